"""`specgate keys add`: create a key, store only its SHA-256 in the keys file, show the secret once.

Contract: on success the file still loads with `load_keys_file` and holds the new key, the secret is printed
alone on one stdout line (exit 0), and a note on stderr says it will not be shown again. The entry is appended
as text so the file's comments and layout survive; only when `keys:` is not the file's last top-level entry
(or is a non-empty flow list) is the file re-dumped, and stderr says its comments were lost. Every write is
atomic (a temporary file in the same directory, then os.replace) and keeps the file's mode. A name already in
the file exits 2 and an unusable existing file exits 2, both leaving the file untouched; a result that fails to
load (which should not happen) restores the old content and exits 1.
"""

from __future__ import annotations

import argparse
import os
import re
import secrets
import stat
import sys
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TextIO

import yaml

from gateway.tenants.keys_file import NAME_PATTERN, KeysFileError, load_keys_file, secret_digest

DEFAULT_KEYS_FILE = Path("configs/keys.yaml")
KEYS_FILE_ENV = "SPECGATE_KEYS_FILE"
SECRET_PREFIX = "sk-sg-"
# Hashes only, no secrets: readable by the gateway's user whoever created it.
NEW_FILE_MODE = 0o644
_NO_WRAP = 1 << 20
NEW_FILE_HEADER = "# API keys (`specgate keys add NAME` appends here). Only SHA-256 digests of secrets are stored.\n"


def keys_file_path(given: Path | None) -> Path:
    if given is not None:
        return given
    return Path(os.environ.get(KEYS_FILE_ENV) or DEFAULT_KEYS_FILE)


def _field_text(field: str, value: Any) -> str:
    # safe_dump quotes what YAML would otherwise read as another type (a name like `123` or `true`); lists stay
    # on the field's line (`models: [demo*]`), as in the file's documented layout.
    flow = None if isinstance(value, list) else False
    text: str = yaml.safe_dump({field: value}, default_flow_style=flow, allow_unicode=True, width=_NO_WRAP)
    return text


def _item_text(entry: Mapping[str, Any], dash_column: int) -> str:
    lines = [_field_text(field, value) for field, value in entry.items()]
    return "".join(" " * dash_column + ("- " if index == 0 else "  ") + line for index, line in enumerate(lines))


def _dash_column(text: str, item: yaml.Node) -> int | None:
    # The node starts after the dash ("  - name: a" starts at `name`); the new item's dash goes where this one's is.
    before = text.splitlines()[item.start_mark.line][: item.start_mark.column]
    return before.rindex("-") if before.strip() == "-" else None


def _appended(text: str, entry: Mapping[str, Any]) -> str | None:
    """`text` with the entry appended as text, or None when only a re-dump can place it."""
    root = yaml.compose(text, Loader=yaml.SafeLoader)
    body = text if not text or text.endswith("\n") else text + "\n"
    if root is None:
        return body + "keys:\n" + _item_text(entry, 2)
    if not isinstance(root, yaml.MappingNode) or root.flow_style:
        return None
    last_key, last_value = root.value[-1] if root.value else (None, None)
    if not any(isinstance(key, yaml.ScalarNode) and key.value == "keys" for key, _ in root.value):
        return body + "keys:\n" + _item_text(entry, 2)
    if not isinstance(last_key, yaml.ScalarNode) or last_key.value != "keys" or last_value is None:
        return None
    if isinstance(last_value, yaml.SequenceNode) and not last_value.flow_style and last_value.value:
        column = _dash_column(text, last_value.value[0])
        return None if column is None else body + _item_text(entry, column)
    empty_flow = isinstance(last_value, yaml.SequenceNode) and not last_value.value
    null = isinstance(last_value, yaml.ScalarNode) and last_value.tag == "tag:yaml.org,2002:null"
    if null and last_value.value == "":
        return body + _item_text(entry, 2)
    if not (empty_flow or null):
        return None
    # `keys: []` or `keys: null` becomes `keys:`, so the block item below belongs to it; a comment after it stays.
    start, end = last_key.start_mark.index, last_value.end_mark.index
    rewritten = text[:start] + "keys:" + text[end:]
    return (rewritten if rewritten.endswith("\n") else rewritten + "\n") + _item_text(entry, 2)


