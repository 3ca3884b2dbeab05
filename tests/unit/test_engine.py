"""Speculative-decoding engine: greedy losslessness (every drafter kind, batched, EOS, threshold,
scheduler), KV rollback exactness, and the sampled output distribution equal to the target's."""

from __future__ import annotations

import pytest
import torch

from deepspec.decoding.engine import generate_speculative, generate_target_only
from deepspec.decoding.sampling import SamplingParams, target_probs
from deepspec.decoding.target_runner import TargetSession
from deepspec.drafters import DrafterSpec, Proposal, build_drafter

GREEDY = SamplingParams()


def make_drafter(target, kind: str, K: int = 4, seed: int = 0, backbone: str = "llama"):
    V = target.vocab_size
    spec = DrafterSpec(kind=kind, num_layers=1 if kind in ("eagle3",) or backbone == "v4" else 2, block_size=K,
                       mask_token_id=V - 1, markov_rank=8, num_taps=3, backbone=backbone)
    torch.manual_seed(seed)
    drafter = build_drafter(spec, target.shapes)
    drafter.attach_target(target.embed_tokens, target.lm_head_weight)
    return drafter.eval()


def random_prompts(V: int, lengths, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, V - 1, (n,), generator=g).tolist() for n in lengths]


class OracleState:
    """Test drafter state: the committed tokens of each request (what extend() was fed)."""

    def __init__(self, batch_size: int):
        self.tokens = [[] for _ in range(batch_size)]

    def extend(self, taps_BTMD, lengths_B, tokens_BT=None):
        for b, n in enumerate(lengths_B.tolist()):
            self.tokens[b].extend(tokens_BT[b, :n].tolist())


class OracleDrafter:
    """Proposes the target's own greedy continuation with some positions corrupted at random.

    Acceptance lengths then cover 0..K and differ across the batch every round: the paths a
    random untrained drafter (which is almost always rejected at once) never reaches.
    """

    def __init__(self, target, K: int = 4, corrupt: float = 0.3, seed: int = 0):
        self.target, self.corrupt = target, corrupt
        self.spec = DrafterSpec(kind="dflash", block_size=K, mask_token_id=0, layer_ids=[1])
        self.g = torch.Generator().manual_seed(seed)
        self.confidence = None

    def new_state(self, batch_size, max_len, device=None):
        return OracleState(batch_size)

    @torch.no_grad()
    def propose(self, state, anchor_tokens_B, anchor_pos_B, greedy=True, temperature=1.0, generator=None):
        K, V = self.spec.block_size, self.target.vocab_size
        rows = []
        for b, anchor in enumerate(anchor_tokens_B.tolist()):
            seq = state.tokens[b][:int(anchor_pos_B[b])] + [anchor]
            for _ in range(K):
                logits = self.target.model(torch.tensor([seq])).logits[0, -1]
                seq.append(int(logits.argmax()))
            rows.append(seq[-K:])
        tokens = torch.tensor(rows)
        bad = torch.rand(tokens.shape, generator=self.g) < self.corrupt
        tokens = torch.where(bad, torch.randint(0, V, tokens.shape, generator=self.g), tokens)
        probs = torch.nn.functional.one_hot(tokens, V).float()
        return Proposal(tokens_BK=tokens, draft_probs_BKV=probs, conf_BK=None)


@pytest.mark.parametrize("family,kind", [("llama", "dspark"), ("qwen3", "dspark"), ("qwen3", "dflash"),
                                         ("llama", "eagle3")])
def test_greedy_speculative_output_equals_target_only(tiny_target, family, kind):
    target = tiny_target(family)
    prompts = random_prompts(target.vocab_size, (5, 9, 7))
    base = generate_target_only(target, prompts, 12, GREEDY, [])
    for batch in ([prompts[0]], prompts):  # batch 1 and a ragged batch of 3
        spec = generate_speculative(target, make_drafter(target, kind), batch, 12, GREEDY, [])
        assert spec.tokens == base.tokens[:len(batch)]
        assert all(len(t) == 12 for t in spec.tokens)
        assert len(spec.rounds) > 0


def test_partial_acceptance_batched_rollback_stays_lossless(tiny_target):
    """Acceptance lengths 0..K that differ across requests, holes in the shared KV cache, compaction."""
    target = tiny_target("llama")
    prompts = random_prompts(target.vocab_size, (4, 11, 6, 8), seed=3)
    base = generate_target_only(target, prompts, 24, GREEDY, [])
    drafter = OracleDrafter(target, K=4, corrupt=0.25)
    spec = generate_speculative(target, drafter, prompts, 24, GREEDY, [])
    assert spec.tokens == base.tokens
    accepted = set(spec.rounds.accepted)
    assert {0, 4} <= accepted and len(accepted) >= 3, accepted  # full, none and partial acceptance happened
    tau = sum(a + 1 for a in spec.rounds.accepted) / len(spec.rounds)
    assert tau > 2.0
    assert spec.timings.steps < 24  # fewer target passes than tokens: it really speculated


