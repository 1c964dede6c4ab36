"""FSDP2 (``torch.distributed.fsdp.fully_shard``) for the phases and PPO, and sharded-tensor helpers.

Builds on :mod:`rlhf_core.distributed` (process groups, collectives), which stays about data
sharding and never imports this module. FSDP2 runs on CPU with gloo in torch 2.13, in fp32 and
with bf16 mixed precision (both tested on CPU; never run on CUDA/NCCL here). Imports only torch.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import distribute_tensor

from .distributed import all_reduce_sum, device, is_dtensor, is_initialized, world_size


def _blocks(model: nn.Module) -> list[nn.Module]:
    """Transformer blocks to shard one by one: the first ``nn.ModuleList`` named ``layers``/``h``/``blocks``."""
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and name.split(".")[-1] in ("layers", "h", "blocks"):
            return list(module)
    return []


def _mesh_and_precision(bf16: bool, replicate: bool = False) -> tuple[Any, dict[str, torch.dtype]]:
    """A 1-D mesh over every rank (or, with ``replicate``, the HSDP mesh (world, 1): replicated over
    the ranks, "sharded" over one, so each rank keeps a whole copy), and the MixedPrecisionPolicy
    arguments for bf16 compute (fp32 reduction) or none."""
    shape = (world_size(), 1) if replicate else (world_size(),)
    names = ("replicate", "shard") if replicate else None
    mesh = init_device_mesh("cuda" if torch.cuda.is_available() else "cpu", shape, mesh_dim_names=names)
    return mesh, (dict(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else {})


def wrap_fsdp2(model: nn.Module, mixed_precision_bf16: bool = False) -> nn.Module:
    """Shard ``model`` with FSDP2: ``fully_shard`` on each transformer block, then on the root.

    Parameters become DTensors sharded on dim 0 over all ranks; each block all-gathers its
    weights just before its forward and frees them after (reshard_after_forward=True), and its
    gradients are reduce-scattered *averaged* over ranks in the backward (DDP's arithmetic: no
    :func:`all_reduce_gradients` after it). Build the optimizer *after* this call, on
    ``model.parameters()``; save through :func:`full_state_dict`. No-op single process.

    Args:
        model: the module (on ``device()``).
        mixed_precision_bf16: compute in bf16 (parameters cast at each all-gather), keep fp32
            parameters and optimizer state, reduce gradients in fp32. Runs on CPU/gloo too (tested).
    """
    if not (is_initialized() and world_size() > 1):
        return model
    mesh, bf16 = _mesh_and_precision(mixed_precision_bf16)
    mp = MixedPrecisionPolicy(**bf16)
    for block in _blocks(model):
        fully_shard(block, mesh=mesh, mp_policy=mp)
    fully_shard(model, mesh=mesh, mp_policy=mp)
    return model


def wrap_trunk_fsdp2(trunk: nn.Module, keep_whole: Sequence[nn.Parameter] = (),
                     mixed_precision_bf16: bool = False, replicate: bool = False) -> nn.Module:
    """FSDP2 for PPO: shard a decoder trunk's blocks, then the trunk; gradients *summed*.

    The PPO update calls the trunk (``model.model``) and reads the unembedding directly, never the
    causal LM's own forward, so the trunk (embeddings + final norm), not the root, is the outer
    FSDP unit. ``keep_whole`` (the unembedding when it is tied to the input embedding) stays a
    plain replicated parameter like the untied unembedding and the value head, all summed by
    :func:`all_reduce_gradients`. Shards reduce-scatter with a divide factor of 1, the sum that
    PPO's ``n_local / N_global`` loss shares expect. No-op single process.

    Args:
        trunk: the policy's trunk on ``device()``, before its optimizer is built.
        mixed_precision_bf16: blocks and trunk compute in bf16 (fp32 parameters, fp32 reduction);
            the trunk's hidden states come out in fp32 for the fused logprob.
        replicate: keep a whole copy on every rank (HSDP mesh (world, 1), no weight traffic) that
            computes exactly as the sharded policy does: PPO's frozen reference under bf16, so that
            π and π_ref differ by their weights, not by their precision.
    """
    if not (is_initialized() and world_size() > 1):
        return trunk
    mesh, bf16 = _mesh_and_precision(mixed_precision_bf16, replicate)
    units = [fully_shard(block, mesh=mesh, mp_policy=MixedPrecisionPolicy(**bf16)) for block in _blocks(trunk)]
    whole = {p for p in trunk.parameters() if any(p is k for k in keep_whole)}
    units.append(fully_shard(trunk, mesh=mesh, ignored_params=whole or None,
                             mp_policy=MixedPrecisionPolicy(**bf16, output_dtype=torch.float32)))
    for unit in units:
        unit.set_gradient_divide_factor(1.0)
        unit.set_force_sum_reduction_for_comms(True)  # a plain SUM (gloo has no PREMUL_SUM)
    return trunk


def clip_grad_norm(params: Sequence[nn.Parameter], max_norm: float) -> torch.Tensor:
    """Global L2 norm of the gradients of a mix of FSDP2 shards and replicated parameters, and
    the gradients scaled by min(1, max_norm / (norm + 1e-6)) (``torch.nn.utils.clip_grad_norm_``'s
    rule). Shards contribute their local squares, all-reduced; replicated gradients (already equal
    on every rank) count once. Without shards it is ``clip_grad_norm_`` itself."""
    grads = [p.grad for p in params if p.grad is not None]
    if not any(is_dtensor(g) for g in grads):
        return torch.nn.utils.clip_grad_norm_(params, max_norm)
    sharded = sum((g.to_local().double().pow(2).sum() for g in grads if is_dtensor(g)),
                  torch.zeros((), dtype=torch.float64, device=device()))
    sharded = all_reduce_sum(sharded.to(device()))
    replicated = sum((g.double().pow(2).sum() for g in grads if not is_dtensor(g)),
                     torch.zeros((), dtype=torch.float64, device=device()))
    norm = (sharded + replicated.to(sharded.device)).sqrt().float()
    coef = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
    if coef < 1:
        for g in grads:
            g.mul_(coef.to(g.device) if not is_dtensor(g) else float(coef))
    return norm


def is_sharded(model: nn.Module) -> bool:
    """True when ``model`` holds FSDP2-sharded parameters: DTensors whose local part is not the whole
    (a ``replicate=True`` copy holds DTensors that are whole on every rank)."""
    return any(is_dtensor(p) and tuple(p.to_local().shape) != tuple(p.shape) for p in model.parameters())


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor behind an FSDP2 shard (an all-gather: every rank calls it), else ``t``."""
    return t.full_tensor() if is_dtensor(t) else t


def shard_like(full: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``full`` laid out like the DTensor ``like`` (same mesh and placements; a collective) when
    ``like`` is one of the same shape, else ``full`` unchanged. For loading full checkpoints."""
    if not is_dtensor(like) or full.shape != like.shape:
        return full
    return distribute_tensor(full.to(like.device, like.dtype), like.device_mesh, like.placements)


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """An FSDP2 model's full state dict on rank 0's CPU (empty on the other ranks; a collective).

    ``torch.distributed.checkpoint.state_dict.get_model_state_dict`` with ``full_state_dict`` and
    ``cpu_offload``: one parameter is all-gathered at a time, so no rank holds the whole model
    on its device.
    """
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
