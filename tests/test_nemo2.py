"""NeMo 2 checkpoint directories (tests/nemo2_layout.py writes them as NeMo's HF importers do) load
into megatron without nemo-toolkit: the same weights and logits as the HF directory they came
from (and as transformers), at TP1 here and at TP2 and PP2 in two spawned gloo processes."""

import json
import os
import shutil
import tarfile

import pytest
import torch
import yaml
from nemo2_layout import write_nemo2_checkpoint
from parallel_harness import _env, _spawn
from test_hf_models import random_transformers_model

from nemo_optune.runtime.distributed import free_port

TOKENS = torch.randint(3, 96, (2, 10), generator=torch.Generator().manual_seed(5))
SHAPE = dict(
    hidden_size=64,
    num_attention_heads=4,
    num_key_value_heads=2,
    intermediate_size=96,
    num_hidden_layers=2,
    initializer_range=0.2,
    bos_token_id=1,
    eos_token_id=2,
)
LLAMA3_ROPE = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}
CASES = {  # name: (transformers config class, arguments, dtype, NeMo's TP when it padded the vocabulary itself)
    "llama": (
        "LlamaConfig",
        dict(SHAPE, vocab_size=100, rope_theta=500000.0, max_position_embeddings=16384, rope_scaling=LLAMA3_ROPE),
        torch.float32,
        None,
    ),
    # trained by NeMo from its tokenizer at TP2: 256 rows in weights/, and optimizer state
    "llama_padded": ("LlamaConfig", dict(SHAPE, vocab_size=100), torch.float32, 2),
    "llama_tied_bf16": ("LlamaConfig", dict(SHAPE, vocab_size=96, tie_word_embeddings=True), torch.bfloat16, None),
    "qwen2": ("Qwen2Config", dict(SHAPE, vocab_size=112), torch.float32, None),
    "mistral": (
        "MistralConfig",
        dict(SHAPE, vocab_size=128, max_position_embeddings=4096, sliding_window=4096),
        torch.float32,
        None,
    ),
}
IN_LAYOUTS = ("llama", "llama_padded", "llama_tied_bf16", "qwen2")
TOLERANCE = 1e-4
DROPPED = "module.decoder.layers.mlp.linear_fc2.weight"


def _hf_dir(name: str, directory: str) -> torch.Tensor:
    """A random transformers model of CASES[name] with a word-level tokenizer of its vocabulary
    (<unk>, <s>, </s>, w3, ...) saved in `directory`; returns its logits of TOKENS."""
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers

    cls, kwargs, dtype, _ = CASES[name]
    model = random_transformers_model(cls, kwargs, seed=list(CASES).index(name))
    with torch.no_grad():
        for p in model.parameters():  # the values saved in `dtype`, in fp32 (megatron computes in fp32)
            p.copy_(p.to(dtype))
        logits = model(TOKENS).logits
    model.to(dtype).save_pretrained(directory)  # (not before: it would round rope's inv_freq buffer too)
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, kwargs["vocab_size"])}}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    transformers.PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    ).save_pretrained(directory)
    return logits


@pytest.fixture(scope="module")
def cases(tmp_path_factory):
    """{name: (HF directory, NeMo 2 directory, transformers' logits)}; plus "dropped": a NeMo 2
    directory of "llama" without one stored tensor."""
    root = tmp_path_factory.mktemp("nemo2")
    out = {}
    for name, (_, _, _, pretrained_tp) in CASES.items():
        hf, nemo = str(root / f"{name}_hf"), str(root / f"{name}_nemo")
        reference = _hf_dir(name, hf)
        write_nemo2_checkpoint(nemo, hf, pretrained_tp=pretrained_tp, optimizer_state=pretrained_tp is not None)
        out[name] = (hf, nemo, reference)
    write_nemo2_checkpoint(str(root / "dropped"), out["llama"][0], drop=(DROPPED,))
    out["dropped"] = (out["llama"][0], str(root / "dropped"), None)
    return out


