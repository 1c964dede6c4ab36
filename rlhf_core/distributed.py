"""torch.distributed helpers: torchrun set-up, sharding, collectives, global statistics, DDP.

Every helper is a no-op (or the single-process formula) when the process group is not
initialised, so the phases call them unconditionally and a plain ``python -m rlhf_core.cli``
run is unchanged.

Conventions:
- Sharding is **contiguous**: rank r gets ``items[start_r:end_r]`` of a balanced split (the
  first ``n % world`` ranks hold one extra item), so concatenating the shards in rank order
  gives back the global batch in its original order. Contiguous (not strided) keeps RLOO/GRPO
  groups — ``group_size`` consecutive rows of one prompt — on one rank when the shard size is a
  multiple of ``group_size``.
- Token-mean losses under data parallelism: DDP *averages* gradients over the W ranks, so a
  rank whose loss is ``Σ_local ℓ / n_local`` would weight each rank equally, not each token.
  The exact global token-mean needs ``loss_r = W · Σ_local ℓ / N_global`` with
  ``N_global = Σ_r n_r`` from one all-reduce (:func:`global_count`); then
  ``(1/W) Σ_r ∇loss_r = ∇(Σ_all ℓ) / N_global``. With :func:`all_reduce_gradients` (a sum,
  no averaging) the factor W is dropped.
- Whitening statistics: population variance over the valid tokens of the **global** batch
  (:func:`global_masked_moments`, passed to ``rlhf_core.ppo.advantages.masked_whiten`` as its
  ``moments``: two all-reduces, sum & count, then the sum of squared deviations — numerically
  the same two passes as ``masked_var``).

FSDP2 (sharded models) lives in :mod:`rlhf_core.fsdp`, which builds on this module.

Imports only torch.

References: PyTorch DDP notes (gradient averaging); PyTorch FSDP2 tutorial (``fully_shard``
per transformer block, then the root); Huang et al. 2024, "The N+ Implementation Details of
RLHF with PPO" (advantage whitening over the whole batch).
"""
from __future__ import annotations

import os
from datetime import timedelta
from typing import Any, Sequence, TypeVar

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel

__all__ = [
    "init_from_env", "shutdown", "is_initialized", "rank", "local_rank", "world_size", "is_main", "barrier",
    "device", "shard", "shard_bounds", "all_reduce_sum", "global_count", "all_gather_bytes", "all_gather_rows",
    "all_reduce_gradients",
    "global_masked_moments", "reduce_metrics", "wrap_ddp", "unwrap", "is_dtensor", "DistributedError",
]

T = TypeVar("T")


class DistributedError(RuntimeError):
    """A distributed set-up the user asked for that cannot work here (one clear line)."""


# --------------------------------------------------------------------------- process group


def is_initialized() -> bool:
    """True inside an initialised process group (torchrun with WORLD_SIZE > 1)."""
    return dist.is_available() and dist.is_initialized()


