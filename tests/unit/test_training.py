"""Trainer pieces that need no engine: schedules, data sharding, batch arithmetic, DeepSpeed JSON.

Protects: the shapes of the three LR schedules; that ranks split every optimizer step's
sequences without overlap or loss and that the split (and its anchors) does not depend on
the number of ranks; clear errors for indivisible global batches; the ZeRO JSON fields
DeepSpeed needs on CPU (torch AdamW, fp32) and GPU (bf16).
"""

from __future__ import annotations

import pytest

from deepspec.training.checkpoint import fingerprint_diff
from deepspec.training.data import eval_plan, plan_step, stream
from deepspec.training.distributed import deepspeed_json, grad_accum_steps
from deepspec.training.logging import wandb_mode
from deepspec.training.schedule import lr_multiplier


def test_cosine_warms_up_then_decays_to_the_floor():
    lrs = [lr_multiplier(s, 100, "cosine", warmup_ratio=0.1, min_lr_ratio=0.1) for s in range(100)]
    assert lrs[0] == pytest.approx(1 / 11) and lrs[9] == pytest.approx(10 / 11)
    assert all(a < b for a, b in zip(lrs[:10], lrs[1:11]))  # linear warmup
    assert lrs[10] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))  # monotone decay
    assert lrs[-1] == pytest.approx(0.1)
    assert lrs[55] == pytest.approx(0.1 + 0.9 * 0.5, abs=0.02)  # half way: midpoint of the cosine


def test_wsd_is_flat_then_decays_linearly_in_the_last_fraction():
    lrs = [lr_multiplier(s, 100, "wsd", warmup_ratio=0.05, decay_ratio=0.2, min_lr_ratio=0.0) for s in range(100)]
    assert lrs[4] < 1.0 and all(x == 1.0 for x in lrs[5:80])
    decay = lrs[80:]
    assert all(a > b for a, b in zip(decay, decay[1:])) and decay[-1] == pytest.approx(0.0)
    assert decay[9] == pytest.approx(0.5)


def test_constant_and_bad_schedule():
    assert [lr_multiplier(s, 10, "constant", warmup_ratio=0.0) for s in range(10)] == [1.0] * 10
    with pytest.raises(ValueError, match="trainer.schedule='linear'"):
        lr_multiplier(0, 10, "linear")


