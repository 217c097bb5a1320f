"""Hot reload of the keys file: the gateway's current KeyDirectory, replaced when the file changes.

Contract: `KeysReloader.directory` is always a complete, valid directory (the file's keys merged with the legacy
`api_keys`), read per request as a plain attribute. A file that is broken at start raises KeysFileError (refuse
to start); a file broken later keeps the last good directory, logs a WARNING on "specgate.tenants" and reports
`on_reload(False, message)`. The watching itself (polling by stat and content hash, rename-replace, SIGHUP shared
with the other watched files, `on_reload` errors logged, not fatal) is gateway/config_watch.py's.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

from gateway.config_watch import WatchedFile
from gateway.tenants.keys_file import KeyDirectory, load_keys_file, merged

logger = logging.getLogger("specgate.tenants")


class KeysReloader(WatchedFile[KeyDirectory]):
    """Holds the current KeyDirectory; re-reads the file on demand, on SIGHUP, and when it changes."""

    def __init__(self, path: Path, legacy: KeyDirectory, on_reload: Callable[[bool, str], None],
                 poll_interval_s: float = 1.0) -> None:
        def load(source: Path) -> KeyDirectory:
            # Merged on every load: a file key that clashes with a legacy key is a broken file like any other.
            return merged(load_keys_file(source), legacy)

        super().__init__(path, load, on_reload, what="keys file", poll_interval_s=poll_interval_s, logger=logger,
                         describe=lambda directory: f"{len(directory.tenants)} keys")

    @property
    def directory(self) -> KeyDirectory:
        return self.value
