"""The toy teacher and the toy judge: stand-ins for the generator and judge LLMs of the embedded default.

They are NOT language models. Each is a real HTTP server on 127.0.0.1 speaking the OpenAI Chat Completions API
(POST /v1/chat/completions; GET /v1/models), so generate.py and filter.py talk to them exactly as they talk to
vLLM, llama.cpp or OpenAI. Behind the API sits the toy world of toy/world.py: a prompt is read with the project's
own prompt files (synth/prompts/*.txt, each turned into a pattern whose {slots} are groups), the toy task inside
it is found with world.parse_instruction, and the reply is computed.

Teacher (model "toy-teacher"), per prompt kind:
    lamini_example_guided / _topic_guided   a numbered list of {count} new toy instructions (train split, no
                                            input form), of the families of the examples shown / of the topics
    evol_in_depth / evol_in_breadth         world.evolve with the operation whose method the prompt names: the
                                            first of 8 draws that brings 3 new words (the eliminator's test),
                                            else the first other in-depth operation that does
    orca_task (+ system message)            world.reference_response in the style the system message asks for
    anything else                           a task to answer: world.reference_response(task)
An answer (the last three kinds) is deliberately wrong with probability `wrong_fraction` (default 0.25): the
final answer is replaced by world.make_wrong's. The draw is a hash of (seed, system, user message), so the same
prompt always gets the same reply (generate.py's resume relies on it), and each wrong answer is appended to the
side file `wrong_log` keyed by answer_key(system, user): the ground truth for the filter's precision and recall.

Judge (model "toy-judge"): reads judge.txt's sections, finds the task in [Instruction] + [Input] and checks the
[Response] with world.check: "Rating: 8-10" when its final answer is the task's, "Rating: 1-3" when not (the
number within the band is a hash of the prompt), "Rating: 1" for a task outside the toy world.

    python -m toy.llm inputs --out runs/data/toy         seeds.jsonl, topics.txt, flan.jsonl
    python -m toy.llm serve teacher --wrong-log runs/data/toy_teacher.wrong.jsonl
    python -m toy.llm serve judge                        prints "… listening on URL", serves until stdin closes
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import re
import string
import sys
import threading
from dataclasses import replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from files import write_jsonl_atomic, write_text_atomic
from synth import evol_instruct, orca
from synth.records import AppendLog
from toy import world

PROMPTS = Path(__file__).resolve().parents[1] / "synth" / "prompts"   # the wording generate.py and filter.py send
TOPICS = {"add": "adding numbers", "subtract": "subtracting numbers", "next_number": "counting up",
          "previous_number": "counting down", "larger": "comparing numbers", "sort_digits": "sorting digits",
          "reverse": "spelling words backwards", "uppercase": "capital letters", "next_letter": "the alphabet",
          "previous_letter": "the alphabet backwards", "count_letters": "counting letters",
          "repeat_word": "repeating words"}
NOT_TOY = "I cannot answer that: I only know the toy world's tasks."


def template_pattern(template: str) -> re.Pattern:
    """A prompt file as a regex matching the whole prompt: literal text exact, each {slot} a lazy group."""
    parts = [re.escape(literal) + (f"(?P<{name}>[\\s\\S]*?)" if name else "")
             for literal, name, _, _ in string.Formatter().parse(template)]
    return re.compile(r"\A" + "".join(parts) + r"\s*\Z")


PATTERNS = {name: template_pattern((PROMPTS / f"{name}.txt").read_text(encoding="utf-8"))
            for name in ("lamini_example_guided", "lamini_topic_guided", "evol_in_depth", "evol_in_breadth",
                         "orca_task", "judge")}
METHOD_NAMES = {method: name for name, method in evol_instruct.METHODS.items()}


def unit(*parts) -> float:
    """A number in [0, 1) fixed by the parts: the servers' only randomness, so replies repeat exactly."""
    return int(hashlib.sha256("\x00".join(map(str, parts)).encode()).hexdigest()[:13], 16) / 16**13


def answer_key(system: str, user: str) -> str:
    """The id of an answer request in the teacher's wrong log; pipeline.py recomputes it from a record."""
    return hashlib.sha256(f"{system}\x00{user}".encode()).hexdigest()[:20]


def _bullets(text: str) -> list[str]:
    return [line[2:].strip() for line in text.splitlines() if line.startswith("- ")]


# --- the teacher -------------------------------------------------------------------------------------

