"""config.py: defaults < TOML < flags, one-line errors naming file and key, stages from [[stages]],
--help from the dataclass comments, and a saved config that loads back to the same values."""
import json
from dataclasses import dataclass, field
from typing import Literal, Optional

import pytest

from config import dump_config, field_comments, format_help, load_config


@dataclass
class Stage:
    name: str                          # data set of this stage: lamini | orca | evol_instruct
    lr: float = 2e-4                   # peak learning rate of this stage
    epochs: int = 1


@dataclass
class Optim:
    weight_decay: float = 0.0          # AdamW weight decay
    betas: tuple[float, float] = (0.9, 0.999)


@dataclass
class ToyConfig:
    """A config shaped like the scripts' ones."""
    # peak learning rate after warmup;
    # QLoRA used 2e-4
    lr: float = 2e-4
    warmup_steps: int = 10             # linear warmup length in optimizer steps
                                       # (not a fraction of the run)
    schedule: Literal["cosine", "linear", "constant"] = "cosine"  # decay after warmup
    compile: bool = False
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj"])  # LoRA targets
    max_steps: Optional[int] = None    # stop after this many steps
    device: Optional[str] = None
    seed: int = 0
    bits: Literal[4, 8] = 4            # weight bits of the frozen base
    optim: Optim = field(default_factory=Optim)  # optimiser settings
    stages: list[Stage] = field(default_factory=lambda: [Stage("lamini"), Stage("orca")])  # SFT stages
    note: str = field(default="", metadata={"help": "free text kept with the run"})

    def __post_init__(self):
        if self.lr <= 0:
            raise ValueError(f"lr must be positive, got {self.lr}")


def write(tmp_path, text, name="run.toml"):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def error_of(argv):
    with pytest.raises(SystemExit) as e:
        load_config(ToyConfig, argv)
    message = str(e.value)
    assert "\n" not in message, "errors are one line"
    return message


def test_flags_override_toml_which_overrides_defaults(tmp_path):
    path = write(tmp_path, "lr = 1e-4\nwarmup_steps = 5\n")
    cfg = load_config(ToyConfig, ["--config", path, "--warmup_steps", "7"])
    assert cfg.lr == 1e-4                       # TOML over the default 2e-4
    assert cfg.warmup_steps == 7                # flag over TOML's 5
    assert cfg.seed == 0                        # untouched default
    assert load_config(ToyConfig, []) == ToyConfig()


def test_flag_forms_equals_space_and_hyphen_are_the_same():
    a = load_config(ToyConfig, ["--warmup-steps=3", "--lr", "0.5"])
    b = load_config(ToyConfig, ["--warmup_steps", "3", "--lr=0.5"])
    assert a == b and a.warmup_steps == 3 and a.lr == 0.5


def test_types_come_from_annotations():
    cfg = load_config(ToyConfig, ["--compile", "TRUE", "--target_modules", "q_proj, v_proj", "--max_steps", "12",
                                  "--schedule", "linear", "--optim.betas", "0.8,0.95", "--note", "a b"])
    assert cfg.compile is True and cfg.target_modules == ["q_proj", "v_proj"] and cfg.max_steps == 12
    assert cfg.schedule == "linear" and cfg.optim.betas == (0.8, 0.95) and cfg.note == "a b"
    for word, value in [("true", True), ("1", True), ("false", False), ("0", False)]:
        assert load_config(ToyConfig, ["--compile", word]).compile is value
    assert load_config(ToyConfig, ["--max_steps", "12", "--max_steps", "none"]).max_steps is None
    assert load_config(ToyConfig, ["--target_modules", ""]).target_modules == []
    assert load_config(ToyConfig, ["--bits", "8"]).bits == 8


