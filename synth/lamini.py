"""LaMini-style instruction generation (Wu et al. 2023, LaMini-LM), in three steps:

1. instructions: each request shows the generator `examples` seed instructions sampled from the seed file
   (databricks-dolly-15k) and asks for `count` new ones, either
     example-guided  "write instructions like these", or
     topic-guided    "write instructions like these, each about one of these topics" (topics from a list);
2. near-duplicate removal: an instruction is dropped when its ROUGE-L F1 with one already kept, or with a seed
   shown as an example, is ≥ 0.7 (Self-Instruct's test; LaMini filters its instructions the same way);
3. responses: each kept instruction goes back to the generator on its own, as the user message.
The two requests per example match the released SurgeGlobal/LaMini data (instruction, source, response).

ROUGE-L on word tokens (Lin 2004), LCS = longest common subsequence of tokens a and b:
    P = LCS/|b|,  R = LCS/|a|,  F1 = 2·P·R/(P + R) = 2·LCS/(|a| + |b|)
"""

from __future__ import annotations

import math
import random
import re
from collections import Counter, defaultdict
from pathlib import Path

PROMPTS = Path(__file__).with_name("prompts")
EXAMPLE_GUIDED = (PROMPTS / "lamini_example_guided.txt").read_text(encoding="utf-8")
TOPIC_GUIDED = (PROMPTS / "lamini_topic_guided.txt").read_text(encoding="utf-8")


def instruction_jobs(seeds: list[str], topics: list[str], n: int, examples: int, count: int,
                     topic_fraction: float, seed: int) -> list[dict]:
    """n instruction-generation requests. Job j draws from its own Random(f"{seed}:lamini:{j}"), so the same
    flags give the same jobs on every run (what lets a re-run skip the finished ones)."""
    if len(seeds) < examples:
        raise ValueError(f"lamini: {examples} examples per request need at least as many seeds, got {len(seeds)}")
    if topic_fraction > 0 and not topics:
        raise ValueError("lamini: topic-guided requests (--topic-fraction > 0) need a topic list (--topics)")
    jobs = []
    for j in range(n):
        rng = random.Random(f"{seed}:lamini:{j}")
        source = "topic_guided" if rng.random() < topic_fraction else "example_guided"
        job = {"id": f"lamini-{j:06d}", "source": source, "examples": rng.sample(seeds, examples),
               "topics": rng.sample(topics, min(3, len(topics))) if source == "topic_guided" else []}
        jobs.append(job)
    return jobs


def instruction_prompt(job: dict, count: int) -> str:
    examples = "\n".join(f"- {e}" for e in job["examples"])
    if job["source"] == "topic_guided":
        topics = "\n".join(f"- {t}" for t in job["topics"])
        return TOPIC_GUIDED.format(examples=examples, topics=topics, count=count)
    return EXAMPLE_GUIDED.format(examples=examples, count=count)


_ITEM = re.compile(r"^\s*(?:\d+\s*[.):]|[-*•])(?:\s+(.*?))?\s*$")


def parse_numbered_list(text: str, limit: int) -> list[str]:
    """Items of a "1. …" / "2) …" / "- …" list, at most `limit`. A line that does not start an item continues
    the previous one; lines before the first item are ignored. ValueError if there is no item at all."""
    items: list[str] = []
    for line in text.splitlines():
        match = _ITEM.match(line)
        if match:
            items.append(match.group(1) or "")
        elif items and line.strip():
            items[-1] += " " + line.strip()
    items = [item.strip().strip('"').strip() for item in items]
    items = [item for item in items if re.search(r"\w", item)]  # a bare "1." or "- ---" is no instruction
    if not items:
        raise ValueError(f"no list items in the generator's reply: {text[:80]!r}")
    return items[:limit]


def tokens(text: str) -> list[str]:
    return re.findall(r"\w+", text.lower())


def lcs_length(a: list[str], b: list[str]) -> int:
    """Longest common subsequence, the textbook O(|a|·|b|) dynamic programme, one row at a time."""
    previous = [0] * (len(b) + 1)
    for x in a:
        current = [0]
        for j, y in enumerate(b):
            current.append(previous[j] + 1 if x == y else max(previous[j + 1], current[j]))
        previous = current
    return previous[-1]


def rouge_l(a: list[str], b: list[str]) -> float:
    """ROUGE-L F1 = 2·LCS/(|a| + |b|) on token lists (0 when both are empty)."""
    if not a or not b:
        return 0.0
    return 2 * lcs_length(a, b) / (len(a) + len(b))


def _multiset(tokens_: list[str]) -> set[tuple[str, int]]:
    """{(token, k)}: the k-th occurrence of each token, so that |A ∩ B| is the multiset overlap."""
    seen: dict[str, int] = {}
    out = set()
    for t in tokens_:
        seen[t] = seen.get(t, 0) + 1
        out.add((t, seen[t]))
    return out


def remove_near_duplicates(candidates: list[str], shown: list[str], threshold: float = 0.7) -> list[int]:
    """Indices of the candidates kept, in order: each is kept when its ROUGE-L F1 with every earlier kept
    candidate and every `shown` seed is < threshold.

    Only pairs that can reach the threshold are compared (the prefix filter of all-pairs similarity search,
    Bayardo et al. 2007). With A, B the token multisets and o = |A ∩ B|, LCS ≤ o, so ROUGE-L ≥ t needs
    o ≥ t(|A| + |B|)/2; as |B| ≥ o, that gives |B| ≥ t|A|/(2 − t) and so o ≥ t|A|/(2 − t) =: o_A.
    Sort every multiset's elements in one global order (rarest first): two multisets sharing o elements share
    one among the first |A| − o + 1 of each. So each text is indexed under its first |A| − ⌈o_A⌉ + 1 elements
    and compared only with the texts found there: first the bound 2o/(|A| + |B|), then the exact LCS."""
    if threshold <= 0:
        raise ValueError(f"dedup threshold must be > 0, got {threshold}")
    if threshold > 1:  # ROUGE-L ≤ 1: nothing is a near-duplicate
        return list(range(len(candidates)))
    texts = [tokens(t) for t in [*shown, *candidates]]
    bags = [_multiset(t) for t in texts]
    frequency = Counter(e for bag in bags for e in bag)

    def prefix(i):
        o = math.ceil(threshold * len(texts[i]) / (2 - threshold) - 1e-9)  # rounding can only lengthen it
        return sorted(bags[i], key=lambda e: (frequency[e], e))[:max(0, len(texts[i]) - o + 1)]

    index: dict[tuple[str, int], list[int]] = defaultdict(list)
    for i in range(len(shown)):
        for e in prefix(i):
            index[e].append(i)
    kept = []
    for i in range(len(shown), len(texts)):
        a, elements, seen = texts[i], prefix(i), set()
        for j in (j for e in elements for j in index[e]):
            if j in seen:
                continue
            seen.add(j)
            b = texts[j]
            if 2 * len(bags[i] & bags[j]) >= threshold * (len(a) + len(b)) and rouge_l(a, b) >= threshold:
                break
        else:
            kept.append(i - len(shown))
            for e in elements:
                index[e].append(i)
    return kept
