"""Harness scoring: log-likelihood requests as lm-evaluation-harness scores them, computed faster.

A multiple-choice item becomes one request per choice, (context, continuation = " " + choice), and

    ll_i       = Σ_{t ∈ continuation_i} log p(x_t | x_<t)                  summed, not averaged
    acc        = [argmax_i ll_i = gold]
    acc_norm   = [argmax_i ll_i / len(choice_i) = gold]                    len in characters, no delimiter
    mc2        = Σ_{i true} exp(ll_i) / Σ_i exp(ll_i)                       TruthfulQA: mass on true answers
    stderr     = sqrt(Σ_d (m_d − m̄)² / (n − 1)) / sqrt(n)                  per-item values m_d, n ≥ 2
    group      = Σ_s n_s m̄_s / Σ_s n_s,  stderr = sqrt(Σ_s (n_s − 1) n_s se_s² / (Σ_s n_s − S) / Σ_s n_s)

exactly as lm_eval/api/task.py (process_results), lm_eval/api/metrics.py (mean_stderr,
pooled_sample_stderr) and lm_eval/tasks/truthfulqa/utils.py compute them. (The harness's docs say
acc_norm divides by bytes; its code divides by characters — len(str) — and so does this file; its
acc_bytes divides by UTF-8 bytes.) argmax ties go to the first choice (np.argmax).

Tokenisation is the harness's TemplateLM._encode_pair for a causal model: trailing whitespace of the
context moves to the front of the continuation; context + continuation is encoded whole, and the
continuation's tokens are what follows the context's own encoding. BOS is prepended (OpenLLaMA's advice
for evaluation; lm-eval does the same with a Llama tokenizer). A request longer than the model's
max_position_embeddings + 1 loses tokens on the left, as in the harness (counted in the output).

Speed, without changing a score:
  - an item's context runs once for all its choices: one row holds the context and then every
    choice's tokens, each choice attending to the context and to itself only (model/packed.py), with
    its positions continuing from the context. lm-eval runs context + choice in full for every choice.
    (A first version filled a KV cache with the context and copied it to one row per choice; packing
    computes the same numbers in one pass, without the copies, about 1.5× faster on the benchmark.)
  - rows are sorted by length (longest first, so a memory error comes at once and the ETA is an upper
    bound) and batched, at most batch_size rows (items) per forward pass, in runs of similar length;
  - lm_head and log-softmax run only at the positions that predict continuation tokens (the harness
    computes the vocabulary distribution at every position of every request), in fp32 whatever the
    model's dtype; sums are accumulated in fp64.
Scores do not depend on the batch size beyond float rounding (the tests compare 1 and 8).
"""
import math
import time

import numpy as np
import torch
from tqdm import tqdm

from evals.tasks import FEWSHOT_SEED, Task, build_context, default_data_dir, draw_shots, load_tasks
from model.packed import hidden_states_packed, tree_mask
from model.sampling import generate


# --- tokenisation ------------------------------------------------------------------------------------

def encode_pair(tokenizer, context, continuation):
    """(context ids, continuation ids) the harness's way; see the module docstring."""
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        continuation = context[-n_spaces:] + continuation
        context = context[:-n_spaces]
    whole = tokenizer.encode(context + continuation)             # [BOS] + pieces
    context_ids = tokenizer.encode(context)
    return context_ids, whole[len(context_ids):]


# --- log-likelihoods: an item's context once, all its choices in the same row ---------------------------

def _common_prefix(seqs):
    n = min(len(s) for s in seqs)
    for i in range(n):
        if any(s[i] != seqs[0][i] for s in seqs[1:]):
            return i
    return n


