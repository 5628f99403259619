"""ModelSpec: what megatron-core needs to build a decoder, read from a Hugging Face config.json.

Every model is of the Llama family (llama, mistral, qwen2: RMSNorm, SwiGLU, grouped-query
attention, RoPE), the built-in tiny one included. `spec_from_hf_config` accepts exactly what the megatron model computes identically and
refuses everything else with one line naming the file and the field.
"""

import dataclasses
import json

from nemo_optune.config import ModelConfig

HF_FAMILIES = ("llama", "mistral", "qwen2")

# megatron-core 0.16.1's RotaryEmbedding._apply_scaling takes only `factor` from GPTModel; the
# other Llama-3.1 scaling parameters are fixed at these values.
MEGATRON_LLAMA3_ROPE = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    family: str  # llama | mistral | qwen2
    num_layers: int
    hidden_size: int
    ffn_hidden_size: int
    num_attention_heads: int
    num_query_groups: int
    vocab_size: int
    max_position_embeddings: int
    normalization: str  # RMSNorm | LayerNorm
    norm_epsilon: float
    gated_linear_unit: bool  # with activation silu: SwiGLU, fc1 = [gate; up]
    activation: str  # silu | gelu
    add_qkv_bias: bool
    add_bias_linear: bool
    position_embedding_type: str  # rope | learned_absolute
    rotary_base: float
    rope_scaling_factor: float | None  # Llama-3.1 ("llama3") RoPE scaling; None: off
    tie_word_embeddings: bool
    # Embedding/output rows are padded to a multiple of this with zeros (megatron splits them
    # over TP). It does not depend on TP, so checkpoints still reshard across layouts.
    vocab_multiple: int
    dtype: str  # the HF checkpoint's dtype, written back on export
    bos_token_id: int | None
    eos_token_id: int | tuple[int, ...] | None
    # Mistral's sliding attention window when it is shorter than max_position_embeddings: megatron
    # attends over the whole causal prefix, so runs must keep their sequences within it.
    attention_window: int | None = None

    def __post_init__(self):
        if isinstance(self.eos_token_id, list):  # JSON has lists only
            object.__setattr__(self, "eos_token_id", tuple(self.eos_token_id))

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def max_sequence_length(self) -> int:
        """Positions a sequence may take and be computed as by the original model."""
        return min(self.max_position_embeddings, self.attention_window or self.max_position_embeddings)

    @property
    def padded_vocab_size(self) -> int:
        return -(-self.vocab_size // self.vocab_multiple) * self.vocab_multiple

    def as_json(self) -> dict:
        """The fields as a checkpoint manifest stores them (tuples become lists)."""
        return json.loads(json.dumps(dataclasses.asdict(self)))


def tiny_llama_spec(cfg: ModelConfig, vocab_size: int, eos_token_id: int, seq_length: int) -> ModelSpec:
    """The built-in model of model.* (trained from scratch by the SFT warm start): a small
    member of the Llama family, so it takes the same path as real checkpoints (and exports)."""
    return ModelSpec(
        family="llama",
        num_layers=cfg.num_layers,
        hidden_size=cfg.hidden_size,
        ffn_hidden_size=cfg.ffn_hidden_size or 3 * cfg.hidden_size,
        num_attention_heads=cfg.num_attention_heads,
        num_query_groups=cfg.num_query_groups or cfg.num_attention_heads,
        vocab_size=vocab_size,
        max_position_embeddings=seq_length,
        normalization="RMSNorm",
        norm_epsilon=1e-5,
        gated_linear_unit=True,
        activation="silu",
        add_qkv_bias=False,
        add_bias_linear=False,
        position_embedding_type="rope",
        rotary_base=10000.0,
        rope_scaling_factor=None,
        tie_word_embeddings=False,
        vocab_multiple=16,
        dtype="float32",
        bos_token_id=None,
        eos_token_id=eos_token_id,
    )


def spec_from_architecture(architecture: dict, where: str) -> ModelSpec:
    """The spec a checkpoint manifest stores (see MegatronGPTOPTuneModel.architecture)."""
    if architecture.get("family") not in HF_FAMILIES:
        raise ValueError(
            f"{where}: a checkpoint of a model this version does not build (family "
            f"{architecture.get('family')!r}; the built-in model before 0.2 was LayerNorm/GELU: "
            f"rerun its SFT warm start)"
        )
    missing = [
        f.name for f in dataclasses.fields(ModelSpec) if f.name not in architecture and f.default is dataclasses.MISSING
    ]
    if missing:
        raise ValueError(f"{where}: the manifest's architecture lacks {', '.join(missing)}")
    return ModelSpec(**{f.name: architecture.get(f.name, f.default) for f in dataclasses.fields(ModelSpec)})


def _refuse(where: str, field: str, value, supported: str):
    raise ValueError(f"{where}: field {field}={value!r} is not supported ({supported})")


def _rope(config: dict, where: str) -> tuple[float, float | None]:
    """(rotary_base, llama3 scaling factor or None) from either config.json layout:
    transformers 5 writes `rope_parameters`; older files have `rope_theta` + `rope_scaling`."""
    if config.get("rope_parameters") is not None:
        name, params = "rope_parameters", dict(config["rope_parameters"])
    else:
        name, params = "rope_scaling", dict(config.get("rope_scaling") or {})
        params.setdefault("rope_theta", config.get("rope_theta", 10000.0))
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in ("default", "llama3"):
        _refuse(where, f"{name}.rope_type", rope_type, "llama3 or null")
    if rope_type == "default":
        return float(params["rope_theta"]), None
    for field, fixed in MEGATRON_LLAMA3_ROPE.items():
        if params.get(field, fixed) != fixed:
            _refuse(where, f"{name}.{field}", params[field], f"megatron-core 0.16.1 fixes it at {fixed}")
    return float(params["rope_theta"]), float(params["factor"])


def spec_from_hf_config(config: dict, where: str) -> ModelSpec:
    """A ModelSpec from a Hugging Face config.json; ValueError naming `where` and the field for
    anything the megatron model would compute differently."""
    try:
        return _spec_from_hf_config(config, where)
    except KeyError as err:
        raise ValueError(f"{where}: field {err.args[0]} missing") from None


def _spec_from_hf_config(config: dict, where: str) -> ModelSpec:
    family = config.get("model_type")
    if family not in HF_FAMILIES:
        _refuse(where, "model_type", family, ", ".join(HF_FAMILIES))
    hidden, heads = config["hidden_size"], config["num_attention_heads"]
    dtype = config.get("torch_dtype") or config.get("dtype") or "float32"  # transformers 4 | 5
    checks = [  # (field, value, is it supported, what is)
        ("hidden_act", config.get("hidden_act", "silu"), lambda v: v == "silu", "silu"),
        (
            "head_dim",
            config.get("head_dim"),
            lambda v: v in (None, hidden // heads),
            f"{hidden // heads} = hidden_size / num_attention_heads",
        ),
        ("attention_bias", config.get("attention_bias", False), lambda v: not v, "false"),
        ("mlp_bias", config.get("mlp_bias", False), lambda v: not v, "false"),
        ("attention_dropout", config.get("attention_dropout", 0.0), lambda v: v == 0, "0.0"),
        ("quantization_config", config.get("quantization_config"), lambda v: v is None, "unquantized weights only"),
        ("use_sliding_window", config.get("use_sliding_window", False), lambda v: not v, "false"),
        (
            "layer_types",
            config.get("layer_types"),
            lambda v: v is None or set(v) == {"full_attention"},
            "full_attention only",
        ),
        ("torch_dtype", dtype, lambda v: v in ("float32", "bfloat16", "float16"), "float32, bfloat16 or float16"),
    ]
    for field, value, ok, supported in checks:
        if not ok(value):
            _refuse(where, field, value, supported)
    rotary_base, scaling = _rope(config, where)
    window = config.get("sliding_window", 4096) if family == "mistral" else None  # transformers' default
    return ModelSpec(
        family=family,
        num_layers=config["num_hidden_layers"],
        hidden_size=hidden,
        ffn_hidden_size=config["intermediate_size"],
        num_attention_heads=heads,
        num_query_groups=config.get("num_key_value_heads") or heads,
        vocab_size=config["vocab_size"],
        max_position_embeddings=config["max_position_embeddings"],
        normalization="RMSNorm",
        norm_epsilon=float(config.get("rms_norm_eps", 1e-6)),
        gated_linear_unit=True,
        activation="silu",
        add_qkv_bias=family == "qwen2",
        add_bias_linear=False,
        position_embedding_type="rope",
        rotary_base=rotary_base,
        rope_scaling_factor=scaling,
        tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
        vocab_multiple=128,
        dtype=dtype,
        bos_token_id=config.get("bos_token_id"),
        eos_token_id=config.get("eos_token_id"),
        attention_window=window if window is not None and window < config["max_position_embeddings"] else None,
    )


def check_sequence_length(spec: ModelSpec, positions: int, key: str) -> None:
    """Refuse, naming `key`, sequences the model would compute differently from its original."""
    if positions > spec.max_position_embeddings:
        raise ValueError(
            f"config key {key}: sequences of {positions} positions exceed the model's "
            f"max_position_embeddings={spec.max_position_embeddings}"
        )
    if spec.attention_window is not None and positions > spec.attention_window:
        raise ValueError(
            f"config key {key}: sequences of {positions} positions exceed the model's sliding attention "
            f"window of {spec.attention_window} (megatron attends over the whole prefix)"
        )


_ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}


def hf_config_from_spec(spec: ModelSpec) -> dict:
    """config.json for `spec`'s family, in the rope_theta/rope_scaling layout every reader
    (transformers 4 and 5, vLLM, TensorRT-LLM) understands."""
    if spec.family not in HF_FAMILIES:
        raise ValueError(f"family {spec.family!r} has no Hugging Face layout ({', '.join(HF_FAMILIES)})")
    scaling = (
        None
        if spec.rope_scaling_factor is None
        else {"rope_type": "llama3", "factor": spec.rope_scaling_factor, **MEGATRON_LLAMA3_ROPE}
    )
    config = {
        "architectures": [_ARCHITECTURES[spec.family]],
        "model_type": spec.family,
        "hidden_size": spec.hidden_size,
        "intermediate_size": spec.ffn_hidden_size,
        "num_hidden_layers": spec.num_layers,
        "num_attention_heads": spec.num_attention_heads,
        "num_key_value_heads": spec.num_query_groups,
        "head_dim": spec.head_dim,
        "vocab_size": spec.vocab_size,
        "max_position_embeddings": spec.max_position_embeddings,
        "rms_norm_eps": spec.norm_epsilon,
        "hidden_act": "silu",
        "rope_theta": spec.rotary_base,
        "rope_scaling": scaling,
        "tie_word_embeddings": spec.tie_word_embeddings,
        "torch_dtype": spec.dtype,
        "bos_token_id": spec.bos_token_id,
        "eos_token_id": spec.eos_token_id,
        "attention_dropout": 0.0,
    }
    if spec.family == "llama":
        config.update(attention_bias=False, mlp_bias=False)
    else:  # mistral: its window (None: full attention); qwen2: full attention everywhere
        config.update(sliding_window=spec.attention_window)
    if spec.family == "qwen2":
        config.update(use_sliding_window=False)
    return config
