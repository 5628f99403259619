"""The Slurm batch scripts in examples/slurm, run with bash as Slurm runs a batch script, under a
local stand-in for srun and scontrol (tests/slurm_standin: its README says what it models).

2 "nodes" x 2 tasks = world 4 at TP=2 (DP=2), gloo on CPU, from the shared SFT warm start, in
three 4-process launches: the torchrun script runs to the end; the srun script gets SIGUSR1 in
its batch shell (what --signal=B:USR1@... does), the ranks save and stop, the script requeues
the job; the rerun (SLURM_RESTART_COUNT=1) resumes, runs to the end and ends bit-identical to
the torchrun run; these real runs and the torchrun script's stop are in the slow tier (make
test-slow, ~3 min). In the default tier a fake trainer checks, cheaply, the scripts' logic: the
pyxis options srun gets and the exit-status and requeue protocol.
"""

import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest
import torch
from conftest import ROOT, TINY

from nemo_optune.runtime.distributed import free_port

STANDIN = os.path.join(ROOT, "tests", "slurm_standin")
FAKE_TRAINER = os.path.join(STANDIN, "fake_trainer")
MULTINODE = os.path.join(ROOT, "examples", "slurm", "optune_multinode.sbatch")
TORCHRUN = os.path.join(ROOT, "examples", "slurm", "optune_torchrun.sbatch")
ITERATIONS = 4  # SIGUSR1 comes after iteration 1 is printed: iteration 2 is the margin to stop before the end
STOP_REASONS = ("SIGUSR1", "a stop signal (on another rank)")  # rank 0's own signal may come after the vote
LAYOUT = {"tp": 2, "pp": 1, "dp": 2, "world_size": 4}
# What a checkpoint holds that must match bit for bit: model and optimizer shards, every rank's
# RNG states, common state, the pool's token rows. (metadata files and trainer_state.pt hold
# paths and the config; the pool's scalars are compared as tensors.)
COMPARED = ("__", "rng_rank", "common.pt", "pool_tokens")
# A stop's checkpoint: at the next safe point inside an iteration (after a generation chunk, the
# reference pass or an optimizer step), or at an iteration's end.
STOP_CHECKPOINT = re.compile(r"iter_\d{6}(_(gen|ref|step)_\d{6})?")


def _port_is_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _job_id_withfree_port() -> int:
    """A job id whose port, 29500 + id % 1000 as the scripts derive it, is free here."""
    for _ in range(200):
        job = random.randrange(100_000, 1_000_000)
        if _port_is_free(29500 + job % 1000):
            return job
    raise RuntimeError("no free port in 29500-30499")


