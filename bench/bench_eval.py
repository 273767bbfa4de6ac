"""Log-likelihood requests/s: evals/harness.py against lm-evaluation-harness's HF backend, same model, same run.

    python bench/bench_eval.py [--out bench/out] [--limit 200] [--shots 0,5] [--batch-size 16] [--rounds 3]
                               [--threads 0]

The model is a small random LLaMA (OpenLLaMA's shape, scaled down) with a SentencePiece tokenizer trained
on ARC-Easy's text, saved as a Hugging Face folder: bezoar loads it with model/loading.py, lm-eval's HFLM
gets transformers' LlamaForCausalLM from the same folder and the SentencePiece-backed slow tokenizer
(transformers' SentencePieceBackend, the old LlamaTokenizer's encoding: the ids equal ours).

Both sides score the same requests: ARC-Easy test items (the first --limit), their contexts built by
evals/tasks.py (the strings lm-eval builds; tests/test_harness_parity.py checks that), one request per
choice. Timed: tokenisation and scoring of all requests (lm-eval: HFLM.loglikelihood; bezoar:
encode_pair + loglikelihoods) after a warm-up on 8 items, each run in its own child process, which also
reports its peak RSS; the sides take turns for --rounds runs each and the fastest run of each is kept. Both must give the same acc and acc_norm to 4 decimals. Goal (issue 8): ≥ 2× lm-eval's rate.
"""
import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))   # run from anywhere

import torch

from bench.machine import describe, peak_rss_bytes, run_child

SHAPE = dict(hidden_size=512, intermediate_size=1376, num_hidden_layers=8, num_attention_heads=8,
             num_key_value_heads=8, max_position_embeddings=2048)
VOCAB = 8000


def build_model(folder):
    """The random model and its tokenizer, written once into folder."""
    from dataclasses import replace

    from evals.tasks import arc, default_data_dir
    from model import PRESETS, Llama, save_pretrained, train_tokenizer

    if os.path.isfile(os.path.join(folder, "model.safetensors")):
        return
    task = arc(default_data_dir(), "ARC-Easy")
    texts = [d.query + " " + " ".join(d.choices) for d in task.docs + task.fewshot_docs]
    train_tokenizer(texts, os.path.join(folder, "tokenizer"), VOCAB)
    model = Llama(replace(PRESETS["tiny"], vocab_size=VOCAB, **SHAPE))
    model.init_weights(seed=0, std=0.1)     # sharper than 0.02: choices' scores stay well apart
    save_pretrained(model, folder)


def requests(limit, shots):
    """(items, [(context, continuation) per choice] per item) of ARC-Easy test."""
    from evals.tasks import arc, build_context, default_data_dir, draw_shots
    task = arc(default_data_dir(), "ARC-Easy")
    docs = task.docs[:limit]
    contexts = [build_context(task, d, s) for d, s in zip(docs, draw_shots(task, docs, shots))]
    return docs, [[(c, " " + choice) for choice in d.choices] for d, c in zip(docs, contexts)]


