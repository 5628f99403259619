"""Run one experiment under a TP x PP x DP layout in spawned gloo processes and return what
the equivalence tests compare (rank 0's view)."""

import os
import socket

import torch
import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, overrides: list[str], out_path: str, capture_iteration: int):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)  # 2 cores shared by up to 4 processes
    from nemo_optune.config import load_config
    from nemo_optune.models import gpt_optune
    from nemo_optune.models.export import gather_full_tensors
    from nemo_optune.run import run_experiment
    from nemo_optune.runtime import distributed
    from nemo_optune.trainers.preference import PreferenceTrainer

    state = {"iteration": -1, "step": 0, "trainer": None}
    captured = {}
    train_on_pool = PreferenceTrainer.train_on_pool
    reduce_and_clip = gpt_optune._CPUOptimizer.reduce_and_clip

    def train_hook(self, it):
        state.update(iteration=it, step=0, trainer=self)
        return train_on_pool(self, it)

    def grad_hook(self):
        norm = reduce_and_clip(self)
        if state["iteration"] == capture_iteration and state["step"] == 0:
            # Gradients of this iteration's first optimizer step, after the DP reduction.
            captured["grads"] = gather_full_tensors(state["trainer"].model.policy, of="grad")
            captured["grad_norm"] = norm
        state["step"] += 1
        return norm

    PreferenceTrainer.train_on_pool = train_hook
    gpt_optune._CPUOptimizer.reduce_and_clip = grad_hook
    summary = run_experiment(load_config("optune_tiny", overrides))
    weights = state["trainer"].model.export_weights()
    if rank == 0:
        torch.save({"summary": summary, "pool": state["trainer"].pool.state_dict(), "weights": weights, **captured},
                   out_path)
    distributed.shutdown()


def run_layout(world: int, overrides: list[str], out_path: str, capture_iteration: int = 1) -> dict:
    mp.spawn(_worker, args=(world, _free_port(), overrides, out_path, capture_iteration), nprocs=world, join=True)
    return torch.load(out_path, weights_only=False)
