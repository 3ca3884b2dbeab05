"""One training step and the held-out evaluation, read top to bottom.

    features (cache / online / hybrid) -> blocks (DFlash/DSpark: anchor packing) or
    sequences (Eagle3: training-time test) -> drafter forward -> chunked losses ->
    backward -> optimizer step

The drafter and its loss run inside one module (`DraftLoss`) so that ZeRO-3 keeps the
head weights the loss reads (Markov W2, Eagle3's pruned LM head) gathered until the loss
is done. Losses are sums; every micro-batch's sum is divided by the sum of position weights
over the whole optimizer step on all ranks (one all-reduce before the first forward), so
one process with gradient accumulation and N processes give the same update.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, fields
from typing import Optional, Union

import torch
from torch import Tensor, nn

from deepspec.drafters.packing import Eagle3Batch, PackedBatch, SequenceFeatures, batch_sequences, pack_blocks
from deepspec.drafters.registry import kind_entry
from deepspec.drafters.spec import DrafterSpec
from deepspec.losses import (
    block_tau,
    cpu_half_products,
    distill_losses,
    eagle3_row_weights,
    eagle_soft_ce,
    position_weights,
)
from deepspec.training.distributed import all_reduce_sum

Batch = Union[PackedBatch, Eagle3Batch]


def loss_weights(spec: DrafterSpec, gamma_w: Optional[float]) -> Tensor:
    """w_k per block position (DFlash/DSpark, docs/training.md) or ttt_decay**j per TTT step (Eagle3)."""
    if not kind_entry(spec).parallel_blocks:
        return spec.ttt_decay ** torch.arange(spec.ttt_steps, dtype=torch.float32)
    return position_weights(spec.block_size, gamma_w)


def make_batch(seqs: list[SequenceFeatures], spec: DrafterSpec, seed: int, device: torch.device,
               dtype: torch.dtype) -> Batch:
    """Pack sequences into the drafter's training batch (anchors drawn from a generator seeded by `seed`)."""
    seqs = [s for s in seqs if bool((s.loss_mask_T[:-1] & s.loss_mask_T[1:]).any())] or seqs
    if not kind_entry(spec).parallel_blocks:
        batch = batch_sequences(seqs, spec.max_seq_len, spec.ttt_steps)
    else:
        gen = torch.Generator().manual_seed(seed)
        batch = pack_blocks(seqs, spec.block_size, spec.anchors_per_seq, spec.mask_token_id, gen)
        if batch.num_blocks == 0:
            raise ValueError("a micro-batch has no supervised tokens (loss masks without two consecutive "
                             "assistant tokens): check the data's loss masks")
    return batch.to(device, dtype)


@dataclass
class LossParts:
    """Weighted sums for one micro-batch (loss_sum differentiable, the rest detached)."""

    loss_sum: Tensor
    ce_sum: Tensor
    tv_sum: Tensor
    conf_sum: Tensor
    weight_sum: Tensor
    accept_NK: Tensor
    correct_NK: Tensor
    valid_NK: Tensor


