"""chat_api.py against a real HTTP server on 127.0.0.1 (tests/http_fixtures.py), in both dialects, with
injected 429 + Retry-After, 5xx, Anthropic's 529, slow replies past the timeout, dropped connections, refused
connections and malformed JSON. Backoff factors are small so the whole file runs in a few seconds."""

import argparse
import logging
import time

import pytest

from chat_api import ChatAPIError, ChatClient, add_endpoint_args, client_from_args, map_unordered
from tests.http_fixtures import FakeChatServer, unused_port, words

KEY = "sk-test-DO-NOT-LEAK-7f3a9c"
USER = [{"role": "user", "content": "name three rivers"}]


def client(server, api="openai", **kw):
    url = server.openai_url if api == "openai" else server.anthropic_url
    kw = {"backoff_factor": 0.01, "timeout": 2.0, "max_retries": 3, **kw}
    return ChatClient(url, "test-model", api, KEY, **kw)


def test_openai_request_sends_system_first_bearer_key_and_returns_content_and_usage():
    with FakeChatServer(api_key=KEY) as server:
        c = client(server, max_tokens=77, temperature=0.3)
        assert c.chat(USER, system="be brief") == "echo: name three rivers"
        request = server.requests[0]
    assert request["path"] == "/v1/chat/completions"
    assert request["headers"]["Authorization"] == f"Bearer {KEY}"
    assert request["body"] == {"model": "test-model", "max_tokens": 77, "temperature": 0.3,
                               "messages": [{"role": "system", "content": "be brief"}] + USER}
    # the server counts words: prompt = "be brief" + "name three rivers", completion = the echo
    assert (c.usage.prompt_tokens, c.usage.completion_tokens) == (2 + 3, words("echo: name three rivers"))
    assert (c.usage.requests, c.usage.retries, c.usage.failures) == (1, 0, 0)


def test_anthropic_request_puts_system_top_level_and_sends_key_and_version_headers():
    with FakeChatServer(api_key=KEY) as server:
        c = client(server, api="anthropic", max_tokens=55)
        assert c.chat(USER, system="be brief") == "echo: name three rivers"
        request = server.requests[0]
    assert request["path"] == "/v1/messages"
    assert request["headers"]["x-api-key"] == KEY and "Authorization" not in request["headers"]
    assert request["headers"]["anthropic-version"] == "2023-06-01"
    assert request["body"]["system"] == "be brief" and request["body"]["messages"] == USER
    assert request["body"]["max_tokens"] == 55
    assert (c.usage.prompt_tokens, c.usage.completion_tokens) == (5, 4)  # usage.input_tokens / output_tokens


def test_wrong_key_is_a_fatal_error_without_retries():
    with FakeChatServer(api_key="another-key") as server:
        with pytest.raises(ChatAPIError) as err:
            client(server).chat(USER)
        assert len(server.requests) == 1
    assert err.value.status == 401 and err.value.fatal


def test_429_waits_for_the_retry_after_the_server_asks_for():
    """Backoff alone would retry at once (urllib3 sleeps 0 before the first retry, factor 0.01 after),
    so an elapsed time ≥ 1 s can only come from honouring Retry-After: 1."""
    with FakeChatServer() as server:
        server.inject(("status", 429, 1))
        c = client(server)
        start = time.perf_counter()
        assert c.chat(USER) == "echo: name three rivers"
        elapsed = time.perf_counter() - start
        assert len(server.requests) == 2
    assert 1.0 <= elapsed < 2.0
    assert c.usage.retries == 1


def test_5xx_and_anthropics_529_are_retried():
    with FakeChatServer() as server:
        server.inject(("status", 500, None), ("status", 502, None), ("status", 503, None))
        openai = client(server)
        assert openai.chat(USER) == "echo: name three rivers"
        server.inject(("status", 529, None), ("status", 529, None))
        anthropic = client(server, api="anthropic")
        assert anthropic.chat(USER) == "echo: name three rivers"
        assert len(server.requests) == 4 + 3
    assert openai.usage.retries == 3 and anthropic.usage.retries == 2


