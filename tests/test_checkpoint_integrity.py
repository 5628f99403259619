"""Checkpoint integrity: published only after every rank's write, verified against its
manifest on load, damaged ones refused with one line (or skipped by auto-resume), wrong
kinds and architectures refused before anything is loaded."""

import hashlib
import json
import os
import shutil

import pytest
from conftest import TINY
from parallel_harness import _spawn

from nemo_optune.cli import run_main as main
from nemo_optune.config import load_config
from nemo_optune.run import run_experiment
from nemo_optune.runtime.checkpoint import MANIFEST, list_checkpoints
from nemo_optune.runtime.distributed import free_port

# ------------------------------------------------------- publishing (2 ranks, gloo)
# (failing rank, checkpoint name): both cases in one pair of processes (spawning is the cost)
PUBLISH_CASES = [(None, "iter_000001"), (1, "iter_000002")]


def _publish_worker(rank, world, port, root):
    import torch.distributed as dist

    from nemo_optune.runtime import checkpoint

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    for failing_rank, name in PUBLISH_CASES:

        def write(tmp, failing_rank=failing_rank):
            with open(os.path.join(tmp, f"shard_rank{rank}.bin"), "wb") as f:
                f.write(bytes([rank]) * (1000 + rank))
            if rank == failing_rank:
                raise OSError(28, "No space left on device")

        try:
            checkpoint._publish(os.path.join(root, name), write, "model", {"num_layers": 2})
            outcome = "published"
        except checkpoint.CheckpointError as err:
            outcome = f"error: {err}"
        with open(os.path.join(root, f"{name}_rank{rank}.txt"), "w") as f:
            f.write(outcome)
    dist.destroy_process_group()


def test_a_checkpoint_is_published_only_after_every_rank_wrote_it(tmp_path):
    _spawn(_publish_worker, (2, free_port(), str(tmp_path)), 2)
    for failing_rank, name in PUBLISH_CASES:
        directory = tmp_path / name
        outcomes = [(tmp_path / f"{name}_rank{r}.txt").read_text() for r in range(2)]
        assert not os.path.exists(f"{directory}.tmp")
        if failing_rank is None:
            assert outcomes == ["published", "published"]
            manifest = json.loads((directory / MANIFEST).read_text())
            assert manifest["kind"] == "model" and manifest["architecture"] == {"num_layers": 2}
            for rank in range(2):  # both ranks' shards, hashed by whichever rank, exactly
                data = bytes([rank]) * (1000 + rank)
                assert manifest["files"][f"shard_rank{rank}.bin"] == {
                    "size": len(data),
                    "sha256": hashlib.sha256(data).hexdigest(),
                }
        else:  # rank 0 wrote its part, rank 1 failed: nobody publishes, both say so
            assert not os.path.exists(directory)
            for outcome in outcomes:
                assert (
                    outcome.startswith("error: writing checkpoint")
                    and "failed on rank 1: [Errno 28] No space left on device" in outcome
                )


# ----------------------------------------------------- loading damaged checkpoints
def _largest_shard(directory: str) -> str:
    shards = [os.path.join(directory, n) for n in os.listdir(directory) if n.endswith(".distcp")]
    return max(shards, key=os.path.getsize)


def _flip_bytes(path: str) -> None:
    with open(path, "r+b") as f:
        f.seek(os.path.getsize(path) // 2)
        f.write(b"\0" * 16)


def _truncate(path: str) -> None:
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)


DAMAGE = {  # name: (damage(directory) -> the path the error names, expected message)
    "bit_rot": (lambda d: (_flip_bytes(_largest_shard(d)), _largest_shard(d))[1], "checksum mismatch"),
    "truncated_shard": (lambda d: (lambda p: (_truncate(p), p)[1])(_largest_shard(d)), "truncated or overwritten"),
    "missing_shard": (
        lambda d: (lambda p: (os.remove(p), p)[1])(_largest_shard(d)),
        "file missing from the checkpoint",
    ),
    "no_manifest": (lambda d: (os.remove(os.path.join(d, MANIFEST)), d)[1], "not a nemo_optune checkpoint"),
    "empty_dir": (lambda d: (shutil.rmtree(d), os.makedirs(d), d)[2], r"is an empty directory"),
}


