"""`deepspec eval profile`: SPS(B) of the target on this hardware, and the scheduler's load simulation.

SPS(B) is target forward steps per second when a step carries B tokens (docs/engine.md). Measured
here as one request verifying B new tokens on top of a KV cache already holding
`eval.profile_context` tokens (the rejected tokens are rolled back after every step, so the
context stays the same size). The table feeds Algorithm 1 (`eval.scheduler=algorithm1
eval.sps_table=S/sps.json`) and `simulate_load`, which replays synthetic decoding steps at
each concurrency and reports the average verification budget per request and the throughput
(the shape of the DSpark paper's Figure 8). Beyond the largest profiled B, SPSTable assumes
the target is throughput bound.
"""

from __future__ import annotations

import platform
from pathlib import Path

import torch
from omegaconf import DictConfig

from deepspec.runs import format_table, print0

POLICIES = ("algorithm1", "stale_topk", "fixed", "none")


def hardware_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu {platform.processor() or platform.machine()} x{torch.get_num_threads()} threads"


def measure_sps(target, batch_tokens: list[int], context: int, repeats: int, seed: int = 0):
    """SPSTable of `target`: one request, `context` tokens cached, B tokens per timed forward."""
    from deepspec.decoding.scheduler import profile_sps
    from deepspec.decoding.target_runner import TargetSession

    if context < 1:
        raise ValueError(f"eval.profile_context={context}; keep at least one token in the KV cache")
    g = torch.Generator().manual_seed(seed)
    V = target.vocab_size
    session = TargetSession(target)
    session.prefill([torch.randint(0, V, (context,), generator=g).tolist()])
    device = target.device

    def step(B: int) -> None:
        ids = torch.randint(0, V, (1, B), generator=g).to(device)
        target.logits(session.step(ids).final_BTD)
        session.commit(torch.zeros(1, dtype=torch.long))  # roll back: the context stays `context` long

    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else None
    return profile_sps(step, sorted(set(int(b) for b in batch_tokens)), repeats=repeats, sync=sync,
                       hardware=f"{hardware_name(device)}; {target.name}; context {context}")


def load_table(sps, concurrency: list[int], gamma: int, seed: int) -> dict[str, list[dict]]:
    """simulate_load under each policy: Algorithm 1, stale top-K, fixed gamma, no speculation."""
    from deepspec.decoding.scheduler import simulate_load

    return {
        "algorithm1": simulate_load(sps, concurrency, gamma=gamma, policy="algorithm1", seed=seed),
        "stale_topk": simulate_load(sps, concurrency, gamma=gamma, policy="stale_topk", seed=seed),
        "fixed": simulate_load(sps, concurrency, gamma=gamma, policy=gamma, seed=seed),
        "none": simulate_load(sps, concurrency, gamma=gamma, policy=0, seed=seed),
    }


def plot_load(path: Path, sps, sims: dict[str, list[dict]]) -> Path:
    """Three panels: SPS(B) profile, verification budget vs concurrency, throughput vs concurrency."""
    from deepspec.runs import pyplot, save_figure

    plt = pyplot()
    fig, (ax0, ax1, ax2) = plt.subplots(1, 3, figsize=(14, 4))
    ax0.plot(sps.batch_tokens, sps.steps_per_s, marker="o")
    ax0.set(xscale="log", xlabel="batch tokens B", ylabel="target steps / s", title="SPS(B) (measured)")
    for name, rows in sims.items():
        conc = [r["concurrency"] for r in rows]
        ax1.plot(conc, [r["avg_budget"] for r in rows], marker="o", label=name)
        ax2.plot(conc, [r["throughput_tokens_per_s"] for r in rows], marker="o", label=name)
    ax1.set(xscale="log", xlabel="concurrent requests", ylabel="drafts verified / request / step",
            title="Verification budget vs load")
    ax2.set(xscale="log", yscale="log", xlabel="concurrent requests", ylabel="tokens / s (all requests)",
            title="Throughput vs load (simulated)")
    for ax in (ax0, ax1, ax2):
        ax.grid(alpha=0.3)
    ax1.legend(fontsize=8)
    ax2.legend(fontsize=8)
    return save_figure(fig, path)


def run(cfg: DictConfig) -> dict:
    """Measure SPS(B) for eval.profile_batches; write S/sps.json, the load simulation table and PNG.

    deepspec eval profile recipe=dspark_smollm2 output_dir=S
    Then: deepspec eval ... eval.scheduler=algorithm1 eval.sps_table=S/sps.json
    Settings: eval.profile_batches, eval.profile_context, eval.profile_repeats, eval.concurrency,
    drafter.block_size (gamma of the simulation).
    """
    from deepspec.config import section
    from deepspec.targets import target_from_config

    ev = section(cfg, "eval")
    out = Path(cfg.output_dir)
    target = target_from_config(cfg, need_tokenizer=False)
    sps = measure_sps(target, list(ev.profile_batches), int(ev.profile_context), int(ev.profile_repeats), ev.seed)
    sps_path = sps.save_json(out / "sps.json")
    gamma = int(ev.block_size or cfg.drafter.block_size)
    sims = load_table(sps, list(ev.concurrency), gamma, ev.seed)
    png = plot_load(out / "load_simulation.png", sps, sims)

    profile_rows = [{"B": b, "steps/s": s, "tokens/s": b * s, "ms/step": 1e3 / s}
                    for b, s in zip(sps.batch_tokens, sps.steps_per_s, strict=True)]
    load_rows = [{"concurrency": a["concurrency"], "alg1 budget": a["avg_budget"],
                  "alg1 tok/s": a["throughput_tokens_per_s"], "topk budget": k["avg_budget"],
                  "topk tok/s": k["throughput_tokens_per_s"], f"fixed-{gamma} tok/s": f["throughput_tokens_per_s"],
                  "no-spec tok/s": n["throughput_tokens_per_s"]}
                 for a, k, f, n in zip(sims["algorithm1"], sims["stale_topk"], sims["fixed"], sims["none"], strict=True)]
    table = format_table(load_rows)
    (out / "load_simulation.md").write_text(
        f"# Load simulation on {sps.hardware}\n\nSPS(B):\n\n```\n{format_table(profile_rows)}\n```\n\n"
        f"Simulated decoding (gamma={gamma}, synthetic calibrated confidences):\n\n```\n{table}\n```\n")
    print0(f"SPS(B) on {sps.hardware}:")
    print0(format_table(profile_rows))
    print0(f"\nLoad simulation (gamma={gamma}):")
    print0(table)
    print0(f"\nwrote {sps_path}, {png}")
    return {"sps_table": str(sps_path), "hardware": sps.hardware, "profile": profile_rows,
            "load_simulation": sims, "gamma": gamma, "files": {"png": str(png), "md": str(out / "load_simulation.md")}}
