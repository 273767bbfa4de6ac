"""Batches: DPO pair tokenisation, right-padded collation (SFT and DPO), and a length-grouped batch sampler.

Padding (collate_sft, collate_dpo): rows are padded on the right to the longest row of the batch (rounded up to
pad_to_multiple_of). Pad positions get input_ids = pad_id, attention_mask = 0 and labels = -100, so they are
neither attended to nor scored; real tokens get attention_mask = 1.

DPO batches: tokenize_pair encodes the prompt once and each response separately, then concatenates,

    chosen   = encode(prompt, bos=True) + encode(chosen,   bos=False, eos=True)
    rejected = encode(prompt, bos=True) + encode(rejected, bos=False, eos=True)

so both rows start with bit-identical prompt tokens (tokenising "prompt + response" as one string can merge
pieces across the boundary differently for the two responses, the prompt/response mismatch TRL users meet).
Labels are -100 on the prompt, the ids on the response with its EOS (the SFT convention of data/sft.py).
Too long (prompt + longer response > max_len), by data/sft.py's rule with the longer response: the prompt is
cut from the left, BOS kept, as far as needed but never below min(its length, min_prompt_len) tokens
("truncated prompt"); if that is not enough, both responses are cut on the right to max_len − prompt length
("truncated response"); each counted once per pair. (TRL cuts every too-long prompt to a fixed
max_prompt_length instead, even when fewer cut tokens would do.) collate_dpo stacks the B chosen rows and then
the B rejected rows into one [2B, T] batch, so one forward pass serves both (the DPO reference's
`concatenated_forward`): logps[:B] are the chosen, logps[B:] the rejected.

Length grouping (LengthGroupedSampler), to waste little compute on padding without sorting the whole epoch:

    perm      = a random permutation of the N examples          (rng seeded by (seed, epoch))
    mega      = perm cut into chunks of batch_size × mega_batch_mult
    batches   = each chunk sorted by length, longest first (stable), cut into batch_size slices
    order     = the batches shuffled with the same rng; the batch holding the longest example goes first,
                so an out-of-memory error shows at step 0, not hours in

Each example appears exactly once per epoch (one batch may be short; nothing is dropped). The order is a
pure function of (seed, epoch, lengths), so a run resumed at (epoch, batch index k) continues with
batches(epoch)[k:], exactly the batches the uninterrupted run would have seen. Packing is not offered: length
grouping already removes most of the padding, and it keeps attention simple (one example per row).

Shapes: B batch (pairs for DPO), T tokens.
"""

import numpy as np
import torch

from data.sft import DataStats, keep_tail
from losses import IGNORE_INDEX


def tokenize_pair(tok, prompt, chosen, rejected, max_len, min_prompt_len, stats=None, where=None):
    """→ {"chosen_input_ids", "chosen_labels", "rejected_input_ids", "rejected_labels": list[int],
    "prompt_len": int}; both rows begin with the same prompt_len prompt tokens and are ≤ max_len long.
    Pass a DataStats (and the pair's "file:line") to count truncations (see the module docstring)."""
    if not 2 <= min_prompt_len < max_len:
        raise ValueError(f"tokenize_pair: need 2 <= min_prompt_len < max_len, got {min_prompt_len}, {max_len}")
    prompt_ids = tok.encode(prompt, bos=True)                                 # [P], BOS first
    responses = [tok.encode(chosen, bos=False, eos=True), tok.encode(rejected, bos=False, eos=True)]
    if len(prompt_ids) + max(map(len, responses)) > max_len:
        room = max_len - min(len(prompt_ids), min_prompt_len)                 # for a response
        if max(map(len, responses)) > room:
            responses = [r[:room] for r in responses]
            if stats is not None:
                stats.add("truncated response", where=where)
        if len(prompt_ids) + max(map(len, responses)) > max_len:
            prompt_ids = keep_tail(prompt_ids, max_len - max(map(len, responses)))
            if stats is not None:
                stats.add("truncated prompt", where=where)
    row = {"prompt_len": len(prompt_ids)}
    for name, response in zip(("chosen", "rejected"), responses):
        row[f"{name}_input_ids"] = prompt_ids + response
        row[f"{name}_labels"] = [IGNORE_INDEX] * len(prompt_ids) + response
    return row


