"""DSpark: DFlash backbone + sequential (Markov / RNN) head + confidence head (docs/algorithms.md).

p_k(v | x0, x<k) = softmax_v(U_k(v) + B_k(x0, x<k, v)), U_k = LM head of the backbone's h_k.
Training is teacher-forced (previous tokens = labels, `PackedBatch.prev_tokens_NK`) and returns
the low-rank bias factors for the chunked loss; inference runs the backbone once for the block
and then samples left to right, feeding each drawn token to the head.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from deepspec.drafters.base import DraftOutput, Proposal, draw
from deepspec.drafters.dflash import BlockDraftState, DFlashDrafter
from deepspec.drafters.heads import ConfidenceHead, build_head
from deepspec.drafters.packing import PackedBatch
from deepspec.drafters.spec import DrafterSpec
from deepspec.targets.shapes import TargetShapes


class DSparkDrafter(DFlashDrafter):
    """DFlash backbone with `head` (markov | rnn | none) and an optional confidence head."""

    def __init__(self, spec: DrafterSpec, shapes: TargetShapes):
        super().__init__(spec, shapes)
        s = self.spec
        self.head = build_head(s.head, shapes.vocab_size, s.markov_rank, shapes.hidden_size)
        prev_dim = s.markov_rank if (self.head is not None and s.confidence_uses_markov) else 0
        self.confidence = ConfidenceHead(shapes.hidden_size, prev_dim) if s.confidence_head else None

    def external_parameters(self) -> list[nn.Parameter]:
        return [] if self.head is None else [self.head.w2]  # returned as lowrank_weight_RV for the loss

    def _conf(self, hidden: Tensor, prev: Tensor) -> Optional[Tensor]:
        if self.confidence is None:
            return None
        prev_emb = self.head.embed_prev(prev) if self.confidence.uses_prev else None
        return self.confidence(hidden, prev_emb)

    def forward(self, batch: PackedBatch) -> DraftOutput:
        hidden = self.backbone(batch)
        prev = batch.prev_tokens_NK
        if self.head is None:
            return DraftOutput(hidden_NKD=hidden, conf_logit_NK=self._conf(hidden, prev))
        return DraftOutput(hidden_NKD=hidden, lowrank_NKR=self.head(prev, hidden), lowrank_weight_RV=self.head.w2,
                           conf_logit_NK=self._conf(hidden, prev))

    @torch.no_grad()
    def propose(self, state: BlockDraftState, anchor_tokens_B: Tensor, anchor_pos_B: Tensor, greedy: bool = True,
                temperature: float = 1.0, generator: Optional[torch.Generator] = None,
                forced_tokens_BK: Optional[Tensor] = None) -> Proposal:
        """One backbone forward for the block, then the head draws tokens left to right."""
        hidden = self.block_hidden(state, anchor_tokens_B, anchor_pos_B)  # [B, K, D]
        base = self.target_logits(hidden)  # U_k
        B, K = hidden.shape[:2]
        head_state = None if self.head is None else self.head.init_state(B, hidden.device)
        prev = anchor_tokens_B
        tokens, probs, confs = [], [], []
        for k in range(K):
            logits = base[:, k].float()
            if self.head is not None:
                lowrank, head_state = self.head.step(prev, hidden[:, k], head_state)
                logits = logits + (lowrank @ self.head.w2).float()
            conf = self._conf(hidden[:, k], prev)
            if conf is not None:
                confs.append(torch.sigmoid(conf.float()))
            forced = None if forced_tokens_BK is None else forced_tokens_BK[:, k]
            tok, p = draw(logits, greedy, temperature, generator, forced)
            tokens.append(tok)
            probs.append(p)
            prev = tok
        return Proposal(tokens_BK=torch.stack(tokens, 1), draft_probs_BKV=torch.stack(probs, 1),
                        conf_BK=torch.stack(confs, 1) if confs else None)
