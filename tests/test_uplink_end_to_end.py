"""Vehicle data reaches the backend exactly as the vehicle saw it: real agent processes,
a real mosquitto with mutual TLS, the backend's sequence accounting, outages and SIGKILL."""

from __future__ import annotations

import random
import time
from pathlib import Path

from agent.outbox import OutboxSettings
from agent.pki import PkiDir
from agent.records import Sample
from agent.uplink.mqtt import MqttSettings
from agent.uplink.service import Uplink, UplinkSettings
from agent.wire import decode_batch
from simulator.backend import BackendMonitor
from tests.broker import BACKEND, VEHICLE_ID, MosquittoBroker, free_port, make_dev_pki, wait_until
from tests.uplink_harness import AgentProcess, outbox_seqs, write_config


def backend(pki: PkiDir, port: int) -> BackendMonitor:
    monitor = BackendMonitor(host="127.0.0.1", port=port, ca_file=pki.ca_cert,
                             cert_file=pki.cert(BACKEND), key_file=pki.key(BACKEND))
    monitor.start()
    assert monitor.wait_subscribed(15)
    return monitor


def stored_samples(config: Path) -> int:
    import sqlite3

    with sqlite3.connect(f"file:{config.parent / 'outbox.sqlite'}?mode=ro", uri=True) as conn:
        return sum(decode_batch(bytes(p)).counts.samples for (p,) in conn.execute("SELECT payload FROM batches"))


def assert_every_batch_accounted(monitor: BackendMonitor, config: Path, last_seq: int) -> None:
    """Each committed batch is at the backend or still in the outbox; none twice, none lost."""
    at_backend = set(monitor.seqs(VEHICLE_ID))
    in_outbox = set(outbox_seqs(config))
    assert at_backend | in_outbox == set(range(1, last_seq + 1)), (
        sorted(set(range(1, last_seq + 1)) - at_backend - in_outbox)[:20])
    assert not monitor.snapshot().vehicle(VEHICLE_ID).seq_conflicts  # a seq is never reused


def test_delivery_with_exact_sequence_accounting(tmp_path: Path) -> None:
    pki = make_dev_pki(tmp_path / "pki")
    with MosquittoBroker(pki) as broker:
        monitor = backend(pki, broker.port)
        try:
            config = write_config(tmp_path / "agent", pki, broker.port)
            agent = AgentProcess(config).start()
            assert monitor.wait_for(lambda: len(monitor.seqs(VEHICLE_ID)) >= 20, 60)
            assert agent.stop() == 0
            time.sleep(1)
            stats = agent.stats()
            last_seq = stats["uplink"]["sink"]["last_seq"]
            assert_every_batch_accounted(monitor, config, last_seq)
            snap = monitor.snapshot().vehicle(VEHICLE_ID)
            assert snap.duplicates == 0 and snap.missing_ranges == ()
            # every sample the rules emitted is at the backend or still stored, none twice
            samples_emitted = stats["rules"]["samples"]
            assert snap.samples + stored_samples(config) == samples_emitted
            status = monitor.status(VEHICLE_ID)
            assert status is not None and status["state"] == "offline"  # clean shutdown
            assert not snap.rejected
        finally:
            monitor.stop()


def test_broker_outage_loses_nothing_and_live_data_is_not_starved(tmp_path: Path) -> None:
    pki = make_dev_pki(tmp_path / "pki")
    arrivals: list[int] = []
    with MosquittoBroker(pki, persistence=True) as broker:
        monitor = BackendMonitor(host="127.0.0.1", port=broker.port, ca_file=pki.ca_cert,
                                 cert_file=pki.cert(BACKEND), key_file=pki.key(BACKEND),
                                 on_batch=lambda arrival: arrivals.append(arrival.seq))
        monitor.start()
        assert monitor.wait_subscribed(15)
        try:
            config = write_config(tmp_path / "agent", pki, broker.port)
            agent = AgentProcess(config).start()
            assert monitor.wait_for(lambda: len(monitor.seqs(VEHICLE_ID)) >= 5, 60)
            broker.stop()  # the backend's persistent session survives in the broker's store
            wait_until(lambda: len(outbox_seqs(config)) >= 16, 60, "a backlog in the outbox")
            backlog_start, backlog_end = min(outbox_seqs(config)), max(outbox_seqs(config))
            backlog = len(outbox_seqs(config))
            seen_before = len(arrivals)
            broker.start()
            assert monitor.wait_for(lambda: backlog_end in monitor.seqs(VEHICLE_ID), 60)
            assert monitor.wait_for(lambda: max(monitor.seqs(VEHICLE_ID)) > backlog_end + 4, 60)
            assert agent.stop() == 0
            time.sleep(1)
            stats = agent.stats()
            assert sum(stats["uplink"]["publisher"]["connect_failures"].values()) >= 1
            assert_every_batch_accounted(monitor, config, stats["uplink"]["sink"]["last_seq"])
            assert monitor.missing(VEHICLE_ID) == []
            # Interleaved drain: right after the reconnect the newest data (live, or the newest of
            # the backlog if nothing newer exists yet) goes out next to the oldest backlog batch.
            after = arrivals[seen_before:]
            assert any(seq >= backlog_end for seq in after[:3]), (backlog, after[:30])
            assert min(after[:4]) <= backlog_start + 1, (backlog_start, after[:30])
        finally:
            monitor.stop()


