"""NeMo 2 checkpoints into a sharded megatron model, without nemo-toolkit.

A NeMo 2 checkpoint is a directory (NVIDIA/NeMo nemo/lightning/ckpt_utils.py, io/pl.py, io/mixin.py):
- weights/: a megatron-core distributed checkpoint (torch_dist: metadata.json, common.pt, .metadata,
  *.distcp) of the megatron model's sharded state dict under the prefix `module.` (NeMo's
  MegatronParallel wraps the model; NeMo itself reloads it with `sharded_state_dict(prefix="module.")`);
- context/model.yaml: the model's fiddle config as YAML, objects as dicts with a `_target_` key;
- context/nemo_tokenizer/: the Hugging Face tokenizer files (model.yaml's tokenizer.pretrained_model_name,
  relative to context/).
Older `.nemo` files (NeMo 1, NeMo-Aligner) are tar archives of another layout: refused, with a hint.
"""

import dataclasses
import json
import os
import tarfile

import yaml

from nemo_optune.data.tokenizer import HFTokenizer
from nemo_optune.models.export import local_shards
from nemo_optune.models.hf_spec import MEGATRON_LLAMA3_ROPE, ModelSpec, _refuse
from nemo_optune.runtime.checkpoint import load_policy_weights, weights_request
from nemo_optune.runtime.distributed import raise_if_any_rank_failed

PREFIX = "module."  # of every model tensor in weights/

_GPT = "nemo.collections.llm.gpt.model."
_LLAMA31_CONFIGS = tuple(
    _GPT + "llama." + name
    for name in (  # Llama 3.1 rope scaling (scale_factor, ...)
        "Llama31Config",
        "Llama31Config8B",
        "Llama31Config70B",
        "Llama31Config405B",
        "Llama32Config1B",
        "Llama32Config3B",
    )
)
# model.yaml's `_target_` -> (family, the accepted `config._target_` classes). MoE (Mixtral, Llama 4),
# Gemma, Nemotron & co compute differently from megatron's plain GPT decoder and are refused.
SUPPORTED_NEMO_CLASSES = {
    _GPT + "llama.LlamaModel": (
        "llama",
        tuple(
            _GPT + "llama." + name
            for name in (
                "LlamaConfig",
                "Llama2Config7B",
                "Llama2Config13B",
                "Llama2Config70B",
                "Llama3Config",
                "Llama3Config8B",
                "Llama3Config70B",
                "CodeLlamaConfig7B",
                "CodeLlamaConfig13B",
                "CodeLlamaConfig34B",
                "CodeLlamaConfig70B",
            )
        )
        + _LLAMA31_CONFIGS,
    ),
    _GPT + "mistral.MistralModel": (
        "mistral",
        tuple(
            _GPT + "mistral." + name for name in ("MistralConfig7B", "MistralNeMoConfig12B", "MistralNeMoConfig123B")
        ),
    ),
    _GPT + "qwen2.Qwen2Model": (
        "qwen2",
        tuple(
            _GPT + "qwen2." + name
            for name in (
                "Qwen2Config",
                "Qwen2Config500M",
                "Qwen25Config500M",
                "Qwen2Config1P5B",
                "Qwen25Config1P5B",
                "Qwen25Config3B",
                "Qwen2Config7B",
                "Qwen25Config7B",
                "Qwen25Config14B",
                "Qwen25Config32B",
                "Qwen2Config72B",
                "Qwen25Config72B",
            )
        ),
    ),
}
_AUTO_TOKENIZER = "nemo.collections.common.tokenizers.huggingface.auto_tokenizer.AutoTokenizer"
_SILU = ("torch.nn.functional.silu", "torch._C._nn.silu")
_DTYPES = {"torch.float32": "float32", "torch.bfloat16": "bfloat16", "torch.float16": "float16"}
# TransformerConfig fields that must keep these values (the supported classes' defaults, also taken
# when a field is absent): anything else is another network than megatron's Llama-style decoder.
_FIXED = {
    "normalization": "RMSNorm",
    "gated_linear_unit": True,
    "add_bias_linear": False,
    "position_embedding_type": "rope",
    "rotary_percent": 1.0,
    "rotary_interleaved": False,
    "seq_len_interpolation_factor": None,
    "num_moe_experts": None,
    "qk_layernorm": False,
    "qk_l2_norm": False,
    "layernorm_zero_centered_gamma": False,
    "apply_residual_connection_post_layernorm": False,
    "softmax_scale": None,
    "multi_latent_attention": False,
    "mtp_num_layers": None,
    "attention_output_gate": False,
    "no_rope_freq": None,
    "heterogeneous_block_specs": False,
    "experimental_attention_variant": None,
}


