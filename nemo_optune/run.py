"""Run one experiment from a typed config: SFT warm start (unless restoring), then the method."""

import json
import os
import sys
import time

from nemo_optune.config import RootConfig, as_dict
from nemo_optune.runtime import distributed
from nemo_optune.runtime.experiment import ExperimentLog, write_report
from nemo_optune.trainers.common import build_task_data, setup, sft_checkpoint_dir
from nemo_optune.trainers.preference import PreferenceTrainer
from nemo_optune.trainers.sft import run_sft


def run_experiment(cfg: RootConfig) -> dict:
    start = time.perf_counter()
    layout = setup(cfg)
    exp_dir = cfg.exp_manager.exp_dir
    log = ExperimentLog(exp_dir, enabled=layout.is_logging_rank, tensorboard=cfg.exp_manager.tensorboard)
    if layout.is_logging_rank:
        with open(os.path.join(exp_dir, "config.json"), "w") as f:
            json.dump(as_dict(cfg), f, indent=2)
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
        log.print(f"[sft] no model.restore_from_path: SFT warm start into {restore}")
        sft_stats = run_sft(cfg, layout, data, restore, log=log.print)
    trainer.load_sft(restore)
    result = trainer.fit()
    summary = trainer.summary({**sft_stats, **result, "sft_checkpoint": restore,
                               "wall_seconds": time.perf_counter() - start})
    log.write_json("summary.json", summary)
    if cfg.exp_manager.report and layout.is_logging_rank:
        write_report(os.path.join(exp_dir, "report.png"), summary)
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

    try:
        typed = to_typed(cfg)
        summary = run_experiment(typed)
    except (ValueError, DataError, OmegaConfBaseException, FileNotFoundError) as err:
        print(f"error: {one_line(err)}", file=sys.stderr, flush=True)
        sys.exit(2)
    if distributed.world_from_env()[0] == 0:
        print(f"[done] held-out reward {summary.get('heldout_reward_initial', float('nan')):.4f} -> "
              f"{summary.get('heldout_reward_final', float('nan')):.4f} in {summary['wall_seconds']:.1f}s, "
              f"peak RSS {summary.get('peak_rss_mb', 0):.0f} MB")
        print(os.path.abspath(typed.exp_manager.exp_dir))
    distributed.shutdown()
