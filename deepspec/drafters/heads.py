"""DSpark sequential heads (docs/algorithms.md): Markov and RNN prefix biases, and the confidence head.

The bias B_k over the vocabulary is always a low-rank product lowrank_k @ W2 (W2 [r, V]), so
training returns `lowrank_NKR` and `W2` and the loss adds the bias chunk by chunk with the
LM head, never materialising [N, K, V] twice.

W2 starts at zero: the head is then a no-op and a freshly built DSpark drafter is exactly a
DFlash drafter, so the bias can only grow where it lowers the loss and an early random bias
over the whole vocabulary never corrupts the backbone's logits. Training still moves W2
(its gradient is lowrank^T dL/dB, and W1 / tanh(o) are non-zero); W1 then receives gradient.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn


class MarkovHead(nn.Module):
    """B(x_{k-1}, .) = W1[x_{k-1}] W2 with W1 [V, r] (an embedding table) and W2 [r, V]."""

    def __init__(self, vocab_size: int, rank: int):
        super().__init__()
        self.w1 = nn.Embedding(vocab_size, rank)
        nn.init.normal_(self.w1.weight, std=0.02)
        self.w2 = nn.Parameter(torch.zeros(rank, vocab_size))

    def embed_prev(self, prev_tokens: Tensor) -> Tensor:
        return self.w1(prev_tokens)

    def forward(self, prev_tokens_NK: Tensor, hidden_NKD: Tensor) -> Tensor:
        """Teacher-forced lowrank_NKR = W1[x_{k-1}] for the whole block at once."""
        return self.w1(prev_tokens_NK)

    def init_state(self, batch_size: int, device) -> None:
        return None

    def step(self, prev_B: Tensor, hidden_BD: Tensor, state: None) -> tuple[Tensor, None]:
        """One sampling step: (lowrank_BR, state)."""
        return self.w1(prev_B), None


class RNNHead(nn.Module):
    """z_k = [s_{k-1}; W1[x_{k-1}]; h_k]; [g, c, o] = A z_k + b;
    s_k = sigmoid(g) * s_{k-1} + (1 - sigmoid(g)) * tanh(c); B_k = tanh(o) @ W2; s_0 = 0."""

    def __init__(self, vocab_size: int, rank: int, hidden: int):
        super().__init__()
        self.rank = rank
        self.w1 = nn.Embedding(vocab_size, rank)
        nn.init.normal_(self.w1.weight, std=0.02)
        self.gates = nn.Linear(2 * rank + hidden, 3 * rank)
        self.w2 = nn.Parameter(torch.zeros(rank, vocab_size))

    def embed_prev(self, prev_tokens: Tensor) -> Tensor:
        return self.w1(prev_tokens)

    def init_state(self, batch_size: int, device) -> Tensor:
        return torch.zeros(batch_size, self.rank, device=device, dtype=self.gates.weight.dtype)

    def step(self, prev_B: Tensor, hidden_BD: Tensor, state: Tensor) -> tuple[Tensor, Tensor]:
        """One recurrence step: (lowrank_BR = tanh(o), new state s_k)."""
        z = torch.cat([state, self.w1(prev_B), hidden_BD.to(state.dtype)], dim=-1)
        g, c, o = self.gates(z).chunk(3, dim=-1)
        gate = torch.sigmoid(g)
        new_state = gate * state + (1 - gate) * torch.tanh(c)
        return torch.tanh(o), new_state

    def forward(self, prev_tokens_NK: Tensor, hidden_NKD: Tensor) -> Tensor:
        """Teacher-forced lowrank_NKR, running the recurrence over the K block slots."""
        state = self.init_state(prev_tokens_NK.shape[0], prev_tokens_NK.device)
        outs = []
        for k in range(prev_tokens_NK.shape[1]):
            out, state = self.step(prev_tokens_NK[:, k], hidden_NKD[:, k], state)
            outs.append(out)
        return torch.stack(outs, dim=1)


class ConfidenceHead(nn.Module):
    """c_k = sigmoid(w^T [h_k; W1[x_{k-1}]]) (or w^T h_k without the prefix embedding); returns logits."""

    def __init__(self, hidden: int, prev_dim: int = 0):
        super().__init__()
        self.proj = nn.Linear(hidden + prev_dim, 1)
        self.uses_prev = prev_dim > 0

    def forward(self, hidden: Tensor, prev_emb: Optional[Tensor]) -> Tensor:
        x = torch.cat([hidden, prev_emb.to(hidden.dtype)], dim=-1) if self.uses_prev else hidden
        return self.proj(x).squeeze(-1)


def build_head(head: str, vocab_size: int, rank: int, hidden: int) -> Optional[nn.Module]:
    """MarkovHead / RNNHead / None for drafter.head = markov | rnn | none."""
    if head == "markov":
        return MarkovHead(vocab_size, rank)
    if head == "rnn":
        return RNNHead(vocab_size, rank, hidden)
    if head == "none":
        return None
    raise ValueError(f"drafter.head={head!r}; choose markov, rnn or none")
