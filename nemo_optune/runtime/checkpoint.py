"""Checkpoints through megatron dist_checkpointing (reshardable across TP/PP), with integrity.

A checkpoint directory holds the dist_checkpointing shards, the model's tokenizer files in
`tokenizer/` (Hugging Face format: a checkpoint restores or exports with its tokenizer), and for training checkpoints
`trainer_state.pt` (pool scalars, counters, history; rank 0), the trainer's per-rank files
(the pool's token rows, one file per DP rank: trainers/preference_pool.py) and
`rng_rank{N}.pt` (every rank's RNG states). `manifest.json` is written LAST: the kind
(model | training), the method that wrote a training checkpoint (resuming it into another is
refused: exp_dir.prepare), the model's architecture, and every file's size and SHA-256.

Publishing: every save goes to `<name>.tmp`; once every rank reports its write done, the
files are hashed (split over ranks), rank 0 writes the manifest, and only then renames the
directory into place. A crash or a failed write on any rank leaves no published checkpoint.
Loading verifies the manifest first (split over ranks): bit rot, a truncated or missing file,
another architecture or the wrong kind of checkpoint is one CheckpointError naming the path.
"""

import hashlib
import json
import os
import random
import re
import shutil

import numpy as np
import torch
import torch.distributed as dist

from nemo_optune.runtime.child_processes import checkpoint_writers
from nemo_optune.runtime.distributed import first_failure
from nemo_optune.runtime.experiment import atomic_output

MANIFEST = "manifest.json"
MANIFEST_FORMAT = 1
TOKENIZER_DIR = "tokenizer"
# iter_NNNNNN after N iterations; iter_NNNNNN_{gen,ref,step}_MMMMMM inside iteration N+1, after M
# generation chunks / the reference pass / M training batches (docs/checkpoints.md).
_ITER_DIR = re.compile(r"^iter_(\d{6})(?:_(gen|ref|step)_(\d{6}))?$")
_PARTS = ("gen", "ref", "step")  # the order of an iteration's safe points


class CheckpointError(RuntimeError):
    """A checkpoint cannot be written or read; the message names the path and what is wrong."""


def _first_error(error: BaseException | str | None, name_rank: bool = True) -> str | None:
    """Collective: the first failed rank's message ("rank R: ..."), or None if none failed, on
    every rank (so all ranks raise together, none hangs, and each names the real cause)."""
    first = first_failure(error)
    if first is None:
        return None
    rank, _, message = first
    return f"rank {rank}: {message}" if name_rank else message


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def _files(directory: str) -> list[str]:
    out = []
    for root, _, names in os.walk(directory):
        out += [os.path.relpath(os.path.join(root, n), directory) for n in names]
    return sorted(n for n in out if n != MANIFEST)


def _my_share(items: list) -> list:
    """This rank's share of a list (hashing is split over ranks: big checkpoints hash in parallel)."""
    return items[dist.get_rank() :: dist.get_world_size()]


def _hash_files(directory: str) -> dict:
    """{relative path: {size, sha256}} of every file, each rank hashing its share. Collective."""
    mine = {
        name: {"size": os.path.getsize(os.path.join(directory, name)), "sha256": _sha256(os.path.join(directory, name))}
        for name in _my_share(_files(directory))
    }
    parts = [None] * dist.get_world_size()
    dist.all_gather_object(parts, mine)
    return {name: entry for part in parts for name, entry in sorted(part.items())}


def _publish(directory: str, write, kind: str, architecture: dict, method: str | None = None) -> None:
    """Run write(tmp_dir) on every rank; once every rank reports success, write the manifest
    and rename tmp_dir to `directory`. Collective."""
    tmp = directory.rstrip("/") + ".tmp"
    error = None
    if dist.get_rank() == 0:
        try:
            shutil.rmtree(tmp, ignore_errors=True)
            os.makedirs(tmp)
        except OSError as err:
            error = err
    error = _first_error(error)
    if error:
        raise CheckpointError(f"cannot create checkpoint directory {tmp} ({error})")
    try:
        with checkpoint_writers():  # no stop signal kills megatron's writer processes; they die with the rank
            write(tmp)
    except Exception as err:  # disk full, permissions, a failing writer: every rank must hear of it
        error = err
    error = _first_error(error)
    if not error:  # every rank's shards are on disk: describe them, then publish
        try:
            files = _hash_files(tmp)
            if dist.get_rank() == 0:
                manifest = {"format": MANIFEST_FORMAT, "kind": kind, "architecture": architecture, "files": files}
                if method is not None:
                    manifest["method"] = method
                with atomic_output(os.path.join(tmp, MANIFEST)) as part, open(part, "w") as f:
                    json.dump(manifest, f, indent=1)
        except OSError as err:
            error = err
        error = _first_error(error)
    if error:
        if dist.get_rank() == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointError(f"writing checkpoint {directory} failed on {error}; earlier checkpoints are untouched")
    if dist.get_rank() == 0:
        if os.path.exists(directory):
            shutil.rmtree(directory)
        os.replace(tmp, directory)
    dist.barrier()


