"""`deepspec train`: distil a drafter against the frozen target.

    deepspec train recipe=dspark_smollm2 input=RUN_DIR [trainer.max_steps=N] [deepspeed=zero2]
    torchrun --nproc_per_node 8 --no-python deepspec train recipe=dspark_qwen3_4b input=... deepspeed=zero2

`input` is a `deepspec data regenerate` output (features computed online from the resident
target, or hybrid) or a features cache. `resume=auto|none|PATH` continues a run exactly;
`init_from=PATH` warm-starts from a drafter's weights only (domain fine-tuning).
Writes output_dir/checkpoints/{step_*,final,best}, metrics.jsonl, loss_curve.png,
tensorboard/ and returns the summary (summary.json).
"""

from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path
from typing import Optional

import torch
from omegaconf import DictConfig, OmegaConf

from deepspec.choices import Eagle3Normalise
from deepspec.config import section
from deepspec.drafters import build_drafter, kind_entry, resolve_spec
from deepspec.guards import redacted
from deepspec.runs import format_table, print0, rank, run_started, world_size
from deepspec.training import checkpoint as ckpt
from deepspec.training.data import eval_plan, plan_step, steps_for_epochs
from deepspec.training.distributed import (DistEnv, build_engine, deepspeed_json, grad_accum_steps,
                                           init_distributed)
from deepspec.training.logging import RunLogger, plot_loss_curve
from deepspec.training.loop import DraftLoss, evaluate, loss_weights, make_batch, train_step
from deepspec.training.schedule import make_lr_lambda
from deepspec.training.warm_start import apply_warm_start


def run(cfg: DictConfig) -> dict:
    """Train the recipe's drafter on `input` (see the module docstring for the options)."""
    env = init_distributed(cfg.target.device)
    from deepspec.targets import target_from_config

    target = target_from_config(cfg)  # with its tokenizer: a features cache's identity includes its hash
    layer_ids = resolve_spec(section(cfg, "drafter"), target.shapes).layer_ids
    train_source, heldout_source = open_sources(cfg, target, layer_ids)
    return train(cfg, target, train_source, heldout_source, env)


def open_sources(cfg: DictConfig, target, layer_ids: list[int]):
    """(train, held-out) feature sources for `cfg.input`: two views of one source, so a hybrid cache_dir
    is written by one writer (held-out is None when the input has no held-out sequences)."""
    if not cfg.input:
        raise ValueError("input=PATH is required: a `deepspec data regenerate` output directory or a features cache")
    from deepspec.features import open_feature_splits

    cache_dir = cfg.features.cache_dir
    if cache_dir and cfg.features.source in ("hybrid", "vllm") and world_size() > 1:
        cache_dir = str(Path(cache_dir) / f"rank_{rank():05d}")  # ranks read different sequences: own shards
    train_source, heldout = open_feature_splits(
        cfg.input, target, layer_ids, mode=cfg.features.source, splits=("train", "heldout"),
        max_seq_len=cfg.data.max_seq_len, cache_dir=cache_dir, storage_dtype=cfg.features.dtype,
        batch_tokens=cfg.features.batch_tokens, shard_tokens=cfg.features.shard_tokens,
        vllm_urls=list(cfg.features.vllm_urls), vllm_concurrency=cfg.features.vllm_concurrency,
        vllm_final_state=cfg.features.vllm_final_state)
    if not len(train_source):
        raise ValueError(f"input={cfg.input}: no trainable training sequence (a row needs status success or "
                         f"truncated, messages that fit the chat template and at least one supervised token "
                         f"within data.max_seq_len={cfg.data.max_seq_len})")
    return train_source, heldout if len(heldout) else None


