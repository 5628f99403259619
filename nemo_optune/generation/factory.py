"""The rollout engine of `generation.engine`: megatron (in-process, the default), vllm or trtllm.

External engines (vLLM, TensorRT-LLM) run their own copy of the policy: they start from an HF
directory exported from the live policy and are refitted from it (models/hf_io.stream_hf_weights,
in buckets of generation.refit_bucket_mb) after every training phase (`refit_engine`). The
export happens when the engine is first used, not when it is built: the trainer is built before
run.py loads the SFT policy or a checkpoint into it.
"""

import os
import shutil
import tempfile
import time
from typing import TYPE_CHECKING, TypeGuard

from nemo_optune.config import RootConfig
from nemo_optune.data.tokenizer import Tokenizer
from nemo_optune.generation.base import RolloutEngine, Rollouts, SamplingParams

if TYPE_CHECKING:  # the model module imports nothing from here (tests/test_gpu_path.py: no import cycles)
    from nemo_optune.models.gpt_optune import MegatronGPTOPTuneModel


def build_engine(
    cfg: RootConfig, model: "MegatronGPTOPTuneModel", tokenizer: Tokenizer, progress=None, exp_dir: str | None = None
) -> RolloutEngine:
    """The engine of cfg.generation.engine for `model` (a MegatronGPTOPTuneModel).

    progress: the in-process engine's progress bars (see megatron_engine._Engine)."""
    g = cfg.generation
    if g.engine == "megatron":
        from nemo_optune.generation.megatron_engine import MegatronInProcessEngine

        return MegatronInProcessEngine(
            model,
            tokenizer.eos_ids,
            tokenizer.pad_id,
            g.micro_batch_size,
            rows_per_pass=g.micro_batch_size,  # bounds the KV cache
            progress=progress,
        )
    if g.engine in ("vllm", "trtllm"):
        return ExternalEngine(
            g.engine,
            model,
            tokenizer.eos_ids,
            tokenizer.pad_id,
            g,
            engine_dir=g.engine_dir,
            tokenizer_dir=_tokenizer_dir(tokenizer),
        )
    raise ValueError(f"config key generation.engine: {g.engine!r} is not one of megatron, vllm, trtllm")


def _tokenizer_dir(tokenizer: Tokenizer) -> str | None:
    """The HF tokenizer's directory, copied into the export (the built-in task tokenizer has none:
    external engines are given token ids and return token ids)."""
    directory = getattr(getattr(tokenizer, "tok", None), "name_or_path", None)  # HFTokenizer
    return directory if isinstance(directory, str) and os.path.isdir(directory) else None


def _backend_class(kind: str):
    if kind == "vllm":
        from nemo_optune.generation.vllm_engine import VLLMEngine

        return VLLMEngine
    from nemo_optune.generation.trtllm_engine import TRTLLMEngine

    return TRTLLMEngine


def is_external(engine: RolloutEngine) -> TypeGuard["ExternalEngine"]:
    return isinstance(engine, ExternalEngine)


def refit_engine(engine: RolloutEngine, model: "MegatronGPTOPTuneModel") -> dict:
    """After a training phase: load the policy's weights into an external engine; its timings
    (timing/refit_seconds, refit_bytes, ...) for the iteration's record. The in-process engine
    runs the policy itself: nothing is streamed, {} is returned."""
    if not is_external(engine):
        return {}
    from nemo_optune.models.hf_io import stream_hf_weights

    engine.resume()
    engine.refit(stream_hf_weights(model))
    return dict(engine.last_timings)


class ExternalEngine:
    """A RolloutEngine in front of vLLM / TensorRT-LLM (`backend`), started on first use from an
    HF export of the policy as it is then, and refitted from the policy afterwards.

    Runs in a single training process (config.validate_engine refuses more for now)."""

    def __init__(
        self,
        kind: str,
        model: "MegatronGPTOPTuneModel",
        stop_ids,
        pad_id: int,
        gen_cfg,
        engine_dir: str | None = None,
        tokenizer_dir: str | None = None,
    ):
        self.kind, self.model, self.stop_ids, self.pad_id, self.gen_cfg = kind, model, list(stop_ids), pad_id, gen_cfg
        self.engine_dir, self.tokenizer_dir = engine_dir, tokenizer_dir
        self.backend: RolloutEngine | None = None
        self.hf_dir: str | None = None
        self._temp_dir: str | None = None
        self.last_timings: dict = {}
        self._start_timings: dict = {}

    # ------------------------------------------------------------------ start
    def start(self) -> RolloutEngine:
        """Export the policy as it is now and start the backend on it (collective: the export);
        the backend (the running one if already started)."""
        from nemo_optune.models.hf_io import export_hf

        if self.backend is not None:
            return self.backend
        begin = time.perf_counter()
        if self.engine_dir:
            hf_dir = os.path.abspath(self.engine_dir)
            if os.path.isdir(hf_dir) and os.listdir(hf_dir):  # a previous run's export (e.g. resumed)
                shutil.rmtree(hf_dir)
        else:
            self._temp_dir = tempfile.mkdtemp(prefix=f"nemo_optune_{self.kind}_")
            hf_dir = os.path.join(self._temp_dir, "hf")
        self.hf_dir = hf_dir
        export_hf(self.model, hf_dir, self.tokenizer_dir)
        exported = time.perf_counter()
        self.backend = backend = _backend_class(self.kind)(hf_dir, self.stop_ids, self.pad_id, self.gen_cfg)
        self.last_timings = {
            "timing/engine_export_seconds": exported - begin,
            "timing/engine_start_seconds": time.perf_counter() - exported,
        }
        self._start_timings = dict(self.last_timings)  # reported with the first refit's
        return backend

    # ------------------------------------------------------- RolloutEngine
    def generate(
        self, prompts: list[list[int]], num_samples: int, params: SamplingParams, seeds: list[int]
    ) -> Rollouts:
        return self.start().generate(prompts, num_samples, params, seeds)

    def refit(self, weights) -> None:
        if self.backend is None:  # not started: start() exports the current weights anyway
            self.start()
            for _ in weights:  # a collective stream: every rank drains it
                pass
            return
        self.backend.refit(weights)
        start, self._start_timings = self._start_timings, {}
        self.last_timings = {**start, **getattr(self.backend, "last_timings", {})}

    def release(self) -> None:
        if self.backend is not None:
            self.backend.release()

    def resume(self) -> None:
        if self.backend is not None:
            self.backend.resume()

    def shutdown(self) -> None:
        backend, self.backend = self.backend, None
        if backend is not None and hasattr(backend, "shutdown"):
            backend.shutdown()
        if self._temp_dir:
            shutil.rmtree(self._temp_dir, ignore_errors=True)
            self._temp_dir = None

    def __del__(self):
        try:
            if self._temp_dir:
                shutil.rmtree(self._temp_dir, ignore_errors=True)
        except Exception:
            pass
