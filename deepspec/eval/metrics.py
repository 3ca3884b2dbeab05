"""Evaluation metrics from the engine's round log and timings (docs/algorithms.md).

- tau: tokens committed per round, averaged over rounds: accepted drafts + the correction / bonus
  token, or the accepted drafts alone when an accepted EOS ended the round (no token follows it);
- per-position conditional acceptance at k: among rounds where positions 1..k-1 were accepted
  and k was verified, the fraction where k was accepted (a round cut by an accepted EOS never
  tested the positions after it);
- verify rate: drafts verified per round (and target tokens per verify pass, anchor included);
- tokens/s of speculative and target-only decoding measured in the same run, and their ratio;
- greedy match: fraction of prompts whose speculative output equals the target-only output
  token for token, and the fraction of target-only tokens reproduced before the first divergence;
- under sampling, a distribution check instead: outputs differ draw by draw, but speculative
  decoding must emit tokens from the target's distribution, so the token frequencies of both
  decoders on the same prompts are compared (chi-square test of homogeneity, total variation);
- per request latency (a batch's requests start together; a request's latency ends at its last
  token): P50 / P95 end to end and per output token, tokens/s per request and in total.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from deepspec.decoding.engine import RoundLog, Timings


def per_position_acceptance(proposed: Sequence[int], accepted: Sequence[int], eos_stop: Sequence[bool],
                            K: int) -> list[float | None]:
    """Conditional acceptance at positions 1..K (None where no round reached the position)."""
    n = torch.tensor(list(proposed), dtype=torch.long)
    a = torch.tensor(list(accepted), dtype=torch.long)
    e = torch.tensor(list(eos_stop), dtype=torch.bool)
    out: list[float | None] = []
    for k in range(1, K + 1):
        reached = (n >= k) & (a >= k - 1) & ~(e & (a == k - 1))
        count = int(reached.sum())
        out.append(float((a[reached] >= k).double().mean()) if count else None)
    return out


def round_metrics(log: RoundLog, K: int) -> dict:
    """tau, per-position acceptance, verify rate and acceptance rate of a set of rounds."""
    R = len(log)
    if R == 0:
        return {"rounds": 0, "tau": None, "per_position_acceptance": [None] * K,
                "drafts_verified_per_round": None, "tokens_per_verify": None, "acceptance_rate": None}
    n = torch.tensor(log.proposed, dtype=torch.double)
    a = torch.tensor(log.accepted, dtype=torch.double)
    return {
        "rounds": R,
        "tau": float(torch.tensor(log.committed, dtype=torch.double).mean()),
        "per_position_acceptance": per_position_acceptance(log.proposed, log.accepted, log.eos_stop, K),
        "drafts_verified_per_round": float(n.mean()),
        "tokens_per_verify": float((n + 1).mean()),
        "acceptance_rate": float(a.sum() / n.sum()) if float(n.sum()) > 0 else None,
        "committed_per_round": float(torch.tensor(log.committed, dtype=torch.double).mean()),
        **_round_latency(log),
    }


def _round_latency(log: RoundLog) -> dict:
    """Median and 90th percentile of a round's wall time (draft + verify + other), in ms."""
    if not log.times_ms:
        return {}
    total = torch.tensor([sum(t) for t in log.times_ms], dtype=torch.double)
    return {"round_ms_p50": float(total.quantile(0.5)), "round_ms_p90": float(total.quantile(0.9))}


def match_metrics(spec_tokens: list[list[int]], base_tokens: list[list[int]]) -> dict:
    """Exact-match rate over prompts, common-prefix token rate, and the first divergences."""
    if len(spec_tokens) != len(base_tokens):
        raise ValueError(f"match_metrics: {len(spec_tokens)} speculative outputs vs {len(base_tokens)} baseline")
    exact, prefix_total, base_total, mismatches = 0, 0, 0, []
    for i, (s, t) in enumerate(zip(spec_tokens, base_tokens, strict=True)):
        common = 0
        while common < min(len(s), len(t)) and s[common] == t[common]:
            common += 1
        exact += int(s == t)
        prefix_total += common
        base_total += len(t)
        if s != t and len(mismatches) < 5:
            mismatches.append({"prompt": i, "position": common, "spec_token": s[common] if common < len(s) else None,
                               "target_token": t[common] if common < len(t) else None})
    return {"greedy_match": exact / len(base_tokens) if base_tokens else None,
            "token_match_rate": prefix_total / base_total if base_total else None,
            "mismatches": mismatches}


