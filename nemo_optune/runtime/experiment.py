"""Experiment outputs: per-iteration console line, TensorBoard, Weights & Biases (optional),
selections.jsonl, samples.jsonl, run_info.json, summary.json and report.png. Only the logging
rank writes. docs/metrics.md lists the metrics."""

import contextlib
import datetime
import json
import os
import platform
import resource
import secrets
import socket
import subprocess
import sys
import time
from collections import defaultdict
from importlib import metadata

from nemo_optune.runtime.lost_ranks import note_phase


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux reports KiB


def peak_gpu_memory_mb() -> float | None:
    """Peak memory torch allocated on this rank's GPU (None without one)."""
    import torch

    return torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None


@contextlib.contextmanager
def atomic_output(path: str):
    """Yield a temporary path to write; rename it over `path` on success, remove it on
    failure (a full disk leaves the previous file, not a truncated one). OSError names the file."""
    tmp = path + ".tmp"
    try:
        yield tmp
        os.replace(tmp, path)
    except OSError as err:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise OSError(err.errno, f"cannot write {path} ({err.strerror or err}); checkpoints are intact") from None


class PhaseTimer:
    """Accumulates wall seconds per named phase (and notes the phase for a lost-rank message)."""

    def __init__(self):
        self.seconds = defaultdict(float)

    @contextlib.contextmanager
    def phase(self, name: str):
        note_phase(name)
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] += time.perf_counter() - start


# An iteration record's keys -> the grouped names TensorBoard and W&B show, in the style of
# NeMo-Aligner / NeMo-RL (train/loss, train/accuracy, val/...). summary.json keeps the record keys.
METRIC_NAMES = {
    "train_loss": "train/loss",
    "train_accuracy": "train/accuracy",
    "train_margin": "train/margin",
    "hypo_kl": "train/hypo_kl",
    "grad_norm": "train/grad_norm",
    "lr": "train/lr",
    "optimizer_steps": "train/optimizer_steps",
    "batches_without_signal": "train/batches_without_signal",
    "heldout_reward": "val/reward",
    "heldout_kl": "val/kl",
    "pool_mean_reward": "rollout/pool_mean_reward",
    "pool_chosen_reward": "rollout/pool_chosen_reward",
    "pool_valid_pairs": "rollout/pool_valid_pairs",
    "rho": "rollout/rho",
    "regenerated": "rollout/regenerated",
    "ties_dropped": "rollout/ties_dropped",
    "non_finite_rewards": "rollout/non_finite_rewards",
    "training_tokens": "throughput/training_tokens",
}
METRIC_GROUPS = {  # dict-valued record keys: group/<sub key>
    "seconds": "timing",
    "reward_by_source": "rollout/reward_by_source",
    "heldout_reward_by_source": "val/reward_by_source",
    "implicit_rewards": "train/rewards",  # TRL's rewards/chosen, rewards/rejected, rewards/margins
    "policy_logps": "train/logps",  # TRL's logps/chosen, logps/rejected
    "completions": "rollout/completions",  # TRL's completions/mean_length, ...
    "heldout_completions": "val/completions",
    "throughput": "throughput",
    "memory": "memory",
}
NOT_METRICS = ("iteration",)  # the step itself


def metric_names(record: dict) -> dict[str, float]:
    """The numeric values of an iteration record under their grouped names; a key not in
    METRIC_NAMES / METRIC_GROUPS goes under train/ (None and non-numbers are left out)."""
    out = {}

    def add(name: str, value) -> None:
        if isinstance(value, dict):
            for key, sub in value.items():
                add(f"{name}/{key}", sub)
        elif isinstance(value, (int, float)):
            out[name] = float(value)

    for key, value in record.items():
        if key in NOT_METRICS:
            continue
        if isinstance(value, dict):
            add(METRIC_GROUPS.get(key, f"train/{key}"), value)
        else:
            add(METRIC_NAMES.get(key, f"train/{key}"), value)
    return out


WANDB_ID_FILE = "wandb_run_id"


