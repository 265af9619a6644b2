"""Trusting a package (issue #13, item 1): the goals come from the verifier, and the package's claims count only
when it is signed by a key the verifier trusts. Every byte — artifact, report, README, manifest — is signed."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import zipfile
from importlib.util import find_spec
from pathlib import Path

import pytest

from castling_deploy.errors import ToleranceError, UsageError
from castling_deploy.packaging import create_package, format_verify_result, verify_package

from .conftest import invoke
from .test_package import _target, _val_set

needs_crypto = pytest.mark.skipif(find_spec("cryptography") is None,
                                  reason="signing needs pip install 'castling-deploy[sign]'")


def _one_line_error(r, code: int, *needles: str) -> None:
    assert r.exit_code == code, (r.exit_code, r.stdout, r.stderr)
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in r.stderr, r.stderr
    for n in needles:
        assert n in errors[0], errors[0]


def _rewrite(src: Path, dst: Path, edit) -> None:
    """Copy a zip, passing each member through ``edit(name, bytes) -> bytes | None`` (None drops it)."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for info in zin.infolist():
            data = edit(info.filename, zin.read(info))
            if data is not None:
                zout.writestr(info.filename, data)


def _bad_onnx(path: Path, hw: int = 8, seed: int = 7) -> None:
    """A model with the same input/output as the good one and random weights: ~chance top-1."""
    from .test_profile import tiny_onnx

    tiny_onnx(path, hw=hw, seed=seed)


@pytest.fixture()
def two_fp32(tmp_path: Path):
    """Two fp32 targets of one model (75.00% top-1 on the val set) and an int8 one."""
    root = tmp_path / "exports" / "m"
    w, b = _target(root, "onnx", "fp32", 75.0, seed=0)
    _target(root, "tensorrt", "fp32", 75.0, seed=0)
    x, y = _val_set(w, b)
    return root, x, y


@pytest.fixture()
def keys(tmp_path: Path, runner):
    key = tmp_path / "keys" / "signer.pem"
    key.parent.mkdir()
    r = invoke(runner, "keygen", "-o", key)
    assert r.exit_code == 0, r.stderr
    other = tmp_path / "keys" / "other.pem"
    assert invoke(runner, "keygen", "-o", other).exit_code == 0
    return key, Path(str(key) + ".pub"), other, Path(str(other) + ".pub")


def _forge(pkg: Path, out: Path, target: str = "onnx") -> None:
    """The attack of issue #13: replace an artifact with a bad model, fix its sha256 and size in the manifest, and
    set the recorded tolerance to 100 (and the recorded accuracy to what the bad model gets, for good measure)."""
    bad = out.parent / "bad.onnx"
    _bad_onnx(bad)
    data = bad.read_bytes()
    name = f"{target}/model.onnx"

    def edit(n: str, raw: bytes) -> bytes | None:
        if n == name:
            return data
        if n == "manifest.json":
            m = json.loads(raw)
            m["files"][name] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
            for t in m["targets"]:
                for a in t["artifacts"]:
                    if a["file"] == name and a.get("recorded"):
                        a["recorded"].update(tolerance_points=100.0, top1_acc=10.0)
            return json.dumps(m).encode()
        return raw

    _rewrite(pkg, out, edit)


def test_forged_unsigned_package_fails_on_the_verifiers_goals(two_fp32, tmp_path: Path, runner) -> None:
    root, x, y = two_fp32
    pkg = create_package(root, tmp_path / "pkg.zip")
    forged = tmp_path / "forged.zip"
    _forge(pkg, forged)
    assert verify_package(forged)["integrity"]["passed"]  # the hashes agree: they were edited together
    with pytest.raises(ToleranceError) as info:
        verify_package(forged, val_images=x, val_labels=y)  # tolerance 100 in the manifest is never read
    res = info.value.result
    assert res["signature"]["status"] == "unsigned" and res["goals"]["tolerance_points"] == 0.5
    assert res["goals"]["recorded_accuracy_trusted"] is False
    row = next(r for r in res["accuracy"] if r["file"] == "onnx/model.onnx")
    assert row["status"] == "failed" and row["reference"] == "tensorrt/model.onnx" and row["measured_top1"] < 30
    assert "recorded accuracies were not trusted (package unsigned)" in format_verify_result(res)


