"""`deepspec inspect`: load the target, render a chat prompt and show what a drafter would read."""

from __future__ import annotations

import time

import torch

from deepspec.drafters.spec import DrafterSpec, resolve_spec
from deepspec.runs import format_table, print0
from deepspec.targets import target_from_config

PROMPT = [{"role": "user", "content": "What is speculative decoding, in one sentence?"}]


def run(cfg) -> dict:
    """Load the recipe's target, render a chat prompt with its template, run it once and print
    the tapped layers' feature shapes, the final hidden state and the greedy next token."""
    t0 = time.perf_counter()
    target = target_from_config(cfg)
    load_s = time.perf_counter() - t0
    spec = resolve_spec(DrafterSpec(**dict(cfg.drafter)), target.shapes)
    text = target.render_chat(PROMPT, add_generation_prompt=True)
    ids = target.tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids.to(target.device)
    t1 = time.perf_counter()
    out = target.forward(ids, spec.layer_ids)
    fwd_s = time.perf_counter() - t1
    next_id = int(target.logits(out.final_BTD[:, -1]).argmax(-1))
    rows = [{"tensor": f"taps (layers {spec.layer_ids})", "shape": list(out.taps_BTMD.shape),
             "dtype": str(out.taps_BTMD.dtype).replace("torch.", "")},
            {"tensor": "final hidden (post-norm)", "shape": list(out.final_BTD.shape),
             "dtype": str(out.final_BTD.dtype).replace("torch.", "")}]
    print0(f"target {target.name}: {target.num_layers} layers, hidden {target.hidden_size}, "
           f"vocab {target.vocab_size} (loaded in {load_s:.1f}s)")
    print0(f"chat prompt ({ids.shape[1]} tokens):\n{text}")
    print0(format_table(rows))
    print0(f"greedy next token: {next_id} {target.tokenizer.decode([next_id])!r}  (forward {fwd_s * 1e3:.0f} ms)")
    return {"target": target.identity(), "layer_ids": spec.layer_ids, "prompt_tokens": int(ids.shape[1]),
            "taps_shape": list(out.taps_BTMD.shape), "final_shape": list(out.final_BTD.shape),
            "next_token": next_id, "load_s": round(load_s, 2), "forward_s": round(fwd_s, 3),
            "finite": bool(torch.isfinite(out.taps_BTMD).all())}