def test_backoff_grows_exponentially_with_bounded_jitter():
    """Three 500s then success, factor 0.1, jitter 0.05: urllib3 sleeps 0 before retry 1, then
    0.1·2¹ + U(0, 0.05) and 0.1·2² + U(0, 0.05): between 0.6 s and 0.7 s in all, plus request time."""
    with FakeChatServer() as server:
        server.inject(*[("status", 500, None)] * 3)
        c = client(server, backoff_factor=0.1, backoff_jitter=0.05)
        start = time.perf_counter()
        c.chat(USER)
        elapsed = time.perf_counter() - start
    assert 0.6 <= elapsed < 0.7 + 0.25


def test_retries_run_out_into_an_error_naming_status_and_server_message():
    with FakeChatServer() as server:
        server.inject(*[("status", 503, None)] * 10)
        c = client(server, max_retries=2)
        with pytest.raises(ChatAPIError, match=r"HTTP 503 .* after 2 retries: injected 503") as err:
            c.chat(USER)
        assert len(server.requests) == 3
    assert err.value.status == 503 and not err.value.fatal
    assert (c.usage.requests, c.usage.retries, c.usage.failures) == (1, 2, 1)


def test_other_4xx_is_not_retried():
    with FakeChatServer() as server:
        server.inject(("status", 400, None))
        with pytest.raises(ChatAPIError, match="HTTP 400"):
            client(server).chat(USER)
        assert len(server.requests) == 1


def test_reply_slower_than_the_timeout_is_retried():
    with FakeChatServer() as server:
        server.inject(("slow", 1.5))
        c = client(server, timeout=0.3)
        start = time.perf_counter()
        assert c.chat(USER) == "echo: name three rivers"
        assert time.perf_counter() - start < 1.0  # did not wait for the slow reply
    assert c.usage.retries == 1


def test_replies_always_slower_than_the_timeout_fail_in_bounded_time():
    with FakeChatServer() as server:
        server.inject(*[("slow", 1.5)] * 3)
        c = client(server, timeout=0.2, max_retries=1)
        start = time.perf_counter()
        with pytest.raises(ChatAPIError, match="after 1 retries: .*[Tt]imed? ?out"):
            c.chat(USER)
        assert time.perf_counter() - start < 1.0  # two attempts of 0.2 s, not 1.5 s
    assert (c.usage.retries, c.usage.failures) == (1, 1)


def test_dropped_connection_is_retried():
    with FakeChatServer() as server:
        server.inject(("drop",))
        c = client(server)
        assert c.chat(USER) == "echo: name three rivers"
    assert c.usage.retries == 1


def test_refused_connection_is_retried_then_reported():
    c = ChatClient(f"http://127.0.0.1:{unused_port()}/v1", "m", max_retries=2, backoff_factor=0.01)
    with pytest.raises(ChatAPIError, match="after 2 retries: .*refused"):
        c.chat(USER)
    assert (c.usage.retries, c.usage.failures) == (2, 1)


def test_malformed_json_is_a_failure_that_names_the_url_not_a_crash():
    with FakeChatServer() as server:
        server.inject(("malformed",))
        c = client(server)
        with pytest.raises(ChatAPIError, match=r"malformed reply from http://127\.0\.0\.1:\d+/v1/chat/completions"):
            c.chat(USER)
        assert c.chat(USER) == "echo: name three rivers"  # the client is fine afterwards
    assert (c.usage.requests, c.usage.failures) == (2, 1)


def test_key_never_appears_in_errors_summary_repr_or_logs(caplog, capsys):
    caplog.set_level(logging.DEBUG)
    with FakeChatServer() as server:
        server.inject(*[("status", 500, None)] * 10, ("malformed",))
        c = client(server, max_retries=1)
        errors = []
        for _ in range(2):
            try:
                c.chat(USER)
            except ChatAPIError as err:
                errors.append(str(err))
        print(c.summary(), repr(c), c.retry)
    text = "\n".join(errors) + capsys.readouterr().out + caplog.text
    assert "HTTP 500" in text and "key=set" in text  # the things we looked at were there
    assert KEY not in text


