"""Evol-Instruct (Xu et al. 2023, WizardLM): make seed instructions harder or rarer, round by round.

Each round ("epoch", the released data's column name) takes every seed chain's newest instruction and picks
one of six operations uniformly:
    in_depth    add_constraints | deepening | concretizing | increase_reasoning_steps | complicate_input
                (evol_in_depth.txt with one method from evol_in_depth_methods.txt)
    in_breadth  a new, rarer instruction in the same domain (evol_in_breadth.txt)
The generator rewrites the instruction, then answers the new one in a second request. The eliminator drops
the evolution when
    copied_prompt_wording  the new instruction repeats the evolving prompt's own labels;
    no_information_gain    it brings fewer than MIN_NEW_WORDS words its parent lacks (WizardLM asks ChatGPT
                           whether the two are equal; a lexical test is cheaper, deterministic and testable);
    punctuation_only       the answer holds nothing but punctuation and stop words;
    apology                the answer apologises or declines and is short (< 80 words, WizardLM's bound);
    too_short              the answer has fewer than `min_words` words.
An eliminated evolution is recorded with its reason and its parent stays in the pool for the next round.
"""

from __future__ import annotations

import random
import re
from pathlib import Path

PROMPTS = Path(__file__).with_name("prompts")
IN_DEPTH = ("add_constraints", "deepening", "concretizing", "increase_reasoning_steps", "complicate_input")
OPERATIONS = IN_DEPTH + ("in_breadth",)
IN_DEPTH_PROMPT = (PROMPTS / "evol_in_depth.txt").read_text(encoding="utf-8")
IN_BREADTH_PROMPT = (PROMPTS / "evol_in_breadth.txt").read_text(encoding="utf-8")
COPY_MARKERS = ("#original instruction#", "#new instruction#", "original instruction", "new instruction")
MIN_NEW_WORDS = 3
APOLOGY = re.compile(r"\b(sorry|apologi[sz]e|i cannot|i can't|i can not|i am unable|i'm unable|as an ai)\b", re.I)
STOP_WORDS = frozenset(
    "a an the and or but if then so of to in on at by for with from as into about is are was were be been being "
    "am do does did have has had it its this that these those there here i me my you your he him his she her we "
    "us our they them their what which who whom will would can could should shall may might must".split())


def _read_methods(path: Path) -> dict[str, str]:
    methods = {}
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if line.strip() and not line.startswith("#"):
            name, sep, method = line.partition(":")
            if not sep:
                raise ValueError(f"{path}:{number}: expected 'name: method'")
            methods[name.strip()] = method.strip()
    if tuple(methods) != IN_DEPTH:
        raise ValueError(f"{path}: expected the operations {IN_DEPTH}, found {tuple(methods)}")
    return methods


METHODS = _read_methods(PROMPTS / "evol_in_depth_methods.txt")


def pick_operation(rng: random.Random) -> tuple[str, str | None]:
    """(evolution_strategy, in_depth_evolving_operation): uniform over the six operations."""
    op = rng.choice(OPERATIONS)
    return ("in_breadth", None) if op == "in_breadth" else ("in_depth", op)


def evolve_prompt(instruction: str, operation: str | None) -> str:
    if operation is None:
        return IN_BREADTH_PROMPT.format(instruction=instruction)
    return IN_DEPTH_PROMPT.format(instruction=instruction, method=METHODS[operation])


def words(text: str) -> list[str]:
    return re.findall(r"[\w']+", text.lower())


def eliminate_instruction(evolved: str, parent: str) -> str | None:
    """The reason to drop an evolved instruction, or None to keep it."""
    if any(marker in evolved.lower() for marker in COPY_MARKERS):
        return "copied_prompt_wording"
    if len(set(words(evolved)) - set(words(parent))) < MIN_NEW_WORDS:
        return "no_information_gain"
    return None


def eliminate_response(response: str, min_words: int) -> str | None:
    """The reason to drop an evolution for its answer, or None to keep it."""
    w = words(response)
    if all(t in STOP_WORDS for t in w):  # also the empty answer
        return "punctuation_only"
    if APOLOGY.search(response) and len(w) < 80:
        return "apology"
    if len(w) < min_words:
        return "too_short"
    return None
