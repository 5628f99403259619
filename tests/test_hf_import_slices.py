"""import_hf reads, on each rank, only the part of each HF tensor that its shards hold.

safetensors is wrapped so that every read is counted (get_tensor: the whole tensor;
get_slice(name)[index]: the slice), in two spawned gloo processes: TP2 on a qwen2 model
(q/k/v biases, grouped-query attention with two query groups per rank, vocabulary 100
padded to 128 rows), then PP2 on a tied llama model in several safetensors files. The
imported shards must equal the slices of the full megatron tensors (hf_to_megatron of the
whole HF tensors, the importer's former way), padding rows zero. A pure test does the same for
the regions of TP1/2/4/8 (one query group per rank at TP8) without processes."""

import collections
import json
import os

import torch
from parallel_harness import _env, _spawn

from nemo_optune.runtime.distributed import free_port

SHAPE = dict(
    hidden_size=64,
    num_attention_heads=8,
    num_key_value_heads=4,
    intermediate_size=96,
    num_hidden_layers=2,
    max_position_embeddings=64,
)
CASES = {  # name: (config.json, layout (tp, pp), safetensors files)
    "qwen2_tp2": (dict(SHAPE, model_type="qwen2", vocab_size=100), (2, 1), 1),
    "llama_tied_pp2": (dict(SHAPE, model_type="llama", vocab_size=100, tie_word_embeddings=True), (1, 2), 3),
}


def _hf_tensors(config: dict) -> dict[str, tuple[int, ...]]:
    h, ffn, vocab = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    kv = config["num_key_value_heads"] * h // config["num_attention_heads"]
    shapes = {"model.embed_tokens.weight": (vocab, h)}
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shapes.update(
            {
                p + "input_layernorm.weight": (h,),
                p + "self_attn.q_proj.weight": (h, h),
                p + "self_attn.k_proj.weight": (kv, h),
                p + "self_attn.v_proj.weight": (kv, h),
                p + "self_attn.o_proj.weight": (h, h),
                p + "post_attention_layernorm.weight": (h,),
                p + "mlp.gate_proj.weight": (ffn, h),
                p + "mlp.up_proj.weight": (ffn, h),
                p + "mlp.down_proj.weight": (h, ffn),
            }
        )
        if config["model_type"] == "qwen2":
            shapes.update(
                {
                    p + "self_attn.q_proj.bias": (h,),
                    p + "self_attn.k_proj.bias": (kv,),
                    p + "self_attn.v_proj.bias": (kv,),
                }
            )
    shapes["model.norm.weight"] = (h,)
    if not config.get("tie_word_embeddings"):
        shapes["lm_head.weight"] = (vocab, h)
    return shapes


def _write_checkpoint(directory: str, config: dict, files: int) -> None:
    """Random bf16 tensors (every value distinct enough to catch a misplaced row), in `files` files."""
    from safetensors.torch import save_file

    os.makedirs(directory)
    gen = torch.Generator().manual_seed(0)
    tensors = {
        name: torch.randn(shape, generator=gen).to(torch.bfloat16) for name, shape in _hf_tensors(config).items()
    }
    names = list(tensors)
    if files == 1:
        save_file(tensors, os.path.join(directory, "model.safetensors"), metadata={"format": "pt"})
    else:
        weight_map = {}
        for k in range(files):
            file = f"model-{k + 1:05d}-of-{files:05d}.safetensors"
            part = {n: tensors[n] for n in names[k::files]}  # interleaved: tensors alternate between files
            save_file(part, os.path.join(directory, file), metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(part, file))
        with open(os.path.join(directory, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {}, "weight_map": weight_map}, f)
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump({**config, "torch_dtype": "bfloat16"}, f)


def _count_reads(reads: collections.Counter) -> None:
    """Wrap safetensors.safe_open: reads[name] += the elements of every tensor handed out."""
    import safetensors

    real = safetensors.safe_open

    class Slice:
        def __init__(self, name, inner):
            self.name, self.inner = name, inner

        def get_shape(self):
            return self.inner.get_shape()

        def __getitem__(self, index):
            tensor = self.inner[index]
            reads[self.name] += tensor.numel()
            return tensor

    class Handle:
        def __init__(self, path, framework, **kwargs):
            self.inner = real(path, framework=framework, **kwargs)

        def __enter__(self):
            self.inner.__enter__()
            return self

        def __exit__(self, *exc):
            return self.inner.__exit__(*exc)

        def keys(self):
            return self.inner.keys()

        def get_slice(self, name):
            return Slice(name, self.inner.get_slice(name))

        def get_tensor(self, name):
            tensor = self.inner.get_tensor(name)
            reads[name] += tensor.numel()
            return tensor

    safetensors.safe_open = Handle


