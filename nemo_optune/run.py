"""Run one experiment from a typed config: SFT warm start (unless restoring), then the method."""

import os
import threading
import time

import torch.distributed as dist

from nemo_optune.config import ONLINE_METHODS, RootConfig, as_dict, max_time_seconds, sort_task_in_use, unread_keys
from nemo_optune.data.task_data import build_task_data
from nemo_optune.runtime import distributed, exp_dir
from nemo_optune.runtime.checkpoint import newest_intact_checkpoint
from nemo_optune.runtime.experiment import ExperimentLog, write_report
from nemo_optune.runtime.preemption import StopRequests
from nemo_optune.trainers.common import setup, sft_checkpoint_dir
from nemo_optune.trainers.preference import PreferenceTrainer
from nemo_optune.trainers.sft import run_sft


def _claim_exp_dir(cfg: RootConfig, layout: distributed.Layout):
    """Rank 0 checks, locks and prepares the experiment directory; every rank gets its
    verdict (the checkpoint to resume, AUTO or None) or its error. Returns (verdict, lock)."""
    verdict, handle = [None, None], None
    if layout.is_logging_rank:
        e = cfg.exp_manager
        try:
            exp_dir.check_writable(e.exp_dir)
            handle = exp_dir.lock(e.exp_dir)
            verdict[0] = exp_dir.prepare(
                e.exp_dir, as_dict(cfg), e.resume_if_exists, e.resume_from, e.overwrite, defaults=as_dict(RootConfig())
            )
        except (exp_dir.ExperimentDirError, OSError) as err:  # every rank must hear of it, or they hang
            verdict[1] = str(err)
    dist.broadcast_object_list(verdict, src=0)
    if verdict[1]:
        raise exp_dir.ExperimentDirError(verdict[1])
    return verdict[0], handle


def pool_records(cfg: RootConfig) -> int | None:
    """How many records the training pool holds at most (before length checks), for the dry
    run's pool row; None for SFT, or when the data file is not there to count."""
    from nemo_optune.data.records import DataError, read_source

    d = cfg.data
    path = d.train_prompts_path if cfg.method in ONLINE_METHODS else d.offline_path
    if cfg.method == "sft" or (path is None and cfg.method not in ONLINE_METHODS):
        return None
    if path is None:  # the task's prompts or a mixture: data.num_train_prompts
        return d.num_train_prompts
    try:
        return sum(1 for _ in read_source(path))
    except DataError:
        return None


def measured_width(cfg: RootConfig, data, restore: str, tokenizer, limit_width: int) -> tuple[int, str]:
    """The run's row width without data.max_prompt_tokens: as the trainer does, the longest
    prompt it will read (the model's tokenizer; no weights) + max_new_tokens, at most the
    model's limit. Where the prompts or the tokenizer cannot be read here, the limit (an upper
    bound, said in the title) and why."""
    from nemo_optune.data.preferences import read_preferences
    from nemo_optune.data.prompts import encode_prompt, fit_prompt
    from nemo_optune.data.records import DataError
    from nemo_optune.trainers.common import read_prompts, rows_width

    d, limit = cfg.data, limit_width - cfg.generation.max_new_tokens
    upper_bound = " (an upper bound, the model's limit: set data.max_prompt_tokens, or {})"
    if tokenizer is None:
        return limit_width, upper_bound.format(f"give {restore} its tokenizer files to measure the prompts")
    try:
        ids = read_prompts(cfg, "heldout", data.heldout_prompts, tokenizer, limit)[1]
        if cfg.method in ONLINE_METHODS:
            ids += read_prompts(cfg, "train", data.train_prompts, tokenizer, limit)[1]
        else:
            for r in read_preferences(str(d.offline_path)):
                fitted = fit_prompt(
                    encode_prompt(r.prompt, tokenizer, d.apply_chat_template, r.where), limit, d.long_prompts, r.where
                )
                ids += [fitted] if fitted is not None else []
    except (DataError, OSError) as err:  # e.g. data files not on this machine: the estimate still helps
        return limit_width, upper_bound.format(f"make the prompts readable here: {err}")
    return rows_width(limit_width, ids, cfg.generation.max_new_tokens), " (the longest prompt read + max_new_tokens)"


