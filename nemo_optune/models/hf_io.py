"""Hugging Face checkpoints (config.json + safetensors) into and out of a sharded megatron model.

Both directions go tensor by tensor through the model's dist-checkpointing metadata
(models/export.local_shards), so they work for any TP/PP layout:
- import: each rank reads, for each of its shards, the one full HF tensor (plus its fused
  partners) it comes from, converts it and copies out its slice;
- export: each full megatron tensor is assembled from its shards by one all-reduce, split into
  HF tensors and handed on; rank 0 writes safetensors files of bounded size as they fill.
No rank holds more than one full tensor (plus its parts) beyond its own shards, except that
rank 0 keeps the tensors of the safetensors file it is filling (export_hf's max_shard_bytes).
"""

import dataclasses
import json
import os
import shutil
from contextlib import ExitStack

import torch
import torch.distributed as dist

from nemo_optune.data.tokenizer import HFTokenizer
from nemo_optune.models.export import is_main_replica, local_shards, shard_region
from nemo_optune.models.hf_mapping import hf_names, hf_to_megatron, megatron_name, megatron_to_hf
from nemo_optune.models.hf_spec import ModelSpec, hf_config_from_spec, spec_from_hf_config
from nemo_optune.runtime.distributed import raise_if_any_rank_failed

SINGLE, INDEX = "model.safetensors", "model.safetensors.index.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
                   "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja")


def is_hf_checkpoint(path: str) -> bool:
    """A Hugging Face model directory: config.json and safetensors weights (single or sharded)."""
    return os.path.isfile(os.path.join(path, "config.json")) and any(
        os.path.isfile(os.path.join(path, name)) for name in ("model.safetensors", "model.safetensors.index.json"))


def read_hf_spec(hf_dir: str) -> ModelSpec:
    path = os.path.join(hf_dir, "config.json")
    try:
        with open(path) as f:
            config = json.load(f)
    except FileNotFoundError:
        raise ValueError(f"{path}: no such file") from None
    except (OSError, ValueError) as err:
        raise ValueError(f"{path}: unreadable ({err})") from None
    return spec_from_hf_config(config, path)


def hf_model_and_tokenizer(restore: str | None):
    """(ModelSpec, HFTokenizer) of a Hugging Face model directory, or (None, None) otherwise."""
    if not restore or not is_hf_checkpoint(restore):
        return None, None
    spec = read_hf_spec(restore)
    eos = [spec.eos_token_id]
    generation_config = os.path.join(restore, "generation_config.json")
    if os.path.isfile(generation_config):  # Llama 3 lists its end-of-turn ids here
        with open(generation_config) as f:
            eos.append(json.load(f).get("eos_token_id"))
    eos_ids = [i for e in eos for i in (e if isinstance(e, (list, tuple)) else [e]) if isinstance(i, int)]
    tokenizer = HFTokenizer(restore, extra_eos_ids=eos_ids)
    if tokenizer.vocab_size > spec.vocab_size:
        raise ValueError(f"{restore}: the tokenizer has {tokenizer.vocab_size} tokens, the model's vocabulary "
                         f"{spec.vocab_size} (config.json vocab_size)")
    return spec, tokenizer


def build_hf_model(spec: ModelSpec, layout, seed: int = 0):
    """A policy-only MegatronGPTOPTuneModel of `spec` in this layout (fp32), to import into."""
    from nemo_optune.config import ModelConfig
    from nemo_optune.models.gpt_optune import MegatronGPTOPTuneModel

    cfg = ModelConfig(tensor_model_parallel_size=layout.tp, pipeline_model_parallel_size=layout.pp)
    return MegatronGPTOPTuneModel(cfg, spec.vocab_size, spec.max_position_embeddings, layout, seed, lr=0.0,
                                  weight_decay=0.0, grad_clip=0.0, with_reference=False, spec=spec)


