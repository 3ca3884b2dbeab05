"""Hardware-aware prefix scheduler: how many drafts each request verifies (docs/engine.md, Algorithm 1).

Verifying one more draft token costs batch capacity; it pays off only while the
expected tokens committed per step times the steps per second the target manages
at that batch size keeps rising.  ``SPSTable`` holds SPS(B), the target's forward
steps per second at B batch tokens (profiled once per hardware);
``schedule_prefixes`` is Algorithm 1 with its early stop; ``budget_from_stale`` +
``topk_prefixes`` is the production variant; ``simulate_load`` replays synthetic
load to show how the budget per request falls as concurrency grows.

Shapes: R active requests, K draft positions; conf_RK holds the calibrated
per-position confidences c_{r,k} in [0, 1] (NaN = position not drafted).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass(frozen=True)
class SPSTable:
    """Target forward steps per second at a given number of batch tokens.

    Between measured points SPS is interpolated linearly; below the first point it
    is the first value; beyond the last it assumes the target is throughput bound
    (tokens/s constant), SPS(B) = SPS(B_max) * B_max / B.
    """

    batch_tokens: tuple[int, ...]
    steps_per_s: tuple[float, ...]
    hardware: str = ""

    def __post_init__(self) -> None:
        if len(self.batch_tokens) == 0 or len(self.batch_tokens) != len(self.steps_per_s):
            raise ValueError(
                f"SPSTable: need as many steps_per_s ({len(self.steps_per_s)}) as batch_tokens "
                f"({len(self.batch_tokens)}), at least one"
            )
        if any(b1 <= b0 for b0, b1 in zip(self.batch_tokens, self.batch_tokens[1:], strict=False)) or self.batch_tokens[0] < 1:
            raise ValueError(f"SPSTable: batch_tokens must be positive and strictly increasing, got {self.batch_tokens}")
        if any(s <= 0 for s in self.steps_per_s):
            raise ValueError(f"SPSTable: steps_per_s must be positive, got {self.steps_per_s}")

    def __call__(self, tokens: float) -> float:
        xs, ys = self.batch_tokens, self.steps_per_s
        if tokens <= xs[0]:
            return ys[0]
        if tokens >= xs[-1]:
            return ys[-1] * xs[-1] / tokens
        hi = next(i for i, x in enumerate(xs) if x >= tokens)
        x0, x1, y0, y1 = xs[hi - 1], xs[hi], ys[hi - 1], ys[hi]
        return y0 + (y1 - y0) * (tokens - x0) / (x1 - x0)

    def many(self, tokens_N: torch.Tensor) -> torch.Tensor:
        """SPS at many batch sizes at once (float64), same rule as calling the table."""
        xs = torch.tensor(self.batch_tokens, dtype=torch.float64)
        ys = torch.tensor(self.steps_per_s, dtype=torch.float64)
        t = tokens_N.double()
        hi = torch.searchsorted(xs, t).clamp(1, len(xs) - 1)
        x0, x1, y0, y1 = xs[hi - 1], xs[hi], ys[hi - 1], ys[hi]
        inside = y0 + (y1 - y0) * (t - x0) / (x1 - x0) if len(xs) > 1 else ys[0].expand_as(t)
        out = torch.where(t <= xs[0], ys[0], inside)
        return torch.where(t >= xs[-1], ys[-1] * xs[-1] / t, out)

    @classmethod
    def synthetic(cls, step_latency_s: float, peak_tokens_per_s: float, max_tokens: int = 4096) -> SPSTable:
        """Roofline-shaped table: SPS(B) = 1 / (step_latency_s + B / peak_tokens_per_s)."""
        points = sorted({1, *[2**i for i in range(1, max_tokens.bit_length())], max_tokens})
        return cls(tuple(points), tuple(1.0 / (step_latency_s + b / peak_tokens_per_s) for b in points),
                   hardware=f"synthetic(latency={step_latency_s}s, peak={peak_tokens_per_s} tok/s)")

    def save_json(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        payload = {"hardware": self.hardware, "batch_tokens": list(self.batch_tokens),
                   "steps_per_s": list(self.steps_per_s)}
        path.write_text(json.dumps(payload, indent=2) + "\n")
        return path

    @classmethod
    def load_json(cls, path: str | Path) -> SPSTable:
        data = json.loads(Path(path).read_text())
        missing = {"batch_tokens", "steps_per_s"} - set(data)
        if missing:
            raise ValueError(f"SPS table {path} lacks {sorted(missing)}; write it with SPSTable.save_json")
        return cls(tuple(int(b) for b in data["batch_tokens"]), tuple(float(s) for s in data["steps_per_s"]),
                   data.get("hardware", ""))


def profile_sps(step_fn: Callable[[int], None], batch_tokens: Sequence[int], repeats: int = 5,
                sync: Callable[[], None] | None = None, hardware: str = "") -> SPSTable:
    """Measure SPS by timing ``step_fn(B)`` (one target forward over B tokens) per batch size."""
    steps = []
    for tokens in batch_tokens:
        step_fn(tokens)  # warm-up
        if sync:
            sync()
        start = time.perf_counter()
        for _ in range(repeats):
            step_fn(tokens)
        if sync:
            sync()
        steps.append(repeats / (time.perf_counter() - start))
    return SPSTable(tuple(batch_tokens), tuple(steps), hardware)


# ---------------------------------------------------------------- Algorithm 1


def _sorted_candidates(conf_RK: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Prefix products a_{r,j} of drafted positions, sorted descending; ties keep (r, j) order.

    Returns (a_sorted, flat_index) with flat_index = r * K + j.  Because c <= 1, a is
    non-increasing in j, so (r, j) always precedes (r, j+1): admitted sets are prefixes.
    """
    conf = conf_RK.detach().double()
    finite = conf[torch.isfinite(conf)]
    if finite.numel() and (bool((finite < 0).any()) or bool((finite > 1).any())):
        raise ValueError("conf_RK must hold confidences in [0, 1] (apply sigmoid / STS to the logits first)")
    drafted = torch.cumprod(torch.isfinite(conf).long(), dim=1).bool()
    a_RK = torch.cumprod(torch.where(drafted, conf, torch.zeros_like(conf)), dim=1)
    a_flat = torch.where(drafted, a_RK, torch.full_like(a_RK, -1.0)).flatten()
    order = torch.sort(-a_flat, stable=True).indices
    keep = a_flat[order] >= 0
    return a_flat[order][keep], order[keep]


