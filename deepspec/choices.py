"""The enumerated settings of the configuration schema.

Each is a `Choice` (a str-valued Enum) whose member names equal their values, so a recipe
or an override writes the plain word (`trainer.schedule=wsd`), OmegaConf checks it when
the config is composed, and the library code that receives it compares it with ordinary
strings. The library functions keep their own checks for callers that do not go through a
config; a unit test keeps the two lists equal.
"""

from __future__ import annotations

from enum import Enum


class Choice(str, Enum):
    """A string enumeration whose members print and format as their plain value (`enum.StrEnum`
    from Python 3.11, written out because deepspec supports 3.10)."""

    def __str__(self) -> str:
        return self.value

    def __format__(self, spec: str) -> str:
        return format(self.value, spec)


class TorchDtype(Choice):
    float32 = "float32"
    bfloat16 = "bfloat16"
    float16 = "float16"


class StreamCollapse(Choice):
    """How DeepSeek-V4's parallel residual streams [B, S, 4, D] become one tapped state [B, S, D]."""

    mean = "mean"
    sum = "sum"
    first = "first"
    last = "last"


class RegenEngine(Choice):
    hf = "hf"  # the target loaded in this process (transformers generate)
    openai = "openai"  # OpenAI-compatible servers (vLLM, SGLang) at regen.urls


class FeatureMode(Choice):
    cache = "cache"  # `input` is a features cache written by `deepspec data features`
    online = "online"  # the resident target computes features for every batch
    hybrid = "hybrid"  # online in the first epoch, written to features.cache_dir, read back afterwards
    vllm = "vllm"  # vLLM servers extract them (features.vllm_urls); with features.cache_dir, kept as in hybrid


class VllmFinalState(Choice):
    """Where features.source=vllm takes the target's final hidden state from (data_tools/vllm_features.py)."""

    auto = "auto"  # engine for DeepSeek-V4, norm elsewhere
    norm = "norm"  # vLLM's state after the last layer + the target's final norm, applied by deepspec
    engine = "engine"  # the model's own final state, returned by deepspec's vLLM plugin


class StorageDtype(Choice):
    fp32 = "fp32"
    bf16 = "bf16"
    fp16 = "fp16"
    fp8 = "fp8"  # e4m3 with one scale per row


class Schedule(Choice):
    cosine = "cosine"
    wsd = "wsd"  # warmup, stable, decay over the final trainer.decay_ratio of steps
    constant = "constant"


class Eagle3Normalise(Choice):
    """How Eagle3's loss is averaged."""

    sequence = "sequence"  # mean per sequence, then over sequences (the reference trainer's)
    token = "token"  # mean over every supervised token of the step (long answers weigh more)


class Precision(Choice):
    auto = "auto"  # bf16 on GPU, fp32 on CPU
    bf16 = "bf16"
    fp32 = "fp32"
    amp = "amp"  # fp32 weights, bf16 autocast


class WarmStart(Choice):
    none = "none"  # random init
    target = "target"  # the drafter's layers start as the target's top layers


class RegenDtype(Choice):
    auto = "auto"  # bf16 on CPUs with AVX512-BF16/AMX and on CUDA, else the target's dtype
    float32 = "float32"
    bfloat16 = "bfloat16"
    float16 = "float16"


class WandbMode(Choice):
    auto = "auto"  # offline without WANDB_API_KEY
    online = "online"
    offline = "offline"
    off = "off"


class BudgetScheduler(Choice):
    """How many drafted tokens each request may verify per round when requests share a batch."""

    none = "none"  # every request verifies its whole block
    algorithm1 = "algorithm1"  # greedy marginal-gain allocation against the measured SPS(B) table
    topk = "topk"  # keep the globally most confident drafted tokens


class VerifyKernel(Choice):
    auto = "auto"  # triton on CUDA, the PyTorch reference elsewhere
    triton = "triton"
    reference = "reference"


class BlockLayout(Choice):
    """Which engine class a DFlash/DSpark export targets."""

    dspark = "dspark"  # Qwen3DSparkModel: reads deepspec blocks exactly
    dflash = "dflash"  # DFlashDraftModel: reads blocks one slot late (refused unless export.check=false)


# `format=`: names with a dash cannot be class attributes, hence the functional form
ExportFormat = Choice("ExportFormat", [(v, v) for v in ("vllm", "sglang", "hf", "v4", "hf-target", "gguf")])
