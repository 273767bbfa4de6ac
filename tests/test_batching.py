"""data/batching.py: DPO pair tokenisation, right-padded collation, the length-grouped batch sampler.

Real HH-RLHF pairs (the helpful-base test split) and a small SentencePiece model trained here on their text
make the DPO batches; the sampler is checked on made-up lengths. Expected tensors are written out or derived
from the tokenizer's own encode of each part.
"""

from pathlib import Path

import numpy as np
import pytest
import torch

from data.batching import LengthGroupedSampler, collate_dpo, collate_sft, tokenize_pair, tokenize_pairs
from data.hh import hh_files, hh_pairs
from data.sft import DataStats, keep_tail
from data.template import DEFAULT_SYSTEM, RESPONSE_MARKER
from model.tokenizer import Tokenizer, train_tokenizer

HH_ROOT = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "hh-rlhf"


@pytest.fixture(scope="module")
def pairs():
    pairs, _ = hh_pairs(hh_files(HH_ROOT, "test", ["helpful-base"]), first_n=64)
    return pairs


@pytest.fixture(scope="module")
def tok(pairs, tmp_path_factory):
    texts = [DEFAULT_SYSTEM] + [p.prompt + p.chosen + "\n" + p.rejected for p in pairs]
    return Tokenizer(train_tokenizer(texts, tmp_path_factory.mktemp("tok") / "hh", 400))


# --- collation ---

def test_sft_rows_are_right_padded_with_mask_zero_and_labels_minus_100():
    rows = [{"input_ids": [1, 5, 6, 2], "labels": [-100, -100, 6, 2]},
            {"input_ids": [1, 7, 2], "labels": [-100, 7, 2]}]
    batch = collate_sft(rows, pad_id=0)
    assert batch["input_ids"].tolist() == [[1, 5, 6, 2], [1, 7, 2, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 1, 0]]
    assert batch["labels"].tolist() == [[-100, -100, 6, 2], [-100, 7, 2, -100]]
    assert all(t.dtype == torch.long and t.shape == (2, 4) for t in batch.values())
    padded = collate_sft(rows, pad_id=0, pad_to_multiple_of=8)
    assert padded["input_ids"].shape == (2, 8) and padded["attention_mask"].sum().item() == 7
    with pytest.raises(ValueError, match="row 0 has 2 input ids but 1 labels"):
        collate_sft([{"input_ids": [1, 2], "labels": [2]}], pad_id=0)


def test_dpo_rows_share_the_prompt_tokens_bit_for_bit(tok, pairs):
    rows, stats = tokenize_pairs(tok, pairs, max_len=4096, min_prompt_len=2048)
    assert stats["tokenized"] == len(pairs) and stats["truncated prompt"] == stats["truncated response"] == 0
    batch = collate_dpo(rows, tok.pad_id)
    B = len(pairs)
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape
    assert batch["input_ids"].shape[0] == 2 * B
    for b, (pair, row) in enumerate(zip(pairs, rows)):
        P = row["prompt_len"]
        assert P == len(tok.encode(pair.prompt))
        assert torch.equal(batch["input_ids"][b, :P], batch["input_ids"][B + b, :P])      # chosen b, rejected b
        assert batch["input_ids"][b, :P].tolist() == tok.encode(pair.prompt)
        assert tok.decode(batch["input_ids"][b, :P].tolist()).endswith(RESPONSE_MARKER)
        for r, response in ((b, pair.chosen), (B + b, pair.rejected)):   # chosen rows first, then rejected
            ids = tok.encode(response, bos=False, eos=True)
            n = P + len(ids)
            assert batch["input_ids"][r, P:n].tolist() == ids and batch["attention_mask"][r].sum().item() == n


def test_dpo_labels_are_minus_100_exactly_on_prompt_and_padding_and_end_with_eos(tok, pairs):
    rows, _ = tokenize_pairs(tok, pairs, max_len=4096, min_prompt_len=2048)
    batch = collate_dpo(rows, tok.pad_id)
    B, T = len(rows), batch["input_ids"].shape[1]
    for r in range(2 * B):
        row = rows[r % B]
        P, n = row["prompt_len"], int(batch["attention_mask"][r].sum())
        labels, ids = batch["labels"][r], batch["input_ids"][r]
        assert batch["attention_mask"][r].tolist() == [1] * n + [0] * (T - n)
        assert (labels[:P] == -100).all() and (labels[n:] == -100).all()
        assert torch.equal(labels[P:n], ids[P:n]) and (labels[P:n] != -100).all()
        assert labels[n - 1].item() == tok.eos_id and (ids[n:] == tok.pad_id).all()