def admitted_mask(conf_RK: torch.Tensor, sps: Callable[[float], float]) -> torch.Tensor:
    """Algorithm 1: which (r, j) candidates are verified this step (bool [R, K]).

    Start with B = R (every request's anchor), tau* = R, best = R * SPS(R).  Walk the
    candidates by a_{r,j} = prod_{i<=j} c_{r,i} descending; admit while
    (tau* + a) * SPS(B + 1) improves on the best, and STOP at the first that does not.
    The stop makes the decision for (r, j) depend only on candidates ranked above it,
    never on c_{r,j+1..} (which depend on the drafted token x_{r,j} itself).
    """
    R, K = conf_RK.shape
    admitted = torch.zeros(R * K, dtype=torch.bool)
    if R == 0:
        return admitted.view(R, K)
    a_sorted, flat = _sorted_candidates(conf_RK)
    # theta[m] = (R + a_1 + ... + a_m) * SPS(R + m) after admitting the first m candidates
    theta = _throughput_curve(a_sorted, R, sps)
    not_better = (theta[1:] <= theta[:-1]).nonzero()
    n_admitted = int(not_better[0]) if len(not_better) else len(a_sorted)  # stop at the first non-gain
    admitted[flat[:n_admitted]] = True
    return admitted.view(R, K)


def _throughput_curve(a_sorted: torch.Tensor, R: int, sps: Callable[[float], float]) -> torch.Tensor:
    """theta[m] = (R + sum_{i<m} a_sorted[i]) * SPS(R + m) for m = 0..len(a_sorted) (float64)."""
    tau = R + torch.cumsum(torch.cat([a_sorted.new_zeros(1), a_sorted]), 0)
    tokens = R + torch.arange(len(tau), dtype=torch.float64)
    if isinstance(sps, SPSTable):
        return tau * sps.many(tokens)
    return tau * torch.tensor([float(sps(float(b))) for b in tokens.tolist()], dtype=torch.float64)