def test_toml_arrays_and_tables_set_lists_and_nested_fields(tmp_path):
    path = write(tmp_path, 'target_modules = ["o_proj"]\nlr = 1\n[optim]\nweight_decay = 0.1\n')
    cfg = load_config(ToyConfig, ["--config", path])
    assert cfg.target_modules == ["o_proj"]
    assert cfg.lr == 1.0 and isinstance(cfg.lr, float)           # a TOML integer is a fine float
    assert cfg.optim == Optim(weight_decay=0.1)                   # betas keeps its default


def test_unknown_toml_key_names_the_file_and_lists_valid_keys(tmp_path):
    path = write(tmp_path, "lr_sheduler = 'cosine'\n")
    message = error_of(["--config", path])
    assert message.startswith(f"{path}: unknown key 'lr_sheduler' (valid: lr, warmup_steps, schedule, ")
    assert message.endswith("stages, note)")


def test_unknown_flag_lists_valid_keys():
    assert error_of(["--lr_sheduler", "x"]).startswith("command line: unknown flag '--lr_sheduler' (valid: lr, ")
    assert "unknown flag '--optim.wd' (valid: weight_decay, betas)" in error_of(["--optim.wd", "1"])


def test_bad_type_names_file_key_value_and_expected_type(tmp_path):
    path = write(tmp_path, "lr = 'abc'\n")
    assert error_of(["--config", path]) == f"{path}: key 'lr' is 'abc', expected float"
    path = write(tmp_path, "warmup_steps = 2.5\n")
    assert error_of(["--config", path]) == f"{path}: key 'warmup_steps' is '2.5', expected int"
    path = write(tmp_path, "compile = 1\n")
    assert error_of(["--config", path]) == f"{path}: key 'compile' is '1', expected bool"
    assert error_of(["--lr", "abc"]) == "command line: key 'lr' is 'abc', expected float"
    assert error_of(["--compile", "maybe"]) == "command line: key 'compile' is 'maybe', expected bool"
    assert error_of(["--schedule", "cos"]) == \
        "command line: key 'schedule' is 'cos', expected one of cosine/linear/constant"
    assert error_of(["--bits", "5"]) == "command line: key 'bits' is '5', expected one of 4/8"
    assert error_of(["--max_steps", "ten"]) == "command line: key 'max_steps' is 'ten', expected int or none"


def test_malformed_command_lines_and_files_are_one_line_errors(tmp_path):
    assert error_of(["--lr"]) == "command line: flag '--lr' needs a value"
    assert "unexpected argument 'lr'" in error_of(["lr", "1"])
    missing = str(tmp_path / "nope.toml")
    assert error_of(["--config", missing]).startswith(f"{missing}: cannot read config file")
    path = write(tmp_path, "lr = = 1\n")
    assert error_of(["--config", path]).startswith(f"{path}: invalid TOML")


def test_stages_come_from_a_toml_array_of_tables(tmp_path):
    path = write(tmp_path, '[[stages]]\nname = "lamini"\nlr = 1e-4\n\n'
                           '[[stages]]\nname = "orca"\n\n[[stages]]\nname = "evol_instruct"\nepochs = 3\n')
    cfg = load_config(ToyConfig, ["--config", path])
    assert cfg.stages == [Stage("lamini", 1e-4), Stage("orca"), Stage("evol_instruct", epochs=3)]


def test_stage_errors_name_the_stage_and_key(tmp_path):
    path = write(tmp_path, '[[stages]]\nname = "a"\n[[stages]]\nname = "b"\nlrr = 1\n')
    assert error_of(["--config", path]).startswith(f"{path}: unknown key 'stages[1].lrr' (valid: name, lr, epochs)")
    path = write(tmp_path, '[[stages]]\nlr = 1e-4\n')
    assert error_of(["--config", path]) == f"{path}: stages[0] is missing key(s) name"
    path = write(tmp_path, '[[stages]]\nname = "a"\nepochs = "two"\n')
    assert error_of(["--config", path]) == f"{path}: key 'stages[0].epochs' is 'two', expected int"


