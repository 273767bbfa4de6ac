"""toy/world.py: the toy world is deterministic, its splits are disjoint, its checker accepts every scheme's
gold format and rejects every deliberate mistake, and its instructions parse back into their tasks."""
import hashlib
import random

import pytest

from data.template import DEFAULT_SYSTEM
from toy import world

STYLES = sorted(world.ORCA_SYSTEM_MESSAGES)


def all_templates():
    """(family, template index) for every paraphrase and every input form."""
    return [(name, k) for name, f in world.FAMILIES.items() for k in range(len(f.templates) + 1)]


def key(task):
    return task.family, task.operands


def record_task(record):
    """The task behind an SFT record, recovered from its text alone."""
    return world.parse_instruction(f"{record['instruction']}\n\n{record['input']}")


def last_turn(transcript):
    prompt, _, answer = transcript.rpartition("\n\nAssistant: ")
    return prompt, answer


def test_same_seed_gives_the_same_data_and_another_seed_other_data():
    makers = [world.lamini_records, world.orca_records, world.evol_records, world.hh_pairs, world.pretraining_text,
              world.heldout_tasks]
    for make in makers:
        assert make(50, 3) == make(50, 3), make.__name__
        assert make(50, 3) != make(50, 4), make.__name__


def test_split_is_a_hash_of_family_and_operands_with_the_stated_heldout_share():
    for family, operands in [("add", (7, 5)), ("reverse", ("cat",)), ("repeat_word", ("dog", 3))]:
        bucket = int(hashlib.sha256(repr((family, operands)).encode()).hexdigest(), 16) % 100
        assert world.split_of(family, operands) == ("heldout" if bucket < world.HELDOUT_PERCENT else "train")
    pairs = [(a, b) for a in range(100) for b in range(100) if a != b]           # the whole "larger" space
    share = sum(world.split_of("larger", p) == "heldout" for p in pairs) / len(pairs)
    assert abs(share - world.HELDOUT_PERCENT / 100) < 0.02


def test_heldout_tasks_cover_every_family_and_share_no_instance_with_any_training_data():
    heldout = world.heldout_tasks(3000, 0)
    assert {t.family for t in heldout} == set(world.FAMILIES)
    assert all(world.split_of(*key(t)) == "heldout" for t in heldout)
    train = [record_task(r) for make in (world.lamini_records, world.orca_records, world.evol_records)
             for r in make(1000, 0)]
    train_turns = [turn.split("\n\nAssistant:")[0] for row in world.hh_pairs(1000, 0)   # every Human turn
                   for turn in row["chosen"].split("\n\nHuman: ")[1:]]
    train += [world.parse_instruction(turn) for turn in train_turns]               # small talk parses to None
    assert sum(t is None for t in train) == sum(turn in str(world.SMALL_TALK) for turn in train_turns)
    train = [t for t in train if t is not None]
    assert len(train) > 3000 and {t.family for t in train} == set(world.FAMILIES)
    assert all(world.split_of(*key(t)) == "train" for t in train)
    assert not {key(t) for t in heldout} & {key(t) for t in train}


def test_parse_instruction_round_trips_every_template_in_every_context():
    rng = random.Random(0)
    for family, k in all_templates():
        for _ in range(20):
            task = world.make_task(family, world.FAMILIES[family].sample(rng), k)
            texts = [f"{task.instruction}\n\n{task.input}".strip(), world.task_prompt(task),
                     world.task_prompt(task, system=world.ORCA_SYSTEM_MESSAGES[rng.choice(STYLES)]),
                     f"Rewrite the following prompt.\n#Given Prompt#:\n{task.instruction}\nInput: {task.input}\n"]
            for op in world.EVOL_OPERATIONS:
                evolved = world.evolve(task, op, rng)
                texts.append(world.task_prompt(evolved))
            for text in texts:
                parsed = world.parse_instruction(text)
                assert parsed is not None and (key(parsed), parsed.answer) == (key(task), task.answer), text
            assert world.parse_instruction(world.task_prompt(task)) == task


def test_parse_instruction_finds_nothing_in_responses_statements_or_impossible_tasks():
    rng = random.Random(1)
    for _ in range(200):
        task = world.sample_task(rng)
        for style in STYLES:
            assert world.parse_instruction(world.reference_response(task, style)) is None
    assert all(world.parse_instruction(doc) is None for doc in world.pretraining_text(300, 0))
    assert world.parse_instruction(DEFAULT_SYSTEM) is None
    assert world.parse_instruction("Which letter comes before a?") is None        # no answer exists
    assert world.parse_instruction("Which letter comes after y?").answer == "z"