def test_eos_stops_both_decoders_at_the_same_token(tiny_target):
    target = tiny_target("llama")
    prompts = random_prompts(target.vocab_size, (6, 5))
    free = generate_target_only(target, prompts, 16, GREEDY, [])
    eos = free.tokens[0][5]  # a token the target really emits mid-answer
    base = generate_target_only(target, prompts, 16, GREEDY, [eos])
    spec = generate_speculative(target, OracleDrafter(target, K=4, corrupt=0.2), prompts, 16, GREEDY, [eos])
    assert spec.tokens == base.tokens
    assert base.tokens[0][-1] == eos and len(base.tokens[0]) <= 6


def test_kv_rollback_matches_a_fresh_forward_over_the_committed_sequence(tiny_target):
    """After rejections (different per request) the next pass scores exactly the committed sequence."""
    target = tiny_target("qwen3")
    V = target.vocab_size
    prompts = random_prompts(V, (5, 8, 3), seed=1)
    session = TargetSession(target, compact_fraction=0.0)  # compact as soon as holes appear
    session.prefill(prompts)
    committed = [list(p) for p in prompts]
    g = torch.Generator().manual_seed(0)
    for keep in ([1, 4, 0], [5, 2, 3], [0, 0, 5]):
        block = torch.randint(0, V, (3, 5), generator=g)
        session.step(block)
        session.commit(torch.tensor(keep))
        for b, n in enumerate(keep):
            committed[b].extend(block[b, :n].tolist())
    probe = torch.randint(0, V, (3, 3), generator=g)
    logits = target.logits(session.step(probe).final_BTD)
    for b in range(3):
        seq = torch.tensor([committed[b] + probe[b].tolist()])
        fresh = target.logits(target.model.get_decoder()(input_ids=seq).last_hidden_state)[0, -3:]
        torch.testing.assert_close(logits[b], fresh, atol=1e-4, rtol=1e-4)


def test_confidence_threshold_and_scheduler_stay_lossless(tiny_target, tmp_path):
    from deepspec.decoding.scheduler import SPSTable
    from deepspec.eval.setup import make_budget_fn

    target = tiny_target("llama")
    prompts = random_prompts(target.vocab_size, (6, 9))
    drafter = make_drafter(target, "dspark")
    base = generate_target_only(target, prompts, 10, GREEDY, [])
    thr = generate_speculative(target, drafter, prompts, 10, GREEDY, [], confidence_threshold=0.5)
    assert thr.tokens == base.tokens
    table = SPSTable.synthetic(step_latency_s=0.01, peak_tokens_per_s=400.0)
    table.save_json(tmp_path / "sps.json")
    for name in ("algorithm1", "topk"):
        budget = make_budget_fn(name, str(tmp_path / "sps.json"))
        spec = generate_speculative(target, drafter, prompts, 10, GREEDY, [], budget_fn=budget)
        assert spec.tokens == base.tokens, name
        assert min(spec.rounds.proposed) < 4, f"{name} never cut a proposal: the test would not see it act"


