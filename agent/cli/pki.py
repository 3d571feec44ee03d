"""``telematics-agent pki``: development PKI for the fleet CA, broker, backend and vehicles.

Typical flow (the vehicle's private key never leaves the vehicle)::

    telematics-agent pki init-ca --dir fleet/                          # fleet side
    telematics-agent pki broker --dir fleet/ --host mqtt.example.net  # fleet side
    telematics-agent pki backend --dir fleet/ --name backend          # fleet side
    telematics-agent pki vehicle-key --key /etc/telematics/vehicle.key --vehicle-id VIN
                                                                       # on the vehicle
    telematics-agent pki sign-csr --ca-dir fleet/ --csr vehicle.csr --out vehicle.crt
                                                                       # fleet side

Remote commands are signed with a separate Ed25519 key (not a TLS key)::

    telematics-agent pki command-key --key fleet/command-signing.key --kid fleet-2025-01 \
        --issuer fleet-ops --trusted-keys vehicle/trusted-command-keys.yaml
                                                                       # fleet side; the trusted
                                                                       # keys file goes to vehicles

``pki dev-setup --dir D --vehicle-id VIN`` does all of it in one directory for a demo
(``--command-key`` adds a command-signing key and its trusted keys file).
"""

from __future__ import annotations

import argparse
import datetime as dt
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from agent import pki
from agent.commands import keys
from agent.errors import ConfigError, RejectedInput
from agent.profile.loader import validate_model
from agent.profile.yamlsrc import load_yaml_file

HELP = "development PKI: fleet CA, broker and vehicle certificates"
EX_DATAERR = 65
EX_USAGE = 2

# What ``dev-setup --command-key`` provisions in the PKI directory.
DEV_COMMAND_KID: Final = "dev-1"
DEV_COMMAND_ISSUER: Final = "fleet-ops"
DEV_COMMAND_KEY_FILE: Final = "command-signing.key"
DEV_TRUSTED_KEYS_FILE: Final = "trusted-command-keys.yaml"


def _token(text: str) -> str:
    if not keys.TOKEN_RE.fullmatch(text):
        raise argparse.ArgumentTypeError(
            f"{text!r}: 1-64 characters A-Z a-z 0-9 . _ : - starting with a letter or digit")
    return text


def _aware_time(text: str) -> dt.datetime:
    try:
        value = dt.datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an ISO 8601 time, e.g. 2026-01-01T00:00:00Z") from None
    if value.tzinfo is None:
        raise argparse.ArgumentTypeError(f"{text!r} has no timezone; add Z or an offset like +01:00")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="pki_command", metavar="ACTION", required=True)

    p = sub.add_parser("init-ca", help="create the fleet CA (EC P-256, self-signed)")
    p.add_argument("--dir", type=Path, required=True, help="PKI directory (ca.key, ca.crt)")
    p.add_argument("--cn", default="Vehicle Telematics Fleet CA", help="CA common name")
    p.add_argument("--days", type=int, default=pki.DEFAULT_CA_DAYS)
    p.add_argument("--force", action="store_true", help="replace an existing CA")

    p = sub.add_parser("broker", help="issue the broker's server certificate")
    p.add_argument("--dir", type=Path, required=True, help="PKI directory holding the CA")
    p.add_argument("--host", action="append", dest="hosts", metavar="NAME",
                   help="DNS name the broker is reached by (repeatable; default localhost)")
    p.add_argument("--ip", action="append", dest="ips", metavar="ADDR",
                   help="IP address the broker is reached by (repeatable; default 127.0.0.1)")
    p.add_argument("--days", type=int, default=pki.DEFAULT_LEAF_DAYS)

    p = sub.add_parser("backend", help="issue a backend (cloud consumer) client identity")
    p.add_argument("--dir", type=Path, required=True, help="PKI directory holding the CA")
    p.add_argument("--name", default="backend", help="identity name = certificate CN")
    p.add_argument("--days", type=int, default=pki.DEFAULT_LEAF_DAYS)

    p = sub.add_parser(
        "vehicle-key",
        help="ON THE VEHICLE: create (or reuse) the private key and write a CSR",
    )
    p.add_argument("--key", type=Path, required=True, help="private key path (written 0600)")
    p.add_argument("--vehicle-id", required=True, help="vehicle id; becomes the CSR's CN")
    p.add_argument("--csr", type=Path, help="CSR path (default: key path with .csr)")

    p = sub.add_parser("sign-csr", help="fleet side: sign a vehicle's CSR")
    p.add_argument("--ca-dir", type=Path, required=True, help="PKI directory holding the CA")
    p.add_argument("--csr", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True, help="certificate to write")
    p.add_argument("--days", type=int, default=pki.DEFAULT_LEAF_DAYS)

    p = sub.add_parser(
        "command-key",
        help="fleet side: create (or reuse) an Ed25519 command-signing key and trust it",
        description="Create an Ed25519 command-signing key (PKCS#8 PEM, mode 0600; an existing key "
                    "file is reused, never replaced) and add its public entry to a trusted command keys "
                    "file (created if missing), the file a vehicle's agent config names as "
                    "commands.trusted_keys. Without --trusted-keys the entry is printed.")
    p.add_argument("--key", type=Path, required=True, help="signing key path (written 0600)")
    p.add_argument("--kid", type=_token, required=True, help="key id; every command signed with it names it")
    p.add_argument("--issuer", type=_token, required=True,
                   help="who signs with it; vehicles keep replay counters per issuer")
    p.add_argument("--trusted-keys", type=Path, metavar="FILE",
                   help="trusted command keys file to add the public entry to (created if missing)")
    p.add_argument("--not-before", type=_aware_time, metavar="ISO", help="key valid from (with a timezone)")
    p.add_argument("--not-after", type=_aware_time, metavar="ISO", help="key valid until (with a timezone)")

    p = sub.add_parser("dev-setup", help="demo: CA, broker, backend and vehicle in one dir")
    p.add_argument("--dir", type=Path, required=True)
    p.add_argument("--vehicle-id", action="append", dest="vehicle_ids", required=True,
                   help="vehicle id (repeatable)")
    p.add_argument("--backend-name", default="backend")
    p.add_argument("--host", action="append", dest="hosts", metavar="NAME")
    p.add_argument("--ip", action="append", dest="ips", metavar="ADDR")
    p.add_argument("--command-key", action="store_true",
                   help=f"also a command-signing key (kid {DEV_COMMAND_KID}, issuer {DEV_COMMAND_ISSUER}): "
                        f"DIR/{DEV_COMMAND_KEY_FILE} and DIR/{DEV_TRUSTED_KEYS_FILE}")