@needs_crypto
def test_signed_package_verifies_only_with_the_right_key(two_fp32, keys, tmp_path: Path, runner) -> None:
    root, _, _ = two_fp32
    key, pub, _, other_pub = keys
    pkg = tmp_path / "signed.zip"
    r = invoke(runner, "package", root, "-o", pkg, "--sign", key)
    assert r.exit_code == 0, r.stderr
    with zipfile.ZipFile(pkg) as zf:
        assert "signature.json" in zf.namelist()
        manifest = json.loads(zf.read("manifest.json"))
    assert "signature.json" not in manifest["files"]
    again = create_package(root, tmp_path / "again.zip", sign_key=key)
    assert again.read_bytes() == pkg.read_bytes()  # Ed25519 is deterministic: so is a signed archive

    r = invoke(runner, "verify", pkg, "--trust", pub, "--json")
    assert r.exit_code == 0, r.stderr
    res = json.loads(r.stdout)
    from castling_deploy.packaging.signing import fingerprint, load_public_key

    fp = fingerprint(load_public_key(pub))
    assert res["signature"] == {"status": "valid", "key_fingerprint": fp, "key_ids": [fp]}
    assert res["goals"]["recorded_accuracy_trusted"] is True and res["integrity"]["checked"] == 5
    r = invoke(runner, "verify", pkg, "--trust", other_pub)
    _one_line_error(r, 3, "signature: not signed by the trusted key")
    assert "signature: invalid" in r.stderr
    r = invoke(runner, "verify", pkg)  # no --trust: the signature is not checked, and the output says so
    assert r.exit_code == 0 and "signature: unchecked" in r.stdout


@needs_crypto
@pytest.mark.parametrize("member", ["onnx/model.onnx", "onnx/report.json", "README.md", "manifest.json",
                                    "signature.json"])
def test_any_modified_byte_breaks_the_signature(two_fp32, keys, tmp_path: Path, runner, member: str) -> None:
    root, _, _ = two_fp32
    key, pub, _, _ = keys
    pkg = create_package(root, tmp_path / "signed.zip", sign_key=key)
    bad = tmp_path / "bad.zip"

    def edit(name: str, data: bytes) -> bytes:
        if name != member:
            return data
        if member == "signature.json":  # a different signature value, envelope still well-formed
            env = json.loads(data)
            sig = bytearray(__import__("base64").b64decode(env["signatures"][0]["sig"]))
            sig[0] ^= 1
            env["signatures"][0]["sig"] = __import__("base64").b64encode(bytes(sig)).decode()
            return json.dumps(env).encode()
        if member == "manifest.json":  # a consistent-looking edit: only a value, the hashes untouched
            return data.replace(b'"tolerance_points": 0.5', b'"tolerance_points": 100.0', 1)
        return data[:-2] + bytes([data[-2] ^ 1]) + data[-1:]

    _rewrite(pkg, bad, edit)
    assert bad.read_bytes() != pkg.read_bytes()
    r = invoke(runner, "verify", bad, "--trust", pub, "--json")
    _one_line_error(r, 3, "signature:")
    res = json.loads(r.stdout)
    assert res["signature"]["status"] == "invalid" and res["status"] == "failed"


@needs_crypto
def test_forged_and_resigned_package_fails_with_the_trusted_key(two_fp32, keys, tmp_path: Path, runner) -> None:
    root, _, _ = two_fp32
    key, pub, other, _ = keys
    pkg = create_package(root, tmp_path / "signed.zip", sign_key=key)
    forged = tmp_path / "forged.zip"
    _forge(pkg, forged)  # the old signature no longer matches
    r = invoke(runner, "verify", forged, "--trust", pub)
    _one_line_error(r, 3, "signature: modified since signing: manifest.json")  # found before extracting
    # the attacker re-signs with their own key: still not the key the verifier trusts
    from castling_deploy.packaging.signing import load_private_key, sign_digests

    with zipfile.ZipFile(forged) as zf:
        digests = {n: hashlib.sha256(zf.read(n)).hexdigest() for n in zf.namelist() if n != "signature.json"}
    resigned = tmp_path / "resigned.zip"
    env = sign_digests(load_private_key(other), digests)
    _rewrite(forged, resigned, lambda n, d: env if n == "signature.json" else d)
    r = invoke(runner, "verify", resigned, "--trust", pub)
    _one_line_error(r, 3, "not signed by the trusted key")
    # stripping the signature makes it unsigned: refused when a key is trusted
    stripped = tmp_path / "stripped.zip"
    _rewrite(forged, stripped, lambda n, d: None if n == "signature.json" else d)
    r = invoke(runner, "verify", stripped, "--trust", pub)
    _one_line_error(r, 3, "package is unsigned but --trust was given")


