"""The policy the PPO loop trains: an HF causal LM, a value head, and a reference view.

Only the trunk (``model.model``) runs forward: logprobs come from hidden states through the fused
kernel (``kernels.fused_logprobs``), so no ``[B, T, V]`` logits tensor is ever built.

References:
- Ziegler et al. 2019, "Fine-Tuning Language Models from Human Preferences" (value head on the trunk).
- Huang et al. 2022, "The N+ implementation details of RLHF with PPO" (value at the state before
  each response token; a separate value network as an option).
"""
from __future__ import annotations

import contextlib
import copy
from typing import Iterator

import torch
from torch import nn

from kernels import fused_kl, fused_logprobs

from .. import fsdp
from ..errors import ConfigError
from ..models import is_peft

IGNORE_INDEX = -100


def trunk_of(model: nn.Module) -> nn.Module:
    """The decoder trunk (embeddings + blocks + final norm) of a causal LM, peft-wrapped or not."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    # LoRA layers are injected in place, so the base model's trunk still runs the adapters.
    prefix = getattr(base, "base_model_prefix", "model")
    return getattr(base, prefix) if hasattr(base, prefix) else base.get_decoder()


def position_ids_for(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that skip left padding: 0 at each row's first real token.  (B, L) -> (B, L)"""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


class CausalLMView:
    """What rollout and scoring need from a language model: hidden states and the unembedding."""

    def __init__(self, model: nn.Module):
        self.model = model

    @property
    def lm_head_weight(self) -> torch.Tensor:
        """(V, H) output embedding (tied or not); logits = hidden @ weight.T."""
        return self.model.get_output_embeddings().weight

    def forward_hidden(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                       position_ids: torch.Tensor | None = None, past_key_values=None,
                       use_cache: bool = False):
        """Last hidden states (B, L, H) of the trunk only; with ``use_cache`` also the cache."""
        if position_ids is None:
            position_ids = position_ids_for(attention_mask)
        out = trunk_of(self.model)(input_ids=input_ids, attention_mask=attention_mask,
                                   position_ids=position_ids, past_key_values=past_key_values,
                                   use_cache=use_cache)
        return (out.last_hidden_state, out.past_key_values) if use_cache else out.last_hidden_state


