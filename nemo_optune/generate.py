"""Generate from any supported checkpoint at any TP/PP layout: prompts in, JSONL out.

    python -m nemo_optune.generate model.restore_from_path=HF_OR_NEMO2_DIR_OR_CHECKPOINT \\
        generate.input_path=prompts.jsonl generate.output_path=out.jsonl [generation.temperature=0]
    torchrun --nproc-per-node 2 -m nemo_optune.generate model.tensor_model_parallel_size=2 ...

Each output row: the prompt (text, or the chat as rendered), the response text, its token ids
and the policy's log-prob of each token (temperature 1). How a user checks a converted or a
trained checkpoint (a training checkpoint's policy is read too); rows follow the input order.
Bad input: one line, exit status 2."""

import json
import os
import sys

from nemo_optune.cli import answer_help
from nemo_optune.config import RootConfig
from nemo_optune.runtime.quiet import quiet_megatron_warnings

GROUPS = ("model", "data", "generation", "generate")  # the keys this command reads


def generate(cfg: RootConfig) -> int:
    """Write cfg.generate.output_path; returns the number of rows written."""
    import torch

    from nemo_optune.data.prompts import encode_prompt_file
    from nemo_optune.data.task_data import build_task_data
    from nemo_optune.generation.factory import build_engine
    from nemo_optune.models.gpt_optune import MegatronGPTOPTuneModel
    from nemo_optune.runtime.distributed import dp_share, gather_rows_over_dp
    from nemo_optune.runtime.seeds import mix_seed
    from nemo_optune.trainers.common import model_and_tokenizer, sampling_params, setup

    gen, d = cfg.generate, cfg.data
    for key, value in (
        ("model.restore_from_path", cfg.model.restore_from_path),
        ("generate.input_path", gen.input_path),
        ("generate.output_path", gen.output_path),
    ):
        if not value:
            raise ValueError(f"config key {key}: needed by the generate command")
    task = build_task_data(d).task
    spec, tokenizer, width = model_and_tokenizer(cfg, task, cfg.model.tensor_model_parallel_size)
    # Without data.max_prompt_tokens a prompt may take whatever the model's positions (or
    # sliding window) leave after the new tokens, not the embedded task's limit.
    limit = d.max_prompt_tokens or spec.max_sequence_length - cfg.generation.max_new_tokens
    texts, prompt_ids, _ = encode_prompt_file(gen.input_path, tokenizer, d, limit)
    layout = setup(cfg)
    model = MegatronGPTOPTuneModel(
        cfg.model,
        spec,
        layout,
        seed=gen.seed,
        with_reference=False,
        tokenizer=tokenizer,
        initialize=False,
    )
    model.load_policy(cfg.model.restore_from_path, from_training=True)  # e.g. EXP/checkpoints/iter_000008
    engine = build_engine(cfg, model, tokenizer)  # generation.engine
    k = gen.samples_per_prompt
    mine, counts = dp_share(torch.arange(len(prompt_ids)), layout)
    rollouts = engine.generate(
        [prompt_ids[i] for i in mine.tolist()], k, sampling_params(cfg), [mix_seed(gen.seed, i) for i in mine.tolist()]
    )
    tokens, lengths, logprobs = (
        gather_rows_over_dp(t, [c * k for c in counts])
        for t in (rollouts.response_tokens, rollouts.response_lengths, rollouts.logprobs)
    )
    if layout.is_logging_rank:
        os.makedirs(os.path.dirname(os.path.abspath(gen.output_path)), exist_ok=True)
        with open(gen.output_path + ".tmp", "w") as f:
            for row in range(len(tokens)):
                n, prompt = int(lengths[row]), row // k
                f.write(
                    json.dumps(
                        {
                            "prompt": texts[prompt],
                            "sample": row % k,
                            "response": tokenizer.decode(tokens[row, :n]),
                            "token_ids": tokens[row, :n].tolist(),
                            "logprobs": logprobs[row, :n].tolist(),
                        }
                    )
                    + "\n"
                )
        os.replace(gen.output_path + ".tmp", gen.output_path)
    return len(tokens)


def main(argv=None) -> None:
    from nemo_optune.config import conf_dir

    argv = sys.argv[1:] if argv is None else list(argv)
    recipe = answer_help(argv, "python -m nemo_optune.generate", __doc__, RootConfig, "optune_tiny", conf_dir(), GROUPS)
    quiet_megatron_warnings()  # before anything imports megatron
    from nemo_optune.cli import fail, one_line, user_errors
    from nemo_optune.config import load_config
    from nemo_optune.runtime import distributed

    try:
        cfg = load_config(recipe.name, recipe.overrides, recipe.config_dir)
        rows = generate(cfg)
    except user_errors() as err:
        fail(one_line(err))
    if distributed.world_from_env()[0] == 0:
        print(f"[generate] {rows} responses -> {cfg.generate.output_path}")
    distributed.shutdown()


if __name__ == "__main__":  # dist_checkpointing spawns workers: keep the guard
    main()
