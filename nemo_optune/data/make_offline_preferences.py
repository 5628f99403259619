"""Write an offline preference JSONL for the embedded sort task (NeMo-Aligner format).

  python -m nemo_optune.data.make_offline_preferences --out prefs.jsonl [--config-name optune_tiny]

Prompts are the recipe's training prompts, so offline and online methods see the same ones."""

import argparse

from nemo_optune.config import load_config
from nemo_optune.data.preferences import sort_task_preferences, write_preference_jsonl
from nemo_optune.data.task_data import build_task_data


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--config-name", default="optune_tiny")
    parser.add_argument("--noise", type=float, default=None, help="default: the recipe's sft.demonstration_noise")
    parser.add_argument("--seed", type=int, default=101)
    parser.add_argument("overrides", nargs="*", help="config overrides, e.g. data.num_train_prompts=128")
    args = parser.parse_args(argv)
    cfg = load_config(args.config_name, args.overrides)
    data = build_task_data(cfg.data)
    noise = cfg.sft.demonstration_noise if args.noise is None else args.noise
    records = sort_task_preferences(data.task, data.train_prompts, noise, args.seed)
    write_preference_jsonl(args.out, records)
    print(f"wrote {len(records)} preference pairs to {args.out}")


if __name__ == "__main__":
    main()
