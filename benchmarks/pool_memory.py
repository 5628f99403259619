"""Per-rank prompt-pool memory of a real tiny OPTune run at DP1, DP2 and DP4 (spawned gloo
ranks, tests/parallel_harness.py), against the dry run's estimate (docs/pool.md).

  PYTHONPATH=$PWD python benchmarks/pool_memory.py

Prints rank 0's pool bytes (the largest block), the estimate and the iteration's loss, which
must not change with DP."""

import os
import sys
import tempfile

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))

from conftest import TINY  # noqa: E402
from parallel_harness import run_layout  # noqa: E402

from nemo_optune.data.pool import pool_bytes_per_rank  # noqa: E402

if __name__ == "__main__":
    root = tempfile.mkdtemp()
    base = TINY + ["sft.steps=2", "trainer.iterations=1", "generation.max_new_tokens=32"]
    for dp in (1, 2, 4):
        out = run_layout(dp, base + [f"exp_manager.exp_dir={root}/dp{dp}"], f"{root}/dp{dp}.pt")
        n, r = out["pool"]["chosen_tokens"].shape
        print(
            f"DP{dp}: rank 0 keeps {out['pool_bytes']} pool bytes (estimate {pool_bytes_per_rank(n, r, dp)}) "
            f"of {n} prompts x {r} tokens; loss {out['summary']['iterations'][0]['train_loss']:.6f}",
            flush=True,
        )
