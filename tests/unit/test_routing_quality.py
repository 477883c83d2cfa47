"""The routing-quality benchmark's verdicts (benchmarks/routing_quality.py): when a policy
sustains a rate, the kv vs round-robin target, and merging separate invocations."""

from __future__ import annotations

from benchmarks.routing import Result
from benchmarks.routing_quality import compare, merge, phase_summary

CPU = {"deployment_cores": 0.5, "client_cores": 0.1}


def results(ttfts: list[float], status: int = 200) -> list[Result]:
    out = []
    for n, ttft in enumerate(ttfts):
        r = Result()
        r.status, r.ttft, r.latency, r.started = status, ttft, ttft + 0.5, float(n)
        r.prompt_tokens, r.cached_tokens, r.output_tokens = 1000, 900, 32
        out.append(r)
    return out


def test_steady_phase_is_sustained() -> None:
    s = phase_summary(results([0.1] * 30), wall=31.0, rate=1.0, cpu=CPU)
    assert s["sustained"] and s["ttft_p50_growth"] == 1.0 and s["errored"] == 0


def test_growing_ttft_is_not_sustained_even_at_full_throughput() -> None:
    s = phase_summary(results([0.1] * 10 + [0.2] * 10 + [0.5] * 10), wall=31.0, rate=1.0, cpu=CPU)
    assert s["completed_over_offered"] >= 0.9
    assert s["ttft_p50_growth"] == 5.0 and not s["sustained"]


def test_falling_behind_or_errors_is_not_sustained() -> None:
    assert not phase_summary(results([0.1] * 30), wall=40.0, rate=1.0, cpu=CPU)["sustained"]
    failed = results([0.1] * 29) + results([0.1], status=500)
    assert not phase_summary(failed, wall=31.0, rate=1.0, cpu=CPU)["sustained"]


def point(p90_ms: float, tok_s: float, sustained: bool) -> dict[str, object]:
    return {"ttft_p90_ms": p90_ms, "throughput_output_tok_s": tok_s, "sustained": sustained}


def test_compare_takes_round_robins_highest_sustained_rate() -> None:
    sweep = {
        "round-robin": {"10": point(200, 300, True), "20": point(600, 600, True), "30": point(9000, 700, False)},
        "kv": {"10": point(100, 300, True), "20": point(150, 600, True), "30": point(300, 950, True)},
    }
    c = compare(sweep)
    assert c["round_robin_highest_sustained_req_s"] == "20" and c["kv_highest_sustained_req_s"] == "30"
    assert c["at_rr_highest_sustained"]["ttft_p90_ratio"] == 4.0 and c["ttft_target_met"]
    assert c["at_top_rate"]["rate"] == "30" and c["throughput_target_met_at_top_rate"]
    sweep["kv"]["20"] = point(250, 600, True)
    assert not compare(sweep)["ttft_target_met"]


def test_merge_keeps_other_invocations_policies_and_rates() -> None:
    old = {"sweep": {"kv": {"8": 1, "16": 2}, "random": {"8": 3}}, "invocations": [{"a": 1}]}
    new = {"sweep": {"kv": {"16": 9}}, "herding": {"40": {"local": 1}}, "invocations": [{"b": 2}]}
    merged = merge(old, new)
    assert merged["sweep"] == {"kv": {"8": 1, "16": 9}, "random": {"8": 3}}
    assert merged["herding"] == {"40": {"local": 1}} and len(merged["invocations"]) == 2
