"""Fused logprob / entropy / exact-KL ops from hidden states, without a [N, V] logits tensor.

Dispatch: Triton kernels on CUDA tensors, the chunked torch reference elsewhere
(``backend="triton"`` on CPU tensors runs the kernels under the Triton interpreter — slow,
for tests). This package never imports ``rlhf_core``. It is not the Hugging Face ``kernels``
package: the distribution is ``rlhf-core`` and it exports none of that package's API.
"""
from __future__ import annotations

import torch

from kernels._dispatch import KernelBackendError, load_triton, resolve_backend
from kernels.reference import chunked_kl, chunked_logprobs, chunked_logprobs_kl, kl_naive, logprobs_naive

__all__ = [
    "fused_logprobs",
    "fused_kl",
    "fused_logprobs_kl",
    "chunked_logprobs_kl",
    "chunked_logprobs",
    "chunked_kl",
    "logprobs_naive",
    "kl_naive",
    "KernelBackendError",
]


def _check_shapes(hidden: torch.Tensor, weight: torch.Tensor, what: str) -> None:
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(
            f"{what}: expected hidden [N, H] and weight [V, H], "
            f"got {tuple(hidden.shape)} and {tuple(weight.shape)}"
        )


def _check_targets(targets: torch.Tensor, n: int, vocab: int, ignore_index: int, what: str) -> None:
    """targets [N], each in [0, V) or ignore_index (one host sync): a wrong id would read another
    row's memory in a kernel, or fail deep inside torch's gather."""
    if targets.shape != (n,):
        raise ValueError(f"{what}: targets must be [N]={n}, got {tuple(targets.shape)}")
    bad = (targets != ignore_index) & ((targets < 0) | (targets >= vocab))
    if bool(bad.any()):
        i = int(bad.nonzero()[0, 0])
        raise ValueError(f"{what}: target {int(targets[i])} at row {i} is outside [0, {vocab}) "
                         f"and is not ignore_index={ignore_index}")


def _check_pair(hidden: torch.Tensor, weight: torch.Tensor, ref_hidden: torch.Tensor, ref_weight: torch.Tensor,
                temperature: float, what: str) -> None:
    """Policy and reference inputs of one KL op: each [N, H] x [V, H], the same N and V, T > 0."""
    _check_shapes(hidden, weight, what)
    _check_shapes(ref_hidden, ref_weight, f"{what} (ref)")
    if ref_hidden.shape[0] != hidden.shape[0] or ref_weight.shape[0] != weight.shape[0]:
        raise ValueError(f"{what}: policy and reference must share N and V")
    if temperature <= 0:
        raise ValueError(f"{what}: temperature must be > 0, got {temperature}")


