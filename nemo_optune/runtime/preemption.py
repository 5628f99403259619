"""Stopping early on a cluster: preemption signals and a wall-clock budget.

Slurm preempts or time-limits a job by sending a signal (SIGTERM, or the one chosen with
`--signal`) and, after a grace period, SIGKILL. The handlers here only record the signal: they
never raise, so a checkpoint being written is never interrupted half-way (a second signal is
noted and changes nothing). At every safe point (after an optimizer step, a generation chunk,
an iteration) all ranks agree (one all-reduce) whether to stop; if so each rank saves the
checkpoint and the process exits with EXIT_STOPPED, and the same command resumes.
`trainer.max_time` stops the same way when the stretch to the next safe point and its save
would not fit in what is left of the budget.
"""

import signal
import sys
import time

import torch
import torch.distributed as dist

from nemo_optune.runtime.distributed import comm_device

EXIT_STOPPED = 3  # saved a checkpoint and stopped early (a stop signal or trainer.max_time): rerun to resume
REASONS = ("", "signal", "max_time")  # index = the all-reduced code, higher wins


class StopRequests:
    def __init__(self, signal_names: list[str], max_time_seconds: float | None, start: float):
        self.max_time, self.start = max_time_seconds, start
        self.signal_name: str | None = None
        self.previous = {}
        for name in signal_names:
            number = getattr(signal, name)
            self.previous[number] = signal.signal(number, self._record)

    def _record(self, number, frame) -> None:
        name = signal.Signals(number).name
        if self.signal_name is None:
            self.signal_name = name
            print(
                f"[stop] {name} received: saving a checkpoint at the next safe point (step or generation chunk), then exiting "
                f"with status {EXIT_STOPPED}",
                file=sys.stderr,
                flush=True,
            )
        else:
            print(
                f"[stop] {name} received again: already stopping (a checkpoint being written is finished, "
                f"not cut short)",
                file=sys.stderr,
                flush=True,
            )

    def restore(self) -> None:
        """Put back the handlers that were there before (in-process runs, tests)."""
        for number, handler in self.previous.items():
            signal.signal(number, handler)
        self.previous = {}

    def agree(self, next_seconds: float, save_due: bool) -> tuple[str | None, bool]:
        """Collective, at a safe point: (the reason to stop: 'SIGTERM' (the signal's name),
        'max_time' or None, the same on every rank: a signal that reached one rank stops all;
        whether any rank finds a wall-clock checkpoint due), in one all-reduce; `next_seconds`:
        up to the next safe point and its save."""
        code = 1 if self.signal_name else 0
        if self.max_time is not None and time.perf_counter() - self.start + next_seconds > self.max_time:
            code = 2
        flag = torch.tensor([code, int(save_due)], dtype=torch.long, device=comm_device())
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        code, save = int(flag[0]), bool(flag[1])
        if code == 0:
            return None, save
        return (self.signal_name or "a stop signal (on another rank)") if REASONS[
            code
        ] == "signal" else "max_time", save
