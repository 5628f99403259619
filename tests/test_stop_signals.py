"""Stop signals as a scheduler sends them: to every process of the run, the launcher included,
repeated, during a save; and no process of the run outlives a killed rank or launcher.

Slurm signals every pid of a job step. Before nemo_optune/runtime/child_processes.py, megatron's
checkpoint writer kept a multiprocessing Manager (and its resource tracker) alive from the first
save on: the signal killed it and the stop's save failed, and both outlived a SIGKILLed rank.
Before nemo_optune/launch.py, torchrun's agent died of SIGUSR1 and its ranks stopped unsaved."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import psutil
import pytest
from conftest import ROOT, TINY
from test_launcher_death import _gone, _kill_all, _tail, _wait_gone

from nemo_optune.config import STOP_SIGNALS

# A rank forks a process inside shielded() (as megatron forks its checkpoint writers) that
# stands for a writer in the middle of a long write.
_RANK = textwrap.dedent("""
    import multiprocessing, signal, time
    from nemo_optune.runtime.child_processes import shielded

    signal.signal(signal.SIGTERM, lambda *a: None)  # the rank's own handler only records
    with shielded():
        writer = multiprocessing.get_context("fork").Process(target=time.sleep, args=(120,))
        writer.start()
    print(writer.pid, flush=True)
    time.sleep(120)
""")


def _signal_masks(pid: int) -> tuple[int, int]:
    """The process's blocked and pending (sent to the process, not yet delivered) signal masks."""
    with open(f"/proc/{pid}/status") as f:
        fields = dict(line.split(":", 1) for line in f)
    return int(fields["SigBlk"], 16), int(fields["ShdPnd"], 16)


def test_a_checkpoint_writer_ignores_stop_signals_and_dies_with_its_rank():
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    rank = subprocess.Popen(
        [sys.executable, "-c", _RANK],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        start_new_session=True,
    )
    procs = [psutil.Process(rank.pid)]
    try:
        writer_pid = rank.stdout.readline()
        assert writer_pid, rank.stderr.read()[-3000:]
        writer = psutil.Process(int(writer_pid))
        procs.append(writer)
        numbers = [getattr(signal, name) for name in STOP_SIGNALS]
        for number in numbers:
            writer.send_signal(number)
        # Each arrived (kill() queues it at once) and waits, blocked, while the writer runs on.
        blocked, pending = _signal_masks(writer.pid)
        bits = sum(1 << (number - 1) for number in numbers)
        assert blocked & bits == bits and pending & bits == bits, (hex(blocked), hex(pending))
        assert not _gone(writer)
        rank.kill()
        rank.wait()
        assert _wait_gone([writer], timeout=10) == []
    finally:
        rank.kill()
        rank.wait()
        _kill_all(procs)


# ------------------------------------------------ real runs under a launcher (slow tier)
RUN = TINY + ["trainer.iterations=6", "exp_manager.checkpoint_every=1", "model.tensor_model_parallel_size=2"]
LAUNCH = [sys.executable, "-m", "nemo_optune.launch"]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]


