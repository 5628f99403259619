"""Serve the configured reward sources over HTTP, with dynamic batching.

    python -m nemo_optune.serve_reward [key=value ...]      # conf/serve/reward.yaml
    python -m nemo_optune.serve_reward reward.source=hf reward.hf.path=RM_DIR server.port=8000

Any `reward:` config of a training run works (task, python, hf, http, several weighted
sources); a trainer points `reward.source=http reward.http.urls=[http://HOST:PORT]` at it.

    GET  /health -> {"status": "ok", "sources": [names], "queued_pairs": n, "stats": {...}}
    POST /score  {"prompts": [str | [{role, content}, ...]], "responses": [str], "columns": {name: [value]}}
                 -> {"rewards": [float | null]}

A reward is the weighted total of the sources (RewardSources.score); null stands for a
non-finite one (JSON has no NaN). `columns` is optional: the prompt rows' other columns and
`truncated`, one value per pair, passed by keyword to the sources (a python function gets those
its signature names); a batch of requests with different columns gets None for a request's missing
ones. Reward shaping (reward.missing_eos_penalty, reward.length_penalty) is the trainer's. Errors answer {"error": "one line"}: 400 malformed JSON,
401 missing/wrong bearer token (server.bearer_token_env), 413 body over server.max_body_bytes,
422 wrong fields or types, unequal lengths, no pairs or over server.max_request_pairs,
503 + Retry-After queue full (server.max_queued_pairs), 500 the source failed (the server stays
up). NeMo-Aligner's {"sentences": [...]} is not accepted: its texts are prompt and response in
one, which the task and python sources cannot score.

Dynamic batching: requests queue in arrival order; one batcher groups them into one scoring
call of at most server.max_batch_tokens (a request over it goes alone), waiting at most
server.max_wait_ms after the oldest queued request for the batch to fill. Tokens are counted by
the source's own count_tokens(prompts, responses) if it has one, else estimated as
(len(prompt) + len(response)) // 4 + 1 per pair. The sources run on a single worker thread:
they need not be thread-safe. SIGTERM/SIGINT: stop accepting, finish the requests in flight
(up to server.graceful_shutdown_seconds), exit 0. Bad config: one line, exit status 2.
"""

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import functools
import hmac
import json
import math
import os
import signal
import socket
import sys
import time
from collections import deque
from typing import TYPE_CHECKING

from nemo_optune.cli import Recipe, answer_help, fail, one_line, user_errors
from nemo_optune.config import (
    ConfigError,
    ServerConfig,
    ServeRewardConfig,
    compose_recipe,
    conf_dir,
    merge_onto,
    validate_serve,
)
from nemo_optune.data.records import DataError, check_messages
from nemo_optune.runtime.quiet import quiet_megatron_warnings

if TYPE_CHECKING:  # imported when a server starts: --help and config errors answer without them
    from fastapi import FastAPI, Request

    from nemo_optune.rewards.sources import RewardSources

RETRY_AFTER_SECONDS = 1  # a full queue drains in about a batch's scoring time


def load_serve_config(recipe: Recipe) -> ServeRewardConfig:
    cfg = merge_onto(ServeRewardConfig, compose_recipe(_serve_dir(), recipe.name, recipe.overrides, recipe.config_dir))
    validate_serve(cfg)
    return cfg


def _serve_dir() -> str:
    return os.path.join(conf_dir(), "serve")


