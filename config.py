"""Configuration: one @dataclass per script, filled from a TOML file and command-line flags.

    defaults in the dataclass  <  configs/*.toml (--config PATH)  <  --field value flags

    cfg = load_config(SFTConfig, argv)     # argv: list of strings; None reads sys.argv[1:]
    dump_config(cfg, out_dir / "config.toml")

Field types come from the annotations: int, float, str, bool, Literal[...], Optional[X], list[X]
(a TOML array, or comma-separated text on the command line), a nested dataclass (a TOML table
[name]), and a list of dataclasses (a TOML array of tables [[name]], e.g. SFT stages).
  - Flags: `--name value` or `--name=value`; `-` and `_` are the same; every flag takes a value.
    bool: true/false/1/0 (also yes/no). Optional: the text `none` means None (flags and TOML strings,
    since TOML has no null). Nested fields by dotted path: `--optim.lr 1e-4`, `--stages.0.lr 1e-4`
    (the element must exist; the number and order of stages are set in TOML only).
  - A TOML table [name] changes only the keys it names; an array of tables [[stages]] replaces the
    whole default list, each element built from its table (its missing keys take their defaults).
  - Help text is the field's comment in the dataclass source: the comment lines right above a field
    and the comment after it, continued on comment lines indented further (field(metadata={"help":
    ...}) works too). `--help` prints every field with its type, default and that text.
  - A TOML value must have the field's TOML type: `lr = "2e-3"` (a string) is an error, not 0.002. Only
    the command line's text is converted (and "none" for an Optional, in both).
  - Ranges: a config class may list allowed values as RANGES = {field: interval}, "(0, inf)" for > 0,
    "[0, 1)" for 0 ≤ x < 1, …; a number outside it, NaN or ±inf is an error (a list or tuple: each item).
Every error is one line naming the file (or `command line`) and the key, e.g.
    configs/tiny.toml: unknown key 'lr_sheduler' (valid: lr, warmup_steps, ...)
    configs/tiny.toml: key 'lr' is 'abc', expected float
    configs/tiny.toml: key 'lr' is -0.002, expected a finite number > 0
and load_config raises it as SystemExit(message), so scripts stop with that line and no traceback.
run_cli(main) does the same for the errors a script meets later (a missing data file, a bad record): every
command-line script ends with `if __name__ == "__main__": run_cli(main)`.

Who uses this, and who uses argparse. A config here is a recipe: train_sft.py, train_dpo.py, toy/base.py and
`evaluate.py harness` have many settings, each commented with the value the paper (or lm-eval) uses,
nested tables ([[stages]]), a file in configs/ to run again, and the resolved config saved with the outputs
(the trainers' --resume compares it field by field). The other tools (generate.py, filter.py,
synth/pipeline.py, `evaluate.py mt-bench | mt-bench-show | report`, toy/llm.py, toy/demo.py, download.py) stay
with argparse: their options are the flags of one command, never saved or resumed against, and they need what
argparse has and this module does not: positional arguments, several values for one flag (filter.py --in
a.jsonl b.jsonl), sub-commands (toy/llm.py serve | inputs), store_true switches, and the endpoint flags that
chat_api.add_endpoint_args adds to a parser.
"""
import ast
import dataclasses
import inspect
import io
import json
import math
import os
import signal
import sys
import textwrap
import tokenize
import tomllib
import traceback
import types
import typing

from files import write_text_atomic


# --- types ---------------------------------------------------------------------------------------

def _fields(cls_or_obj):
    return [f for f in dataclasses.fields(cls_or_obj) if f.init]


