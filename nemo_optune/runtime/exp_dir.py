"""What an experiment directory already holds decides how a run starts: fresh, resumed from
its newest checkpoint, or refused because it holds a different run."""

import json
import os
import shutil

from nemo_optune.runtime.checkpoint import list_checkpoints

# Keys that may change between a run and its resumption (layout, length, bookkeeping).
RESUMABLE_CHANGES = (
    "model.tensor_model_parallel_size",
    "model.pipeline_model_parallel_size",
    "trainer.iterations",
    "generation.micro_batch_size",
    "exp_manager.",
)


class ExperimentDirError(RuntimeError):
    """The experiment directory cannot be used as asked; the message names the key."""


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def config_differences(old: dict, new: dict) -> list[str]:
    a, b = _flatten(old), _flatten(new)
    return sorted(k for k in set(a) | set(b)
                  if a.get(k) != b.get(k) and not any(k.startswith(p) for p in RESUMABLE_CHANGES))


def checkpoints_root(exp_dir: str) -> str:
    return os.path.join(exp_dir, "checkpoints")


def prepare(exp_dir: str, config: dict, resume_if_exists: bool, resume_from: str | None, overwrite: bool) -> str | None:
    """Check and prepare `exp_dir` (rank 0 only); return the checkpoint to resume from, or None.

    Refuses, before any heavy work, a directory that holds a run with a different config
    unless `overwrite`, and an unwritable directory. Never deletes a checkpoint it may resume."""
    try:
        os.makedirs(exp_dir, exist_ok=True)
        probe = os.path.join(exp_dir, ".write_probe")
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as err:
        raise ExperimentDirError(f"config key exp_manager.exp_dir: {exp_dir} is not writable ({err.strerror})") from None

    config_file = os.path.join(exp_dir, "config.json")
    if os.path.exists(config_file):
        with open(config_file) as f:
            old = json.load(f)
        changed = config_differences(old, config)
        if changed and not overwrite:
            raise ExperimentDirError(
                f"config key exp_manager.exp_dir: {exp_dir} holds a run with a different config "
                f"({', '.join(changed[:5])}{', ...' if len(changed) > 5 else ''}); use another exp_dir, "
                f"or exp_manager.overwrite=true to start over")
        if changed:  # overwrite asked for: the old run's outputs go
            for name in ("checkpoints", "sft_checkpoint", "selections.jsonl", "summary.json"):
                path = os.path.join(exp_dir, name)
                if os.path.isdir(path):
                    shutil.rmtree(path)
                elif os.path.exists(path):
                    os.remove(path)

    resume = resume_from
    if resume is None and resume_if_exists:
        found = list_checkpoints(checkpoints_root(exp_dir))
        resume = found[-1] if found else None
    if resume is not None and not os.path.exists(os.path.join(resume, "trainer_state.pt")):
        raise ExperimentDirError(f"config key exp_manager.resume_from: {resume} is not a complete training checkpoint")
    tmp = config_file + ".tmp"
    with open(tmp, "w") as f:
        json.dump(config, f, indent=2)
    os.replace(tmp, config_file)
    return resume


def truncate_jsonl(path: str, keep_iterations: int) -> None:
    """Drop records of iterations after `keep_iterations` (they are redone on resume)."""
    if not os.path.exists(path):
        return
    with open(path) as f:
        kept = [line for line in f if line.strip() and json.loads(line)["iteration"] <= keep_iterations]
    with open(path + ".tmp", "w") as f:
        f.writelines(kept)
    os.replace(path + ".tmp", path)
