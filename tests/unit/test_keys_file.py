"""The tenants' keys file (gateway/tenants/keys_file.py) and `specgate keys add` (gateway/tenants/keys_cli.py)."""

from __future__ import annotations

import hashlib
import stat
from pathlib import Path

import pytest
import yaml

from gateway.cli import main
from gateway.tenants.keys_file import (
    KeyDirectory,
    KeysFileError,
    legacy_directory,
    load_keys_file,
    merged,
    parse_keys,
    secret_digest,
)

A = secret_digest("secret-a")
B = secret_digest("secret-b")
C = secret_digest("secret-c")

FILE = f"""\
# the tenants
defaults: {{rpm: 60, tpm: 100000, max_concurrent: 8, priority: normal}}
keys:
  - name: team-a
    sha256: {A.upper()}
    models: ["demo*"]
    rpm: 600
    priority: high
    admin: true
  - name: team-b
    sha256: {B}
    max_tokens: 4096
    daily_tokens: 1000000
    allow_client_priority: true
  - name: gone
    sha256: {C}
    revoked: true
"""


def _error(text: str) -> str:
    with pytest.raises(KeysFileError) as raised:
        parse_keys(text, "keys.yaml")
    return str(raised.value)


def test_defaults_apply_and_a_keys_own_values_win() -> None:
    directory = parse_keys(FILE, "keys.yaml")
    a, b = directory.tenants[A], directory.tenants[B]
    assert (a.name, a.sha256, a.models) == ("team-a", A, ("demo*",))
    assert (a.rpm, a.tpm, a.max_concurrent, a.priority, a.admin) == (600, 100000, 8, "high", True)
    assert (b.rpm, b.priority, b.models, b.max_tokens, b.daily_tokens) == (60, "normal", ("*",), 4096, 1000000)
    assert (b.admin, b.allow_client_priority, a.allow_client_priority) == (False, True, False)
    assert a.max_tokens is None and a.daily_tokens is None


def test_a_limit_set_nowhere_is_unlimited() -> None:
    tenant = parse_keys(f"keys:\n  - name: free\n    sha256: {A}\n", "k").tenants[A]
    assert (tenant.rpm, tenant.tpm, tenant.max_concurrent, tenant.max_tokens) == (None, None, None, None)
    assert tenant.priority == "normal" and not tenant.limited
    assert parse_keys(FILE, "k").tenants[B].limited


def test_revoked_keys_are_left_out() -> None:
    directory = parse_keys(FILE, "keys.yaml")
    assert C not in directory.tenants
    assert directory.names == ["team-a", "team-b"]
    assert directory.lookup(b"secret-c") is None


@pytest.mark.parametrize("text", ["", "# nothing yet\n", "keys: []\n", "keys:\n", "defaults: {rpm: 5}\n"])
def test_a_file_without_keys_is_valid(text: str) -> None:
    assert parse_keys(text, "keys.yaml").tenants == {}


def test_lookup_finds_the_right_secret_only() -> None:
    directory = parse_keys(FILE, "keys.yaml")
    found = directory.lookup(b"secret-a")
    assert found is not None and found.name == "team-a"
    assert directory.lookup(b"secret-A") is None
    assert directory.lookup(b"") is None


def test_allows_model_matches_globs_case_sensitively() -> None:
    tenant = parse_keys(FILE, "keys.yaml").tenants[A]
    assert tenant.allows_model("demo") and tenant.allows_model("demo-target")
    assert not tenant.allows_model("Demo") and not tenant.allows_model("smollm2")
    assert parse_keys(FILE, "keys.yaml").tenants[B].allows_model("anything/at-all")


def test_an_unknown_field_names_its_line() -> None:
    text = FILE.replace("    max_tokens: 4096\n", "    max_tokns: 4096\n")
    assert _error(text).startswith("keys.yaml line 12: keys[1].max_tokns: Extra inputs are not permitted")
    assert _error("defaults: {rpm: 1}\nsecrets: []\n").startswith("keys.yaml line 2: secrets:")