def _load_both(hf_dir: str, nemo_dir: str, layout) -> dict:
    """Logits at every position of TOKENS and the full weights, of the model loaded from the NeMo 2
    directory and of the one imported from the HF directory, at this layout."""
    from nemo_optune.models.export import gather_full_tensors
    from nemo_optune.models.gpt_optune import inference_model
    from nemo_optune.models.hf_io import import_hf, read_hf_spec
    from nemo_optune.models.nemo2_io import import_nemo2, nemo2_model_and_tokenizer

    out = {}
    for source, spec, load, directory in (
        ("nemo2", nemo2_model_and_tokenizer(nemo_dir)[0], import_nemo2, nemo_dir),
        ("hf", read_hf_spec(hf_dir), import_hf, hf_dir),
    ):
        model = inference_model(spec, layout)
        load(directory, model)
        length = TOKENS.shape[1]
        rows, last = TOKENS.repeat_interleave(length, 0), torch.arange(length).repeat(len(TOKENS))
        out[source] = {
            "logits": model.next_token_logits(rows, last, micro_batch_size=32).reshape(*TOKENS.shape, -1),
            "weights": gather_full_tensors(model.policy),
        }
    return out


def _assert_same_model(measured: dict, reference: torch.Tensor) -> None:
    nemo2, hf = measured["nemo2"], measured["hf"]
    assert nemo2["weights"].keys() == hf["weights"].keys()
    for key, tensor in hf["weights"].items():  # padding rows included: zero in both
        assert torch.equal(nemo2["weights"][key], tensor), key
    assert nemo2["logits"].shape == reference.shape
    assert float((nemo2["logits"] - hf["logits"]).abs().max()) < TOLERANCE
    assert float((nemo2["logits"] - reference).abs().max()) < TOLERANCE


@pytest.mark.parametrize("name", list(CASES))
def test_tp1_loads_the_hf_models_weights_and_logits(name, cases):
    from nemo_optune.runtime import distributed

    hf, nemo, reference = cases[name]
    _assert_same_model(_load_both(hf, nemo, distributed.initialize(1, 1, seed=0)), reference)


def _layout_worker(rank, world, port, cases, result_dir):
    _env(rank, world, port)
    from nemo_optune.models.gpt_optune import inference_model
    from nemo_optune.models.nemo2_io import import_nemo2, nemo2_model_and_tokenizer
    from nemo_optune.runtime import distributed
    from nemo_optune.trainers.common import quiet_megatron_warnings

    quiet_megatron_warnings()
    results = {}
    for phase, tp, pp in (("tp2", 2, 1), ("pp2", 1, 2)):
        layout = distributed.initialize(tp, pp, seed=0)
        results[phase] = {name: _load_both(cases[name][0], cases[name][1], layout) for name in IN_LAYOUTS}
    nemo = cases["dropped"][1]
    try:
        import_nemo2(nemo, inference_model(nemo2_model_and_tokenizer(nemo)[0], layout))
    except ValueError as err:
        results["error"] = str(err)
    torch.save(results if rank == 0 else {"error": results.get("error")}, os.path.join(result_dir, f"rank{rank}.pt"))
    distributed.shutdown()


@pytest.fixture(scope="module")
def layouts(cases, tmp_path_factory):
    """Rank 0's results at TP2 and PP2 (the same two processes), and every rank's error."""
    root = tmp_path_factory.mktemp("layouts")
    _spawn(_layout_worker, (2, free_port(), cases, str(root)), 2)
    return [torch.load(root / f"rank{rank}.pt", weights_only=False) for rank in range(2)]


@pytest.mark.parametrize("phase", ["tp2", "pp2"])
def test_tp2_and_pp2_load_the_hf_models_weights_and_logits(phase, cases, layouts):
    for name in IN_LAYOUTS:
        _assert_same_model(layouts[0][phase][name], cases[name][2])


def test_a_missing_tensor_is_one_error_on_every_rank(cases, layouts):
    expected = f"{cases['dropped'][1]}/weights: tensor {DROPPED} missing"
    assert [result["error"] for result in layouts] == [expected, expected]


