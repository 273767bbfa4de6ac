"""evals/harness.py on its own: hand-computed acc_norm, mc2 and standard errors; the harness's pair
tokenisation; packed scoring (model/packed.py) equal to a plain full forward per request; the context
computed once per item; batch sizes 1 and 8 giving the same accuracy to the last digit; the toy tasks; the
`evaluate.py harness` command line (JSON layout, samples, errors)."""
import json
import math
import random

import pytest
import torch
from lm_eval.api import metrics as lm_metrics
from lm_eval.api.model import TemplateLM

from evals import harness, tasks as T
from evals.harness_cli import main as cli_main
from model import Tokenizer, load_pretrained, train_tokenizer
from model.sampling import generate
from tiny_checkpoints import tiny_hf_model, write_checkpoint

DATA = T.default_data_dir()
pytestmark = pytest.mark.usefixtures("one_thread")   # tests/conftest.py: one torch thread


@pytest.fixture(scope="module")
def arc():
    task = T.arc(DATA, "ARC-Easy")
    task.docs = task.docs[:24]
    return task


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, arc):
    """A random 2-layer LLaMA (hidden 64) and a 600-piece tokenizer trained on ARC-Easy dev text."""
    folder = tmp_path_factory.mktemp("harness")
    texts = [d.query + " " + " ".join(d.choices) for d in arc.fewshot_docs]
    train_tokenizer(texts + [T.toy_mc(20).docs[0].query], folder / "tokenizer", 600)
    write_checkpoint(tiny_hf_model(vocab_size=600, max_position_embeddings=1024), folder)
    return folder


@pytest.fixture(scope="module")
def lm(ckpt):
    return load_pretrained(str(ckpt)), Tokenizer(ckpt / "tokenizer.model")


# --- metrics: golden values ------------------------------------------------------------------------------

def test_acc_norm_divides_by_characters_not_bytes_and_ties_go_to_the_first_choice():
    # "é" is one character and two UTF-8 bytes: -3/3 = -1.0 beats -2.2/2 = -1.1 by characters (choice 0),
    # while by bytes -3/6 = -0.5 loses to -2.2/2 (choice 1).
    m = harness.multiple_choice_metrics([-3.0, -2.2], ["éée", "ab"], gold=0)
    assert m == {"acc": 0.0, "acc_norm": 1.0}
    assert harness.multiple_choice_metrics([-2.0, -2.0], ["a", "b"], gold=0) == {"acc": 1.0, "acc_norm": 1.0}
    assert harness.multiple_choice_metrics([-1.0, -9.0], ["x", "y"], gold=1, metrics=("acc",)) == {"acc": 0.0}


def test_mc2_is_the_normalised_probability_mass_of_the_true_answers():
    lls = [math.log(0.25), math.log(0.15), math.log(0.1)]           # masses 0.25 : 0.15 : 0.10 of 0.5
    m = harness.multiple_choice_metrics(lls, ["a", "b", "c"], 0, mc2_labels=[1, 0, 1])
    assert m["acc"] == pytest.approx(0.7, abs=1e-12)
    far = [-2000.0, -2001.0]                                         # exp underflows: still 1/(1+e⁻¹)
    assert harness.multiple_choice_metrics(far, ["a", "b"], 0, mc2_labels=[1, 0])["acc"] == pytest.approx(1 / (1 + math.exp(-1)))


def test_standard_errors_by_hand_and_against_lm_eval():
    assert harness.mean_stderr([1.0, 0.0, 1.0, 1.0]) == pytest.approx(0.25)   # s = 0.5, n = 4
    assert harness.mean_stderr([1.0]) == "N/A"
    # pooled: ((9·0.01·10) + (29·0.04·30)) / (40 − 2) / 40 = 35.7 / 1520
    assert harness.pooled_stderr([0.1, 0.2], [10, 30]) == pytest.approx(math.sqrt(35.7 / 1520))
    rng = random.Random(0)
    values = [rng.random() for _ in range(37)]
    assert harness.mean_stderr(values) == pytest.approx(lm_metrics.mean_stderr(values), rel=1e-12)
    assert harness.pooled_stderr([0.03, 0.05, 0.02], [100, 7, 320]) == pytest.approx(
        lm_metrics.pooled_sample_stderr([0.03, 0.05, 0.02], [100, 7, 320]), rel=1e-12)


