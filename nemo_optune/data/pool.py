"""The OPTune prompt pool: per training prompt, its current preference pair, the pair's
rewards and the cached reference log-probs. Replicated on every rank (see docs/cluster.md,
'What is communicated'), so selection and weight normalisation need no communication."""

import dataclasses

import torch


@dataclasses.dataclass
class PromptPool:
    chosen_tokens: torch.Tensor  # [N, R] long
    chosen_lengths: torch.Tensor  # [N] long
    rejected_tokens: torch.Tensor  # [N, R] long
    rejected_lengths: torch.Tensor  # [N] long
    chosen_rewards: torch.Tensor  # [N] float
    rejected_rewards: torch.Tensor  # [N] float
    valid: torch.Tensor  # [N] bool: False when all K rewards tied (no preference signal)
    ref_chosen_logps: torch.Tensor  # [N] float
    ref_rejected_logps: torch.Tensor  # [N] float
    refreshed_at: torch.Tensor  # [N] long: iteration of the last regeneration (-1: never)

    @classmethod
    def empty(cls, num_prompts: int, max_response_tokens: int) -> "PromptPool":
        n, r = num_prompts, max_response_tokens
        return cls(
            chosen_tokens=torch.zeros(n, r, dtype=torch.long),
            chosen_lengths=torch.zeros(n, dtype=torch.long),
            rejected_tokens=torch.zeros(n, r, dtype=torch.long),
            rejected_lengths=torch.zeros(n, dtype=torch.long),
            chosen_rewards=torch.zeros(n),
            rejected_rewards=torch.zeros(n),
            valid=torch.zeros(n, dtype=torch.bool),
            ref_chosen_logps=torch.zeros(n),
            ref_rejected_logps=torch.zeros(n),
            refreshed_at=torch.full((n,), -1, dtype=torch.long),
        )

    def __len__(self) -> int:
        return self.chosen_rewards.shape[0]

    def fields(self) -> dict[str, torch.Tensor]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    def rows(self, indices: torch.Tensor) -> dict[str, torch.Tensor]:
        return {name: value[indices] for name, value in self.fields().items()}

    def update(self, indices: torch.Tensor, rows: dict[str, torch.Tensor]) -> None:
        """Overwrite the entries at `indices`; every other entry is left untouched."""
        for name, value in self.fields().items():
            value[indices] = rows[name].to(value.dtype)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v.clone() for k, v in self.fields().items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        for name, value in self.fields().items():
            value.copy_(state[name])


def build_sequences(
    prompts: list[list[int]], responses: torch.Tensor, response_lengths: torch.Tensor, width: int, pad_id: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded prompt+response token rows [B, width] and the loss mask [B, width] that
    selects the positions whose NEXT token is a response token (labels are tokens shifted by one)."""
    rows = len(prompts)
    tokens = torch.full((rows, width), pad_id, dtype=torch.long)
    loss_mask = torch.zeros(rows, width)
    for b, prompt in enumerate(prompts):
        p, n = len(prompt), int(response_lengths[b])
        tokens[b, :p] = torch.tensor(prompt)
        tokens[b, p : p + n] = responses[b, :n]
        loss_mask[b, p - 1 : p + n - 1] = 1.0
    return tokens, loss_mask
