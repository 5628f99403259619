"""Per-iteration wall time of OPTune under TP1, TP2, PP2 and DP2 on this machine.

  python benchmarks/layout_timing.py --out bench_layouts [--iterations 4]

Each layout runs from the same SFT checkpoint with torchrun; prints a Markdown table of the
median iteration time (iteration 1, which fills the whole pool, reported separately) and its
split. No speed claims: on 2 CPU cores, more processes only add communication."""

import argparse
import json
import os
import statistics
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAYOUTS = {  # name: (processes, overrides)
    "TP1": (1, []),
    "TP2": (2, ["model.tensor_model_parallel_size=2"]),
    "PP2": (2, ["model.pipeline_model_parallel_size=2"]),
    "DP2": (2, []),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--iterations", type=int, default=4)
    args = parser.parse_args()
    launcher = os.path.join(ROOT, "examples", "train_optune.py")
    sft_dir = os.path.join(args.out, "sft")
    subprocess.run(
        [
            sys.executable,
            launcher,
            "--config-name",
            "sft_tiny",
            f"exp_manager.exp_dir={sft_dir}",
            "exp_manager.overwrite=true",
        ],
        check=True,
        capture_output=True,
        cwd=ROOT,
    )
    rows = []
    for name, (procs, overrides) in LAYOUTS.items():
        exp = os.path.join(args.out, name)
        env = {**os.environ, "OMP_NUM_THREADS": str(max(1, 2 // procs))}  # 2 cores in all
        subprocess.run(
            [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--standalone",
                f"--nproc_per_node={procs}",
                launcher,
                "--config-name",
                "optune",
                f"exp_manager.exp_dir={exp}",
                f"model.restore_from_path={sft_dir}/sft_checkpoint",
                f"trainer.iterations={args.iterations}",
                "exp_manager.overwrite=true",
                "exp_manager.resume_if_exists=false",
                *overrides,
            ],
            check=True,
            capture_output=True,
            cwd=ROOT,
            env=env,
        )
        with open(os.path.join(exp, "summary.json")) as f:
            summary = json.load(f)
        later = summary["iterations"][1:]
        rows.append(
            {
                "layout": name,
                "processes": procs,
                **summary["layout"],
                "first_iteration_s": summary["iterations"][0]["seconds"]["total"],
                **{
                    f"{k}_s": statistics.median(i["seconds"][k] for i in later)
                    for k in ("total", "generation", "reference", "exchange", "training")
                },
                "heldout_reward_final": summary["heldout_reward_final"],
            }
        )
    with open(os.path.join(args.out, "layouts.json"), "w") as f:
        json.dump(rows, f, indent=2)
    print(
        "| layout | procs | iteration 1 s (full pool) | later iterations s (median) | generation | reference | exchange | training | final held-out |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['layout']} | {r['processes']} | {r['first_iteration_s']:.2f} | {r['total_s']:.2f} | {r['generation_s']:.2f} | "
            f"{r['reference_s']:.2f} | {r['exchange_s']:.3f} | {r['training_s']:.2f} | {r['heldout_reward_final']:.4f} |"
        )


if __name__ == "__main__":
    main()
