"""Run experiments under a TP x PP x DP layout in spawned gloo processes and hand rank 0's
view back to the tests: the pool, exported weights, captured gradients. Can also SIGKILL
the run, or send it stop signals, at a chosen point, to test resumption."""

import os
import signal

import psutil
import torch
import torch.multiprocessing as mp

from nemo_optune.runtime.distributed import free_port


def _env(rank: int, world: int, port: int) -> None:
    # Own process group: whatever a SIGKILLed rank leaves behind, the harness kills the group.
    os.setsid()
    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )
    torch.set_num_threads(1)  # 2 cores shared by up to 4 processes


def _install_signals(events, state, rank: int) -> None:
    """Send this process and its children (as Slurm signals every process of a step) signals at
    `events` = [(point, iteration index, signal name, ranks or None for all)], each once; point
    in generation | training | reference (the whole pool's pass) | checkpoint (shards written,
    not yet published), at its first call in that iteration, or `point:k` at its k-th (from 0).
    SIGKILL ends the process there."""
    from nemo_optune.generation.megatron_engine import MegatronInProcessEngine
    from nemo_optune.models.gpt_optune import MegatronGPTOPTuneModel
    from nemo_optune.runtime import checkpoint
    from nemo_optune.trainers.preference_pool import PreferencePool

    pending = [e for e in events if e[3] is None or rank in e[3]]

    calls: dict = {}  # (point, iteration) -> calls so far

    def signal_if(here: str):
        key = (here, state["iteration"])
        calls[key] = calls.get(key, 0) + 1
        for event in list(pending):
            point, iteration, name, _ = event
            point, _, k = point.partition(":")
            if here == point and state["iteration"] == iteration and calls[key] == int(k or 0) + 1:
                pending.remove(event)
                for process in [*psutil.Process().children(recursive=True), psutil.Process()]:
                    process.send_signal(getattr(signal, name))

    generate, train_step, rng_state = (
        MegatronInProcessEngine.generate,
        MegatronGPTOPTuneModel.train_step,
        checkpoint._rng_state,
    )
    MegatronInProcessEngine.generate = lambda self, *a, **k: (signal_if("generation"), generate(self, *a, **k))[1]
    MegatronGPTOPTuneModel.train_step = lambda self, *a, **k: (signal_if("training"), train_step(self, *a, **k))[1]
    checkpoint._rng_state = lambda: (signal_if("checkpoint"), rng_state())[1]
    reference = PreferencePool.refresh_all_reference_logprobs
    PreferencePool.refresh_all_reference_logprobs = lambda self: (signal_if("reference"), reference(self))[1]


def _worker(rank, world, port, overrides, out_path, capture_iteration, signals):
    _env(rank, world, port)
    from nemo_optune.config import load_config
    from nemo_optune.models import optimizers
    from nemo_optune.models.export import gather_full_tensors
    from nemo_optune.run import run_experiment
    from nemo_optune.runtime import distributed
    from nemo_optune.trainers.preference import PreferenceTrainer

    state = {"iteration": -1, "step": 0, "trainer": None}
    captured = {}
    iteration, train_on_pool = PreferenceTrainer.iteration, PreferenceTrainer.train_on_pool
    reduce_and_clip = optimizers.CPUOptimizer.reduce_and_clip

    def iteration_hook(self, it):
        state.update(iteration=it, trainer=self)
        return iteration(self, it)

    def train_hook(self, it, window, pos, timer):
        state.update(step=0)
        return train_on_pool(self, it, window, pos, timer)

    def grad_hook(self):
        norm = reduce_and_clip(self)
        if state["iteration"] == capture_iteration and state["step"] == 0:
            # Gradients of this iteration's first optimizer step, after the DP reduction.
            captured["grads"] = gather_full_tensors(state["trainer"].model.policy, of="grad")
            captured["grad_norm"] = norm
        state["step"] += 1
        return norm

    PreferenceTrainer.iteration = iteration_hook
    PreferenceTrainer.train_on_pool = train_hook
    optimizers.CPUOptimizer.reduce_and_clip = grad_hook
    if signals:
        _install_signals(signals, state, rank)
    summary = run_experiment(load_config("optune_tiny", overrides))
    trainer = state["trainer"]
    weights = trainer.model.export_weights() if trainer else {}
    # The whole pool on rank 0 (every token row fetched from its owner), and this rank's own share's bytes.
    pool = _whole_pool_on_rank0(trainer) if trainer else None
    if rank == 0:
        pool_bytes = trainer.pool.store.nbytes() if trainer else None
        torch.save(
            {"summary": summary, "pool": pool, "pool_bytes": pool_bytes, "weights": weights, **captured}, out_path
        )
    distributed.shutdown()


