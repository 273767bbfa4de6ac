"""SFT examples: read instruction data into (prompt, response) pairs, then tokenise them into input_ids/labels.

Sources (all JSONL, one JSON object per line; a name ending in .gz is read through gzip):

  format          instruction       input    response             system            written by
  generated       instruction       input    response             system            generate.py / filter.py
  lamini          instruction       -        response             -                 SurgeGlobal LaMini export
  evol_instruct   instruction       -        response             -                 SurgeGlobal Evol-Instruct export
  orca            inputs            -        explained_targets    system_message    SurgeGlobal Orca export

The generated schema (synth/SCHEMA.md; generate.py writes it, filter.py keeps it): one record per line with
    id (str), scheme ("lamini" | "evol" | "orca"), instruction (str), input (str, may be ""),
    response (str), system (str, "" or null → the default system sentence),
plus scheme metadata and judge fields (judge_rating, judge_reason, …), which this reader ignores. filter.py's
output for the released sets is in this schema too (it maps their columns and keeps the originals).
The released SurgeGlobal sets are read from JSONL exports of their columns (no parquet, so no pyarrow):
LaMini (instruction, source, response, judge columns), Evol-Instruct (instruction, response, category,
evolution_strategy, in-depth-evolving_operation, epoch), Orca (original_index, inputs, targets, task_source,
task_name, template_type, system_message, explained_targets, judge columns). Orca's `targets` is the short
Flan answer; the response we train on is the generator's `explained_targets`. format="auto" picks the format
from the first record's columns: `scheme` → generated, `explained_targets` → orca, `evolution_strategy` →
evol_instruct, otherwise lamini (instruction + response). HH-RLHF dialogues are read by data/hh.py.

Choices:
  - System message: an empty or missing one means the default sentence (DEFAULT_SYSTEM), for every source.
    OpenBezoar's template always has a system section and uses the default "most of the time"; Orca's
    "empty system message" variant means "no special instructions", which is what the default says.
  - Judge columns are not read here: thresholds belong to filter.py, whose output this module reads.
  - Rejected and counted, never dropped silently: an empty (whitespace-only) response, an empty instruction.
    A line that is not a JSON object, or lacks a column / has one of the wrong type, is a ValueError naming
    file:line; with skip_bad=True it is counted as "bad line" instead.
Every reader returns (examples, stats); print(stats) gives "read 1504, used 1503, empty response 1 (…)".

Tokenisation (tokenize_example), the same convention as the DPO pairs in data/batching.py:
    input_ids = encode(prompt, bos=True) + encode(response, bos=False, eos=True)
    labels    = [-100] * len(prompt ids)  + response ids (EOS included)
The prompt and the response are encoded separately and concatenated (as the qlora reference does), so the
boundary between them is exact: the first label is the response's first token, never a piece that straddles
"### Response:\\n" and the response. (SentencePiece's dummy prefix makes the response's first piece "▁word", as at
the start of any text; training and generation agree on it.) Labels are not shifted here (losses.py shifts them).
Too long (len > max_len), in this order:
  1. the response is kept whole unless it leaves fewer than min(len(prompt ids), min_prompt_len) tokens for
     the prompt; then it is cut on the right (its EOS is lost: the model is not taught to stop there) and
     counted as "truncated response";
  2. the prompt is cut from the left to fit, keeping BOS at position 0 (OpenLLaMA always saw BOS first), and
     counted as "truncated prompt". The end of the prompt ("### Response:\\n") and the response survive.
"""

import os
from dataclasses import dataclass

from data.template import format_prompt
from files import iter_jsonl
from losses import IGNORE_INDEX


@dataclass
class Example:
    """One SFT example: the template-formatted prompt (ends with "### Response:\\n") and the target response."""
    prompt: str
    response: str
    id: str       # the record's own id, else "file:line"
    source: str   # generated: the record's scheme; released: the format name; HH: "hh-rlhf/<subset>"


class DataStats:
    """Counts of what a reader or tokeniser did, so that nothing is dropped without a number.

    stats.add("empty response", where="lamini.jsonl:12"); stats["empty response"] → 1
    str(stats) → "lamini: read 1504, used 1503, empty response 1 (first at lamini.jsonl:12)"
    Keys appear in the order they were first counted; the first few locations of each are kept."""

    KEEP_WHERE = 3

    def __init__(self, name=""):
        self.name = name
        self.counts = {}   # key → count, insertion-ordered
        self.where = {}    # key → up to KEEP_WHERE "file:line" locations

    def add(self, key, n=1, where=None):
        self.counts[key] = self.counts.get(key, 0) + n
        if where is not None and len(self.where.setdefault(key, [])) < self.KEEP_WHERE:
            self.where[key].append(where)

    def __getitem__(self, key):
        return self.counts.get(key, 0)

    def __str__(self):
        parts = []
        for key, n in self.counts.items():
            at = self.where.get(key)
            parts.append(f"{key} {n}" + (f" (first at {', '.join(at)})" if at else ""))
        return (f"{self.name}: " if self.name else "") + ", ".join(parts)


# --- reading JSONL ---