def speed_metrics(spec: Timings, spec_tokens: int, base: Timings, base_tokens: int) -> dict:
    """Tokens/s of both decoders (prefill included), speedup and where a round's time goes."""
    spec_tps = spec_tokens / spec.total_s if spec.total_s > 0 else None
    base_tps = base_tokens / base.total_s if base.total_s > 0 else None
    rounds = max(spec.steps, 1)
    return {
        "spec_tokens_per_s": spec_tps,
        "target_tokens_per_s": base_tps,
        "speedup": spec_tps / base_tps if spec_tps and base_tps else None,
        "spec_tokens": spec_tokens,
        "target_tokens": base_tokens,
        "spec_seconds": spec.total_s,
        "target_seconds": base.total_s,
        "round_ms": {"draft": 1e3 * spec.draft_s / rounds, "verify": 1e3 * spec.verify_s / rounds,
                     "other": 1e3 * spec.other_s / rounds},
        "target_step_ms": 1e3 * base.verify_s / max(base.steps, 1),
        "prefill_s": {"spec": spec.prefill_s, "target": base.prefill_s},
    }


def merge_logs(logs: Sequence[RoundLog]) -> RoundLog:
    out = RoundLog()
    offset = 0
    for log in logs:
        out.request.extend(r + offset for r in log.request)
        out.proposed.extend(log.proposed)
        out.accepted.extend(log.accepted)
        out.committed.extend(log.committed)
        out.eos_stop.extend(log.eos_stop)
        out.conf_logits.extend(log.conf_logits)
        out.times_ms.extend(log.times_ms)
        offset += (max(log.request) + 1) if log.request else 0
    return out


def _quantile_ms(values_s: Sequence[float], q: float) -> float | None:
    if not values_s:
        return None
    return 1e3 * float(torch.tensor(list(values_s), dtype=torch.double).quantile(q))


def latency_metrics(latency_s: Sequence[float], tokens: Sequence[Sequence[int]], total_s: float,
                    prefix: str = "") -> dict:
    """Per-request latency percentiles and tokens/s per request and in total, keys prefixed."""
    n_tokens = [len(t) for t in tokens]
    per_token = [lat / n for lat, n in zip(latency_s, n_tokens, strict=True) if n > 0]
    rates = [n / lat for lat, n in zip(latency_s, n_tokens, strict=True) if lat > 0]
    return {f"{prefix}tok_s_per_request": sum(rates) / len(rates) if rates else None,
            f"{prefix}tok_s_total": sum(n_tokens) / total_s if total_s > 0 else None,
            f"{prefix}latency_p50_ms": _quantile_ms(latency_s, 0.5),
            f"{prefix}latency_p95_ms": _quantile_ms(latency_s, 0.95),
            f"{prefix}ms_per_token_p50": _quantile_ms(per_token, 0.5),
            f"{prefix}ms_per_token_p95": _quantile_ms(per_token, 0.95)}


def distribution_check(spec_tokens: list[list[int]], base_tokens: list[list[int]], min_count: int = 10) -> dict:
    """Do speculative and target-only decoding emit tokens with the same frequencies? (sampling)

    A chi-square test of homogeneity on the 2 x V table of token counts; tokens seen fewer than
    `min_count` times in both outputs together are pooled into one bin (the test needs expected
    counts that are not tiny). p_value near 0 says the two decoders' outputs differ in distribution
    (a lossy verifier); a lossless one gives p-values spread over (0, 1]. tv_distance is half the L1
    distance of the two frequency vectors (sampling noise keeps it above 0 on a few prompts).
    """
    spec = torch.tensor([t for row in spec_tokens for t in row], dtype=torch.long)
    base = torch.tensor([t for row in base_tokens for t in row], dtype=torch.long)
    if spec.numel() == 0 or base.numel() == 0:
        return {"test": "chi-square homogeneity of token frequencies", "p_value": None, "tv_distance": None,
                "tokens": [int(spec.numel()), int(base.numel())]}
    V = int(max(spec.max(), base.max())) + 1
    counts = torch.stack([torch.bincount(spec, minlength=V), torch.bincount(base, minlength=V)]).double()
    total = counts.sum(0)
    keep = total >= min_count
    table = torch.cat([counts[:, keep], counts[:, ~keep & (total > 0)].sum(1, keepdim=True)], dim=1)
    table = table[:, table.sum(0) > 0]
    expected = table.sum(1, keepdim=True) * table.sum(0, keepdim=True) / table.sum()
    stat = float(((table - expected) ** 2 / expected).sum())
    dof = max(table.shape[1] - 1, 1)
    p_value = float(torch.special.gammaincc(torch.tensor(dof / 2, dtype=torch.double),
                                            torch.tensor(stat / 2, dtype=torch.double)))
    freq = counts / counts.sum(1, keepdim=True)
    return {"test": "chi-square homogeneity of token frequencies", "statistic": stat, "dof": dof,
            "p_value": p_value, "tv_distance": float(0.5 * (freq[0] - freq[1]).abs().sum()),
            "tokens": [int(spec.numel()), int(base.numel())]}
