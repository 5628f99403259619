"""What an experiment directory already holds decides how a run starts: fresh, resumed from
its newest checkpoint, or refused because it holds a different run or another run holds it."""

import fcntl
import json
import os
import shutil
import socket

from nemo_optune.config import flatten_keys
from nemo_optune.runtime.checkpoint import (
    CheckpointError,
    checkpoints_root,
    iterations_done,
    list_checkpoints,
    read_manifest,
)
from nemo_optune.runtime.experiment import atomic_output

# Keys that may change between a run and its resumption (layout, length, bookkeeping).
RESUMABLE_CHANGES = (
    "model.tensor_model_parallel_size",
    "model.pipeline_model_parallel_size",
    "trainer.iterations",
    "generation.micro_batch_size",
    "trainer.max_time",  # operation, not training: a requeued job may get another budget
    "trainer.stop_signals",
    "trainer.collective_timeout_seconds",
    "trainer.progress_bar",
    "trainer.eval_every",  # what is measured, not how the run trains
    "exp_manager.",
)
LOCK_FILE = ".lock"
AUTO = "newest intact checkpoint"  # prepare's verdict when the newest checkpoint is to be found


class ExperimentDirError(RuntimeError):
    """The experiment directory cannot be used as asked; the message names the key."""


def config_differences(old: dict, new: dict, defaults: dict | None = None) -> list[str]:
    """Keys whose values differ between the stored config `old` and `new`, but those that may
    change on resume. A key `old` lacks (written by a version before the key existed) differs
    only where `new` sets it off its default: that run behaved as the default does."""
    a, b, d = flatten_keys(old), flatten_keys(new), flatten_keys(defaults or {})

    def differs(k: str) -> bool:
        if k not in a and k in d:
            return b.get(k) != d[k]
        return a.get(k) != b.get(k)

    return sorted(k for k in set(a) | set(b) if differs(k) and not any(k.startswith(p) for p in RESUMABLE_CHANGES))


def lock(exp_dir: str):
    """Hold `exp_dir` for this process until it exits (or the returned file is closed): a
    second run on the same directory is refused, naming the holder. Call after the
    directory is known to be writable."""
    handle = open(os.path.join(exp_dir, LOCK_FILE), "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "unknown pid"
        handle.close()
        raise ExperimentDirError(
            f"config key exp_manager.exp_dir: {exp_dir} is in use by another run ({holder}); "
            f"wait for it to end or use another exp_dir"
        ) from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
    handle.flush()
    return handle


def prepare(
    exp_dir: str,
    config: dict,
    resume_if_exists: bool,
    resume_from: str | None,
    overwrite: bool,
    defaults: dict | None = None,
) -> str | None:
    """Check and prepare `exp_dir` (rank 0 only, after `lock`); return the checkpoint to
    resume from, AUTO (find the newest intact one once the model exists), or None. `defaults`:
    the config's default values (see config_differences).

    Refuses, before any heavy work: a directory that holds a run with a different config
    unless `overwrite`; fewer trainer.iterations than a checkpoint already has done. Never
    deletes a checkpoint it may resume."""
    config_file = os.path.join(exp_dir, "config.json")
    if os.path.exists(config_file):
        with open(config_file) as f:
            old = json.load(f)
        changed = config_differences(old, config, defaults)
        if changed and not overwrite:
            raise ExperimentDirError(
                f"config key exp_manager.exp_dir: {exp_dir} holds a run with a different config "
                f"({', '.join(changed[:5])}{', ...' if len(changed) > 5 else ''}); use another exp_dir, "
                f"or exp_manager.overwrite=true to start over"
            )
        if changed:  # overwrite asked for: the old run's outputs go
            for name in ("checkpoints", "sft_checkpoint", "selections.jsonl", "summary.json", "report.png"):
                path = os.path.join(exp_dir, name)
                if os.path.isdir(path):
                    shutil.rmtree(path)
                elif os.path.exists(path):
                    os.remove(path)

    resume = resume_from
    if resume is None and resume_if_exists and list_checkpoints(checkpoints_root(exp_dir)):
        resume = AUTO
    newest = resume if resume not in (None, AUTO) else (list_checkpoints(checkpoints_root(exp_dir)) or [None])[-1]
    if resume is not None and newest:
        check_method(newest, config["method"], "exp_manager.resume_from" if resume_from else "exp_manager.exp_dir")
    done = iterations_done(newest) if newest else None
    asked = config["trainer"]["iterations"]
    if resume is not None and done is not None:
        require_iterations_cover(asked, done, newest)
    with atomic_output(config_file) as tmp, open(tmp, "w") as f:
        json.dump(config, f, indent=2)
    return resume


def require_iterations_cover(asked: int, done: int, checkpoint: str) -> None:
    """A resumed run asks for at least the iterations its checkpoint has done (checked from the
    directory's name before any work, and from the checkpoint's history once it is loaded)."""
    if asked < done:
        raise ExperimentDirError(
            f"config key trainer.iterations: {asked}, but {checkpoint} has {done} iterations done; "
            f"ask for at least {done}, or use another exp_manager.exp_dir"
        )


def check_method(checkpoint: str, method: str, key: str) -> None:
    """A training checkpoint resumes only into the method that wrote it (its pool, history and
    optimizer state mean something else to another); checkpoints from before methods were
    recorded, and unreadable ones (verified when loaded), pass here."""
    try:
        written_by = read_manifest(checkpoint).get("method")
    except CheckpointError:
        return
    if written_by is not None and written_by != method:
        raise ExperimentDirError(
            f"config key {key}: {checkpoint} was written by method {written_by}, this run is method {method}; "
            f"resume it with method={written_by}, or start this one without it (another exp_manager.exp_dir)"
        )


def check_writable(exp_dir: str) -> None:
    try:
        os.makedirs(exp_dir, exist_ok=True)
        probe = os.path.join(exp_dir, ".write_probe")
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as err:
        raise ExperimentDirError(
            f"config key exp_manager.exp_dir: {exp_dir} is not writable ({err.strerror})"
        ) from None


def truncate_jsonl(path: str, keep_iterations: int) -> None:
    """Drop records of iterations after `keep_iterations` (they are redone on resume)."""
    if not os.path.exists(path):
        return
    with open(path) as f:
        kept = [line for line in f if line.strip() and json.loads(line)["iteration"] <= keep_iterations]
    with atomic_output(path) as tmp, open(tmp, "w") as f:
        f.writelines(kept)
