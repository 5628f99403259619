"""Operating a run: progress bars only on a terminal, run_info.json, grouped metric names,
Weights & Biases in offline mode (no network), continued by a resumed run."""

import glob
import io
import json
import os
import re
import select
import struct
import subprocess
import sys
import time

import pytest
import torch
from conftest import ROOT, TINY

from nemo_optune.config import WandbConfig
from nemo_optune.runtime.experiment import ExperimentLog, metric_names
from nemo_optune.runtime.progress import PhaseProgress, progress

SCRIPT = os.path.join(ROOT, "examples", "train_optune.py")
BAR = re.compile(r"(generation|training|evaluation): +\d+%\|")


def _env(tmp) -> dict:
    """W&B kept inside tmp and offline: nothing reaches the network or the home directory."""
    env = dict(os.environ, WANDB_MODE="offline", WANDB_SILENT="true", TERM="xterm")
    for var in ("WANDB_DIR", "WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        env[var] = str(tmp / var.lower())
    env.pop("WANDB_API_KEY", None)
    return env


def run_piped(overrides: list[str], tmp) -> str:
    proc = subprocess.run(
        [sys.executable, SCRIPT, *overrides],
        cwd=ROOT,
        env=_env(tmp),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:]
    return proc.stdout


def run_on_terminal(overrides: list[str], tmp) -> str:
    """The run with stdout and stderr on a pseudo-terminal (120 columns); what it wrote there."""
    import fcntl
    import termios

    master, slave = os.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
    proc = subprocess.Popen(
        [sys.executable, SCRIPT, *overrides],
        cwd=ROOT,
        env=_env(tmp),
        stdin=subprocess.DEVNULL,
        stdout=slave,
        stderr=slave,
        close_fds=True,
    )
    os.close(slave)
    chunks, deadline = [], time.monotonic() + 600
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 1.0)
            if ready:
                try:
                    data = os.read(master, 65536)
                except OSError:  # EIO: every writer of the terminal is gone
                    break
                if not data:
                    break
                chunks.append(data)
            elif proc.poll() is not None:
                break
    finally:
        os.close(master)
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=60)
    out = b"".join(chunks).decode(errors="replace")
    assert proc.returncode == 0, out[-3000:]
    return out


def wandb_history(exp: str) -> tuple[list[str], dict[int, dict]]:
    """(run ids, {step: {metric: value}}) of the offline W&B runs under exp/wandb, read from
    their .wandb files (a leveldb-style record log of protobuf Records; wandb 0.31 has no
    Python reader for it, and offline mode writes no wandb-summary.json)."""
    from wandb.proto import wandb_internal_pb2

    ids, history = [], {}
    for path in sorted(glob.glob(os.path.join(exp, "wandb", "offline-run-*", "run-*.wandb"))):
        with open(path, "rb") as f:
            data = f.read()
        assert data[:4] == b":W&B"
        pos, parts = 7, b""  # file header; then 32 KiB blocks of records: crc (4), length (2), type (1), data
        while pos + 7 <= len(data):
            left = 32768 - pos % 32768
            crc_length_type = struct.unpack("<IHB", data[pos : pos + 7]) if left >= 7 else (0, 0, 0)
            if crc_length_type[1:] == (0, 0):  # block padding
                pos += left
                continue
            _, length, kind = crc_length_type
            parts += data[pos + 7 : pos + 7 + length]
            pos += 7 + length
            if kind in (1, 4):  # a whole record, or the last piece of one
                record = wandb_internal_pb2.Record()
                record.ParseFromString(parts)
                parts = b""
                if record.HasField("run"):
                    ids.append(record.run.run_id)
                elif record.HasField("history"):
                    items = {"/".join(i.nested_key) or i.key: json.loads(i.value_json) for i in record.history.item}
                    history.setdefault(record.history.step.num, {}).update(items)
    return ids, history


@pytest.fixture(scope="module")
def wandb_run(sft_checkpoint, tmp_path_factory):
    """A tiny run on a pipe, W&B on (offline); (output, exp_dir, tmp)."""
    pytest.importorskip("wandb")
    tmp = tmp_path_factory.mktemp("logged")
    exp = str(tmp / "exp")
    out = run_piped(
        TINY
        + [
            f"exp_manager.exp_dir={exp}",
            f"model.restore_from_path={sft_checkpoint}",
            "exp_manager.wandb.enabled=true",
            "exp_manager.wandb.mode=offline",
            "exp_manager.wandb.tags=[ci,tiny]",
        ],
        tmp,
    )
    return out, exp, tmp


