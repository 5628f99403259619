"""The TensorRT-LLM adapter (nemo_optune/generation/trtllm_engine.py) against a fake `tensorrt_llm`.

TensorRT-LLM cannot be installed here (CPU only, wheel on NVIDIA's index). The fake below has
the signatures of TensorRT-LLM 1.2.1 as read in the source (each with the file and commit it was
read at); every call goes through inspect.signature(real signature).bind(...), so a keyword the
real API does not have fails here. The adapter was never run against the real library.

Sources (NVIDIA/TensorRT-LLM):
  R1 = gh-pages commit 58fb435eacc402f3bd177e60f592c955d2b0719d, 1.2.1/_modules/... (the Sphinx
       source pages of release 1.2.1: the release's own files, rendered)
  R2 = main-branch file versions stored in the code index (commit given per use)
"""

import asyncio
import dataclasses
import inspect
import os
import sys
import types
from typing import Any, Literal, Optional, Union

import pytest
import torch
from safetensors.torch import save_file

from nemo_optune.config import GenerationConfig
from nemo_optune.generation.base import SamplingParams

CALLS: list = []


def _bind(fn, *args, **kwargs):
    """Bind against the real signature (raises TypeError for a keyword it lacks)."""
    return inspect.signature(fn).bind(*args, **kwargs)


# --------------------------------------------------------------------------- fake tensorrt_llm
# R1 tensorrt_llm/sampling_params.py (1.2.1/_modules/tensorrt_llm/sampling_params.html): a
# @dataclass(slots=True, kw_only=True); these are its init fields, in order, with their defaults.
@dataclasses.dataclass(kw_only=True)
class FakeSamplingParams:
    end_id: Optional[int] = None
    pad_id: Optional[int] = None
    max_tokens: int = 32
    bad: Optional[Union[str, list[str]]] = None
    bad_token_ids: Optional[list[int]] = None
    stop: Optional[Union[str, list[str]]] = None
    stop_token_ids: Optional[list[int]] = None
    include_stop_str_in_output: bool = False
    embedding_bias: Any = None
    logits_processor: Any = None
    apply_batched_logits_processor: bool = False
    n: int = 1
    best_of: Optional[int] = None
    use_beam_search: bool = False
    top_k: Optional[int] = None
    top_p: Optional[float] = None
    top_p_min: Optional[float] = None
    top_p_reset_ids: Optional[int] = None
    top_p_decay: Optional[float] = None
    seed: Optional[int] = None
    temperature: Optional[float] = None
    min_tokens: Optional[int] = None
    beam_search_diversity_rate: Optional[float] = None
    repetition_penalty: Optional[float] = None
    presence_penalty: Optional[float] = None
    frequency_penalty: Optional[float] = None
    prompt_ignore_length: Optional[int] = None
    length_penalty: Optional[float] = None
    early_stopping: Optional[int] = None
    no_repeat_ngram_size: Optional[int] = None
    min_p: Optional[float] = None
    beam_width_array: Optional[list[int]] = None
    logprobs: Optional[int] = None
    prompt_logprobs: Optional[int] = None
    return_context_logits: bool = False
    return_generation_logits: bool = False
    exclude_input_from_output: bool = True
    return_encoder_output: bool = False
    return_perf_metrics: bool = False
    additional_model_outputs: Optional[list[str]] = None
    _context_logits_auto_enabled: bool = False
    _generation_logits_auto_enabled: bool = False
    _return_log_probs: bool = False
    lookahead_config: Any = None
    guided_decoding: Any = None
    ignore_eos: bool = False
    detokenize: bool = True
    add_special_tokens: bool = True
    truncate_prompt_tokens: Optional[int] = None
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True

    def __post_init__(self):  # R1 sampling_params.html: __post_init__ / _validate (the n > 1 greedy rule)
        self.best_of = self.best_of or self.n
        if self.best_of > 1 and self.temperature == 0:
            raise ValueError("Greedy decoding in the LLM API does not allow multiple returns.")


