"""Eagle3: frozen shared weights, TTT attention pattern, vocabulary map, save/load, and training-time
test agreeing with autoregressive inference."""

from __future__ import annotations

import pytest
import torch

from deepspec.drafters import DrafterSpec, build_drafter
from deepspec.drafters.eagle3 import build_vocab_map, count_tokens
from deepspec.drafters.io import load_drafter, save_drafter
from deepspec.drafters.packing import batch_sequences
from tests.unit.drafter_fixtures import target_features, tiny_target

STEPS = 3


def make(family="llama", vocab=None, seed=1):
    target, shapes = tiny_target(family)
    spec = DrafterSpec(kind="eagle3", num_layers=1, block_size=4, ttt_steps=STEPS, draft_vocab_size=vocab)
    torch.manual_seed(seed)
    drafter = build_drafter(spec, shapes)
    if vocab is not None:
        counts = torch.arange(shapes.vocab_size).remainder(7).float()  # a deterministic "frequency"
        drafter.set_vocab_map(*build_vocab_map(counts, vocab))
    drafter.attach_target(target.model.embed_tokens, target.lm_head.weight)
    return drafter, target


def seqs_for(drafter, target, lengths=(12, 9), seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for T in lengths:
        ids = torch.randint(0, drafter.shapes.vocab_size, (T,), generator=g)
        if drafter.pruned:  # keep to draft-vocabulary tokens, so any suffix can be forced at inference
            ids = drafter.draft_to_target()[ids % drafter.spec.draft_vocab_size]
        out.append(target_features(target, ids, drafter.spec.layer_ids))
    return out


def logits_of(drafter, out):
    return drafter.draft_logits(out.hidden_NKD)


def test_vocab_map_round_trip():
    counts = torch.tensor([5, 0, 9, 9, 1, 7, 0, 3])
    d2t, t2d = build_vocab_map(counts, 4)
    kept = torch.arange(4) + d2t
    assert kept.tolist() == [0, 2, 3, 5]  # the four most frequent, in id order
    assert torch.nonzero(t2d).flatten().tolist() == kept.tolist()
    assert torch.equal(torch.cumsum(t2d.long(), 0)[kept] - 1, torch.arange(4))  # target -> draft -> target
    assert count_tokens([torch.tensor([1, 1, 3])], 5).tolist() == [0, 2, 0, 1, 0]


@pytest.mark.parametrize("vocab", [None, 40])
def test_trainable_params_and_frozen_target_weights(vocab):
    drafter, target = make(vocab=vocab)
    names = set(dict(drafter.named_parameters())) | set(drafter.state_dict())
    assert not any("embed" in n or "lm_head" in n for n in names)
    batch = batch_sequences(seqs_for(drafter, target), max_len=16, ttt_steps=STEPS)
    out = drafter(batch)
    if vocab is not None:  # the draft head is the frozen slice of the target's rows at the kept ids
        ids = torch.arange(vocab) + drafter.d2t
        assert torch.equal(out.draft_to_target_v, ids) and not out.lm_head_weight_VD.requires_grad
        assert torch.equal(out.lm_head_weight_VD, target.lm_head.weight[ids])
    logits_of(drafter, out).logsumexp(-1).sum().backward()
    assert all(p.grad is not None for p in drafter.parameters())
    assert target.lm_head.weight.grad is None and target.model.embed_tokens.weight.grad is None


def test_ttt_step_j_at_row_t_sees_no_later_rows():
    drafter, target = make()
    seqs = seqs_for(drafter, target, lengths=(12,))
    batch = batch_sequences(seqs, max_len=16, ttt_steps=STEPS)
    T = batch.input_ids_BT.shape[1]
    ref = drafter(batch).hidden_NKD.view(T, STEPS, -1)
    t = 5
    for j in range(STEPS):
        b = batch_sequences(seqs, max_len=16, ttt_steps=STEPS)
        b.taps_BTMD[0, t + 1:] += 3.0  # later target features
        b.input_ids_BT[0, t + 2 + j:] = (b.input_ids_BT[0, t + 2 + j:] + 1) % 50  # tokens after x_{t+1+j}
        got = drafter(b).hidden_NKD.view(T, STEPS, -1)
        assert torch.equal(got[:t + 1, j], ref[:t + 1, j]), f"step {j} row <= {t} saw a later position"
    b = batch_sequences(seqs, max_len=16, ttt_steps=STEPS)
    b.input_ids_BT[0, t + 1 + STEPS - 1] += 1  # the input token of the last step at row t
    got = drafter(b).hidden_NKD.view(T, STEPS, -1)
    assert torch.equal(got[t, :STEPS - 1], ref[t, :STEPS - 1]) and not torch.allclose(got[t, -1], ref[t, -1])


@pytest.mark.parametrize("family", ["llama", "qwen3"])
@pytest.mark.parametrize("vocab", [None, 40])
def test_training_time_test_equals_inference_propose(family, vocab):
    drafter, target = make(family, vocab)
    seqs = seqs_for(drafter, target)
    batch = batch_sequences(seqs, max_len=16, ttt_steps=STEPS)
    T = batch.input_ids_BT.shape[1]
    train = logits_of(drafter, drafter(batch)).float().softmax(-1).view(2, T, STEPS, -1)
    for b, seq in enumerate(seqs):
        ids = seq.input_ids_T
        for t in (0, 2, 4):  # t + 1 + STEPS < 9 = the shorter length
            state = drafter.new_state(1, 32)
            cut = (t + 1) // 2  # features 0..t in two ragged chunks
            state.extend(seq.taps_TMD[None, :cut + 2], torch.tensor([cut]), ids[None, :cut + 2])
            state.extend(seq.taps_TMD[None, cut:t + 1], torch.tensor([t + 1 - cut]), ids[None, cut:t + 1])
            prop = drafter.propose(state, ids[t + 1:t + 2], torch.tensor([t + 1]),
                                   forced_tokens_BK=ids[None, t + 2:t + 2 + STEPS], num_tokens=STEPS)
            probs = prop.draft_probs_BKV[0]
            if vocab is not None:  # draft probabilities live on the kept target ids, zero elsewhere
                assert probs[:, ~drafter.t2d].abs().sum() == 0
                probs = probs[:, drafter.t2d]
            torch.testing.assert_close(probs, train[b, t], atol=1e-5, rtol=1e-4)


def test_batched_ragged_propose_and_crop():
    drafter, target = make(vocab=40)
    seqs = seqs_for(drafter, target)
    taps = torch.stack([s.taps_TMD[:9] for s in seqs])
    ids = torch.stack([s.input_ids_T[:9] for s in seqs])
    state = drafter.new_state(2, 32)
    state.extend(taps, torch.tensor([8, 5]), ids)
    both = drafter.propose(state, torch.stack([ids[0, 8], ids[1, 5]]), torch.tensor([8, 5]))
    assert set(both.tokens_BK.flatten().tolist()) <= set(drafter.draft_to_target().tolist())
    torch.testing.assert_close(both.draft_probs_BKV.sum(-1), torch.ones(2, 4))
    for b, n in ((0, 8), (1, 5)):
        single = drafter.new_state(1, 32)
        single.extend(taps[b:b + 1], torch.tensor([n]), ids[b:b + 1])
        one = drafter.propose(single, ids[b, n:n + 1], torch.tensor([n]))
        assert torch.equal(one.tokens_BK[0], both.tokens_BK[b])
    state.crop(torch.tensor([4, 5]))
    single = drafter.new_state(1, 32)
    single.extend(taps[:1], torch.tensor([4]), ids[:1])
    cropped = drafter.propose(state, torch.stack([ids[0, 4], ids[1, 5]]), torch.tensor([4, 5]))
    torch.testing.assert_close(cropped.draft_probs_BKV[0],
                               drafter.propose(single, ids[0, 4:5], torch.tensor([4])).draft_probs_BKV[0])


def test_save_load_keeps_vocab_map_and_outputs(tmp_path):
    drafter, target = make(vocab=40)
    batch = batch_sequences(seqs_for(drafter, target), max_len=16, ttt_steps=STEPS)
    save_drafter(tmp_path, drafter)
    loaded = load_drafter(tmp_path, target.model.embed_tokens, target.lm_head.weight)
    assert torch.equal(loaded.d2t, drafter.d2t) and torch.equal(loaded.t2d, drafter.t2d)
    assert not torch.equal(drafter.d2t, torch.zeros_like(drafter.d2t))  # a real map, not the placeholder
    a, b = drafter(batch), loaded(batch)
    assert torch.equal(a.hidden_NKD, b.hidden_NKD) and torch.equal(a.lm_head_weight_VD, b.lm_head_weight_VD)
