"""A per-sandbox certificate authority for the secret hosts, made on the host with ``cryptography``.

The CA's private key lives only in this process's memory (never written to disk, never sent to the
guest); :attr:`SandboxCA.cert_pem` is what the guest's trust store gets. The CA carries an X.509
*name constraint* limiting it to the secret hosts, so even a guest that trusts it cannot be shown a
certificate for any other name signed by it. Leaf certificates are minted per SNI on demand, share
one leaf key, and are cached (as server-side :class:`ssl.SSLContext` objects, bounded).

OpenSSL loads certificates only from paths, so a leaf is handed to it through an anonymous pipe
(``/dev/fd/N``): the key material never touches a file system.
"""

from __future__ import annotations

import datetime as _dt
import os
import ssl
import threading
from collections import OrderedDict
from collections.abc import Iterable

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from exec_sandbox.egress.policy import normalize_hostname

__all__ = ["SandboxCA"]

_LEAF_CACHE = 256


def _name(common: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "exec-sandbox egress"),
                      x509.NameAttribute(NameOID.COMMON_NAME, common)])


def _pipe_path(data: bytes, fds: list[int]) -> str:
    if len(data) > 60_000:
        raise ValueError("PEM too large for a pipe")
    read_fd, write_fd = os.pipe()
    fds.append(read_fd)
    try:
        os.write(write_fd, data)
    finally:
        os.close(write_fd)
    return f"/dev/fd/{read_fd}"


def _load_context_from_memory(chain_pem: bytes, key_pem: bytes) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_alpn_protocols(["http/1.1"])
    fds: list[int] = []
    try:
        ctx.load_cert_chain(_pipe_path(chain_pem, fds), _pipe_path(key_pem, fds))
    finally:
        for fd in fds:
            os.close(fd)
    return ctx


class SandboxCA:
    """A CA restricted (name constraints) to ``hosts``; mints and caches leaf TLS contexts."""

    def __init__(self, hosts: Iterable[str], *, valid_days: int = 30) -> None:
        patterns = sorted({normalize_hostname(h, wildcard=True) for h in hosts})
        if not patterns:
            raise ValueError("a sandbox CA needs at least one host")
        self.hosts = patterns
        self._valid = _dt.timedelta(days=valid_days)
        now = _dt.datetime.now(_dt.UTC)
        self._key = ec.generate_private_key(ec.SECP256R1())
        self._leaf_key = ec.generate_private_key(ec.SECP256R1())
        subject = _name("exec-sandbox egress CA")
        permitted = [x509.DNSName(p[2:] if p.startswith("*.") else p) for p in patterns]
        self._cert = (
            x509.CertificateBuilder()
            .subject_name(subject).issuer_name(subject)
            .public_key(self._key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - _dt.timedelta(hours=1))
            .not_valid_after(now + self._valid)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False,
                                         encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.NameConstraints(permitted_subtrees=permitted, excluded_subtrees=None),
                           critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(self._key.public_key()),
                           critical=False)
            .sign(self._key, hashes.SHA256())
        )
        self.cert_pem: bytes = self._cert.public_bytes(serialization.Encoding.PEM)
        self._leaf_key_pem = self._leaf_key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
        self._contexts: OrderedDict[str, ssl.SSLContext] = OrderedDict()
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"SandboxCA(hosts={self.hosts})"

    def covers(self, name: str) -> bool:
        """Whether ``name`` is one of this CA's hosts (exact or below a ``*.`` pattern)."""
        host = normalize_hostname(name)
        return any(host.endswith(p[1:]) if p.startswith("*.") else host == p for p in self.hosts)

    def leaf_pem(self, name: str) -> bytes:
        """A fresh leaf certificate (PEM) for ``name``, signed by this CA."""
        host = normalize_hostname(name)
        if not self.covers(host):
            raise ValueError(f"{host} is not a host of this CA")
        now = _dt.datetime.now(_dt.UTC)
        cert = (
            x509.CertificateBuilder()
            .subject_name(_name(host)).issuer_name(self._cert.subject)
            .public_key(self._leaf_key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - _dt.timedelta(hours=1))
            .not_valid_after(now + min(self._valid, _dt.timedelta(days=7)))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(host)]), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(self._key.public_key()),
                           critical=False)
            .sign(self._key, hashes.SHA256())
        )
        return cert.public_bytes(serialization.Encoding.PEM)

    def server_context(self, name: str) -> ssl.SSLContext:
        """A server-side TLS context presenting a leaf for ``name`` (minted once, then cached)."""
        host = normalize_hostname(name)
        with self._lock:
            ctx = self._contexts.get(host)
            if ctx is not None:
                self._contexts.move_to_end(host)
                return ctx
        ctx = _load_context_from_memory(self.leaf_pem(host) + self.cert_pem, self._leaf_key_pem)
        with self._lock:
            self._contexts[host] = ctx
            while len(self._contexts) > _LEAF_CACHE:
                self._contexts.popitem(last=False)
        return ctx
