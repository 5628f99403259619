"""Llama-family Hugging Face checkpoints into and out of megatron-core, checked against
`transformers` itself on tiny random models built from configs (no downloads).

One process (TP1) in this process; TP2, PP2 (importing TP2's export) and TP2xPP2 in spawned
gloo processes, one run per layout shared by all the asserts."""

import dataclasses
import json
import os

import pytest
import torch
from parallel_harness import _env, _spawn

from nemo_optune.models.hf_mapping import hf_names, hf_to_megatron, megatron_to_hf
from nemo_optune.models.hf_spec import hf_config_from_spec, spec_from_architecture, spec_from_hf_config
from nemo_optune.runtime.distributed import free_port

TOKENS = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(3))
MASK = torch.zeros(2, 12)
MASK[0, 3:11], MASK[1, 5:9] = 1.0, 1.0  # position i scores token i+1
SHAPE = dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, intermediate_size=96, initializer_range=0.2)
CASES = {  # name: (transformers config class, arguments)
    # vocab 100: padded to 128 megatron rows, whose logits must not count
    "llama": (
        "LlamaConfig",
        dict(
            SHAPE,
            num_hidden_layers=2,
            vocab_size=100,
            rope_theta=500000.0,
            max_position_embeddings=16384,
            rope_scaling={
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192,
            },
        ),
    ),
    "llama_tied": ("LlamaConfig", dict(SHAPE, num_hidden_layers=2, vocab_size=96, tie_word_embeddings=True)),
    "mistral": (
        "MistralConfig",
        dict(SHAPE, num_hidden_layers=4, vocab_size=128, max_position_embeddings=4096, sliding_window=4096),
    ),
    "qwen2": ("Qwen2Config", dict(SHAPE, num_hidden_layers=2, vocab_size=112)),
}
TOLERANCE = 1e-4


# ----------------------------------------------------------------------- pure mapping
def _spec(**changes):
    """A llama spec from config.json fields; a change to None removes the field."""
    config = {
        "model_type": "llama",
        "hidden_size": 64,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "intermediate_size": 96,
        "num_hidden_layers": 2,
        "vocab_size": 100,
        "max_position_embeddings": 64,
    }
    return spec_from_hf_config({k: v for k, v in {**config, **changes}.items() if v is not None}, "config.json")


def test_fused_qkv_is_interleaved_per_query_group():
    spec = dataclasses.replace(_spec(), hidden_size=4)  # head_dim 1: one row per head
    q, k, v = torch.tensor([[0.0], [1.0], [2.0], [3.0]]), torch.tensor([[10.0], [11.0]]), torch.tensor([[20.0], [21.0]])
    name = "decoder.layers.1.self_attention.linear_qkv.weight"
    assert hf_names(name, spec) == tuple(f"model.layers.1.self_attn.{p}_proj.weight" for p in "qkv")
    fused = hf_to_megatron(name, [q, k, v], spec)
    assert fused.flatten().tolist() == [0, 1, 10, 20, 2, 3, 11, 21]  # [q heads of g, k_g, v_g] per group g
    assert [t.tolist() for _, t in megatron_to_hf(name, fused, spec)] == [q.tolist(), k.tolist(), v.tolist()]


@pytest.mark.parametrize(
    "name",
    [
        "decoder.layers.0.self_attention.linear_qkv.weight",
        "decoder.layers.0.self_attention.linear_qkv.bias",
        "decoder.layers.0.mlp.linear_fc1.weight",
        "embedding.word_embeddings.weight",
        "output_layer.weight",
        "decoder.layers.1.mlp.linear_fc2.weight",
    ],
)
def test_mapping_round_trips(name):
    spec = _spec(model_type="qwen2")
    shapes = {
        "self_attn.q_proj.weight": (64, 64),
        "self_attn.k_proj.weight": (32, 64),
        "self_attn.v_proj.weight": (32, 64),
        "self_attn.q_proj.bias": (64,),
        "self_attn.k_proj.bias": (32,),
        "self_attn.v_proj.bias": (32,),
        "mlp.gate_proj.weight": (96, 64),
        "mlp.up_proj.weight": (96, 64),
        "mlp.down_proj.weight": (64, 96),
        "model.embed_tokens.weight": (100, 64),
        "lm_head.weight": (100, 64),
    }
    parts = [
        torch.randn(shapes[n.split(".", 3)[-1] if n.startswith("model.layers") else n]) for n in hf_names(name, spec)
    ]
    fused = hf_to_megatron(name, parts, spec)
    if "word_embeddings" in name or "output_layer" in name:  # zero rows up to the padded vocabulary
        assert fused.shape[0] == 128 and not fused[100:].any()
    back = megatron_to_hf(name, fused, spec)
    assert [n for n, _ in back] == list(hf_names(name, spec))
    assert all(torch.equal(a, b) for a, (_, b) in zip(parts, back))


