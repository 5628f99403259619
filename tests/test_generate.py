"""The generate command: greedy output of an imported model (from a Hugging Face or a NeMo 2
directory) equals transformers' greedy `generate` token for token, with the same per-token
log-probs, at TP1 and TP2."""

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import ROOT
from test_hf_training import make_hf_model

PROMPTS = ["3141>", "97>", "5521>", "80808>"]


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    directory = str(tmp_path_factory.mktemp("hf") / "model")
    make_hf_model(directory, [p + "".join(sorted(p[:-1])) for p in PROMPTS] * 20)
    return directory


def transformers_greedy(hf_dir, prompt_ids, new_tokens):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    out = model.generate(
        torch.tensor([prompt_ids]),
        max_new_tokens=new_tokens,
        do_sample=False,
        pad_token_id=0,
        eos_token_id=2,
        output_scores=True,
        return_dict_in_generate=True,
    )
    tokens = out.sequences[0, len(prompt_ids) :].tolist()
    logprobs = [float(torch.log_softmax(s[0].float(), -1)[t]) for s, t in zip(out.scores, tokens)]
    if 2 in tokens:  # up to and including the end-of-sequence token
        end = tokens.index(2) + 1
        tokens, logprobs = tokens[:end], logprobs[:end]
    return tokens, logprobs


@pytest.mark.parametrize("source,tp", [("hf", 1), ("hf", 2), ("nemo2", 2)])
def test_greedy_generation_equals_transformers(hf_dir, tmp_path, source, tp):
    from nemo_optune.data.tokenizer import HFTokenizer

    start = hf_dir
    if source == "nemo2":  # the same model written in NeMo 2's layout
        from nemo2_layout import write_nemo2_checkpoint

        start = str(tmp_path / "nemo2")
        write_nemo2_checkpoint(start, hf_dir)
    prompts = tmp_path / "prompts.jsonl"
    # UltraChat's rows: the plain-text `prompt` beside the chat; the chat (up to its last user turn) is rendered
    prompts.write_text(
        "".join(
            json.dumps(
                {
                    "prompt": p,
                    "prompt_id": str(i),
                    "messages": [{"role": "user", "content": p}, {"role": "assistant", "content": "0"}],
                }
            )
            + "\n"
            for i, p in enumerate(PROMPTS)
        )
    )
    out = tmp_path / "out.jsonl"
    args = [
        f"model.restore_from_path={start}",
        f"generate.input_path={prompts}",
        f"generate.output_path={out}",
        "generation.temperature=0",
        "generation.max_new_tokens=12",
        "data.max_prompt_tokens=20",
        f"model.tensor_model_parallel_size={tp}",
    ]
    launcher = [os.path.join(os.path.dirname(sys.executable), "torchrun"), "--standalone", f"--nproc_per_node={tp}"]
    done = subprocess.run(
        [*launcher, "-m", "nemo_optune.generate", *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    tokenizer = HFTokenizer(hf_dir)
    assert len(rows) == len(PROMPTS)
    for prompt, row in zip(PROMPTS, rows):
        prompt_ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}])
        tokens, logprobs = transformers_greedy(hf_dir, prompt_ids, 12)
        assert row["token_ids"] == tokens, prompt
        assert row["logprobs"] == pytest.approx(logprobs, abs=1e-4)
        assert row["response"] == tokenizer.decode(tokens)


def test_generate_needs_its_paths(tmp_path, capsys):
    from nemo_optune.generate import main

    with pytest.raises(SystemExit) as exit_info:
        main([f"model.restore_from_path={tmp_path}"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip() == "error: config key generate.input_path: needed by the generate command"


def test_prompts_may_take_the_positions_the_model_leaves(hf_dir, tmp_path, capsys):
    """Without data.max_prompt_tokens a prompt is limited by the model (64 positions here minus
    the new tokens), not by the embedded task's 9 tokens."""
    from nemo_optune.data.tokenizer import HFTokenizer
    from nemo_optune.generate import main

    long_prompt = " ".join(PROMPTS * 3)
    n = len(HFTokenizer(hf_dir).apply_chat_template([{"role": "user", "content": long_prompt}]))
    assert 9 < n < 64 - 12
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"messages": [{"role": "user", "content": long_prompt}]}) + "\n")
    out = tmp_path / "out.jsonl"
    base = [
        f"model.restore_from_path={hf_dir}",
        f"generate.input_path={prompts}",
        f"generate.output_path={out}",
        "generation.temperature=0",
    ]
    main(base + ["generation.max_new_tokens=12"])
    assert len(out.read_text().splitlines()) == 1
    with pytest.raises(SystemExit):
        main(base + [f"generation.max_new_tokens={64 - n + 1}"])
    assert (
        capsys.readouterr()
        .err.strip()
        .endswith(
            f"{prompts}:1: prompt has {n} tokens, over the limit of {n - 1} (raise data.max_prompt_tokens, "
            "or data.long_prompts: skip | truncate)"
        )
    )


def test_the_sort_tasks_checks_do_not_apply_to_a_prompt_file():
    """generate reads its prompts from generate.input_path: the toy task's answer length
    (max_new_tokens >= its longest answer + EOS) is not asked of it; training on the task is."""
    from nemo_optune.config import ConfigError, load_config

    short = ["model.restore_from_path=/models/chat", "generation.max_new_tokens=4"]
    load_config("optune_tiny", [*short, "generate.input_path=prompts.jsonl", "generate.output_path=out.jsonl"])
    with pytest.raises(ConfigError, match="config key generation.max_new_tokens"):
        load_config("optune_tiny", short)
