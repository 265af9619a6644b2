"""``local``: this machine through the same shell/script/cache code path as a remote device.

Why bother: ``profile --device local`` then measures exactly what a device run measures (a fresh process, the
same runner script), and the tests exercise the device code path without any server.
"""
from __future__ import annotations

import sys

from .base import ShellDevice


class LocalDevice(ShellDevice):
    kind = "local"

    def __init__(self, *, python: str | None = None, cache_dir: str | None = None, tmp_dir: str | None = None) -> None:
        super().__init__(cache_dir=cache_dir, tmp_dir=tmp_dir)
        self.uri = "local"
        self.python = python or sys.executable

    def _argv(self, command: str) -> list[str]:
        return ["/bin/sh", "-c", command]
