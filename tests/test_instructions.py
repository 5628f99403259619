"""The verifiable-instructions task: every check on hand-written positive and negative
responses, the reward read back from generated prompts, the prompt sets and their writer."""

import json
import os

import pytest
from conftest import ROOT

from nemo_optune.config import ConfigError, DataConfig, load_config, sort_task_in_use
from nemo_optune.data import instructions, make_instruction_prompts
from nemo_optune.data.instructions import INSTRUCTIONS, follows, found_instructions, instruction_text, score
from nemo_optune.data.task_data import build_task_data
from nemo_optune.rewards.instructions import reward
from nemo_optune.rewards.python_function import PythonFunctionReward

# kind -> (parameter, responses that follow it, responses that do not)
CASES = {
    "max_words": ("5", ["one two three four five", "Short."], ["one two three four five six", "", "   "]),
    "no_commas": (None, ["No commas here.", "a; b: c"], ["Yes, indeed.", ""]),
    "lowercase": (None, ["all small letters here.", "ok 123"], ["Not all small.", "123 !", ""]),
    "uppercase": (None, ["ALL CAPS HERE.", "OK 123"], ["ALL CAPS but one", "123"]),
    "keyword": ("river", ["The River runs.", "a river, wide"], ["The riverbank.", "rivers flow", ""]),
    "start_word": ("yes", ["Yes, of course.", "yes it is", "  YES!"], ["Oh yes.", "yesterday was fine", ""]),
    "end_phrase": ("That is all.", ["Done. That is all.", "That is all.\n"], ["That is all", "That is all. Bye"]),
    "bullets": ("2", ["- a\n- b", "Intro:\n* one\n  - two"], ["- a\n- b\n- c", "-a\n-b", "1. a\n2. b"]),
    "json": (None, ['{"a": 1}', '```json\n{"a": [1, 2]}\n```', "[1, 2]"], ["{a: 1}", "Sure: {}", ""]),
}


def test_every_kind_has_cases():
    assert set(CASES) == set(INSTRUCTIONS)


@pytest.mark.parametrize("kind", sorted(CASES))
def test_check_on_hand_written_responses(kind):
    parameter, good, bad = CASES[kind]
    text = instruction_text(kind, parameter)
    assert found_instructions(f"Describe a cat. {text}") == [(kind, parameter or "")]
    for response in good:
        assert follows(kind, parameter or "", response), (kind, response)
        assert score(f"Describe a cat. {text}", response) == 1.0
    for response in bad:
        assert not follows(kind, parameter or "", response), (kind, response)
        assert score(f"Describe a cat. {text}", response) == 0.0


def test_reward_is_the_share_of_instructions_followed():
    prompt = [
        {"role": "system", "content": 'Use at most 2 words. Include the word "river".'},  # not the user's
        {"role": "user", "content": "Describe a lake."},
        {"role": "assistant", "content": "A lake."},
        {"role": "user", "content": 'Describe a river. Use at most 3 words. Include the word "green".'},
    ]
    assert reward([prompt, prompt, prompt], ["Green water.", "Blue river water flows.", "A green river flows."]) == [
        1.0,
        0.0,
        0.5,
    ]
    assert reward(["Use at most 3 words. Do not use any commas."], ["Yes, two."]) == [0.5]  # a text prompt
    with pytest.raises(ValueError, match="no instruction found"):
        reward(["Describe a lake."], ["A lake."])


def test_python_reward_source_imports_it():
    source = PythonFunctionReward("nemo_optune.rewards.instructions:reward")
    assert source.score(["Do not use any commas."], ["a, b"]) == [0.0]