def chi_square_p(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """p-value of Pearson's chi-square; bins with expected count < 5 are pooled."""
    n = counts.sum()
    expected = probs.double() * n
    small = expected < 5
    obs = torch.cat([counts[~small].double(), counts[small].double().sum()[None]])
    exp = torch.cat([expected[~small], expected[small].sum()[None]])
    keep = exp > 0
    stat = float((((obs - exp) ** 2)[keep] / exp[keep]).sum())
    dof = int(keep.sum()) - 1
    return float(torch.special.gammaincc(torch.tensor(dof / 2.0), torch.tensor(stat / 2.0)))


@pytest.mark.parametrize("params", [SamplingParams(temperature=1.0), SamplingParams(0.8, top_p=0.9, top_k=12)])
def test_sampled_first_token_follows_the_target_distribution(tiny_target, params):
    """3000 independent requests, one speculative round each: tokens ~ p_t (chi-square), not ~ p_d."""
    target = tiny_target("llama", vocab_size=32, initializer_range=0.2)  # peaked p_t, p_d far from it
    drafter = make_drafter(target, "dflash", K=3, seed=2)
    prompt = random_prompts(32, (6,), seed=5)[0]
    N = 3000
    gen = generate_speculative(target, drafter, [prompt] * N, 1, params, [], generator=torch.Generator().manual_seed(0))
    counts = torch.bincount(torch.tensor([t[0] for t in gen.tokens]), minlength=32)
    with torch.no_grad():
        last = target.model.get_decoder()(input_ids=torch.tensor([prompt])).last_hidden_state[0, -1]
    p_t = target_probs(target.logits(last), params)
    assert chi_square_p(counts, p_t) > 1e-3
    # power: the first drafts were often rejected, and the test tells p_d from p_t
    accept_rate = sum(gen.rounds.accepted) / sum(gen.rounds.proposed)
    assert accept_rate < 0.9
    state = drafter.new_state(1, 16)
    out = TargetSession(target, drafter.spec.layer_ids).prefill([prompt[:-1]])
    state.extend(out.taps_BTMD, torch.tensor([5]), tokens_BT=torch.tensor([prompt[:-1]]))
    p_d = drafter.propose(state, torch.tensor([prompt[-1]]), torch.tensor([5]), greedy=False,
                          temperature=params.temperature).draft_probs_BKV[0, 0]
    assert 0.5 * float((p_d - p_t).abs().sum()) > 0.3
    assert chi_square_p(counts, p_d) < 1e-6


def test_sampled_first_token_with_the_scheduler_in_the_loop_follows_the_target(tiny_target, tmp_path):
    """Algorithm 1 picks per-request budgets from the confidences; the output law must not move."""
    from deepspec.decoding.scheduler import SPSTable
    from deepspec.eval.setup import make_budget_fn

    target = tiny_target("llama", vocab_size=32, initializer_range=0.2)
    drafter = make_drafter(target, "dspark", K=3, seed=2)
    # flat SPS up to 4500 batch tokens, then a cliff: of 3000 requests about half get a draft verified
    SPSTable((1, 4500, 9000), (100.0, 100.0, 1.0)).save_json(tmp_path / "sps.json")
    prompt = random_prompts(32, (6,), seed=5)[0]
    params = SamplingParams(temperature=1.0)
    gen = generate_speculative(target, drafter, [prompt] * 3000, 1, params, [],
                               budget_fn=make_budget_fn("algorithm1", str(tmp_path / "sps.json")),
                               generator=torch.Generator().manual_seed(1))
    budgets = torch.tensor(gen.rounds.proposed)
    assert int(budgets.min()) < int(budgets.max()), "the scheduler did not vary the budget"
    counts = torch.bincount(torch.tensor([t[0] for t in gen.tokens]), minlength=32)
    with torch.no_grad():
        last = target.model.get_decoder()(input_ids=torch.tensor([prompt])).last_hidden_state[0, -1]
    assert chi_square_p(counts, target_probs(target.logits(last), params)) > 1e-3


def test_target_probs_top_k_top_p():
    logits = torch.log(torch.tensor([[0.5, 0.2, 0.15, 0.1, 0.05]]))
    torch.testing.assert_close(target_probs(logits, SamplingParams(1.0, top_k=2)),
                               torch.tensor([[5 / 7, 2 / 7, 0.0, 0.0, 0.0]]))
    # top_p=0.8: 0.5 + 0.2 < 0.8, so 0.15 (which crosses 0.8) is kept, the rest dropped
    torch.testing.assert_close(target_probs(logits, SamplingParams(1.0, top_p=0.8)),
                               torch.tensor([[0.5, 0.2, 0.15, 0.0, 0.0]]) / 0.85)
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(1.0, top_p=0.0)


def test_block_size_beyond_the_drafter_is_refused(tiny_target):
    target = tiny_target("llama")
    with pytest.raises(ValueError, match="block size"):
        generate_speculative(target, make_drafter(target, "dflash"), [[1, 2, 3]], 4, GREEDY, [], block_size=9)


def test_threshold_without_a_confidence_head_is_refused(tiny_target):
    target = tiny_target("llama")
    with pytest.raises(ValueError, match="no confidence head"):
        generate_speculative(target, make_drafter(target, "dflash"), [[1, 2, 3]], 4, GREEDY, [],
                             confidence_threshold=0.5)


def test_deepseek_v4_compressed_cache_rolls_back_by_snapshot_and_replay(tiny_target):
    """V4's sliding-window + compressed caches cannot be cropped: rollback replays the kept tokens."""
    target = tiny_target("deepseek_v4")  # sliding_window=8: 20 tokens run far past it
    prompts = random_prompts(target.vocab_size, (6,))
    base = generate_target_only(target, prompts, 20, GREEDY, [])
    spec = generate_speculative(target, OracleDrafter(target, K=4, corrupt=0.3), prompts, 20, GREEDY, [])
    assert spec.tokens == base.tokens
    assert len(set(spec.rounds.accepted)) >= 3
    v4_drafter = make_drafter(target, "dspark", backbone="v4")  # MoE + mHC draft layers (docs/deepseek_v4.md)
    assert generate_speculative(target, v4_drafter, prompts, 20, GREEDY, []).tokens == base.tokens
    with pytest.raises(ValueError, match="batch_size=1"):
        generate_speculative(target, make_drafter(target, "dflash"), prompts * 2, 4, GREEDY, [])
