"""Prompt and preference files: JSONL and parquet, prompt strings or chat messages, the
NeMo-Aligner and HF/TRL preference schemas; errors name FILE:LINE."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import TINY

from nemo_optune.config import load_config
from nemo_optune.data.preferences import read_preferences
from nemo_optune.data.prompts import encode_prompt, read_prompts
from nemo_optune.data.records import DataError
from nemo_optune.data.sort_task import SortTask

SYSTEM = {"role": "system", "content": "be brief"}
USER1, USER2 = {"role": "user", "content": "hi"}, {"role": "user", "content": "sort 21"}
BOT1, BOT2 = {"role": "assistant", "content": "hello"}, {"role": "assistant", "content": "12"}


def write(path, rows):
    if str(path).endswith(".parquet"):
        pq.write_table(pa.Table.from_pylist(rows), str(path))
    else:
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.mark.parametrize("suffix", ["jsonl", "parquet"])
def test_prompts_from_strings_and_ultrachat_messages(tmp_path, suffix):
    rows = [
        {"prompt": "321>", "prompt_id": None, "messages": None},
        {"prompt": None, "prompt_id": None, "messages": [SYSTEM, USER1, BOT1, USER2, BOT2]},
        # UltraChat's own rows: `prompt` is the first user turn as plain text; the chat wins
        {"prompt": "hi", "prompt_id": "9f1c", "messages": [USER1, BOT1, USER2, BOT2]},
    ]  # the answer after the last user turn is not prompt
    prompts, where = read_prompts(write(tmp_path / f"p.{suffix}", rows))
    assert prompts == ["321>", (SYSTEM, USER1, BOT1, USER2), (USER1, BOT1, USER2)]
    assert where[1].endswith(":2" if suffix == "jsonl" else ":row 2")


@pytest.mark.parametrize(
    "row,message",
    [
        ({"messages": [SYSTEM, BOT1]}, r"p\.jsonl:1: field 'messages' has no user turn"),
        ({"messages": [{"role": "robot", "content": "x"}]}, r"p\.jsonl:1: messages\[0\] must be"),
        ({"text": "321>"}, r"p\.jsonl:1: needs a string field 'prompt' or a list field 'messages' \(data.prompt_field"),
        ({"prompt": " "}, r"p\.jsonl:1: empty prompt"),
    ],
)
def test_bad_prompt_rows_name_file_and_line(tmp_path, row, message):
    with pytest.raises(DataError, match=message):
        read_prompts(write(tmp_path / "p.jsonl", [row]))


def test_configurable_prompt_fields(tmp_path):
    prompts, _ = read_prompts(write(tmp_path / "p.jsonl", [{"question": "12>"}, {"chat": [USER2]}]), "question", "chat")
    assert prompts == ["12>", (USER2,)]


@pytest.mark.parametrize(
    "row,expected",
    [
        (
            {
                "prompt": "21>",
                "chosen_response": "12",
                "rejected_response": "21",
                "chosen_reward": 1,
                "rejected_reward": 0,
            },
            ("21>", "12", "21", 1.0, 0.0),
        ),
        ({"prompt": "21>", "chosen": "12", "rejected": "21"}, ("21>", "12", "21", None, None)),
        (
            {"prompt": [USER2], "chosen": [BOT2], "rejected": [{"role": "assistant", "content": "21"}]},
            ((USER2,), "12", "21", None, None),
        ),
        (
            {
                "chosen": [SYSTEM, USER2, BOT2],
                "rejected": [SYSTEM, USER2, {"role": "assistant", "content": "2"}],
            },  # implicit prompt
            ((SYSTEM, USER2), "12", "2", None, None),
        ),
        (
            {  # UltraFeedback's rows: `prompt` is the user turn as plain text, the conversations hold the chat
                "prompt": "hi",
                "prompt_id": "9f1c",
                "chosen": [USER1, BOT1, USER2, BOT2],
                "rejected": [USER1, BOT1, USER2, {"role": "assistant", "content": "2"}],
            },
            ((USER1, BOT1, USER2), "12", "2", None, None),
        ),
        (  # responses as assistant turns alone: the string prompt stays
            {"prompt": "21>", "chosen": [BOT2], "rejected": [{"role": "assistant", "content": "2"}]},
            ("21>", "12", "2", None, None),
        ),
    ],
)
def test_preference_schemas(tmp_path, row, expected):
    (record,) = read_preferences(write(tmp_path / "prefs.jsonl", [row]))
    assert (record.prompt, record.chosen, record.rejected, record.chosen_reward, record.rejected_reward) == expected


@pytest.mark.parametrize(
    "row,message",
    [
        ({"chosen": [USER2, BOT2], "rejected": [USER1, BOT2]}, "'chosen' and 'rejected' do not share their turns"),
        ({"prompt": [USER2], "chosen": [USER2], "rejected": [BOT2]}, "field 'chosen' must end with an assistant turn"),
        ({"prompt": "21>", "chosen": "12"}, "missing field 'rejected'"),
        ({"prompt": "21>", "chosen_response": 3, "rejected_response": "1"}, "field 'chosen_response' must be a string"),
    ],
)
def test_bad_preference_rows_name_file_and_line(tmp_path, row, message):
    with pytest.raises(DataError, match=rf"prefs\.jsonl:1: {message}"):
        read_preferences(write(tmp_path / "prefs.jsonl", [row]))


def test_chat_prompts_need_a_chat_template(tmp_path):
    tok = SortTask().tokenizer
    with pytest.raises(DataError, match="f:3: chat-message prompts need a tokenizer with a chat template"):
        encode_prompt((USER2,), tok, False, "f:3")
    with pytest.raises(DataError, match="f:3: data.apply_chat_template=true need a tokenizer with a chat template"):
        encode_prompt("21>", tok, True, "f:3")

    class Templated:
        chat_template = "{{ messages }}"

        def apply_chat_template(self, messages, add_generation_prompt):
            assert add_generation_prompt
            return [len(messages), len(messages[-1]["content"])]

    assert encode_prompt("21>", Templated(), True, "f:3") == [1, 3]
    assert encode_prompt((SYSTEM, USER2), Templated(), False, "f:3") == [2, 7]


def test_online_run_from_prompt_files_and_offline_run_from_trl_schema(sft_checkpoint, tmp_path):
    """Prompt files feed OPTune (40 prompts with batches of 32: the remainder carries) and the
    evaluation (parquet); an offline set in the HF/TRL schema trains exactly like the same
    set in NeMo-Aligner's schema."""
    from nemo_optune.data.task_data import build_task_data
    from nemo_optune.run import run_experiment

    data = build_task_data(load_config("optune_tiny", TINY).data)
    train = write(
        tmp_path / "train.jsonl",
        [
            {"messages": [{"role": "user", "content": p}]} if i % 2 else {"prompt": p}
            for i, p in enumerate(data.train_prompts[:40])
        ],
    )
    heldout = write(tmp_path / "heldout.parquet", [{"prompt": p} for p in data.heldout_prompts])
    base = TINY + [f"model.restore_from_path={sft_checkpoint}"]
    with pytest.raises(DataError, match=r"train\.jsonl:2: chat-message prompts need a tokenizer with a chat template"):
        run_experiment(
            load_config(
                "optune_tiny", base + [f"exp_manager.exp_dir={tmp_path / 'chat'}", f"data.train_prompts_path={train}"]
            )
        )
    write(tmp_path / "train.jsonl", [{"prompt": p} for p in data.train_prompts[:40]])
    summary = run_experiment(
        load_config(
            "optune_tiny",
            base
            + [
                f"exp_manager.exp_dir={tmp_path / 'files'}",
                f"data.train_prompts_path={train}",
                f"data.heldout_prompts_path={heldout}",
                "trainer.iterations=3",
            ],
        )
    )
    assert [it["regenerated"] for it in summary["iterations"]] == [40, 20, 20]
    assert [it["optimizer_steps"] for it in summary["iterations"]] == [1, 1, 1]  # 120 records: 3 batches + 24 carried
    assert summary["heldout_reward_initial"] == pytest.approx(
        run_experiment(
            load_config("optune_tiny", base + [f"exp_manager.exp_dir={tmp_path / 'task'}", "trainer.iterations=1"])
        )["heldout_reward_initial"],
        abs=1e-12,
    )  # the same held-out prompts from a file: the same evaluation

    from nemo_optune.data.preferences import sort_task_preferences, write_preference_jsonl

    records = sort_task_preferences(data.task, data.train_prompts, 0.9, seed=5)
    nemo = str(tmp_path / "nemo.jsonl")
    write_preference_jsonl(nemo, records)
    trl = write(
        tmp_path / "trl.parquet",
        [
            {
                "prompt": r.prompt,
                "chosen": r.chosen,
                "rejected": r.rejected,
                "chosen_reward": r.chosen_reward,
                "rejected_reward": r.rejected_reward,
            }
            for r in records
        ],
    )
    losses = [
        [
            it["train_loss"]
            for it in run_experiment(
                load_config(
                    "dpo_offline", base + [f"exp_manager.exp_dir={tmp_path / name}", f"data.offline_path={path}"]
                )
            )["iterations"]
        ]
        for name, path in (("nemo", nemo), ("trl", trl))
    ]
    assert losses[0] == losses[1]


def test_a_prompt_that_encodes_to_no_tokens_is_refused():
    """A tokenizer that drops every character (no BOS): nothing to continue from."""

    class DropsEverything:
        def encode(self, text, add_special_tokens=True):
            return []

    with pytest.raises(DataError, match=r"p\.jsonl:3: the prompt encodes to no tokens"):
        encode_prompt("\u200b", DropsEverything(), apply_chat_template=False, where="p.jsonl:3")
