"""One small client for the two chat APIs that generate.py, filter.py and evaluate.py's judge talk to.

OpenAI-compatible Chat Completions (OpenAI, vLLM, TGI, llama.cpp's server, SGLang):
    POST {base_url}/chat/completions       base_url ends in /v1, as OPENAI_BASE_URL does
    Authorization: Bearer {key}            (no header without a key: local servers need none)
    {"model", "messages": [{"role": "system" | "user" | "assistant", "content"}], "max_tokens", "temperature"}
    → choices[0].message.content           usage.prompt_tokens, usage.completion_tokens

Anthropic Messages:
    POST {base_url}/v1/messages            base_url as ANTHROPIC_BASE_URL: https://api.anthropic.com
    x-api-key: {key}, anthropic-version: 2023-06-01
    {"model", "system", "messages": [{"role": "user" | "assistant", "content"}], "max_tokens", "temperature"}
    → the "text" blocks of content         usage.input_tokens, usage.output_tokens
    (system is top-level, never a message; max_tokens is required)

Retries are urllib3's `Retry`, mounted on each requests session; everything asked of them fits there:
    status_forcelist   429 and 500–599, so Anthropic's 529 "overloaded" too;
    allowed_methods    {"POST"}: urllib3 retries only idempotent methods by default. A chat request changes
                       no state on the server; sending it twice costs at most its tokens twice;
    total              one budget for everything: refused or failed connections, read timeouts, dropped
                       connections and retried statuses all count against it;
    Retry-After        respect_retry_after_header: on a retried status, the server's delay replaces the
                       backoff. urllib3 reads what RFC 9110 allows, whole seconds or an HTTP date; a
                       fractional value ("0.5") makes that request fail rather than retry;
    backoff            before retry n: 0 for n = 1 (urllib3 retries the first failure at once), then
                       backoff_factor · 2^(n−1) + U(0, backoff_jitter), capped at backoff_max;
    raise_on_status    False: when retries run out we get the last reply and report the server's message.
What Retry cannot see is the body: a 200 whose JSON is malformed is a failure here, not a retry (generate.py
and filter.py redo failed items when re-run).

The key lives only in the request headers: never printed, logged, or written out; repr shows key=set|none.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import threading
import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass

import requests
from requests.adapters import HTTPAdapter
from tqdm import tqdm
from urllib3.exceptions import MaxRetryError
from urllib3.util.retry import Retry

RETRY_STATUSES = frozenset([429, *range(500, 600)])  # 529: Anthropic "overloaded"
FATAL_STATUSES = frozenset([401, 403, 404])  # wrong key, no access, wrong URL or model: every request would fail
DEFAULT_URL = {"openai": "https://api.openai.com/v1", "anthropic": "https://api.anthropic.com"}
ANTHROPIC_VERSION = "2023-06-01"


class ChatAPIError(Exception):
    """A chat request that failed for good (after retries). `status` is the HTTP status, None without one."""

    def __init__(self, message: str, status: int | None = None, retries: int = 0):
        super().__init__(message)
        self.status, self.retries = status, retries

    @property
    def fatal(self) -> bool:
        return self.status in FATAL_STATUSES


@dataclass
class Usage:
    requests: int = 0  # chat() calls
    retries: int = 0  # extra HTTP attempts made by urllib3's Retry
    failures: int = 0  # chat() calls that raised ChatAPIError
    prompt_tokens: int = 0  # OpenAI usage.prompt_tokens, Anthropic usage.input_tokens
    completion_tokens: int = 0  # OpenAI usage.completion_tokens, Anthropic usage.output_tokens


class ChatClient:
    def __init__(self, base_url: str, model: str, api: str = "openai", api_key: str | None = None, *,
                 timeout: float = 300.0, max_retries: int = 6, backoff_factor: float = 1.0,
                 backoff_jitter: float | None = None, backoff_max: float = 60.0, max_tokens: int = 1024,
                 temperature: float = 0.7, name: str = "chat"):
        if api not in ("openai", "anthropic"):
            raise ValueError(f"{name}: api must be 'openai' or 'anthropic', got {api!r}")
        self.name, self.api, self.model = name, api, model
        self.url = base_url.rstrip("/") + ("/chat/completions" if api == "openai" else "/v1/messages")
        self.timeout, self.max_retries = timeout, max_retries
        self.max_tokens, self.temperature = max_tokens, temperature
        self._headers = {"Content-Type": "application/json"}
        if api == "anthropic":
            self._headers["anthropic-version"] = ANTHROPIC_VERSION
            if api_key:
                self._headers["x-api-key"] = api_key
        elif api_key:
            self._headers["Authorization"] = f"Bearer {api_key}"
        self._has_key = bool(api_key)
        self.retry = Retry(
            total=max_retries, connect=None, read=None, status=None, other=None, redirect=0,
            allowed_methods=frozenset(["POST"]), status_forcelist=RETRY_STATUSES,
            backoff_factor=backoff_factor,
            backoff_jitter=backoff_factor if backoff_jitter is None else backoff_jitter,
            backoff_max=backoff_max, respect_retry_after_header=True, raise_on_status=False)
        # requests does not promise that one Session is safe to share between threads, so each pool thread
        # gets its own (and its own keep-alive connection).
        self._local = threading.local()
        self._sessions: list[requests.Session] = []
        self._lock = threading.Lock()
        self.usage = Usage()
        self.started = time.perf_counter()

    def __repr__(self) -> str:
        return (f"{self.name}: api={self.api} url={self.url} model={self.model} "
                f"key={'set' if self._has_key else 'none'}")

    def _session(self) -> requests.Session:
        session = getattr(self._local, "session", None)
        if session is None:
            session = requests.Session()
            session.headers.update(self._headers)
            adapter = HTTPAdapter(max_retries=self.retry, pool_connections=1, pool_maxsize=1)
            session.mount("http://", adapter)
            session.mount("https://", adapter)
            self._local.session = session
            with self._lock:
                self._sessions.append(session)
        return session

    def chat(self, messages: list[dict], system: str = "", max_tokens: int | None = None,
             temperature: float | None = None) -> str:
        """messages: [{"role": "user" | "assistant", "content": str}, ...], starting with user. Returns the text."""
        max_tokens = self.max_tokens if max_tokens is None else max_tokens
        temperature = self.temperature if temperature is None else temperature
        if self.api == "openai":
            system_message = [{"role": "system", "content": system}] if system else []
            body = {"model": self.model, "messages": system_message + messages,
                    "max_tokens": max_tokens, "temperature": temperature}
        else:
            body = {"model": self.model, "messages": messages, "max_tokens": max_tokens,
                    "temperature": temperature}
            if system:
                body["system"] = system
        with self._lock:
            self.usage.requests += 1
        try:
            text, prompt_tokens, completion_tokens, retries = self._post(body)
        except ChatAPIError as err:
            with self._lock:
                self.usage.failures += 1
                self.usage.retries += err.retries
            raise
        with self._lock:
            self.usage.retries += retries
            self.usage.prompt_tokens += prompt_tokens
            self.usage.completion_tokens += completion_tokens
        return text

    def _post(self, body: dict) -> tuple[str, int, int, int]:
        try:
            response = self._session().post(self.url, json=body, timeout=self.timeout)
            raw = response.content
        except requests.RequestException as err:
            # Retry raises MaxRetryError only once `total` is spent: then all max_retries were made.
            exhausted = any(isinstance(a, MaxRetryError) for a in err.args)
            retries = self.max_retries if exhausted else 0
            raise ChatAPIError(f"{self.name}: {self.url} failed after {retries} retries: "
                               f"{type(err).__name__}: {_reason(err)}", retries=retries) from None
        history = getattr(response.raw, "retries", None)
        retries = len(history.history) if history is not None else 0
        if not 200 <= response.status_code < 300:
            raise ChatAPIError(f"{self.name}: HTTP {response.status_code} from {self.url} after {retries} "
                               f"retries: {_server_message(raw)}", status=response.status_code, retries=retries)
        try:
            data = response.json()
            if self.api == "openai":
                text = data["choices"][0]["message"]["content"]
                usage = data.get("usage") or {}
                prompt_tokens, completion_tokens = usage.get("prompt_tokens", 0), usage.get("completion_tokens", 0)
            else:
                text = "".join(block["text"] for block in data["content"] if block.get("type") == "text")
                usage = data.get("usage") or {}
                prompt_tokens, completion_tokens = usage.get("input_tokens", 0), usage.get("output_tokens", 0)
            if not isinstance(text, str):
                raise TypeError(f"text is {type(text).__name__}")
        except (ValueError, KeyError, IndexError, TypeError, AttributeError) as err:
            raise ChatAPIError(f"{self.name}: malformed reply from {self.url} ({type(err).__name__}: {err}); "
                               f"body starts {raw[:120]!r}", retries=retries) from None
        return text, int(prompt_tokens or 0), int(completion_tokens or 0), retries

    def summary(self) -> str:
        u, seconds = self.usage, time.perf_counter() - self.started
        return (f"{self.name}: {u.requests} requests, {u.retries} retries, {u.failures} failed, "
                f"tokens prompt={u.prompt_tokens} completion={u.completion_tokens}, "
                f"{seconds:.1f}s, {u.requests / max(seconds, 1e-9):.2f} req/s")

    def close(self):
        with self._lock:
            for session in self._sessions:
                session.close()
            self._sessions.clear()


def _reason(err: Exception) -> str:
    """The innermost cause of a requests error, in one line (URLs yes, headers never)."""
    cause = err.args[0] if err.args else err
    cause = getattr(cause, "reason", cause)
    return str(cause).splitlines()[0][:300] if str(cause) else type(cause).__name__


def _server_message(raw: bytes) -> str:
    """The error message in OpenAI's {"error": {"message"}}, Anthropic's {"type": "error", "error": {...}} or
    vLLM's {"message"} shape; else the start of the body."""
    try:
        data = json.loads(raw)
        error = data.get("error", data)
        message = error.get("message") if isinstance(error, dict) else error
        if message:
            return str(message)[:300]
    except (ValueError, AttributeError):
        pass
    return repr(raw[:200])