class DraftLoss(nn.Module):
    """The drafter plus its distillation loss; the frozen LM head is a plain attribute, not a parameter."""

    def __init__(self, drafter: nn.Module, lm_head_weight_VD: Tensor, weights_K: Tensor, alpha_ce: float,
                 alpha_tv: float, alpha_conf: float, vocab_chunk: int, keep_probs_mb: float = 0.0,
                 eagle3_per_sequence: bool = True):
        super().__init__()
        self.eagle3_per_sequence = eagle3_per_sequence  # Eagle3: per-sequence (True) or token mean
        self.drafter = drafter
        self.parallel_blocks = kind_entry(drafter).parallel_blocks
        object.__setattr__(self, "lm_head_weight_VD", lm_head_weight_VD.detach())
        self.register_buffer("weights_K", weights_K.float(), persistent=False)
        self.alphas = (alpha_ce, alpha_tv, alpha_conf)
        self.vocab_chunk = vocab_chunk
        self.keep_probs_mb = keep_probs_mb

    def forward(self, batch: Batch) -> tuple[Tensor, ...]:
        """LossParts as a plain tuple: ZeRO-3 hooks the backward of tuple outputs (re-gathering W2)."""
        return astuple_shallow(self.losses(batch))

    def losses(self, batch: Batch) -> LossParts:
        out = self.drafter(batch)
        amp = self._amp_dtype(batch)
        if amp is not None:
            with torch.autocast(batch.target_hidden_NKD.device.type, enabled=False):
                return self._losses(out, batch, amp)
        return self._losses(out, batch, None)

    def _amp_dtype(self, batch: Batch) -> torch.dtype | None:
        device = batch.target_hidden_NKD.device.type
        return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None

    def _half_lm_head(self, dtype: torch.dtype) -> Tensor:
        """The frozen LM head in `dtype`, cast once (it never changes)."""
        cached = getattr(self, "_lm_head_half", None)
        if cached is None or cached.dtype != dtype:
            cached = self.lm_head_weight_VD.to(dtype)
            object.__setattr__(self, "_lm_head_half", cached)
        return cached

    def _losses(self, out, batch: Batch, amp: torch.dtype | None) -> LossParts:
        """The loss of the drafter's output. Under amp (bf16 autocast) DFlash/DSpark's chunked loss
        gets bf16 inputs and runs its vocabulary-sized products in bf16 (`cpu_half_products`), while
        softmax statistics, sums and the gradients of the fp32 weights stay fp32."""
        w = self.weights_K
        if not self.parallel_blocks:  # Eagle3: soft CE against the target over the (pruned) draft vocabulary
            draft_head = self.lm_head_weight_VD if out.lm_head_weight_VD is None else out.lm_head_weight_VD
            w_NK = self.row_weights(batch)
            loss, wsum, accept, correct = eagle_soft_ce(
                out.hidden_NKD, draft_head, batch.target_hidden_NKD, self.lm_head_weight_VD, batch.valid_NK,
                w_NK, out.draft_to_target_v, self.vocab_chunk)
            valid = batch.valid_NK.bool()
            tv = (w_NK * 2 * (1 - accept) * valid).sum()
            return LossParts(loss, loss.detach(), tv, tv.new_zeros(()), wsum, accept, correct, valid)
        a_ce, a_tv, a_conf = self.alphas
        hidden, lm_head, target_hidden = out.hidden_NKD, self.lm_head_weight_VD, batch.target_hidden_NKD
        lowrank, lowrank_w, conf = out.lowrank_NKR, out.lowrank_weight_RV, out.conf_logit_NK
        if amp is not None:
            hidden, lm_head, target_hidden = hidden.to(amp), self._half_lm_head(amp), target_hidden.to(amp)
            lowrank = None if lowrank is None else lowrank.to(amp)
            lowrank_w = None if lowrank_w is None else lowrank_w.to(amp)
            conf = None if conf is None else conf.float()
        with cpu_half_products(amp is not None):
            r = distill_losses(hidden, lm_head, target_hidden, batch.labels_NK, batch.valid_NK, w, lowrank,
                               lowrank_w, conf, a_ce, a_tv, a_conf, self.vocab_chunk,
                               keep_probs_mb=self.keep_probs_mb)
        return LossParts(r.loss_sum, r.ce_sum, r.tv_sum, r.conf_sum, r.weight_sum, r.accept_NK, r.correct_NK,
                         r.valid_NK)

    def row_weights(self, batch: Batch) -> Tensor:
        """Loss weight of each (row, position) of `batch` [N, K]; zero where unsupervised."""
        if not self.parallel_blocks:  # Eagle3
            return eagle3_row_weights(batch.valid_NK, self.weights_K, batch.input_ids_BT.shape[1],
                                      self.eagle3_per_sequence)
        return batch.valid_NK.float() * self.weights_K.to(batch.valid_NK.device)


def astuple_shallow(parts: LossParts) -> tuple[Tensor, ...]:
    return tuple(getattr(parts, f.name) for f in fields(parts))


