"""Hugging Face checkpoints (config.json + safetensors) into and out of a sharded megatron model.

Both directions go tensor by tensor through the model's dist-checkpointing metadata
(models/export.local_shards), so they work for any TP/PP layout:
- import: each rank reads only the rows (or columns) of each HF tensor that its shards hold
  (safetensors get_slice), straight into them; hf_to_megatron applied to index tensors says
  which rows those are, so the layout is defined once;
- export: each full megatron tensor is assembled from its shards by one all-reduce, split into
  HF tensors and handed on; rank 0 writes safetensors files of bounded size as they fill, so
  beyond its shards a rank holds one full tensor, and rank 0 the file it is filling
  (export_hf's max_shard_bytes).
"""

import dataclasses
import json
import os
import shutil
from contextlib import ExitStack

import torch
import torch.distributed as dist

from nemo_optune.data.tokenizer import HFTokenizer, Tokenizer
from nemo_optune.models.export import is_main_replica, local_shards, shard_region
from nemo_optune.models.hf_mapping import hf_names, hf_to_megatron, megatron_name, megatron_to_hf
from nemo_optune.models.hf_spec import ModelSpec, hf_config_from_spec, spec_from_hf_config
from nemo_optune.runtime.distributed import raise_if_any_rank_failed

SINGLE, INDEX = "model.safetensors", "model.safetensors.index.json"
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
)


def is_hf_checkpoint(path: str) -> bool:
    """A Hugging Face model directory: config.json and safetensors weights (single or sharded)."""
    return os.path.isfile(os.path.join(path, "config.json")) and any(
        os.path.isfile(os.path.join(path, name)) for name in ("model.safetensors", "model.safetensors.index.json")
    )


def _read_json(path: str) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise ValueError(f"{path}: no such file") from None
    except (OSError, ValueError) as err:
        raise ValueError(f"{path}: unreadable ({err})") from None


def read_hf_spec(hf_dir: str) -> ModelSpec:
    """The spec of config.json, its end-of-sequence ids joined by generation_config.json's
    (Llama 3 lists its end-of-turn ids there): generation stops on any of them."""
    path = os.path.join(hf_dir, "config.json")
    spec = spec_from_hf_config(_read_json(path), path)
    generation_config = os.path.join(hf_dir, "generation_config.json")
    if not os.path.isfile(generation_config):
        return spec
    eos = sorted(set(eos_ids(spec.eos_token_id)) | set(eos_ids(_read_json(generation_config).get("eos_token_id"))))
    return dataclasses.replace(spec, eos_token_id=eos[0] if len(eos) == 1 else tuple(eos) if eos else None)


def eos_ids(value) -> list[int]:
    """An eos_token_id field (an int, a list or null) as a list."""
    return [i for i in (value if isinstance(value, (list, tuple)) else [value]) if isinstance(i, int)]


def check_tokenizer(tokenizer: Tokenizer, spec: ModelSpec, where: str) -> None:
    if tokenizer.vocab_size > spec.vocab_size:
        raise ValueError(
            f"{where}: the tokenizer has {tokenizer.vocab_size} tokens, the model's vocabulary "
            f"{spec.vocab_size} (config.json vocab_size)"
        )


def has_tokenizer(directory: str) -> bool:
    return any(os.path.exists(os.path.join(directory, name)) for name in TOKENIZER_FILES)


def hf_model_and_tokenizer(hf_dir: str):
    """(ModelSpec, HFTokenizer) of a Hugging Face model directory; the tokenizer is None when the
    directory has no tokenizer files (weights can still be converted)."""
    spec = read_hf_spec(hf_dir)
    if not has_tokenizer(hf_dir):
        return spec, None
    tokenizer = HFTokenizer(hf_dir, extra_eos_ids=eos_ids(spec.eos_token_id))
    check_tokenizer(tokenizer, spec, hf_dir)
    return spec, tokenizer


