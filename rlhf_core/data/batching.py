"""Batches of token ids and of indices: the right-padding every phase and the reward model share."""
from __future__ import annotations

from typing import Iterator, Sequence

import torch


def chunks(n: int, batch_size: int) -> Iterator[list[int]]:
    """Consecutive index batches over ``n`` items (evaluation order)."""
    for start in range(0, n, batch_size):
        yield list(range(start, min(n, start + batch_size)))


def pad(seqs: Sequence[Sequence[int]], value: int) -> torch.Tensor:
    """Right-pad integer lists to the longest one.  Returns (B, T_max) long."""
    width = max(len(s) for s in seqs)
    out = torch.full((len(seqs), width), value, dtype=torch.long)
    for i, s in enumerate(seqs):
        out[i, :len(s)] = torch.as_tensor(s, dtype=torch.long)
    return out
