"""Write a NeMo 2 checkpoint directory from a tiny Hugging Face model directory, laid out as NeMo's
own HF importers (`llm.import_ckpt`) write it, so that tests can read one without nemo-toolkit.

What this mimics, read in NVIDIA/NeMo at commit 8cfedd72 (2025-09-20):
- <dir>/weights + <dir>/context: nemo/lightning/ckpt_utils.py (WEIGHTS_PATH, CONTEXT_PATH);
  io/connector.py `nemo_save` saves through the trainer, then `TrainerContext.io_dump(context,
  yaml_attrs=["model"])`.
- weights/: io/pl.py `MegatronCheckpointIO.save_checkpoint` calls `dist_checkpointing.save(checkpoint,
  weights, torch_dist strategy, content_metadata=...)` with Lightning's checkpoint dict, in which
  pytorch/strategies/megatron_strategy.py `save_checkpoint` empties "state_dict" and puts the model
  under "sharded_state_dict" = MegatronParallel.sharded_state_dict(): the megatron model's own
  sharded state dict with the prefix "module." (megatron_parallel.py `_module_sharded_state_dict`;
  vlm/neva/model/base.py `restore_model_weights` reloads `sharded_state_dict(prefix="module.")`).
  The importers save no optimizer state (`nemo_setup`: ckpt_save_optimizer=False). megatron writes
  metadata.json, common.pt, .metadata and the .distcp shards; TE layers add `_extra_state` objects
  (the local layers here have them too). Lightning's bookkeeping in common.pt is reduced to
  epoch/global_step/version here.
- vocabulary rows: gpt/model/base.py `GPTConfig.configure_model` builds exactly config.vocab_size rows
  when it is set (the llama and qwen2 importers set it to the HF vocab_size), else the tokenizer's
  length padded to make_vocab_size_divisible_by x TP (nemo/lightning/base.py `get_vocab_size`); the
  llama and mistral importers set make_vocab_size_divisible_by to the largest power of two <= 128
  dividing the HF vocab_size, qwen2's to 128. `pretrained_tp=k` writes a model NeMo built from its
  tokenizer at TP=k instead (vocab_size null, rows padded, random padding rows).
- context/model.yaml: io/mixin.py `_io_dump_yaml` (yaml.SafeDumper; every object as a mapping with
  `_target_` = module.qualname and all dataclass fields, functions and dtypes as {_target_, _call_:
  false}); see NeMo's tests/lightning/_io/artifacts/model.yaml. The fields and config classes are
  those the importers set (gpt/model/llama.py HFLlamaImporter.config: Llama31Config with scale_factor
  for llama3 rope scaling else LlamaConfig; qwen2.py HFQwen2Importer.config: Qwen2Config; mistral.py
  HFMistralImporter.config: MistralConfig7B with seq_length = window_size[0] = sliding_window) plus the
  class defaults that matter to the network; NeMo writes every other TransformerConfig field too.
  generation_config is written as the yaml fallback representer would write a non-fiddle object
  (not checked against a real file).
- context/nemo_tokenizer/: the importers save the HF tokenizer to /tmp/nemo_tokenizer
  (io/connector.py `save_hf_tokenizer_assets`); NeMo's AutoTokenizer.pretrained_model_name is a
  DirOrStringArtifact (io/registry.py), copied to context/<basename> (io/artifact/file.py) and
  written relative in model.yaml: `pretrained_model_name: nemo_tokenizer`.
- context/io.json: always written by `io_dump` (fiddle's serialization.dump_json: root, objects,
  refcounts, version); here only those keys, empty — nemo_optune does not read it.
"""

import json
import os
import shutil

import torch
import yaml

from nemo_optune.models.gpt_optune import inference_model
from nemo_optune.models.hf_io import TOKENIZER_FILES, import_hf, read_hf_spec
from nemo_optune.models.nemo2_io import fixed_config_fields
from nemo_optune.models.optimizers import CPUOptimizer
from nemo_optune.runtime import distributed

GPT = "nemo.collections.llm.gpt.model."
MODEL_CLASSES = {
    "llama": GPT + "llama.LlamaModel",
    "mistral": GPT + "mistral.MistralModel",
    "qwen2": GPT + "qwen2.Qwen2Model",
}
AUTO_TOKENIZER = "nemo.collections.common.tokenizers.huggingface.auto_tokenizer.AutoTokenizer"


def _ref(target: str) -> dict:
    """A function or dtype as NeMo's yaml writes it."""
    return {"_call_": False, "_target_": target}


def _power_of_two_divisor(vocab_size: int) -> int:
    base = 128
    while vocab_size % base:
        base //= 2
    return base


