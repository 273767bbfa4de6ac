"""The toy world: the embedded CPU default's tasks, answers and data, all drawn from a seeded RNG.

With no network and no GPU, `make sft dpo eval` runs the whole recipe on a tiny LLaMA. That needs a world
small enough for a model of a few million parameters to learn in minutes, with answers that can be checked
exactly, so that every stage's effect is measured. The toy teacher/judge server, training and evaluation
all import this one module. No dataset text is copied in: every string is generated here.

Tasks. Twelve families with short answers: add, subtract, next_number, previous_number, larger,
sort_digits, reverse, uppercase, next_letter, previous_letter, count_letters, repeat_word. A Task is
(family, operands) rendered through one of several paraphrase templates, or through the family's "input
form" (operand-free instruction + operands in `input`). Numbers are written in digits and letter strings
letter by letter ("c a t"): the project tokenizer splits digits, and spaced letters are one piece each, so
reversing or capitalising is copying pieces, which a tiny model can learn.

Splits. key = (family, operands); sha256 of the key gives a bucket in [0, 100), buckets below
HELDOUT_PERCENT are "heldout", the rest "train". SFT, DPO and teacher data use "train"; evaluation uses
"heldout", so no evaluated instance appears in any instruction data (paraphrase templates are shared).

Answers. check(task, response): the final answer is the text after the last "Answer:" if there is one,
else the last non-empty line; a response ends where a new turn starts ("\\n\\nHuman:", "\\n### ").
Normalised (outer space, quotes, a final "." and repeated spaces dropped; case kept, since uppercase is a
task) and compared exactly with the gold answer.

Responses. The default response (reference_response with no style) states the fact the way pretraining
does, with the instruction's operands, then the answer on its own line: "7 plus 5 is 12.\nAnswer: 12". A
model of a million parameters cannot read operands out of an instruction and compute in the same token (we
measured: trained on bare answers it often gives an answer of the right kind with the wrong content), but it
can copy the operands into a statement it knows and then copy the statement's end. The orca styles explain
in several lines and end with the same "Answer: X" line.

Schemes. lamini_records (instruction → default response), orca_records (our Orca-kind system message →
explanation ending "Answer: X", plus Flan-like fields), evol_records (an evolved instruction → default
response, or the step_by_step explanation when it asks for reasoning), hh_pairs (HH-RLHF rows {"chosen",
"rejected"}: the same dialogue ending in the default response and in the same response around a make_wrong
answer), used for the HH-RLHF SFT stage (chosen) and for DPO. system None = the default sentence.

Pretraining. pretraining_text: statements ("7 plus 5 is 12.", "c a t backwards is t a c."), paragraphs
that name operands first and state facts about them later ("We have the letters c a t. Backwards they read
t a c."; "We add 7 and 5. The result is 12."; a worked explanation in a response style's words), counting
and alphabet runs; never a question, an instruction, a template marker or an "Answer:" line: the base learns
the facts, the words the responses use and how to find operands named earlier, not the instruction-following
format, so its exact match on templated prompts stays near zero.

Teacher. parse_instruction(text) finds the first toy instruction in any prompt text (the pipeline's own
wording around it is ignored) and returns its Task; reference_response, make_wrong, evolve and orca_style
give the teacher its answers, its deliberate mistakes, its evolutions and its explanation styles.
"""
import hashlib
import random
import re
import string
from dataclasses import dataclass

from data.template import DEFAULT_SYSTEM, format_prompt

HELDOUT_PERCENT = 20
PARAGRAPH_SHARE = 0.5             # pretraining units that are paragraphs (the rest: statements, runs, words)
LETTERS = string.ascii_lowercase
WORDS = ("cat", "dog", "sun", "hat", "cup", "pen", "box", "red", "map", "egg", "car", "bus", "sky", "tree", "fish",
         "bird", "star", "moon", "rain", "leaf", "book", "door", "milk", "cake", "frog", "ship", "coin", "lamp")


@dataclass(frozen=True)
class Task:
    family: str
    operands: tuple       # in the family's field order, e.g. (7, 5) for add, ("cat",) for reverse
    instruction: str
    input: str            # "" unless the operands are given as input
    answer: str           # the gold answer, short and exact