def test_sigkill_at_random_moments_loses_no_committed_batch(tmp_path: Path) -> None:
    pki = make_dev_pki(tmp_path / "pki")
    rng = random.Random(1234)
    with MosquittoBroker(pki) as broker:
        monitor = backend(pki, broker.port)
        try:
            config = write_config(tmp_path / "agent", pki, broker.port)
            kills = 5
            for _ in range(kills):
                agent = AgentProcess(config).start()
                time.sleep(rng.uniform(1.5, 4.0))
                agent.kill()
            agent = AgentProcess(config).start()
            wait_until(lambda: "mqtt connected" in agent.log_text(), 30, "the last agent to connect")
            time.sleep(3)
            assert agent.stop() == 0
            time.sleep(1)
            last_seq = agent.stats()["uplink"]["sink"]["last_seq"]
            assert last_seq > 10
            assert_every_batch_accounted(monitor, config, last_seq)
            snap = monitor.snapshot().vehicle(VEHICLE_ID)
            assert monitor.missing(VEHICLE_ID) == []
            assert len(snap.boots) == kills + 1
            # duplicates are allowed (a batch acked by the broker just before the kill) and detected
            assert snap.duplicates == len(snap.duplicate_seqs)
        finally:
            monitor.stop()


def test_full_outbox_evicts_oldest_telemetry_and_reports_it(tmp_path: Path) -> None:
    pki = make_dev_pki(tmp_path / "pki")
    port = free_port()
    outbox_settings = OutboxSettings(path=tmp_path / "outbox.sqlite", max_bytes=1024 * 1024,
                                     max_payload_bytes=16384, compression="none")
    mqtt = MqttSettings(host="127.0.0.1", port=port, ca_file=pki.ca_cert, cert_file=pki.cert(VEHICLE_ID),
                        key_file=pki.key(VEHICLE_ID), reconnect_min_s=0.2, reconnect_max_s=0.5)
    uplink = Uplink(UplinkSettings(outbox=outbox_settings, mqtt=mqtt), VEHICLE_ID)
    rng = random.Random(7)
    t0 = time.time_ns()
    try:
        # no broker yet: ~3 MB of telemetry into a 1 MiB outbox
        for batch in range(120):
            uplink.sink.emit([Sample(f"Vehicle.Signal{i % 50}", t0 + batch * 10**9 + i, rng.random(), "flood", True)
                              for i in range(1500)])
            uplink.sink.flush()
        stats = uplink.outbox.stats()
        assert stats.used_bytes <= outbox_settings.max_bytes
        report = uplink.outbox.loss_report().to_dict()
        evicted = report["losses"]["telemetry"]["evicted"]  # type: ignore[index]
        assert evicted["batches"] > 0
        stored = uplink.outbox.stats().batches["telemetry"]
        with MosquittoBroker(pki, port=port) as broker:
            monitor = backend(pki, broker.port)
            try:
                uplink.start()
                assert monitor.wait_for(lambda: len(monitor.seqs(VEHICLE_ID)) == stored, 60)
                assert monitor.wait_for(lambda: bool(monitor.snapshot().vehicle(VEHICLE_ID).reported_losses), 30)
                snap = monitor.snapshot().vehicle(VEHICLE_ID)
                # the oldest batches were evicted: the backend has the newest, contiguous
                assert snap.first_seq == evicted["batches"] + 1 and snap.missing_ranges == ()
                assert snap.reported_losses["telemetry"]["evicted"]["batches"] == evicted["batches"]
                # every sample emitted either arrived or was reported as evicted
                assert snap.reported_losses["telemetry"]["evicted"]["samples"] + snap.samples == 120 * 1500
                # reported once: the outbox cleared what the broker acknowledged
                wait_until(lambda: uplink.outbox.loss_report().empty, 15, "the loss report to be acknowledged")
            finally:
                monitor.stop()
    finally:
        uplink.close()