def test_spec_round_trips_through_config_json_and_a_manifest():
    llama3 = {
        "rope_type": "llama3",
        "factor": 32.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    }
    spec = _spec(eos_token_id=[128001, 128009], rope_theta=500000.0, rope_scaling=llama3, torch_dtype="bfloat16")
    assert (spec.rotary_base, spec.rope_scaling_factor, spec.eos_token_id) == (500000.0, 32.0, (128001, 128009))
    assert spec_from_hf_config(hf_config_from_spec(spec), "config.json") == spec
    assert spec_from_architecture(json.loads(json.dumps(spec.as_json())), "CKPT") == spec


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"model_type": "gemma"}, "field model_type='gemma' is not supported (llama, mistral, qwen2)"),
        (
            {"rope_scaling": {"rope_type": "yarn", "factor": 4.0}},
            "field rope_scaling.rope_type='yarn' is not supported (llama3 or null)",
        ),
        (
            {"rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}},
            "field rope_parameters.rope_type='linear' is not supported (llama3 or null)",
        ),
        (
            {"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 2.0}},
            "field rope_scaling.low_freq_factor=2.0 is not supported (megatron-core 0.16.1 fixes it at 1.0)",
        ),
        ({"attention_bias": True}, "field attention_bias=True is not supported (false)"),
        ({"mlp_bias": True}, "field mlp_bias=True is not supported (false)"),
        ({"hidden_act": "gelu"}, "field hidden_act='gelu' is not supported (silu)"),
        ({"head_dim": 32}, "field head_dim=32 is not supported (16 = hidden_size / num_attention_heads)"),
        ({"model_type": "qwen2", "use_sliding_window": True}, "field use_sliding_window=True is not supported (false)"),
        (
            {"quantization_config": {"quant_method": "gptq"}},
            "field quantization_config={'quant_method': 'gptq'} is not supported",
        ),
        ({"hidden_size": None}, "field hidden_size missing"),
    ],
)
def test_unsupported_configs_are_refused_with_one_line(changes, message):
    with pytest.raises(ValueError) as err:
        _spec(**changes)
    assert str(err.value).startswith(f"config.json: {message}") and "\n" not in str(err.value)


@pytest.mark.parametrize(
    "changes,window",
    [
        ({"model_type": "mistral", "sliding_window": 16}, 16),
        ({"model_type": "mistral", "max_position_embeddings": 8192}, 4096),  # transformers' default window
        ({"model_type": "mistral", "sliding_window": None}, None),
        ({"model_type": "mistral", "sliding_window": 9000, "max_position_embeddings": 8192}, None),
    ],
)
def test_a_sliding_window_bounds_the_sequences_a_run_may_use(changes, window):
    """zephyr-7b-sft-full (Mistral v0.1) has a 4096-token window and 32768 positions: it loads,
    and only sequences longer than the window are refused."""
    from nemo_optune.models.hf_spec import check_sequence_length, hf_config_from_spec

    spec = _spec(**changes)
    assert spec.attention_window == window
    assert hf_config_from_spec(spec)["sliding_window"] == window  # exported as it came
    check_sequence_length(spec, 16, "generation.max_new_tokens")
    if window is not None:
        with pytest.raises(
            ValueError,
            match=f"config key generation.max_new_tokens: sequences of {window + 1} "
            f"positions exceed the model's sliding attention window of {window}",
        ):
            check_sequence_length(spec, window + 1, "generation.max_new_tokens")


# -------------------------------------------------------------- transformers models
def random_transformers_model(cls: str, kwargs: dict, seed: int):
    """A transformers model of config class `cls`, random biases and norms included."""
    import transformers

    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(getattr(transformers, cls)(**kwargs)).eval()
    with torch.no_grad():  # transformers initialises biases to 0 and norms to 1: make them count
        for key, p in model.named_parameters():
            if key.endswith("bias") or "norm" in key:
                p.copy_(torch.randn_like(p) * 0.5 + ("norm" in key))
    return model