def read_manifest(directory: str) -> dict:
    """The manifest of a published checkpoint, or CheckpointError saying why there is none."""
    if not os.path.isdir(directory):
        raise CheckpointError(f"{directory}: no such checkpoint directory")
    path = os.path.join(directory, MANIFEST)
    if not os.path.exists(path):
        what = "is empty" if not os.listdir(directory) else f"has no {MANIFEST}"
        raise CheckpointError(
            f"{directory}: not a nemo_optune checkpoint ({what}; an unfinished save or another format)"
        )
    try:
        with open(path) as f:
            manifest = json.load(f)
        manifest["kind"], manifest["architecture"], manifest["files"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise CheckpointError(f"{path}: unreadable manifest ({err})") from None
    return manifest


def _check_file(directory: str, name: str, entry: dict) -> str | None:
    path = os.path.join(directory, name)
    if not os.path.exists(path):
        return f"{path}: file missing from the checkpoint"
    size = os.path.getsize(path)
    if size != entry["size"]:
        return f"{path}: {size} bytes, the manifest says {entry['size']} (truncated or overwritten)"
    if _sha256(path) != entry["sha256"]:
        return f"{path}: checksum mismatch (the file is corrupted)"
    return None


def verify_checkpoint(directory: str, kind: str, architecture: dict, also: tuple[str, ...] = ()) -> dict:
    """Check kind (`kind`, or one of `also`), architecture and every file's size and checksum
    (split over ranks) before anything is loaded; the same CheckpointError on every rank.
    Collective. Returns the manifest."""
    error, manifest = None, None
    try:
        manifest = read_manifest(directory)
        if manifest["kind"] != kind and manifest["kind"] not in also:
            hint = (
                "pass it as exp_manager.resume_from"
                if manifest["kind"] == "training"
                else "pass it as model.restore_from_path"
            )
            raise CheckpointError(
                f"{directory}: a {manifest['kind']} checkpoint where a {kind} checkpoint is needed ({hint})"
            )
        # Keys of either side: a key the config lacks (a field of another model family) differs too.
        saved = manifest["architecture"]
        keys = list(architecture) + [k for k in saved if k not in architecture]
        differences = [
            f"{k} {saved.get(k)} in the checkpoint, {architecture.get(k)} in the config"
            for k in keys
            if saved.get(k) != architecture.get(k)
        ]
        if differences:
            raise CheckpointError(f"{directory}: another model architecture ({'; '.join(differences)})")
        for name in _my_share(sorted(manifest["files"])):
            error = error or _check_file(directory, name, manifest["files"][name])
    except CheckpointError as err:
        error = str(err)
    error = _first_error(error, name_rank=False)  # the message names the path already
    if error:
        raise CheckpointError(error)
    return manifest


# ------------------------------------------------------------------ model checkpoints
def _save_tokenizer(tmp: str, model) -> None:
    if dist.get_rank() == 0 and model.tokenizer is not None:
        model.tokenizer.save_pretrained(os.path.join(tmp, TOKENIZER_DIR))


def save_model(directory: str, model) -> None:
    """The policy's weights (e.g. the SFT warm start) and tokenizer as a model checkpoint. Collective."""
    from megatron.core import dist_checkpointing

    def write(tmp: str) -> None:
        dist_checkpointing.save(model.policy.sharded_state_dict(), tmp)
        _save_tokenizer(tmp, model)

    _publish(directory, write, "model", model.architecture())


def weights_request(model, prefix: str = "") -> dict:
    """The policy's sharded state dict to load weights into, without TransformerEngine's
    `_extra_state` entries (its FP8 metadata): a checkpoint written without TE (the CPU SFT,
    convert on a CPU node, NeMo's weights-only files) has none, and bf16 runs need none."""
    return {k: v for k, v in model.policy.sharded_state_dict(prefix=prefix).items() if not k.endswith("_extra_state")}


def load_policy_weights(model, state: dict) -> None:
    """Load `state` (the keys of weights_request) into the policy: every key but TE's
    `_extra_state` must be there."""
    result = model.policy.load_state_dict(state, strict=False)
    wrong = [k for k in result.missing_keys if not k.endswith("_extra_state")] + result.unexpected_keys
    if wrong:
        raise RuntimeError(f"loading the policy's weights: missing or unexpected keys {wrong[:5]}")
    model.weights_loaded = True


def load_model(directory: str, model, from_training: bool = False) -> None:
    """Verify, then load a model checkpoint (with `from_training`, also a training checkpoint's
    weights) into the policy, resharded to this layout. Collective."""
    from megatron.core import dist_checkpointing

    verify_checkpoint(directory, "model", model.architecture(), also=("training",) if from_training else ())
    request = weights_request(model)
    loaded = dist_checkpointing.load(request, directory)
    # A training checkpoint's common state also holds the optimizer's: take the model's keys.
    load_policy_weights(model, {key: loaded[key] for key in request})


# --------------------------------------------------------------- training checkpoints
def _rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])


