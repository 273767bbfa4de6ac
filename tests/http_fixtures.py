"""A real HTTP server on 127.0.0.1 for the tests and the bench, speaking both chat dialects.

    POST /v1/chat/completions   OpenAI-compatible Chat Completions
    POST /v1/messages           Anthropic Messages

Each request is checked against its dialect's contract (a request that breaks it gets a 400, so a client bug
fails the test), recorded in `server.requests`, then answered by `answer(system, messages) -> str`. Faults are
queued with `inject(...)`; each request takes the next one:

    ("status", code, retry_after)   an error reply in the dialect's shape, Retry-After sent when not None
    ("slow", seconds)               sleep, then answer (a client with a shorter timeout has gone by then)
    ("malformed",)                  200 with a body that is not JSON
    ("drop",)                       close the connection without replying

Token usage is counted in words, so a test can derive the expected totals itself:
prompt tokens = words in the system message and every message, completion tokens = words in the answer.
"""

from __future__ import annotations

import json
import threading
import time
from collections import deque
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def echo(system: str, messages: list[dict]) -> str:
    return "echo: " + messages[-1]["content"]


def words(text: str) -> int:
    return len(text.split())


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as real servers do: the client reuses its connections
    disable_nagle_algorithm = True  # headers and body go out in two writes; without this, delayed ACK adds 40 ms

    def log_message(self, *args):  # quiet: the tests read assertions, not access logs
        pass

    def do_POST(self):
        server: FakeChatServer = self.server.chat
        raw = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        fault = server._next_fault()
        with server.lock:
            server.in_flight += 1
            server.max_in_flight = max(server.max_in_flight, server.in_flight)
        try:
            self._serve(server, raw, fault)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client timed out and left; nothing to do
        finally:
            with server.lock:
                server.in_flight -= 1

    def _serve(self, server, raw, fault):
        dialect = {"/v1/chat/completions": "openai", "/v1/messages": "anthropic"}.get(self.path)
        try:
            body = json.loads(raw)
        except ValueError:
            body = None
        with server.lock:
            server.requests.append({"path": self.path, "headers": dict(self.headers), "body": body})
        if dialect is None:
            return self._reply(404, {"error": {"message": f"no route {self.path}"}})
        problem = _contract_problem(dialect, self.headers, body, server.api_key)
        if problem:
            status = 401 if "key" in problem else 400
            return self._reply(status, _error(dialect, problem))

        if fault and fault[0] == "drop":
            self.close_connection = True
            return
        if fault and fault[0] == "status":
            _, code, retry_after = fault
            headers = {} if retry_after is None else {"Retry-After": str(retry_after)}
            return self._reply(code, _error(dialect, f"injected {code}"), headers)
        if fault and fault[0] == "malformed":
            return self._send(200, b'{"choices": [{"message": {"content": "trunc')
        if fault and fault[0] == "slow":
            time.sleep(fault[1])
        if server.delay:
            time.sleep(server.delay)

        system = body.get("system", "") if dialect == "anthropic" else ""
        messages = body["messages"]
        if dialect == "openai" and messages[0]["role"] == "system":
            system, messages = messages[0]["content"], messages[1:]
        text = server.answer(system, messages)
        prompt_tokens = words(system) + sum(words(m["content"]) for m in messages)
        if dialect == "openai":
            reply = {"id": "chatcmpl-test", "object": "chat.completion", "model": body["model"],
                     "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                                  "finish_reason": "stop"}],
                     "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": words(text),
                               "total_tokens": prompt_tokens + words(text)}}
        else:
            reply = {"id": "msg_test", "type": "message", "role": "assistant", "model": body["model"],
                     "content": [{"type": "text", "text": text}], "stop_reason": "end_turn",
                     "usage": {"input_tokens": prompt_tokens, "output_tokens": words(text)}}
        self._reply(200, reply)

    def _reply(self, status, obj, headers=None):
        self._send(status, json.dumps(obj).encode(), headers)

    def _send(self, status, data, headers=None):
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data)


def _error(dialect, message):
    if dialect == "anthropic":
        return {"type": "error", "error": {"type": "api_error", "message": message}}
    return {"error": {"message": message, "type": "server_error"}}


def _contract_problem(dialect, headers, body, api_key):
    """What the request gets wrong for its dialect, or None."""
    if not isinstance(body, dict):
        return "body is not a JSON object"
    if not isinstance(body.get("model"), str) or not isinstance(body.get("messages"), list) or not body["messages"]:
        return "model (string) and messages (non-empty list) are required"
    if dialect == "openai":
        if api_key is not None and headers.get("Authorization") != f"Bearer {api_key}":
            return "wrong or missing key"
        roles = [m.get("role") for m in body["messages"]]
        if any(r not in ("system", "user", "assistant") for r in roles) or "system" in roles[1:]:
            return f"bad roles {roles}"
    else:
        if api_key is not None and headers.get("x-api-key") != api_key:
            return "wrong or missing key"
        if headers.get("anthropic-version") != "2023-06-01":
            return "anthropic-version header missing"
        if not isinstance(body.get("max_tokens"), int):
            return "max_tokens is required"
        roles = [m.get("role") for m in body["messages"]]
        if roles[0] != "user" or any(r not in ("user", "assistant") for r in roles):
            return f"bad roles {roles}: system goes top-level, messages start with user"
    if any(not isinstance(m.get("content"), str) for m in body["messages"]):
        return "message content must be a string"
    return None


class FakeChatServer:
    """with FakeChatServer(answer) as server: ... server.openai_url / server.anthropic_url"""

    def __init__(self, answer=echo, delay: float = 0.0, api_key: str | None = None):
        self.answer = answer
        self.delay = delay  # seconds before every answer (the bench's 200 ms server)
        self.api_key = api_key  # when set, requests without it get a 401
        self.lock = threading.Lock()
        self.faults: deque = deque()
        self.requests: list[dict] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self.httpd.daemon_threads = True
        self.httpd.block_on_close = False  # a handler still sleeping on a "slow" fault must not hold up close
        self.httpd.chat = self
        self.port = self.httpd.server_address[1]
        self.openai_url = f"http://127.0.0.1:{self.port}/v1"
        self.anthropic_url = f"http://127.0.0.1:{self.port}"
        self._thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                        daemon=True)

    def inject(self, *faults):
        with self.lock:
            self.faults.extend(faults)

    def _next_fault(self):
        with self.lock:
            return self.faults.popleft() if self.faults else None

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()
        self._thread.join(timeout=5)


def unused_port() -> int:
    """A port on 127.0.0.1 that nothing listens on (bound, then released)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
