"""The built-in model is a tiny Llama (RMSNorm, SwiGLU, GQA, RoPE) whose checkpoints carry their
tokenizer: its SFT checkpoint restores with its own architecture and exports to a Hugging Face
directory that transformers loads, tokenizes and computes alike."""

import json
import os

import pytest
import torch
from conftest import TINY

from nemo_optune.data.sort_task import SortTask
from nemo_optune.data.tokenizer import HFTokenizer


def test_the_character_tokenizer_and_its_hugging_face_form_agree(tmp_path):
    task = SortTask()
    char = task.tokenizer
    char.save_pretrained(str(tmp_path))
    hf = HFTokenizer(str(tmp_path))
    assert (hf.vocab_size, hf.eos_ids, hf.pad_id, hf.chat_template) == (13, frozenset({1}), 0, None)
    assert (char.vocab_size, char.eos_ids, char.pad_id) == (13, frozenset({1}), 0)
    for prompt in task.prompts(300, seed=3):
        answer = task.target(prompt)
        assert hf.encode(prompt + answer) == char.encode(prompt + answer)
        ids = char.encode(answer) + [char.eos_id] + char.encode("12")
        assert hf.decode(ids) == char.decode(ids) == answer
    assert hf.decode(char.encode("12") + [char.pad_id, 5]) == "12"
    for tokenizer in (char, hf):
        with pytest.raises(ValueError):
            tokenizer.encode("12a>")


def _builtin_checkpoint_logits(checkpoint: str, tokens: torch.Tensor) -> torch.Tensor:
    from nemo_optune.models.gpt_optune import inference_model
    from nemo_optune.models.sources import checkpoint_spec
    from nemo_optune.runtime import distributed
    from nemo_optune.runtime.checkpoint import load_model

    model = inference_model(checkpoint_spec(checkpoint), distributed.initialize(1, 1, seed=0))
    load_model(checkpoint, model)
    length = tokens.shape[1]  # causal: position p's logits are the next-token logits of its prefix
    rows, last = tokens.repeat_interleave(length, 0), torch.arange(length).repeat(len(tokens))
    return model.next_token_logits(rows, last, micro_batch_size=64).reshape(*tokens.shape, -1)


def test_the_sft_checkpoint_exports_to_a_model_transformers_runs_alike(sft_checkpoint, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from nemo_optune import convert

    manifest = json.load(open(os.path.join(sft_checkpoint, "manifest.json")))
    arch = manifest["architecture"]
    assert (
        arch["family"],
        arch["normalization"],
        arch["gated_linear_unit"],
        arch["num_attention_heads"],
        arch["num_query_groups"],
        arch["position_embedding_type"],
    ) == ("llama", "RMSNorm", True, 4, 2, "rope")
    assert "tokenizer/tokenizer.json" in manifest["files"]  # checksummed like the weights
    out = str(tmp_path / "hf")
    assert convert.main(["--to", "hf", "--checkpoint", sft_checkpoint, "--out", out]) == 0
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    tokenizer = AutoTokenizer.from_pretrained(out)
    task = SortTask()
    prompts = task.prompts(16, seed=5)
    tokens = torch.tensor([tokenizer.encode(p.ljust(9, "0")) for p in prompts])  # 9 tokens each
    assert tokens.tolist() == [task.tokenizer.encode(p.ljust(9, "0")) for p in prompts]
    with torch.no_grad():
        expected = model(tokens).logits
    ours = _builtin_checkpoint_logits(sft_checkpoint, tokens)
    assert expected.abs().max() > 1.0
    torch.testing.assert_close(ours, expected, atol=1e-4, rtol=0)


def test_a_restored_checkpoint_brings_its_architecture_and_tokenizer(sft_checkpoint, tmp_path):
    """model.* describe the built-in model only: restoring takes the checkpoint's shape."""
    from nemo_optune.config import load_config
    from nemo_optune.data.task_data import build_task_data
    from nemo_optune.trainers.common import model_and_tokenizer

    cfg = load_config(
        "optune_tiny",
        TINY + [f"model.restore_from_path={sft_checkpoint}", "model.num_layers=4", f"exp_manager.exp_dir={tmp_path}"],
    )
    spec, tokenizer, _ = model_and_tokenizer(cfg, build_task_data(cfg.data).task, tp=1)
    assert spec.num_layers == 2 and isinstance(tokenizer, HFTokenizer)
    assert tokenizer.encode("3141>") == SortTask().tokenizer.encode("3141>")


def test_a_manifest_missing_spec_fields_is_one_line():
    from nemo_optune.models.hf_spec import spec_from_architecture

    with pytest.raises(ValueError, match=r"^CKPT: the manifest's architecture lacks hidden_size, ffn_hidden_size"):
        spec_from_architecture({"family": "llama", "num_layers": 2}, "CKPT")
