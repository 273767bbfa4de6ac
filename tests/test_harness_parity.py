"""evals/harness.py against lm-evaluation-harness itself, in process, on the same tiny random LLaMA.

Real rows of ARC-Easy, MMLU, TruthfulQA, BoolQ, PIQA, OpenBookQA and GSM8K (a few of each, read from
../shared/data at test time) and project-made rows in the HellaSwag and Winogrande release formats are
written twice into a temporary folder: in the layouts of ../shared/data, which evals/tasks.py reads, and
in the Hugging Face dataset schemas, which lm-eval reads through its OWN task YAMLs (lm_eval/tasks/*,
only dataset location and split names overridden). lm-eval's HF backend (HFLM) scores a transformers
LlamaForCausalLM with the SentencePiece-backed tokenizer; bezoar scores the same weights loaded by
model/loading.py. Compared: every context string, every choice's summed log-likelihood, acc, acc_norm,
mc2 and their standard errors, GSM8K's prompts; then the `bezoar` lm_eval model class runs the same
tasks through lm-eval (simple_evaluate and the command line) and must agree too.
"""
import csv
import json
import os

import pytest

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
import lm_eval                                                                   # noqa: E402 (test-only dependency)
from lm_eval.models.huggingface import HFLM                                      # noqa: E402
from lm_eval.tasks._yaml_loader import load_yaml                                 # noqa: E402
from transformers.tokenization_utils_sentencepiece import SentencePieceBackend   # noqa: E402

from evals import harness, tasks as T                                            # noqa: E402
from model import Tokenizer, load_pretrained, train_tokenizer                    # noqa: E402
from tiny_checkpoints import tiny_hf_model, write_checkpoint                     # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")   # tests/conftest.py: one torch thread
DATA = T.default_data_dir()
LM_EVAL_TASKS = os.path.join(os.path.dirname(lm_eval.__file__), "tasks")
SHOTS = {"arc_easy": 2, "mmlu_astronomy": 2, "truthfulqa_mc2": 0, "truthfulqa_mc1": 0, "boolq": 1, "piqa": 2,
         "openbookqa": 2, "hellaswag": 2, "winogrande": 2, "gsm8k": 1}


def _jsonl(path, rows):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)


def _head(path, n):
    with open(path, encoding="utf-8") as f:
        return [json.loads(next(f)) for _ in range(n)]


def _arc_hf(r):
    q = r["question"]
    return {"id": r["id"], "question": q["stem"], "choices": {"text": [c["text"] for c in q["choices"]],
                                                              "label": [c["label"] for c in q["choices"]]},
            "answerKey": r["answerKey"]}


# Project-made rows in the original HellaSwag and Winogrande layouts (no copy of either is stored).
HELLASWAG = [
    {"activity_label": "Baking bread", "ctx_a": "A man kneads dough on a wooden table.", "ctx_b": "then he",
     "endings": ["shapes it into a loaf.", "paints the [title] table blue.", "sings to the oven.", "drives away."],
     "label": "0"},
    {"activity_label": "Home and Garden", "ctx_a": "[header] How to water a fern [title] Check the soil.",
     "ctx_b": "", "endings": ["[step] Pour water  slowly.", "Sell the fern.", "Burn the leaves.", "Ignore it."],
     "label": "0"},
    {"activity_label": "Rowing", "ctx_a": "Two women carry a boat to the lake.", "ctx_b": "the women NOW",
     "endings": ["row across the water.", "eat the boat.", "fly home.", "paint the lake."], "label": "0"},
    {"activity_label": "Painting", "ctx_a": "A girl dips a brush in red paint.", "ctx_b": "she",
     "endings": ["eats the brush.", "paints a red circle.", "runs outside.", "sleeps."], "label": "1"},
    {"activity_label": "Skating", "ctx_a": "A boy laces his skates.", "ctx_b": "he",
     "endings": ["swims.", "cooks.", "glides onto the ice.", "reads."], "label": "2"},
]
WINOGRANDE = [dict(zip(("sentence", "option1", "option2", "answer"), row)) for row in [
    ("The kite stayed up in the oak because the _ was so tall.", "kite", "oak", "2"),
    ("The kite stayed up in the oak because the _ was so light.", "kite", "oak", "1"),
    ("Anna lent Maria a pen because _ had two of them.", "Anna", "Maria", "1"),
    ("Anna lent Maria a pen because _ had lost hers.", "Anna", "Maria", "2"),
    ("The dog chased the cat until _ was tired and lay down.", "the dog", "the cat", "1"),
]]