def _optional_of(tp):
    """X for Optional[X] / X | None, else None."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(tp)) == 2:
            return args[0]
        raise TypeError(f"unsupported union type {tp}")
    return None


def _list_of(tp):
    """X for list[X], else None."""
    return typing.get_args(tp)[0] if typing.get_origin(tp) is list else None


def _type_name(tp):
    if (inner := _optional_of(tp)) is not None:
        return f"{_type_name(inner)} or none"
    if (item := _list_of(tp)) is not None:
        return f"list of {_type_name(item)}"
    if typing.get_origin(tp) is tuple:
        return "(" + ", ".join(_type_name(t) for t in typing.get_args(tp)) + ")"
    if typing.get_origin(tp) is typing.Literal:
        return "one of " + "/".join(str(a) for a in typing.get_args(tp))
    return getattr(tp, "__name__", str(tp))


def _convert(value, tp, source, key, from_text=False):
    """Return value as type tp, or raise ValueError. from_text: value is the command line's text, to be
    parsed; otherwise it comes from TOML and must already have the type (no string → number)."""
    def bad():
        shown = value if isinstance(value, str) else json.dumps(value, default=str)
        quoted = ""
        if isinstance(value, str) and not from_text and (_optional_of(tp) or tp) in (int, float):
            try:
                float(value)
                quoted = ", a string (TOML: write the number without quotes)"
            except ValueError:
                pass
        return ValueError(f"{source}: key '{key}' is '{shown}'{quoted}, expected {_type_name(tp)}")

    text = from_text and isinstance(value, str)
    if (inner := _optional_of(tp)) is not None:
        if isinstance(value, str) and value.strip().lower() in ("none", "null"):   # TOML has no null
            return None
        try:
            return _convert(value, inner, source, key, from_text)
        except ValueError:
            if dataclasses.is_dataclass(inner) or _list_of(inner) is not None:
                raise
            raise bad() from None                                       # "expected int or none"
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ValueError(f"{source}: key '{key}' must be a TOML table [{key}] of {tp.__name__} fields")
        return _from_table(tp, value, source, key + ".")
    if typing.get_origin(tp) is tuple:                                  # fixed length: tuple[float, float]
        items = [v.strip() for v in value.split(",")] if text else value
        if not isinstance(items, list) or len(items) != len(typing.get_args(tp)):
            raise bad()
        return tuple(_convert(v, t, source, f"{key}[{i}]", from_text)
                     for i, (v, t) in enumerate(zip(items, typing.get_args(tp))))
    if (item := _list_of(tp)) is not None:
        if dataclasses.is_dataclass(item):
            if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
                raise ValueError(f"{source}: key '{key}' must be a TOML array of tables [[{key}]]")
            return [_from_table(item, v, source, f"{key}[{i}].") for i, v in enumerate(value)]
        if text:
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list):
            raise bad()
        return [_convert(v, item, source, f"{key}[{i}]", from_text) for i, v in enumerate(value)]
    if typing.get_origin(tp) is typing.Literal:
        choices = {str(c) if text else c: c for c in typing.get_args(tp)}   # --bits 4 matches Literal[4, 8]
        if value not in choices:
            raise bad()
        return choices[value]
    if tp is bool:
        if isinstance(value, bool):
            return value
        words = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}
        if text and value.strip().lower() in words:
            return words[value.strip().lower()]
        raise bad()
    if tp in (int, float):
        if (isinstance(value, bool) or not isinstance(value, (int, float, str)) or (isinstance(value, str) and not text)
                or (tp is int and isinstance(value, float))):
            raise bad()
        try:
            return tp(value.strip() if text else value)
        except ValueError:
            raise bad() from None
    if tp is str:
        if isinstance(value, str):
            return value
        raise bad()
    raise TypeError(f"{key}: config type {tp} is not supported")


def _range_text(spec, tp):
    """'(0, inf)' → 'a finite number > 0'; '[1, inf)' for an int → 'an integer ≥ 1'; '[0, 1)' → 'a number in
    [0, 1)'."""
    lo, hi = (float(x) for x in spec[1:-1].split(","))
    kind = "an integer" if tp is int else "a finite number" if math.isinf(hi) else "a number"
    if math.isinf(hi):
        return f"{kind} {'>' if spec[0] == '(' else '≥'} {lo:g}"
    return f"{kind} in {spec}"


