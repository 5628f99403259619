"""Command-line conventions: every command answers --help (exit 0) with its config keys and their
defaults, without importing torch or megatron; recipes outside the checkout (--config-path,
--config FILE.yaml) find the package's own; the recipes ship inside a non-editable install."""

import dataclasses
import os
import shutil
import subprocess
import sys
import zipfile

import pytest
import yaml
from conftest import ROOT

from nemo_optune.cli import config_keys_help, parse_args
from nemo_optune.config import RootConfig, as_dict, load_config
from nemo_optune.serve_reward import ServeRewardConfig

HELP_ALL = """
import contextlib, io, json, runpy, sys
out = {}
for name, run in [
    ("train", lambda: __import__("nemo_optune.cli").cli.train()),
    ("sft", lambda: __import__("nemo_optune.cli").cli.sft()),
    *[(m, lambda m=m: runpy.run_module("nemo_optune." + m, run_name="__main__"))
      for m in ("generate", "serve_reward", "convert")],
]:
    sys.argv = [name, "--help"]
    text = io.StringIO()
    with contextlib.redirect_stdout(text):
        try:
            run()
            code = 0
        except SystemExit as stop:
            code = stop.code or 0
    out[name] = (code, text.getvalue())
heavy = [m for m in ("torch", "megatron", "transformers", "fastapi", "uvicorn") if m in sys.modules]
print(json.dumps({"help": out, "heavy": heavy}))
"""


@pytest.fixture(scope="module")
def helps():
    import json

    done = subprocess.run([sys.executable, "-c", HELP_ALL], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout)


def test_every_command_answers_help_without_heavy_imports(helps):
    assert helps["heavy"] == []
    for name, (code, text) in helps["help"].items():
        assert code == 0 and text.startswith("usage: "), (name, text[:300])
    train = helps["help"]["train"][1]
    assert "--config-path DIR" in train and "--config FILE.yaml" in train and "optune_llama3_8b" in train
    assert "\n  trainer:\n    iterations: 8\n" in train
    generate = helps["help"]["generate"][1]
    assert "\n  generation:\n" in generate and "\n    input_path: null" in generate
    assert "trainer:" not in generate  # only the groups the command reads
    assert "  server:\n    host: 127.0.0.1\n    port: 8000" in helps["help"]["serve_reward"][1]
    assert "--tp TP" in helps["help"]["convert"][1] and "(default: 1)" in helps["help"]["convert"][1]


@pytest.mark.parametrize("schema", [RootConfig, ServeRewardConfig])
def test_the_help_lists_every_key_with_its_default(schema):
    """The help's key listing, read as YAML, is the typed config's defaults, key for key."""
    listed = yaml.safe_load(config_keys_help(schema))
    assert listed == dataclasses.asdict(schema())
    assert "# preference pairs per optimizer step, over all DP ranks" in config_keys_help(RootConfig)


def test_the_launcher_script_answers_help():
    done = subprocess.run(
        [sys.executable, os.path.join(ROOT, "examples", "train_sft.py"), "--help"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0 and "default: sft_tiny" in done.stdout and done.stderr == ""


@pytest.mark.parametrize(
    "argv,expected",
    [
        ([], ("optune_tiny", None, [])),
        (["-cn", "optune", "trainer.iterations=2"], ("optune", None, ["trainer.iterations=2"])),
        (["--config-name=optune.yaml"], ("optune", None, [])),
        (["--config", "{d}/mine.yaml", "a=1"], ("mine", "{d}", ["a=1"])),
        (["--config-path", "{d}", "--config-name", "mine"], ("mine", "{d}", [])),
        (["--config-path={d}", "-cn", "mine"], ("mine", "{d}", [])),
    ],
)
def test_recipe_arguments(argv, expected, tmp_path):
    recipe = parse_args([a.format(d=tmp_path) for a in argv], "optune_tiny")
    name, directory, overrides = expected
    assert (recipe.name, recipe.config_dir, recipe.overrides, recipe.help) == (
        name,
        directory and directory.format(d=tmp_path),
        overrides,
        False,
    )


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--config", "{d}/mine.yaml", "--config-name", "x"], "--config FILE.yaml stands for --config-path"),
        (["--config", "mine.txt"], "--config mine.txt: expected a recipe file ending in .yaml"),
        (["--config-path", "{d}/nowhere"], "--config-path {d}/nowhere: no such directory"),
        (["--config-path"], "--config-path needs a directory"),
        (["--seed", "3"], "unknown argument '--seed'"),
    ],
)
def test_bad_recipe_arguments(argv, message, tmp_path):
    with pytest.raises(ValueError, match=message.format(d=tmp_path).replace("(", r"\(")):
        parse_args([a.format(d=tmp_path) for a in argv], "optune_tiny")


RECIPE = """defaults:
  - base
  - layout: 1x8
  - _self_
method: online_dpo
trainer:
  iterations: 3
model:
  optune:
    selection: all
"""


def test_a_recipe_outside_the_checkout_uses_the_packages_base(tmp_path):
    (tmp_path / "mine.yaml").write_text(RECIPE)
    cfg = load_config("mine", ["trainer.lr=1e-5", "model.tensor_model_parallel_size=1"], str(tmp_path))
    expected = as_dict(RootConfig())
    assert (cfg.method, cfg.trainer.iterations, cfg.trainer.lr) == ("online_dpo", 3, 1e-5)
    assert cfg.trainer.micro_batch_size == 1  # from the package's layout/1x8.yaml
    assert cfg.generation.max_new_tokens == expected["generation"]["max_new_tokens"]  # from base.yaml
    with pytest.raises(ValueError, match=rf"--config-name other: no recipe {tmp_path}/other.yaml \(recipes: mine\)"):
        load_config("other", [], str(tmp_path))


@pytest.mark.slow  # builds a wheel and runs a dry run from it (~40 s on 2 cores)
def test_a_non_editable_install_finds_its_recipes(tmp_path):
    wheels, site, source = tmp_path / "wheels", tmp_path / "site", tmp_path / "source"
    for part in ("nemo_optune", "conf"):  # a copy: building writes build/ next to setup.py
        shutil.copytree(os.path.join(ROOT, part), source / part, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(os.path.join(ROOT, "setup.py"), source)
    pip = [sys.executable, "-m", "pip", "-q"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", str(source), "-w", str(wheels)], check=True)
    (wheel,) = wheels.iterdir()
    assert "nemo_optune/conf/base.yaml" in zipfile.ZipFile(wheel).namelist()
    subprocess.run([*pip, "install", "--no-deps", "--target", str(site), str(wheel)], check=True)
    (tmp_path / "mine.yaml").write_text(RECIPE)
    env = {**os.environ, "PYTHONPATH": str(site)}
    for args in (["--config-name", "optune"], ["--config", "mine.yaml", "model.tensor_model_parallel_size=1"]):
        done = subprocess.run(
            [str(site / "bin" / "optune-train"), *args, "trainer.dry_run=true"],
            capture_output=True,
            text=True,
            cwd=tmp_path,
            env=env,
            timeout=300,
        )
        assert done.returncode == 0 and "[dry run]" in done.stdout, done.stderr[-2000:]