class _SafetensorsReader:
    """Slices of the tensors of a HF checkpoint directory by name (single file or sharded).

    safetensors maps each file it opens and hands out views of the mapping: only the pages a
    slice covers are read, and they count in this process's RSS until the file is closed and
    the views are gone. release() closes every open file (import_hf calls it after each
    megatron tensor), so a rank never holds more of the files than the slices of one tensor."""

    def __init__(self, hf_dir: str, stack: ExitStack):
        from safetensors import safe_open

        self.hf_dir, self.safe_open, self.handles = hf_dir, safe_open, {}
        stack.callback(self.release)
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
            handle = self.safe_open(path, framework="pt")
            self.handles[file] = handle.__enter__()
        return self.handles[file]

    def release(self) -> None:
        """Close the open files (their mapped pages leave this process's RSS)."""
        handles, self.handles = self.handles, {}
        for handle in handles.values():
            handle.__exit__(None, None, None)

    def check(self, name: str, shape: torch.Size) -> None:
        """That tensor `name` exists with this shape (from the file's header: no data read)."""
        if name not in self.files:
            raise ValueError(f"{self.label}: tensor {name} missing")
        found = list(self._open(self.files[name]).get_slice(name).get_shape())
        if found != list(shape):
            raise ValueError(f"{self.files[name]}: tensor {name} has shape {found}, expected {list(shape)}")

    def read(self, name: str, index: tuple[slice, ...]) -> torch.Tensor:
        """tensor[index] of a check()ed tensor (a view of the mapped file: only these rows and
        columns are read)."""
        return self._open(self.files[name]).get_slice(name)[index]


def _row_sources(name: str, shape: torch.Size, expected: dict[str, torch.Size], spec: ModelSpec) -> torch.Tensor:
    """Where each row of the full megatron tensor `name` comes from, as [rows, 2] int64:
    (1 + i, row r) for row r of its i-th HF tensor (hf_names order), (0, 0) for a row of zeros
    (the vocabulary padding). hf_to_megatron computes it, run on index tensors instead of the
    weights: the layouts are its alone."""
    parts = [expected[n] for n in hf_names(name, spec)]
    index = [torch.stack([torch.full((p[0],), i + 1), torch.arange(p[0])], dim=1) for i, p in enumerate(parts)]
    sources = hf_to_megatron(name, index, spec)
    if sources.shape != (shape[0], 2) or any(p[1:] != shape[1:] for p in parts):
        raise ValueError(
            f"megatron tensor {name}: its Hugging Face layout is not a rearrangement of rows "
            f"(import_hf reads row slices)"
        )
    return sources


def _copy_shard(
    reader: _SafetensorsReader,
    names: tuple[str, ...],
    sources: torch.Tensor,
    region: tuple[slice, ...],
    param: torch.Tensor,
) -> None:
    """Fill `param`, the `region` of a megatron tensor whose rows come from `sources`
    (_row_sources), reading from each HF tensor only the rows and columns the region needs:
    consecutive rows in one slice, copied straight into `param` (converted to its dtype)."""
    rows, cols = region[0], region[1:]
    part, row = sources[rows].unbind(1)
    if not len(part):
        return
    # Runs of shard rows that come from consecutive rows of one HF tensor (or are all zeros).
    cut = (part[1:] != part[:-1]) | ((part[1:] != 0) & (row[1:] != row[:-1] + 1))
    starts = [0, *(cut.nonzero().flatten() + 1).tolist()]
    runs = {}  # HF tensor -> [(first HF row, first shard row, rows)]
    for start, end in zip(starts, starts[1:] + [len(part)]):
        if part[start] == 0:
            param[start:end].zero_()
        else:
            runs.setdefault(int(part[start]) - 1, []).append((int(row[start]), start, end - start))
    for i, part_runs in runs.items():
        blocks = []  # [first HF row, end HF row, runs]: runs that touch or overlap, read at once
        for run in sorted(part_runs):
            if blocks and run[0] <= blocks[-1][1]:
                blocks[-1][1] = max(blocks[-1][1], run[0] + run[2])
                blocks[-1][2].append(run)
            else:
                blocks.append([run[0], run[0] + run[2], [run]])
        for first, end, block_runs in blocks:
            data = reader.read(names[i], (slice(first, end), *cols))
            for hf_row, start, count in block_runs:
                param[start : start + count].copy_(data[hf_row - first : hf_row - first + count])
            del data


