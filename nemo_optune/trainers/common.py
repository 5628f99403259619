"""What every recipe builds the same way: validated layout, sequence width, sampling."""

import os

import torch

from nemo_optune.config import RootConfig, check_model_layout, sort_task_in_use
from nemo_optune.data.prompts import Prompt, PromptSet, configured_prompts, encode_prompt_set
from nemo_optune.data.sort_task import SortTask
from nemo_optune.data.task_data import Task
from nemo_optune.data.tokenizer import Tokenizer
from nemo_optune.generation.base import SamplingParams
from nemo_optune.runtime import distributed
from nemo_optune.runtime.quiet import quiet_megatron_warnings


def setup(cfg: RootConfig):
    """Initialise the process groups for a config from config.load_config (which validated it
    against this world size)."""
    quiet_megatron_warnings()
    if cfg.model.precision == "bf16" and not torch.cuda.is_available():
        raise ValueError("config key model.precision: bf16 needs a GPU; use fp32 on CPU")
    return distributed.initialize(
        cfg.model.tensor_model_parallel_size,
        cfg.model.pipeline_model_parallel_size,
        cfg.trainer.seed,
        collective_timeout_seconds=cfg.trainer.collective_timeout_seconds,
    )


def check_layout(spec, tp: int, pp: int, where: str) -> None:
    """A model spec against the layout (config.validate checks the built-in model's model.* at start-up)."""
    check_model_layout(
        where, tp, pp, spec.num_attention_heads, spec.num_query_groups, spec.num_layers, spec.padded_vocab_size
    )


def builtin_spec(cfg: RootConfig, task: SortTask, tokenizer: Tokenizer | None = None):
    """The built-in model of model.* (the SFT warm start trains it) for the task's tokenizer."""
    from nemo_optune.models.hf_spec import tiny_llama_spec

    tokenizer = tokenizer or task.tokenizer
    return tiny_llama_spec(cfg.model, tokenizer.vocab_size, tokenizer.eos_id, sequence_width(cfg, task))


def model_and_tokenizer(cfg: RootConfig, task: Task, tp: int):
    """(spec, tokenizer, sequence width): model.restore_from_path (our checkpoint, a HF or a
    NeMo 2 directory) brings its architecture and tokenizer; without it, the built-in model of
    model.* with the task's tokenizer. Checked against the layout and the sequence width before
    any model exists."""
    from nemo_optune.models import sources
    from nemo_optune.models.hf_spec import check_sequence_length

    m = cfg.model
    if m.restore_from_path is None:
        assert isinstance(task, SortTask)  # config.validate: other tasks need model.restore_from_path
        spec, tokenizer = builtin_spec(cfg, task), task.tokenizer
        width = sequence_width(cfg, task)
    else:
        spec, tokenizer = sources.model_and_tokenizer(m.restore_from_path)
        if tokenizer is None:
            raise ValueError(
                f"config key model.restore_from_path: {m.restore_from_path} has no tokenizer files "
                "(tokenizer.json, or what transformers loads)"
            )
        width = sequence_width(cfg, task, spec)
        check_sequence_length(spec, width, "generation.max_new_tokens")  # data.max_prompt_tokens + max_new_tokens
    check_layout(spec, tp, m.pipeline_model_parallel_size, m.restore_from_path or "the built-in model")
    return spec, tokenizer, width


def max_prompt_tokens(cfg: RootConfig, task, spec=None) -> int:
    """data.max_prompt_tokens; else the sort task's limit where that task is in use (or no model
    is known yet), else what the model's positions leave after generation.max_new_tokens."""
    if cfg.data.max_prompt_tokens:
        return cfg.data.max_prompt_tokens
    if spec is None or sort_task_in_use(cfg):
        return task.max_prompt_chars
    return spec.max_sequence_length - cfg.generation.max_new_tokens


def sequence_width(cfg: RootConfig, task, spec=None) -> int:
    return max_prompt_tokens(cfg, task, spec) + cfg.generation.max_new_tokens


def rows_width(limit_width: int, prompt_ids: list[list[int]], max_new_tokens: int) -> int:
    """Rows as wide as the longest prompt read (+ max_new_tokens), not the limit's width: a
    model's limit can be thousands of positions."""
    return min(limit_width, max(map(len, prompt_ids), default=0) + max_new_tokens)


def read_prompts(
    cfg: RootConfig, split: str, task_prompts: list[Prompt], tokenizer: Tokenizer, limit: int
) -> tuple[list[Prompt], list[list[int]], int, dict[str, list]]:
    """(prompts, token ids, how many were over the limit, the kept prompts' other columns) of
    data.{split}_prompts_path / data.{split}_sources, or of the task's prompts."""
    read = configured_prompts(cfg.data, split) or PromptSet(task_prompts, ["task"] * len(task_prompts))
    texts, ids, too_long, kept = encode_prompt_set(read.prompts, read.where, tokenizer, cfg.data, limit)
    return texts, ids, too_long, read.take(kept).columns


def sampling_params(cfg: RootConfig) -> SamplingParams:
    """Sampling for OPTune / online DPO rollouts, as configured."""
    g = cfg.generation
    return SamplingParams(temperature=g.temperature, top_p=g.top_p, top_k=g.top_k, max_new_tokens=g.max_new_tokens)


def sft_checkpoint_dir(cfg: RootConfig) -> str:
    return os.path.join(cfg.exp_manager.exp_dir, "sft_checkpoint")
