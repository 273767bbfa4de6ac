"""Harness tasks: readers for the benchmarks' original files, few-shot contexts, the Open LLM Leaderboard preset.

Each task is written the way lm-evaluation-harness 0.4 (lm_eval/tasks/*/*.yaml) formulates it, so a
context/continuation pair here is the pair the harness builds:

    context  = description + Σ_shots (query + target_delimiter + answer + fewshot_delimiter) + query
    requests = [(context, target_delimiter + choice) for each choice]          multiple choice
               [(shots + query + choice, target_delimiter + answer) for each choice]  Winogrande (partial)
               (context, stop strings)                                        generative (GSM8K)

with target_delimiter " " and fewshot_delimiter "\\n\\n" unless a task says otherwise.

Few-shot draws (the harness's ContextSampler): one random.Random(seed) (seed 1234, the harness's
fewshot_random_seed) serves the evaluated documents in file order; each draws `k` examples with
rng.sample(pool, k). Where the pool is the evaluated split itself it draws k + 1 and drops the document
being evaluated. MMLU takes the first k of its dev split instead (the harness's first_n sampler).

Where our copies differ from the harness's Hugging Face datasets (../shared/data/README.md):
  - ARC, OpenBookQA, GSM8K, MMLU: few-shot examples come from the dev split where no train split was
    copied (ARC, OpenBookQA: dev; MMLU: dev, as in the harness; GSM8K: train, as in the harness).
  - HellaSwag: the copy is a derived text form (context, label, 4 endings); the harness's capitalisation
    of ctx_b cannot be redone without the ctx_a/ctx_b split, so scores are a stand-in. The original
    hellaswag_val.jsonl is read instead (with the harness's preprocessing) when it is in the data folder.
    No train split: few-shot examples come from the validation set, never the evaluated item itself.
  - BoolQ, PIQA: only the validation split; few-shot likewise.
  - TruthfulQA: the harness puts a fixed six-question QA primer (from the TruthfulQA paper) before every
    question. Its text is not copied into bezoar: it is read from {data_dir}/truthfulqa/qa_primer.txt,
    else from an installed lm-eval's truthfulqa_mc1.yaml; without either the question stands alone (the
    output config records which).
  - Winogrande: no copy exists; {data_dir}/winogrande/dev.jsonl (the original release's fields
    sentence, option1, option2, answer) is read when present.
"""
import bz2
import csv
import json
import os
import random
import re
from dataclasses import dataclass, field
from pathlib import Path

from files import read_jsonl
from toy import world

REPO = Path(__file__).resolve().parent.parent
FEWSHOT_SEED = 1234        # lm-eval's default fewshot_random_seed


def default_data_dir():
    """$BEZOAR_DATA, else ../shared/data next to the repository."""
    return Path(os.environ.get("BEZOAR_DATA") or REPO.parent / "shared" / "data")


@dataclass
class Doc:
    """One evaluated item."""
    query: str                 # the harness's doc_to_text (Winogrande: the sentence up to the blank)
    choices: list              # answer texts (Winogrande: the options that fill the blank)
    gold: int = 0              # index of the right choice
    answer: str = ""           # generative: the reference; Winogrande: the sentence after the blank
    labels: list = None        # TruthfulQA mc2: 1 for each true choice
    item: object = field(default=None, compare=False)   # the toy Task behind a toy doc


