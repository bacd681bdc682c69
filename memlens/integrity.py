"""Provenance you can verify, and sign: digests of records and the files they depend on, Ed25519 signatures.

Every record memlens writes (run.json, audit.json, a canary set's canaries.json and
membership.json) carries an ``integrity`` block:

* ``sha256``: the digest of the record's own canonical content (key-sorted, compact JSON of
  everything but the integrity block), so an edited number is found;
* ``files``: the sha256 of every file the record depends on (the weights and heads of a run, the
  tables of an audit, the membership file of a canary set), so a truncated or swapped file is found;
* ``signature`` (optional): an Ed25519 signature of the record's digest (``cryptography``), with
  the signer's public key, so a record can be tied to the job that holds the private key.

**What they catch.** Digests catch mix-ups (another run's file), accidental damage and naive edits:
anyone who changes a number without recomputing the digest. They do not stop a deliberate forger,
who can recompute a digest as easily as memlens does. Signatures do: a record signed by the trusted
job (``memlens audit --sign-key``, the policy's ``require_signature``) cannot be edited, nor its
tables or weights swapped, without the private key. Keep the private key to the job that audits
(a CI secret), and the public key in the policy.
"""

from __future__ import annotations

import base64
import json
import os
from pathlib import Path
from typing import Any

from memlens.errors import MemlensError
from memlens.io import canonical_json, dumps, read_json, sha256_bytes, sha256_file

FIELD = "integrity"


def content_digest(doc: dict) -> str:
    """sha256 of the canonical JSON of ``doc`` without its integrity block, as it reads back from disk."""
    body = {k: v for k, v in doc.items() if k != FIELD}
    return sha256_bytes(canonical_json(json.loads(dumps(body, indent=None))).encode("utf-8"))


def stamp(doc: dict, *, files: dict[str, str] | None = None, sign_key: Any = None) -> dict:
    """``doc`` with its integrity block: its digest, its files' digests, and a signature when a key is given."""
    block: dict[str, Any] = {"sha256": content_digest(doc), "files": dict(sorted((files or {}).items()))}
    if sign_key is not None:
        block["signature"] = sign(block["sha256"], sign_key)
    return {**{k: v for k, v in doc.items() if k != FIELD}, FIELD: block}


def verify(doc: dict, path: Path, *, base: Path | None = None, require: bool = True) -> dict | None:
    """Check a record read from ``path``: its own digest, its files (those still present under
    ``base``, default the record's folder) and its signature when it has one.

    Returns:
        The integrity block (None for a record written before memlens recorded integrity, when
        ``require`` is False).

    Raises:
        MemlensError: naming the file that was edited, truncated or swapped.
    """
    block = doc.get(FIELD)
    if not isinstance(block, dict):
        if require:
            raise MemlensError(f"{path} has no integrity record (written by an older memlens, or stripped); re-create "
                               f"it")
        return None
    if content_digest(doc) != block.get("sha256"):
        raise MemlensError(f"{path} was modified after memlens wrote it (its content does not match its sha256); "
                           f"re-create it instead of editing it")
    base = base or path.parent
    for name, digest in (block.get("files") or {}).items():
        f = base / name
        if not f.is_file():
            raise MemlensError(f"{f} is missing; {path.name} depends on it")
        if sha256_file(f) != digest:
            raise MemlensError(f"{f} was modified or replaced after {path.name} recorded it (sha256 differs)")
    sig = block.get("signature")
    if sig is not None:
        check_signature(block["sha256"], sig, where=path)
    return block


def read_verified(path: str | Path, *, what: str, require: bool = True) -> dict:
    """A JSON record from ``path``, verified (see :func:`verify`)."""

    path = Path(path)
    doc = read_json(path, what=what)
    if not isinstance(doc, dict):
        raise MemlensError(f"{path} is not a memlens {what}")
    verify(doc, path, require=require)
    return doc


# ----------------------------------------------------------------------------- signatures


def load_private_key(path: str | Path):
    """An Ed25519 private key from a PEM file (``memlens keygen`` writes one)."""
    # cryptography: optional or slow to import, loaded only on this path
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    path = Path(path)
    if not path.is_file():
        raise MemlensError(f"signing key not found: {path}")
    try:
        key = load_pem_private_key(path.read_bytes(), password=None)
    except (ValueError, TypeError) as exc:
        raise MemlensError(f"{path} is not an unencrypted PEM private key: {exc}") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise MemlensError(f"{path} is not an Ed25519 key (memlens signs with Ed25519)")
    return key


def public_key_text(key) -> str:
    """The base64 of an Ed25519 public key's 32 raw bytes (what policies and records hold)."""
    # cryptography: optional or slow to import, loaded only on this path
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    pub = key.public_key() if hasattr(key, "public_key") else key
    return base64.b64encode(pub.public_bytes(Encoding.Raw, PublicFormat.Raw)).decode()


def parse_public_key(text: str):
    """A public key given as base64 raw bytes, or a PEM file's path or content."""
    # cryptography: optional or slow to import, loaded only on this path
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
    from cryptography.hazmat.primitives.serialization import load_pem_public_key

    text = text.strip()
    try:
        if "BEGIN PUBLIC KEY" in text:
            key = load_pem_public_key(text.encode())
        elif Path(text).is_file():
            key = load_pem_public_key(Path(text).read_bytes())
        else:
            key = Ed25519PublicKey.from_public_bytes(base64.b64decode(text, validate=True))
    except (ValueError, TypeError, OSError) as exc:
        raise MemlensError(f"not an Ed25519 public key (base64 of 32 bytes, or PEM): {exc}") from None
    if not isinstance(key, Ed25519PublicKey):
        raise MemlensError("not an Ed25519 public key")
    return key


def sign(digest: str, key) -> dict:
    value = key.sign(bytes.fromhex(digest))
    return {"algorithm": "ed25519", "public_key": public_key_text(key), "value": base64.b64encode(value).decode()}


def check_signature(digest: str, sig: dict, *, where: Path | str) -> None:
    # cryptography: optional or slow to import, loaded only on this path
    from cryptography.exceptions import InvalidSignature

    if sig.get("algorithm") != "ed25519":
        raise MemlensError(f"{where}: unknown signature algorithm {sig.get('algorithm')!r}")
    key = parse_public_key(sig.get("public_key", ""))
    try:
        key.verify(base64.b64decode(sig.get("value", "")), bytes.fromhex(digest))
    except (InvalidSignature, ValueError):
        raise MemlensError(f"{where}: its signature does not verify (the record or its signature was altered)") \
            from None


def signed_by(block: dict | None, public_key: str) -> bool:
    """Whether a verified integrity block carries a signature by ``public_key``."""
    if not block or not block.get("signature"):
        return False
    want = public_key_text(parse_public_key(public_key))
    return block["signature"].get("public_key") == want


def generate_key(out: str | Path) -> str:
    """Write a new Ed25519 private key (PEM, mode 0600) and return its public key (base64)."""

    # cryptography: optional or slow to import, loaded only on this path
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat

    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption())
    out = Path(out)
    fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(pem)
    return public_key_text(key)


def file_digests(folder: Path, names: list[str]) -> dict[str, str]:
    return {n: sha256_file(folder / n) for n in names if (folder / n).is_file()}