def checkpoints_root(exp_dir: str) -> str:
    return os.path.join(exp_dir, "checkpoints")


def checkpoint_path(exp_dir: str, iteration: int, part: tuple[str, int] | None = None) -> str:
    """iter_NNNNNN after `iteration` iterations; with `part` = (gen | ref | step, M), a safe point
    inside the next iteration."""
    name = f"iter_{iteration:06d}" + (f"_{part[0]}_{part[1]:06d}" if part else "")
    return os.path.join(checkpoints_root(exp_dir), name)


def save_training_checkpoint(
    exp_dir: str,
    iteration: int,
    model,
    trainer_state: dict,
    keep_last: int,
    method: str | None = None,
    rank_files: dict | None = None,
    part: tuple[str, int] | None = None,
) -> str:
    """Model, optimizer, RNG and trainer state after `iteration` (and `part` of the next, see
    checkpoint_path), and this rank's `rank_files` ({file name: object}); then keep the newest
    `keep_last` checkpoints. Collective. Returns the published path."""
    from megatron.core import dist_checkpointing

    def write(tmp: str) -> None:
        model_sd = model.policy.sharded_state_dict()
        dist_checkpointing.save({"model": model_sd, "optimizer": model.optimizer.sharded_state_dict(model_sd)}, tmp)
        torch.save(_rng_state(), os.path.join(tmp, f"rng_rank{dist.get_rank()}.pt"))
        if dist.get_rank() == 0:
            torch.save(trainer_state, os.path.join(tmp, "trainer_state.pt"))
        for name, value in (rank_files or {}).items():
            torch.save(value, os.path.join(tmp, name))
        _save_tokenizer(tmp, model)

    path = checkpoint_path(exp_dir, iteration, part)
    _publish(path, write, "training", model.architecture(), method)
    prune_checkpoints(checkpoints_root(exp_dir), keep_last)
    return path


def load_training_checkpoint(directory: str, model) -> dict:
    """Verify, then load model and optimizer (resharded to this layout) and this rank's RNG
    states; return the trainer state. Collective."""
    from megatron.core import dist_checkpointing

    verify_checkpoint(directory, "training", model.architecture())
    model_sd = weights_request(model)
    loaded = dist_checkpointing.load(
        {"model": model_sd, "optimizer": model.optimizer.sharded_state_dict(model_sd, is_loading=True)}, directory
    )
    load_policy_weights(model, loaded["model"])
    model.optimizer.load_sharded(loaded["optimizer"])
    rng_file = os.path.join(directory, f"rng_rank{dist.get_rank()}.pt")
    if os.path.exists(rng_file):  # absent when resuming on more ranks than saved
        _set_rng_state(torch.load(rng_file, weights_only=False))
    return torch.load(os.path.join(directory, "trainer_state.pt"), weights_only=False)


def iterations_done(checkpoint: str) -> int | None:
    """The whole iterations N a training checkpoint directory iter_NNNNNN[_PART_MMMMMM] holds,
    None for other names."""
    match = _ITER_DIR.match(os.path.basename(os.path.normpath(checkpoint)))
    return int(match.group(1)) if match else None


def checkpoint_part(checkpoint: str) -> tuple[str, int] | None:
    """The (gen | ref | step, M) of a checkpoint inside an iteration (checkpoint_path's `part`),
    None for an iteration's checkpoint iter_NNNNNN."""
    match = _ITER_DIR.match(os.path.basename(os.path.normpath(checkpoint)))
    assert match is not None, checkpoint
    _, part, count = match.groups()
    return (part, int(count)) if part else None


def _order(name: str) -> tuple[int, int, int]:
    part, done = checkpoint_part(name), iterations_done(name)
    assert done is not None
    return (done, _PARTS.index(part[0]) + 1, part[1]) if part else (done, 0, 0)


def list_checkpoints(root: str) -> list[str]:
    """Published training checkpoints under `root`, oldest first (`.tmp` leftovers are not)."""
    if not os.path.isdir(root):
        return []
    return [os.path.join(root, n) for n in sorted((n for n in os.listdir(root) if _ITER_DIR.match(n)), key=_order)]


def newest_intact_checkpoint(exp_dir: str, architecture: dict, warn) -> str | None:
    """The newest training checkpoint of `exp_dir` that verifies; each newer one that does
    not is reported through `warn` and skipped (kept on disk for inspection). Collective."""
    for path in reversed(list_checkpoints(checkpoints_root(exp_dir))):
        try:
            verify_checkpoint(path, "training", architecture)
            return path
        except CheckpointError as err:
            warn(f"[resume] skipping a damaged checkpoint: {err}")
    return None


def prune_checkpoints(root: str, keep_last: int) -> None:
    if dist.get_rank() == 0 and keep_last > 0:
        for old in list_checkpoints(root)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
        for name in os.listdir(root):
            if name.endswith(".tmp"):  # left by a crash during an earlier save
                shutil.rmtree(os.path.join(root, name), ignore_errors=True)
    dist.barrier()
