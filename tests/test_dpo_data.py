"""DPO batches: the packed layout (data/dpo.py) written out by hand, its log-probs and gradients equal to the
stacked [2B, T] batch and to each sequence scored alone, the truncation rule on real HH-RLHF pairs, and the toy
preference pairs read back as HH-RLHF records."""
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from data.batching import tokenize_pair, tokenize_pairs
from data.dpo import collate_dpo_packed
from data.hh import hh_example, hh_files, hh_pairs
from data.sft import DataStats
from data.template import DEFAULT_SYSTEM
from lora import apply_lora, lora_modules
from losses import sequence_logps
from model import PRESETS, Llama
from model.packed import tree_mask
from model.tokenizer import Tokenizer, train_tokenizer
from toy import world
from train_dpo import collate, pair_logps

HH_ROOT = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "hh-rlhf"


def row(prompt, chosen, rejected):
    """A tokenize_pair row from id lists (responses without the prompt)."""
    return {"prompt_len": len(prompt), "chosen_input_ids": prompt + chosen, "rejected_input_ids": prompt + rejected,
            "chosen_labels": [-100] * len(prompt) + chosen, "rejected_labels": [-100] * len(prompt) + rejected}


# --- the packed layout ----------------------------------------------------------------------------------

def test_a_pair_packs_into_prompt_chosen_rejected_with_response_positions_restarting_after_the_prompt():
    rows = [row([1, 5, 6], [7, 2], [8, 9, 2]), row([1, 4], [3, 2], [2])]
    b = collate_dpo_packed(rows, pad_id=0)
    assert b["input_ids"].tolist() == [[1, 5, 6, 7, 2, 8, 9, 2], [1, 4, 3, 2, 2, 0, 0, 0]]
    assert b["position_ids"].tolist() == [[0, 1, 2, 3, 4, 3, 4, 5], [0, 1, 2, 3, 2, 0, 0, 0]]
    assert b["segments"].tolist() == [[0, 0, 0, 1, 1, 2, 2, 2], [0, 0, 1, 1, 2, -1, -1, -1]]
    T = 8   # index: positions in the packed batch flattened to B·T, in collate_dpo's [2B, U] layout (U = 6)
    assert b["index"].tolist() == [[0, 1, 2, 3, 4, 0],                  # chosen 0: prompt, chosen; pad → 0
                                   [T + 0, T + 1, T + 2, T + 3, 0, 0],  # chosen 1
                                   [0, 1, 2, 5, 6, 7],                  # rejected 0: prompt, then its response
                                   [T + 0, T + 1, T + 4, 0, 0, 0]]      # rejected 1
    assert b["labels"].tolist() == [[-100, -100, -100, 7, 2, -100], [-100, -100, 3, 2, -100, -100],
                                    [-100, -100, -100, 8, 9, 2], [-100, -100, 2, -100, -100, -100]]
    # the gather rebuilds every unpacked row's tokens exactly
    for r, ids in enumerate([rows[0]["chosen_input_ids"], rows[1]["chosen_input_ids"],
                             rows[0]["rejected_input_ids"], rows[1]["rejected_input_ids"]]):
        assert b["input_ids"].flatten()[b["index"][r, :len(ids)]].tolist() == ids


def test_rejected_tokens_see_the_prompt_and_themselves_but_not_the_chosen_response():
    """Pair 1 above: prompt 0-1, chosen 2-3, rejected 4, pads 5-7 (1 = may attend; a pad sees itself only)."""
    mask = tree_mask(collate_dpo_packed([row([1, 5, 6], [7, 2], [8, 9, 2]), row([1, 4], [3, 2], [2])], 0)["segments"])
    assert mask.shape == (2, 1, 8, 8)
    assert mask[1, 0].int().tolist() == [[1, 0, 0, 0, 0, 0, 0, 0],
                                         [1, 1, 0, 0, 0, 0, 0, 0],
                                         [1, 1, 1, 0, 0, 0, 0, 0],
                                         [1, 1, 1, 1, 0, 0, 0, 0],
                                         [1, 1, 0, 0, 1, 0, 0, 0],
                                         [0, 0, 0, 0, 0, 1, 0, 0],
                                         [0, 0, 0, 0, 0, 0, 1, 0],
                                         [0, 0, 0, 0, 0, 0, 0, 1]]


@pytest.fixture(scope="module")
def micro_model():
    """A random 2-layer LLaMA with LoRA on every projection and B ≠ 0, so adapters change the logits."""
    config = replace(PRESETS["tiny"], vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=4)
    model = Llama(config)
    model.init_weights(seed=0, std=0.2)
    torch.manual_seed(0)
    apply_lora(model, 4, 8, 0.0, "all-linear")
    with torch.no_grad():
        for _, m in lora_modules(model):
            m.lora_B.weight.normal_(0, 0.1)
    return model.train()