# --- tokenisation ----------------------------------------------------------------------------------------

class _Oracle(TemplateLM):
    """lm-eval's own TemplateLM._encode_pair over our tokenizer's encode (BOS prepended)."""

    def __init__(self, tok):
        super().__init__()
        self.tok = tok

    eot_token_id = 2

    def tok_encode(self, string, add_special_tokens=None, **kwargs):
        return self.tok.encode(string)

    _loglikelihood_tokens = loglikelihood_rolling = generate_until = None


@pytest.mark.parametrize("context,continuation", [
    ("Question: Which is a gas?\nAnswer:", " oxygen"), ("Question: Which is a gas?\nAnswer: ", "oxygen"),
    ("Fill in:  \n ", " the blank"), ("A B C", "D"), ("x", " y z"), ("The cat ", " sat")])
def test_encode_pair_is_the_harness_encode_pair(lm, context, continuation):
    _, tok = lm
    ours = harness.encode_pair(tok, context, continuation)
    assert ours == _Oracle(tok)._encode_pair(context, continuation)
    stripped = context.rstrip()
    assert ours[0] == tok.encode(stripped) and ours[0][0] == tok.bos_id
    assert ours[0] + ours[1] == tok.encode(stripped + context[len(stripped):] + continuation)


# --- scoring ---------------------------------------------------------------------------------------------

def reference(model, requests):
    """One plain forward per request over context + continuation, no cache, no batching."""
    out = []
    for c, t in requests:
        s = c + t
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([s[:-1]]))[0].double(), -1)       # [T, V]
        rows = range(len(c) - 1, len(s) - 1)
        out.append((sum(logp[j, s[j + 1]].item() for j in rows), all(logp[j].argmax().item() == s[j + 1] for j in rows)))
    return out


def test_shared_prefix_scores_equal_a_plain_forward_per_request(lm, arc):
    model, tok = lm
    contexts = [T.build_context(arc, d, s) for d, s in zip(arc.docs[:6], T.draw_shots(arc, arc.docs[:6], 2))]
    groups = [[harness.encode_pair(tok, c, " " + ch) for ch in d.choices] for c, d in zip(contexts, arc.docs)]
    groups.append([harness.encode_pair(tok, "The box is " + w, " very heavy.") for w in ("red", "blue")])  # partial
    groups.append([harness.encode_pair(tok, "Pick:", x) for x in (" a", " ab", " abc")])  # nested choices
    groups.append([([1, 5, 9], [7]), ([1, 5, 9], [8])])                  # one-token continuations
    for batch_size in (1, 3, 16):
        got, cut = harness.loglikelihoods(model, groups, batch_size, progress=False)
        assert cut == 0
        for group, scores in zip(groups, got):
            expect = reference(model, group)
            assert [s for s, _ in scores] == pytest.approx([s for s, _ in expect], abs=1e-4)
            assert [g for _, g in scores] == [g for _, g in expect]


def test_requests_longer_than_max_length_lose_tokens_on_the_left_as_in_the_harness(lm):
    model, _ = lm
    groups = [[([1] + list(range(3, 40)), [11, 12]), ([1] + list(range(3, 40)), [13])], [([1, 5], [6])]]
    got, cut = harness.loglikelihoods(model, groups, 4, progress=False, max_length=30)
    assert cut == 2
    fitted = [[(c[len(c) + len(t) - 31:], t) for c, t in groups[0]], groups[1]]  # (ctx + cont)[-(30 + 1):]
    for group, scores in zip(fitted, got):
        assert [s for s, _ in scores] == pytest.approx([s for s, _ in reference(model, group)], abs=1e-4)
    with pytest.raises(ValueError, match="a continuation of 31 tokens exceeds the model's 30"):
        harness.loglikelihoods(model, [[([1], list(range(3, 34)))]], 4, progress=False, max_length=30)