def map_unordered(fn, items, concurrency: int):
    """Yield (item, result, error) as calls fn(item) finish, in completion order; error is None on success.

    A bounded pool: `concurrency` threads, and never more than `concurrency` items taken from `items` and not
    yet handed back, so a long job list is read lazily. An exception raised by fn comes back as `error`, so
    one failed request does not stop the others; the caller decides what is fatal."""
    pool = ThreadPoolExecutor(max_workers=concurrency)
    running = {}
    items = iter(items)
    try:
        while True:
            for item in itertools.islice(items, concurrency - len(running)):
                running[pool.submit(fn, item)] = item
            if not running:
                return
            done, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in done:
                item = running.pop(future)
                error = future.exception()
                yield item, (None if error else future.result()), error
    finally:
        pool.shutdown(wait=False, cancel_futures=True)


def completed_jobs(work, jobs: list, concurrency: int, counts, max_failures: int, *, name: str, unit: str,
                   endpoint: str, noun: str = "requests", failures=(ChatAPIError,), failed: str = "failed",
                   describe=lambda job: job["id"], progress: bool = True):
    """Yield (job, result) for each job whose work(job) succeeded, as they finish (map_unordered), under a
    progress bar `name` on stderr: the bookkeeping that generate.py's passes, filter.py's ratings and MT-Bench's
    judgments share. A failed job is never yielded:
        a fatal ChatAPIError (401, 403, 404)   SystemExit "{name}: {error}": wrong key, URL or model, so every
                                               other job would fail too
        an error not in `failures`             raised as it is: a bug, not a bad reply
        any other                              counts[failed] += 1 (counts: a Counter); the first 10 are printed,
                                               "{name}: {describe(job)} failed: {error}"; at max_failures the run
                                               stops: "{name}: N {noun} failed (--max-failures); is the {endpoint} up?"
    A re-run of the script redoes the failed jobs."""
    bar = tqdm(total=len(jobs), desc=name, unit=unit, dynamic_ncols=True, disable=not progress)
    try:
        for job, result, error in map_unordered(work, jobs, concurrency):
            bar.update()
            if error is None:
                yield job, result
                continue
            if isinstance(error, ChatAPIError) and error.fatal:
                raise SystemExit(f"{name}: {error}")
            if not isinstance(error, failures):
                raise error
            counts[failed] += 1
            if counts[failed] <= 10:
                tqdm.write(f"{name}: {describe(job)} failed: {error}")
            if counts[failed] >= max_failures:
                raise SystemExit(f"{name}: {counts[failed]} {noun} failed (--max-failures); is the {endpoint} up?")
    finally:
        bar.close()


