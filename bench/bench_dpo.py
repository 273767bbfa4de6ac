"""One QLoRA DPO step on the CPU: bezoar (train_dpo.py's step) against TRL's DPOTrainer with PEFT, same run.

The step (issue 6): the small LLaMA of bench_sft_step.py (hidden 512, 8 layers, 8 heads, MLP 1376, vocab
32000), NF4 base (blocks of 64, double quantisation) on every layer projection, LoRA r 64, alpha 16, dropout
0.05 on all of them, activation checkpointing (TRL's default and ours), AdamW; a batch of 4 preference
pairs, each row 256 tokens (a 128-token prompt, then a 128-token response, EOS last): chosen and rejected
rows go through one [8, 256] forward, the reference is the same model with its adapters disabled, the loss
is DPO's sigmoid loss with beta 0.1, then backward, clip at 1.0 and the optimizer step.
    ours         train_dpo.py's loop body: each pair one row [prompt, chosen, rejected] (share_prompt, the
                 default: data/dpo.py), pair_logps, the reference pass under no_grad with disable_adapters,
                 losses.dpo_loss, backward, clip, training.make_optimizer's AdamW
    cached       the same with the reference log-probs computed once before the timed steps
                 (precompute_ref_logps: the policy only)
    stacked      ours with share_prompt = false: chosen and rejected rows stacked [8, 256] (as TRL does)
    TRL          trl.DPOTrainer (pinned in requirements-test.txt) on transformers' LlamaForCausalLM with
                 bitsandbytes Linear4bit layers (its CPU path), a fresh PEFT LoRA from peft_config, reference =
                 adapters disabled (what TRL does for a PEFT model without ref_model), disable_dropout=False so
                 that both sides keep the LoRA dropout; a word-level tokenizer maps "t123" to id 123, so TRL
                 tokenises the pairs' text into exactly our ids. Its step is timed by a TrainerCallback
                 (on_step_begin → on_step_end: collation, forward, reference, loss, backward, clip, step).
Both sides build the same random dense weights (bench_sft_step.build_ours / build_peer), so they quantise to
the same NF4 codes and the first step's policy log-probs agree; both print their first loss (log 2: the
policy equals the reference while B = 0) and their logps/chosen.

Each (side, dtype) runs in its own child process, which reports its own peak RSS (bench/machine.py); the
children alternate sides for --rounds rounds; times are medians over all timed steps.

    python bench/bench_dpo.py [--rounds 1] [--steps 3] [--warmup 1] [--dtypes fp32,bf16]
                              [--sides ours,cached,stacked,trl]
"""
import argparse
import json
import math
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))   # run from anywhere
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")     # see bench_nf4.py: busy machine, many operators

import torch  # noqa: E402

from bench.bench_sft_step import ALL_LINEAR, DTYPES, R, SMALL, build_ours, build_peer  # noqa: E402
from bench.machine import describe, matmul_gflops, peak_rss_bytes, run_child  # noqa: E402

PAIRS, PROMPT, RESPONSE = 4, 128, 128                  # rows of PROMPT + RESPONSE = 256 tokens
BETA, MAX_GRAD_NORM, LR = 0.1, 1.0, 5e-5
GB = 1e9


def pair_rows(vocab_size, seed=1):
    """PAIRS rows in data/batching.tokenize_pair's format: [BOS] + random prompt ids, random responses ending
    in EOS (ids 3 … V−1 elsewhere), labels −100 on the prompt."""
    g = torch.Generator().manual_seed(seed)
    ids = lambda n: torch.randint(3, vocab_size, (n,), generator=g).tolist()   # noqa: E731
    rows = []
    for _ in range(PAIRS):
        prompt = [1] + ids(PROMPT - 1)
        row = {"prompt_len": PROMPT}
        for side in ("chosen", "rejected"):
            response = ids(RESPONSE - 1) + [2]
            row[f"{side}_input_ids"] = prompt + response
            row[f"{side}_labels"] = [-100] * PROMPT + response
        rows.append(row)
    return rows


# --- ours ----------------------------------------------------------------------------------------------

