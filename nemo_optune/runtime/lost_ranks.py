"""No hung ranks: when a collective fails because a peer died (gloo and NCCL see the closed
connection at once) or waited past trainer.collective_timeout_seconds, every surviving rank
exits non-zero with one line naming the lost rank(s) and the phase it was in.

Which rank is lost: every rank bumps its own counter in the rendezvous store once a second
from a daemon thread (a heartbeat); a survivor reads the counters twice, a few seconds apart,
and names the ranks whose counter did not move. Unlike asking the survivors to check in, this
cannot wait on a survivor that is itself blocked in a collective.
"""

import os
import sys
import threading
import time

import torch.distributed as dist

HEARTBEAT_SECONDS = 1.0
PREFIX = "nemo_optune/heartbeat/"
EXIT_RANK_LOST = 1
_where = {"phase": "start-up", "iteration": None}
_heartbeat: dict = {}  # stop (threading.Event) and thread, while this process beats


def note_phase(phase: str, iteration: int | None = None) -> None:
    """Where this rank is, for the message if a peer is lost (cheap: two dict writes)."""
    _where["phase"] = phase
    if iteration is not None:
        _where["iteration"] = iteration


def where() -> str:
    it = _where["iteration"]
    return f"{_where['phase']}" + (f" of iteration {it}" if it is not None else "")


def start_heartbeat() -> None:
    """This rank's heartbeat thread (multi-process runs only; one per process)."""
    if not dist.is_initialized() or dist.get_world_size() == 1 or _heartbeat:
        return
    store, key = dist.distributed_c10d._get_default_store(), f"{PREFIX}{dist.get_rank()}"
    stop = threading.Event()

    def beat():
        while not stop.is_set():
            try:
                store.add(key, 1)
            except Exception:  # the store is gone: the failure handler will say so
                return
            stop.wait(HEARTBEAT_SECONDS)

    thread = threading.Thread(target=beat, name="nemo_optune-heartbeat", daemon=True)
    thread.start()
    _heartbeat.update(stop=stop, thread=thread)


def stop_heartbeat() -> None:
    """Before the process group is destroyed: a thread still inside the store when rank 0's
    store server is torn down aborts the process at exit ("terminate called without an active
    exception", seen in tests after a finished run)."""
    if _heartbeat:
        _heartbeat["stop"].set()
        _heartbeat["thread"].join(timeout=10 * HEARTBEAT_SECONDS)
        _heartbeat.clear()


def is_collective_failure(err: BaseException) -> bool:
    """A collective that failed on a lost or stuck peer (not a bug of this rank's own)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return False
    if isinstance(err, getattr(dist, "DistBackendError", ())):
        return True
    text = str(err)
    return isinstance(err, RuntimeError) and any(
        s in text
        for s in (
            "Connection closed by peer",
            "Connection reset by peer",
            "Timed out waiting",
            "Gloo",
            "NCCL",
            "Socket Timeout",
            "Broken pipe",
        )
    )


def lost_ranks(window: float = 3 * HEARTBEAT_SECONDS) -> list[int] | None:
    """Ranks whose heartbeat stood still over `window` seconds; None if the store is unreachable."""
    try:
        store, world = dist.distributed_c10d._get_default_store(), dist.get_world_size()
        before = [store.add(f"{PREFIX}{r}", 0) for r in range(world)]
        time.sleep(window)
        after = [store.add(f"{PREFIX}{r}", 0) for r in range(world)]
    except Exception:
        return None
    return [r for r in range(world) if after[r] == before[r] and r != dist.get_rank()]


def exit_for_lost_rank(err: BaseException, timeout_seconds: float) -> None:
    """Name the lost rank(s) and this rank's phase on stderr, then leave at once (a normal
    exit could wait on the dead peer again in shutdown or at exit handlers)."""
    rank, lost = dist.get_rank(), lost_ranks()
    if lost is None:
        who = (
            f"the rendezvous store at {os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')} is gone "
            f"(rank 0 or its launcher died)"
        )
    elif lost:
        who = f"lost rank{'s' if len(lost) > 1 else ''} {', '.join(map(str, lost))} (no heartbeat)"
    else:
        who = (
            f"a collective failed though every rank's heartbeat is alive: a rank is stuck or its connection "
            f"broke (trainer.collective_timeout_seconds={timeout_seconds:g})"
        )
    first = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
    print(f"error: rank {rank}: {who}, during {where()}; stopping this rank ({first})", file=sys.stderr, flush=True)
    sys.stdout.flush()
    os._exit(EXIT_RANK_LOST)