def _layer(sh) -> int | None:
    """The decoder layer a shard belongs to (its offset along the prepended layer axis)."""
    if sh.prepend_axis_num > 1:
        raise ValueError(f"{sh.key}: more than one stacked axis (virtual pipeline or experts) is not supported")
    return sh.global_offset[0] if sh.prepend_axis_num else None


def import_hf(hf_dir: str, model) -> None:
    """Load a HF checkpoint into `model.policy` (built from read_hf_spec(hf_dir)): every rank
    reads only the rows (row-parallel layers: columns) of each HF tensor that its own shards
    hold, straight into them; the files' headers give the shapes, checked before any data is
    read. Collective (every rank raises the first error)."""
    error = None
    try:
        # Vocabulary padding is the built model's layout, not the checkpoint's (HF tensors are
        # unpadded): a HF export of the built-in model (padded to 16) loads back into it.
        spec = dataclasses.replace(read_hf_spec(hf_dir), vocab_multiple=model.spec.vocab_multiple)
        for f in (f.name for f in dataclasses.fields(spec) if getattr(spec, f.name) != getattr(model.spec, f.name)):
            raise ValueError(
                f"{hf_dir}/config.json: another model than the one built "
                f"({f} {getattr(spec, f)!r} in the file, {getattr(model.spec, f)!r} in the model)"
            )
        with ExitStack() as stack, torch.no_grad():
            reader = _SafetensorsReader(hf_dir, stack)
            name, names, sources = None, (), None
            for sh, param in local_shards(model.policy):
                axes = sh.prepend_axis_num
                if megatron_name(sh.key, _layer(sh)) != name:  # SwiGLU fc1 comes as two shards in a row
                    reader.release()  # the previous tensor's pages
                    name = megatron_name(sh.key, _layer(sh))
                    shape = torch.Size(sh.global_shape[axes:])
                    expected = {n: t.shape for n, t in megatron_to_hf(name, torch.empty(shape, device="meta"), spec)}
                    names = hf_names(name, spec)
                    for n in names:
                        reader.check(n, expected[n])
                    sources = _row_sources(name, shape, expected, spec)
                _copy_shard(reader, names, sources, shard_region(sh)[axes:], param)
    except (ValueError, OSError) as err:
        error = err
    raise_if_any_rank_failed(error)
    model.weights_loaded = True  # (load_policy then refreshes the optimizer's fp32 copies)


def _main_in_group(replica_id) -> bool:
    """The shard counts once within one data-parallel replica: megatron's replica ids are
    (0, TP-duplicate index, DP rank), and a model-parallel group holds one DP rank."""
    ids = replica_id if isinstance(replica_id, tuple) else (replica_id,)
    return is_main_replica(ids[:2] if len(ids) == 3 else ids)


