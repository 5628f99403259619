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
"""

import signal
import sys

import psutil

from nemo_optune.config import STOP_SIGNALS
from nemo_optune.runtime.preemption import EXIT_STOPPED

_stopping = {"signals": 0}  # stop signals passed on to the workers so far


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