def _hf_model(name: str):
    cls, kwargs = CASES[name]
    return random_transformers_model(cls, kwargs, seed=list(CASES).index(name))


def _reference(model) -> dict:
    with torch.no_grad():
        logits = model(TOKENS).logits
    logp = logits.log_softmax(-1)[:, :-1].gather(-1, TOKENS[:, 1:, None]).squeeze(-1)
    return {"logits": logits, "logps": (logp * MASK[:, :-1]).sum(-1)}


@pytest.fixture(scope="module")
def hf_models(tmp_path_factory):
    """{name: (directory, transformers' state dict and outputs)}, saved with save_pretrained."""
    root = tmp_path_factory.mktemp("hf")
    out = {}
    for name in CASES:
        model = _hf_model(name)
        model.save_pretrained(root / name)
        out[name] = (str(root / name), {"state": model.state_dict(), **_reference(model)})
    return out


def _measure(model) -> dict:
    """Logits at every position, masked log-probs, and the gradient of their sum (after the
    optimizer's reductions), computed by the model's own schedule paths."""
    from nemo_optune.models.export import gather_full_tensors

    length = TOKENS.shape[1]
    # Causal: the logits at position p of a sequence are the next-token logits of its prefix.
    rows, last = TOKENS.repeat_interleave(length, 0), torch.arange(length).repeat(len(TOKENS))
    logits = model.next_token_logits(rows, last, micro_batch_size=64).reshape(*TOKENS.shape, -1)
    logps = model.sequence_logprobs("policy", TOKENS, MASK, micro_batch_size=8)
    model.prepare_for_training_step()
    model.get_loss_and_metrics([{"tokens": TOKENS, "loss_mask": MASK}], lambda mb, lp: (-lp.sum(), {}))
    norm = model.optimizer.reduce_and_clip()  # grad_clip 0: no clipping
    return {"logits": logits, "logps": logps, "grads": gather_full_tensors(model.policy, of="grad"), "norm": norm}


def _import_and_measure(hf_dir: str, layout) -> tuple:
    from nemo_optune.config import ModelConfig
    from nemo_optune.models.gpt_optune import MegatronGPTOPTuneModel
    from nemo_optune.models.hf_io import import_hf, read_hf_spec

    cfg = ModelConfig(tensor_model_parallel_size=layout.tp, pipeline_model_parallel_size=layout.pp)
    # lr=0: with an optimizer, whose gradient reduction _measure runs.
    model = MegatronGPTOPTuneModel(cfg, read_hf_spec(hf_dir), layout, 0, lr=0.0, with_reference=False, initialize=False)
    import_hf(hf_dir, model)
    return model, _measure(model)


@pytest.fixture(scope="module")
def tp1(hf_models, tmp_path_factory):
    """TP1 in this process: {name: (measures, exported directory)}."""
    from nemo_optune.models.hf_io import export_hf
    from nemo_optune.runtime import distributed
    from nemo_optune.trainers.common import quiet_megatron_warnings

    quiet_megatron_warnings()
    layout = distributed.initialize(1, 1, seed=0)
    root = tmp_path_factory.mktemp("tp1")
    out = {}
    for name, (hf_dir, _) in hf_models.items():
        model, measured = _import_and_measure(hf_dir, layout)
        measured["inv_freq"] = model.policy.rotary_pos_emb.inv_freq
        export_hf(model, str(root / name))
        out[name] = (measured, str(root / name))
    return out


def _layout_worker(rank, world, port, phases, result_path):
    """For each phase (name, tp, pp, sources, export root, conversion): import each source at
    TP x PP, measure, export to export_root/name; then run the conversion CLI, either
    ("megatron", hf_dir, checkpoint) or ("hf", checkpoint, out_dir)."""
    _env(rank, world, port)
    from nemo_optune import convert as cli
    from nemo_optune.models.hf_io import export_hf
    from nemo_optune.runtime import distributed
    from nemo_optune.trainers.common import quiet_megatron_warnings

    quiet_megatron_warnings()
    results = {}
    for phase, tp, pp, sources, export_root, (to, source, out) in phases:
        layout = distributed.initialize(tp, pp, seed=0)
        results[phase] = {}
        for name, hf_dir in sources.items():
            model, results[phase][name] = _import_and_measure(hf_dir, layout)
            export_hf(model, os.path.join(export_root, name))
        flags = ["--hf" if to == "megatron" else "--checkpoint", source, "--out", out, "--tp", str(tp), "--pp", str(pp)]
        results[phase]["convert_rc"] = cli.main(["--to", to, *flags])
    if rank == 0:
        torch.save(results, result_path)
    distributed.shutdown()