def stream_hf_weights(model, group=None):
    """(HF name, full tensor) of `model.policy`, on every rank, one megatron tensor at a time:
    each is assembled from its shards by a sum all-reduce over all ranks. Collective.

    group: a model-parallel group (the TP x PP ranks of one DP replica, e.g. megatron's
    get_model_parallel_group()) instead: the sums run within it, so DP replicas assemble their
    own copies at once and a group of one rank (TP = PP = 1) communicates nothing.

    The seam for refitting rollout engines (vLLM, TensorRT-LLM take HF-named tensors)."""
    spec, shards = model.spec, {}
    for sh, value in local_shards(model.policy):
        shards.setdefault((sh.key, _layer(sh)), []).append((sh, value))
    counts_once = is_main_replica if group is None else _main_in_group
    # Every rank runs the same sequence of all-reduces: agree on the tensors of all stages.
    described = [None] * dist.get_world_size(group)
    mine = {unit: (sh.global_shape[sh.prepend_axis_num :], value.dtype) for unit, ((sh, value), *_) in shards.items()}
    if len(described) == 1:
        described = [mine]
    else:
        dist.all_gather_object(described, mine, group=group)
    units = {unit: what for part in described for unit, what in part.items()}

    def hf_order(unit):  # embedding, layers, final norm, output layer
        key, layer = unit
        return (-1 if key.startswith("embedding") else spec.num_layers if layer is None else layer), key

    device = next(model.policy.parameters()).device
    for key, layer in sorted(units, key=hf_order):
        shape, dtype = units[(key, layer)]
        full = torch.zeros(shape, dtype=dtype, device=device)
        for sh, value in shards.get((key, layer), []):
            if counts_once(sh.replica_id):  # TP-duplicated and DP-replicated shards once
                full[shard_region(sh)[sh.prepend_axis_num :]] = value.detach()
        if len(described) > 1:
            dist.all_reduce(full, group=group)
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
        names = {
            file: f"model-{i + 1:05d}-of-{len(self.files):05d}.safetensors" for i, (file, _) in enumerate(self.files)
        }
        for old, new in names.items():
            os.replace(os.path.join(self.out_dir, old), os.path.join(self.out_dir, new))
        index = {
            "metadata": {"total_size": sum(size for _, size in self.files)},
            "weight_map": {name: names[file] for name, file in sorted(self.weight_map.items())},
        }
        _write_json(os.path.join(self.out_dir, INDEX), index)


def _write_json(path: str, value: dict) -> None:
    with open(path, "w") as f:
        json.dump(value, f, indent=2)


def export_hf(
    model, out_dir: str | None, tokenizer_dir: str | None = None, max_shard_bytes: int = 5 << 30, group=None
) -> None:
    """Write `model.policy` as a HF checkpoint of its spec's family: config.json,
    generation_config.json, safetensors in the spec's dtype, and the tokenizer files of
    `tokenizer_dir` if given. Rank 0 writes; collective (every rank raises the first error).

    group: a model-parallel group (see stream_hf_weights): the first rank of each such group
    writes its own copy to its `out_dir` (the other ranks' out_dir is not used)."""
    first = 0 if group is None else dist.get_process_group_ranks(group)[0]
    spec, writing, error = model.spec, dist.get_rank() == first, None
    try:
        config = hf_config_from_spec(spec)
        tokenizer = (
            [os.path.join(tokenizer_dir, n) for n in TOKENIZER_FILES if os.path.exists(os.path.join(tokenizer_dir, n))]
            if tokenizer_dir
            else []
        )
        if tokenizer_dir and not tokenizer:
            raise ValueError(f"{tokenizer_dir}: no tokenizer files ({', '.join(TOKENIZER_FILES)})")
        if writing:
            assert out_dir is not None, "the writing rank needs an out_dir"
            if os.path.exists(out_dir) and os.listdir(out_dir):
                raise ValueError(f"{out_dir}: exists and is not empty")
            os.makedirs(out_dir, exist_ok=True)
    except (ValueError, OSError) as err:
        error = err
    raise_if_any_rank_failed(error)
    writer = _ShardWriter(out_dir, max_shard_bytes) if writing and out_dir is not None else None
    for name, tensor in stream_hf_weights(model, group):  # every rank takes part, even after a failed write
        if writer is not None and error is None:
            try:
                writer.add(name, tensor.to(getattr(torch, spec.dtype)).cpu())
            except OSError as err:
                error = err
    if writer is not None and out_dir is not None and error is None:
        try:
            writer.close()
            _write_json(os.path.join(out_dir, "config.json"), config)
            _write_json(
                os.path.join(out_dir, "generation_config.json"),
                {k: config[k] for k in ("bos_token_id", "eos_token_id") if config[k] is not None},
            )
            for path in tokenizer:
                shutil.copy(path, out_dir)
        except OSError as err:
            error = err
    raise_if_any_rank_failed(error)
