"""trainer.dry_run=true: the config and layout are checked and a per-GPU memory estimate is
printed from config.json alone; nothing is loaded or written."""

import json
import os

import pytest

from nemo_optune.models.hf_io import read_hf_spec
from nemo_optune.models.memory import parameter_count, per_gpu_estimate

LLAMA_31_8B = {  # the public config.json of Llama-3.1-8B-Instruct (architecture fields)
    "model_type": "llama",
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "vocab_size": 128256,
    "max_position_embeddings": 131072,
    "rms_norm_eps": 1e-5,
    "rope_theta": 500000.0,
    "hidden_act": "silu",
    "tie_word_embeddings": False,
    "rope_scaling": {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    },
    "bos_token_id": 128000,
    "eos_token_id": [128001, 128008, 128009],
    "torch_dtype": "bfloat16",
}


@pytest.fixture
def llama_dir(tmp_path):
    (tmp_path / "llama").mkdir()
    (tmp_path / "llama" / "config.json").write_text(json.dumps(LLAMA_31_8B))
    return str(tmp_path / "llama")


def test_parameter_count_of_llama_31_8b(llama_dir):
    assert parameter_count(read_hf_spec(llama_dir)) == 8_030_261_248  # the published count


def test_estimate_terms_by_hand(llama_dir):
    spec = read_hf_spec(llama_dir)
    rows = per_gpu_estimate(
        spec,
        tp=2,
        pp=1,
        dp=4,
        bf16=True,
        distributed_optimizer=True,
        micro_batch_pairs=1,
        micro_batches=16,
        sequence_length=1024,
        generation_batch=64,
    )
    per_gpu = (8_030_261_248 - 4096) / 2  # everything but the final norm is split over TP (norms: within rounding)
    assert rows["policy weights"] == pytest.approx(per_gpu * 2 / 2**30, rel=1e-3)
    assert rows["optimizer (fp32 main + Adam)"] == pytest.approx(per_gpu * 12 / 4 / 2**30, rel=1e-3)
    assert rows["training logits"] == pytest.approx(1024 * 2 * 128256 / 2 * 4 / 2**30)
    # K and V of 8 groups x 128 dims, bf16, heads split over TP2, 32 layers, 64 rows x 1024 positions
    assert rows["generation KV cache"] == pytest.approx(64 * 1024 * 32 * 2 * 8 * 128 * 2 / 2 / 2**30)  # 4 GiB
    assert rows["generation logits"] == pytest.approx(64 * 128256 * 4 / 2**30)


def test_dry_run_prints_the_estimate_and_loads_nothing(llama_dir, tmp_path, capsys):
    from nemo_optune.cli import run_main as main

    exp = tmp_path / "exp"
    main(
        [
            f"model.restore_from_path={llama_dir}",
            "trainer.dry_run=true",
            "model.precision=bf16",
            "data.max_prompt_tokens=512",
            "generation.max_new_tokens=512",
            f"exp_manager.exp_dir={exp}",
        ]
    )
    out = capsys.readouterr().out
    assert "[dry run] llama model, TP=1 PP=1 DP=1 (world 1), 1024 positions" in out
    assert "8.03 B" in out and "peak while training" in out
    assert not os.path.exists(exp)