def child_ours(dtype_name, steps, warmup, cached, share_prompt):
    from lora import disable_adapters
    from losses import dpo_loss
    from train_dpo import collate, pair_logps
    from training import make_optimizer
    model = build_ours(SMALL, DTYPES[dtype_name], R, ALL_LINEAR)          # NF4 + LoRA, checkpointing, train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer(params, LR, 0.0, (0.9, 0.999), "cpu")
    b = collate(pair_rows(SMALL.vocab_size), 0, share_prompt, "cpu")
    chunk = 1024
    cache = None
    if cached:                                                               # precompute_ref_logps
        with torch.no_grad(), disable_adapters(model):
            cache = pair_logps(model, b, chunk)
    times, cpu_times, first = [], [], None
    for i in range(warmup + steps):
        t, c = time.perf_counter(), time.process_time()
        policy_chosen_logps, policy_rejected_logps = pair_logps(model, b, chunk)
        if cache is not None:
            ref_chosen_logps, ref_rejected_logps = cache
        else:
            with torch.no_grad(), disable_adapters(model):
                ref_chosen_logps, ref_rejected_logps = pair_logps(model, b, chunk)
        losses, _, _ = dpo_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps,
                                BETA)
        losses.mean().backward()
        torch.nn.utils.clip_grad_norm_(params, MAX_GRAD_NORM)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if i >= warmup:
            times.append(time.perf_counter() - t)
            cpu_times.append(time.process_time() - c)
        if first is None:
            first = {"loss": losses.mean().item(), "logps_chosen": policy_chosen_logps.mean().item()}
    return {"times": times, "cpu_times": cpu_times, "first": first, "peak_rss": peak_rss_bytes()}


# --- TRL -----------------------------------------------------------------------------------------------

