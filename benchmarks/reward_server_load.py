"""Load test of the reward server: N concurrent clients x M requests of B pairs each.

    .venv/bin/python benchmarks/reward_server_load.py                          # the task source
    .venv/bin/python benchmarks/reward_server_load.py --hf RM_DIR              # a Hugging Face reward model
    .venv/bin/python benchmarks/reward_server_load.py --random-hf /tmp/rm --requests 8 --pairs 16  # a random 19M one
    .venv/bin/python benchmarks/reward_server_load.py --url http://HOST:PORT   # a server already running
    .venv/bin/python benchmarks/reward_server_load.py --clients 1,4,16 --requests 20 --pairs 64 \\
        --server-arg server.max_wait_ms=2

Per number of clients: throughput (pairs/s over the wall time), p50/p99 request latency, and
batching efficiency from the server's /health stats (pairs and requests per scoring call).
Clients are threads, each with its own keep-alive httpx.Client; when the script starts the
server, both share this machine's cores. Prints a table, writes JSON (--out).
"""

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time

import httpx

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from nemo_optune.data.sort_task import SortTask  # noqa: E402


def start_server(overrides: list[str]) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "nemo_optune.serve_reward", "server.port=0", *overrides],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    line = proc.stdout.readline()
    if not line.startswith("nemo_optune reward server listening on "):
        proc.kill()
        sys.exit(f"the server did not start (exit status {proc.wait()})")
    return proc, line.split()[-1]


def make_requests(count: int, pairs: int, seed: int) -> list[dict]:
    rng, task = random.Random(seed), SortTask()
    out = []
    for _ in range(count):
        prompts = [task.sample_prompt(rng) for _ in range(pairs)]
        out.append(
            {"prompts": prompts, "responses": ["".join(rng.sample(task.target(p), len(p) - 1)) for p in prompts]}
        )
    return out


def run_clients(url: str, headers: dict, clients: int, requests: int, pairs: int) -> dict:
    work = [make_requests(requests, pairs, seed=c) for c in range(clients)]
    latencies, errors = [], []
    start_line = threading.Barrier(clients + 1)

    def client(bodies: list[dict]):
        with httpx.Client(headers=headers, timeout=600) as http:
            start_line.wait()
            for body in bodies:
                start = time.perf_counter()
                answer = http.post(f"{url}/score", json=body)
                latencies.append(time.perf_counter() - start)
                if answer.status_code != 200:
                    errors.append(f"HTTP {answer.status_code}: {answer.text[:200]}")

    before = httpx.get(f"{url}/health").json()["stats"]
    threads = [threading.Thread(target=client, args=(bodies,)) for bodies in work]
    for t in threads:
        t.start()
    start_line.wait()
    start = time.perf_counter()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    after = httpx.get(f"{url}/health").json()["stats"]
    if errors:
        sys.exit(f"{len(errors)} requests failed, e.g. {errors[0]}")
    batches = max(after["batches"] - before["batches"], 1)
    latencies.sort()
    return {
        "clients": clients,
        "requests": clients * requests,
        "pairs_per_request": pairs,
        "wall_seconds": wall,
        "pairs_per_second": clients * requests * pairs / wall,
        "p50_ms": 1000 * latencies[len(latencies) // 2],
        "p99_ms": 1000 * latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))],
        "scoring_calls": batches,
        "pairs_per_call": (after["pairs"] - before["pairs"]) / batches,
        "requests_per_call": (after["requests"] - before["requests"]) / batches,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    target = parser.add_mutually_exclusive_group()
    target.add_argument("--hf", help="serve this Hugging Face reward model directory (default: the task source)")
    target.add_argument(
        "--random-hf",
        metavar="DIR",
        help="write a random Llama reward classifier (6 layers, hidden 512, "
        "19M parameters, a BPE tokenizer of its own; tests/test_reward_models.py) to DIR and serve it",
    )
    target.add_argument("--url", help="load a server that is already running")
    parser.add_argument("--bearer-token-env", help="with --url: environment variable holding the server's token")
    parser.add_argument("--server-arg", action="append", default=[], help="key=value override for the started server")
    parser.add_argument("--clients", default="1,4,16")
    parser.add_argument("--requests", type=int, default=20, help="per client")
    parser.add_argument("--pairs", type=int, default=64, help="per request")
    parser.add_argument("--out", default=os.path.join(ROOT, "bench_out", "reward_server_load.json"))
    args = parser.parse_args()

    proc, url = None, args.url
    if url is None:
        if args.random_hf:
            sys.path.insert(0, os.path.join(ROOT, "tests"))
            from test_reward_models import make_reward_model

            args.hf = make_reward_model(args.random_hf, layers=6, hidden=512)
        source = ["reward.source=hf", f"reward.hf.path={args.hf}"] if args.hf else []
        proc, url = start_server(source + args.server_arg)
    headers = {"Authorization": f"Bearer {os.environ[args.bearer_token_env]}"} if args.bearer_token_env else {}
    try:
        run_clients(url, headers, 1, 2, args.pairs)  # warm-up: connections, a model's first call
        rows = [run_clients(url, headers, int(n), args.requests, args.pairs) for n in args.clients.split(",")]
        health = httpx.get(f"{url}/health").json()
    finally:
        if proc is not None:
            proc.send_signal(signal.SIGTERM)
            proc.wait()

    print(
        f"reward server {url}, sources {health['sources']}, {args.requests} requests of {args.pairs} pairs per client"
    )
    print(f"{'clients':>7} {'pairs/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'pairs/call':>10} {'requests/call':>13}")
    for r in rows:
        print(
            f"{r['clients']:>7} {r['pairs_per_second']:>9.0f} {r['p50_ms']:>8.1f} {r['p99_ms']:>8.1f} "
            f"{r['pairs_per_call']:>10.1f} {r['requests_per_call']:>13.2f}"
        )
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(
            {"url": url, "sources": health["sources"], "hf": args.hf, "server_args": args.server_arg, "rows": rows},
            f,
            indent=1,
        )
    print(args.out)


if __name__ == "__main__":
    main()