def test_an_items_context_runs_once_for_all_its_choices(lm, arc):
    model, tok = lm
    d = arc.docs[0]
    context = T.build_context(arc, d, T.draw_shots(arc, [d], 3)[0])
    group = [harness.encode_pair(tok, context, " " + c) for c in d.choices]
    fed = []
    hook = model.model.embed_tokens.register_forward_hook(lambda m, args, out: fed.append(tuple(args[0].shape)))
    try:
        harness.loglikelihoods(model, [group], 16, progress=False)
    finally:
        hook.remove()
    n_ctx = len(group[0][0])
    assert fed == [(1, n_ctx + sum(len(t) - 1 for _, t in group))]      # one row: context once, then choices
    assert fed[0][1] < sum(len(c) + len(t) - 1 for c, t in group) / 2     # lm-eval runs each request whole


def test_packed_rows_run_the_same_decoder_as_hidden_states(lm):
    """One segment-0 row with positions 0… is a plain causal sequence; padding never changes a real row."""
    from model.packed import hidden_states_packed, tree_mask
    model, _ = lm
    ids = torch.randint(3, 600, (2, 9), generator=torch.Generator().manual_seed(0))
    segments = torch.zeros(2, 9, dtype=torch.long)
    segments[1, 6:] = -1                                                  # the second row: 6 tokens + padding
    positions = torch.arange(9).expand(2, 9)
    with torch.no_grad():
        packed = hidden_states_packed(model, ids, positions, tree_mask(segments))
        assert torch.allclose(packed[0], model.hidden_states(ids[:1])[0], atol=1e-5)
        assert torch.allclose(packed[1, :6], model.hidden_states(ids[1:, :6])[0], atol=1e-5)
    mask = tree_mask(torch.tensor([[0, 0, 1, 1, 2, -1]]))[0, 0].int().tolist()
    assert mask == [[1, 0, 0, 0, 0, 0],          # context
                    [1, 1, 0, 0, 0, 0],
                    [1, 1, 1, 0, 0, 0],          # choice 1: the context and itself
                    [1, 1, 1, 1, 0, 0],
                    [1, 1, 0, 0, 1, 0],          # choice 2: the context and itself, not choice 1
                    [0, 0, 0, 0, 0, 1]]          # padding: itself only


def test_batch_sizes_1_and_8_give_the_same_accuracy_to_the_last_digit(lm, arc):
    model, tok = lm
    runs = [harness.evaluate(model, tok, [arc], num_fewshot=2, batch_size=b, log_samples=True, progress=False)
            for b in (1, 8)]
    one, eight = (r["results"]["arc_easy"] for r in runs)
    assert one == eight                                                  # acc, acc_norm, stderrs: identical
    for a, b in zip(runs[0]["samples"]["arc_easy"], runs[1]["samples"]["arc_easy"]):
        assert [x for x, _ in a["resps"]] == pytest.approx([x for x, _ in b["resps"]], abs=1e-5)


def test_generation_is_greedy_cut_at_stop_strings_and_independent_of_batching(lm):
    model, tok = lm
    prompts = ["Question: Which is a gas?\nAnswer:", "The", "Question: What melts ice?\nAnswer: heat\n\nQuestion:"]
    batched = harness.generate_all(model, tok, prompts, until=("\n",), max_gen_toks=12, batch_size=3, progress=False)
    for p, text in zip(prompts, batched):
        alone = generate(model, [tok.encode(p)], 12, eos_id=tok.eos_id, stop_strings=("\n",), tokenizer=tok)[0].text
        assert text == alone and "\n" not in text