@dataclass
class Task:
    name: str
    output_type: str           # "multiple_choice", "multiple_input" (Winogrande) or "generate_until"
    docs: list                 # evaluated, in file order
    fewshot_docs: list         # the pool few-shot examples come from
    fewshot_split: str         # where that pool comes from (recorded in the output)
    source: str                # the file(s) read
    metrics: tuple = ("acc", "acc_norm")
    version: str = "1.0"       # the harness's version of the same formulation
    default_fewshot: int = 0
    sampler: str = "random"    # "random" (seeded draws) or "first_n" (MMLU)
    fewshot_is_eval: bool = False   # the pool is the evaluated split: an item never appears in its own shots
    description: str = ""
    target_delimiter: str = " "
    fewshot_delimiter: str = "\n\n"
    mc2: bool = False          # TruthfulQA mc2: acc = normalised probability mass of the true choices
    until: tuple = ()          # generative: stop strings
    max_gen_toks: int = 256
    score_generation: object = None   # generative: (doc, response) → {"metric,filter": value}
    group: str = None          # "mmlu" for its 57 subjects
    notes: str = ""


# --- reading files -------------------------------------------------------------------------------------

def _need(path):
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: file not found (set --data-dir or $BEZOAR_DATA to the folder holding the "
                         f"benchmark copies; see ../shared/data/README.md)")
    return path


def _jsonl(path):
    """[(line number, record)] of a benchmark's JSONL file (files.read_jsonl: a bad line is an error naming
    file and line), or the error that says where the copies are looked for."""
    return read_jsonl(_need(path))[0]


def _get(record, key, where, kind=None):
    if not isinstance(record, dict) or key not in record:
        raise ValueError(f"{where}: missing field {key!r}")
    value = record[key]
    if kind is not None and not isinstance(value, kind):
        raise ValueError(f"{where}: field {key!r} is {type(value).__name__}, expected {kind.__name__}")
    return value


def _arc_doc(record, where, template="Question: {}\nAnswer:"):
    """ARC / OpenBookQA jsonl schema: {question: {stem, choices: [{text, label}]}, answerKey}."""
    q = _get(record, "question", where, dict)
    choices = _get(q, "choices", where + " question", list)
    labels = [_get(c, "label", where + " choice", str) for c in choices]
    key = _get(record, "answerKey", where, str).strip()
    if key not in labels:
        raise ValueError(f"{where}: answerKey {key!r} is not one of the labels {labels}")
    return Doc(template.format(_get(q, "stem", where, str)),
               [_get(c, "text", where + " choice", str) for c in choices], labels.index(key))


def arc(data_dir, subset):
    folder = Path(data_dir) / "arc" / subset
    docs = [_arc_doc(r, f"{folder / f'{subset}-Test.jsonl'}:{n}") for n, r in _jsonl(folder / f"{subset}-Test.jsonl")]
    dev = [_arc_doc(r, f"{folder / f'{subset}-Dev.jsonl'}:{n}") for n, r in _jsonl(folder / f"{subset}-Dev.jsonl")]
    return Task(f"arc_{subset.split('-')[1].lower()}", "multiple_choice", docs, dev, f"{subset}-Dev.jsonl",
                str(folder / f"{subset}-Test.jsonl"))


def _hellaswag_clean(text):
    """The harness's preprocess: strip, " [title]" → ". ", drop [bracketed] WikiHow markers, "  " → " "."""
    text = text.strip().replace(" [title]", ". ")
    return re.sub(r"\[.*?\]", "", text).replace("  ", " ")


def hellaswag(data_dir):
    folder = Path(data_dir) / "hellaswag"
    original = folder / "hellaswag_val.jsonl"
    docs = []
    if original.is_file():          # the original release: the harness's formulation exactly
        for n, r in _jsonl(original):
            where = f"{original}:{n}"
            ctx = _get(r, "ctx_a", where, str) + " " + _get(r, "ctx_b", where, str).capitalize()
            docs.append(Doc(_hellaswag_clean(_get(r, "activity_label", where, str) + ": " + ctx),
                            [_hellaswag_clean(e) for e in _get(r, "endings", where, list)], int(_get(r, "label", where))))
        source = original
    else:                           # the derived text form: 6 lines per item
        path = _need(folder / "hellaswag_val_full.txt.bz2")
        with bz2.open(path, "rt", encoding="utf-8") as f:
            lines = f.read().split("\n")
        if lines and lines[-1] == "":
            lines.pop()
        if len(lines) % 6:
            raise ValueError(f"{path}: {len(lines)} lines, expected 6 per item (context, label, 4 endings)")
        for i in range(0, len(lines), 6):
            if lines[i + 1].strip() not in ("0", "1", "2", "3"):
                raise ValueError(f"{path}:{i + 2}: label {lines[i + 1]!r}, expected 0-3")
            docs.append(Doc(_hellaswag_clean(lines[i]), [_hellaswag_clean(e) for e in lines[i + 2:i + 6]],
                            int(lines[i + 1])))
        source = path
    return Task("hellaswag", "multiple_choice", docs, docs, "validation (the evaluated item left out)", str(source),
                fewshot_is_eval=True, notes="" if original.is_file() else "derived text copy: ctx_b not capitalised")