def fused_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    temperature: float = 1.0,
    return_entropy: bool = False,
    backend: str = "auto",
    ignore_index: int = -100,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Log-probability of ``targets`` (and entropy) under softmax(hidden @ weight.T / T).

    Formula: z = hidden @ weight.T / T; logprob = z[target] - logsumexp(z);
    entropy = logsumexp(z) - Σ_j softmax(z)_j z_j. Never materializes [N, V] logits.

    Args:
        hidden: final hidden states, fp32/fp16/bf16, any strides.
        weight: LM-head weight (same dtype family as hidden).
        targets: token ids (int) in [0, V). Rows equal to ``ignore_index`` give 0 (logprob and
            entropy), no gradient, and cost nothing. Other ids outside [0, V): ValueError.
        temperature: T > 0 dividing the logits (the sampling temperature).
        return_entropy: also return the per-row entropy.
        backend: "auto" (Triton on CUDA, torch elsewhere), "triton", or "torch".
        ignore_index: target value marking rows to skip.
    Shapes:
        hidden [N, H], weight [V, H], targets [N] -> logprobs [N], entropy [N]
    Returns:
        ``logprobs`` or ``(logprobs, entropy)``, float32 for fp32/fp16/bf16 inputs (float64 inputs
        stay float64 on the torch backend); differentiable w.r.t. ``hidden`` and ``weight``.
    """
    _check_shapes(hidden, weight, "fused_logprobs")
    if temperature <= 0:
        raise ValueError(f"fused_logprobs: temperature must be > 0, got {temperature}")
    _check_targets(targets, hidden.shape[0], weight.shape[0], ignore_index, "fused_logprobs")
    # an empty batch needs no kernel launch (a grid of 0 programs is an error in Triton)
    if resolve_backend(backend, hidden, weight, targets) == "torch" or hidden.shape[0] == 0:
        return chunked_logprobs(hidden, weight, targets, temperature, return_entropy, ignore_index)
    mod = load_triton("triton_logprob", hidden.device)
    return mod.triton_logprobs(hidden, weight, targets, temperature, return_entropy, ignore_index)


def fused_kl(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    ref_hidden: torch.Tensor,
    ref_weight: torch.Tensor,
    temperature: float = 1.0,
    backend: str = "auto",
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Exact per-token KL(π‖π_ref) over the full vocabulary, from both models' hidden states.

    Formula: with z = hidden @ weight.T / T, zq = ref_hidden @ ref_weight.T / T, p = softmax(z),
    KL = Σ_j p_j (z_j - zq_j) - logsumexp(z) + logsumexp(zq)  (= Σ p log(p/q), ≥ 0).

    Args:
        hidden, weight: policy hidden states and LM head — gradients flow here.
        ref_hidden, ref_weight: reference model's; treated as constants (no gradient).
        temperature: T > 0 dividing both sides' logits.
        backend: "auto" (Triton on CUDA, torch elsewhere), "triton", or "torch".
        mask: bool [N]; rows where it is False give 0 and no gradient, and cost nothing (None: all).
    Shapes:
        hidden [N, H], weight [V, H], ref_hidden [N, H'], ref_weight [V, H'], mask [N] -> kl [N]
    Returns:
        float32 ``kl`` [N] ≥ 0 for fp32/fp16/bf16 inputs (float64 stays float64 on the torch backend).
    """
    _check_pair(hidden, weight, ref_hidden, ref_weight, temperature, "fused_kl")
    if mask is not None and mask.shape != hidden.shape[:1]:
        raise ValueError(f"fused_kl: mask must be [N]={hidden.shape[0]}, got {tuple(mask.shape)}")
    if resolve_backend(backend, hidden, weight, ref_hidden, ref_weight) == "torch" or hidden.shape[0] == 0:
        return chunked_kl(hidden, weight, ref_hidden, ref_weight, temperature, mask=mask)
    mod = load_triton("triton_kl", hidden.device)
    return mod.triton_kl(hidden, weight, ref_hidden, ref_weight, temperature, mask)


def fused_logprobs_kl(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    ref_hidden: torch.Tensor,
    ref_weight: torch.Tensor,
    targets: torch.Tensor,
    temperature: float = 1.0,
    backend: str = "auto",
    ignore_index: int = -100,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The rollout's scoring in one pass: log π(target), log π_ref(target) and the exact
    KL(π‖π_ref) per token, from both models' hidden states (no gradient).

    Formula: with z = hidden @ weight.T / T and zq = ref_hidden @ ref_weight.T / T,
    logprob = z[target] − lse(z), ref_logprob = zq[target] − lse(zq),
    kl = Σ_j softmax(z)_j (z_j − zq_j) − lse(z) + lse(zq). The same numbers as
    ``fused_logprobs`` on each side and ``fused_kl``, for one sweep over the vocabulary instead of three.

    Shapes: hidden [N, H], weight [V, H], ref_hidden [N, H'], ref_weight [V, H'], targets [N]
        -> (logprobs [N], ref_logprobs [N], kl [N]), float32; the logprobs are 0 where
        target == ignore_index (the KL of those rows is computed all the same).
    """
    _check_pair(hidden, weight, ref_hidden, ref_weight, temperature, "fused_logprobs_kl")
    _check_targets(targets, hidden.shape[0], weight.shape[0], ignore_index, "fused_logprobs_kl")
    if resolve_backend(backend, hidden, weight, ref_hidden, ref_weight, targets) == "torch" or hidden.shape[0] == 0:
        return chunked_logprobs_kl(hidden, weight, ref_hidden, ref_weight, targets, temperature, ignore_index)
    mod = load_triton("triton_kl", hidden.device)
    return mod.triton_logprobs_kl(hidden, weight, ref_hidden, ref_weight, targets, temperature, ignore_index)
