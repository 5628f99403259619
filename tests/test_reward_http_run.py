"""OPTune scoring through the reward server on loopback (`reward.source=http`): the same pool and
losses as scoring in-process; the server lost mid-run and restarted in time costs nothing; lost
for good, the run stops with one line and its checkpoints stay as they were."""

import os
import re
import subprocess
import sys
import threading

import torch
from conftest import ROOT, TINY

from nemo_optune.config import load_config
from nemo_optune.runtime.checkpoint import _sha256, list_checkpoints, read_manifest

TESTS = os.path.join(ROOT, "tests")


def start_server(
    port: int = 0, die_after_pairs: int = 0, function: str = "reward_functions:sort_reward_dies"
) -> tuple[subprocess.Popen, str]:
    """The reward server serving the task reward through a Python function; (process, URL)."""
    env = {
        **os.environ,
        "PYTHONPATH": TESTS + os.pathsep + os.environ.get("PYTHONPATH", ""),
        "REWARD_DIE_AFTER_PAIRS": str(die_after_pairs),
    }
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "nemo_optune.serve_reward",
            f"server.port={port}",
            "reward.source=python",
            f"reward.function={function}",
        ],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    for line in server.stdout:
        found = re.search(r"listening on (http://\S+)", line)
        if found:
            threading.Thread(target=server.stdout.read, daemon=True).start()  # keep the pipe drained
            return server, found.group(1)
    raise RuntimeError(f"the reward server did not start (exit {server.wait()})")


def final_pool(exp_dir) -> dict:
    newest = list_checkpoints(os.path.join(exp_dir, "checkpoints"))[-1]
    pool = torch.load(os.path.join(newest, "trainer_state.pt"), weights_only=False)["pool"]  # the scalars
    return {**pool, **torch.load(os.path.join(newest, "pool_tokens_dp00000.pt"))}  # one process: every token row


def http_overrides(url: str, exp_dir) -> list[str]:
    return TINY + [
        f"exp_manager.exp_dir={exp_dir}",
        "reward.source=http",
        f"reward.http.urls=[{url}]",
        "reward.http.batch_size=48",
        "reward.retries=8",  # backoff 0.25 s doubling: ~64 s for the restarted server to come up
        "reward.backoff_seconds=0.25",
        "reward.timeout_seconds=30",
        "reward.http.dead_server_seconds=0",
    ]


def assert_same_run(a: dict, b: dict, pool_a: dict, pool_b: dict) -> None:
    keys = ("heldout_reward", "heldout_kl", "train_loss", "train_accuracy", "pool_mean_reward", "regenerated")
    for x, y in zip(a["iterations"], b["iterations"]):
        assert [x[k] for k in keys] == [y[k] for k in keys]
    for name, value in pool_a.items():
        assert torch.equal(value, pool_b[name]), name


def test_scoring_through_the_server_trains_exactly_like_in_process_and_survives_a_restart(sft_checkpoint, tmp_path):
    from nemo_optune.run import run_experiment

    start = [f"model.restore_from_path={sft_checkpoint}"]
    local = run_experiment(load_config("optune_tiny", TINY + start + [f"exp_manager.exp_dir={tmp_path / 'local'}"]))
    server, url = start_server()
    try:
        remote = run_experiment(load_config("optune_tiny", start + http_overrides(url, tmp_path / "http")))
    finally:
        server.terminate()
        assert server.wait(timeout=30) == 0  # SIGTERM: a clean shutdown
    assert_same_run(local, remote, final_pool(tmp_path / "local"), final_pool(tmp_path / "http"))

    # The server dies inside iteration 1's scoring (after the first evaluation's 64 pairs and
    # some of the iteration's 256); a watcher restarts it on the same port while the client retries.
    port = int(url.rsplit(":", 1)[1])
    server, _ = start_server(port, die_after_pairs=100)
    restarted, finished = [], threading.Event()

    def restart_when_dead():
        server.wait()
        if not finished.is_set():  # (a failed run kills the server too: no restart then)
            restarted.append(start_server(port)[0])

    watcher = threading.Thread(target=restart_when_dead)
    watcher.start()
    try:
        again = run_experiment(load_config("optune_tiny", start + http_overrides(url, tmp_path / "restart")))
    finally:
        finished.set()
        server.kill()
        watcher.join(timeout=60)
        for process in restarted:
            process.kill()
    assert server.returncode == -9 and restarted  # it really died and came back
    assert again["reward_source_failures"] >= 1
    assert_same_run(local, again, final_pool(tmp_path / "local"), final_pool(tmp_path / "restart"))


def test_a_server_lost_for_good_stops_the_run_with_one_line_and_keeps_its_checkpoints(sft_checkpoint, tmp_path):
    exp = tmp_path / "exp"
    # Dies in iteration 2's scoring: evaluations of 64 pairs, 256 + 128 new samples; iteration 1 is checkpointed.
    server, url = start_server(die_after_pairs=64 + 256 + 64 + 50)
    try:
        out = subprocess.run(
            [
                sys.executable,
                os.path.join(ROOT, "examples", "train_optune.py"),
                f"model.restore_from_path={sft_checkpoint}",
                "exp_manager.checkpoint_every=1",
                *http_overrides(url, exp)[:-4],
                "reward.retries=2",
                "reward.backoff_seconds=0.1",
                "reward.timeout_seconds=10",
                "reward.http.dead_server_seconds=0",
            ],
            capture_output=True,
            text=True,
            cwd=ROOT,
            timeout=300,
        )
    finally:
        server.kill()
    assert out.returncode == 2, out.stderr[-3000:]
    last = out.stderr.strip().splitlines()[-1]
    assert "reward source 'http' failed 3 times" in last and "the prompt pool was not updated" in last, last
    checkpoints = list_checkpoints(str(exp / "checkpoints"))
    assert [os.path.basename(c) for c in checkpoints] == ["iter_000001"], out.stdout[-3000:]
    manifest = read_manifest(checkpoints[0])  # intact: every file as the manifest records it
    for name, entry in manifest["files"].items():
        assert _sha256(os.path.join(checkpoints[0], name)) == entry["sha256"], name
