"""A rank's helper processes (megatron's checkpoint writers) ignore stop signals and die with it.

Slurm signals every process of a job step (all pids of its cgroup), not only the ranks: at
preemption, at the time limit, or on `scancel --signal`. A helper process that dies of the
signal (or survives its SIGKILLed rank) breaks the stop's checkpoint or lingers:

- megatron's sync save starts, on its first use, a multiprocessing Manager (a spawned server
  process, with multiprocessing's resource tracker) only to carry the write results back; its
  writers then run in the rank. A signal to every process killed the Manager and the next save
  failed ("[Errno 32] Broken pipe"), and both outlived a SIGKILLed rank. The results now go
  through an in-process queue: no Manager, no tracker, no long-lived helper at all.
- Its writers are forked per save and write one bucket each. They are forked with the stop
  signals blocked (the mask is inherited; the rank's own threads still take the signal and
  record it: it waits for the safe point as always), and with PR_SET_PDEATHSIG, so they die
  with the rank instead of finishing a write nobody will publish.

PR_SET_PDEATHSIG fires when the *thread* that forked the child exits: the writers are forked
by the thread that runs the save, which outlives them (see launcher_watchdog for why ranks,
which a launcher starts, are watched by polling instead).
"""

import contextlib
import ctypes
import os
import queue
import signal
import sys
import threading

from nemo_optune.config import STOP_SIGNALS

_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
EXIT_PARENT_GONE = 1
# Looked up now, not in the forked child (no dlopen between fork and the child's first steps).
_prctl = ctypes.CDLL(None, use_errno=True).prctl if sys.platform.startswith("linux") else None

# In the thread inside shielded(): depth (nesting) and pid; a forked child starts with a copy.
_state = threading.local()


def _die_with_parent() -> None:
    """In a child forked inside shielded(): SIGKILL when the thread that forked it ends (its
    process dying included)."""
    if getattr(_state, "depth", 0) == 0 or _prctl is None:
        return
    _state.depth = 0  # the child's own children are not a rank's helpers
    if _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        return
    if os.getppid() != _state.pid:  # the parent died before prctl: no death signal will come
        os._exit(EXIT_PARENT_GONE)


os.register_at_fork(after_in_child=_die_with_parent)


def _no_results_manager() -> None:
    """Hand megatron's writer an in-process results queue before it makes a Manager for one.
    Sync saves (the only kind here) put and get the results in the rank itself; only an async
    save, whose writer is another process, needs the Manager's queue."""
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    if filesystem_async._results_queue is None:
        filesystem_async._results_queue = queue.Queue()


@contextlib.contextmanager
def shielded():
    """Around code that forks helper processes: they ignore the stop signals and die with this
    process. This thread blocks the stop signals meanwhile; one that reaches the process is
    still recorded as always (by another thread, or on unblocking)."""
    stops = {getattr(signal, name) for name in STOP_SIGNALS}
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, stops)
    _state.depth, _state.pid = getattr(_state, "depth", 0) + 1, os.getpid()
    try:
        yield
    finally:
        _state.depth -= 1
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


@contextlib.contextmanager
def checkpoint_writers():
    """Around a megatron dist_checkpointing save: no Manager, shielded writers."""
    _no_results_manager()
    with shielded():
        yield
