"""`deepspec export format=gguf`: a drafter as the GGUF llama.cpp serves, made by llama.cpp's converter.

    deepspec export draft=CKPT format=gguf output_dir=G

G/ holds the HF layout llama.cpp's `convert_hf_to_gguf.py` reads (`config.json` +
`model.safetensors`: Qwen3DSparkModel for DFlash/DSpark, LlamaForCausalLMEagle3 for Eagle3, every
convention written out: block_size, mask_token_id, target_layer_ids, markov_head_type,
sample_from_anchor), `target_vocab/` (the target's config.json and tokenizer, which the converter
takes the vocabulary from) and `draft.gguf`, converted by the pinned llama.cpp (export/llamacpp.py).

The GGUF is then read back with the `gguf` package's reader and every convention compared with the
drafter's: the converter fills in silent defaults (block_size 16 when the key is missing), so a
GGUF that would be misread is deleted and the export fails naming the key.
"""

from __future__ import annotations

import importlib.util
import json
import time
from pathlib import Path

from torch import nn

from deepspec.drafters.registry import kind_entry
from deepspec.export import llamacpp
from deepspec.export.conventions import to_engine_ids

DRAFT_GGUF = "draft.gguf"
TARGET_VOCAB = "target_vocab"
OUTTYPES = {"bfloat16": "bf16", "float16": "f16", "float32": "f32"}
SPEC_TYPE = {"dspark": "draft-dspark", "dflash": "draft-dspark", "eagle3": "draft-eagle3"}


class GGUFConventionError(ValueError):
    """The converted GGUF does not carry a convention as the drafter was trained (names the key)."""


def write_target_vocab(source: str, gguf_file: str | None, out: Path,
                       chat_template: str | None = None) -> Path:
    """The target's config.json and tokenizer files (no weights): what the converter reads from the target."""
    from deepspec.targets.loading import load_tokenizer, target_config

    out.mkdir(parents=True, exist_ok=True)
    config = target_config(source, gguf_file=gguf_file).to_dict()
    config.pop("quantization_config", None)
    config["architectures"] = config.get("architectures") or [_arch_of(config)]
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    tokenizer = load_tokenizer(source, gguf_file)
    if chat_template:
        tokenizer.chat_template = chat_template
    tokenizer.save_pretrained(str(out))
    return out


def _arch_of(config: dict) -> str:
    names = {"llama": "LlamaForCausalLM", "qwen3": "Qwen3ForCausalLM", "qwen2": "Qwen2ForCausalLM"}
    model_type = config.get("model_type")
    if model_type not in names:
        raise ValueError(f"target model_type={model_type!r}: no llama.cpp architecture known for format=gguf "
                         f"({', '.join(names)})")
    return names[model_type]


def export_gguf(drafter: nn.Module, output_dir, target_source: str, target_gguf_file: str | None = None,
                dtype: str = "bfloat16", check: bool = True, sts_temperatures: list[float] | None = None,
                chat_template: str | None = None, target_vocab: Path | None = None) -> dict:
    """Write the HF layout + target vocab + draft.gguf into output_dir; returns the export summary.

    `target_vocab`: an existing `write_target_vocab` directory to use instead of writing one.
    """
    from deepspec.export.drafter import export_drafter

    if dtype not in OUTTYPES:
        raise ValueError(f"export.dtype={dtype!r}; format=gguf writes {', '.join(OUTTYPES)}")
    if drafter.spec.backbone != "llama":
        raise ValueError(f"drafter.backbone={drafter.spec.backbone}: llama.cpp's DFlash/DSpark/Eagle3 drafts "
                         f"are dense Llama/Qwen3 layers; this drafter cannot be written as a GGUF")
    if importlib.util.find_spec("sentencepiece") is None:
        raise ModuleNotFoundError("format=gguf: llama.cpp's convert_hf_to_gguf.py imports sentencepiece; "
                                  "install it with `pip install 'deepspec[llamacpp]'`")
    out = Path(output_dir)
    t0 = time.perf_counter()
    summary = export_drafter(drafter, "llamacpp", out, dtype=dtype, check=check,
                             sts_temperatures=sts_temperatures)
    vocab = target_vocab or write_target_vocab(target_source, target_gguf_file, out / TARGET_VOCAB,
                                               chat_template)
    target_vocab_size = json.loads((vocab / "config.json").read_text()).get("vocab_size")
    if target_vocab_size != drafter.shapes.vocab_size:
        raise ValueError(f"target {target_source} has vocab_size {target_vocab_size}; the drafter was "
                         f"trained for {drafter.shapes.vocab_size}: use the recipe of its own target")
    gguf_path = out / DRAFT_GGUF
    proc = llamacpp.run_converter(out, vocab, gguf_path, OUTTYPES[dtype])
    (out / "convert.log").write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0 or not gguf_path.is_file():
        raise RuntimeError(f"llama.cpp's convert_hf_to_gguf.py failed on {out} (exit {proc.returncode}); "
                           f"last lines of {out / 'convert.log'}:\n{(proc.stdout + proc.stderr)[-1500:]}")
    try:
        found = check_gguf(gguf_path, drafter)
    except GGUFConventionError:
        gguf_path.unlink()
        raise
    summary.update({"format": "gguf", "engine": "llamacpp", "llamacpp_version": llamacpp.LLAMACPP_VERSION,
                    "gguf": str(gguf_path), "gguf_metadata": found, "outtype": OUTTYPES[dtype],
                    "files": summary["files"] + ([] if target_vocab else [TARGET_VOCAB + "/"])
                    + [DRAFT_GGUF, "convert.log"], "target_vocab": str(vocab),
                    "seconds_convert": round(time.perf_counter() - t0, 1),
                    "serve": f"llama-server -m TARGET.gguf -md {gguf_path} --spec-type "
                             f"{SPEC_TYPE[drafter.spec.kind]} --spec-draft-n-max {drafter.spec.block_size}"})
    return summary


