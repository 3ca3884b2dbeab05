"""DFlash / DSpark drafters: frozen shared weights, no attention leakage, heads, save/load, and the
training forward agreeing with the inference `propose` (the eval engine relies on it)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from deepspec.drafters import DrafterSpec, build_drafter, default_layer_ids
from deepspec.drafters.heads import RNNHead
from deepspec.drafters.io import load_drafter, save_drafter
from deepspec.drafters.packing import pack_blocks
from tests.unit.drafter_fixtures import target_features, tiny_target

K = 4


def make(kind, family="llama", head="markov", conf=True, seed=1, **kw):
    target, shapes = tiny_target(family)
    spec = DrafterSpec(kind=kind, num_layers=2, block_size=K, mask_token_id=shapes.vocab_size - 1, head=head,
                       markov_rank=8, confidence_head=conf, num_taps=3, **kw)
    torch.manual_seed(seed)
    drafter = build_drafter(spec, shapes)
    if getattr(drafter, "head", None) is not None:  # W2 starts at zero; make the bias visible in tests
        torch.nn.init.normal_(drafter.head.w2, std=0.5)
    drafter.attach_target(target.model.embed_tokens, target.lm_head.weight)
    return drafter, target


def batch_for(drafter, target, lengths=(14, 11), anchors=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    V = drafter.shapes.vocab_size
    seqs = []
    for T in lengths:
        ids = torch.randint(0, V - 1, (T,), generator=g)
        lm = torch.ones(T, dtype=torch.bool)
        lm[:2] = False
        seqs.append(target_features(target, ids, drafter.spec.layer_ids, lm))
    return seqs, pack_blocks(seqs, K, anchors, drafter.spec.mask_token_id, generator=g)


def full_logits(drafter, out):
    logits = drafter.target_logits(out.hidden_NKD)
    if out.lowrank_NKR is not None:
        logits = logits + out.lowrank_NKR @ out.lowrank_weight_RV
    return logits


def test_default_layer_ids():
    assert default_layer_ids("dspark", 36) == [1, 9, 17, 25, 33]
    assert default_layer_ids("eagle3", 36) == [2, 18, 33]


def test_mask_token_is_required():
    _, shapes = tiny_target("llama")
    with pytest.raises(ValueError, match="mask_token_id"):
        build_drafter(DrafterSpec(kind="dflash"), shapes)


@pytest.mark.parametrize("kind", ["dflash", "dspark"])
def test_only_trainable_params_get_grads_and_target_weights_stay_out(kind):
    drafter, target = make(kind)
    _, batch = batch_for(drafter, target)
    names = set(dict(drafter.named_parameters())) | set(drafter.state_dict())
    assert not any("embed_tokens" in n or "lm_head" in n for n in names)
    n_params = sum(p.numel() for p in drafter.parameters())
    assert target.model.embed_tokens.weight.data_ptr() not in {p.data_ptr() for p in drafter.parameters()}
    out = drafter(batch)
    loss = full_logits(drafter, out).logsumexp(-1).sum()
    if out.conf_logit_NK is not None:
        loss = loss + out.conf_logit_NK.sum()
    loss.backward()
    assert all(p.grad is not None for p in drafter.parameters()), "a trainable parameter got no gradient"
    assert target.model.embed_tokens.weight.grad is None and target.lm_head.weight.grad is None
    assert n_params == sum(p.numel() for p in drafter.parameters())


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_no_leakage_between_context_blocks_and_sequences(family):
    drafter, target = make("dspark", family)
    seqs, batch = batch_for(drafter, target, anchors=3)
    base = drafter(batch)
    ref = torch.cat([full_logits(drafter, base), base.conf_logit_NK[..., None]], -1)

    def rerun(b):
        out = drafter(b)
        return torch.cat([full_logits(drafter, out), out.conf_logit_NK[..., None]], -1)

    n = 1  # second block of sequence 0
    a = int(batch.anchor_pos_N[n])
    # 1) context at positions >= anchor_n (same sequence) changes: block n is unchanged, an earlier-context
    #    change does reach it
    b = clone(batch)
    seq0 = batch.ctx_seq_C == 0
    b.ctx_taps_CMD[seq0 & (batch.ctx_pos_C >= a)] += 5.0
    got = rerun(b)
    assert torch.equal(got[n], ref[n])
    b.ctx_taps_CMD[seq0 & (batch.ctx_pos_C == a - 1)] += 5.0
    assert not torch.allclose(rerun(b)[n], ref[n])
    # 2) another sequence's context and blocks change: sequence 0's blocks are unchanged
    b = clone(batch)
    b.ctx_taps_CMD[batch.ctx_seq_C == 1] += 3.0
    other = batch.block_seq_N == 1
    b.block_ids_NK[other, 0] = (b.block_ids_NK[other, 0] + 1) % 50
    b.prev_tokens_NK[other] = (b.prev_tokens_NK[other] + 1) % 50
    assert torch.equal(rerun(b)[~other], ref[~other])
    # 3) another block of the same sequence changes: block n is unchanged
    b = clone(batch)
    b.block_ids_NK[0, 0] = (b.block_ids_NK[0, 0] + 1) % 50
    b.prev_tokens_NK[0] = (b.prev_tokens_NK[0] + 1) % 50
    got = rerun(b)
    assert torch.equal(got[1:], ref[1:]) and not torch.allclose(got[0], ref[0])


def clone(batch):
    return dataclasses.replace(batch, **{f.name: getattr(batch, f.name).clone() for f in dataclasses.fields(batch)
                                         if isinstance(getattr(batch, f.name), torch.Tensor)})


def state_for(drafter, seq, anchor):
    """Inference state holding the context before `anchor`, fed in two ragged chunks."""
    state = drafter.new_state(batch_size=1, max_len=32)
    taps = seq.taps_TMD[None]
    first = anchor // 2
    state.extend(taps[:, :first + 3], torch.tensor([first]))  # rows past `first` are padding
    state.extend(taps[:, first:anchor], torch.tensor([anchor - first]))
    return state


@pytest.mark.parametrize("family", ["llama", "qwen3"])
@pytest.mark.parametrize("kind,head", [("dflash", "none"), ("dspark", "markov"), ("dspark", "rnn")])
def test_training_forward_equals_inference_propose(family, kind, head):
    drafter, target = make(kind, family, head=head)
    seqs, batch = batch_for(drafter, target, anchors=3)
    out = drafter(batch)
    train_probs = full_logits(drafter, out).float().softmax(-1)
    for n in range(batch.num_blocks):
        s = int(batch.block_seq_N[n])
        a = int(batch.anchor_pos_N[n])
        state = state_for(drafter, seqs[s], a)
        prop = drafter.propose(state, batch.block_ids_NK[n, :1], torch.tensor([a]), greedy=True,
                               forced_tokens_BK=batch.labels_NK[n:n + 1])
        torch.testing.assert_close(prop.draft_probs_BKV[0], train_probs[n], atol=1e-5, rtol=1e-4)
        if out.conf_logit_NK is not None:
            torch.testing.assert_close(prop.conf_BK[0], torch.sigmoid(out.conf_logit_NK[n]), atol=1e-5, rtol=1e-4)


def test_propose_batched_ragged_requests_match_single_requests():
    drafter, target = make("dspark")
    seqs, _ = batch_for(drafter, target)
    anchors = [9, 6]
    state = drafter.new_state(batch_size=2, max_len=32)
    taps = torch.stack([seqs[0].taps_TMD[:10], seqs[1].taps_TMD[:10]])
    state.extend(taps, torch.tensor(anchors))
    state.extend(taps, torch.tensor([0, 0]))  # no-op
    anchor_tok = torch.tensor([int(seqs[0].input_ids_T[9]), int(seqs[1].input_ids_T[6])])
    both = drafter.propose(state, anchor_tok, torch.tensor(anchors), greedy=True)
    for b in range(2):
        single = drafter.propose(state_for(drafter, seqs[b], anchors[b]), anchor_tok[b:b + 1],
                                 torch.tensor([anchors[b]]), greedy=True)
        assert torch.equal(single.tokens_BK[0], both.tokens_BK[b])
        torch.testing.assert_close(single.draft_probs_BKV[0], both.draft_probs_BKV[b], atol=1e-6, rtol=1e-5)
    # crop back to a shorter context = a state that only ever saw that context
    state.crop(torch.tensor([5, 6]))
    cropped = drafter.propose(state, anchor_tok, torch.tensor([5, 6]), greedy=True)
    fresh = drafter.propose(state_for(drafter, seqs[0], 5), anchor_tok[:1], torch.tensor([5]), greedy=True)
    torch.testing.assert_close(cropped.draft_probs_BKV[0], fresh.draft_probs_BKV[0], atol=1e-6, rtol=1e-5)


def test_sampling_draws_left_to_right_from_returned_probs():
    drafter, target = make("dspark")
    seqs, _ = batch_for(drafter, target)
    state = state_for(drafter, seqs[0], 8)
    anchor = seqs[0].input_ids_T[8:9]
    p1 = drafter.propose(state, anchor, torch.tensor([8]), greedy=False, temperature=0.7,
                         generator=torch.Generator().manual_seed(5))
    p2 = drafter.propose(state, anchor, torch.tensor([8]), greedy=False, temperature=0.7,
                         generator=torch.Generator().manual_seed(5))
    assert torch.equal(p1.tokens_BK, p2.tokens_BK)
    # the distributions are those of the sampled prefix: re-scoring the drawn tokens reproduces them
    forced = drafter.propose(state, anchor, torch.tensor([8]), greedy=False, temperature=0.7,
                             forced_tokens_BK=p1.tokens_BK)
    torch.testing.assert_close(forced.draft_probs_BKV, p1.draft_probs_BKV)
    assert p1.draft_probs_BKV.dtype == torch.float32
    torch.testing.assert_close(p1.draft_probs_BKV.sum(-1), torch.ones(1, K))


def test_rnn_head_follows_the_equations():
    torch.manual_seed(0)
    V, r, D, N = 20, 6, 5, 3
    head = RNNHead(V, r, D)
    prev = torch.randint(0, V, (N, K))
    hidden = torch.randn(N, K, D)
    got = head(prev, hidden)
    A, bias, W1 = head.gates.weight, head.gates.bias, head.w1.weight
    for n in range(N):
        s = torch.zeros(r)
        for k in range(K):
            z = torch.cat([s, W1[prev[n, k]], hidden[n, k]])
            y = A @ z + bias
            g, c, o = y[:r], y[r:2 * r], y[2 * r:]
            s = torch.sigmoid(g) * s + (1 - torch.sigmoid(g)) * torch.tanh(c)
            torch.testing.assert_close(got[n, k], torch.tanh(o))


def test_markov_head_starts_as_a_no_op():
    _, shapes = tiny_target("llama")
    d = build_drafter(DrafterSpec(kind="dspark", mask_token_id=shapes.vocab_size - 1, num_taps=3), shapes)
    assert d.head.w2.abs().sum() == 0


@pytest.mark.parametrize("kind,head", [("dflash", "none"), ("dspark", "rnn")])
def test_save_load_gives_identical_outputs(tmp_path, kind, head):
    drafter, target = make(kind, head=head)
    _, batch = batch_for(drafter, target)
    save_drafter(tmp_path, drafter)
    loaded = load_drafter(tmp_path, target.model.embed_tokens, target.lm_head.weight)
    assert loaded.spec == drafter.spec
    a, b = drafter(batch), loaded(batch)
    assert torch.equal(a.hidden_NKD, b.hidden_NKD)
    if a.lowrank_NKR is not None:
        assert torch.equal(a.lowrank_NKR, b.lowrank_NKR) and torch.equal(a.conf_logit_NK, b.conf_logit_NK)


def test_batch_without_anchors_gives_empty_outputs():
    drafter, target = make("dspark")
    ids = torch.arange(6)
    seq = target_features(target, ids, drafter.spec.layer_ids, torch.zeros(6, dtype=torch.bool))
    out = drafter(pack_blocks([seq], K, 4, drafter.spec.mask_token_id))
    assert out.hidden_NKD.shape == (0, K, drafter.shapes.hidden_size) and out.conf_logit_NK.shape == (0, K)


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
@pytest.mark.parametrize("window", [None, 5])
def test_flex_and_sdpa_block_attention_agree(window):
    """The block-sparse flex_attention path (used on CUDA) computes the same blocks as per-sequence SDPA."""
    drafter, target = make("dspark", "qwen3", sliding_window=window)
    seqs, batch = batch_for(drafter, target, lengths=(14, 3, 11), anchors=3)  # seq 1: anchor 0 or none
    outs = {}
    for impl in ("sdpa", "flex"):
        drafter.spec.attention = impl
        with torch.no_grad():  # flex_attention has no CPU backward; CUDA training uses the compiled kernel
            out = drafter(batch)
        outs[impl] = torch.cat([full_logits(drafter, out), out.conf_logit_NK[..., None]], -1)
    torch.testing.assert_close(outs["flex"], outs["sdpa"], atol=1e-5, rtol=1e-4)
