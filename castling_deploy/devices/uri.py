"""Device URIs: ``ssh://[user@]host[:port]``, ``adb:SERIAL`` (``adb:`` = the only device), ``local``.

Why strict: the host and serial end up as arguments of ssh/adb; a value starting with ``-`` would be read as an
option, and whitespace or control characters have no business in a host name, so both are refused here.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from urllib.parse import urlsplit

from .errors import DeviceUsageError


SSH_CONFIG_ENV = "CASTLING_DEPLOY_SSH_CONFIG"
_HOST_RE = re.compile(r"^[A-Za-z0-9_.%:-]+$")  # names, aliases, IPv4, IPv6 (brackets already stripped)
_USER_RE = re.compile(r"^[A-Za-z0-9_.][A-Za-z0-9_.@-]*$")
_SERIAL_RE = re.compile(r"^[A-Za-z0-9_.:-]*$")  # USB serials and host:port of adb over TCP


@dataclass(frozen=True)
class DeviceSpec:
    """The parsed URI, before anything connects."""

    uri: str
    kind: str  # "ssh" | "adb" | "local"
    host: str | None = None
    user: str | None = None
    port: int | None = None
    serial: str | None = None


def parse_uri(uri: str) -> DeviceSpec:
    """Parse and validate a device URI; raises DeviceUsageError (exit 2) with the accepted forms."""
    forms = "expected ssh://[user@]host[:port], adb:SERIAL, adb: or local"
    text = (uri or "").strip()
    if text == "local":
        return DeviceSpec(uri="local", kind="local")
    if text.startswith("adb:"):
        serial = text[4:]
        serial = serial.removeprefix("//")
        if serial.startswith("-") or not _SERIAL_RE.match(serial):
            raise DeviceUsageError(text, "not a valid adb serial", "use the serial printed by `adb devices`")
        return DeviceSpec(uri=text, kind="adb", serial=serial or None)
    if text.startswith("ssh://"):
        try:
            parts = urlsplit(text)
            port = parts.port
        except ValueError as exc:
            raise DeviceUsageError(text, f"bad ssh URI ({exc})", forms) from exc
        host = parts.hostname
        if parts.path not in ("", "/") or parts.query or parts.fragment or parts.password is not None:
            raise DeviceUsageError(text, "an ssh device URI has no path, query or password", forms)
        if not host or host.startswith("-") or not _HOST_RE.match(host):
            raise DeviceUsageError(text, "missing or invalid host", forms)
        user = parts.username
        if user is not None and (user.startswith("-") or not _USER_RE.match(user)):
            raise DeviceUsageError(text, "invalid user name", forms)
        # urlsplit lower-cases the host; ssh config aliases are case-sensitive, so keep the spelling given.
        netloc = parts.netloc.rsplit("@", 1)[-1]
        raw_host = netloc[1:netloc.index("]")] if netloc.startswith("[") else netloc.split(":", 1)[0]
        return DeviceSpec(uri=text, kind="ssh", host=raw_host, user=user, port=port)
    raise DeviceUsageError(text or repr(uri), "unknown device", forms)
