"""Everything distributed in one place: process group, DeepSpeed engine, collectives.

This is the only module that imports `deepspeed` (drafters and the loop stay
single-device, torchtitan's habit). On CPU DeepSpeed runs with the gloo backend
(`DS_ACCELERATOR=cpu`), fp32 and torch's AdamW (`"torch_adam": true`); on GPU with
NCCL and bf16. The ZeRO JSON is generated here from the `deepspeed` config group.

Launch with torchrun (it sets RANK / WORLD_SIZE / LOCAL_RANK / MASTER_*); a plain
`deepspec train` is a world of one and gets those variables filled in here. Never the
deepspeed launcher's `--local_rank` argument: DeepSpeed reads LOCAL_RANK from the env.
"""

from __future__ import annotations

import contextlib
import os
import socket
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Iterator, Optional

import torch
from torch import nn

if TYPE_CHECKING:
    from deepspec.config import DeepSpeedConfig, TrainerConfig


@dataclass(frozen=True)
class DistEnv:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device

    @property
    def is_rank0(self) -> bool:
        return self.rank == 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(device: str = "auto") -> DistEnv:
    """Start (or join) the process group: gloo + DS_ACCELERATOR=cpu on CPU, NCCL on GPU."""
    use_cuda = torch.cuda.is_available() if device == "auto" else device.startswith("cuda")
    if not use_cuda:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    if "RANK" not in os.environ:  # a plain `deepspec train`: a world of one
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1")
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
    import deepspeed

    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if use_cuda:
        torch.cuda.set_device(local_rank)
    if not torch.distributed.is_initialized():
        deepspeed.init_distributed(dist_backend="nccl" if use_cuda else "gloo", auto_mpi_discovery=False)
    dev = torch.device(f"cuda:{local_rank}") if use_cuda else torch.device("cpu")
    return DistEnv(rank=torch.distributed.get_rank(), local_rank=local_rank,
                   world_size=torch.distributed.get_world_size(), device=dev)


def grad_accum_steps(global_batch: int, micro_batch: int, world_size: int) -> int:
    """global_batch = micro_batch x grad_accum x world_size, or a clear error."""
    per_step = micro_batch * world_size
    if global_batch % per_step:
        ok = [g for g in range(per_step, 4 * max(global_batch, per_step) + 1, per_step)][:3]
        raise ValueError(f"trainer.global_batch={global_batch} sequences is not divisible by trainer.micro_batch="
                         f"{micro_batch} x world_size={world_size} = {per_step}; use a multiple such as "
                         f"{ok} or change trainer.micro_batch")
    return global_batch // per_step


def deepspeed_json(ds: DeepSpeedConfig, tr: TrainerConfig, grad_accum: int, world_size: int,
                   bf16: bool) -> dict:
    """The DeepSpeed config dict for one run (ZeRO 0/1/2/3, AdamW, clipping, bf16 or fp32) from the
    `deepspeed` and `trainer` sections; `ds.extra` is merged over it last."""
    if ds.zero_stage not in (0, 1, 2, 3):
        raise ValueError(f"deepspeed.zero_stage={ds.zero_stage}; choose 0, 1, 2 or 3")
    zero: dict[str, Any] = {"stage": ds.zero_stage, "overlap_comm": ds.overlap_comm,
                            "reduce_bucket_size": int(ds.reduce_bucket_size)}
    if ds.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu"}
    if ds.offload_param:
        if ds.zero_stage != 3:
            raise ValueError("deepspeed.offload_param needs zero_stage=3 (deepspeed=zero3)")
        zero["offload_param"] = {"device": "cpu"}
    cfg = {
        "train_batch_size": tr.micro_batch * grad_accum * world_size,
        "train_micro_batch_size_per_gpu": tr.micro_batch,
        "gradient_accumulation_steps": grad_accum,
        "gradient_clipping": tr.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": bool(bf16)},
        "optimizer": {"type": "AdamW", "params": {
            "lr": tr.lr, "betas": list(tr.betas), "eps": 1e-8, "weight_decay": tr.weight_decay,
            "torch_adam": True, "adam_w_mode": True}},
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    _deep_update(cfg, dict(ds.extra or {}))
    return cfg


def _deep_update(base: dict, extra: dict) -> None:
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(base.get(k), dict):
            _deep_update(base[k], v)
        else:
            base[k] = v


def build_engine(model: nn.Module, ds_config: dict, lr_lambda: Callable[[int], float],
                 leaf_modules: Optional[list[str]] = None, external_params: Optional[list[nn.Parameter]] = None):
    """DeepSpeed engine over `model`'s trainable parameters with a LambdaLR schedule.

    Frozen parameters (requires_grad=False) never enter the optimizer. `leaf_modules`
    (class names) are kept whole under ZeRO-3 (MoE experts, docs/training.md). `external_params` are
    read by `model`'s forward outside their own module's forward (DSpark's W2 in the loss):
    ZeRO-3 gathers them for the whole of `model`'s forward and backward.
    """
    import deepspeed

    if leaf_modules and ds_config["zero_optimization"]["stage"] == 3:
        from deepspeed.utils import set_z3_leaf_modules

        classes = {type(m) for m in model.modules() if type(m).__name__ in set(leaf_modules)}
        missing = set(leaf_modules) - {c.__name__ for c in classes}
        if missing:
            raise ValueError(f"deepspeed.leaf_modules {sorted(missing)} name no module class of the drafter")
        set_z3_leaf_modules(model, list(classes))
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the drafter has no trainable parameters")

    def scheduler(optimizer):
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda)

    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=params, config=ds_config,
                                           lr_scheduler=scheduler)
    if ds_config["zero_optimization"]["stage"] == 3:
        for p in external_params or []:
            deepspeed.zero.register_external_parameter(engine.module, p)
    return engine