def _full_tensors(hf_dir: str) -> dict[str, torch.Tensor]:
    """Every tensor, whole (from the bytes: not through the counting safe_open)."""
    from safetensors.torch import load

    out = {}
    for file in sorted(f for f in os.listdir(hf_dir) if f.endswith(".safetensors")):
        with open(os.path.join(hf_dir, file), "rb") as f:
            out.update(load(f.read()))
    return out


def _worker(rank, world, port, root, result_dir):
    _env(rank, world, port)
    from nemo_optune.models.export import local_shards, shard_region
    from nemo_optune.models.gpt_optune import inference_model
    from nemo_optune.models.hf_io import _layer, import_hf, read_hf_spec
    from nemo_optune.models.hf_mapping import hf_names, hf_to_megatron, megatron_name
    from nemo_optune.runtime import distributed

    reads = collections.Counter()
    _count_reads(reads)
    results = {}
    for case, (_, (tp, pp), _) in CASES.items():
        hf_dir = os.path.join(root, case)
        spec = read_hf_spec(hf_dir)
        model = inference_model(spec, distributed.initialize(tp, pp, seed=0))
        reads.clear()
        import_hf(hf_dir, model)
        counted = dict(reads)
        full = _full_tensors(hf_dir)
        mismatched, padding = [], 0
        for sh, param in local_shards(model.policy):
            name = megatron_name(sh.key, _layer(sh))
            expected = hf_to_megatron(name, [full[n] for n in hf_names(name, spec)], spec)
            region = shard_region(sh)[sh.prepend_axis_num :]
            if not torch.equal(param, expected[region].float()):
                mismatched.append((name, region))
            if name in ("embedding.word_embeddings.weight", "output_layer.weight"):
                rows = range(region[0].start, region[0].stop)
                padding += sum(1 for r in rows if r >= spec.vocab_size)
        results[case] = {
            "reads": counted,
            "mismatched": mismatched,
            "padding_rows": padding,
            "padded_vocab": spec.padded_vocab_size,
        }
    torch.save(results, os.path.join(result_dir, f"rank{rank}.pt"))
    distributed.shutdown()


def test_each_rank_reads_only_its_share_of_every_tensor(tmp_path):
    for case, (config, _, files) in CASES.items():
        _write_checkpoint(str(tmp_path / case), config, files)
    _spawn(_worker, (2, free_port(), str(tmp_path), str(tmp_path)), 2)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]

    for case, (config, (tp, pp), _) in CASES.items():
        shapes = _hf_tensors(config)
        numel = {name: torch.Size(shape).numel() for name, shape in shapes.items()}
        per_rank = [r[case] for r in ranks]
        assert all(not r["mismatched"] for r in per_rank), [r["mismatched"] for r in per_rank]
        # Embedding and output layer: rows 100..127 are padding (zeros, checked above); at TP2 rank 1
        # holds them, at PP2 stage 0's embedding and stage 1's (tied) output layer.
        assert sum(r["padding_rows"] for r in per_rank) == 2 * (per_rank[0]["padded_vocab"] - config["vocab_size"])
        assert set().union(*(r["reads"] for r in per_rank)) <= set(numel), "read a tensor it does not know"
        for name, n in numel.items():
            counts = [r["reads"].get(name, 0) for r in per_rank]
            if pp > 1:  # each stage reads the tensors of its layers, the tied embedding both stages
                tied = name == "model.embed_tokens.weight" and config.get("tie_word_embeddings")
                assert sorted(counts) == ([n, n] if tied else [0, n]), (case, name, counts)
            elif "norm" in name:  # every TP rank holds the norms whole
                assert counts == [n] * tp, (case, name, counts)
            else:
                # A rank's share: its rows (or columns, for o_proj and down_proj) of the tensor; of the
                # vocabulary's padded 128 rows, rank 0 holds 64 of the 100 real ones.
                vocab = "embed_tokens" in name or "lm_head" in name
                share = n // shapes[name][0] * per_rank[0]["padded_vocab"] // tp if vocab else n // tp
                assert max(counts) <= share, (case, name, counts, share)
                assert sum(counts) == n, (case, name, counts)  # together: every element exactly once