@pytest.mark.parametrize("name", list(CASES))
def test_spec_from_model_yaml_equals_the_hf_spec(name, cases):
    from nemo_optune.models.hf_io import read_hf_spec
    from nemo_optune.models.nemo2_io import nemo2_model_and_tokenizer

    hf, nemo, _ = cases[name]
    spec, tokenizer = nemo2_model_and_tokenizer(nemo)
    hf_spec = read_hf_spec(hf)
    assert spec == hf_spec and spec.padded_vocab_size == hf_spec.padded_vocab_size
    assert (spec.dtype, tokenizer.vocab_size, tokenizer.eos_ids) == (str(CASES[name][2])[6:], spec.vocab_size, {2})


# ------------------------------------------------------------------------- bad input
def _edited_copy(nemo_dir: str, tmp_path, key: str, value) -> str:
    """A copy of the checkpoint whose model.yaml has `key` (dotted) set to `value` (None: removed)."""
    out = str(tmp_path / "edited")
    shutil.copytree(nemo_dir, out)
    path = os.path.join(out, "context", "model.yaml")
    model = yaml.safe_load(open(path))
    *parents, last = key.split(".")
    node = model
    for parent in parents:
        node = node[parent]
    if value is None:
        del node[last]
    else:
        node[last] = value
    yaml.safe_dump(model, open(path, "w"))
    return out


GPT = "nemo.collections.llm.gpt.model."


@pytest.mark.parametrize(
    "key, value, message",
    [
        (
            "_target_",
            GPT + "mixtral.MixtralModel",
            f"field _target_='{GPT}mixtral.MixtralModel' is not supported "
            f"({GPT}llama.LlamaModel, {GPT}mistral.MistralModel, {GPT}qwen2.Qwen2Model)",
        ),
        (
            "config._target_",
            GPT + "llama.Llama4Config",
            f"field config._target_='{GPT}llama.Llama4Config' is not supported (LlamaConfig, Llama2Config7B",
        ),
        ("config.num_moe_experts", 8, "field config.num_moe_experts=8 is not supported (null)"),
        (
            "config.activation_func",
            {"_call_": False, "_target_": "torch._C._nn.gelu"},
            "field config.activation_func='torch._C._nn.gelu' is not supported (torch.nn.functional.silu)",
        ),
        ("config.normalization", "LayerNorm", "field config.normalization='LayerNorm' is not supported (\"RMSNorm\")"),
        (
            "config.position_embedding_type",
            "learned_absolute",
            "field config.position_embedding_type='learned_absolute' is not supported (\"rope\")",
        ),
        (
            "config.low_freq_factor",
            2.0,
            "field config.low_freq_factor=2.0 is not supported (megatron-core 0.16.1 fixes it",
        ),
        (
            "config.params_dtype",
            {"_call_": False, "_target_": "torch.float8_e4m3fn"},
            "field config.params_dtype='torch.float8_e4m3fn' is not supported",
        ),
        ("config.num_layers", None, "field config.num_layers missing"),
        (
            "tokenizer._target_",
            "nemo.collections.common.tokenizers.sentencepiece_tokenizer.SentencePieceTokenizer",
            "field tokenizer._target_='nemo.collections.common.tokenizers.sentencepiece_tokenizer.SentencePieceTokenizer' is "
            "not supported",
        ),
    ],
)
def test_unsupported_model_yaml_is_refused_with_one_line(key, value, message, cases, tmp_path):
    from nemo_optune.models.nemo2_io import nemo2_model_and_tokenizer

    nemo = _edited_copy(cases["llama"][1], tmp_path, key, value)
    with pytest.raises(ValueError) as err:
        nemo2_model_and_tokenizer(nemo)
    assert str(err.value).startswith(f"{nemo}/context/model.yaml: {message}") and "\n" not in str(err.value)


