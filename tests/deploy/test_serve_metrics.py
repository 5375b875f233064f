"""Metrics: vLLM's spec-decode counter names, request histograms, one private registry per instance."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from deploy.metrics import RequestRecord, ServeMetrics
from falcon_core.metrics import GenerationStats


def samples(m: ServeMetrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(m.render().decode()):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_record_moves_spec_decode_counters_and_histograms() -> None:
    stats = GenerationStats(prompt_tokens=5)
    stats.record_step(3, 2, 2, 0.01, 0.02)  # depth-3 tree, 2 accepted
    stats.record_step(3, 0, 2, 0.01, 0.02)
    stats.record_plain_step(0.02)
    m = ServeMetrics()
    rec = RequestRecord("m", "length", 5, 6, latency_s=1.0, ttft_s=0.2, queue_s=0.0, stats=stats)
    m.record(rec)
    m.record(rec)
    s = samples(m)
    lab = (("model_name", "m"),)
    assert s[("spec_decode_num_drafts_total", lab)] == 4
    assert s[("spec_decode_num_draft_tokens_total", lab)] == 12
    assert s[("spec_decode_num_accepted_tokens_total", lab)] == 4
    assert s[("spec_decode_num_accepted_tokens_per_pos_total", (("model_name", "m"), ("position", "0")))] == 2
    assert s[("spec_decode_num_accepted_tokens_per_pos_total", (("model_name", "m"), ("position", "1")))] == 2
    assert s[("e2e_request_latency_seconds_count", lab)] == 2
    assert s[("time_to_first_token_seconds_sum", lab)] == 0.4
    assert s[("request_decode_tokens_per_second_sum", lab)] == 2 * 5 / 0.8
    assert s[("generation_tokens_total", lab)] == 12
    assert s[("request_success_total", (("finished_reason", "length"), ("model_name", "m")))] == 2


def test_registries_are_independent() -> None:
    a, b = ServeMetrics(), ServeMetrics()
    a.record_error(400)
    assert samples(a)[("request_errors_total", (("status", "400"),))] == 1
    assert ("request_errors_total", (("status", "400"),)) not in samples(b)