class _SafetensorsReader:
    """Tensors of a HF checkpoint directory by name, one at a time (single file or sharded)."""

    def __init__(self, hf_dir: str, stack: ExitStack):
        from safetensors import safe_open

        self.hf_dir, self.stack, self.safe_open, self.handles = hf_dir, stack, safe_open, {}
        if os.path.exists(os.path.join(hf_dir, INDEX)):
            with open(os.path.join(hf_dir, INDEX)) as f:
                self.files = json.load(f)["weight_map"]
            self.label = INDEX
        elif os.path.exists(os.path.join(hf_dir, SINGLE)):
            self.files = dict.fromkeys(self._open(SINGLE).keys(), SINGLE)
            self.label = SINGLE
        else:
            raise ValueError(f"{hf_dir}: no {SINGLE} or {INDEX}")

    def _open(self, file: str):
        if file not in self.handles:
            path = os.path.join(self.hf_dir, file)
            if not os.path.exists(path):
                raise ValueError(f"{path}: no such file (listed in {INDEX})")
            self.handles[file] = self.stack.enter_context(self.safe_open(path, framework="pt"))
        return self.handles[file]

    def get(self, name: str, shape: torch.Size) -> torch.Tensor:
        if name not in self.files:
            raise ValueError(f"{self.label}: tensor {name} missing")
        handle = self._open(self.files[name])
        found = list(handle.get_slice(name).get_shape())
        if found != list(shape):
            raise ValueError(f"{self.files[name]}: tensor {name} has shape {found}, expected {list(shape)}")
        return handle.get_tensor(name)


def _layer(sh) -> int | None:
    """The decoder layer a shard belongs to (its offset along the prepended layer axis)."""
    if sh.prepend_axis_num > 1:
        raise ValueError(f"{sh.key}: more than one stacked axis (virtual pipeline or experts) is not supported")
    return sh.global_offset[0] if sh.prepend_axis_num else None


def import_hf(hf_dir: str, model) -> None:
    """Load a HF checkpoint into `model.policy` (built from read_hf_spec(hf_dir)): every rank
    reads only what its own shards need. Collective (every rank raises the first error)."""
    error = None
    try:
        spec = read_hf_spec(hf_dir)
        for f in (f.name for f in dataclasses.fields(spec) if getattr(spec, f.name) != getattr(model.spec, f.name)):
            raise ValueError(f"{hf_dir}/config.json: another model than the one built "
                             f"({f} {getattr(spec, f)!r} in the file, {getattr(model.spec, f)!r} in the model)")
        with ExitStack() as stack, torch.no_grad():
            reader = _SafetensorsReader(hf_dir, stack)
            name, full = None, None
            for sh, param in local_shards(model.policy):
                axes = sh.prepend_axis_num
                if megatron_name(sh.key, _layer(sh)) != name:  # SwiGLU fc1 comes as two shards in a row
                    name = megatron_name(sh.key, _layer(sh))
                    shape = torch.Size(sh.global_shape[axes:])
                    expected = dict(megatron_to_hf(name, torch.empty(shape, device="meta"), spec))
                    full = hf_to_megatron(name, [reader.get(n, expected[n].shape) for n in hf_names(name, spec)], spec)
                param.copy_(full[shard_region(sh)[axes:]])
    except (ValueError, OSError) as err:
        error = err
    raise_if_any_rank_failed(error)
    model.optimizer.reload_model_params()  # GPU: the optimizer's fp32 copies of the weights


def stream_hf_weights(model):
    """(HF name, full tensor) of `model.policy`, on every rank, one megatron tensor at a time:
    each is assembled from its shards by a sum all-reduce over all ranks. Collective.

    The seam for refitting rollout engines (vLLM, TensorRT-LLM take HF-named tensors)."""
    spec, shards = model.spec, {}
    for sh, value in local_shards(model.policy):
        shards.setdefault((sh.key, _layer(sh)), []).append((sh, value))
    # Every rank runs the same sequence of all-reduces: agree on the tensors of all stages.
    described = [None] * dist.get_world_size()
    dist.all_gather_object(described, {unit: (sh.global_shape[sh.prepend_axis_num:], value.dtype)
                                       for unit, ((sh, value), *_) in shards.items()})
    units = {unit: what for part in described for unit, what in part.items()}

    def hf_order(unit):  # embedding, layers, final norm, output layer
        key, layer = unit
        return (-1 if key.startswith("embedding") else spec.num_layers if layer is None else layer), key

    device = next(model.policy.parameters()).device
    for key, layer in sorted(units, key=hf_order):
        shape, dtype = units[(key, layer)]
        full = torch.zeros(shape, dtype=dtype, device=device)
        for sh, value in shards.get((key, layer), []):
            if is_main_replica(sh.replica_id):  # TP-duplicated and DP-replicated shards once
                full[shard_region(sh)[sh.prepend_axis_num:]] = value.detach()
        dist.all_reduce(full)
        yield from megatron_to_hf(megatron_name(key, layer), full, spec)