def _import_error(nemo_dir: str, spec=None) -> str:
    from nemo_optune.models.gpt_optune import inference_model
    from nemo_optune.models.nemo2_io import import_nemo2, nemo2_model_and_tokenizer
    from nemo_optune.runtime import distributed

    model = inference_model(spec or nemo2_model_and_tokenizer(nemo_dir)[0], distributed.initialize(1, 1, seed=0))
    with pytest.raises(ValueError) as err:
        import_nemo2(nemo_dir, model)
    assert "\n" not in str(err.value)
    return str(err.value)


def test_weights_that_do_not_fit_are_one_line_errors(cases, tmp_path):
    import dataclasses

    from nemo_optune.models.nemo2_io import nemo2_model_and_tokenizer

    nemo = cases["llama"][1]
    assert _import_error(cases["dropped"][1]) == f"{cases['dropped'][1]}/weights: tensor {DROPPED} missing"
    wider = _edited_copy(nemo, tmp_path, "config.ffn_hidden_size", 128)
    assert _import_error(wider) == (
        f"{wider}/weights: tensor module.decoder.layers.mlp.linear_fc1.weight has shape "
        "[2, 192, 64], expected [2, 256, 64]"
    )
    other = dataclasses.replace(nemo2_model_and_tokenizer(nemo)[0], norm_epsilon=1e-3)
    assert _import_error(nemo, other).startswith(
        f"{nemo}/context/model.yaml: another model than the one built "
        "(norm_epsilon 1e-06 in the file, 0.001 in the model)"
    )
    broken = str(tmp_path / "broken")
    shutil.copytree(nemo, broken)
    with open(os.path.join(broken, "weights", ".metadata"), "wb") as f:
        f.write(b"not a pickle")
    assert _import_error(broken).startswith(f"{broken}/weights: unreadable checkpoint metadata (")
    truncated = str(tmp_path / "truncated")
    shutil.copytree(nemo, truncated)
    for name in os.listdir(os.path.join(truncated, "weights")):
        if name.endswith(".distcp"):
            with open(os.path.join(truncated, "weights", name), "r+b") as f:
                f.truncate(os.path.getsize(f.name) // 2)
    assert _import_error(truncated) == (
        f"{truncated}/weights: cannot load (EOFError; a damaged or incomplete checkpoint?)"
    )


def test_a_nemo_archive_and_other_directories_are_refused(cases, tmp_path):
    from nemo_optune.models.nemo2_io import is_nemo2_checkpoint, nemo2_model_and_tokenizer

    archive = str(tmp_path / "model.nemo")
    (tmp_path / "model_config.yaml").write_text("num_layers: 2\n")
    with tarfile.open(archive, "w") as tar:
        tar.add(tmp_path / "model_config.yaml", arcname="model_config.yaml")
    hf, nemo, _ = cases["llama"]
    assert is_nemo2_checkpoint(nemo) and not is_nemo2_checkpoint(hf) and not is_nemo2_checkpoint(archive)
    for path, message in (
        (archive, "a .nemo archive (NeMo 1 / NeMo-Aligner) is not supported; convert it with NeMo's"),
        (hf, "not a NeMo 2 checkpoint directory (no weights/ and context/model.yaml)"),
        (str(tmp_path), "not a NeMo 2 checkpoint directory"),
    ):
        with pytest.raises(ValueError) as err:
            nemo2_model_and_tokenizer(path)
        assert str(err.value).startswith(f"{path}: {message}") and "\n" not in str(err.value)


def test_model_yaml_is_in_nemos_form(cases):
    """What NeMo's readers (its TensorRT-LLM exporter's load_nemo_config / get_weights_dtype) take from it."""
    hf, nemo, _ = cases["llama_tied_bf16"]
    model = yaml.safe_load(open(os.path.join(nemo, "context", "model.yaml")))
    assert model["_target_"] == GPT + "llama.LlamaModel" and model["config"]["_target_"] == GPT + "llama.LlamaConfig"
    assert model["config"]["params_dtype"]["_target_"] == "torch.bfloat16"
    assert json.load(open(os.path.join(nemo, "weights", "metadata.json")))["sharded_backend"] == "torch_dist"
    assert os.path.isfile(os.path.join(nemo, "context", model["tokenizer"]["pretrained_model_name"], "tokenizer.json"))
