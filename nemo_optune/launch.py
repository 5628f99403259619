"""torchrun for nemo_optune: a stop signal to the launcher saves a checkpoint, and it exits 3.

    python -m nemo_optune.launch --nproc_per_node 2 examples/train_optune.py model.tensor_model_parallel_size=2

Takes torchrun's arguments and runs torch.distributed.run in this process, except that on a
stop signal (SIGTERM, SIGINT, SIGUSR1, SIGUSR2, SIGHUP: what Slurm, scancel or a terminal send)
the agent passes the signal on to its workers and keeps waiting for them: the ranks save a
checkpoint at the next safe point and exit 3, and so does this launcher. Plain torchrun dies of
SIGUSR1 and SIGUSR2 (its ranks, their launcher gone, stop without saving) and, on the others,
SIGKILLs the workers after --shutdown-timeout (30 s), which can cut the stop's save short; it
exits 1 when the ranks exit 3. Whether the ranks got the signal too (Slurm signals every
process of the step) or only the launcher (kill, a terminal), they stop once: a rank notes a
repeated signal and carries on saving. SIGQUIT (and whatever --signals-to-handle adds) keeps
torchrun's handling: pass it on, wait --shutdown-timeout, then SIGKILL.

When a worker fails (exits with a status other than 0 or 3, or dies of a signal) and no stop
signal came, the others get SIGTERM and, FAILURE_GRACE_SECONDS later, SIGKILL, instead of
torchrun's 30 s: with a peer gone no collective, hence no checkpoint, can complete. A survivor
in a collective sees the loss at once and is gone well within the grace (the SIGTERM ends it
once its own error path has put the default handlers back); one busy away from collectives (a
generation chunk at DP>1) or hung in one records the SIGTERM as a stop request and would wait
the whole 30 s for a save that cannot happen. After a stop signal, and when ranks exit 3 (a
stop they agreed on), their save keeps torchrun's time.
"""

import signal
import sys

import psutil

from nemo_optune.config import STOP_SIGNALS
from nemo_optune.runtime.preemption import EXIT_STOPPED

_stopping = {"signals": 0}  # stop signals passed on to the workers so far
FAILURE_GRACE_SECONDS = 3


def _pass_on(number, frame) -> None:
    """Hand the signal to the workers (the agent's children) and return to waiting for them.
    With no workers: after an earlier stop signal they have exited (e.g. srun's
    --kill-on-bad-exit SIGTERM once another node's launcher exited 3): nothing to do; before
    they exist (rendezvous) there is nothing to save: torchrun's handling."""
    from torch.distributed.elastic.multiprocessing.api import _terminate_process_handler

    workers = psutil.Process().children()
    if not workers:
        if _stopping["signals"]:
            return
        _terminate_process_handler(number, frame)
    _stopping["signals"] += 1
    name = signal.Signals(number).name
    print(f"[launch] {name}: passed on to {len(workers)} worker(s); waiting for them to save and exit", file=sys.stderr)
    for worker in workers:
        try:
            worker.send_signal(number)
        except psutil.NoSuchProcess:  # exited meanwhile
            pass


def _short_grace_after_a_failure() -> None:
    """Wrap torchrun's worker teardown (SubprocessContext._close: on the first failed worker, on
    the agent's shutdown) so that the survivors of a failed worker get FAILURE_GRACE_SECONDS."""
    from torch.distributed.elastic.multiprocessing.api import SubprocessContext

    close = SubprocessContext._close

    def _close(self, death_sig, timeout=30):
        failed = any(failure.exitcode != EXIT_STOPPED for failure in self._failures.values())
        if failed and not _stopping["signals"]:
            timeout = min(timeout, FAILURE_GRACE_SECONDS)
        close(self, death_sig, timeout)

    SubprocessContext._close = _close  # type: ignore[method-assign]


def main(argv: list[str] | None = None) -> None:
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, record
    from torch.distributed.run import parse_args, run

    args = parse_args(sys.argv[1:] if argv is None else argv)
    # torchrun installs its handlers when it starts the workers: leave the stop signals to ours.
    args.signals_to_handle = ",".join(
        name for name in (s.strip() for s in args.signals_to_handle.split(",")) if name not in STOP_SIGNALS
    )
    for name in STOP_SIGNALS:
        signal.signal(getattr(signal, name), _pass_on)
    _short_grace_after_a_failure()
    try:
        record(run)(args)
    except ChildFailedError as err:
        codes = {failure.exitcode for failure in err.failures.values()}
        if codes != {EXIT_STOPPED}:
            raise
        print(
            f"[launch] the workers saved a checkpoint and stopped (exit {EXIT_STOPPED}): the same command resumes",
            file=sys.stderr,
        )
        sys.exit(EXIT_STOPPED)


if __name__ == "__main__":
    main()