@dataclass(frozen=True)
class Family:
    fields: str           # one letter per operand: a b n numbers, s letter string, d digit string, l letter, w word
    sample: object        # rng → operands
    answer: object        # *operands → str (ValueError when there is none, e.g. the letter before "a")
    templates: tuple      # instruction paraphrases with {field} slots
    input_form: tuple     # (instruction without operands, input with {field} slots)
    statements: tuple     # pretraining sentences with {field} slots and {answer}
    about: tuple          # pretraining sentences that refer back to operands named earlier, {answer} only
    doing: tuple          # pretraining sentences that name the operation and its operands, no answer
    explain: object       # *operands → explanation lines, without the final answer
    wrongs: object        # *operands → plausible wrong answers
    sibling: str          # the family an in_breadth evolution moves to


def _sp(s):
    return " ".join(s)


def _letters(rng, lo, hi):
    return "".join(rng.sample(LETTERS, rng.randint(lo, hi)))


def _shift_letter(letter, k):
    i = LETTERS.index(letter) + k
    if not 0 <= i < 26:
        raise ValueError(f"no letter {k:+d} from {letter!r}")
    return LETTERS[i]


def _swap(items, i):
    items = list(items)
    items[i], items[i + 1] = items[i + 1], items[i]
    return items


FAMILIES = {
    "add": Family(
        "ab", lambda r: (r.randint(0, 20), r.randint(0, 20)), lambda a, b: str(a + b),
        ("What is {a} plus {b}?", "Add {a} and {b}.", "Compute the sum of {a} and {b}.", "Work out {a} + {b}."),
        ("Add the two numbers in the input.", "{a} and {b}"),
        ("{a} plus {b} is {answer}.", "The sum of {a} and {b} is {answer}.", "Adding {b} to {a} gives {answer}."),
        ("Their sum is {answer}.", "Added together they make {answer}."),
        ("We add {a} and {b}.", "We put {a} and {b} together."),
        lambda a, b: [f"We start at {a} and count up {b} more.", f"{a} plus {b} is {a + b}."],
        lambda a, b: [a + b + 1, a + b - 1, a + b + 2, a + b + 10], "subtract"),
    "subtract": Family(
        "ab", lambda r: (lambda a: (a, r.randint(0, a)))(r.randint(0, 20)), lambda a, b: str(a - b),
        ("What is {a} minus {b}?", "Subtract {b} from {a}.", "Take {b} away from {a}.", "Work out {a} - {b}."),
        ("Subtract the second number in the input from the first.", "{a} and {b}"),
        ("{a} minus {b} is {answer}.", "Taking {b} away from {a} leaves {answer}."),
        ("The first minus the second is {answer}.", "Taking the second away from the first leaves {answer}."),
        ("We take {b} away from {a}.", "We subtract {b} from {a}."),
        lambda a, b: [f"We start at {a} and count down {b}.", f"{a} minus {b} is {a - b}."],
        lambda a, b: [a - b + 1, a - b - 1, a + b, a - b + 2], "add"),
    "next_number": Family(
        "n", lambda r: (r.randint(0, 98),), lambda n: str(n + 1),
        ("What number comes after {n}?", "Which number follows {n}?", "Count one up from {n}.",
         "Give the number right after {n}."),
        ("Give the number that comes after the one in the input.", "{n}"),
        ("After {n} comes {answer}.", "{n} is followed by {answer}.", "One more than {n} is {answer}."),
        ("The number after it is {answer}.", "One more is {answer}."),
        ("We count one up from {n}.", "We look for the number after {n}."),
        lambda n: [f"Counting up by one from {n} gives {n + 1}."],
        lambda n: [n, n + 2, n + 10], "previous_number"),
    "previous_number": Family(
        "n", lambda r: (r.randint(1, 99),), lambda n: str(n - 1),
        ("What number comes before {n}?", "Which number is just before {n}?", "Count one down from {n}.",
         "Give the number right before {n}."),
        ("Give the number that comes before the one in the input.", "{n}"),
        ("Before {n} comes {answer}.", "{answer} comes right before {n}.", "One less than {n} is {answer}."),
        ("The number before it is {answer}.", "One less is {answer}."),
        ("We count one down from {n}.", "We look for the number before {n}."),
        lambda n: [f"Counting down by one from {n} gives {n - 1}."],
        lambda n: [n, n - 2, n + 1], "next_number"),
    "larger": Family(
        "ab", lambda r: tuple(r.sample(range(100), 2)), lambda a, b: str(max(a, b)),
        ("Which is larger, {a} or {b}?", "Pick the bigger number: {a} or {b}.", "Name the larger of {a} and {b}.",
         "Which number is greater, {a} or {b}?"),
        ("Give the larger of the two numbers in the input.", "{a} and {b}"),
        ("Of {a} and {b}, the larger is {answer}.", "Between {a} and {b}, {answer} is the bigger number."),
        ("The larger one is {answer}.", "The bigger of the two is {answer}."),
        ("We compare {a} and {b}.", "We look for the larger of {a} and {b}."),
        lambda a, b: [f"{max(a, b)} is more than {min(a, b)}.", f"So the larger number is {max(a, b)}."],
        lambda a, b: [min(a, b), max(a, b) + 1], "sort_digits"),
    "sort_digits": Family(
        "d", lambda r: ("".join(r.sample("0123456789", r.randint(3, 4))),), lambda d: _sp(sorted(d)),
        ("Sort the digits {d} from smallest to largest.", "Put {d} in increasing order.",
         "Arrange the digits {d} in ascending order."),
        ("Sort the digits in the input from smallest to largest.", "{d}"),
        ("The digits {d} in increasing order are {answer}.", "Sorted, {d} becomes {answer}."),
        ("In increasing order they are {answer}.", "Sorted, they become {answer}."),
        ("We sort the digits {d}.", "We put the digits {d} in increasing order."),
        lambda d: [f"The smallest digit is {min(d)} and the largest is {max(d)}.",
                   "From smallest to largest: " + ", then ".join(sorted(d)) + "."],
        lambda d: [_sp(d), _sp(_swap(sorted(d), 0)), _sp(sorted(d, reverse=True))], "larger"),
    "reverse": Family(
        "s", lambda r: (_letters(r, 3, 5),), lambda s: _sp(s[::-1]),
        ("Reverse the letters {s}.", "Write {s} backwards.", "Spell {s} in reverse order."),
        ("Reverse the letters in the input.", "{s}"),
        ("{s} backwards is {answer}.", "Reversed, {s} reads {answer}."),
        ("Backwards they read {answer}.", "In reverse order they are {answer}."),
        ("We write {s} backwards.", "We reverse the letters {s}."),
        lambda s: [f"From first to last the letters are {_sp(s)}.", f"From last to first they are {_sp(s[::-1])}."],
        lambda s: [_sp(s), _sp(_swap(s[::-1], 0))], "uppercase"),
    "uppercase": Family(
        "s", lambda r: (_letters(r, 3, 5),), lambda s: _sp(s.upper()),
        ("Write {s} in capital letters.", "Convert {s} to uppercase.", "Make the letters {s} uppercase."),
        ("Write the letters in the input in capital letters.", "{s}"),
        ("{s} in capital letters is {answer}.", "Capitalised, {s} becomes {answer}."),
        ("In capital letters they are {answer}.", "Capitalised, they become {answer}."),
        ("We write {s} in capital letters.", "We make the letters {s} uppercase."),
        lambda s: ["Each small letter becomes its capital.", f"So {_sp(s)} becomes {_sp(s.upper())}."],
        lambda s: [_sp(s), _sp(s[:-1].upper() + s[-1]), _sp(s[0] + s[1:].upper())], "reverse"),
    "next_letter": Family(
        "l", lambda r: (r.choice(LETTERS[:-1]),), lambda l: _shift_letter(l, 1),
        ("Which letter comes after {l}?", "What is the next letter after {l}?", "Name the letter that follows {l}."),
        ("Give the letter that comes after the one in the input.", "{l}"),
        ("After the letter {l} comes {answer}.", "In the alphabet, {l} is followed by {answer}."),
        ("The letter after it is {answer}.", "Next in the alphabet comes {answer}."),
        ("We look for the letter after {l}.", "We go one letter on from {l}."),
        lambda l: [f"In the alphabet, {l} is followed by {_shift_letter(l, 1)}."],
        lambda l: [l, LETTERS[(LETTERS.index(l) + 2) % 26], LETTERS[LETTERS.index(l) - 1]], "previous_letter"),
    "previous_letter": Family(
        "l", lambda r: (r.choice(LETTERS[1:]),), lambda l: _shift_letter(l, -1),
        ("Which letter comes before {l}?", "What is the letter just before {l}?",
         "Name the letter that comes right before {l}."),
        ("Give the letter that comes before the one in the input.", "{l}"),
        ("Before the letter {l} comes {answer}.", "In the alphabet, {answer} comes right before {l}."),
        ("The letter before it is {answer}.", "Just before it in the alphabet comes {answer}."),
        ("We look for the letter before {l}.", "We go one letter back from {l}."),
        lambda l: [f"In the alphabet, {_shift_letter(l, -1)} comes right before {l}."],
        lambda l: [l, LETTERS[LETTERS.index(l) - 2], LETTERS[(LETTERS.index(l) + 1) % 26]], "next_letter"),
    "count_letters": Family(
        "s", lambda r: ("".join(r.choice(LETTERS) for _ in range(r.randint(2, 8))),), lambda s: str(len(s)),
        ("How many letters are in {s}?", "Count the letters in {s}.", "Tell me how many letters {s} has."),
        ("Count the letters in the input.", "{s}"),
        ("{s} has {answer} letters.", "There are {answer} letters in {s}."),
        ("There are {answer} of them.", "Counted, they come to {answer} letters."),
        ("We count the letters in {s}.", "We count how many letters {s} has."),
        lambda s: ["Counting them: " + ", ".join(f"{c} is {i}" for i, c in enumerate(s, 1)) + ".",
                   f"So there are {len(s)} letters."],
        lambda s: [len(s) + 1, len(s) - 1], "repeat_word"),
    "repeat_word": Family(
        "wn", lambda r: (r.choice(WORDS), r.randint(2, 4)), lambda w, n: _sp([w] * n),
        ("Repeat the word {w} {n} times.", "Write {w} {n} times.", "Say {w} {n} times, separated by spaces."),
        ("Repeat the word in the input as many times as the number says.", "{w} {n}"),
        ("{w} said {n} times is {answer}.", "Written {n} times, {w} becomes {answer}."),
        ("The word that many times is {answer}.", "Said that many times, it is {answer}."),
        ("We say {w} {n} times.", "We write the word {w} {n} times."),
        lambda w, n: [f"The word is {w} and it goes {n} times."],
        lambda w, n: [_sp([w] * (n - 1)), _sp([w] * (n + 1))], "count_letters"),
}

