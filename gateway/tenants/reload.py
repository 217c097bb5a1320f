"""Hot reload of the keys file: the gateway's current KeyDirectory, replaced when the file changes.

Contract: `KeysReloader.directory` is always a complete, valid directory (the file's keys merged with the legacy
`api_keys`), read per request as a plain attribute. A file that is broken at start raises KeysFileError (refuse
to start); a file broken later keeps the last good directory, logs a WARNING on "specgate.tenants" and reports
`on_reload(False, message)`. Changes are found by polling the file's (mtime_ns, size, inode), so an in-place
write and a rename over it (editors, Kubernetes ConfigMaps) both count; a stat change whose content hash is the
same (a `touch`) does not reload. SIGHUP reloads at once when `run()` runs on the main thread's loop.
`on_reload` is called only for reloads, not for the first load; an exception it raises is logged, not fatal
to the watcher.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import signal
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from gateway.tenants.keys_file import KeyDirectory, KeysFileError, load_keys_file, merged

logger = logging.getLogger("specgate.tenants")

_Fingerprint = tuple[int, int, int] | None


def _fingerprint(path: Path) -> _Fingerprint:
    try:
        # os.stat follows symlinks: a ConfigMap's swapped `..data` link shows up as the target's new inode.
        status = os.stat(path)
    except OSError:
        return None
    return (status.st_mtime_ns, status.st_size, status.st_ino)


def _content_hash(path: Path) -> str | None:
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError:
        return None


class KeysReloader:
    """Holds the current KeyDirectory; re-reads the file on demand, on SIGHUP, and when it changes."""

    def __init__(self, path: Path, legacy: KeyDirectory, on_reload: Callable[[bool, str], None],
                 poll_interval_s: float = 1.0) -> None:
        self._path = path
        self._legacy = legacy
        self._on_reload = on_reload
        self._poll_interval_s = poll_interval_s
        # Taken before the read: a change racing the read shows up as a difference at the next poll.
        self._seen = _fingerprint(path)
        self._seen_hash = _content_hash(path)
        self._directory = merged(load_keys_file(path), legacy)

    @property
    def directory(self) -> KeyDirectory:
        return self._directory

    def reload(self) -> bool:
        self._seen = _fingerprint(self._path)
        self._seen_hash = _content_hash(self._path)
        try:
            directory = merged(load_keys_file(self._path), self._legacy)
        except KeysFileError as exc:
            message = f"keys file not reloaded, the previous keys stay in force: {exc}"
            logger.warning("%s", message)
            self._on_reload(False, message)
            return False
        self._directory = directory
        message = f"keys file {self._path} reloaded: {len(directory.tenants)} keys"
        logger.info("%s", message)
        self._on_reload(True, message)
        return True

    def check(self) -> bool | None:
        """Reload if the file changed since it was last read: the reload's success, or None when unchanged."""
        seen = _fingerprint(self._path)
        if seen == self._seen:
            return None
        content = _content_hash(self._path)
        if content is not None and content == self._seen_hash:
            self._seen = seen
            return None
        return self.reload()

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        installed, previous = self._install_sighup(loop)
        try:
            while True:
                await asyncio.sleep(self._poll_interval_s)
                # A small local file: stat and read on the loop cost less than a thread hop.
                try:
                    self.check()
                except Exception:  # a bug in on_reload must not stop the watching
                    logger.exception("keys file check failed")
        finally:
            if installed:
                loop.remove_signal_handler(signal.SIGHUP)
                # remove_signal_handler leaves SIG_DFL, which for SIGHUP ends the process: put back what was there.
                with contextlib.suppress(TypeError, ValueError):
                    signal.signal(signal.SIGHUP, previous)

    def _install_sighup(self, loop: asyncio.AbstractEventLoop) -> tuple[bool, Any]:
        """Whether the handler went in (signals reach only the main thread; Windows has no SIGHUP), and the one it
        replaced."""
        sighup = getattr(signal, "SIGHUP", None)
        if sighup is None or threading.current_thread() is not threading.main_thread():
            return False, None
        previous = signal.getsignal(sighup)
        try:
            loop.add_signal_handler(sighup, self._on_sighup)
        except (NotImplementedError, RuntimeError, ValueError):
            return False, None
        return True, signal.SIG_DFL if previous is None else previous

    def _on_sighup(self) -> None:
        try:
            self.reload()
        except Exception:
            logger.exception("keys file reload on SIGHUP failed")

