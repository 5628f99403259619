"""Retries with exponential backoff and a per-call timeout around any reward source.

Remote reward servers fail and stall; the trainer scores a whole batch before touching the
pool, so a source that finally fails leaves the pool exactly as it was."""

import concurrent.futures
import time

import torch

from nemo_optune.rewards.base import keyword_parameters, keywords_for


class RewardSourceError(RuntimeError):
    """The reward source failed on every attempt."""


class ResilientRewardSource:
    def __init__(self, source, name: str, retries: int, backoff_seconds: float, timeout_seconds: float):
        self.source, self.name = source, name
        self.retries, self.backoff, self.timeout = retries, backoff_seconds, timeout_seconds
        # A new thread's current CUDA device is 0: the worker takes this rank's, so that a
        # source placing tensors on "cuda" finds its model there.
        self._cuda_device = torch.cuda.current_device() if torch.cuda.is_available() else None
        self._pool = self._worker()
        self.failures = 0  # failed attempts so far (logged)

    def _worker(self) -> concurrent.futures.ThreadPoolExecutor:
        """One worker thread: a call that timed out may still be running; it is abandoned."""
        if self._cuda_device is None:
            return concurrent.futures.ThreadPoolExecutor(max_workers=1)
        return concurrent.futures.ThreadPoolExecutor(
            max_workers=1, initializer=torch.cuda.set_device, initargs=(self._cuda_device,)
        )

    def _keywords(self, columns: dict) -> dict:
        """The columns the source's score() takes: a source of (prompts, responses) alone gets none."""
        return keywords_for(keyword_parameters(self.source.score)[0], columns)

    def score(self, prompts: list[str], responses: list[str], **columns) -> list[float]:
        last = None
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(self.backoff * 2 ** (attempt - 1))
            future = self._pool.submit(self.source.score, prompts, responses, **self._keywords(columns))
            try:
                rewards = future.result(timeout=self.timeout)
            except concurrent.futures.TimeoutError:
                last = f"timed out after {self.timeout}s"
                self._pool = self._worker()
            except Exception as err:  # any failure of the source is retried
                last = f"{type(err).__name__}: {err}"
            else:
                if len(rewards) != len(prompts):
                    last = f"returned {len(rewards)} rewards for {len(prompts)} responses"
                else:
                    return [float(r) for r in rewards]
            self.failures += 1
        raise RewardSourceError(
            f"reward source {self.name!r} failed {self.retries + 1} times (last: {last}); "
            f"the prompt pool was not updated"
        )
