"""Experiment outputs: per-iteration console line, TensorBoard, selections.jsonl,
summary.json and report.png. Only the logging rank writes."""

import contextlib
import json
import os
import resource
import time
from collections import defaultdict


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux reports KiB


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
    """Accumulates wall seconds per named phase."""

    def __init__(self):
        self.seconds = defaultdict(float)

    @contextlib.contextmanager
    def phase(self, name: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] += time.perf_counter() - start


class ExperimentLog:
    def __init__(self, exp_dir: str, enabled: bool, tensorboard: bool):
        self.exp_dir = exp_dir
        self.enabled = enabled
        self.writer = None
        if enabled:
            os.makedirs(exp_dir, exist_ok=True)
            if tensorboard:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(log_dir=os.path.join(exp_dir, "tensorboard"))

    def print(self, message: str) -> None:
        if self.enabled:
            print(message, flush=True)

    def scalars(self, step: int, values: dict, prefix: str = "") -> None:
        if self.writer is not None:
            for key, value in values.items():
                if isinstance(value, (int, float)):
                    self.writer.add_scalar(prefix + key, value, step)
                elif isinstance(value, dict):
                    self.scalars(step, value, prefix + key + "/")
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

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def write_report(path: str, summary: dict) -> None:
    """report.png: held-out reward per iteration, and each iteration's time split."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    iters = summary["iterations"]
    xs = list(range(len(iters) + 1))
    rewards = [summary["heldout_reward_initial"]] + [it["heldout_reward"] for it in iters]
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
        right.bar(xs[1:], values, bottom=bottom, label=phase)
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
