"""Ranks stop when their launcher dies (nemo_optune/runtime/launcher_watchdog.py).

torchrun starts each worker in its own session, so without the watchdog a SIGKILLed torchrun
leaves both ranks running to the end of the run, writing into the experiment directory."""

import os
import signal
import subprocess
import sys
import textwrap
import time

import psutil
from conftest import ROOT, TINY

MESSAGE = "is gone; rank"


def _gone(proc: psutil.Process) -> bool:
    """Exited (a zombie that init has not reaped yet counts: it runs no code)."""
    try:
        return not proc.is_running() or proc.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def _wait_gone(procs, timeout: float) -> list:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        alive = [p for p in procs if not _gone(p)]
        if not alive:
            return []
        time.sleep(0.2)
    return [p for p in procs if not _gone(p)]


def _kill_all(procs) -> None:
    """SIGKILL what is left: each process's group if it leads one, then the process."""
    for p in procs:
        try:
            if os.getpgid(p.pid) == p.pid and p.is_running():
                os.killpg(p.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError, psutil.NoSuchProcess):
            pass
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass


def _descendants(proc: psutil.Process) -> list:
    try:
        return proc.children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def _tail(path: str, n: int = 3000) -> str:
    with open(path, errors="replace") as f:
        return f.read()[-n:]


def test_watch_launcher_only_under_a_launcher(monkeypatch):
    from nemo_optune.runtime import launcher_watchdog

    for name in launcher_watchdog.LAUNCHER_ENV:
        monkeypatch.delenv(name, raising=False)
    assert not launcher_watchdog.started_by_launcher()
    assert not launcher_watchdog.watch_launcher()  # plain single-process run: no thread
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "x")
    assert launcher_watchdog.started_by_launcher()
    monkeypatch.setattr(launcher_watchdog.multiprocessing, "parent_process", lambda: object())
    assert not launcher_watchdog.started_by_launcher()  # a multiprocessing child of a rank


# A "launcher" starts a "rank" in its own session (as torchrun does); the rank starts the
# watchdog and a grandchild in its process group (like megatron's Manager process).
_LAUNCHER = textwrap.dedent("""
    import os, subprocess, sys
    rank = subprocess.Popen([sys.executable, "-c", sys.argv[1]], start_new_session=True,
                            env={**os.environ, "TORCHELASTIC_RUN_ID": "t", "RANK": "1"})
    print(rank.pid, flush=True)
    rank.wait()
""")
_RANK = textwrap.dedent("""
    import subprocess, sys, time
    from nemo_optune.runtime.launcher_watchdog import watch_launcher
    assert watch_launcher(poll_seconds=0.1)
    assert watch_launcher(poll_seconds=0.1)  # idempotent
    helper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    print(helper.pid, flush=True)
    time.sleep(60)
    print("rank finished", flush=True)
""")


def test_rank_and_its_group_stop_when_launcher_dies(tmp_path):
    log = tmp_path / "log.txt"
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    with open(log, "w") as out:
        launcher = subprocess.Popen(
            [sys.executable, "-c", _LAUNCHER, _RANK],
            stdout=subprocess.PIPE,
            stderr=out,
            text=True,
            env=env,
            start_new_session=True,
        )
    procs = []
    try:
        procs.append(psutil.Process(int(launcher.stdout.readline())))  # the rank
        helper_pid = launcher.stdout.readline()
        assert helper_pid, _tail(log)
        procs.append(psutil.Process(int(helper_pid)))
        launcher.kill()
        launcher.wait()
        assert _wait_gone(procs, timeout=10) == [], _tail(log)
        text = _tail(log)
        assert text.count(MESSAGE) == 1 and "launcher (pid" in text and "rank 1 stops" in text, text
    finally:
        launcher.kill()
        launcher.wait()
        _kill_all(procs)


def test_torchrun_sigkill_stops_both_ranks(tmp_path):
    exp = tmp_path / "exp"
    log = tmp_path / "torchrun.log"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        "examples/train_optune.py",
        "--config-name",
        "optune_tiny",
        *TINY,
        "trainer.iterations=200",
        f"exp_manager.exp_dir={exp}",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with open(log, "w") as out:
        torchrun = subprocess.Popen(
            cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    launcher = psutil.Process(torchrun.pid)
    seen: dict[int, psutil.Process] = {}
    try:
        # Both ranks call watch_launcher() before the process group forms, and rank 0 writes
        # config.json only after it has formed: from then on both ranks are watched.
        deadline = time.monotonic() + 120
        while not (exp / "config.json").exists():
            assert torchrun.poll() is None, f"torchrun exited early:\n{_tail(log)}"
            assert time.monotonic() < deadline, f"the ranks did not start in time:\n{_tail(log)}"
            time.sleep(0.5)
        workers = launcher.children()
        assert len(workers) == 2, (workers, _tail(log))
        for p in [*workers, *(d for w in workers for d in _descendants(w))]:
            seen[p.pid] = p
        assert not (exp / "summary.json").exists()

        torchrun.send_signal(signal.SIGKILL)  # the launcher only, not its session
        torchrun.wait()
        for w in workers:  # children started since (checkpoint Manager, ...) must go too
            for d in _descendants(w):
                seen.setdefault(d.pid, d)
        left = _wait_gone(list(seen.values()), timeout=15)
        assert left == [], f"still running after the launcher died: {left}\n{_tail(log)}"
        time.sleep(1)
        assert not (exp / "summary.json").exists()
        assert MESSAGE in _tail(log, 20000)
    finally:
        if torchrun.poll() is None:
            torchrun.kill()
            torchrun.wait()
        _kill_all(list(seen.values()))
        try:
            os.killpg(torchrun.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