def test_pool_keeps_exactly_concurrency_requests_in_flight_and_returns_errors():
    """12 requests of 0.2 s at concurrency 4 take 3 waves, ≈ 0.6 s; one at a time would take 2.4 s."""
    with FakeChatServer(delay=0.2) as server:
        c = client(server)

        def ask(i):
            if i == 5:
                raise ValueError("bad item")
            return c.chat([{"role": "user", "content": f"q{i}"}])

        start = time.perf_counter()
        results = list(map_unordered(ask, range(12), concurrency=4))
        elapsed = time.perf_counter() - start
        assert server.max_in_flight == 4
    assert sorted(item for item, _, _ in results) == list(range(12))
    assert {item: result for item, result, error in results if error is None} == \
        {i: f"echo: q{i}" for i in range(12) if i != 5}
    assert [(item, str(error)) for item, _, error in results if error is not None] == [(5, "bad item")]
    assert elapsed < 1.2


def test_pool_reads_a_long_job_list_lazily():
    taken = []

    def jobs():
        for i in range(1000):
            taken.append(i)
            yield i

    stream = map_unordered(lambda i: i, jobs(), concurrency=3)
    next(stream)
    stream.close()
    assert len(taken) <= 3 + 3  # at most one window refilled, never the whole list


# --- endpoints from flags and environment ---------------------------------------------------------

ENV = ["GENERATOR_URL", "GENERATOR_MODEL", "GENERATOR_API", "GENERATOR_API_KEY", "JUDGE_URL", "JUDGE_MODEL",
       "JUDGE_API", "JUDGE_API_KEY", "OPENAI_BASE_URL", "OPENAI_API_KEY", "ANTHROPIC_BASE_URL", "ANTHROPIC_API_KEY"]


def resolve(monkeypatch, env, argv=(), role="generator"):
    for name in ENV:
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    parser = argparse.ArgumentParser()
    add_endpoint_args(parser, role, temperature=0.5)
    args = parser.parse_args(list(argv))
    c = client_from_args(args, role)
    assert getattr(args, f"{role}_api_key") is None  # printing args afterwards cannot show a key
    return c


def test_endpoint_comes_from_role_variables_and_a_vendor_key_is_not_sent_to_them(monkeypatch):
    c = resolve(monkeypatch, {"GENERATOR_URL": "http://127.0.0.1:8000/v1", "GENERATOR_MODEL": "falcon",
                              "OPENAI_API_KEY": KEY})
    assert (c.url, c.model, c.api) == ("http://127.0.0.1:8000/v1/chat/completions", "falcon", "openai")
    assert "Authorization" not in c._headers  # OPENAI_API_KEY belongs with OPENAI_BASE_URL, not GENERATOR_URL


def test_endpoint_falls_back_to_the_vendor_variables_with_their_key(monkeypatch):
    c = resolve(monkeypatch, {"OPENAI_BASE_URL": "http://127.0.0.1:9/v1", "OPENAI_API_KEY": KEY,
                              "GENERATOR_MODEL": "gpt"})
    assert c.url == "http://127.0.0.1:9/v1/chat/completions" and c._headers["Authorization"] == f"Bearer {KEY}"
    c = resolve(monkeypatch, {"JUDGE_API": "anthropic", "JUDGE_MODEL": "claude", "ANTHROPIC_API_KEY": KEY,
                              "GENERATOR_MODEL": "not-me"}, role="judge")
    assert (c.url, c.model) == ("https://api.anthropic.com/v1/messages", "claude")
    assert c._headers["x-api-key"] == KEY


def test_flags_beat_environment_and_a_missing_model_is_named(monkeypatch):
    c = resolve(monkeypatch, {"GENERATOR_URL": "http://env/v1", "GENERATOR_MODEL": "env-model",
                              "GENERATOR_API_KEY": "env-key"},
                ["--generator-url", "http://flag/v1", "--generator-model", "flag-model", "--generator-api-key",
                 KEY, "--concurrency", "3", "--timeout", "9"])
    assert (c.url, c.model, c._headers["Authorization"], c.timeout) == \
        ("http://flag/v1/chat/completions", "flag-model", f"Bearer {KEY}", 9.0)
    assert c.temperature == 0.5  # the script's default for its role
    with pytest.raises(SystemExit, match="--judge-model or set JUDGE_MODEL"):
        resolve(monkeypatch, {"GENERATOR_MODEL": "x"}, role="judge")