def test_a_limit_below_one_or_not_an_integer_names_its_line() -> None:
    assert _error(FILE.replace("rpm: 600", "rpm: 0")) == (
        "keys.yaml line 7: keys[0].rpm: Input should be greater than or equal to 1")
    assert _error(FILE.replace("rpm: 600", 'rpm: "600"')).startswith("keys.yaml line 7: keys[0].rpm: ")
    assert _error(FILE.replace("priority: high", "priority: urgent")).startswith("keys.yaml line 8: keys[0].priority")


def test_a_missing_field_points_at_its_entry() -> None:
    without_hash = FILE.replace(f"    sha256: {B}\n", "")
    assert _error(without_hash).startswith("keys.yaml line 10: keys[1].sha256: Field required")


def test_bad_yaml_names_its_line() -> None:
    assert _error(FILE.replace("    rpm: 600\n", "    rpm: [600\n")).startswith("keys.yaml line 8: ")
    assert _error("keys:\n  - name: a\n   bad indent: 1\n").startswith("keys.yaml line 3: ")


def test_duplicate_names_hashes_and_fields_name_the_second_line() -> None:
    assert _error(FILE.replace("name: gone", "name: team-a")).startswith("keys.yaml line 15: keys[2].name: 'team-a'")
    assert _error(FILE.replace(C, A.lower())).startswith("keys.yaml line 16: keys[2].sha256: ")
    assert _error(FILE.replace("    rpm: 600\n", "    rpm: 600\n    rpm: 6\n")).startswith("keys.yaml line 8: rpm:")


def test_bad_names_and_hashes_are_refused() -> None:
    assert "keys[0].name" in _error(f"keys:\n  - name: 'a b'\n    sha256: {A}\n")
    assert "keys[0].sha256" in _error("keys:\n  - name: a\n    sha256: 1234\n")


def test_a_missing_file_is_a_keys_file_error(tmp_path: Path) -> None:
    with pytest.raises(KeysFileError, match=r"missing\.yaml"):
        load_keys_file(tmp_path / "missing.yaml")


def test_legacy_keys_keep_their_old_powers() -> None:
    directory = legacy_directory(["first", "second", "first"])
    assert directory.names == ["key-1", "key-2"]
    tenant = directory.lookup(b"second")
    assert tenant is not None and tenant.name == "key-2" and tenant.models == ("*",)
    assert tenant.admin and tenant.allow_client_priority and not tenant.limited and tenant.priority == "normal"
    assert tenant.sha256 == hashlib.sha256(b"second").hexdigest()


def test_merged_is_a_union_and_refuses_duplicates() -> None:
    from_file = parse_keys(FILE, "keys.yaml")
    both = merged(from_file, legacy_directory(["old"]))
    assert both.names == ["key-1", "team-a", "team-b"]
    assert merged().tenants == {} and isinstance(merged(), KeyDirectory)
    with pytest.raises(KeysFileError, match="same secret"):
        merged(from_file, legacy_directory(["secret-a"]))
    renamed = parse_keys(f"keys:\n  - name: key-1\n    sha256: {C}\n", "k")
    with pytest.raises(KeysFileError, match="'key-1'"):
        merged(renamed, legacy_directory(["old"]))


# `specgate keys add`