def test_too_long_pairs_cut_the_prompt_down_to_min_prompt_len_then_the_responses(tok, pairs):
    pair = max(pairs, key=lambda p: len(p.prompt))
    prompt = tok.encode(pair.prompt)
    chosen, rejected = (tok.encode(x, bos=False, eos=True) for x in (pair.chosen, pair.rejected))
    max_prompt_len = len(prompt) // 2
    # 1. only the prompt is cut: room for the longer response after max_prompt_len tokens
    stats = DataStats()
    max_len = max_prompt_len + max(len(chosen), len(rejected))
    row = tokenize_pair(tok, pair.prompt, pair.chosen, pair.rejected, max_len, max_prompt_len, stats)
    assert row["chosen_input_ids"] == keep_tail(prompt, max_prompt_len) + chosen
    assert row["rejected_input_ids"][:max_prompt_len] == [tok.bos_id] + prompt[-(max_prompt_len - 1):]
    assert (stats["truncated prompt"], stats["truncated response"]) == (1, 0)
    # 2. both are cut: each response keeps max_len − max_prompt_len tokens, losing its EOS
    max_len = max_prompt_len + 5
    row = tokenize_pair(tok, pair.prompt, pair.chosen, pair.rejected, max_len, max_prompt_len, stats)
    assert row["chosen_input_ids"] == keep_tail(prompt, max_prompt_len) + chosen[:5]
    assert row["rejected_labels"] == [-100] * max_prompt_len + rejected[:5]
    assert (stats["truncated prompt"], stats["truncated response"]) == (2, 1)
    # 3. a short prompt is never cut, even when the responses are
    short = tok.encode("Hi")
    row = tokenize_pair(tok, "Hi", pair.chosen, pair.rejected, len(short) + 5, len(short) + 2, stats)
    assert row["chosen_input_ids"] == short + chosen[:5] and row["rejected_input_ids"] == short + rejected[:5]
    assert (stats["truncated prompt"], stats["truncated response"]) == (2, 2)
    with pytest.raises(ValueError, match="min_prompt_len < max_len"):
        tokenize_pair(tok, pair.prompt, pair.chosen, pair.rejected, 64, 64)


# --- the length-grouped sampler ---

def made_up_lengths(n=1003, seed=0):
    return np.random.default_rng(seed).integers(5, 2000, size=n).tolist()


def test_every_example_appears_exactly_once_per_epoch():
    lengths = made_up_lengths()
    sampler = LengthGroupedSampler(lengths, batch_size=8, seed=3, mega_batch_mult=10)
    for epoch in range(3):
        batches = sampler.batches(epoch)
        assert len(batches) == len(sampler) == 126                      # ⌈1003 / 8⌉
        assert sorted(i for batch in batches for i in batch) == list(range(len(lengths)))
        assert sorted(map(len, batches))[0] == 1003 % 8 and sum(len(b) < 8 for b in batches) == 1


def test_the_order_is_a_function_of_seed_and_epoch_only():
    lengths = made_up_lengths()
    a = LengthGroupedSampler(lengths, batch_size=8, seed=3).batches(1)
    assert a == LengthGroupedSampler(lengths, batch_size=8, seed=3).batches(1)
    assert a != LengthGroupedSampler(lengths, batch_size=8, seed=3).batches(2)
    assert a != LengthGroupedSampler(lengths, batch_size=8, seed=4).batches(1)


def test_resuming_mid_epoch_gives_the_same_remaining_batches():
    lengths = made_up_lengths()
    uninterrupted = [(epoch, batch) for epoch in range(2)
                     for batch in LengthGroupedSampler(lengths, batch_size=8, seed=7).batches(epoch)]
    # a run stops after batch 50 of epoch 0; a new process rebuilds the sampler and continues from (0, 50)
    done = uninterrupted[:50]
    restarted = LengthGroupedSampler(lengths, batch_size=8, seed=7)
    rest = [(0, batch) for batch in restarted.batches(0)[50:]] + [(1, batch) for batch in restarted.batches(1)]
    assert done + rest == uninterrupted


def test_batches_are_length_groups_and_the_longest_comes_first():
    lengths = made_up_lengths()
    # one mega-batch holding everything: the batches are consecutive slices of the length-sorted order,
    # so the length ranges of two batches never overlap
    batches = LengthGroupedSampler(lengths, batch_size=8, seed=0, mega_batch_mult=1000).batches(0)
    ranges = sorted((min(lengths[i] for i in b), max(lengths[i] for i in b)) for b in batches)
    assert all(hi <= next_lo for (_, hi), (next_lo, _) in zip(ranges, ranges[1:]))
    assert int(np.argmax(lengths)) in batches[0]
    # with the default mega-batches, padding is a small fraction of what random batches of 8 waste
    def padding(batches):
        return sum(len(b) * max(lengths[i] for i in b) - sum(lengths[i] for i in b) for b in batches)
    grouped = LengthGroupedSampler(lengths, batch_size=8, seed=0, mega_batch_mult=50).batches(0)
    perm = np.random.default_rng(0).permutation(len(lengths)).tolist()
    random = [perm[i:i + 8] for i in range(0, len(perm), 8)]
    assert padding(grouped) < 0.1 * padding(random)
    with pytest.raises(ValueError, match="batch_size=0"):
        LengthGroupedSampler(lengths, batch_size=0, seed=0)