@needs_crypto
def test_trusted_signature_makes_recorded_accuracy_a_goal(two_fp32, keys, tmp_path: Path) -> None:
    root, x, y = two_fp32
    key, pub, _, _ = keys
    pkg = create_package(root, tmp_path / "signed.zip", sign_key=key)
    res = verify_package(pkg, val_images=x, val_labels=y, trust=pub)
    assert res["passed"] and res["goals"]["recorded_accuracy_trusted"] is True
    assert all(r["drop_vs_recorded"] == 0.0 for r in res["accuracy"] if "measured_top1" in r)
    assert "not trusted" not in format_verify_result(res)
    y_bad = y.copy()
    y_bad[:4] = (y_bad[:4] + 1) % 10  # every artifact 68.75%: consistent with each other, 6.25 below the record
    assert verify_package(pkg, val_images=x, val_labels=y_bad)["passed"]  # untrusted: nothing says 75%
    with pytest.raises(ToleranceError) as info:
        verify_package(pkg, val_images=x, val_labels=y_bad, trust=pub)
    rows = [r for r in info.value.result["accuracy"] if "measured_top1" in r]
    assert [r["drop_vs_recorded"] for r in rows] == [6.25, 6.25] and info.value.exit_code == 3
    assert "onnx/model.onnx: top-1 68.75% vs 75.00% recorded at export and signed (drop 6.25 > 0.5 points)" in \
        info.value.result["failures"]
    # the verifier's tolerance, not the package's, decides
    assert verify_package(pkg, val_images=x, val_labels=y_bad, trust=pub, tolerance=7)["passed"]


@needs_crypto
def test_unsigned_package_is_reported_and_refused_under_trust(two_fp32, keys, tmp_path: Path, runner) -> None:
    root, _, _ = two_fp32
    _, pub, _, _ = keys
    pkg = create_package(root, tmp_path / "plain.zip")
    r = invoke(runner, "verify", pkg, "--json")
    assert r.exit_code == 0 and json.loads(r.stdout)["signature"]["status"] == "unsigned"
    r = invoke(runner, "verify", pkg, "--trust", pub, "--json")
    _one_line_error(r, 3, "package is unsigned but --trust was given")
    assert json.loads(r.stdout)["signature"]["status"] == "unsigned"


@needs_crypto
def test_ecdsa_p256_keys_and_encrypted_keys(two_fp32, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                            runner) -> None:
    from cryptography.hazmat.primitives import serialization as ser
    from cryptography.hazmat.primitives.asymmetric import ec

    root, _, _ = two_fp32
    k = ec.generate_private_key(ec.SECP256R1())
    key, pub = tmp_path / "ec.pem", tmp_path / "ec.pub"
    key.write_bytes(k.private_bytes(ser.Encoding.PEM, ser.PrivateFormat.PKCS8, ser.NoEncryption()))
    pub.write_bytes(k.public_key().public_bytes(ser.Encoding.PEM, ser.PublicFormat.SubjectPublicKeyInfo))
    pkg = create_package(root, tmp_path / "ec.zip", sign_key=key)
    assert verify_package(pkg, trust=pub)["signature"]["status"] == "valid"

    monkeypatch.setenv("CASTLING_SIGN_PASSWORD", "s3cret")
    enc = tmp_path / "enc.pem"
    assert invoke(runner, "keygen", "-o", enc).exit_code == 0
    assert b"ENCRYPTED" in enc.read_bytes() and (enc.stat().st_mode & 0o777) == 0o600
    pkg = create_package(root, tmp_path / "enc.zip", sign_key=enc)
    monkeypatch.delenv("CASTLING_SIGN_PASSWORD")
    assert verify_package(pkg, trust=Path(str(enc) + ".pub"))["signature"]["status"] == "valid"
    r = invoke(runner, "package", root, "-o", tmp_path / "nopw.zip", "--sign", enc)
    _one_line_error(r, 2, "encrypted", "CASTLING_SIGN_PASSWORD")
    assert not (tmp_path / "nopw.zip").exists()


@needs_crypto
def test_bad_keys_are_usage_errors(two_fp32, keys, tmp_path: Path, runner) -> None:
    root, _, _ = two_fp32
    key, pub, _, _ = keys
    pkg = create_package(root, tmp_path / "signed.zip", sign_key=key)
    junk = tmp_path / "junk.pem"
    junk.write_text("not a key")
    cases = [(["verify", pkg, "--trust", key], "this is a private key"),
             (["verify", pkg, "--trust", junk], "not a PEM public key"),
             (["verify", pkg, "--trust", tmp_path / "missing.pub"], "no such public key file"),
             (["package", root, "-o", tmp_path / "x.zip", "--sign", pub], "not a PEM private key"),
             (["package", root, "-o", tmp_path / "x.zip", "--sign", junk], "not a PEM private key")]
    for args, needle in cases:
        _one_line_error(invoke(runner, *args), 2, needle)
    assert not (tmp_path / "x.zip").exists()
    (tmp_path / "exists.pem").write_text("x")
    _one_line_error(invoke(runner, "keygen", "-o", tmp_path / "exists.pem"), 2, "already exists")
    assert (tmp_path / "exists.pem").read_text() == "x" and not (tmp_path / "exists.pem.pub").exists()


