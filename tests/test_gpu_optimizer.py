"""The GPU optimizer path (`MegatronGPUOptimizer`): megatron's DDP and its bf16 optimizers,
run on CPU.

megatron-core's optimizers hard-code CUDA in a few kinds of places: tensors created with
device="cuda" or moved with .cuda() (the distributed optimizer's checkpoint gather), and dtype
checks against the names "torch.cuda.BFloat16Tensor" / "torch.cuda.FloatTensor".
`_CudaNamesOnCpu` redirects exactly those while a test runs; megatron's DDP,
Float16OptimizerWithFloat16Params, DistributedOptimizer, ChainedOptimizer and their
checkpoint formats run unmodified (nemo_optune's cpu_shim covers DDP's CUDA streams).
"""

import contextlib

import pytest
import torch
from megatron.core.optimizer.distrib_optimizer import HAVE_APEX_OR_TE
from torch.overrides import TorchFunctionMode

from nemo_optune.config import ModelConfig
from nemo_optune.models import gpt_optune, optimizers
from nemo_optune.models.hf_spec import tiny_llama_spec
from nemo_optune.runtime import distributed
from nemo_optune.runtime.checkpoint import load_model, load_training_checkpoint, save_model, save_training_checkpoint
from nemo_optune.trainers.common import quiet_megatron_warnings

VOCAB, LENGTH, LR = 16, 8, 1e-3