def batch_env(state: str, exp: str, job_id: int, tasks_per_node: int = 2, **extra) -> dict:
    """The environment Slurm gives a batch script of a 2-node job, plus the stand-in's settings."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("SLURM", "MASTER_", "TORCHELASTIC", "PET_", "CONTAINER_", "NEMO_"))
        and k
        not in (
            "RANK",
            "LOCAL_RANK",
            "WORLD_SIZE",
            "LOCAL_WORLD_SIZE",
            "GROUP_RANK",
            "EXP_DIR",
            "EXP_ROOT",
            "MAX_TIME",
            "ENGINE",
            "RECIPE",
            "TP",
            "PP",
        )
    }
    env.update(
        {
            "PATH": os.pathsep.join([STANDIN, os.path.dirname(sys.executable), env.get("PATH", "")]),
            "SLURM_JOB_ID": str(job_id),
            "SLURM_JOBID": str(job_id),
            "SLURM_JOB_NAME": "optune",
            "SLURM_JOB_NODELIST": "node[1-2]",
            "SLURM_NODELIST": "node[1-2]",
            "SLURM_NNODES": "2",
            "SLURM_JOB_NUM_NODES": "2",
            "SLURM_NTASKS_PER_NODE": str(tasks_per_node),
            "SLURM_NTASKS": str(2 * tasks_per_node),
            "SLURM_TASKS_PER_NODE": f"{tasks_per_node}(x2)",
            "SLURM_SUBMIT_DIR": ROOT,
            "SLURMD_NODENAME": "node1",
            # node1 is not a name this machine resolves: the stand-in's scontrol prints its address.
            "SLURM_STANDIN_DIR": state,
            "SLURM_STANDIN_HOST_ADDRS": "node1=127.0.0.1,node2=127.0.0.1",
            "EXP_DIR": exp,
            "RECIPE": "optune_tiny",
            "TP": "2",
            "PP": "1",
            "OMP_NUM_THREADS": "1",
            "PYTHONUNBUFFERED": "1",
        }
    )
    env.update({k: str(v) for k, v in extra.items()})
    return env


def run_batch(script: str, env: dict, args: list[str], on_line=None, timeout: float = 240) -> tuple[int, str]:
    """bash SCRIPT ARGS in the repository, as slurmd starts a batch script; on_line(line, proc)
    sees the merged output as it comes. Returns (exit status, output)."""
    proc = subprocess.Popen(
        ["bash", script, *args],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    lines = []

    def read():
        for line in proc.stdout:
            lines.append(line)
            if on_line is not None:
                on_line(line, proc)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        code = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # bash and srun; the ranks stop when srun is gone
        raise AssertionError(f"{os.path.basename(script)} ran past {timeout}s:\n{''.join(lines)[-4000:]}") from None
    reader.join(timeout=30)
    return code, "".join(lines)


def _records(state: str, name: str) -> list[dict]:
    path = os.path.join(state, name)
    return [json.loads(line) for line in open(path)] if os.path.exists(path) else []


def _overrides(sft_checkpoint: str) -> list[str]:
    # checkpoint_every=0: a checkpoint at the end only, so one before it is the stop's.
    return TINY + [
        f"model.restore_from_path={sft_checkpoint}",
        f"trainer.iterations={ITERATIONS}",
        "exp_manager.checkpoint_every=0",
    ]


def _signal_at_first_iteration(sent: list):
    """on_line: SIGUSR1 to the batch shell once rank 0 has printed its first iteration."""

    def on_line(line, proc):
        if line.startswith("[iter 1/") and not sent:
            sent.append(time.monotonic())
            os.kill(proc.pid, signal.SIGUSR1)

    return on_line


def _checkpoint(exp: str, iteration: int) -> tuple[dict, dict]:
    """(sha256 of the compared files, pool tensors) of checkpoints/iter_NNNNNN."""
    path = os.path.join(exp, "checkpoints", f"iter_{iteration:06d}")
    files = json.load(open(os.path.join(path, "manifest.json")))["files"]
    hashes = {name: f["sha256"] for name, f in files.items() if name.startswith(COMPARED)}
    pool = torch.load(os.path.join(path, "trainer_state.pt"), weights_only=False)["pool"]
    return hashes, pool


def _assert_srun_ended_well(end: dict, out: str) -> None:
    """srun returned 0, or (seen about 1 run in 6 under torchrun: a worker aborts in C++ at
    interpreter exit, "terminate called without an active exception", after the run completed)
    it did not and the script, seeing summary.json written by this step, said the run finished."""
    if end["returncode"] != 0:
        assert "the run ended with status 0" in out, out[-4000:]


def test_both_scripts_parse():
    for script in (MULTINODE, TORCHRUN):
        subprocess.run(["bash", "-n", script], check=True)


def test_scontrol_standin_expands_hostlists_like_slurm():
    env = {**os.environ, "PATH": STANDIN + os.pathsep + os.environ["PATH"]}
    env.pop("SLURM_STANDIN_HOST_ADDRS", None)
    out = subprocess.run(
        ["scontrol", "show", "hostnames", "node[1-2],gpu[07-08,10]"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    assert out == ["node1", "node2", "gpu07", "gpu08", "gpu10"]


@pytest.fixture(scope="module")
def uninterrupted(sft_checkpoint, tmp_path_factory):
    """The torchrun script to the end, on the port it derives from the job id: one torchrun per
    node (2 agents, c10d rendezvous on 127.0.0.1), 2 workers each. Also the reference of the
    preempted srun job (the same config: a launcher does not change the numbers)."""
    root = tmp_path_factory.mktemp("slurm_torchrun")
    exp, state, job = str(root / "exp"), str(root / "slurm"), _job_id_withfree_port()
    env = batch_env(state, exp, job, tasks_per_node=1, GPUS_PER_NODE=2)
    code, out = run_batch(TORCHRUN, env, _overrides(sft_checkpoint))
    return {"code": code, "out": out, "exp": exp, "state": state, "job": job}


@pytest.fixture(scope="module")
def preempted(sft_checkpoint, tmp_path_factory):
    """The srun script; SIGUSR1 to the batch shell once rank 0 printed iteration 1 (what
    --signal=B:USR1@600 does); then, as Slurm starts the requeued job, the same script and
    command again with SLURM_RESTART_COUNT=1."""
    root = tmp_path_factory.mktemp("slurm_srun")
    exp, state, job = str(root / "exp"), str(root / "slurm"), _job_id_withfree_port()
    sent = []
    first = run_batch(
        MULTINODE,
        batch_env(state, exp, job, MASTER_PORT=free_port()),
        _overrides(sft_checkpoint),
        on_line=_signal_at_first_iteration(sent),
    )
    stopped = (
        json.load(open(os.path.join(exp, "summary.json")))
        if os.path.exists(os.path.join(exp, "summary.json"))
        else None
    )
    checkpoints = (
        sorted(os.listdir(os.path.join(exp, "checkpoints"))) if os.path.isdir(os.path.join(exp, "checkpoints")) else []
    )
    requeues = _records(state, "requeue.jsonl")
    second = run_batch(
        MULTINODE,
        batch_env(state, exp, job, MASTER_PORT=free_port(), SLURM_RESTART_COUNT=1),
        _overrides(sft_checkpoint),
    )
    return {
        "first": first,
        "second": second,
        "sent": sent,
        "stopped": stopped,
        "checkpoints": checkpoints,
        "requeues": requeues,
        "exp": exp,
        "state": state,
        "job": job,
    }


def test_torchrun_script_runs_to_the_end(uninterrupted):
    assert uninterrupted["code"] == 0, uninterrupted["out"][-4000:]
    assert f"rendezvous 127.0.0.1:{29500 + uninterrupted['job'] % 1000}" in uninterrupted["out"]
    assert "[slurm] done" in uninterrupted["out"]
    start, end = _records(uninterrupted["state"], "srun.jsonl")
    assert [(t["procid"], t["node"]) for t in start["tasks"]] == [(0, "node1"), (1, "node2")]  # one per node
    assert start["command"][:6] == ["python", "-m", "nemo_optune.launch", "--nnodes", "2", "--nproc_per_node"]
    _assert_srun_ended_well(end, uninterrupted["out"])
    assert _records(uninterrupted["state"], "requeue.jsonl") == []
    summary = json.load(open(os.path.join(uninterrupted["exp"], "summary.json")))
    assert summary["layout"] == LAYOUT and summary["stopped_by"] is None and len(summary["iterations"]) == ITERATIONS


def test_srun_script_stops_on_sigusr1_saves_and_requeues(preempted):
    code, out = preempted["first"]
    assert preempted["sent"] and code == 3, out[-4000:]
    assert "[slurm] SIGUSR1: forwarded to the ranks" in out and f"requeueing job {preempted['job']}" in out
    assert [(r["job_id"], r["restart_count"]) for r in preempted["requeues"]] == [(str(preempted["job"]), 0)]
    start, end = _records(preempted["state"], "srun.jsonl")[:2]
    assert "--kill-on-bad-exit=1" in start["argv"] and start["command"][:2] == ["python", "examples/train_optune.py"]
    assert end["signals_forwarded"] == ["SIGUSR1"]
    done = len(preempted["stopped"]["iterations"])
    assert preempted["stopped"]["stopped_by"] in STOP_REASONS and 1 <= done < ITERATIONS
    assert len(preempted["checkpoints"]) == 1  # checkpoint_every=0: the stop's, at the next safe point
    assert STOP_CHECKPOINT.fullmatch(preempted["checkpoints"][0]), preempted["checkpoints"]
    assert preempted["checkpoints"][0].startswith(f"iter_{done:06d}")  # inside (or at the end of) iteration done + 1


def test_requeued_srun_job_resumes_and_runs_to_the_end_with_ranks_from_slurm(preempted):
    code, out = preempted["second"]
    assert code == 0, out[-4000:]
    assert "start 2," in out and "[resume] from" in out and "[slurm] done" in out
    assert len(_records(preempted["state"], "requeue.jsonl")) == 1  # not again
    start, end = _records(preempted["state"], "srun.jsonl")[2:]
    assert [(t["procid"], t["localid"], t["nodeid"], t["node"]) for t in start["tasks"]] == [
        (0, 0, 0, "node1"),
        (1, 1, 0, "node1"),
        (2, 0, 1, "node2"),
        (3, 1, 1, "node2"),
    ]
    assert start["step_id"] == 1 and end["signals_forwarded"] == []
    _assert_srun_ended_well(end, out)
    summary = json.load(open(os.path.join(preempted["exp"], "summary.json")))
    assert summary["layout"] == LAYOUT and summary["stopped_by"] is None
    assert summary["resumed_from"].endswith(preempted["checkpoints"][-1])


def test_requeued_run_ends_bit_identical_to_the_uninterrupted_one(preempted, uninterrupted):
    assert preempted["second"][0] == 0 and uninterrupted["code"] == 0
    got = json.load(open(os.path.join(preempted["exp"], "summary.json")))
    ref = json.load(open(os.path.join(uninterrupted["exp"], "summary.json")))
    for key in ("heldout_reward", "train_loss", "lr"):
        assert [i[key] for i in got["iterations"]] == [i[key] for i in ref["iterations"]], key
    got_hashes, got_pool = _checkpoint(preempted["exp"], ITERATIONS)
    ref_hashes, ref_pool = _checkpoint(uninterrupted["exp"], ITERATIONS)
    # 4 shard files at TP2 x DP2, 4 RNG files, common.pt, the pool's token rows of each DP rank
    assert len(ref_hashes) == 4 + 4 + 1 + 2
    assert got_hashes == ref_hashes
    assert got_pool.keys() == ref_pool.keys()
    for name, value in ref_pool.items():
        assert torch.equal(got_pool[name], value), f"pool field {name} differs"


@pytest.mark.slow  # a fourth 4-process launch (~25 s on 2 cores): make test-slow
def test_torchrun_script_stops_on_sigusr1_and_requeues(sft_checkpoint, tmp_path):
    """SIGUSR1 reaches the launcher (nemo_optune.launch, which passes it on and waits) and its
    workers; the workers save and exit 3, and so does the launcher; the script requeues."""
    exp, state, job = str(tmp_path / "exp"), str(tmp_path / "slurm"), _job_id_withfree_port()
    env = batch_env(state, exp, job, tasks_per_node=1, GPUS_PER_NODE=2, MASTER_PORT=free_port())
    sent = []
    code, out = run_batch(TORCHRUN, env, _overrides(sft_checkpoint), on_line=_signal_at_first_iteration(sent))
    assert sent and code == 3, out[-4000:]
    assert "[launch] the workers saved a checkpoint and stopped (exit 3)" in out
    assert _records(state, "srun.jsonl")[-1]["signals_forwarded"] == ["SIGUSR1"]
    summary = json.load(open(os.path.join(exp, "summary.json")))
    assert summary["layout"] == LAYOUT and summary["stopped_by"] in STOP_REASONS
    done = len(summary["iterations"])
    (checkpoint,) = os.listdir(os.path.join(exp, "checkpoints"))
    assert STOP_CHECKPOINT.fullmatch(checkpoint) and checkpoint.startswith(f"iter_{done:06d}"), checkpoint
    assert [r["job_id"] for r in _records(state, "requeue.jsonl")] == [str(job)]


def test_container_options_reach_srun_and_the_command_runs_here(tmp_path):
    """CONTAINER_IMAGE: srun gets pyxis' options; the stand-in records them and runs the command
    here (the fake trainer: with the real one this would test nothing more, since the stand-in
    ignores the options). ENGINE and the job's end time become overrides, before the script's
    arguments (which win)."""
    exp, state = str(tmp_path / "runs" / "exp"), str(tmp_path / "slurm")
    env = batch_env(
        state,
        exp,
        4242,
        MASTER_PORT=1,
        CONTAINER_IMAGE="/x.sqsh",
        MOUNTS="/models,/lustre/data:/data:ro",
        ENGINE="megatron",
        SLURM_JOB_END_TIME=int(time.time()) + 3600,
        STOP_MARGIN=300,
    )
    env["PATH"] = FAKE_TRAINER + os.pathsep + env["PATH"]
    code, out = run_batch(MULTINODE, env, ["trainer.iterations=3"], timeout=60)
    assert code == 0, out
    (start, _) = _records(state, "srun.jsonl")
    argv = start["argv"]
    assert argv[argv.index("--container-image") + 1] == "/x.sqsh"
    mounts = argv[argv.index("--container-mounts") + 1].split(",")
    assert f"{ROOT}:/workspace/nemo_optune" in mounts and f"{tmp_path / 'runs'}:{tmp_path / 'runs'}" in mounts
    assert mounts[-2:] == ["/models", "/lustre/data:/data:ro"]  # MOUNTS: model and data directories
    assert argv[argv.index("--container-workdir") + 1] == "/workspace/nemo_optune"
    command = start["command"]
    assert command[:2] == ["python", "examples/train_optune.py"] and command[-1] == "trainer.iterations=3"
    assert "generation.engine=megatron" in command and f"exp_manager.exp_dir={exp}" in command
    max_time = next(a.split("=", 1)[1] for a in command if a.startswith("trainer.max_time="))
    days, hours, minutes, seconds = map(int, max_time.split(":"))
    assert 3300 - 60 <= ((days * 24 + hours) * 60 + minutes) * 60 + seconds <= 3300
    assert all(os.path.exists(os.path.join(state, f"task{r}.env")) for r in range(4))  # ran, here


def test_mounts_without_a_container_is_refused(tmp_path):
    env = batch_env(str(tmp_path / "slurm"), str(tmp_path / "exp"), 4242, MASTER_PORT=1, MOUNTS="/models")
    env["PATH"] = FAKE_TRAINER + os.pathsep + env["PATH"]
    code, out = run_batch(MULTINODE, env, [], timeout=60)
    assert code == 2 and "MOUNTS=/models needs CONTAINER_IMAGE" in out, out
    assert _records(str(tmp_path / "slurm"), "srun.jsonl") == []  # before any step


def _defaults_env(state: str, exp: str, tasks_per_node: int, **extra) -> dict:
    """A batch environment with none of the scripts' own settings (RECIPE, TP, PP): their defaults."""
    env = batch_env(state, exp, _job_id_withfree_port(), tasks_per_node=tasks_per_node, **extra)
    for key in ("RECIPE", "TP", "PP"):
        del env[key]
    return env