def _add(capsys: pytest.CaptureFixture[str], path: Path, *args: str) -> tuple[int, str, str]:
    code = main(["keys", "add", *args, "--file", str(path)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_keys_add_appends_and_prints_the_secret_once(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "keys.yaml"
    path.write_text(FILE)
    path.chmod(0o640)
    code, out, err = _add(capsys, path, "team-c", "--models", "demo*", "smol*", "--rpm", "10", "--priority", "low")
    assert code == 0 and "shown only this once" in err
    secret = out.strip()
    assert out == secret + "\n" and secret.startswith("sk-sg-") and len(secret) > 40
    text = path.read_text()
    assert text.startswith(FILE) and "# the tenants" in text
    tenant = load_keys_file(path).lookup(secret.encode())
    assert tenant is not None and tenant.name == "team-c" and tenant.models == ("demo*", "smol*")
    assert (tenant.rpm, tenant.tpm, tenant.priority, tenant.admin) == (10, 100000, "low", False)
    assert secret not in text and secret_digest(secret) in text
    assert stat.S_IMODE(path.stat().st_mode) == 0o640

    code, second, _ = _add(capsys, path, "team-d", "--admin", "--allow-client-priority")
    directory = load_keys_file(path)
    assert code == 0 and directory.names == ["team-a", "team-b", "team-c", "team-d"]
    added = directory.lookup(second.strip().encode())
    assert added is not None and added.admin and added.allow_client_priority
    # Appended in the existing items' layout, not as a flow mapping or at another indent.
    assert "\n  - name: team-d\n    sha256: " in path.read_text()


def test_keys_add_refuses_a_duplicate_name_and_leaves_the_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "keys.yaml"
    path.write_text(FILE)
    for name in ("team-a", "gone"):  # a revoked key's name is taken too
        code, out, err = _add(capsys, path, name)
        assert (code, out) == (2, "") and name in err
    assert path.read_text() == FILE


def test_keys_add_creates_a_missing_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "conf" / "keys.yaml"
    monkeypatch.setenv("SPECGATE_KEYS_FILE", str(path))
    code = main(["keys", "add", "first", "--daily-tokens", "500"])
    secret = capsys.readouterr().out.strip()
    tenant = load_keys_file(path).lookup(secret.encode())
    assert code == 0 and tenant is not None and tenant.daily_tokens == 500
    assert yaml.safe_load(path.read_text())["keys"][0] == {"name": "first", "sha256": secret_digest(secret),
                                                          "daily_tokens": 500}


@pytest.mark.parametrize(("before", "kept"), [
    ("keys: []  # none yet\n# end\n", "# none yet"),
    ("defaults: {rpm: 5}  # all\nkeys:\n", "# all"),
    ("# only a comment\n", "# only a comment"),
    ("keys:\n- name: a\n  sha256: " + A + "  # flush left\n", "# flush left"),
])
def test_keys_add_keeps_comments_whatever_the_list_looks_like(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], before: str, kept: str
) -> None:
    path = tmp_path / "keys.yaml"
    path.write_text(before)
    code, out, err = _add(capsys, path, "new")
    assert code == 0 and kept in path.read_text() and "not kept" not in err
    tenant = load_keys_file(path).lookup(out.strip().encode())
    assert tenant is not None and tenant.name == "new"


def test_keys_add_rewrites_when_keys_is_not_last_and_says_so(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "keys.yaml"
    path.write_text(f"keys:\n  - name: a\n    sha256: {A}\ndefaults:  # lost\n  rpm: 7\n")
    code, out, err = _add(capsys, path, "new")
    assert code == 0 and "comments were not kept" in err
    tenant = load_keys_file(path).lookup(out.strip().encode())
    assert tenant is not None and tenant.rpm == 7 and load_keys_file(path).names == ["a", "new"]


def test_keys_add_refuses_a_broken_file_and_a_bad_name(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "keys.yaml"
    path.write_text("keys:\n  - name: a\n")
    code, out, err = _add(capsys, path, "new")
    assert (code, out) == (2, "") and "line 2" in err and path.read_text() == "keys:\n  - name: a\n"
    code, out, _ = _add(capsys, tmp_path / "other.yaml", "no spaces")
    assert (code, out) == (2, "") and not (tmp_path / "other.yaml").exists()


def test_the_example_keys_file_loads_and_its_documented_secrets_open_it() -> None:
    example = Path(__file__).resolve().parents[2] / "configs" / "keys" / "keys.example.yaml"
    directory = load_keys_file(example)
    team = directory.lookup(b"sk-example-team-a")
    ops = directory.lookup(b"sk-example-ops")
    assert team is not None and team.rpm == 600 and team.priority == "high" and not team.admin
    assert ops is not None and ops.admin and ops.rpm == 60, "the defaults apply where a key says nothing"