def train(cfg: DictConfig, target, train_source, heldout_source=None, env: Optional[DistEnv] = None) -> dict:
    """The training run proper: drafter, engine, resume, the step loop, checkpoints, summary."""
    env = env or init_distributed(cfg.target.device)
    t_start = time.perf_counter()
    tr = section(cfg, "trainer")
    spec = resolve_spec(section(cfg, "drafter"), target.shapes)
    if tr.precision not in ("auto", "bf16", "amp", "fp32"):
        raise ValueError(f"trainer.precision={tr.precision!r}; choose auto (bf16 on GPU, fp32 on CPU), bf16, "
                         f"amp (fp32 weights, bf16 autocast) or fp32")
    amp = torch.bfloat16 if tr.precision == "amp" else None
    bf16 = tr.precision == "bf16" or (tr.precision == "auto" and env.device.type == "cuda")
    dtype = torch.bfloat16 if bf16 else torch.float32
    grad_accum = grad_accum_steps(tr.global_batch, tr.micro_batch, env.world_size)
    total_steps = tr.max_steps or steps_for_epochs(len(train_source), tr.global_batch, tr.epochs)

    torch.manual_seed(cfg.seed)
    drafter = build_drafter(spec, target.shapes)
    drafter.attach_target(target.embed_tokens, target.lm_head_weight)
    target_id = {**target.identity(), "source": getattr(target, "source", None)}
    if cfg.init_from:
        ckpt.load_weights(drafter, cfg.init_from, target=target_id)
        print0(f"[train] init_from={cfg.init_from}: drafter weights loaded (fresh optimizer, step 0)")
    else:
        apply_warm_start(drafter, target, tr.warm_start)
    if not cfg.init_from and kind_entry(spec).prunes_vocab and spec.draft_vocab_size is not None:
        set_eagle3_vocab(drafter, train_source, target.vocab_size, spec.draft_vocab_size, heldout_source)
    if tr.activation_checkpointing:
        apply_activation_checkpointing(drafter)
    weights_K = loss_weights(spec, cfg.loss.gamma_w)
    model = DraftLoss(drafter, target.lm_head_weight, weights_K, cfg.loss.alpha_ce, cfg.loss.alpha_tv,
                      cfg.loss.alpha_conf, cfg.loss.vocab_chunk, cfg.loss.keep_probs_mb,
                      eagle3_per_sequence=cfg.loss.eagle3_normalise == Eagle3Normalise.sequence).to(env.device)

    ds = section(cfg, "deepspeed")
    ds_config = deepspeed_json(ds, tr, grad_accum, env.world_size, bf16)
    lr_lambda = make_lr_lambda(total_steps, tr.schedule, tr.warmup_ratio, tr.min_lr_ratio, tr.decay_ratio)
    engine = build_engine(model, ds_config, lr_lambda, list(ds.leaf_modules), drafter.external_parameters())

    fingerprint = run_fingerprint(cfg, spec, target, bf16)
    state = ckpt.TrainState()
    resume_from = ckpt.find_resume(cfg.output_dir, cfg.resume)
    if resume_from is not None:
        state = ckpt.load_checkpoint(engine, resume_from, fingerprint, env)
        print0(f"[train] resumed from {resume_from} at step {state.step}")
    elif cfg.resume == "auto":
        print0(f"[train] resume=auto: no checkpoint under {ckpt.checkpoints_dir(cfg.output_dir)}; starting afresh")
    if cfg.overwrite and env.is_rank0:
        ckpt.clear_run(cfg.output_dir)  # every check passed: the previous run goes now
    run_started()

    heldout = heldout_source
    if heldout is None or len(heldout) < env.world_size:
        print0(f"[train] held-out split has {0 if heldout is None else len(heldout)} sequences for {env.world_size} "
               f"rank(s); simulated τ is measured on the first training sequences instead")
        heldout = train_source
    eval_batches = [make_batch(heldout.get_batch(p.indices), spec, p.seed, env.device, dtype)
                    for p in eval_plan(len(heldout), tr.eval_sequences, tr.micro_batch, env.world_size, env.rank,
                                       cfg.seed)]
    n_params = sum(getattr(p, "ds_numel", p.numel()) for p in drafter.parameters() if p.requires_grad)
    print0(format_table([{"drafter": spec.kind, "trainable": f"{n_params / 1e6:.2f}M", "world": env.world_size,
                          "zero": ds.zero_stage, "global_batch": tr.global_batch, "micro": tr.micro_batch,
                          "grad_accum": grad_accum, "steps": total_steps,
                          "epochs": round(total_steps * tr.global_batch / len(train_source), 2),
                          "train_seqs": len(train_source), "heldout_seqs": len(heldout),
                          "precision": "bf16" if bf16 else "amp" if amp else "fp32"}]))

    logger = RunLogger(cfg.output_dir, env.is_rank0, total_steps, state.step, tr, Path(cfg.output_dir).name,
                       redacted(cfg))

    def run_eval(step: int) -> dict:
        result = evaluate(engine.module, eval_batches, env.device)
        logger.eval(step, result)
        if state.best_tau is None or result["simulated_tau"] > state.best_tau:
            state.best_tau, state.best_step = result["simulated_tau"], step
            ckpt.save_best(drafter, cfg.output_dir, step, result["simulated_tau"], env, target=target_id)
        return result

    if state.step == 0 and state.initial_tau is None:
        state.initial_tau = run_eval(0)["simulated_tau"]
    train_time = tokens = sequences = 0.0
    last: dict = {}
    for step in range(state.step, total_steps):
        t0 = time.perf_counter()
        epoch, plans = plan_step(len(train_source), tr.global_batch, tr.micro_batch, env.world_size, env.rank,
                                 cfg.seed, step)
        batches = [make_batch(train_source.get_batch(p.indices), spec, p.seed, env.device, dtype) for p in plans]
        last = train_step(engine, batches, weights_K, env.world_size, amp)
        dt = time.perf_counter() - t0
        train_time, tokens, sequences = train_time + dt, tokens + last["anchor_tokens"], sequences + tr.global_batch
        last.update(lr=engine.get_lr()[0],
                    tokens_per_s=last["anchor_tokens"] / dt, sequences_per_s=tr.global_batch / dt, epoch=epoch)
        state.step, state.epoch = step + 1, epoch
        done = state.step == total_steps
        logger.step(state.step, last, write=state.step % tr.log_every == 0 or done or state.step == 1)
        if tr.eval_every and state.step % tr.eval_every == 0 and not done:
            run_eval(state.step)
        next_epoch = (state.step * tr.global_batch) // len(train_source)
        if next_epoch != epoch or (tr.save_every and state.step % tr.save_every == 0) or done:
            flush_features(train_source)  # hybrid: what was computed goes to disk before a save / next epoch
        if tr.save_every and state.step % tr.save_every == 0 and not done:
            ckpt.save_checkpoint(engine, drafter, cfg.output_dir, ckpt.step_name(state.step), state, fingerprint,
                                 tr.keep_last, env)

    final_eval = run_eval(state.step)
    final_dir = ckpt.save_checkpoint(engine, drafter, cfg.output_dir, "final", state, fingerprint, tr.keep_last,
                                     env)
    history = logger.history() if env.is_rank0 else []
    logger.close()
    curve = plot_loss_curve(history, Path(cfg.output_dir) / "loss_curve.png") if env.is_rank0 else None
    train_losses = [r["loss"] for r in history if r.get("kind") == "train"]
    summary = {
        "steps": state.step,
        "final_loss": last.get("loss", train_losses[-1] if train_losses else None),
        "initial_simulated_tau": state.initial_tau,
        "final_simulated_tau": final_eval["simulated_tau"],
        "best_simulated_tau": state.best_tau,
        "best_step": state.best_step,
        "tokens_per_s": tokens / train_time if train_time else None,
        "sequences_per_s": sequences / train_time if train_time else None,
        "per_position_acceptance": final_eval["per_position_acceptance"],
        "per_position_accuracy": final_eval["per_position_accuracy"],
        "heldout_loss": final_eval["loss"],
        "checkpoint": str(final_dir),
        "best_checkpoint": str(ckpt.checkpoints_dir(cfg.output_dir) / "best"),
        "resumed_from": str(resume_from) if resume_from else None,
        "world_size": env.world_size,
        "zero_stage": ds.zero_stage,
        "train_time_s": round(train_time, 2),
        "wall_time_s": round(time.perf_counter() - t_start, 2),
        "loss_curve": str(curve) if curve else None,
    }
    print0("\n" + format_table([{k: summary[k] for k in ("steps", "final_loss", "initial_simulated_tau",
                                                           "best_simulated_tau", "tokens_per_s", "wall_time_s")}]))
    print0("held-out acceptance by position: " + " ".join(f"{a:.3f}" for a in summary["per_position_acceptance"]))
    print0(f"checkpoint (draft=): {final_dir}")
    return summary