class _CudaNamesOnCpu(TorchFunctionMode):
    """device="cuda" and .cuda() -> CPU; Tensor.type() reports CUDA type names."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.cuda:
            return args[0]
        if str(kwargs.get("device", "")).startswith("cuda"):
            kwargs["device"] = "cpu"
        out = func(*args, **kwargs)
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            out = out.replace("torch.", "torch.cuda.", 1)
        return out


@pytest.mark.parametrize("sharded", [True, False])
@pytest.mark.parametrize("precision", ["bf16", "fp32"])
def test_one_switch_sets_both_configs(sharded, precision):
    cfg = ModelConfig(precision=precision, distributed_optimizer=sharded)
    ddp, opt = optimizers.megatron_optimizer_configs(cfg, lr=1e-4, weight_decay=0.1, grad_clip=0.5)
    assert ddp.use_distributed_optimizer is opt.use_distributed_optimizer is sharded
    assert opt.bf16 is (precision == "bf16") and not opt.fp16
    assert opt.params_dtype == (torch.bfloat16 if precision == "bf16" else torch.float32)
    assert ddp.grad_reduce_in_fp32
    assert (opt.optimizer, opt.lr, opt.weight_decay, opt.clip_grad) == ("adam", 1e-4, 0.1, 0.5)


@pytest.fixture
def megatron_model(monkeypatch):
    """Builds MegatronGPTOPTuneModel(seed) as on a GPU: megatron DDP + megatron optimizer."""
    quiet_megatron_warnings()
    layout = distributed.initialize(1, 1, seed=0)
    monkeypatch.setattr(optimizers, "use_megatron_optimizer", lambda: True)

    def build(cfg: ModelConfig, seed: int):
        spec = tiny_llama_spec(cfg, VOCAB, 1, LENGTH)
        return gpt_optune.MegatronGPTOPTuneModel(
            cfg, spec, layout, seed, lr=LR, weight_decay=0.0, grad_clip=1.0, with_reference=False
        )

    with contextlib.nullcontext() if torch.cuda.is_available() else _CudaNamesOnCpu():
        yield build


def _train_step(model) -> None:
    tokens = torch.randint(0, VOCAB, (4, LENGTH), generator=torch.Generator().manual_seed(0))
    batch = [{"tokens": tokens, "loss_mask": torch.ones(4, LENGTH)}]
    model.train_step(batch, lambda mb, logps: (-logps.sum() / logps.numel(), {}))


def _weights(model) -> torch.Tensor:
    return torch.cat([p.detach().float().reshape(-1) for p in model.policy.parameters()])


_MEGATRON_CLASS = {True: "DistributedOptimizer", False: "Float16OptimizerWithFloat16Params"}


@pytest.mark.parametrize("sharded", [True, False])
@pytest.mark.parametrize("reload", [True, False])
def test_first_step_starts_from_the_loaded_sft_weights(megatron_model, tmp_path, sharded, reload):
    """The optimizer is built (fp32 main params copied) before the SFT weights are loaded.
    load_policy re-copies them; a bare load_model (reload=False) leaves the optimizer's
    copy of the random init, which the first step writes back over the SFT weights."""
    cfg = ModelConfig(
        num_layers=1, hidden_size=32, num_attention_heads=2, precision="bf16", distributed_optimizer=sharded
    )
    sft = megatron_model(cfg, seed=1)
    save_model(str(tmp_path / "sft"), sft)
    model = megatron_model(cfg, seed=0)
    (inner,) = model.optimizer.megatron_opt.chained_optimizers
    assert type(inner).__name__ == _MEGATRON_CLASS[sharded]
    assert {p.dtype for p in model.policy.parameters()} == {torch.bfloat16}
    init, sft_weights = _weights(model), _weights(sft)

    if reload:
        model.load_policy(str(tmp_path / "sft"))
    else:
        load_model(str(tmp_path / "sft"), model)
    assert torch.equal(_weights(model), sft_weights)
    _train_step(model)

    after = _weights(model)
    gap = (sft_weights - init).norm()
    assert not torch.equal(after, sft_weights)  # the step did update
    if reload:
        assert (after - sft_weights).norm() < 0.1 * gap
    else:  # what happened before load_policy existed
        assert (after - init).norm() < 0.1 * gap


# megatron-core 0.16.1's DistributedOptimizer loads its checkpoint state only into TE/apex
# FusedAdam: with torch's Adam (its per-parameter "step"; CPU installs) it raises KeyError 'step'.
_TORCH_ADAM = pytest.mark.xfail(
    not HAVE_APEX_OR_TE, raises=KeyError, strict=True, reason="megatron DistributedOptimizer + torch Adam cannot resume"
)


@pytest.mark.parametrize("sharded", [pytest.param(True, marks=_TORCH_ADAM), False])
def test_training_checkpoint_restores_main_params(megatron_model, tmp_path, sharded):
    """Resuming needs no reload: megatron's optimizer state carries the fp32 main params
    (and Adam moments), so a resumed step equals the uninterrupted one."""
    cfg = ModelConfig(
        num_layers=1, hidden_size=32, num_attention_heads=2, precision="bf16", distributed_optimizer=sharded
    )
    run = megatron_model(cfg, seed=0)
    _train_step(run)
    _train_step(run)
    path = save_training_checkpoint(str(tmp_path), 2, run, {}, keep_last=1)
    resumed = megatron_model(cfg, seed=5)
    _train_step(resumed)  # a state for the checkpoint to overwrite
    load_training_checkpoint(path, resumed)
    _train_step(run)
    _train_step(resumed)
    torch.testing.assert_close(_weights(resumed), _weights(run), atol=0, rtol=0)


@pytest.mark.parametrize("megatron", [True, False], ids=["megatron", "cpu"])
def test_weight_decay_leaves_norms_and_biases_alone(monkeypatch, megatron):
    """One step with zero gradients is pure decoupled weight decay: matrices shrink by
    lr x weight_decay, norm weights (1-D) stay as they were (megatron's wd_mult=0 rule),
    on both optimizer paths."""
    quiet_megatron_warnings()
    layout = distributed.initialize(1, 1, seed=0)
    monkeypatch.setattr(optimizers, "use_megatron_optimizer", lambda: megatron)
    cfg = ModelConfig(num_layers=1, hidden_size=32, num_attention_heads=2)
    spec = tiny_llama_spec(cfg, VOCAB, 1, LENGTH)
    lr, decay = 0.1, 0.5
    on_cpu = megatron and not torch.cuda.is_available()
    with _CudaNamesOnCpu() if on_cpu else contextlib.nullcontext():
        model = gpt_optune.MegatronGPTOPTuneModel(
            cfg, spec, layout, 0, lr=lr, weight_decay=decay, grad_clip=0.0, with_reference=False
        )
        before = {n: p.detach().clone() for n, p in model.policy.named_parameters()}
        tokens = torch.randint(0, VOCAB, (2, LENGTH), generator=torch.Generator().manual_seed(0))
        model.train_step([{"tokens": tokens, "loss_mask": torch.ones(2, LENGTH)}], lambda mb, lp: (lp.sum() * 0, {}))
    one_d = [n for n, p in model.policy.named_parameters() if p.dim() == 1]
    assert one_d  # the norms
    for name, param in model.policy.named_parameters():
        if param.dim() == 1 or name.endswith(".bias"):
            assert torch.equal(param.detach(), before[name]), name
        else:
            torch.testing.assert_close(param.detach(), before[name] * (1 - lr * decay))


def test_distributed_optimizer_checkpoint_gathers_onto_dp_rank_0_only(megatron_model, tmp_path, monkeypatch):
    """fully_reshardable saves gather the fp32 main params and Adam moments of the TP shard;
    the memory-efficient variant gathers them over gloo onto DP rank 0 only, instead of onto
    every DP rank."""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    calls = []
    gather = DistributedOptimizer.get_parameter_state_dp_zero

    def spy(self, *args, **kwargs):
        calls.append(kwargs)
        return gather(self, *args, **kwargs)

    monkeypatch.setattr(DistributedOptimizer, "get_parameter_state_dp_zero", spy)
    cfg = ModelConfig(num_layers=1, hidden_size=32, num_attention_heads=2, precision="bf16", distributed_optimizer=True)
    model = megatron_model(cfg, seed=0)
    _train_step(model)
    save_training_checkpoint(str(tmp_path), 1, model, {}, keep_last=1)
    assert calls and all(c["use_gloo_comm"] and not c["return_on_all_ranks"] for c in calls)


def test_inference_models_have_no_optimizer():
    """convert and generate build the model alone: no DDP gradient buffer, no main params."""
    from nemo_optune.models.gpt_optune import inference_model

    quiet_megatron_warnings()
    layout = distributed.initialize(1, 1, seed=0)
    model = inference_model(tiny_llama_spec(ModelConfig(), VOCAB, 1, LENGTH), layout)
    assert model.optimizer is None and model._train_module is None
    with pytest.raises(RuntimeError, match="built for inference"):
        model.prepare_for_training_step()