class _MemoryReader:
    """The importer's reader over tensors in memory, counting the elements of every read."""

    def __init__(self, tensors: dict[str, torch.Tensor]):
        self.tensors, self.reads = tensors, collections.Counter()

    def read(self, name, index):
        out = self.tensors[name][index]
        self.reads[name] += out.numel()
        return out


def test_row_slices_equal_the_full_conversion_at_tp_1_2_4_8():
    """_row_sources + _copy_shard against hf_to_megatron of the whole tensors, for the regions
    megatron gives each TP rank (column-parallel: rows, fc1 as its gate and up halves;
    row-parallel: columns), up to one query group per rank; pure, no process group."""
    from nemo_optune.models.hf_io import _copy_shard, _row_sources
    from nemo_optune.models.hf_mapping import hf_names, hf_to_megatron, megatron_to_hf
    from nemo_optune.models.hf_spec import spec_from_hf_config

    config = dict(SHAPE, model_type="qwen2", num_attention_heads=16, num_key_value_heads=8, vocab_size=100)
    spec = spec_from_hf_config(config, "config.json")
    shapes = _hf_tensors(config)
    gen = torch.Generator().manual_seed(1)
    tensors = {name: torch.randn(shape, generator=gen) for name, shape in shapes.items()}
    h, ffn, rows = spec.hidden_size, spec.ffn_hidden_size, spec.padded_vocab_size
    qkv = (spec.num_attention_heads + 2 * spec.num_query_groups) * spec.head_dim
    megatron = {  # name: (shape, how TP splits it)
        "embedding.word_embeddings.weight": ((rows, h), "rows"),
        "output_layer.weight": ((rows, h), "rows"),
        "decoder.final_layernorm.weight": ((h,), None),
        "decoder.layers.1.self_attention.linear_qkv.layer_norm_weight": ((h,), None),
        "decoder.layers.1.self_attention.linear_qkv.weight": ((qkv, h), "rows"),
        "decoder.layers.1.self_attention.linear_qkv.bias": ((qkv,), "rows"),
        "decoder.layers.1.self_attention.linear_proj.weight": ((h, h), "columns"),
        "decoder.layers.1.mlp.linear_fc1.weight": ((2 * ffn, h), "halves"),
        "decoder.layers.1.mlp.linear_fc2.weight": ((h, ffn), "columns"),
    }
    for tp in (1, 2, 4, 8):
        for name, (shape, split) in megatron.items():
            shape = torch.Size(shape)
            parts = hf_names(name, spec)
            full = hf_to_megatron(name, [tensors[n] for n in parts], spec)
            expected = {n: t.shape for n, t in megatron_to_hf(name, torch.empty(shape, device="meta"), spec)}
            sources = _row_sources(name, shape, expected, spec)
            reads = []
            for rank in range(tp):
                reader = _MemoryReader(tensors)
                if split is None:
                    regions = [(slice(0, shape[0]),)]
                elif split == "columns":
                    step = shape[1] // tp
                    regions = [(slice(0, shape[0]), slice(rank * step, (rank + 1) * step))]
                elif split == "rows":
                    step = shape[0] // tp
                    regions = [(slice(rank * step, (rank + 1) * step), *(slice(0, s) for s in shape[1:]))]
                else:  # SwiGLU fc1: this rank's rows of gate, then of up (two shards of one parameter)
                    step = ffn // tp
                    regions = [
                        (slice(half * ffn + rank * step, half * ffn + (rank + 1) * step), slice(0, h))
                        for half in (0, 1)
                    ]
                for region in regions:
                    param = torch.full([r.stop - r.start for r in region], float("nan"))
                    _copy_shard(reader, parts, sources, region, param)
                    assert torch.equal(param, full[region]), (tp, rank, name, region)
                reads.append(reader.reads)
            for n in parts:
                counts = [r.get(n, 0) for r in reads]
                numel = tensors[n].numel()
                if split is None:
                    assert counts == [numel] * tp, (tp, name, n, counts)
                else:  # each rank its share (vocabulary: of the padded rows), all ranks together once
                    share = numel // tensors[n].shape[0] * rows // tp if "embed" in n or "lm_head" in n else numel // tp
                    assert max(counts) <= share and sum(counts) == numel, (tp, name, n, counts, share)
