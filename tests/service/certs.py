"""Certificates for the service tests, in QEMU's layout, made with trustme."""

from __future__ import annotations

import datetime
import os
from pathlib import Path

import trustme


def write_tls_dir(
    directory: Path,
    ca: trustme.CA,
    *names: str,
    expired: bool = False,
    trust: trustme.CA | None = None,
) -> Path:
    """ca-cert.pem (of ``trust`` or ``ca``) and one certificate for ``names``
    (CN = first name, SANs = all) as both server and client certificate."""
    directory.mkdir(parents=True, exist_ok=True)
    kwargs = {}
    if expired:
        now = datetime.datetime.now(datetime.UTC)
        kwargs = {
            "not_before": now - datetime.timedelta(days=30),
            "not_after": now - datetime.timedelta(days=1),
        }
    cert = ca.issue_cert(*names, common_name=names[0], **kwargs)
    (trust or ca).cert_pem.write_to_path(str(directory / "ca-cert.pem"))
    for role in ("server", "client"):
        cert.cert_chain_pems[0].write_to_path(str(directory / f"{role}-cert.pem"))
        key = directory / f"{role}-key.pem"
        cert.private_key_pem.write_to_path(str(key))
        os.chmod(key, 0o600)
    return directory
