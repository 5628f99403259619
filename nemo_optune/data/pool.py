"""The OPTune prompt pool: per training prompt, its current preference pair, the pair's
rewards and the cached reference log-probs (docs/pool.md).

Sharded over data-parallel ranks by prompt id: the per-prompt scalars (lengths, rewards,
validity, refresh iteration, reference log-probs: ~41 bytes a prompt) are on every rank, so
selection and weight normalisation stay global with no communication; the response tokens
(2 x max_new_tokens longs a prompt, the bulk) are kept only by the prompt's owner, the DP
rank whose balanced_shard block of range(N) holds it. `exchange_rows` moves token rows to
the ranks that need them (new pairs to their owners, a global batch's rows to its trainers)."""

import dataclasses
from collections.abc import Callable

import torch

from nemo_optune.algorithms.selection import balanced_shard

TOKEN_FIELDS = ("chosen_tokens", "rejected_tokens")  # [held, R]: only the held prompts' rows


@dataclasses.dataclass
class PromptPool:
    chosen_tokens: torch.Tensor  # [H, R] long: rows of the prompts in `held`
    chosen_lengths: torch.Tensor  # [N] long
    rejected_tokens: torch.Tensor  # [H, R] long
    rejected_lengths: torch.Tensor  # [N] long
    chosen_rewards: torch.Tensor  # [N] float
    rejected_rewards: torch.Tensor  # [N] float
    valid: torch.Tensor  # [N] bool: False when all K rewards tied (no preference signal)
    ref_chosen_logps: torch.Tensor  # [N] float
    ref_rejected_logps: torch.Tensor  # [N] float
    refreshed_at: torch.Tensor  # [N] long: iteration of the last regeneration (-1: never)
    # [H] ascending prompt ids whose token rows are here; left out: the rows are prompts 0..H-1
    held: torch.Tensor = dataclasses.field(default_factory=lambda: torch.empty(0, dtype=torch.long))

    def __post_init__(self) -> None:
        if not len(self.held):
            self.held = torch.arange(self.chosen_tokens.shape[0])

    @classmethod
    def empty(cls, num_prompts: int, max_response_tokens: int, dp_rank: int = 0, dp: int = 1) -> "PromptPool":
        """A pool of `num_prompts` holding the tokens of DP rank `dp_rank`'s block of them."""
        n, r, held = num_prompts, max_response_tokens, owned_prompts(num_prompts, dp_rank, dp)
        return cls(
            chosen_tokens=torch.zeros(len(held), r, dtype=torch.long),
            chosen_lengths=torch.zeros(n, dtype=torch.long),
            rejected_tokens=torch.zeros(len(held), r, dtype=torch.long),
            rejected_lengths=torch.zeros(n, dtype=torch.long),
            chosen_rewards=torch.zeros(n),
            rejected_rewards=torch.zeros(n),
            valid=torch.zeros(n, dtype=torch.bool),
            ref_chosen_logps=torch.zeros(n),
            ref_rejected_logps=torch.zeros(n),
            refreshed_at=torch.full((n,), -1, dtype=torch.long),
            held=held,
        )

    def __len__(self) -> int:
        return self.chosen_rewards.shape[0]

    def fields(self) -> dict[str, torch.Tensor]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "held"}

    def scalars(self) -> dict[str, torch.Tensor]:
        """The [N] fields, the same on every rank."""
        return {k: v for k, v in self.fields().items() if k not in TOKEN_FIELDS}

    def local(self, indices: torch.Tensor) -> torch.Tensor:
        """Positions in the token rows of prompt ids `indices`, which must be held here."""
        positions = torch.searchsorted(self.held, indices).clamp(max=max(len(self.held) - 1, 0))
        if len(indices) and not torch.equal(self.held[positions], indices):
            missing = indices[self.held[positions] != indices][0]
            raise KeyError(f"prompt {int(missing)}'s tokens are held by another data-parallel rank")
        return positions

    def rows(self, indices: torch.Tensor) -> dict[str, torch.Tensor]:
        local = self.local(indices)
        return {name: value[local if name in TOKEN_FIELDS else indices] for name, value in self.fields().items()}

    def update(self, indices: torch.Tensor, rows: dict[str, torch.Tensor]) -> None:
        """Overwrite the entries at `indices` of the fields in `rows` (token rows: of held
        prompts only); every other entry is left untouched."""
        for name, value in rows.items():
            field = getattr(self, name)
            field[self.local(indices) if name in TOKEN_FIELDS else indices] = value.to(field.dtype)

    def with_tokens(self, indices: torch.Tensor, tokens: dict[str, torch.Tensor]) -> "PromptPool":
        """A view of this pool's scalars that holds `tokens`, the token rows of `indices` (e.g. a
        global batch's rows fetched from their owners)."""
        order = torch.sort(indices).indices
        fields = {name: tokens[name][order] if name in TOKEN_FIELDS else v for name, v in self.fields().items()}
        return PromptPool(**fields, held=indices[order])

    def nbytes(self) -> int:
        return sum(v.element_size() * v.numel() for v in self.fields().values())

    def state_dict(self, tokens: bool = True) -> dict[str, torch.Tensor]:
        """The scalars and (`tokens`) this rank's token rows with their prompt ids (`held`)."""
        kept = self.fields() if tokens else self.scalars()
        return {**{k: v.clone() for k, v in kept.items()}, **({"held": self.held.clone()} if tokens else {})}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """The scalars, and the token rows of `state` that this rank holds (any DP size saved it;
        a state without `held` has every prompt's rows)."""
        for name, value in self.scalars().items():
            value.copy_(state[name])
        if TOKEN_FIELDS[0] in state:
            self.load_tokens(state)

    def load_tokens(self, shard: dict[str, torch.Tensor]) -> None:
        """Copy the rows of `shard` (token fields, `held` ids; absent: all) that this rank holds."""
        there = shard.get("held")
        there = torch.arange(shard[TOKEN_FIELDS[0]].shape[0]) if there is None else there
        mine = torch.isin(there, self.held)
        for name in TOKEN_FIELDS:
            getattr(self, name)[self.local(there[mine])] = shard[name][mine]