def model_yaml(hf_config: dict, spec, pretrained_tp: int | None = None) -> dict:
    """context/model.yaml's content for a HF config.json (as NeMo's importer for its family)."""
    family = spec.family
    config = {
        "num_layers": spec.num_layers,
        "hidden_size": spec.hidden_size,
        "ffn_hidden_size": spec.ffn_hidden_size,
        "num_attention_heads": spec.num_attention_heads,
        "num_query_groups": spec.num_query_groups,
        "init_method_std": hf_config.get("initializer_range", 0.02),
        "layernorm_epsilon": spec.norm_epsilon,
        "gated_linear_unit": True,
        "rotary_base": spec.rotary_base,
        "seq_length": spec.max_position_embeddings,
        "share_embeddings_and_output_weights": spec.tie_word_embeddings,
        "vocab_size": spec.vocab_size,
        "make_vocab_size_divisible_by": _power_of_two_divisor(spec.vocab_size),
        "fp16": spec.dtype == "float16",
        "bf16": spec.dtype == "bfloat16",
        "params_dtype": _ref(f"torch.{spec.dtype}"),
        "kv_channels": spec.head_dim,
        "generation_config": {
            "_call_": True,
            "_target_": "transformers.generation.configuration_utils.GenerationConfig",
        },
        # the config classes' defaults (the mistral branch sets window_size)
        **fixed_config_fields(family),
        "activation_func": _ref("torch.nn.functional.silu"),
        "hidden_dropout": 0.0,
        "attention_dropout": 0.0,
        "tensor_model_parallel_size": 1,
        "pipeline_model_parallel_size": 1,
        "virtual_pipeline_model_parallel_size": None,
        "transformer_layer_spec": _ref(GPT + "base.default_layer_spec"),
    }
    if family == "llama":
        if spec.rope_scaling_factor is None:
            config["_target_"] = GPT + "llama.LlamaConfig"
        else:
            config.update(
                _target_=GPT + "llama.Llama31Config",
                scale_factor=spec.rope_scaling_factor,
                low_freq_factor=1.0,
                high_freq_factor=4.0,
                old_context_len=8192,
            )
    elif family == "qwen2":
        if spec.tie_word_embeddings:  # NeMo's importer unties them; not mimicked here
            raise ValueError("a tied qwen2 model is imported untied by NeMo")
        config.update(_target_=GPT + "qwen2.Qwen2Config", make_vocab_size_divisible_by=128)
    else:  # mistral: no vocab_size (the tokenizer's is taken), seq_length = the sliding window
        window = hf_config.get("sliding_window")
        config.update(
            _target_=GPT + "mistral.MistralConfig7B",
            vocab_size=None,
            cp_comm_type="a2a" if window else None,
            window_size=None if window is None else [window, 0],
            seq_length=window,
        )
    if pretrained_tp is not None:  # trained by NeMo from its tokenizer: no vocab_size, rows padded
        config.update(vocab_size=None, make_vocab_size_divisible_by=128)
    tokenizer = {
        "_target_": AUTO_TOKENIZER,
        "pretrained_model_name": "nemo_tokenizer",
        "vocab_file": None,
        "merges_file": None,
        "mask_token": None,
        "bos_token": None,
        "eos_token": None,
        "pad_token": None,
        "sep_token": None,
        "cls_token": None,
        "unk_token": None,
        "additional_special_tokens": [],
        "use_fast": True,
        "trust_remote_code": False,
        "include_special_tokens": False,
        "chat_template": None,
    }
    model = {
        "_target_": MODEL_CLASSES[family],
        "config": config,
        "optim": None,
        "tokenizer": tokenizer,
        "model_transform": None,
    }
    if family == "llama":
        model["model_context_managers"] = []
    return model


def write_nemo2_checkpoint(
    out_dir: str, hf_dir: str, pretrained_tp: int | None = None, drop: tuple = (), optimizer_state: bool = False
) -> None:
    """A NeMo 2 checkpoint of the HF model in hf_dir (its family from config.json), written at TP1 in
    this process's one-process world (initialised here). `pretrained_tp`: see the module docstring;
    `drop`: stored tensor keys to leave out; `optimizer_state`: as a training checkpoint, with Adam
    moments (zeros) as megatron's non-distributed optimizer shards them, under "optimizer"."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    with open(os.path.join(hf_dir, "config.json")) as f:
        hf_config = json.load(f)
    spec = read_hf_spec(hf_dir)
    model = inference_model(spec, distributed.initialize(1, 1, seed=0))
    import_hf(hf_dir, model)
    model.policy.to(getattr(torch, spec.dtype))  # NeMo saves its params in params_dtype
    sharded = model.policy.sharded_state_dict(prefix="module.")
    rows = spec.vocab_size
    if pretrained_tp is not None:
        multiple = 128 * pretrained_tp
        rows = -(-spec.vocab_size // multiple) * multiple
    for name in ("module.embedding.word_embeddings.weight", "module.output_layer.weight"):
        if name in sharded:  # NeMo's rows: the vocabulary, or padded with what its init left there
            table = sharded[name].data[: spec.vocab_size]
            padding = torch.randn(rows - spec.vocab_size, table.shape[1], generator=torch.Generator().manual_seed(1))
            rows_written = torch.cat([table, padding.to(table.dtype)])
            sharded[name] = ShardedTensor.from_rank_offsets(sharded[name].key, rows_written)
    sharded = {k: v for k, v in sharded.items() if v.key not in drop}
    checkpoint = {
        "state_dict": {},
        "sharded_state_dict": sharded,
        "epoch": 0,
        "global_step": 0,
        "pytorch-lightning_version": "2.5.1",
    }
    if optimizer_state:  # megatron_strategy.py save_checkpoint: checkpoint["optimizer"] = [sharded optimizer state]
        model_sd = model.policy.sharded_state_dict(prefix="module.")
        optimizer = CPUOptimizer(model.policy, lr=0.0, weight_decay=0.0, grad_clip=0.0)
        checkpoint["optimizer"] = [optimizer.sharded_state_dict(model_sd, is_loading=True)]
    weights, context = os.path.join(out_dir, "weights"), os.path.join(out_dir, "context")
    os.makedirs(weights)
    dist_checkpointing.save(checkpoint, weights, content_metadata={})
    os.makedirs(os.path.join(context, "nemo_tokenizer"))
    with open(os.path.join(context, "model.yaml"), "w") as f:
        yaml.safe_dump(model_yaml(hf_config, spec, pretrained_tp), f)
    with open(os.path.join(context, "io.json"), "w") as f:
        json.dump({"root": {}, "objects": {}, "refcounts": {}, "version": "0.0.1"}, f)
    for name in TOKENIZER_FILES:
        if os.path.exists(os.path.join(hf_dir, name)):
            shutil.copy(os.path.join(hf_dir, name), os.path.join(context, "nemo_tokenizer"))
