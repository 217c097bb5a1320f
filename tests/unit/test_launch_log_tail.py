"""A worker that fails to start is reported with its log's tail, led by the root cause logged far above it."""

from __future__ import annotations

from pathlib import Path

from engine.launch import _log_tail

ROOT_CAUSE = ("(Worker pid=7) ERROR 12-07 15:36:26 [multiproc_executor.py:953] "
              "safetensors._safetensors_rust.SafetensorError: Error while deserializing header: header too large\n")


def test_the_first_exception_leads_a_tail_that_no_longer_holds_it(tmp_path: Path) -> None:
    log = tmp_path / "worker.log"
    log.write_text("(APIServer pid=5) WARNING ... failed to increase with error current limit\n" + ROOT_CAUSE
                   + "".join(f"  frame {i}\n" for i in range(60))
                   + "RuntimeError: Engine core initialization failed. See root cause above.\n")
    report = _log_tail(log)
    assert report.startswith("first error: " + ROOT_CAUSE)
    assert report.rstrip().endswith("See root cause above.")
    assert "frame 59" in report and "frame 10" not in report


def test_a_short_log_is_given_whole(tmp_path: Path) -> None:
    log = tmp_path / "worker.log"
    log.write_text(ROOT_CAUSE + "RuntimeError: failed\n")
    assert _log_tail(log) == ROOT_CAUSE + "RuntimeError: failed\n"
    assert _log_tail(tmp_path / "missing.log") == "(no log)"
