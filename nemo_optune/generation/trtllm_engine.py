"""TensorRT-LLM rollout engine (PyTorch backend, LLM API), refitted from the live policy.

Written against TensorRT-LLM **1.2.1** (the newest stable tag; PyPI lists 1.2.1 as the newest
non-pre-release). Every TensorRT-LLM name used here, with the file it was read in, is listed in
docs/engines.md. Never executed: no machine with TensorRT-LLM was available (its wheel comes
from NVIDIA's index and needs CUDA); tests/test_trtllm_adapter.py drives it against a fake
module with the same signatures.

Shape of the integration (as NeMo-RL's TRT-LLM backend and TensorRT-LLM's own RL example do):

- `tensorrt_llm.llmapi.AsyncLLM` (the RL class: Ray orchestrator, `ray_worker_extension_cls`
  defaulting to `tensorrt_llm.llmapi.rlhf_utils.WorkerExtension`) on the policy's HF export.
  Its RL methods are coroutines; this adapter owns one private event loop and runs them to
  completion, so the RolloutEngine interface stays synchronous.
- generate: the synchronous `LLM.generate(inputs, sampling_params, use_tqdm)` with one token-id
  list per prompt and one `SamplingParams(n=K, seed=seeds[p], logprobs=1, ...)` per prompt.
- refit: `collective_rpc("update_weights", args=(payload,))` per bucket, payload
  `{device_uuid: [(hf_name, reduce_tensor(cuda_tensor)), ...]}` (CUDA IPC handles: the engine's
  workers share this process's GPU), then `collective_rpc("update_weights", args=(None,))` to
  finalise (the worker then runs `process_weights_after_loading` / `post_load_weights` and resets
  the prefix cache). The finalise call is only made when the buckets covered every weight of
  the exported checkpoint: a partial refit is refused before it.
- release / resume: `AsyncLLM.release(tags)` / `AsyncLLM.resume(tags)` when
  generation.trtllm.sleep is on (the memory tags of the engine's virtual-memory allocator).
"""

import asyncio
import glob
import json
import os
import time

import torch

from nemo_optune.generation.base import Rollouts, SamplingParams
from nemo_optune.generation.refit import RefitStats, tensor_bytes, timed, weight_buckets

IMPORT_HINT = (
    "use the NGC container (Dockerfile: nvcr.io/nvidia/tensorrt-llm/release:1.2.1), or install "
    "tensorrt-llm==1.2.1 from NVIDIA's index (pypi.nvidia.com) on a CUDA machine"
)


def _import_tensorrt_llm():
    """(AsyncLLM, SamplingParams, KvCacheConfig, get_device_uuid), or one line saying why not."""
    try:
        from tensorrt_llm._torch.utils import get_device_uuid
        from tensorrt_llm.llmapi import AsyncLLM, KvCacheConfig
        from tensorrt_llm.llmapi import SamplingParams as TRTSamplingParams
    except Exception as err:  # ImportError, or libcuda missing at import time
        reason = f"{type(err).__name__}: {err}".splitlines()[0]
        raise RuntimeError(
            f"generation.engine=trtllm but tensorrt_llm is not importable ({reason}): {IMPORT_HINT}"
        ) from None
    return AsyncLLM, TRTSamplingParams, KvCacheConfig, get_device_uuid


def _ipc_handle(tensor: torch.Tensor):
    """(rebuild function, args) for another process on the same GPU: what rlhf_utils.WorkerExtension
    .update_weights rebuilds with `func(*args)` after setting args[6] to its own device index."""
    from torch.multiprocessing.reductions import reduce_tensor

    return reduce_tensor(tensor)