def _run(world: int, phases: list, result_path: str) -> dict:
    _spawn(_layout_worker, (world, free_port(), phases, result_path), world)
    return torch.load(result_path, weights_only=False)


@pytest.fixture(scope="module")
def layouts_root(tmp_path_factory):
    return tmp_path_factory.mktemp("layouts")


@pytest.fixture(scope="module")
def two_process_layouts(hf_models, layouts_root):
    """{layout: (results, export root)} for TP2 then PP2 in the same two processes (spawning is
    most of the cost); PP2 imports what TP2 exported. The CLI converts llama to a checkpoint at
    TP2 and that checkpoint back to HF at PP2 (resharded on load): "cli" is that directory."""
    root = layouts_root
    originals = {name: hf_dir for name, (hf_dir, _) in hf_models.items()}
    two = _run(
        2,
        [
            ("tp2", 2, 1, originals, str(root / "tp2"), ("megatron", originals["llama"], str(root / "llama_ckpt"))),
            (
                "pp2",
                1,
                2,
                {name: str(root / "tp2" / name) for name in originals},
                str(root / "pp2"),
                ("hf", str(root / "llama_ckpt"), str(root / "llama_cli")),
            ),
        ],
        str(root / "two.pt"),
    )
    out = {layout: (results, str(root / layout)) for layout, results in two.items()}
    out["cli"] = str(root / "llama_cli")
    return out


@pytest.fixture(scope="module")
def four_process_layouts(hf_models, layouts_root, two_process_layouts):
    """TP2 x PP2 (four processes: the slow tier) from the originals, and the CLI's TP2 llama
    checkpoint exported at TP2 x PP2."""
    root = layouts_root
    originals = {name: hf_models[name][0] for name in ("llama_tied", "qwen2")}
    four = _run(
        4,
        [("tp2pp2", 2, 2, originals, str(root / "tp2pp2"), ("hf", str(root / "llama_ckpt"), str(root / "llama_cli4")))],
        str(root / "four.pt"),
    )
    out = {layout: (results, str(root / layout)) for layout, results in four.items()}
    out["cli"] = str(root / "llama_cli4")
    return out


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max())


def _assert_like_transformers(measured: dict, reference: dict) -> None:
    assert measured["logits"].shape == reference["logits"].shape  # padding rows dropped
    assert _max_diff(measured["logits"], reference["logits"]) < TOLERANCE
    assert _max_diff(measured["logps"], reference["logps"]) < TOLERANCE  # padding rows have no mass


def _assert_loads_equal(directory: str, state: dict) -> None:
    from transformers import AutoModelForCausalLM

    loaded = AutoModelForCausalLM.from_pretrained(directory).state_dict()
    assert loaded.keys() == state.keys()
    for key, tensor in state.items():
        assert loaded[key].dtype == tensor.dtype and torch.equal(loaded[key], tensor), key


@pytest.mark.parametrize("name", list(CASES))
def test_tp1_logits_and_logprobs_equal_transformers(name, hf_models, tp1):
    _, reference = hf_models[name]
    measured, _ = tp1[name]
    _assert_like_transformers(measured, reference)


def test_rope_base_and_llama3_scaling_give_transformers_frequencies(tp1):
    # Short test sequences barely turn the low frequencies that llama3 scaling changes.
    hf = _hf_model("llama")
    torch.testing.assert_close(tp1["llama"][0]["inv_freq"], hf.model.rotary_emb.inv_freq, rtol=1e-6, atol=0)


@pytest.mark.parametrize("name", list(CASES))
def test_export_loads_in_transformers_with_every_tensor_equal(name, hf_models, tp1):
    _, reference = hf_models[name]
    from nemo_optune.models.hf_io import read_hf_spec

    _assert_loads_equal(tp1[name][1], reference["state"])
    assert read_hf_spec(tp1[name][1]) == read_hf_spec(hf_models[name][0])  # our config.json: the same model


