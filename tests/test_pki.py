"""Development PKI: file permissions, the vehicle CSR flow, what the CA will and won't sign."""

from __future__ import annotations

import os
import stat
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from agent import pki
from agent.cli.main import main
from agent.errors import EX_CONFIG, ConfigError, RejectedInput

VIN = "WVWZZZ1JZXW000001"


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


E = TypeVar("E", bound=x509.ExtensionType)


def ext(cert: x509.Certificate, cls: type[E]) -> E:
    return cert.extensions.get_extension_for_class(cls).value


def test_dev_setup_cli_writes_a_consistent_pki_with_private_keys_0600(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    d = tmp_path / "fleet"
    assert main(["pki", "dev-setup", "--dir", str(d), "--vehicle-id", VIN]) == 0
    out = capsys.readouterr().out
    layout = pki.PkiDir(d)
    names = ["ca", "broker", "backend", VIN]
    for name in names:
        key_path = layout.ca_key if name == "ca" else layout.key(name)
        cert_path = layout.ca_cert if name == "ca" else layout.cert(name)
        assert mode(key_path) == 0o600, key_path
        assert mode(cert_path) == 0o644, cert_path
        assert f"wrote {key_path}" in out
    # no temporary files left behind by the atomic writes
    assert sorted(p.name for p in d.iterdir() if p.name.startswith(".")) == []

    ca = pki.load_certificate(layout.ca_cert)
    assert ext(ca, x509.BasicConstraints) == x509.BasicConstraints(ca=True, path_length=0)
    ca_public = ca.public_key()
    assert isinstance(ca_public, ec.EllipticCurvePublicKey)
    assert isinstance(ca_public.curve, ec.SECP256R1)

    broker = pki.load_certificate(layout.cert("broker"))
    broker.verify_directly_issued_by(ca)
    san = ext(broker, x509.SubjectAlternativeName)
    assert san.get_values_for_type(x509.DNSName) == ["localhost"]
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    assert list(ext(broker, x509.ExtendedKeyUsage)) == [ExtendedKeyUsageOID.SERVER_AUTH]

    for client in ("backend", VIN):
        cert = pki.load_certificate(layout.cert(client))
        cert.verify_directly_issued_by(ca)
        assert pki.common_name(cert.subject) == client
        assert ext(cert, x509.BasicConstraints) == x509.BasicConstraints(ca=False, path_length=None)
        assert list(ext(cert, x509.ExtendedKeyUsage)) == [ExtendedKeyUsageOID.CLIENT_AUTH]


def test_broker_cli_takes_extra_names(tmp_path: Path) -> None:
    d = tmp_path / "fleet"
    assert main(["pki", "init-ca", "--dir", str(d)]) == 0
    assert main(["pki", "broker", "--dir", str(d), "--host", "mqtt.example.net",
                 "--host", "localhost", "--ip", "10.0.0.7"]) == 0
    san = ext(pki.load_certificate(pki.PkiDir(d).cert("broker")), x509.SubjectAlternativeName)
    assert san.get_values_for_type(x509.DNSName) == ["mqtt.example.net", "localhost"]
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["10.0.0.7"]


def test_keys_are_0600_even_with_a_permissive_umask(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        pki.write_private_key(tmp_path / "k.key", pki.generate_private_key())
        pki.write_private_key(tmp_path / "k.key", pki.generate_private_key())  # replace
    finally:
        os.umask(old)
    assert mode(tmp_path / "k.key") == 0o600
    assert [p.name for p in tmp_path.iterdir()] == ["k.key"]


def test_init_ca_refuses_to_replace_an_existing_ca(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    d = tmp_path / "fleet"
    assert main(["pki", "init-ca", "--dir", str(d)]) == 0
    before = (d / "ca.key").read_bytes()
    assert main(["pki", "init-ca", "--dir", str(d)]) == 1
    assert "already exists" in capsys.readouterr().err
    assert (d / "ca.key").read_bytes() == before


def test_signing_without_a_ca_is_a_config_error(tmp_path: Path) -> None:
    pki.create_vehicle_key(tmp_path / "v.key", tmp_path / "v.csr", VIN)
    code = main(["pki", "sign-csr", "--ca-dir", str(tmp_path / "none"), "--csr",
                 str(tmp_path / "v.csr"), "--out", str(tmp_path / "v.crt")])
    assert code == EX_CONFIG
    assert not (tmp_path / "v.crt").exists()


# ----------------------------------------------------------------- key permission check


@pytest.mark.parametrize(
    ("file_mode", "who"), [(0o644, "group and others"), (0o640, "group"), (0o604, "others")]
)
def test_check_private_key_file_rejects_readable_keys_with_the_fix(
    tmp_path: Path, file_mode: int, who: str
) -> None:
    key = tmp_path / "vehicle.key"
    pki.write_private_key(key, pki.generate_private_key())
    key.chmod(file_mode)
    with pytest.raises(ConfigError) as err:
        pki.check_private_key_file(key)
    message = str(err.value)
    assert f"accessible by {who}" in message
    assert f"mode {file_mode:04o}" in message
    assert f"chmod 600 {key}" in message


def test_check_private_key_file_accepts_0600_and_rejects_missing_or_odd(tmp_path: Path) -> None:
    key = tmp_path / "vehicle.key"
    pki.write_private_key(key, pki.generate_private_key())
    pki.check_private_key_file(key)  # 0600: fine
    key.chmod(0o400)
    pki.check_private_key_file(key)  # read-only for the owner is fine too
    with pytest.raises(ConfigError, match="does not exist"):
        pki.check_private_key_file(tmp_path / "missing.key")
    with pytest.raises(ConfigError, match="not a regular file"):
        pki.check_private_key_file(tmp_path)


# ----------------------------------------------------------------- CSR flow


def test_csr_flow_key_never_leaves_the_vehicle_key_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    fleet, vehicle = tmp_path / "fleet", tmp_path / "vehicle"
    assert main(["pki", "init-ca", "--dir", str(fleet)]) == 0
    key_path = vehicle / "identity" / "vehicle.key"
    assert main(["pki", "vehicle-key", "--key", str(key_path), "--vehicle-id", VIN]) == 0
    csr_path = key_path.with_suffix(".csr")
    # the CSR goes to the fleet; only it crosses over
    shipped = fleet / "incoming.csr"
    shipped.write_bytes(csr_path.read_bytes())
    cert_path = fleet / "issued.crt"
    assert main(["pki", "sign-csr", "--ca-dir", str(fleet), "--csr", str(shipped),
                 "--out", str(cert_path), "--days", "30"]) == 0
    assert f"CN={VIN}" in capsys.readouterr().out

    assert mode(key_path) == 0o600
    key = pki.load_private_key(key_path)
    cert = pki.load_certificate(cert_path)
    assert cert.public_key() == key.public_key()
    assert pki.common_name(cert.subject) == VIN
    cert.verify_directly_issued_by(pki.load_certificate(fleet / "ca.crt"))
    lifetime = cert.not_valid_after_utc - cert.not_valid_before_utc
    assert 29 <= lifetime.days <= 30

    # Exactly one file anywhere holds the vehicle's private key: its key file.
    secret = key.private_numbers().private_value.to_bytes(32, "big")
    der = key.private_bytes(
        serialization.Encoding.DER, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    key_pem = key_path.read_bytes()
    holders = [
        p for p in tmp_path.rglob("*")
        if p.is_file() and (secret in p.read_bytes() or der in p.read_bytes()
                            or key_pem in p.read_bytes())
    ]
    assert holders == [key_path]
    # and the vehicle side holds nothing else (no stray temporary copies)
    assert {p for p in vehicle.rglob("*") if p.is_file()} == {key_path, csr_path}


def test_vehicle_key_is_reused_so_renewal_keeps_the_identity(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    key_path = tmp_path / "v.key"
    assert main(["pki", "vehicle-key", "--key", str(key_path), "--vehicle-id", VIN]) == 0
    first = key_path.read_bytes()
    assert main(["pki", "vehicle-key", "--key", str(key_path), "--vehicle-id", VIN,
                 "--csr", str(tmp_path / "renew.csr")]) == 0
    assert "reused existing private key" in capsys.readouterr().out
    assert key_path.read_bytes() == first
    renewal = x509.load_pem_x509_csr((tmp_path / "renew.csr").read_bytes())
    assert renewal.public_key() == pki.load_private_key(key_path).public_key()


def test_vehicle_key_refuses_to_reuse_a_loose_key(tmp_path: Path) -> None:
    key_path = tmp_path / "v.key"
    pki.create_vehicle_key(key_path, tmp_path / "v.csr", VIN)
    key_path.chmod(0o644)
    assert main(["pki", "vehicle-key", "--key", str(key_path), "--vehicle-id", VIN]) == EX_CONFIG


@pytest.fixture
def ca(tmp_path: Path) -> pki.PkiDir:
    d = pki.PkiDir(tmp_path / "fleet")
    pki.init_ca(d)
    return d


def _csr(key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey, cn: str,
         *, ask_for_ca: bool = False) -> x509.CertificateSigningRequest:
    builder = x509.CertificateSigningRequestBuilder().subject_name(
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    )
    if ask_for_ca:
        builder = builder.add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
    return builder.sign(key, hashes.SHA256())


def test_sign_csr_ignores_requested_extensions(ca: pki.PkiDir) -> None:
    ca_key, ca_cert = ca.load_ca()
    cert = pki.sign_csr(ca_key, ca_cert, _csr(pki.generate_private_key(), VIN, ask_for_ca=True))
    assert ext(cert, x509.BasicConstraints) == x509.BasicConstraints(ca=False, path_length=None)
    with pytest.raises(x509.ExtensionNotFound):
        cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)


@pytest.mark.parametrize(
    ("make", "reason"),
    [
        (lambda: _csr(pki.generate_private_key(), "vt/other/#"), "invalid_vehicle_id"),
        (lambda: _csr(pki.generate_private_key(), "-leading-dash"), "invalid_vehicle_id"),
        (lambda: _csr(rsa.generate_private_key(65537, 2048), VIN), "csr_key_type"),
        (lambda: _csr(ec.generate_private_key(ec.SECP384R1()), VIN), "csr_key_type"),
        (lambda: x509.CertificateSigningRequestBuilder().subject_name(
            x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "x")])
        ).sign(pki.generate_private_key(), hashes.SHA256()), "csr_no_cn"),
    ],
)
def test_sign_csr_rejects_unacceptable_requests(
    ca: pki.PkiDir, make: Callable[[], x509.CertificateSigningRequest], reason: str
) -> None:
    ca_key, ca_cert = ca.load_ca()
    with pytest.raises(RejectedInput) as err:
        pki.sign_csr(ca_key, ca_cert, make())
    assert err.value.reason == reason


def test_sign_csr_rejects_a_tampered_request(ca: pki.PkiDir, tmp_path: Path) -> None:
    good = _csr(pki.generate_private_key(), VIN)
    der = good.public_bytes(serialization.Encoding.DER)
    forged = x509.load_der_x509_csr(der.replace(VIN.encode(), b"WVWZZZ1JZXW999999"))
    assert pki.common_name(forged.subject) == "WVWZZZ1JZXW999999"
    ca_key, ca_cert = ca.load_ca()
    with pytest.raises(RejectedInput) as err:
        pki.sign_csr(ca_key, ca_cert, forged)
    assert err.value.reason == "csr_bad_signature"


def test_sign_csr_cli_rejects_garbage_without_writing(
    ca: pki.PkiDir, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    garbage = tmp_path / "x.csr"
    garbage.write_bytes(b"-----BEGIN CERTIFICATE REQUEST-----\nnot base64\n")
    out = tmp_path / "x.crt"
    code = main(["pki", "sign-csr", "--ca-dir", str(ca.root), "--csr", str(garbage),
                 "--out", str(out)])
    assert code == 65
    assert "csr_malformed" in capsys.readouterr().err
    assert not out.exists()


def test_vehicle_id_rules() -> None:
    assert pki.validate_vehicle_id(VIN) == VIN
    for bad in ["", "a/b", "a+b", "a#", " VIN", "-x", "x" * 65, "a b"]:
        with pytest.raises(RejectedInput):
            pki.validate_vehicle_id(bad)