def read_records(paths, stats, skip_bad=False, first_n=None):
    """Yield (where, record) for every non-blank line of each file in turn; where = "path:line".

    paths: one path or a list, read in the given order (files.iter_jsonl: .gz through gzip, errors naming
    path:line). first_n: stop after that many records (non-blank lines, counted across files before any
    filtering). Each is counted as "read"; a line that is not a JSON object raises ValueError naming
    path:line, or with skip_bad is counted as "bad line"."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    for path in paths:
        if first_n is not None and stats["read"] >= first_n:
            return
        for number, record in iter_jsonl(path, skip_bad):
            stats.add("read")
            where = f"{path}:{number}"
            if record is None:                          # a bad line, skipped (skip_bad)
                stats.add("bad line", where=where)
            else:
                yield where, record
            if first_n is not None and stats["read"] >= first_n:
                return                                  # lines past first_n are never read, nor checked


def field(record, name, where, optional=False):
    """record[name] as a str; ValueError naming where and the field unless it is a str (or, if optional,
    missing/null, which gives "")."""
    value = record.get(name)
    if value is None and optional:
        return ""
    if not isinstance(value, str):
        got = "missing" if name not in record else type(value).__name__
        raise ValueError(f"{where}: field {name!r} is {got}, expected a string")
    return value


# format → (instruction column, input column, response column, system column); None = the format has none
FORMATS = {
    "generated": ("instruction", "input", "response", "system"),
    "lamini": ("instruction", None, "response", None),
    "evol_instruct": ("instruction", None, "response", None),
    "orca": ("inputs", None, "explained_targets", "system_message"),
}


def detect_format(record, where):
    """Format name from one record's columns (see the module docstring)."""
    if "scheme" in record:
        return "generated"
    if "explained_targets" in record:
        return "orca"
    if "evolution_strategy" in record:
        return "evol_instruct"
    if "instruction" in record and "response" in record:
        return "lamini"
    raise ValueError(f"{where}: cannot tell the data format from the columns {sorted(record)}; expected "
                     f"generate.py's (scheme, instruction, input, response, system) or a SurgeGlobal export "
                     f"(instruction/response, or Orca's inputs/explained_targets/system_message)")


def sft_examples(paths, format="auto", skip_bad=False, first_n=None):
    """Read SFT examples from JSONL files. Returns (list[Example], DataStats).

    format: "auto" (detected per file from its first record) or one of FORMATS."""
    if format != "auto" and format not in FORMATS:
        raise ValueError(f"sft_examples: format={format!r}; expected 'auto' or one of {sorted(FORMATS)}")
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    stats, examples = DataStats(", ".join(os.path.basename(str(p)) for p in paths)), []
    for path in paths:
        path_format = None if format == "auto" else format
        for where, record in read_records(path, stats, skip_bad, first_n):
            try:
                path_format = path_format or detect_format(record, where)
                instruction_col, input_col, response_col, system_col = FORMATS[path_format]
                instruction = field(record, instruction_col, where)
                input = field(record, input_col, where, optional=True) if input_col else ""
                response = field(record, response_col, where)
                system = field(record, system_col, where, optional=True) if system_col else ""
                source = field(record, "scheme", where) if path_format == "generated" else path_format
                record_id = record.get("id")
            except ValueError:
                if not skip_bad:
                    raise
                stats.add("bad line", where=where)
                continue
            if not instruction.strip():
                stats.add("empty instruction", where=where)
                continue
            if not response.strip():
                stats.add("empty response", where=where)
                continue
            prompt = format_prompt(instruction, input, system if system.strip() else None)
            examples.append(Example(prompt, response.strip(), str(record_id) if record_id is not None else where,
                                    source))
            stats.add("used")
        if first_n is not None and stats["read"] >= first_n:
            break
    return examples, stats


# --- tokenising ---

def keep_tail(ids, n):
    """ids (starting with BOS) cut from the left to n tokens, BOS kept: [ids[0]] + ids[-(n-1):]."""
    assert n >= 1 and len(ids) >= n
    return ids[:1] + ids[len(ids) - (n - 1):]


def tokenize_example(tok, ex, max_len, min_prompt_len=64, stats=None):
    """Example → {"input_ids": list[int], "labels": list[int]} of equal length ≤ max_len.

    input_ids = [BOS] prompt ids + response ids + [EOS]; labels = -100 on the prompt, the ids on the response
    (EOS included). Truncation rules and their counters ("truncated response", "truncated prompt") are in the
    module docstring; pass a DataStats to collect them."""
    if not 2 <= min_prompt_len < max_len:
        raise ValueError(f"tokenize_example: need 2 <= min_prompt_len < max_len, got {min_prompt_len}, {max_len}")
    prompt = tok.encode(ex.prompt, bos=True)                           # [P], BOS first
    response = tok.encode(ex.response, bos=False, eos=True)            # [R], EOS last
    if len(prompt) + len(response) > max_len:
        room = max_len - min(len(prompt), min_prompt_len)
        if len(response) > room:
            response = response[:room]
            if stats is not None:
                stats.add("truncated response", where=ex.id)
        if len(prompt) + len(response) > max_len:
            prompt = keep_tail(prompt, max_len - len(response))
            if stats is not None:
                stats.add("truncated prompt", where=ex.id)
    return {"input_ids": prompt + response, "labels": [IGNORE_INDEX] * len(prompt) + response}


def tokenize_examples(tok, examples, max_len, min_prompt_len=64):
    """tokenize_example over a list. Returns (rows, DataStats with "tokenized" and the truncation counts)."""
    stats = DataStats("tokenize")
    stats.add("tokenized", len(examples))
    rows = [tokenize_example(tok, ex, max_len, min_prompt_len, stats) for ex in examples]
    return rows, stats
