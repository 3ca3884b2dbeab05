"""Evaluation metrics from the engine's round log and timings (docs/algorithms.md).

- tau: accepted drafts + 1 per round (the correction / bonus token counts), averaged over rounds;
- per-position conditional acceptance at k: among rounds where positions 1..k-1 were accepted
  and k was verified, the fraction where k was accepted (a round cut by an accepted EOS never
  tested the positions after it);
- verify rate: drafts verified per round (and target tokens per verify pass, anchor included);
- tokens/s of speculative and target-only decoding measured in the same run, and their ratio;
- greedy match: fraction of prompts whose speculative output equals the target-only output
  token for token, and the fraction of target-only tokens reproduced before the first divergence.
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
        "tau": float((a + 1).mean()),
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