def test_prompt_sets_are_deterministic_disjoint_and_scorable():
    cfg = DataConfig(task="instructions", num_train_prompts=64, num_heldout_prompts=32, seed=3)
    a, b = build_task_data(cfg), build_task_data(cfg)
    assert a.train_prompts == b.train_prompts and a.heldout_prompts == b.heldout_prompts
    assert build_task_data(DataConfig(task="instructions", seed=4)).train_prompts[:64] != a.train_prompts
    texts = [p[-1]["content"] for p in a.train_prompts + a.heldout_prompts]
    assert len(set(texts)) == len(texts)  # distinct, and no held-out prompt is trained on
    kinds = set()
    for prompt in a.train_prompts + a.heldout_prompts:
        found = found_instructions(prompt[-1]["content"])
        assert 1 <= len(found) <= 2
        assert frozenset(k for k, _ in found) not in instructions.CONFLICTS
        kinds.update(k for k, _ in found)
        assert 0.0 <= a.task.reward(prompt, "- a\n- b") <= 1.0
    assert kinds == set(INSTRUCTIONS)


def test_writer_command(tmp_path):
    make_instruction_prompts.main(["--out", str(tmp_path), "--train", "8", "--heldout", "4", "--seed", "3"])
    rows = {n: [json.loads(line) for line in open(tmp_path / f"{n}.jsonl")] for n in ("train", "heldout")}
    data = build_task_data(DataConfig(task="instructions", num_train_prompts=8, num_heldout_prompts=4, seed=3))
    assert [tuple(r["messages"]) for r in rows["train"]] == data.train_prompts
    assert [tuple(r["messages"]) for r in rows["heldout"]] == data.heldout_prompts


def test_through_the_reward_server():
    from fastapi.testclient import TestClient

    from nemo_optune.config import RewardConfig
    from nemo_optune.rewards.sources import RewardSources
    from nemo_optune.serve_reward import ServerConfig, build_app

    sources = RewardSources(RewardConfig(source="python", function="nemo_optune.rewards.instructions:reward"), None)
    chat = [{"role": "user", "content": 'Describe a lake. Do not use any commas. Include the word "green".'}]
    with TestClient(build_app(sources, ServerConfig(), None)) as client:
        answer = client.post(
            "/score", json={"prompts": [chat, "Use at most 2 words."], "responses": ["a, green", "ok"]}
        )
    assert answer.status_code == 200 and answer.json()["rewards"] == [0.5, 1.0]


HF_CONFIG = os.path.join(ROOT, "examples", "hf_configs", "zephyr-7b-sft-full")  # a config.json is enough to validate


def test_real_model_recipes_validate_without_any_sort_task_setting():
    for recipe in ("real_model", "demo_real"):
        cfg = load_config(recipe, [f"model.restore_from_path={HF_CONFIG}", "generation.max_new_tokens=4"])
        assert cfg.data.task == "instructions" and not sort_task_in_use(cfg)
        assert cfg.reward.function == "nemo_optune.rewards.instructions:reward" and cfg.data.apply_chat_template
    files = ["data.train_prompts_path=p.jsonl", "data.heldout_prompts_path=p.jsonl"]
    python = ["reward.source=python", "reward.function=nemo_optune.rewards.instructions:reward"]
    real = [f"model.restore_from_path={HF_CONFIG}", "generation.max_new_tokens=4"]
    assert not sort_task_in_use(load_config("optune_tiny", files + python + real))
    for without in (files, python, real[:1]):  # task prompts, task reward, or the built-in model: the sort task
        overrides = [o for o in files + python + real if o not in without]
        with pytest.raises(ConfigError, match="generation.max_new_tokens: 4 cannot hold the sort task's longest"):
            load_config("optune_tiny", overrides)


def test_the_instructions_task_needs_a_pretrained_model():
    with pytest.raises(ConfigError, match="config key data.task: instructions needs a pretrained chat model"):
        load_config("optune_tiny", ["data.task=instructions"])
    with pytest.raises(ConfigError, match="config key data.task: 'poems' is not one of sort, instructions"):
        load_config("optune_tiny", ["data.task=poems"])


def test_the_kinds_drawn_are_configurable():
    data = build_task_data(DataConfig(task="instructions", instructions=["no_commas", "keyword"], seed=5))
    found = {k for p in data.train_prompts + data.heldout_prompts for k, _ in found_instructions(p[-1]["content"])}
    assert found == {"no_commas", "keyword"}
    with pytest.raises(ConfigError, match="config key data.instructions: 'haiku' is not one of max_words, no_commas"):
        load_config("optune_tiny", ["data.instructions=[no_commas,haiku]"])
