"""An oracle drafter: a real drafter whose proposals are forced to a known continuation.

`ForcedDrafter` wraps a DFlash/DSpark drafter. Every round the wrapped drafter really runs
(its backbone, LM head and sequential head cost what they always cost) but the tokens it
proposes are replaced, through `propose(..., forced_tokens_BK=...)`, by the continuation each
request is known to take (the target's own greedy output, decoded beforehand). Under greedy
decoding every draft is then accepted and a round commits gamma + 1 tokens: the engine's cost
measured apart from the drafter's quality (`benchmarks/engine_ceiling.py`).

Greedy decoding only: the forced tokens were not drawn from the drafter's distribution, so
the sampling rule would no longer be exact.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


class ForcedDrafter:
    """Delegates to `drafter`, forcing draft k of request b to `sequences[b][anchor_pos + 1 + k]`.

    sequences[b]: the whole token sequence of request b (prompt, then the continuation the
    target will produce). Positions past its end are filled with `pad_token` (those drafts are
    simply rejected, as a wrong guess would be).
    """

    def __init__(self, drafter, sequences: Sequence[Sequence[int]], pad_token: int = 0):
        self.drafter = drafter
        self.spec = drafter.spec
        self.confidence = getattr(drafter, "confidence", None)
        self.pad_token = int(pad_token)
        longest = max(len(s) for s in sequences)
        self.table_BL = torch.full((len(sequences), longest + 2 * self.spec.block_size + 2), self.pad_token,
                                   dtype=torch.long)
        for b, seq in enumerate(sequences):
            self.table_BL[b, :len(seq)] = torch.tensor(list(seq), dtype=torch.long)

    def new_state(self, batch_size: int, max_len: int, device=None):
        if batch_size != self.table_BL.shape[0]:
            raise ValueError(f"ForcedDrafter holds {self.table_BL.shape[0]} sequences; the batch has "
                             f"{batch_size}")
        return self.drafter.new_state(batch_size, max_len, device)

    def forced(self, anchor_pos_B: torch.Tensor, K: int) -> torch.Tensor:
        """forced_BK: the known tokens right after each anchor."""
        cols_BK = anchor_pos_B.cpu()[:, None] + 1 + torch.arange(K)
        cols_BK = cols_BK.clamp_max(self.table_BL.shape[1] - 1)
        return self.table_BL.gather(1, cols_BK)

    @torch.no_grad()
    def propose(self, state, anchor_tokens_B: torch.Tensor, anchor_pos_B: torch.Tensor, greedy: bool = True,
                temperature: float = 1.0, generator=None, num_drafts: int | None = None, **kwargs):
        if not greedy:
            raise ValueError("ForcedDrafter forces tokens the drafter did not draw: greedy decoding only")
        K = self.spec.block_size
        forced_BK = self.forced(anchor_pos_B, K).to(anchor_tokens_B.device)
        if num_drafts is not None:
            kwargs["num_drafts"] = num_drafts
        return self.drafter.propose(state, anchor_tokens_B, anchor_pos_B, greedy=True,
                                    temperature=temperature, generator=generator, forced_tokens_BK=forced_BK,
                                    **kwargs)