def owned_prompts(num_prompts: int, dp_rank: int, dp: int) -> torch.Tensor:
    """The prompt ids whose tokens DP rank `dp_rank` keeps: its balanced_shard block of range(N),
    the same block dp_share gives it of the whole pool."""
    return balanced_shard(torch.arange(num_prompts), dp_rank, dp)


def pool_bytes_per_rank(num_prompts: int, max_response_tokens: int, dp: int) -> int:
    """Host bytes of the pool on the most loaded DP rank (rank 0, the largest block): every
    prompt's scalars and its block's token rows. Counted, not allocated (for the dry run)."""
    one = PromptPool.empty(1, max_response_tokens)
    row_bytes = sum(one.fields()[name].nbytes for name in TOKEN_FIELDS)
    return num_prompts * (one.nbytes() - row_bytes) + -(-num_prompts // dp) * row_bytes


def _block_of(positions: torch.Tensor, n: int, world: int) -> torch.Tensor:
    """The rank whose balanced_shard block of n items holds each position."""
    base, extra = divmod(n, world)
    boundary = extra * (base + 1)
    return torch.where(positions < boundary, positions // (base + 1), extra + (positions - boundary) // max(base, 1))


def _block_start(n: int, rank: int, world: int) -> int:
    base, extra = divmod(n, world)
    return rank * base + min(rank, extra)


# transport(send rows, rows to each rank, rows from each rank) -> the rows received, by source rank
Transport = Callable[[torch.Tensor, list[int], list[int]], torch.Tensor]


def owner_of(indices: torch.Tensor, num_prompts: int, dp: int) -> torch.Tensor:
    """The DP rank that keeps each prompt's tokens (owned_prompts)."""
    return _block_of(indices, num_prompts, dp)


def exchange_rows(
    local: list[torch.Tensor], held: torch.Tensor, want: list[torch.Tensor], rank: int, transport: Transport
) -> list[torch.Tensor]:
    """Collective: the rows of prompt ids want[rank], in that order, of each tensor of `local`.
    The ids `held` (ascending) are shared out over the len(want) ranks in balanced_shard blocks
    and this rank has `local` ([block, width] tensors of one dtype), the rows of its block; every
    rank passes the same `held` and `want` (each rank's wish). `transport` is an all-to-all
    (runtime.distributed.all_to_all_over_dp); only the wanted rows travel, once."""
    world = len(want)
    start = _block_start(len(held), rank, world)
    send, send_counts = [], []
    for ids in want:
        positions = torch.searchsorted(held, ids)
        mine = positions[_block_of(positions, len(held), world) == rank] - start
        send.append(torch.cat([t[mine] for t in local], dim=1))
        send_counts.append(len(mine))
    source = _block_of(torch.searchsorted(held, want[rank]), len(held), world)
    received = transport(torch.cat(send), send_counts, torch.bincount(source, minlength=world).tolist())
    out = torch.empty_like(received)
    out[torch.sort(source, stable=True).indices] = received  # arrivals are grouped by source rank
    return list(out.split([t.shape[1] for t in local], dim=1))


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
