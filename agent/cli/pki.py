"""``telematics-agent pki``: development PKI for the fleet CA, broker, backend and vehicles.

Typical flow (the vehicle's private key never leaves the vehicle)::

    telematics-agent pki init-ca --dir fleet/                          # fleet side
    telematics-agent pki broker --dir fleet/ --host mqtt.example.net  # fleet side
    telematics-agent pki backend --dir fleet/ --name backend          # fleet side
    telematics-agent pki vehicle-key --key /etc/telematics/vehicle.key --vehicle-id VIN
                                                                       # on the vehicle
    telematics-agent pki sign-csr --ca-dir fleet/ --csr vehicle.csr --out vehicle.crt
                                                                       # fleet side

``pki dev-setup --dir D --vehicle-id VIN`` does all of it in one directory for a demo.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

from agent import pki
from agent.errors import RejectedInput

HELP = "development PKI: fleet CA, broker and vehicle certificates"
EX_DATAERR = 65


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

    p = sub.add_parser("dev-setup", help="demo: CA, broker, backend and vehicle in one dir")
    p.add_argument("--dir", type=Path, required=True)
    p.add_argument("--vehicle-id", action="append", dest="vehicle_ids", required=True,
                   help="vehicle id (repeatable)")
    p.add_argument("--backend-name", default="backend")
    p.add_argument("--host", action="append", dest="hosts", metavar="NAME")
    p.add_argument("--ip", action="append", dest="ips", metavar="ADDR")


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
    return 0


_ACTIONS: dict[str, Callable[[argparse.Namespace], int]] = {
    "init-ca": _init_ca,
    "broker": _broker,
    "backend": _backend,
    "vehicle-key": _vehicle_key,
    "sign-csr": _sign_csr,
    "dev-setup": _dev_setup,
}
