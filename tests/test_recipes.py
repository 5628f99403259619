"""Every recipe in conf/ runs one iteration end to end."""

import glob
import os

import pytest
from conftest import ROOT, TINY

from nemo_optune.config import load_config

# Recipes for real checkpoints need their model and data (tests/test_dry_run.py checks the 7-8B
# ones, tests/test_instructions.py and tests/test_real_model.py the real-model and demo recipes).
REAL_MODEL_RECIPES = ("optune_zephyr_7b", "optune_llama3_8b", "real_model", "demo_real")
RECIPES = sorted(
    name
    for name in (os.path.basename(p)[:-5] for p in glob.glob(os.path.join(ROOT, "conf", "*.yaml")))
    if name != "base" and name not in REAL_MODEL_RECIPES
)


@pytest.fixture(scope="module")
def offline_jsonl(tmp_path_factory):
    from nemo_optune.data.make_offline_preferences import main

    path = tmp_path_factory.mktemp("prefs") / "prefs.jsonl"
    main(["--out", str(path), *TINY])
    return str(path)


@pytest.mark.parametrize("recipe", RECIPES)
def test_recipe_runs_one_iteration(recipe, sft_checkpoint, offline_jsonl, tmp_path):
    from nemo_optune.run import run_experiment

    cfg = load_config(
        recipe,
        TINY
        + [
            "trainer.iterations=1",
            f"exp_manager.exp_dir={tmp_path}",
            f"model.restore_from_path={sft_checkpoint}",
            f"data.offline_path={offline_jsonl}",
            *(["sft.steps=4"] if recipe == "sft_tiny" else []),  # the recipe runs; learning is tested elsewhere
        ],
    )
    summary = run_experiment(cfg)
    assert summary["method"] == cfg.method
    if cfg.method == "sft":
        assert os.path.isdir(summary["checkpoint"])
        return
    (it,) = summary["iterations"]
    if recipe in ("online_dpo", "optune"):  # shipped with TRL's schedule: one step per generation round
        assert cfg.trainer.prompts_per_iteration == cfg.trainer.global_batch_size == 32
    per_iteration = cfg.trainer.prompts_per_iteration or cfg.data.num_train_prompts
    steps = per_iteration // cfg.trainer.global_batch_size
    assert 0 <= it["heldout_reward"] <= 1 and it["train_loss"] > 0 and it["optimizer_steps"] == steps
    if cfg.method in ("dpo_offline", "hypo"):
        assert it["regenerated"] == 0
    else:
        assert it["regenerated"] == per_iteration
    if cfg.method == "hypo":
        assert it["hypo_kl"] != 0 and it["seconds"]["generation"] > 0


@pytest.mark.parametrize("script", ["compare_methods", "layout_timing", "generation", "vs_trl", "train_step"])
def test_benchmark_scripts_import(script):
    """The benchmarks run outside the suite; at least their imports must follow the code."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(script, os.path.join(ROOT, "benchmarks", f"{script}.py"))
    spec.loader.exec_module(importlib.util.module_from_spec(spec))