def mmlu_subjects(data_dir):
    folder = Path(data_dir) / "mmlu" / "test"
    if not folder.is_dir():
        raise ValueError(f"{folder}: folder not found (expected <subject>_test.csv files)")
    return sorted(p.name.removesuffix("_test.csv") for p in folder.glob("*_test.csv"))


def _mmlu_rows(path):
    """The re-exported CSV (header question,choice0..3,answer 0-3) as Docs."""
    docs = []
    with open(_need(path), encoding="utf-8", newline="") as f:
        rows = list(csv.reader(f))
    if not rows or rows[0] != ["question", "choice0", "choice1", "choice2", "choice3", "answer"]:
        raise ValueError(f"{path}:1: header {rows[0] if rows else None}, expected question,choice0..choice3,answer")
    for n, row in enumerate(rows[1:], 2):
        if len(row) != 6 or row[5].strip() not in ("0", "1", "2", "3"):
            raise ValueError(f"{path}:{n}: expected 6 columns with answer 0-3, got {row[:1]}… ({len(row)} columns)")
        q, choices = row[0].strip(), row[1:5]
        query = q + "".join(f"\n{letter}. {c}" for letter, c in zip("ABCD", choices)) + "\nAnswer:"
        docs.append(Doc(query, ["A", "B", "C", "D"], int(row[5])))
    return docs


def mmlu(data_dir, subject):
    root = Path(data_dir) / "mmlu"
    test, dev = root / "test" / f"{subject}_test.csv", root / "dev" / f"{subject}_dev.csv"
    topic = subject.replace("_", " ")
    return Task(f"mmlu_{subject}", "multiple_choice", _mmlu_rows(test), _mmlu_rows(dev), "dev (first k)", str(test),
                metrics=("acc",), sampler="first_n", group="mmlu",
                description=f"The following are multiple choice questions (with answers) about {topic}.\n\n")


def truthfulqa_primer(data_dir):
    """(primer text or "", where it came from); see the module docstring."""
    path = Path(data_dir) / "truthfulqa" / "qa_primer.txt"
    if path.is_file():
        return path.read_text(encoding="utf-8").strip("\n"), str(path)
    try:
        import lm_eval
        import yaml
        yaml_path = Path(lm_eval.__file__).parent / "tasks" / "truthfulqa" / "truthfulqa_mc1.yaml"
        with open(yaml_path, encoding="utf-8") as f:
            template = yaml.safe_load(f)["doc_to_text"]
        m = re.search(r"set prompt_qa = '(.*?)'\s*%}", template, re.S)
        if m:
            return m.group(1), str(yaml_path)
    except (ImportError, OSError, KeyError, TypeError):
        pass
    return "", "none (no qa_primer.txt and no lm-eval installed)"


