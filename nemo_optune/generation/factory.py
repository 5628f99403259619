"""The rollout engine of `generation.engine`: megatron (in-process, the default), vllm or trtllm.

External engines (vLLM, TensorRT-LLM) run their own copy of the policy: they start from an HF
directory exported from the live policy and are refitted from it (models/hf_io.stream_hf_weights,
in buckets of generation.refit_bucket_mb) after every training phase (`refit_engine`). The
export happens when the engine is first used, not when it is built: the trainer is built before
run.py loads the SFT policy or a checkpoint into it. One engine per DP replica, on its first
rank (generation/placement.py).
"""

import os
import shutil
import tempfile
import time
from typing import TYPE_CHECKING, TypeGuard

from nemo_optune.config import RootConfig
from nemo_optune.data.tokenizer import Tokenizer
from nemo_optune.generation.base import RolloutEngine, Rollouts, SamplingParams
from nemo_optune.generation.placement import EnginePlacement, broadcast_rollouts, locate_engine
from nemo_optune.runtime.distributed import raise_if_any_rank_failed

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
    (timing/refit_seconds, refit_bytes, ...) for the iteration's record (on the engines' ranks).
    The in-process engine runs the policy itself: nothing is streamed, {} is returned."""
    if not is_external(engine):
        return {}
    from nemo_optune.models.hf_io import stream_hf_weights

    engine.resume()
    engine.refit(stream_hf_weights(model, engine.group))
    return dict(engine.last_timings)


def _model_parallel_group():
    """This rank's model-parallel group (its DP replica's TP x PP ranks), None in a single process."""
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return None
    from megatron.core import parallel_state as mpu

    return mpu.get_model_parallel_group()


class ExternalEngine:
    """A RolloutEngine in front of vLLM / TensorRT-LLM (`backend`), started on first use from an
    HF export of the policy as it is then, and refitted from the policy afterwards.

    At any world size: one backend per DP replica, on its model-parallel group's first rank
    (generation/placement.py); the group's other ranks get its rollouts. Every method is
    collective over the world (all ranks call them at the same points); `group`: this rank's
    model-parallel group (default megatron's; None: this rank alone)."""

    def __init__(
        self,
        kind: str,
        model: "MegatronGPTOPTuneModel",
        stop_ids,
        pad_id: int,
        gen_cfg,
        engine_dir: str | None = None,
        tokenizer_dir: str | None = None,
        group=_model_parallel_group,
    ):
        self.kind, self.model, self.stop_ids, self.pad_id, self.gen_cfg = kind, model, list(stop_ids), pad_id, gen_cfg
        self.engine_dir, self.tokenizer_dir = engine_dir, tokenizer_dir
        self._group = group
        self.placement: EnginePlacement | None = None
        self.backend: RolloutEngine | None = None
        self.hf_dir: str | None = None
        self._temp_dir: str | None = None
        self.last_timings: dict = {}
        self._start_timings: dict = {}

    @property
    def group(self):
        """This rank's model-parallel group (None: this rank alone), resolved at first use."""
        if callable(self._group):
            self._group = self._group()
        return self._group

    # ------------------------------------------------------------------ start
    def _export_dir(self, placement: EnginePlacement) -> str:
        """Where the leader exports: generation.engine_dir (dp<replica> below it with several
        engines), else a temp dir of its own."""
        if not self.engine_dir:
            self._temp_dir = tempfile.mkdtemp(prefix=f"nemo_optune_{self.kind}_")
            return os.path.join(self._temp_dir, "hf")
        hf_dir = os.path.abspath(self.engine_dir)
        if placement.engines > 1:
            hf_dir = os.path.join(hf_dir, f"dp{placement.replica}")
        if os.path.isdir(hf_dir) and os.listdir(hf_dir):  # a previous run's export (e.g. resumed)
            shutil.rmtree(hf_dir)
        return hf_dir

    def _export(self, hf_dir: str | None) -> None:
        """The policy as an HF directory at `hf_dir` on the leaders (collective)."""
        from nemo_optune.models.hf_io import export_hf

        export_hf(self.model, hf_dir, self.tokenizer_dir, group=self.group)

    def start(self) -> RolloutEngine | None:
        """Export the policy as it is now and start the backend on it on the leaders (collective:
        the placement, the export, then every rank raises the first rank's failure); the backend
        (the running one if already started; None on the ranks that only receive)."""
        if self.placement is not None:
            return self.backend
        begin = time.perf_counter()
        placement = locate_engine(self.group)
        self.hf_dir = self._export_dir(placement) if placement.leads else None
        self._export(self.hf_dir)
        exported = time.perf_counter()
        error = None
        if placement.leads:
            assert self.hf_dir is not None
            where = {"placement": placement} if self.kind == "vllm" else {}
            try:
                self.backend = _backend_class(self.kind)(self.hf_dir, self.stop_ids, self.pad_id, self.gen_cfg, **where)
            except Exception as err:  # every rank stops, not only the leader
                error = err
        raise_if_any_rank_failed(error)
        self.placement = placement
        self.last_timings = {
            "timing/engine_export_seconds": exported - begin,
            "timing/engine_start_seconds": time.perf_counter() - exported,
        }
        self._start_timings = dict(self.last_timings)  # reported with the first refit's
        return self.backend

    # ------------------------------------------------------- RolloutEngine
    def generate(
        self, prompts: list[list[int]], num_samples: int, params: SamplingParams, seeds: list[int]
    ) -> Rollouts:
        """The leader's rollouts of `prompts` (the group's DP share: the same on all its ranks)."""
        backend = self.start()
        assert self.placement is not None
        out, error = None, None
        if backend is not None:
            try:
                out = backend.generate(prompts, num_samples, params, seeds)
            except Exception as err:  # the group's other ranks raise it too
                error = err
        rows = len(prompts) * num_samples
        return broadcast_rollouts(
            out, error, rows, params.max_new_tokens, self.pad_id, self.group, self.placement.leader
        )

    def refit(self, weights) -> None:
        """The leaders load `weights` (their group's stream, collective: every rank drains it,
        also after its leader failed); then every rank raises the first failure."""
        weights = iter(weights)
        if self.placement is None:  # not started: start() exports the current weights anyway
            self.start()
            for _ in weights:
                pass
            return
        error = None
        if self.backend is not None:
            try:
                self.backend.refit(weights)
            except Exception as err:
                error = err
        for _ in weights:
            pass
        raise_if_any_rank_failed(error)
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
        self.placement = None
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
