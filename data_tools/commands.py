"""`deepspec data <tool>` entry points: config in, library call, summary dict out.

Each function reads the composed config once, builds typed arguments and calls the
library module that does the work (prompts.py, regenerate.py, features.py). The CLI
writes the returned dict as ``output_dir/summary.json``.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

from deepspec.runs import format_table, print0


def _input(cfg) -> str:
    if not cfg.input:
        raise ValueError("input=PATH is required: the previous stage's output_dir (or a JSONL file)")
    return str(cfg.input)


def _layer_ids(cfg, shapes) -> list[int]:
    from deepspec.config import section
    from deepspec.drafters.spec import resolve_spec

    return list(resolve_spec(section(cfg, "drafter"), shapes).layer_ids)


def prompts(cfg) -> dict[str, Any]:
    """Read, clean, de-duplicate, mix and split chat prompts (data.sources, data.weights,
    data.max_rows, data.heldout_fraction, data.seed) into output_dir/train.jsonl and heldout.jsonl."""
    from data_tools.prompts import format_summary, prepare_prompts

    weights = None if cfg.data.weights is None else [float(w) for w in cfg.data.weights]
    summary = prepare_prompts(list(cfg.data.sources), weights, cfg.data.max_rows, cfg.data.heldout_fraction,
                              cfg.data.seed, Path(cfg.output_dir), max_prompt_chars=cfg.data.max_prompt_chars)
    print0(format_summary(summary))
    return summary


def _sampling_settings(cfg):
    from data_tools.regenerate import SamplingSettings

    r = cfg.regen
    return SamplingSettings(max_new_tokens=r.max_new_tokens, temperature=r.temperature, top_p=r.top_p,
                            top_k=r.top_k, thinking=r.thinking, max_turns=r.max_turns,
                            max_seq_len=cfg.data.max_seq_len, seed=r.seed)


def regenerate(cfg) -> dict[str, Any]:
    """Regenerate every assistant turn of input=PATH (a prompts folder or a JSONL file) with the
    target: regen.engine=hf (the target's own model) or openai (regen.urls; the API key is read from
    the environment variable regen.api_key_env, OPENAI_API_KEY by default, and never written).
    Resumable: rerun the same command after an interruption; rows that failed are retried.
    Writes output_dir/regenerated.jsonl."""
    from data_tools.regenerate import format_summary, run_regeneration

    r = cfg.regen
    settings = _sampling_settings(cfg)
    input_path = _input(cfg)
    provenance = None
    if r.engine == "hf":
        from data_tools.hf_engine import HFEngine
        from deepspec.targets import target_from_config

        target = target_from_config(cfg)
        engine = HFEngine(target, settings, batch_size=r.batch_size, window_batches=r.window_batches,
                          dtype=r.dtype)
        provenance = {"target_source": target.source}
    elif r.engine == "openai":
        from data_tools.openai_engine import OpenAIEngine, api_key_from_env

        engine = OpenAIEngine(list(r.urls), r.model or cfg.target.name, settings,
                              api_key=r.api_key or api_key_from_env(r.api_key_env),
                              concurrency=r.concurrency, retries=r.retries, timeout_s=r.timeout_s,
                              backoff_s=r.backoff_s, return_token_ids=r.return_token_ids)
        provenance = {"urls": list(r.urls)}
    else:
        raise ValueError(f"regen.engine={r.engine!r}; choose hf or openai")
    summary = run_regeneration(input_path, cfg.output_dir, engine, settings, max_rows=cfg.data.max_rows,
                               retry_failed=r.retry_failed, max_error_fraction=r.max_error_fraction,
                               provenance=provenance)
    print0(format_summary(summary))
    return summary


def features(cfg) -> dict[str, Any]:
    """Write the target-feature cache of input=PATH (a regenerate folder) into output_dir: per token
    the id, loss mask, tapped layers (drafter.layer_ids) and final hidden state, stored as
    features.dtype (fp32 | bf16 | fp16 | fp8) in shards of features.shard_tokens. Resumable.
    features.source=vllm: vLLM computes them, at features.vllm_urls or, when none are given, in a
    server started here from $DEEPSPEC_VLLM_VENV (same cache either way).
    features.regenerate=true (with source=vllm): input= is prompts; every answer is generated with the
    regen settings and its features come from the same vLLM passes (one follow-up request for the
    end-of-turn tail); writes output_dir/regenerated.jsonl beside the cache. Resumable."""
    from data_tools.features import write_feature_cache
    from deepspec.targets import target_from_config

    f = cfg.features
    if f.regenerate and f.source != "vllm":
        raise ValueError(f"features.regenerate=true runs through vLLM (features.source=vllm), not "
                         f"features.source={f.source}; or run `deepspec data regenerate` then `deepspec data features`")
    target = target_from_config(cfg)
    layer_ids = target.check_layer_ids(_layer_ids(cfg, target.shapes))
    if f.regenerate:
        return _regenerate_features(cfg, target, layer_ids)
    with _feature_extractor(cfg, target, layer_ids) as (extractor, engine):
        summary = write_feature_cache(_input(cfg), target, layer_ids, cfg.output_dir,
                                      storage_dtype=f.dtype, max_seq_len=cfg.data.max_seq_len,
                                      shard_tokens=f.shard_tokens, batch_tokens=f.batch_tokens,
                                      extractor=extractor, engine=engine)
        if extractor is not None:
            summary["vllm"] = dict(extractor.stats, urls=extractor.urls)
    shown = ("sequences", "tokens", "loss_tokens", "shards", "engine", "storage_dtype", "final_dtype",
             "bytes_per_token", "total_bytes", "tokens_per_s")
    print0(format_table([{k: summary[k] for k in shown}]))
    return summary


def _regenerate_features(cfg, target, layer_ids: list[int]) -> dict[str, Any]:
    """`features` with features.regenerate=true (data_tools/regen_features.py)."""
    from data_tools.regen_features import BLOCK_SIZE, OnePass, run_one_pass
    from data_tools.regenerate import format_summary

    f, r = cfg.features, cfg.regen
    with _feature_extractor(cfg, target, layer_ids, extra=["--block-size", str(BLOCK_SIZE)]) as (extractor, _):
        one_pass = OnePass(extractor, target.tokenizer, _sampling_settings(cfg), f.dtype)
        summary = run_one_pass(_input(cfg), cfg.output_dir, one_pass, target, layer_ids,
                               shard_tokens=f.shard_tokens, concurrency=f.vllm_concurrency,
                               max_rows=cfg.data.max_rows, retry_failed=r.retry_failed,
                               max_error_fraction=r.max_error_fraction)
        summary["vllm"] = dict(extractor.stats, urls=extractor.urls)
    print0(format_summary(summary))
    shown = ("sequences", "tokens", "loss_tokens", "shards", "storage_dtype", "bytes_per_token", "total_bytes")
    print0(format_table([{**{k: summary[k] for k in shown},
                          "target_passes_per_token": summary["passes"]["per_sequence_token"]}]))
    return summary


@contextlib.contextmanager
def _feature_extractor(cfg, target, layer_ids: list[int], extra: list[str] = ()):
    """(extractor, engine name) for `features`: None with the resident target; a VllmExtractor for
    features.source=vllm (at features.vllm_urls, or a local server for the length of the block)."""
    f = cfg.features
    if f.source != "vllm":
        yield None, "transformers"
        return
    from data_tools.vllm_features import VllmExtractor, final_state_source, local_server, vllm_layer_ids

    final = final_state_source(target, f.vllm_final_state)  # refuses what vLLM cannot give before any server
    if f.vllm_urls:
        yield VllmExtractor(list(f.vllm_urls), target, layer_ids, f.vllm_concurrency, final_state=final), "vllm"
        return
    work = Path(cfg.output_dir) / "vllm"
    model_dir = _hf_dir_for_vllm(cfg, work / "target")
    dtype = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}[str(cfg.target.dtype)]
    print0(f"[features] starting a vLLM server on {model_dir} ({dtype}); log {work / 'vllm_server.log'}")
    with local_server(model_dir, vllm_layer_ids(layer_ids, target.num_layers, final), work / "hidden_states",
                      dtype=dtype, max_model_len=cfg.data.max_seq_len + 1, log=work / "vllm_server.log", extra=extra,
                      final=final) as url:
        yield VllmExtractor([url], target, layer_ids, f.vllm_concurrency, final_state=final), "vllm"


def _hf_dir_for_vllm(cfg, out: Path) -> Path:
    """An HF directory vLLM can load for the recipe's target: target.source itself when it is one,
    else the target exported once to ``out`` (GGUF and embedded targets)."""
    source = Path(str(cfg.target.source))
    if (source / "config.json").is_file():
        return source
    if not ((out / "config.json").is_file() and (out / "model.safetensors").is_file()):
        from deepspec.export.target import export_target

        export_target(str(cfg.target.source), out, gguf_file=cfg.target.gguf_file,
                      chat_template=cfg.target.chat_template)
    return out


def target_shapes(cfg):
    """The target's TargetShapes from its config alone (no weights; the same lookup as `deepspec plan`,
    DeepSeek-V4 presets included), loading the model only as a last resort."""
    from deepspec.targets import shapes_from_hf_config
    from deepspec.targets.loading import target_config

    t = cfg.target
    try:
        return shapes_from_hf_config(target_config(t.source, t.name, t.gguf_file, dict(t.random_config)))
    except (OSError, ValueError, KeyError):
        from deepspec.targets import target_from_config

        return target_from_config(cfg, need_tokenizer=False).shapes


def estimate(cfg) -> dict[str, Any]:
    """Bytes per token and total size of a feature cache for the recipe's target, tapped layers
    (drafter.layer_ids), features.dtype and data.tokens tokens, without loading the target weights;
    printed beside DeepSpec's published 6 + 2·d·(m+1) bytes/token (bf16)."""
    from data_tools.cache import (
        STORAGE_DTYPES,
        bytes_per_token,
        check_dtype,
        deepspec_bytes_per_token,
        final_dtype,
    )

    shapes = target_shapes(cfg)
    layer_ids = _layer_ids(cfg, shapes)
    m, d = len(layer_ids), shapes.hidden_size
    dtype = check_dtype(cfg.features.dtype)
    tokens = cfg.data.tokens
    if tokens is None or tokens < 0:
        raise ValueError("data.tokens=N is required (tokens to cache), e.g. data.tokens=1000000")
    rows = [{"dtype": name, "final_dtype": final_dtype(name), "bytes_per_token": bytes_per_token(m, d, name),
             "total_GB": bytes_per_token(m, d, name) * tokens / 1e9} for name in STORAGE_DTYPES]
    deepspec = deepspec_bytes_per_token(m, d)
    rows.append({"dtype": "DeepSpec bf16", "final_dtype": "bf16", "bytes_per_token": deepspec,
                 "total_GB": deepspec * tokens / 1e9})
    print0(f"target {cfg.target.name}: hidden {d}, taps {layer_ids} (m={m}); {tokens:,} tokens; "
           f"layout: 4 B id + 1 B mask + m·d·bytes + d·final bytes (+ m·4 B fp8 scales; fp8 keeps the final "
           f"hidden state in bf16)")
    print0(format_table(rows))
    bpt = bytes_per_token(m, d, dtype)
    return {"target": cfg.target.name, "hidden_size": d, "layer_ids": layer_ids, "num_taps": m, "dtype": dtype,
            "final_dtype": final_dtype(dtype), "tokens": tokens, "bytes_per_token": bpt,
            "total_bytes": bpt * tokens,
            "deepspec_bf16_bytes_per_token": deepspec, "deepspec_bf16_total_bytes": deepspec * tokens,
            "ratio_vs_deepspec": round(bpt / deepspec, 4),
            "all_dtypes": {r["dtype"]: r["bytes_per_token"] for r in rows}}
