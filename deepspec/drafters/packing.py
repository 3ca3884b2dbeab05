"""Training batches: anchor sampling and anchor-bounded block packing (docs/training.md).

DFlash/DSpark train on *blocks*: per sequence, N anchors i (positions where i and i+1 lie
in the loss mask), each giving block inputs [x_i, mask, ..., mask] at positions i..i+K-1
and labels x_{i+1..i+K}. Blocks of many sequences go into one dense `PackedBatch`; which
context each block query sees is carried by token-level indices (sequence id, position,
anchor), never by padded [B, T, T] masks. Only context before each sequence's last anchor
is kept, so the drafter's cost follows the number of anchors, not the context length.

Eagle3 trains on whole sequences (causal, with training-time test): `batch_sequences`.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Optional

import torch
from torch import Tensor

from deepspec.features import SequenceFeatures


def _to(obj, device, dtype):
    """Move every tensor field; cast floating ones to `dtype` when given."""
    out = {}
    for f in fields(obj):
        v = getattr(obj, f.name)
        if isinstance(v, Tensor):
            v = v.to(device=device, dtype=dtype if (dtype is not None and v.is_floating_point()) else v.dtype)
        out[f.name] = v
    return type(obj)(**out)


@dataclass
class PackedBatch:
    """Blocks of many sequences in one dense batch (C context tokens, N blocks of K slots).

    Sequences are laid out in order: sequence s owns ctx rows [sum(ctx_counts[:s]), +ctx_counts[s])
    and blocks [sum(block_counts[:s]), +block_counts[s]). Block n's queries see the ctx rows of
    its own sequence with position < anchor_pos_N[n], and the K slots of block n.
    """

    ctx_taps_CMD: Tensor  # tapped target features of the context tokens
    ctx_pos_C: Tensor  # position of each ctx token in its sequence
    ctx_seq_C: Tensor  # sequence id of each ctx token
    block_ids_NK: Tensor  # [anchor, mask, ..., mask]
    block_pos_NK: Tensor  # anchor + k, k = 0..K-1
    block_seq_N: Tensor
    anchor_pos_N: Tensor
    labels_NK: Tensor  # slot k predicts x_{anchor+k+1}
    valid_NK: Tensor  # bool; a contiguous prefix of each row
    target_hidden_NKD: Tensor  # final[anchor + k]: the target's hidden that predicts labels_NK[:, k]
    prev_tokens_NK: Tensor  # x_{anchor+k}: the token before label k (teacher forcing)
    ctx_counts: list[int]
    block_counts: list[int]

    @property
    def num_blocks(self) -> int:
        return self.block_ids_NK.shape[0]

    @property
    def block_size(self) -> int:
        return self.block_ids_NK.shape[1]

    def to(self, device=None, dtype: Optional[torch.dtype] = None) -> PackedBatch:
        return _to(self, device, dtype)


def sample_anchors(loss_mask_T: Tensor, num_anchors: int, generator: Optional[torch.Generator] = None) -> Tensor:
    """Anchor positions i with loss_mask[i] and loss_mask[i+1], sorted.

    Draws `num_anchors` without replacement (deterministic for a given generator state);
    returns all valid positions when there are fewer.
    """
    lm = loss_mask_T.bool().cpu()
    valid = torch.nonzero(lm[:-1] & lm[1:]).flatten()
    if valid.numel() > num_anchors:
        pick = torch.randperm(valid.numel(), generator=generator)[:num_anchors]
        valid = valid[pick].sort().values
    return valid.to(loss_mask_T.device)


def block_targets(seq: SequenceFeatures, anchors_N: Tensor, block_size: int) -> dict[str, Tensor]:
    """labels / valid prefix / target hidden / previous tokens for blocks at `anchors_N`."""
    ids, lm, final = seq.input_ids_T, seq.loss_mask_T.bool(), seq.final_TD
    T = ids.shape[0]
    k = torch.arange(1, block_size + 1, device=ids.device)
    label_pos = anchors_N[:, None] + k  # x_{i+k}
    in_seq = label_pos < T
    safe = label_pos.clamp(max=T - 1)
    valid = (in_seq & lm[safe]).long().cumprod(dim=1).bool()
    labels = torch.where(in_seq, ids[safe], torch.zeros_like(safe))
    hidden = final[safe - 1] * in_seq[..., None].to(final.dtype)  # final[i+k-1]
    prev = torch.cat([ids[anchors_N][:, None], labels[:, :-1]], dim=1)  # slot 1: anchor; slot k: label k-1
    return {"labels_NK": labels, "valid_NK": valid, "target_hidden_NKD": hidden, "prev_tokens_NK": prev}


def pack_blocks(seqs: list[SequenceFeatures], block_size: int, anchors_per_seq: int, mask_token_id: int,
                generator: Optional[torch.Generator] = None) -> PackedBatch:
    """Sample anchors in every sequence and pack all blocks and their contexts into one batch."""
    if not seqs:
        raise ValueError("pack_blocks got no sequences")
    parts: dict[str, list[Tensor]] = {name: [] for name in (
        "ctx_taps_CMD", "ctx_pos_C", "ctx_seq_C", "block_ids_NK", "block_pos_NK", "block_seq_N", "anchor_pos_N",
        "labels_NK", "valid_NK", "target_hidden_NKD", "prev_tokens_NK")}
    ctx_counts, block_counts = [], []
    offs = torch.arange(block_size)
    for s, seq in enumerate(seqs):
        T = seq.input_ids_T.shape[0]
        for name, t in (("loss_mask_T", seq.loss_mask_T), ("taps_TMD", seq.taps_TMD), ("final_TD", seq.final_TD)):
            if t.shape[0] != T:
                raise ValueError(f"sequence {s}: {name} has {t.shape[0]} rows but input_ids_T has {T}")
        anchors = sample_anchors(seq.loss_mask_T, anchors_per_seq, generator)
        dev = seq.input_ids_T.device
        n = anchors.numel()
        ctx_len = int(anchors.max()) if n else 0  # only positions before the last anchor are ever seen
        ctx_counts.append(ctx_len)
        block_counts.append(n)
        parts["ctx_taps_CMD"].append(seq.taps_TMD[:ctx_len])
        parts["ctx_pos_C"].append(torch.arange(ctx_len, device=dev))
        parts["ctx_seq_C"].append(torch.full((ctx_len,), s, device=dev, dtype=torch.long))
        ids = torch.full((n, block_size), mask_token_id, device=dev, dtype=torch.long)
        ids[:, 0] = seq.input_ids_T[anchors]
        parts["block_ids_NK"].append(ids)
        parts["block_pos_NK"].append(anchors[:, None] + offs.to(dev))
        parts["block_seq_N"].append(torch.full((n,), s, device=dev, dtype=torch.long))
        parts["anchor_pos_N"].append(anchors)
        for name, t in block_targets(seq, anchors, block_size).items():
            parts[name].append(t)
    cat = {name: torch.cat(ts) for name, ts in parts.items()}
    return PackedBatch(**cat, ctx_counts=ctx_counts, block_counts=block_counts)


def block_attention_masks(batch: PackedBatch, sliding_window: Optional[int] = None) -> list[Optional[Tensor]]:
    """Per sequence: bool mask [N_s*K, C_s + N_s*K] over keys [ctx of s; blocks of s] (True = attend).

    Query (block n, slot k) sees ctx position c iff c < anchor_n (and, with a sliding window
    w, block_pos - c < w), and every slot of its own block. None for sequences without blocks.
    """
    masks: list[Optional[Tensor]] = []
    c0 = n0 = 0
    K = batch.block_size
    for C, N in zip(batch.ctx_counts, batch.block_counts, strict=True):
        if N == 0:
            masks.append(None)
            c0, n0 = c0 + C, n0 + N
            continue
        ctx_pos = batch.ctx_pos_C[c0:c0 + C]
        qpos = batch.block_pos_NK[n0:n0 + N].reshape(-1)  # [N*K]
        anchor = batch.anchor_pos_N[n0:n0 + N].repeat_interleave(K)
        ctx_ok = ctx_pos[None, :] < anchor[:, None]
        if sliding_window is not None:
            ctx_ok &= (qpos[:, None] - ctx_pos[None, :]) < sliding_window
        blk = torch.arange(N, device=qpos.device).repeat_interleave(K)
        masks.append(torch.cat([ctx_ok, blk[:, None] == blk[None, :]], dim=1))
        c0, n0 = c0 + C, n0 + N
    return masks


@dataclass
class Eagle3Batch:
    """Whole sequences, one per row (padded), for Eagle3 training-time test with K steps.

    Row position t, step j (N = B*T rows of the flattened [B, T]): input token x_{t+1+j},
    label x_{t+2+j}, target hidden final[t+1+j]; valid iff t+2+j < length and
    loss_mask[t+2+j] (steps are supervised independently, as in Eagle3).
    """

    input_ids_BT: Tensor
    taps_BTMD: Tensor
    lengths_B: Tensor
    labels_NK: Tensor
    valid_NK: Tensor
    target_hidden_NKD: Tensor

    def to(self, device=None, dtype: Optional[torch.dtype] = None) -> Eagle3Batch:
        return _to(self, device, dtype)


def batch_sequences(seqs: list[SequenceFeatures], max_len: int, ttt_steps: int) -> Eagle3Batch:
    """Pad (and truncate to `max_len`) whole sequences into an `Eagle3Batch`."""
    if not seqs:
        raise ValueError("batch_sequences got no sequences")
    lengths = [min(s.input_ids_T.shape[0], max_len) for s in seqs]
    B, T, K = len(seqs), max(lengths), ttt_steps
    s0 = seqs[0]
    dev = s0.input_ids_T.device
    ids = torch.zeros(B, T, dtype=torch.long, device=dev)
    lm = torch.zeros(B, T, dtype=torch.bool, device=dev)
    taps = s0.taps_TMD.new_zeros(B, T, *s0.taps_TMD.shape[1:])
    final = s0.final_TD.new_zeros(B, T, s0.final_TD.shape[-1])
    for b, (s, n) in enumerate(zip(seqs, lengths, strict=True)):
        ids[b, :n], lm[b, :n] = s.input_ids_T[:n], s.loss_mask_T[:n].bool()
        taps[b, :n], final[b, :n] = s.taps_TMD[:n], s.final_TD[:n]
    t = torch.arange(T, device=dev)
    label_pos = t[:, None] + torch.arange(2, K + 2, device=dev)  # [T, K]
    safe = label_pos.clamp(max=T - 1)
    in_seq = label_pos[None] < torch.tensor(lengths, device=dev)[:, None, None]  # [B, T, K]
    valid = in_seq & lm[:, safe]
    labels = torch.where(in_seq, ids[:, safe], 0)
    hidden = final[:, safe - 1] * in_seq[..., None].to(final.dtype)
    return Eagle3Batch(ids, taps, torch.tensor(lengths, device=dev), labels.reshape(B * T, K),
                       valid.reshape(B * T, K), hidden.reshape(B * T, K, -1))