class Rejected(Exception):
    """A request answered with an error status and a one-line reason."""

    def __init__(self, status: int, message: str, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers


@dataclasses.dataclass
class Pending:
    prompts: list[str]
    responses: list[str]
    columns: dict[str, list]  # one value per pair each
    tokens: int
    arrived: float  # time.monotonic()
    future: asyncio.Future


class Batcher:
    """The queue of admitted requests and the one task that scores them in batches."""

    def __init__(self, sources: "RewardSources", max_batch_tokens: int, max_wait_seconds: float):
        self.sources, self.budget, self.max_wait = sources, max_batch_tokens, max_wait_seconds
        self.queue: deque[Pending] = deque()
        self.arrived = asyncio.Event()
        self.queued_pairs = 0  # admitted and not answered yet
        self.executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="reward-source")
        self.counter = next((s.source.count_tokens for s in sources.sources if hasattr(s.source, "count_tokens")), None)
        self.batches = self.requests = self.pairs = self.failed_batches = 0

    async def count_tokens(self, prompts: list[str], responses: list[str]) -> int:
        if self.counter is None:
            return sum((prompt_chars(p) + len(r)) // 4 + 1 for p, r in zip(prompts, responses))
        # On the scoring thread: a source's tokenizer need not be thread-safe either.
        return sum(await asyncio.get_running_loop().run_in_executor(self.executor, self.counter, prompts, responses))

    def submit(self, prompts: list[str], responses: list[str], columns: dict[str, list], tokens: int) -> asyncio.Future:
        future = asyncio.get_running_loop().create_future()
        self.queue.append(Pending(prompts, responses, columns, tokens, time.monotonic(), future))
        self.queued_pairs += len(prompts)
        self.arrived.set()
        return future

    async def run(self) -> None:
        while True:
            await self._wait_for_batch()
            await self._score(self._take())

    async def _wait_for_batch(self) -> None:
        while not self.queue:
            self.arrived.clear()
            await self.arrived.wait()
        # Requests that queued while the last batch was scored are past their wait already.
        while sum(p.tokens for p in self.queue) < self.budget:
            left = self.queue[0].arrived + self.max_wait - time.monotonic()
            if left <= 0:
                return
            self.arrived.clear()
            try:
                await asyncio.wait_for(self.arrived.wait(), left)
            except asyncio.TimeoutError:
                return

    def _take(self) -> list[Pending]:
        """Queued requests in arrival order while they fit the budget; at least one."""
        batch, tokens = [], 0
        while self.queue and (not batch or tokens + self.queue[0].tokens <= self.budget):
            p = self.queue.popleft()
            if p.future.done():  # its request was cancelled (client gone, shutdown timeout)
                self.queued_pairs -= len(p.prompts)
                continue
            batch.append(p)
            tokens += p.tokens
        return batch

    async def _score(self, batch: list[Pending]) -> None:
        if not batch:
            return
        prompts = [x for p in batch for x in p.prompts]
        responses = [x for p in batch for x in p.responses]
        names = dict.fromkeys(name for p in batch for name in p.columns)
        columns = {n: [x for p in batch for x in p.columns.get(n, [None] * len(p.prompts))] for n in names}
        try:
            rewards = await asyncio.get_running_loop().run_in_executor(
                self.executor, functools.partial(self.sources.score, prompts, responses, **columns)
            )
        except Exception as err:
            self.failed_batches += 1
            if len(batch) == 1:
                self._answer(batch[0], error=err)
            else:  # one request may be what breaks the source: score them one by one, so only it fails
                for p in batch:
                    await self._score([p])
            return
        self.batches, self.requests, self.pairs = (
            self.batches + 1,
            self.requests + len(batch),
            self.pairs + len(prompts),
        )
        start = 0
        for p in batch:
            self._answer(p, rewards=rewards[start : start + len(p.prompts)])
            start += len(p.prompts)

    def _answer(self, p: Pending, rewards: list[float] | None = None, error: Exception | None = None) -> None:
        self.queued_pairs -= len(p.prompts)
        if p.future.done():  # its request was cancelled meanwhile
            return
        if error is None:
            p.future.set_result(rewards)
        else:
            p.future.set_exception(error)

    def stats(self) -> dict:
        return {
            "batches": self.batches,
            "requests": self.requests,
            "pairs": self.pairs,
            "failed_batches": self.failed_batches,
            "mean_pairs_per_batch": self.pairs / max(self.batches, 1),
            "mean_requests_per_batch": self.requests / max(self.batches, 1),
        }


def parse_pairs(body: bytes, max_pairs: int) -> tuple[list[str], list[str], dict[str, list]]:
    """The request's prompts, responses and columns, or Rejected with a one-line reason."""
    try:
        payload = json.loads(body)
    except ValueError as err:  # also bytes that are not UTF-8
        raise Rejected(400, f"malformed JSON: {err}") from None
    if not isinstance(payload, dict):
        raise Rejected(422, 'the body must be a JSON object {"prompts": [...], "responses": [...]}')
    unknown = sorted(set(payload) - {"prompts", "responses", "columns"})
    if unknown:
        raise Rejected(422, f"unknown field {unknown[0]!r}: expected prompts, responses and optionally columns")
    for key in ("prompts", "responses"):
        if key not in payload:
            raise Rejected(422, f"missing field {key!r}")
        if not isinstance(payload[key], list):
            raise Rejected(422, f"{key} must be a list, got {type(payload[key]).__name__}")
    bad = next((i for i, x in enumerate(payload["responses"]) if not isinstance(x, str)), None)
    if bad is not None:
        raise Rejected(422, f"responses[{bad}] must be a string, got {type(payload['responses'][bad]).__name__}")
    prompts, responses = [parse_prompt(x, i) for i, x in enumerate(payload["prompts"])], payload["responses"]
    if len(prompts) != len(responses):
        raise Rejected(422, f"{len(prompts)} prompts but {len(responses)} responses")
    if not prompts:
        raise Rejected(422, "no pairs to score")
    if len(prompts) > max_pairs:
        raise Rejected(422, f"{len(prompts)} pairs in one request, over the server's limit of {max_pairs}")
    return prompts, responses, parse_columns(payload.get("columns", {}), len(prompts))


def parse_columns(columns, n: int) -> dict[str, list]:
    """The optional `columns`: {name: [one value per pair]}, names that are not the sources' own arguments."""
    if not isinstance(columns, dict):
        raise Rejected(422, f"columns must be an object of lists, got {type(columns).__name__}")
    for name, values in columns.items():
        if name in ("prompts", "responses") or not name.isidentifier():
            raise Rejected(422, f"columns: {name!r} cannot be a keyword argument of a reward source")
        if not isinstance(values, list) or len(values) != n:
            got = len(values) if isinstance(values, list) else type(values).__name__
            raise Rejected(422, f"columns[{name!r}] must be a list of {n} values (one per pair), got {got}")
    return columns


def parse_prompt(prompt, i: int):
    """A prompt: a string, or a conversation as a list of {role, content} turns."""
    if isinstance(prompt, str):
        return prompt
    try:
        return check_messages(prompt, "request", f"prompts[{i}]")
    except DataError as err:
        raise Rejected(422, f"prompts[{i}] must be a string or a list of {{role, content}} turns ({err})") from None


def prompt_chars(prompt) -> int:
    return len(prompt) if isinstance(prompt, str) else sum(len(turn["content"]) for turn in prompt)


async def read_body(request: "Request", limit: int) -> bytes:
    """The body, or 413 as soon as it is known to be over the limit (declared or read)."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise Rejected(413, f"body of {declared} bytes, over the server's limit of {limit}")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise Rejected(413, f"body over the server's limit of {limit} bytes")
    return bytes(body)


def build_app(sources: "RewardSources", s: ServerConfig, token: str | None) -> "FastAPI":
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse

    batcher = Batcher(sources, s.max_batch_tokens, s.max_wait_ms / 1000)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        task = asyncio.create_task(batcher.run())
        yield
        # uvicorn has waited for the requests in flight (graceful shutdown): nothing is left to score.
        task.cancel()
        batcher.executor.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.batcher = batcher

    @app.exception_handler(Rejected)
    async def rejected(request: Request, err: Rejected) -> JSONResponse:
        return JSONResponse({"error": err.message}, status_code=err.status, headers=err.headers)

    @app.get("/health")  # open without the token: for load balancers' probes
    async def health() -> dict:
        return {
            "status": "ok",
            "sources": sources.names,
            "queued_pairs": batcher.queued_pairs,
            "stats": batcher.stats(),
        }

    @app.post("/score")
    async def score(request: Request) -> JSONResponse:
        if token is not None and not hmac.compare_digest(
            request.headers.get("authorization", "").encode(), f"Bearer {token}".encode()
        ):
            raise Rejected(401, "missing or wrong bearer token", {"WWW-Authenticate": "Bearer"})
        prompts, responses, columns = parse_pairs(await read_body(request, s.max_body_bytes), s.max_request_pairs)
        tokens = await batcher.count_tokens(prompts, responses)
        if batcher.queued_pairs + len(prompts) > s.max_queued_pairs:
            raise Rejected(
                503,
                f"queue full ({batcher.queued_pairs} pairs queued, limit {s.max_queued_pairs}): retry later",
                {"Retry-After": str(RETRY_AFTER_SECONDS)},
            )
        try:
            rewards = await batcher.submit(prompts, responses, columns, tokens)
        except Exception as err:  # the source failed (after its retries)
            raise Rejected(500, one_line(err) or type(err).__name__) from None
        return JSONResponse({"rewards": [r if math.isfinite(r) else None for r in rewards]})

    return app


def listen(host: str, port: int) -> socket.socket:
    """A listening socket, so a client connecting right after the start-up line is queued, not refused."""
    # proto=IPPROTO_TCP, or asyncio leaves Nagle on for the connections (40 ms per keep-alive request).
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as err:
        sock.close()
        raise ConfigError(f"config key server.port: cannot listen on {host}:{port} ({err.strerror})") from None
    sock.listen(2048)
    return sock


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    recipe = answer_help(argv, "python -m nemo_optune.serve_reward", __doc__, ServeRewardConfig, "reward", _serve_dir())
    try:
        cfg = load_serve_config(recipe)
        quiet_megatron_warnings()  # before anything imports megatron
        import uvicorn

        from nemo_optune.data.sort_task import SortTask
        from nemo_optune.rewards.sources import RewardSources

        s = cfg.server
        sock = listen(s.host, s.port)  # a port in use fails before a model loads
        sources = RewardSources(cfg.reward, SortTask(min_digits=cfg.data.min_digits, max_digits=cfg.data.max_digits))
    except user_errors() as err:
        fail(one_line(err))
    app = build_app(sources, s, os.environ[s.bearer_token_env] if s.bearer_token_env else None)
    server = uvicorn.Server(
        uvicorn.Config(
            app,
            log_level="info",
            access_log=False,
            lifespan="on",
            timeout_graceful_shutdown=s.graceful_shutdown_seconds,
        )
    )
    host = f"[{s.host}]" if ":" in s.host else s.host
    print(f"nemo_optune reward server listening on http://{host}:{sock.getsockname()[1]}", flush=True)
    # uvicorn handles SIGTERM/SIGINT (graceful shutdown), then raises the signal again with the
    # handler it found: a no-op one lets the process, finished by then, exit with status 0.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)
    server.run(sockets=[sock])


if __name__ == "__main__":
    main()