# --- endpoints from flags and environment ------------------------------------------------------------

def add_endpoint_args(parser: argparse.ArgumentParser, role: str, temperature: float):
    """--{role}-url/-model/-api/-api-key plus the transport flags. role: "generator" or "judge"."""
    env = role.upper()
    g = parser.add_argument_group(f"{role} endpoint (flags beat {env}_* variables, which beat OPENAI_*/ANTHROPIC_*)")
    g.add_argument(f"--{role}-url", help=f"base URL, e.g. http://127.0.0.1:8000/v1 (vLLM), http://127.0.0.1:8080/v1 "
                   f"(llama.cpp); default ${env}_URL, else OPENAI_BASE_URL or ANTHROPIC_BASE_URL, else the vendor's")
    g.add_argument(f"--{role}-model", help=f"model name the server knows; default ${env}_MODEL")
    g.add_argument(f"--{role}-api", choices=["openai", "anthropic"],
                   help=f"wire format: OpenAI-compatible Chat Completions or Anthropic Messages; default ${env}_API, "
                   "else openai")
    g.add_argument(f"--{role}-api-key", help=f"prefer ${env}_API_KEY: a flag is visible in ps and shell history. "
                   f"OPENAI_API_KEY / ANTHROPIC_API_KEY are used only with the vendor's own URL variable or default, "
                   f"so a key is never sent to a server it was not meant for")
    g.add_argument("--concurrency", type=int, default=8, help="requests in flight at once")
    g.add_argument("--timeout", type=float, default=300.0,
                   help="seconds to wait for a reply (a 40B model on CPU may need minutes)")
    g.add_argument("--max-retries", type=int, default=6, help="retries per request on 429/5xx/529/connection errors")
    g.add_argument("--backoff", type=float, default=1.0,
                   help="backoff factor: retry n waits backoff·2^(n-1) + U(0, backoff) s unless Retry-After says")
    g.add_argument("--max-tokens", type=int, default=1024, help="reply length limit (Anthropic requires one)")
    g.add_argument("--temperature", type=float, default=temperature)