def schedule_prefixes(conf_RK: torch.Tensor, sps: Callable[[float], float]) -> torch.Tensor:
    """Verification budget per request (int64 [R]): the length of its admitted draft prefix."""
    return admitted_mask(conf_RK, sps).sum(dim=1)


# ---------------------------------------------------------------- production variant


def budget_from_stale(conf_stale_RK: torch.Tensor, sps: Callable[[float], float]) -> int:
    """Total draft budget K for the batch, sized from confidences two steps old.

    Those confidences cannot depend on the tokens being verified now, so the search
    may be global: K = argmax_m (R + sum of the m largest a) * SPS(R + m).
    """
    R = conf_stale_RK.shape[0]
    if R == 0:
        return 0
    a_sorted, _ = _sorted_candidates(conf_stale_RK)
    theta = _throughput_curve(a_sorted, R, sps)
    return int((theta == theta.max()).nonzero()[0])  # the smallest budget among equal maxima


def topk_prefixes(conf_now_RK: torch.Tensor, K_total: int) -> torch.Tensor:
    """Budget per request from the top-K current candidates by a_{r,j} (prefixes by construction)."""
    R, K = conf_now_RK.shape
    _, flat = _sorted_candidates(conf_now_RK)
    chosen = flat[: max(int(K_total), 0)]
    return torch.bincount(torch.div(chosen, K, rounding_mode="floor"), minlength=R)[:R]


# ---------------------------------------------------------------- load simulation


def simulate_load(
    sps: Callable[[float], float],
    concurrency: Sequence[int],
    gamma: int = 7,
    rounds: int = 200,
    policy: str | int = "algorithm1",
    mean_logit: float = 1.5,
    std_logit: float = 1.0,
    seed: int = 0,
) -> list[dict]:
    """Replay synthetic decoding steps at each concurrency level.

    Each step, every request has calibrated confidences c = sigmoid(N(mean_logit,
    std_logit)) for gamma positions and accepts position k with probability c_k
    (left to right).  ``policy``: "algorithm1" (schedule_prefixes), "stale_topk"
    (budget from the confidences of two steps earlier, then top-K of the current
    ones) or an int (fixed budget per request; 0 = no speculation).  Returns per level:
    {"concurrency", "avg_budget" (drafts verified per request per step),
    "avg_batch_tokens", "tau" (tokens committed per request per step),
    "throughput_tokens_per_s", "per_request_tokens_per_s"}.
    """
    if not (isinstance(policy, int) or policy in ("algorithm1", "stale_topk")):
        raise ValueError(f"simulate_load: policy={policy!r}; use 'algorithm1', 'stale_topk' or an int budget")
    g = torch.Generator().manual_seed(seed)
    results = []
    for R in concurrency:
        history: list[torch.Tensor] = []
        budget_sum = tokens_sum = committed = 0.0
        elapsed = 0.0
        for _ in range(rounds):
            conf_RK = torch.sigmoid(torch.randn(R, gamma, generator=g, dtype=torch.float64) * std_logit + mean_logit)
            survives_RK = torch.cumprod((torch.rand(R, gamma, generator=g, dtype=torch.float64) < conf_RK).long(), 1)
            if isinstance(policy, int):
                budget_R = torch.full((R,), min(max(policy, 0), gamma), dtype=torch.long)
            elif policy == "algorithm1":
                budget_R = schedule_prefixes(conf_RK, sps)
            else:
                stale = history[-2] if len(history) >= 2 else conf_RK
                budget_R = topk_prefixes(conf_RK, budget_from_stale(stale, sps))
            history = (history + [conf_RK])[-2:]
            accepted_R = (survives_RK * (torch.arange(gamma)[None, :] < budget_R[:, None])).sum(1)
            batch_tokens = R + int(budget_R.sum())
            elapsed += 1.0 / sps(batch_tokens)
            budget_sum += float(budget_R.sum())
            tokens_sum += batch_tokens
            committed += float(accepted_R.sum()) + R
        results.append({
            "concurrency": R,
            "avg_budget": budget_sum / (rounds * R),
            "avg_batch_tokens": tokens_sum / rounds,
            "tau": committed / (rounds * R),
            "throughput_tokens_per_s": committed / elapsed,
            "per_request_tokens_per_s": committed / elapsed / R,
        })
    return results
