"""HH-RLHF (Anthropic, helpful + harmless): dialogues for the HH SFT stage and preference pairs for DPO.

The files: <root>/<subset>/<split>.jsonl.gz, one record per line with two strings, `chosen` and `rejected`,
each a whole dialogue:

    "\\n\\nHuman: What is a bezoar?\\n\\nAssistant: A mass in the stomach."
    "\\n\\nHuman: Is it dangerous?\\n\\nAssistant: It can be."

Only "\\n\\nHuman:" and "\\n\\nAssistant:" mark turns (the dataset's own markers; a "Human:" inside a line is
text). A transcript is split at its last "\\n\\nAssistant:": the prompt runs through that marker and the
response is the rest, so prompt + response == transcript. The two sides of a record normally share the prompt
and differ in the final Assistant turn only.

Into the template (ours to choose; the paper does not show it). The final Assistant turn is the response; the
turns before it form the instruction, under the default system sentence:
  - one Human turn: the instruction is its text, exactly like a LaMini instruction ("What is a bezoar?");
  - several turns: one "Human: …" / "Assistant: …" entry per turn, joined by "\\n", the Human turn being
    answered last:
        Human: What is a bezoar?
        Assistant: A mass in the stomach.
        Human: Is it dangerous?
First questions then look like the instructions of the earlier SFT stages; follow-ups carry their whole
history, with HH's own role names, and the question to answer is always the last entry. Turn texts are
stripped of surrounding whitespace (HH puts a space, sometimes two, after each marker). The HH SFT stage
(chosen side) and the DPO pairs use the same mapping, via `dialogue_prompt`, which evaluate.py can call too;
`chat_template()` is the same mapping as the Jinja chat template bezoar writes into tokenizer_config.json, so
transformers' apply_chat_template and vLLM's chat endpoint build exactly these prompts.

Malformed transcripts are skipped and counted as "malformed" (first locations kept as file:line): not starting
with "\\n\\nHuman:", turns that do not alternate Human/Assistant (e.g. two Assistant turns in a row), an empty
turn before the last, or a response that contains a "\\n\\nHuman:" turn (the model ran on and wrote the user's
next message). Of the 8552 chosen transcripts of the test splits, 20 are malformed (8, 10, 1, 1 by subset).
Broken JSON or a missing `chosen`/`rejected` field is a ValueError naming file:line (with skip_bad, a counted
"bad line").

"First N": records are read from the subsets in HH_SUBSETS order (the order of the Hugging Face train split:
harmless-base, helpful-base, helpful-online, helpful-rejection-sampled) and first_n counts records read,
before any skipping, so that first_n=100_000 picks the same rows as the paper's "first 100K examples"; the
skipped ones among them are reported.

DPO pairs whose prompts differ (README paragraph). Some records' two transcripts do not share the text before
their last "\\n\\nAssistant:" (17 of the 8552 test records: 5 harmless-base, 9 helpful-base, 0 helpful-online,
3 helpful-rejection-sampled). In each of them the two transcripts part inside the same Assistant turn, but one
side's text after that point holds further turn markers (a second "\\n\\nAssistant:" paragraph, or an invented
"Human:"/"Humans:" message and another Assistant turn), so the two last markers fall in different places.
DPO compares log π(y_w|x) with log π(y_l|x) for one prompt x, and no single x exists here: taking the chosen
side's prompt would make the rejected "response" a stretch of dialogue with invented turns, and cutting both at
their longest common prefix would do the same to both sides. So bezoar skips these pairs and counts them
("prompt mismatch", with file:line of the first few); at 0.2% of the data they cost nothing measurable, and no
pair is trained on a prompt that only one of its responses answers. Pairs with an empty response, or whose two
responses are identical (no preference to learn), are skipped and counted too. Each skipped record is counted
once, under the first reason that applies, checked in this order: prompt mismatch, empty response, identical
responses, malformed.
"""

import json
import os
import re
from dataclasses import dataclass

from data.sft import DataStats, Example, field, read_records
from data.template import DEFAULT_SYSTEM, PROMPT_TEMPLATE, RESPONSE_MARKER, format_prompt

HH_SUBSETS = ("harmless-base", "helpful-base", "helpful-online", "helpful-rejection-sampled")
ASSISTANT = "\n\nAssistant:"
HUMAN = "\n\nHuman:"
TURN_MARKER = re.compile(r"\n\n(Human|Assistant):")


@dataclass
class Pair:
    """One DPO example: the shared template-formatted prompt and the two responses."""
    prompt: str
    chosen: str
    rejected: str
    id: str       # "file:line"
    source: str   # "hh-rlhf/<subset>"