def write_both(root):
    """The sample in bezoar's layout (root/ours) and lm-eval's (root/hf/<task>/<split>.jsonl); returns
    {task: lm-eval config dict}."""
    ours, hf = root / "ours", root / "hf"
    cfgs = {}

    def cfg(yaml, name, files, **over):
        c = load_yaml(os.path.join(LM_EVAL_TASKS, yaml))
        for key in ("tag", "group", "task_alias"):
            c.pop(key, None)
        c.update(task=f"p_{name}", dataset_path="json", dataset_name=None, num_fewshot=SHOTS[name],
                 dataset_kwargs={"data_files": {s: str(p) for s, p in files.items()}}, **over)
        cfgs[name] = c

    test, dev = _head(DATA / "arc/ARC-Easy/ARC-Easy-Test.jsonl", 10), _head(DATA / "arc/ARC-Easy/ARC-Easy-Dev.jsonl", 30)
    _jsonl(ours / "arc/ARC-Easy/ARC-Easy-Test.jsonl", test)
    _jsonl(ours / "arc/ARC-Easy/ARC-Easy-Dev.jsonl", dev)
    _jsonl(hf / "arc/test.jsonl", [_arc_hf(r) for r in test])
    _jsonl(hf / "arc/train.jsonl", [_arc_hf(r) for r in dev])
    cfg("arc/arc_easy.yaml", "arc_easy", {"test": hf / "arc/test.jsonl", "train": hf / "arc/train.jsonl"},
        validation_split=None)

    for split, n in (("test", 8), ("dev", 5)):
        with open(DATA / f"mmlu/{split}/astronomy_{split}.csv", encoding="utf-8", newline="") as f:
            rows = list(csv.reader(f))[:n + 1]
        os.makedirs(ours / f"mmlu/{split}", exist_ok=True)
        with open(ours / f"mmlu/{split}/astronomy_{split}.csv", "w", encoding="utf-8", newline="") as f:
            csv.writer(f).writerows(rows)
        _jsonl(hf / f"mmlu/{split}.jsonl", [{"question": r[0], "subject": "astronomy", "choices": r[1:5],
                                             "answer": int(r[5])} for r in rows[1:]])
    cfg("mmlu/default/mmlu_astronomy.yaml", "mmlu_astronomy",
        {"test": hf / "mmlu/test.jsonl", "dev": hf / "mmlu/dev.jsonl"})

    with open(DATA / "truthfulqa/data/mc_task.json", encoding="utf-8") as f:
        items = json.load(f)[:6]
    os.makedirs(ours / "truthfulqa/data")
    (ours / "truthfulqa/data/mc_task.json").write_text(json.dumps(items), encoding="utf-8")
    _jsonl(hf / "truthfulqa/validation.jsonl", [
        {"question": it["question"], **{f"{v}_targets": {"choices": list(it[f"{v}_targets"]),
                                                         "labels": list(it[f"{v}_targets"].values())} for v in ("mc1", "mc2")}}
        for it in items])
    for v in ("mc1", "mc2"):
        cfg(f"truthfulqa/truthfulqa_{v}.yaml", f"truthfulqa_{v}", {"validation": hf / "truthfulqa/validation.jsonl"})

    # BoolQ, PIQA, HellaSwag: few-shot from the evaluated split, the evaluated item left out (the harness
    # does that when the few-shot split is its test split).
    rows = _head(DATA / "boolq/val.jsonl", 8)
    _jsonl(ours / "boolq/val.jsonl", rows)
    _jsonl(hf / "boolq/val.jsonl", [{**r, "label": int(r["label"] == "true")} for r in rows])
    cfg("super_glue/boolq/default.yaml", "boolq", {"test": hf / "boolq/val.jsonl"}, test_split="test",
        validation_split=None, training_split=None, fewshot_split="test")

    rows = _head(DATA / "piqa/dev.jsonl", 10)
    with open(DATA / "piqa/dev-labels.lst", encoding="utf-8") as f:
        labels = [next(f).strip() for _ in range(10)]
    _jsonl(ours / "piqa/dev.jsonl", rows)
    (ours / "piqa/dev-labels.lst").write_text("\n".join(labels) + "\n")
    _jsonl(hf / "piqa/dev.jsonl", [{**r, "label": int(lab)} for r, lab in zip(rows, labels)])
    cfg("piqa/piqa.yaml", "piqa", {"test": hf / "piqa/dev.jsonl"}, test_split="test", validation_split=None,
        training_split=None, fewshot_split="test")

    _jsonl(ours / "hellaswag/hellaswag_val.jsonl", HELLASWAG)
    _jsonl(hf / "hellaswag/val.jsonl", HELLASWAG)
    cfg("hellaswag/hellaswag.yaml", "hellaswag", {"test": hf / "hellaswag/val.jsonl"}, test_split="test",
        validation_split=None, training_split=None, fewshot_split="test")

    test = _head(DATA / "openbookqa/openbookqa.jsonl", 8)
    _jsonl(ours / "openbookqa/openbookqa.jsonl", test)
    with open(DATA / "openbookqa/Main/dev.tsv", encoding="utf-8", newline="") as f:
        dev = list(csv.reader(f, delimiter="\t"))[:21]
    os.makedirs(ours / "openbookqa/Main")
    with open(ours / "openbookqa/Main/dev.tsv", "w", encoding="utf-8", newline="") as f:
        csv.writer(f, delimiter="\t").writerows(dev)
    _jsonl(hf / "obqa/test.jsonl", [{"id": r["id"], "question_stem": r["question"]["stem"],
                                     "choices": _arc_hf(r)["choices"], "answerKey": r["answerKey"]} for r in test])
    parsed = T._openbookqa_tsv(ours / "openbookqa/Main/dev.tsv")
    _jsonl(hf / "obqa/train.jsonl", [{"id": r[0], "question_stem": d.query, "choices": {"text": d.choices,
                                      "label": list("ABCD")}, "answerKey": r[4]} for r, d in zip(dev[1:], parsed)])
    cfg("openbookqa/openbookqa.yaml", "openbookqa", {"test": hf / "obqa/test.jsonl", "train": hf / "obqa/train.jsonl"},
        validation_split=None)

    _jsonl(ours / "winogrande/dev.jsonl", WINOGRANDE)
    _jsonl(hf / "winogrande/dev.jsonl", WINOGRANDE)
    cfg("winogrande/default.yaml", "winogrande", {"test": hf / "winogrande/dev.jsonl"}, test_split="test",
        validation_split=None, training_split=None, fewshot_split="test")

    test, train = _head(DATA / "gsm8k/test.jsonl", 3), _head(DATA / "gsm8k/train.jsonl", 20)
    _jsonl(ours / "gsm8k/test.jsonl", test)
    _jsonl(ours / "gsm8k/train.jsonl", train)
    _jsonl(hf / "gsm8k/test.jsonl", test)
    _jsonl(hf / "gsm8k/train.jsonl", train)
    cfg("gsm8k/gsm8k.yaml", "gsm8k", {"test": hf / "gsm8k/test.jsonl", "train": hf / "gsm8k/train.jsonl"})
    cfgs["gsm8k"]["generation_kwargs"] = {**cfgs["gsm8k"]["generation_kwargs"], "max_gen_toks": 6}
    return cfgs


