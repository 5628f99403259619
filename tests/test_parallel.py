"""TP, PP, DP and TP x PP give the same OPTune iteration as one process (gloo, CPU)."""

import pytest
import torch
from conftest import TINY
from parallel_harness import hypo_overrides, run_layout

from nemo_optune.data.pool import pool_bytes_per_rank

LAYOUTS = {  # name: (world size, overrides)
    "tp2": (2, ["model.tensor_model_parallel_size=2"]),
    "pp2": (2, ["model.pipeline_model_parallel_size=2"]),
    "dp2": (2, []),
    "tp2pp2": (4, ["model.tensor_model_parallel_size=2", "model.pipeline_model_parallel_size=2"]),
    # one row per pair, own positions and mask, through TP-sharded heads and both pipeline stages
    "tp2pp2_packed": (
        4,
        ["model.tensor_model_parallel_size=2", "model.pipeline_model_parallel_size=2", "trainer.pack_pairs=true"],
    ),
}


@pytest.fixture(scope="module")
def single(sft_checkpoint, tmp_path_factory):
    """The single-process run from the shared SFT checkpoint, which every layout reshards on load."""
    exp = tmp_path_factory.mktemp("single")
    overrides = TINY + [f"exp_manager.exp_dir={exp}", f"model.restore_from_path={sft_checkpoint}"]
    return sft_checkpoint, run_layout(1, overrides, str(exp / "result.pt"))


def _relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp(min=1e-12))


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_layout_matches_single_process(name, single, tmp_path):
    sft_checkpoint, ref = single
    world, layout_overrides = LAYOUTS[name]
    got = run_layout(
        world,
        TINY
        + layout_overrides
        + [
            f"exp_manager.exp_dir={tmp_path / 'exp'}",
            f"model.restore_from_path={sft_checkpoint}",  # resharded on load
        ],
        str(tmp_path / "result.pt"),
    )

    tp = 2 if "tp2" in name else 1
    pp = 2 if "pp2" in name else 1
    assert got["summary"]["layout"] == {"tp": tp, "pp": pp, "dp": world // (tp * pp), "world_size": world}
    # Same selection, same generated pairs and rewards: the pool is identical.
    for field, value in ref["pool"].items():
        if value.dtype.is_floating_point:
            torch.testing.assert_close(got["pool"][field], value, rtol=1e-5, atol=1e-5, msg=field)
        else:
            assert torch.equal(got["pool"][field], value), field
    # Each rank keeps the token rows of its own block of prompts only (the dry run's estimate).
    n, r = ref["pool"]["chosen_tokens"].shape
    assert ref["pool_bytes"] == pool_bytes_per_rank(n, r, 1)
    assert got["pool_bytes"] == pool_bytes_per_rank(n, r, world // (tp * pp))
    # Same loss and gradients (first optimizer step of iteration 2) within 1e-5 relative.
    for it_ref, it_got in zip(ref["summary"]["iterations"], got["summary"]["iterations"]):
        assert it_got["train_loss"] == pytest.approx(it_ref["train_loss"], rel=1e-5)
        assert it_got["heldout_reward"] == pytest.approx(it_ref["heldout_reward"], abs=1e-9)
    assert got["grads"].keys() == ref["grads"].keys()
    for key, g in ref["grads"].items():
        assert _relative_error(got["grads"][key], g) < 1e-5, key
    assert got["grad_norm"] == pytest.approx(ref["grad_norm"], rel=1e-5)
    for key, w in ref["weights"].items():
        assert _relative_error(got["weights"][key], w) < 1e-5, key


@pytest.fixture(scope="module")
def hypo_single(sft_checkpoint, tmp_path_factory):
    """HyPO (offline pairs + online samples for the KL term) in one process."""
    root = tmp_path_factory.mktemp("hypo")
    base = hypo_overrides(str(root), sft_checkpoint, TINY)
    return base, run_layout(1, base + [f"exp_manager.exp_dir={root / 'run'}"], str(root / "result.pt"))


@pytest.mark.parametrize("name", ["tp2", "pp2", "dp2"])  # dp2: the offline pool sharded over DP
def test_hypo_layout_matches_single_process(name, hypo_single, tmp_path):
    base, ref = hypo_single
    world, layout_overrides = LAYOUTS[name]
    got = run_layout(
        world, base + layout_overrides + [f"exp_manager.exp_dir={tmp_path / 'run'}"], str(tmp_path / "result.pt")
    )
    for it_ref, it_got in zip(ref["summary"]["iterations"], got["summary"]["iterations"]):
        # The KL terms are means of log-prob differences (~0.006 here): TP's sums move each
        # log-prob by ~1e-7 absolute, more than 1e-5 of so small a difference.
        for key in ("train_loss", "hypo_kl", "heldout_kl"):
            assert it_got[key] == pytest.approx(it_ref[key], rel=1e-5, abs=1e-6), key
    for key, g in ref["grads"].items():
        assert _relative_error(got["grads"][key], g) < 1e-5, key
    for key, w in ref["weights"].items():
        assert _relative_error(got["weights"][key], w) < 1e-5, key
