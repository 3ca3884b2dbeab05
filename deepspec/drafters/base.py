"""What every drafter shares: outputs, proposals, and the frozen target weights it borrows.

The target's token embedding and LM head are used by every drafter but never trained and
never saved: they live in a plain attribute holder (`TargetWeights`), so they appear in
neither `parameters()` nor `state_dict()`; DeepSpeed never puts them in optimizer state
and checkpoints never duplicate them. Call `attach_target` before the first forward.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass
class DraftOutput:
    """Training forward output; the loss applies the LM head chunk by chunk.

    Draft logits = hidden_NKD @ W^T (+ lowrank_NKR @ lowrank_weight_RV), where W is
    `lm_head_weight_VD` when given (Eagle3 pruned vocabulary: the frozen rows of the target's LM
    head at `draft_to_target_v`, the absolute target id of each draft entry) and the target's
    LM head otherwise.
    """

    hidden_NKD: Tensor
    lowrank_NKR: Optional[Tensor] = None
    lowrank_weight_RV: Optional[Tensor] = None
    conf_logit_NK: Optional[Tensor] = None
    lm_head_weight_VD: Optional[Tensor] = None
    draft_to_target_v: Optional[Tensor] = None


@dataclass
class Proposal:
    """Draft tokens for a batch of requests (target vocabulary ids).

    draft_probs_BKV: float32 full-vocabulary distributions the tokens were drawn from (the
    verifier needs them to sample); conf_BK: sigmoid confidences or None.
    """

    tokens_BK: Tensor
    draft_probs_BKV: Tensor
    conf_BK: Optional[Tensor] = None


class TargetWeights:
    """Plain holder (not an nn.Module) of the target's embedding [V, D] and LM head [V, D]."""

    def __init__(self, embed_weight_VD: Tensor, lm_head_weight_VD: Tensor):
        self.embed_weight_VD = embed_weight_VD.detach()
        self.lm_head_weight_VD = lm_head_weight_VD.detach()


class SharedTargetMixin:
    """`attach_target` / `embed` / `target_logits` for drafters that borrow the target's weights."""

    _frozen: Optional[TargetWeights] = None

    def attach_target(self, embed_tokens, lm_head_weight: Tensor) -> None:
        """Borrow the target's embedding (nn.Embedding or [V, D] tensor) and LM head weight [V, D]."""
        embed_w = embed_tokens.weight if isinstance(embed_tokens, nn.Embedding) else embed_tokens
        V = self.shapes.vocab_size
        for name, w in (("embed_tokens", embed_w), ("lm_head_weight", lm_head_weight)):
            if w.shape[0] != V or w.shape[-1] != self.shapes.hidden_size:
                raise ValueError(f"attach_target: {name} has shape {tuple(w.shape)}; this drafter was built for "
                                 f"vocab {V} x hidden {self.shapes.hidden_size}")
        object.__setattr__(self, "_frozen", TargetWeights(embed_w, lm_head_weight))

    @property
    def target_attached(self) -> bool:
        return self._frozen is not None

    @property
    def frozen(self) -> TargetWeights:
        if self._frozen is None:
            raise RuntimeError(f"{type(self).__name__}: call attach_target(embed_tokens, lm_head_weight) first")
        return self._frozen

    def external_parameters(self) -> list[nn.Parameter]:
        """Trainable parameters the loss uses outside their module's forward (ZeRO-3 must register them
        with `deepspeed.zero.register_external_parameter`): DSpark's W2. Empty for the others."""
        return []

    def embed(self, ids: Tensor, dtype: torch.dtype) -> Tensor:
        return F.embedding(ids, self.frozen.embed_weight_VD).to(dtype)

    def target_logits(self, hidden: Tensor) -> Tensor:
        w = self.frozen.lm_head_weight_VD
        return hidden.to(w.dtype) @ w.T


def draw(logits_BV: Tensor, greedy: bool, temperature: float, generator: Optional[torch.Generator],
         forced_B: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """(tokens_B, probs_BV float32): argmax when greedy, else a sample at `temperature`.

    `forced_B` overrides the drawn tokens (teacher forcing at inference; tests, scoring).
    """
    logits = logits_BV.float()
    if greedy:
        probs = logits.softmax(-1)
        tokens = logits.argmax(-1)
    else:
        if temperature <= 0:
            raise ValueError(f"temperature={temperature}; use greedy=True for temperature 0")
        probs = (logits / temperature).softmax(-1)
        tokens = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
    if forced_B is not None:
        tokens = forced_B.to(tokens.device)
    return tokens, probs