def test_the_srun_scripts_defaults_pass_their_dry_run(tmp_path):
    """RECIPE, TP and PP left unset (2 nodes x 1 task here: every rank runs the dry run's checks)."""
    state = str(tmp_path / "slurm")
    code, out = run_batch(MULTINODE, _defaults_env(state, str(tmp_path / "exp"), 1), ["trainer.dry_run=true"])
    assert code == 0 and "[dry run] llama model, TP=1 PP=1 DP=2 (world 2)" in out, out[-3000:]
    (start, _) = _records(state, "srun.jsonl")
    assert start["command"][2:4] == ["--config-name", "optune"]


@pytest.mark.slow  # 2 x 16 processes, each importing megatron (~5 min on 2 shared cores)
@pytest.mark.parametrize("script", [MULTINODE, TORCHRUN], ids=["srun", "torchrun"])
def test_both_scripts_defaults_pass_their_dry_run_at_their_sbatch_shape(script, tmp_path):
    """2 nodes x 8 GPUs (the scripts' #SBATCH lines), RECIPE, TP, PP, GPUS_PER_NODE left unset."""
    srun = script == MULTINODE
    env = _defaults_env(str(tmp_path / "slurm"), str(tmp_path / "exp"), 8 if srun else 1, MASTER_PORT=free_port())
    code, out = run_batch(script, env, ["trainer.dry_run=true"], timeout=600)
    assert code == 0 and "[dry run] llama model, TP=1 PP=1 DP=16 (world 16)" in out, out[-3000:]


