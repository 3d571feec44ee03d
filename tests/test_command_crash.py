"""A command whose agent dies before acknowledging it is redelivered and never runs twice."""

from __future__ import annotations

import time
from pathlib import Path

from tests.broker import VEHICLE_ID, MosquittoBroker, make_dev_pki, wait_until
from tests.command_harness import CloudClient, make_command_key
from tests.uplink_harness import AgentProcess, write_config

EV = Path(__file__).resolve().parent.parent / "firmware_profiles" / "ev_sedan" / "ev_sedan.yaml"


def test_redelivery_after_kill_before_acknowledging_runs_once(tmp_path: Path) -> None:
    pki = make_dev_pki(tmp_path / "pki")
    key, trusted = make_command_key(tmp_path)
    with MosquittoBroker(pki) as broker:
        # No vehicle on the buses: lock_doors sends its frames, then waits 2 s for a lock state
        # that never comes; the agent is killed inside that wait, before it acknowledged.
        config = write_config(
            tmp_path / "agent", pki, broker.port, profile=EV,
            buses={"powertrain": {"interface": "virtual", "channel": "crash-pt"},
                   "body": {"interface": "virtual", "channel": "crash-body"}},
            extra={"commands": {"trusted_keys": str(trusted), "replay": {"path": str(tmp_path / "replay.db")},
                                "verifier": {"max_skew_ms": 0}}})
        agent = AgentProcess(config).start()
        cloud = CloudClient(broker, VEHICLE_ID, key)
        try:
            wait_until(lambda: "mqtt connected" in agent.log_text(), 60, "the agent to connect")
            command_id = cloud.send("lock_doors")
            wait_until(lambda: "in_progress" in cloud.states(command_id), 30, "the command to start")
            agent.kill()  # SIGKILL: no result recorded, no acknowledgement sent
            assert "failed" not in cloud.states(command_id)

            restarted = AgentProcess(config).start()
            result = cloud.final(command_id, timeout=60)
            assert result.state == "failed" and result.reason == "interrupted", result
            time.sleep(1)
            assert restarted.stop() == 0
        finally:
            cloud.close()
    # the broker redelivered the request and the restarted agent answered it from its replay
    # store without running it again
    assert "replayed_id" in restarted.log_text()
    stats = restarted.stats()["commands"]
    assert stats.get("accepted", 0) == 0 and stats.get("rejected_replayed_id") == 1
    # reported at start-up (found interrupted) and again as the answer to the redelivery
    assert cloud.states(command_id) == ["accepted", "in_progress", "failed", "failed"]
    assert {(r.state, r.reason) for r in cloud.results if r.command_id == command_id
            and r.state == "failed"} == {("failed", "interrupted")}
