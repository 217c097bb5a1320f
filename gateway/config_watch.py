"""Hot reload of one configuration file: the value loaded from it, replaced when the file changes.

Contract: `WatchedFile.value` is always a value `load` returned, read per request as a plain attribute. The first
load happens in the constructor and its errors propagate (a file broken at start refuses the start). A file broken
later keeps the last good value, logs a WARNING naming `what` and the error, and reports `on_reload(False,
message)`; a good reload reports `on_reload(True, message)`. `on_reload` is called only for reloads, not for the
first load; an exception it raises is logged, never passed on. Changes are found by polling the file's
(mtime_ns, size, inode), so an in-place write and a rename over it (editors, Kubernetes ConfigMaps) both count; a
stat change whose content hash is the same (a `touch`) does not reload. SIGHUP reloads at once every WatchedFile
whose `run()` runs on the main thread's loop; when the last of them stops, the SIGHUP handler that was there
before is put back.
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
from typing import Any, Generic, TypeVar

T = TypeVar("T")

_logger = logging.getLogger("specgate.config")

# Where a loop's _SighupFanout lives (see that class for why on the loop).
_FANOUT_ATTRIBUTE = "_specgate_sighup_fanout"

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


class _SighupFanout:
    """The single SIGHUP callback of one event loop, calling every watcher that runs on that loop.

    `loop.add_signal_handler` keeps one callback per signal, so a second watcher installing its own would silently
    unhook the first. The watchers of one loop therefore share this object, and it is kept as an attribute of the
    loop itself: its lifetime is exactly the loop's (a new loop, e.g. in the next test, starts clean), only that
    loop's thread ever touches it (no lock), and the process has no module-level registry to leak or go stale.
    A module-level WeakKeyDictionary keyed by loop would hold the same map, but as process-wide mutable state.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, sighup: int, previous: Any) -> None:
        self._loop = loop
        self._sighup = sighup
        self._previous = previous
        self._members: list[Callable[[], None]] = []

    @classmethod
    def join(cls, loop: asyncio.AbstractEventLoop, member: Callable[[], None]) -> _SighupFanout | None:
        """Add `member` to the loop's fan-out, installing it on first use; None where SIGHUP cannot be handled
        (not the main thread: signals reach only it; no SIGHUP on Windows; a loop without signal support)."""
        fanout = getattr(loop, _FANOUT_ATTRIBUTE, None)
        if not isinstance(fanout, _SighupFanout):
            fanout = cls._install(loop)
            if fanout is None:
                return None
        fanout._members.append(member)
        return fanout

    @classmethod
    def _install(cls, loop: asyncio.AbstractEventLoop) -> _SighupFanout | None:
        sighup = getattr(signal, "SIGHUP", None)
        if sighup is None or threading.current_thread() is not threading.main_thread():
            return None
        previous = signal.getsignal(sighup)
        fanout = cls(loop, sighup, signal.SIG_DFL if previous is None else previous)
        try:
            setattr(loop, _FANOUT_ATTRIBUTE, fanout)
        except AttributeError:  # a loop class with __slots__: without a shared place, chaining is impossible
            return None
        try:
            loop.add_signal_handler(sighup, fanout._fire)
        except (NotImplementedError, RuntimeError, ValueError):
            delattr(loop, _FANOUT_ATTRIBUTE)
            return None
        return fanout

    def leave(self, member: Callable[[], None]) -> None:
        self._members.remove(member)
        if self._members:
            return
        with contextlib.suppress(AttributeError):
            delattr(self._loop, _FANOUT_ATTRIBUTE)
        if not self._loop.is_closed():  # a closed loop has dropped its handlers already
            self._loop.remove_signal_handler(self._sighup)
        # remove_signal_handler leaves SIG_DFL, which for SIGHUP ends the process: put back what was there.
        with contextlib.suppress(TypeError, ValueError):
            signal.signal(self._sighup, self._previous)

    def _fire(self) -> None:
        # A copy: a member may stop (and leave) while the others are still being called.
        for member in list(self._members):
            member()


class WatchedFile(Generic[T]):
    """Holds the value loaded from a file; re-reads on demand, on SIGHUP and when the file changes (rename-replace
    included)."""

    def __init__(self, path: Path, load: Callable[[Path], T], on_reload: Callable[[bool, str], None], *,
                 what: str, poll_interval_s: float = 1.0, logger: logging.Logger | None = None,
                 describe: Callable[[T], str] | None = None) -> None:
        self._path = path
        self._load = load
        self._on_reload = on_reload
        self._what = what
        self._poll_interval_s = poll_interval_s
        self._logger = logger if logger is not None else _logger
        self._describe = describe
        # Taken before the read: a change racing the read shows up as a difference at the next poll.
        self._seen = _fingerprint(path)
        self._seen_hash = _content_hash(path)
        self._value = load(path)

    @property
    def value(self) -> T:
        return self._value

    @property
    def path(self) -> Path:
        return self._path

    def reload(self) -> bool:
        self._seen = _fingerprint(self._path)
        self._seen_hash = _content_hash(self._path)
        try:
            value = self._load(self._path)
        except Exception as exc:  # whatever the loader raises, the file is unusable: the old value stays
            message = f"{self._what} {self._path} not reloaded, the last good one stays in force: {exc}"
            # A loader reports a bad file as ValueError/OSError; anything else may be a bug: keep its traceback.
            expected = isinstance(exc, ValueError | OSError)
            self._logger.warning("%s", message, exc_info=None if expected else exc)
            self._report(False, message)
            return False
        self._value = value
        summary = f": {self._describe(value)}" if self._describe is not None else ""
        message = f"{self._what} {self._path} reloaded{summary}"
        self._logger.info("%s", message)
        self._report(True, message)
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
        """Poll until cancelled, and reload on SIGHUP meanwhile."""
        loop = asyncio.get_running_loop()
        fanout = _SighupFanout.join(loop, self._on_sighup)
        try:
            while True:
                await asyncio.sleep(self._poll_interval_s)
                # A small local file: stat and read on the loop cost less than a thread hop.
                try:
                    self.check()
                except Exception:  # a bug must not stop the watching
                    self._logger.exception("%s check failed", self._what)
        finally:
            if fanout is not None:
                fanout.leave(self._on_sighup)

    def _report(self, ok: bool, message: str) -> None:
        try:
            self._on_reload(ok, message)
        except Exception:  # the callback's bug is not the file's fault: the reload stands
            self._logger.exception("%s reload callback failed", self._what)

    def _on_sighup(self) -> None:
        # Called by the loop's fan-out: raising here would keep the other watchers from reloading.
        try:
            self.reload()
        except Exception:
            self._logger.exception("%s reload on SIGHUP failed", self._what)