def test_group_score_is_size_weighted_with_pooled_stderr(lm):
    model, tok = lm
    a, b = T.mmlu(DATA, "astronomy"), T.mmlu(DATA, "anatomy")
    a.docs, b.docs = a.docs[:3], b.docs[:6]
    out = harness.evaluate(model, tok, [a, b], num_fewshot={"mmlu": 1}, progress=False)
    ra, rb, g = out["results"]["mmlu_astronomy"], out["results"]["mmlu_anatomy"], out["results"]["mmlu"]
    assert list(out["results"])[0] == "mmlu" and out["groups"]["mmlu"] == g
    assert out["group_subtasks"] == {"mmlu": ["mmlu_astronomy", "mmlu_anatomy"]}
    assert out["n-shot"]["mmlu_anatomy"] == 1 and g["sample_len"] == 9
    assert g["acc,none"] == pytest.approx((3 * ra["acc,none"] + 6 * rb["acc,none"]) / 9)
    assert g["acc_stderr,none"] == pytest.approx(lm_metrics.pooled_sample_stderr(
        [ra["acc_stderr,none"], rb["acc_stderr,none"]], [3, 6]))
    table = harness.format_table(out, {"mmlu": "acc,none"})
    assert "|mmlu " in table and "acc*" in table and "mmlu_anatomy" in table


def test_toy_tasks_score_through_the_python_api(lm):
    model, tok = lm
    mc, gen = T.toy_mc(4), T.toy_gen(4)
    gen.max_gen_toks = 8
    out = harness.evaluate(model, tok, [mc, gen], batch_size=4, log_samples=True, progress=False)
    assert set(out["results"]["toy_mc"]) >= {"acc,none", "acc_stderr,none", "acc_norm,none"}
    assert 0 <= out["results"]["toy_gen"]["exact_match,none"] <= 1
    sample = out["samples"]["toy_mc"][0]
    d = mc.docs[0]
    assert sample["arguments"] == [[d.query, c] for c in d.choices]       # no space after "### Response:\n"
    (response,) = out["samples"]["toy_gen"][0]["resps"][0]
    assert response == generate(model, [tok.encode(gen.docs[0].query)], 8, eos_id=tok.eos_id,
                                stop_strings=gen.until, tokenizer=tok)[0].text


# --- command line ----------------------------------------------------------------------------------------

def test_command_line_writes_lm_eval_json_samples_and_a_table(ckpt, tmp_path, capsys):
    out = tmp_path / "res.json"
    cli_main(["--model", str(ckpt), "--tasks", "arc_easy,toy_mc", "--limit", "3", "--num-fewshot", "1",
              "--batch-size", "4", "--output", str(out), "--log-samples", "true", "--progress", "false"])
    printed = capsys.readouterr().out
    assert "|arc_easy" in printed and "|toy_mc" in printed and f"wrote {out}" in printed
    res = json.loads(out.read_text())
    assert res["results"]["arc_easy"]["alias"] == "arc_easy" and "acc_norm_stderr,none" in res["results"]["arc_easy"]
    assert res["n-samples"]["arc_easy"] == {"original": 2376, "effective": 3}
    assert res["config"]["model_path"] == str(ckpt) and res["config"]["add_bos_token"] is True
    rows = [json.loads(line) for line in (tmp_path / "res.samples.jsonl").read_text().splitlines()]
    assert [r["task"] for r in rows] == ["arc_easy"] * 3 + ["toy_mc"] * 3
    assert not list(tmp_path.glob("*.tmp"))


@pytest.mark.parametrize("argv,message", [
    ([], "--model PATH is required"),
    (["--model", "x"], "give either --tasks"),
    (["--model", "x", "--preset", "open_llm_v2"], "preset is 'open_llm_v2', expected one of open_llm_v1"),
    (["--model", "{ckpt}", "--tasks", "arc"], "evaluate.py harness: unknown task 'arc'"),
    (["--model", "{ckpt}", "--tasks", "winogrande", "--data-dir", "{tmp}"], r"winogrande/dev\.jsonl: file not found"),
])
def test_command_line_errors_are_one_line(ckpt, tmp_path, argv, message):
    argv = [a.format(ckpt=ckpt, tmp=tmp_path) for a in argv]
    with pytest.raises(SystemExit, match=message) as e:
        cli_main(argv + ["--output", str(tmp_path / "o.json")])
    assert "\n" not in str(e.value)