class ExperimentLog:
    """Console lines, TensorBoard and W&B scalars, JSON outputs. Construct it on every rank
    (only the logging rank, enabled=True, writes): with W&B on, its verdict reaches all ranks."""

    def __init__(
        self,
        exp_dir: str,
        enabled: bool,
        tensorboard: bool,
        wandb=None,
        config: dict | None = None,
        resuming: bool = False,
    ):
        """wandb: the exp_manager.wandb config (WandbConfig) or None; config: the resolved
        config, stored with the W&B run; resuming: the run continues from a checkpoint, so it
        continues the W&B run whose id exp_dir/wandb_run_id holds (else a new W&B run)."""
        self.exp_dir = exp_dir
        self.enabled = enabled
        self.writer = None
        self.wandb_run = None
        error = None
        if enabled:
            os.makedirs(exp_dir, exist_ok=True)
            if wandb is not None and wandb.enabled:  # first: a missing package fails before any other work
                try:
                    self.wandb_run = self._start_wandb(wandb, config or {}, resuming)
                except Exception as err:  # every rank must hear of it (below), or they hang
                    error = (
                        str(err)
                        if str(err).startswith("config key")
                        else f"config key exp_manager.wandb: wandb.init failed ({type(err).__name__}: {err})"
                    )
            if tensorboard and error is None:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(log_dir=os.path.join(exp_dir, "tensorboard"))
        if wandb is not None and wandb.enabled:
            error = _rank0_verdict(error)
        if error:
            self.close()
            raise ValueError(error)

    def _start_wandb(self, w, config: dict, resuming: bool):
        try:
            import wandb
        except ImportError:
            raise ValueError(
                "config key exp_manager.wandb.enabled: wandb is not installed (pip install -e '.[wandb]')"
            ) from None
        id_file = os.path.join(self.exp_dir, WANDB_ID_FILE)
        run_id = None
        if resuming and os.path.exists(id_file):
            with open(id_file) as f:
                run_id = f.read().strip() or None
        if run_id is None:  # a fresh start (no checkpoint) begins a new W&B run: its steps restart at 1
            run_id = secrets.token_hex(4)
            with atomic_output(id_file) as tmp, open(tmp, "w") as f:
                f.write(run_id + "\n")
        quiet = {"silent": True} if w.mode != "online" else {"quiet": True}  # online: the run's URL only
        run = wandb.init(
            project=w.project,
            name=w.name or os.path.basename(os.path.abspath(self.exp_dir)),
            entity=w.entity,
            group=w.group,
            tags=list(w.tags) or None,
            mode=w.mode,
            dir=self.exp_dir,
            config=config,
            id=run_id,
            resume="allow",
            settings=wandb.Settings(**quiet),
        )
        self.wandb_mode = w.mode
        if w.mode == "offline":
            self.print(
                f"[wandb] offline run {run_id} in {os.path.join(self.exp_dir, 'wandb')} "
                f"(upload: wandb sync {os.path.join(self.exp_dir, 'wandb', 'offline-run-*')})"
            )
        return run

    def print(self, message: str) -> None:
        if self.enabled:
            print(message, flush=True)

    def scalars(self, step: int, values: dict) -> None:
        """An iteration record's numbers, under their grouped names (metric_names), at `step`."""
        if self.writer is None and self.wandb_run is None:
            return
        metrics = metric_names(values)
        if self.writer is not None:
            for name, value in metrics.items():
                self.writer.add_scalar(name, value, step)
            self.writer.flush()
        if self.wandb_run is not None:
            self.wandb_run.log(metrics, step=step)

    def samples(self, step: int, samples: list[dict]) -> None:
        """A few held-out prompts with their responses and rewards: samples.jsonl (one line each,
        with the iteration; 0 = the start) and TensorBoard's text tab (val/samples)."""
        if not self.enabled or not samples:
            return
        for sample in samples:
            self.append_jsonl("samples.jsonl", {"iteration": step, **sample})
        if self.writer is not None:
            text = "\n\n".join(
                f"**held-out prompt {s['prompt_index']}** (reward {s['reward']}, {s['length']} tokens)\n\n"
                + "".join(f"    {line}\n" for line in f"{_text(s['prompt'])}\n---\n{s['response']}".splitlines())
                for s in samples
            )
            self.writer.add_text("val/samples", text, step)
            self.writer.flush()

    def append_jsonl(self, name: str, record: dict) -> None:
        if self.enabled:
            with open(os.path.join(self.exp_dir, name), "a") as f:
                f.write(json.dumps(record) + "\n")

    def write_json(self, name: str, data: dict) -> None:
        """Atomic: the old file stays whole until the new one is complete."""
        if self.enabled:
            with atomic_output(os.path.join(self.exp_dir, name)) as tmp, open(tmp, "w") as f:
                json.dump(data, f, indent=2)

    def record_start(self, config: dict, layout: dict, resume: str | None = None) -> None:
        """Adds this start to exp_dir/run_info.json ({"starts": [...]}, one entry per start, so a
        requeued job's history stays): config, source revision, versions, layout, host, time, command."""
        if not self.enabled:
            return
        path = os.path.join(self.exp_dir, "run_info.json")
        starts = []
        if os.path.exists(path):
            try:
                with open(path) as f:
                    starts = json.load(f)["starts"]
                if not isinstance(starts, list):
                    raise TypeError("starts is not a list")
            except (ValueError, KeyError, TypeError) as err:  # kept aside, not lost
                os.replace(path, path + ".unreadable")
                self.print(f"[run_info] {path} was unreadable ({err}); moved to {path}.unreadable")
                starts = []
        entry = run_info(config, layout, resume)
        if self.wandb_run is not None:
            entry["wandb"] = {"id": self.wandb_run.id, "mode": self.wandb_mode}
        self.write_json("run_info.json", {"starts": starts + [entry]})

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
        if self.wandb_run is not None:
            failed = sys.exc_info()[0] is not None and not _clean_exit(sys.exc_info()[1])
            self.wandb_run.finish(exit_code=1 if failed else 0)
            self.wandb_run = None