class Teacher:
    """teacher(system, messages) → reply text; the module docstring lists what it answers and how."""

    def __init__(self, wrong_fraction: float = 0.25, seed: int = 0, wrong_log: str | None = None):
        if not 0 <= wrong_fraction <= 1:
            raise ValueError(f"toy teacher: wrong_fraction must be in [0, 1], got {wrong_fraction}")
        self.wrong_fraction, self.seed = wrong_fraction, seed
        self.log = AppendLog(wrong_log) if wrong_log else None
        self.lock = threading.Lock()

    def __call__(self, system: str, messages: list[dict]) -> str:
        user = messages[-1]["content"]
        rng = random.Random(f"{self.seed}:{system}\x00{user}")
        for name in ("lamini_example_guided", "lamini_topic_guided"):
            match = PATTERNS[name].match(user)
            if match:
                return self.instructions(match, rng)
        match = PATTERNS["evol_in_depth"].match(user) or PATTERNS["evol_in_breadth"].match(user)
        if match:
            method = match.groupdict().get("method")
            return self.evolve(match["instruction"].strip(), METHOD_NAMES.get(method, "add_constraints")
                               if method is not None else "in_breadth", rng)
        match = PATTERNS["orca_task"].match(user)
        if match:
            return self.answer(system, user, match["inputs"].strip(), _orca_style(system), rng)
        return self.answer(system, user, user, None, rng)

    def instructions(self, match, rng) -> str:
        """LaMini: {count} new train-split toy instructions, of the families the examples or topics show."""
        count = int(match["count"])
        if "topics" in match.groupdict():
            families = [f for t in _bullets(match["topics"]) for f, topic in TOPICS.items() if topic == t]
        else:
            families = [t.family for t in map(world.parse_instruction, _bullets(match["examples"])) if t]
        families = sorted(set(families)) or sorted(world.FAMILIES)
        tasks = [world.sample_task(rng, "train", rng.choice(families), input_form=False) for _ in range(count)]
        return "\n".join(f"{i}. {t.instruction}" for i, t in enumerate(tasks, 1))

    def evolve(self, original: str, operation: str, rng) -> str:
        """Evol-Instruct: the original (instruction, then its input after a blank line) evolved by `operation`."""
        task = world.parse_instruction(original)
        if task is None:
            return original  # nothing the toy world can evolve: the eliminator drops it (no_information_gain)
        head, _, tail = original.partition("\n\n")
        task = replace(task, instruction=head, input=tail)
        # Up to 8 draws of the operation asked for, then the other in-depth ones (a rewording it already
        # holds adds nothing); complicate_input needs operands that are not input already.
        tries = [operation] * 8 + [op for op in world.EVOL_OPERATIONS if op != operation]
        for op in [op for op in tries if not (op == "complicate_input" and tail)]:
            new = world.evolve(task, op, rng)
            text = new.instruction + (f"\n\n{new.input}" if new.input else "")
            if evol_instruct.eliminate_instruction(text, original) is None:
                break
        return text

    def answer(self, system: str, user: str, task_text: str, style: str | None, rng) -> str:
        """The task's reference response; with probability wrong_fraction its final answer made wrong."""
        task = world.parse_instruction(task_text)
        if task is None:
            return NOT_TOY
        response = world.reference_response(replace(task, instruction=task_text), style)  # sees "show reasoning"
        if unit(self.seed, "wrong", system, user) >= self.wrong_fraction:
            return response
        wrong = world.make_wrong(task, rng)
        response = response[:len(response) - len(task.answer)] + wrong  # every reference ends with the answer
        if self.log is not None:
            key = answer_key(system, user)
            with self.lock:
                if key not in self.log.ids:
                    self.log.write({"id": key, "system": system, "user": user, "response": response,
                                    "gold": task.answer})
        return response


def _orca_style(system: str) -> str | None:
    """world.reference_response's style for one of orca_system_messages.txt's messages, read off its name."""
    name = next((n for n, text in orca.SYSTEM_MESSAGES if text == system), "")
    for keys, style in ((("brief",), "brief"), (("five_year_old",), "five_year_old"),
                        (("teacher", "definition"), "teacher"), (("step", "faithful"), "step_by_step")):
        if any(k in name for k in keys):
            return style
    return None if not system else "justify"


# --- the judge ---------------------------------------------------------------------------------------

def judge(system: str, messages: list[dict]) -> str:
    """A rating in judge.txt's form from the toy world's checker. A re-ask (judge_retry.txt) is answered from
    the first message, which holds the record."""
    prompt = messages[0]["content"]
    match = PATTERNS["judge"].match(prompt)
    if match is None:
        return "Rating: 1\nReason: I could not find the task and response sections in this prompt."
    text = match["instruction"] + (f"\n\n{match['input']}" if match["input"] != "(none)" else "")
    task = world.parse_instruction(text)
    if task is None:
        return "Rating: 1\nReason: This is not a toy-world task, so its answer cannot be checked."
    given, band = world.extract_answer(match["response"]), unit("judge", prompt)
    if world.check(task, match["response"]):
        return f"Rating: {8 + int(3 * band)}\nReason: The final answer {given!r} is correct."
    return f"Rating: {1 + int(3 * band)}\nReason: The final answer {given!r} is wrong; it should be {task.answer!r}."


# --- the HTTP server ---------------------------------------------------------------------------------

