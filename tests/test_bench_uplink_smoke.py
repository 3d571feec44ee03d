"""Smoke test of bench/bench_uplink.py: its parts on a tiny workload against a real broker.

Behaviour only (everything acknowledged, counts as expected, latencies positive, the report
renders); no timing thresholds. The only time asserted is a lower bound the delay proxy
guarantees by construction (a round trip through it cannot take less than its delay).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.profile.loader import load_profile
from agent.wire import decode_batch
from bench import bench_uplink as bu
from bench.traffic import generate

RTT_MS = 40.0


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[bu.BenchEnv]:
    with bu.BenchEnv(tmp_path_factory.mktemp("bench-uplink")) as started:
        yield started


@pytest.fixture(scope="module")
def backlog(tmp_path_factory: pytest.TempPathFactory) -> bu.Backlog:
    encoded = bu.encode_seconds(2)
    return bu.write_backlog(tmp_path_factory.mktemp("backlog") / "outbox.sqlite", encoded, 3)


def test_backlog_is_one_batch_per_flush_of_busy_bus_data(backlog: bu.Backlog) -> None:
    assert backlog.batches == 3  # ~10,000 samples per second fit one 128 KiB batch
    payloads = bu.backlog_payloads(backlog)
    assert len(payloads) == 3 and sum(map(len, payloads)) == backlog.payload_bytes
    decoded = [decode_batch(p) for p in payloads]
    assert [d.seq for d in decoded] == sorted({d.seq for d in decoded})  # new seq per commit
    assert sum(d.counts.values for d in decoded) == backlog.samples
    assert decoded[0].samples == decoded[2].samples  # distinct seconds reused in turn


def test_drains_acknowledge_everything(env: bu.BenchEnv, backlog: bu.Backlog, tmp_path: Path) -> None:
    agent = bu.drain_agent(env, backlog, tmp_path / "agent")
    assert (agent.batches, agent.samples) == (backlog.batches, backlog.samples)
    assert agent.extra["published"] == backlog.batches
    assert agent.seconds > 0 and agent.extra["ack_ms_per_batch"] > 0
    assert agent.tcp.sent > backlog.payload_bytes  # TLS records carry every payload
    payloads = bu.backlog_payloads(backlog)
    naive = bu.drain_naive_batches(env, payloads, backlog.samples)
    assert (naive.batches, naive.payload_bytes) == (backlog.batches, backlog.payload_bytes)
    assert naive.tcp.sent > backlog.payload_bytes
    nagle = bu.drain_naive_batches(env, payloads[:1], 1, nodelay=False)
    assert nagle.side == "naive batches, Nagle" and nagle.batches == 1
    samples = bu.first_samples(40)
    as_json = bu.drain_naive_json(env, samples)
    assert as_json.batches == 40 and as_json.samples == 40
    assert as_json.payload_bytes == sum(len(bu.json_sample(s)) for s in samples)
    assert as_json.tcp.sent > as_json.payload_bytes


def test_delay_proxy_forwards_and_delays(env: bu.BenchEnv, backlog: bu.Backlog, tmp_path: Path) -> None:
    payloads = bu.backlog_payloads(backlog)
    with bu.delay_proxy(env.port, RTT_MS) as port:
        agent = bu.drain_agent(env, backlog, tmp_path / "agent", port=port)
        naive = bu.drain_naive_batches(env, payloads, backlog.samples, port=port)
    assert agent.batches == naive.batches == backlog.batches
    assert agent.tcp.sent > backlog.payload_bytes
    # TLS handshake, CONNECT and one round trip per publish, each at least RTT_MS.
    assert naive.seconds >= (backlog.batches + 1) * RTT_MS / 1000


def test_heavy_profile_adds_one_rule_over_every_signal(tmp_path: Path) -> None:
    profile = load_profile(bu.heavy_profile(tmp_path))
    shipped = load_profile(bu.PROFILE)
    assert len(profile.spec.rules) == len(shipped.spec.rules) + 1
    rule = profile.spec.rules[-1]
    assert rule.name == bu.ALL_ON_CHANGE
    assert set(rule.signals) == set(shipped.catalog)  # type: ignore[union-attr]


def test_latency_runs_measure_every_sample(env: bu.BenchEnv, tmp_path: Path) -> None:
    profile = load_profile(bu.PROFILE)
    frames = generate(profile, 2.5)
    agent = bu.latency_agent(env, profile, frames, tmp_path / "agent")
    naive = bu.latency_naive(env, profile, frames)
    for run in (agent, naive):
        assert run.frames == len(frames)
        assert run.samples > 0 and len(run.per_sample_ms) == run.samples
        assert all(ms > 0 for ms in run.per_sample_ms)
        assert run.tcp.sent > run.payload_bytes > 0
    assert agent.per_batch_ms and all(ms > 0 for ms in agent.per_batch_ms)
    assert len(agent.commit_to_ack_ms) == len(agent.per_batch_ms)
    assert all(ms >= 0 for ms in agent.commit_to_ack_ms)
    # The oldest sample of a batch is at least as old as the batch's commit -> PUBACK.
    assert all(b >= c for b, c in zip(agent.per_batch_ms, agent.commit_to_ack_ms, strict=True))
    assert agent.publishes >= len(agent.per_batch_ms)  # one publish per batch, a few samples each
    assert agent.publishes < agent.samples
    assert naive.publishes == naive.samples + naive.other_records  # one message per record


def test_report_renders(env: bu.BenchEnv, backlog: bu.Backlog, tmp_path: Path) -> None:
    payloads = bu.backlog_payloads(backlog)
    runs = {
        "agent": [bu.drain_agent(env, backlog, tmp_path / "a")],
        "naive batches": [bu.drain_naive_batches(env, payloads, backlog.samples)],
        "naive batches, Nagle": [bu.drain_naive_batches(env, payloads[:1], 1, nodelay=False)],
        "naive json": [bu.drain_naive_json(env, bu.first_samples(20))],
    }
    profile = load_profile(bu.PROFILE)
    frames = generate(profile, 1.5)
    latency = {"rules": {"agent": bu.latency_agent(env, profile, frames, tmp_path / "l"),
                         "naive": bu.latency_naive(env, profile, frames)}}
    report = bu.Report(bu.Plan.quick(), "cmd", backlog, backlog, runs, {}, latency, "machine")
    text = bu.render(report)
    assert text.startswith("## Uplink (issue 3)\n")
    assert "Reading: " in text
    for label in bu.SIDE_LABELS.values():  # one drain table (no RTT runs given), a row per side
        assert text.count(f"\n| {label} |") == 1
    assert text.count("\n| rules (") == 3  # the latency table: header, agent and naive rows
    assert text.count(" | agent | ") == text.count(" | naive | ") == 1
