import math

import pytest

from nemo_optune.runtime.lr_schedule import learning_rate


def test_warmup_then_cosine_hand_computed():
    lr = [learning_rate(s, 1.0, warmup_steps=2, total_steps=6, decay="cosine", min_lr=0.1) for s in range(7)]
    cosine = [0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * p / 4)) for p in range(5)]
    assert lr == pytest.approx([0.5, 1.0] + cosine)
    assert lr[2] == pytest.approx(1.0) and lr[6] == pytest.approx(0.1)


def test_constant_and_linear():
    assert learning_rate(100, 3e-4, 0, 10, "constant", 0.0) == 3e-4
    assert learning_rate(5, 1.0, 0, 10, "linear", 0.0) == pytest.approx(0.5)
    assert learning_rate(50, 1.0, 0, 10, "linear", 0.2) == pytest.approx(0.2)
    with pytest.raises(ValueError, match="lr decay"):
        learning_rate(0, 1.0, 0, 10, "step", 0.0)