def read_gguf_fields(path: Path) -> tuple[str, dict]:
    """(architecture, {key: value}) of a GGUF's scalar and small-array metadata, via the gguf reader."""
    from gguf import GGUFReader

    reader = GGUFReader(str(path))
    values = {}
    for name, f in reader.fields.items():
        if name.startswith("tokenizer.ggml.") and name not in ("tokenizer.ggml.mask_token_id",):
            continue
        try:
            v = f.contents()
        except Exception:  # noqa: BLE001  (exotic field types we do not need)
            continue
        values[name] = v
    return str(values.get("general.architecture")), values


def check_gguf(path: Path, drafter: nn.Module) -> dict:
    """Compare the converted GGUF's conventions with the drafter's; returns what was read."""
    spec = drafter.spec
    arch, f = read_gguf_fields(path)
    problems = []

    def want(key: str, expected, why: str) -> None:
        got = f.get(key)
        if isinstance(got, list):
            got = [int(x) for x in got]
        if got != expected:
            problems.append(f"{key}={got!r}, expected {expected!r}: {why}")

    if kind_entry(spec).parallel_blocks:
        want("general.architecture", "dflash", "llama.cpp serves DFlash/DSpark as the dflash architecture")
        want("dflash.block_size", spec.block_size, "config.json block_size (the converter's default is 16)")
        want("tokenizer.ggml.mask_token_id", spec.mask_token_id, "dflash_config.mask_token_id")
        # llama.cpp taps the *input* of layer i (llama_set_embeddings_layer_inp) = the output of layer i-1
        want("dflash.target_layers", [i + 1 for i in sorted(spec.layer_ids)],
             "dflash_config.target_layer_ids (llama.cpp taps the input of each listed layer)")
        want("dflash.sample_from_anchor", True, "sample_from_anchor: deepspec drafts from the anchor slot")
        has_conf = getattr(drafter, "confidence", None) is not None
        want("dflash.has_confidence_head", has_conf, "confidence_head.proj tensors")
    else:
        want("general.architecture", "eagle3", "LlamaForCausalLMEagle3 with draft_vocab_size and one layer")
        want("eagle3.target_layers", to_engine_ids("llamacpp", "eagle3", spec.layer_ids),
             "eagle_aux_hidden_state_layer_ids (llama.cpp taps the input of each listed layer)")
    if problems:
        raise GGUFConventionError(f"{path}: the converted GGUF would be misread by llama.cpp:\n  - "
                                  + "\n  - ".join(problems))
    return {k: (v if not isinstance(v, list) or len(v) < 64 else f"[{len(v)} values]") for k, v in f.items()
            if k.startswith(("general.architecture", "dflash.", "eagle3.", "tokenizer.ggml.mask_token_id"))}
