"""Identity and keys: the fleet CA, broker, backend and vehicle certificates.

The vehicle's private key is generated on the vehicle and never leaves its key file: the
vehicle writes a certificate signing request (CSR) whose CN is its vehicle id, the fleet
side signs it (:func:`sign_csr`) and hands back only the certificate. Every private key
is written 0600 through a temporary file and ``os.replace`` so a reader never sees a
half-written or briefly world-readable key.

Certificates are EC P-256 / ECDSA-SHA256. What is signed is decided here, not by the CSR:
only the CN is taken from a CSR; its requested extensions are ignored so a vehicle cannot
ask for a CA certificate or a server name.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import ipaddress
import os
import re
import stat
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from agent.errors import ConfigError, RejectedInput
from agent.sqlitefiles import fsync_dir

# A vehicle id becomes an MQTT client id, a topic level and a certificate CN: no topic
# separators or wildcards, no whitespace, bounded length.
VEHICLE_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,63}$")

DEFAULT_CA_DAYS = 3650
DEFAULT_LEAF_DAYS = 825
# Certificates start a little in the past so a verifier whose clock lags slightly
# does not reject a certificate issued a moment ago.
_BACKDATE = dt.timedelta(minutes=5)


def validate_vehicle_id(vehicle_id: str) -> str:
    """Return ``vehicle_id`` if it can safely be a client id, topic level and CN."""
    if not VEHICLE_ID_RE.fullmatch(vehicle_id):
        raise RejectedInput(
            "invalid_vehicle_id",
            f"{vehicle_id!r}: use 1-64 characters A-Z a-z 0-9 . _ : - starting with a "
            "letter or digit (it becomes an MQTT topic level, so no '/', '+', '#')",
        )
    return vehicle_id


# --------------------------------------------------------------------------- files


def write_atomic(path: Path, data: bytes, mode: int) -> None:
    """Write ``data`` to ``path`` with exactly ``mode``, replacing any old file atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        # mkstemp creates 0600; set the final mode on the descriptor before any data
        # lands, independent of the umask.
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_name)
        raise
    fsync_dir(path.parent)


def write_private_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    """Write an unencrypted PKCS#8 PEM private key, mode 0600."""
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    write_atomic(path, pem, 0o600)


def write_certificate(path: Path, cert: x509.Certificate) -> None:
    write_atomic(path, cert.public_bytes(serialization.Encoding.PEM), 0o644)


def write_csr(path: Path, csr: x509.CertificateSigningRequest) -> None:
    write_atomic(path, csr.public_bytes(serialization.Encoding.PEM), 0o644)


def check_private_key_file(path: Path | str) -> None:
    """Refuse a private key that is missing, not a regular file, or readable by others.

    Raises :class:`ConfigError` with the reason and the command that fixes it.
    """
    key_path = Path(path)
    try:
        st = key_path.stat()
    except FileNotFoundError:
        raise ConfigError.single(str(key_path), "private key file does not exist") from None
    except OSError as exc:
        raise ConfigError.single(
            str(key_path), f"cannot stat private key file: {exc.strerror}"
        ) from None
    if not stat.S_ISREG(st.st_mode):
        raise ConfigError.single(str(key_path), "private key path is not a regular file")
    loose = stat.S_IMODE(st.st_mode) & 0o077
    if loose:
        who = " and ".join(
            w for w, bits in (("group", 0o070), ("others", 0o007)) if loose & bits
        )
        raise ConfigError.single(
            str(key_path),
            f"private key is accessible by {who} (mode {stat.S_IMODE(st.st_mode):04o}); "
            f"anyone who can read it can impersonate this identity. "
            f"Run: chmod 600 {key_path}",
        )


def load_private_key(path: Path) -> ec.EllipticCurvePrivateKey:
    try:
        key = serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
    except FileNotFoundError:
        raise ConfigError.single(str(path), "private key file does not exist") from None
    except (ValueError, TypeError) as exc:
        raise ConfigError.single(str(path), f"not an unencrypted PEM private key: {exc}") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ConfigError.single(str(path), "private key is not an EC key")
    return key


def load_certificate(path: Path | str) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(Path(path).read_bytes())
    except FileNotFoundError:
        raise ConfigError.single(str(path), "certificate file does not exist") from None
    except ValueError as exc:
        raise ConfigError.single(str(path), f"not a PEM certificate: {exc}") from None


