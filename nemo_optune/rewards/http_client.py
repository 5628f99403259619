"""`reward.source: http`: scores from one or more reward servers (python -m nemo_optune.serve_reward).

The pairs go out in requests of at most http.batch_size pairs, spread round-robin over
http.urls, two in flight per server (so a server scores one batch while the next one waits in
its queue). A server that fails (no connection, a timeout, a 5xx) is skipped for
http.dead_server_seconds and the request goes to the next live one; a busy server (503/429) is
not dead: after the other servers, it is asked once more after its Retry-After. A 4xx is a bug
in what we send, so another server would refuse it too: it is raised at once with the server's
reason. ResilientRewardSource retries the whole call with backoff.

Wire format (docs/rewards.md): POST {url}/score {"prompts": [str], "responses": [str],
"columns": {name: [value]}} -> {"rewards": [float | null]}, null for a non-finite reward (JSON
has no NaN). `columns` (the prompt rows' other columns and `truncated`, one value per pair) is
sent only when there are any: servers that predate it keep working for runs without them.
"""

import concurrent.futures
import math
import os
import time

import httpx

from nemo_optune.config import HTTPRewardConfig

MAX_RETRY_AFTER_SECONDS = 5.0  # longer Retry-After waits are left to ResilientRewardSource's backoff


class RewardServerError(RuntimeError):
    """No server could score a request, or a server refused or garbled it."""


class HTTPReward:
    def __init__(
        self, cfg: HTTPRewardConfig, timeout_seconds: float, key: str = "reward.http", check_health: bool = False
    ):
        headers = {}
        if cfg.bearer_token_env:
            token = os.environ.get(cfg.bearer_token_env)
            if token is None:
                raise ValueError(
                    f"config key {key}.bearer_token_env: environment variable {cfg.bearer_token_env} is not set"
                )
            headers["Authorization"] = f"Bearer {token}"
        self.urls = [url.rstrip("/") for url in cfg.urls]
        self.batch_size, self.dead_seconds = cfg.batch_size, cfg.dead_server_seconds
        # One client: keep-alive connections are reused across calls (it is thread-safe).
        self.client = httpx.Client(
            headers=headers, timeout=httpx.Timeout(timeout_seconds, connect=cfg.connect_timeout_seconds)
        )
        self.pool = concurrent.futures.ThreadPoolExecutor(
            max_workers=2 * len(self.urls), thread_name_prefix="reward-http"
        )
        self.dead_until = dict.fromkeys(self.urls, 0.0)  # time.monotonic() until which a server is skipped
        self.next_server = 0  # round-robin across calls, so one-request calls spread too
        if check_health:
            self.check_health(key)

    def check_health(self, key: str) -> None:
        """At start-up, before any work: at least one server answers GET /health (those that do
        not are skipped for dead_server_seconds), else one line naming the key and the URLs."""
        errors = []
        for url in self.urls:
            try:
                self.client.get(f"{url}/health").raise_for_status()
            except httpx.HTTPError as err:
                errors.append(f"{url}: {type(err).__name__}: {err}")
                self.dead_until[url] = time.monotonic() + self.dead_seconds
        if len(errors) == len(self.urls):
            raise ValueError(f"config key {key}.urls: no reward server answers GET /health ({'; '.join(errors)})")

    def score(self, prompts: list[str], responses: list[str], **columns: list) -> list[float]:
        b, n = self.batch_size, len(self.urls)
        chunks = [
            {
                "prompts": prompts[i : i + b],
                "responses": responses[i : i + b],
                **({"columns": {k: v[i : i + b] for k, v in columns.items()}} if columns else {}),
            }
            for i in range(0, len(prompts), b)
        ]
        first, self.next_server = self.next_server, (self.next_server + len(chunks)) % n
        futures = [self.pool.submit(self._score_chunk, payload, (first + i) % n) for i, payload in enumerate(chunks)]
        try:
            return [reward for future in futures for reward in future.result()]
        except BaseException:
            for future in futures:  # the call has failed: send no more of its requests
                future.cancel()
            raise

    def _score_chunk(self, payload: dict, start: int) -> list[float]:
        prompts = payload["prompts"]
        order = self.urls[start:] + self.urls[:start]
        # With every server dead, ask them all anyway rather than fail without trying: a blip
        # would otherwise fail every retry of ResilientRewardSource for dead_server_seconds.
        servers = [url for url in order if self.dead_until[url] <= time.monotonic()] or order
        last, waited = None, False
        while True:
            busy = {}  # url -> Retry-After seconds
            for url in servers:
                try:
                    response = self.client.post(f"{url}/score", json=payload)
                except httpx.TransportError as err:  # no connection, a timeout, a dropped connection
                    last = f"{url}: {type(err).__name__}: {err}"
                    self.dead_until[url] = time.monotonic() + self.dead_seconds
                    continue
                if response.status_code == 200:
                    return _rewards(url, response, len(prompts))
                last = f"{url}: HTTP {response.status_code}: {_reason(response)}"
                if response.status_code in (429, 503):
                    busy[url] = _retry_after(response)
                elif response.status_code >= 500:
                    self.dead_until[url] = time.monotonic() + self.dead_seconds
                else:
                    raise RewardServerError(f"reward server refused the request: {last}")
            if not busy or waited:
                raise RewardServerError(
                    f"no reward server could score {len(prompts)} pairs "
                    f"(servers: {', '.join(self.urls)}); last error: {last}"
                )
            time.sleep(min(min(busy.values()), MAX_RETRY_AFTER_SECONDS))
            servers, waited = list(busy), True


def _rewards(url: str, response: httpx.Response, n: int) -> list[float]:
    """One finite reward or null (-> NaN) per pair, else RewardServerError."""
    try:
        rewards = response.json()["rewards"]
    except (ValueError, KeyError, TypeError):
        raise RewardServerError(f'reward server {url} answered without a JSON {{"rewards": [...]}}') from None
    if not isinstance(rewards, list) or len(rewards) != n:
        got = len(rewards) if isinstance(rewards, list) else type(rewards).__name__
        raise RewardServerError(f"reward server {url} answered {got} rewards for {n} pairs")
    out = []
    for r in rewards:
        if r is not None and (isinstance(r, bool) or not isinstance(r, (int, float)) or not math.isfinite(r)):
            raise RewardServerError(
                f"reward server {url} answered {r!r} as a reward (expected a finite number or null)"
            )
        out.append(float("nan") if r is None else float(r))
    return out


def _reason(response: httpx.Response) -> str:
    """The server's one-line {"error": ...}, or the start of whatever it sent."""
    try:
        error = response.json().get("error")
    except (ValueError, AttributeError):
        error = None
    text = error if isinstance(error, str) else response.text
    return (text.strip().splitlines() or [response.reason_phrase])[0][:300]


def _retry_after(response: httpx.Response) -> float:
    try:
        return max(0.0, float(response.headers.get("retry-after", "1")))
    except ValueError:  # an HTTP date: not worth parsing for a wait of a few seconds
        return 1.0