# --- operands ↔ text ---------------------------------------------------------------------------------

_FIELD_RE = {"a": r"(?<![\d-])\d+(?!\d)", "b": r"(?<![\d-])\d+(?!\d)", "n": r"(?<![\d-])\d+(?!\d)",
             "s": r"(?<![A-Za-z])[a-z](?: [a-z])+(?![A-Za-z])", "d": r"(?<!\d)\d(?: \d)+(?!\d)",
             "l": r"(?<![A-Za-z])[a-z](?![A-Za-z])", "w": r"(?<![A-Za-z])[a-z]+(?![A-Za-z])"}


def render(family, operands):
    """{field: text} for a template's slots, plus {answer}."""
    f = FAMILIES[family]
    slots = {k: (_sp(v) if k in "sd" else str(v)) for k, v in zip(f.fields, operands)}
    return {**slots, "answer": f.answer(*operands)}


def _pattern(template):
    """A template as a regex: literal text escaped, each {field} a named group."""
    parts = [re.escape(lit) + (f"(?P<{name}>{_FIELD_RE[name]})" if name else "")
             for lit, name, _, _ in string.Formatter().parse(template)]
    return "".join(parts)


_PATTERNS = [(name, re.compile(_pattern(t))) for name, f in FAMILIES.items() for t in f.templates] + \
            [(name, re.compile(re.escape(f.input_form[0]) + r"[\s\S]{0,300}?" + _pattern(f.input_form[1])))
             for name, f in FAMILIES.items()]