def test_a_pipe_gets_no_bars_but_the_iteration_lines(wandb_run):
    out, _, _ = wandb_run
    assert "[iter 1/2] heldout" in out and "[iter 2/2] heldout" in out
    assert not BAR.search(out) and "%|" not in out and "rows/s" not in out and "\r" not in out
    # implicit rewards, response lengths, memory and tokens/s in the line
    line = re.compile(
        r"\[iter 2/2\] .* rw [+-]\d\.\d{3}/[+-]\d\.\d{3}  len \d+\.\d/\d+ eos [01]\.\d\d  mem \d+MB \| "
        r"gen \d+\.\d\ds \d+ tok/s .* train \d+\.\d\ds \d+ tok/s total"
    )
    assert line.search(out), out[-2000:]


def test_run_info_records_the_start(wandb_run):
    _, exp, _ = wandb_run
    with open(os.path.join(exp, "run_info.json")) as f:
        start = json.load(f)["starts"][0]  # the resume test adds a second
    head = subprocess.run(["git", "-C", ROOT, "rev-parse", "HEAD"], capture_output=True, text=True, check=True)
    assert start["git"]["revision"] == head.stdout.strip() and isinstance(start["git"]["dirty"], bool)
    versions = start["versions"]
    for name in ("python", "torch", "megatron-core", "transformers", "nemo_optune", "wandb"):
        assert versions[name], name
    assert start["layout"] == {"tp": 1, "pp": 1, "dp": 1, "world_size": 1}
    assert start["config"]["trainer"]["iterations"] == 2 and start["config"]["exp_manager"]["exp_dir"] == exp
    assert start["hostname"] and start["start_time"] and start["resume"] is None
    assert start["command"][1] == SCRIPT and f"exp_manager.exp_dir={exp}" in start["command"]
    with open(os.path.join(exp, "wandb_run_id")) as f:
        assert start["wandb"] == {"id": f.read().strip(), "mode": "offline"}
    # summary.json keeps the record keys; TensorBoard and W&B get the grouped names
    with open(os.path.join(exp, "summary.json")) as f:
        assert {"train_loss", "train_accuracy", "heldout_reward", "seconds"} <= set(json.load(f)["iterations"][0])


def test_wandb_offline_logs_the_metrics_and_a_resumed_run_continues_it(wandb_run, sft_checkpoint):
    _, exp, tmp = wandb_run
    with open(os.path.join(exp, "wandb_run_id")) as f:
        run_id = f.read().strip()
    assert glob.glob(os.path.join(exp, "wandb", f"offline-run-*-{run_id}", f"run-{run_id}.wandb"))
    assert not os.path.exists(tmp / "wandb_dir" / "wandb")  # under exp_dir, not WANDB_DIR
    ids, history = wandb_history(exp)
    assert ids == [run_id] and sorted(history) == [1, 2]
    with open(os.path.join(exp, "summary.json")) as f:
        iterations = json.load(f)["iterations"]
    for step, record in zip((1, 2), iterations):
        logged = history[step]
        assert logged["train/loss"] == pytest.approx(record["train_loss"])
        assert logged["val/reward"] == pytest.approx(record["heldout_reward"])
        assert logged["rollout/regenerated"] == record["regenerated"]
        assert logged["timing/training"] == pytest.approx(record["seconds"]["training"])
        assert {"train/accuracy", "train/grad_norm", "train/lr", "val/kl", "rollout/pool_mean_reward"} <= set(logged)
        for name, (key, sub) in {
            "train/rewards/chosen": ("implicit_rewards", "chosen"),
            "train/rewards/margins": ("implicit_rewards", "margins"),
            "train/logps/rejected": ("policy_logps", "rejected"),
            "rollout/completions/mean_length": ("completions", "mean_length"),
            "rollout/completions/eos_rate": ("completions", "eos_rate"),
            "val/completions/max_length": ("heldout_completions", "max_length"),
            "throughput/generation_tokens_per_s": ("throughput", "generation_tokens_per_s"),
            "throughput/training_tokens_per_s": ("throughput", "training_tokens_per_s"),
            "memory/peak_rss_mb": ("memory", "peak_rss_mb"),
        }.items():
            assert logged[name] == pytest.approx(record[key][sub]), name

    # the requeued job (one more iteration), this time on a terminal, resumes the checkpoint and
    # the same W&B run, with a progress bar per phase
    out = run_on_terminal(
        TINY
        + [
            f"exp_manager.exp_dir={exp}",
            f"model.restore_from_path={sft_checkpoint}",
            "exp_manager.wandb.enabled=true",
            "trainer.iterations=3",
        ],
        tmp,
    )
    assert "[resume]" in out and "[iter 3/3]" in out
    assert {m.group(1) for m in BAR.finditer(out)} == {"generation", "training", "evaluation"}, out[-3000:]
    assert "rows/s" in out or "s/rows" in out  # rate and ETA: [elapsed<remaining, rate]
    assert re.search(r"\[\d\d:\d\d<", out)
    assert re.search(r"\[iter 3/3\] heldout .* eval \d+\.\d\ds\r?\n", out)  # the metrics line stays whole
    ids, history = wandb_history(exp)
    assert ids == [run_id, run_id] and sorted(history) == [1, 2, 3] and "train/loss" in history[3]
    with open(os.path.join(exp, "run_info.json")) as f:
        first, second = json.load(f)["starts"]
    assert first["resume"] is None and second["resume"] and second["wandb"]["id"] == run_id
    assert second["config"]["trainer"]["iterations"] == 3