@pytest.mark.parametrize("layout,world", [("1x8", 8), ("4x8", 32)])
@pytest.mark.parametrize(
    "recipe,model", [("optune_zephyr_7b", "zephyr-7b-sft-full"), ("optune_llama3_8b", "llama-3.1-8b-instruct")]
)
def test_the_7b_recipes_fit_80_gb_gpus_in_both_layouts(recipe, model, layout, world, tmp_path, monkeypatch, capsys):
    """The shipped recipes validate at 1 node and 4 nodes x 8 GPUs with the models' public
    config.json (examples/hf_configs/) and the estimate leaves headroom on an 80 GB GPU."""
    from conftest import ROOT
    from test_reward_models import make_reward_model

    from nemo_optune.config import load_config
    from nemo_optune.run import run_experiment

    monkeypatch.setenv("WORLD_SIZE", str(world))
    cfg = load_config(
        recipe,
        [
            f"layout={layout}",
            f"model.restore_from_path={ROOT}/examples/hf_configs/{model}",
            "data.train_prompts_path=p.jsonl",
            "data.heldout_prompts_path=p.jsonl",
            f"reward.hf.path={make_reward_model(tmp_path / 'rm')}",
            "trainer.dry_run=true",
            f"exp_manager.exp_dir={tmp_path}/x",
        ],
    )
    rows = run_experiment(cfg)["dry_run"]
    dp = world // 2
    assert f"TP=2 PP=1 DP={dp} (world {world}), 1024 positions" in capsys.readouterr().out
    assert (cfg.trainer.lr, cfg.generation.top_p, cfg.trainer.global_batch_size) == (5e-7, 0.9, 128)
    assert 30 < rows["peak while training"] < 70 and rows["peak while generating"] < 70


def test_the_pool_row_falls_as_data_parallelism_grows(tmp_path, monkeypatch):
    """The pool's token rows are sharded over DP: the host memory the dry run reports per rank
    is the sharded store's real bytes (tests/test_pool_shards.py) and falls with DP; so do an
    iteration's new pairs."""
    from nemo_optune.config import load_config
    from nemo_optune.data.pool import pool_bytes_per_rank
    from nemo_optune.run import run_experiment

    per_rank = []
    for world in (1, 2, 4):
        monkeypatch.setenv("WORLD_SIZE", str(world))
        cfg = load_config("optune_tiny", ["trainer.dry_run=true", f"exp_manager.exp_dir={tmp_path}/x"])
        rows = run_experiment(cfg)["dry_run"]
        row = rows["prompt pool (host RAM per DP rank)"]
        expected = pool_bytes_per_rank(cfg.data.num_train_prompts, cfg.generation.max_new_tokens, world)
        assert row == pytest.approx(expected / 2**30)
        # the first iteration generates the whole pool, held beside it until its last chunk
        assert rows["new pairs of an iteration (host RAM per DP rank)"] == row
        per_rank.append(row)
    assert per_rank[0] > per_rank[1] > per_rank[2]


def test_without_a_prompt_limit_the_estimate_is_at_the_longest_prompt_read(tmp_path, capsys):
    """real_model leaves data.max_prompt_tokens null: a run's rows are as wide as the longest
    prompt it reads + generation.max_new_tokens, so the dry run measures the same with the
    model's tokenizer, not the model's limit of positions (thousands: estimates of terabytes)."""
    from test_hf_training import make_hf_model

    from nemo_optune.cli import run_main as main
    from nemo_optune.data.tokenizer import HFTokenizer

    prompts = ["Name a colour.", "Write one short sentence about the sea, the wind and the boats."]
    model = str(tmp_path / "hf")
    make_hf_model(model, prompts * 20)
    rows = "".join(json.dumps({"messages": [{"role": "user", "content": p}]}) + "\n" for p in prompts)
    (tmp_path / "p.jsonl").write_text(rows)
    longest = max(len(HFTokenizer(model).apply_chat_template([{"role": "user", "content": p}])) for p in prompts)
    common = [
        "--config-name",
        "real_model",
        f"model.restore_from_path={model}",
        "generation.max_new_tokens=8",
        "trainer.dry_run=true",
        f"exp_manager.exp_dir={tmp_path / 'exp'}",
        f"data.heldout_prompts_path={tmp_path / 'p.jsonl'}",
    ]
    main([*common, f"data.train_prompts_path={tmp_path / 'p.jsonl'}"])
    assert f"{longest + 8} positions (the longest prompt read + max_new_tokens)" in capsys.readouterr().out
    assert longest + 8 < 64  # the tiny model's limit: what the estimate used before
    main([*common, f"data.train_prompts_path={tmp_path / 'gone.jsonl'}"])  # data not on this machine
    out = capsys.readouterr().out
    assert "64 positions (an upper bound, the model's limit: set data.max_prompt_tokens" in out
    assert "gone.jsonl: cannot open data file" in out
