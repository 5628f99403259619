"""What model.restore_from_path may name, told apart by the files it holds:

- a nemo_optune model checkpoint (manifest.json; the spec in the manifest, the tokenizer in tokenizer/),
- a Hugging Face model directory (config.json + safetensors, its tokenizer files beside them),
- a NeMo 2 checkpoint directory (weights/ + context/model.yaml, the tokenizer in context/nemo_tokenizer/).

Each brings its architecture and its tokenizer; anything else is one line naming the key.
"""

import os

from nemo_optune.data.tokenizer import HFTokenizer
from nemo_optune.models.hf_io import (
    check_tokenizer,
    eos_ids,
    hf_model_and_tokenizer,
    import_hf,
    is_hf_checkpoint,
    read_hf_spec,
)
from nemo_optune.models.hf_spec import ModelSpec, spec_from_architecture
from nemo_optune.models.nemo2_io import import_nemo2, is_nemo2_checkpoint, nemo2_model_and_tokenizer, refuse_nemo_tar
from nemo_optune.runtime.checkpoint import MANIFEST, TOKENIZER_DIR, load_model, read_manifest


def source_kind(path: str, key: str = "config key model.restore_from_path") -> str:
    """'checkpoint' | 'hf' | 'nemo2', or ValueError naming `key`."""
    if os.path.isfile(os.path.join(path, MANIFEST)):
        return "checkpoint"
    if os.path.isfile(os.path.join(path, "metadata.json")):  # a megatron checkpoint without our manifest
        read_manifest(path)  # says why: an unfinished save or another format
    if is_hf_checkpoint(path):
        return "hf"
    if is_nemo2_checkpoint(path):
        return "nemo2"
    refuse_nemo_tar(path)
    if os.path.isfile(os.path.join(path, "config.json")):
        read_hf_spec(path)  # an unsupported model says so first
        raise ValueError(
            f"{key}: {path} has a config.json but no model.safetensors or model.safetensors.index.json "
            "(Hugging Face weights are read from safetensors only)"
        )
    what = (
        "does not exist"
        if not os.path.exists(path)
        else "is an empty directory"
        if os.path.isdir(path) and not os.listdir(path)
        else "is none of them"
    )
    raise ValueError(
        f"{key}: {path} {what} (expected a nemo_optune checkpoint with {MANIFEST}, a Hugging "
        "Face directory with config.json + model.safetensors, or a NeMo 2 directory with weights/ + "
        "context/model.yaml)"
    )


def checkpoint_spec(directory: str) -> ModelSpec:
    return spec_from_architecture(read_manifest(directory)["architecture"], directory)


def model_and_tokenizer(path: str):
    """(ModelSpec, tokenizer) that `path` brings; nothing heavy is read."""
    kind = source_kind(path)
    if kind == "hf":
        return hf_model_and_tokenizer(path)
    if kind == "nemo2":
        return nemo2_model_and_tokenizer(path)
    spec, tokenizer_dir = checkpoint_spec(path), os.path.join(path, TOKENIZER_DIR)
    if not os.path.isdir(tokenizer_dir):
        raise ValueError(f"{path}: no {TOKENIZER_DIR}/ directory (a checkpoint carries its tokenizer)")
    tokenizer = HFTokenizer(tokenizer_dir, extra_eos_ids=eos_ids(spec.eos_token_id))
    check_tokenizer(tokenizer, spec, tokenizer_dir)
    return spec, tokenizer


def dry_run_model(path: str):
    """(ModelSpec, tokenizer or None) without weights: a directory holding just a config.json
    (and maybe tokenizer files) will do."""
    if os.path.isfile(os.path.join(path, "config.json")):
        return hf_model_and_tokenizer(path)
    return model_and_tokenizer(path)


def load_weights(path: str, model, from_training: bool = False) -> None:
    """Load the weights `path` holds into model.policy at the model's layout (with
    `from_training`, a training checkpoint's policy too). Collective."""
    kind = source_kind(path)
    if kind == "hf":
        import_hf(path, model)
    elif kind == "nemo2":
        import_nemo2(path, model)
    else:
        load_model(path, model, from_training)
