"""Write the verifiable-instructions task's prompts (data/instructions.py) as chat-message JSONL
files, DIR/train.jsonl and DIR/heldout.jsonl, drawn as data.task=instructions draws them."""

import argparse
import json
import os

from nemo_optune.config import DataConfig
from nemo_optune.data.instructions import INSTRUCTIONS
from nemo_optune.data.task_data import build_task_data


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m nemo_optune.data.make_instruction_prompts", description=__doc__)
    p.add_argument("--out", required=True, help="directory for train.jsonl and heldout.jsonl")
    p.add_argument("--train", type=int, default=256)
    p.add_argument("--heldout", type=int, default=64)
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--kinds", nargs="*", default=[], choices=list(INSTRUCTIONS), help="default: all")
    args = p.parse_args(argv)
    data = build_task_data(
        DataConfig(
            task="instructions",
            num_train_prompts=args.train,
            num_heldout_prompts=args.heldout,
            seed=args.seed,
            instructions=args.kinds,
        )
    )
    os.makedirs(args.out, exist_ok=True)
    for name, prompts in (("train", data.train_prompts), ("heldout", data.heldout_prompts)):
        with open(os.path.join(args.out, f"{name}.jsonl"), "w") as f:
            f.writelines(json.dumps({"messages": list(prompt)}) + "\n" for prompt in prompts)
    print(args.out)


if __name__ == "__main__":
    main()
