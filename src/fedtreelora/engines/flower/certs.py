"""Test certificates and SuperNode keys for a TLS-secured, authenticated Flower deployment.

For trying a deployment on one machine or a lab network. Production sites should use certificates
from their own CA and keep private keys where they were made.

Writes, under ``out_dir``:

* ``ca.crt`` / ``ca.key``: a self-signed certificate authority;
* ``server.pem`` / ``server.key``: the SuperLink's TLS certificate (signed by the CA) for the given
  host names and IP addresses;
* ``supernode_K`` / ``supernode_K.pub``: each SuperNode's P-384 key pair (OpenSSH format), the public
  half registered with ``flwr supernode register``.
"""

from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID


@dataclass(frozen=True)
class Credentials:
    """Paths of what :func:`make_credentials` wrote."""

    ca_cert: Path
    server_cert: Path
    server_key: Path
    node_keys: tuple[Path, ...]

    def node_public_key(self, k: int) -> Path:
        return self.node_keys[k].with_name(self.node_keys[k].name + ".pub")


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _write_private(path: Path, data: bytes) -> None:
    path.write_bytes(data)
    path.chmod(0o600)


def make_credentials(
    out_dir: str | Path, *, num_nodes: int, hosts: tuple[str, ...] = ("localhost", "127.0.0.1"), days: int = 365
) -> Credentials:
    """Make a CA, a SuperLink certificate valid for ``hosts``, and ``num_nodes`` SuperNode key pairs."""
    if num_nodes < 0:
        raise ValueError(f"num_nodes must be >= 0, got {num_nodes}")
    folder = Path(out_dir)
    folder.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(_name("fedtreelora test CA"))
        .issuer_name(_name("fedtreelora test CA"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    server_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    alt_names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            alt_names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            alt_names.append(x509.DNSName(host))
    server_cert = (
        x509.CertificateBuilder()
        .subject_name(_name(hosts[0]))
        .issuer_name(ca_cert.subject)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName(alt_names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    pem = serialization.Encoding.PEM
    plain = serialization.NoEncryption()
    (folder / "ca.crt").write_bytes(ca_cert.public_bytes(pem))
    _write_private(folder / "ca.key", ca_key.private_bytes(pem, serialization.PrivateFormat.TraditionalOpenSSL, plain))
    (folder / "server.pem").write_bytes(server_cert.public_bytes(pem))
    _write_private(
        folder / "server.key", server_key.private_bytes(pem, serialization.PrivateFormat.TraditionalOpenSSL, plain)
    )
    keys = []
    for k in range(num_nodes):
        key = ec.generate_private_key(ec.SECP384R1())
        path = folder / f"supernode_{k}"
        _write_private(path, key.private_bytes(pem, serialization.PrivateFormat.OpenSSH, plain))
        public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
        path.with_name(path.name + ".pub").write_bytes(public + b"\n")
        keys.append(path)
    return Credentials(folder / "ca.crt", folder / "server.pem", folder / "server.key", tuple(keys))
