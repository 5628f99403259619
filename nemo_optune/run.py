"""Run one experiment from a typed config: SFT warm start (unless restoring), then the method."""

import os
import sys
import time

import torch.distributed as dist

from nemo_optune.config import RootConfig, as_dict
from nemo_optune.runtime import distributed, exp_dir
from nemo_optune.runtime.experiment import ExperimentLog, write_report
from nemo_optune.trainers.common import build_task_data, setup, sft_checkpoint_dir
from nemo_optune.trainers.preference import PreferenceTrainer
from nemo_optune.trainers.sft import run_sft


def _prepare_exp_dir(cfg: RootConfig, layout) -> str | None:
    """Rank 0 checks the experiment directory; every rank gets its verdict (or its error)."""
    verdict = [None, None]
    if layout.is_logging_rank:
        e = cfg.exp_manager
        try:
            verdict[0] = exp_dir.prepare(e.exp_dir, as_dict(cfg), e.resume_if_exists, e.resume_from, e.overwrite)
        except exp_dir.ExperimentDirError as err:
            verdict[1] = str(err)
    dist.broadcast_object_list(verdict, src=0)
    if verdict[1]:
        raise exp_dir.ExperimentDirError(verdict[1])
    return verdict[0]


def run_experiment(cfg: RootConfig) -> dict:
    start = time.perf_counter()
    layout = setup(cfg)
    resume = _prepare_exp_dir(cfg, layout)
    log = ExperimentLog(cfg.exp_manager.exp_dir, enabled=layout.is_logging_rank, tensorboard=cfg.exp_manager.tensorboard)
    data = build_task_data(cfg)

    if cfg.method == "sft":
        stats = run_sft(cfg, layout, data, sft_checkpoint_dir(cfg), log=log.print)
        summary = {"method": "sft", "config": as_dict(cfg), "layout": layout.as_dict(), **stats,
                   "checkpoint": sft_checkpoint_dir(cfg), "wall_seconds": time.perf_counter() - start}
        log.write_json("summary.json", summary)
        log.close()
        return summary

    trainer = PreferenceTrainer(cfg, layout, data, log)  # reads and checks its data first
    sft_stats = {}
    restore = cfg.model.restore_from_path
    if restore is None:
        restore = sft_checkpoint_dir(cfg)
        if os.path.isdir(restore):  # same config (checked above), deterministic: reuse it
            log.print(f"[sft] reusing the SFT warm start in {restore}")
        else:
            log.print(f"[sft] no model.restore_from_path: SFT warm start into {restore}")
            sft_stats = run_sft(cfg, layout, data, restore, log=log.print)
    trainer.load_sft(restore)
    if resume:
        trainer.resume(resume)
    if layout.is_logging_rank:  # records of iterations after the checkpoint are redone
        exp_dir.truncate_jsonl(os.path.join(cfg.exp_manager.exp_dir, "selections.jsonl"), len(trainer.history))
    result = trainer.fit()
    summary = trainer.summary({**sft_stats, **result, "sft_checkpoint": restore, "resumed_from": resume,
                               "wall_seconds": time.perf_counter() - start})
    log.write_json("summary.json", summary)
    if cfg.exp_manager.report and layout.is_logging_rank:
        write_report(os.path.join(cfg.exp_manager.exp_dir, "report.png"), summary)
    log.close()
    return summary


def one_line(err: BaseException) -> str:
    """OmegaConf's messages span lines (value, full_key, types): keep the key on one line."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    key = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("full_key:")), None)
    text = lines[0] if lines else type(err).__name__
    return f"config key {key}: {text}" if key and key not in text else text


def main(cfg) -> None:
    """Entry point shared by the example launchers: typed config in, experiment out.
    Bad input exits with status 2 and one line naming the key, file or line."""
    from omegaconf.errors import OmegaConfBaseException

    from nemo_optune.config import to_typed
    from nemo_optune.data.preference_jsonl import DataError
    from nemo_optune.rewards.resilient import RewardSourceError
    from nemo_optune.runtime.checkpoint import CheckpointError

    try:
        typed = to_typed(cfg)
        summary = run_experiment(typed)
    except (ValueError, DataError, OmegaConfBaseException, FileNotFoundError, exp_dir.ExperimentDirError,
            CheckpointError, RewardSourceError) as err:
        print(f"error: {one_line(err)}", file=sys.stderr, flush=True)
        sys.exit(2)
    if distributed.world_from_env()[0] == 0:
        print(f"[done] held-out reward {summary.get('heldout_reward_initial', float('nan')):.4f} -> "
              f"{summary.get('heldout_reward_final', float('nan')):.4f} in {summary['wall_seconds']:.1f}s, "
              f"peak RSS {summary.get('peak_rss_mb', 0):.0f} MB")
        print(os.path.abspath(typed.exp_manager.exp_dir))
    distributed.shutdown()