def _text(prompt) -> str:
    """A prompt as text: itself, or its chat messages as JSON."""
    return prompt if isinstance(prompt, str) else json.dumps(prompt, ensure_ascii=False)


def _clean_exit(err: BaseException) -> bool:
    return isinstance(err, SystemExit) and err.code in (0, None)


def _rank0_verdict(error: str | None) -> str | None:
    """Rank 0's error (or None), on every rank of the job."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return error
    verdict = [error]
    dist.broadcast_object_list(verdict, src=0)
    return verdict[0]


# ----------------------------------------------------------------- run_info.json
def source_revision() -> dict | None:
    """{"revision": HEAD, "dirty": uncommitted changes to tracked files} of the git checkout
    nemo_optune runs from; None when it is not one (e.g. installed from a wheel) or git fails."""
    package = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", "--no-optional-locks", "-C", package, *args], capture_output=True, text=True, timeout=20, check=True
        ).stdout.strip()

    try:
        git("ls-files", "--error-unmatch", "__init__.py")  # this package is tracked, not just inside some repo
        return {
            "revision": git("rev-parse", "HEAD"),
            "dirty": bool(git("status", "--porcelain", "--untracked-files=no")),
        }
    except (OSError, subprocess.SubprocessError):
        return None


def package_versions() -> dict:
    """Versions of python and the core packages (None if missing), plus the optional ones present."""

    def version(name: str) -> str | None:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return None

    out = {"python": platform.python_version()}
    out.update({name: version(name) for name in ("nemo_optune", "torch", "megatron-core", "transformers")})
    for name in ("wandb", "vllm", "tensorrt_llm", "transformer_engine"):
        if version(name) is not None:
            out[name] = version(name)
    with contextlib.suppress(Exception):
        import torch

        out["cuda"] = torch.version.cuda
    return out


def run_info(config: dict, layout: dict, resume: str | None = None) -> dict:
    """One start of a run: what ran, where, from which source."""
    scheduler = {
        k: v
        for k, v in os.environ.items()
        if k
        in (
            "SLURM_JOB_ID",
            "SLURM_ARRAY_JOB_ID",
            "SLURM_ARRAY_TASK_ID",
            "SLURM_RESTART_COUNT",
            "SLURM_JOB_NODELIST",
            "TORCHELASTIC_RESTART_COUNT",
        )
    }
    return {
        "start_time": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "hostname": socket.gethostname(),
        "pid": os.getpid(),
        "command": [sys.executable, *sys.argv],
        "cwd": os.getcwd(),
        "git": source_revision(),
        "versions": package_versions(),
        "layout": layout,
        "resume": resume,
        "scheduler": scheduler,
        "config": config,
    }


def write_report(path: str, summary: dict) -> None:
    """report.png: held-out reward per iteration, and each iteration's time split."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    iters = summary["iterations"]
    evaluated = [(it["iteration"], it["heldout_reward"]) for it in iters if it["heldout_reward"] is not None]
    xs, rewards = zip(*([(0, summary["heldout_reward_initial"])] + evaluated))  # trainer.eval_every > 1: fewer
    fig, (left, right) = plt.subplots(1, 2, figsize=(12.5, 4))
    left.plot(xs, rewards, marker="o")
    left.set_xlabel("iteration (0 = SFT start)")
    left.set_ylabel("held-out mean reward")
    left.set_title(f"{summary['method']}: held-out reward")
    left.grid(alpha=0.3)
    phases = ["generation", "scoring", "reference", "training", "other"]
    bottom = [0.0] * len(iters)
    for phase in phases:
        if phase == "other":
            values = [it["seconds"]["total"] - sum(it["seconds"][p] for p in phases[:-1]) for it in iters]
        else:
            values = [it["seconds"][phase] for it in iters]
        right.bar([it["iteration"] for it in iters], values, bottom=bottom, label=phase)
        bottom = [b + v for b, v in zip(bottom, values)]
    right.set_xlabel("iteration")
    right.set_ylabel("seconds (held-out eval excluded)")
    right.set_title("time per iteration")
    right.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    try:
        with atomic_output(path) as tmp:
            fig.savefig(tmp, dpi=100, format="png")
    finally:
        plt.close(fig)
