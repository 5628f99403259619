"""Compare the methods on the embedded task from one SFT checkpoint, seed for seed.

  python benchmarks/compare_methods.py --out bench_out [--seeds 3] [--iterations 10]

Writes OUT/results.json (one row per method, medians over seeds, per-seed values kept),
OUT/results.md (the table) and OUT/reward_vs_seconds.png. Times are the iterations' own
seconds (generation + scoring + reference + exchange + training); held-out evaluation is
a measurement cost common to all methods and is excluded. The target reward is online
DPO's median final held-out reward minus --target-slack, stated in the output.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from nemo_optune.config import load_config  # noqa: E402
from nemo_optune.data.preferences import sort_task_preferences, write_preference_jsonl  # noqa: E402
from nemo_optune.data.task_data import build_task_data  # noqa: E402

OFFLINE = "offline"  # placeholder for the generated JSONL path
METHODS = {  # row name: (recipe, overrides)
    "online_dpo": ("online_dpo", []),
    "optune_rho0.25": ("optune", ["model.optune.rho=0.25"]),
    "optune_rho0.5": ("optune", ["model.optune.rho=0.5"]),
    "optune_rho1.0": ("optune", ["model.optune.rho=1.0"]),
    "random_rho0.5": ("optune_random", ["model.optune.rho=0.5"]),
    "optune_adaptive": ("optune_adaptive", []),
    "optune_rho0.5_unweighted": ("optune", ["model.optune.rho=0.5", "model.optune.weighting=none"]),
    "optune_rho0.5_no_ref_cache": ("optune", ["model.optune.rho=0.5", "model.optune.cache_reference_logprobs=false"]),
    "dpo_offline": ("dpo_offline", [OFFLINE]),
    "hypo": ("hypo", [OFFLINE]),
}
# The OPTune paper's schedule for every row: an iteration regenerates (a share of) the whole
# pool and trains an epoch on it, two rows per pair; the shipped online_dpo/optune recipes step
# per generation round and pack pairs (HyPO cannot pack: the same train step for every row).
PAPER_SCHEDULE = [
    "trainer.prompts_per_iteration=null",
    "trainer.eval_every=1",
    "model.optune.selection_key=chosen",
    "trainer.pack_pairs=false",
]
PHASES = ("generation", "scoring", "reference", "exchange", "training")


def median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def curve(summary: dict) -> list[tuple[float, float]]:
    """(cumulative iteration seconds, held-out reward) of the evaluated iterations, starting at
    (0, SFT reward)."""
    points, t = [(0.0, summary["heldout_reward_initial"])], 0.0
    for it in summary["iterations"]:
        t += it["seconds"]["total"]
        if it["heldout_reward"] is not None:
            points.append((t, it["heldout_reward"]))
    return points


def seconds_to(points, target: float):
    return next((t for t, r in points if r >= target), None)


def run(recipe: str, overrides: list[str], exp_dir: str) -> dict:
    """One run in a fresh process (no state carried between runs), its summary back."""
    launcher = os.path.join(ROOT, "examples", "train_optune.py")
    cmd = [sys.executable, launcher, "--config-name", recipe, f"exp_manager.exp_dir={exp_dir}", *overrides]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stderr[-3000:]}")
    with open(os.path.join(exp_dir, "summary.json")) as f:
        return json.load(f)


def run_all(args) -> dict:
    os.makedirs(args.out, exist_ok=True)
    sft = run("sft_tiny", ["exp_manager.overwrite=true"], os.path.join(args.out, "sft"))
    cfg = load_config("optune")
    prefs = os.path.join(args.out, "offline_prefs.jsonl")
    data = build_task_data(cfg.data)
    write_preference_jsonl(
        prefs, sort_task_preferences(data.task, data.train_prompts, cfg.sft.demonstration_noise, seed=101)
    )
    runs = {name: [] for name in METHODS}
    for seed in range(1, args.seeds + 1):  # methods interleaved, so machine drift hits all alike
        for name, (recipe, extra) in METHODS.items():
            overrides = [("data.offline_path=" + prefs) if o == OFFLINE else o for o in extra] + [
                *PAPER_SCHEDULE,
                f"trainer.seed={seed}",
                f"trainer.iterations={args.iterations}",
                f"model.restore_from_path={sft['checkpoint']}",
                "exp_manager.overwrite=true",
                "exp_manager.resume_if_exists=false",
                "exp_manager.tensorboard=false",
                "exp_manager.report=false",
                "exp_manager.checkpoint_every=0",
            ]
            start = time.perf_counter()
            summary = run(recipe, overrides, os.path.join(args.out, "runs", name, f"seed{seed}"))
            runs[name].append(summary)
            print(
                f"[bench] seed {seed} {name:28s} final {summary['heldout_reward_final']:.4f} "
                f"kl {summary['heldout_kl_final']:.3f} in {time.perf_counter() - start:.1f}s",
                flush=True,
            )
    return {"sft": sft, "runs": runs}


def rho_label(cfg: dict):
    """The configured rho, "adaptive", or None for the offline methods."""
    if cfg["method"] not in ("optune", "online_dpo"):
        return None
    return "adaptive" if cfg["model"]["optune"]["adaptive_rho"]["enabled"] else cfg["model"]["optune"]["rho"]


def summarise(runs: dict, slack: float) -> tuple[list[dict], float]:
    target = median(s["heldout_reward_final"] for s in runs["online_dpo"]) - slack
    online_seconds = median(sum(i["seconds"]["total"] for i in s["iterations"]) for s in runs["online_dpo"])
    rows = []
    for name, summaries in runs.items():
        cfg = summaries[0]["config"]
        train_seconds = [sum(i["seconds"]["total"] for i in s["iterations"]) for s in summaries]
        to_target = [seconds_to(curve(s), target) for s in summaries]
        reached = sum(t is not None for t in to_target)
        stt = median(to_target) if reached * 2 > len(to_target) else None  # a majority of seeds must reach it
        rows.append(
            {
                "method": name,
                "recipe_method": cfg["method"],
                "rho": rho_label(cfg),
                "heldout_reward_initial": median(s["heldout_reward_initial"] for s in summaries),
                "heldout_reward_final": median(s["heldout_reward_final"] for s in summaries),
                "heldout_reward_best": median(max(r for _, r in curve(s)[1:]) for s in summaries),
                "heldout_kl_final": median(s["heldout_kl_final"] for s in summaries),
                "train_seconds": median(train_seconds),
                "wall_seconds": median(s["wall_seconds"] for s in summaries),
                "seconds_to_target": stt,
                "seeds_reaching_target": reached,
                "speedup_to_target_vs_online_dpo": online_seconds / stt if stt else None,
                "responses_generated": median(s["responses_generated"] for s in summaries),
                "seconds_split": {
                    p: median(sum(i["seconds"][p] for i in s["iterations"]) for s in summaries) for p in PHASES
                },
                "per_seed": [
                    {
                        "seed": s["config"]["trainer"]["seed"],
                        "heldout_reward_final": s["heldout_reward_final"],
                        "train_seconds": t,
                        "seconds_to_target": tt,
                        "heldout_kl_final": s["heldout_kl_final"],
                        "curve": curve(s),
                    }
                    for s, t, tt in zip(summaries, train_seconds, to_target)
                ],
            }
        )
    return rows, target


def fmt(v, spec=".3f"):
    return "—" if v is None else format(v, spec)


def markdown(rows: list[dict], target: float, args) -> str:
    lines = [
        f"Embedded sort task, {args.iterations} iterations, medians of {args.seeds} seeds, one SFT checkpoint. "
        f"Target reward = online DPO's median final - {args.target_slack} = **{target:.4f}**. "
        "Seconds = the iterations' own time (held-out evaluation excluded).",
        "",
        "| method | ρ | held-out final | best | rev. KL | train s | s to target (seeds) | speed-up vs online | responses | gen s | ref s | train-step s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        s = r["seconds_split"]
        lines.append(
            f"| {r['method']} | {r['rho'] if isinstance(r['rho'], str) else fmt(r['rho'], '.2f')} | {fmt(r['heldout_reward_final'], '.4f')} | "
            f"{fmt(r['heldout_reward_best'], '.4f')} | {fmt(r['heldout_kl_final'])} | {fmt(r['train_seconds'], '.2f')} | "
            f"{fmt(r['seconds_to_target'], '.2f')} ({r['seeds_reaching_target']}/{args.seeds}) | "
            f"{fmt(r['speedup_to_target_vs_online_dpo'], '.2f')} | {r['responses_generated']:.0f} | "
            f"{s['generation']:.2f} | {s['reference']:.2f} | {s['training']:.2f} |"
        )
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], target: float, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 5.5))
    for r in rows:
        for i, seed in enumerate(r["per_seed"]):
            xs, ys = zip(*seed["curve"])
            ax.plot(
                xs,
                ys,
                marker="." if i else "o",
                alpha=1.0 if i == 0 else 0.35,
                lw=1.5 if i == 0 else 0.8,
                label=r["method"] if i == 0 else None,
                color=f"C{rows.index(r) % 10}",
            )
    ax.axhline(target, color="grey", ls="--", lw=1, label=f"target {target:.3f}")
    ax.set_xlabel("cumulative iteration seconds (held-out eval excluded)")
    ax.set_ylabel("held-out mean reward")
    ax.set_title("held-out reward vs wall-clock (first seed bold, others faint)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--iterations", type=int, default=10)
    parser.add_argument("--target-slack", type=float, default=0.02)
    args = parser.parse_args()
    start = time.perf_counter()
    data = run_all(args)
    rows, target = summarise(data["runs"], args.target_slack)
    result = {
        "target_reward": target,
        "iterations": args.iterations,
        "seeds": args.seeds,
        "sft_seconds": data["sft"]["sft_seconds"],
        "benchmark_seconds": time.perf_counter() - start,
        "methods": rows,
    }
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(result, f, indent=2)
    table = markdown(rows, target, args)
    with open(os.path.join(args.out, "results.md"), "w") as f:
        f.write(table)
    plot(rows, target, os.path.join(args.out, "reward_vs_seconds.png"))
    print(table)


if __name__ == "__main__":
    main()
