"""`reward.source: hf` and combined sources: a tiny random reward classifier built here, with a
tokenizer of its own (not the policy's), scored against a direct transformers forward; weights
and per-source logs; scoring placement (once per model-parallel group) under TP2 x DP2."""

import json
import os
import re

import pytest
import torch
from conftest import TINY

from nemo_optune.config import ConfigError, HFRewardConfig, RewardConfig, load_config
from nemo_optune.data.sort_task import SortTask
from nemo_optune.rewards.hf_model import HFRewardModel, check_reward_model_dir
from nemo_optune.rewards.sources import RewardSources

REWARD_TEMPLATE = "{% for m in messages %}[{{ m['role'] | upper }}] {{ m['content'] }}\n{% endfor %}"


def make_reward_model(directory, pad: bool = True, template: bool = True, layers: int = 2, hidden: int = 32):
    """A byte-level BPE tokenizer (its own vocabulary and chat markup) and a random Llama
    sequence classifier with one output."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForSequenceClassification, PreTrainedTokenizerFast

    task = SortTask()
    texts = [p + task.target(p) + " is sorted, [USER] [ASSISTANT]" for p in task.prompts(300, seed=5)]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(
        texts, trainers.BpeTrainer(vocab_size=200, special_tokens=["<pad>", "<s>", "</s>"], show_progress=False)
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>" if pad else None,
        chat_template=REWARD_TEMPLATE if template else None,
    )
    tokenizer.save_pretrained(directory)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=3 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=8,
        num_key_value_heads=4,
        max_position_embeddings=512,
        num_labels=1,
        pad_token_id=0 if pad else None,
        bos_token_id=1,
        eos_token_id=2,
    )
    torch.manual_seed(3)
    model = LlamaForSequenceClassification(config)
    with torch.no_grad():
        model.score.weight.normal_(0, 1.0)  # spread the scores so a pooling mix-up shows
    model.save_pretrained(directory)
    return str(directory)


def direct_scores(directory, texts, max_length=None, special=False):
    """One transformers forward per text, unpadded: what a user would compute by hand."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(directory)
    model = AutoModelForSequenceClassification.from_pretrained(directory).eval()
    scores = []
    with torch.no_grad():
        for text in texts:
            ids = tokenizer(text, add_special_tokens=special)["input_ids"]
            ids = ids[-max_length:] if max_length else ids
            scores.append(float(model(input_ids=torch.tensor([ids])).logits[0, 0]))
    return scores


PROMPTS = [
    "3141>",
    [{"role": "system", "content": "sort the digits"}, {"role": "user", "content": "98765432>"}],
    "70>",
    [{"role": "user", "content": "5551>"}],
    "123456789>",
    "8>",
]
RESPONSES = ["1134", "23456789", "07", "1555 and more words", "123456789", ""]


@pytest.mark.parametrize("pad", [True, False], ids=["pad-id", "no-pad-id"])
def test_scores_equal_a_direct_forward_of_each_text(tmp_path, pad):
    path = make_reward_model(tmp_path / "rm", pad=pad)
    rm = HFRewardModel(HFRewardConfig(path=path, batch_tokens=40, device="cpu"))
    scores = rm.score(PROMPTS, RESPONSES)
    # The reward model's own template renders the exchange; the policy's markup never appears.
    texts = [
        rm.tokenizer.apply_chat_template(
            ([{"role": "user", "content": p}] if isinstance(p, str) else p) + [{"role": "assistant", "content": r}],
            tokenize=False,
        )
        for p, r in zip(PROMPTS, RESPONSES)
    ]
    assert texts[1] == "[SYSTEM] sort the digits\n[USER] 98765432>\n[ASSISTANT] 23456789\n"
    expected = direct_scores(path, texts)
    assert max(abs(a - b) for a, b in zip(scores, expected)) < 1e-5
    assert len(rm.batches([len(ids) for ids in rm.encode(PROMPTS, RESPONSES)])) > 1  # several padded batches
    assert len(set(round(s, 4) for s in scores)) == len(scores)  # distinct: a row mix-up would show


