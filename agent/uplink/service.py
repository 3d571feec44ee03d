"""The uplink service: records -> durable outbox -> MQTT publisher.

Wires :class:`~agent.batcher.OutboxSink` (what the pipeline emits to),
:class:`~agent.outbox.Outbox` and :class:`~agent.uplink.mqtt.MqttPublisher`, and reports
the outbox's losses (evicted, expired, rejected) upstream in the retained status message,
clearing them only once the broker acknowledged that status.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict

from agent.batcher import OutboxSink, new_boot_id
from agent.commands.results import CommandResult, ResultBatch
from agent.outbox import LossReport, Outbox, OutboxSettings, Priority
from agent.uplink.mqtt import CommandInbox, MqttPublisher, MqttSettings, check_identity


class UplinkSettings(BaseModel):
    """The ``uplink:`` section of the agent configuration."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    outbox: OutboxSettings
    mqtt: MqttSettings


class Uplink:
    def __init__(self, settings: UplinkSettings, vehicle_id: str, inbox: CommandInbox | None = None) -> None:
        self.settings = settings
        self.vehicle_id = vehicle_id
        self.boot_id = new_boot_id()
        check_identity(settings.mqtt, vehicle_id)  # refuse a bad identity before touching disk
        self.outbox = Outbox(settings.outbox)
        try:
            self.sink = OutboxSink(self.outbox, vehicle_id=vehicle_id, boot_id=self.boot_id)
            self.publisher = MqttPublisher(settings.mqtt, vehicle_id, self.outbox, status=self, inbox=inbox)
        except BaseException:
            self.outbox.close()
            raise

    # StatusSource: the online status carries what the outbox lost since the last report.
    def status_report(self) -> tuple[dict[str, object], object]:
        report = self.outbox.loss_report()
        stats = self.outbox.stats()
        fields: dict[str, object] = {
            "boot_id": self.boot_id,
            "outbox": {"batches": stats.batches, "used_bytes": stats.used_bytes,
                       "max_bytes": stats.max_bytes, "next_seq": stats.next_seq},
            **report.to_dict(),
        }
        return fields, (report if not report.empty else None)

    def status_delivered(self, token: object) -> None:
        if isinstance(token, LossReport):
            self.outbox.ack_loss_report(token)

    def publish_result(self, result: CommandResult) -> None:
        """A command result, stored durably (highest priority) before it is published."""
        self.outbox.commit([(Priority.EVENT, ResultBatch(result, self.vehicle_id, self.boot_id))])

    def start(self) -> None:
        self.publisher.start()

    def stats(self) -> dict[str, object]:
        return {"publisher": vars(self.publisher.counters()), "sink": vars(self.sink.stats),
                "connected": self.publisher.connected}

    def close(self) -> None:
        """After the pipeline closed the sink: stop publishing, then close the outbox."""
        self.sink.close()
        self.publisher.stop()
        self.outbox.close()