def _start(launcher: list[str], exp, log, sft_checkpoint: str) -> subprocess.Popen:
    """A TP2 run under `launcher` in its own session; returns once its first periodic
    checkpoint is published (megatron's writer has run on both ranks)."""
    cmd = [*launcher, "--standalone", "--nproc_per_node", "2", "examples/train_optune.py", "--config-name"]
    cmd += ["optune_tiny", *RUN, f"model.restore_from_path={sft_checkpoint}", f"exp_manager.exp_dir={exp}"]
    with open(log, "w") as out:
        run = subprocess.Popen(
            cmd,
            cwd=ROOT,
            env={**os.environ, "OMP_NUM_THREADS": "1"},
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    deadline = time.monotonic() + 900  # generous: the slow tier may share its cores
    while not (exp / "checkpoints" / "iter_000001").exists():
        assert run.poll() is None, f"the run exited early:\n{_tail(log)}"
        assert time.monotonic() < deadline, f"no checkpoint in time:\n{_tail(log)}"
        time.sleep(0.2)
    return run


def _processes(run: subprocess.Popen) -> list[psutil.Process]:
    """The launcher and every process under it (Slurm signals all of a step's processes)."""
    launcher = psutil.Process(run.pid)
    return [launcher, *launcher.children(recursive=True)]


def _signal(processes, number: int) -> None:
    for process in processes:
        try:
            process.send_signal(number)
        except psutil.NoSuchProcess:
            pass


def _during_a_save(checkpoints, timeout: float = 60) -> bool:
    """Wait for a checkpoint being written (a .tmp directory); False if none was seen."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(name.endswith(".tmp") for name in os.listdir(checkpoints)):
            return True
        time.sleep(0.005)
    return False


def _assert_complete(checkpoint) -> None:
    manifest = json.loads((checkpoint / "manifest.json").read_text())
    for name, entry in manifest["files"].items():
        assert (checkpoint / name).stat().st_size == entry["size"], name


# (launcher, signal, who gets it, exit status): Slurm signals every process of the step; a
# kill or a terminal reaches the launcher only. Plain torchrun still saves on SIGTERM, but
# exits 1 (it counts the ranks' 3 as a failure).
STOPS = {
    "launch-SIGUSR1-every-process-twice": (LAUNCH, "SIGUSR1", "every", 2, 3),
    "launch-SIGTERM-every-process-twice": (LAUNCH, "SIGTERM", "every", 2, 3),
    "launch-SIGUSR1-launcher-only": (LAUNCH, "SIGUSR1", "launcher", 1, 3),
    "torchrun-SIGTERM-every-process": (TORCHRUN, "SIGTERM", "every", 1, 1),
}


@pytest.mark.slow
@pytest.mark.parametrize("stop", STOPS, ids=list(STOPS))
def test_a_stop_signal_under_a_launcher_saves_a_complete_checkpoint(stop, sft_checkpoint, tmp_path):
    """After a periodic save, the signal (and a second one while the stop's checkpoint is
    being written): the ranks save a complete checkpoint and the launcher exits with the status."""
    launcher, name, who, times, status = STOPS[stop]
    exp, log = tmp_path / "exp", tmp_path / "run.log"
    run = _start(launcher, exp, log, sft_checkpoint)
    seen = _processes(run)
    try:
        _signal(seen if who == "every" else seen[:1], getattr(signal, name))
        if times == 2:
            assert _during_a_save(exp / "checkpoints"), _tail(log)
            _signal(_processes(run), getattr(signal, name))
        assert run.wait(timeout=300) == status, _tail(log)
        summary = json.loads((exp / "summary.json").read_text())
        assert summary["stopped_by"] == name
        done = len(summary["iterations"])
        names = sorted(os.listdir(exp / "checkpoints"))  # the stop's is the newest, at a safe point
        assert names[-1].startswith(f"iter_{done:06d}") and not any(n.endswith(".tmp") for n in names), names
        _assert_complete(exp / "checkpoints" / names[-1])
        assert f"[stop] {name}: checkpoint {names[-1]} written" in _tail(log, 100000)
    finally:
        if run.poll() is None:
            run.kill()
            run.wait()
        _kill_all(seen)


@pytest.mark.slow
@pytest.mark.parametrize("victim", ["rank1", "rank1-rank0-hung", "launcher"])
def test_no_process_of_the_run_outlives_a_killed_rank_or_launcher(victim, sft_checkpoint, tmp_path):
    """After a periodic save (megatron's writer has run), SIGKILL rank 1 or the launcher:
    every process of the run is gone within 10 s (a Manager and a resource tracker per rank
    used to stay for good). rank1-rank0-hung: rank 0 is SIGSTOPped first, as a survivor busy
    away from collectives (a generation chunk at DP>1) or hung in one that would not see its
    peer's loss: torchrun gave it 30 s (--shutdown-timeout), the launcher FAILURE_GRACE_SECONDS."""
    exp, log = tmp_path / "exp", tmp_path / "run.log"
    run = _start(LAUNCH, exp, log, sft_checkpoint)
    seen = _processes(run)
    try:
        workers = {w.environ().get("RANK"): w for w in psutil.Process(run.pid).children()}
        assert sorted(workers) == ["0", "1"], workers
        if victim == "rank1-rank0-hung":
            workers["0"].suspend()
        (seen[0] if victim == "launcher" else workers["1"]).kill()
        assert _wait_gone(seen, timeout=10) == [], f"still running: {[p.cmdline() for p in seen if not _gone(p)]}"
    finally:
        if run.poll() is None:
            run.kill()
        run.wait()
        _kill_all(seen)