# ----------------------------------------------------------------- pieces
class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_bars_only_when_enabled_and_on_a_terminal():
    for stream, enabled, shown in (
        (_Terminal(), True, True),
        (_Terminal(), False, False),
        (io.StringIO(), True, False),
    ):
        with progress("training", 4, enabled, unit="step", stream=stream) as bar:
            bar.update(2)
        assert ("training:" in stream.getvalue()) == shown

    phases = PhaseProgress(True, stream=_Terminal())
    assert list(phases.iterate("training", [1, 2, 3], unit="step")) == [1, 2, 3]
    with phases.phase("evaluation"), phases.rows(8) as bar:
        bar.update(8)
        with phases.rows(4) as inner:  # nested (HyPO samples inside a step): no second bar
            inner.update(4)
    text = phases.stream.getvalue()
    assert "training:" in text and "0/3" in text and "evaluation:" in text and "0/8" in text and "0/4" not in text


def test_metric_names_are_grouped():
    record = {
        "iteration": 3,
        "train_loss": 0.5,
        "train_accuracy": 0.75,
        "heldout_reward": 0.2,
        "heldout_kl": 0.1,
        "rho": None,
        "regenerated": 16,
        "reward_by_source": {"task": 0.3},
        "heldout_reward_by_source": {"task": 0.2},
        "seconds": {"training": 1.5, "total": 2.0},
        "implicit_rewards": {"chosen": 0.25, "rejected": -0.5, "margins": 0.75},
        "policy_logps": {"chosen": -3.0},
        "completions": {"mean_length": 5.5, "eos_rate": 0.5},
        "heldout_completions": {},  # not evaluated
        "throughput": {"generation_tokens_per_s": None, "training_tokens_per_s": 40.0},
        "memory": {"peak_rss_mb": 100.0, "peak_gpu_memory_mb": None},  # None: no GPU
        "new_key": 7,
    }
    assert metric_names(record) == {
        "train/loss": 0.5,
        "train/accuracy": 0.75,
        "val/reward": 0.2,
        "val/kl": 0.1,
        "rollout/regenerated": 16.0,
        "rollout/reward_by_source/task": 0.3,
        "val/reward_by_source/task": 0.2,
        "timing/training": 1.5,
        "timing/total": 2.0,
        "train/rewards/chosen": 0.25,
        "train/rewards/rejected": -0.5,
        "train/rewards/margins": 0.75,
        "train/logps/chosen": -3.0,
        "rollout/completions/mean_length": 5.5,
        "rollout/completions/eos_rate": 0.5,
        "throughput/training_tokens_per_s": 40.0,
        "memory/peak_rss_mb": 100.0,
        "train/new_key": 7.0,
    }


