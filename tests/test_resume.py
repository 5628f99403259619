"""SIGKILL at several points, resume, and finish bit-for-bit equal to an uninterrupted run;
resharding a checkpoint across layouts."""

import os

import pytest
import torch
from conftest import TINY
from parallel_harness import hypo_overrides, loss_at_layout, run_layout

# Warm-up + cosine decay: a resumed run must also pick the learning-rate schedule up where it was.
RUN = TINY + [
    "trainer.iterations=3",
    "exp_manager.checkpoint_every=1",
    "exp_manager.keep_last=2",
    "trainer.lr_warmup_steps=2",
    "trainer.lr_decay=cosine",
    "trainer.min_lr=3e-5",
]
TP2 = ["model.tensor_model_parallel_size=2"]
KILL_POINTS = [("generation", 1), ("training", 2), ("checkpoint", 1)]


def _assert_identical(got: dict, ref: dict) -> None:
    for name, value in ref["pool"].items():
        assert torch.equal(got["pool"][name], value), f"pool field {name} differs"
    assert got["weights"].keys() == ref["weights"].keys()
    for key, value in ref["weights"].items():
        assert torch.equal(got["weights"][key], value), f"weight {key} differs"
    for key in ("train_loss", "lr"):
        assert [i[key] for i in got["summary"]["iterations"]] == [i[key] for i in ref["summary"]["iterations"]], key


@pytest.fixture(scope="module", params=["tp1", "tp2"])
def uninterrupted(request, sft_checkpoint, tmp_path_factory):
    layout = [] if request.param == "tp1" else TP2
    world = 1 if request.param == "tp1" else 2
    exp = tmp_path_factory.mktemp(f"straight_{request.param}")
    overrides = RUN + layout + [f"model.restore_from_path={sft_checkpoint}", f"exp_manager.exp_dir={exp}"]
    return world, layout, run_layout(world, overrides, str(exp / "result.pt")), str(exp)


@pytest.mark.parametrize("kill_at", KILL_POINTS, ids=lambda k: f"{k[0]}-iter{k[1] + 1}")
def test_sigkill_then_resume_is_bit_identical(kill_at, uninterrupted, sft_checkpoint, tmp_path):
    world, layout, ref, _ = uninterrupted
    overrides = RUN + layout + [f"model.restore_from_path={sft_checkpoint}", f"exp_manager.exp_dir={tmp_path}"]
    assert run_layout(world, overrides, str(tmp_path / "killed.pt"), kill_at=kill_at) is None
    checkpoints = sorted(os.listdir(tmp_path / "checkpoints"))
    if kill_at[0] == "checkpoint":  # the half-written save is not a checkpoint
        assert any(name.endswith(".tmp") for name in checkpoints)
    got = run_layout(world, overrides, str(tmp_path / "resumed.pt"))
    assert got["summary"]["resumed_from"] is not None
    _assert_identical(got, ref)
    lines = (tmp_path / "selections.jsonl").read_text().splitlines()
    assert len(lines) == 3  # redone iterations are not logged twice
    assert not any(name.endswith(".tmp") for name in os.listdir(tmp_path / "checkpoints"))


# (signal, point, iteration index, ranks it reaches with their helper processes: None = all, as
# Slurm sends it), exp_manager.checkpoint_every, and the checkpoints left (keep_last=2): the
# last one is the stop's, written at the next safe point
STOPS = {
    # 64 prompts: one generation chunk; the stop comes after it
    "SIGTERM-generation-iter1-rank0": ([("generation", 0, "SIGTERM", [0])], 0, ["iter_000000_gen_000001"]),
    # A second signal while the stop's checkpoint is being written changes nothing.
    "SIGUSR1-training-iter2-then-again-while-saving": (
        [("training", 1, "SIGUSR1", None), ("checkpoint", 1, "SIGUSR1", None)],
        0,
        ["iter_000001_step_000001"],
    ),
    # After a periodic save, when megatron's writer has run once (it kept a Manager process
    # that the signal killed, failing the stop's save): a preemption or time limit.
    "SIGTERM-training-iter2-after-a-save-then-again-while-saving": (
        [("training", 1, "SIGTERM", None), ("checkpoint", 1, "SIGTERM", None)],
        1,
        ["iter_000001", "iter_000001_step_000001"],
    ),
}


