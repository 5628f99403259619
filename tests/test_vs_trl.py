"""benchmarks/vs_trl.py's own logic (the benchmark itself runs outside the suite): the real
task's rows compose into the configs they claim, TRL's snapshot schedule, OPTune's speed-up."""

import importlib.util
import os
import sys

import pytest
from conftest import ROOT

from nemo_optune.config import load_config


@pytest.fixture(scope="module")
def vs_trl():
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    spec = importlib.util.spec_from_file_location("vs_trl", os.path.join(ROOT, "benchmarks", "vs_trl.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_real_task_rows_are_online_dpo_and_optune_on_demo_real(vs_trl):
    rows = vs_trl.TASKS["real"].ours
    cfgs = {name: load_config(recipe, overrides) for name, (recipe, overrides) in rows.items()}
    dpo, optune = cfgs["online_dpo"], cfgs["optune"]
    shipped = load_config("online_dpo").model.optune
    assert dpo.method == "online_dpo" and optune.method == "optune"
    assert (dpo.model.optune.rho, dpo.model.optune.selection, dpo.model.optune.weighting) == (
        shipped.rho,
        shipped.selection,
        shipped.weighting,
    )
    assert optune.model.optune.rho == 0.5
    for cfg in cfgs.values():  # demo_real's data, step and sampling; a held-out point per iteration
        assert cfg.data.instructions == ["max_words", "no_commas"] and cfg.trainer.eval_every == 1
        assert cfg.trainer.lr == vs_trl.TASKS["real"].trl["learning_rate"]
        assert cfg.trainer.prompts_per_iteration == vs_trl.TASKS["real"].trl["per_device_train_batch_size"]


def test_snapshot_schedule(vs_trl):
    assert vs_trl.snapshot_schedule(vs_trl.TASKS["real"], 120) == [40, 80, 120]
    assert vs_trl.snapshot_schedule(vs_trl.TASKS["real"], 150) == [40, 80, 120, 150]
    assert vs_trl.snapshot_schedule(vs_trl.TASKS["sort"], 4) == [1, 2, 3, 4]


def test_speedup_to_final(vs_trl):
    def row(name, curves, seconds):
        return {
            "name": name,
            "final_reward": curves[0][-1][1],
            "train_seconds": seconds,
            "per_seed": [{"curve": c} for c in curves],
        }

    dpo = row("online_dpo", [[(0, 0.4), (60, 0.7), (120, 0.85)]], 120.0)
    optune = row("optune", [[(0, 0.4), (30, 0.8), (60, 0.9)], [(0, 0.4), (40, 0.86)], [(0, 0.4), (50, 0.5)]], 60.0)
    got = vs_trl.speedup_to_final([dpo, optune])
    assert got["optune_seconds_per_seed"] == [60, 40, None] and got["optune_seconds"] == 60
    assert got["speedup"] == pytest.approx(2.0)
    assert vs_trl.speedup_to_final([dpo]) is None
