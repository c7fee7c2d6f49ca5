"""Test certificates made at test time with `cryptography`: a CA, a server certificate for
127.0.0.1/localhost, and client certificates (one from the CA, one from a stranger CA).

    pki = make_pki(tmp_path / "pki")
    pki.ca_pem, pki.server_cert_pem, pki.server_key_pem, pki.client_cert_pem, pki.client_key_pem
    pki.path("ca.pem")  # every PEM is also written to a file (CLIs take paths)
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _key_pem(key) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _cert(subject: str, key, issuer_name: x509.Name | None, issuer_key, *, ca: bool = False,
          san: list | None = None, usage=None) -> x509.Certificate:
    now = dt.datetime.now(dt.timezone.utc)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    b = (x509.CertificateBuilder().subject_name(name).issuer_name(issuer_name or name)
         .public_key(key.public_key()).serial_number(x509.random_serial_number())
         .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=2))
         .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if ca:
        b = b.add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                          data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                          crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
    if san:
        b = b.add_extension(x509.SubjectAlternativeName(san), critical=False)
    if usage:
        b = b.add_extension(x509.ExtendedKeyUsage(usage), critical=False)
    return b.sign(issuer_key, hashes.SHA256())


@dataclass
class Pki:
    root: Path
    ca_pem: bytes
    server_cert_pem: bytes
    server_key_pem: bytes
    client_cert_pem: bytes
    client_key_pem: bytes
    stranger_cert_pem: bytes  # a client certificate signed by another CA
    stranger_key_pem: bytes

    def path(self, name: str) -> str:
        return str(self.root / name)


def make_pki(root: Path) -> Pki:
    root.mkdir(parents=True, exist_ok=True)
    ca_key = _key()
    ca = _cert("adapmoe-test-ca", ca_key, None, ca_key, ca=True)
    server_key = _key()
    server = _cert("adapmoe-test-server", server_key, ca.subject, ca_key,
                   san=[x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")],
                   usage=[ExtendedKeyUsageOID.SERVER_AUTH])
    client_key = _key()
    client = _cert("adapmoe-test-client", client_key, ca.subject, ca_key, usage=[ExtendedKeyUsageOID.CLIENT_AUTH])
    other_ca_key = _key()
    other_ca = _cert("stranger-ca", other_ca_key, None, other_ca_key, ca=True)
    stranger_key = _key()
    stranger = _cert("stranger", stranger_key, other_ca.subject, other_ca_key, usage=[ExtendedKeyUsageOID.CLIENT_AUTH])
    pem = lambda c: c.public_bytes(serialization.Encoding.PEM)  # noqa: E731
    pki = Pki(root, pem(ca), pem(server), _key_pem(server_key), pem(client), _key_pem(client_key),
              pem(stranger), _key_pem(stranger_key))
    for name, data in (("ca.pem", pki.ca_pem), ("server.pem", pki.server_cert_pem), ("server.key", pki.server_key_pem),
                       ("client.pem", pki.client_cert_pem), ("client.key", pki.client_key_pem),
                       ("stranger.pem", pki.stranger_cert_pem), ("stranger.key", pki.stranger_key_pem)):
        (root / name).write_bytes(data)
        if name.endswith(".key"):
            (root / name).chmod(0o600)
    return pki