def test_check_accepts_the_gold_answer_in_every_scheme_format():
    rng = random.Random(2)
    for family, k in all_templates():
        for _ in range(30):
            task = world.make_task(family, world.FAMILIES[family].sample(rng), k)
            gold = [task.answer, f" {task.answer}.\n", f"Answer: {task.answer}",
                    f"{task.answer}\n\nHuman: And now?", f"{task.answer}\n### Instruction:\nMore"]
            gold += [world.reference_response(task, style) for style in STYLES]
            assert all(world.check(task, r) for r in gold), (task, gold)
    for r in world.lamini_records(300, 0) + world.orca_records(300, 0) + world.evol_records(300, 0):
        assert world.check(record_task(r), r["response"]), r
    for row in world.hh_pairs(300, 0):
        prompt, answer = last_turn(row["chosen"])
        assert world.check(world.parse_instruction(prompt.rpartition("\n\nHuman: ")[2]), answer)


def test_check_rejects_every_make_wrong_answer_in_every_format():
    rng = random.Random(3)
    for family, k in all_templates():
        for _ in range(100):
            task = world.make_task(family, world.FAMILIES[family].sample(rng), k)
            wrong = world.make_wrong(task, rng)
            explained = world.reference_response(task, rng.choice(STYLES)).rpartition("Answer:")[0] + f"Answer: {wrong}"
            assert not any(world.check(task, r) for r in (wrong, f"Answer: {wrong}", f"{wrong}.", explained)), wrong
    for row in world.hh_pairs(300, 0):
        prompt, answer = last_turn(row["rejected"])
        assert not world.check(world.parse_instruction(prompt.rpartition("\n\nHuman: ")[2]), answer)


def test_make_wrong_answers_look_like_answers_of_the_same_kind():
    rng = random.Random(4)
    for _ in range(2000):
        task = world.sample_task(rng)
        wrong = world.make_wrong(task, rng)
        assert wrong.replace(" ", "").isdigit() == task.answer.replace(" ", "").isdigit(), (task, wrong)
        assert wrong.replace(" ", "").isalpha() == task.answer.replace(" ", "").isalpha(), (task, wrong)
    garbled = world.make_task("reverse", ("aba",))      # a palindrome: no listed wrong answer differs; fallback does
    assert not world.check(garbled, world.make_wrong(garbled, rng))


def test_records_have_the_generated_data_schema_fields():
    base = {"id", "scheme", "instruction", "input", "response", "system", "family"}
    extra = {"lamini": {"source"}, "orca": {"inputs", "targets", "task_source", "task_name", "template_type", "style"},
             "evol_instruct": {"evolution_strategy", "operation", "round"}}
    for make, scheme in [(world.lamini_records, "lamini"), (world.orca_records, "orca"),
                         (world.evol_records, "evol_instruct")]:
        records = make(200, 0)
        assert len({r["id"] for r in records}) == 200
        for r in records:
            assert set(r) == base | extra[scheme] and r["scheme"] == scheme
            assert all(isinstance(r[f], str) and r[f].strip() for f in ("instruction", "response"))
            assert isinstance(r["input"], str) and (r["system"] is None or isinstance(r["system"], str))
    for r in world.orca_records(200, 0):
        assert r["system"] == world.ORCA_SYSTEM_MESSAGES[r["style"]] and r["targets"] in r["response"]
        assert r["inputs"].startswith(r["instruction"]) and r["input"] in r["inputs"]
        assert r["response"].endswith(f"\nAnswer: {r['targets']}") or r["response"] == f"Answer: {r['targets']}"
    evol = world.evol_records(500, 0)
    assert {r["operation"] for r in evol} == set(world.EVOL_OPERATIONS) | {None}
    for r in evol:
        assert (r["operation"] is None) == (r["evolution_strategy"] == "in_breadth") and 1 <= r["round"] <= 3
        assert r["response"].startswith("Step 1: ") == world.asks_for_reasoning(r["instruction"])


def test_hh_pairs_share_the_dialogue_and_differ_only_in_the_last_answer():
    rows = world.hh_pairs(300, 0)
    assert all(set(row) == {"chosen", "rejected"} for row in rows)
    assert any(row["chosen"].count("\n\nHuman: ") == 2 for row in rows)
    for row in rows:
        assert row["chosen"].startswith("\n\nHuman: ")
        (cp, ca), (rp, ra) = last_turn(row["chosen"]), last_turn(row["rejected"])
        task, wrong = world.parse_instruction(cp.rpartition("\n\nHuman: ")[2]), world.extract_answer(ra)
        assert cp == rp and ca == world.reference_response(task) and wrong != task.answer
        assert ra == f"{world.restatement(task, wrong)}\nAnswer: {wrong}"     # the same words around the wrong answer


