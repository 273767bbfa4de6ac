"""MT-Bench (Zheng et al. 2023, "Judging LLM-as-a-Judge with MT-Bench and Chatbot Arena"): our model answers 80
two-turn questions, a judge LLM grades each turn 1–10 (evals/mt_bench_judge.py), and the figures are FastChat's.

    python evaluate.py mt-bench --model runs/dpo/merged --model-id bezoar-dpo --judge-model gpt-4o
    python evaluate.py mt-bench --answers-from other/model_answer/vicuna-7b-v1.3.jsonl --judge-model ...
    python evaluate.py mt-bench-show runs/mt_bench/model_judgment/gpt-4o_single.jsonl [--json]

Files are FastChat's (../shared/data/mt_bench and fastchat/llm_judge/data/mt_bench):
    question.jsonl                     {question_id, category, turns: [q1, q2], reference?}
    judge_prompts.jsonl                {name, type, system_prompt, prompt_template, output_format, ...}
    reference_answer/gpt-4.jsonl       model_answer records for the math, reasoning and coding questions
    model_answer/<model>.jsonl         {question_id, answer_id, model_id, choices: [{index: 0, turns: [a1, a2]}],
                                        tstamp}                                       (we write one)
    model_judgment/<judge>_single.jsonl  see mt_bench_judge.py                          (we append to one)
A judged model is named by its answer file's name without .jsonl (FastChat's load_model_answers); ours by
--model-id, which also names its answer file.

Answering, as FastChat's gen_model_answer.py does, through our prompt template:
  - temperature by category (FastChat's temperature_config): writing, roleplay 0.7; stem, humanities 0.1;
    extraction, math, coding, reasoning 0, which is greedy decoding; any other category 0.7. top_p 1, one
    answer per question, up to max_new_tokens new tokens per turn (FastChat's default 1024).
  - turn 1: data/template.py's prompt, the question as the instruction under the default system sentence.
  - turn 2: the first exchange goes into the instruction, in data/hh.py's dialogue_prompt layout, the one the
    HH-RLHF SFT stage trains multi-turn dialogues on:
        ### Instruction:
        Human: {question 1}
        Assistant: {our answer 1}
        Human: {question 2}
  - an answer ends at EOS or at a stop string (the model writing a new template section, "### Instruction:",
    or the user's next turn, "\\nHuman:"), and is stripped of surrounding whitespace, as FastChat strips it.
  - the context window (max_position_embeddings) bounds prompt + answer: a prompt with less room than
    max_new_tokens gets what room there is and is counted ("shortened by the context").
  - questions are answered in file order, in batches of consecutive questions sharing a temperature; sampling
    uses a generator seeded from --seed and the batch's first question id, so a rerun with the same batches
    writes the same answers.
Each finished question is appended to the answer file at once (synth/records.py's AppendLog): a killed run
loses at most the batch in flight, and a rerun skips the question ids already there.
"""

from __future__ import annotations

import argparse
import json
import os
import time
import uuid
from collections import Counter
from pathlib import Path

import torch
from tqdm import tqdm

from chat_api import add_endpoint_args, client_from_args
from data.hh import dialogue_prompt
from data.template import format_prompt
from evals.mt_bench_judge import format_summary, judge_answers, read_judge_prompts, summarize
from files import lock_folder, read_jsonl
from model.sampling import generate
from synth.records import AppendLog
from training import resolve_device

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "mt_bench"
TEMPERATURE = {"writing": 0.7, "roleplay": 0.7, "extraction": 0.0, "math": 0.0, "coding": 0.0, "reasoning": 0.0,
               "stem": 0.1, "humanities": 0.1}
DEFAULT_TEMPERATURE = 0.7                   # categories FastChat's table does not list
STOP_STRINGS = ("### Instruction:", "### System:", "\nHuman:")
ANSWER_KEY = {"question_id": int}


# --- reading ---------------------------------------------------------------------------------------

