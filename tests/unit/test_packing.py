"""Anchor sampling and block packing: labels, contiguous supervised prefix, target-hidden alignment."""

from __future__ import annotations

import torch

from deepspec.drafters.packing import (
    SequenceFeatures,
    batch_sequences,
    block_attention_masks,
    pack_blocks,
    sample_anchors,
)

K, MASK = 4, 99


def seq(ids, mask, m=2, d=3):
    """Hand-made sequence whose features encode the position: taps[t] = t, final[t] = 100 + t."""
    T = len(ids)
    pos = torch.arange(T, dtype=torch.float32)
    return SequenceFeatures(torch.tensor(ids), torch.tensor(mask, dtype=torch.bool),
                            pos[:, None, None].expand(T, m, d).clone(), (100 + pos)[:, None].expand(T, d).clone())


def test_anchors_need_both_positions_in_loss_mask():
    lm = torch.tensor([0, 1, 1, 0, 1, 1, 1, 0, 1], dtype=torch.bool)
    assert sample_anchors(lm, 100).tolist() == [1, 4, 5]


def test_anchor_sampling_is_deterministic_and_without_replacement():
    lm = torch.ones(50, dtype=torch.bool)
    a = sample_anchors(lm, 10, torch.Generator().manual_seed(3))
    b = sample_anchors(lm, 10, torch.Generator().manual_seed(3))
    assert a.tolist() == b.tolist() and len(set(a.tolist())) == 10 and a.tolist() == sorted(a.tolist())
    assert a.max() < 49


def test_labels_prefix_and_target_hidden_alignment():
    # positions: 0  1  2  3  4  5  6  7
    ids = [10, 11, 12, 13, 14, 15, 16, 17]
    lm = [0, 1, 1, 1, 0, 1, 1, 1]  # position 4 (a user token) breaks supervision
    b = pack_blocks([seq(ids, lm)], K, anchors_per_seq=100, mask_token_id=MASK)
    assert b.anchor_pos_N.tolist() == [1, 2, 5, 6]
    assert b.block_ids_NK.tolist()[0] == [11, MASK, MASK, MASK]
    assert b.block_pos_NK.tolist()[2] == [5, 6, 7, 8]
    assert b.labels_NK.tolist() == [[12, 13, 14, 15], [13, 14, 15, 16], [16, 17, 0, 0], [17, 0, 0, 0]]
    # anchor 1: labels at 2,3 valid, 4 outside the mask -> 5 is not supervised either (contiguous prefix)
    assert b.valid_NK.tolist() == [[1, 1, 0, 0], [1, 0, 0, 0], [1, 1, 0, 0], [1, 0, 0, 0]]
    # slot k predicts x_{anchor+k+1} from the target's final hidden at anchor+k
    assert b.target_hidden_NKD[0, :, 0].tolist() == [101, 102, 103, 104]
    assert b.target_hidden_NKD[2, :2, 0].tolist() == [105, 106]
    assert b.target_hidden_NKD[2, 2:].abs().sum() == 0  # past the sequence end
    assert b.prev_tokens_NK.tolist()[0] == [11, 12, 13, 14]
    # only context before the last anchor is kept
    assert b.ctx_counts == [6] and b.ctx_pos_C.tolist() == list(range(6))
    assert b.ctx_taps_CMD[:, 0, 0].tolist() == list(range(6))


def test_packing_many_sequences_and_masks():
    s0 = seq([1, 2, 3, 4, 5, 6], [1] * 6)
    s1 = seq([7, 8, 9], [0, 0, 0])  # no anchors at all
    s2 = seq([20, 21, 22, 23], [0, 0, 1, 1])
    b = pack_blocks([s0, s1, s2], K, anchors_per_seq=2, mask_token_id=MASK, generator=torch.Generator().manual_seed(0))
    assert b.block_counts == [2, 0, 1] and b.num_blocks == 3
    assert b.block_seq_N.tolist()[-1] == 2 and b.anchor_pos_N.tolist()[-1] == 2
    assert b.ctx_seq_C.tolist() == [0] * b.ctx_counts[0] + [2, 2]
    masks = block_attention_masks(b)
    assert masks[1] is None
    m2 = masks[2]  # one block of seq 2: anchor 2 sees ctx 0,1 and its own 4 slots
    assert m2.shape == (K, 2 + K) and bool(m2.all())
    m0 = masks[0]
    a0, a1 = b.anchor_pos_N[:2].tolist()
    C = b.ctx_counts[0]
    assert m0[:K, :C].sum(1).tolist() == [a0] * K and m0[K:, :C].sum(1).tolist() == [a1] * K
    assert not m0[:K, C + K:].any() and m0[:K, C:C + K].all()  # never another block; own block bidirectional


def test_sliding_window_limits_context():
    b = pack_blocks([seq(list(range(12)), [1] * 12)], K, anchors_per_seq=100, mask_token_id=MASK)
    n = b.anchor_pos_N.tolist().index(10)
    mask = block_attention_masks(b, sliding_window=3)[0]
    row = mask[n * K + 1, :b.ctx_counts[0]]  # query at position 11 sees ctx 9 only (11 - c < 3, c < 10)
    assert torch.nonzero(row).flatten().tolist() == [9]


def test_eagle3_batch_alignment():
    s0 = seq([10, 11, 12, 13, 14], [0, 1, 1, 1, 1])
    s1 = seq([20, 21, 22], [1, 1, 1])
    b = batch_sequences([s0, s1], max_len=4, ttt_steps=2)
    assert b.lengths_B.tolist() == [4, 3] and b.input_ids_BT.shape == (2, 4)
    # row (b=0, t=0): step 0 label x2 from final[1]; step 1 label x3 from final[2]
    assert b.labels_NK[0].tolist() == [12, 13] and b.target_hidden_NKD[0, :, 0].tolist() == [101, 102]
    # t=2 of the truncated s0: labels at 4, 5 are past max_len
    assert b.valid_NK[2].tolist() == [False, False]
    assert b.valid_NK[4].tolist() == [True, False]  # s1, t=0: x2 valid, x3 past the end