def word_tokenizer(vocab_size):
    """A transformers tokenizer whose vocabulary is "t<id>" (and <unk>, <s>, </s> as 0, 1, 2), split on spaces."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"t{i}": i for i in range(3, vocab_size)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   pad_token="<unk>")


def child_trl(dtype_name, steps, warmup):
    import datasets
    import transformers
    from peft import LoraConfig
    from trl import DPOConfig, DPOTrainer
    from bench.bench_sft_step import ALPHA, DROPOUT
    transformers.logging.set_verbosity_error()
    datasets.disable_progress_bars()
    dtype = DTYPES[dtype_name]
    model = build_peer(SMALL, dtype, R).unload()                               # bnb NF4 layers, no adapters yet
    tok = word_tokenizer(SMALL.vocab_size)
    text = lambda ids: "".join(tok.convert_ids_to_tokens(i) + " " for i in ids).rstrip()   # noqa: E731
    rows = pair_rows(SMALL.vocab_size)
    data = datasets.Dataset.from_list([
        {"prompt": text(r["chosen_input_ids"][:PROMPT]) + " ", "chosen": text(r["chosen_input_ids"][PROMPT:]),
         "rejected": text(r["rejected_input_ids"][PROMPT:])} for r in rows])
    args = DPOConfig(output_dir="/tmp/bench_dpo_trl", per_device_train_batch_size=PAIRS, max_steps=warmup + steps,
                     learning_rate=LR, lr_scheduler_type="constant", weight_decay=0.0, max_grad_norm=MAX_GRAD_NORM,
                     beta=BETA, max_length=PROMPT + RESPONSE, gradient_checkpointing=True,
                     gradient_checkpointing_kwargs={"use_reentrant": False}, disable_dropout=False,
                     bf16=dtype == torch.bfloat16, fp16=False, use_cpu=True, report_to="none", save_strategy="no",
                     logging_steps=1, disable_tqdm=True, dataloader_num_workers=0, seed=0)
    peft_config = LoraConfig(r=R, lora_alpha=ALPHA, lora_dropout=DROPOUT, target_modules="all-linear",
                             task_type="CAUSAL_LM")
    times, cpu_times, starts = [], [], []

    class StepTimer(transformers.TrainerCallback):
        def on_step_begin(self, *a, **k):
            starts.append((time.perf_counter(), time.process_time()))

        def on_step_end(self, *a, **k):
            times.append(time.perf_counter() - starts[-1][0])
            cpu_times.append(time.process_time() - starts[-1][1])

    trainer = DPOTrainer(model=model, args=args, train_dataset=data, processing_class=tok, peft_config=peft_config,
                         callbacks=[StepTimer()])
    first_batch = next(iter(trainer.get_train_dataloader()))
    assert first_batch["input_ids"].shape == (2 * PAIRS, PROMPT + RESPONSE), first_batch["input_ids"].shape
    trainer.train()
    log = trainer.state.log_history[0]                                         # the first step's record
    first = {"loss": float(log["loss"]), "logps_chosen": float(log["logps/chosen"])}
    return {"times": times[warmup:], "cpu_times": cpu_times[warmup:], "first": first, "peak_rss": peak_rss_bytes(),
            "trl": __import__("trl").__version__}


# --- report --------------------------------------------------------------------------------------------

def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=1, help="alternating rounds of children per dtype")
    p.add_argument("--steps", type=int, default=3, help="timed steps per child, after --warmup")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--dtypes", default="fp32,bf16")
    p.add_argument("--sides", default="ours,cached,stacked,trl")
    p.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        side, dtype_name, steps, warmup = args.child[0], args.child[1], int(args.child[2]), int(args.child[3])
        result = (child_trl(dtype_name, steps, warmup) if side == "trl"
                  else child_ours(dtype_name, steps, warmup, cached=side == "cached", share_prompt=side != "stacked"))
        print(json.dumps(result))
        return

    print(describe())
    print("load average (1, 5, 15 min): %.2f %.2f %.2f" % os.getloadavg(), f"on {os.cpu_count()} CPUs")
    c = SMALL
    print(f"step: LLaMA D {c.hidden_size}, L {c.num_hidden_layers}, H {c.num_attention_heads}, F "
          f"{c.intermediate_size}, V {c.vocab_size}; {PAIRS} pairs x {PROMPT + RESPONSE} tokens ({PROMPT} prompt + "
          f"{RESPONSE} response); NF4 base; LoRA r {R} alpha 16 dropout 0.05 on all linear layers; checkpointing; "
          f"beta {BETA}; AdamW")
    dtypes, sides = args.dtypes.split(","), args.sides.split(",")
    runs = {(s, d): [] for s in sides for d in dtypes}
    rates = {d: [] for d in dtypes}
    for rnd in range(args.rounds):
        for d in dtypes:
            rates[d].append(matmul_gflops(DTYPES[d]))
            for s in sides:
                r = run_child(__file__, s, d, args.steps, args.warmup)
                runs[(s, d)].append(r)
                first = r["first"]
                print(f"  round {rnd + 1} {s:7} {d}: step s " + " ".join(f"{t:.2f}" for t in r["times"])
                      + " (CPU s " + " ".join(f"{t:.2f}" for t in r["cpu_times"]) + ")"
                      + (f", first loss {first['loss']:.6f} (log 2 = {math.log(2):.6f})" if first["loss"] else "")
                      + (f", first logps/chosen {first['logps_chosen']:.2f}" if first["logps_chosen"] else "")
                      + f", peak RSS {r['peak_rss'] / GB:.2f} GB, load %.1f" % os.getloadavg()[0], flush=True)

    # CPU s: the process's CPU time per step (all its threads); on a machine shared with other jobs it
    # moves less than the wall-clock time, and pairs per CPU-second compares the work each side does.
    print(f"\n{'dtype':5} {'side':7} {'step s':>7} {'pairs/s':>8} {'CPU s':>7} {'pairs/CPU s':>11} {'peak RSS GB':>11} "
          f"{'matmul GFLOP/s':>14}")
    summary = {}
    for d in dtypes:
        rate = statistics.median(rates[d])
        for s in sides:
            med = statistics.median(t for r in runs[(s, d)] for t in r["times"])
            cpu = statistics.median(t for r in runs[(s, d)] for t in r["cpu_times"])
            peak = max(r["peak_rss"] for r in runs[(s, d)])
            summary[(s, d)] = {"pairs_s": PAIRS / med, "pairs_cpu_s": PAIRS / cpu, "peak": peak}
            print(f"{d:5} {s:7} {med:7.2f} {PAIRS / med:8.2f} {cpu:7.2f} {PAIRS / cpu:11.2f} {peak / GB:11.2f} {rate:14.1f}")
    for d in dtypes:
        o = summary.get(("ours", d))
        for other in ("trl", "stacked", "cached"):
            q = summary.get((other, d))
            if o and q:
                print(f"{d}: ours / {other}: pairs/s {o['pairs_s'] / q['pairs_s']:.2f}x, pairs per CPU-second "
                      f"{o['pairs_cpu_s'] / q['pairs_cpu_s']:.2f}x, peak RSS ours - {other} = "
                      f"{(o['peak'] - q['peak']) / 2**20:+.0f} MiB")
    print("load average at the end: %.2f %.2f %.2f" % os.getloadavg())


if __name__ == "__main__":
    main()
