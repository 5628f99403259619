"""OPTune end to end from a Hugging Face or a NeMo 2 directory: a BPE tokenizer trained here with
a chat template, a tiny random Llama, a `messages` prompt file, a Python reward; the trained
checkpoint carries the tokenizer and exports back to a directory transformers loads and
generates from."""

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, TINY

from nemo_optune.config import load_config
from nemo_optune.data.task_data import build_task_data

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def make_hf_model(directory, texts):
    """A byte-level BPE tokenizer trained on `texts` and a random 2-layer Llama that fits it."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    specials = ["<pad>", "<s>", "</s>", "<|user|>", "<|assistant|>", "<|system|>"]
    bpe.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=300, special_tokens=specials, show_progress=False))
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe, pad_token="<pad>", bos_token="<s>", eos_token="</s>", chat_template=CHAT_TEMPLATE
    )
    tokenizer.save_pretrained(directory)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        rope_theta=10000.0,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(directory)
    return tokenizer


@pytest.mark.parametrize("source", ["hf", "nemo2"])
def test_optune_from_a_model_directory_and_back_to_hugging_face(source, tmp_path):
    from nemo_optune.run import run_experiment

    data = build_task_data(load_config("optune_tiny", TINY).data)
    task = data.task
    texts = [p + task.target(p) for p in data.train_prompts] * 4
    hf = str(tmp_path / "hf")
    tokenizer = make_hf_model(hf, texts)
    start = hf
    if source == "nemo2":  # the same model in NeMo 2's layout (weights/ + context/)
        from nemo2_layout import write_nemo2_checkpoint

        start = str(tmp_path / "nemo2")
        write_nemo2_checkpoint(start, hf)
    train, heldout = tmp_path / "train.jsonl", tmp_path / "heldout.jsonl"
    for path, prompts in ((train, data.train_prompts), (heldout, data.heldout_prompts)):  # UltraChat's rows
        path.write_text(
            "".join(
                json.dumps(
                    {
                        "prompt": p,  # plain text: chat_sort_reward fails on it, the chat must win
                        "prompt_id": str(i),
                        "messages": [{"role": "user", "content": p}, {"role": "assistant", "content": task.target(p)}],
                    }
                )
                + "\n"
                for i, p in enumerate(prompts)
            )
        )
    summary = run_experiment(
        load_config(
            "optune_tiny",
            TINY
            + [
                f"exp_manager.exp_dir={tmp_path / 'exp'}",
                f"model.restore_from_path={start}",
                f"data.train_prompts_path={train}",
                f"data.heldout_prompts_path={heldout}",
                # no data.max_prompt_tokens: the model's 64 positions less 10 new tokens, rows as wide as the
                # longest prompt read + 10, and none of the sort task's checks (prompt files, python reward)
                "reward.source=python",
                "reward.function=reward_functions:chat_sort_reward",
            ],
        )
    )
    first, second = summary["iterations"]
    assert (first["regenerated"], second["regenerated"]) == (64, 32)
    assert first["pool_valid_pairs"] > 0 and all(it["optimizer_steps"] == 2 for it in summary["iterations"])
    assert 0 <= summary["heldout_reward_final"] <= 1 and summary["heldout_kl_final"] > 0  # the policy moved

    checkpoint = sorted((tmp_path / "exp" / "checkpoints").iterdir())[-1]
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "nemo_optune.convert",
            "--to",
            "hf",
            "--checkpoint",
            str(checkpoint),
            "--out",
            str(tmp_path / "exported"),
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    model = AutoModelForCausalLM.from_pretrained(str(tmp_path / "exported"))
    original = AutoModelForCausalLM.from_pretrained(hf)
    moved = [not torch.equal(a, b) for a, b in zip(model.state_dict().values(), original.state_dict().values())]
    assert any(moved)  # the exported weights are the trained ones
    exported_tokenizer = PreTrainedTokenizerFast.from_pretrained(str(tmp_path / "exported"))
    ids = exported_tokenizer.apply_chat_template(
        [{"role": "user", "content": "3141>"}], add_generation_prompt=True, return_tensors="pt", return_dict=False
    )
    generated = model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert generated.shape[1] > ids.shape[1]
    assert tokenizer.decode(generated[0, ids.shape[1] :]) == exported_tokenizer.decode(generated[0, ids.shape[1] :])


def test_a_tokenizer_larger_than_the_model_vocabulary_is_refused(tmp_path):
    from nemo_optune.models.hf_io import hf_model_and_tokenizer

    hf = str(tmp_path / "hf")
    make_hf_model(hf, ["123>123"] * 10)
    config = json.loads(open(os.path.join(hf, "config.json")).read())
    config["vocab_size"] = 4
    open(os.path.join(hf, "config.json"), "w").write(json.dumps(config))
    with pytest.raises(ValueError, match=r"the tokenizer has \d+ tokens, the model's vocabulary 4"):
        hf_model_and_tokenizer(hf)
