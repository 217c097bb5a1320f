"""`specgate ab-report` on a synthetic request log: significance where versions differ and none where they do not,
shadow-pair output agreement, skipped non-JSON lines, the time window, the PNG, and scipy/matplotlib left unloaded
by the rest of the CLI."""

from __future__ import annotations

import json
import math
import random
import subprocess
import sys
from pathlib import Path

import pytest

from gateway.cli import main
from gateway.reports.ab_report import parse_time
from gateway.reports.ab_stats import median_ci, two_proportion

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
T0 = 1_700_000_000.0  # 2023-11-14T22:13:20Z
PER_VERSION = 300
NOISE = ['INFO:     127.0.0.1:51234 - "POST /v1/chat/completions HTTP/1.1" 200 OK', "Traceback {not json",
         "", "{\"truncated\": ", "[1, 2, 3]", 'INFO specgate: {"event": "reload"}']


def _record(rng: random.Random, version: str, index: int, ttft_median: float, error: bool) -> dict[str, object]:
    ok = not error
    return {"time": T0 + index * 10, "request_id": f"{version}-{index}", "model": "chat", "route": "chat",
            "served_model": version, "worker": "w0", "status": "502" if error else "200", "stream": True,
            "output_tokens": rng.randint(40, 160) if ok else 0,
            "ttft_s": rng.lognormvariate(math.log(ttft_median), 0.35) if ok else None,
            "tbt_mean_s": rng.lognormvariate(math.log(0.02), 0.2) if ok else None, "e2e_s": 1.0,
            "shadow_of": None, "greedy": False, "output_sha256": None}