def _cli(args: list[str], capsys) -> str:
    """Run the launcher's main in-process; return its one line of stderr (exit status 2)."""
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    return lines[0]


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_a_damaged_model_checkpoint_is_refused_with_one_line(damage, sft_checkpoint, tmp_path, capsys):
    copy = str(tmp_path / "sft")
    shutil.copytree(sft_checkpoint, copy)
    hurt, message = DAMAGE[damage]
    named = hurt(copy)
    line = _cli(TINY + [f"exp_manager.exp_dir={tmp_path / 'exp'}", f"model.restore_from_path={copy}"], capsys)
    assert line.startswith("error: ") and named in line and message in line, line


@pytest.fixture(scope="module")
def trained(tmp_path_factory, sft_checkpoint):
    """A finished 2-iteration run with a checkpoint after each iteration."""
    exp = tmp_path_factory.mktemp("trained")
    cfg = load_config(
        "optune_tiny",
        TINY
        + [
            f"exp_manager.exp_dir={exp}",
            f"model.restore_from_path={sft_checkpoint}",
            "exp_manager.checkpoint_every=1",
            "exp_manager.keep_last=3",
        ],
    )
    run_experiment(cfg)
    return str(exp)


WRONG = {  # name: (overrides given sft = the SFT checkpoint and newest = a training checkpoint, expected line)
    "training_as_restore": (
        lambda sft, newest: [f"model.restore_from_path={newest}"],
        "{newest}: a training checkpoint where a model checkpoint is needed (pass it as exp_manager.resume_from)",
    ),
    "model_as_resume": (
        lambda sft, newest: [f"model.restore_from_path={sft}", f"exp_manager.resume_from={sft}"],
        "{sft}: a model checkpoint where a training checkpoint is needed (pass it as model.restore_from_path)",
    ),
    "old_builtin_restore": (
        lambda sft, newest: [f"model.restore_from_path={newest}"],  # newest: see below
        "{newest}: a checkpoint of a model this version does not build (family None; the built-in "
        "model before 0.2 was LayerNorm/GELU: rerun its SFT warm start)",
    ),
    "other_architecture_resume": (
        lambda sft, newest: [f"model.restore_from_path={sft}", f"exp_manager.resume_from={newest}"],
        "{newest}: another model architecture (num_layers 4 in the checkpoint, 2 in the config)",
    ),
    "other_method_resume": (
        lambda sft, newest: [
            f"model.restore_from_path={sft}",
            f"exp_manager.resume_from={newest}",
            "method=online_dpo",
            "model.optune.selection=all",
        ],
        "config key exp_manager.resume_from: {newest} was written by method optune, this run is method "
        "online_dpo; resume it with method=optune, or start this one without it (another exp_manager.exp_dir)",
    ),
    "absent": (
        lambda sft, newest: [f"model.restore_from_path={sft}_absent"],
        "config key model.restore_from_path: {sft}_absent does not exist (expected a nemo_optune checkpoint "
        "with manifest.json, a Hugging Face directory with config.json + model.safetensors, or a NeMo 2 "
        "directory with weights/ + context/model.yaml)",
    ),
}


@pytest.mark.parametrize("case", list(WRONG))
def test_wrong_kinds_and_architectures_are_refused_with_one_line(case, trained, sft_checkpoint, tmp_path, capsys):
    newest = list_checkpoints(os.path.join(trained, "checkpoints"))[-1]
    if case == "other_architecture_resume":  # a training checkpoint of a 4-layer model
        newest = str(shutil.copytree(newest, tmp_path / "iter_000002"))
        manifest = json.loads(open(os.path.join(newest, MANIFEST)).read())
        manifest["architecture"]["num_layers"] = 4
        open(os.path.join(newest, MANIFEST), "w").write(json.dumps(manifest))
    if case == "old_builtin_restore":  # the SFT checkpoint of the built-in model before 0.2 (no family)
        newest = str(shutil.copytree(sft_checkpoint, tmp_path / "old_sft"))
        manifest = json.loads(open(os.path.join(newest, MANIFEST)).read())
        manifest["architecture"] = {"num_layers": 2, "hidden_size": 64, "num_attention_heads": 4}
        open(os.path.join(newest, MANIFEST), "w").write(json.dumps(manifest))
    overrides, expected = WRONG[case]
    line = _cli(TINY + [f"exp_manager.exp_dir={tmp_path / 'exp'}", *overrides(sft_checkpoint, newest)], capsys)
    assert line == "error: " + expected.format(sft=sft_checkpoint, newest=newest)


