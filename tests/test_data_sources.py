"""Prompt sources as users bring them (docs/data_sources.md): globs and directories of shards,
`datasets` save_to_disk directories, weighted mixtures; the rows' other columns and `truncated`
reaching reward functions by keyword, in process and through the reward server; reward shaping."""

import json
import os

import pyarrow as pa
import pytest
import torch
from conftest import TINY

from nemo_optune.config import ConfigError, DataConfig, PromptSourceConfig, RewardConfig, load_config
from nemo_optune.data.make_sort_prompts import write_sort_prompts
from nemo_optune.data.prompts import configured_prompts, mix_prompt_sets, read_prompt_set
from nemo_optune.data.records import DataError, write_records
from nemo_optune.rewards.python_function import PythonFunctionReward, RewardFunctionError
from nemo_optune.rewards.shaping import shape_rewards


def save_to_disk_layout(directory, rows: list[dict], shards: int = 2) -> str:
    """What `Dataset.save_to_disk(directory, num_shards=shards)` writes (datasets 5.2.0): Arrow IPC
    stream shards listed in state.json, beside dataset_info.json."""
    os.makedirs(directory)
    table = pa.Table.from_pylist(rows)
    per = -(-len(rows) // shards)
    names = [f"data-{i:05d}-of-{shards:05d}.arrow" for i in range(shards)]
    for i, name in enumerate(names):
        with pa.ipc.new_stream(os.path.join(directory, name), table.schema) as writer:
            writer.write_table(table.slice(i * per, per))
    state = {"_data_files": [{"filename": n} for n in names], "_fingerprint": "0", "_split": None}
    with open(os.path.join(directory, "state.json"), "w") as f:
        json.dump(state, f)
    with open(os.path.join(directory, "dataset_info.json"), "w") as f:
        json.dump({"features": {}}, f)
    return str(directory)


ROWS = [{"prompt": f"{9 - i}{i}>", "reference": f"{i}{9 - i}", "id": i} for i in range(7)]


def test_every_kind_of_source_reads_the_same_rows_in_order(tmp_path):
    shards = tmp_path / "shards"
    shards.mkdir()
    write_records(str(shards / "train-00000-of-00002.parquet"), ROWS[:4])
    write_records(str(shards / "train-00001-of-00002.jsonl"), ROWS[4:])
    (shards / "README.md").write_text("not data")
    saved = save_to_disk_layout(tmp_path / "saved", ROWS, shards=3)
    for source in (str(shards), str(shards / "train-*"), saved):
        read = read_prompt_set(source)
        assert read.prompts == [r["prompt"] for r in ROWS], source
        assert read.columns == {"reference": [r["reference"] for r in ROWS], "id": list(range(7))}
    assert read_prompt_set(str(shards)).where[4] == f"{shards}/train-00001-of-00002.jsonl:1"
    assert read_prompt_set(saved).where[3] == f"{saved}/data-00001-of-00003.arrow:row 1"


def test_the_real_datasets_save_to_disk_reads_the_same(tmp_path):
    datasets = pytest.importorskip("datasets")  # the trl extra's datasets==5.2.0

    shuffled = datasets.Dataset.from_list(ROWS).shuffle(seed=3)  # an indices mapping, flattened on save
    shuffled.save_to_disk(str(tmp_path / "saved"), num_shards=2)
    read = read_prompt_set(str(tmp_path / "saved"))
    assert read.prompts == shuffled["prompt"] and read.columns["reference"] == shuffled["reference"]


def dataset_dict(d):
    (d / "dataset_dict.json").write_text('{"splits": ["train"]}')
    (d / "train").mkdir()
    return str(d)


def bad_state(d):
    (d / "state.json").write_text("{}")
    return str(d)


def bad_second_shard(d):
    write_records(str(d / "a.jsonl"), ROWS)
    write_records(str(d / "b.jsonl"), [{"q": 1}])
    return str(d)


@pytest.mark.parametrize(
    "make,message",
    [
        (lambda d: str(d / "none-*.parquet"), r"none-\*\.parquet: no files match this pattern"),
        (str, r": directory has no \.parquet / \.jsonl / \.json files"),
        (dataset_dict, r": a datasets DatasetDict; give one split's directory \(train\)"),
        (bad_state, r"state\.json: not a datasets save_to_disk state"),
        (bad_second_shard, r"b\.jsonl:1: needs a string field 'prompt' or a list field 'messages'"),
    ],
    ids=["glob", "empty-dir", "dataset-dict", "bad-state", "bad-row-in-2nd-shard"],
)
def test_a_bad_source_is_one_line_naming_it(tmp_path, make, message):
    with pytest.raises(DataError, match=message):
        read_prompt_set(make(tmp_path))


def test_preference_sets_come_from_the_same_kinds_of_source(tmp_path):
    from nemo_optune.data.preferences import read_preferences

    rows = [{"prompt": r["prompt"], "chosen": r["reference"], "rejected": r["prompt"][:2]} for r in ROWS]
    write_records(str(tmp_path / "all.jsonl"), rows)
    (tmp_path / "shards").mkdir()
    write_records(str(tmp_path / "shards" / "p-0.parquet"), rows[:3])
    write_records(str(tmp_path / "shards" / "p-1.jsonl"), rows[3:])

    def pairs(source):
        return [(r.prompt, r.chosen, r.rejected) for r in read_preferences(source)]

    expected = pairs(str(tmp_path / "all.jsonl"))
    assert len(expected) == 7
    assert pairs(str(tmp_path / "shards")) == pairs(save_to_disk_layout(tmp_path / "saved", rows)) == expected


def test_a_reserved_column_names_the_source(tmp_path):
    path = str(tmp_path / "p.jsonl")
    write_records(path, [{"prompt": "1>", "truncated": False}])
    with pytest.raises(DataError, match=r"p\.jsonl: column 'truncated' is reserved"):
        configured_prompts(DataConfig(train_prompts_path=path), "train")


def test_a_3_to_1_mixture_draws_3_to_1_deterministically(tmp_path):
    a, b = str(tmp_path / "a.jsonl"), str(tmp_path / "b.parquet")
    write_records(a, [{"prompt": f"a{i}>", "reference": str(i)} for i in range(100)])
    write_records(b, [{"question": f"b{i}>"} for i in range(10)])
    cfg = DataConfig(
        num_train_prompts=4000,
        train_sources=[PromptSourceConfig(path=a, weight=3.0), PromptSourceConfig(path=b, prompt_field="question")],
    )
    mixed = configured_prompts(cfg, "train")
    from_a = sum(p.startswith("a") for p in mixed.prompts)
    # Binomial(4000, 3/4): sd 27 draws; the draw is fixed by data.seed, so this cannot flake.
    assert abs(from_a / 4000 - 0.75) < 0.02, from_a
    assert mixed.columns["reference"][mixed.prompts.index("a5>")] == "5"
    assert all(r is None for p, r in zip(mixed.prompts, mixed.columns["reference"]) if p.startswith("b"))
    # Each source's rows in shuffled passes: b's 10 rows each appear equally often, pass by pass.
    b_draws = [p for p in mixed.prompts if p.startswith("b")]
    for start in range(0, len(b_draws) - 9, 10):
        assert sorted(b_draws[start : start + 10]) == sorted(f"b{i}>" for i in range(10))
    assert configured_prompts(cfg, "train") == mixed
    cfg.seed += 1
    assert configured_prompts(cfg, "train").prompts != mixed.prompts
    assert configured_prompts(cfg, "heldout") is None  # no held-out sources: the task's prompts


def test_mixture_counts_follow_the_documented_draw():
    """random.Random(seed).choices over the weights decides each draw's source."""
    import random

    sets = [read_set(["x>"]), read_set(["y>"])]
    mixed = mix_prompt_sets(sets, [3.0, 1.0], 50, seed=11)
    picks = random.Random(11).choices(range(2), weights=[3.0, 1.0], k=50)
    assert mixed.prompts == [["x>", "y>"][i] for i in picks]


def read_set(prompts):
    from nemo_optune.data.prompts import PromptSet

    return PromptSet(prompts, ["t"] * len(prompts))


@pytest.mark.parametrize(
    "overrides,message",
    [
        (
            ["data.train_prompts_path=a.jsonl", "data.train_sources=[{path: b.jsonl}]"],
            "config key data.train_sources: give either data.train_prompts_path",
        ),
        (
            ["data.heldout_sources=[{weight: 2}]"],
            "config key data.heldout_sources[0].path: a prompt source needs a path",
        ),
        (["data.train_sources=[{path: a, weight: 0}]"], "config key data.train_sources[0].weight: must be > 0"),
        (["reward.length_penalty=0.1"], "config key reward.target_length: reward.length_penalty=0.1 needs"),
        (["reward.missing_eos_penalty=-1"], "config key reward.missing_eos_penalty: must be >= 0"),
        (["reward.sources=[{name: length_penalty}]"], "config key reward.sources: 'length_penalty' names the reward"),
    ],
)
def test_bad_source_and_shaping_keys_name_the_key(overrides, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace(".", r"\.")):
        load_config("optune_tiny", overrides)


def test_the_reward_server_refuses_shaping_keys():
    from nemo_optune.serve_reward import ServeRewardConfig, validate_serve

    cfg = ServeRewardConfig(reward=RewardConfig(missing_eos_penalty=1.0))
    with pytest.raises(ConfigError, match="config key reward.missing_eos_penalty: reward shaping is applied by the"):
        validate_serve(cfg)


def test_shaping_subtracts_the_penalties_once():
    rewards = torch.tensor([1.0, 0.5, float("nan"), 0.0], dtype=torch.float64)
    truncated = torch.tensor([False, True, True, False])
    lengths = torch.tensor([3, 10, 10, 6])
    shaped, penalties = shape_rewards(rewards, truncated, lengths, 0.25, 0.1, 4)
    # length: 0, 6, 6 and 2 tokens beyond 4; missing EOS: rows 1 and 2
    expected = torch.tensor([1.0, 0.5 - 0.25 - 0.6, float("nan"), 0.0 - 0.2], dtype=torch.float64)
    assert torch.allclose(shaped, expected, equal_nan=True)
    assert penalties["missing_eos_penalty"].tolist() == [0.0, 0.25, 0.25, 0.0]
    assert torch.allclose(penalties["length_penalty"], torch.tensor([0.0, 0.6, 0.6, 0.2], dtype=torch.float64))
    unshaped, none = shape_rewards(rewards, truncated, lengths, None, 0.0, None)
    assert torch.equal(unshaped.nan_to_num(), rewards.nan_to_num()) and none == {}


def test_a_reward_function_gets_the_keywords_its_signature_names():
    fn = PythonFunctionReward("reward_functions:sort_reference_reward")
    columns = {"reference": ["12", "123"], "id": [0, 1], "truncated": [False, True]}
    assert fn.score(["21>", "321>"], ["12", "12"], **columns) == [1.0, 2 / 3]  # `id` not passed: not a parameter
    fn.check_columns({"reference", "truncated"})
    with pytest.raises(RewardFunctionError, match="requires keyword 'reference', which the prompts do not provide"):
        fn.check_columns({"id", "truncated"})
    everything = PythonFunctionReward("reward_functions:keywords_seen")
    assert everything.score(["1>"], ["1"], **{k: v[:1] for k, v in columns.items()}) == [3.0]  # **kwargs: all
    assert PythonFunctionReward("reward_functions:sort_reward").score(["21>"], ["12"], **columns) == [1.0]


def test_the_server_batches_requests_with_different_columns():
    """Requests scored together: each column of any of them, None for a request without it."""
    import asyncio

    from nemo_optune.serve_reward import Batcher

    calls = []

    class Sources:
        sources: list = []

        def score(self, prompts, responses, **columns):
            calls.append(columns)
            return [float(len(r)) for r in responses]

    async def two_requests():
        batcher = Batcher(Sources(), max_batch_tokens=1000, max_wait_seconds=0.0)
        first = batcher.submit(["1>"], ["1"], {"reference": ["1"]}, 1)
        second = batcher.submit(["32>", "2>"], ["23", "2"], {}, 2)
        await batcher._score(batcher._take())
        return await first, await second

    assert asyncio.run(two_requests()) == ([1.0], [2.0, 1.0])
    assert calls == [{"reference": ["1", None, None]}]


def final_pool(exp_dir) -> dict:
    from test_reward_http_run import final_pool as newest

    return newest(exp_dir)


class SortRuns:
    """The sort task's prompts with their answers as a `reference` column, written as a directory
    of parquet shards, a save_to_disk directory and a held-out file, and the built-in task run
    (task prompts, task reward) that runs from them must equal to the bit."""

    def __init__(self, sft_checkpoint, root):
        self.root = root
        self.base = TINY + [f"model.restore_from_path={sft_checkpoint}", "trainer.iterations=1"]
        files = write_sort_prompts(str(root / "sort"), load_config("optune_tiny", TINY).data, shards=3)
        self.shards, self.heldout = str(root / "sort" / "train"), files[-1]
        self.saved = save_to_disk_layout(root / "saved", read_rows(files[:-1]), shards=2)
        self.task, self.task_pool = self.run("task", [])

    def run(self, name, overrides):
        from nemo_optune.run import run_experiment

        exp = self.root / name
        summary = run_experiment(load_config("optune_tiny", self.base + [f"exp_manager.exp_dir={exp}"] + overrides))
        return summary, final_pool(exp)

    def assert_equals_the_task_run(self, name, overrides):
        summary, pool = self.run(name, overrides)
        for a, b in zip(self.task["iterations"], summary["iterations"]):
            assert (a["heldout_reward"], a["train_loss"]) == (b["heldout_reward"], b["train_loss"]), name
        for key, value in self.task_pool.items():
            assert torch.equal(value, pool[key]), (name, key)


@pytest.fixture(scope="module")
def sort_runs(sft_checkpoint, tmp_path_factory):
    return SortRuns(sft_checkpoint, tmp_path_factory.mktemp("sort_runs"))


REFERENCE_REWARD = ["reward.source=python", "reward.function=reward_functions:sort_reference_reward"]


def test_optune_from_parquet_shards_with_a_reference_reward_equals_the_task_run(sort_runs):
    sort_runs.assert_equals_the_task_run(
        "shards",
        [f"data.train_prompts_path={sort_runs.shards}", f"data.heldout_prompts_path={sort_runs.heldout}"]
        + REFERENCE_REWARD,
    )


def test_optune_from_save_to_disk_and_through_the_reward_server_equals_the_task_run(sort_runs):
    from test_reward_http_run import start_server

    sort_runs.assert_equals_the_task_run(
        "saved", [f"data.train_prompts_path={sort_runs.saved}", f"data.heldout_prompts_path={sort_runs.heldout}"]
    )
    server, url = start_server(function="reward_functions:sort_reference_reward")
    try:
        sort_runs.assert_equals_the_task_run(
            "http",
            [
                f"data.train_prompts_path={sort_runs.shards}/train-*.parquet",
                f"data.heldout_prompts_path={sort_runs.heldout}",
                "reward.source=http",
                f"reward.http.urls=[{url}]",
            ],
        )
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_a_3_to_1_mixture_run_pays_the_missing_eos_penalty_of_cut_responses(sort_runs, tmp_path):
    other = str(tmp_path / "other.jsonl")
    write_records(other, [{"prompt": p} for p in data_prompts(seed=99)])
    penalty = 0.5
    mixed, _ = sort_runs.run(
        "mixed",
        [
            f"data.train_sources=[{{path: {sort_runs.saved}, weight: 3}}, {{path: {other}, weight: 1}}]",
            f"reward.missing_eos_penalty={penalty}",
            "generation.max_new_tokens=9",  # the longest answer and its EOS just fit: longer responses are cut
        ],
    )
    cut = 0.0
    for it in mixed["iterations"]:
        c = it["completions"]
        assert it["reward_by_source"]["missing_eos_penalty"] == pytest.approx(penalty * (1 - c["eos_rate"]), abs=1e-9)
        cut += 1 - c["eos_rate"]
    assert cut > 0  # some responses were cut, and paid
    assert mixed["iterations"][0]["regenerated"] == 64  # data.num_train_prompts drawn from the mixture


def read_rows(paths: list[str]) -> list[dict]:
    import pyarrow.parquet as pq

    return [row for p in paths for row in pq.read_table(p).to_pylist()]


def data_prompts(seed: int) -> list[str]:
    from nemo_optune.data.task_data import build_task_data

    return build_task_data(DataConfig(num_train_prompts=32, num_heldout_prompts=1, seed=seed)).train_prompts
