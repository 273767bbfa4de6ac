"""The CPU demo of the foundation: train a tokenizer, build a tiny LLaMA, save it as a Hugging Face
checkpoint, load it back and sample from it through the OpenBezoar prompt template.

The model's weights are random, so what it writes is noise: the demo shows the plumbing (tokenizer,
checkpoint format, KV-cache sampling) end to end, not a trained model. Runs in seconds on 2 cores.

    python -m toy.demo [--out runs/demo] [--seed 0]                    (make demo)
"""
import argparse
import os
import random
import time
from dataclasses import replace

import torch

from data.template import format_prompt
from model import PRESETS, Llama, Tokenizer, check_vocab, load_pretrained, save_pretrained
from model.sampling import generate
from model.tokenizer import train_tokenizer

WORDS = ("apple river stone cloud seven garden lamp quiet north green paper window orange music "
         "forty bridge small answer number letter reverse count plus minus word first last").split()


def toy_sentences(n: int, seed: int):
    """Made-up sentences to train the demo tokenizer on: words, numbers and a little punctuation."""
    rng = random.Random(seed)
    for _ in range(n):
        words = [rng.choice(WORDS) if rng.random() < 0.8 else str(rng.randint(0, 999)) for _ in range(rng.randint(3, 12))]
        yield " ".join(words).capitalize() + rng.choice([".", "?", "!", ":"])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="runs/demo", help="folder for the tokenizer and the checkpoint")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    t0 = time.time()

    texts = list(toy_sentences(3000, args.seed)) + [format_prompt("Reverse the word stone.")]
    train_tokenizer(texts, os.path.join(args.out, "tokenizer"), vocab_size=400)
    tok = Tokenizer(os.path.join(args.out, "tokenizer.model"))
    print(f"tokenizer: {tok.vocab_size} pieces, trained on {len(texts)} sentences")

    config = replace(PRESETS["tiny"], vocab_size=tok.vocab_size)
    torch.manual_seed(args.seed)
    model = Llama(config)
    model.init_weights(seed=args.seed)
    n_params = sum(p.numel() for p in model.parameters())
    ckpt = os.path.join(args.out, "model")
    save_pretrained(model, ckpt, tokenizer=tok)      # a complete folder: transformers and vLLM load it as is
    model = load_pretrained(ckpt)
    check_vocab(tok, model.config.vocab_size, ckpt)
    print(f"model: tiny LLaMA, {n_params / 1e6:.2f} M parameters, saved to and reloaded from {ckpt}/")

    prompts = [format_prompt(q) for q in ("Reverse the word stone.", "What is 7 plus 5?")]
    outs = generate(model, [tok.encode(p) for p in prompts], 24, temperature=0.8, top_p=0.95,
                    eos_id=tok.eos_id, tokenizer=tok, generator=torch.Generator(device="cpu").manual_seed(args.seed))
    for p, o in zip(prompts, outs):
        print("-" * 60 + f"\n{p}{o.text!r}   [{len(o.tokens)} tokens, {o.finish_reason}; random weights]")
    print(f"demo finished in {time.time() - t0:.1f} s")


if __name__ == "__main__":
    main()