def init_from_env(timeout_s: float = 1800.0) -> bool:
    """Join the process group torchrun describes; a no-op for a single process.

    Reads RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT (set by torchrun). Backend:
    gloo on CPU; with CUDA ``"cpu:gloo,cuda:nccl"`` (CUDA tensors over NCCL, CPU tensors still
    over gloo) and the process pinned to ``device()``; ``RLHF_DIST_BACKEND`` overrides the backend
    (``gloo`` lets two ranks share one GPU for a smoke test, which NCCL refuses).
    Idempotent: a second call returns True without re-initialising.

    Returns:
        True when a process group with more than one rank is active.

    Raises:
        DistributedError: WORLD_SIZE > 1 but MASTER_ADDR / MASTER_PORT are missing.
    """
    if is_initialized():
        return dist.get_world_size() > 1
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return False
    missing = [k for k in ("RANK", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise DistributedError(f"WORLD_SIZE={world} but {', '.join(missing)} unset: launch with torchrun")
    # RLHF_DIST_BACKEND overrides (e.g. "gloo": several ranks on ONE GPU, which NCCL refuses)
    backend = os.environ.get("RLHF_DIST_BACKEND") or ("cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo")
    if torch.cuda.is_available():
        torch.cuda.set_device(device())
    dist.init_process_group(backend=backend, init_method="env://", timeout=timedelta(seconds=timeout_s))
    return True


def shutdown() -> None:
    """Leave the process group (call once at exit; no-op single process)."""
    if is_initialized():
        dist.destroy_process_group()


def rank() -> int:
    """Global rank (0 without a process group)."""
    return dist.get_rank() if is_initialized() else 0


def local_rank() -> int:
    """Rank on this node (torchrun's LOCAL_RANK; 0 without it)."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def world_size() -> int:
    """Number of ranks (1 without a process group)."""
    return dist.get_world_size() if is_initialized() else 1


def is_main() -> bool:
    """True on the rank that writes outputs, checkpoints and metrics (rank 0)."""
    return rank() == 0


def barrier() -> None:
    """Wait for every rank (no-op single process)."""
    if is_initialized() and world_size() > 1:
        dist.barrier()


def device(preference: str = "auto") -> torch.device:
    """This rank's device: ``cuda:LOCAL_RANK`` when CUDA is available (``"auto"``) or asked for
    (``"cuda"``), else (or with ``"cpu"``) the CPU.

    Raises:
        DistributedError: ``"cuda"`` on a machine where torch sees no GPU.
    """
    if preference == "cpu":
        return torch.device("cpu")
    if torch.cuda.is_available():  # more ranks than GPUs (a smoke test on one GPU): they share
        return torch.device("cuda", local_rank() % max(torch.cuda.device_count(), 1))
    if preference == "cuda":
        raise DistributedError("device='cuda' but torch.cuda.is_available() is False (a CPU-only torch, "
                               "or no visible GPU)")
    return torch.device("cpu")


# --------------------------------------------------------------------------- sharding


def shard_bounds(n: int, rank_: int, world: int) -> tuple[int, int]:
    """[start, end) of rank ``rank_``'s contiguous, balanced slice of ``n`` items."""
    if world < 1 or not 0 <= rank_ < world:
        raise ValueError(f"rank {rank_} out of range for world size {world}")
    base, extra = divmod(n, world)
    start = rank_ * base + min(rank_, extra)
    return start, start + base + (1 if rank_ < extra else 0)


def shard(items: Sequence[T], rank_: int | None = None, world: int | None = None) -> Sequence[T]:
    """Rank ``rank_``'s contiguous slice of ``items`` (defaults: this process's rank and world).

    Contiguous and balanced: sizes differ by at most 1, the first ``len(items) % world`` ranks
    get the extra item, and ``shard(items, 0, W) + ... + shard(items, W-1, W) == items``.
    Works on lists and on tensors (sliced along dim 0).
    """
    rank_ = rank() if rank_ is None else rank_
    world = world_size() if world is None else world
    start, end = shard_bounds(len(items), rank_, world)
    return items[start:end]


# --------------------------------------------------------------------------- collectives


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over ranks, in place, and return it (identity single process)."""
    if is_initialized() and world_size() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def global_count(n: int | float) -> float:
    """Σ over ranks of a local count (e.g. valid tokens), as a Python number.

    float64 carries integer counts exactly up to 2**53, far beyond any batch.
    """
    return float(all_reduce_sum(torch.tensor(float(n), dtype=torch.float64, device=device())))


def sum_metrics(metrics: dict[str, float]) -> dict[str, float]:
    """Σ over ranks of each metric, in one collective (every rank passes the same keys); identity in
    one process. For quantities already divided by a global count (a micro-batch's share of a loss)."""
    if not (is_initialized() and world_size() > 1):
        return dict(metrics)
    keys = sorted(metrics)
    packed = all_reduce_sum(torch.tensor([float(metrics[k]) for k in keys], dtype=torch.float64, device=device()))
    return {k: float(packed[i]) for i, k in enumerate(keys)}


def global_max(x: float) -> float:
    """Max over ranks of a local number (identity in one process)."""
    t = torch.tensor(float(x), dtype=torch.float64, device=device())
    if is_initialized() and world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t)


def _all_gather_padded(t: torch.Tensor) -> list[torch.Tensor]:
    """Every rank's ``t`` (any first-dim size; same dtype and trailing shape) in rank order: the
    sizes are exchanged first, then the tensors zero-padded to the longest and gathered."""
    sizes = [torch.zeros(1, dtype=torch.int64, device=t.device) for _ in range(world_size())]
    dist.all_gather(sizes, torch.tensor([t.shape[0]], dtype=torch.int64, device=t.device))
    width = max(int(n) for n in sizes)
    padded = torch.zeros((width, *t.shape[1:]), dtype=t.dtype, device=t.device)
    padded[:t.shape[0]] = t
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded)
    return [part[:int(n)] for part, n in zip(parts, sizes)]


def all_gather_bytes(data: bytes) -> list[bytes]:
    """Every rank's ``data`` on every rank, in rank order (``[data]`` single process).

    For small per-rank blobs (RNG states, a checkpoint's name); sizes may differ per rank.
    CPU tensors, so gloo carries them (also under ``"cpu:gloo,cuda:nccl"``). No pickling.
    """
    if not (is_initialized() and world_size() > 1):
        return [data]
    payload = torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else torch.zeros(0, dtype=torch.uint8)
    return [bytes(part.numpy()) for part in _all_gather_padded(payload)]


def all_gather_rows(t: torch.Tensor) -> torch.Tensor:
    """Concatenation over ranks, in rank order, of each rank's rows (first-dim sizes may differ).

    With contiguous shards (:func:`shard`) this rebuilds the global batch in its original order,
    so a metric computed from it is the one-process value, bit for bit. Identity single process.
    """
    if not (is_initialized() and world_size() > 1):
        return t
    return torch.cat(_all_gather_padded(t))


def all_reduce_gradients(params: Sequence[nn.Parameter], average: bool = False) -> None:
    """Sum (or, with ``average``, average like DDP) ``.grad`` over ranks, in one collective.

    For code paths that do not go through ``DistributedDataParallel.forward``: the PPO update
    calls the trunk and the fused kernel directly, and the phases' ``loss_fn`` closures call the
    bare model — DDP only syncs gradients of a backward that followed *its own* forward. Pair
    ``average=False`` with losses scaled by ``n_local / N_global``, ``average=True`` with
    ``W · n_local / N_global`` (the DDP convention). Unlike DDP's bucketed hooks this does not
    overlap communication with the backward pass. Parameters with no gradient on this rank get
    a zero one so that every rank joins the collective with the same sizes.
    """
    if not (is_initialized() and world_size() > 1):
        return
    grads = []
    for p in params:
        if is_dtensor(p):  # FSDP2 shards: their backward already reduce-scattered them
            continue
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        grads.append(p.grad)
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])  # one collective, not one per tensor
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    if average:
        flat /= world_size()
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()