@pytest.mark.parametrize("damage", ["truncated_trainer_state", "bit_rot"])
def test_auto_resume_falls_back_to_the_newest_intact_checkpoint(damage, trained, tmp_path, capsys):
    exp = str(tmp_path / "exp")
    shutil.copytree(trained, exp)
    first, second = list_checkpoints(os.path.join(exp, "checkpoints"))
    if damage == "bit_rot":
        _flip_bytes(_largest_shard(second))
    else:
        _truncate(os.path.join(second, "trainer_state.pt"))
    config = json.loads(open(os.path.join(exp, "config.json")).read())
    cfg = load_config(
        "optune_tiny",
        TINY
        + [
            f"exp_manager.exp_dir={exp}",
            f"model.restore_from_path={config['model']['restore_from_path']}",
            "exp_manager.checkpoint_every=1",
            "exp_manager.keep_last=3",
            "trainer.iterations=3",
        ],
    )
    summary = run_experiment(cfg)
    out = capsys.readouterr().out
    assert f"[resume] skipping a damaged checkpoint: {second}" in out
    assert summary["resumed_from"] == first
    assert [it["iteration"] for it in summary["iterations"]] == [1, 2, 3]
    # the redone iteration 2 is the same as the original one: the fallback resumed exactly
    original = json.loads(open(os.path.join(trained, "summary.json")).read())["iterations"][1]
    assert summary["iterations"][1]["train_loss"] == original["train_loss"]
    assert summary["iterations"][1]["heldout_reward"] == original["heldout_reward"]


def test_disk_full_while_writing_the_summary_is_one_line_and_keeps_checkpoints(trained, tmp_path, capsys, monkeypatch):
    exp = str(tmp_path / "exp")
    shutil.copytree(trained, exp)
    config = json.loads(open(os.path.join(exp, "config.json")).read())
    before = open(os.path.join(exp, "summary.json")).read()

    real_dump = json.dump

    def dump(obj, f, **kwargs):
        if f.name.endswith("summary.json.tmp"):
            f.write('{"partial')
            raise OSError(28, "No space left on device")
        return real_dump(obj, f, **kwargs)

    monkeypatch.setattr(json, "dump", dump)
    line = _cli(
        TINY
        + [
            f"exp_manager.exp_dir={exp}",
            f"model.restore_from_path={config['model']['restore_from_path']}",
            "exp_manager.checkpoint_every=1",
            "exp_manager.keep_last=3",
        ],
        capsys,
    )
    monkeypatch.undo()
    assert (
        line
        == f"error: [Errno 28] cannot write {os.path.join(exp, 'summary.json')} (No space left on device); checkpoints are intact"
    )
    assert open(os.path.join(exp, "summary.json")).read() == before and not os.path.exists(
        os.path.join(exp, "summary.json.tmp")
    )
    assert len(list_checkpoints(os.path.join(exp, "checkpoints"))) == 2


def test_the_generate_command_reads_a_training_checkpoints_policy(trained, tmp_path):
    """Training checkpoints are refused as model.restore_from_path of a run (the hint says
    resume_from) but a user checks a trained policy with the generate command."""
    from nemo_optune.generate import main as generate_main

    newest = list_checkpoints(os.path.join(trained, "checkpoints"))[-1]
    prompts, out = tmp_path / "p.jsonl", tmp_path / "out.jsonl"
    prompts.write_text('{"prompt": "3141>"}\n{"prompt": "987>"}\n')
    generate_main(
        [
            f"model.restore_from_path={newest}",
            f"generate.input_path={prompts}",
            f"generate.output_path={out}",
            "generation.temperature=0",
        ]
    )
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["prompt"] for r in rows] == ["3141>", "987>"]
    assert all(len(r["token_ids"]) == len(r["logprobs"]) > 0 and max(r["logprobs"]) <= 0 for r in rows)
