"""Token sampling as a pure function of logits and one pre-drawn uniform per row."""

import torch

FIRST_CANDIDATES = 64  # top-p looks at this many best tokens first (then, for rows they do not cover, at all)


def sample_tokens(
    logits: torch.Tensor, uniform: torch.Tensor, temperature: float, top_k: int, top_p: float
) -> torch.Tensor:
    """Draw one token per row of `logits` [B, V] from softmax(logits / temperature), truncated to
    the top_k best and to the smallest best-first prefix whose mass reaches top_p (the best token
    always stays), using `uniform` [B] in (0, 1): inverse-CDF sampling, token i is drawn when
    uniform falls in its slice of the cumulative probabilities.

    One uniform per row keeps each row's draw a function of its own seed only, and costs O(V):
    no vocabulary-sized noise and no full sort (a sort of 64 x 32k logits takes ~70 ms on two CPU
    cores). Top-k and top-p look only at the best candidates (torch.topk); top-p sorts the whole
    vocabulary only for rows whose best FIRST_CANDIDATES tokens hold less than top_p."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    scores = logits.float() / temperature
    if top_k <= 0 and top_p >= 1.0:
        probs = scores.softmax(dim=-1)
        return _inverse_cdf(probs, uniform)
    if top_k > 0:
        best, index = scores.topk(min(top_k, scores.shape[-1]), dim=-1)
        return _draw_from_best(best, index, best.logsumexp(dim=-1, keepdim=True), uniform, top_p)
    # Top-p of the whole softmax: the best FIRST_CANDIDATES tokens where they hold top_p of the
    # mass (most rows of a trained model), a full sort for the other rows.
    log_total = scores.logsumexp(dim=-1, keepdim=True)
    best, index = scores.topk(min(FIRST_CANDIDATES, scores.shape[-1]), dim=-1)
    enough = (best - log_total).exp().sum(dim=-1) >= top_p
    if bool(enough.all()):
        return _draw_from_best(best, index, log_total, uniform, top_p)
    tokens = torch.empty(scores.shape[0], dtype=torch.long, device=scores.device)
    tokens[enough] = _draw_from_best(best[enough], index[enough], log_total[enough], uniform[enough], top_p)
    rest = ~enough
    ordered, order = scores[rest].sort(dim=-1, descending=True)
    tokens[rest] = _draw_from_best(ordered, order, log_total[rest], uniform[rest], top_p)
    return tokens


def _draw_from_best(
    best: torch.Tensor, index: torch.Tensor, log_total: torch.Tensor, uniform: torch.Tensor, top_p: float
) -> torch.Tensor:
    """Tokens drawn among candidates `best` (scores, best first) at vocabulary `index`, with
    probabilities exp(best - log_total), cut to the smallest prefix whose mass reaches top_p
    (the first candidate always stays)."""
    probs = (best - log_total).exp()
    if top_p < 1.0:
        probs = probs.masked_fill(probs.cumsum(dim=-1) - probs >= top_p, 0.0)
    return index.gather(-1, _inverse_cdf(probs, uniform)[:, None]).squeeze(-1)


def _inverse_cdf(probs: torch.Tensor, uniform: torch.Tensor) -> torch.Tensor:
    """Per row, the first index whose cumulative probability reaches uniform x the row's total
    (rows need not sum to 1; zero-probability entries are never drawn)."""
    cdf = probs.cumsum(dim=-1)
    target = uniform.to(cdf.dtype)[:, None] * cdf[:, -1:]
    return torch.searchsorted(cdf, target).squeeze(-1).clamp(max=probs.shape[-1] - 1)


# Counter-based noise. Constants as signed integers: torch has no unsigned 32/64-bit
# arithmetic, but signed multiplication and addition wrap like unsigned.
def _signed(x: int, bits: int) -> int:
    return x - (1 << bits) if x >= 1 << (bits - 1) else x


_GOLDEN64 = _signed(0x9E3779B97F4A7C15, 64)
_MIX64 = (_signed(0xBF58476D1CE4E5B9, 64), _signed(0x94D049BB133111EB, 64))
_GOLDEN32 = _signed(0x9E3779B9, 32)
_MIX32 = (_signed(0x7FEB352D, 32), _signed(0x846CA68B, 32))


def _shr(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Logical right shift (torch's >> is arithmetic on signed integers)."""
    width = 64 if x.dtype == torch.int64 else 32
    return (x >> bits) & ((1 << (width - bits)) - 1)


def _splitmix64(x: torch.Tensor) -> torch.Tensor:
    """splitmix64's finaliser (Steele et al. 2014): a bijection of 64-bit words."""
    x = (x ^ _shr(x, 30)) * _MIX64[0]
    x = (x ^ _shr(x, 27)) * _MIX64[1]
    return x ^ _shr(x, 31)


def _lowbias32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash (C. Wellons' lowbias32): 32-bit multiplies vectorise on CPU,
    64-bit ones do not."""
    x = (x ^ _shr(x, 16)) * _MIX32[0]
    x = (x ^ _shr(x, 15)) * _MIX32[1]
    return x ^ _shr(x, 16)


def counter_uniform(seeds, sample_index, steps: int) -> torch.Tensor:
    """Uniform numbers in (0, 1), [B, steps] float32: entry [b, t] is a pure function of
    (seeds[b], sample_index[b], t), the draw of sample sample_index[b] of a prompt at decoding
    step t.

    Counter-based: a row's draws depend on nothing else (not its batch, its position in it, its
    rank, nor `steps`). (seed, sample) hash to a 32-bit stream key (64-bit mixing, B values);
    entry t is lowbias32(key + (t + 1) * golden), whose top 24 bits give (k + 0.5) / 2^24 (exact
    in float32)."""
    seeds = torch.as_tensor(seeds, dtype=torch.int64)
    sample_index = torch.as_tensor(sample_index, dtype=torch.int64, device=seeds.device)
    key = _splitmix64(_splitmix64(seeds * _GOLDEN64 + 1) ^ (sample_index + 1))
    key32 = (_shr(key, 32) - (1 << 31)).to(torch.int32)  # the top 32 bits, as a signed word
    counters = torch.arange(1, steps + 1, dtype=torch.int32, device=seeds.device) * _GOLDEN32
    bits = _shr(_lowbias32(key32[:, None] + counters), 8)
    return (bits.float() + 0.5) * (1.0 / (1 << 24))
