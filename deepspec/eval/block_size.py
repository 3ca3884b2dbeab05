"""`eval.block_size=auto`: the static gamma that maximises expected tokens per unit of time.

Cost model. A round with gamma drafts costs c(gamma) = draft(gamma) + verify(gamma) (+ the
engine's bookkeeping, measured with verify), in units of one target-only decode step measured
on the same machine, same batch size, same dtype. It commits on average

    E[tau(gamma)] = 1 + sum_{k=1..gamma} prod_{j<=k} a_j

tokens, where a_j is the drafter's conditional acceptance at position j (the probability that
draft j is accepted given drafts 1..j-1 were). Target-only decoding commits 1 token per step,
so the expected speedup of gamma is E[tau(gamma)] / c(gamma); `choose_block_size` takes the
largest. The acceptance comes from a short calibration pass (speculative decoding with the
drafter's full block on held-apart prompts), the costs from timing the real forwards.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch


@dataclass
class BlockSizeChoice:
    """The chosen gamma and the cost model it was chosen from (one row per candidate gamma)."""

    block_size: int
    acceptance: list[float]  # conditional acceptance a_1..a_K (untested positions count as 0)
    rows: list[dict]  # gamma, expected_tau, draft_steps, verify_steps, round_steps, expected_speedup
    source: str  # where the acceptance came from

    def to_json(self) -> dict:
        return {"chosen": self.block_size, "acceptance": self.acceptance, "cost_model": self.rows,
                "acceptance_source": self.source}

    def table(self) -> str:
        lines = [f"eval.block_size=auto: acceptance by position ({self.source}): "
                 + " ".join(f"{a:.2f}" for a in self.acceptance),
                 "  gamma  E[tau]  draft  verify  round  E[speedup]   (costs in target-only decode steps)"]
        for r in self.rows:
            mark = "  <- chosen" if r["gamma"] == self.block_size else ""
            lines.append(f"  {r['gamma']:>5}  {r['expected_tau']:>6.3f}  {r['draft_steps']:>5.2f}  "
                         f"{r['verify_steps']:>6.2f}  {r['round_steps']:>5.2f}  "
                         f"{r['expected_speedup']:>10.3f}{mark}")
        return "\n".join(lines)


def expected_tau(acceptance: list[float], gamma: int) -> float:
    """1 + sum over k <= gamma of the probability that drafts 1..k are all accepted."""
    total, alive = 1.0, 1.0
    for a in acceptance[:gamma]:
        alive *= a
        total += alive
    return total


def choose_block_size(acceptance: list[float | None], draft_steps: dict[int, float],
                      verify_steps: dict[int, float], source: str = "given") -> BlockSizeChoice:
    """The gamma in `draft_steps` maximising expected_tau / (draft + verify); ties go to the smaller gamma."""
    if not draft_steps or set(draft_steps) != set(verify_steps):
        raise ValueError("choose_block_size: draft and verify costs must be given for the same block sizes")
    acc = [0.0 if a is None else float(a) for a in acceptance]
    gammas = sorted(draft_steps)
    if len(acc) < gammas[-1]:
        raise ValueError(f"choose_block_size: acceptance covers {len(acc)} positions; gamma up to "
                         f"{gammas[-1]} was asked for")
    rows = []
    for g in gammas:
        tau = expected_tau(acc, g)
        cost = draft_steps[g] + verify_steps[g]
        rows.append({"gamma": g, "expected_tau": tau, "draft_steps": draft_steps[g],
                     "verify_steps": verify_steps[g], "round_steps": cost, "expected_speedup": tau / cost})
    best = max(rows, key=lambda r: (r["expected_speedup"], -r["gamma"]))
    return BlockSizeChoice(block_size=best["gamma"], acceptance=acc, rows=rows, source=source)


def _elapsed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


@torch.no_grad()
def measure_round_costs(target, drafter, prompts: list[list[int]], gammas: list[int],
                        repeats: int = 5) -> tuple[dict[int, float], dict[int, float]]:
    """(draft_steps, verify_steps) per gamma for a batch of `prompts`, in target-only decode steps.

    Times the very calls a round makes: the drafter's propose of gamma drafts, and the target's
    pass over gamma + 1 tokens with its taps, LM head and KV rollback; one decode step is the
    target-only session's step + LM head. (Extending the drafter's state, a few hundredths of a
    step, is left out.) Every call is timed `repeats` times, interleaved, and the fastest time
    kept: on a machine shared with other jobs it is the least disturbed one.
    """
    from deepspec.decoding.target_runner import TargetSession
    from deepspec.drafters.registry import kind_entry

    B = len(prompts)
    device = target.device
    plain = TargetSession(target)
    plain.prefill(prompts)
    token_B1 = torch.tensor([[p[-1]] for p in prompts], device=device)
    session = TargetSession(target, drafter.spec.layer_ids)
    out = session.prefill(prompts)
    len_B = torch.tensor([len(p) for p in prompts], device=device)
    state = drafter.new_state(B, max(len(p) for p in prompts) + 2 * max(gammas) + 4, device)
    ids_BT = torch.zeros(B, out.taps_BTMD.shape[1], dtype=torch.long, device=device)
    for b, p in enumerate(prompts):
        ids_BT[b, :len(p)] = torch.tensor(p, device=device)
    state.extend(out.taps_BTMD, len_B, tokens_BT=ids_BT)
    anchor_B = token_B1[:, 0]
    kw = "num_drafts" if kind_entry(drafter.spec).parallel_blocks else "num_tokens"
    none_kept = torch.zeros(B, dtype=torch.long, device=device)

    def decode_step():
        plain.logits(plain.step(token_B1).final_BTD[:, 0]).argmax(-1)
        plain.commit(none_kept)

    def draft(g: int):
        drafter.propose(state, anchor_B, len_B, greedy=True, with_probs=False, **{kw: g})

    def verify(g: int):
        step = session.step(token_B1.expand(B, g + 1))
        session.logits(step.final_BTD).argmax(-1)
        session.commit(none_kept)

    step_s, draft_s, verify_s = [], {g: [] for g in gammas}, {g: [] for g in gammas}
    for r in range(repeats + 1):  # the first pass warms up and is not kept
        times = [_elapsed(decode_step)]
        for g in gammas:
            times += [_elapsed(lambda g=g: draft(g)), _elapsed(lambda g=g: verify(g))]
        if r:
            step_s.append(times[0])
            for i, g in enumerate(gammas):
                draft_s[g].append(times[1 + 2 * i])
                verify_s[g].append(times[2 + 2 * i])
    step = min(step_s)
    return ({g: min(draft_s[g]) / step for g in gammas}, {g: min(verify_s[g]) / step for g in gammas})


def calibrate_block_size(target, drafter, benchmark: str, skip_prompts: int, num_prompts: int, settings,
                         progress: bool = True) -> BlockSizeChoice:
    """`eval.block_size=auto`: acceptance from a short speculative pass, costs timed; returns the choice.

    The pass decodes `num_prompts` conversations of `benchmark` that come after the first
    `skip_prompts` (the ones the eval scores), with the drafter's whole block; when the
    benchmark has no such prompts it reuses its first ones (and says so).
    """
    from dataclasses import replace

    from deepspec.eval.benchmarks import load_benchmark
    from deepspec.eval.evaluate import encode_chat, run_benchmark
    from deepspec.eval.metrics import per_position_acceptance

    if num_prompts < 1:
        raise ValueError(f"eval.auto_prompts={num_prompts}; eval.block_size=auto needs at least one "
                         f"calibration prompt")
    K = int(drafter.spec.block_size)
    bench = load_benchmark(benchmark, skip_prompts + num_prompts)
    held_apart = bench.conversations[skip_prompts:]
    source = f"{len(held_apart)} {benchmark} prompts after the evaluated ones"
    if not held_apart:
        held_apart = bench.conversations[:num_prompts]
        source = f"{len(held_apart)} {benchmark} prompts (also evaluated: the benchmark has no others)"
    bench = replace(bench, conversations=held_apart)
    run = run_benchmark(target, drafter, bench, replace(settings, block_size=K), progress=progress,
                        baseline=False)
    log = run.rounds
    acceptance = per_position_acceptance(log.proposed, log.accepted, log.eos_stop, K)
    prompts = [encode_chat(target, [{"role": "user", "content": c[0]}], settings.thinking)
               for c in held_apart]
    prompts = (prompts * settings.batch_size)[:settings.batch_size]
    draft, verify = measure_round_costs(target, drafter, prompts, list(range(1, K + 1)))
    return choose_block_size(acceptance, draft, verify, source=f"{source}, {len(log)} rounds")