@contextlib.contextmanager
def full_parameters(module: nn.Module) -> Iterator[None]:
    """Inside, every parameter of `module` is whole on every rank (ZeRO-3 gathers; else a no-op)."""
    params = [p for p in module.parameters() if hasattr(p, "ds_id")]
    if not params:
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
        yield


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum over ranks (a copy; the input is unchanged). A world of one returns a copy."""
    out = t.detach().clone()
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        torch.distributed.all_reduce(out)
    return out


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank `src`'s Python object on every rank."""
    if not (torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1):
        return obj
    box = [obj]
    torch.distributed.broadcast_object_list(box, src=src)
    return box[0]


def all_gather_object(obj: Any) -> list:
    if not (torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1):
        return [obj]
    out: list = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(out, obj)
    return out


def barrier() -> None:
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        torch.distributed.barrier()


def shutdown() -> None:
    """Leave the process group (tests call train() many times in one process)."""
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def _deepspeed_value_types() -> list:
    """The non-tensor classes DeepSpeed's own checkpoint files hold (plain values, no code)."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


def refusal_reason(exc: Exception) -> str:
    """The line of a weights-only unpickling error that names the refused object."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    named = [line for line in lines if "GLOBAL" in line or "Unsupported" in line]
    return (named or lines or [type(exc).__name__])[0].split(". Please")[0]


def load_engine_checkpoint(engine, path, tag: str = "engine") -> None:
    """`engine.load_checkpoint` (weights, optimizer, scheduler) with every `torch.load` inside it
    forced to weights_only=True: a checkpoint from another source cannot run code on load."""
    import pickle

    original = torch.load

    def weights_only_load(*args, **kwargs):
        kwargs["weights_only"] = True
        return original(*args, **kwargs)

    torch.load = weights_only_load
    try:
        with torch.serialization.safe_globals(_deepspeed_value_types()):
            load_path, _ = engine.load_checkpoint(str(path), tag=tag, load_optimizer_states=True,
                                                  load_lr_scheduler_states=True)
    except pickle.UnpicklingError as exc:
        raise ValueError(f"{path}/{tag}: refused to load the DeepSpeed state: it holds objects other than "
                         f"tensors and DeepSpeed's own values, and unpickling them could run code "
                         f"({refusal_reason(exc)}); resume only from checkpoints you wrote") from None
    except (RuntimeError, EOFError) as exc:
        raise ValueError(f"{path}/{tag}: the DeepSpeed state cannot be read ({str(exc).splitlines()[0]}): "
                         f"truncated or damaged; resume from another checkpoint") from None
    finally:
        torch.load = original
    if load_path is None:
        raise ValueError(f"DeepSpeed found no engine state in {path}/{tag}: resume from a complete checkpoint")
