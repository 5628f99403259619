"""The verifiable-instructions task: every check on hand-written positive and negative
responses, the reward read back from generated prompts, the prompt sets and their writer."""

import json

import pytest

from nemo_optune.config import DataConfig
from nemo_optune.data import instructions
from nemo_optune.data.instructions import INSTRUCTIONS, found_instructions, follows, instruction_text, score
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
    instructions.main(["--out", str(tmp_path), "--train", "8", "--heldout", "4", "--seed", "3"])
    rows = {n: [json.loads(line) for line in open(tmp_path / f"{n}.jsonl")] for n in ("train", "heldout")}
    data = build_task_data(DataConfig(task="instructions", num_train_prompts=8, num_heldout_prompts=4, seed=3))
    assert [tuple(r["messages"]) for r in rows["train"]] == data.train_prompts
    assert [tuple(r["messages"]) for r in rows["heldout"]] == data.heldout_prompts
