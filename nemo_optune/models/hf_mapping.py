"""Hugging Face Llama-family tensor names and layouts <-> megatron-core, on full tensors.

Megatron names are the model's dist-checkpointing keys with the layer index spelled out
("decoder.layers.3.mlp.linear_fc1.weight"): the same for megatron's local and Transformer
Engine layer specs (the local spec maps its `input_layernorm` to TE's fused
`self_attention.linear_qkv.layer_norm_weight`). Pure functions: no process group needed.
"""

import re

import torch

from nemo_optune.models.hf_spec import HF_FAMILIES, ModelSpec

# Per layer: megatron name -> the HF tensors it is made of, in fusion order. llama, mistral and
# qwen2 share it (the q/k/v biases exist in qwen2 models only).
_LAYER = {
    "self_attention.linear_qkv.layer_norm_weight": ("input_layernorm.weight",),
    "self_attention.linear_qkv.weight": (
        "self_attn.q_proj.weight",
        "self_attn.k_proj.weight",
        "self_attn.v_proj.weight",
    ),
    "self_attention.linear_qkv.bias": ("self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias"),
    "self_attention.linear_proj.weight": ("self_attn.o_proj.weight",),
    "mlp.linear_fc1.layer_norm_weight": ("post_attention_layernorm.weight",),
    "mlp.linear_fc1.weight": ("mlp.gate_proj.weight", "mlp.up_proj.weight"),
    "mlp.linear_fc2.weight": ("mlp.down_proj.weight",),
}
_GLOBAL = {
    "embedding.word_embeddings.weight": ("model.embed_tokens.weight",),
    "decoder.final_layernorm.weight": ("model.norm.weight",),
    "output_layer.weight": ("lm_head.weight",),
}
_VOCAB_ROWS = ("embedding.word_embeddings.weight", "output_layer.weight")
_LAYER_NAME = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")


def megatron_name(key: str, layer: int | None) -> str:
    """A dist-checkpointing key (layers stacked) + layer index -> a per-layer megatron name."""
    return key if layer is None else key.replace("decoder.layers.", f"decoder.layers.{layer}.", 1)


def hf_names(name: str, spec: ModelSpec) -> tuple[str, ...]:
    """The HF tensors a megatron tensor is made of (several for fused ones)."""
    if spec.family not in HF_FAMILIES:
        raise ValueError(f"family {spec.family!r} has no Hugging Face layout ({', '.join(HF_FAMILIES)})")
    match = _LAYER_NAME.match(name)
    parts = _LAYER.get(match.group(2)) if match else _GLOBAL.get(name)
    if parts is None:
        raise ValueError(f"megatron tensor {name} has no Hugging Face counterpart in a {spec.family} model")
    return tuple(f"model.layers.{match.group(1)}.{p}" for p in parts) if match else parts


def _kind(name: str) -> str:
    if "linear_qkv.weight" in name or "linear_qkv.bias" in name:
        return "qkv"
    if name.endswith("linear_fc1.weight"):
        return "gate_up"
    return "vocab" if name in _VOCAB_ROWS else "same"


def hf_to_megatron(name: str, tensors: list[torch.Tensor], spec: ModelSpec) -> torch.Tensor:
    """The full megatron tensor `name` from its HF tensors (in `hf_names` order)."""
    kind = _kind(name)
    if kind == "qkv":
        # Interleaved per query group: [q heads of group g, k_g, v_g] for every group g, so
        # that an even split of the rows over TP gives each rank whole groups.
        q, k, v = (t.reshape(spec.num_query_groups, -1, *t.shape[1:]) for t in tensors)
        return torch.cat([q, k, v], dim=1).reshape(-1, *q.shape[2:])
    if kind == "gate_up":
        return torch.cat(tensors)
    (tensor,) = tensors
    if kind == "vocab":  # zero rows up to the padded vocabulary
        return torch.cat([tensor, tensor.new_zeros(spec.padded_vocab_size - spec.vocab_size, *tensor.shape[1:])])
    return tensor


def megatron_to_hf(name: str, tensor: torch.Tensor, spec: ModelSpec) -> list[tuple[str, torch.Tensor]]:
    """(HF name, tensor) for each HF tensor the full megatron tensor `name` is made of."""
    kind = _kind(name)
    if kind == "qkv":
        per_group = spec.num_attention_heads // spec.num_query_groups * spec.head_dim
        grouped = tensor.reshape(spec.num_query_groups, per_group + 2 * spec.head_dim, *tensor.shape[1:])
        parts = [
            p.reshape(-1, *tensor.shape[1:]) for p in grouped.split([per_group, spec.head_dim, spec.head_dim], dim=1)
        ]
    elif kind == "gate_up":
        parts = list(tensor.chunk(2))
    elif kind == "vocab":
        parts = [tensor[: spec.vocab_size]]
    else:
        parts = [tensor]
    return list(zip(hf_names(name, spec), parts))