def tokenize_pairs(tok, pairs, max_len, min_prompt_len):
    """tokenize_pair over a list of data.hh.Pair. Returns (rows, DataStats with "tokenized" and truncations)."""
    stats = DataStats("tokenize pairs")
    stats.add("tokenized", len(pairs))
    rows = [tokenize_pair(tok, p.prompt, p.chosen, p.rejected, max_len, min_prompt_len, stats, p.id)
            for p in pairs]
    return rows, stats


def pad_right(sequences, labels, pad_id, pad_to_multiple_of=1):
    """Lists of ids and labels → input_ids, attention_mask, labels, each a [B, T] int64 tensor, T = the
    longest row rounded up to pad_to_multiple_of."""
    if not sequences or len(sequences) != len(labels):
        raise ValueError(f"pad_right: got {len(sequences)} sequences and {len(labels)} label rows; expected "
                         f"the same number, at least one")
    T = max(map(len, sequences))
    T = -(-T // pad_to_multiple_of) * pad_to_multiple_of
    B = len(sequences)
    input_ids = torch.full((B, T), pad_id, dtype=torch.long, device="cpu")                 # [B, T]
    attention_mask = torch.zeros((B, T), dtype=torch.long, device="cpu")                   # [B, T]
    label_ids = torch.full((B, T), IGNORE_INDEX, dtype=torch.long, device="cpu")           # [B, T]
    for b, (ids, lab) in enumerate(zip(sequences, labels)):
        if len(ids) != len(lab):
            raise ValueError(f"pad_right: row {b} has {len(ids)} input ids but {len(lab)} labels")
        input_ids[b, :len(ids)] = torch.tensor(ids, dtype=torch.long, device="cpu")
        attention_mask[b, :len(ids)] = 1
        label_ids[b, :len(lab)] = torch.tensor(lab, dtype=torch.long, device="cpu")
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": label_ids}


def collate_sft(rows, pad_id, pad_to_multiple_of=1):
    """rows of tokenize_example → {"input_ids", "attention_mask", "labels"}: [B, T] int64, right-padded."""
    return pad_right([r["input_ids"] for r in rows], [r["labels"] for r in rows], pad_id, pad_to_multiple_of)


def collate_dpo(rows, pad_id, pad_to_multiple_of=1):
    """rows of tokenize_pair → {"input_ids", "attention_mask", "labels"}: [2B, T] int64, right-padded;
    rows 0…B−1 are the chosen responses, rows B…2B−1 the rejected ones, in the same pair order."""
    sequences = [r["chosen_input_ids"] for r in rows] + [r["rejected_input_ids"] for r in rows]
    labels = [r["chosen_labels"] for r in rows] + [r["rejected_labels"] for r in rows]
    return pad_right(sequences, labels, pad_id, pad_to_multiple_of)          # [2B, T] each


class LengthGroupedSampler:
    """Batches of similar-length examples, shuffled, deterministic in (seed, epoch); see the module docstring.

    sampler = LengthGroupedSampler(lengths, batch_size=8, seed=0)
    for k, batch in enumerate(sampler.batches(epoch)[start:], start): …   # batch: list of example indices"""

    def __init__(self, lengths, batch_size, seed, mega_batch_mult=50):
        if batch_size < 1 or mega_batch_mult < 1:
            raise ValueError(f"LengthGroupedSampler: batch_size={batch_size}, mega_batch_mult={mega_batch_mult}; "
                             f"both must be ≥ 1")
        if len(lengths) == 0:
            raise ValueError("LengthGroupedSampler: no examples")
        self.lengths = np.asarray(lengths, dtype=np.int64)                   # [N]
        self.batch_size, self.seed, self.mega_batch_mult = batch_size, seed, mega_batch_mult

    def __len__(self):
        """Batches per epoch."""
        return -(-len(self.lengths) // self.batch_size)

    def batches(self, epoch):
        """The epoch's batches, in order: a list of lists of example indices."""
        rng = np.random.default_rng([self.seed, epoch])
        perm = rng.permutation(len(self.lengths))                            # [N]
        mega = self.batch_size * self.mega_batch_mult
        batches = []
        for start in range(0, len(perm), mega):
            chunk = perm[start:start + mega]
            chunk = chunk[np.argsort(-self.lengths[chunk], kind="stable")]   # longest first
            batches += [chunk[i:i + self.batch_size].tolist() for i in range(0, len(chunk), self.batch_size)]
        batches = [batches[i] for i in rng.permutation(len(batches))]
        longest = int(np.argmax(self.lengths))
        first = next(k for k, batch in enumerate(batches) if longest in batch)
        batches.insert(0, batches.pop(first))
        return batches