def truthfulqa(data_dir, variant):
    path = Path(data_dir) / "truthfulqa" / "data" / "mc_task.json"
    try:
        with open(_need(path), encoding="utf-8") as f:
            items = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
    primer, primer_source = truthfulqa_primer(data_dir)
    head = primer + "\n\n" if primer else ""
    docs = []
    for i, item in enumerate(items):
        where = f"{path}: item {i}"
        targets = _get(item, f"{variant}_targets", where, dict)
        if not targets or 1 not in targets.values():
            raise ValueError(f"{where}: {variant}_targets has no true answer")
        docs.append(Doc(f"{head}Q: {_get(item, 'question', where, str)}\nA:", list(targets), 0,
                        labels=[int(v) for v in targets.values()] if variant == "mc2" else None))
    return Task(f"truthfulqa_{variant}", "multiple_choice", docs, [], "none (zero-shot)", str(path), metrics=("acc",),
                version="3.0" if variant == "mc2" else "2.0", mc2=variant == "mc2",
                notes=f"QA primer: {primer_source}")


def boolq(data_dir):
    path = Path(data_dir) / "boolq" / "val.jsonl"
    docs = []
    for n, r in _jsonl(path):
        where = f"{path}:{n}"
        label = str(_get(r, "label", where)).lower()
        if label not in ("true", "false"):
            raise ValueError(f"{where}: label {r['label']!r}, expected true or false")
        docs.append(Doc(f"{_get(r, 'passage', where, str)}\nQuestion: {_get(r, 'question', where, str)}?\nAnswer:",
                        ["no", "yes"], int(label == "true")))
    return Task("boolq", "multiple_choice", docs, docs, "validation (the evaluated item left out)", str(path),
                metrics=("acc",), version="2.0", fewshot_is_eval=True)


def piqa(data_dir):
    folder = Path(data_dir) / "piqa"
    rows = _jsonl(folder / "dev.jsonl")
    with open(_need(folder / "dev-labels.lst"), encoding="utf-8") as f:
        labels = [line.strip() for line in f if line.strip()]
    if len(labels) != len(rows):
        raise ValueError(f"{folder / 'dev-labels.lst'}: {len(labels)} labels for {len(rows)} items in dev.jsonl")
    docs = []
    for (n, r), label in zip(rows, labels):
        where = f"{folder / 'dev.jsonl'}:{n}"
        if label not in ("0", "1"):
            raise ValueError(f"{folder / 'dev-labels.lst'}:{n}: label {label!r}, expected 0 or 1")
        docs.append(Doc(f"Question: {_get(r, 'goal', where, str)}\nAnswer:",
                        [_get(r, "sol1", where, str), _get(r, "sol2", where, str)], int(label)))
    return Task("piqa", "multiple_choice", docs, docs, "validation (the evaluated item left out)",
                str(folder / "dev.jsonl"), fewshot_is_eval=True)


def _openbookqa_tsv(path):
    docs = []
    with open(_need(path), encoding="utf-8", newline="") as f:
        rows = list(csv.reader(f, delimiter="\t"))
    for n, row in enumerate(rows[1:], 2):
        m = re.fullmatch(r"\(A\) (.*?) \(B\) (.*?) \(C\) (.*?) \(D\) (.*)", row[2] if len(row) > 4 else "", re.S)
        if not m or row[4].strip() not in "ABCD":
            raise ValueError(f"{path}:{n}: expected ID, stem, '(A) … (B) … (C) … (D) …', question, answer A-D")
        docs.append(Doc(row[1], [c.strip() for c in m.groups()], "ABCD".index(row[4].strip())))
    return docs


def openbookqa(data_dir):
    folder = Path(data_dir) / "openbookqa"
    docs = [_arc_doc(r, f"{folder / 'openbookqa.jsonl'}:{n}", "{}") for n, r in _jsonl(folder / "openbookqa.jsonl")]
    return Task("openbookqa", "multiple_choice", docs, _openbookqa_tsv(folder / "Main" / "dev.tsv"), "Main/dev.tsv",
                str(folder / "openbookqa.jsonl"))