def _copy_head(src, dst, n):
    dst.parent.mkdir(parents=True, exist_ok=True)
    with open(src, encoding="utf-8") as f:
        dst.write_text("".join(next(f) for _ in range(n)), encoding="utf-8")


def test_open_llm_v1_preset_runs_each_task_with_its_shots_and_averages_the_leaderboard_metrics(ckpt, tmp_path, capsys):
    import bz2
    d = tmp_path / "data"
    _copy_head(DATA / "arc/ARC-Challenge/ARC-Challenge-Test.jsonl", d / "arc/ARC-Challenge/ARC-Challenge-Test.jsonl", 2)
    _copy_head(DATA / "arc/ARC-Challenge/ARC-Challenge-Dev.jsonl", d / "arc/ARC-Challenge/ARC-Challenge-Dev.jsonl", 26)
    with bz2.open(DATA / "hellaswag/hellaswag_val_full.txt.bz2", "rt", encoding="utf-8") as f:
        head = "".join(next(f) for _ in range(6 * 12))
    (d / "hellaswag").mkdir()
    with bz2.open(d / "hellaswag/hellaswag_val_full.txt.bz2", "wt", encoding="utf-8") as f:
        f.write(head)
    for split, n in (("test", 3), ("dev", 6)):
        for subject in ("anatomy", "virology"):
            _copy_head(DATA / f"mmlu/{split}/{subject}_{split}.csv", d / f"mmlu/{split}/{subject}_{split}.csv", n)
    (d / "truthfulqa/data").mkdir(parents=True)
    items = json.loads((DATA / "truthfulqa/data/mc_task.json").read_text(encoding="utf-8"))[:2]
    (d / "truthfulqa/data/mc_task.json").write_text(json.dumps(items), encoding="utf-8")
    _copy_head(DATA / "gsm8k/test.jsonl", d / "gsm8k/test.jsonl", 1)
    _copy_head(DATA / "gsm8k/train.jsonl", d / "gsm8k/train.jsonl", 6)
    (d / "winogrande").mkdir()
    (d / "winogrande/dev.jsonl").write_text("".join(json.dumps(
        {"sentence": f"Tom gave Ann {k} apples because _ had many.", "option1": "Tom", "option2": "Ann",
         "answer": "1"}) + "\n" for k in range(7)))
    out = tmp_path / "preset.json"
    cli_main(["--model", str(ckpt), "--preset", "open_llm_v1", "--limit", "2", "--data-dir", str(d),
              "--output", str(out), "--progress", "false"])
    res = json.loads(out.read_text())
    assert res["n-shot"] == {"arc_challenge": 25, "hellaswag": 10, "mmlu_anatomy": 5, "mmlu_virology": 5,
                             "truthfulqa_mc2": 0, "winogrande": 5, "gsm8k": 5}
    board = res["leaderboard"]
    expect = {"arc_challenge": res["results"]["arc_challenge"]["acc_norm,none"],
              "hellaswag": res["results"]["hellaswag"]["acc_norm,none"], "mmlu": res["results"]["mmlu"]["acc,none"],
              "truthfulqa_mc2": res["results"]["truthfulqa_mc2"]["acc,none"],
              "winogrande": res["results"]["winogrande"]["acc,none"],
              "gsm8k": res["results"]["gsm8k"]["exact_match,strict-match"]}
    assert board["scores"] == expect and board["average"] == pytest.approx(sum(expect.values()) / 6)
    assert res["configs"]["gsm8k"]["generation_kwargs"]["until"] == ["Question:", "</s>", "<|im_end|>"]
    assert "open_llm_v1 average over 6 tasks" in capsys.readouterr().out
    # without a Winogrande file the preset says so and goes on (here it stops at the missing model)
    (d / "winogrande/dev.jsonl").unlink()
    with pytest.raises(SystemExit):
        cli_main(["--model", str(tmp_path / "none"), "--preset", "open_llm_v1", "--data-dir", str(d)])
    assert "skipping winogrande: no " in capsys.readouterr().err
