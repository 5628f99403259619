"""What every recipe builds the same way: validated layout, sequence width, sampling."""

import os
import warnings

import torch

from nemo_optune.config import RootConfig, validate
from nemo_optune.data.sort_task import SortTask
from nemo_optune.generation.base import SamplingParams
from nemo_optune.runtime import distributed


def quiet_megatron_warnings() -> None:
    # megatron-core warns once per layer about missing apex/TE; nothing to act on here.
    warnings.filterwarnings("ignore", module=r"megatron\..*")
    warnings.filterwarnings("ignore", message=".*(Apex|apex|Transformer Engine|TransformerEngine).*")
    # dist_checkpointing still uses torch's ShardedTensor, which torch marks as deprecated.
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.distributed\..*")


def setup(cfg: RootConfig):
    """Validate against the real world size, then initialise the process groups."""
    quiet_megatron_warnings()
    _, _, world = distributed.world_from_env()
    validate(cfg, world_size=world)
    if cfg.model.precision == "bf16" and not torch.cuda.is_available():
        raise ValueError("config key model.precision: bf16 needs a GPU; use fp32 on CPU")
    return distributed.initialize(cfg.model.tensor_model_parallel_size, cfg.model.pipeline_model_parallel_size, cfg.trainer.seed)


def check_vocab(vocab_size: int, tp: int) -> None:
    if vocab_size % tp:
        raise ValueError(f"config key model.tensor_model_parallel_size: vocabulary {vocab_size} is not divisible by TP={tp}")


def model_and_tokenizer(cfg: RootConfig, task: SortTask, tp: int):
    """(spec, tokenizer, sequence width): a Hugging Face directory as model.restore_from_path
    brings its architecture and tokenizer; otherwise spec is None (the tiny model of model.*)
    with the task's tokenizer. Checked against TP and the sequence width before any model exists."""
    from nemo_optune.models.hf_io import hf_model_and_tokenizer
    from nemo_optune.models.hf_spec import check_sequence_length

    spec, tokenizer = hf_model_and_tokenizer(cfg.model.restore_from_path)
    width = sequence_width(cfg, task)
    if spec is None:
        tokenizer = task.tokenizer
        check_vocab(tokenizer.vocab_size, tp)
    else:  # data.max_prompt_tokens + generation.max_new_tokens positions
        check_sequence_length(spec, width, "generation.max_new_tokens")
    return spec, tokenizer, width


def max_prompt_tokens(cfg: RootConfig, task: SortTask) -> int:
    return cfg.data.max_prompt_tokens or task.max_prompt_chars


def sequence_width(cfg: RootConfig, task: SortTask) -> int:
    return max_prompt_tokens(cfg, task) + cfg.generation.max_new_tokens


def sampling_params(cfg: RootConfig) -> SamplingParams:
    """Sampling for OPTune / online DPO rollouts, as configured."""
    g = cfg.generation
    return SamplingParams(temperature=g.temperature, top_p=g.top_p, top_k=g.top_k, max_new_tokens=g.max_new_tokens)


def sft_checkpoint_dir(cfg: RootConfig) -> str:
    return os.path.join(cfg.exp_manager.exp_dir, "sft_checkpoint")
