"""The scripts sent to a device python over stdin, assembled from the self-contained modules' own text.

Why text and not an installed package: the device needs nothing of ours installed, the script always matches
the host's version, and ``python3 - ARGS < script`` leaves no file behind on the device.
"""
from __future__ import annotations

from functools import cache
from pathlib import Path

_HERE = Path(__file__).resolve().parent
_FINGERPRINT_MAIN = "\nimport json as _j, sys as _s\n_s.stdout.write(_j.dumps(collect_fingerprint()))\n"
_RUNNER_MAIN = "\nimport sys as _s\n_s.exit(main(_s.argv[1:]))\n"


def _text(name: str) -> str:
    return (_HERE / name).read_text(encoding="utf-8")


@cache
def fingerprint_script() -> str:
    """Prints the device fingerprint as one JSON document."""
    return _text("fingerprint.py") + _FINGERPRINT_MAIN


@cache
def runner_script() -> str:
    """``python3 - profile ARTIFACT ...`` / ``python3 - logits ARTIFACT IN.npy OUT.npy``; see remote_runner.py."""
    return "\n".join([_text("fingerprint.py"), _text("remote_runner.py"), _text("remote_extra.py")]) + _RUNNER_MAIN