def all_text(folder):
    """Every string in the sample, for the tokenizer."""
    out = []
    for dirpath, _, files in os.walk(folder):
        for name in files:
            out += open(os.path.join(dirpath, name), encoding="utf-8").read().splitlines()
    return out


def local_tasks():
    """A TaskManager without lm-eval's own index (scanning its 13,000 YAML files takes ~20 s): every task
    here is a config dict or a file under --include_path."""
    from lm_eval.tasks import TaskManager
    return TaskManager(include_defaults=False)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("parity")
    cfgs = write_both(root)
    ckpt = root / "ckpt"
    os.makedirs(ckpt)
    train_tokenizer(all_text(root / "ours") + list(T.truthfulqa_primer(root / "ours")[0].splitlines()),
                    ckpt / "tokenizer", 700)
    hf = tiny_hf_model(vocab_size=700, max_position_embeddings=2048)
    write_checkpoint(hf, ckpt)
    hf_tok = SentencePieceBackend(vocab_file=str(ckpt / "tokenizer.model"), unk_token="<unk>", bos_token="<s>",
                                  eos_token="</s>", special_tokens_pattern="bos", legacy=True)
    theirs = lm_eval.simple_evaluate(model=HFLM(pretrained=hf, tokenizer=hf_tok, batch_size=4, device="cpu"),
                                     tasks=list(cfgs.values()), log_samples=True, task_manager=local_tasks())
    model, tok = load_pretrained(str(ckpt)), Tokenizer(ckpt / "tokenizer.model")
    tasks = {t.name: t for t in T.load_tasks(["arc_easy", "mmlu_astronomy", "truthfulqa_mc1", "truthfulqa_mc2",
                                              "boolq", "piqa", "hellaswag", "openbookqa", "winogrande", "gsm8k"],
                                             root / "ours")}
    tasks["gsm8k"].max_gen_toks = 6
    ours = harness.evaluate(model, tok, list(tasks.values()), num_fewshot=SHOTS, batch_size=3, log_samples=True,
                            progress=False, data_dir=root / "ours")
    return dict(root=root, cfgs=cfgs, ckpt=ckpt, theirs=theirs, ours=ours, model=model, tok=tok)


