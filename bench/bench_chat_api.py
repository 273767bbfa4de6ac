"""chat_api.py: throughput against a local server that answers after 200 ms, and the client's own cost, next
to the OpenAI Python SDK (the peer: httpx underneath) in the same run.

    python bench/bench_chat_api.py [--delay 0.2] [--waves 8]

Throughput: for each concurrency c in 1, 2, 4, 8, 16, send waves·c requests through map_unordered, the pool
generate.py and filter.py use. The ideal is c / delay requests per second; efficiency = measured / ideal.
Overhead: the calling thread's CPU time per request (time.thread_time counts only time spent running, not
time blocked on the socket) over sequential requests to a server that answers at once, median of 5 runs;
the wall-clock per request there is reported too (it includes the server's own work). The peer runs the same
two measurements with one openai.OpenAI client (max_retries=0) shared by the pool's threads.
The server is tests/http_fixtures.py's, on 127.0.0.1 in a child process (its own interpreter, as a real server
would be), so its Python work neither shares this process's GIL nor counts as the client's.
Also reported: the machine's fp32/bf16 matmul rates (bench/machine.py) and this process's peak RSS.
Writes bench/out/chat_api.json.
"""

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script from anywhere

import openai  # noqa: E402  (bench-only peer, requirements-test.txt)

from chat_api import ChatClient, map_unordered  # noqa: E402
from tests.http_fixtures import FakeChatServer  # noqa: E402


def serve(delay: float):
    """Child process: print the server's URL, serve until the parent closes our stdin."""
    with FakeChatServer(delay=delay) as server:
        print(server.openai_url, flush=True)
        sys.stdin.read()


@contextmanager
def server_process(delay: float):
    child = subprocess.Popen([sys.executable, __file__, "--serve", str(delay)], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)
    try:
        yield child.stdout.readline().strip()
    finally:
        child.stdin.close()
        child.wait(timeout=10)


class PeerClient:
    """The OpenAI SDK behind ChatClient's chat(messages) → text, for the same measurements."""

    def __init__(self, url: str):
        self.client = openai.OpenAI(base_url=url, api_key="none", max_retries=0, timeout=30)

    def chat(self, messages):
        reply = self.client.chat.completions.create(model="bench", messages=messages, max_tokens=1024,
                                                    temperature=0.7)
        return reply.choices[0].message.content

    def close(self):
        self.client.close()


def make_client(kind: str, url: str):
    return ChatClient(url, "bench", timeout=30) if kind == "bezoar" else PeerClient(url)


def throughput(kind: str, delay: float, concurrency: int, waves: int) -> dict:
    with server_process(delay) as url:
        client = make_client(kind, url)
        list(map_unordered(lambda i: client.chat([{"role": "user", "content": "warm"}]), range(concurrency),
                           concurrency))  # open each thread's connection before timing
        n = waves * concurrency
        start = time.perf_counter()
        results = list(map_unordered(lambda i: client.chat([{"role": "user", "content": f"q{i}"}]), range(n),
                                     concurrency))
        seconds = time.perf_counter() - start
        client.close()
    assert all(error is None for _, _, error in results), [e for _, _, e in results if e][:1]
    rate, ideal = n / seconds, concurrency / delay
    return {"client": kind, "concurrency": concurrency, "requests": n, "seconds": seconds, "req_per_s": rate,
            "ideal": ideal, "efficiency": rate / ideal}


def overhead(kind: str, requests: int = 300, repeats: int = 5) -> dict:
    with server_process(0.0) as url:
        client = make_client(kind, url)
        message = [{"role": "user", "content": "How many legs does a spider have?"}]
        for _ in range(20):
            client.chat(message)
        cpu, wall = [], []
        for _ in range(repeats):
            c0, w0 = time.thread_time(), time.perf_counter()
            for _ in range(requests):
                client.chat(message)
            cpu.append((time.thread_time() - c0) / requests * 1e3)
            wall.append((time.perf_counter() - w0) / requests * 1e3)
        client.close()
    return {"client_cpu_ms_per_request": statistics.median(cpu), "wall_ms_per_request": statistics.median(wall)}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--delay", type=float, default=0.2, help="server reply delay, seconds")
    p.add_argument("--waves", type=int, default=8, help="requests per concurrency slot")
    p.add_argument("--serve", type=float, help=argparse.SUPPRESS)  # internal: run as the server child
    args = p.parse_args(argv)
    if args.serve is not None:
        return serve(args.serve)

    from bench.machine import describe, peak_rss_bytes  # here, not at the top: the server children skip torch
    machine = describe()
    print(machine)
    rows = {kind: [throughput(kind, args.delay, c, args.waves) for c in (1, 2, 4, 8, 16)]
            for kind in ("bezoar", "openai-sdk")}
    cost = {kind: overhead(kind) for kind in ("bezoar", "openai-sdk")}
    print(f"server delay {args.delay * 1e3:.0f} ms, {args.waves} requests per slot; peer: openai {openai.__version__}")
    print(f"{'concurrency':>11} {'requests':>8} {'ideal':>7} {'bezoar req/s':>12} {'efficiency':>10} "
          f"{'openai req/s':>12} {'efficiency':>10}")
    for ours, peer in zip(rows["bezoar"], rows["openai-sdk"]):
        print(f"{ours['concurrency']:>11} {ours['requests']:>8} {ours['ideal']:>7.2f} {ours['req_per_s']:>12.2f} "
              f"{ours['efficiency']:>10.3f} {peer['req_per_s']:>12.2f} {peer['efficiency']:>10.3f}")
    for kind, c in cost.items():
        print(f"client overhead {kind:10s}: {c['client_cpu_ms_per_request']:.3f} ms CPU per request "
              f"(wall {c['wall_ms_per_request']:.3f} ms per request against a server that answers at once)")
    ratio = cost["bezoar"]["client_cpu_ms_per_request"] / cost["openai-sdk"]["client_cpu_ms_per_request"]
    print(f"CPU per request, bezoar / openai SDK: {ratio:.2f}")
    scaling, own = min(r["efficiency"] for r in rows["bezoar"]), cost["bezoar"]["client_cpu_ms_per_request"]
    print(f"targets (issue 7): efficiency up to 16 ≥ 0.9: {scaling:.3f} {'met' if scaling >= 0.9 else 'NOT met'}; "
          f"client overhead < 1 ms: {own:.3f} ms {'met' if own < 1 else 'NOT met'}")
    rss = peak_rss_bytes()
    print(f"peak RSS {rss / 2**20:.0f} MiB")

    out = ROOT / "bench" / "out" / "chat_api.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": machine, "platform": platform.platform(),
                               "python": platform.python_version(), "openai": openai.__version__,
                               "delay_s": args.delay, "throughput": rows, "overhead": cost,
                               "cpu_ratio_vs_openai_sdk": ratio, "peak_rss_bytes": rss}, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