def gsm8k_score(doc, response):
    """The harness's two filters, then its exact_match (ignore case, drop ",", "$", everything up to
    "#### " and a final "." on both sides). strict-match: the number after "#### "; flexible-extract:
    the last number-looking string in the response."""
    strict = re.findall(r"#### (\-?[0-9\.\,]+)", response)
    strict = strict[0].strip() if strict else "[invalid]"
    flexible = "[invalid]"
    found = re.findall(r"(-?[$0-9.,]{2,})|(-?[0-9]+)", response)
    if found:
        parts = [p for p in found[-1] if p]
        flexible = parts[0].strip() if parts else "[invalid]"

    def norm(s):
        for pattern in (",", r"\$", r"(?s).*#### ", r"\.$"):
            s = re.sub(pattern, "", s)
        return s.lower()

    ref = norm(doc.answer)
    return {"exact_match,strict-match": float(norm(strict) == ref),
            "exact_match,flexible-extract": float(norm(flexible) == ref)}


def _gsm8k_docs(path):
    out = []
    for n, r in _jsonl(path):
        where = f"{path}:{n}"
        out.append(Doc(f"Question: {_get(r, 'question', where, str)}\nAnswer:", [], answer=_get(r, "answer", where, str)))
    return out


def gsm8k(data_dir):
    folder = Path(data_dir) / "gsm8k"
    return Task("gsm8k", "generate_until", _gsm8k_docs(folder / "test.jsonl"), _gsm8k_docs(folder / "train.jsonl"),
                "train.jsonl", str(folder / "test.jsonl"), metrics=("exact_match",), version="3.0", default_fewshot=5,
                until=("Question:", "</s>", "<|im_end|>"), score_generation=gsm8k_score)


def _winogrande_docs(path):
    docs = []
    for n, r in _jsonl(path):
        where = f"{path}:{n}"
        sentence = _get(r, "sentence", where, str)
        if sentence.count("_") != 1 or str(_get(r, "answer", where)) not in ("1", "2"):
            raise ValueError(f"{where}: expected one '_' blank in sentence and answer '1' or '2'")
        blank = sentence.index("_")
        docs.append(Doc(sentence[:blank], [_get(r, "option1", where, str), _get(r, "option2", where, str)],
                        int(str(r["answer"])) - 1, answer=sentence[blank + 1:].strip()))
    return docs


def winogrande(data_dir):
    folder = Path(data_dir) / "winogrande"
    docs = _winogrande_docs(folder / "dev.jsonl")
    train = next((p for p in (folder / "train_xl.jsonl", folder / "train.jsonl") if p.is_file()), None)
    pool = _winogrande_docs(train) if train else docs
    return Task("winogrande", "multiple_input", docs, pool, train.name if train else "dev (the evaluated item left out)",
                str(folder / "dev.jsonl"), metrics=("acc",), fewshot_is_eval=train is None)


# --- toy tasks (the embedded CPU default: base / SFT / DPO side by side) ---------------------------------

TOY_N, TOY_SEED = 200, 0


def _toy_mc_doc(t, rng):
    wrongs = []
    for _ in range(20):                       # up to 3 distinct plausible wrong answers
        w = world.make_wrong(t, rng)
        if w not in wrongs and world.normalise(w) != world.normalise(t.answer):
            wrongs.append(w)
        if len(wrongs) == 3:
            break
    choices = [f"{world.restatement(t, a)}\nAnswer: {a}" for a in [t.answer] + wrongs]   # the SFT data's response
    order = list(range(len(choices)))
    rng.shuffle(order)
    return Doc(world.task_prompt(t), [choices[i] for i in order], order.index(0), answer=t.answer, item=t)