# R1 tensorrt_llm/executor/result.py (1.2.1/_modules/tensorrt_llm/executor/result.html)
@dataclasses.dataclass
class Logprob:
    logprob: float
    rank: Optional[int] = None


@dataclasses.dataclass
class CompletionOutput:  # R1 result.html: CompletionOutput fields (the adapter reads index, token_ids, logprobs)
    index: int
    text: str = ""
    token_ids: Optional[list[int]] = dataclasses.field(default_factory=list)
    cumulative_logprob: Optional[float] = None
    logprobs: Any = None  # TokenLogprobs (list[dict[int, Logprob]]) | List[float]
    prompt_logprobs: Any = None
    finish_reason: Optional[Literal["stop", "length", "timeout", "cancelled"]] = None
    stop_reason: Optional[Union[int, str]] = None
    generation_logits: Optional[torch.Tensor] = None
    additional_context_outputs: Optional[dict[str, torch.Tensor]] = None
    additional_generation_outputs: Optional[dict[str, torch.Tensor]] = None
    disaggregated_params: Any = None
    request_perf_metrics: Any = None


class FakeKvCacheConfig:
    """KvCacheConfig(free_gpu_memory_fraction=...): R2 examples/ray_orchestrator RL example and
    NeMo-RL trtllm_worker_async.py (KvCacheConfig(**{'free_gpu_memory_fraction': ...})); a
    pydantic model in tensorrt_llm/llmapi/llm_args.py, here only the field the adapter sets."""

    def __init__(self, *, free_gpu_memory_fraction: Optional[float] = None, enable_block_reuse: bool = True):
        self.free_gpu_memory_fraction = free_gpu_memory_fraction
        self.enable_block_reuse = enable_block_reuse


class RealSignatures:
    """The real methods' signatures (bodies irrelevant)."""

    # R1 tensorrt_llm/llmapi/llm.py (1.2.1/_modules/tensorrt_llm/llmapi/llm.html): BaseLLM.__init__
    def llm_init(
        self,
        model,
        tokenizer=None,
        tokenizer_mode="auto",
        skip_tokenizer_init: bool = False,
        trust_remote_code: bool = False,
        tensor_parallel_size: int = 1,
        dtype: str = "auto",
        revision=None,
        tokenizer_revision=None,
        **kwargs,
    ): ...

    # R1 tensorrt_llm/_torch/async_llm.py (1.2.1/_modules/tensorrt_llm/_torch/async_llm.html): AsyncLLM.__init__
    def async_llm_init(
        self, placement_groups=None, placement_bundle_indices=None, per_worker_gpu_share=None, *args, **kwargs
    ): ...

    # R1 llm.html: BaseLLM.generate
    def generate(
        self,
        inputs,
        sampling_params=None,
        use_tqdm: bool = True,
        lora_request=None,
        prompt_adapter_request=None,
        kv_cache_retention_config=None,
        disaggregated_params=None,
        scheduling_params=None,
        cache_salt=None,
    ): ...

    # R1 async_llm.html: AsyncLLM.setup_async / release / resume / collective_rpc
    async def setup_async(self): ...

    async def release(self, tags: list[str]): ...

    async def resume(self, tags: list[str]): ...

    async def collective_rpc(
        self, method: str, args: tuple = (), kwargs: Optional[dict] = None, unique_reply_rank: Optional[int] = None
    ) -> list: ...

    # R1 llm.html: BaseLLM.shutdown (registered with exception_handler / atexit)
    def shutdown(self) -> None: ...

    # R2 tensorrt_llm/llmapi/rlhf_utils.py (commit 04762f3b82e2410c84ccdfd7901844831147668a):
    # WorkerExtension.update_weights, the worker method collective_rpc("update_weights") runs
    def update_weights(self, ipc_handles: Optional[dict] = None): ...