def client_from_args(args: argparse.Namespace, role: str) -> ChatClient:
    env, environ = role.upper(), os.environ
    flag = lambda name: getattr(args, f"{role}_{name}")  # noqa: E731
    api = flag("api") or environ.get(f"{env}_API") or "openai"
    if api not in ("openai", "anthropic"):
        raise SystemExit(f"{role}: {env}_API must be openai or anthropic, got {api!r}")
    url = flag("url") or environ.get(f"{env}_URL")
    key = flag("api_key") or environ.get(f"{env}_API_KEY")
    if not url:  # the vendor's own variables, and with them the vendor's key
        vendor = "OPENAI" if api == "openai" else "ANTHROPIC"
        url = environ.get(f"{vendor}_BASE_URL") or DEFAULT_URL[api]
        key = key or environ.get(f"{vendor}_API_KEY")
    model = flag("model") or environ.get(f"{env}_MODEL")
    if not model:
        raise SystemExit(f"{role}: no model given: pass --{role}-model or set {env}_MODEL")
    if args.concurrency < 1 or args.max_retries < 0 or args.timeout <= 0:
        raise SystemExit(f"{role}: --concurrency ≥ 1, --max-retries ≥ 0 and --timeout > 0 expected")
    setattr(args, f"{role}_api_key", None)  # the key lives in the client only, so printing args cannot leak it
    return ChatClient(url, model, api, key, timeout=args.timeout, max_retries=args.max_retries,
                      backoff_factor=args.backoff, max_tokens=args.max_tokens, temperature=args.temperature,
                      name=role)