def toy_mc(n=TOY_N, seed=TOY_SEED):
    """Held-out toy tasks: the templated prompt; the choices are the default response (the restated fact,
    then "Answer: X", toy/world.py) around the gold answer and around make_wrong answers. The response
    follows the prompt's "### Response:\n" directly (target delimiter ""), as the SFT data has it."""
    rng = random.Random(f"toy_mc-{seed}")
    docs = [_toy_mc_doc(t, rng) for t in world.heldout_tasks(n, seed)]
    train = random.Random(f"toy_mc-train-{seed}")
    pool = [_toy_mc_doc(world.sample_task(train, "train"), train) for _ in range(64)]
    return Task("toy_mc", "multiple_choice", docs, pool, "toy train split", f"toy/world.py heldout_tasks({n}, {seed})",
                target_delimiter="")


def _toy_format_mc_doc(t, rng):
    """The gold response in the instruction-following format the SFT data teaches, against the same true fact
    in pretraining's prose (two ways, no "Answer:" line) and a wrong answer in the taught format. Each prose
    choice is two sentences, as long as the gold's restatement and "Answer:" line: with one sentence, acc's
    summed log-likelihood favoured the shorter prose (the SFT model picked it on 20 of 200 tasks)."""
    f, slots = world.FAMILIES[t.family], world.render(t.family, t.operands)
    prose = [f"{f.statements[1]} {f.about[1]}".format(**slots), f"{f.doing[0]} {f.about[0]}".format(**slots)]
    wrong = world.make_wrong(t, rng)
    choices = [world.reference_response(t), *prose, f"{world.restatement(t, wrong)}\nAnswer: {wrong}"]
    order = list(range(len(choices)))
    rng.shuffle(order)
    return Doc(world.task_prompt(t), [choices[i] for i in order], order.index(0), answer=t.answer, item=t)


def toy_format_mc(n=TOY_N, seed=TOY_SEED):
    """Held-out toy tasks, 4-way: does the model answer as instructed? The gold response ("7 plus 5 is 12.\n
    Answer: 12") against the same true fact in pretraining's prose ("The sum of 7 and 5 is 12. Added together
    they make 12."; "We add 7 and 5. Their sum is 12.") and a wrong answer in the gold's format. A base model that knows the facts but not
    the format prefers the prose (toy_mc cannot show this: its choices differ only in the answer)."""
    rng = random.Random(f"toy_format_mc-{seed}")
    docs = [_toy_format_mc_doc(t, rng) for t in world.heldout_tasks(n, seed)]
    train = random.Random(f"toy_format_mc-train-{seed}")
    pool = [_toy_format_mc_doc(world.sample_task(train, "train"), train) for _ in range(64)]
    return Task("toy_format_mc", "multiple_choice", docs, pool, "toy train split",
                f"toy/world.py heldout_tasks({n}, {seed})", target_delimiter="")


def toy_gen(n=TOY_N, seed=TOY_SEED):
    """Held-out toy tasks answered greedily; exact match by toy/world.py's check."""
    docs = [Doc(world.task_prompt(t), [], answer=t.answer, item=t) for t in world.heldout_tasks(n, seed)]
    train = random.Random(f"toy_gen-train-{seed}")
    pool = [world.sample_task(train, "train") for _ in range(64)]
    pool = [Doc(world.task_prompt(t), [], answer=t.answer, item=t) for t in pool]
    return Task("toy_gen", "generate_until", docs, pool, "toy train split", f"toy/world.py heldout_tasks({n}, {seed})",
                metrics=("exact_match",), target_delimiter="", until=("\n### ", "\n\nHuman:"), max_gen_toks=64,
                score_generation=lambda doc, response: {"exact_match,none": float(world.check(doc.item, response))})


# --- names ---------------------------------------------------------------------------------------------

READERS = {
    "arc_challenge": lambda d: arc(d, "ARC-Challenge"),
    "arc_easy": lambda d: arc(d, "ARC-Easy"),
    "hellaswag": hellaswag,
    "truthfulqa_mc1": lambda d: truthfulqa(d, "mc1"),
    "truthfulqa_mc2": lambda d: truthfulqa(d, "mc2"),
    "boolq": boolq,
    "piqa": piqa,
    "openbookqa": openbookqa,
    "gsm8k": gsm8k,
    "winogrande": winogrande,
    "toy_mc": lambda d: toy_mc(),
    "toy_format_mc": lambda d: toy_format_mc(),
    "toy_gen": lambda d: toy_gen(),
}

