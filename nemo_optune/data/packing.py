"""A preference pair as one row that computes its prompt once:

    [prompt, chosen, last prompt token again (the "bridge"), rejected]

The bridge sits at the prompt's last position and sees the prompt without its last token, so it
computes exactly what that token computed in an unpacked row, and its label is the rejected
response's first token. The rejected tokens see the prompt, the bridge and themselves, never the
chosen response; their positions continue from the bridge. Both responses' log-probs therefore
equal those of the two unpacked rows (tests/test_trainer_behaviour.py, tests/test_parallel.py)."""

import torch

from nemo_optune.data.micro_batch import SequenceMicroBatch


def packed_pair_sequences(prompts: list[list[int]], rows: dict, width: int, pad_id: int) -> SequenceMicroBatch:
    """Packed rows of pool `rows` (chosen/rejected tokens and lengths), right-padded to `width`.

    Returns tokens, positions [B, width] (long), loss_mask (both responses' label positions) and
    rejected_mask [B, width] (float; the chosen ones are loss_mask - rejected_mask), and
    pack_layout [B, 3] (prompt length, bridge index, row length) from which
    packed_attention_mask builds the mask at whatever width the row is trimmed to."""
    batch = len(prompts)
    tokens = torch.full((batch, width), pad_id, dtype=torch.long)
    positions = torch.zeros(batch, width, dtype=torch.long)
    loss_mask, rejected_mask = torch.zeros(batch, width), torch.zeros(batch, width)
    layout = torch.zeros(batch, 3, dtype=torch.long)
    for b, prompt in enumerate(prompts):
        p, c, r = len(prompt), int(rows["chosen_lengths"][b]), int(rows["rejected_lengths"][b])
        bridge = p + c
        if bridge + 1 + r > width:
            raise ValueError(f"a packed pair of {bridge + 1 + r} tokens does not fit width {width}")
        tokens[b, :p] = torch.tensor(prompt)
        tokens[b, p:bridge] = rows["chosen_tokens"][b, :c]
        tokens[b, bridge] = prompt[-1]
        tokens[b, bridge + 1 : bridge + 1 + r] = rows["rejected_tokens"][b, :r]
        positions[b, :bridge] = torch.arange(bridge)
        positions[b, bridge : bridge + 1 + r] = torch.arange(p - 1, p + r)
        loss_mask[b, p - 1 : bridge - 1] = 1.0  # labels: the chosen response
        rejected_mask[b, bridge : bridge + r] = 1.0  # labels: the rejected response
        layout[b] = torch.tensor([p, bridge, bridge + 1 + r])
    return {
        "tokens": tokens,
        "positions": positions,
        "loss_mask": loss_mask + rejected_mask,
        "rejected_mask": rejected_mask,
        "pack_layout": layout,
    }


def packed_attention_mask(layout: torch.Tensor, width: int) -> torch.Tensor:
    """[B, 1, width, width] bool, True = masked, for rows with pack_layout `layout` [B, 3]:
    prompt and chosen causal among themselves; bridge and rejected see the prompt but its last
    token, the bridge and the rejected tokens before them; padding sees only itself."""
    slots = torch.arange(width, device=layout.device)
    query, key = slots[None, :, None], slots[None, None, :]  # [1, W, 1], [1, 1, W]
    prompt, bridge, length = (layout[:, i, None, None] for i in range(3))  # [B, 1, 1]
    causal = key <= query
    first_part = causal & (query < bridge) & (key < bridge)
    second_part = causal & (query >= bridge) & (query < length) & ((key < prompt - 1) | (key >= bridge))
    padding = (query == key) & (query >= length)
    return ~(first_part | second_part | padding)[:, None]
