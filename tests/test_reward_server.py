"""The reward server (python -m nemo_optune.serve_reward) and its client (reward.source=http)."""

import math
import os
import queue
import random
import re
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import pytest
from conftest import ROOT

from nemo_optune.config import HTTPRewardConfig, RewardConfig, RewardSourceConfig
from nemo_optune.data.sort_task import SortTask
from nemo_optune.rewards.http_client import HTTPReward, RewardServerError
from nemo_optune.rewards.sources import RewardSources

TOKEN_ENV = "NEMO_OPTUNE_TEST_REWARD_TOKEN"
HEADERS = {"Authorization": "Bearer s3cret"}
SLOW_SECONDS = 2.0  # long enough for the checks made while a request is being scored

REWARDS_MODULE = f"""
import time
from nemo_optune.data.sort_task import SortTask

def nan_for_empty(prompts, responses):
    task = SortTask()
    return [float("nan") if r == "" else task.reward(p, r) for p, r in zip(prompts, responses)]

def slow(prompts, responses):
    if "boom" in responses:
        raise ValueError("boom")
    time.sleep({SLOW_SECONDS})
    return [0.25] * len(prompts)
"""

# The task's reward plus half of a python function's (NaN for an empty response).
SOURCES = ["reward.sources=[{source:task},{source:python,name:fn,weight:0.5,function:'server_rewards:nan_for_empty'}]"]


class Server:
    def __init__(self, rewards_dir, log_dir, overrides: list[str], env: dict | None = None):
        self.stderr = open(log_dir / "server.err", "w+")
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(rewards_dir), ROOT]), **(env or {})}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "nemo_optune.serve_reward", "server.port=0", *overrides],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=self.stderr,
            text=True,
        )
        lines = queue.Queue()
        threading.Thread(target=lambda: [lines.put(line) for line in self.proc.stdout], daemon=True).start()
        try:
            line = lines.get(timeout=60)
        except queue.Empty:
            line = ""
        if not line.startswith("nemo_optune reward server listening on http://"):
            self.stop()
        assert line.startswith("nemo_optune reward server listening on http://"), (line, self.errors())
        self.url = line.split()[-1]

    def errors(self) -> str:
        self.stderr.seek(0)
        return self.stderr.read()

    def health(self) -> dict:
        return httpx.get(f"{self.url}/health").json()

    def wait_for_queued(self, pairs: int) -> None:
        deadline = time.monotonic() + 10
        while self.health()["queued_pairs"] != pairs:
            assert time.monotonic() < deadline, self.health()
            time.sleep(0.02)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        self.stderr.close()


@pytest.fixture(scope="module")
def rewards_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("rewards")
    (path / "server_rewards.py").write_text(REWARDS_MODULE)
    sys.path.insert(0, str(path))
    yield path
    sys.path.remove(str(path))


@pytest.fixture(scope="module")
def server(rewards_dir):
    s = Server(
        rewards_dir,
        rewards_dir,
        SOURCES
        + [
            "server.max_wait_ms=20",
            "server.max_request_pairs=64",
            "server.max_body_bytes=20000",
            f"server.bearer_token_env={TOKEN_ENV}",
        ],
        env={TOKEN_ENV: "s3cret"},
    )
    yield s
    s.stop()


@pytest.fixture
def slow_server(rewards_dir, tmp_path):
    s = Server(
        rewards_dir,
        tmp_path,
        [
            "reward.source=python",
            "reward.function=server_rewards:slow",
            "reward.retries=0",
            "server.max_queued_pairs=4",
            "server.max_request_pairs=4",
        ],
    )
    yield s
    s.stop()


def pairs(n: int, seed: int) -> tuple[list[str], list[str]]:
    """Task prompts with responses of every quality, some empty (NaN from the python source)."""
    rng = random.Random(seed)
    task = SortTask()
    prompts = [task.sample_prompt(rng) for _ in range(n)]
    responses = [
        rng.choice([task.target(p), task.target(p)[::-1], "".join(rng.sample("0123456789", 4)), ""]) for p in prompts
    ]
    return prompts, responses


def in_process(prompts, responses) -> list[float]:
    cfg = RewardConfig(
        sources=[
            RewardSourceConfig(source="task"),
            RewardSourceConfig(source="python", name="fn", weight=0.5, function="server_rewards:nan_for_empty"),
        ]
    )
    return RewardSources(cfg, SortTask()).score(prompts, responses)


def same(a: list[float], b: list[float]) -> bool:
    """Exactly equal, NaN where NaN."""
    return len(a) == len(b) and all(x == y or (math.isnan(x) and math.isnan(y)) for x, y in zip(a, b))