def test_a_flag_sets_one_field_of_one_stage(tmp_path):
    cfg = load_config(ToyConfig, ["--stages.1.lr", "5e-5"])
    assert cfg.stages == [Stage("lamini"), Stage("orca", lr=5e-5)]
    assert "'5' is not an index of stages (0..1" in error_of(["--stages.5.lr", "1"])
    assert "names a table" in error_of(["--stages", "x"])
    assert "unknown flag '--stages.0.lrr' (valid: name, lr, epochs)" in error_of(["--stages.0.lrr", "1"])


def test_post_init_checks_the_final_values():
    assert error_of(["--lr", "-1"]) == "lr must be positive, got -1.0"


def test_field_comments_read_above_trailing_continued_and_metadata():
    helps = field_comments(ToyConfig)
    assert helps["lr"] == "peak learning rate after warmup; QLoRA used 2e-4"
    assert helps["warmup_steps"] == "linear warmup length in optimizer steps (not a fraction of the run)"
    assert helps["schedule"] == "decay after warmup"
    assert helps["compile"] == ""
    assert helps["note"] == "free text kept with the run"
    assert field_comments(Stage)["name"] == "data set of this stage: lamini | orca | evol_instruct"


def test_help_lists_every_field_with_its_comment_and_exits_0(capsys):
    with pytest.raises(SystemExit) as e:
        load_config(ToyConfig, ["--lr", "1", "--help"], prog="train_toy.py")
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: train_toy.py [--config PATH.toml]")
    assert "A config shaped like the scripts' ones." in out
    assert "--lr float = 0.0002\n        peak learning rate after warmup; QLoRA used 2e-4" in out
    assert "--schedule one of cosine/linear/constant = cosine" in out
    assert "[[stages]] array of tables, flags --stages.N.FIELD" in out
    assert "--stages.N.name str = required" in out
    assert "data set of this stage" in out
    assert out == format_help(ToyConfig, "train_toy.py") + "\n"


def test_dumped_toml_loads_back_to_the_same_config(tmp_path):
    cfg = load_config(ToyConfig, ["--stages.0.lr", "1e-5", "--max_steps", "4", "--note", 'say "hi"\n\\',
                                  "--optim.betas", "0.5,0.25", "--target_modules", "q_proj"])
    dump_config(cfg, tmp_path / "config.toml")
    assert load_config(ToyConfig, ["--config", str(tmp_path / "config.toml")]) == cfg
    assert load_config(ToyConfig, ["--config", str(dump_config_path(ToyConfig(), tmp_path))]) == ToyConfig()
    dump_config(cfg, tmp_path / "config.json")
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["stages"][0] == {"name": "lamini", "lr": 1e-5, "epochs": 1} and saved["max_steps"] == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "config.toml", "defaults.toml"]


def dump_config_path(cfg, tmp_path):
    path = tmp_path / "defaults.toml"                             # max_steps None is written as "none"
    dump_config(cfg, path)
    return path


@dataclass
class Ranged:
    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.999)
    batch_size: int = 1
    label_smoothing: float = 0.0
    warmup: Optional[int] = None
    stages: list[Stage] = field(default_factory=lambda: [Stage("lamini")])
    RANGES = {"lr": "(0, inf)", "betas": "[0, 1)", "batch_size": "[1, inf)", "label_smoothing": "[0, 0.5)",
              "warmup": "[0, inf)"}


def ranged_error(argv):
    with pytest.raises(SystemExit) as e:
        load_config(Ranged, argv)
    return str(e.value)


