"""`deepspec export`: write a drafter (or the target) in a layout a serving engine loads.

    deepspec export recipe=R draft=CKPT format=vllm|sglang|hf output_dir=X   # a trained drafter
    deepspec export recipe=R draft=CKPT format=v4 output_dir=X               # DeepSeek-V4 mtp.* layout
    deepspec export recipe=R format=hf-target output_dir=X                   # the recipe's target as an HF dir
    deepspec export draft=CKPT format=gguf output_dir=G   # G/draft.gguf (llama.cpp) + the HF layout beside it

X/config.json carries the engine's architecture and fields; X/summary.json lists the files
written, the layer ids in deepspec's and the engine's convention, and every warning.
"""

from __future__ import annotations

import time
from pathlib import Path

from deepspec.drafters.registry import kind_entry
from deepspec.runs import clear_folder, format_table, print0, run_started

EXPORT_FORMATS = ("vllm", "sglang", "hf", "v4", "hf-target", "gguf")


def run(cfg) -> dict:
    """Export the drafter at draft=PATH as format=vllm|sglang|hf|v4|gguf, or the target as format=hf-target.

    The key check (export.check=true) refuses a drafter export the engine would refuse or silently
    misread, naming the keys; export.dtype sets the weights' dtype (bfloat16 by default).
    """
    fmt = cfg.format
    if fmt not in EXPORT_FORMATS:
        raise ValueError(f"format={fmt!r}; choose one of {', '.join(EXPORT_FORMATS)}")
    t0 = time.perf_counter()
    if fmt == "hf-target":
        from deepspec.export.target import export_target

        _start(cfg)
        t = cfg.target
        summary = export_target(t.source, cfg.output_dir, gguf_file=t.gguf_file, dtype=t.dtype,
                                chat_template=t.chat_template, random_config=dict(t.random_config or {}),
                                seed=t.seed, tokenizer_source=t.tokenizer)
        print0(f"target {t.name} written as an HF directory in {cfg.output_dir} ({summary['seconds']} s): "
               f"{', '.join(summary['files'])}")
        return summary

    from deepspec.drafters.io import load_drafter, resolve_draft_dir
    from deepspec.export.drafter import export_drafter, find_sts
    from deepspec.runs import check_export_output

    draft_dir = resolve_draft_dir(cfg.draft)
    check_export_output(cfg.output_dir, draft_dir, cfg.overwrite)
    drafter = load_drafter(draft_dir)
    target_note = None
    if kind_entry(drafter).prunes_vocab and drafter.spec.draft_vocab_size is not None \
            and fmt in ("vllm", "sglang", "gguf"):
        target_note = _attach_target(cfg, drafter, draft_dir)  # the pruned LM head is a slice of the target's
    _start(cfg)
    if fmt == "v4":
        import torch

        from deepspec.export.v4 import export_v4

        summary = export_v4(drafter, cfg.output_dir, dtype=getattr(torch, cfg.export.dtype))
    elif fmt == "gguf":
        from deepspec.export.gguf import export_gguf

        recorded, where = _recorded_config(cfg, draft_dir)
        t = recorded.target
        summary = export_gguf(drafter, cfg.output_dir, t.source, t.gguf_file, dtype=cfg.export.dtype,
                              check=cfg.export.check, sts_temperatures=find_sts(draft_dir),
                              chat_template=t.chat_template)
        target_note = "; ".join(filter(None, [target_note, f"{t.name} (from {where}): vocabulary for the converter"]))
    else:
        summary = export_drafter(drafter, fmt, cfg.output_dir, dtype=cfg.export.dtype, check=cfg.export.check,
                                 sts_temperatures=find_sts(draft_dir), dflash_layout=cfg.export.dflash_layout)
    summary["draft"] = str(draft_dir)
    if target_note:
        summary["target"] = target_note
    summary["seconds"] = round(time.perf_counter() - t0, 2)
    _report(summary)
    return summary


def _start(cfg) -> None:
    """Every check passed: clear an earlier export (overwrite=true) and record the config."""
    out = Path(cfg.output_dir)
    if cfg.overwrite and out.is_dir():
        clear_folder(out)
    run_started()


def _recorded_config(cfg, draft_dir):
    """(config, where): the training run's recorded config.yaml when it names a target, else the recipe's."""
    from omegaconf import OmegaConf

    recorded = draft_dir.parent.parent / "config.yaml"
    if recorded.is_file():
        run_cfg = OmegaConf.load(recorded)
        if "target" in run_cfg:
            return run_cfg, str(recorded)
    return cfg, "the recipe"


def _attach_target(cfg, drafter, draft_dir) -> str:
    """Load the target the drafter was trained against (the training run's recorded config when
    present, else the recipe's) and attach it; refuse a target of other shapes."""
    from deepspec.targets import target_from_config

    source_cfg, where = _recorded_config(cfg, draft_dir)
    target = target_from_config(source_cfg, need_tokenizer=False)
    from deepspec.drafters.io import check_target

    check_target(draft_dir, {**target.identity(), "source": target.source})
    if (target.vocab_size, target.hidden_size) != (drafter.shapes.vocab_size, drafter.shapes.hidden_size):
        raise ValueError(f"target {target.name} from {where} has vocab {target.vocab_size} x hidden "
                         f"{target.hidden_size}; the drafter at {draft_dir} was trained for vocab "
                         f"{drafter.shapes.vocab_size} x hidden {drafter.shapes.hidden_size}: pass the matching recipe")
    drafter.attach_target(target.embed_tokens, target.lm_head_weight)
    return f"{target.name} (from {where})"


def _report(summary: dict) -> None:
    ids = summary.get("layer_ids") or {}
    rows = [{"field": k, "value": str(v)} for k, v in (
        ("format", summary.get("format")), ("architecture", summary.get("architecture")),
        ("engine method", summary.get("method")), ("taps (deepspec: output of layer k)", ids.get("deepspec")),
        (f"written {ids.get('field')}", ids.get("written")), ("engine taps output of", ids.get("engine_taps_output_of")),
        ("mask token", summary.get("mask_token_id")), ("STS temperatures", summary.get("sts_temperatures")),
        ("key check", summary.get("check")), ("files", ", ".join(summary.get("files", []))))
        if v is not None]
    print0(format_table(rows))
    for w in summary.get("warnings", []):
        print0(f"WARNING: {w}")
    if summary.get("serve"):
        print0(f"serve with: {summary['serve']}")