def hh_files(root, split="train", subsets=HH_SUBSETS):
    """[<root>/<subset>/<split>.jsonl.gz for each subset], in the given order; ValueError if one is missing."""
    paths = [os.path.join(root, subset, f"{split}.jsonl.gz") for subset in subsets]
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise ValueError(f"{missing[0]}: HH-RLHF file not found (expected <root>/<subset>/{split}.jsonl.gz "
                         f"for subsets {', '.join(subsets)})")
    return paths


def split_transcript(text):
    """(prompt, response): the prompt runs through the last "\\n\\nAssistant:", the response is the rest, so
    prompt + response == text. ValueError if there is no Assistant turn."""
    cut = text.rfind(ASSISTANT)
    if cut < 0:
        raise ValueError("no '\\n\\nAssistant:' turn")
    cut += len(ASSISTANT)
    return text[:cut], text[cut:]


def parse_turns(text):
    """"\\n\\nHuman: a\\n\\nAssistant: b" → [("Human", "a"), ("Assistant", "b")], texts stripped.

    ValueError (the reason) unless the text starts with "\\n\\nHuman:", the roles alternate and every turn but
    the last has text. The last may be empty: a prompt ends with an open "\\n\\nAssistant:"."""
    parts = TURN_MARKER.split(text)               # ["", role, text, role, text, …]
    if parts[0] or len(parts) < 3 or parts[1] != "Human":
        raise ValueError("does not start with '\\n\\nHuman:'")
    turns = [(role, said.strip()) for role, said in zip(parts[1::2], parts[2::2])]
    for i, (role, said) in enumerate(turns):
        expected = ("Human", "Assistant")[i % 2]
        if role != expected:
            raise ValueError(f"turn {i + 1} is {role}, expected {expected} (turns must alternate)")
        if not said and i < len(turns) - 1:
            raise ValueError(f"turn {i + 1} ({role}) is empty")
    return turns


def dialogue_prompt(turns):
    """Template prompt for a dialogue [(role, text), …] that alternates from Human and ends with the Human
    turn to answer (see the module docstring for the mapping)."""
    if not turns or len(turns) % 2 == 0:
        raise ValueError(f"dialogue_prompt: expected an odd number of turns, Human first and last; got {len(turns)}")
    for i, (role, said) in enumerate(turns):
        if role != ("Human", "Assistant")[i % 2] or not said.strip():
            raise ValueError(f"dialogue_prompt: turn {i + 1} is ({role!r}, {said[:40]!r}); turns must alternate "
                             f"Human/Assistant from Human, each with text")
    if len(turns) == 1:
        return format_prompt(turns[0][1])
    return format_prompt("\n".join(f"{role}: {said}" for role, said in turns))


# Placeholders in capitals are filled in from data/template.py by chat_template(). Every tag trims the
# whitespace around it ("-"), so the layout here never reaches the output.
CHAT_TEMPLATE_JINJA = """
{%- if messages and messages[0]['role'] == 'system' -%}
    {%- set system = messages[0]['content'] -%}
    {%- set turns = messages[1:] -%}
{%- else -%}
    {%- set system = DEFAULT_SYSTEM -%}
    {%- set turns = messages -%}
{%- endif -%}
{%- if turns and turns[-1]['role'] == 'assistant' -%}
    {%- set history = turns[:-1] -%}
    {%- set response = turns[-1]['content'] -%}
{%- else -%}
    {%- set history = turns -%}
    {%- set response = none -%}
{%- endif -%}
{%- if history|length % 2 == 0 -%}
    {{- raise_exception('OpenBezoar chat: after an optional system message, the turns alternate user/assistant from user to user, plus an optional last assistant turn (the response)') -}}
{%- endif -%}
{%- set ns = namespace(lines=[]) -%}
{%- for message in history -%}
    {%- if message['role'] != ['user', 'assistant'][loop.index0 % 2] or not message['content']|trim -%}
        {{- raise_exception('OpenBezoar chat: turn ' ~ loop.index ~ ' is ' ~ message['role'] ~ '; the turns alternate user/assistant from user, each with text') -}}
    {%- endif -%}
    {%- set ns.lines = ns.lines + [('Human' if message['role'] == 'user' else 'Assistant') ~ ': ' ~ message['content']] -%}
{%- endfor -%}
{%- if history|length == 1 -%}
    {%- set instruction = history[0]['content'] -%}
{%- else -%}
    {%- set instruction = ns.lines|join(NEWLINE) -%}
{%- endif -%}
{{- bos_token ~ HEAD ~ system ~ MIDDLE ~ instruction ~ BEFORE_RESPONSE -}}
{%- if response is not none -%}
    {{- RESPONSE_MARKER ~ response ~ eos_token -}}
{%- elif add_generation_prompt -%}
    {{- RESPONSE_MARKER -}}
{%- endif -%}
"""