def read_questions(path) -> list:
    """question.jsonl records, each checked: question_id (int, unique), category (str), turns (two strings)."""
    rows, _ = read_jsonl(path, {"question_id": int, "category": str, "turns": list})
    seen = set()
    for number, q in rows:
        if len(q["turns"]) != 2 or not all(isinstance(t, str) and t.strip() for t in q["turns"]):
            raise ValueError(f"{path}:{number}: 'turns' should be two non-empty strings")
        if q["question_id"] in seen:
            raise ValueError(f"{path}:{number}: duplicate question_id {q['question_id']}")
        seen.add(q["question_id"])
    return [q for _, q in rows]


def read_answers(path) -> dict:
    """{question_id: record} from a model_answer file, each with choices[0].turns holding two strings."""
    rows, _ = read_jsonl(path, {"question_id": int, "choices": list})
    answers = {}
    for number, record in rows:
        choice = record["choices"][0] if record["choices"] else None
        turns = choice.get("turns") if isinstance(choice, dict) else None
        if not isinstance(turns, list) or len(turns) < 2 or not all(isinstance(t, str) for t in turns[:2]):
            raise ValueError(f"{path}:{number}: expected choices[0].turns to hold two answer strings")
        if record["question_id"] in answers:
            raise ValueError(f"{path}:{number}: duplicate question_id {record['question_id']}")
        answers[record["question_id"]] = record
    return answers


# --- answering -------------------------------------------------------------------------------------

def turn_1_prompt(question: dict) -> str:
    return format_prompt(question["turns"][0].strip())


def turn_2_prompt(question: dict, answer_1: str) -> str:
    q1, q2 = (t.strip() for t in question["turns"])
    if answer_1:
        return dialogue_prompt([("Human", q1), ("Assistant", answer_1), ("Human", q2)])
    # dialogue_prompt refuses empty turns (training dialogues have none); an empty answer keeps its empty place
    return format_prompt(f"Human: {q1}\nAssistant: \nHuman: {q2}")


def complete(model, tok, prompts: list, temperature: float, max_new_tokens: int, top_p: float = 1.0,
             generator=None, counts: Counter | None = None) -> list:
    """Answer texts for prompt strings, batched. A prompt whose length + max_new_tokens exceeds the context
    window runs alone with the room left (a shared batch would give every row the longest prompt's room)."""
    ids = [tok.encode(p) for p in prompts]
    limit = model.config.max_position_embeddings
    texts = [""] * len(prompts)
    fits = [i for i, x in enumerate(ids) if len(x) + max_new_tokens <= limit]
    groups = [fits] if fits else []
    groups += [[i] for i, x in enumerate(ids) if len(x) + max_new_tokens > limit]
    for group in groups:
        room = min(max_new_tokens, limit - len(ids[group[0]]))
        if room < max_new_tokens and counts is not None:
            counts["turns shortened by the context"] += 1
        if room <= 0:                     # the prompt alone fills the context: nothing can be generated
            continue
        outs = generate(model, [ids[i] for i in group], room, temperature=temperature, top_p=top_p,
                        eos_id=tok.eos_id, stop_strings=STOP_STRINGS, tokenizer=tok, generator=generator)
        for i, out in zip(group, outs):
            texts[i] = out.text.strip()
            if counts is not None:
                counts["turns at max_new_tokens"] += out.finish_reason == "length" and room == max_new_tokens
                counts["new tokens"] += len(out.tokens)
    return texts


