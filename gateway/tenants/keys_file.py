"""The tenants' keys file: its schema, and loading it into a KeyDirectory.

Contract: `parse_keys` / `load_keys_file` either return a complete `KeyDirectory` or raise `KeysFileError` whose
message starts "<file> line <n>: " for the first problem (one line per problem), so an operator can go straight
to it. Unknown fields, non-integer or < 1 limits, duplicate names, hashes or mapping keys are all errors: a typo
must never silently disable a limit. A key's own value wins over `defaults`; a limit set by neither is None
(unlimited). Revoked keys are validated but left out of the directory. Secrets are never stored, only their
SHA-256; `KeyDirectory.lookup` hashes what the client presents.
"""

from __future__ import annotations

import fnmatch
import hashlib
import hmac
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator

Priority = Literal["high", "normal", "low"]
NAME_PATTERN = r"^[A-Za-z0-9._-]{1,64}$"

# Strict: YAML `rpm: "600"` or `rpm: true` is a mistake to report, not a value to coerce.
_Limit = Annotated[int | None, Field(strict=True, ge=1)]
_Flag = Annotated[bool, Field(strict=True)]


class _Defaults(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    rpm: _Limit = None
    tpm: _Limit = None
    max_concurrent: _Limit = None
    priority: Priority | None = None
    max_tokens: _Limit = None
    daily_tokens: _Limit = None


class _KeyEntry(_Defaults):
    name: Annotated[str, Field(strict=True, pattern=NAME_PATTERN)]
    sha256: Annotated[str, Field(strict=True, pattern=r"^[0-9A-Fa-f]{64}$")]
    models: Annotated[list[Annotated[str, Field(strict=True, min_length=1)]], Field(min_length=1)] = ["*"]
    admin: _Flag = False
    allow_client_priority: _Flag = False
    revoked: _Flag = False


class _KeysFile(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    defaults: _Defaults = _Defaults()
    keys: list[_KeyEntry] = []

    # `keys:` with no items under it (what a new file starts as) reads as null: it means "no keys".
    @field_validator("defaults", "keys", mode="before")
    @classmethod
    def _null_is_empty(cls, value: Any, info: ValidationInfo) -> Any:
        if value is None:
            return {} if info.field_name == "defaults" else []
        return value


@dataclass(frozen=True, slots=True)
class Tenant:
    """One API key's identity and what it is allowed; limits of None are unlimited."""

    name: str
    sha256: str
    models: tuple[str, ...]
    rpm: int | None
    tpm: int | None
    max_concurrent: int | None
    priority: Priority
    max_tokens: int | None
    daily_tokens: int | None
    admin: bool
    allow_client_priority: bool

    def allows_model(self, model: str) -> bool:
        # Case-sensitive on every platform: model names are served case-sensitively.
        return any(fnmatch.fnmatchcase(model, pattern) for pattern in self.models)

    @property
    def limited(self) -> bool:
        return any(limit is not None for limit in (self.rpm, self.tpm, self.max_concurrent, self.daily_tokens))


class KeysFileError(ValueError):
    """A keys file (or a combination of key sources) that cannot be used; the message names file and line."""


@dataclass(frozen=True)
class KeyDirectory:
    """The usable keys, by the hex SHA-256 of their secret."""

    tenants: Mapping[str, Tenant]

    def lookup(self, secret: bytes) -> Tenant | None:
        if not secret:
            return None
        digest = hashlib.sha256(secret).hexdigest()
        tenant = self.tenants.get(digest)
        # The mapping already matched; compare_digest keeps the comparison itself constant-time whatever matched.
        if tenant is None or not hmac.compare_digest(tenant.sha256, digest):
            return None
        return tenant

    @property
    def names(self) -> list[str]:
        return sorted(tenant.name for tenant in self.tenants.values())


def secret_digest(secret: str | bytes) -> str:
    raw = secret.encode("utf-8") if isinstance(secret, str) else secret
    return hashlib.sha256(raw).hexdigest()


def _loc_text(loc: Sequence[int | str]) -> str:
    text = ""
    for part in loc:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text


def _line_of(root: yaml.Node | None, loc: Sequence[int | str]) -> int:
    """The 1-based line of the node at `loc`, or of its nearest ancestor that exists (a missing field: its entry)."""
    if root is None:
        return 1
    node: yaml.Node = root
    line = node.start_mark.line
    for part in loc:
        if isinstance(node, yaml.MappingNode):
            found = next(((k, v) for k, v in node.value if isinstance(k, yaml.ScalarNode) and k.value == part), None)
            if found is None:
                break
            # The key's line, not the value's: a block list under `keys:` starts on the line after it.
            line, node = found[0].start_mark.line, found[1]
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and 0 <= part < len(node.value):
            node = node.value[part]
            line = node.start_mark.line
        else:
            break
    return line + 1


def _duplicate_mapping_keys(node: yaml.Node | None) -> list[tuple[int, str]]:
    """YAML lets a later `rpm:` in the same mapping replace an earlier one; here it is an error."""
    problems: list[tuple[int, str]] = []
    if isinstance(node, yaml.MappingNode):
        seen: set[str] = set()
        for key, value in node.value:
            if isinstance(key, yaml.ScalarNode):
                if key.value in seen:
                    problems.append((key.start_mark.line + 1, f"{key.value}: duplicate field"))
                seen.add(key.value)
            problems.extend(_duplicate_mapping_keys(value))
    elif isinstance(node, yaml.SequenceNode):
        for item in node.value:
            problems.extend(_duplicate_mapping_keys(item))
    return problems


def _raise(source: str, problems: list[tuple[int, str]]) -> None:
    if problems:
        raise KeysFileError("\n".join(f"{source} line {line}: {message}" for line, message in sorted(problems)))


def _compose(text: str, source: str) -> tuple[yaml.Node | None, Any]:
    loader = yaml.SafeLoader(text)
    try:
        root = loader.get_single_node()
        data = loader.construct_document(root) if root is not None else None
    except yaml.MarkedYAMLError as exc:
        line = exc.problem_mark.line + 1 if exc.problem_mark is not None else 1
        raise KeysFileError(f"{source} line {line}: {exc.problem or exc.context or 'invalid YAML'}") from exc
    except yaml.YAMLError as exc:
        raise KeysFileError(f"{source} line 1: {exc}") from exc
    finally:
        loader.dispose()
    return root, data


def _tenant(entry: _KeyEntry, defaults: _Defaults) -> Tenant:
    def pick(field: str) -> Any:
        own = getattr(entry, field)
        return own if own is not None else getattr(defaults, field)

    return Tenant(
        name=entry.name, sha256=entry.sha256.lower(), models=tuple(entry.models), rpm=pick("rpm"), tpm=pick("tpm"),
        max_concurrent=pick("max_concurrent"), priority=pick("priority") or "normal", max_tokens=pick("max_tokens"),
        daily_tokens=pick("daily_tokens"), admin=entry.admin, allow_client_priority=entry.allow_client_priority,
    )


def parse_keys(text: str, source: str) -> KeyDirectory:
    root, data = _compose(text, source)
    _raise(source, _duplicate_mapping_keys(root))
    if data is not None and not isinstance(data, dict):
        _raise(source, [(_line_of(root, ()), "the file must be a mapping with `keys:` (and optionally `defaults:`)")])
    try:
        parsed = _KeysFile.model_validate(data or {})
    except ValidationError as exc:
        _raise(source, [(_line_of(root, error["loc"]), f"{_loc_text(error['loc'])}: {error['msg']}")
                        for error in exc.errors(include_url=False)])
        raise  # unreachable: a ValidationError has at least one error
    problems: list[tuple[int, str]] = []
    names: set[str] = set()
    digests: set[str] = set()
    tenants: dict[str, Tenant] = {}
    for index, entry in enumerate(parsed.keys):
        digest = entry.sha256.lower()
        if entry.name in names:
            problems.append((_line_of(root, ("keys", index, "name")), f"keys[{index}].name: '{entry.name}' is "
                             "already used by another key"))
        if digest in digests:
            problems.append((_line_of(root, ("keys", index, "sha256")), f"keys[{index}].sha256: the same secret "
                             "hash is already used by another key"))
        names.add(entry.name)
        digests.add(digest)
        if not entry.revoked:
            tenants[digest] = _tenant(entry, parsed.defaults)
    _raise(source, problems)
    return KeyDirectory(MappingProxyType(tenants))


def load_keys_file(path: Path) -> KeyDirectory:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise KeysFileError(f"{path}: cannot read the keys file: {exc}") from exc
    return parse_keys(text, str(path))


def legacy_directory(api_keys: Sequence[str]) -> KeyDirectory:
    """The old static `api_keys` setting as tenants that keep the powers those keys had: all of them."""
    tenants: dict[str, Tenant] = {}
    for position, secret in enumerate(api_keys, start=1):
        digest = secret_digest(secret)
        # A key listed twice was harmless before; the first listing names it. An empty key never matched.
        if secret and digest not in tenants:
            tenants[digest] = Tenant(
                name=f"key-{position}", sha256=digest, models=("*",), rpm=None, tpm=None, max_concurrent=None,
                priority="normal", max_tokens=None, daily_tokens=None, admin=True, allow_client_priority=True,
            )
    return KeyDirectory(MappingProxyType(tenants))


def merged(*directories: KeyDirectory) -> KeyDirectory:
    """One directory from several sources (the keys file and the legacy setting); a name or secret in two is an
    error, since which of the two tenants a request belongs to would be arbitrary."""
    tenants: dict[str, Tenant] = {}
    names: set[str] = set()
    for directory in directories:
        for digest, tenant in directory.tenants.items():
            if digest in tenants:
                raise KeysFileError(f"keys '{tenants[digest].name}' and '{tenant.name}' have the same secret in two "
                                    "key sources (the keys file and the api_keys setting?)")
            if tenant.name in names:
                raise KeysFileError(f"key name '{tenant.name}' is used in two key sources (the keys file and the "
                                    "api_keys setting?)")
            tenants[digest] = tenant
            names.add(tenant.name)
    return KeyDirectory(MappingProxyType(tenants))
