"""Stop a rank when the launcher that started it (torchrun, srun) dies.

torchrun starts every worker in its own session, so a SIGKILLed torchrun (or a node agent that
crashed) leaves its ranks running: they finish the run into the experiment directory that the
user believes is dead, and race any rerun. A daemon thread polls os.getppid(): when the parent
dies the kernel re-parents the rank (to init or to a subreaper), its parent pid changes, and the
rank stops, with its whole process group when it leads one.

Why not prctl(PR_SET_PDEATHSIG) as well: the death signal fires when the parent *thread* that
forked the rank exits, not when the parent process dies, so a launcher that starts workers from
a helper thread (torchrun's process contexts, slurmstepd, a future version of either) would kill
a healthy run (a rank's own helpers, forked by the thread that outlives them, do use it:
child_processes). A change of parent pid happens only when the whole parent process is gone, so
polling it never fires falsely; the price is up to one poll interval of delay, which is nothing
next to a training step.
"""

import multiprocessing
import os
import signal
import sys
import threading
import time

POLL_SECONDS = 1.0

# torchrun (torch.distributed.elastic) sets the first two; srun sets SLURM_STEP_ID for its tasks
# (not for the batch script itself, so a plain `python` inside sbatch is not watched).
LAUNCHER_ENV = ("TORCHELASTIC_RUN_ID", "GROUP_RANK", "SLURM_STEP_ID")

_lock = threading.Lock()
_watching_pid: int | None = None  # the pid that started the thread: a forked child starts its own


def started_by_launcher() -> bool:
    """True when a launcher started this process directly. Children that multiprocessing
    started (spawn, fork or forkserver) inherit the launcher's environment but their parent is a
    rank, not the launcher: they are not watched."""
    if multiprocessing.parent_process() is not None:
        return False
    return any(name in os.environ for name in LAUNCHER_ENV)


def _rank() -> str:
    for name in ("RANK", "SLURM_PROCID"):
        if name in os.environ:
            return os.environ[name]
    return "?"


def _stop(launcher_pid: int) -> None:
    try:
        print(
            f"error: launcher (pid {launcher_pid}) is gone; rank {_rank()} stops so that nothing more "
            f"is written to the experiment directory",
            file=sys.stderr,
            flush=True,
        )
    except Exception:  # stderr may be a pipe the dead launcher held: stop regardless
        pass
    if os.getpgrp() == os.getpid():  # we lead our group: take its children along
        os.killpg(os.getpgrp(), signal.SIGKILL)
    os._exit(1)


def _watch(launcher_pid: int, poll_seconds: float) -> None:
    while True:
        time.sleep(poll_seconds)
        if os.getppid() != launcher_pid:
            _stop(launcher_pid)


def watch_launcher(poll_seconds: float = POLL_SECONDS, force: bool = False) -> bool:
    """Start the watchdog once per process if a launcher started this process (or `force`).
    Returns whether this process is watched."""
    global _watching_pid
    with _lock:
        if _watching_pid == os.getpid():
            return True
        if not (force or started_by_launcher()):
            return False
        launcher_pid = os.getppid()
        threading.Thread(
            target=_watch, args=(launcher_pid, poll_seconds), name="launcher-watchdog", daemon=True
        ).start()
        _watching_pid = os.getpid()
        return True
