"""The output layer + cross entropy of a log-prob pass at a real vocabulary: every position
(as megatron computes it with labels) against the loss mask's positions only (_response_nll).

    OMP_NUM_THREADS=1 python benchmarks/output_layer_positions.py [--prompt 48] [--response 32]
                                                                 [--rows 32] [--vocab 49152] [--hidden 576]

SmolLM2-135M's sizes by default, demo_real's rows (2 x 16 pairs, prompts ~48 tokens with the chat
template, responses up to 32): random hidden states and output weight, megatron's
vocab_parallel_cross_entropy on both sides. Prints the largest NLL difference at the masked
positions and, forward without gradients (the reference pass) and forward + backward (training),
the best of 3 interleaved rounds and the ratio.
"""

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for name, default in (("prompt", 48), ("response", 32), ("rows", 32), ("vocab", 49152), ("hidden", 576)):
        parser.add_argument(f"--{name}", type=int, default=default)
    args = parser.parse_args()

    import torch
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    from nemo_optune.runtime import distributed

    distributed.initialize(1, 1, seed=0)
    torch.manual_seed(0)
    p, b, s = args.prompt, args.rows, args.prompt + args.response
    hidden = torch.randn(s, b, args.hidden, requires_grad=True)  # megatron's [s, b, h]
    weight = (torch.randn(args.vocab, args.hidden) * 0.02).requires_grad_()
    tokens = torch.randint(0, args.vocab, (b, s))
    mask = torch.zeros(b, s)
    mask[:, p - 1 : s - 1] = 1  # the positions whose next token is a response token
    labels = torch.roll(tokens, -1, 1)

    def every_position() -> torch.Tensor:
        return vocab_parallel_cross_entropy(hidden @ weight.T, labels.t().contiguous()).t()

    def masked_only() -> torch.Tensor:
        rows, cols = mask.nonzero(as_tuple=True)
        logits = (hidden[cols, rows].unsqueeze(1) @ weight.T).transpose(0, 1)
        nll = vocab_parallel_cross_entropy(logits, labels[rows, cols].unsqueeze(0)).squeeze(0)
        return torch.zeros(b, s).index_put((rows, cols), nll)

    with torch.no_grad():
        diff = (every_position() - masked_only())[mask.bool()].abs().max()
    print(f"max |NLL difference| at the masked positions: {float(diff):.3g}")
    for backward in (False, True):
        best = {"every position": float("inf"), "masked only": float("inf")}
        for _ in range(3):
            for name, fn in (("every position", every_position), ("masked only", masked_only)):
                hidden.grad = weight.grad = None
                start = time.perf_counter()
                with torch.set_grad_enabled(backward):
                    nll = fn()
                    if backward:
                        (nll * mask).sum().backward()
                best[name] = min(best[name], time.perf_counter() - start)
        ratio = best["every position"] / best["masked only"]
        label = "forward + backward" if backward else "forward, no grad"
        print(f"{label:18s} " + "  ".join(f"{k} {v:.3f}s" for k, v in best.items()) + f"  ratio {ratio:.2f}x")


if __name__ == "__main__":
    main()