class Tally:
    """Running sums over micro-batches, reduced across ranks in one all-reduce."""

    NAMES = ("loss", "ce", "tv", "conf", "weight", "tau", "blocks", "slots")

    def __init__(self, K: int):
        self.K = K
        self.v = torch.zeros(len(self.NAMES) + 3 * K, dtype=torch.float64)

    def add(self, parts: LossParts, slots: int) -> None:
        valid = parts.valid_NK.bool()
        has_block = valid[:, 0]
        tau = block_tau(parts.accept_NK, valid)[has_block]
        head = torch.stack([torch.as_tensor(x).detach().double().cpu() for x in (
            parts.loss_sum, parts.ce_sum, parts.tv_sum, parts.conf_sum, parts.weight_sum, tau.sum(),
            has_block.sum(), slots)])
        per_k = torch.cat([parts.accept_NK.double().sum(0), parts.correct_NK.double().sum(0),
                           valid.double().sum(0)]).cpu()
        self.v += torch.cat([head, per_k])

    def reduce(self, device: torch.device) -> dict:
        v = all_reduce_sum(self.v.to(device)).cpu()
        s = dict(zip(self.NAMES, v[:len(self.NAMES)].tolist()))
        K = self.K
        acc, cor, cnt = v[-3 * K:-2 * K], v[-2 * K:-K], v[-K:].clamp(min=1)
        w = max(s["weight"], 1e-12)
        return {"loss": s["loss"] / w, "ce": s["ce"] / w, "tv": s["tv"] / w, "conf": s["conf"] / w,
                "simulated_tau": s["tau"] / max(s["blocks"], 1), "anchor_tokens": int(s["slots"]),
                "per_position_acceptance": (acc / cnt).tolist(), "per_position_accuracy": (cor / cnt).tolist()}


def autocast(device: torch.device, dtype: torch.dtype | None):
    """Mixed precision for the drafter and its loss: matmuls in ``dtype`` (bf16), weights, gradients and
    optimizer state stay fp32 (``dtype=None``: a no-op context)."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def train_step(engine, batches: list[Batch], weights_K: Tensor, world_size: int,
               autocast_dtype: torch.dtype | None = None) -> dict:
    """One optimizer step over this rank's micro-batches; returns global metrics (all ranks agree).
    ``autocast_dtype`` (bf16) runs forward and backward under `autocast` (fp32 master weights)."""
    device = next(engine.module.parameters()).device
    local_w = sum(engine.module.row_weights(b).sum() for b in batches)
    global_w = float(all_reduce_sum(torch.as_tensor(local_w, dtype=torch.float64, device=device)))
    if global_w <= 0:
        raise ValueError("this optimizer step has no supervised positions on any rank: check the loss masks")
    # DeepSpeed divides by grad_accum (engine.backward) and averages over ranks; undo both so the
    # update is grad(sum of all weighted losses) / (sum of all weights).
    scale = len(batches) * world_size / global_w
    tally = Tally(weights_K.numel())
    grad_norm = None
    for i, batch in enumerate(batches):
        with autocast(device, autocast_dtype):
            parts = LossParts(*engine(batch))
        engine.backward(parts.loss_sum * scale)
        if i == len(batches) - 1 and engine.zero_optimization_stage() == 0:
            grad_norm = local_grad_norm(engine.module)  # DeepSpeed reports no norm for fp32 without ZeRO
        engine.step()
        tally.add(parts, batch.valid_NK.numel())
    metrics = tally.reduce(device)
    reported = engine.get_global_grad_norm()
    metrics["grad_norm"] = float(reported) if reported is not None else grad_norm
    return metrics


def local_grad_norm(module: nn.Module) -> Optional[float]:
    """L2 norm of the accumulated gradients before clipping (stage 0: every rank holds all of them,
    already averaged by the all-reduce that ran in backward)."""
    norms = [p.grad.detach().float().norm() for p in module.parameters() if p.grad is not None]
    return float(torch.stack(norms).norm()) if norms else None


@torch.no_grad()
def evaluate(module: DraftLoss, batches: list[Batch], device: torch.device) -> dict:
    """Held-out loss, simulated τ and per-position acceptance/accuracy (global over ranks)."""
    was_training = module.training
    module.eval()
    tally = Tally(module.weights_K.numel())
    for batch in batches:
        tally.add(LossParts(*module(batch)), batch.valid_NK.numel())
    module.train(was_training)
    return tally.reduce(device)