def _redumped(text: str, entry: Mapping[str, Any]) -> str:
    data = yaml.safe_load(text) or {}
    data["keys"] = [*(data.get("keys") or []), dict(entry)]
    dumped: str = yaml.safe_dump(data, sort_keys=False, allow_unicode=True, width=_NO_WRAP)
    return dumped


def _write_atomic(path: Path, content: str, mode: int) -> None:
    descriptor, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(descriptor, "w", encoding="utf-8") as handle:
            handle.write(content)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(temporary, mode)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def _names_in(text: str) -> set[str]:
    # Called on a file that loads, so the shape is known; revoked keys' names count too.
    data = yaml.safe_load(text) or {}
    return {str(entry["name"]) for entry in data.get("keys") or []}


def add_key(path: Path, name: str, options: Mapping[str, Any], out: TextIO | None = None,
            err: TextIO | None = None) -> int:
    """Append a new key named `name` with `options` (only those given) to `path`; the exit code."""
    out = sys.stdout if out is None else out
    err = sys.stderr if err is None else err
    if not re.fullmatch(NAME_PATTERN, name):
        print(f"specgate: key name '{name}' must be 1-64 of A-Z a-z 0-9 . _ -", file=err)
        return 2
    existed = path.exists()
    old_text = ""
    if existed:
        try:
            load_keys_file(path)
        except KeysFileError as exc:
            print(f"specgate: fix the keys file before adding to it:\n{exc}", file=err)
            return 2
        old_text = path.read_text(encoding="utf-8")
        if name in _names_in(old_text):
            print(f"specgate: a key named '{name}' already exists in {path}; choose another name", file=err)
            return 2
    secret = SECRET_PREFIX + secrets.token_urlsafe(32)
    digest = secret_digest(secret)
    entry = {"name": name, "sha256": digest, **options}
    new_text = _appended(old_text, entry) if existed else NEW_FILE_HEADER + "keys:\n" + _item_text(entry, 2)
    if new_text is None:
        new_text = _redumped(old_text, entry)
        print(f"specgate: `keys:` is not the last entry of {path}, so it was rewritten: its comments were not kept",
              file=err)
    mode = stat.S_IMODE(path.stat().st_mode) if existed else NEW_FILE_MODE
    path.parent.mkdir(parents=True, exist_ok=True)
    _write_atomic(path, new_text, mode)
    try:
        tenant = load_keys_file(path).tenants.get(digest)
        if tenant is None or tenant.name != name:
            raise KeysFileError(f"{path}: the new key is not in the file after writing it")
    except KeysFileError as exc:
        if existed:
            _write_atomic(path, old_text, mode)
        else:
            path.unlink(missing_ok=True)
        print(f"specgate: adding the key failed, {path} is as it was:\n{exc}", file=err)
        return 1
    print(secret, file=out, flush=True)
    print(f"specgate: added key '{name}' to {path}. The secret above is shown only this once: store it now. "
          "A gateway watching this file picks it up by itself.", file=err)
    return 0


def options_from(args: argparse.Namespace) -> dict[str, Any]:
    """The entry's fields from `specgate keys add`'s arguments: only those given, in the file's usual order."""
    options: dict[str, Any] = {}
    if args.models:
        options["models"] = list(args.models)
    for field in ("rpm", "tpm", "max_concurrent", "priority", "max_tokens", "daily_tokens"):
        if getattr(args, field) is not None:
            options[field] = getattr(args, field)
    for flag in ("admin", "allow_client_priority"):
        if getattr(args, flag):
            options[flag] = True
    return options


def run_keys(args: argparse.Namespace) -> int:
    """`specgate keys ...`: dispatch on the subcommand."""
    try:
        if args.keys_command == "add":
            return add_key(keys_file_path(args.file), args.name, options_from(args))
    except OSError as exc:  # a directory or file this user may not write: one line, not a traceback
        print(f"specgate: {exc}", file=sys.stderr)
        return 1
    return 2
