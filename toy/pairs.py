"""On-policy toy preference pairs: the SFT model's own mistakes as DPO's rejected responses (embedded default).

Static toy pairs (world.hh_pairs: the gold response against the same words around a make_wrong answer) teach a
margin the SFT model mostly has already, on mistakes it does not make; DPO on them raised held-out reward
accuracy and lowered exact match (see bench/README.md's embedded-default section for the figures). Preference
data works best when the rejected side is what the model itself says, so here it is:

    for each of n training tasks (world.sample_task "train": the templates and input forms evaluation uses)
        k samples from the SFT model at temperature τ, up to max_new_tokens (model/sampling.generate)
        each sample judged as filter.py judges a record: judge_prompt → the toy judge (toy/llm.py judge,
            called in-process rather than over HTTP) → parse_judgement
        rejected: a distinct sample rated below filter.THRESHOLD, or one cut at max_new_tokens (no EOS)
        chosen:   the gold response (world.reference_response), which world.check must accept
    → HH-RLHF rows {"chosen", "rejected"}: "\\n\\nHuman: <instruction>\\n\\nAssistant: <response>"

A one-turn HH row becomes exactly the prompt evaluation uses (data/hh.py dialogue_prompt = format_prompt), so
DPO trains on the prompts it is scored on, with training operands only. Counts (tasks, samples, wrong,
cut, right, pairs, chosen responses the checker refused) are returned and printed; nothing is dropped silently.
The samples are drawn with a seeded generator on the CPU: the file is a function of the SFT model and the seed.
"""
import random
from collections import Counter

import torch

from toy import world


def judged_wrong(task, response):
    """True when filter.py's judging of (task, response) with the toy judge rates it below filter's threshold."""
    from filter import THRESHOLD, judge_prompt, parse_judgement   # here: filter.py is a script at the top level
    from toy.llm import judge
    record = {"system": None, "instruction": task.instruction, "input": task.input, "targets": task.answer,
              "response": response}
    rating, _ = parse_judgement(judge(None, [{"role": "user", "content": judge_prompt(record)}]))
    return rating is None or rating < THRESHOLD


def on_policy_pairs(model, tok, n, seed, split, samples, temperature, max_new_tokens, batch=256):
    """(rows, counts): up to n · samples HH-RLHF rows from n tasks of `split` ("train" for DPO's pairs,
    "heldout" for its held-out ones), see the module docstring."""
    from model.sampling import generate
    rng = random.Random(f"on-policy-{split}-{seed}")
    tasks = [world.sample_task(rng, split) for _ in range(n)]
    generator = torch.Generator(device=model.lm_head.weight.device).manual_seed(seed)
    counts, rows = Counter(tasks=n), []
    jobs = [t for t in tasks for _ in range(samples)]                      # each task `samples` times in a row
    answers = []
    with torch.no_grad():
        for i in range(0, len(jobs), batch):
            ids = [tok.encode(world.task_prompt(t)) for t in jobs[i:i + batch]]
            answers += generate(model, ids, max_new_tokens, temperature=temperature, eos_id=tok.eos_id,
                                tokenizer=tok, generator=generator)
    for j in range(0, len(jobs), samples):
        task = jobs[j]
        gold = world.reference_response(task)
        if not world.check(task, gold):
            counts["chosen refused by the checker"] += 1
            continue
        rejected = []
        for c in answers[j:j + samples]:
            text = c.text.strip()
            counts["samples"] += 1
            if c.finish_reason == "length":
                counts["cut (no EOS)"] += 1
            elif judged_wrong(task, text):
                counts["wrong"] += 1
            else:
                counts["right"] += 1
                continue
            if text and text != gold and text not in rejected:
                rejected.append(text)
        human = f"{task.instruction}\n\n{task.input}" if task.input else task.instruction
        prompt = f"\n\nHuman: {human}\n\nAssistant:"
        rows += [{"chosen": f"{prompt} {gold}", "rejected": f"{prompt} {r}"} for r in rejected]
    counts["pairs"] = len(rows)
    return rows, counts