MC_TASKS = ["arc_easy", "mmlu_astronomy", "truthfulqa_mc1", "truthfulqa_mc2", "boolq", "piqa", "hellaswag",
            "openbookqa", "winogrande"]


@pytest.mark.parametrize("name", MC_TASKS + ["gsm8k"])
def test_contexts_are_the_strings_lm_eval_builds(setup, name):
    theirs = [s for s in setup["theirs"]["samples"][f"p_{name}"] if s["filter"] in ("none", "strict-match")]
    ours = setup["ours"]["samples"][name]
    assert len(ours) == len(theirs) > 0
    for a, b in zip(ours, sorted(theirs, key=lambda s: s["doc_id"])):
        assert [list(x)[:2] if name != "gsm8k" else x[0] for x in a["arguments"]] == \
               [list(x)[:2] if name != "gsm8k" else x[0] for x in b["arguments"]]


@pytest.mark.parametrize("name", MC_TASKS)
def test_choice_loglikelihoods_and_metrics_equal_lm_eval(setup, name):
    theirs = sorted(setup["theirs"]["samples"][f"p_{name}"], key=lambda s: s["doc_id"])
    ours = setup["ours"]["samples"][name]
    for a, b in zip(ours, theirs):
        assert [ll for ll, _ in a["resps"]] == pytest.approx([r[0][0] for r in b["resps"]], abs=2e-4)
        assert [g for _, g in a["resps"]] == [r[0][1] for r in b["resps"]]
    r_ours, r_theirs = setup["ours"]["results"][name], setup["theirs"]["results"][f"p_{name}"]
    keys = [k for k in r_theirs if "," in k]
    assert keys and sorted(keys) == sorted(k for k in r_ours if "," in k)
    for k in keys:
        if name == "truthfulqa_mc2":                         # a probability mass, not a 0/1 count
            assert r_ours[k] == pytest.approx(r_theirs[k], abs=1e-6)
        else:
            assert r_ours[k] == r_theirs[k], k               # acc, acc_norm and stderr to the last digit


def test_gsm8k_scoring_equals_lm_eval_filters_and_exact_match(setup):
    """The harness's own regex filters and exact_match on crafted responses, against gsm8k_score."""
    from lm_eval.api.metrics import exact_match_hf_evaluate
    from lm_eval.filters.extraction import RegexFilter
    cfg = setup["cfgs"]["gsm8k"]
    doc = T.Doc("q", [], answer="She pays 3 * $1,200 = $3,600.\n#### 3600")
    responses = [" She pays $3,600.\n#### 3600", " #### 3,600.", " 3600 dollars", " It is 3599.\n#### 3599",
                 " the answer is $3,600.", " nothing", " -4 and then 3600", " #### 3600\n#### 12"]
    regexes = cfg["metric_list"][0]["regexes_to_ignore"]
    for filt in cfg["filter_list"]:
        f = filt["filter"][0]
        extract = RegexFilter(f["regex_pattern"], f.get("group_select", 0))
        picked = [x[0] for x in extract.apply([[r] for r in responses], [None] * len(responses))]
        expect = [exact_match_hf_evaluate([p], [doc.answer], regexes_to_ignore=regexes, ignore_case=True,
                                          ignore_punctuation=False)["exact_match"] for p in picked]
        got = [T.gsm8k_score(doc, r)[f"exact_match,{filt['name']}"] for r in responses]
        assert got == expect, filt["name"]
    assert T.gsm8k_score(doc, responses[0]) == {"exact_match,strict-match": 1.0, "exact_match,flexible-extract": 1.0}


def test_output_layout_matches_lm_eval(setup):
    ours, theirs = setup["ours"], setup["theirs"]
    for key in ("results", "configs", "versions", "n-shot", "higher_is_better", "n-samples", "config"):
        assert key in ours and key in theirs
    assert ours["n-samples"]["arc_easy"] == theirs["n-samples"]["p_arc_easy"]
    assert ours["n-shot"]["arc_easy"] == theirs["n-shot"]["p_arc_easy"] == 2
    assert ours["config"]["add_bos_token"] is True


