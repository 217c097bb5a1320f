"""The generic file watcher (gateway/config_watch.py): SIGHUP shared by several watchers, rename-replace, broken
files keeping the last good value."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import threading
from pathlib import Path
from typing import Any

import pytest

from gateway.config_watch import WatchedFile
from tests.support import replace_by_rename, until


class Reports:
    def __init__(self) -> None:
        self.calls: list[tuple[bool, str]] = []

    def __call__(self, ok: bool, message: str) -> None:
        self.calls.append((ok, message))


def _number(path: Path) -> int:
    return int(path.read_text())  # ValueError for anything but a number: the "broken file"


def _watch(path: Path, reports: Reports, what: str = "number file", poll_interval_s: float = 1.0) -> WatchedFile[int]:
    return WatchedFile(path, _number, reports, what=what, poll_interval_s=poll_interval_s)


def _write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


async def _stop(task: asyncio.Task[None]) -> None:
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


def test_a_file_broken_at_start_raises(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        _watch(_write(tmp_path, "n.txt", "not a number"), Reports())
    with pytest.raises(OSError):
        _watch(tmp_path / "missing.txt", Reports())


def test_a_broken_file_keeps_the_old_value_and_reports(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = _write(tmp_path, "n.txt", "1")
    reports = Reports()
    watched = _watch(path, reports, what="routes file")
    path.write_text("twelve")
    with caplog.at_level(logging.WARNING, logger="specgate.config"):
        assert watched.reload() is False
    assert watched.value == 1
    assert [ok for ok, _ in reports.calls] == [False]
    assert "routes file" in reports.calls[0][1] and "twelve" in reports.calls[0][1]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("routes file" in text and "twelve" in text for text in warnings)
    path.write_text("2")
    assert watched.reload() is True and watched.value == 2 and reports.calls[-1][0] is True


def test_a_rename_replace_keeping_size_and_mtime_is_detected(tmp_path: Path) -> None:
    path = _write(tmp_path, "n.txt", "11")
    reports = Reports()
    watched = _watch(path, reports)
    before = path.stat()
    replace_by_rename(path, "22")
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert (path.stat().st_size, path.stat().st_mtime_ns) == (before.st_size, before.st_mtime_ns)
    assert watched.check() is True and watched.value == 22
    assert watched.check() is None and len(reports.calls) == 1


def test_a_touch_does_not_reload(tmp_path: Path) -> None:
    path = _write(tmp_path, "n.txt", "5")
    reports = Reports()
    watched = _watch(path, reports)
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 5_000_000_000))
    assert watched.check() is None and reports.calls == []


def test_an_on_reload_that_raises_does_not_undo_the_reload(tmp_path: Path) -> None:
    def explode(ok: bool, message: str) -> None:
        raise RuntimeError("a bug in the callback")

    path = _write(tmp_path, "n.txt", "1")
    watched = WatchedFile(path, _number, explode, what="number file")
    path.write_text("3")
    assert watched.reload() is True and watched.value == 3


@pytest.mark.anyio
async def test_run_picks_up_a_rename_replace(tmp_path: Path) -> None:
    path = _write(tmp_path, "n.txt", "1")
    reports = Reports()
    watched = _watch(path, reports, poll_interval_s=0.05)
    task = asyncio.create_task(watched.run())
    try:
        replace_by_rename(path, "broken")
        assert await until(lambda: [ok for ok, _ in reports.calls] == [False])
        assert watched.value == 1
        replace_by_rename(path, "7")
        assert await until(lambda: watched.value == 7)
        assert not task.done()
    finally:
        await _stop(task)


@pytest.mark.anyio
async def test_one_sighup_reloads_every_watched_file(tmp_path: Path) -> None:
    assert threading.current_thread() is threading.main_thread()

    def placeholder(signum: int, frame: Any) -> None:  # were the watchers' handler absent, SIGHUP must not kill us
        hups.append(signum)

    hups: list[int] = []
    previous = signal.signal(signal.SIGHUP, placeholder)
    try:
        first_path, second_path = _write(tmp_path, "a.txt", "1"), _write(tmp_path, "b.txt", "10")
        first_reports, second_reports = Reports(), Reports()
        # Polling an hour apart: only the signal can make these reload.
        first = _watch(first_path, first_reports, what="first file", poll_interval_s=3600)
        second = _watch(second_path, second_reports, what="second file", poll_interval_s=3600)
        first_task = asyncio.create_task(first.run())
        second_task = asyncio.create_task(second.run())
        try:
            assert await until(lambda: signal.getsignal(signal.SIGHUP) is not placeholder)
            await asyncio.sleep(0.05)  # both tasks have started (and joined the SIGHUP fan-out)
            replace_by_rename(first_path, "2")
            replace_by_rename(second_path, "20")
            os.kill(os.getpid(), signal.SIGHUP)
            assert await until(lambda: (first.value, second.value) == (2, 20))
            assert first_reports.calls[-1][0] is True and second_reports.calls[-1][0] is True

            # One watcher stopping leaves the other one's SIGHUP in place.
            await _stop(first_task)
            assert signal.getsignal(signal.SIGHUP) is not placeholder
            replace_by_rename(first_path, "3")
            replace_by_rename(second_path, "30")
            os.kill(os.getpid(), signal.SIGHUP)
            assert await until(lambda: second.value == 30)
            assert first.value == 2
        finally:
            if not first_task.done():
                await _stop(first_task)
            await _stop(second_task)
        assert hups == []
        assert signal.getsignal(signal.SIGHUP) is placeholder  # the last one to stop puts back what was there
    finally:
        signal.signal(signal.SIGHUP, previous)