class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: the client reuses one connection per thread
    disable_nagle_algorithm = True

    def log_message(self, *args):
        pass

    def do_GET(self):
        if self.path != "/v1/models":
            return self._reply(404, {"error": {"message": f"no route GET {self.path}"}})
        self._reply(200, {"object": "list", "data": [{"id": self.server.model, "object": "model"}]})

    def do_POST(self):
        if self.path != "/v1/chat/completions":
            return self._reply(404, {"error": {"message": f"no route POST {self.path}; try /v1/chat/completions"}})
        try:
            body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
            messages = body["messages"]
            if not messages or any(not isinstance(m.get("content"), str) for m in messages):
                raise ValueError("messages must be a non-empty list of {role, content: string}")
        except (ValueError, KeyError, TypeError, AttributeError) as err:
            return self._reply(400, {"error": {"message": f"bad request: {err}", "type": "invalid_request_error"}})
        system = messages[0]["content"] if messages[0].get("role") == "system" else ""
        messages = messages[1:] if messages[0].get("role") == "system" else messages
        try:
            text = self.server.answer(system, messages)
        except Exception as err:  # a bug in the stand-in: say so in the reply (the client reports it)
            return self._reply(500, {"error": {"message": f"{type(err).__name__}: {err}", "type": "server_error"}})
        prompt_words = sum(len(m["content"].split()) for m in messages) + len(system.split())
        self._reply(200, {"id": "chatcmpl-toy", "object": "chat.completion", "model": self.server.model,
                          "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                                       "finish_reason": "stop"}],
                          "usage": {"prompt_tokens": prompt_words, "completion_tokens": len(text.split())}})

    def _reply(self, status: int, obj: dict):
        data = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


class ToyServer:
    """with ToyServer(answer, model) as server: server.url (ends in /v1, as GENERATOR_URL does)"""

    def __init__(self, answer, model: str, port: int = 0):
        self.httpd = ThreadingHTTPServer(("127.0.0.1", port), _Handler)
        self.httpd.daemon_threads = True
        self.httpd.answer, self.httpd.model = answer, model
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self._thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                        daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


# --- the toy world's inputs for generate.py ----------------------------------------------------------

def write_inputs(out: str, n_seeds: int = 1200, n_tasks: int = 4000, seed: int = 0) -> dict:
    """The toy world's versions of the real inputs, train split only (held-out tasks never reach the data):
        seeds.jsonl  databricks-dolly-15k's format; an input-form task's operands go in `context`
        topics.txt   one topic per family (TOPICS)
        flan.jsonl   the Flan fields orca reads; inputs = instruction, a blank line, input
    Same arguments, same files. Returns {"seeds", "topics", "tasks"} → path."""
    rng, folder = random.Random(f"toy-inputs-{seed}"), Path(out)
    seeds = [world.sample_task(rng, "train") for _ in range(n_seeds)]
    tasks = [world.sample_task(rng, "train") for _ in range(n_tasks)]
    paths = {"seeds": folder / "seeds.jsonl", "topics": folder / "topics.txt", "tasks": folder / "flan.jsonl"}
    write_jsonl_atomic(paths["seeds"], [{"instruction": t.instruction, "context": t.input, "response": t.answer,
                                         "category": t.family} for t in seeds])
    write_text_atomic(paths["topics"], "".join(f"{t}\n" for t in dict.fromkeys(TOPICS.values())))
    write_jsonl_atomic(paths["tasks"], [{"inputs": f"{t.instruction}\n\n{t.input}" if t.input else t.instruction,
                                         "targets": t.answer, "task_name": t.family, "template_type": "zs_noopt",
                                         "task_source": "toy"} for t in tasks])
    return {k: str(p) for k, p in paths.items()}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("serve", help="run the toy teacher or judge on 127.0.0.1 until stdin closes")
    s.add_argument("role", choices=["teacher", "judge"])
    s.add_argument("--port", type=int, default=0, help="0: any free port (the URL is printed)")
    s.add_argument("--wrong-fraction", type=float, default=0.25, help="teacher: share of answers made wrong")
    s.add_argument("--wrong-log", help="teacher: append each deliberately wrong answer here (JSONL)")
    s.add_argument("--seed", type=int, default=0)
    i = sub.add_parser("inputs", help="write the toy seeds, topics and Flan-style tasks")
    i.add_argument("--out", required=True, help="folder")
    i.add_argument("--seeds", type=int, default=1200)
    i.add_argument("--tasks", type=int, default=4000)
    i.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.command == "inputs":
        print(json.dumps(write_inputs(args.out, args.seeds, args.tasks, args.seed)))
        return
    answer = Teacher(args.wrong_fraction, args.seed, args.wrong_log) if args.role == "teacher" else judge
    with ToyServer(answer, f"toy-{args.role}", args.port) as server:
        print(f"toy {args.role} listening on {server.url}", flush=True)
        while sys.stdin.buffer.read1(65536):  # until the parent closes our stdin (or exits); ignore what it sends
            pass


if __name__ == "__main__":
    main()