def _whole_pool_on_rank0(trainer) -> dict:
    """Collective over DP: the pool's state with every prompt's token rows on DP rank 0."""
    everything, dp = torch.arange(len(trainer.pool.store)), trainer.layout.dp
    return trainer.pool.fetch([everything] + [everything[:0]] * (dp - 1)).state_dict()


def hypo_overrides(root, sft_checkpoint: str, tiny: list[str]) -> list[str]:
    """HyPO on the task's offline pairs (written to root/prefs.jsonl) from the SFT checkpoint."""
    from nemo_optune.data.make_offline_preferences import main as make_preferences

    make_preferences(["--out", os.path.join(root, "prefs.jsonl"), *tiny])
    return tiny + [
        "method=hypo",
        f"data.offline_path={os.path.join(root, 'prefs.jsonl')}",
        "model.optune.weighting=none",
        f"model.restore_from_path={sft_checkpoint}",
    ]


def run_layout(
    world: int, overrides: list[str], out_path: str, capture_iteration: int = 1, kill_at=None, signals=()
) -> dict | None:
    """Run to the end (or to a stop that `signals` cause, see _install_signals) and return rank
    0's results; with `kill_at` = (point, iteration), expect that SIGKILL and return None."""
    if kill_at is None:
        _spawn(_worker, (world, free_port(), overrides, out_path, capture_iteration, list(signals)), world)
        return torch.load(out_path, weights_only=False)
    args = (world, free_port(), overrides, out_path, capture_iteration, [(*kill_at, "SIGKILL", None)])
    try:
        _spawn(_worker, args, world)
    except mp.ProcessExitedException as err:
        assert err.signal_name == "SIGKILL", err
        return None
    raise AssertionError(f"the run was not killed at {kill_at}")


# Imported once by the fork server of each test process, so a rank starts in well under a second
# instead of importing torch, megatron and transformers again (~5 s each on 2 cores).
PRELOAD = ["torch", "megatron.core", "transformers", "nemo_optune.run", "parallel_harness"]


def preloaded_context():
    """The multiprocessing context whose processes fork from the preloaded server."""
    import multiprocessing

    multiprocessing.set_forkserver_preload(PRELOAD)
    return mp.get_context("forkserver")


def _spawn(fn, args, world: int) -> None:
    """mp.spawn through the preloaded fork server, then kill whatever the ranks left behind
    (each rank leads its own group)."""
    preloaded_context()
    context = mp.start_processes(fn, args=args, nprocs=world, join=False, start_method="forkserver")
    try:
        while not context.join():
            pass
    finally:
        for process in context.processes:
            try:
                os.killpg(process.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass


def _loss_worker(rank, world, port, overrides, checkpoint, out_path):
    """Resume `checkpoint` under this layout and compute, forward only, the preference loss
    of the pool's first global batch through the trainer's own batch and loss assembly."""
    _env(rank, world, port)
    from nemo_optune.config import load_config
    from nemo_optune.data.task_data import build_task_data
    from nemo_optune.runtime import distributed
    from nemo_optune.runtime.experiment import ExperimentLog
    from nemo_optune.trainers.common import setup
    from nemo_optune.trainers.preference import PreferenceTrainer
    from nemo_optune.trainers.preference_loss import pair_sequences

    cfg = load_config("optune_tiny", overrides)
    layout = setup(cfg)
    trainer = PreferenceTrainer(
        cfg, layout, build_task_data(cfg.data), ExperimentLog("", enabled=False, tensorboard=False)
    )
    trainer.model.load_policy(cfg.model.restore_from_path)
    trainer.model.sync_reference_to_policy()
    trainer.resume(checkpoint)
    batch = torch.arange(cfg.trainer.global_batch_size)
    loss = trainer.batch_loss(batch)["loss"]
    pool = trainer.pool
    rows = pool.fetch([batch] * trainer.layout.dp).rows(batch)
    tokens, mask = pair_sequences(
        [pool.prompt_ids[i] for i in batch.tolist()], rows, trainer.width, trainer.tokenizer.pad_id
    )
    logps = trainer.model.sequence_logprobs("policy", tokens, mask, micro_batch_size=16)
    if rank == 0:
        torch.save({"loss": loss, "logps": logps}, out_path)
    distributed.shutdown()


def loss_at_layout(world: int, overrides: list[str], checkpoint: str, out_path: str) -> dict:
    _spawn(_loss_worker, (world, free_port(), overrides, checkpoint, out_path), world)
    return torch.load(out_path, weights_only=False)