# R2 tensorrt_llm/_torch/utils.py get_device_uuid(device_idx) (imported by rlhf_utils.py, same commit)
def get_device_uuid(device_idx: int) -> str:
    CALLS.append(("get_device_uuid", device_idx))
    return f"GPU-fake-{device_idx}"


class FakeAsyncLLM:
    """Records calls; generates deterministic tokens from a script set by the test."""

    script = None  # callable(prompt tokens, SamplingParams) -> list[CompletionOutput]

    def __init__(self, *args, **kwargs):
        _bind(RealSignatures.async_llm_init, self, *args, **kwargs)
        _bind(RealSignatures.llm_init, self, *args, **kwargs)
        # LlmArgs fields the adapter (or this test's llm_kwargs) passes
        assert set(kwargs) <= {
            "model",
            "skip_tokenizer_init",
            "tensor_parallel_size",
            "dtype",
            "kv_cache_config",
            "enable_sleep",
        }
        CALLS.append(("AsyncLLM", kwargs))
        self.enable_sleep = kwargs.get("enable_sleep", False)
        self.loaded: dict = {}
        self.finalised = 0

    async def setup_async(self):
        _bind(RealSignatures.setup_async, self)
        CALLS.append(("setup_async",))
        return self

    def generate(self, *args, **kwargs):
        bound = _bind(RealSignatures.generate, self, *args, **kwargs).arguments
        inputs, sampling = bound["inputs"], bound["sampling_params"]
        CALLS.append(("generate", inputs, sampling, bound.get("use_tqdm", True)))
        assert isinstance(inputs, list) and all(isinstance(p, list) for p in inputs)
        assert isinstance(sampling, list) and len(sampling) == len(inputs)
        return [
            types.SimpleNamespace(prompt_token_ids=p, outputs=FakeAsyncLLM.script(p, sp))
            for p, sp in zip(inputs, sampling)
        ]

    async def release(self, *args, **kwargs):
        tags = _bind(RealSignatures.release, self, *args, **kwargs).arguments["tags"]
        if not self.enable_sleep:  # what TensorRT-LLM's worker raises
            raise RuntimeError("Sleep feature is not enabled")
        CALLS.append(("release", tags))

    async def resume(self, *args, **kwargs):
        tags = _bind(RealSignatures.resume, self, *args, **kwargs).arguments["tags"]
        CALLS.append(("resume", tags))

    async def collective_rpc(self, *args, **kwargs):
        bound = _bind(RealSignatures.collective_rpc, self, *args, **kwargs).arguments
        assert bound["method"] == "update_weights"
        worker_args = bound.get("args", ())
        _bind(RealSignatures.update_weights, self, *worker_args, **(bound.get("kwargs") or {}))
        handles = worker_args[0]
        if handles is None:
            CALLS.append(("update_weights", None))
            self.finalised += 1
        else:  # rebuild as rlhf_utils.WorkerExtension.update_weights does: func(*args)
            assert list(handles) == ["GPU-fake-0"]
            names = []
            for name, (func, func_args) in handles["GPU-fake-0"]:
                self.loaded[name] = func(*func_args).clone()
                names.append(name)
            CALLS.append(("update_weights", names))
        return [None]

    def shutdown(self):
        _bind(RealSignatures.shutdown, self)
        CALLS.append(("shutdown",))


def _fake_module():
    root = types.ModuleType("tensorrt_llm")
    llmapi = types.ModuleType("tensorrt_llm.llmapi")
    llmapi.AsyncLLM, llmapi.SamplingParams, llmapi.KvCacheConfig = FakeAsyncLLM, FakeSamplingParams, FakeKvCacheConfig
    torch_pkg = types.ModuleType("tensorrt_llm._torch")
    utils = types.ModuleType("tensorrt_llm._torch.utils")
    utils.get_device_uuid = get_device_uuid
    root.llmapi, root._torch, torch_pkg.utils = llmapi, torch_pkg, utils
    return {
        "tensorrt_llm": root,
        "tensorrt_llm.llmapi": llmapi,
        "tensorrt_llm._torch": torch_pkg,
        "tensorrt_llm._torch.utils": utils,
    }