# The exit-status protocol, with a fake trainer (tests/slurm_standin/fake_trainer/python): each
# case's task snippets, a signal for the batch shell once every task waits for it, the status the
# script must exit with, and whether it requeues. Snippets are timed so that the outcome does not
# depend on which task the stand-in's --kill-on-bad-exit SIGTERM reaches first.
STOP_3 = "trap 'exit 3' TERM; sleep 0.5; exit 3"
PROTOCOL = {
    "all-finish": ({"FAKE_TASK_0": "summary null; exit 0"}, None, 0, False),
    "all-stop-exit-3": ({"FAKE_TASK_0": f"summary SIGUSR1; {STOP_3}", "FAKE_TASK_DEFAULT": STOP_3}, None, 3, True),
    # --kill-on-bad-exit SIGTERMs the others once rank 3 exited 3: srun says 143, summary.json says stopped.
    "stop-then-stragglers-killed": (
        {"FAKE_TASK_0": "summary SIGUSR1; hang", "FAKE_TASK_3": "sleep 0.5; exit 3", "FAKE_TASK_DEFAULT": "hang"},
        None,
        3,
        True,
    ),
    "crash-kills-the-rest": ({"FAKE_TASK_1": "exit 1", "FAKE_TASK_DEFAULT": "hang"}, None, 128 + 15, False),
    "bad-config": ({"FAKE_TASK_0": "sleep 0.5; exit 2", "FAKE_TASK_DEFAULT": "on TERM 2"}, None, 2, False),
    # A summary.json from an earlier start does not make a crash look like a stop.
    "old-summary-then-crash": (
        {"FAKE_TASK_0": "sleep 0.5; exit 1", "FAKE_TASK_DEFAULT": "on TERM 1"},
        "old-summary",
        1,
        False,
    ),
    # SIGTERM (scancel, preemption, the time limit): saved and exit 3, but the script does not requeue.
    "sigterm-stops-without-requeue": (
        {"FAKE_TASK_0": "summary SIGTERM; on TERM 3", "FAKE_TASK_DEFAULT": "on TERM 3"},
        signal.SIGTERM,
        3,
        False,
    ),
    "sigusr1-stops-and-requeues": ({"FAKE_TASK_DEFAULT": "on USR1 3"}, signal.SIGUSR1, 3, True),
}