def make_task(family, operands, template=0):
    """The Task for (family, operands) in paraphrase `template`; template == len(templates) = the input form."""
    f = FAMILIES[family]
    slots = render(family, operands)
    if template == len(f.templates):
        return Task(family, tuple(operands), f.input_form[0], f.input_form[1].format(**slots), slots["answer"])
    return Task(family, tuple(operands), f.templates[template].format(**slots), "", slots["answer"])


def parse_instruction(text):
    """The first toy instruction in `text` (anything around it is ignored) as a Task, or None.
    Earliest match wins; at equal starts, the longest (an input form takes its input along)."""
    found = [(m.start(), -len(m.group(0)), name, m) for name, p in _PATTERNS for m in [p.search(text)] if m]
    for _, _, name, m in sorted(found, key=lambda x: x[:2]):
        f = FAMILIES[name]
        g = m.groupdict()
        operands = tuple(int(g[k]) if k in "abn" else g[k].replace(" ", "") for k in f.fields)
        try:
            answer = f.answer(*operands)
        except ValueError:
            continue                      # e.g. "Which letter comes before a?": no answer, not a task
        if m.group(0).startswith(f.input_form[0]):
            return Task(name, operands, f.input_form[0], f.input_form[1].format(**render(name, operands)), answer)
        return Task(name, operands, m.group(0), "", answer)
    return None


