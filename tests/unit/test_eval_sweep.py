"""The pieces of the concurrency sweep: per-request latency from the engine, percentiles, the sampling
distribution check, measured peak memory, the drafter's bytes, the sweep's batch-size setting, the
shipped instruction set and the concurrency plot."""

from __future__ import annotations

import json
import mmap
import time

import pytest
import torch

from deepspec.decoding.engine import generate_speculative, generate_target_only
from deepspec.decoding.sampling import SamplingParams
from deepspec.eval.metrics import distribution_check, latency_metrics


def test_latency_metrics_percentiles_and_rates():
    out = latency_metrics([1.0, 2.0, 3.0, 4.0], [[0] * 10, [0] * 10, [0] * 30, [0] * 40], total_s=5.0)
    assert out["latency_p50_ms"] == pytest.approx(2500.0)
    assert out["latency_p95_ms"] == pytest.approx(3850.0)  # linear interpolation between 3 s and 4 s
    assert out["tok_s_total"] == pytest.approx(90 / 5.0)
    assert out["tok_s_per_request"] == pytest.approx((10 + 5 + 10 + 10) / 4)
    assert out["ms_per_token_p50"] == pytest.approx(100.0)  # per token: 100, 200, 100, 100 ms
    prefixed = latency_metrics([1.0], [[0]], total_s=1.0, prefix="target_")
    assert set(prefixed) == {f"target_{k}" for k in out}


def test_distribution_check_separates_same_from_different_distributions():
    g = torch.Generator().manual_seed(0)
    p = torch.softmax(torch.randn(40, generator=g), 0)
    q = torch.softmax(torch.randn(40, generator=g) * 2, 0)

    def draw(probs, n):
        return [torch.multinomial(probs, n, replacement=True, generator=g).tolist()]

    same = distribution_check(draw(p, 4000), draw(p, 4000))
    other = distribution_check(draw(p, 4000), draw(q, 4000))
    assert same["p_value"] > 0.01 and other["p_value"] < 1e-6
    assert other["tv_distance"] > same["tv_distance"]
    assert distribution_check([[]], [[1, 2]])["p_value"] is None


def test_peak_memory_sees_a_large_allocation_on_cpu():
    from deepspec.eval.memory import PeakMemory, rss_bytes

    if rss_bytes() is None:
        pytest.skip("no /proc/self/statm on this system")
    with PeakMemory("cpu") as idle:
        pass
    with PeakMemory("cpu") as busy:
        # 256 MB of fresh anonymous pages, every one touched: a tensor of that size may be served from
        # memory an earlier test freed but the allocator kept resident (seen in a full CI run), and
        # then the RSS never moves; held for a few sampling intervals so the sampler sees it
        buf = mmap.mmap(-1, 256 * 2**20)
        for offset in range(0, len(buf), mmap.PAGESIZE):
            buf[offset] = 1
        time.sleep(0.05)
        buf.close()
    assert busy.peak_mb - idle.peak_mb > 200
    assert busy.what == "process RSS"


def test_engine_reports_one_latency_per_request(tiny_target):
    from tests.unit.test_engine import make_drafter

    target = tiny_target()
    drafter = make_drafter(target, "dspark")
    prompts = [[1, 2, 3, 4], [5, 6, 7], [8, 9, 10, 11, 12]]
    for gen in (generate_target_only(target, prompts, 6, SamplingParams(), [0]),
                generate_speculative(target, drafter, prompts, 6, SamplingParams(), [0])):
        assert len(gen.latency_s) == 3
        assert all(0 < t <= gen.timings.total_s for t in gen.latency_s)


def test_drafter_bytes_count_its_own_weights_and_its_state(tiny_target):
    from deepspec.eval.memory import drafter_kv_bytes, drafter_param_bytes
    from tests.unit.test_engine import make_drafter

    target = tiny_target()
    drafter = make_drafter(target, "dspark")
    own = sum(t.numel() * t.element_size() for t in drafter.state_dict().values())
    assert drafter_param_bytes(drafter) == own  # the borrowed embedding / LM head are not counted
    d = drafter.dims
    per_layer = 2 * 3 * d.num_kv_heads * 50 * d.head_dim * 4  # K and V, batch 3, 50 tokens, fp32
    assert drafter_kv_bytes(drafter, 3, 50, "cpu") == len(drafter.layers) * per_layer + 3 * 8  # + lengths_B


def test_batch_sizes_setting():
    from deepspec.eval.setup import parse_batch_sizes

    assert parse_batch_sizes([], 2) == [2]
    assert parse_batch_sizes([1, 2, 4, 8], 1) == [1, 2, 4, 8]
    for bad in ([0, 1], [2, 2]):
        with pytest.raises(ValueError, match="eval.batch_sizes"):
            parse_batch_sizes(bad, 1)


def test_instruction_set_is_shipped_with_its_license_and_in_the_default_eval_set():
    from deepspec.config import EvalConfig
    from deepspec.eval.benchmarks import KINDS, SHIPPED_DIR, load_benchmark

    bench = load_benchmark("instruct")
    assert len(bench.conversations) >= 50
    assert "Apache" in (SHIPPED_DIR / "LICENSE.instruct").read_text()
    kinds = {KINDS[name] for name in EvalConfig().benchmarks}
    assert kinds == {"maths", "code", "chat"}
    for line in (SHIPPED_DIR / "instruct.jsonl").read_text().splitlines():
        assert len(json.loads(line)["turns"]) == 1


def test_concurrency_plot_is_written(tmp_path):
    from deepspec.eval.report import plot_concurrency

    rows = [{"batch_size": b, "speedup": 2.0 / b, "tok_s_total": 10.0 * b, "target_tok_s_total": 8.0 * b}
            for b in (1, 2, 4)]
    base = {"B": {"benchmarks": {"gsm8k": {"sweep": rows}}}}
    path = plot_concurrency(tmp_path / "s.png", {"gsm8k": {"sweep": rows}}, base)
    assert path.stat().st_size > 1000