@pytest.mark.parametrize("layout", ["tp2", "pp2", "tp2pp2"])
def test_layouts_match_transformers_and_export_exactly(layout, hf_models, tp1, request):
    processes = "four_process_layouts" if layout == "tp2pp2" else "two_process_layouts"
    results, export_root = request.getfixturevalue(processes)[layout]
    names = [n for n in results if n != "convert_rc"]
    assert names and results["convert_rc"] == 0
    for name in names:
        _, reference = hf_models[name]
        _assert_like_transformers(results[name], reference)
        _assert_loads_equal(os.path.join(export_root, name), reference["state"])
        # Gradients (every tensor, the tied embedding's two PP copies summed) equal TP1's.
        ref_measured = tp1[name][0]
        assert results[name]["grads"].keys() == ref_measured["grads"].keys()
        for key, grad in ref_measured["grads"].items():
            assert float((results[name]["grads"][key] - grad).norm() / grad.norm()) < 1e-5, key
        assert results[name]["norm"] == pytest.approx(ref_measured["norm"], rel=1e-5)


@pytest.mark.parametrize("processes", ["two_process_layouts", "four_process_layouts"], ids=["pp2", "tp2pp2"])
def test_cli_checkpoint_at_tp2_exports_at_another_layout(hf_models, processes, request):
    _assert_loads_equal(request.getfixturevalue(processes)["cli"], hf_models["llama"][1]["state"])


def test_bf16_checkpoint_round_trips_exactly(tmp_path):
    """Hub checkpoints are mostly bf16: imported into fp32 weights, exported back as bf16."""
    from nemo_optune.models.hf_io import export_hf
    from nemo_optune.runtime import distributed

    hf = _hf_model("llama_tied").to(torch.bfloat16)
    hf.save_pretrained(tmp_path / "bf16")
    model, _ = _import_and_measure(str(tmp_path / "bf16"), distributed.initialize(1, 1, seed=0))
    assert model.spec.dtype == "bfloat16"
    export_hf(model, str(tmp_path / "out"))
    _assert_loads_equal(str(tmp_path / "out"), hf.state_dict())


def test_a_model_padded_otherwise_imports_and_exports_the_same_tensors(hf_models, tmp_path):
    """Vocabulary padding is the built model's choice (HF tensors are unpadded): a model padded
    to 16 rows (the built-in model's) imports a HF directory (read as padded to 128) and
    exports it back unchanged."""
    import dataclasses

    from nemo_optune.models.gpt_optune import inference_model
    from nemo_optune.models.hf_io import export_hf, import_hf, read_hf_spec
    from nemo_optune.runtime import distributed

    hf_dir, ref = hf_models["llama"]
    spec = dataclasses.replace(read_hf_spec(hf_dir), vocab_multiple=16)
    assert spec.padded_vocab_size != read_hf_spec(hf_dir).padded_vocab_size
    model = inference_model(spec, distributed.initialize(1, 1, seed=0))
    import_hf(hf_dir, model)
    export_hf(model, str(tmp_path / "out"))
    _assert_loads_equal(str(tmp_path / "out"), ref["state"])


def _word_tokenizer(directory: str, vocab_size: int) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.WordLevel({f"w{i}": i for i in range(vocab_size)}, unk_token="w0"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="w0").save_pretrained(directory)


def test_sharded_safetensors_and_tokenizer_export_and_import(hf_models, tmp_path):
    """Several files + index: transformers loads them and the importer reads them back; the
    tokenizer files are copied."""
    from transformers import PreTrainedTokenizerFast

    from nemo_optune.models.hf_io import export_hf, read_hf_spec
    from nemo_optune.runtime import distributed

    hf_dir, reference = hf_models["qwen2"]
    _word_tokenizer(str(tmp_path / "tokenizer"), 112)
    layout = distributed.initialize(1, 1, seed=0)
    model, _ = _import_and_measure(hf_dir, layout)
    export_hf(model, str(tmp_path / "sharded"), tokenizer_dir=str(tmp_path / "tokenizer"), max_shard_bytes=64 << 10)
    index = json.load(open(tmp_path / "sharded" / "model.safetensors.index.json"))
    assert len(set(index["weight_map"].values())) > 2
    _assert_loads_equal(str(tmp_path / "sharded"), reference["state"])
    # (AutoTokenizer would take the class from config.json's model_type: Qwen2's, not this test's.)
    assert PreTrainedTokenizerFast.from_pretrained(str(tmp_path / "sharded"))("w5 w7 w111")["input_ids"] == [5, 7, 111]
    again, measured = _import_and_measure(str(tmp_path / "sharded"), layout)
    assert read_hf_spec(str(tmp_path / "sharded")) == again.spec
    _assert_like_transformers(measured, reference)