def child(side, folder, limit, shots, batch_size, threads):
    """Score every request once on one side (after a warm-up on 8 items); print a JSON line."""
    from evals.harness import encode_pair, loglikelihoods, multiple_choice_metrics
    if threads:
        torch.set_num_threads(threads)
    docs, items = requests(limit, shots)
    n_requests = sum(len(item) for item in items)
    if side == "bezoar":
        from model import Tokenizer, load_pretrained
        model, tok = load_pretrained(folder), Tokenizer(os.path.join(folder, "tokenizer.model"))

        def run(items):
            encoded = [[encode_pair(tok, c, t) for c, t in item] for item in items]
            scores, _ = loglikelihoods(model, encoded, batch_size, progress=False)
            return [ll for item in scores for ll, _ in item]
    else:
        os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
        import transformers
        from lm_eval.api.instance import Instance
        from lm_eval.models.huggingface import HFLM
        from transformers.tokenization_utils_sentencepiece import SentencePieceBackend
        hf = transformers.LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        tok = SentencePieceBackend(vocab_file=os.path.join(folder, "tokenizer.model"), unk_token="<unk>",
                                   bos_token="<s>", eos_token="</s>", special_tokens_pattern="bos", legacy=True)
        lm = HFLM(pretrained=hf, tokenizer=tok, batch_size=batch_size, device="cpu")

        def run(items):
            pairs = [pair for item in items for pair in item]
            instances = [Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(pairs)]
            return [ll for ll, _ in lm.loglikelihood(instances, disable_tqdm=True)]
    run(items[:8])                                          # warm-up: kernels, allocator, caches
    t0 = time.perf_counter()
    lls = run(items)
    seconds = time.perf_counter() - t0
    metrics, i = [], 0
    for d in docs:
        metrics.append(multiple_choice_metrics(lls[i:i + len(d.choices)], d.choices, d.gold))
        i += len(d.choices)
    print(json.dumps({"side": side, "requests": n_requests, "seconds": seconds, "requests_per_s": n_requests / seconds,
                      "acc": sum(m["acc"] for m in metrics) / len(metrics),
                      "acc_norm": sum(m["acc_norm"] for m in metrics) / len(metrics),
                      "lls": lls, "peak_rss_bytes": peak_rss_bytes(), "threads": torch.get_num_threads()}))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="bench/out")
    ap.add_argument("--limit", type=int, default=200)
    ap.add_argument("--shots", default="0,5", help="few-shot settings to measure, comma-separated")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=3, help="runs per side, the sides taking turns; best kept")
    ap.add_argument("--threads", type=int, default=0, help="torch threads per child (0 = torch's default)")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--folder", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args.child, args.folder, args.limit, int(args.shots), args.batch_size, args.threads)

    folder = os.path.join(args.out, "eval_model")
    os.makedirs(folder, exist_ok=True)
    build_model(folder)
    if args.threads:
        torch.set_num_threads(args.threads)
    machine = describe()
    print(machine)
    report = {"machine": machine, "model_shape": {**SHAPE, "vocab_size": VOCAB}, "batch_size": args.batch_size,
              "limit": args.limit, "task": "arc_easy (ARC-Easy-Test.jsonl)", "runs": []}
    for shots in [int(s) for s in args.shots.split(",")]:
        side = {}
        for _ in range(args.rounds):            # taking turns, so a busy spell on the machine hits both
            for name in ("lm-eval-hf", "bezoar"):
                r = run_child(__file__, name, "--folder", folder, "--limit", args.limit, "--shots", shots,
                              "--batch-size", args.batch_size, "--threads", args.threads)
                best = side.setdefault(name, dict(r, all_seconds=[]))
                best["all_seconds"].append(r["seconds"])
                if r["seconds"] < best["seconds"]:
                    best.update(r, all_seconds=best["all_seconds"])
        ours, peer = side["bezoar"], side["lm-eval-hf"]
        max_dll = max(abs(a - b) for a, b in zip(ours.pop("lls"), peer.pop("lls")))
        run = {"num_fewshot": shots, "bezoar": ours, "lm-eval-hf": peer,
               "speedup": ours["requests_per_s"] / peer["requests_per_s"], "max_abs_loglikelihood_diff": max_dll,
               "same_acc_4dp": round(ours["acc"], 4) == round(peer["acc"], 4)
               and round(ours["acc_norm"], 4) == round(peer["acc_norm"], 4)}
        report["runs"].append(run)
        print(f"{shots}-shot, {ours['requests']} requests: bezoar {ours['requests_per_s']:.1f} req/s "
              f"({ours['peak_rss_bytes'] / 2**20:.0f} MiB peak), lm-eval HF {peer['requests_per_s']:.1f} req/s "
              f"({peer['peak_rss_bytes'] / 2**20:.0f} MiB peak): {run['speedup']:.2f}x; acc {ours['acc']:.4f} vs "
              f"{peer['acc']:.4f}, acc_norm {ours['acc_norm']:.4f} vs {peer['acc_norm']:.4f}; "
              f"max |Δll| {max_dll:.2e}")
    path = os.path.join(args.out, "bench_eval.json")
    with open(path + ".tmp", "w") as f:
        json.dump(report, f, indent=2)
    os.replace(path + ".tmp", path)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
