"""Held-out reward before and after training over several runs (seeds) of one recipe: a table,
the mean rise and the seed spread, from each experiment directory's summary.json.

    python scripts/seed_spread.py runs/demo_real_s1 runs/demo_real_s2 runs/demo_real_s3 [--json OUT]

The spread is max - min over the seeds (of the final held-out reward); the rise counts as shown
when the mean rise is larger than that spread."""

import argparse
import json
import os
import statistics
import sys


def read(exp_dir: str) -> dict:
    path = os.path.join(exp_dir, "summary.json")
    try:
        with open(path) as f:
            summary = json.load(f)
        start, end = summary["heldout_reward_initial"], summary["iterations"][-1]["heldout_reward"]
    except (OSError, ValueError, KeyError, IndexError) as err:
        sys.exit(f"error: {path}: not a finished preference run's summary ({type(err).__name__}: {err})")
    return {
        "exp_dir": exp_dir,
        "seed": summary["config"]["trainer"]["seed"],
        "start": start,
        "end": end,
        "rise": end - start,
        "seconds": summary.get("wall_seconds"),
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("exp_dirs", nargs="+")
    parser.add_argument("--json", help="also write the figures here")
    args = parser.parse_args(argv)
    runs = [read(d) for d in args.exp_dirs]
    print(f"{'seed':>6} {'start':>7} {'end':>7} {'rise':>7} {'seconds':>8}  exp_dir")
    for r in runs:
        seconds = f"{r['seconds']:.0f}" if r["seconds"] is not None else "-"
        print(f"{r['seed']:>6} {r['start']:7.4f} {r['end']:7.4f} {r['rise']:+7.4f} {seconds:>8}  {r['exp_dir']}")
    ends = [r["end"] for r in runs]
    result = {
        "runs": runs,
        "mean_start": statistics.fmean(r["start"] for r in runs),
        "mean_end": statistics.fmean(ends),
        "mean_rise": statistics.fmean(r["rise"] for r in runs),
        "end_spread": max(ends) - min(ends),
    }
    result["rise_exceeds_spread"] = result["mean_rise"] > result["end_spread"]
    print(
        f"mean {result['mean_start']:.4f} -> {result['mean_end']:.4f}: rise {result['mean_rise']:+.4f}, "
        f"seed spread of the end {result['end_spread']:.4f} ({len(runs)} seeds): "
        f"{'rise > spread' if result['rise_exceeds_spread'] else 'rise NOT above the spread'}"
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