def fixed_config_fields(family: str) -> dict:
    """The TransformerConfig fields a NeMo 2 model of `family` must hold at these values."""
    fixed = dict(_FIXED, add_qkv_bias=family == "qwen2")  # the q/k/v biases of Qwen2 only
    if family != "mistral":
        fixed["window_size"] = None
    return fixed


def is_nemo2_checkpoint(path: str | None) -> bool:
    """A NeMo 2 checkpoint directory: weights/ and context/model.yaml."""
    return (
        bool(path)
        and os.path.isdir(os.path.join(path, "weights"))
        and os.path.isfile(os.path.join(path, "context", "model.yaml"))
    )


def refuse_nemo_tar(path: str | None) -> None:
    """ValueError for a `.nemo` file: a tar archive of NeMo 1 / NeMo-Aligner, another layout."""
    if path and os.path.isfile(path) and (path.endswith(".nemo") or tarfile.is_tarfile(path)):
        raise ValueError(
            f"{path}: a .nemo archive (NeMo 1 / NeMo-Aligner) is not supported; convert it with NeMo's "
            "scripts/checkpoint_converters/convert_nemo1_to_nemo2.py (a NeMo 2 directory) or its "
            "convert_<model>_nemo_to_hf.py (a Hugging Face directory) and pass that directory"
        )


def _target(value):
    """The `_target_` of a fiddle-serialised object, else the value itself."""
    return value.get("_target_") if isinstance(value, dict) else value


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split())


def _cause(err: BaseException) -> str:
    """What failed, in one line: torch's CheckpointException carries every rank's traceback in its
    text, so take the first failed rank's own exception."""
    failures = getattr(err, "failures", None)
    if failures:
        err = next(iter(failures.values()))[0]
    return f"{type(err).__name__}: {_one_line(err)}".rstrip(": ")


def _read_model_yaml(path: str) -> tuple[dict, str]:
    where = os.path.join(path, "context", "model.yaml")
    try:
        with open(where) as f:
            model = yaml.safe_load(f)
    except FileNotFoundError:
        raise ValueError(f"{where}: no such file") from None
    except (OSError, yaml.YAMLError) as err:
        raise ValueError(f"{where}: unreadable ({_one_line(err)})") from None
    if not isinstance(model, dict) or not isinstance(model.get("config"), dict):
        raise ValueError(f"{where}: not a NeMo 2 model config (no `config` mapping)")
    return model, where


def _tokenizer(model: dict, path: str, where: str) -> HFTokenizer:
    config = model.get("tokenizer") or {}
    if _target(config) != _AUTO_TOKENIZER:
        _refuse(where, "tokenizer._target_", _target(config), f"{_AUTO_TOKENIZER}: Hugging Face tokenizer files")
    name = config.get("pretrained_model_name", "nemo_tokenizer")
    if not isinstance(name, str):  # a hub name NeMo did not copy into context/ (io/artifact/file.py)
        _refuse(where, "tokenizer.pretrained_model_name", name, "a directory in context/")
    directory = os.path.join(path, "context", name)
    if not os.path.isdir(directory):
        raise ValueError(f"{directory}: no such tokenizer directory (tokenizer.pretrained_model_name in {where})")
    return HFTokenizer(directory)


def nemo2_model_and_tokenizer(path: str) -> tuple[ModelSpec, HFTokenizer]:
    """(ModelSpec, HFTokenizer) of a NeMo 2 checkpoint directory; ValueError naming the file and
    the field for anything the megatron model would compute differently."""
    refuse_nemo_tar(path)
    if not is_nemo2_checkpoint(path):
        raise ValueError(f"{path}: not a NeMo 2 checkpoint directory (no weights/ and context/model.yaml)")
    model, where = _read_model_yaml(path)
    try:
        return _spec(model, path, where)
    except KeyError as err:
        raise ValueError(f"{where}: field config.{err.args[0]} missing") from None