def common_name(name: x509.Name) -> str | None:
    attrs = name.get_attributes_for_oid(NameOID.COMMON_NAME)
    if not attrs:
        return None
    value = attrs[0].value
    return value if isinstance(value, str) else value.decode("utf-8", "replace")


# --------------------------------------------------------------------------- issuing


def generate_private_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _name(cn: str, org: str = "Vehicle Telematics") -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, org),
            x509.NameAttribute(NameOID.COMMON_NAME, cn),
        ]
    )


def create_ca(
    common_name: str = "Vehicle Telematics Fleet CA",
    days: int = DEFAULT_CA_DAYS,
    key: ec.EllipticCurvePrivateKey | None = None,
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """A self-signed CA that may sign leaf certificates only (path length 0)."""
    key = key or generate_private_key()
    now = dt.datetime.now(dt.UTC)
    subject = _name(common_name)
    public = key.public_key()
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _BACKDATE)
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .sign(key, hashes.SHA256())
    )
    return key, cert


@dataclass(frozen=True)
class ServerNames:
    """Subject alternative names of a server certificate."""

    dns: tuple[str, ...] = ("localhost",)
    ips: tuple[str, ...] = ("127.0.0.1",)


def issue_certificate(
    ca_key: ec.EllipticCurvePrivateKey,
    ca_cert: x509.Certificate,
    public_key: ec.EllipticCurvePublicKey,
    subject_cn: str,
    *,
    days: int = DEFAULT_LEAF_DAYS,
    server: ServerNames | None = None,
    not_before: dt.datetime | None = None,
) -> x509.Certificate:
    """Sign a leaf certificate: a TLS client, or a TLS server when ``server`` is given.

    ``not_before`` exists so tests can issue certificates that are already expired.
    """
    start = not_before if not_before is not None else dt.datetime.now(dt.UTC) - _BACKDATE
    eku = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(subject_cn))
        .issuer_name(ca_cert.subject)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(start + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([eku]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
    )
    if server is not None:
        sans: list[x509.GeneralName] = [x509.DNSName(d) for d in server.dns]
        sans += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in server.ips]
        if not sans:
            raise ValueError("a server certificate needs at least one DNS name or IP address")
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    return builder.sign(ca_key, hashes.SHA256())


def make_csr(key: ec.EllipticCurvePrivateKey, vehicle_id: str) -> x509.CertificateSigningRequest:
    validate_vehicle_id(vehicle_id)
    return (
        x509.CertificateSigningRequestBuilder()
        .subject_name(_name(vehicle_id))
        .sign(key, hashes.SHA256())
    )


def load_csr(path: Path) -> x509.CertificateSigningRequest:
    """Read a CSR from a vehicle; anything malformed is rejected with a reason."""
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        raise RejectedInput("csr_missing", f"{path} does not exist") from None
    try:
        return x509.load_pem_x509_csr(data)
    except ValueError as exc:
        raise RejectedInput("csr_malformed", f"{path} is not a PEM CSR: {exc}") from None


def sign_csr(
    ca_key: ec.EllipticCurvePrivateKey,
    ca_cert: x509.Certificate,
    csr: x509.CertificateSigningRequest,
    days: int = DEFAULT_LEAF_DAYS,
) -> x509.Certificate:
    """Issue a vehicle client certificate for a CSR after checking it.

    The CSR must carry a valid self-signature (proof the requester holds the key), an EC
    P-256 public key and a CN that is a valid vehicle id.
    """
    if not csr.is_signature_valid:
        raise RejectedInput("csr_bad_signature", "CSR signature does not verify")
    public = csr.public_key()
    if not isinstance(public, ec.EllipticCurvePublicKey) or not isinstance(
        public.curve, ec.SECP256R1
    ):
        raise RejectedInput("csr_key_type", "CSR public key must be EC P-256")
    cn = common_name(csr.subject)
    if cn is None:
        raise RejectedInput("csr_no_cn", "CSR subject has no CN (the vehicle id)")
    validate_vehicle_id(cn)
    return issue_certificate(ca_key, ca_cert, public, cn, days=days)


