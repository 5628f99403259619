"""Hugging Face or NeMo 2 checkpoints <-> nemo_optune model checkpoints (megatron dist-checkpointing).

    python -m nemo_optune.convert --to megatron --from HF_OR_NEMO2_DIR --out CKPT [--tp N] [--pp N]
    python -m nemo_optune.convert --to hf --checkpoint CKPT --out HF_DIR [--tokenizer DIR] [--tp N] [--pp N]
    python -m nemo_optune.convert --to hf --from FILE.gguf --out HF_DIR   # a GGUF Llama-family file
    python -m nemo_optune.convert --to hf --from smollm2-135m-instruct --out HF_DIR  # packaged (the `real` extra)

Runs under torchrun for TP/PP > 1 (world size divisible by TP*PP). The model checkpoint's
manifest stores the model spec and its tokenizer/ the tokenizer, which `--to hf` writes back
(--tokenizer: another directory's tokenizer files instead). A GGUF file is dequantized to an
fp32 Hugging Face directory with its tokenizer and chat template (models/gguf_io.py). Bad input:
one line, exit code 2.
"""

import argparse
import os
import sys

from nemo_optune.runtime.quiet import quiet_megatron_warnings


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m nemo_optune.convert",
        description=__doc__,
        formatter_class=lambda prog: argparse.RawDescriptionHelpFormatter(prog, max_help_position=32),
    )
    p.add_argument("--to", choices=("megatron", "hf"), required=True, help="the output's format")
    p.add_argument(
        "--from",
        "--hf",
        dest="source",
        help="Hugging Face or NeMo 2 directory to import (--to megatron); a .gguf file or a packaged model's "
        "name to convert (--to hf)",
    )
    p.add_argument("--checkpoint", help="model or training checkpoint to export (--to hf)")
    p.add_argument("--out", required=True, help="the directory to write")
    p.add_argument("--tokenizer", help="write the tokenizer files of this directory, not the checkpoint's (--to hf)")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel size to build the model at (default: 1)")
    p.add_argument("--pp", type=int, default=1, help="pipeline-parallel size to build the model at (default: 1)")
    return p


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    from_gguf = args.to == "hf" and args.source is not None
    source = args.source if args.to == "megatron" or from_gguf else args.checkpoint
    if source is None:
        _parser().error(f"--to {args.to} needs --{'from' if args.to == 'megatron' else 'checkpoint'}")
    quiet_megatron_warnings()  # before anything imports megatron
    from nemo_optune.models import sources
    from nemo_optune.models.gguf_io import PACKAGED, gguf_to_hf, resolve_gguf
    from nemo_optune.models.gpt_optune import inference_model
    from nemo_optune.models.hf_io import export_hf
    from nemo_optune.runtime import distributed
    from nemo_optune.runtime.checkpoint import TOKENIZER_DIR, CheckpointError, load_model, save_model

    try:
        if from_gguf:
            gguf = resolve_gguf(source)
            if gguf is None:
                raise ValueError(
                    f"--from {source}: --to hf converts a .gguf file or a packaged model ({', '.join(PACKAGED)}); "
                    "a checkpoint to export is given with --checkpoint"
                )
            gguf_to_hf(gguf, args.out)
            return 0
        # The spec first: a missing or unsupported model fails before any process group.
        if args.to == "megatron":
            if sources.source_kind(source, "--from") == "checkpoint":
                raise ValueError(f"--from {source}: already a nemo_optune checkpoint")
            spec, tokenizer = sources.model_and_tokenizer(source)
        else:
            spec, tokenizer = sources.checkpoint_spec(source), None
        _, _, world = distributed.world_from_env()
        if world % (args.tp * args.pp):
            raise ValueError(f"world size {world} is not divisible by TP*PP = {args.tp}*{args.pp}")
        model = inference_model(spec, distributed.initialize(args.tp, args.pp, seed=0), tokenizer=tokenizer)
        if args.to == "megatron":
            sources.load_weights(source, model)
            save_model(args.out, model)
        else:
            load_model(source, model, from_training=True)  # an SFT/converted or a training checkpoint
            tokenizer_dir = args.tokenizer or os.path.join(source, TOKENIZER_DIR)
            export_hf(model, args.out, tokenizer_dir if args.tokenizer or os.path.isdir(tokenizer_dir) else None)
    except (ValueError, CheckpointError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


def console() -> None:
    """python -m nemo_optune.convert, optune-convert."""
    try:
        code = main()
    finally:
        if "nemo_optune.runtime.distributed" in sys.modules:  # not after --help or an argument error
            sys.modules["nemo_optune.runtime.distributed"].shutdown()
    sys.exit(code)


if __name__ == "__main__":
    console()
