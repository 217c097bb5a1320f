"""The keys file's hot reload (gateway/tenants/reload.py): on demand, on change (also by rename), on SIGHUP."""

from __future__ import annotations

import asyncio
import logging
import os
from pathlib import Path

import pytest

from gateway.tenants.keys_file import KeysFileError, legacy_directory, secret_digest
from gateway.tenants.reload import KeysReloader
from tests.support import replace_by_rename, until


def _keys(*names: str) -> str:
    return "keys:\n" + "".join(f"  - name: {name}\n    sha256: {secret_digest(name)}\n" for name in names)


class Reports:
    def __init__(self) -> None:
        self.calls: list[tuple[bool, str]] = []

    def __call__(self, ok: bool, message: str) -> None:
        self.calls.append((ok, message))


@pytest.fixture
def keys_path(tmp_path: Path) -> Path:
    path = tmp_path / "keys.yaml"
    path.write_text(_keys("alpha"))
    return path


def _replace_keeping_size_and_mtime(path: Path, text: str) -> None:
    """Same length, same mtime: only the inode (and the content) tell the new file from the old one."""
    before = path.stat()
    replace_by_rename(path, text)
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    after = path.stat()
    assert (after.st_size, after.st_mtime_ns) == (before.st_size, before.st_mtime_ns)
    assert after.st_ino != before.st_ino


def test_a_broken_file_at_start_refuses_to_start(tmp_path: Path) -> None:
    path = tmp_path / "keys.yaml"
    path.write_text("keys:\n  - name: a\n")
    with pytest.raises(KeysFileError, match="line 2"):
        KeysReloader(path, legacy_directory([]), Reports())
    with pytest.raises(KeysFileError):
        KeysReloader(tmp_path / "missing.yaml", legacy_directory([]), Reports())


def test_the_directory_merges_the_file_with_the_legacy_keys(keys_path: Path) -> None:
    reloader = KeysReloader(keys_path, legacy_directory(["old-key"]), Reports())
    assert reloader.directory.names == ["alpha", "key-1"]
    tenant = reloader.directory.lookup(b"old-key")
    assert tenant is not None and tenant.admin


def test_an_edit_is_visible_after_reload(keys_path: Path) -> None:
    reports = Reports()
    reloader = KeysReloader(keys_path, legacy_directory([]), reports)
    keys_path.write_text(_keys("alpha", "beta"))
    assert reloader.reload() is True
    assert reloader.directory.lookup(b"beta") is not None
    assert len(reports.calls) == 1 and reports.calls[0][0] is True


def test_a_broken_edit_keeps_the_old_keys(keys_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    reports = Reports()
    reloader = KeysReloader(keys_path, legacy_directory([]), reports)
    keys_path.write_text(_keys("alpha", "beta").replace("    sha256", "    sha265", 1))
    with caplog.at_level(logging.WARNING, logger="specgate.tenants"):
        assert reloader.reload() is False
    assert reloader.directory.names == ["alpha"] and reloader.directory.lookup(b"alpha") is not None
    assert [ok for ok, _ in reports.calls] == [False] and "line 3" in reports.calls[0][1]
    assert any(r.levelno == logging.WARNING and "sha265" in r.getMessage() for r in caplog.records)


def test_a_clash_with_the_legacy_keys_keeps_the_old_keys(keys_path: Path) -> None:
    reports = Reports()
    reloader = KeysReloader(keys_path, legacy_directory(["old-key"]), reports)
    keys_path.write_text(_keys("alpha", "key-1"))
    assert reloader.reload() is False and "'key-1'" in reports.calls[-1][1]
    assert reloader.directory.names == ["alpha", "key-1"] and reloader.directory.lookup(b"old-key") is not None


def test_check_ignores_a_touch_and_reloads_a_change(keys_path: Path) -> None:
    reports = Reports()
    reloader = KeysReloader(keys_path, legacy_directory([]), reports)
    assert reloader.check() is None
    stat = keys_path.stat()
    os.utime(keys_path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 5_000_000_000))
    assert reloader.check() is None and reports.calls == []
    keys_path.write_text(_keys("alpha", "gamma"))
    assert reloader.check() is True and reloader.directory.lookup(b"gamma") is not None
    assert reloader.check() is None and len(reports.calls) == 1


async def _stop(task: asyncio.Task[None]) -> None:
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


@pytest.mark.anyio
async def test_run_picks_up_a_rename_that_keeps_size_and_mtime(keys_path: Path) -> None:
    reports = Reports()
    reloader = KeysReloader(keys_path, legacy_directory([]), reports, poll_interval_s=0.05)
    task = asyncio.create_task(reloader.run())
    try:
        _replace_keeping_size_and_mtime(keys_path, _keys("omega"))
        assert await until(lambda: reloader.directory.lookup(b"omega") is not None)
        assert reloader.directory.lookup(b"alpha") is None and reports.calls[-1][0] is True
    finally:
        await _stop(task)