def _server_names(args: argparse.Namespace) -> pki.ServerNames:
    return pki.ServerNames(
        dns=tuple(args.hosts or ["localhost"]), ips=tuple(args.ips or ["127.0.0.1"])
    )


def _say(*paths: Path) -> None:
    for path in paths:
        print(f"wrote {path}")


def run(args: argparse.Namespace) -> int:
    try:
        return _ACTIONS[args.pki_command](args)
    except RejectedInput as exc:
        print(f"rejected: {exc}", file=sys.stderr)
        return EX_DATAERR


def _init_ca(args: argparse.Namespace) -> int:
    d = pki.PkiDir(args.dir)
    if not pki.init_ca(d, args.cn, args.days, force=args.force):
        print(f"a CA already exists in {args.dir} (use --force to replace it)", file=sys.stderr)
        return 1
    _say(d.ca_key, d.ca_cert)
    return 0


def _broker(args: argparse.Namespace) -> int:
    d = pki.PkiDir(args.dir)
    _say(*pki.issue_identity(d, "broker", server=_server_names(args), days=args.days))
    return 0


def _backend(args: argparse.Namespace) -> int:
    pki.validate_vehicle_id(args.name)  # same character rules: it is a CN and a username
    _say(*pki.issue_identity(pki.PkiDir(args.dir), args.name, days=args.days))
    return 0


def _vehicle_key(args: argparse.Namespace) -> int:
    csr_path: Path = args.csr or args.key.with_suffix(".csr")
    created = pki.create_vehicle_key(args.key, csr_path, args.vehicle_id)
    print(f"{'created' if created else 'reused existing'} private key {args.key}")
    _say(csr_path)
    print("send the CSR (never the key) to the fleet CA: pki sign-csr")
    return 0


def _sign_csr(args: argparse.Namespace) -> int:
    cert = pki.sign_csr_file(pki.PkiDir(args.ca_dir), args.csr, args.out, args.days)
    _say(args.out)
    cn = pki.common_name(cert.subject)
    print(f"subject CN={cn} valid until {cert.not_valid_after_utc.isoformat()}")
    return 0


def _dev_setup(args: argparse.Namespace) -> int:
    d = pki.PkiDir(args.dir)
    _say(*pki.dev_setup(d, args.vehicle_ids, backend_name=args.backend_name,
                        server=_server_names(args)))
    if args.command_key:
        outcome = provision_command_key(d.root / DEV_COMMAND_KEY_FILE, kid=DEV_COMMAND_KID,
                                        issuer=DEV_COMMAND_ISSUER, trusted_keys=d.root / DEV_TRUSTED_KEYS_FILE)
        _report_command_key(outcome)
    return 0