@pytest.mark.parametrize("stop", STOPS, ids=list(STOPS))
def test_a_stop_signal_saves_and_the_rerun_ends_bit_identical(stop, uninterrupted, sft_checkpoint, tmp_path):
    """At TP1 and TP2: the signal (at TP2, to one rank or to both) stops every rank at the next
    safe point (after the generation chunk or optimizer step) with a checkpoint, also when
    checkpoint_every=0 asks for none before the end; the same command resumes and ends
    bit-identical to the uninterrupted run."""
    world, layout, ref, _ = uninterrupted
    events, every, checkpoints = STOPS[stop]
    overrides = (
        RUN
        + layout
        + [
            f"model.restore_from_path={sft_checkpoint}",
            f"exp_manager.exp_dir={tmp_path}",
            f"exp_manager.checkpoint_every={every}",
        ]
    )
    stopped = run_layout(world, overrides, str(tmp_path / "stopped.pt"), signals=events)
    _, iteration, name, _ = events[0]
    assert stopped["summary"]["stopped_by"] == name
    assert len(stopped["summary"]["iterations"]) == iteration  # stopped inside that iteration
    assert sorted(os.listdir(tmp_path / "checkpoints")) == checkpoints
    got = run_layout(world, overrides, str(tmp_path / "resumed.pt"))
    assert got["summary"]["resumed_from"].endswith(checkpoints[-1]) and got["summary"]["stopped_by"] is None
    _assert_identical(got, ref)


@pytest.mark.parametrize("uninterrupted", ["tp1"], indirect=True)
def test_tp1_checkpoint_resumes_at_tp2_and_dp2_with_the_same_loss(uninterrupted, sft_checkpoint, tmp_path):
    """Saved by one process (one pool token file), resumed at TP2 (every weight split on load)
    and at DP2 (each rank loads its half of the pool's token rows and fetches the rest of its
    batch share from the other). The slow tier's TP2 runs resume their own checkpoints."""
    _, _, _, exp = uninterrupted
    checkpoint = os.path.join(exp, "checkpoints", "iter_000003")
    base = RUN + [f"model.restore_from_path={sft_checkpoint}", f"exp_manager.exp_dir={tmp_path}"]
    at_tp1 = loss_at_layout(1, base, checkpoint, str(tmp_path / "tp1.pt"))
    for name, layout in (("tp2", TP2), ("dp2", [])):
        got = loss_at_layout(2, base + layout, checkpoint, str(tmp_path / f"{name}.pt"))
        assert got["loss"] == pytest.approx(at_tp1["loss"], abs=1e-6), name
        torch.testing.assert_close(got["logps"], at_tp1["logps"], atol=1e-5, rtol=0, msg=name)


def test_more_iterations_on_resume_keep_the_schedule_horizon(sft_checkpoint, tmp_path):
    """A cosine run of 2 iterations extended to 3: the first two iterations' learning rates are
    those of the original run (no jump), and the added iteration trains at min_lr."""
    from nemo_optune.config import load_config
    from nemo_optune.run import run_experiment

    base = TINY + [
        f"model.restore_from_path={sft_checkpoint}",
        f"exp_manager.exp_dir={tmp_path}",
        "trainer.lr_decay=cosine",
        "trainer.min_lr=3e-5",
        "exp_manager.checkpoint_every=1",
    ]
    first = run_experiment(load_config("optune_tiny", base + ["trainer.iterations=2"]))
    extended = run_experiment(load_config("optune_tiny", base + ["trainer.iterations=3"]))
    assert [i["lr"] for i in extended["iterations"][:2]] == [i["lr"] for i in first["iterations"]]
    assert extended["iterations"][2]["lr"] == pytest.approx(3e-5)  # past the original horizon of 4 steps


# One iteration of 32 optimizer steps (64 prompts, global batch 2) regenerated in 4 chunks of 16
# prompts, a step checkpoint every 8 steps: stops land inside the iteration.
MID = TINY + [
    "trainer.iterations=1",
    "trainer.global_batch_size=2",
    "trainer.micro_batch_size=2",
    "generation.rollout_chunk_prompts=16",
    "exp_manager.checkpoint_every_steps=8",
    "exp_manager.keep_last=2",
    "trainer.lr_warmup_steps=4",
    "trainer.lr_decay=cosine",
    "trainer.min_lr=3e-5",
]