def test_values_outside_their_range_are_one_line_errors_naming_file_key_and_range(tmp_path):
    for text, shown in (("-2e-3", "-0.002"), ("0", "0.0"), ("nan", "nan"), ("inf", "inf")):
        path = write(tmp_path, f"lr = {text}\n")
        assert ranged_error(["--config", path]) == f"{path}: key 'lr' is {shown}, expected a finite number > 0"
        assert ranged_error(["--lr", text]) == f"command line: key 'lr' is {shown}, expected a finite number > 0"
    path = write(tmp_path, "betas = [0.9, 1.0]\n")
    assert ranged_error(["--config", path]) == f"{path}: key 'betas[1]' is 1.0, expected a number in [0, 1)"
    assert ranged_error(["--betas", "-0.1,0.9"]) == "command line: key 'betas[0]' is -0.1, expected a number in [0, 1)"
    assert ranged_error(["--label_smoothing", "0.5"]) == \
        "command line: key 'label_smoothing' is 0.5, expected a number in [0, 0.5)"
    path = write(tmp_path, "batch_size = 0\n")
    assert ranged_error(["--config", path]) == f"{path}: key 'batch_size' is 0, expected an integer ≥ 1"
    assert ranged_error(["--warmup", "-1"]) == "command line: key 'warmup' is -1, expected an integer ≥ 0"
    cfg = load_config(Ranged, ["--warmup", "none", "--lr", "0.5", "--betas", "0,0.5", "--label_smoothing", "0.25"])
    assert (cfg.warmup, cfg.lr, cfg.betas, cfg.label_smoothing) == (None, 0.5, (0.0, 0.5), 0.25)   # the bounds


def test_toml_strings_are_not_numbers_bools_or_lists(tmp_path):
    path = write(tmp_path, 'lr = "2e-3"\n')
    assert ranged_error(["--config", path]) == \
        f"{path}: key 'lr' is '2e-3', a string (TOML: write the number without quotes), expected float"
    path = write(tmp_path, '[[stages]]\nname = "a"\nepochs = "2"\n')
    assert ranged_error(["--config", path]).startswith(f"{path}: key 'stages[0].epochs' is '2', a string")
    path = write(tmp_path, 'warmup = "3"\n')
    assert ranged_error(["--config", path]).startswith(f"{path}: key 'warmup' is '3', a string")
    path = write(tmp_path, 'compile = "true"\n')
    assert error_of(["--config", path]) == f"{path}: key 'compile' is 'true', expected bool"
    path = write(tmp_path, 'target_modules = "q_proj"\n')
    assert error_of(["--config", path]) == f"{path}: key 'target_modules' is 'q_proj', expected list of str"
    path = write(tmp_path, 'bits = "4"\n')
    assert error_of(["--config", path]) == f"{path}: key 'bits' is '4', expected one of 4/8"
    path = write(tmp_path, 'max_steps = "none"\nbits = 8\n')               # TOML has no null: "none" is None
    cfg = load_config(ToyConfig, ["--config", path])
    assert cfg.max_steps is None and cfg.bits == 8


def test_the_scripts_ranges_name_their_fields_and_hold_their_defaults():
    import dataclasses
    import math

    from toy.base import BaseConfig
    from train_dpo import DPOConfig
    from train_sft import SFTConfig, Stage as SFTStage
    for cls in (SFTConfig, SFTStage, DPOConfig, BaseConfig):
        fields = {f.name: f for f in dataclasses.fields(cls)}
        assert set(cls.RANGES) <= set(fields), set(cls.RANGES) - set(fields)
        defaults = cls() if cls is not SFTStage else cls(data=["x.jsonl"])
        for name, spec in cls.RANGES.items():
            lo, hi = (float(x) for x in spec[1:-1].split(","))
            value = getattr(defaults, name)
            for v in (value if isinstance(value, tuple) else [value]):
                if v is not None:
                    assert math.isfinite(v) and (lo < v if spec[0] == "(" else lo <= v) and \
                        (v < hi if spec[-1] == ")" else v <= hi), (cls.__name__, name, v)
    assert SFTConfig.RANGES["lr"] == DPOConfig.RANGES["lr"] == "(0, inf)" and DPOConfig.RANGES["beta"] == "(0, inf)"
    assert DPOConfig.RANGES["label_smoothing"] == "[0, 0.5)" and SFTConfig.RANGES["betas"] == "[0, 1)"
