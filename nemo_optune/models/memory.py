"""A per-GPU memory estimate of a run, from the model spec and the config alone (no weights):
what `trainer.dry_run=true` prints. Approximate by design: it counts the big terms (weights,
gradients, optimizer state, activations, logits, the generation KV cache) for the most loaded
pipeline stage."""

from nemo_optune.models.hf_spec import ModelSpec

GIB = 1 << 30


def layer_params(spec: ModelSpec) -> int:
    h, f, hd = spec.hidden_size, spec.ffn_hidden_size, spec.head_dim
    qkv = h * (spec.num_attention_heads + 2 * spec.num_query_groups) * hd
    if spec.add_qkv_bias or spec.add_bias_linear:
        qkv += (spec.num_attention_heads + 2 * spec.num_query_groups) * hd
    mlp = (3 if spec.gated_linear_unit else 2) * h * f
    return qkv + h * h + mlp + 2 * h  # + attention output projection and two norms


def parameter_count(spec: ModelSpec) -> int:
    embeddings = spec.padded_vocab_size * spec.hidden_size * (1 if spec.tie_word_embeddings else 2)
    return spec.num_layers * layer_params(spec) + embeddings + spec.hidden_size


def per_gpu_estimate(
    spec: ModelSpec,
    tp: int,
    pp: int,
    dp: int,
    *,
    bf16: bool,
    distributed_optimizer: bool,
    micro_batch_pairs: int,
    micro_batches: int,
    sequence_length: int,
    generation_batch: int,
) -> dict[str, float]:
    """GiB per GPU on the most loaded stage (the first or last: it holds an embedding table)."""
    weight_bytes = 2 if bf16 else 4
    # One stage holds every table at PP=1; at PP>1 the first holds the embedding, the last the
    # output layer (a copy of the embedding when tied).
    tables = (1 if spec.tie_word_embeddings else 2) if pp == 1 else 1
    stage_params = (
        spec.num_layers // pp * layer_params(spec) + tables * spec.padded_vocab_size * spec.hidden_size
    ) / tp
    s, h, a = sequence_length, spec.hidden_size, spec.num_attention_heads
    b = 2 * micro_batch_pairs  # chosen and rejected sequences
    # Korthikanti et al. (2022), per layer, 16-bit, tensor parallel, no recomputation; the first
    # stage of a 1F1B pipeline holds up to PP micro-batches in flight.
    per_layer = s * b * h * (10 + 24 / tp + 5 * a * s / (h * tp))
    activations = per_layer * (spec.num_layers // pp) * min(pp, micro_batches) * (1 if bf16 else 2)
    logits = s * b * spec.padded_vocab_size / tp * 4  # fp32 for the vocab-parallel cross entropy
    # The KV-cached engine holds keys and values of every position of a pass's rows (at most
    # generation.micro_batch_size) for this stage's layers, its heads split over TP, in the
    # weights' dtype; each step gathers [rows, V] fp32 logits of the last position.
    head_bytes = 2 * spec.num_query_groups * spec.head_dim * weight_bytes / tp
    kv_cache = generation_batch * s * (spec.num_layers // pp) * head_bytes
    generation = generation_batch * spec.padded_vocab_size * 4
    rows = {
        "parameters (model, billions)": parameter_count(spec) / 1e9,
        "policy weights": stage_params * weight_bytes / GIB,
        "reference weights": stage_params * weight_bytes / GIB,
        "gradients (fp32)": stage_params * 4 / GIB,
        "optimizer (fp32 main + Adam)": stage_params * (12 if bf16 else 8) / (dp if distributed_optimizer else 1) / GIB,
        "training activations": activations / GIB,
        "training logits": logits / GIB,
        "generation KV cache": kv_cache / GIB,
        "generation logits": generation / GIB,
    }
    resident = sum(
        rows[k] for k in ("policy weights", "reference weights", "gradients (fp32)", "optimizer (fp32 main + Adam)")
    )
    rows["peak while training"] = resident + rows["training activations"] + rows["training logits"]
    rows["peak while generating"] = resident + rows["generation KV cache"] + rows["generation logits"]
    return rows


def print_estimate(rows: dict[str, float], title: str) -> str:
    """The table `trainer.dry_run=true` prints, ending with the peaks of the two phases."""
    lines = [title, f"  {'parameters (model)':40s} {rows['parameters (model, billions)']:10.2f} B"]
    lines += [f"  {k:40s} {v:10.2f} GiB" for k, v in rows.items() if not k.startswith("parameters")]
    return "\n".join(lines)
