"""The policy's optimizers, built only for training (inference-only models have none).

On GPU: megatron's DDP and (distributed) optimizer (`MegatronGPUOptimizer`). On CPU, where
megatron's optimizers hard-code CUDA: torch AdamW with an explicit DP all-reduce
(`CPUOptimizer`). Both leave norms and biases undecayed (megatron's wd_mult=0 rule).
"""

import torch
import torch.distributed as dist

from nemo_optune.config import ModelConfig


def decays(name: str, param: torch.Tensor) -> bool:
    """megatron's default rule (optimizer.get_standard_config_overrides): no weight decay for
    biases and 1-D parameters (norm weights)."""
    return not (name.endswith(".bias") or param.dim() == 1)


def use_megatron_optimizer() -> bool:
    """megatron's optimizers hard-code CUDA devices: on CPU the model uses `CPUOptimizer`."""
    return torch.cuda.is_available()


def megatron_optimizer_configs(cfg: ModelConfig, lr: float, weight_decay: float, grad_clip: float):
    """(DistributedDataParallelConfig, OptimizerConfig) for megatron's DDP and optimizer.

    One switch, model.distributed_optimizer, sets both: DDP reduce-scatters gradients exactly
    when the optimizer is sharded to consume them (otherwise it all-reduces)."""
    from megatron.core.distributed import DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig

    sharded = cfg.distributed_optimizer
    bf16 = cfg.precision == "bf16"
    ddp = DistributedDataParallelConfig(use_distributed_optimizer=sharded, grad_reduce_in_fp32=True)
    opt = OptimizerConfig(
        optimizer="adam",
        lr=lr,
        weight_decay=weight_decay,
        clip_grad=grad_clip,
        bf16=bf16,
        params_dtype=torch.bfloat16 if bf16 else torch.float32,
        use_distributed_optimizer=sharded,
    )
    return ddp, opt


class CPUOptimizer:
    """AdamW with an explicit sum-all-reduce of gradients over the DP group."""

    def __init__(self, model, lr: float, weight_decay: float, grad_clip: float):
        from megatron.core import parallel_state as mpu

        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        decayed = [p for n, p in named if decays(n, p)]
        undecayed = [p for n, p in named if not decays(n, p)]
        # In the groups' order: torch numbers optimizer state that way (sharded_state_dict).
        self.params = decayed + undecayed
        self.torch_opt = torch.optim.AdamW(
            [{"params": decayed, "weight_decay": weight_decay}, {"params": undecayed, "weight_decay": 0.0}], lr=lr
        )
        self.grad_clip = grad_clip
        # Tied embeddings at PP>1: the first stage's word embedding and the last stage's output
        # weight are copies of one parameter, each with part of its gradient.
        self.tied_copy = None
        if (
            model.share_embeddings_and_output_weights
            and mpu.get_pipeline_model_parallel_world_size() > 1
            and mpu.is_rank_in_embedding_group()
        ):
            self.tied_copy = model.shared_embedding_or_output_weight()

    def set_lr(self, lr: float) -> None:
        for group in self.torch_opt.param_groups:
            group["lr"] = lr

    def zero_grad(self) -> None:
        self.torch_opt.zero_grad(set_to_none=False)
        for p in self.params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)

    def step(self) -> float:
        norm = self.reduce_and_clip()
        self.torch_opt.step()
        return norm

    def reload_model_params(self) -> None:
        """Nothing to do: AdamW updates the model's own parameters."""

    def reduce_and_clip(self) -> float:
        """Sum gradients over DP (and over the tied embedding's two copies), then clip by the
        global norm. Returns the norm."""
        from megatron.core import parallel_state as mpu
        from megatron.core.tensor_parallel import param_is_not_tensor_parallel_duplicate
        from megatron.core.transformer.module import param_is_not_shared

        grads = [p.grad for p in self.params]
        if mpu.get_data_parallel_world_size() > 1:
            # One flat buffer: a single collective instead of one per parameter.
            flat = torch.cat([g.reshape(-1) for g in grads])
            dist.all_reduce(flat, group=mpu.get_data_parallel_group())
            for g, new in zip(grads, torch._utils._unflatten_dense_tensors(flat, grads)):
                g.copy_(new)
        if self.tied_copy is not None:  # megatron's _allreduce_word_embedding_grads
            dist.all_reduce(self.tied_copy.grad, group=mpu.get_embedding_group())
        # Global grad norm over TP and PP shards, counting TP-replicated params and the last
        # stage's copy of a tied embedding once.
        sq = torch.zeros((), dtype=torch.float32)
        for p in self.params:
            if param_is_not_tensor_parallel_duplicate(p) and param_is_not_shared(p):
                sq += (p.grad.float() ** 2).sum()
        dist.all_reduce(sq, group=mpu.get_model_parallel_group())
        norm = sq.sqrt().item()
        if self.grad_clip > 0 and norm > self.grad_clip:
            for g in grads:
                g.mul_(self.grad_clip / (norm + 1e-6))
        return norm

    def sharded_state_dict(self, model_sharded_state_dict: dict, is_loading: bool = False) -> dict:
        """Adam moments as ShardedTensors shaped like their parameters, so that the
        optimizer reshards across TP/PP exactly like the model (megatron's helpers)."""
        from megatron.core.dist_checkpointing.optimizer import (
            get_param_id_to_sharded_param_map,
            optim_state_to_sharding_state,
        )

        # Loading: a template to load into. Saving before the first step (a checkpoint inside the
        # first iteration): the moments AdamW's first step would create, the same zeros and step 0.
        if is_loading or not self.torch_opt.state:
            for p in self.params:
                self.torch_opt.state[p] = {
                    "step": torch.tensor(0.0),
                    "exp_avg": torch.zeros_like(p),
                    "exp_avg_sq": torch.zeros_like(p),
                }
        state = self.torch_opt.state_dict()
        steps = {float(s["step"]) for s in state["state"].values()}
        id_map = get_param_id_to_sharded_param_map(model_sharded_state_dict, self.params)
        optim_state_to_sharding_state(state, id_map, exclude_keys=("step",))
        state["adam_step"] = steps.pop() if steps else 0.0  # one step count for every parameter
        return state

    def load_sharded(self, state: dict) -> None:
        step = torch.tensor(float(state.pop("adam_step")))
        for moments in state["state"].values():
            moments["step"] = step.clone()
        self.torch_opt.load_state_dict(state)


