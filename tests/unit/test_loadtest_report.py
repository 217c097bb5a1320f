"""Load generator output: JSON, Markdown and PNG files for single runs and sweeps, through the CLI."""

from __future__ import annotations

import json
import re
from pathlib import Path

from loadtest import generator
from loadtest.fake_config import FakeEngineConfig
from loadtest.fake_engine import run_in_thread

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_cli_run_writes_json_markdown_and_plots(tmp_path: Path) -> None:
    with run_in_thread(FakeEngineConfig(ttft_s=0.002, gap_s=0.001)) as url:
        code = generator.main(["--base-url", url, "--concurrency", "3", "--num-requests", "9", "--output-len", "5",
                               "--slo", "ttft=1s", "--no-progress", "--output-dir", str(tmp_path), "--label", "t"])
    assert code == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["requests"]["completed"] == 9
    assert summary["goodput"]["good_requests"] == 9
    assert summary["command"].startswith("specgate loadtest --base-url")
    assert summary["ttft_ms"]["p99"] >= summary["ttft_ms"]["p50"] > 0
    records = json.loads((tmp_path / "records.json").read_text())
    assert len(records) == 9 and {"ttft_s", "itl_s", "tpot_s", "latency_s", "chunk_tokens", "kind"} <= set(records[0])
    markdown = (tmp_path / "summary.md").read_text()
    assert "| TTFT |" in markdown and "goodput" in markdown
    assert (tmp_path / "distributions.png").read_bytes().startswith(PNG_MAGIC)


def test_cli_sweep_writes_latency_vs_load(tmp_path: Path) -> None:
    with run_in_thread(FakeEngineConfig(ttft_s=0.001, gap_s=0.001)) as url:
        code = generator.main(["--base-url", url, "--endpoint", "completions", "--sweep", "concurrency=1,4",
                               "--num-requests", "8", "--output-len", "4", "--no-progress",
                               "--output-dir", str(tmp_path)])
    assert code == 0
    sweep = json.loads((tmp_path / "sweep.json").read_text())
    assert [level["level"] for level in sweep["levels"]] == [1.0, 4.0]
    assert all(level["requests"]["completed"] == 8 for level in sweep["levels"])
    assert (tmp_path / "sweep.png").read_bytes().startswith(PNG_MAGIC)
    assert (tmp_path / "concurrency-4" / "summary.json").exists()
    rows = [line for line in (tmp_path / "sweep.md").read_text().splitlines() if re.match(r"\| \d", line)]
    assert [row.split(" | ")[0] for row in rows] == ["| 1", "| 4"]


def test_cli_exit_code_when_nothing_succeeds(tmp_path: Path) -> None:
    with run_in_thread(FakeEngineConfig(ttft_s=0, gap_s=0)) as url:
        code = generator.main(["--base-url", url, "--num-requests", "2", "--header", "x-fake-fault:500",
                               "--no-progress", "--no-plots", "--output-dir", str(tmp_path)])
    assert code == 1
    assert json.loads((tmp_path / "summary.json").read_text())["errors"] == {"http_500": 2}