def test_without_a_chat_template_prompt_and_response_are_concatenated(tmp_path):
    path = make_reward_model(tmp_path / "rm", template=False)
    rm = HFRewardModel(HFRewardConfig(path=path, device="cpu"))
    prompts, responses = ["3141>", "70>"], ["1134", "07"]
    expected = direct_scores(path, ["3141>1134", "70>07"], special=True)
    assert max(abs(a - b) for a, b in zip(rm.score(prompts, responses), expected)) < 1e-5


def test_long_texts_keep_their_last_tokens(tmp_path):
    path = make_reward_model(tmp_path / "rm")
    rm = HFRewardModel(HFRewardConfig(path=path, max_length=6, device="cpu"))
    texts = [rm.render(p, r) for p, r in zip(PROMPTS, RESPONSES)]
    assert (
        max(abs(a - b) for a, b in zip(rm.score(PROMPTS, RESPONSES), direct_scores(path, texts, max_length=6))) < 1e-5
    )
    assert rm.truncated == sum(len(rm.tokenizer(t, add_special_tokens=False)["input_ids"]) > 6 for t in texts) > 0


def test_a_directory_that_is_not_a_reward_model_is_refused_with_the_key(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    with pytest.raises(ValueError, match="config key K: .*missing is not a directory"):
        check_reward_model_dir(str(tmp_path / "missing"), "K")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="config key K: .*has no config.json"):
        check_reward_model_dir(str(tmp_path / "empty"), "K")
    LlamaForCausalLM(
        LlamaConfig(vocab_size=16, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)
    ).save_pretrained(tmp_path / "lm")
    with pytest.raises(ValueError, match=r"config key K: .* has no \*ForSequenceClassification"):
        check_reward_model_dir(str(tmp_path / "lm"), "K")
    path = make_reward_model(tmp_path / "rm")
    config = json.load(open(os.path.join(path, "config.json")))
    json.dump(
        {**config, "id2label": {"0": "a", "1": "b"}, "num_labels": 2}, open(os.path.join(path, "config.json"), "w")
    )
    with pytest.raises(ValueError, match="config key K: .* has 2 labels; a reward model has exactly 1"):
        check_reward_model_dir(path, "K")
    json.dump(config, open(os.path.join(path, "config.json"), "w"))
    os.remove(os.path.join(path, "tokenizer.json"))
    os.remove(os.path.join(path, "tokenizer_config.json"))
    os.remove(os.path.join(path, "chat_template.jinja"))
    with pytest.raises(ValueError, match="config key K: .* has no tokenizer files"):
        check_reward_model_dir(path, "K")


def test_weighted_sources_sum_and_keep_their_columns():
    from nemo_optune.config import RewardSourceConfig

    cfg = RewardConfig(
        sources=[
            RewardSourceConfig(source="task", weight=0.5),
            RewardSourceConfig(
                source="python", name="length", weight=-2.0, function="reward_functions:response_length"
            ),
        ]
    )
    sources = RewardSources(cfg, SortTask())
    prompts, responses = ["3141>", "70>", "8>"], ["1134", "70", "88"]
    columns = sources.score_columns(prompts, responses)
    task = [SortTask().reward(p, r) for p, r in zip(prompts, responses)]
    assert columns.tolist() == [[t, float(len(r))] for t, r in zip(task, responses)]
    assert sources.score(prompts, responses) == [0.5 * t - 2.0 * len(r) for t, r in zip(task, responses)]
    assert sources.names == ["task", "length"]


@pytest.mark.parametrize(
    "override, key",
    [
        ("reward.sources=[{source: task}, {source: hf}]", "reward.sources[1].hf.path"),
        ("reward.sources=[{source: http, http: {urls: [localhost:1]}}]", "reward.sources[0].http.urls"),
        ("reward.sources=[{source: python}]", "reward.sources[0].function"),
        ("reward.sources=[{source: bleu}]", "reward.sources[0].source"),
    ],
)
def test_a_bad_source_is_named_by_its_key(override, key):
    with pytest.raises(ConfigError, match=f"config key {re.escape(key)}:"):
        load_config("optune_tiny", [override])