def random_rows(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = lambda k: torch.randint(3, 64, (k,), generator=g).tolist()    # noqa: E731
    lengths = [(9, 4, 6), (5, 7, 1), (12, 2, 3), (3, 5, 5)]
    return [row([1] + ids(P - 1), ids(Rc - 1) + [2], ids(Rr - 1) + [2]) for P, Rc, Rr in lengths[:n]]


@pytest.mark.parametrize("checkpointing", [False, True])
def test_packed_log_probs_and_gradients_equal_the_stacked_batch_and_each_sequence_alone(micro_model, checkpointing):
    model, rows = micro_model, random_rows(4)
    model.gradient_checkpointing = checkpointing
    alone = torch.tensor([[sequence_logps(model(torch.tensor([r[f"{s}_input_ids"]])).detach(),
                                          torch.tensor([r[f"{s}_labels"]]))[0].item() for s in ("chosen", "rejected")]
                          for r in rows])                                                   # [B, 2], unpadded
    grads = {}
    for share_prompt in (True, False):
        chosen, rejected = pair_logps(model, collate(rows, 0, share_prompt, "cpu"), chunk_size=5)
        assert torch.allclose(torch.stack([chosen, rejected], 1), alone, atol=1e-4, rtol=0)
        model.zero_grad()
        (chosen.sum() - 2 * rejected.sum()).backward()
        grads[share_prompt] = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    assert all(torch.allclose(grads[True][n], grads[False][n], atol=1e-4, rtol=1e-4) for n in grads[True])
    assert any(g.abs().max() > 1e-3 for g in grads[True].values())
    model.gradient_checkpointing = False


# --- tokenisation: the truncation rule on real pairs -----------------------------------------------------

@pytest.fixture(scope="module")
def real(tmp_path_factory):
    pairs, _ = hh_pairs(hh_files(HH_ROOT, "test", ["helpful-base"]), first_n=96)
    texts = [DEFAULT_SYSTEM] + [p.prompt + p.chosen + "\n" + p.rejected for p in pairs]
    return pairs, Tokenizer(train_tokenizer(texts, tmp_path_factory.mktemp("tok") / "hh", 400))


def test_a_too_long_pair_keeps_as_much_prompt_as_fits_not_a_fixed_cut(real):
    """TRL would cut every too-long prompt to max_prompt_length; here it loses only what does not fit."""
    pairs, tok = real
    pair = max(pairs, key=lambda p: len(tok.encode(p.prompt)))
    prompt = tok.encode(pair.prompt)
    chosen, rejected = (tok.encode(x, bos=False, eos=True) for x in (pair.chosen, pair.rejected))
    longest = max(len(chosen), len(rejected))
    max_len = len(prompt) + longest - 7                                  # 7 tokens too many
    stats = DataStats()
    r = tokenize_pair(tok, pair.prompt, pair.chosen, pair.rejected, max_len, 16, stats, where="x:1")
    assert r["prompt_len"] == len(prompt) - 7 and r["chosen_input_ids"][r["prompt_len"]:] == chosen
    assert r["chosen_input_ids"][:r["prompt_len"]] == [tok.bos_id] + prompt[8:]      # cut from the left, BOS kept
    assert (stats["truncated prompt"], stats["truncated response"], stats.where["truncated prompt"]) == (1, 0, ["x:1"])


def test_real_pairs_fit_max_len_keep_min_prompt_len_and_share_their_prompt_tokens(real):
    pairs, tok = real
    max_len, min_prompt_len = 192, 48
    rows, stats = tokenize_pairs(tok, pairs, max_len, min_prompt_len)
    expected_cut = expected_short = 0
    for p, r in zip(pairs, rows):
        P = len(tok.encode(p.prompt))
        R = max(len(tok.encode(x, bos=False, eos=True)) for x in (p.chosen, p.rejected))
        expected_cut += P + R > max_len and P > min_prompt_len and max_len - R < P     # independent count
        expected_short += R > max_len - min(P, min_prompt_len)
        assert max(len(r["chosen_input_ids"]), len(r["rejected_input_ids"])) <= max_len
        assert r["prompt_len"] >= min(P, min_prompt_len)
        assert r["chosen_input_ids"][:r["prompt_len"]] == r["rejected_input_ids"][:r["prompt_len"]]
        assert r["chosen_labels"][:r["prompt_len"]] == [-100] * r["prompt_len"]
    assert stats["tokenized"] == len(pairs) and expected_cut > 0 and expected_short > 0
    assert (stats["truncated prompt"], stats["truncated response"]) == (expected_cut, expected_short)
    packed = collate_dpo_packed(rows, tok.pad_id)
    tokens = sum(len(r["chosen_input_ids"]) + len(r["rejected_input_ids"]) for r in rows)
    assert (packed["segments"] >= 0).sum() == tokens - sum(r["prompt_len"] for r in rows)   # each prompt once


# --- the toy preference pairs ------------------------------------------------------------------------

def test_toy_pairs_read_back_as_hh_records_with_the_sft_prompt_and_the_gold_answer_chosen(tmp_path):
    from files import write_jsonl_atomic
    path = tmp_path / "pairs.jsonl.gz"
    records = world.hh_pairs(50, seed=3, split="heldout")
    write_jsonl_atomic(path, records)
    pairs, stats = hh_pairs(str(path))
    assert (stats["read"], stats["used"], len(pairs)) == (50, 50, 50)
    for record, pair in zip(records, pairs):
        assert (pair.prompt, pair.chosen) == hh_example(record["chosen"])          # the HH SFT stage's mapping
        instruction = pair.prompt.split("### Instruction:\n")[1].split("\n\n### Response:")[0]
        task = world.parse_instruction(instruction.split("\n")[-1])         # the last turn (after any history)
        assert task is not None and world.check(task, pair.chosen) and not world.check(task, pair.rejected)
        assert world.split_of(task.family, task.operands) == "heldout"
