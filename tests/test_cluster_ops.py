"""Operating on a cluster: trainer.max_time stops with a checkpoint (exit 3) and the rerun
resumes; stop-signal bookkeeping; a rank lost mid-run makes the survivor exit non-zero within
the collective timeout, naming it. (Stop signals with bit-identical resume: test_resume.py.)"""

import os
import signal
import subprocess
import sys
import time

import pytest
from conftest import ROOT, TINY

from nemo_optune.runtime.preemption import EXIT_STOPPED, StopRequests

TRAIN = [sys.executable, os.path.join(ROOT, "examples", "train_optune.py")]


def test_max_time_saves_and_stops_then_the_same_command_resumes(sft_checkpoint, tmp_path):
    run = (
        TRAIN
        + TINY
        + [
            f"model.restore_from_path={sft_checkpoint}",
            f"exp_manager.exp_dir={tmp_path}",
            "trainer.iterations=1",
            "exp_manager.checkpoint_every=0",
        ]
    )
    # One second is used up before the first safe point: the run stops after the first generation chunk.
    out = subprocess.run(run + ["trainer.max_time=00:00:00:01"], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert out.returncode == EXIT_STOPPED, out.stderr[-2000:]
    assert (
        "[stop] max_time: checkpoint iter_000000_gen_000001 written (inside iteration 1, after generation chunk 1); "
        "exiting with status 3" in out.stdout
    )
    assert os.listdir(tmp_path / "checkpoints") == ["iter_000000_gen_000001"]
    again = subprocess.run(
        run + ["trainer.max_time=01:00:00:00"], capture_output=True, text=True, cwd=ROOT, timeout=300
    )
    assert again.returncode == 0, again.stderr[-2000:]
    assert "0 iterations done (inside iteration 1, after generation chunk 1)" in again.stdout
    assert "[iter 1/1]" in again.stdout


def test_stop_requests_record_signals_and_the_budget():
    previous = signal.getsignal(signal.SIGUSR1)
    stop = StopRequests(["SIGUSR1"], max_time_seconds=100.0, start=time.perf_counter())
    try:
        assert stop.agree(10.0, False)[0] is None
        assert stop.agree(200.0, False)[0] == "max_time"
        os.kill(os.getpid(), signal.SIGUSR1)
        os.kill(os.getpid(), signal.SIGUSR1)  # again: noted, nothing raised
        assert stop.agree(10.0, False)[0] == "SIGUSR1"
        assert stop.agree(200.0, False)[0] == "max_time"  # the budget outranks a signal
    finally:
        stop.restore()
    assert signal.getsignal(signal.SIGUSR1) is previous


@pytest.mark.parametrize("value", ["1:xx", "00:00:00:00", "1:2:3:4:5"])
def test_a_bad_max_time_names_the_key(value):
    from nemo_optune.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="config key trainer.max_time:"):
        load_config("optune_tiny", [f"trainer.max_time={value}"])


def test_a_lost_rank_makes_the_other_exit_naming_it_within_the_timeout(sft_checkpoint, tmp_path):
    """Two ranks started as srun starts them (no agent that would kill the survivor); rank 1 is
    SIGKILLed during iteration 2. Rank 0 must not wait: it exits non-zero, naming rank 1."""
    from nemo_optune.runtime.distributed import free_port

    port, timeout = free_port(), 20
    procs = []
    for rank in range(2):
        env = {
            **os.environ,
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "WORLD_SIZE": "2",
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "OMP_NUM_THREADS": "1",
        }
        procs.append(
            subprocess.Popen(
                TRAIN
                + TINY
                + [
                    f"model.restore_from_path={sft_checkpoint}",
                    f"exp_manager.exp_dir={tmp_path}",
                    "trainer.iterations=20",
                    "model.tensor_model_parallel_size=2",
                    f"trainer.collective_timeout_seconds={timeout}",
                ],
                cwd=ROOT,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    try:
        for line in procs[0].stdout:
            if line.startswith("[iter 1/20]"):
                break
        procs[1].kill()
        killed = time.monotonic()
        code = procs[0].wait(timeout=timeout + 30)
        waited = time.monotonic() - killed
    finally:
        for p in procs:
            p.kill()
    error = procs[0].stderr.read().strip().splitlines()[-1]
    assert code == 1 and waited < timeout, (code, waited, error)
    assert error.startswith("error: rank 0: lost rank 1 (no heartbeat), during "), error
    print(f"rank 0 exited {waited:.1f} s after rank 1 was killed: {error}")


def test_rendezvous_ports_are_drawn_below_the_ephemeral_range():
    """A port the OS hands out (bind to 0) is ephemeral: gloo's own outgoing connections can be
    given it before the store binds it (EADDRINUSE, seen in the suite). free_port draws below."""
    from nemo_optune.runtime.distributed import EPHEMERAL_PORTS, free_port

    low = int(open(EPHEMERAL_PORTS).read().split()[0]) if os.path.exists(EPHEMERAL_PORTS) else 32768
    ports = {free_port() for _ in range(20)}
    assert all(10000 <= p < low for p in ports), ports
    assert len(ports) > 1  # drawn, not one fixed port for every run
