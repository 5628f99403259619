"""Token sampling (generation/sampling.py): inverse-CDF draws from the temperature-scaled,
top-k / top-p truncated softmax, against a plain full-sort reference and against the
distribution itself. Pure torch."""

import math

import pytest
import torch

from nemo_optune.generation.sampling import FIRST_CANDIDATES, sample_tokens


def reference_sample(logits, uniform, temperature, top_k, top_p):
    """The textbook version: sort the whole vocabulary, truncate, renormalise, invert the CDF
    (untruncated: the CDF in vocabulary order, no sort)."""
    scores = logits / temperature
    if top_k == 0 and top_p >= 1.0:
        cdf = scores.softmax(-1).cumsum(-1)
        return torch.searchsorted(cdf, uniform[:, None] * cdf[:, -1:]).clamp(max=cdf.shape[-1] - 1).squeeze(-1)
    ordered, order = scores.sort(dim=-1, descending=True)
    if top_k > 0:
        ordered, order = ordered[:, :top_k], order[:, :top_k]
    probs = (ordered - ordered.logsumexp(-1, keepdim=True)).exp()
    keep = probs.cumsum(-1) - probs < top_p
    probs = probs * keep
    cdf = probs.cumsum(-1)
    position = torch.searchsorted(cdf, uniform[:, None] * cdf[:, -1:]).clamp(max=probs.shape[-1] - 1)
    return order.gather(-1, position).squeeze(-1)


@pytest.mark.parametrize(
    "vocab,temperature,top_k,top_p",
    [
        (13, 1.0, 0, 1.0),
        (13, 0.7, 0, 0.9),
        (13, 1.3, 4, 1.0),
        (13, 1.0, 5, 0.6),
        (5000, 1.0, 0, 0.95),  # flat-ish logits: the first 64 candidates hold < 0.95, candidates widen
        (5000, 0.5, 50, 0.9),
        (200, 1.0, 0, 0.3),
    ],
)
def test_sample_tokens_equals_the_full_sort_reference(vocab, temperature, top_k, top_p):
    gen = torch.Generator().manual_seed(vocab + top_k)
    scale = torch.tensor([2.0, 8.0]).repeat(150)[:, None]  # flat rows and peaked rows
    logits = torch.randn(300, vocab, generator=gen) * scale
    uniform = torch.rand(300, generator=gen).clamp(1e-6, 1 - 1e-6)
    got = sample_tokens(logits, uniform, temperature, top_k, top_p)
    assert torch.equal(got, reference_sample(logits, uniform, temperature, top_k, top_p))
    if vocab == 5000 and top_k == 0:  # some rows' first candidates hold top_p, others' do not
        best = (logits.topk(FIRST_CANDIDATES).values - logits.logsumexp(-1, keepdim=True)).exp().sum(-1)
        assert float(best.min()) < top_p <= float(best.max())


@pytest.mark.parametrize(
    "top_k,top_p,expected",
    [
        (0, 1.0, [math.exp(v) for v in (3.0, 2.0, 1.0, 0.0)]),
        (2, 1.0, [math.exp(3.0), math.exp(2.0), 0, 0]),
        # masses of logits 3, 2, 1, 0: 0.644, 0.237, 0.087, 0.032. A token stays while the mass before it
        # is under top_p: at 0.85 the mass before the third is 0.881 (two stay), at 0.9 three stay.
        (0, 0.85, [math.exp(3.0), math.exp(2.0), 0, 0]),
        (0, 0.9, [math.exp(3.0), math.exp(2.0), math.exp(1.0), 0]),
        (0, 0.5, [1, 0, 0, 0]),  # the best token always stays
    ],
)
def test_sample_tokens_draws_the_truncated_distribution(top_k, top_p, expected):
    n = 200_000
    logits = torch.tensor([[1.0, 3.0, 0.0, 2.0, float("-inf")]]).expand(n, 5)  # token 4: probability 0
    uniform = (torch.arange(n, dtype=torch.float64) + 0.5) / n  # evenly spread: frequencies are exact to ~1/n
    tokens = sample_tokens(logits, uniform.float(), 1.0, top_k, top_p)
    counts = torch.bincount(tokens, minlength=5).double() / n
    total = sum(expected)
    want = [0.0] * 5
    want[1], want[3], want[0], want[2] = (e / total for e in expected)  # tokens by logit 3, 2, 1, 0
    assert counts.tolist() == pytest.approx(want, abs=2e-4)
    assert counts[4] == 0


def test_greedy_and_row_independence():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(20, 50, generator=gen)
    uniform = torch.rand(20, generator=gen)
    assert torch.equal(sample_tokens(logits, uniform, 0.0, 0, 1.0), logits.argmax(-1))
    whole = sample_tokens(logits, uniform, 1.0, 10, 0.9)
    order = torch.tensor([7, 3, 19])
    assert torch.equal(sample_tokens(logits[order], uniform[order], 1.0, 10, 0.9), whole[order])
