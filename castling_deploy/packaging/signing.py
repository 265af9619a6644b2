"""Package signatures: a DSSE envelope over an in-toto Statement that lists every file of the package.

``signature.json`` (the one member not listed in ``manifest.json``) is a DSSE envelope
(https://github.com/secure-systems-lab/dsse, payload type ``application/vnd.in-toto+json``) whose payload is an
in-toto Statement v1: one subject per archive member — ``manifest.json``, ``README.md``, every artifact and
report — with its sha256. The signature is Ed25519 (or ECDSA P-256 / SHA-256) over the DSSE pre-authentication
encoding; keys are PEM files (``castling-deploy keygen`` or ``openssl genpkey -algorithm ed25519``).

The hashes inside a package only catch accidents: whoever can edit a package can edit its hashes. A signature by a
key the *verifier* trusts is what makes the manifest's recorded accuracies and artifact list evidence.
Needs the ``cryptography`` package (the ``sign`` extra); reading an envelope's key id does not.
"""
from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
from pathlib import Path
from typing import Any

from ..errors import UsageError
from ..optional import import_optional

SIGNATURE = "signature.json"
PAYLOAD_TYPE = "application/vnd.in-toto+json"
STATEMENT_TYPE = "https://in-toto.io/Statement/v1"
PREDICATE_TYPE = "urn:castling-deploy:package-signature:v1"
PASSWORD_ENV = "CASTLING_SIGN_PASSWORD"
MAX_KEY_BYTES = 64 * 1024
MAX_SIGNATURE_BYTES = 64 * 2**20


class SignatureInvalid(Exception):
    """The envelope is malformed, not signed by the trusted key, or does not list exactly the package's files."""


def _crypto() -> Any:
    return import_optional("cryptography.hazmat.primitives.serialization", "cryptography", "sign",
                           "signing and checking package signatures")


def pae(payload_type: str, body: bytes) -> bytes:
    """DSSE v1 pre-authentication encoding: what is actually signed."""
    t = payload_type.encode()
    return b"DSSEv1 %d %s %d %s" % (len(t), t, len(body), body)


def _read_key_file(path: Path, what: str) -> bytes:
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"{path}: no such {what} file")
    if path.stat().st_size > MAX_KEY_BYTES:
        raise UsageError(f"{path}: too large for a PEM {what}")
    return path.read_bytes()


def _check_key_type(key: Any, path: Path) -> Any:
    from cryptography.hazmat.primitives.asymmetric import ec, ed25519

    if isinstance(key, (ed25519.Ed25519PrivateKey, ed25519.Ed25519PublicKey)):
        return key
    if isinstance(key, (ec.EllipticCurvePrivateKey, ec.EllipticCurvePublicKey)) and key.curve.name == "secp256r1":
        return key
    raise UsageError(f"{path}: unsupported key type {type(key).__name__}; use Ed25519 (castling-deploy keygen) "
                     "or ECDSA P-256")


def load_private_key(path: Path) -> Any:
    """A PEM private key (PKCS#8); encrypted keys take their password from $CASTLING_SIGN_PASSWORD."""
    ser = _crypto()
    data = _read_key_file(path, "private key")
    password = os.environ.get(PASSWORD_ENV)
    try:
        key = ser.load_pem_private_key(data, password=password.encode() if password else None)
    except TypeError:
        raise UsageError(f"{path}: the key is encrypted; set {PASSWORD_ENV} to its password") from None
    except ValueError as exc:
        raise UsageError(f"{path}: not a PEM private key, or a wrong {PASSWORD_ENV} "
                         f"({str(exc).splitlines()[0][:80]})") from None
    return _check_key_type(key, path)


def load_public_key(path: Path) -> Any:
    """A PEM public key (SubjectPublicKeyInfo), the one given to ``verify --trust``."""
    ser = _crypto()
    data = _read_key_file(path, "public key")
    if b"PRIVATE KEY" in data:
        raise UsageError(f"{path}: this is a private key; --trust takes the public key (KEYFILE.pub from keygen)")
    try:
        key = ser.load_pem_public_key(data)
    except ValueError:
        raise UsageError(f"{path}: not a PEM public key (expected '-----BEGIN PUBLIC KEY-----')") from None
    return _check_key_type(key, path)


def fingerprint(key: Any) -> str:
    """sha256 of the public key's DER SubjectPublicKeyInfo — same as
    ``openssl pkey -pubin -in KEY.pub -outform DER | sha256sum``."""
    ser = _crypto()
    pub = key.public_key() if hasattr(key, "public_key") else key
    der = pub.public_bytes(ser.Encoding.DER, ser.PublicFormat.SubjectPublicKeyInfo)
    return "sha256:" + hashlib.sha256(der).hexdigest()


def _sign_bytes(key: Any, data: bytes) -> bytes:
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec

    if isinstance(key, ec.EllipticCurvePrivateKey):
        return key.sign(data, ec.ECDSA(hashes.SHA256()))
    return key.sign(data)


def _verify_bytes(key: Any, sig: bytes, data: bytes) -> bool:
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec

    try:
        if isinstance(key, ec.EllipticCurvePublicKey):
            key.verify(sig, data, ec.ECDSA(hashes.SHA256()))
        else:
            key.verify(sig, data)
    except InvalidSignature:
        return False
    return True


