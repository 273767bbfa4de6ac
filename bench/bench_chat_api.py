"""chat_api.py: throughput against a local server that answers after 200 ms, and the client's own cost.

    python bench/bench_chat_api.py [--delay 0.2] [--waves 8]

Throughput: for each concurrency c in 1, 2, 4, 8, 16, send waves·c requests through map_unordered, the pool
generate.py and filter.py use. The ideal is c / delay requests per second; efficiency = measured / ideal.
Overhead: the calling thread's CPU time per request (time.thread_time counts only time spent running, not
time blocked on the socket) over sequential requests to a server that answers at once, median of 5 runs;
the wall-clock per request there is reported too (it includes the server's own work).
The server is tests/http_fixtures.py's, on 127.0.0.1 in a child process (its own interpreter, as a real server
would be), so its Python work neither shares this process's GIL nor counts as the client's.
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


def throughput(delay: float, concurrency: int, waves: int) -> dict:
    with server_process(delay) as url:
        client = ChatClient(url, "bench", timeout=30)
        list(map_unordered(lambda i: client.chat([{"role": "user", "content": "warm"}]), range(concurrency),
                           concurrency))  # open each thread's connection before timing
        n = waves * concurrency
        start = time.perf_counter()
        results = list(map_unordered(lambda i: client.chat([{"role": "user", "content": f"q{i}"}]), range(n),
                                     concurrency))
        seconds = time.perf_counter() - start
        client.close()
    assert all(error is None for _, _, error in results)
    rate, ideal = n / seconds, concurrency / delay
    return {"concurrency": concurrency, "requests": n, "seconds": seconds, "req_per_s": rate, "ideal": ideal,
            "efficiency": rate / ideal}


def overhead(requests: int = 300, repeats: int = 5) -> dict:
    with server_process(0.0) as url:
        client = ChatClient(url, "bench", timeout=30)
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

    rows = [throughput(args.delay, c, args.waves) for c in (1, 2, 4, 8, 16)]
    print(f"server delay {args.delay * 1e3:.0f} ms, {args.waves} requests per slot")
    print(f"{'concurrency':>11} {'requests':>8} {'seconds':>8} {'req/s':>7} {'ideal':>7} {'efficiency':>10}")
    for r in rows:
        print(f"{r['concurrency']:>11} {r['requests']:>8} {r['seconds']:>8.2f} {r['req_per_s']:>7.2f} "
              f"{r['ideal']:>7.2f} {r['efficiency']:>10.3f}")
    cost = overhead()
    print(f"client overhead: {cost['client_cpu_ms_per_request']:.3f} ms CPU per request "
          f"(wall {cost['wall_ms_per_request']:.3f} ms per request against a server that answers at once)")
    scaling, own = min(r["efficiency"] for r in rows), cost["client_cpu_ms_per_request"]
    print(f"targets (issue 7): efficiency up to 16 ≥ 0.9: {scaling:.3f} {'met' if scaling >= 0.9 else 'NOT met'}; "
          f"client overhead < 1 ms: {own:.3f} ms {'met' if own < 1 else 'NOT met'}")

    out = ROOT / "bench" / "out" / "chat_api.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": platform.platform(), "python": platform.python_version(),
                               "delay_s": args.delay, "throughput": rows, **cost}, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
