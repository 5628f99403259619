"""Shared pieces of refitting an external rollout engine from the live policy's weights.

`weight_buckets` groups the stream of HF-named full tensors (`models.hf_io.stream_hf_weights`)
into bounded chunks, so an engine receives the weights a few MiB at a time instead of one
full copy of the model; `RefitStats` is what one refit cost."""

import dataclasses
import time
from collections.abc import Iterable, Iterator

import torch


@dataclasses.dataclass
class RefitStats:
    seconds: float = 0.0
    bytes: int = 0
    tensors: int = 0
    buckets: int = 0

    def as_timings(self, prefix: str = "refit") -> dict:
        return {
            f"timing/{prefix}_seconds": self.seconds,
            f"{prefix}_bytes": self.bytes,
            f"{prefix}_tensors": self.tensors,
            f"{prefix}_buckets": self.buckets,
        }


def timed(timings: dict, key: str, call) -> None:
    """Run call() and record its seconds as timings[key] (engine sleep/wake for the records)."""
    start = time.perf_counter()
    call()
    timings[key] = time.perf_counter() - start


def tensor_bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def weight_buckets(
    weights: Iterable[tuple[str, torch.Tensor]], bucket_bytes: int
) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """Group (name, tensor) pairs, in order, into lists of at most `bucket_bytes` bytes.

    A tensor larger than a bucket goes alone in its own list. Empty lists are never yielded."""
    if bucket_bytes <= 0:
        raise ValueError(f"bucket_bytes must be > 0, got {bucket_bytes}")
    bucket: list[tuple[str, torch.Tensor]] = []
    size = 0
    for name, tensor in weights:
        n = tensor_bytes(tensor)
        if bucket and size + n > bucket_bytes:
            yield bucket
            bucket, size = [], 0
        bucket.append((name, tensor))
        size += n
        if size >= bucket_bytes:
            yield bucket
            bucket, size = [], 0
    if bucket:
        yield bucket