def dry_run(cfg: RootConfig) -> dict:
    """The config is valid (checked by now); the model's spec comes from model.restore_from_path
    (a directory with just config.json will do), else from model.*; it is checked against the
    layout and sequence width; nothing is loaded, no process group is made."""
    from nemo_optune.data.batching import micro_batch_size_for
    from nemo_optune.data.pool import pool_bytes_per_rank
    from nemo_optune.models.hf_spec import check_sequence_length
    from nemo_optune.models.memory import GIB, per_gpu_estimate, print_estimate
    from nemo_optune.models.sources import dry_run_model
    from nemo_optune.rewards.sources import RewardSources
    from nemo_optune.trainers.common import builtin_spec, check_layout, quiet_megatron_warnings, sequence_width

    quiet_megatron_warnings()

    m, t, g = cfg.model, cfg.trainer, cfg.generation
    data = build_task_data(cfg.data)
    task = data.task
    restore = m.restore_from_path
    spec, tokenizer = dry_run_model(restore) if restore else (builtin_spec(cfg, task), None)
    width = sequence_width(cfg, task, spec if restore else None)
    width_note = ""
    if restore and not cfg.data.max_prompt_tokens and not sort_task_in_use(cfg) and cfg.method != "sft":
        width, width_note = measured_width(cfg, data, restore, tokenizer, width)
    rank, _, world = distributed.world_from_env()
    tp, pp = m.tensor_model_parallel_size, m.pipeline_model_parallel_size
    check_layout(spec, tp, pp, restore or "the built-in model")
    check_sequence_length(spec, width, "generation.max_new_tokens")
    dp = world // (tp * pp)
    if cfg.method != "sft":  # reward model directories and functions checked; no model loaded, no server asked
        RewardSources(cfg.reward, task, load=False)
    micro = micro_batch_size_for(t.global_batch_size // dp, t.micro_batch_size)
    rows = per_gpu_estimate(
        spec,
        tp,
        pp,
        dp,
        bf16=m.precision == "bf16",
        distributed_optimizer=m.distributed_optimizer,
        micro_batch_pairs=micro,
        micro_batches=t.global_batch_size // (micro * dp),
        sequence_length=width,
        generation_batch=g.micro_batch_size,
    )
    records = pool_records(cfg)
    if records is not None:  # host memory, not GPU: tokens sharded over DP, scalars on every rank
        rows["prompt pool (host RAM per DP rank)"] = pool_bytes_per_rank(records, g.max_new_tokens, dp) / GIB
        if cfg.method in ONLINE_METHODS:
            # An iteration's new pairs wait beside the pool until its last generation chunk (a
            # checkpoint inside the iteration saves them): up to its whole window, generated
            # whole in the first iteration.
            window = min(records, t.prompts_per_iteration or records)
            rows["new pairs of an iteration (host RAM per DP rank)"] = (
                pool_bytes_per_rank(window, g.max_new_tokens, dp) / GIB
            )
    if rank == 0:
        print(
            print_estimate(
                rows,
                f"[dry run] {spec.family} model, TP={tp} PP={pp} DP={dp} (world {world}), "
                f"{width} positions{width_note}, per GPU on the most loaded pipeline stage:",
            ),
            flush=True,
        )
    return {"method": cfg.method, "dry_run": rows, "wall_seconds": 0.0}


def run_experiment(cfg: RootConfig) -> dict:
    if distributed.world_from_env()[0] == 0:  # set, but not read by this method: said in the log, not refused
        for line in unread_keys(cfg):
            print(f"[config] warning: {line}", flush=True)
    if cfg.trainer.dry_run:
        return dry_run(cfg)
    start = time.perf_counter()
    # Installed first: a stop signal during set-up or SFT is honoured at the first safe point.
    stop = StopRequests(
        cfg.trainer.stop_signals if threading.current_thread() is threading.main_thread() else [],
        max_time_seconds(cfg.trainer.max_time) if cfg.trainer.max_time else None,
        start,
    )
    try:
        return _run_in_exp_dir(cfg, stop, start)
    finally:
        stop.restore()


def _run_in_exp_dir(cfg: RootConfig, stop: StopRequests, start: float) -> dict:
    layout = setup(cfg)
    resume, lock = _claim_exp_dir(cfg, layout)
    try:
        log = ExperimentLog(
            cfg.exp_manager.exp_dir,
            enabled=layout.is_logging_rank,
            tensorboard=cfg.exp_manager.tensorboard,
            wandb=cfg.exp_manager.wandb,
            config=as_dict(cfg),
            resuming=resume is not None,
        )
        try:
            log.record_start(as_dict(cfg), layout.as_dict(), resume)  # run_info.json: one entry per start
            return _run(cfg, layout, log, resume, start, stop)
        finally:
            log.close()
    finally:
        if lock is not None:
            lock.close()


def _run(
    cfg: RootConfig,
    layout: distributed.Layout,
    log: ExperimentLog,
    resume: str | None,
    start: float,
    stop: StopRequests,
) -> dict:
    data = build_task_data(cfg.data)
    if cfg.method == "sft":
        stats = run_sft(cfg, layout, data, sft_checkpoint_dir(cfg), log=log.print)
        summary = {
            "method": "sft",
            "config": as_dict(cfg),
            "layout": layout.as_dict(),
            **stats,
            "checkpoint": sft_checkpoint_dir(cfg),
            "wall_seconds": time.perf_counter() - start,
        }
        log.write_json("summary.json", summary)
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
    trainer.model.load_policy(restore)
    trainer.model.sync_reference_to_policy()
    if resume == exp_dir.AUTO:
        resume = newest_intact_checkpoint(cfg.exp_manager.exp_dir, trainer.model.architecture(), warn=log.print)
    if resume:
        trainer.resume(resume)
    if layout.is_logging_rank:  # records of iterations after the checkpoint are redone
        exp_dir.truncate_jsonl(os.path.join(cfg.exp_manager.exp_dir, "selections.jsonl"), len(trainer.history))
    result = trainer.fit(stop)
    summary = trainer.summary(
        {
            **sft_stats,
            **result,
            "sft_checkpoint": restore,
            "resumed_from": resume,
            "wall_seconds": time.perf_counter() - start,
        }
    )
    log.write_json("summary.json", summary)
    if cfg.exp_manager.report and layout.is_logging_rank:
        write_report(os.path.join(cfg.exp_manager.exp_dir, "report.png"), summary)
    return summary
