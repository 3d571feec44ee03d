"""The agent process facing a broker it must not or cannot use: nothing lost, clear causes."""

from __future__ import annotations

import time
from pathlib import Path

from agent.errors import EX_CONFIG
from tests.broker import VEHICLE_ID, MosquittoBroker, make_dev_pki, wait_until
from tests.uplink_harness import AgentProcess, outbox_seqs, write_config


def test_untrusted_broker_gets_nothing_and_the_agent_keeps_buffering(tmp_path: Path) -> None:
    pki = make_dev_pki(tmp_path / "pki")
    stranger = make_dev_pki(tmp_path / "stranger")  # a CA the vehicle was not provisioned with
    with MosquittoBroker(pki) as broker:
        config = write_config(tmp_path / "agent", pki, broker.port,
                              mqtt={"ca_file": str(stranger.ca_cert)})
        agent = AgentProcess(config).start()
        try:
            wait_until(lambda: len(outbox_seqs(config)) >= 3 if (config.parent / "outbox.sqlite").exists()
                       else False, 30, "batches buffered in the outbox")
            time.sleep(2)
        finally:
            assert agent.stop() == 0
    stats = agent.stats()["uplink"]["publisher"]
    assert stats["published"] == 0 and stats["acked"] == 0
    assert stats["connect_failures"].get("broker_cert_untrusted", 0) >= 2  # retried with backoff
    assert "broker certificate verify failed" in agent.log_text()
    assert len(outbox_seqs(config)) >= 3  # nothing left the outbox


def test_publish_denied_by_acl_stays_in_the_outbox(tmp_path: Path) -> None:
    pki = make_dev_pki(tmp_path / "pki")
    with MosquittoBroker(pki) as broker:
        # the ACL lets a vehicle write only vt/<its id>/#; this agent is misconfigured
        config = write_config(tmp_path / "agent", pki, broker.port, mqtt={"topic_prefix": "fleet"})
        agent = AgentProcess(config).start()
        try:
            wait_until(lambda: "broker refused publish" in agent.log_text(), 30, "a denied publish")
            time.sleep(1.5)
        finally:
            assert agent.stop() == 0
    stats = agent.stats()["uplink"]["publisher"]
    assert stats["denied"] >= 1 and stats["acked"] == 0
    stored = outbox_seqs(config)
    assert stored and stored[0] == 1  # the very first batch is still there
    assert "0x87" in agent.log_text()  # Not authorized, from the MQTT v5 PUBACK


def test_agent_refuses_a_private_key_others_can_read(tmp_path: Path) -> None:
    pki = make_dev_pki(tmp_path / "pki")
    config = write_config(tmp_path / "agent", pki, 1883)
    key = pki.key(VEHICLE_ID)
    key.chmod(0o644)
    agent = AgentProcess(config).start()
    assert agent.proc is not None
    assert agent.proc.wait(60) == EX_CONFIG
    log = agent.log_text()
    assert str(key) in log and "chmod 600" in log and "accessible by group and others" in log
    assert not (config.parent / "outbox.sqlite").exists()  # refused before anything was written