def sign_digests(key: Any, digests: dict[str, str]) -> bytes:
    """``signature.json`` bytes: a DSSE envelope signing one in-toto subject per (name, sha256) — every member
    of the package except the signature itself."""
    statement = {
        "_type": STATEMENT_TYPE,
        "subject": [{"name": n, "digest": {"sha256": d}} for n, d in sorted(digests.items())],
        "predicateType": PREDICATE_TYPE,
        "predicate": {"files": len(digests)},
    }
    body = json.dumps(statement, indent=1, sort_keys=True).encode()
    sig = _sign_bytes(key, pae(PAYLOAD_TYPE, body))
    envelope = {"payloadType": PAYLOAD_TYPE, "payload": base64.b64encode(body).decode(),
                "signatures": [{"keyid": fingerprint(key), "sig": base64.b64encode(sig).decode()}]}
    return (json.dumps(envelope, indent=2) + "\n").encode()


def _parse_envelope(raw: bytes) -> tuple[bytes, list[dict]]:
    try:
        env = json.loads(raw)
        sigs = env["signatures"]
        if not (isinstance(env, dict) and env.get("payloadType") == PAYLOAD_TYPE and isinstance(sigs, list)
                and sigs and all(isinstance(s, dict) and isinstance(s.get("sig"), str) for s in sigs)):
            raise ValueError("not a DSSE envelope of an in-toto statement")
        return base64.b64decode(env["payload"], validate=True), sigs
    except (ValueError, KeyError, TypeError, RecursionError, binascii.Error) as exc:
        raise SignatureInvalid(f"{SIGNATURE} is malformed ({str(exc)[:80]})") from None


def envelope_key_ids(raw: bytes) -> list[str]:
    """The key ids an envelope names (hints only: nothing is checked). [] when it cannot be read."""
    try:
        _, sigs = _parse_envelope(raw)
    except SignatureInvalid:
        return []
    return [str(s.get("keyid"))[:80] for s in sigs if s.get("keyid")]


def open_envelope(raw: bytes, key: Any) -> dict[str, str]:
    """The signed subjects (name -> sha256) when ``key`` signed ``raw``; SignatureInvalid otherwise."""
    body, sigs = _parse_envelope(raw)
    signed = pae(PAYLOAD_TYPE, body)
    good = False
    for s in sigs:
        try:
            good = _verify_bytes(key, base64.b64decode(s["sig"], validate=True), signed)
        except (ValueError, binascii.Error):
            good = False
        if good:
            break
    if not good:
        names = ", ".join(envelope_key_ids(raw)) or "no key id"
        raise SignatureInvalid(f"not signed by the trusted key {fingerprint(key)} (the signature names {names})")
    try:
        st = json.loads(body)
        subjects = {s["name"]: s["digest"]["sha256"] for s in st["subject"]}
        if st.get("_type") != STATEMENT_TYPE or st.get("predicateType") != PREDICATE_TYPE \
                or len(subjects) != len(st["subject"]) \
                or not all(isinstance(n, str) and isinstance(d, str) for n, d in subjects.items()):
            raise ValueError("unexpected statement type or duplicate subjects")
    except (ValueError, KeyError, TypeError, RecursionError) as exc:
        raise SignatureInvalid(f"the signed statement is malformed ({str(exc)[:80]})") from None
    return subjects


def subject_problems(subjects: dict[str, str], digests: dict[str, str | None]) -> list[str]:
    """How the package's members (name -> sha256, None when not hashed yet) differ from the signed subjects."""
    changed = sorted(n for n in set(subjects) & set(digests) if digests[n] is not None and subjects[n] != digests[n])
    added, removed = sorted(set(digests) - set(subjects)), sorted(set(subjects) - set(digests))
    return [f"{label}: {', '.join(names[:5])}" for label, names in
            (("modified since signing", changed), ("not signed", added), ("removed since signing", removed))
            if names]


def verify_envelope(raw: bytes, key: Any, digests: dict[str, str]) -> None:
    """Raise SignatureInvalid unless ``key`` signed ``raw`` and its subjects are exactly ``digests``
    (name -> sha256 of every package member but the signature)."""
    problems = subject_problems(open_envelope(raw, key), dict(digests))
    if problems:
        raise SignatureInvalid("; ".join(problems))


def generate_keypair(out: Path) -> tuple[Path, Path, str]:
    """Write an Ed25519 private key to ``out`` (mode 0600, encrypted with $CASTLING_SIGN_PASSWORD when set) and
    its public key to ``out.pub``; refuse to overwrite either. Returns both paths and the fingerprint."""
    ser = _crypto()
    from cryptography.hazmat.primitives.asymmetric import ed25519

    out = Path(out)
    pub_path = out.with_name(out.name + ".pub")
    for p in (out, pub_path):
        if p.exists() or p.is_symlink():
            raise UsageError(f"{p}: already exists; keygen never overwrites a key")
    if not out.parent.is_dir():
        raise UsageError(f"{out.parent}: no such folder for the key")
    key = ed25519.Ed25519PrivateKey.generate()
    password = os.environ.get(PASSWORD_ENV)
    enc = ser.BestAvailableEncryption(password.encode()) if password else ser.NoEncryption()
    priv = key.private_bytes(ser.Encoding.PEM, ser.PrivateFormat.PKCS8, enc)
    pub = key.public_key().public_bytes(ser.Encoding.PEM, ser.PublicFormat.SubjectPublicKeyInfo)
    try:
        fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except OSError as exc:
        raise UsageError(f"{out}: cannot create the key file ({exc.strerror})") from None
    with os.fdopen(fd, "wb") as fh:
        fh.write(priv)
    pub_path.write_bytes(pub)
    return out, pub_path, fingerprint(key)