@dataclass(frozen=True)
class CommandKeyOutcome:
    """What :func:`provision_command_key` did."""

    key_path: Path
    entry: keys.TrustedKeyEntry
    created: bool  # False: an existing key file was reused
    trusted_keys: Path | None
    added: bool  # False: no trusted keys file given, or the same entry was already in it


def _trusted_entries(path: Path) -> list[keys.TrustedKeyEntry]:
    if not path.exists():
        return []
    data, source = load_yaml_file(path)
    spec: keys.TrustedKeysFile = validate_model(keys.TrustedKeysFile, data, source)
    return list(spec.keys)


def _same_key(a: keys.TrustedKeyEntry, b: keys.TrustedKeyEntry) -> bool:
    return keys.raw_public_key(keys.TrustedKey.from_entry(a).public_key) == keys.raw_public_key(
        keys.TrustedKey.from_entry(b).public_key)


def provision_command_key(key_path: Path, *, kid: str, issuer: str, trusted_keys: Path | None = None,
                          not_before: dt.datetime | None = None,
                          not_after: dt.datetime | None = None) -> CommandKeyOutcome:
    """Create (or reuse) a command-signing key and add its entry to ``trusted_keys``.

    Re-running with the same arguments changes nothing (dev-setup is repeatable). A kid
    already naming another key in the trusted keys file is a ConfigError, found before a
    new key is written; ValueError (pydantic's) for an impossible validity window.
    """
    existing = _trusted_entries(trusted_keys) if trusted_keys is not None else []
    same_kid = next((e for e in existing if e.kid == kid), None)
    created = not key_path.exists()
    if created:
        if same_kid is not None and trusted_keys is not None:
            raise ConfigError.single(str(trusted_keys), f"kid {kid!r} already names another key here; give "
                                     "a new key a new kid")
        entry = keys.generate_signing_key(key_path, kid=kid, issuer=issuer, not_before=not_before,
                                          not_after=not_after)
    else:
        entry = keys.public_entry(keys.load_signing_key(key_path), kid=kid, issuer=issuer,
                                  not_before=not_before, not_after=not_after)
    if trusted_keys is None:
        return CommandKeyOutcome(key_path, entry, created, None, False)
    if same_kid is not None:
        if _same_key(same_kid, entry) and same_kid.issuer == issuer:
            return CommandKeyOutcome(key_path, entry, created, trusted_keys, False)
        raise ConfigError.single(str(trusted_keys), f"kid {kid!r} already names a different key or issuer "
                                 f"({same_kid.issuer}) here; {key_path} does not match it")
    keys.add_trusted_key(trusted_keys, entry)
    return CommandKeyOutcome(key_path, entry, created, trusted_keys, True)


def _report_command_key(outcome: CommandKeyOutcome) -> None:
    entry = outcome.entry
    if outcome.created:
        _say(outcome.key_path)
    else:
        print(f"reused existing signing key {outcome.key_path}")
    if outcome.trusted_keys is None:
        print("add this entry under `keys:` in each vehicle's trusted command keys file:")
        print(entry.to_yaml(), end="")
    elif outcome.added:
        print(f"added kid {entry.kid} (issuer {entry.issuer}) to {outcome.trusted_keys}")
    else:
        print(f"kid {entry.kid} (issuer {entry.issuer}) already trusted in {outcome.trusted_keys}")
    if outcome.trusted_keys is not None:
        print(f"vehicles: set commands.trusted_keys to a copy of {outcome.trusted_keys} (not writable by "
              "group or others)")
    print(f"sign commands with: telematics-sim backend ... command --signing-key {outcome.key_path} "
          f"--kid {entry.kid}")


def _command_key(args: argparse.Namespace) -> int:
    if args.not_before is not None and args.not_after is not None and args.not_before >= args.not_after:
        print("error: --not-before must be earlier than --not-after", file=sys.stderr)
        return EX_USAGE
    outcome = provision_command_key(args.key, kid=args.kid, issuer=args.issuer, trusted_keys=args.trusted_keys,
                                    not_before=args.not_before, not_after=args.not_after)
    _report_command_key(outcome)
    return 0


_ACTIONS: dict[str, Callable[[argparse.Namespace], int]] = {
    "init-ca": _init_ca,
    "broker": _broker,
    "backend": _backend,
    "vehicle-key": _vehicle_key,
    "sign-csr": _sign_csr,
    "command-key": _command_key,
    "dev-setup": _dev_setup,
}