class _ShardWriter:
    """safetensors files of at most `max_bytes` each, written as they fill; one file is
    model.safetensors, several are model-0000i-of-0000n.safetensors + the index."""

    def __init__(self, out_dir: str, max_bytes: int):
        self.out_dir, self.max_bytes = out_dir, max_bytes
        self.pending, self.pending_bytes, self.files, self.weight_map = {}, 0, [], {}

    def add(self, name: str, tensor: torch.Tensor) -> None:
        size = tensor.numel() * tensor.element_size()
        if self.pending and self.pending_bytes + size > self.max_bytes:
            self._flush()
        self.pending[name] = tensor.contiguous()
        self.pending_bytes += size

    def _flush(self) -> None:
        from safetensors.torch import save_file

        file = f"part-{len(self.files):05d}.safetensors"
        save_file(self.pending, os.path.join(self.out_dir, file), metadata={"format": "pt"})
        self.weight_map.update(dict.fromkeys(self.pending, file))
        self.files.append((file, self.pending_bytes))
        self.pending, self.pending_bytes = {}, 0

    def close(self) -> None:
        self._flush()
        if len(self.files) == 1:
            os.replace(os.path.join(self.out_dir, self.files[0][0]), os.path.join(self.out_dir, SINGLE))
            return
        names = {file: f"model-{i + 1:05d}-of-{len(self.files):05d}.safetensors" for i, (file, _) in enumerate(self.files)}
        for old, new in names.items():
            os.replace(os.path.join(self.out_dir, old), os.path.join(self.out_dir, new))
        index = {"metadata": {"total_size": sum(size for _, size in self.files)},
                 "weight_map": {name: names[file] for name, file in sorted(self.weight_map.items())}}
        _write_json(os.path.join(self.out_dir, INDEX), index)


def _write_json(path: str, value: dict) -> None:
    with open(path, "w") as f:
        json.dump(value, f, indent=2)


def export_hf(model, out_dir: str, tokenizer_dir: str | None = None, max_shard_bytes: int = 5 << 30) -> None:
    """Write `model.policy` as a HF checkpoint of its spec's family: config.json,
    generation_config.json, safetensors in the spec's dtype, and the tokenizer files of
    `tokenizer_dir` if given. Rank 0 writes; collective (every rank raises the first error)."""
    spec, writing, error = model.spec, dist.get_rank() == 0, None
    try:
        config = hf_config_from_spec(spec)
        tokenizer = [os.path.join(tokenizer_dir, n) for n in TOKENIZER_FILES
                     if os.path.exists(os.path.join(tokenizer_dir, n))] if tokenizer_dir else []
        if tokenizer_dir and not tokenizer:
            raise ValueError(f"{tokenizer_dir}: no tokenizer files ({', '.join(TOKENIZER_FILES)})")
        if os.path.exists(out_dir) and os.listdir(out_dir):
            raise ValueError(f"{out_dir}: exists and is not empty")
        if writing:
            os.makedirs(out_dir, exist_ok=True)
    except (ValueError, OSError) as err:
        error = err
    raise_if_any_rank_failed(error)
    writer = _ShardWriter(out_dir, max_shard_bytes) if writing else None
    for name, tensor in stream_hf_weights(model):  # every rank takes part, even after a failed write
        if writer is not None and error is None:
            try:
                writer.add(name, tensor.to(getattr(torch, spec.dtype)).cpu())
            except OSError as err:
                error = err
    if writer is not None and error is None:
        try:
            writer.close()
            _write_json(os.path.join(out_dir, "config.json"), config)
            _write_json(os.path.join(out_dir, "generation_config.json"),
                        {k: config[k] for k in ("bos_token_id", "eos_token_id") if config[k] is not None})
            for path in tokenizer:
                shutil.copy(path, out_dir)
        except OSError as err:
            error = err
    raise_if_any_rank_failed(error)