def _runs(order, length, rows):
    """Split `order` (longest first) into runs of at most `rows` items; a run also ends where the next
    item is shorter than its first by more than max(4 tokens, a quarter), which bounds the padding."""
    runs = []
    for i in order:
        if runs and len(runs[-1]) < rows and length(runs[-1][0]) - length(i) <= max(4, length(runs[-1][0]) // 4):
            runs[-1].append(i)
        else:
            runs.append([i])
    return runs


def pack(requests):
    """One packed row (model/packed.py) for an item's requests [(context ids, continuation ids)].

    The shared prefix P is the longest run of input tokens (a sequence minus its last token) that all
    requests share, at most the shortest context (all of it when the contexts are equal); each request
    adds its remaining input tokens as its own segment. Continuation token s[j + 1] is predicted at
    input position j: the prefix's last row position when j = P − 1, else a position in the segment.
    Returns ids, positions, segments and, per request, its [(row position, target id)]."""
    P = min(min(len(c) for c, _ in requests), _common_prefix([(c + t)[:-1] for c, t in requests]))
    ids, positions, segments, targets = list(requests[0][0][:P]), list(range(P)), [0] * P, []
    for i, (c, t) in enumerate(requests):
        s, start = c + t, len(ids)
        ids += s[P:-1]
        positions += range(P, len(s) - 1)
        segments += [i + 1] * (len(s) - 1 - P)
        targets.append([(P - 1 if j == P - 1 else start + j - P, s[j + 1]) for j in range(len(c) - 1, len(s) - 1)])
    return ids, positions, segments, targets


@torch.no_grad()
def _score_rows(model, rows):
    """Packed rows (right-padded into one batch) → per row, per request (Σ log p, all tokens greedy).
    Only the positions that predict continuation tokens go through lm_head and the log-softmax."""
    device = model.lm_head.weight.device
    B, T = len(rows), max(len(row[0]) for row in rows)
    ids = torch.full((B, T), model.config.pad_token_id, dtype=torch.long, device="cpu")           # [B, T]
    positions = torch.zeros((B, T), dtype=torch.long, device="cpu")                               # [B, T]
    segments = torch.full((B, T), -1, dtype=torch.long, device="cpu")                             # [B, T], -1 = padding
    index, targets, owner = [], [], []        # per continuation token: flat row position, id, its request
    requests = 0
    for b, (row_ids, row_positions, row_segments, row_targets) in enumerate(rows):
        ids[b, :len(row_ids)] = torch.tensor(row_ids, device="cpu")
        positions[b, :len(row_ids)] = torch.tensor(row_positions, device="cpu")
        segments[b, :len(row_ids)] = torch.tensor(row_segments, device="cpu")
        for request in row_targets:
            index += [b * T + p for p, _ in request]
            targets += [t for _, t in request]
            owner += [requests] * len(request)
            requests += 1
    ids, positions, segments = ids.to(device), positions.to(device), segments.to(device)
    hidden = hidden_states_packed(model, ids, positions, tree_mask(segments))          # [B, T, D]
    hidden = hidden.reshape(B * T, -1)[torch.tensor(index, device=device)]             # [N, D]
    logp = torch.log_softmax(model.lm_head(hidden).float(), dim=-1)                    # [N, V]
    targets, owner = torch.tensor(targets, device=device), torch.tensor(owner, device=device)
    token_logp = logp.gather(1, targets[:, None]).squeeze(1)                           # [N]
    sums = torch.zeros(requests, dtype=torch.float64, device=device).index_add_(0, owner, token_logp.double())
    misses = torch.zeros(requests, dtype=torch.long, device=device).index_add_(0, owner, (logp.argmax(-1) != targets).long())
    scores = iter(zip(sums.tolist(), (misses == 0).tolist()))
    return [[next(scores) for _ in row[3]] for row in rows]


def loglikelihoods(model, groups, batch_size=16, progress=True, desc="loglikelihood", max_length=None):
    """groups: [[(context ids, continuation ids), …] per item] → [[(Σ log p, greedy), …] per item].

    Both id lists non-empty (the context starts with BOS). Each item becomes one packed row (pack);
    rows are sorted by length, longest first, and batched, batch_size rows per forward pass at most
    (runs of similar length, _runs). Requests longer than max_length (default max_position_embeddings)
    + 1 are cut on the left, as the harness does. Returns (results, number of cut requests)."""
    limit = max_length or model.config.max_position_embeddings
    cut = 0
    rows = []
    for requests in groups:
        fitted = []
        for c, t in requests:
            if not c or not t:
                raise ValueError("loglikelihoods: empty context or continuation (the context needs at least BOS)")
            if len(t) > limit:
                raise ValueError(f"loglikelihoods: a continuation of {len(t)} tokens exceeds the model's {limit}")
            excess = len(c) + len(t) - (limit + 1)
            if excess > 0:
                c, cut = c[excess:], cut + 1
            fitted.append((list(c), list(t)))
        rows.append(pack(fitted))
    # longest first; ties by position, so the order (and every batch) is deterministic
    order = sorted(range(len(rows)), key=lambda g: (-len(rows[g][0]), g))
    results = [None] * len(rows)
    was_training = model.training
    model.eval()
    with tqdm(total=sum(len(g) for g in groups), desc=desc, unit="req", disable=not progress) as bar:
        for batch in _runs(order, lambda g: len(rows[g][0]), batch_size):
            for g, scores in zip(batch, _score_rows(model, [rows[g] for g in batch])):
                results[g] = scores
                bar.update(len(scores))
    model.train(was_training)
    return results, cut


def generate_all(model, tokenizer, contexts, until, max_gen_toks, batch_size=16, progress=True, desc="generate"):
    """Greedy continuations of each context, cut at the first stop string or EOS (the harness's
    generate_until). Contexts are cut on the left to leave room for max_gen_toks."""
    keep = max(1, model.config.max_position_embeddings - max_gen_toks)
    prompts = [tokenizer.encode(c)[-keep:] for c in contexts]
    order = sorted(range(len(prompts)), key=lambda i: (-len(prompts[i]), i))
    out = [None] * len(prompts)
    with tqdm(total=len(prompts), desc=desc, unit="req", disable=not progress) as bar:
        for start in range(0, len(order), batch_size):
            chunk = order[start:start + batch_size]
            done = generate(model, [prompts[i] for i in chunk], max_gen_toks, eos_id=tokenizer.eos_id,
                            stop_strings=until, tokenizer=tokenizer)
            for i, completion in zip(chunk, done):
                out[i] = completion.text
            bar.update(len(chunk))
    return out


# --- metrics ------------------------------------------------------------------------------------------

def multiple_choice_metrics(lls, choices, gold, metrics=("acc", "acc_norm"), mc2_labels=None):
    """Per-item metrics from the choices' summed log-likelihoods; see the module docstring."""
    lls = np.asarray(lls, dtype=np.float64)
    if mc2_labels is not None:
        p = np.exp(lls - lls.max())                  # = exp(ll) / Σ exp(ll), without underflow
        p = p / p.sum()
        return {"acc": float(p[np.asarray(mc2_labels) == 1].sum())}
    out = {"acc": float(np.argmax(lls) == gold)}
    if "acc_norm" in metrics:
        with np.errstate(divide="ignore", invalid="ignore"):
            out["acc_norm"] = float(np.argmax(lls / np.array([float(len(c)) for c in choices])) == gold)
    return out


def mean_stderr(values):
    """Standard error of the mean with the sample standard deviation (n − 1); "N/A" below 2 items."""
    n = len(values)
    if n < 2:
        return "N/A"
    mu = sum(values) / n
    return math.sqrt(sum((x - mu) ** 2 for x in values) / (n - 1)) / math.sqrt(n)


def pooled_stderr(stderrs, sizes):
    """A size-weighted group's standard error from its subtasks' (lm-eval's pooled_sample_stderr)."""
    var = sum((n - 1) * se ** 2 * n for se, n in zip(stderrs, sizes)) / (sum(sizes) - len(sizes))
    return math.sqrt(var / sum(sizes))


# --- one task -----------------------------------------------------------------------------------------

def run_task(model, tokenizer, task, k, limit=None, batch_size=16, seed=FEWSHOT_SEED, progress=True):
    """Per-item metric dicts {"acc,none": v, …}, samples, and the count of left-cut requests."""
    docs = task.docs
    if limit is not None:
        docs = docs[:int(math.ceil(len(docs) * limit)) if limit < 1 else int(limit)]
    contexts = [build_context(task, d, s) for d, s in zip(docs, draw_shots(task, docs, k, seed))]
    samples, values = [], []
    if task.output_type == "generate_until":
        responses = generate_all(model, tokenizer, contexts, task.until, task.max_gen_toks, batch_size,
                                 progress, desc=task.name)
        for i, (d, c, r) in enumerate(zip(docs, contexts, responses)):
            values.append(task.score_generation(d, r))
            samples.append({"doc_id": i, "target": d.answer, "arguments": [[c, {"until": list(task.until)}]],
                            "resps": [[r]], **values[-1]})
        return values, samples, 0
    pairs = []
    for d, c in zip(docs, contexts):
        if task.output_type == "multiple_input":          # one context per option, one shared continuation
            pairs.append([(ctx, task.target_delimiter + d.answer) for ctx in c])
        else:
            pairs.append([(c, task.target_delimiter + choice) for choice in d.choices])
    encoded = [[encode_pair(tokenizer, c, t) for c, t in item] for item in pairs]
    scores, cut = loglikelihoods(model, encoded, batch_size, progress, desc=task.name)
    for i, (d, item, s) in enumerate(zip(docs, pairs, scores)):
        m = multiple_choice_metrics([ll for ll, _ in s], d.choices, d.gold, task.metrics,
                                    d.labels if task.mc2 else None)
        values.append({f"{name},none": v for name, v in m.items()})
        samples.append({"doc_id": i, "target": d.gold, "arguments": [list(p) for p in item],
                        "resps": [[ll, greedy] for ll, greedy in s], **values[-1]})
    return values, samples, cut


# --- many tasks, harness JSON layout --------------------------------------------------------------------

def _fewshot_for(task, num_fewshot):
    if num_fewshot is None:
        return task.default_fewshot
    if isinstance(num_fewshot, dict):
        k = num_fewshot.get(task.name, num_fewshot.get(task.group))
        return task.default_fewshot if k is None else k
    return num_fewshot


def evaluate(model, tokenizer, task_names, num_fewshot=None, limit=None, batch_size=16, data_dir=None,
             fewshot_seed=FEWSHOT_SEED, progress=True, log_samples=False, model_path=None):
    """Score tasks; returns lm-eval's output layout (results → task → "acc,none", "acc_stderr,none", …).

    task_names: names from evals.tasks (e.g. "arc_easy", "mmlu", "toy_mc") or Task objects.
    num_fewshot: None (each task's default), an int for all, or {task or group name: k}.
    limit: the first `limit` items of each task (a fraction if < 1). samples under "samples" on request."""
    start = time.time()
    data_dir = data_dir or default_data_dir()
    tasks = [t for name in task_names for t in ([name] if isinstance(name, Task) else load_tasks([name], data_dir))]
    out = {"results": {}, "groups": {}, "group_subtasks": {}, "configs": {}, "versions": {}, "n-shot": {},
           "higher_is_better": {}, "n-samples": {}}
    samples, cut_total = {}, 0
    for task in tasks:
        k = _fewshot_for(task, num_fewshot)
        values, task_samples, cut = run_task(model, tokenizer, task, k, limit, batch_size, fewshot_seed, progress)
        cut_total += cut
        entry = {"alias": task.name, "sample_len": len(values)}
        for key in values[0] if values else []:
            name, _, filt = key.partition(",")
            column = [v[key] for v in values]
            entry[key] = sum(column) / len(column)
            entry[f"{name}_stderr,{filt}"] = mean_stderr(column)
        out["results"][task.name] = entry
        out["configs"][task.name] = {
            "task": task.name, "source": task.source, "output_type": task.output_type, "num_fewshot": k,
            "fewshot_split": task.fewshot_split, "fewshot_sampler": task.sampler, "fewshot_seed": fewshot_seed,
            "description": task.description, "target_delimiter": task.target_delimiter,
            "fewshot_delimiter": task.fewshot_delimiter, "metric_list": [{"metric": m, "aggregation": "mean",
                                                                          "higher_is_better": True} for m in task.metrics],
            **({"generation_kwargs": {"until": list(task.until), "max_gen_toks": task.max_gen_toks,
                                      "do_sample": False}} if task.output_type == "generate_until" else {}),
            **({"notes": task.notes} if task.notes else {}),
            "truncated_requests": cut}
        out["versions"][task.name] = task.version
        out["n-shot"][task.name] = k
        out["higher_is_better"][task.name] = {m: True for m in task.metrics}
        out["n-samples"][task.name] = {"original": len(task.docs), "effective": len(values)}
        samples[task.name] = task_samples
        if task.group:
            out["group_subtasks"].setdefault(task.group, []).append(task.name)
    for group, members in out["group_subtasks"].items():
        entries = [out["results"][m] for m in members]
        sizes = [e["sample_len"] for e in entries]
        g = {"alias": group, "sample_len": sum(sizes)}
        keys = [key for key in entries[0] if "," in key and "_stderr," not in key]
        for key in keys:
            name, _, filt = key.partition(",")
            g[key] = sum(e[key] * n for e, n in zip(entries, sizes)) / sum(sizes)
            stderrs = [e[f"{name}_stderr,{filt}"] for e in entries]
            ok = "N/A" not in stderrs and sum(sizes) > len(sizes)
            g[f"{name}_stderr,{filt}"] = pooled_stderr(stderrs, sizes) if ok else "N/A"
        out["groups"][group] = g
        out["results"] = {group: g, **out["results"]}
        out["versions"][group] = "2"
    n_params = sum(p.numel() for p in model.parameters())
    out["config"] = {"model": "bezoar", "model_args": f"pretrained={model_path}" if model_path else None,
                     "model_path": model_path, "model_num_parameters": n_params,
                     "model_dtype": str(model.lm_head.weight.dtype), "batch_size": batch_size, "limit": limit,
                     "num_fewshot": num_fewshot, "add_bos_token": True, "fewshot_seed": fewshot_seed,
                     "max_length": model.config.max_position_embeddings, "data_dir": str(data_dir),
                     "device": str(model.lm_head.weight.device), "truncated_requests": cut_total}
    out["total_evaluation_time_seconds"] = str(time.time() - start)
    if log_samples:
        out["samples"] = samples
    return out


def format_table(out, highlight=None):
    """The printed table (lm-eval's columns). highlight: {task: metric key} marked with '*'."""
    head = ["Tasks", "Version", "Filter", "n-shot", "Metric", "", "Value", "", "Stderr"]
    rows = []
    for task, entry in out["results"].items():
        first = True
        for key, value in entry.items():
            if "," not in key or "_stderr," in key:
                continue
            name, _, filt = key.partition(",")
            se = entry.get(f"{name}_stderr,{filt}", "N/A")
            mark = "*" if highlight and highlight.get(task) == key else ""
            rows.append([task if first else "", str(out["versions"].get(task, "")), filt,
                         str(out["n-shot"].get(task, "")), name + mark, "↑", f"{value:.4f}", "±",
                         se if isinstance(se, str) else f"{se:.4f}"])
            first = False
    widths = [max(len(r[i]) for r in [head] + rows) for i in range(len(head))]
    line = lambda r: "|" + "|".join(c.ljust(w) for c, w in zip(r, widths)) + "|"
    return "\n".join([line(head), "|" + "|".join("-" * w for w in widths) + "|"] + [line(r) for r in rows])