def _check_range(cls, name, value, source, key):
    """ValueError naming source and key unless value (each item of a list or tuple) lies in cls.RANGES[name]."""
    spec = getattr(cls, "RANGES", {}).get(name)
    if spec is None or value is None:
        return
    lo, hi = (float(x) for x in spec[1:-1].split(","))
    items = list(enumerate(value)) if isinstance(value, (list, tuple)) else [(None, value)]
    for i, v in items:
        inside = (lo < v if spec[0] == "(" else lo <= v) and (v < hi if spec[-1] == ")" else v <= hi)
        if not (math.isfinite(v) and inside):
            where = key if i is None else f"{key}[{i}]"
            raise ValueError(f"{source}: key '{where}' is {v}, expected {_range_text(spec, type(v))}")


def _unknown(source, key, cls, flag=False):
    valid = ", ".join(f.name for f in _fields(cls))
    return ValueError(f"{source}: unknown {'flag' if flag else 'key'} '{key}' (valid: {valid})")


def _from_table(cls, table, source, prefix="", base=None):
    """Build cls from a TOML table; keys absent from the table come from base, else cls's defaults."""
    hints, names = typing.get_type_hints(cls), {f.name for f in _fields(cls)}
    kwargs = {f.name: getattr(base, f.name) for f in _fields(cls)} if base is not None else {}
    for key, value in table.items():
        if key not in names:
            raise _unknown(source, prefix + key, cls)
        tp = hints[key]
        if dataclasses.is_dataclass(tp) and isinstance(value, dict) and key in kwargs:
            kwargs[key] = _from_table(tp, value, source, prefix + key + ".", base=kwargs[key])
        else:
            kwargs[key] = _convert(value, tp, source, prefix + key)
            _check_range(cls, key, kwargs[key], source, prefix + key)
    required = [f.name for f in _fields(cls) if f.name not in kwargs
                and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if required:
        raise ValueError(f"{source}: {prefix.rstrip('.') or cls.__name__} is missing key(s) {', '.join(required)}")
    return cls(**kwargs)


def _set_flag(cfg, dotted, text):
    """Apply `--a.b.c text` to cfg in place; lists of dataclasses are addressed by index (--stages.0.lr)."""
    source = "command line"
    obj, parts = cfg, dotted.split(".")
    for i, part in enumerate(parts):
        where = ".".join(parts[:i + 1])
        if isinstance(obj, list):
            if not part.isdigit() or int(part) >= len(obj):
                raise ValueError(f"{source}: flag '--{dotted}': '{part}' is not an index of {where.rsplit('.', 1)[0]} "
                                 f"(0..{len(obj) - 1}; add elements in TOML)")
            if i == len(parts) - 1:
                raise ValueError(f"{source}: flag '--{dotted}' sets a whole table; set a field of it")
            obj = obj[int(part)]
            continue
        if part not in {f.name for f in _fields(obj)}:
            raise _unknown(source, "--" + where, type(obj), flag=True)
        tp = typing.get_type_hints(type(obj))[part]
        if i == len(parts) - 1:
            if dataclasses.is_dataclass(tp) or dataclasses.is_dataclass(_list_of(tp)):
                field_path = f"--{dotted}.FIELD" if dataclasses.is_dataclass(tp) else f"--{dotted}.N.FIELD"
                raise ValueError(f"{source}: flag '--{dotted}' names a table; set its fields ({field_path}) "
                                 f"or write it in the TOML file")
            value = _convert(text, tp, source, dotted, from_text=True)
            _check_range(type(obj), part, value, source, dotted)
            setattr(obj, part, value)
        else:
            obj = getattr(obj, part)


def _rebuild(obj):
    """Re-create every dataclass from its fields so that each __post_init__ checks the final values."""
    if isinstance(obj, list):
        return [_rebuild(v) for v in obj]
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return type(obj)(**{f.name: _rebuild(getattr(obj, f.name)) for f in _fields(obj)})
    return obj


# --- the entry point -------------------------------------------------------------------------------

def load_config(cls, argv=None, prog=None):
    """Return a cls instance: dataclass defaults < --config TOML < --field value flags. Every field of
    cls needs a default (the recipe's value). `--help` prints the fields and exits 0; any error raises
    SystemExit with one line; __post_init__ runs on the final values, so its checks apply to all three."""
    argv = list(sys.argv[1:] if argv is None else argv)
    prog = prog or os.path.basename(sys.argv[0] or "script")
    if "--help" in argv or "-h" in argv:
        print(format_help(cls, prog))
        raise SystemExit(0)
    try:
        path, flags, i = None, [], 0
        while i < len(argv):
            arg = argv[i]
            if not arg.startswith("--") or arg == "--":
                raise ValueError(f"command line: unexpected argument '{arg}' (flags are --field value)")
            name, eq, value = arg[2:].partition("=")
            if not eq:
                if i + 1 >= len(argv):
                    raise ValueError(f"command line: flag '--{name}' needs a value")
                value, i = argv[i + 1], i + 1
            i += 1
            name = name.replace("-", "_")
            if name == "config":
                path = value
            else:
                flags.append((name, value))
        cfg = cls()
        if path is not None:
            try:
                with open(path, "rb") as f:
                    table = tomllib.load(f)
            except OSError as e:
                raise ValueError(f"{path}: cannot read config file ({e.strerror})") from None
            except tomllib.TOMLDecodeError as e:
                raise ValueError(f"{path}: invalid TOML: {e}") from None
            cfg = _from_table(cls, table, path, base=cfg)
        for name, value in flags:
            _set_flag(cfg, name, value)
        return _rebuild(cfg)
    except ValueError as e:
        raise SystemExit(str(e)) from None


def run_cli(main, argv=None):
    """Run a script's main(argv) as a command and exit with its status (None: 0). The errors bezoar raises
    for bad input, ValueError and OSError (a missing or unreadable file), end the run with their one line
    on stderr and status 1, as SystemExit messages do; `--debug` anywhere on the command line (removed
    before main sees it) shows the traceback as well. Anything else is a bug and keeps its traceback."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    try:
        status = main(argv)
    except SystemExit as e:
        if debug and not isinstance(e.code, (int, type(None))):
            traceback.print_exc()
        raise
    except (ValueError, OSError) as e:
        if debug:
            raise
        raise SystemExit(" ".join(str(e).splitlines()) or type(e).__name__) from None
    except KeyboardInterrupt:
        if debug:
            raise
        print("interrupted", file=sys.stderr)
        raise SystemExit(130) from None
    # Everything is done and saved: a SIGINT or SIGTERM now would only make the interpreter's exit look
    # like a failure (status −15), so they are ignored for the last moments.
    for s in (signal.SIGINT, signal.SIGTERM):
        signal.signal(s, signal.SIG_IGN)
    raise SystemExit(status or 0)


# --- help text from the source's comments --------------------------------------------------------

def field_comments(cls):
    """{field name: help text} from metadata["help"], else the comments around the field in the source."""
    try:
        source = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):
        source = ""
    comments = {}                                                       # line → (column, text, own line?)
    if source:
        lines = source.splitlines()
        for tok in tokenize.generate_tokens(io.StringIO(source).readline):
            if tok.type == tokenize.COMMENT:
                row, col = tok.start
                own_line = not lines[row - 1][:col].strip()
                comments[row] = (col, tok.string.lstrip("#").strip(), own_line)
    body = ast.parse(source).body[0].body if source else []
    helps = {}
    for node in body:
        if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
            continue
        col, text = node.col_offset, []
        row = node.lineno - 1                                           # comment lines right above
        while row in comments and comments[row][2] and comments[row][0] == col:
            text.insert(0, comments[row][1])
            row -= 1
        text += [comments[r][1] for r in range(node.lineno, node.end_lineno + 1)
                 if r in comments and not comments[r][2]]               # after the code on its lines
        row = node.end_lineno + 1                                       # continued, indented further
        while row in comments and comments[row][2] and comments[row][0] > col:
            text.append(comments[row][1])
            row += 1
        helps[node.target.id] = " ".join(t for t in text if t)
    for f in dataclasses.fields(cls):
        if "help" in f.metadata:
            helps[f.name] = f.metadata["help"]
    return helps


def _default_text(f):
    if f.default is not dataclasses.MISSING:
        value = f.default
    elif f.default_factory is not dataclasses.MISSING:
        value = f.default_factory()
    else:
        return "required"
    if dataclasses.is_dataclass(value) or (isinstance(value, list) and value and dataclasses.is_dataclass(value[0])):
        return "see TOML"
    if isinstance(value, (list, tuple)):
        return ",".join(str(v) for v in value) or "(empty)"
    if value is None or isinstance(value, bool):
        return str(value).lower()
    return str(value) if value != "" else '""'


def _help_lines(cls, prefix, indent):
    lines, helps, hints = [], field_comments(cls), typing.get_type_hints(cls)
    nested = []
    for f in _fields(cls):
        tp = hints[f.name]
        lines.append(f"{indent}--{prefix}{f.name} {_type_name(tp)} = {_default_text(f)}")
        if helps.get(f.name):
            lines += [indent + "      " + ln for ln in textwrap.wrap(helps[f.name], 94 - len(indent))]
        if dataclasses.is_dataclass(tp):
            nested.append((f"[{prefix}{f.name}] table, flags --{prefix}{f.name}.FIELD", tp, f"{prefix}{f.name}."))
        elif dataclasses.is_dataclass(_list_of(tp)):
            nested.append((f"[[{prefix}{f.name}]] array of tables, flags --{prefix}{f.name}.N.FIELD",
                           _list_of(tp), f"{prefix}{f.name}.N."))
    for title, sub, sub_prefix in nested:
        lines += ["", f"{indent}{title}:"] + _help_lines(sub, sub_prefix, indent + "  ")
    return lines


def format_help(cls, prog="script"):
    """The --help text: usage, the class docstring, then every field with type, default and comment."""
    doc = inspect.getdoc(cls) or ""
    if doc.startswith(cls.__name__ + "("):                              # dataclass's generated signature
        doc = ""
    head = [f"usage: {prog} [--config PATH.toml] [--field value ...]",
            "precedence: defaults < --config TOML < flags; bool: true/false; lists: a,b,c; Optional: none"]
    return "\n".join(head + ([doc] if doc else []) + ["", "fields:"] + _help_lines(cls, "", "  "))


# --- saving the resolved config ----------------------------------------------------------------------

def config_to_dict(cfg):
    """Plain dict (nested dicts and lists) of a config, for JSON logs."""
    return dataclasses.asdict(cfg)


def _toml_value(v):
    if v is None:
        return '"none"'
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return ("nan" if math.isnan(v) else "inf" if v > 0 else "-inf") if not math.isfinite(v) else repr(v)
    if isinstance(v, int):
        return str(v)
    if isinstance(v, str):
        return json.dumps(v).replace("\x7f", "\\u007f")                # TOML basic string ⊇ JSON escapes
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    raise TypeError(f"cannot write {type(v).__name__} to TOML")


def _toml_lines(d, prefix=""):
    """Scalars first, then [tables] and [[arrays of tables]] (TOML puts keys after a header in it)."""
    def is_table_list(v):
        return isinstance(v, list) and v and all(isinstance(x, dict) for x in v)
    lines = [f"{k} = {_toml_value(v)}" for k, v in d.items() if not isinstance(v, dict) and not is_table_list(v)]
    for k, v in d.items():
        if isinstance(v, dict):
            lines += ["", f"[{prefix}{k}]"] + _toml_lines(v, f"{prefix}{k}.")
        elif is_table_list(v):
            for item in v:
                lines += ["", f"[[{prefix}{k}]]"] + _toml_lines(item, f"{prefix}{k}.")
    return lines


def dump_config(cfg, path):
    """Write the resolved config atomically: TOML (loadable again with --config) or, for *.json, JSON."""
    d = config_to_dict(cfg)
    text = json.dumps(d, indent=2) if str(path).endswith(".json") else "\n".join(_toml_lines(d))
    write_text_atomic(path, text + "\n")