@pytest.mark.parametrize("world", [1, 2, 4])
def test_ranks_split_each_step_without_overlap_and_independently_of_world_size(world):
    n, G, mb = 20, 8, 2
    for step in range(6):  # 48 sequences: crosses two epoch boundaries
        one = plan_step(n, G, mb, 1, 0, seed=3, global_step=step)[1]
        parts = [plan_step(n, G, mb, world, r, seed=3, global_step=step)[1] for r in range(world)]
        assert all(len(p) == G // mb // world for p in parts)  # equal grad-accum steps per rank
        dealt = sorted((tuple(m.indices), m.seed) for p in parts for m in p)
        assert dealt == sorted((tuple(m.indices), m.seed) for m in one)  # same groups, same anchor seeds
    assert sorted(stream(n, 3, 0, n)) == list(range(n))  # an epoch is a permutation
    assert stream(n, 3, 0, n) != stream(n, 3, n, n)  # reshuffled per epoch
    assert plan_step(n, G, mb, 1, 0, 3, 5)[0] == 2  # step 5 reads positions 40..47: epoch 2


def test_eval_plan_is_the_same_blocks_on_any_world_size():
    one = eval_plan(16, 16, 4, 1, 0, seed=0)
    two = [m for r in range(2) for m in eval_plan(16, 16, 4, 2, r, seed=0)]
    assert sorted((tuple(m.indices), m.seed) for m in one) == sorted((tuple(m.indices), m.seed) for m in two)
    assert len(eval_plan(3, 16, 4, 2, 0, 0)) == len(eval_plan(3, 16, 4, 2, 1, 0)) == 1  # equal work per rank
    with pytest.raises(ValueError, match="at least 2 sequences"):
        eval_plan(1, 16, 4, 2, 0, 0)


def test_global_batch_must_divide():
    assert grad_accum_steps(512, 8, 8) == 8
    assert grad_accum_steps(8, 4, 2) == 1
    with pytest.raises(ValueError, match=r"global_batch=10 .*micro_batch=4 x world_size=2 = 8; use .* \[8, 16, 24\]"):
        grad_accum_steps(10, 4, 2)


def test_deepspeed_json_for_cpu_and_gpu():
    from deepspec.config import DeepSpeedConfig, TrainerConfig

    tr = TrainerConfig(micro_batch=4, lr=1e-3, betas=[0.9, 0.95], weight_decay=0.0, grad_clip=1.0)
    extra = {"zero_optimization": {"contiguous_gradients": True}}
    cpu = deepspeed_json(DeepSpeedConfig(zero_stage=2, extra=extra), tr, grad_accum=2, world_size=1,
                         bf16=False)
    assert cpu["train_batch_size"] == 8 and cpu["gradient_accumulation_steps"] == 2
    assert cpu["optimizer"]["params"]["torch_adam"] is True and cpu["optimizer"]["type"] == "AdamW"
    assert cpu["bf16"]["enabled"] is False and cpu["gradient_clipping"] == 1.0
    assert cpu["zero_optimization"] == {"stage": 2, "overlap_comm": False, "reduce_bucket_size": 50_000_000,
                                        "contiguous_gradients": True}
    gpu = deepspeed_json(DeepSpeedConfig(zero_stage=3, offload_param=True), TrainerConfig(micro_batch=8), 8,
                         8, bf16=True)
    assert gpu["train_batch_size"] == 512 and gpu["optimizer"]["params"]["lr"] == TrainerConfig.lr
    assert gpu["bf16"]["enabled"] and gpu["zero_optimization"]["offload_param"] == {"device": "cpu"}
    with pytest.raises(ValueError, match="zero_stage=3"):
        deepspeed_json(DeepSpeedConfig(zero_stage=2, offload_param=True), tr, 1, 1, False)
    with pytest.raises(ValueError, match="zero_stage=4"):
        deepspeed_json(DeepSpeedConfig(zero_stage=4), tr, 1, 1, False)


def test_fingerprint_diff_names_keys_and_wandb_modes(monkeypatch):
    assert fingerprint_diff({"a": 1, "b": [1, 2]}, {"a": 1, "b": [1, 3], "c": 0}) == ["b: [1, 2] -> [1, 3]",
                                                                                     "c: None -> 0"]
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    assert wandb_mode("auto") == "offline" and wandb_mode("off") is None and wandb_mode("False") is None
    monkeypatch.setenv("WANDB_API_KEY", "x")
    assert wandb_mode("auto") == "online"
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert wandb_mode("online") is None


def test_activation_checkpointing_keeps_loss_and_gradients(tiny_target):
    import copy

    import torch

    from deepspec.drafters import DrafterSpec, build_drafter
    from deepspec.training.loop import DraftLoss, loss_weights, make_batch
    from deepspec.training.synthetic import TargetGeneratedSource
    from deepspec.training.train import apply_activation_checkpointing

    target = tiny_target("llama")
    torch.manual_seed(0)
    spec = DrafterSpec(kind="dspark", num_layers=2, markov_rank=8, mask_token_id=255, anchors_per_seq=6)
    drafter = build_drafter(spec, target.shapes)
    twin = copy.deepcopy(drafter)
    apply_activation_checkpointing(twin)
    seqs = TargetGeneratedSource(target, drafter.spec.layer_ids, 3, answer_len=10).get_batch([0, 1, 2])
    batch = make_batch(seqs, drafter.spec, seed=0, device=torch.device("cpu"), dtype=torch.float32)
    grads, saved = [], []
    for d in (drafter, twin):
        d.attach_target(target.embed_tokens, target.lm_head_weight)
        count = [0]

        def pack(t, count=count):
            count[0] += 1
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = DraftLoss(d, target.lm_head_weight, loss_weights(d.spec, None), 0.1, 0.9, 1.0, 100)(batch)[0]
        loss.backward()
        saved.append(count[0])
        grads.append((loss.detach(), [p.grad.clone() for p in d.parameters() if p.grad is not None]))
    assert saved[1] < saved[0] / 2, saved  # the layers' activations are recomputed, not stored
    torch.testing.assert_close(grads[0][0], grads[1][0])
    assert len(grads[0][1]) == len(grads[1][1]) > 0
    for a, b in zip(grads[0][1], grads[1][1]):
        torch.testing.assert_close(a, b)
