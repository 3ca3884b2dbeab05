"""Speculative decoding engine (docs/engine.md) and the target-only baseline it is measured against.

Both loops run a batch of requests through the same `TargetSession` (KV-cached target with
per-request rollback), so speedup = tokens/s speculative ÷ tokens/s target-only compares
like with like.

Speculative round, per request (anchor x0 = last committed token, not yet read by the target):
  1. draft:   proposal x1..xK from the drafter, whose state holds the target features of every
              position before the anchor (`propose`);
  2. budget:  drafts to verify n_B <= K (all, or cut by the confidence threshold, or chosen by
              the Algorithm-1 scheduler from calibrated confidences);
  3. verify:  one target pass over [x0, x1..x_W] (W = max n_B) with the KV cache, then the fused
              verification kernel (`deepspec.kernels.verify`) accepts a prefix and draws the
              correction / bonus token;
  4. commit:  keep the KV entries of x0..x_a (a = accepted), roll back the rest; extend the
              drafter state with the target features of x0..x_a; the correction/bonus token is
              the next anchor.
The whole prompt is prefilled (as target-only decoding does) and the target's first token,
drawn from the prefill's last position, is the first anchor: the drafter's first round then
starts from a generated token at a position where training put anchors, not from the last
prompt token. The verification kernel is told every EOS id of the target.

Greedy costs. The drafter computes no softmax in greedy mode (`with_probs=False`) and runs its
LM head only on the rows it drafts (`num_drafts`); the target's session keeps greedy
verification bit-identical to target-only decoding at batch 1 in any dtype (see
`deepspec.decoding.target_runner`).

Sampling. Greedy (temperature 0): the drafter proposes argmaxes and the kernel accepts while
x_k == argmax p_t — output equals target-only greedy decoding token for token. Temperature > 0:
p_t is the target's distribution after temperature, top-k and top-p (`sampling.target_probs`,
the very function the baseline samples from); p_d is the distribution the drafter actually drew
each token from (its temperature softmax, no top-k/top-p: the drafters' `propose` cannot filter,
and the rule min(1, p_t/p_d) is exact for any p_d the tokens were really drawn from). The
residual max(0, p_t - p_d) then restores exactly p_t, truncation included.

Timings per round: draft = propose + drafter-state extend; verify = target pass + LM head +
probabilities + kernel; other = everything else (budgeting, KV commit, bookkeeping). The
first token comes from the prefill and is timed with it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from deepspec.decoding.sampling import SamplingParams, next_tokens, target_probs
from deepspec.decoding.target_runner import TargetSession
from deepspec.drafters.registry import kind_entry
from deepspec.kernels import verify
from deepspec.targets.frozen import FrozenTarget

# (calibrated confidences conf_BK [NaN where not drafted], active_B) -> drafts to verify per request
BudgetFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class RoundLog:
    """One entry per (request, round) of speculative decoding, in the order they happened."""

    request: list[int] = field(default_factory=list)
    proposed: list[int] = field(default_factory=list)  # drafts verified (n)
    accepted: list[int] = field(default_factory=list)  # accepted drafts (a <= n)
    committed: list[int] = field(default_factory=list)  # tokens committed by the round (tau_round)
    eos_stop: list[bool] = field(default_factory=list)  # an accepted EOS ended the round early
    conf_logits: list[list[float]] = field(default_factory=list)  # raw confidence logits of the K drafts
    times_ms: list[tuple[float, float, float]] = field(default_factory=list)  # (draft, verify, other) of the round

    def __len__(self) -> int:
        return len(self.request)


@dataclass
class Timings:
    prefill_s: float = 0.0
    draft_s: float = 0.0
    verify_s: float = 0.0
    other_s: float = 0.0
    total_s: float = 0.0
    steps: int = 0  # target forward steps after prefill (rounds or decode steps)

    def add(self, other: Timings) -> None:
        for name in ("prefill_s", "draft_s", "verify_s", "other_s", "total_s", "steps"):
            setattr(self, name, getattr(self, name) + getattr(other, name))


@dataclass
class Generation:
    """Output of one batch: generated tokens per request (EOS included when reached)."""

    tokens: list[list[int]]
    timings: Timings
    rounds: RoundLog = field(default_factory=RoundLog)
    latency_s: list[float] = field(default_factory=list)  # per request: batch start -> its last token


class _Stopper:
    """Collects generated tokens per request; a request stops at an EOS or at max_new_tokens."""

    def __init__(self, batch_size: int, max_new_tokens: int, eos_ids: Sequence[int], start: float = 0.0):
        self.tokens: list[list[int]] = [[] for _ in range(batch_size)]
        self.active = [True] * batch_size
        self.max_new_tokens, self.eos = max_new_tokens, set(int(e) for e in eos_ids)
        self.start, self.latency_s = start, [0.0] * batch_size

    def push(self, b: int, new_tokens: Sequence[int]) -> None:
        for tok in new_tokens:
            if not self.active[b]:
                return
            self.tokens[b].append(int(tok))
            if int(tok) in self.eos or len(self.tokens[b]) >= self.max_new_tokens:
                self.active[b] = False
                self.latency_s[b] = time.perf_counter() - self.start

    def any_active(self) -> bool:
        return any(self.active)

    def active_mask(self, device) -> torch.Tensor:
        return torch.tensor(self.active, dtype=torch.bool, device=device)


def _check_prompts(prompts: list[list[int]], max_new_tokens: int) -> None:
    if not prompts:
        raise ValueError("generate: no prompts given")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens}; generate at least one token")
    short = [i for i, p in enumerate(prompts) if len(p) < 2]
    if short:
        raise ValueError(f"prompts {short[:5]} have fewer than 2 tokens; render them with the chat template first")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def generate_target_only(target: FrozenTarget, prompts: list[list[int]], max_new_tokens: int,
                         sampling: SamplingParams, eos_ids: Sequence[int],
                         generator: torch.Generator | None = None) -> Generation:
    """Plain KV-cached decoding of a batch with the target alone (the speedup baseline)."""
    _check_prompts(prompts, max_new_tokens)
    device = target.device
    timings = Timings()
    start = time.perf_counter()
    session = TargetSession(target)
    out = session.prefill(prompts)
    lengths_B = torch.tensor([len(p) for p in prompts], device=device)
    last_BD = out.final_BTD[torch.arange(len(prompts), device=device), lengths_B - 1]
    token_B = next_tokens(session.logits(last_BD), sampling, generator)
    stop = _Stopper(len(prompts), max_new_tokens, eos_ids, start)
    for b, tok in enumerate(token_B.tolist()):
        stop.push(b, [tok])
    _sync(device)
    timings.prefill_s = time.perf_counter() - start
    while stop.any_active():
        t0 = time.perf_counter()
        out = session.step(token_B[:, None])
        token_B = next_tokens(session.logits(out.final_BTD[:, 0]), sampling, generator)
        session.commit(torch.ones_like(token_B))
        for b, tok in enumerate(token_B.tolist()):
            stop.push(b, [tok])
        _sync(device)
        timings.verify_s += time.perf_counter() - t0
        timings.steps += 1
    timings.total_s = time.perf_counter() - start
    return Generation(tokens=stop.tokens, timings=timings, latency_s=stop.latency_s)


def _conf_logits(conf_BK: torch.Tensor | None) -> torch.Tensor | None:
    """The drafter gives sigmoid confidences; calibration works on their logits."""
    if conf_BK is None:
        return None
    return torch.logit(conf_BK.double().clamp(1e-12, 1 - 1e-12))


def calibrated_confidence(conf_logits_BK: torch.Tensor, temperatures_K: torch.Tensor | None) -> torch.Tensor:
    """c_k = sigmoid(logit_k / T_k) with STS temperatures (T = 1 when None)."""
    from deepspec.decoding.calibration import apply_sts

    if temperatures_K is not None:
        temperatures_K = temperatures_K[: conf_logits_BK.shape[1]]
    return apply_sts(conf_logits_BK, temperatures_K)


def threshold_budget(conf_BK: torch.Tensor, threshold: float) -> torch.Tensor:
    """Drafts kept per request: the longest prefix whose confidences are all >= threshold."""
    return torch.cumprod((conf_BK >= threshold).long(), dim=1).sum(dim=1)


def _drafts_to_verify(conf_logits_BK: torch.Tensor | None, active_B: torch.Tensor, K: int,
                      threshold: float | None, budget_fn: BudgetFn | None, sts_temperatures: torch.Tensor | None,
                      kind: str) -> torch.Tensor:
    """n_B: K for active requests, cut by the confidence threshold and/or the scheduler; 0 when done."""
    n_B = torch.where(active_B, K, 0).long()
    if threshold is None and budget_fn is None:
        return n_B
    if conf_logits_BK is None:
        raise ValueError(f"eval.confidence_threshold / eval.scheduler need confidences, but this {kind} drafter "
                         f"has no confidence head; unset them or use a DSpark drafter trained with "
                         f"drafter.confidence_head=true")
    conf_BK = calibrated_confidence(conf_logits_BK, sts_temperatures).to(active_B.device)
    if threshold is not None:
        n_B = torch.minimum(n_B, threshold_budget(conf_BK, threshold))
    if budget_fn is not None:
        masked = torch.where(active_B[:, None], conf_BK, torch.full_like(conf_BK, float("nan")))
        n_B = torch.minimum(n_B, budget_fn(masked.cpu(), active_B.cpu()).to(n_B.device).long())
    return n_B


@torch.no_grad()
def generate_speculative(target: FrozenTarget, drafter: torch.nn.Module, prompts: list[list[int]],
                         max_new_tokens: int, sampling: SamplingParams, eos_ids: Sequence[int],
                         block_size: int | None = None, confidence_threshold: float | None = None,
                         budget_fn: BudgetFn | None = None, sts_temperatures: torch.Tensor | None = None,
                         generator: torch.Generator | None = None, kernel: str = "auto") -> Generation:
    """Speculative decoding of a batch with `drafter` (DSpark, DFlash or Eagle3) against `target`.

    block_size: drafts per round (<= the drafter's block size for DFlash/DSpark; Eagle3 drafts
    any number); confidence_threshold: cut each proposal before the first calibrated c_k below
    it; budget_fn: a scheduler choosing drafts per request from calibrated confidences (it sees
    the confidences, never the draft tokens; verification stays exact whatever it picks).
    """
    _check_prompts(prompts, max_new_tokens)
    spec = drafter.spec
    K = int(block_size or spec.block_size)
    any_length = not kind_entry(spec).parallel_blocks  # autoregressive drafters draft any number of tokens
    if not any_length and K > spec.block_size:
        raise ValueError(f"eval.block_size={K} exceeds the drafter's block size {spec.block_size}: a "
                         f"{spec.kind} drafter proposes at most {spec.block_size} tokens per round")
    if K < 1:
        raise ValueError(f"eval.block_size={K}; draft at least one token per round")
    device = target.device
    B = len(prompts)
    eos_list = sorted(set(int(e) for e in eos_ids))
    timings, log = Timings(), RoundLog()
    start = time.perf_counter()

    # prefill the whole prompt; the target's first token (drawn from the prefill, as target-only
    # decoding does) is the first anchor, at the position training anchors sit on
    session = TargetSession(target, spec.layer_ids)
    out = session.prefill(prompts)
    len_B = torch.tensor([len(p) for p in prompts], device=device)
    rows_B = torch.arange(B, device=device)
    anchor_B = next_tokens(session.logits(out.final_BTD[rows_B, len_B - 1]), sampling, generator)
    state = drafter.new_state(B, max(len(p) for p in prompts) + max_new_tokens + K + 2, device)
    ctx_ids_BT = torch.zeros(B, out.taps_BTMD.shape[1], dtype=torch.long, device=device)
    for b, p in enumerate(prompts):
        ctx_ids_BT[b, :len(p)] = torch.tensor(p, device=device)
    state.extend(out.taps_BTMD, len_B, tokens_BT=ctx_ids_BT)
    anchor_pos_B = len_B.clone()
    stop = _Stopper(B, max_new_tokens, eos_list, start)
    for b, tok in enumerate(anchor_B.tolist()):
        stop.push(b, [tok])
    _sync(device)
    timings.prefill_s = time.perf_counter() - start
    draft_kwargs = {"num_tokens": K} if any_length else {"num_drafts": K}

    while stop.any_active():
        t0 = time.perf_counter()
        prop = drafter.propose(state, anchor_B, anchor_pos_B, greedy=sampling.greedy,
                               temperature=sampling.temperature or 1.0, generator=generator,
                               with_probs=not sampling.greedy, **draft_kwargs)
        drafts_BK = prop.tokens_BK[:, :K]
        _sync(device)
        t1 = time.perf_counter()

        active_B = stop.active_mask(device)
        logits_BK = _conf_logits(None if prop.conf_BK is None else prop.conf_BK[:, :K])
        n_B = _drafts_to_verify(logits_BK, active_B, K, confidence_threshold, budget_fn, sts_temperatures,
                                spec.kind)
        W = max(int(n_B.max()), 1)  # the kernel needs K >= 1 columns; n_B = 0 verifies none of them
        t2 = time.perf_counter()

        verify_in_BW1 = torch.cat([anchor_B[:, None], drafts_BK[:, :W]], dim=1)
        step = session.step(verify_in_BW1)
        logits_BW1V = session.logits(step.final_BTD)
        if sampling.greedy:
            result = verify(drafts_BK[:, :W], None, logits_BW1V, n_B, None, eos_list, True, kernel)
        else:
            result = verify(drafts_BK[:, :W], prop.draft_probs_BKV[:, :W].float(),
                            target_probs(logits_BW1V, sampling), n_B, None, eos_list, False, kernel,
                            generator=generator)
        _sync(device)
        t3 = time.perf_counter()

        accepted_B = result.accepted_B
        keep_B = torch.where(active_B, accepted_B + 1, torch.zeros_like(accepted_B))
        session.commit(keep_B)
        t4 = time.perf_counter()
        state.extend(step.taps_BTMD, keep_B, tokens_BT=verify_in_BW1)
        _sync(device)
        t5 = time.perf_counter()

        last_B = result.committed_BK1.gather(1, (result.num_committed_B - 1).clamp_min(0)[:, None])[:, 0]
        anchor_B = torch.where(active_B, last_B, anchor_B)
        anchor_pos_B = anchor_pos_B + keep_B
        committed = result.committed_BK1.tolist()
        num_committed = result.num_committed_B.tolist()
        accepted = accepted_B.tolist()
        n_list = n_B.tolist()
        logit_rows = None if logits_BK is None else logits_BK.tolist()
        n_logged = 0
        for b in range(B):
            if not stop.active[b]:
                continue
            log.request.append(b)
            log.proposed.append(n_list[b])
            log.accepted.append(accepted[b])
            log.committed.append(num_committed[b])
            log.eos_stop.append(num_committed[b] == accepted[b])
            if logit_rows is not None:
                log.conf_logits.append(logit_rows[b])
            stop.push(b, committed[b][:num_committed[b]])
            n_logged += 1
        t6 = time.perf_counter()
        draft_s, verify_s, other_s = (t1 - t0) + (t5 - t4), t3 - t2, (t2 - t1) + (t4 - t3) + (t6 - t5)
        log.times_ms.extend([(1e3 * draft_s, 1e3 * verify_s, 1e3 * other_s)] * n_logged)
        timings.draft_s += draft_s
        timings.verify_s += verify_s
        timings.other_s += other_s
        timings.steps += 1
    timings.total_s = time.perf_counter() - start
    return Generation(tokens=stop.tokens, timings=timings, rounds=log, latency_s=stop.latency_s)