@needs_crypto
def test_malformed_signature_file(two_fp32, keys, tmp_path: Path, runner) -> None:
    root, _, _ = two_fp32
    key, pub, _, _ = keys
    pkg = create_package(root, tmp_path / "signed.zip", sign_key=key)
    for i, junk in enumerate([b"{", b"[]", b'{"payloadType": "x", "payload": "", "signatures": []}',
                              b"[" * 100_000 + b"]" * 100_000]):
        bad = tmp_path / f"bad{i}.zip"
        _rewrite(pkg, bad, lambda n, d, junk=junk: junk if n == "signature.json" else d)
        _one_line_error(invoke(runner, "verify", bad, "--trust", pub), 3, "signature.json is malformed")
        r = invoke(runner, "verify", bad)
        assert r.exit_code == 0 and "signature: unchecked" in r.stdout


def test_missing_cryptography_names_the_extra(two_fp32, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                              runner) -> None:
    root, _, _ = two_fp32
    for mod in [m for m in sys.modules if m == "cryptography" or m.startswith("cryptography.")]:
        monkeypatch.delitem(sys.modules, mod)
    monkeypatch.setitem(sys.modules, "cryptography", None)
    pub = tmp_path / "k.pub"
    pub.write_text("-----BEGIN PUBLIC KEY-----\n")
    pkg = create_package(root, tmp_path / "plain.zip")
    assert verify_package(pkg)["signature"]["status"] == "unsigned"  # unsigned checks need no extra
    for args in (["verify", pkg, "--trust", pub], ["package", root, "-o", tmp_path / "s.zip", "--sign", pub],
                 ["keygen", "-o", tmp_path / "k.pem"]):
        _one_line_error(invoke(runner, *args), 4, "castling-deploy[sign]")
    assert not (tmp_path / "s.zip").exists() and not (tmp_path / "k.pem").exists()


def test_verifier_goals_are_validated(two_fp32, tmp_path: Path, runner) -> None:
    root, _, _ = two_fp32
    pkg = create_package(root, tmp_path / "p.zip")
    _one_line_error(invoke(runner, "verify", pkg, "--tolerance", "nan"), 2, "--tolerance")
    _one_line_error(invoke(runner, "verify", pkg, "--tolerance", "-1"), 2, "--tolerance")
    _one_line_error(invoke(runner, "verify", pkg, "--min-top1", "101"), 2, "--min-top1")
    with pytest.raises(UsageError):
        verify_package(pkg, batch=0)
    assert sorted(os.listdir(tmp_path)) == ["exports", "p.zip"]


@needs_crypto
@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")
def test_openssl_keys_and_openssl_checks_our_signature(two_fp32, tmp_path: Path) -> None:
    """Standard pieces: an `openssl genpkey` key signs; `openssl pkeyutl` verifies the DSSE signature; the
    fingerprint is the sha256 of the DER public key."""
    import base64
    import subprocess

    from castling_deploy.packaging.signing import PAYLOAD_TYPE, pae

    root, _, _ = two_fp32
    key, pub = tmp_path / "o.pem", tmp_path / "o.pub"
    subprocess.run(["openssl", "genpkey", "-algorithm", "ed25519", "-out", key], check=True)
    subprocess.run(["openssl", "pkey", "-in", key, "-pubout", "-out", pub], check=True)
    pkg = create_package(root, tmp_path / "o.zip", sign_key=key)
    res = verify_package(pkg, trust=pub)
    der = subprocess.run(["openssl", "pkey", "-pubin", "-in", pub, "-outform", "DER"], check=True,
                         capture_output=True).stdout
    assert res["signature"]["key_fingerprint"] == "sha256:" + hashlib.sha256(der).hexdigest()
    env = json.loads(zipfile.ZipFile(pkg).read("signature.json"))
    body = base64.b64decode(env["payload"])
    (tmp_path / "pae.bin").write_bytes(pae(PAYLOAD_TYPE, body))
    (tmp_path / "sig.bin").write_bytes(base64.b64decode(env["signatures"][0]["sig"]))
    subprocess.run(["openssl", "pkeyutl", "-verify", "-pubin", "-inkey", pub, "-rawin", "-in", tmp_path / "pae.bin",
                    "-sigfile", tmp_path / "sig.bin"], check=True, capture_output=True)
    with zipfile.ZipFile(pkg) as zf:  # the statement lists every other member with its sha256
        expected = {n: hashlib.sha256(zf.read(n)).hexdigest() for n in zf.namelist() if n != "signature.json"}
    subjects = {s["name"]: s["digest"]["sha256"] for s in json.loads(body)["subject"]}
    assert subjects == expected and "manifest.json" in subjects