def test_a_dry_run_checks_the_reward_model_directory(tmp_path):
    from nemo_optune.run import run_experiment

    with pytest.raises(ValueError, match="config key reward.sources.1..hf.path: .*absent is not a directory"):
        run_experiment(
            load_config(
                "optune_tiny",
                [
                    "trainer.dry_run=true",
                    f"exp_manager.exp_dir={tmp_path}",
                    f"reward.sources=[{{source: task}}, {{source: hf, hf: {{path: {tmp_path}/absent}}}}]",
                ],
            )
        )


def test_a_single_source_and_a_list_together_are_refused():
    with pytest.raises(ConfigError, match="config key reward.sources: give either reward.source"):
        load_config("optune_tiny", ["reward.source=python", "reward.function=a:b", "reward.sources=[{source: task}]"])


def test_optune_with_a_task_reward_and_a_reward_model_logs_each(sft_checkpoint, tmp_path):
    """Two sources in a run: the held-out reward is the weighted sum of the per-source means."""
    from nemo_optune.run import run_experiment

    path = make_reward_model(tmp_path / "rm")
    summary = run_experiment(
        load_config(
            "optune_tiny",
            TINY
            + [
                f"exp_manager.exp_dir={tmp_path / 'exp'}",
                f"model.restore_from_path={sft_checkpoint}",
                f"reward.sources=[{{source: task}}, {{source: hf, name: rm, weight: 0.25, hf: {{path: {path}}}}}]",
            ],
        )
    )
    for record in summary["iterations"]:
        by_source = record["heldout_reward_by_source"]
        assert set(by_source) == set(record["reward_by_source"]) == {"task", "rm"}
        assert abs(record["heldout_reward"] - (by_source["task"] + 0.25 * by_source["rm"])) < 1e-6
        assert 0 <= by_source["task"] <= 1 and by_source["rm"] != 0


def _placement_worker(rank, world, port, out_dir):
    from parallel_harness import _env

    _env(rank, world, port)
    os.environ["REWARD_CALL_LOG"] = str(out_dir)
    from nemo_optune.rewards.resilient import RewardSourceError
    from nemo_optune.runtime.distributed import initialize, shutdown

    layout = initialize(tp=2, pp=1, seed=0)
    responses = ["x" * (3 * layout.dp_rank + i) for i in range(3)]  # each DP rank its own share
    logged = RewardSources(
        RewardConfig(source="python", function="reward_functions:logged_length"), SortTask(), load=False
    )
    rollout = ({}, torch.zeros(3, dtype=torch.bool), torch.tensor([len(r) for r in responses]))  # columns, cut, lengths
    total, _ = logged.score_once_per_model_parallel_group(["p"] * 3, responses, *rollout)
    failing = RewardSources(
        RewardConfig(source="python", function="reward_functions:fails_on_rank_2", retries=0), SortTask()
    )
    try:
        failing.score_once_per_model_parallel_group(["p"] * 3, responses, *rollout)
        outcome = "scored"
    except RewardSourceError as err:
        outcome = str(err)
    (out_dir / f"result{rank}.json").write_text(
        json.dumps({"dp_rank": layout.dp_rank, "total": total.tolist(), "failure": outcome})
    )
    shutdown()  # process groups left to the interpreter's exit can abort it ("terminate called ...")


def test_rewards_are_scored_once_per_model_parallel_group_and_failures_stop_every_rank(tmp_path):
    """TP2 x DP2: ranks 0 and 2 score their DP share, ranks 1 and 3 receive it; when rank 2's
    source fails, all four ranks raise its error (none waits in a later collective)."""
    from parallel_harness import _spawn

    from nemo_optune.runtime.distributed import free_port

    _spawn(_placement_worker, (4, free_port(), tmp_path), 4)
    assert sorted(p.name for p in tmp_path.glob("rank*")) == ["rank0", "rank2"]
    assert all((tmp_path / name).read_text() == "3\n" for name in ("rank0", "rank2"))  # one call of 3 pairs each
    results = [json.loads((tmp_path / f"result{r}.json").read_text()) for r in range(4)]
    for r in results:
        assert r["total"] == [3.0 * r["dp_rank"] + i for i in range(3)]
        assert r["failure"].startswith(
            "reward source 'fails_on_rank_2' failed 1 times (last: ValueError: the scorer of rank 2"
        )
