"""`reward.source: hf`: a local Hugging Face sequence classifier with one output (a reward model).

The reward model has its own tokenizer: the policy's responses arrive as text and are
re-encoded here, never passed as policy token ids (reward models whose vocabulary differs from
the policy's are the common case). A prompt is a string or a conversation (a list of
{role, content} turns); with a chat template the response is appended as the assistant turn
and the reward tokenizer's own template renders the whole exchange.

Texts longer than `max_length` keep their last tokens (the response is what is judged); each
call logs how many were cut. Batches are sorted by length and filled up to `batch_tokens`
padded tokens.
"""

import json
import logging
import os
from typing import cast

import torch

from nemo_optune.models.hf_io import has_tokenizer

log = logging.getLogger(__name__)


def check_reward_model_dir(path: str, key: str) -> None:
    """Cheap checks every rank runs before any model is built; one line naming the key."""
    config_path = os.path.join(path, "config.json")
    if not os.path.isdir(path):
        raise ValueError(f"config key {key}: {path} is not a directory")
    if not os.path.isfile(config_path):
        raise ValueError(f"config key {key}: {path} has no config.json (a Hugging Face model directory is expected)")
    try:
        config = json.load(open(config_path))
    except (OSError, ValueError) as err:
        raise ValueError(f"config key {key}: {config_path} is not readable JSON ({err})") from None
    architectures = config.get("architectures") or []
    if not any(a.endswith("ForSequenceClassification") for a in architectures):
        raise ValueError(
            f"config key {key}: {config_path} architectures {architectures} has no "
            f"*ForSequenceClassification (a reward model scores a sequence with one output)"
        )
    labels = config.get("num_labels", len(config.get("id2label") or {0: "LABEL_0", 1: "LABEL_1"}))
    if labels != 1:
        raise ValueError(f"config key {key}: {config_path} has {labels} labels; a reward model has exactly 1")
    if not has_tokenizer(path):
        raise ValueError(f"config key {key}: {path} has no tokenizer files; the reward model's own tokenizer is needed")


def pick_device_and_dtype(device: str, dtype: str) -> tuple[torch.device, torch.dtype]:
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    target = torch.device(device)
    if target.type == "cuda" and target.index is None:
        # This rank's GPU by number: scoring runs in a worker thread (rewards/resilient.py), where
        # a bare "cuda" would mean that thread's current device, cuda:0.
        target = torch.device("cuda", torch.cuda.current_device())
    if dtype == "auto":
        bf16 = target.type == "cuda" and torch.cuda.is_bf16_supported()
        return target, torch.bfloat16 if bf16 else torch.float32
    return target, {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]


class HFRewardModel:
    def __init__(self, cfg, key: str = "reward.hf"):
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        check_reward_model_dir(cfg.path, f"{key}.path")
        self.device, self.dtype = pick_device_and_dtype(cfg.device, cfg.dtype)
        self.tokenizer = AutoTokenizer.from_pretrained(cfg.path)
        self.tokenizer.truncation_side = "left"
        self.model = AutoModelForSequenceClassification.from_pretrained(cfg.path, dtype=self.dtype)
        self.model.to(self.device).eval()
        self.text_config = self.model.config.get_text_config()
        self.batch_tokens = cfg.batch_tokens
        self.max_length = cfg.max_length or self.model_limit()
        self.use_chat_template = cfg.apply_chat_template and bool(self.tokenizer.chat_template)
        self.truncated = 0  # texts cut to max_length, over the run

    def model_limit(self) -> int:
        limits = [getattr(self.text_config, "max_position_embeddings", None), self.tokenizer.model_max_length]
        return min(int(n) for n in limits if n is not None and n < 1e9)

    # ------------------------------------------------------------------ text -> ids
    def render(self, prompt, response: str) -> str:
        """The text the reward model reads: its own chat template over the exchange, or
        prompt + response when it has none (or apply_chat_template is off)."""
        if not self.use_chat_template:
            return (prompt if isinstance(prompt, str) else "\n".join(m["content"] for m in prompt)) + response
        turns = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else [dict(m) for m in prompt]
        text = self.tokenizer.apply_chat_template(turns + [{"role": "assistant", "content": response}], tokenize=False)
        return cast(str, text)  # tokenize=False: the rendered string

    def encode(self, prompts: list, responses: list[str]) -> list[list[int]]:
        texts = [self.render(p, r) for p, r in zip(prompts, responses)]
        # A chat template writes its own special tokens (BOS); plain text gets the tokenizer's.
        special = not self.use_chat_template
        ids = self.tokenizer(texts, add_special_tokens=special)["input_ids"]
        long = [i for i, row in enumerate(ids) if len(row) > self.max_length]
        if long:
            cut = self.tokenizer(
                [texts[i] for i in long], add_special_tokens=special, truncation=True, max_length=self.max_length
            )["input_ids"]
            for i, row in zip(long, cut):
                ids[i] = row
            self.truncated += len(long)
            log.warning(
                "reward model: %d of %d texts longer than %d tokens kept their last tokens",
                len(long),
                len(texts),
                self.max_length,
            )
        return ids

    def count_tokens(self, prompts: list, responses: list[str]) -> list[int]:
        """Tokens per pair (the reward server's batching budget)."""
        return [len(row) for row in self.encode(prompts, responses)]

    # ------------------------------------------------------------------ scoring
    def batches(self, lengths: list[int]) -> list[list[int]]:
        """Indices grouped longest first, each group's rows x longest <= batch_tokens (a
        longer single text is a group of its own)."""
        order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
        groups: list[list[int]] = []
        current: list[int] = []
        for i in order:
            if current and (len(current) + 1) * lengths[current[0]] > self.batch_tokens:
                groups.append(current)
                current = []
            current.append(i)
        return groups + [current] if current else groups

    @torch.no_grad()
    def score(self, prompts: list, responses: list[str]) -> list[float]:
        ids = self.encode(prompts, responses)
        rewards = torch.empty(len(ids), dtype=torch.float64)
        for group in self.batches([len(row) for row in ids]):
            rows = [ids[i] for i in group]
            rewards[group] = self.forward(rows).double().cpu()
        return rewards.tolist()

    def forward(self, rows: list[list[int]]) -> torch.Tensor:
        """Scores of right-padded rows. Decoder classifiers read the last token that is not
        the pad id: the configured pad id pools exactly as a forward of each text alone would;
        without one, an id absent from the batch does (each text's own last token)."""
        width = max(len(row) for row in rows)
        pad = self.text_config.pad_token_id
        if pad is None:
            present = {t for row in rows for t in row}
            pad = next(t for t in range(len(present) + 1) if t not in present)
        input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
        for r, row in enumerate(rows):
            input_ids[r, : len(row)] = torch.tensor(row)
            attention_mask[r, : len(row)] = 1
        configured = self.text_config.pad_token_id
        self.text_config.pad_token_id = pad
        try:
            logits = self.model(
                input_ids=input_ids.to(self.device), attention_mask=attention_mask.to(self.device)
            ).logits
        finally:
            self.text_config.pad_token_id = configured
        return logits[:, 0].float()