# ------------------------------------------------------------------------- bad input
def _broken_copy(hf_dir: str, tmp_path, edit) -> str:
    """A copy of hf_dir whose model.safetensors tensors went through edit(dict)."""
    import shutil

    from safetensors.torch import load_file, save_file

    out = tmp_path / "broken"
    shutil.copytree(hf_dir, out)
    tensors = load_file(str(out / "model.safetensors"))
    edit(tensors)
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    return str(out)


@pytest.mark.parametrize(
    "case", ["no_config", "no_weights", "missing_tensor", "wrong_shape", "unsupported", "old_builtin"]
)
def test_cli_bad_inputs_give_one_line_and_exit_2(case, hf_models, tmp_path, capsys):
    from nemo_optune import convert

    hf_dir = hf_models["mistral"][0]
    to, expected = "megatron", None
    if case == "no_config":
        (tmp_path / "empty").mkdir()
        source, expected = (
            str(tmp_path / "empty"),
            f"--from: {tmp_path / 'empty'} is an empty directory (expected a nemo_optune checkpoint",
        )
    elif case == "no_weights":
        os.makedirs(tmp_path / "w")
        with open(tmp_path / "w" / "config.json", "w") as f:
            f.write(open(os.path.join(hf_dir, "config.json")).read())
        source = str(tmp_path / "w")
        expected = f"--from: {source} has a config.json but no model.safetensors or model.safetensors.index.json"
    elif case == "missing_tensor":
        source = _broken_copy(hf_dir, tmp_path, lambda t: t.pop("model.layers.3.mlp.up_proj.weight"))
        expected = "model.safetensors: tensor model.layers.3.mlp.up_proj.weight missing"
    elif case == "wrong_shape":

        def truncate(t):
            t["model.layers.1.self_attn.k_proj.weight"] = t["model.layers.1.self_attn.k_proj.weight"][:16]

        source = _broken_copy(hf_dir, tmp_path, truncate)
        expected = (
            "model.safetensors: tensor model.layers.1.self_attn.k_proj.weight has shape [16, 64], expected [32, 64]"
        )
    elif case == "unsupported":
        os.makedirs(tmp_path / "u")
        config = json.load(open(os.path.join(hf_dir, "config.json")))
        with open(tmp_path / "u" / "config.json", "w") as f:
            json.dump({**config, "rope_scaling": {"rope_type": "yarn", "factor": 4.0}, "rope_parameters": None}, f)
        source = str(tmp_path / "u")
        expected = f"{source}/config.json: field rope_scaling.rope_type='yarn' is not supported (llama3 or null)"
    else:  # the built-in model before 0.2 (LayerNorm/GELU) is no longer built: its manifest had no family
        os.makedirs(tmp_path / "old")
        with open(tmp_path / "old" / "manifest.json", "w") as f:
            json.dump(
                {"format": 1, "kind": "model", "files": {}, "architecture": {"num_layers": 2, "hidden_size": 64}}, f
            )
        to, source = "hf", str(tmp_path / "old")
        expected = f"{source}: a checkpoint of a model this version does not build (family None"
    flag = "--from" if to == "megatron" else "--checkpoint"
    assert convert.main(["--to", to, flag, source, "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {expected}") and err.count("\n") == 1, err


def test_checkpoint_of_another_family_is_refused_before_loading(hf_models, tmp_path):
    """A converted Llama checkpoint does not load into the built-in model (another shape)."""
    from nemo_optune.config import ModelConfig
    from nemo_optune.models.gpt_optune import MegatronGPTOPTuneModel, inference_model
    from nemo_optune.models.hf_io import read_hf_spec
    from nemo_optune.models.hf_spec import tiny_llama_spec
    from nemo_optune.runtime import distributed
    from nemo_optune.runtime.checkpoint import CheckpointError, load_model, save_model

    layout = distributed.initialize(1, 1, seed=0)
    llama = inference_model(read_hf_spec(hf_models["llama_tied"][0]), layout)
    save_model(str(tmp_path / "llama"), llama)
    tiny = MegatronGPTOPTuneModel(
        ModelConfig(),
        tiny_llama_spec(ModelConfig(), 96, 1, 16),
        layout,
        0,
        lr=0.0,
        weight_decay=0.0,
        grad_clip=0.0,
        with_reference=False,
    )
    with pytest.raises(
        CheckpointError,
        match=r"another model architecture \(.*tie_word_embeddings True in the checkpoint, False in the config",
    ):
        load_model(str(tmp_path / "llama"), tiny)