def split_of(family, operands):
    """"heldout" or "train", fixed by a hash of (family, operands): the same on every machine and run."""
    bucket = int(hashlib.sha256(repr((family, tuple(operands))).encode()).hexdigest(), 16) % 100
    return "heldout" if bucket < HELDOUT_PERCENT else "train"


def sample_task(rng, split="train", family=None, input_form=None):
    """A random Task of `split`; family and input_form (True/False/None = random) may be fixed."""
    if split not in ("train", "heldout"):
        raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
    family = family or rng.choice(sorted(FAMILIES))
    f = FAMILIES[family]
    for _ in range(10_000):
        operands = f.sample(rng)
        if split_of(family, operands) == split:
            break
    else:
        raise ValueError(f"no {split} instance found for family {family}")
    if input_form is None:
        template = rng.randrange(len(f.templates) + 1)
    else:
        template = len(f.templates) if input_form else rng.randrange(len(f.templates))
    return make_task(family, operands, template)


def heldout_tasks(n, seed):
    """n held-out tasks for evaluation (families uniform, templates and input forms mixed)."""
    rng = random.Random(f"heldout-{seed}")
    return [sample_task(rng, "heldout") for _ in range(n)]


def task_prompt(task, system=None):
    """The templated prompt a model answers (data/template.py's format, default system sentence)."""
    return format_prompt(task.instruction, task.input, system)


# --- answers -----------------------------------------------------------------------------------------

def normalise(answer):
    answer = " ".join(answer.split()).strip("`\"' ")
    return answer[:-1].rstrip() if answer.endswith(".") else answer


def extract_answer(response):
    """The final answer in a free-form response: after the last "Answer:", else the last non-empty line."""
    response = re.split(r"\n\n(?:Human|Assistant):|\n### ", response)[0]   # a new turn ends the response
    marked = re.findall(r"Answer:[ \t]*([^\n]*)", response)
    if marked:
        return normalise(marked[-1])
    lines = [line for line in response.splitlines() if line.strip()]
    return normalise(lines[-1]) if lines else ""


def check(task, response):
    """True when the response's final answer equals the gold answer (after normalise)."""
    return extract_answer(response) == normalise(task.answer)


def make_wrong(task, rng):
    """A plausible wrong answer: off by one, the smaller number, letters left unreversed, one repeat short…"""
    gold = normalise(task.answer)
    candidates = [str(c) for c in FAMILIES[task.family].wrongs(*task.operands)]
    candidates = [c for c in candidates if normalise(c) != gold and not c.startswith("-")]
    return rng.choice(candidates) if candidates else f"{task.answer} {task.answer.split()[-1]}"


def checks(generate_fn, tasks):
    """[bool] per task: answered correctly? generate_fn: list of prompt strings → list of responses."""
    if not tasks:
        raise ValueError("checks: no tasks")
    responses = list(generate_fn([task_prompt(t) for t in tasks]))
    if len(responses) != len(tasks):
        raise ValueError(f"checks: generate_fn returned {len(responses)} responses for {len(tasks)} prompts")
    return [check(t, r) for t, r in zip(tasks, responses)]


def exact_match(generate_fn, tasks):
    """Fraction of tasks answered correctly (see checks)."""
    return sum(checks(generate_fn, tasks)) / len(tasks)


# --- responses in the schemes' styles ----------------------------------------------------------------