# --------------------------------------------------------------------------- layout


@dataclass(frozen=True)
class PkiDir:
    """File layout of a development PKI directory.

    ``ca.key``/``ca.crt`` for the fleet CA, and ``<name>.key``/``<name>.crt`` for every
    identity issued from it (``broker``, ``backend``, vehicles by id).
    """

    root: Path

    @property
    def ca_key(self) -> Path:
        return self.root / "ca.key"

    @property
    def ca_cert(self) -> Path:
        return self.root / "ca.crt"

    def key(self, name: str) -> Path:
        return self.root / f"{name}.key"

    def cert(self, name: str) -> Path:
        return self.root / f"{name}.crt"

    def csr(self, name: str) -> Path:
        return self.root / f"{name}.csr"

    def load_ca(self) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
        if not self.ca_key.exists():
            raise ConfigError.single(
                str(self.ca_key), "no fleet CA here; create one with `pki init-ca`"
            )
        check_private_key_file(self.ca_key)
        return load_private_key(self.ca_key), load_certificate(self.ca_cert)


def init_ca(
    pki: PkiDir,
    common_name: str = "Vehicle Telematics Fleet CA",
    days: int = DEFAULT_CA_DAYS,
    *,
    force: bool = False,
) -> bool:
    """Create the CA in ``pki``; returns False (and changes nothing) if one exists."""
    if pki.ca_key.exists() and not force:
        return False
    key, cert = create_ca(common_name, days)
    write_private_key(pki.ca_key, key)
    write_certificate(pki.ca_cert, cert)
    return True


def issue_identity(
    pki: PkiDir,
    name: str,
    *,
    common_name: str | None = None,
    server: ServerNames | None = None,
    days: int = DEFAULT_LEAF_DAYS,
    not_before: dt.datetime | None = None,
) -> tuple[Path, Path]:
    """Generate a key and certificate for a fleet-side identity (broker, backend).

    These keys are created where they are used (the fleet side), unlike vehicle keys.
    """
    ca_key, ca_cert = pki.load_ca()
    key = generate_private_key()
    cert = issue_certificate(
        ca_key, ca_cert, key.public_key(), common_name or name,
        days=days, server=server, not_before=not_before,
    )
    write_private_key(pki.key(name), key)
    write_certificate(pki.cert(name), cert)
    return pki.key(name), pki.cert(name)


def create_vehicle_key(key_path: Path, csr_path: Path, vehicle_id: str) -> bool:
    """On the vehicle: make (or reuse) the private key and write a CSR for ``vehicle_id``.

    An existing key is reused so that re-running renews the certificate without
    invalidating the identity; returns True if a new key was generated.
    """
    validate_vehicle_id(vehicle_id)
    created = False
    if key_path.exists():
        check_private_key_file(key_path)
        key = load_private_key(key_path)
    else:
        key = generate_private_key()
        write_private_key(key_path, key)
        created = True
    write_csr(csr_path, make_csr(key, vehicle_id))
    return created


def sign_csr_file(
    pki: PkiDir, csr_path: Path, cert_path: Path, days: int = DEFAULT_LEAF_DAYS
) -> x509.Certificate:
    """Fleet side: sign the CSR at ``csr_path`` and write the certificate."""
    ca_key, ca_cert = pki.load_ca()
    cert = sign_csr(ca_key, ca_cert, load_csr(csr_path), days)
    write_certificate(cert_path, cert)
    return cert


def dev_setup(
    pki: PkiDir,
    vehicle_ids: Sequence[str],
    *,
    backend_name: str = "backend",
    server: ServerNames | None = None,
) -> list[Path]:
    """Everything a local demo needs: CA (reused if present), broker, backend, vehicles.

    Vehicles go through the same CSR flow as in the field.
    """
    written: list[Path] = []
    if init_ca(pki):
        written += [pki.ca_key, pki.ca_cert]
    written += issue_identity(pki, "broker", server=server or ServerNames())
    written += issue_identity(pki, backend_name)
    for vid in vehicle_ids:
        create_vehicle_key(pki.key(vid), pki.csr(vid), vid)
        sign_csr_file(pki, pki.csr(vid), pki.cert(vid))
        written += [pki.key(vid), pki.csr(vid), pki.cert(vid)]
    return written
