"""A KV cache of our own at megatron-core's attention layers, for generation.

megatron-core 0.16.1's static-batching path stores keys un-rotated and, at every decoding
step, re-applies RoPE to the whole cache and (local layer spec) repeats every key/value head
for its query group: per-token cost grows with the prefix, measured 5x slower per token at 70
positions than at 22 on a 20M Llama. Here, for the duration of a generation forward, each
layer's SelfAttention.forward is replaced by `_cached_self_attention`: megatron's own qkv
projection (TE's fused norm included) and output projection (its TP all-reduce), with RoPE
applied once to the new queries/keys at each row's own positions, keys stored rotated, and
grouped-query attention computed without repeating keys (the query heads of a group attend
as one block). The rest of the model (embedding, norms, MLP, pipeline schedule, last-token
logits) is megatron's, driven by the StaticInferenceContext this cache extends.

The same attention, with gradients and without plain linears, serves training on packed pairs
(data/packing.py): rows with their own positions and attention mask, which megatron's RoPE
(always at 0..s-1) cannot express.
"""

import contextlib
import math

import torch
import torch.nn.functional as F
from megatron.core.inference.contexts import StaticInferenceContext
from megatron.core.models.common.embeddings.rope_utils import _rotate_half


class KVCache(StaticInferenceContext):
    """Per layer, keys (rotated) and values [rows, local kv heads, max_sequence_length, head dim].

    Before each micro-batch's forward the caller calls set_positions (the attention mask
    [rows, 1, s, sequence_len_offset + s], True = masked, travels as the model's
    attention_mask); the layers write slots sequence_len_offset .. + s of rows
    batch_size_offset .. (megatron's micro-batch bookkeeping), and the caller advances
    sequence_len_offset."""

    def __init__(self, rows: int, max_sequence_length: int):
        super().__init__(rows, max_sequence_length)
        self.rotary_tables: tuple[torch.Tensor, torch.Tensor] | None = None  # cos, sin [max_sequence_length, dim]
        self.rotary: tuple[torch.Tensor, torch.Tensor] | None = None  # cos, sin at this micro-batch's positions
        # (linear, its weight, packed weight) of _plain_linears: found and packed once per cache
        self.plain_linears: list | None = None

    def set_positions(self, positions: torch.Tensor) -> None:
        """The positions [micro-batch rows, s] of the next forward's tokens in their rows (read
        once per forward here, not by every layer)."""
        if self.rotary_tables is not None:
            cos, sin = self.rotary_tables
            self.rotary = cos[positions.t()][:, :, None], sin[positions.t()][:, :, None]  # [s, b, 1, dim]

    def keep_rows(self, index: torch.Tensor) -> None:
        """Row r of the cache becomes old row index[r] (the others are dropped)."""
        for layer, (keys, values) in self.key_value_memory_dict.items():
            self.key_value_memory_dict[layer] = (keys[index], values[index])
        self.max_batch_size = len(index)

    def _layer_memory(self, layer: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if layer not in self.key_value_memory_dict:
            _, _, heads, dim = like.shape
            shape = (self.max_batch_size, heads, self.max_sequence_length, dim)
            self.key_value_memory_dict[layer] = (like.new_zeros(shape), like.new_zeros(shape))
        return self.key_value_memory_dict[layer]


def _rotate(t: torch.Tensor, cache: KVCache, interleaved: bool) -> torch.Tensor:
    """RoPE on t [s, b, heads, head dim] at each row's own positions (megatron's rotation; the
    first `dim` channels rotate, as with rotary_percent < 1)."""
    cos, sin = cache.rotary
    dim = cos.shape[-1]
    rotated = t[..., :dim] * cos.to(t.dtype) + _rotate_half(t[..., :dim], interleaved) * sin.to(t.dtype)
    return rotated if dim == t.shape[-1] else torch.cat((rotated, t[..., dim:]), dim=-1)


def _cached_self_attention(
    attention, cache: KVCache, hidden_states: torch.Tensor, attention_mask: torch.Tensor, **unused
):
    """SelfAttention.forward on the cache; hidden_states [s, b, h], attention_mask [b, 1, s,
    cached + s] (True = masked; every query must see at least one key) -> (output, bias)."""
    config = attention.config
    query, key, value = attention.get_query_key_value_tensors(hidden_states)  # [s, b, heads, dim]
    s, b = query.shape[:2]
    rows = slice(cache.batch_size_offset, cache.batch_size_offset + b)
    if cache.rotary is not None:
        query = _rotate(query, cache, config.rotary_interleaved)
        key = _rotate(key, cache, config.rotary_interleaved)
    keys, values = cache._layer_memory(attention.layer_number, key)
    start, end = cache.sequence_len_offset, cache.sequence_len_offset + s
    keys[rows, :, start:end] = key.permute(1, 2, 0, 3)
    values[rows, :, start:end] = value.permute(1, 2, 0, 3)
    kv_heads, dim = keys.shape[1], query.shape[-1]
    group = query.shape[2] // kv_heads
    # Query head j uses kv head j // group (megatron's grouping): [b, kv heads, group * s, dim].
    q = query.permute(1, 2, 0, 3).reshape(b, kv_heads, group * s, dim)
    allowed = ~attention_mask.expand(b, 1, s, end)
    if s > 1:  # a decoding step's one query row broadcasts over the group's heads as it is
        allowed = allowed.repeat(1, 1, group, 1)  # [b, 1, group * s, end]
    scale = config.softmax_scale or 1.0 / math.sqrt(dim)
    context = F.scaled_dot_product_attention(
        q, keys[rows, :, :end], values[rows, :, :end], attn_mask=allowed, scale=scale
    )
    context = context.reshape(b, kv_heads * group, s, dim).permute(2, 0, 1, 3).reshape(s, b, -1)
    return attention.linear_proj(context)


@contextlib.contextmanager
def cached_attention(gpt_model, cache: KVCache, plain_linears: bool = True):
    """Within the block, `gpt_model`'s attention layers read and write `cache`. plain_linears:
    see _plain_linears (generation only: training keeps megatron's linears, whose autograd
    Function feeds its gradient buffers)."""
    if getattr(gpt_model.config, "attention_output_gate", False):
        raise NotImplementedError("the KV cache does not implement attention output gates")
    rotary = getattr(gpt_model, "rotary_pos_emb", None)
    if rotary is not None and getattr(gpt_model, "position_embedding_type", "rope") == "rope":
        if cache.rotary_tables is None:
            freqs = rotary(cache.max_sequence_length)[:, 0, 0].float()  # [positions, dim]
            cache.rotary_tables = torch.cos(freqs), torch.sin(freqs)
    layers = [layer.self_attention for layer in gpt_model.decoder.layers]
    for attention in layers:
        attention.forward = lambda hidden, attention_mask, _attention=attention, **k: _cached_self_attention(
            _attention, cache, hidden, attention_mask, **k
        )
    if cache.plain_linears is None:
        cache.plain_linears = _plain_linears(gpt_model) if plain_linears else []
    linears = [linear for linear, _, _ in cache.plain_linears]
    for linear, source, packed in cache.plain_linears:
        linear.forward = (
            lambda x, weight=None, runtime_gather_output=None, _linear=linear, _source=source, _packed=packed: (
                _plain_linear(_linear, x, weight, _source, _packed)
            )
        )
    try:
        yield
    finally:
        for module in layers + linears:
            del module.forward


def _plain_linears(gpt_model) -> list:
    """[(linear, its weight, that weight packed or None)] for the megatron-local linears
    (decoder and output layer) when they have no tensor-parallel peer: there, their forward is
    one matmul behind an autograd Function and TP bookkeeping (~25 us a call, 7-9% of a
    decoding step of a small model on CPU) that generation, without gradients, does not need.
    TransformerEngine's layers are not of these classes and keep their forward."""
    from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear

    linears = [m for m in gpt_model.decoder.modules() if isinstance(m, (ColumnParallelLinear, RowParallelLinear))]
    output_layer = getattr(gpt_model, "output_layer", None) if getattr(gpt_model, "post_process", False) else None
    if isinstance(output_layer, ColumnParallelLinear):
        linears.append(output_layer)
    if any(m.tp_group is not None and m.tp_group.size() > 1 for m in linears):
        return []
    weights = [gpt_model.shared_embedding_or_output_weight() if m.weight is None else m.weight for m in linears]
    return [(m, w, _packed_weight(w)) for m, w in zip(linears, weights)]


# oneDNN's weight layout is chosen for a batch size; decoding batches are tens to hundreds of rows.
_PACKING_ROWS = 64
# The packed matmul costs ~25 us a call more than F.linear: measured slower below ~256 x 512
# weights (a 64-wide model: 2x slower at 16 rows), faster above (512 wide: 1.4x at 128 rows).
_PACKING_MIN_ELEMENTS = 1 << 17


def _packed_weight(weight: torch.Tensor | None) -> torch.Tensor | None:
    """On CPU, `weight` reordered once into oneDNN's blocked layout (what torch.compile's CPU
    backend does for inference): F.linear re-reads the plain layout at every call, the packed
    matmul is measured 25-30% faster at 64 rows and 2x at one row on these cores for a 512-wide
    model. The copy lives for one generation pass (weights change between passes). None where
    it does not apply or gain (not CPU, other dtypes, small weights, an absent operator)."""
    if weight is None or weight.device.type != "cpu" or weight.dtype not in (torch.float32, torch.bfloat16):
        return None
    if weight.numel() < _PACKING_MIN_ELEMENTS:
        return None
    if not (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")):
        return None
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), _PACKING_ROWS)


def _plain_linear(
    linear, x: torch.Tensor, weight: torch.Tensor | None, source: torch.Tensor, packed: torch.Tensor | None
):
    """ColumnParallelLinear / RowParallelLinear.forward at TP = 1: (output, bias left to the
    caller). `packed` is `source` (the weight the linear uses: its own, or the tied embedding
    the output layer is passed) in oneDNN's layout (_packed_weight), or None."""
    bias = linear.bias
    add_bias = None if linear.skip_bias_add else bias
    weight = linear.weight if weight is None else weight
    if packed is not None and weight is source:
        output = torch.ops.mkldnn._linear_pointwise(x, packed, add_bias, "none", [], "")
    else:
        output = F.linear(x, weight, add_bias)
    return output, bias if linear.skip_bias_add else None