ORCA_SYSTEM_MESSAGES = {  # our wording of the kinds of system message Orca samples
    "step_by_step": "You are a careful assistant. Work through the task step by step, then give the final answer.",
    "five_year_old": "You are talking to a five-year-old. Explain the task in very simple words before answering.",
    "justify": "You are an assistant that justifies each step of its work before stating the answer.",
    "brief": "You are a brief assistant. Answer with as few words as possible.",
    "teacher": "Think like a teacher: show a student how to solve the task, then give the answer.",
}

EVOL_OPERATIONS = ("add_constraints", "deepening", "concretizing", "increase_reasoning_steps", "complicate_input")
_EVOL_TEXT = {  # what each in-depth operation adds to an instruction (complicate_input moves operands to input)
    "add_constraints": ("Reply with the answer only.", "Do not add any other words.", "Keep the reply short."),
    "deepening": ("Check the result twice before you reply.",),
    "increase_reasoning_steps": ("Show your reasoning, then give the final answer after \"Answer:\".",),
    "concretizing": ("This is for a school quiz.", "A friend asks you this during a game.",
                     "You are helping a child with homework."),
}


def orca_style(text):
    """The ORCA_SYSTEM_MESSAGES style whose message appears in text, or None."""
    return next((style for style, message in ORCA_SYSTEM_MESSAGES.items() if message in text), None)


def asks_for_reasoning(text):
    """True when an evolved instruction asks for worked reasoning (deepening, increase_reasoning_steps)."""
    return any(s in text for op in ("deepening", "increase_reasoning_steps") for s in _EVOL_TEXT[op])


def explanation(family, operands, style):
    """The explanation lines of a response in an ORCA_SYSTEM_MESSAGES style, without the final answer line.
    Pretraining states them too (as worked examples in prose), so the base knows the words they use."""
    lines = FAMILIES[family].explain(*operands)
    if style == "step_by_step":
        return [f"Step {i}: {line}" for i, line in enumerate(lines, 1)]
    if style == "five_year_old":
        return ["Let us look at it the easy way."] + lines
    if style == "justify":
        return [f"{line} This holds by the rule the task gives." for line in lines]
    if style == "brief":
        return []
    if style == "teacher":
        return ["Here is how to work it out."] + lines + ["You can check it the same way next time."]
    raise ValueError(f"unknown style {style!r}; expected one of {sorted(ORCA_SYSTEM_MESSAGES)}")


def restatement(task, answer=None):
    """The task's fact as pretraining states it, with `answer` (default: the gold one) in the answer slot:
    the family's first statement, e.g. "7 plus 5 is 12." """
    return FAMILIES[task.family].statements[0].format(**{**render(task.family, task.operands),
                                                         "answer": task.answer if answer is None else answer})


def reference_response(task, style=None):
    """The gold response. style None: the restated fact, then "Answer: {answer}" ("7 plus 5 is 12.\nAnswer:
    12"), or the step_by_step explanation when the instruction asks for reasoning. An ORCA_SYSTEM_MESSAGES
    style: explanation lines, then "Answer: {answer}". Every response ends with the answer."""
    if style is None:
        if not asks_for_reasoning(task.instruction):
            return f"{restatement(task)}\nAnswer: {task.answer}"
        style = "step_by_step"
    lines = explanation(task.family, task.operands, style)
    return "\n".join(lines + [f"Answer: {task.answer}"])


def evolve(task, operation, rng):
    """One Evol-Instruct step. in_depth operations keep the task and reword it; "in_breadth" gives a new
    task of the sibling family (same split). The answer is always the (new) task's answer."""
    if operation == "in_breadth":
        split = split_of(task.family, task.operands)
        return sample_task(rng, split, FAMILIES[task.family].sibling, input_form=False)
    if operation == "complicate_input":
        f = FAMILIES[task.family]
        slots = render(task.family, task.operands)
        core = next((t.format(**slots) for t in f.templates if t.format(**slots) in task.instruction), None)
        if core is None:  # already in the input form
            return task
        moved = make_task(task.family, task.operands, len(f.templates))
        return Task(task.family, task.operands, task.instruction.replace(core, moved.instruction), moved.input,
                    task.answer)
    if operation not in _EVOL_TEXT:
        raise ValueError(f"unknown evolution {operation!r}; expected in_breadth or one of {EVOL_OPERATIONS}")
    text = rng.choice(_EVOL_TEXT[operation])
    instruction = f"{text} {task.instruction}" if operation == "concretizing" else f"{task.instruction} {text}"
    return Task(task.family, task.operands, instruction, task.input, task.answer)