def chat_template():
    """dialogue_prompt and format_prompt as a Jinja chat template, for tokenizer_config.json: what
    transformers' apply_chat_template, vLLM's chat endpoint and TGI render a conversation with.

    messages: an optional {"role": "system"} first (its content replaces the default system sentence, as
    format_prompt's `system` does), then user/assistant turns alternating from user. Roles map to HH's
    "Human"/"Assistant": one user turn is the instruction itself, several are joined as dialogue_prompt
    joins them. Contents are used as given (dialogue_prompt does not strip either).
      - ending with a user turn: bos_token + the prompt before its "### Response:" line; with
        add_generation_prompt, RESPONSE_MARKER too, i.e. bos_token + exactly the text bezoar generates from;
      - ending with an assistant turn: the SFT training text, bos_token + prompt + response + eos_token.
    bos_token comes first because apply_chat_template and vLLM tokenize the rendered text without adding
    special tokens: the template is what puts BOS first, as Tokenizer.encode does. The strings come from
    PROMPT_TEMPLATE and DEFAULT_SYSTEM, so the two cannot drift apart."""
    head, rest = PROMPT_TEMPLATE.split("{system}")
    middle, tail = rest.split("{instruction}")
    assert tail.endswith(RESPONSE_MARKER)
    fill = {"DEFAULT_SYSTEM": DEFAULT_SYSTEM, "HEAD": head, "MIDDLE": middle,
            "BEFORE_RESPONSE": tail.removesuffix(RESPONSE_MARKER), "RESPONSE_MARKER": RESPONSE_MARKER, "NEWLINE": "\n"}
    # One pass, so no filled-in text is filled again; a JSON string is also a valid Jinja string literal.
    placeholders = re.compile(r"\b(" + "|".join(fill) + r")\b")
    return placeholders.sub(lambda m: json.dumps(fill[m.group(1)]), CHAT_TEMPLATE_JINJA.strip())


def hh_example(transcript):
    """One transcript → (template prompt, response text, stripped; may be empty: the caller counts it).
    ValueError (the reason) if the transcript is malformed (see the module docstring)."""
    prompt, response = split_transcript(transcript)
    if HUMAN in response:
        raise ValueError("the response contains a '\\n\\nHuman:' turn")
    turns = parse_turns(prompt)                   # ends with the open ("Assistant", "")
    return dialogue_prompt(turns[:-1]), response.strip()


def _source(where):
    """"…/helpful-base/test.jsonl.gz:12" → "hh-rlhf/helpful-base"."""
    return "hh-rlhf/" + os.path.basename(os.path.dirname(where.rsplit(":", 1)[0]))


def _read_sides(where, record, stats, skip_bad):
    """(chosen, rejected) strings, or None after counting a bad line (skip_bad) — else ValueError."""
    try:
        return field(record, "chosen", where), field(record, "rejected", where)
    except ValueError:
        if not skip_bad:
            raise
        stats.add("bad line", where=where)
        return None


def hh_sft_examples(paths, first_n=None, skip_bad=False):
    """SFT examples from the chosen side of HH-RLHF transcripts, multi-turn history kept.
    paths: one file or a list (see hh_files for the subset order). Returns (list[Example], DataStats)."""
    stats, examples = DataStats("hh-rlhf sft"), []
    for where, record in read_records(paths, stats, skip_bad, first_n):
        sides = _read_sides(where, record, stats, skip_bad)
        if sides is None:
            continue
        try:
            prompt, response = hh_example(sides[0])
        except ValueError:
            stats.add("malformed", where=where)
            continue
        if not response:
            stats.add("empty response", where=where)
            continue
        examples.append(Example(prompt, response, where, _source(where)))
        stats.add("used")
    return examples, stats


def hh_pairs(paths, first_n=None, skip_bad=False):
    """DPO pairs (prompt, chosen, rejected) from HH-RLHF records. Returns (list[Pair], DataStats).
    Skipped and counted: "prompt mismatch", "empty response", "identical responses", "malformed"."""
    stats, pairs = DataStats("hh-rlhf pairs"), []
    for where, record in read_records(paths, stats, skip_bad, first_n):
        sides = _read_sides(where, record, stats, skip_bad)
        if sides is None:
            continue
        try:
            (prompt_c, chosen), (prompt_r, rejected) = split_transcript(sides[0]), split_transcript(sides[1])
        except ValueError:
            stats.add("malformed", where=where)
            continue
        if prompt_c != prompt_r:
            stats.add("prompt mismatch", where=where)
            continue
        if not chosen.strip() or not rejected.strip():
            stats.add("empty response", where=where)
            continue
        if chosen.strip() == rejected.strip():
            stats.add("identical responses", where=where)
            continue
        try:
            prompt, chosen = hh_example(sides[0])
            _, rejected = hh_example(sides[1])
        except ValueError:
            stats.add("malformed", where=where)
            continue
        pairs.append(Pair(prompt, chosen, rejected, where, _source(where)))
        stats.add("used")
    return pairs, stats