def test_bezoar_lm_eval_model_class_agrees_with_hf_backend(setup):
    import evals.lm_eval_model  # noqa: F401  (registers "bezoar")
    cfgs = [setup["cfgs"][n] for n in ("arc_easy", "winogrande", "truthfulqa_mc2")]
    out = lm_eval.simple_evaluate(model="bezoar", model_args=f"pretrained={setup['ckpt']}", tasks=cfgs,
                                  batch_size=5, log_samples=True, task_manager=local_tasks())
    for name in ("arc_easy", "winogrande", "truthfulqa_mc2"):
        a = sorted(out["samples"][f"p_{name}"], key=lambda s: s["doc_id"])
        b = sorted(setup["theirs"]["samples"][f"p_{name}"], key=lambda s: s["doc_id"])
        for x, y in zip(a, b):
            assert [r[0][0] for r in x["resps"]] == pytest.approx([r[0][0] for r in y["resps"]], abs=2e-4)
        assert out["results"][f"p_{name}"]["acc,none"] == pytest.approx(setup["theirs"]["results"][f"p_{name}"]["acc,none"], abs=1e-6)


def test_lm_eval_command_line_runs_bezoar_on_a_local_file_task(setup, tmp_path, monkeypatch):
    """`python -m evals.lm_eval_model --model bezoar … --include_path DIR`, called in process."""
    from lm_eval.tasks import TaskManager

    from evals.lm_eval_model import main
    init = TaskManager.__init__
    monkeypatch.setattr(TaskManager, "__init__", lambda self, *a, **k: init(self, *a, **{**k, "include_defaults": False}))
    arc = setup["root"] / "hf/arc"
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks/local_arc.yaml").write_text(
        "task: local_arc\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    test: {arc / 'test.jsonl'}\n    train: {arc / 'train.jsonl'}\n"
        "output_type: multiple_choice\ntraining_split: train\ntest_split: test\n"
        "doc_to_text: \"Question: {{question}}\\nAnswer:\"\ndoc_to_target: \"{{choices.label.index(answerKey)}}\"\n"
        "doc_to_choice: \"{{choices.text}}\"\nmetric_list:\n  - metric: acc\n  - metric: acc_norm\n")
    main(["--model", "bezoar", "--model_args", f"pretrained={setup['ckpt']}", "--tasks", "local_arc",
          "--include_path", str(tmp_path / "tasks"), "--num_fewshot", "2", "--batch_size", "4", "--device", "cpu",
          "--output_path", str(tmp_path / "out")])
    found = [os.path.join(d, f) for d, _, fs in os.walk(tmp_path / "out") for f in fs if f.endswith(".json")]
    assert found, "lm_eval wrote no results file"
    results = json.load(open(found[0]))["results"]["local_arc"]
    assert results["acc,none"] == setup["theirs"]["results"]["p_arc_easy"]["acc,none"]
    assert results["acc_norm,none"] == setup["theirs"]["results"]["p_arc_easy"]["acc_norm,none"]


def test_rolling_loglikelihood_equals_hf_backend_across_windows(setup):
    """Perplexity requests: disjoint windows of max_length tokens (here 10, so texts span several)."""
    import transformers
    from lm_eval.api.instance import Instance

    from evals.lm_eval_model import BezoarLM
    ckpt = setup["ckpt"]
    texts = [json.loads(line)["question"]["stem"] for line in open(DATA / "arc/ARC-Easy/ARC-Easy-Dev.jsonl")][:4]
    requests = [Instance("loglikelihood_rolling", {}, (t,), i) for i, t in enumerate(texts)]
    hf = transformers.LlamaForCausalLM.from_pretrained(str(ckpt)).eval()
    hf_tok = SentencePieceBackend(vocab_file=str(ckpt / "tokenizer.model"), unk_token="<unk>", bos_token="<s>",
                                  eos_token="</s>", special_tokens_pattern="bos", legacy=True)
    theirs = HFLM(pretrained=hf, tokenizer=hf_tok, batch_size=4, device="cpu", max_length=10)
    ours = BezoarLM(pretrained=str(ckpt), batch_size=4, max_length=10)
    assert len(setup["tok"].encode(texts[0])) > 2 * 10
    expect = theirs.loglikelihood_rolling(requests, disable_tqdm=True)
    assert ours.loglikelihood_rolling(requests, disable_tqdm=True) == pytest.approx(expect, abs=2e-4)