@pytest.mark.parametrize("case", PROTOCOL, ids=list(PROTOCOL))
def test_exit_status_protocol(case, tmp_path):
    tasks, to_send, expected, requeued = PROTOCOL[case]
    exp, state, job = str(tmp_path / "exp"), str(tmp_path / "slurm"), 4242
    env = batch_env(state, exp, job, MASTER_PORT=1, SLURM_STANDIN_KILL_WAIT=5, **tasks)
    env["PATH"] = FAKE_TRAINER + os.pathsep + env["PATH"]
    if to_send == "old-summary":
        os.makedirs(exp)
        with open(os.path.join(exp, "summary.json"), "w") as f:
            json.dump({"stopped_by": "SIGUSR1"}, f, indent=2)
        os.utime(os.path.join(exp, "summary.json"), (time.time() - 3600,) * 2)
        to_send = None
    waiting = []

    def on_line(line, proc):
        if to_send is not None and " waiting for SIG" in line:
            waiting.append(line)
            if len(waiting) == 4:
                os.kill(proc.pid, to_send)

    code, out = run_batch(MULTINODE, env, [], on_line=on_line, timeout=60)
    assert code == expected, out
    assert bool(_records(state, "requeue.jsonl")) == requeued, out
    if case == "all-finish":  # what the stand-in gave each task
        envs = [
            dict(line.rstrip("\n").split("=", 1) for line in open(os.path.join(state, f"task{r}.env")))
            for r in range(4)
        ]
        assert [(e["SLURM_PROCID"], e["SLURM_LOCALID"], e["SLURM_NODEID"], e["SLURMD_NODENAME"]) for e in envs] == [
            ("0", "0", "0", "node1"),
            ("1", "1", "0", "node1"),
            ("2", "0", "1", "node2"),
            ("3", "1", "1", "node2"),
        ]
        for e in envs:
            assert (e["SLURM_NTASKS"], e["SLURM_NNODES"], e["SLURM_JOB_ID"], e["SLURM_STEP_ID"]) == (
                "4",
                "2",
                "4242",
                "0",
            )
            assert e["SLURM_JOB_NODELIST"] == "node[1-2]" and e["SLURM_TASKS_PER_NODE"] == "2(x2)"