def _lines() -> list[str]:
    """v1 and v3 alike (1 % errors, TTFT ~200 ms), v2 slower (~300 ms) with 8 % errors; 10 v1 requests shadowed
    on v3, 9 with the same output; a second route, a refused request and noise between the records."""
    rng = random.Random(20240601)
    records = []
    for version, ttft, errors in (("v1", 0.2, 3), ("v2", 0.3, 24), ("v3", 0.2, 3)):
        # Exactly `errors` of them, spread evenly over the run, so a time window keeps its share.
        records += [_record(rng, version, i, ttft, error=i * errors // PER_VERSION != (i + 1) * errors // PER_VERSION)
                    for i in range(PER_VERSION)]
    for i in range(10):
        primary = records[i]
        primary.update(greedy=True, output_sha256=f"{i:064x}")
        records.append({**_record(rng, "v3", 1000 + i, 0.2, error=False), "time": primary["time"],
                        "shadow_of": primary["request_id"], "greedy": True,
                        "output_sha256": f"{i:064x}" if i < 9 else "f" * 64})
    records.append({**_record(rng, "x", 0, 0.2, error=False), "route": "chat", "served_model": None, "status": "429"})
    records += [{**_record(rng, "c1", i, 0.1, error=False), "route": "code"} for i in range(5)]
    records.append({**_record(rng, "direct", 0, 0.1, error=False), "route": None})
    lines = []
    for i, record in enumerate(records):
        text = json.dumps(record)
        lines.append(f"2023-11-14 22:13:20,000 INFO specgate.requests: {text}" if i % 5 == 0 else text)
        if i % 50 == 0:
            lines.append(NOISE[(i // 50) % len(NOISE)])
    return lines


@pytest.fixture(scope="module")
def log(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("ab") / "requests.log"
    path.write_text("\n".join(_lines()) + "\n")
    return path


def _report(log: Path, out: Path, *extra: str) -> str:
    assert main(["ab-report", "--log", str(log), "--output-dir", str(out), *extra]) == 0
    return (out / "ab-report.md").read_text()


def _cells(markdown: str, *first: str) -> list[str]:
    """The cells of the one table row whose leading cells are `first`."""
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in markdown.splitlines() if line.startswith("|")]
    found = [row for row in rows if row[: len(first)] == list(first)]
    assert len(found) == 1, (first, found)
    return found[0]


def test_report_marks_real_differences_and_only_those(log: Path, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    markdown = _report(log, tmp_path)
    assert capsys.readouterr().out.strip() == str(tmp_path / "ab-report.md")
    noise = sum(1 for line in _lines() if line in NOISE and line)
    assert f"(917 request records, {noise} other lines skipped)" in markdown
    assert _cells(markdown, "`v1`", "300")[2:] == ["3", "1.00 % (0.34 %–2.90 %)", "0"]
    assert _cells(markdown, "`v2`", "300")[2] == "24"
    assert "no version served (refused before a worker): 1." in markdown
    for metric in ("TTFT", "error rate"):
        assert _cells(markdown, "`v1`", "`v2`", metric)[-1] == "**yes**"
    for metric in ("TTFT", "TPOT", "output tokens", "error rate"):
        assert _cells(markdown, "`v1`", "`v3`", metric)[-1] == "no"
    assert _cells(markdown, "`v1`", "TTFT (ms)")[2] == "297"  # 2xx only
    shadow = _cells(markdown, "`v1` → `v3`")
    assert shadow[1] == "10" and shadow[-2:] == ["10", "0.9"]
    assert "## Route `code`" in markdown and "`direct`" not in markdown
    png = tmp_path / "ab-report.png"
    assert png.read_bytes().startswith(PNG_MAGIC)
    from PIL import Image

    with Image.open(png) as image:
        image.verify()
    with Image.open(png) as image:
        assert image.mode == "P" and image.width > 1000


def test_since_until_and_route_keep_the_window_and_route(log: Path, tmp_path: Path) -> None:
    # [T0, T0 + 1000 s): requests 0..99 of each version; naive ISO is UTC.
    markdown = _report(log, tmp_path, "--since", "2023-11-14T22:13:20", "--until", str(T0 + 1000), "--route", "chat")
    assert _cells(markdown, "`v1`", "100")[2] == "1"
    assert _cells(markdown, "`v2`", "100")[2] == "8"
    assert "## Route `code`" not in markdown and "route: chat" in markdown


def test_an_empty_window_still_writes_a_report(log: Path, tmp_path: Path) -> None:
    markdown = _report(log, tmp_path, "--since", "2030-01-01T00:00:00+00:00")
    assert "No routed requests in the window." in markdown
    assert (tmp_path / "ab-report.png").read_bytes().startswith(PNG_MAGIC)


def test_a_missing_log_is_one_line_and_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["ab-report", "--log", str(tmp_path / "none.log"), "--output-dir", str(tmp_path)]) == 2
    assert "none.log" in capsys.readouterr().err


def test_times_are_iso_8601_or_unix_seconds() -> None:
    assert parse_time("2023-11-14T22:13:20") == parse_time("2023-11-14T22:13:20Z") == T0
    assert parse_time("2023-11-14T23:13:20+01:00") == parse_time(str(T0)) == T0
    with pytest.raises(Exception, match="neither"):
        parse_time("yesterday")


def test_statistics_at_their_edges() -> None:
    assert median_ci([1.0, 2.0, 3.0, 4.0, 5.0]) is None  # 2 * 0.5**5 > 5 %: no 95 % interval from 5 values
    assert median_ci([float(x) for x in range(1, 7)]) == (1.0, 6.0)
    assert two_proportion(0, 10, 0, 20) == 1.0
    assert two_proportion(3, 300, 24, 300) == pytest.approx(3.6e-5, rel=0.1)


def test_the_cli_loads_neither_scipy_nor_matplotlib_until_the_report_runs() -> None:
    code = ("import sys, gateway.cli; gateway.cli.build_parser(); "
            "print([m for m in ('scipy', 'matplotlib', 'numpy') if m in sys.modules])")
    finished = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert finished.stdout.strip() == "[]"