def global_masked_moments(x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and population variance of ``x`` over the valid positions of all ranks.

    Formula: N = Σ_r Σ m, μ = Σ_r Σ m·x / max(N, 1), σ² = Σ_r Σ m·(x − μ)² / max(N, 1) —
    ``masked_mean`` and ``masked_var(unbiased=False)`` of the concatenated global batch.
    Two passes (not E[x²] − μ²) so no cancellation when |μ| ≫ σ.

    Shapes: x (B_r, T), mask (B_r, T) (B_r may differ per rank, T must not) -> (), ().

    Returns:
        (mean, var) in ``x``'s dtype; (0, 0) when no rank has a valid token.
    """
    valid = mask.bool()
    zero = torch.zeros((), dtype=x.dtype, device=x.device)
    xm = torch.where(valid, x, zero)  # (B, T) padding selected away, never multiplied
    sums = torch.stack([xm.sum(), valid.sum().to(x.dtype)])  # (2,) Σ m·x, Σ m
    all_reduce_sum(sums)
    count = sums[1].clamp_min(1)
    mean = sums[0] / count
    sq = torch.where(valid, (x - mean) ** 2, zero).sum().reshape(1)  # (1,) Σ m·(x − μ)²
    all_reduce_sum(sq)
    return mean, sq[0] / count


def reduce_metrics(metrics: dict[str, float], counts: dict[str, float] | None = None) -> dict[str, float]:
    """Mean of each metric over ranks, weighted by ``counts[key]`` where given (else weight 1).

    Formula: m̄_k = Σ_r w_{r,k}·m_{r,k} / Σ_r w_{r,k}. Every rank must pass the same keys
    (they are sorted, then reduced in one collective). A key whose total weight is 0 maps to 0.
    """
    if not (is_initialized() and world_size() > 1):
        return dict(metrics)
    keys = sorted(metrics)
    counts = counts or {}
    w = torch.tensor([float(counts.get(k, 1.0)) for k in keys], dtype=torch.float64, device=device())
    v = torch.tensor([float(metrics[k]) for k in keys], dtype=torch.float64, device=device())
    packed = all_reduce_sum(torch.cat([v * w, w]))  # (2K,)
    num, den = packed[:len(keys)], packed[len(keys):]
    return {k: float(num[i] / den[i]) if den[i] > 0 else 0.0 for i, k in enumerate(keys)}


# --------------------------------------------------------------------------- model wrappers


def wrap_ddp(model: nn.Module, **kwargs: Any) -> nn.Module:
    """``DistributedDataParallel(model)`` under a process group, else ``model`` unchanged.

    On CUDA the model must already be on ``device()``; ``kwargs`` go to DDP (e.g.
    ``find_unused_parameters=True`` for LoRA models with frozen branches).
    """
    if not (is_initialized() and world_size() > 1):
        return model
    ids = [local_rank()] if torch.cuda.is_available() else None
    return DistributedDataParallel(model, device_ids=ids, **kwargs)


def unwrap(model: nn.Module) -> nn.Module:
    """The user's module inside a DDP wrapper (what to save and evaluate)."""
    return getattr(model, "module", model)


def is_dtensor(t: Any) -> bool:
    """True for an FSDP2 shard (a ``DTensor``); its gradients are reduced by FSDP2 itself."""
    return isinstance(t, DTensor)