def post(server, body, headers=HEADERS) -> httpx.Response:
    """JSON for a dict or list, else the bytes (or chunks) as they are."""
    data = {"json": body} if isinstance(body, (dict, list)) else {"content": body}
    return httpx.post(f"{server.url}/score", headers=headers, **data)


def test_scores_over_http_equal_the_in_process_sources(server, monkeypatch):
    prompts, responses = pairs(40, seed=0)
    expected = in_process(prompts, responses)
    assert any(math.isnan(r) for r in expected) and not all(math.isnan(r) for r in expected)

    answer = post(server, {"prompts": prompts, "responses": responses})
    assert answer.status_code == 200
    assert same([float("nan") if r is None else r for r in answer.json()["rewards"]], expected)

    monkeypatch.setenv(TOKEN_ENV, "s3cret")
    client = HTTPReward(
        HTTPRewardConfig(urls=[server.url], batch_size=7, bearer_token_env=TOKEN_ENV), timeout_seconds=10
    )
    assert same(client.score(prompts, responses), expected)  # 6 requests, reassembled in order
    health = server.health()
    assert health["status"] == "ok" and health["sources"] == ["task", "fn"] and health["queued_pairs"] == 0


def test_concurrent_clients_get_their_own_rewards_and_share_batches(server):
    work = [pairs(5, seed=100 + i) for i in range(40)]
    expected = [in_process(p, r) for p, r in work]
    before = server.health()["stats"]
    results = [None] * len(work)

    def client(first: int):
        with httpx.Client(headers=HEADERS) as http:
            for i in range(first, len(work), 8):
                rewards = http.post(
                    f"{server.url}/score", json={"prompts": work[i][0], "responses": work[i][1]}
                ).json()["rewards"]
                results[i] = [float("nan") if r is None else r for r in rewards]

    threads = [threading.Thread(target=client, args=(t,)) for t in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(same(got, want) for got, want in zip(results, expected))
    after = server.health()["stats"]
    requests, batches = after["requests"] - before["requests"], after["batches"] - before["batches"]
    assert requests == 40 and after["pairs"] - before["pairs"] == 200
    assert batches < requests  # some batch held several requests


@pytest.mark.parametrize(
    "body,status,reason",
    [
        (b'{"prompts": ["1>"], "responses": ', 400, "malformed JSON"),
        (b"\xff\xfe\x00", 400, "malformed JSON"),
        ([["1>", "1"]], 422, "must be a JSON object"),
        ({"prompts": "1>", "responses": ["1"]}, 422, "prompts must be a list, got str"),
        (
            {"prompts": ["1>", 2], "responses": ["1", "2"]},
            422,
            "prompts[1] must be a string or a list of {role, content} turns",
        ),
        ({"prompts": [[{"role": "user"}]], "responses": ["1"]}, 422, "prompts[0] must be a string or a list of {role"),
        ({"prompts": ["1>"], "responses": [None]}, 422, "responses[0] must be a string, got NoneType"),
        ({"prompts": ["1>"]}, 422, "missing field 'responses'"),
        ({"sentences": ["1>1"]}, 422, "unknown field 'sentences'"),
        ({"prompts": ["1>", "2>"], "responses": ["1"]}, 422, "2 prompts but 1 responses"),
        ({"prompts": [], "responses": []}, 422, "no pairs to score"),
        (
            {"prompts": ["1>"] * 65, "responses": ["1"] * 65},
            422,
            "65 pairs in one request, over the server's limit of 64",
        ),
        ({"prompts": ["1>"], "responses": ["1"], "columns": [1]}, 422, "columns must be an object of lists"),
        (
            {"prompts": ["1>"], "responses": ["1"], "columns": {"reference": ["1", "2"]}},
            422,
            "columns['reference'] must be a list of 1 values (one per pair), got 2",
        ),
        (
            {"prompts": ["1>"], "responses": ["1"], "columns": {"prompts": ["1"]}},
            422,
            "columns: 'prompts' cannot be a keyword argument",
        ),
        ({"prompts": ["1>"], "responses": ["1" * 30000]}, 413, "over the server's limit of 20000"),
        (
            iter([b'{"prompts": ["1>"], "responses": ["'] + [b"1" * 4096] * 6 + [b'"]}']),
            413,
            "over the server's limit of 20000",
        ),
    ],
    ids=[
        "truncated",
        "not-utf8",
        "not-an-object",
        "not-a-list",
        "not-a-prompt",
        "bad-turn",
        "not-a-string",
        "missing",
        "sentences",
        "unequal",
        "empty",
        "too-many-pairs",
        "columns-not-an-object",
        "column-length",
        "column-name",
        "content-length",
        "chunked",
    ],
)
def test_a_bad_request_gets_a_one_line_reason_and_the_server_goes_on(server, body, status, reason):
    answer = post(server, body)
    assert answer.status_code == status
    error = answer.json()["error"]
    assert reason in error and "\n" not in error
    assert post(server, {"prompts": ["21>"], "responses": ["12"]}).json() == {"rewards": [1.5]}


def test_keep_alive_requests_are_not_held_back(server):
    """Nagle's algorithm against delayed ACKs would add 40 ms to each request on a kept-alive connection."""
    with httpx.Client(headers=HEADERS) as http:
        times = []
        for _ in range(11):
            start = time.perf_counter()
            http.get(f"{server.url}/health").raise_for_status()
            times.append(time.perf_counter() - start)
    assert sorted(times)[5] < 0.02  # the median; about 1 ms


def test_score_needs_the_bearer_token(server):
    good = {"prompts": ["21>"], "responses": ["12"]}
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
        answer = post(server, good, headers=headers)
        assert answer.status_code == 401 and answer.json() == {"error": "missing or wrong bearer token"}
    assert post(server, good).status_code == 200
    assert httpx.get(f"{server.url}/health").status_code == 200  # probes need no token


def test_a_client_without_its_token_variable_names_the_key():
    with pytest.raises(
        ValueError, match="config key reward.http.bearer_token_env: environment variable NO_SUCH_VAR_X is not set"
    ):
        HTTPReward(HTTPRewardConfig(urls=["http://127.0.0.1:1"], bearer_token_env="NO_SUCH_VAR_X"), timeout_seconds=1)


@pytest.fixture
def dead_urls():
    """URLs of bound ports that do not listen: connections are refused at once."""
    socks = [socket.socket() for _ in range(2)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    yield [f"http://127.0.0.1:{s.getsockname()[1]}" for s in socks]
    for s in socks:
        s.close()


def test_the_client_skips_a_dead_server(server, dead_urls, monkeypatch):
    monkeypatch.setenv(TOKEN_ENV, "s3cret")
    client = HTTPReward(
        HTTPRewardConfig(
            urls=[dead_urls[0], server.url], batch_size=4, bearer_token_env=TOKEN_ENV, connect_timeout_seconds=1
        ),
        timeout_seconds=10,
    )
    prompts, responses = pairs(20, seed=1)
    assert same(client.score(prompts, responses), in_process(prompts, responses))
    assert client.dead_until[dead_urls[0]] > time.monotonic() + 20 and client.dead_until[server.url] == 0


def test_the_client_names_every_server_when_all_are_dead(dead_urls):
    client = HTTPReward(HTTPRewardConfig(urls=dead_urls, connect_timeout_seconds=0.5), timeout_seconds=1)
    start = time.monotonic()
    with pytest.raises(
        RewardServerError,
        match=f"no reward server could score 3 pairs \\(servers: {dead_urls[0]}, "
        f"{dead_urls[1]}\\); last error: .*ConnectError",
    ):
        client.score(["1>"] * 3, ["1"] * 3)
    assert time.monotonic() - start < 5


def test_a_run_checks_its_servers_before_any_work(server, dead_urls):
    """At start-up (check_health, as a training run builds it) at least one server must answer."""
    with pytest.raises(
        ValueError,
        match=f"config key reward.http.urls: no reward server answers GET /health "
        f"\\({dead_urls[0]}: ConnectError.*; {dead_urls[1]}: ConnectError",
    ):
        HTTPReward(HTTPRewardConfig(urls=dead_urls), timeout_seconds=1, check_health=True)
    client = HTTPReward(HTTPRewardConfig(urls=[dead_urls[0], server.url]), timeout_seconds=1, check_health=True)
    assert client.dead_until[dead_urls[0]] > time.monotonic() and client.dead_until[server.url] == 0.0


def test_the_client_raises_a_4xx_reason_at_once(server, monkeypatch):
    monkeypatch.setenv(TOKEN_ENV, "s3cret")
    client = HTTPReward(
        HTTPRewardConfig(urls=[server.url], batch_size=100, bearer_token_env=TOKEN_ENV), timeout_seconds=10
    )
    with pytest.raises(
        RewardServerError,
        match="refused the request: .*HTTP 422: 70 pairs in one request, over the server's limit of 64",
    ):
        client.score(["1>"] * 70, ["1"] * 70)


def post_in_background(server, pairs: int) -> tuple[threading.Thread, dict]:
    """A request of `pairs` pairs in flight (queued at the server) when this returns; its answer
    lands in the dict."""
    answer = {}
    thread = threading.Thread(
        target=lambda: answer.update(
            post(server, {"prompts": ["1>"] * pairs, "responses": ["1"] * pairs}, headers={}).json()
        )
    )
    thread.start()
    server.wait_for_queued(pairs)
    return thread, answer


def test_a_full_queue_answers_503_with_retry_after(slow_server):
    thread, first = post_in_background(slow_server, 4)
    answer = post(slow_server, {"prompts": ["1>"], "responses": ["1"]}, headers={})
    assert answer.status_code == 503 and answer.headers["Retry-After"] == "1"
    assert answer.json()["error"] == "queue full (4 pairs queued, limit 4): retry later"
    # A client gives the busy server one more try after Retry-After, then gives up for this attempt.
    client = HTTPReward(HTTPRewardConfig(urls=[slow_server.url]), timeout_seconds=10)
    with pytest.raises(RewardServerError, match="HTTP 503: queue full"):
        client.score(["1>"], ["1"])
    thread.join()
    assert first == {"rewards": [0.25] * 4}
    assert post(slow_server, {"prompts": ["1>"], "responses": ["1"]}, headers={}).json() == {"rewards": [0.25]}


def test_a_failing_request_gets_500_and_its_batch_neighbours_their_rewards(slow_server):
    answers = {}

    def send(name, responses):
        answer = post(slow_server, {"prompts": ["1>"] * len(responses), "responses": responses}, headers={})
        answers[name] = (answer.status_code, answer.json())

    first = threading.Thread(target=send, args=("first", ["1"]))
    first.start()
    slow_server.wait_for_queued(1)  # being scored: the next two queue, and are scored in one batch
    threads = [
        threading.Thread(target=send, args=(name, responses))
        for name, responses in (("good", ["1", "1"]), ("bad", ["boom"]))
    ]
    for t in threads:
        t.start()
    slow_server.wait_for_queued(4)
    for t in [first, *threads]:
        t.join()
    assert answers["first"] == (200, {"rewards": [0.25]})
    assert answers["good"] == (200, {"rewards": [0.25, 0.25]})
    status, body = answers["bad"]
    assert status == 500 and re.fullmatch(
        r"reward source '\w+' failed 1 times \(last: ValueError: boom\)[^\n]*", body["error"]
    )
    stats = slow_server.health()["stats"]
    assert (stats["batches"], stats["failed_batches"]) == (
        2,
        2,
    )  # first; good+bad failed, then good alone and bad alone

    # The client takes a 5xx for a failed server: it skips it, and with no other server, says so.
    client = HTTPReward(HTTPRewardConfig(urls=[slow_server.url]), timeout_seconds=10)
    with pytest.raises(
        RewardServerError,
        match=f"no reward server could score 1 pairs \\(servers: {slow_server.url}\\); "
        f"last error: {slow_server.url}: HTTP 500: reward source '\\w+' failed",
    ):
        client.score(["1>"], ["boom"])
    assert client.dead_until[slow_server.url] > time.monotonic()


def test_sigterm_lets_the_request_in_flight_finish_then_exits_0(slow_server):
    thread, result = post_in_background(slow_server, 2)
    slow_server.proc.send_signal(signal.SIGTERM)
    thread.join()
    assert result == {"rewards": [0.25] * 2}
    assert slow_server.proc.wait(timeout=20) == 0, slow_server.errors()
    assert "Traceback" not in slow_server.errors()


@pytest.mark.parametrize(
    "override,message",
    [
        ("server.port=70000", "config key server.port: must be in [0, 65535] (0 = any free port), got 70000"),
        (
            "server.max_queued_pairs=8",
            "config key server.max_queued_pairs: 8 cannot hold one request of server.max_request_pairs=1024",
        ),
        (
            "server.bearer_token_env=NO_SUCH_VAR_X",
            "config key server.bearer_token_env: environment variable NO_SUCH_VAR_X is not set",
        ),
        ("server.max_batch_tokenz=1", "config key server.max_batch_tokenz"),
        ("reward.source=python", "config key reward.function: source=python needs package.module:function"),
    ],
)
def test_a_bad_server_config_is_one_line_and_status_2(override, message, capsys):
    from nemo_optune.serve_reward import main

    with pytest.raises(SystemExit) as exit_:
        main([override])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {message}") and err.count("\n") == 1


def test_a_bad_server_config_exits_before_serving():
    done = subprocess.run(
        [sys.executable, "-m", "nemo_optune.serve_reward", "server.port=-1"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr == "error: config key server.port: must be in [0, 65535] (0 = any free port), got -1\n"


def test_a_prompt_may_be_a_conversation():
    import json

    from nemo_optune.serve_reward import parse_pairs

    turns = [{"role": "system", "content": "sort"}, {"role": "user", "content": "21>"}]
    body = json.dumps({"prompts": ["21>", turns], "responses": ["12", "12"]}).encode()
    assert parse_pairs(body, 8) == (["21>", turns], ["12", "12"], {})