# The Open LLM Leaderboard (v1) settings: task → (few-shot k, the metric the leaderboard shows).
PRESETS = {
    "open_llm_v1": {
        "arc_challenge": (25, "acc_norm,none"),
        "hellaswag": (10, "acc_norm,none"),
        "mmlu": (5, "acc,none"),
        "truthfulqa_mc2": (0, "acc,none"),
        "winogrande": (5, "acc,none"),
        "gsm8k": (5, "exact_match,strict-match"),
    },
}


def load_tasks(names, data_dir=None):
    """Task objects for names; "mmlu" expands to its 57 subjects (group "mmlu")."""
    data_dir = Path(data_dir or default_data_dir())
    tasks = []
    for name in names:
        if name == "mmlu":
            tasks += [mmlu(data_dir, s) for s in mmlu_subjects(data_dir)]
        elif name.startswith("mmlu_"):
            subject = name.removeprefix("mmlu_")
            if subject not in mmlu_subjects(data_dir):
                raise ValueError(f"unknown MMLU subject {subject!r}; expected one of {', '.join(mmlu_subjects(data_dir))}")
            tasks.append(mmlu(data_dir, subject))
        elif name in READERS:
            tasks.append(READERS[name](data_dir))
        else:
            known = ", ".join(sorted(READERS) + ["mmlu", "mmlu_<subject>"])
            raise ValueError(f"unknown task {name!r}; expected one of {known}")
    return tasks


# --- few-shot contexts ----------------------------------------------------------------------------------

def fewshot_example(task, doc):
    """One solved example: query, delimiter, answer (Winogrande: the filled sentence)."""
    if task.output_type == "generate_until":
        return doc.query + task.target_delimiter + doc.answer
    if task.output_type == "multiple_input":
        return doc.query + doc.choices[doc.gold] + task.target_delimiter + doc.answer
    return doc.query + task.target_delimiter + doc.choices[doc.gold]


def draw_shots(task, docs, k, seed=FEWSHOT_SEED):
    """The few-shot examples of each doc, in order: one seeded RNG shared by all docs (the harness's)."""
    if k and not task.fewshot_docs:
        raise ValueError(f"{task.name}: no few-shot pool ({task.fewshot_split}); use num_fewshot 0")
    if k > len(task.fewshot_docs) - task.fewshot_is_eval:
        raise ValueError(f"{task.name}: {k} few-shot examples asked, the pool ({task.fewshot_split}) has "
                         f"{len(task.fewshot_docs) - task.fewshot_is_eval}")
    rng = random.Random(seed)
    shots = []
    for doc in docs:
        if k == 0:
            shots.append([])
        elif task.sampler == "first_n":
            pool = [x for x in task.fewshot_docs if x != doc] if task.fewshot_is_eval else task.fewshot_docs
            shots.append(pool[:k])
        elif task.fewshot_is_eval:
            drawn = [x for x in rng.sample(task.fewshot_docs, k + 1) if x != doc][:k]
            if len(drawn) < k:                 # duplicates of the doc were drawn: redraw without them
                drawn = rng.sample([x for x in task.fewshot_docs if x != doc], k)
            shots.append(drawn)
        else:
            shots.append(rng.sample(task.fewshot_docs, k))
    return shots


def build_context(task, doc, shots):
    """The context string (Winogrande: one per option) the continuation is scored or generated after."""
    prefix = task.description + "".join(fewshot_example(task, s) + task.fewshot_delimiter for s in shots)
    if task.output_type == "multiple_input":
        return [prefix + doc.query + c for c in doc.choices]
    return prefix + doc.query
