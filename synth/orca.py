"""Orca-style explanation tuning (Mukherjee et al. 2023, Orca): Flan tasks answered under system messages
that ask for an explanation.

Each Flan row (inputs, targets, task_name, template_type; task_source optional) draws one system message from
orca_system_messages.txt (the kinds of Orca's 16: step by step, explain to a five-year-old, think like a
teacher, justify each step, answer briefly, …; the wording is ours). The generator gets that system message
and the task's inputs, plus the gold target as a private note (orca_task.txt), and writes an explained answer
that reaches the target: the released data's `explained_targets`. The judge in filter.py later sees the
target as the reference answer and rates agreement with it.
"""

from __future__ import annotations

import random
from pathlib import Path

PROMPTS = Path(__file__).with_name("prompts")
TASK_PROMPT = (PROMPTS / "orca_task.txt").read_text(encoding="utf-8")
FLAN_FIELDS = {"inputs": str, "targets": str, "task_name": str, "template_type": str}


def _read_system_messages(path: Path) -> list[tuple[str, str]]:
    messages = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if line.strip() and not line.startswith("#"):
            name, sep, text = line.partition(":")
            if not sep or not name.strip():
                raise ValueError(f"{path}:{number}: expected 'name: message'")
            messages.append((name.strip(), text.strip()))
    return messages


SYSTEM_MESSAGES = _read_system_messages(PROMPTS / "orca_system_messages.txt")


def pick_system_message(rng: random.Random) -> tuple[str, str]:
    """(name, text), uniform over the list."""
    return rng.choice(SYSTEM_MESSAGES)


def task_prompt(inputs: str, targets: str) -> str:
    return TASK_PROMPT.format(inputs=inputs, targets=targets)