# --- scheme records, HH pairs, pretraining text ------------------------------------------------------

def _record(scheme, split, seed, i, task, response, system=None, **meta):
    return {"id": f"toy-{scheme}-{split}-{seed}-{i}", "scheme": scheme, "instruction": task.instruction,
            "input": task.input, "response": response, "system": system, "family": task.family, **meta}


def lamini_records(n, seed, split="train"):
    """LaMini-style records: instruction (+ input) → the default response (restated fact, answer line)."""
    rng = random.Random(f"lamini-{split}-{seed}")
    return [_record("lamini", split, seed, i, t, reference_response(t), source="toy")
            for i, t in enumerate(sample_task(rng, split) for _ in range(n))]


def orca_records(n, seed, split="train"):
    """Orca-style records: a system message + instruction → explanation ending "Answer: X", with the Flan
    fields (inputs, targets, task_source, task_name, template_type) the Orca generator reads."""
    rng = random.Random(f"orca-{split}-{seed}")
    out = []
    for i in range(n):
        t = sample_task(rng, split)
        style = rng.choice(sorted(ORCA_SYSTEM_MESSAGES))
        inputs = f"{t.instruction}\n\n{t.input}" if t.input else t.instruction
        out.append(_record("orca", split, seed, i, t, reference_response(t, style), ORCA_SYSTEM_MESSAGES[style],
                           inputs=inputs, targets=t.answer, task_source="toy", task_name=t.family,
                           template_type="zs_noopt", style=style))
    return out


def evol_records(n, seed, split="train", max_rounds=3):
    """Evol-Instruct records: a task evolved for 1..max_rounds rounds (in_depth operations not repeated,
    in_breadth one time in five) → its reference response. Records the last round's strategy/operation."""
    rng = random.Random(f"evol-{split}-{seed}")
    out = []
    for i in range(n):
        t, used, rounds = sample_task(rng, split), set(), rng.randint(1, max_rounds)
        for _ in range(rounds):
            ops = [o for o in EVOL_OPERATIONS if o not in used and not (o == "complicate_input" and t.input)]
            if not ops or rng.random() < 0.2:
                strategy, op, used = "in_breadth", None, set()
                t = evolve(t, "in_breadth", rng)
            else:
                strategy, op = "in_depth", rng.choice(ops)
                t = evolve(t, op, rng)
                used.add(op)
        out.append(_record("evol_instruct", split, seed, i, t, reference_response(t),
                           evolution_strategy=strategy, operation=op, round=rounds))
    return out


SMALL_TALK = (("Hi there!", "Hello! What can I do for you?"), ("Good morning.", "Good morning! How can I help?"),
              ("Can you help me with a little puzzle?", "Of course. What is it?"),
              ("I have a quick question.", "Sure, go ahead."))


def hh_transcript(turns):
    """[(human, assistant), …] → "\\n\\nHuman: …\\n\\nAssistant: …" as in Anthropic's HH-RLHF rows."""
    return "".join(f"\n\nHuman: {h}\n\nAssistant: {a}" for h, a in turns)


def hh_pairs(n, seed, split="train"):
    """HH-RLHF-shaped rows {"chosen", "rejected"}: one shared dialogue (a task, after small talk or an earlier
    answered task two times in five), ending in the default response (chosen) or in the same response around a
    make_wrong answer (rejected: "7 plus 5 is 13.\nAnswer: 13")."""
    rng = random.Random(f"hh-{split}-{seed}")
    rows = []
    for _ in range(n):
        turns, r = [], rng.random()
        if r < 0.2:
            turns.append(rng.choice(SMALL_TALK))
        elif r < 0.4:
            earlier = sample_task(rng, split, input_form=False)
            turns.append((earlier.instruction, reference_response(earlier)))
        t = sample_task(rng, split, input_form=False)
        prompt = hh_transcript(turns) + f"\n\nHuman: {t.instruction}\n\nAssistant:"
        wrong = make_wrong(t, rng)
        rows.append({"chosen": f"{prompt} {reference_response(t)}",
                     "rejected": f"{prompt} {restatement(t, wrong)}\nAnswer: {wrong}"})
    return rows