def test_default_response_restates_the_fact_with_the_instructions_operands_then_gives_the_answer():
    rng = random.Random(7)
    for family, k in all_templates():
        f = world.FAMILIES[family]
        for _ in range(20):
            task = world.make_task(family, f.sample(rng), k)
            statement, answer_line = world.reference_response(task).split("\n")
            slots = world.render(family, task.operands)
            assert statement == f.statements[0].format(**slots)                # as pretraining states it
            assert answer_line == f"Answer: {task.answer}" and world.check(task, world.reference_response(task))
            assert world.restatement(task, "x") == f.statements[0].format(**{**slots, "answer": "x"})
    for r in world.lamini_records(100, 0):
        assert r["response"] == world.reference_response(record_task(r))


def test_evolve_keeps_the_task_in_depth_and_moves_to_the_sibling_in_breadth():
    rng = random.Random(5)
    for _ in range(200):
        task = world.sample_task(rng, input_form=False)
        moved = world.evolve(task, "complicate_input", rng)
        assert moved.input and key(moved) == key(task) and world.evolve(moved, "complicate_input", rng) == moved
        for op in ("add_constraints", "deepening", "concretizing", "increase_reasoning_steps"):
            evolved = world.evolve(task, op, rng)
            assert key(evolved) == key(task) and len(evolved.instruction) > len(task.instruction)
        breadth = world.evolve(task, "in_breadth", rng)
        assert breadth.family == world.FAMILIES[task.family].sibling
        assert world.split_of(*key(breadth)) == world.split_of(*key(task))
    with pytest.raises(ValueError, match="unknown evolution"):
        world.evolve(task, "shorten", rng)


def test_pretraining_text_states_facts_without_any_instruction_format():
    docs = world.pretraining_text(500, 0)
    for marker in ("###", "Human:", "Assistant:", "Answer:", "Instruction", "Response", "?"):
        assert not any(marker in doc for doc in docs), marker
    text = " ".join(docs)
    assert "plus" in text and "backwards" in text and "spelled" in text
    # paragraphs about operands named earlier, and the explanations' words (responses' styles, no answer line)
    assert "We have the numbers" in text and "The result is" in text and "Their sum is" in text
    assert "Step 2: " in text and "This holds by the rule the task gives." in text
    train_only = world.pretraining_text(200, 0, split="train")
    assert train_only != world.pretraining_text(200, 0) and all(world.parse_instruction(d) is None for d in train_only)


def test_exact_match_is_one_for_an_oracle_half_for_a_half_oracle_and_zero_for_echo():
    tasks = world.heldout_tasks(100, 0)

    def oracle(prompts):
        return [world.reference_response(world.parse_instruction(p), "teacher") for p in prompts]

    def half(prompts):
        return [r if i % 2 else "no idea" for i, r in enumerate(oracle(prompts))]

    assert world.exact_match(oracle, tasks) == 1.0
    assert world.exact_match(half, tasks) == 0.5
    assert world.exact_match(lambda prompts: prompts, tasks) == 0.0
    with pytest.raises(ValueError, match="returned 1 responses for 100 prompts"):
        world.exact_match(lambda prompts: ["x"], tasks)


def slots_of(template):
    return {name for _, name, _, _ in __import__("string").Formatter().parse(template) if name}


def test_pretraining_paragraphs_name_the_operands_first_and_state_the_true_answer_after_them():
    for name, f in world.FAMILIES.items():
        assert all(slots_of(t) == {"answer"} for t in f.about), name                # refers back only
        assert all(slots_of(t) == set(f.fields) for t in f.doing + world.INTROS[f.fields]), name
        assert all(slots_of(t) == set(f.fields) | {"answer"} for t in f.statements), name
    assert all(slots_of(t) == {"answer"} for t in world.RESULTS)
    rng = random.Random(6)
    for _ in range(600):
        family = rng.choice(sorted(world.FAMILIES))
        f, operands = world.FAMILIES[family], world.FAMILIES[family].sample(rng)
        text = world._paragraph(rng, family, operands)
        slots = world.render(family, operands)
        first, _, rest = text.replace("\n", " ").partition(". ")
        assert all(slots[k] in first for k in f.fields), text                       # the operands come first
        if family != "repeat_word":                                # its explanation ends before the answer
            assert f" {slots['answer']}" in f" {rest}".replace(", then ", " "), text  # the true answer after
        assert world.parse_instruction(text) is None