def _ipc_handle(tensor):
    """CPU stand-in for torch's reduce_tensor: the same (func, args) shape, args[6] a device index."""
    return (lambda *a: a[0], (tensor, None, None, None, None, None, 0))


@pytest.fixture
def trt(monkeypatch, tmp_path):
    for name, module in _fake_module().items():
        monkeypatch.setitem(sys.modules, name, module)
    from nemo_optune.generation import trtllm_engine

    monkeypatch.setattr(trtllm_engine, "_ipc_handle", _ipc_handle)
    CALLS.clear()
    weights = {
        "model.embed_tokens.weight": torch.randn(8, 4),
        "model.norm.weight": torch.randn(4),
        "lm_head.weight": torch.randn(8, 4),
    }
    save_file(weights, os.path.join(tmp_path, "model.safetensors"))
    return trtllm_engine, str(tmp_path), weights


def _engine(trt, **trtllm):
    module, hf_dir, _ = trt
    cfg = GenerationConfig()
    cfg.refit_bucket_mb = 1
    for key, value in trtllm.items():
        setattr(cfg.trtllm, key, value)
    return module.TRTLLMEngine(hf_dir, stop_ids=[2, 3], pad_id=0, gen_cfg=cfg)


def test_construction_and_generate(trt):
    def script(prompt, sp):
        # sample k: tokens 5+k, 6, then the stop token 3 (then junk the adapter must cut), or no stop
        outs = []
        for k in range(sp.n):
            tokens = [5 + k, 6, 3, 9] if k == 0 else [5 + k, 6, 7, 8]
            outs.append(
                CompletionOutput(
                    index=k,
                    token_ids=tokens[: sp.max_tokens],
                    logprobs=[{t: Logprob(-0.1 * (i + 1), 1)} for i, t in enumerate(tokens)],
                )
            )
        return outs[::-1]  # out of order: the adapter sorts by index

    FakeAsyncLLM.script = script
    engine = _engine(trt, free_gpu_memory_fraction=0.3)
    assert CALLS[0][0] == "AsyncLLM" and CALLS[1] == ("setup_async",)
    kwargs = CALLS[0][1]
    assert kwargs["model"] == trt[1] and kwargs["skip_tokenizer_init"] is True and kwargs["tensor_parallel_size"] == 1
    assert kwargs["kv_cache_config"].free_gpu_memory_fraction == 0.3

    out = engine.generate(
        [[1, 4], [1, 4, 4]], 2, SamplingParams(temperature=1.0, top_p=0.9, max_new_tokens=4), seeds=[11, 12]
    )
    name, inputs, sampling, use_tqdm = CALLS[-1]
    assert name == "generate" and inputs == [[1, 4], [1, 4, 4]] and use_tqdm is False
    assert [s.seed for s in sampling] == [11, 12] and all(s.n == 2 for s in sampling)
    s = sampling[0]
    assert (
        s.max_tokens,
        s.logprobs,
        s.temperature,
        s.top_p,
        s.top_k,
        s.stop_token_ids,
        s.end_id,
        s.pad_id,
        s.include_stop_str_in_output,
        s.detokenize,
    ) == (4, 1, 1.0, 0.9, None, [2, 3], 2, 0, True, False)
    assert out.response_tokens.tolist() == [[5, 6, 3, 0], [6, 6, 7, 8], [5, 6, 3, 0], [6, 6, 7, 8]]
    assert out.response_lengths.tolist() == [3, 4, 3, 4]
    expected = torch.tensor([[-0.1, -0.2, -0.3, 0.0], [-0.1, -0.2, -0.3, -0.4]]).repeat(2, 1)
    assert torch.allclose(out.logprobs, expected)