def answer_questions(model, tok, questions: list, out_path, model_id: str, *, max_new_tokens: int = 1024,
                     batch_size: int = 8, top_p: float = 1.0, seed: int = 0, progress: bool = True) -> Counter:
    """Answer both turns of each question not yet in out_path, appending FastChat model_answer records.
    Returns counts: answered, already answered, turns at max_new_tokens, turns shortened by the context,
    new tokens."""
    counts = Counter()
    device = model.lm_head.weight.device
    with AppendLog(out_path, key=ANSWER_KEY) as log:
        for number, record in enumerate(log.records, start=1):
            if record.get("model_id") != model_id:
                raise SystemExit(f"{out_path}:{number}: answers of model_id {record.get('model_id')!r}, this run's "
                                 f"is {model_id!r}; give each model its own answer file")
        todo = [q for q in questions if q["question_id"] not in log.ids]
        counts["already answered"] = len(questions) - len(todo)
        batches = []                      # consecutive questions sharing a temperature, at most batch_size
        for q in todo:
            t = TEMPERATURE.get(q["category"], DEFAULT_TEMPERATURE)
            if batches and batches[-1][0] == t and len(batches[-1][1]) < batch_size:
                batches[-1][1].append(q)
            else:
                batches.append((t, [q]))
        bar = tqdm(total=len(todo), desc="answer", unit="question", dynamic_ncols=True, disable=not progress)
        for temperature, batch in batches:
            generator = None
            if temperature > 0:
                generator = torch.Generator(device=device).manual_seed(seed * 100_003 + batch[0]["question_id"])
            first = complete(model, tok, [turn_1_prompt(q) for q in batch], temperature, max_new_tokens, top_p,
                             generator, counts)
            second = complete(model, tok, [turn_2_prompt(q, a) for q, a in zip(batch, first)], temperature,
                              max_new_tokens, top_p, generator, counts)
            for q, a1, a2 in zip(batch, first, second):
                log.write({"question_id": q["question_id"], "answer_id": uuid.uuid4().hex, "model_id": model_id,
                           "choices": [{"index": 0, "turns": [a1, a2]}], "tstamp": time.time()})
                counts["answered"] += 1
            bar.update(len(batch))
            bar.set_postfix(new_tokens=counts["new tokens"])
        bar.close()
    return counts


# --- command line ----------------------------------------------------------------------------------

def parse_args(argv):
    p = argparse.ArgumentParser(prog="evaluate.py mt-bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="Hugging Face folder of the model to answer with (config.json, weights)")
    p.add_argument("--model-id", help="name for its answers and judgments; default: the folder's name")
    p.add_argument("--adapter", help="a PEFT LoRA folder to load on top of --model")
    p.add_argument("--tokenizer", help="SentencePiece tokenizer.model; default: <model>/tokenizer.model")
    p.add_argument("--dtype", choices=["float32", "float16", "bfloat16"],
                   help="compute dtype; default: the checkpoint's")
    p.add_argument("--quantize", choices=["none", "nf4"], default="none", help="load the layers as 4-bit NF4")
    p.add_argument("--device", help="cpu, cuda, cuda:N; default: cuda if available, else cpu")
    p.add_argument("--max-new-tokens", type=int, default=1024, help="per turn (FastChat's default: 1024)")
    p.add_argument("--batch-size", type=int, default=8, help="questions generated together")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling for the sampled categories")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--answers-from", nargs="+", default=[], metavar="JSONL",
                   help="also judge these model_answer files (each model named by its file name)")
    p.add_argument("--no-judge", action="store_true", help="write the answers only")
    p.add_argument("--first-n", type=int, help="only the first n questions (a quick check)")
    p.add_argument("--questions", default=str(DATA / "question.jsonl"))
    p.add_argument("--judge-prompts", default=str(DATA / "judge_prompts.jsonl"))
    p.add_argument("--reference", default=str(DATA / "reference_answer" / "gpt-4.jsonl"),
                   help="reference answers for math, reasoning and coding (FastChat's are GPT-4's)")
    p.add_argument("--out-dir", default="runs/mt_bench",
                   help="answers go to OUT/model_answer/<model-id>.jsonl, judgments to "
                        "OUT/model_judgment/<judge model>_single.jsonl")
    p.add_argument("--answers", help="our answer file, instead of the one under --out-dir")
    p.add_argument("--judgments", help="the judgment file, instead of the one under --out-dir")
    p.add_argument("--max-failures", type=int, default=100, help="stop after this many failed judge requests")
    add_endpoint_args(p, "judge", temperature=0.0)
    p.set_defaults(max_tokens=2048)       # FastChat's judges: temperature 0, up to 2048 tokens
    return p.parse_args(argv)


def load_model(args):
    """(model, tokenizer) from --model, --adapter, --tokenizer, --dtype, --quantize, --device."""
    from lora import load_adapter
    from model import Tokenizer, check_vocab, load_pretrained

    model = load_pretrained(args.model, dtype=args.dtype, device=resolve_device(args.device, "--device"),
                            quantize=None if args.quantize == "none" else "nf4")
    if args.adapter:
        load_adapter(model, args.adapter)       # the LoRA layers are made on the base layers' device
    tok = Tokenizer(args.tokenizer or os.path.join(args.model, "tokenizer.model"))
    check_vocab(tok, model.config.vocab_size, os.path.join(args.model, "config.json"))
    return model.eval(), tok


