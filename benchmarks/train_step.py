"""Train-step time by micro-batching: equal micro-batches in batch order (trainer.micro_batch_size)
against micro-batches by padded tokens (trainer.micro_batch_tokens) and packed pairs
(trainer.pack_pairs), on pairs of variable length.

    .venv/bin/python benchmarks/train_step.py [--model llama20m|tiny] [--max-new 256] [--prompt-tokens P]
                                              [--repeats 5]

A random-weight policy (the ~20M Llama of benchmarks/generation.py, or the recipe's tiny one),
one global batch of 64 pairs with random responses whose lengths are uniform in
[max_new / 16, max_new], on the embedded task's prompts or (--prompt-tokens P) random prompts
of lengths uniform in [P / 2, P]. Real tokens: both rows' prompt and response tokens. Per strategy: forward + backward + optimizer
step of the whole batch, the strategies' calls interleaved (best of --repeats rounds). Prints a
JSON line per strategy and a table: micro-batches, padded and real tokens, seconds per step.
"""

import argparse
import json
import os
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from generation import LLAMA_20M, best_seconds, random_policy_case  # noqa: E402

# name: (trainer.micro_batch_size, trainer.micro_batch_tokens, trainer.pack_pairs)
STRATEGIES = {
    "pairs_64": (64, None, False),
    "pairs_16": (16, None, False),
    "pairs_8": (8, None, False),
    "tokens_8k": (64, 8192, False),
    "tokens_16k": (64, 16384, False),
    "packed_8": (8, None, True),
    "packed_tokens_8k": (64, 8192, True),
}


def fill_pool(trainer, batch, max_new: int, prompt_tokens: int | None, seed: int) -> None:
    """Random chosen/rejected responses of random lengths for the pool entries in `batch` (and
    random prompts of random lengths, with prompt_tokens)."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    store, vocab = trainer.pool.store, trainer.tokenizer.vocab_size
    n = len(batch)
    if prompt_tokens:
        for i in batch.tolist():
            length = int(torch.randint(max(1, prompt_tokens // 2), prompt_tokens + 1, (1,), generator=gen))
            trainer.pool.prompt_ids[i] = torch.randint(0, vocab, (length,), generator=gen).tolist()
        trainer.width = prompt_tokens + max_new
    for name in ("chosen", "rejected"):
        lengths = torch.randint(max(1, max_new // 16), max_new + 1, (n,), generator=gen)
        tokens = torch.randint(0, vocab, (n, store.chosen_tokens.shape[1]), generator=gen)
        getattr(store, f"{name}_tokens")[batch] = tokens
        getattr(store, f"{name}_lengths")[batch] = lengths
    store.chosen_rewards[batch], store.rejected_rewards[batch] = 1.0, 0.0
    store.valid[batch] = True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=["llama20m", "tiny"], default="llama20m")
    parser.add_argument("--max-new", type=int, default=256)
    parser.add_argument("--prompt-tokens", type=int, default=None, help="random prompts of up to this many tokens")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    import torch

    from nemo_optune.runtime import distributed

    overrides = (LLAMA_20M if args.model == "llama20m" else []) + ["model.optune.weighting=none"]
    try:
        with tempfile.TemporaryDirectory() as tmp:
            cfg, trainer, model, _, _ = random_policy_case(overrides, 1, args.max_new, tmp)
            trainer.model = model  # the random-weight policy (the trainer's own is built empty)
            batch = torch.arange(cfg.trainer.global_batch_size)
            fill_pool(trainer, batch, args.max_new, args.prompt_tokens, seed=0)
            real = int(
                sum(2 * len(trainer.pool.prompt_ids[i]) for i in batch.tolist())
                + trainer.pool.store.chosen_lengths[batch].sum()
                + trainer.pool.store.rejected_lengths[batch].sum()
            )
            results, timed = {}, {}
            for name, (pairs, tokens, pack) in STRATEGIES.items():

                def step(pairs=pairs, tokens=tokens, pack=pack):
                    t = cfg.trainer
                    t.micro_batch_size, t.micro_batch_tokens, t.pack_pairs = pairs, tokens, pack
                    micro_batches, _ = trainer.micro_batches(batch)
                    model.train_step(micro_batches, trainer.loss_fn)
                    return micro_batches

                micro_batches = step()
                padded = sum(mb["tokens"].numel() for mb in model._trim_padding(micro_batches))
                results[name] = {
                    "strategy": name,
                    "model": args.model,
                    "max_new": args.max_new,
                    "prompt_tokens": args.prompt_tokens,
                    "micro_batch_size": pairs,
                    "micro_batch_tokens": tokens,
                    "pack_pairs": pack,
                    "micro_batches": len(micro_batches),
                    "padded_tokens": padded,
                    "real_tokens": real,
                }
                timed[name] = step
            for name, seconds in best_seconds(timed, args.repeats).items():
                results[name]["seconds_per_step"] = seconds
                print(json.dumps(results[name]), flush=True)
    finally:
        distributed.shutdown()
    base = results["pairs_64"]["seconds_per_step"]
    print(
        f"\n{'strategy':<18}{'micro-batches':>14}{'padded tokens':>15}{'real tokens':>13}{'s/step':>9}{'vs pairs_64':>13}"
    )
    for r in results.values():
        print(
            f"{r['strategy']:<18}{r['micro_batches']:>14}{r['padded_tokens']:>15}{r['real_tokens']:>13}"
            f"{r['seconds_per_step']:>9.3f}{base / r['seconds_per_step']:>12.2f}x"
        )


if __name__ == "__main__":
    main()
