"""One demo_real iteration's log-prob passes at a real vocabulary, this tree against another revision.

    python benchmarks/logprob_positions.py --baseline-root DIR [--model runs/models/smollm2-135m-instruct]
                                           [--rounds 2] [--repeats 2]

DIR holds another revision's `nemo_optune` and `conf` (e.g. `git archive REV nemo_optune conf | tar -x -C DIR`).
Each round runs one worker process per tree (baseline first, then this one), so a slow spell of a
shared machine hits both alike. A worker builds the `demo_real` trainer on the model (its real
prompts; responses random tokens of generation.max_new_tokens), then times, best of --repeats
after a warm-up: the reference log-probs of one iteration's window (2 x 16 sequences) and one
training step on it (forward + backward + optimizer step, the recipe's micro-batches). Prints a
JSON line per worker and the median ratio baseline / this tree.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def worker(model_dir: str, repeats: int) -> dict:
    import torch

    # nemo_optune first: the helpers below put this tree on sys.path, the worker's tree is PYTHONPATH's.
    import nemo_optune

    from generation import best_seconds, recipe_trainer  # isort: skip
    from train_step import fill_pool  # isort: skip

    with tempfile.TemporaryDirectory() as tmp:
        cfg, trainer = recipe_trainer("demo_real", [f"model.restore_from_path={model_dir}"], None, tmp)
        trainer.model.load_policy(model_dir)
        trainer.model.sync_reference_to_policy()
        batch = torch.arange(cfg.trainer.global_batch_size)
        fill_pool(trainer, batch, cfg.generation.max_new_tokens, None, seed=0)
        pool = trainer.pool
        prompts = [pool.prompt_ids[i] for i in batch.tolist()]
        rows = pool.store.rows(batch)
        seconds = best_seconds(
            {
                "reference": lambda: pool.reference_logprobs(prompts, rows),
                "train_step": lambda: trainer.model.train_step(trainer.micro_batches(batch)[0], trainer.loss_fn),
            },
            repeats,
        )
    prompt_tokens = sum(map(len, prompts))
    response_tokens = int(rows["chosen_lengths"].sum() + rows["rejected_lengths"].sum())
    return {
        "package": os.path.dirname(nemo_optune.__file__),
        "seconds": seconds,
        "vocab": trainer.model.vocab_size,
        "layers": trainer.model.spec.num_layers,
        "prompt_tokens_per_row": prompt_tokens / len(prompts),
        "response_tokens_per_row": response_tokens / (2 * len(prompts)),
        "torch_threads": torch.get_num_threads(),
    }


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        print(json.dumps(worker(sys.argv[2], int(sys.argv[3]))), flush=True)
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline-root", required=True)
    parser.add_argument("--model", default=os.path.join(ROOT, "runs", "models", "smollm2-135m-instruct"))
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    if not os.path.isdir(os.path.join(args.baseline_root, "nemo_optune")):
        raise SystemExit(f"error: --baseline-root {args.baseline_root}: no nemo_optune package there")
    if not os.path.isdir(args.model):
        raise SystemExit(f"error: --model {args.model}: not a directory")
    results: dict[str, list[dict]] = {"baseline": [], "this": []}
    for _ in range(args.rounds):
        for name, root in (("baseline", os.path.abspath(args.baseline_root)), ("this", ROOT)):
            env = {**os.environ, "PYTHONPATH": root}
            cmd = [
                sys.executable,
                os.path.abspath(__file__),
                "--worker",
                os.path.abspath(args.model),
                str(args.repeats),
            ]
            done = subprocess.run(cmd, capture_output=True, text=True, cwd=root, env=env, check=False)
            if done.returncode != 0:
                raise SystemExit(f"error: the {name} worker failed:\n{done.stderr[-3000:]}")
            results[name].append(json.loads(done.stdout.strip().splitlines()[-1]))
            print(json.dumps({"tree": name, **results[name][-1]}), flush=True)
    for phase in results["this"][0]["seconds"]:
        before = statistics.median(r["seconds"][phase] for r in results["baseline"])
        after = statistics.median(r["seconds"][phase] for r in results["this"])
        print(f"{phase:12s} baseline {before:7.3f}s  this tree {after:7.3f}s  ratio {before / after:.2f}x", flush=True)


if __name__ == "__main__":
    main()