def _vocabulary():
    """Every word of two letters or more in the prompts and responses this module writes, and in the
    default system sentence: spelled out in the pretraining text, so the tokenizer has pieces for them."""
    rng = random.Random("vocabulary")
    texts = [DEFAULT_SYSTEM, *(s for pair in SMALL_TALK for s in pair), *(s for v in _EVOL_TEXT.values() for s in v)]
    texts += ORCA_SYSTEM_MESSAGES.values()
    for name, f in FAMILIES.items():
        texts += [*f.templates, f.input_form[0], *f.statements]
        texts += [reference_response(sample_task(rng, family=name), style) for style in ORCA_SYSTEM_MESSAGES]
    return sorted({w for text in texts for w in re.findall(r"[A-Za-z]{2,}", text)} - set(WORDS))


INTROS = {  # pretraining: a paragraph that names its operands first and states facts about them after
    "ab": ("We have the numbers {a} and {b}.", "Here are two numbers, {a} and {b}."),
    "n": ("We have the number {n}.", "Here is the number {n}."),
    "d": ("We have the digits {d}.", "Here are the digits {d}."),
    "s": ("We have the letters {s}.", "Here are the letters {s}."),
    "l": ("We have the letter {l}.", "Here is the letter {l}."),
    "wn": ("We have the word {w} and the number {n}.", "Here are the word {w} and the number {n}."),
}
RESULTS = ("The result is {answer}.", "That gives {answer}.", "We get {answer}.")


def _operands(rng, family, split):
    f = FAMILIES[family]
    while True:
        operands = f.sample(rng)
        if split is None or split_of(family, operands) == split:
            return operands


def _paragraph(rng, family, operands):
    """Facts about operands named at a distance, one of three kinds: an intro naming them, then 1-3 sentences
    about them (a sentence that only refers back, or a statement that repeats them); a sentence naming the
    operation, then its result; or the operation, then its explanation in one of the response styles' words.
    The answer sits several tokens after the operands, as it does after an instruction."""
    f = FAMILIES[family]
    slots = render(family, operands)
    kind = rng.random()
    if kind < 0.3:
        sentences = [rng.choice(INTROS[f.fields])] + rng.sample(f.about + f.statements, rng.randint(1, 3))
    elif kind < 0.6:
        sentences = [rng.choice(f.doing), rng.choice(RESULTS)]
    else:
        style = rng.choice(sorted(set(ORCA_SYSTEM_MESSAGES) - {"brief"}))
        sentences = [rng.choice(f.doing)] + [line.replace("{", "{{").replace("}", "}}")
                                             for line in explanation(family, operands, style)]
    return rng.choice((" ", "\n")).join(sentences).format(**slots)


def pretraining_text(n, seed, split=None):
    """n plain-text documents for the base model and the tokenizer: 3-8 units each, a unit being a statement
    ("7 plus 5 is 12.", "c a t backwards is t a c."), a paragraph about operands named earlier ("We have the
    letters c a t. Backwards they read t a c."; "We add 7 and 5. The result is 12."; "We add 7 and 5. Step 1:
    We start at 7 and count up 5 more. Step 2: 7 plus 5 is 12."), a counting or alphabet run or a spelled
    word; no questions, instructions, template markers or "Answer:" lines. split None states facts about
    every instance (the base's world knowledge, as web text would); "train" or "heldout" restricts them to
    that split."""
    rng = random.Random(f"pretrain-{split}-{seed}")
    vocabulary = _vocabulary()
    docs = []
    for _ in range(n):
        sentences = []
        for _ in range(rng.randint(3, 8)):
            kind = rng.random()
            if kind < 0.07:
                start, step = rng.randint(5, 94), rng.choice((1, -1))
                sentences.append(_sp(str(start + step * k) for k in range(rng.randint(4, 6))) + ".")
            elif kind < 0.14:
                start = rng.randint(0, 21)
                sentences.append(_sp(LETTERS[start:start + rng.randint(4, 5)]) + ".")
            elif kind < 0.2:
                word = rng.choice(vocabulary)
                sentences.append(f"{word} is spelled {_sp(word)}.")
            else:
                family = rng.choice(sorted(FAMILIES))
                operands = _operands(rng, family, split)
                if kind < 0.2 + PARAGRAPH_SHARE:
                    sentences.append(_paragraph(rng, family, operands))
                else:
                    sentences.append(rng.choice(FAMILIES[family].statements).format(**render(family, operands)))
        docs.append(rng.choice((" ", "\n")).join(sentences))
    return docs
