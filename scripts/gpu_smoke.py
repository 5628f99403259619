"""The first thing to run on a GPU machine (make gpu-smoke): 2 OPTune iterations of a Hugging
Face model in bf16 with megatron's DDP and distributed optimizer (TransformerEngine layers when
installed), at TP1, then TP2 and DP2 when the machine has 2 GPUs, with the in-process engine and,
when installed, vLLM. Prints one table and exits 1 if any run failed (2: bad arguments).

    python scripts/gpu_smoke.py [HF_DIR] [--out DIR]     # default HF_DIR: make demo-real's model
    python scripts/gpu_smoke.py --cpu                      # the CPU dry mode: the built-in tiny
                                                           # model at TP1, fp32, same table

Each run is its own process (torchrun for 2 ranks), reading its figures from the run's
summary.json: s/iteration (the iteration's timed phases), generation tokens/s (rank 0's response
tokens over its generation seconds), peak GPU memory (rank 0), refit seconds (external engines;
the in-process engine has none), held-out reward after the last iteration. docs/gpu.md.
"""

import argparse
import dataclasses
import importlib.util
import json
import os
import shutil
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_MODEL = os.path.join("runs", "models", "smollm2-135m-instruct")  # make demo-real's
COMMON = [
    "trainer.iterations=2",
    "data.num_train_prompts=64",
    "data.num_heldout_prompts=32",
    "trainer.global_batch_size=16",
    "trainer.micro_batch_size=4",
    "generation.micro_batch_size=32",
    "exp_manager.tensorboard=false",
    "exp_manager.report=false",
    "trainer.progress_bar=false",
]
GPU = ["model.precision=bf16", "model.distributed_optimizer=true"]
# The CPU dry mode: the built-in model with a short SFT warm start, fp32 (megatron's optimizer
# needs CUDA: the CPU optimizer runs instead).
CPU = ["sft.steps=10", "sft.num_demonstrations=128"]


@dataclasses.dataclass
class Run:
    name: str
    ranks: int
    tp: int
    engine: str

    def command(self, out: str, model: str | None, cpu: bool) -> list[str]:
        launcher = [sys.executable]
        if self.ranks > 1:
            launcher += ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={self.ranks}"]
        overrides = [
            *COMMON,
            *(CPU if cpu else GPU),
            f"model.tensor_model_parallel_size={self.tp}",
            f"generation.engine={self.engine}",
            f"exp_manager.exp_dir={self.exp_dir(out)}",
        ]
        if model is not None:
            overrides.append(f"model.restore_from_path={model}")
        return [
            *launcher,
            os.path.join(ROOT, "examples", "train_optune.py"),
            "--config-name",
            "optune_tiny",
            *overrides,
        ]

    def exp_dir(self, out: str) -> str:
        return os.path.join(out, self.name)


def plan(gpus: int, has_vllm: bool, cpu: bool, heads: tuple[int, int] = (2, 2)) -> tuple[list[Run], list[str]]:
    """(runs, skipped with why); heads: the model's (attention, key-value) heads, which TP splits."""
    if cpu:
        return [Run("tp1-megatron", 1, 1, "megatron")], ["tp2, dp2, vllm: GPU only"]
    runs, skipped = [Run("tp1-megatron", 1, 1, "megatron")], []
    if gpus < 2:
        skipped.append(f"tp2, dp2: {gpus} GPU(s), 2 needed")
    elif any(h % 2 for h in heads):
        runs.append(Run("dp2-megatron", 2, 1, "megatron"))
        skipped.append(f"tp2: the model's {heads[0]} attention / {heads[1]} key-value heads do not split in 2")
    else:
        runs += [Run("tp2-megatron", 2, 2, "megatron"), Run("dp2-megatron", 2, 1, "megatron")]
    if has_vllm:
        runs.append(Run("tp1-vllm", 1, 1, "vllm"))
    else:
        skipped.append("vllm: not installed")
    return runs, skipped


def figures(summary: dict) -> dict:
    """The table's row from a run's summary.json."""
    iterations = summary["iterations"]
    generation = sum(r["seconds"]["generation"] for r in iterations)
    refit = [r["timing/refit_seconds"] for r in iterations if "timing/refit_seconds" in r]
    return {
        "s/iteration": sum(r["seconds"]["total"] for r in iterations) / len(iterations),
        "gen tokens/s": sum(r["generated_tokens"] for r in iterations) / generation if generation else None,
        "peak GPU MiB": summary.get("peak_gpu_memory_mb"),
        "refit s": sum(refit) / len(refit) if refit else None,
        "held-out reward": summary["heldout_reward_final"],
    }


COLUMNS = ("s/iteration", "gen tokens/s", "peak GPU MiB", "refit s", "held-out reward")


def table(rows: list[tuple[str, dict | None, str]]) -> str:
    """One line per run: its figures, or '-' where there is none, and its status."""
    head = f"{'run':<14}" + "".join(f"{c:>17}" for c in COLUMNS) + "  status"
    lines = [head, "-" * len(head)]
    for name, values, status in rows:
        cells = "".join(
            f"{'-' if values is None or values[c] is None else format(values[c], '.3f'):>17}" for c in COLUMNS
        )
        lines.append(f"{name:<14}{cells}  {status}")
    return "\n".join(lines)


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("model", nargs="?", default=None, help=f"a Hugging Face model directory (default {DEFAULT_MODEL})")
    p.add_argument(
        "--out", default=os.path.join("runs", "gpu_smoke"), help="where the runs write (default %(default)s)"
    )
    p.add_argument("--cpu", action="store_true", help="the CPU dry mode: the built-in tiny model at TP1, fp32")
    args = p.parse_args(argv)
    if args.cpu and args.model is not None:
        p.error("--cpu runs the built-in tiny model: give no model directory")
    if not args.cpu:
        args.model = os.path.abspath(args.model or DEFAULT_MODEL)
        if not os.path.isfile(os.path.join(args.model, "config.json")):
            p.error(
                f"{args.model} has no config.json (a Hugging Face model directory; make demo-real prepares the default)"
            )
    return args


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    import torch

    gpus = torch.cuda.device_count()
    if not args.cpu and gpus == 0:
        print("error: no CUDA device (the CPU dry mode: --cpu)", file=sys.stderr)
        return 2
    heads = (2, 2)
    if not args.cpu:
        config = json.load(open(os.path.join(args.model, "config.json")))
        heads = (config["num_attention_heads"], config.get("num_key_value_heads", config["num_attention_heads"]))
    runs, skipped = plan(gpus, importlib.util.find_spec("vllm") is not None, args.cpu, heads)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")]))}
    rows = []
    for run in runs:
        shutil.rmtree(run.exp_dir(args.out), ignore_errors=True)  # a fresh run, not a resumed one
        print(f"[gpu-smoke] {run.name}: {' '.join(run.command(args.out, args.model, args.cpu))}", flush=True)
        done = subprocess.run(run.command(args.out, args.model, args.cpu), cwd=ROOT, env=env)
        summary_path = os.path.join(run.exp_dir(args.out), "summary.json")
        if done.returncode != 0 or not os.path.isfile(summary_path):
            rows.append((run.name, None, f"FAILED (exit status {done.returncode})"))
            continue
        rows.append((run.name, figures(json.load(open(summary_path))), "ok"))
    print(table(rows))
    for why in skipped:
        print(f"skipped: {why}")
    return 0 if all(status == "ok" for _, _, status in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