def test_completion_counts_and_stats_of_hand_built_rollouts():
    """Lengths count the stop token; a response ended when its last token is an end-of-sequence
    id or padding (the engines stop on both), also at exactly max_new_tokens; else it was cut."""
    from types import SimpleNamespace

    from nemo_optune.generation.base import Rollouts, completion_counts, completion_stats

    tokens = torch.tensor([[5, 2, 0, 0], [5, 6, 7, 8], [5, 6, 7, 2], [0, 0, 0, 0]])
    rollouts = Rollouts(tokens, torch.tensor([2, 4, 4, 1]), torch.zeros(4, 4))
    counts = completion_counts(rollouts, SimpleNamespace(eos_ids=frozenset({2}), pad_id=0))
    assert counts.tolist() == [0, 1, 1, 0, 2, 3]  # lengths 0..4, then the 3 that ended
    expected = {"responses": 4, "tokens": 11, "mean_length": 2.75, "min_length": 1, "max_length": 4, "eos_rate": 0.75}
    assert completion_stats(counts) == expected
    assert completion_stats(counts + counts) == {**expected, "responses": 8, "tokens": 22}  # ranks add up
    assert completion_stats(torch.zeros(6, dtype=torch.float64)) == {}


def test_wandb_missing_is_a_config_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb raises ImportError
    with pytest.raises(
        ValueError,
        match=r"config key exp_manager.wandb.enabled: wandb is not installed "
        r"\(pip install -e '.\[wandb\]'\)",
    ):
        ExperimentLog(str(tmp_path), enabled=True, tensorboard=False, wandb=WandbConfig(enabled=True))
    ExperimentLog(str(tmp_path), enabled=True, tensorboard=False, wandb=WandbConfig(enabled=False)).close()


def test_tensorboard_gets_the_grouped_names(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    log = ExperimentLog(str(tmp_path), enabled=True, tensorboard=True)
    log.scalars(1, {"iteration": 1, "train_loss": 0.5, "heldout_reward": 0.25, "seconds": {"total": 2.0}})
    log.close()
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert sorted(events.Tags()["scalars"]) == ["timing/total", "train/loss", "val/reward"]
    assert [(e.step, e.value) for e in events.Scalars("train/loss")] == [(1, 0.5)]


def test_samples_go_to_jsonl_and_tensorboard_text(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    log = ExperimentLog(str(tmp_path), enabled=True, tensorboard=True)
    chat = [{"role": "user", "content": "Say hi"}]
    samples = [
        {"prompt_index": 0, "prompt": "12>", "response": "12", "length": 3, "reward": 1.0},
        {"prompt_index": 1, "prompt": chat, "response": "hi\nthere", "length": 4, "reward": None},
    ]
    log.samples(0, samples)
    log.samples(2, samples[:1])
    log.samples(3, [])  # nothing to write
    log.close()
    lines = [json.loads(line) for line in (tmp_path / "samples.jsonl").read_text().splitlines()]
    assert lines == [{"iteration": 0, **samples[0]}, {"iteration": 0, **samples[1]}, {"iteration": 2, **samples[0]}]
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    texts = events.Tensors("val/samples/text_summary")
    assert [e.step for e in texts] == [0, 2]
    first = texts[0].tensor_proto.string_val[0].decode()
    assert "held-out prompt 1" in first and '"content": "Say hi"' in first and "    there" in first


def test_report_with_evaluations_skipped(tmp_path):
    """trainer.eval_every=2 over 4 iterations: held-out rewards at iterations 2 and 4 only, timing
    bars for all 4 (the report once failed here, after the whole run, with a shape mismatch)."""
    from nemo_optune.runtime.experiment import write_report

    phases = ("generation", "scoring", "reference", "training")
    iterations = [
        {
            "iteration": i,
            "heldout_reward": 0.1 * i if i % 2 == 0 else None,
            "seconds": {p: 0.5 for p in phases} | {"total": 3.0},
        }
        for i in range(1, 5)
    ]
    path = tmp_path / "report.png"
    write_report(str(path), {"method": "online_dpo", "heldout_reward_initial": 0.0, "iterations": iterations})
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
