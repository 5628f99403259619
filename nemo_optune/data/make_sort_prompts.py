"""Write the sort task's prompts with their answers in a `reference` column, as a user's data set
would bring them (docs/data_sources.md): DIR/train/train-0000i-of-0000n.{parquet,jsonl} shards and
DIR/heldout.{parquet,jsonl}, drawn as data.task=sort draws them (the same prompts, in order)."""

import argparse
import os

from nemo_optune.config import DataConfig
from nemo_optune.data.records import write_records
from nemo_optune.data.sort_task import reference_rows
from nemo_optune.data.task_data import build_task_data


def write_sort_prompts(out: str, data_cfg: DataConfig, shards: int = 1, suffix: str = "parquet") -> list[str]:
    """The files written: the training shards, then the held-out file."""
    data = build_task_data(data_cfg)
    os.makedirs(os.path.join(out, "train"), exist_ok=True)
    train = reference_rows(data.train_prompts)
    per_shard = -(-len(train) // shards)
    paths = []
    for i in range(shards):
        paths.append(os.path.join(out, "train", f"train-{i:05d}-of-{shards:05d}.{suffix}"))
        write_records(paths[-1], train[i * per_shard : (i + 1) * per_shard])
    paths.append(os.path.join(out, f"heldout.{suffix}"))
    write_records(paths[-1], reference_rows(data.heldout_prompts))
    return paths


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m nemo_optune.data.make_sort_prompts", description=__doc__)
    p.add_argument("--out", required=True, help="directory for train/ (the shards) and the held-out file")
    p.add_argument("--train", type=int, default=256)
    p.add_argument("--heldout", type=int, default=512)
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--shards", type=int, default=1)
    p.add_argument("--format", choices=("parquet", "jsonl"), default="parquet")
    args = p.parse_args(argv)
    cfg = DataConfig(num_train_prompts=args.train, num_heldout_prompts=args.heldout, seed=args.seed)
    for path in write_sort_prompts(args.out, cfg, args.shards, args.format):
        print(path)


if __name__ == "__main__":
    main()