class ValueHead(nn.Module):
    """Scalar value from a hidden state: one linear layer, no dropout, near-zero init.

    A small init keeps the first value estimates near 0 so early advantages are ~ the rewards
    instead of noise from a random projection.
    """

    def __init__(self, hidden_size: int, init_std: float = 0.01):
        super().__init__()
        self.summary = nn.Linear(hidden_size, 1)
        nn.init.normal_(self.summary.weight, std=init_std)
        nn.init.zeros_(self.summary.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """(..., H) -> (...,) float32 values."""
        return self.summary(hidden.to(self.summary.weight.dtype)).squeeze(-1).float()


class PolicyWithValue(nn.Module, CausalLMView):
    """An HF causal LM (optionally peft-wrapped) + a value head + a frozen reference.

    Args:
        model: the policy LM (``PreTrainedModel`` or ``PeftModel``).
        value_model: ``"shared"`` (value head on the policy trunk: one forward gives logprobs and
            values), ``"separate"`` (the head sits on its own trunk copy) or ``"none"`` (no critic:
            for the critic-free estimators rloo, grpo, dr_grpo, reinforce_pp; nothing built or saved).
        value_backbone: for ``"separate"``, the causal LM / classifier whose trunk initializes the
            value network (e.g. the reward model); default a copy of the policy's trunk.
        ref_model: an explicit reference LM; default the adapter-disabled policy under LoRA
            (no second copy of the weights) or a frozen deep copy otherwise.
    """

    def __init__(self, model: nn.Module, value_model: str = "shared",
                 value_backbone: nn.Module | None = None, ref_model: nn.Module | None = None):
        nn.Module.__init__(self)
        if value_model not in ("shared", "separate", "none"):
            raise ValueError(f"value_model must be 'shared', 'separate' or 'none', got {value_model!r}")
        self.model = model
        self.value_model = value_model
        hidden_size = model.get_output_embeddings().weight.shape[1]
        self.value_head = ValueHead(hidden_size) if value_model != "none" else None
        self.value_trunk: nn.Module | None = None
        if value_model == "separate":
            source = trunk_of(value_backbone) if value_backbone is not None else trunk_of(model)
            self.value_trunk = copy.deepcopy(source)
            self.value_trunk.requires_grad_(True)
        self.is_lora = is_peft(model)
        if self.is_lora and hasattr(model.get_output_embeddings(), "lora_A"):
            raise ConfigError("lora_target_modules: LoRA on the output layer is not supported: the fused logprob "
                              "kernel reads the LM head's weight directly, so its adapter would be ignored "
                              "(leave the LM head out of lora_target_modules)")
        self.ref_model: nn.Module | None = None
        if ref_model is not None or not self.is_lora:
            self.ref_model = ref_model if ref_model is not None else copy.deepcopy(model)
            self.ref_model.requires_grad_(False).eval()
        self.eval()  # dropout off throughout PPO: rollout and update must see the same policy

    def train(self, mode: bool = True) -> "PolicyWithValue":
        """Kept in eval mode: dropout would make the first-epoch ratio differ from 1."""
        return super().train(False)

    @property
    def has_critic(self) -> bool:
        """False for ``value_model="none"``: no values are computed, trained or saved."""
        return self.value_head is not None

    def response_values(self, hidden: torch.Tensor, input_ids: torch.Tensor,
                        attention_mask: torch.Tensor) -> torch.Tensor | None:
        """Values (B, T) at the states before each response token; None without a critic.

        Shapes: hidden (B, T, H) from :func:`response_hidden`; input_ids/attention_mask (B, Lq+T).
        Shared: the head reads ``hidden``. Separate: the value trunk runs its own forward.
        """
        if self.value_head is None:
            return None
        if self.value_trunk is None:
            return self.value_head(hidden).float()  # (B, T); fp32 also under bf16 autocast
        t = hidden.shape[1]
        full = self.value_trunk(input_ids=input_ids, attention_mask=attention_mask,
                                position_ids=position_ids_for(attention_mask)).last_hidden_state
        lq = input_ids.shape[1] - t
        return self.value_head(full[:, lq - 1: lq - 1 + t]).float()  # (B, T)

    @contextlib.contextmanager
    def reference(self) -> Iterator[CausalLMView]:
        """A view of the reference policy: adapter-disabled under LoRA, else the frozen copy."""
        if self.ref_model is not None:
            yield CausalLMView(self.ref_model)
        else:
            with self.model.disable_adapter():
                yield CausalLMView(self.model)

    def shard_fsdp2(self, bf16: bool = False, shard_reference: bool = False) -> None:
        """Under torchrun, shard the policy's trunk with FSDP2 (the unembedding and value head stay
        replicated, :func:`rlhf_core.fsdp.wrap_trunk_fsdp2`) and, with ``shard_reference``, the frozen
        reference's trunk likewise. Under ``bf16`` an unsharded reference is wrapped as a whole copy
        per rank with the same mixed-precision policy, so it computes in the policy's precision (at
        iteration 1 π = π_ref up to the sampling loop's rounding, not bf16's). Call before the
        optimizer is built. No-op in one process."""
        fsdp.wrap_trunk_fsdp2(trunk_of(self.model), [self.lm_head_weight], bf16)
        if self.ref_model is not None and (shard_reference or bf16):  # frozen: no gradients to reduce
            ref = self.ref_model
            fsdp.wrap_trunk_fsdp2(trunk_of(ref), [ref.get_output_embeddings().weight], bf16,
                                  replicate=not shard_reference)

    def named_trainable_parameters(self) -> dict[str, nn.Parameter]:
        """Parameters the optimizer updates, by name (the reference and frozen base weights excluded)."""
        return {n: p for n, p in self.named_parameters() if p.requires_grad and not n.startswith("ref_model.")}

    def trainable_parameters(self) -> list[nn.Parameter]:
        """:meth:`named_trainable_parameters`' values, in order."""
        return list(self.named_trainable_parameters().values())

    def value_state_dict(self) -> dict[str, torch.Tensor]:
        """Value head (+ separate trunk) weights, saved next to the policy as value_head.safetensors
        (empty without a critic)."""
        if self.value_head is None:
            return {}
        state = {f"value_head.{k}": v for k, v in self.value_head.state_dict().items()}
        if self.value_trunk is not None:
            state.update({f"value_trunk.{k}": v for k, v in self.value_trunk.state_dict().items()})
        return {k: v.detach().contiguous().cpu() for k, v in state.items()}


def response_hidden(lm: CausalLMView, query_ids: torch.Tensor, query_mask: torch.Tensor,
                    response_ids: torch.Tensor, mask: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Hidden states at the positions that predict each response token.

    Shapes: query (B, Lq) left-padded, response (B, T) right-padded.
    Returns: (hidden (B, T, H), input_ids (B, Lq+T), attention_mask (B, Lq+T)); row t of ``hidden``
    is the state after reading query + response[:t], i.e. the one whose logits score response[t].
    """
    input_ids = torch.cat([query_ids, response_ids], dim=1)  # (B, Lq+T)
    attention_mask = torch.cat([query_mask.long(), mask.long()], dim=1)  # (B, Lq+T)
    hidden = lm.forward_hidden(input_ids, attention_mask)  # (B, Lq+T, H)
    lq, t = query_ids.shape[1], response_ids.shape[1]
    return hidden[:, lq - 1: lq - 1 + t], input_ids, attention_mask  # (B, T, H)


def response_logprobs(lm: CausalLMView, query_ids: torch.Tensor, query_mask: torch.Tensor,
                      response_ids: torch.Tensor, mask: torch.Tensor, temperature: float = 1.0,
                      backend: str = "auto", with_values: bool = False, with_entropy: bool = False,
                      ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """log π(response_t | query, response_<t) from hidden states, plus values and entropy.

    logprobs_t = log_softmax(h_t · Wᵀ / temperature)[response_t], computed row-wise by
    ``kernels.fused_logprobs`` on (B·T, H) rows; masked rows use ``ignore_index`` and read 0.

    Shapes: query (B, Lq), response/mask (B, T).
    Returns: (logprobs (B, T) float32, values (B, T) or None, entropy (B, T) or None), zero where
    mask is 0. ``with_values`` needs a :class:`PolicyWithValue`.
    """
    hidden, input_ids, attention_mask = response_hidden(lm, query_ids, query_mask, response_ids, mask)
    return logprobs_from_hidden(lm, hidden, input_ids, attention_mask, response_ids, mask, temperature,
                                backend, with_values, with_entropy)


def response_logprobs_and_kl(policy: PolicyWithValue, query_ids: torch.Tensor, query_mask: torch.Tensor,
                             response_ids: torch.Tensor, mask: torch.Tensor, temperature: float = 1.0,
                             backend: str = "auto") -> tuple[torch.Tensor, ...]:
    """:func:`response_logprobs` with values and entropy, plus the exact per-token KL(π‖π_ref) under the
    current parameters: one policy forward (with grad) and one reference forward (no grad), the KL
    from ``kernels.fused_kl`` on both hidden states, so its backward trains the policy.

    Shapes: query (B, Lq), response/mask (B, T).
    Returns: (logprobs, values, entropy, kl), each (B, T) and 0 where mask is 0.
    """
    hidden, input_ids, attention_mask = response_hidden(policy, query_ids, query_mask, response_ids, mask)
    logprobs, values, entropy = logprobs_from_hidden(policy, hidden, input_ids, attention_mask, response_ids, mask,
                                                     temperature, backend, with_values=True, with_entropy=True)
    with torch.no_grad(), policy.reference() as ref:
        ref_hidden, _, _ = response_hidden(ref, query_ids, query_mask, response_ids, mask)  # (B, T, H')
        ref_weight = ref.lm_head_weight
    b, t, h = hidden.shape
    kl = fused_kl(hidden.reshape(b * t, h), policy.lm_head_weight, ref_hidden.reshape(b * t, -1), ref_weight,
                  temperature, backend)  # (B·T,)
    return logprobs, values, entropy, kl.view(b, t) * mask.bool()


def logprobs_from_hidden(lm: CausalLMView, hidden: torch.Tensor, input_ids: torch.Tensor,
                         attention_mask: torch.Tensor, response_ids: torch.Tensor, mask: torch.Tensor,
                         temperature: float = 1.0, backend: str = "auto", with_values: bool = False,
                         with_entropy: bool = False,
                         ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """:func:`response_logprobs` from hidden states already computed (e.g. by the sampling loop).

    Shapes: hidden (B, T, H), row t the state that predicts response[t]; input_ids/attention_mask
    (B, Lq+T) (read only by a separate value network); response/mask (B, T).
    """
    b, t, h = hidden.shape
    valid = mask.bool()
    targets = response_ids.masked_fill(~valid, IGNORE_INDEX).reshape(-1)  # (B·T,)
    out = fused_logprobs(hidden.reshape(b * t, h), lm.lm_head_weight, targets, temperature=temperature,
                         return_entropy=with_entropy, backend=backend, ignore_index=IGNORE_INDEX)
    logprobs, entropy = (out if with_entropy else (out, None))
    logprobs = logprobs.reshape(b, t) * valid  # (B, T)
    if entropy is not None:
        entropy = entropy.reshape(b, t) * valid  # (B, T)
    values = None
    if with_values:  # None from a policy without a critic
        values = lm.response_values(hidden, input_ids, attention_mask)  # type: ignore[attr-defined]
        values = values * valid if values is not None else None
    return logprobs, values, entropy