def main(argv=None):
    args = parse_args(argv)
    if not args.model and not args.answers_from:
        raise SystemExit("mt-bench: give --model (answer, then judge) and/or --answers-from (judge those files)")
    if args.max_new_tokens < 1 or args.batch_size < 1 or (args.first_n is not None and args.first_n < 1):
        raise SystemExit("mt-bench: --max-new-tokens, --batch-size and --first-n must be ≥ 1")
    with lock_folder(args.out_dir):                 # one run per --out-dir; a second stops here (files.py)
        return answer_and_judge(args)


def answer_and_judge(args) -> int:
    # every input is read before any answering, so a bad file stops the run in seconds rather than hours
    all_questions = read_questions(args.questions)
    questions = all_questions[:args.first_n]
    client = None if args.no_judge else client_from_args(args, "judge")
    args.judge_api_key = None                                            # printed below: never the key
    print(f"mt-bench: {json.dumps(vars(args))}")
    answers = {Path(f).name.removesuffix(".jsonl"): read_answers(f) for f in args.answers_from}
    if len(answers) < len(args.answers_from):
        raise SystemExit("mt-bench: two --answers-from files share a name, so their models would too")
    if client is not None:
        judge_prompts, references = read_judge_prompts(args.judge_prompts), read_answers(args.reference)

    if args.model:
        model_id = args.model_id or Path(args.model).name
        if not model_id or "/" in model_id or model_id in answers:
            raise SystemExit(f"mt-bench: --model-id {model_id!r} must be a file name, unlike any --answers-from")
        out = args.answers or os.path.join(args.out_dir, "model_answer", f"{model_id}.jsonl")
        model, tok = load_model(args)
        counts = answer_questions(model, tok, questions, out, model_id, max_new_tokens=args.max_new_tokens,
                                  batch_size=args.batch_size, top_p=args.top_p, seed=args.seed)
        print(f"mt-bench: answers {out}: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
        answers[model_id] = read_answers(out)
        del model
    if client is None:
        return 0

    judgments = args.judgments or os.path.join(args.out_dir, "model_judgment",
                                               f"{client.model.replace('/', '_')}_single.jsonl")
    print(repr(client))
    client.started = time.perf_counter()  # its req/s then covers the judging, not the answering before it
    try:
        counts = judge_answers(client, questions, answers, judge_prompts, references, judgments,
                               concurrency=args.concurrency, max_failures=args.max_failures)
    finally:
        print(client.summary())
        client.close()
    print(f"mt-bench: judgments {judgments}: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
    print(format_summary(summarize(judgments, all_questions)))
    if counts["request failed"]:
        raise SystemExit(f"mt-bench: {counts['request failed']} judgments not made (requests failed); "
                         f"run again to make them")
    return 0


def show_main(argv=None):
    p = argparse.ArgumentParser(prog="evaluate.py mt-bench-show",
                                description="FastChat show_result's single-mode figures for a model_judgment file")
    p.add_argument("judgments", help="a FastChat model_judgment jsonl (e.g. gpt-4_single.jsonl)")
    p.add_argument("--json", action="store_true", help="print the figures as JSON")
    p.add_argument("--questions", help="question.jsonl, for the per-category means; default: "
                   "../shared/data/mt_bench's if present; 'none' to leave them out")
    args = p.parse_args(argv)
    if args.questions is None and (DATA / "question.jsonl").is_file():
        args.questions = str(DATA / "question.jsonl")
    try:
        questions = None if args.questions in (None, "none") else read_questions(args.questions)
        summary = summarize(args.judgments, questions)
    except (OSError, ValueError) as err:
        raise SystemExit(f"mt-bench-show: {err}") from None
    if args.json:
        print(json.dumps({"judgments": args.judgments, "models": summary}, indent=2))
    else:
        print(f"judgments: {args.judgments}")
        print(format_summary(summary))
    return 0
