"""DPO batches with the prompt computed once per pair: [prompt, chosen response, rejected response] in one row.

The two rows of a pair (data/batching.py tokenize_pair) begin with the same P prompt tokens, so a forward pass
over [2B, P + R] rows computes every prompt twice. Packed, each pair is one row of P + Rc + Rr tokens

    tokens     p0 … p(P−1) | c0 … c(Rc−1)  | r0 … r(Rr−1)  | pads
    positions  0  … P−1    | P  … P+Rc−1   | P  … P+Rr−1   | 0
    segment    0  …        | 1  …          | 2  …          | −1

and attention is causal within the row, each response seeing the prompt and itself only (model/packed.py:
tree_mask of these segments, hidden_states_packed runs the decoder stack with it). Each response then sees
exactly the prompt and its own earlier tokens at the positions it has in its own row, so its hidden states
equal those of the unpacked row (up to float rounding: other matmul shapes, an explicit mask). With prompts
of ~P and responses of ~R tokens a step processes B(P + 2R) tokens instead of 2B(P + R): a quarter fewer at
P = R, about half fewer for the short answers of the toy pairs.

Scoring. The unpacked layout is recovered by a gather: `index` [2B, U] gives, for each position of the
chosen rows (0 … B−1) and then the rejected rows (B … 2B−1) as collate_dpo lays them out, its position in the
packed batch flattened to B·T; padding maps to 0 (its label is −100). hidden.view(B·T, D)[index] is then
[2B, U, D] with collate_dpo's labels, and losses.sequence_logps_chunked scores it unchanged. The rejected
response's first token is predicted from the prompt's last position, which the gather provides.

Shapes: B pairs, T packed tokens, U tokens of the longest unpacked row.
"""
import torch

from data.batching import collate_dpo


def collate_dpo_packed(rows, pad_id):
    """rows of tokenize_pair → {"input_ids", "position_ids", "segments": [B, T] int64, "index", "labels":
    [2B, U] int64}; see the module docstring. labels are collate_dpo's (chosen rows first)."""
    B = len(rows)
    lengths = [len(r["chosen_input_ids"]) + len(r["rejected_input_ids"]) - r["prompt_len"] for r in rows]
    T = max(lengths)
    input_ids = torch.full((B, T), pad_id, dtype=torch.long, device="cpu")                       # [B, T]
    position_ids = torch.zeros((B, T), dtype=torch.long, device="cpu")                           # [B, T]
    segments = torch.full((B, T), -1, dtype=torch.long, device="cpu")                            # [B, T]
    unpacked = collate_dpo(rows, pad_id)
    U = unpacked["labels"].shape[1]
    index = torch.zeros((2 * B, U), dtype=torch.long, device="cpu")                              # [2B, U]
    for b, r in enumerate(rows):
        P = r["prompt_len"]
        chosen, rejected = r["chosen_input_ids"][P:], r["rejected_input_ids"][P:]
        Rc, Rr = len(chosen), len(rejected)
        input_ids[b, :P + Rc + Rr] = torch.tensor(r["chosen_input_ids"] + rejected, device="cpu")
        position_ids[b, :P + Rc] = torch.arange(P + Rc, device="cpu")
        position_ids[b, P + Rc:P + Rc + Rr] = torch.arange(P, P + Rr, device="cpu")
        segments[b, :P], segments[b, P:P + Rc], segments[b, P + Rc:P + Rc + Rr] = 0, 1, 2
        index[b, :P + Rc] = b * T + torch.arange(P + Rc, device="cpu")                           # chosen row b
        index[B + b, :P] = b * T + torch.arange(P, device="cpu")                                 # rejected row b
        index[B + b, P:P + Rr] = b * T + torch.arange(P + Rc, P + Rc + Rr, device="cpu")
    return {"input_ids": input_ids, "position_ids": position_ids, "segments": segments, "index": index,
            "labels": unpacked["labels"]}