# The distributed optimizer's default format (fully_sharded_model_space) fails to save in
# megatron-core 0.16.1; fully_reshardable also reshards across TP/PP/DP. Its save gathers the
# fp32 main params and both Adam moments of the TP shard: mem_efficient gathers them over gloo
# onto DP rank 0 only, not onto every DP rank (~43 GB of host memory per rank at 7B otherwise).
OPTIMIZER_CHECKPOINT_METADATA = {
    "distrib_optim_sharding_type": "fully_reshardable",
    "distrib_optim_fully_reshardable_mem_efficient": True,
}


class MegatronGPUOptimizer:
    """megatron DDP (sum over DP, as calculate_per_token_loss asks) + megatron Adam, sharded
    over DP when model.distributed_optimizer.

    Not run end to end in this repository's CI (no GPU); tests/test_gpu_optimizer.py runs
    its bf16 optimizer on CPU. See docs/gpu.md."""

    def __init__(self, model, cfg: ModelConfig, lr: float, weight_decay: float, grad_clip: float):
        from megatron.core.distributed import DistributedDataParallel
        from megatron.core.optimizer import get_megatron_optimizer

        ddp_config, opt_config = megatron_optimizer_configs(cfg, lr, weight_decay, grad_clip)
        self.ddp = DistributedDataParallel(model.config, ddp_config, model)
        self.megatron_opt = get_megatron_optimizer(opt_config, [self.ddp])
        self.weight_decay = weight_decay

    def set_lr(self, lr: float) -> None:
        # megatron's groups carry wd_mult (0 for norms and biases) but only its
        # OptimizerParamScheduler, which is not used here, multiplies it in.
        for group in self.megatron_opt.param_groups:
            group["lr"] = lr
            group["weight_decay"] = self.weight_decay * group.get("wd_mult", 1.0)

    def zero_grad(self) -> None:
        self.ddp.zero_grad_buffer()
        self.megatron_opt.zero_grad()

    def step(self) -> float:
        from megatron.core.distributed import finalize_model_grads

        finalize_model_grads([self.ddp])
        _, grad_norm, _ = self.megatron_opt.step()
        return float(grad_norm or 0.0)

    def sharded_state_dict(self, model_sharded_state_dict: dict, is_loading: bool = False) -> dict:
        return self.megatron_opt.sharded_state_dict(
            model_sharded_state_dict, is_loading=is_loading, metadata=OPTIMIZER_CHECKPOINT_METADATA
        )

    def load_sharded(self, state: dict) -> None:
        # Restores the fp32 main params too (saved with the moments), so no reload is needed.
        self.megatron_opt.load_state_dict(state)

    def reload_model_params(self) -> None:
        """Re-copy the fp32 main params from the model's (bf16) params; without it the first
        step would write back the weights the optimizer copied at construction."""
        self.megatron_opt.reload_model_params()


def build_optimizer(model, cfg: ModelConfig, lr: float, weight_decay: float, grad_clip: float):
    """(optimizer, the module the training schedule runs: megatron's DDP wrapper or the model)."""
    if use_megatron_optimizer():
        optimizer = MegatronGPUOptimizer(model, cfg, lr, weight_decay, grad_clip)
        return optimizer, optimizer.ddp
    return CPUOptimizer(model, lr, weight_decay, grad_clip), model