def test_greedy_asks_for_one_sample_and_copies_it(trt):
    FakeAsyncLLM.script = lambda p, sp: [CompletionOutput(index=0, token_ids=[7, 2], logprobs=[-0.5, -0.25])]
    engine = _engine(trt)
    out = engine.generate([[1]], 3, SamplingParams(temperature=0.0, max_new_tokens=3), seeds=[5])
    assert CALLS[-1][2][0].n == 1 and CALLS[-1][2][0].temperature == 0.0
    assert out.response_tokens.tolist() == [[7, 2, 0]] * 3 and out.response_lengths.tolist() == [2] * 3
    assert out.logprobs[:, :2].tolist() == [[-0.5, -0.25]] * 3  # a plain float list is accepted too


def test_refit_buckets_then_finalise(trt):
    module, _, weights = trt
    engine = _engine(trt)
    engine.bucket_bytes = 160  # 8x4 fp32 = 128 bytes, 4 fp32 = 16: [embed, norm], [lm_head]
    CALLS.clear()
    engine.refit(iter(weights.items()))
    rpc = [c for c in CALLS if c[0] == "update_weights"]
    assert rpc == [
        ("update_weights", ["model.embed_tokens.weight", "model.norm.weight"]),
        ("update_weights", ["lm_head.weight"]),
        ("update_weights", None),
    ]
    assert CALLS[0] == ("get_device_uuid", 0)
    for name, tensor in weights.items():
        assert torch.equal(engine.llm.loaded[name], tensor)
    t = engine.last_timings
    assert t["refit_tensors"] == 3 and t["refit_buckets"] == 2 and t["refit_bytes"] == (32 + 4 + 32) * 4
    assert t["timing/refit_seconds"] >= 0


def test_partial_refit_is_refused_before_finalise(trt):
    _, _, weights = trt
    engine = _engine(trt)
    partial = [(n, t) for n, t in weights.items() if n != "lm_head.weight"]
    with pytest.raises(RuntimeError, match="missed 1 of 3 tensors.*lm_head.weight"):
        engine.refit(iter(partial))
    assert engine.llm.finalised == 0
    with pytest.raises(RuntimeError, match="does not have.*'extra.weight'"):
        engine.refit(iter([("extra.weight", torch.zeros(2))] + list(weights.items())))
    assert engine.llm.finalised == 0 and "extra.weight" not in engine.llm.loaded


def test_release_resume(trt):
    engine = _engine(trt)
    engine.release()
    engine.resume()
    assert not [c for c in CALLS if c[0] in ("release", "resume")]  # sleep off: nothing to free
    assert "timing/engine_sleep_seconds" not in engine.last_timings
    engine = _engine(trt, sleep=True)  # generation.trtllm.sleep alone must switch the engine's sleep on
    assert CALLS[-2][1]["enable_sleep"] is True
    engine.release()
    engine.release()
    engine.resume()
    engine.resume()
    assert [c for c in CALLS if c[0] in ("release", "resume")] == [
        ("release", ["model", "kv_cache"]),
        ("resume", ["model", "kv_cache"]),
    ]
    assert {"timing/engine_sleep_seconds", "timing/engine_wake_seconds"} <= set(engine.last_timings)
    engine.shutdown()
    assert CALLS[-1] == ("shutdown",)


def test_wrong_keyword_fails_in_the_fake(trt):
    with pytest.raises(TypeError):
        FakeSamplingParams(num_return_sequences=2)
    with pytest.raises(TypeError):
        asyncio.run(FakeAsyncLLM(model="x").collective_rpc("update_weights", arguments=(None,)))


def test_missing_tensorrt_llm_is_one_line(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "tensorrt_llm", None)  # import raises ImportError
    from nemo_optune.generation import trtllm_engine

    with pytest.raises(RuntimeError) as info:
        trtllm_engine.TRTLLMEngine(str(tmp_path), [2], 0, GenerationConfig())
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith("generation.engine=trtllm but tensorrt_llm is not importable (")
    assert "use the NGC container" in message
