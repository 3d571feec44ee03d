"""Generate firmware_profiles/busy_bus/busy_bus.dbc, the CAN database of the benchmark profile.

The database is modelled on the powertrain bus of a parallel-hybrid car at 500 kbit/s:
14 hand-designed messages carry what the busy_bus profile's catalog maps (vehicle and
wheel speeds, pedals, engine, motor, gearbox, HV and 12 V battery, odometer, doors), and
deterministic filler messages named like production databases (``ECM_17``, ``ESP_21``)
make up the rest of the traffic: many frames at 10 and 20 ms, others at 50/100/200/500/
1000 ms, plus event-driven, network-management and diagnostic messages that have
no cycle time and exist only to make the database as large as a real one.

Totals, computed from GenMsgCycleTime exactly as tests/test_shipped_profiles.py does:

* 427 messages (175 periodic, 252 without a cycle time), 1,542 signals
* periodic traffic: 3,705 frames/s and 10,006 signals/s; 2,900 of the frames/s are
  10 and 20 ms messages
* bus load at 500 kbit/s: 73.7 %, counting 47 + 8*DLC bits per 11-bit frame and
  67 + 8*DLC bits per 29-bit frame, plus 15 % bit stuffing
* the 14 catalog messages send 841 frames/s (23 %); the busy_bus profile's rules need
  10 of them, 441 frames/s (12 % of the traffic)

The output is byte-for-byte deterministic (no randomness, no timestamps).

Usage::

    python scripts/gen_busy_bus_dbc.py            # rewrite the DBC, print the totals
    python scripts/gen_busy_bus_dbc.py --check    # exit 1 if the committed DBC is stale
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field
from pathlib import Path

OUTPUT = Path(__file__).resolve().parent.parent / "firmware_profiles" / "busy_bus" / "busy_bus.dbc"
BITRATE = 500_000
STUFFING = 1.15


@dataclass(frozen=True)
class Sig:
    name: str
    length: int
    scale: float = 1.0
    offset: float = 0.0
    unit: str = ""
    signed: bool = False
    minimum: float | None = None
    maximum: float | None = None
    choices: tuple[str, ...] = ()
    start_raw: int | None = None
    comment: str = ""


@dataclass
class Msg:
    frame_id: int
    name: str
    dlc: int
    sender: str
    cycle_ms: int | None
    signals: list[Sig]
    big_endian: bool = False
    extended: bool = False
    send_type: str = "Cyclic"
    comment: str = ""
    starts: dict[str, int] = field(default_factory=dict)


ECUS = {
    "ECM": "Engine control module (1.5 l turbo petrol)",
    "TCM": "Transmission control module (7-speed dual clutch)",
    "HCU": "Hybrid control unit: torque split between engine and motor",
    "INV": "Traction motor inverter (P2 motor)",
    "BMS": "Battery management system of the 300 V hybrid battery",
    "DCDC": "HV to 12 V DC/DC converter",
    "OBC": "On-board charger (plug-in variant)",
    "ESP": "Electronic stability program with ABS",
    "EBB": "Electric brake booster",
    "EPS": "Electric power steering",
    "EPB": "Electric parking brake",
    "AWD": "All-wheel-drive coupling",
    "ACC": "Adaptive cruise control radar",
    "TMS": "Thermal management (pumps, valves, fan, heat pump)",
    "IC": "Instrument cluster",
    "GW": "Central gateway (routes body and chassis values)",
    "TCU": "Telematics control unit (this agent)",
}
RECEIVERS = {
    "ECM": "TCM,HCU,ESP,IC,TCU", "TCM": "ECM,HCU,ESP,IC", "HCU": "ECM,TCM,INV,BMS,ESP",
    "INV": "HCU,BMS,TMS", "BMS": "HCU,INV,DCDC,OBC,TMS", "DCDC": "HCU,BMS,GW",
    "OBC": "BMS,HCU,IC", "ESP": "ECM,TCM,HCU,EPS,EPB,AWD,ACC", "EBB": "ESP,HCU",
    "EPS": "ESP,ACC,GW", "EPB": "ESP,TCM,IC", "AWD": "ESP,HCU", "ACC": "ESP,HCU,IC",
    "TMS": "ECM,BMS,INV,HCU", "IC": "GW,TCU", "GW": "ECM,HCU,IC,TCU", "TCU": "GW",
}
BIG_ENDIAN_ECUS = {"INV", "EPS", "ACC", "OBC"}

GEAR = ("P", "R", "N", "D")
OPEN = ("Closed", "Open")
LOCK = ("UNLOCKED", "LOCKED")


def _counter(msg: str) -> Sig:
    return Sig(f"{msg}_Counter", 4, maximum=15, comment="Alive counter, +1 per frame.")


def _crc(msg: str) -> Sig:
    return Sig(f"{msg}_CRC", 8, maximum=255, comment="CRC8 (SAE J1850) over the other bytes.")


def core_messages() -> list[Msg]:
    """The messages the busy_bus catalog maps; designed by hand like a real database."""

    def m(fid: int, name: str, dlc: int, sender: str, cycle: int, sigs: list[Sig],
          comment: str, counter: bool = True, crc: bool = True) -> Msg:
        tail = ([_counter(name)] if counter else []) + ([_crc(name)] if crc else [])
        return Msg(fid, name, dlc, sender, cycle, sigs + tail,
                   big_endian=sender in BIG_ENDIAN_ECUS, comment=comment)

    return [
        m(0x0A0, "HCU_DriverInput", 8, "HCU", 10, [
            Sig("AccelPedalPos", 8, 0.4, unit="%", maximum=100,
                comment="Accelerator pedal travel after APS1/APS2 plausibility."),
            Sig("HCU_TorqueRequest", 16, 0.1, unit="Nm", signed=True, minimum=-800, maximum=800,
                comment="Total wheel torque request; negative is regeneration."),
        ], "Driver inputs as arbitrated by the hybrid control unit."),
        m(0x0B0, "ECM_EngineData1", 8, "ECM", 10, [
            Sig("EngineSpeed", 16, 0.25, unit="rpm", maximum=8000),
            Sig("EngineTorqueActual", 12, 0.5, unit="Nm", signed=True, minimum=-100, maximum=400),
            Sig("EngineState", 3, choices=("Off", "Cranking", "Running", "Stalled", "AutoStop")),
        ], "Engine speed, torque and state."),
        m(0x0B8, "INV_MotorStatus", 8, "INV", 10, [
            Sig("MotorSpeed", 16, unit="rpm", signed=True, minimum=-16000, maximum=16000),
            Sig("MotorTorque", 12, 0.5, unit="Nm", signed=True, minimum=-350, maximum=350),
        ], "P2 motor speed and torque (Motorola byte order)."),
        m(0x0C8, "ESP_VehicleSpeed", 8, "ESP", 10, [
            Sig("VehicleSpeed", 16, 0.01, unit="km/h", maximum=300,
                comment="Vehicle reference speed from the four wheel speeds."),
            Sig("LongAccel", 12, 0.01, -20.48, unit="m/s^2", start_raw=2048,
                comment="Longitudinal acceleration, positive forward."),
        ], "Vehicle reference speed and acceleration."),
        m(0x0CC, "ESP_WheelSpeeds", 8, "ESP", 10, [
            Sig(f"WheelSpeed{w}", 14, 0.02, unit="km/h", maximum=300)
            for w in ("FL", "FR", "RL", "RR")
        ], "Wheel speeds.", crc=False),
        m(0x0D0, "EBB_BrakeStatus", 6, "EBB", 10, [
            Sig("BrakePedalPos", 8, 0.4, unit="%", maximum=100, comment="Brake pedal travel."),
            Sig("BrakePressure", 12, 0.1, unit="bar", maximum=250),
        ], "Brake pedal and master cylinder pressure."),
        m(0x0E0, "EPS_SteeringAngle", 8, "EPS", 10, [
            Sig("SteeringWheelAngle", 16, 0.1, unit="deg", signed=True, minimum=-780, maximum=780,
                comment="Steering wheel angle, positive to the left."),
            Sig("SteeringWheelRate", 12, unit="deg/s", maximum=2000),
        ], "Steering wheel angle sensor (Motorola byte order)."),
        m(0x110, "BMS_PackStatus", 8, "BMS", 20, [
            Sig("PackVoltage", 16, 0.1, unit="V", maximum=500, start_raw=3000),
            Sig("PackCurrent", 16, 0.1, unit="A", signed=True, minimum=-400, maximum=400,
                comment="Pack current, positive when discharging."),
            Sig("BMS_State", 4, choices=("Init", "Standby", "Precharge", "Drive", "Charge",
                                         "Fault", "Shutdown")),
        ], "HV battery electrical state."),
        m(0x130, "TCM_GearStatus", 8, "TCM", 20, [
            Sig("SelectedGear", 3, choices=GEAR, comment="Gear selector position."),
            Sig("CurrentGear", 4, signed=True, minimum=-1, maximum=7,
                comment="Engaged gear: -1 reverse, 0 neutral, 1..7."),
            Sig("TransOilTemp", 8, 1, -40, unit="degC", maximum=150, start_raw=60),
        ], "Selected and engaged gear."),
        m(0x310, "BMS_SOC", 8, "BMS", 100, [
            Sig("SOC_Displayed", 10, 0.1, unit="%", maximum=100, start_raw=600),
            Sig("SOC_Actual", 10, 0.1, unit="%", maximum=100, start_raw=620),
            Sig("BMS_PackTempAvg", 8, 1, -40, unit="degC", maximum=100, start_raw=65),
            Sig("SOH", 8, 0.5, unit="%", maximum=100, start_raw=196),
        ], "State of charge and health.", counter=False, crc=False),
        m(0x320, "ECM_EngineData2", 8, "ECM", 100, [
            Sig("CoolantTemp", 8, 1, -40, unit="degC", maximum=150, start_raw=60),
            Sig("OilTemp", 8, 1, -40, unit="degC", maximum=160, start_raw=60),
            Sig("IntakeAirTemp", 8, 1, -40, unit="degC", maximum=150, start_raw=60),
            Sig("AmbientAirTemp", 8, 0.5, -40, unit="degC", maximum=87.5, start_raw=110),
            Sig("BaroPressure", 8, 0.5, unit="kPa", maximum=125, start_raw=202),
        ], "Engine temperatures and ambient conditions.", crc=False),
        m(0x330, "DCDC_Status", 5, "DCDC", 100, [
            Sig("LVBatteryVoltage", 10, 0.02, unit="V", maximum=20, start_raw=630,
                comment="12 V battery voltage measured by the DC/DC converter."),
            Sig("DCDC_OutputCurrent", 10, 0.25, unit="A", maximum=250),
            Sig("DCDC_State", 3, choices=("Off", "Standby", "Buck", "Fault")),
        ], "DC/DC converter and 12 V battery.", crc=False),
        m(0x3A0, "GW_BodyStatus", 4, "GW", 100, [
            Sig("DoorFL_Open", 1, choices=OPEN), Sig("DoorFR_Open", 1, choices=OPEN),
            Sig("DoorRL_Open", 1, choices=OPEN), Sig("DoorRR_Open", 1, choices=OPEN),
            Sig("TrunkOpen", 1, choices=OPEN),
            Sig("CentralLockStatus", 1, choices=LOCK, start_raw=1),
        ], "Doors and locks, routed from the body bus by the gateway.", crc=False),
        m(0x520, "IC_VehicleInfo", 8, "IC", 1000, [
            Sig("Odometer", 24, 0.1, unit="km", maximum=1677721.5,
                comment="Total distance, 0.1 km resolution."),
            Sig("FuelLevel", 8, 0.4, unit="%", maximum=100, start_raw=150),
            Sig("RangeEstimate", 10, unit="km", maximum=1000),
        ], "Odometer, fuel level and range from the cluster.", counter=False, crc=False),
    ]


# Filler signal shapes: (stem, bits, scale, offset, unit, signed, minimum, maximum).
SHAPES = [
    ("Torque", 12, 0.5, 0.0, "Nm", True, -500.0, 500.0),
    ("Speed", 16, 0.25, 0.0, "rpm", False, 0.0, 12000.0),
    ("Temp", 8, 1.0, -40.0, "degC", False, -40.0, 215.0),
    ("Press", 12, 0.1, 0.0, "bar", False, 0.0, 400.0),
    ("Current", 12, 0.1, -204.8, "A", False, -204.8, 204.7),
    ("Voltage", 12, 0.1, 0.0, "V", False, 0.0, 409.5),
    ("Position", 8, 0.4, 0.0, "%", False, 0.0, 100.0),
    ("Ratio", 10, 0.001, 0.0, "", False, 0.0, 1.023),
    ("Angle", 14, 0.1, 0.0, "deg", True, -800.0, 800.0),
    ("Flow", 12, 0.05, 0.0, "L/h", False, 0.0, 204.75),
    ("Power", 12, 0.1, 0.0, "kW", False, 0.0, 409.5),
    ("Accel", 10, 0.02, -10.24, "m/s^2", False, -10.24, 10.22),
]
STATES = [
    ("Mode", ("Off", "Standby", "Active", "Degraded", "Fault")),
    ("Status", ("Init", "Ok", "Warning", "Error")),
    ("Request", ("None", "Increase", "Decrease", "Hold")),
]

# Periodic filler per cycle time: (cycle ms, message count, DLCs, data signals per message,
# sending ECUs, first and last frame id). Faster messages are shorter, as on real buses.
PERIODIC_BUCKETS: list[tuple[int, int, tuple[int, ...], tuple[int, ...], tuple[str, ...], int, int]] = [
    (10, 6, (4, 2, 6, 3), (1, 1, 2, 1), ("ECM", "HCU", "INV", "ESP", "TCM", "EBB"), 0x080, 0x0FF),
    (20, 30, (2, 4, 3, 6, 2), (1, 1, 2, 1, 1), ("ECM", "TCM", "HCU", "INV", "BMS", "ESP", "EPS",
                                                "ACC", "AWD"), 0x100, 0x1FF),
    (50, 16, (6, 4, 8, 4), (2, 3, 3), ("ECM", "TCM", "HCU", "BMS", "ESP", "EPB", "ACC", "TMS"),
     0x200, 0x27F),
    (100, 27, (8, 6, 4, 5), (2, 2, 3, 2), ("ECM", "TCM", "HCU", "INV", "BMS", "DCDC", "ESP",
                                            "EPS", "TMS", "IC", "GW"), 0x280, 0x3FF),
    (200, 20, (8, 6, 4), (4, 3, 2), ("ECM", "TCM", "BMS", "EPB", "AWD", "TMS", "IC", "GW"),
     0x400, 0x47F),
    (500, 12, (8, 4), (5, 3), ("ECM", "BMS", "OBC", "TMS", "IC", "GW"), 0x480, 0x4FF),
    (1000, 48, (8, 8, 6), (7, 5, 4), tuple(e for e in ECUS if e != "TCU"), 0x500, 0x5FF),
]
EVENT_MESSAGES_PER_ECU = 10

NEW_SYMBOLS = [
    "NS_DESC_", "CM_", "BA_DEF_", "BA_", "VAL_", "CAT_DEF_", "CAT_", "FILTER", "BA_DEF_DEF_",
    "EV_DATA_", "ENVVAR_DATA_", "SGTYPE_", "SGTYPE_VAL_", "BA_DEF_SGTYPE_", "BA_SGTYPE_",
    "SIG_TYPE_REF_", "VAL_TABLE_", "SIG_GROUP_", "SIG_VALTYPE_", "SIGTYPE_VALTYPE_", "BO_TX_BU_",
    "BA_DEF_REL_", "BA_REL_", "BA_DEF_DEF_REL_", "BU_SG_REL_", "BU_EV_REL_", "BU_BO_REL_",
    "SG_MUL_VAL_",
]


def _shape_signal(msg: str, k: int, seq: int) -> Sig:
    """k-th data signal of a filler message; seq spreads the shapes over the database."""
    if (seq + k) % 7 == 6:
        stem, names = STATES[(seq + k) % len(STATES)]
        return Sig(f"{msg}_{stem}{k + 1}", 3, choices=names)
    stem, bits, scale, offset, unit, signed, lo, hi = SHAPES[(seq * 5 + k) % len(SHAPES)]
    return Sig(f"{msg}_{stem}{k + 1}", bits, scale, offset, unit, signed, lo, hi)


def _fits(sigs: list[Sig], dlc: int) -> bool:
    try:
        _layout(Msg(0, "probe", dlc, "ECM", None, sigs))
    except ValueError:
        return False
    return True


def filler_messages(used_ids: set[int]) -> list[Msg]:
    out: list[Msg] = []
    number: dict[str, int] = {}
    seq = 0

    def next_name(ecu: str) -> str:
        number[ecu] = number.get(ecu, 0) + 1
        return f"{ecu}_{number[ecu]:02d}"

    for cycle, count, dlcs, n_data, ecus, first_id, last_id in PERIODIC_BUCKETS:
        fid = first_id
        for i in range(count):
            while fid in used_ids:
                fid += 1
            if fid > last_id:
                raise ValueError(f"no frame id left for {cycle} ms")
            ecu = ecus[i % len(ecus)]
            name = next_name(ecu)
            dlc = dlcs[i % len(dlcs)]
            data = [_shape_signal(name, k, seq) for k in range(n_data[i % len(n_data)])]
            while True:
                # Fast frames are E2E protected (alive counter; CRC too from 6 bytes up),
                # except 2-byte raw sensor frames.
                sigs = data + ([_counter(name)] if cycle <= 20 and dlc >= 3 else []) \
                    + ([_crc(name)] if cycle <= 20 and dlc >= 6 else [])
                if _fits(sigs, dlc):
                    break
                if dlc < 8:
                    dlc += 1
                else:
                    data.pop()
            out.append(Msg(fid, name, dlc, ecu, cycle, sigs, big_endian=ecu in BIG_ENDIAN_ECUS))
            used_ids.add(fid)
            fid += 1
            seq += 1

    # Without a cycle time: event-driven and configuration messages, network management,
    # UDS diagnostics (11-bit physical addressing and 29-bit normal-fixed addressing).
    fid = 0x600
    for e_index, ecu in enumerate(ECUS):
        for j in range(EVENT_MESSAGES_PER_ECU):
            name = next_name(ecu)
            sigs = [_shape_signal(name, k, seq) for k in range(2 + (j + e_index) % 5)]
            dlc = 8
            while not _fits(sigs, dlc):
                sigs.pop()
            out.append(Msg(fid, name, dlc, ecu, None, sigs, send_type="OnEvent",
                           big_endian=ecu in BIG_ENDIAN_ECUS))
            fid += 1
            seq += 1
    for e_index, ecu in enumerate(ECUS):
        out.append(Msg(0x6C0 + e_index, f"NM_{ecu}", 8, ecu, None, [
            Sig(f"NM_{ecu}_SourceNode", 8, maximum=255),
            Sig(f"NM_{ecu}_RepeatMessageRequest", 1),
            Sig(f"NM_{ecu}_ActiveWakeup", 1),
            Sig(f"NM_{ecu}_PartialNetworkInfo", 1),
            Sig(f"NM_{ecu}_UserData", 40, maximum=2**40 - 1),
        ], send_type="OnEvent", comment=f"AUTOSAR network management PDU of the {ecu}."))
    for e_index, ecu in enumerate(e for e in ECUS if e != "TCU"):
        request, response = 0x700 + 8 * e_index, 0x700 + 8 * e_index + 0x80
        addr = 0x10 + e_index
        for fid_, name, sender, is_ext in (
            (request, f"{ecu}_DiagRequest", "TCU", False),
            (response, f"{ecu}_DiagResponse", ecu, False),
            (0x18DA00F1 | addr << 8, f"{ecu}_UdsRequestExt", "TCU", True),
            (0x18DAF100 | addr, f"{ecu}_UdsResponseExt", ecu, True),
        ):
            prefix = name.split("_", 1)[1]
            out.append(Msg(fid_, name, 8, sender, None, [
                Sig(f"{prefix}_PCI", 8, maximum=255),
                Sig(f"{prefix}_ServiceId", 8, maximum=255),
                Sig(f"{prefix}_Payload", 48, maximum=2**48 - 1),
            ], big_endian=True, extended=is_ext, send_type="OnEvent",
                comment=f"UDS {'request to' if sender == 'TCU' else 'response of'} the {ecu}"
                        f"{' (29-bit normal fixed addressing)' if is_ext else ''}."))
    out.append(Msg(0x7DF, "OBD_FunctionalRequest", 8, "TCU", None, [
        Sig("ObdReq_PCI", 8, maximum=255), Sig("ObdReq_ServiceId", 8, maximum=255),
        Sig("ObdReq_Payload", 48, maximum=2**48 - 1),
    ], big_endian=True, send_type="OnEvent", comment="OBD-II functional request."))
    # The plug-in charger speaks a J1939-style protocol on 29-bit identifiers.
    out.append(Msg(0x18FF50E5, "OBC_ChargerStatus", 8, "OBC", 1000, [
        Sig("OBC_OutputVoltage", 16, 0.1, unit="V", maximum=500),
        Sig("OBC_OutputCurrent", 16, 0.1, unit="A", maximum=40),
        Sig("OBC_ChargeState", 8, choices=("Idle", "Charging", "Complete", "Fault")),
    ], big_endian=True, extended=True, comment="Charger status (29-bit identifier)."))
    out.append(Msg(0x1806E5F4, "BMS_ChargeRequest", 8, "BMS", 1000, [
        Sig("MaxChargeVoltage", 16, 0.1, unit="V", maximum=500),
        Sig("MaxChargeCurrent", 16, 0.1, unit="A", maximum=40),
        Sig("ChargeControl", 8, choices=("Start", "Stop"), start_raw=1),
    ], big_endian=True, extended=True, comment="Charge limits to the charger (29-bit identifier)."))
    return out


def all_messages() -> list[Msg]:
    core = core_messages()
    messages = core + filler_messages({m.frame_id for m in core})
    for msg in messages:
        msg.starts = _layout(msg)
    return messages


def _layout(msg: Msg) -> dict[str, int]:
    """DBC start bits: signals packed in order, CRC in the last byte.

    Signals of 8 bits or more start on a byte boundary when everything still fits that
    way; otherwise the message is packed tightly (like ESP_WheelSpeeds).
    """
    total = msg.dlc * 8
    body = [s for s in msg.signals if not s.name.endswith("_CRC")]
    crc = [s for s in msg.signals if s.name.endswith("_CRC")]
    limit = total - 8 * len(crc)
    for align in (True, False):
        starts: dict[str, int] = {}
        pos = 0  # Intel: bit number; Motorola: position in the MSB-first bit stream
        for sig in body:
            if align and sig.length >= 8 and pos % 8:
                pos = (pos + 7) // 8 * 8
            starts[sig.name] = _start_bit(pos, msg.big_endian)
            pos += sig.length
        if pos <= limit:
            for sig in crc:
                starts[sig.name] = _start_bit(total - 8, msg.big_endian)
            return starts
    raise ValueError(f"{msg.name}: signals do not fit in {msg.dlc} bytes")


def _start_bit(stream_pos: int, big_endian: bool) -> int:
    if not big_endian:
        return stream_pos
    return (stream_pos // 8) * 8 + 7 - stream_pos % 8


def _num(x: float) -> str:
    return f"{x:.12g}"


def _limits(sig: Sig) -> tuple[float, float]:
    if sig.choices:
        return 0, len(sig.choices) - 1
    raw_lo, raw_hi = ((-(2 ** (sig.length - 1)), 2 ** (sig.length - 1) - 1) if sig.signed
                      else (0, 2 ** sig.length - 1))
    lo = sig.minimum if sig.minimum is not None else raw_lo * sig.scale + sig.offset
    hi = sig.maximum if sig.maximum is not None else raw_hi * sig.scale + sig.offset
    return lo, hi


def _dbc_id(msg: Msg) -> int:
    return msg.frame_id | 0x80000000 if msg.extended else msg.frame_id


def render(messages: list[Msg] | None = None) -> str:
    messages = all_messages() if messages is None else messages
    out = ['VERSION "busy_bus powertrain 9.0"', "", "", "NS_ :"]
    out += [f"\t{k}" for k in NEW_SYMBOLS]
    out += ["", "BS_:", "", "BU_: " + " ".join(ECUS), "", ""]
    for msg in messages:
        out.append(f"BO_ {_dbc_id(msg)} {msg.name}: {msg.dlc} {msg.sender}")
        order = "0" if msg.big_endian else "1"
        for sig in msg.signals:
            lo, hi = _limits(sig)
            out.append(
                f" SG_ {sig.name} : {msg.starts[sig.name]}|{sig.length}@{order}"
                f"{'-' if sig.signed else '+'} ({_num(sig.scale)},{_num(sig.offset)}) "
                f'[{_num(lo)}|{_num(hi)}] "{sig.unit}" {RECEIVERS[msg.sender]}'
            )
        out.append("")
    out += ["", ""]
    out.append('CM_ "Benchmark database: powertrain bus of a parallel-hybrid car, 500 kbit/s. '
               'Generated by scripts/gen_busy_bus_dbc.py; do not edit by hand.";')
    for ecu, text in ECUS.items():
        out.append(f'CM_ BU_ {ecu} "{text}.";')
    for msg in messages:
        if msg.comment:
            out.append(f'CM_ BO_ {_dbc_id(msg)} "{msg.comment}";')
        for sig in msg.signals:
            if sig.comment:
                out.append(f'CM_ SG_ {_dbc_id(msg)} {sig.name} "{sig.comment}";')
    out += [
        'BA_DEF_  "BusType" STRING ;',
        'BA_DEF_  "DBName" STRING ;',
        'BA_DEF_ BO_  "GenMsgCycleTime" INT 0 65535;',
        'BA_DEF_ BO_  "GenMsgSendType" ENUM  "Cyclic","OnEvent","IfActive","NoMsgSendType";',
        'BA_DEF_ BO_  "VFrameFormat" ENUM  "StandardCAN","ExtendedCAN","reserved","J1939PG",'
        + ",".join(['"reserved"'] * 10) + ',"StandardCAN_FD","ExtendedCAN_FD";',
        'BA_DEF_ SG_  "GenSigStartValue" FLOAT -1000000000 1000000000;',
        'BA_DEF_DEF_  "BusType" "CAN";',
        'BA_DEF_DEF_  "DBName" "";',
        'BA_DEF_DEF_  "GenMsgCycleTime" 0;',
        'BA_DEF_DEF_  "GenMsgSendType" "Cyclic";',
        'BA_DEF_DEF_  "VFrameFormat" "StandardCAN";',
        'BA_DEF_DEF_  "GenSigStartValue" 0;',
        'BA_ "BusType" "CAN";',
        'BA_ "DBName" "busy_bus";',
    ]
    for msg in messages:
        if msg.cycle_ms is not None:
            out.append(f'BA_ "GenMsgCycleTime" BO_ {_dbc_id(msg)} {msg.cycle_ms};')
        if msg.send_type != "Cyclic":
            out.append(f'BA_ "GenMsgSendType" BO_ {_dbc_id(msg)} 1;')
        if msg.extended:
            out.append(f'BA_ "VFrameFormat" BO_ {_dbc_id(msg)} 1;')
        for sig in msg.signals:
            if sig.start_raw is not None:
                out.append(f'BA_ "GenSigStartValue" SG_ {_dbc_id(msg)} {sig.name} {sig.start_raw};')
    for msg in messages:
        for sig in msg.signals:
            if sig.choices:
                pairs = " ".join(f'{i} "{c}"' for i, c in enumerate(sig.choices))
                out.append(f"VAL_ {_dbc_id(msg)} {sig.name} {pairs} ;")
    return "\n".join(out) + "\n"


def frame_bits(dlc: int, extended: bool) -> float:
    """Bits on the wire for one classic CAN frame, with the stuffing allowance."""
    return ((67 if extended else 47) + 8 * dlc) * STUFFING


def totals(messages: list[Msg]) -> dict[str, float]:
    periodic = [m for m in messages if m.cycle_ms]
    fps = sum(1000 / m.cycle_ms for m in periodic if m.cycle_ms)
    sps = sum(1000 / m.cycle_ms * len(m.signals) for m in periodic if m.cycle_ms)
    bits = sum(1000 / m.cycle_ms * frame_bits(m.dlc, m.extended) for m in periodic if m.cycle_ms)
    core = {m.name for m in core_messages()}
    core_fps = sum(1000 / m.cycle_ms for m in periodic if m.name in core and m.cycle_ms)
    return {
        "messages": len(messages),
        "periodic": len(periodic),
        "signals": sum(len(m.signals) for m in messages),
        "frames_per_s": fps,
        "signals_per_s": sps,
        "bus_load": bits / BITRATE,
        "core_share": core_fps / fps,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true",
                        help="do not write; exit 1 if the committed file differs")
    parser.add_argument("output", nargs="?", type=Path, default=OUTPUT)
    args = parser.parse_args(argv)
    messages = all_messages()
    text = render(messages)
    t = totals(messages)
    print(f"{t['messages']} messages ({t['periodic']} periodic), {t['signals']} signals; "
          f"{t['frames_per_s']:.0f} frames/s, {t['signals_per_s']:.0f} signals/s, "
          f"bus load {100 * t['bus_load']:.1f} % of {BITRATE // 1000} kbit/s; "
          f"catalog messages {100 * t['core_share']:.0f} % of frames")
    if args.check:
        current = args.output.read_bytes().decode() if args.output.exists() else ""
        if current != text:
            print(f"{args.output} is stale: run scripts/gen_busy_bus_dbc.py", file=sys.stderr)
            return 1
        return 0
    args.output.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.output.with_suffix(".dbc.tmp")
    tmp.write_bytes(text.encode())
    tmp.replace(args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