@pytest.fixture(scope="module", params=["tp1", "tp2", "dp2"])  # dp2: a token file per DP rank
def uninterrupted_midstep(request, sft_checkpoint, tmp_path_factory):
    world, layout = {"tp1": (1, []), "tp2": (2, TP2), "dp2": (2, [])}[request.param]
    exp = tmp_path_factory.mktemp(f"midstep_{request.param}")
    overrides = MID + layout + [f"model.restore_from_path={sft_checkpoint}", f"exp_manager.exp_dir={exp}"]
    return world, layout, run_layout(world, overrides, str(exp / "result.pt"))


def test_stops_inside_an_iteration_resume_bit_identical(uninterrupted_midstep, sft_checkpoint, tmp_path):
    """SIGTERM during the 2nd generation chunk stops after that chunk; the same command resumes
    there, and SIGTERM before the 10th optimizer step stops after it (one step, then the save;
    a second SIGTERM during that save changes nothing); the third start ends bit-identical to
    the uninterrupted run, its iteration record too."""
    world, layout, ref = uninterrupted_midstep
    overrides = MID + layout + [f"model.restore_from_path={sft_checkpoint}", f"exp_manager.exp_dir={tmp_path}"]
    checkpoints = tmp_path / "checkpoints"
    # The second start saves step 8 (checkpoint_every_steps), then the stop's step 10, during which
    # (its 2nd save) SIGTERM comes again: noted, the save finishes.
    stops = [
        ([("generation:1", 0, "SIGTERM", None)], "iter_000000_gen_000002"),
        ([("training:9", 0, "SIGTERM", None), ("checkpoint:1", 0, "SIGTERM", None)], "iter_000000_step_000010"),
    ]
    for n, (events, newest) in enumerate(stops):
        stopped = run_layout(world, overrides, str(tmp_path / f"stop{n}.pt"), signals=events)
        assert stopped["summary"]["stopped_by"] == "SIGTERM" and stopped["summary"]["iterations"] == []
        assert sorted(os.listdir(checkpoints))[-1] == newest
        # the new token rows of the chunks done, until the last chunk: in a file per DP rank
        per_dp_rank = {f"position_tokens_dp{r:05d}.pt" for r in range(1 if layout == TP2 else world)}
        written = per_dp_rank & set(os.listdir(checkpoints / newest))
        assert written == (per_dp_rank if "_gen_" in newest else set()), written
    assert sorted(os.listdir(checkpoints)) == ["iter_000000_step_000008", "iter_000000_step_000010"]  # keep_last
    got = run_layout(world, overrides, str(tmp_path / "resumed.pt"))
    assert got["summary"]["resumed_from"].endswith("iter_000000_step_000010") and got["summary"]["stopped_by"] is None
    _assert_identical_records(got, ref)
    assert got["summary"]["iterations"][0]["optimizer_steps"] == 32


def _assert_identical_records(got: dict, ref: dict) -> None:
    """_assert_identical, and every iteration record equal but for its timings and memory."""
    _assert_identical(got, ref)
    untimed = ("seconds", "throughput", "memory")
    for record, ref_record in zip(got["summary"]["iterations"], ref["summary"]["iterations"], strict=True):
        assert {k: v for k, v in record.items() if k not in untimed} == {
            k: v for k, v in ref_record.items() if k not in untimed
        }
    assert got["summary"]["responses_generated"] == ref["summary"]["responses_generated"]


def test_a_stop_after_the_reference_pass_resumes_bit_identical(sft_checkpoint, tmp_path):
    """HyPO (offline pairs): the whole pool's reference pass of iteration 1 is a safe point of
    its own. SIGTERM during it stops right after it (iter_000000_ref_000001); the same command
    resumes there, trains (with HyPO's online samples) and ends bit-identical to the
    uninterrupted run."""
    base = hypo_overrides(str(tmp_path), sft_checkpoint, TINY) + ["trainer.iterations=1"]
    ref = run_layout(1, base + [f"exp_manager.exp_dir={tmp_path / 'straight'}"], str(tmp_path / "straight.pt"))
    overrides = base + [f"exp_manager.exp_dir={tmp_path / 'run'}"]
    stopped = run_layout(1, overrides, str(tmp_path / "stopped.pt"), signals=[("reference", 0, "SIGTERM", None)])
    assert stopped["summary"]["stopped_by"] == "SIGTERM" and stopped["summary"]["iterations"] == []
    assert os.listdir(tmp_path / "run" / "checkpoints") == ["iter_000000_ref_000001"]
    got = run_layout(1, overrides, str(tmp_path / "resumed.pt"))
    assert got["summary"]["resumed_from"].endswith("iter_000000_ref_000001") and got["summary"]["stopped_by"] is None
    _assert_identical_records(got, ref)