def _spec(model: dict, path: str, where: str) -> tuple[ModelSpec, HFTokenizer]:
    cfg = model["config"]
    if model.get("_target_") not in SUPPORTED_NEMO_CLASSES:
        _refuse(where, "_target_", model.get("_target_"), ", ".join(SUPPORTED_NEMO_CLASSES))
    family, config_classes = SUPPORTED_NEMO_CLASSES[model["_target_"]]
    if cfg.get("_target_") not in config_classes:
        _refuse(where, "config._target_", cfg.get("_target_"), ", ".join(c.rsplit(".", 1)[1] for c in config_classes))
    hidden, heads, seq_length = cfg["hidden_size"], cfg["num_attention_heads"], cfg["seq_length"]
    for field, required in fixed_config_fields(family).items():
        if cfg.get(field, required) != required:
            _refuse(where, f"config.{field}", cfg[field], json.dumps(required))
    if _target(cfg.get("activation_func", _SILU[0])) not in _SILU:
        _refuse(where, "config.activation_func", _target(cfg["activation_func"]), _SILU[0])
    if cfg.get("kv_channels") not in (None, hidden // heads):
        _refuse(
            where, "config.kv_channels", cfg["kv_channels"], f"{hidden // heads} = hidden_size / num_attention_heads"
        )
    window = cfg.get("window_size")  # Mistral's sliding window: [left, 0]
    if window is not None and not (isinstance(window, list) and len(window) == 2 and window[1] == 0):
        _refuse(where, "config.window_size", window, "null or [window, 0]")
    scaling = None
    if cfg["_target_"] in _LLAMA31_CONFIGS:  # NeMo's Llama31Config.configure_model scales inv_freq
        for nemo_field, megatron_field in (
            ("low_freq_factor", "low_freq_factor"),
            ("high_freq_factor", "high_freq_factor"),
            ("old_context_len", "original_max_position_embeddings"),
        ):
            if cfg[nemo_field] != MEGATRON_LLAMA3_ROPE[megatron_field]:
                _refuse(
                    where,
                    f"config.{nemo_field}",
                    cfg[nemo_field],
                    f"megatron-core 0.16.1 fixes it at {MEGATRON_LLAMA3_ROPE[megatron_field]}",
                )
        scaling = float(cfg["scale_factor"])
    dtype = _target(cfg.get("params_dtype")) or (
        "torch.bfloat16" if cfg.get("bf16") else "torch.float16" if cfg.get("fp16") else "torch.float32"
    )
    if dtype not in _DTYPES:
        _refuse(where, "config.params_dtype", dtype, ", ".join(_DTYPES))
    tokenizer = _tokenizer(model, path, where)
    # NeMo builds exactly config.vocab_size rows when set (its HF importers set it), else the
    # tokenizer's length padded for its TP; the real vocabulary is the former, else the latter.
    vocab_size = cfg.get("vocab_size") or tokenizer.vocab_size
    if tokenizer.vocab_size > vocab_size:
        raise ValueError(
            f"{where}: the tokenizer has {tokenizer.vocab_size} tokens, the model's vocabulary "
            f"{vocab_size} (config.vocab_size)"
        )
    spec = ModelSpec(
        family=family,
        num_layers=cfg["num_layers"],
        hidden_size=hidden,
        ffn_hidden_size=cfg["ffn_hidden_size"],
        num_attention_heads=heads,
        num_query_groups=cfg.get("num_query_groups") or heads,
        vocab_size=vocab_size,
        max_position_embeddings=seq_length,
        normalization="RMSNorm",
        norm_epsilon=float(cfg["layernorm_epsilon"]),
        gated_linear_unit=True,
        activation="silu",
        add_qkv_bias=family == "qwen2",
        add_bias_linear=False,
        position_embedding_type="rope",
        rotary_base=float(cfg["rotary_base"]),
        rope_scaling_factor=scaling,
        tie_word_embeddings=bool(cfg["share_embeddings_and_output_weights"]),
        vocab_multiple=128,
        dtype=_DTYPES[dtype],
        bos_token_id=tokenizer.tok.bos_token_id,
        eos_token_id=tokenizer.tok.eos_token_id,
        attention_window=window[0] if window is not None and window[0] < seq_length else None,
    )
    return spec, tokenizer


def _model_weights_only():
    """A load strategy for common.pt that reads nothing: it holds Lightning's and NeMo's pickled
    trainer state, which needs their classes to unpickle and which the weights do not need."""
    from megatron.core.dist_checkpointing.strategies.common import TorchCommonLoadStrategy

    class SkipCommonState(TorchCommonLoadStrategy):
        def load_common(self, checkpoint_dir):
            return {}

    return SkipCommonState()


def _check_weights(weights: str, model) -> None:
    """Every tensor of this rank's shards is in weights/ with its global shape (vocabulary rows:
    at least the real vocabulary), before any rank starts the collective load."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.core import maybe_load_config

    try:
        config = maybe_load_config(weights)
        stored = dist_checkpointing.load_tensors_metadata(weights) if config is not None else {}
    except Exception as err:  # json, pickle, torch errors of damaged files
        raise ValueError(f"{weights}: unreadable checkpoint metadata ({_cause(err)})") from None
    if config is None:
        raise ValueError(f"{weights}: no metadata.json (not a megatron distributed checkpoint)")
    if config.sharded_backend != "torch_dist":
        _refuse(f"{weights}/metadata.json", "sharded_backend", config.sharded_backend, "torch_dist")
    for sh, _ in local_shards(model.policy):
        key, expected = PREFIX + sh.key, list(sh.global_shape)
        if key not in stored:
            raise ValueError(f"{weights}: tensor {key} missing")
        found = list(stored[key].global_shape)
        if sh.allow_shape_mismatch:  # embedding/output rows: NeMo pads them its own way (or not at all)
            if found[1:] != expected[1:] or found[0] < model.spec.vocab_size:
                raise ValueError(
                    f"{weights}: tensor {key} has shape {found}, expected at least "
                    f"{model.spec.vocab_size} rows of {expected[1:]}"
                )
        elif found != expected:
            raise ValueError(f"{weights}: tensor {key} has shape {found}, expected {expected}")


def import_nemo2(path: str, model) -> None:
    """Load a NeMo 2 checkpoint's weights/ into `model.policy` (built from its spec) at the model's
    TP/PP layout; TE `_extra_state`, optimizer and trainer state in it are ignored. Collective
    (every rank raises the first error)."""
    from megatron.core import dist_checkpointing
    from torch.distributed.checkpoint import CheckpointException

    weights, error = os.path.join(path, "weights"), None
    try:
        spec, _ = nemo2_model_and_tokenizer(path)
        for f in (f.name for f in dataclasses.fields(spec) if getattr(spec, f.name) != getattr(model.spec, f.name)):
            raise ValueError(
                f"{path}/context/model.yaml: another model than the one built "
                f"({f} {getattr(spec, f)!r} in the file, {getattr(model.spec, f)!r} in the model)"
            )
        _check_weights(weights, model)
    except ValueError as err:
        error = err
    raise_if_any_rank_failed(error)
    request = weights_request(model, prefix=PREFIX)
    try:
        loaded = dist_checkpointing.load(request, weights, common_strategy=_model_weights_only())
    except (Exception, CheckpointException) as err:  # torch's: a BaseException with every rank's errors
        error = ValueError(f"{weights}: cannot load ({_cause(err)}; a damaged or incomplete checkpoint?)")
    raise_if_any_rank_failed(error)
    state = {key[len(PREFIX) :]: value for key, value in loaded.items()}
    # Rows past the vocabulary are NeMo's padding (with its TP's multiple): zero, as import_hf leaves them.
    first_row = model.layout.tp_rank * (model.spec.padded_vocab_size // model.layout.tp)
    for key in ("embedding.word_embeddings.weight", "output_layer.weight"):
        if key in state:
            state[key][max(0, model.spec.vocab_size - first_row) :] = 0
    load_policy_weights(model, state)  # (load_policy then refreshes the optimizer's fp32 copies)
