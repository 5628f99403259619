"""How stale an OPTune run's reused pairs are: from a training checkpoint, each pool pair's age
(iterations since it was sampled), reward gap and DPO margin under the checkpoint's policy.

    python benchmarks/pool_age.py EXP_DIR [--bins 1,4,8,16,32]

EXP_DIR: a run's directory (its config.json and checkpoints/iter_*). Prints, per age bin, the
pairs, the share valid, the mean reward gap, the mean implicit-reward margin
beta * Delta and the mean DPO gradient scale sigma(-beta * Delta) of the valid pairs (how much
a pair still moves the policy: near 0 once the policy separates it).
"""

import argparse
import json
import os
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("exp_dir")
    parser.add_argument("--bins", default="1,4,8,16,32", help="upper edges of the age bins (the last is open)")
    args = parser.parse_args()
    from nemo_optune.runtime.checkpoint import checkpoints_root, list_checkpoints

    checkpoints = list_checkpoints(checkpoints_root(args.exp_dir))
    if not checkpoints:
        raise SystemExit(f"error: {args.exp_dir}: no checkpoints/iter_* there")

    import torch

    from nemo_optune import algorithms as alg
    from nemo_optune.trainers.preference_loss import pair_sequences

    from generation import recipe_trainer  # isort: skip

    with open(os.path.join(args.exp_dir, "config.json")) as f:
        saved = json.load(f)
    with tempfile.TemporaryDirectory() as tmp:
        model = f"model.restore_from_path={saved['model']['restore_from_path']}"
        cfg, trainer = recipe_trainer(saved["method"], [model], None, tmp)  # the recipe of that name
        trainer.resume(checkpoints[-1])
    store, pool = trainer.pool.store, trainer.pool
    n = len(store)
    tokens, mask = pair_sequences(pool.prompt_ids, store.rows(torch.arange(n)), pool.width, trainer.tokenizer.pad_id)
    logps = trainer.model.sequence_logprobs("policy", tokens, mask, cfg.generation.micro_batch_size)
    beta = cfg.model.optune.beta
    margin = beta * alg.dpo_margin(logps[:n], logps[n:], store.ref_chosen_logps, store.ref_rejected_logps)
    age = len(trainer.history) - 1 - store.refreshed_at
    gap = store.chosen_rewards - store.rejected_rewards
    edges = [0] + [int(b) for b in args.bins.split(",")] + [10**9]
    print(f"{checkpoints[-1]}: {len(trainer.history)} iterations, {n} pairs, {int(store.valid.sum())} valid")
    print("age       pairs  valid  gap    beta*margin  sigma(-beta*margin)")
    for lo, hi in zip(edges, edges[1:]):
        inside = (age >= lo) & (age < hi)
        valid = inside & store.valid
        if not inside.any():
            continue
        m = margin[valid]
        print(
            f"[{lo:3d},{hi if hi < 10**9 else 'inf':>4}) {int(inside.sum()):5d}  {float(valid.sum() / inside.sum()):.2f}  "
            f"{float(gap[valid].mean()) if valid.any() else float('nan'):.3f}  {float(m.mean()) if valid.any() else float('nan'):10.2f}  "
            f"{float(torch.sigmoid(-m).mean()) if valid.any() else float('nan'):.3f}"
        )


if __name__ == "__main__":
    main()