def flush_features(source) -> None:
    """Hybrid sources write computed features as a shard (a no-op for cache and online sources)."""
    flush = getattr(source, "flush", None)
    if flush is not None:
        flush()


def run_fingerprint(cfg: DictConfig, spec, target, bf16: bool) -> dict:
    """What a resumed run must share with the checkpoint for the continuation to be the same run."""
    s = asdict(spec)
    return {
        "drafter": {k: s[k] for k in sorted(s)},
        "layer_ids": list(spec.layer_ids),
        "target": target.identity(),
        "global_batch": cfg.trainer.global_batch,
        "micro_batch": cfg.trainer.micro_batch,
        "seed": cfg.seed,
        "zero_stage": cfg.deepspeed.zero_stage,
        "precision": "bf16" if bf16 else "amp" if cfg.trainer.precision == "amp" else "fp32",
        "loss": OmegaConf.to_container(cfg.loss),
    }


def set_eagle3_vocab(drafter, source, vocab_size: int, n_keep: int, heldout=None) -> dict:
    """Eagle3 pruned vocabulary: the `n_keep` tokens most frequent over every supervised token of the
    training source, read from token ids (no target forward). Returns the token count and coverages."""
    from deepspec.drafters.eagle3 import build_vocab_map, count_supervised_tokens, vocab_coverage

    t0 = time.perf_counter()
    counts = count_supervised_tokens(source, vocab_size)
    if int(counts.sum()) == 0:
        raise ValueError("the training data has no supervised token: Eagle3's draft vocabulary cannot be "
                         "counted (check the loss masks of the input)")
    d2t, t2d = build_vocab_map(counts, n_keep)
    drafter.set_vocab_map(d2t, t2d)
    info = {"sequences": len(source), "tokens": int(counts.sum()),
            "train_coverage": vocab_coverage(counts, t2d)}
    if heldout is not None and len(heldout) and hasattr(heldout, "supervised_tokens"):
        info["heldout_coverage"] = vocab_coverage(count_supervised_tokens(heldout, vocab_size), t2d)
    held = f", held-out {info['heldout_coverage']:.2%}" if "heldout_coverage" in info else ""
    print0(f"[train] Eagle3 draft vocabulary: {n_keep} most frequent of {vocab_size} tokens over "
           f"{info['tokens']:,} supervised tokens of {len(source)} sequences "
           f"({time.perf_counter() - t0:.1f} s); coverage: train {info['train_coverage']:.2%}{held}")
    return info


def apply_activation_checkpointing(drafter) -> None:
    """Recompute each draft decoder layer in backward instead of storing its activations."""
    from torch.utils.checkpoint import checkpoint

    layers = getattr(drafter, "layers", None)
    if layers is None:
        print0("[train] activation checkpointing: this drafter has no `layers` list; not applied")
        return
    for layer in layers:
        inner = layer.forward

        def wrapped(*args, _inner=inner, **kwargs):
            return checkpoint(_inner, *args, use_reentrant=False, **kwargs)

        layer.forward = wrapped
