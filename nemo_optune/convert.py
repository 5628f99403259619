"""Hugging Face checkpoints <-> nemo_optune model checkpoints (megatron dist-checkpointing).

    python -m nemo_optune.convert --to megatron --hf HF_DIR --out CKPT [--tp N] [--pp N]
    python -m nemo_optune.convert --to hf --checkpoint CKPT --out HF_DIR [--tokenizer DIR] [--tp N] [--pp N]

Runs under torchrun for TP/PP > 1 (world size divisible by TP*PP). The model checkpoint's
manifest stores the model spec, which `--to hf` reads back. Bad input: one line, exit code 2.
"""

import argparse
import sys

from nemo_optune.models.hf_io import build_hf_model, export_hf, import_hf, read_hf_spec
from nemo_optune.models.hf_spec import spec_from_architecture
from nemo_optune.runtime import distributed
from nemo_optune.runtime.checkpoint import CheckpointError, load_model, read_manifest, save_model


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m nemo_optune.convert", description=__doc__.split("\n\n")[0])
    p.add_argument("--to", choices=("megatron", "hf"), required=True)
    p.add_argument("--hf", help="Hugging Face checkpoint directory to import (--to megatron)")
    p.add_argument("--checkpoint", help="model or training checkpoint to export (--to hf)")
    p.add_argument("--out", required=True)
    p.add_argument("--tokenizer", help="copy the tokenizer files of this directory (--to hf)")
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--pp", type=int, default=1)
    return p


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    source = args.hf if args.to == "megatron" else args.checkpoint
    if source is None:
        _parser().error(f"--to {args.to} needs --{'hf' if args.to == 'megatron' else 'checkpoint'}")
    try:
        # The spec first: a missing or unsupported model fails before any process group.
        spec = read_hf_spec(args.hf) if args.to == "megatron" else spec_from_architecture(
            read_manifest(args.checkpoint)["architecture"], args.checkpoint)
        from nemo_optune.trainers.common import quiet_megatron_warnings

        quiet_megatron_warnings()
        _, _, world = distributed.world_from_env()
        if world % (args.tp * args.pp):
            raise ValueError(f"world size {world} is not divisible by TP*PP = {args.tp}*{args.pp}")
        model = build_hf_model(spec, distributed.initialize(args.tp, args.pp, seed=0))
        if args.to == "megatron":
            import_hf(args.hf, model)
            save_model(args.out, model)
        else:
            load_model(args.checkpoint, model, from_training=True)  # an SFT/converted or a training checkpoint
            export_hf(model, args.out, args.tokenizer)
    except (ValueError, CheckpointError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    try:
        code = main()
    finally:
        distributed.shutdown()
    sys.exit(code)