def checkpoint_weight_names(hf_dir: str) -> set[str]:
    """The tensor names of an HF checkpoint directory (safetensors index, else the files' headers)."""
    index = os.path.join(hf_dir, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            return set(json.load(f)["weight_map"])
    from safetensors import safe_open

    names: set[str] = set()
    for path in sorted(glob.glob(os.path.join(hf_dir, "*.safetensors"))):
        with safe_open(path, framework="pt") as f:
            names.update(f.keys())
    if not names:
        raise ValueError(f"{hf_dir}: no safetensors weights (the engine refits by these names)")
    return names


def _has_tokenizer(hf_dir: str) -> bool:
    return any(
        os.path.exists(os.path.join(hf_dir, n)) for n in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")
    )


class TRTLLMEngine:
    """RolloutEngine on TensorRT-LLM's AsyncLLM (see the module docstring).

    gen_cfg: the project's GenerationConfig (temperature etc. come per call in SamplingParams;
    here: refit_bucket_mb, engine_tp_size and the nested `trtllm` keys)."""

    def __init__(self, hf_dir: str, stop_ids, pad_id: int, gen_cfg):
        AsyncLLM, self._SamplingParams, KvCacheConfig, self._get_device_uuid = _import_tensorrt_llm()
        t = getattr(gen_cfg, "trtllm", None)
        self.hf_dir = hf_dir
        self.stop_ids = sorted(set(int(i) for i in stop_ids))
        if not self.stop_ids:
            raise ValueError("TRTLLMEngine needs at least one stop token id")
        self.pad_id = int(pad_id)
        self.bucket_bytes = int(getattr(gen_cfg, "refit_bucket_mb", 256)) << 20
        self.sleep = bool(getattr(t, "sleep", False))
        self.release_tags = list(getattr(t, "release_tags", None) or ("model", "kv_cache"))
        tp = int(getattr(gen_cfg, "engine_tp_size", 1))
        if tp != 1:
            # The IPC payload carries the tensors of this process's GPU only; each TP worker on
            # another GPU would find no handles for its device.
            raise ValueError(
                f"generation.engine_tp_size={tp}: the TensorRT-LLM engine refits through CUDA IPC "
                "from one GPU and runs at tensor-parallel size 1 for now"
            )
        self.expected_names = checkpoint_weight_names(hf_dir)
        self.last_timings: dict = {}
        self._loop = asyncio.new_event_loop()
        kwargs = dict(
            model=hf_dir,
            skip_tokenizer_init=not _has_tokenizer(hf_dir),  # token ids in, token ids out
            tensor_parallel_size=tp,
            dtype=str(getattr(t, "dtype", "auto")),
            kv_cache_config=KvCacheConfig(free_gpu_memory_fraction=float(getattr(t, "free_gpu_memory_fraction", 0.5))),
        )
        if self.sleep:
            # Without it the engine's worker raises "Sleep feature is not enabled" at the first release().
            kwargs["enable_sleep"] = True
        extra = dict(getattr(t, "llm_kwargs", None) or {})
        kwargs.update(extra)
        self.llm = AsyncLLM(**kwargs)
        self._run(self.llm.setup_async())  # AsyncLLM defers its Ray workers until this
        self._released = False

    # ----------------------------------------------------------------- helpers
    def _run(self, coroutine):
        return self._loop.run_until_complete(coroutine)

    def _device(self) -> torch.device:
        return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")

    def _sampling_params(self, params: SamplingParams, num_samples: int, seed: int):
        kwargs = dict(
            max_tokens=params.max_new_tokens,
            n=num_samples,
            seed=int(seed),
            temperature=float(params.temperature),
            end_id=self.stop_ids[0],
            pad_id=self.pad_id,
            stop_token_ids=list(self.stop_ids),
            include_stop_str_in_output=True,
            logprobs=1,
            detokenize=False,
        )
        if params.top_k > 0:
            kwargs["top_k"] = int(params.top_k)
        if params.top_p < 1.0:
            kwargs["top_p"] = float(params.top_p)
        return self._SamplingParams(**kwargs)

    @staticmethod
    def _token_logprob(entry, token: int) -> float:
        """One position of CompletionOutput.logprobs: a float, or {token_id: Logprob(logprob, rank)}."""
        if isinstance(entry, dict):
            if token not in entry:
                raise RuntimeError(f"TensorRT-LLM returned logprobs without the sampled token {token}")
            value = entry[token]
            return float(value.logprob if hasattr(value, "logprob") else value)
        return float(entry)

    # ------------------------------------------------------------ RolloutEngine
    def generate(
        self, prompts: list[list[int]], num_samples: int, params: SamplingParams, seeds: list[int]
    ) -> Rollouts:
        new = params.max_new_tokens
        rows = len(prompts) * num_samples
        out = Rollouts.empty(rows, new, self.pad_id)
        if rows == 0 or new == 0:
            return out
        response, lengths, logprobs = out.response_tokens, out.response_lengths, out.logprobs
        if len(seeds) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds")
        # Greedy: the LLM API refuses n > 1 (every sample would be the same): ask for one, copy it.
        per_prompt = 1 if params.temperature == 0 else num_samples
        sampling = [self._sampling_params(params, per_prompt, s) for s in seeds]
        outputs = self.llm.generate([list(map(int, p)) for p in prompts], sampling_params=sampling, use_tqdm=False)
        stops = set(self.stop_ids) | {self.pad_id}
        for p, request in enumerate(outputs):
            completions = sorted(request.outputs, key=lambda c: c.index)
            if len(completions) != per_prompt:
                raise RuntimeError(
                    f"TensorRT-LLM returned {len(completions)} completions for prompt {p}, expected {per_prompt}"
                )
            for k in range(num_samples):
                c = completions[k if per_prompt > 1 else 0]
                tokens = [int(t) for t in c.token_ids][:new]
                # up to and including the first stop token (as the in-process engines)
                for i, tok in enumerate(tokens):
                    if tok in stops:
                        tokens = tokens[: i + 1]
                        break
                row = p * num_samples + k
                if tokens:
                    response[row, : len(tokens)] = torch.tensor(tokens)
                    if c.logprobs is None or len(c.logprobs) < len(tokens):
                        raise RuntimeError(
                            "TensorRT-LLM returned fewer logprobs than tokens "
                            f"({0 if c.logprobs is None else len(c.logprobs)} < {len(tokens)})"
                        )
                    logprobs[row, : len(tokens)] = torch.tensor(
                        [self._token_logprob(c.logprobs[i], tok) for i, tok in enumerate(tokens)]
                    )
                lengths[row] = len(tokens)
        return out

    def refit(self, weights) -> None:
        """Send the policy's HF-named weights bucket by bucket, then finalise. Refuses (before the
        finalise call) names the checkpoint does not have and a stream that misses some."""
        begin = time.perf_counter()
        stats = RefitStats()
        seen: set[str] = set()
        device = self._device()
        uuid = self._get_device_uuid(device.index if device.index is not None else 0)
        for bucket in weight_buckets(weights, self.bucket_bytes):
            unknown = [n for n, _ in bucket if n not in self.expected_names]
            if unknown:
                raise RuntimeError(
                    f"refit refused: {len(unknown)} weight(s) the engine's checkpoint does not have "
                    f"(e.g. {unknown[0]!r})"
                )
            staged = [(name, tensor.detach().to(device).contiguous()) for name, tensor in bucket]
            payload = {uuid: [(name, _ipc_handle(t)) for name, t in staged]}
            self._run(self.llm.collective_rpc("update_weights", args=(payload,)))
            del payload, staged  # the workers have copied the bucket when the call returns
            seen.update(name for name, _ in bucket)
            stats.buckets += 1
            stats.tensors += len(bucket)
            stats.bytes += sum(tensor_bytes(t) for _, t in bucket)
        missing = self.expected_names - seen
        if missing:
            raise RuntimeError(
                f"refit refused: the weight stream missed {len(missing)} of {len(self.expected_names)} "
                f"tensors (e.g. {sorted(missing)[0]!r}); the engine was not finalised"
            )
        self._run(self.llm.collective_rpc("update_weights", args=(None,)))  # finalise
        stats.seconds = time.perf_counter() - begin
        self.last_timings = {**self.last_timings, **stats.as_timings()}

    def release(self) -> None:
        """Free the engine's GPU memory (generation.trtllm.sleep); otherwise nothing."""
        if not self.sleep or self._released:
            return
        timed(
            self.last_timings,
            "timing/engine_sleep_seconds",
            lambda: self._run(self.llm.release(list(self.release_tags))),
        )
        self._released = True

    def resume(self) -> None:
        if not self._released:
            return
        timed(
            self.last_timings, "timing/engine_wake_seconds", lambda: self._run(self.llm.resume(list(self.release_tags)))
        )
        self._released = False

    def shutdown(self) -> None:
        llm, self.llm = self.llm, None
        if llm is not None:
            llm.shutdown()
        if not self._loop.is_closed():
            self._loop.close()
