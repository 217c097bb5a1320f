"""The serving process keeps slow log writes off the event loop."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator

import pytest

from gateway.serve import logging_off_the_loop


class StuckHandler(logging.Handler):
    """A handler whose writes block until released, like stderr into a pipe nobody reads."""

    def __init__(self) -> None:
        super().__init__()
        self.unblock = threading.Event()
        self.written: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.unblock.wait(10)
        self.written.append(record.getMessage())


@pytest.fixture
def stuck_root() -> Iterator[StuckHandler]:
    root = logging.getLogger()
    saved_handlers, saved_level = root.handlers[:], root.level
    handler = StuckHandler()
    root.handlers, root.level = [handler], logging.INFO
    try:
        yield handler
    finally:
        handler.unblock.set()
        root.handlers, root.level = saved_handlers, saved_level


def test_a_blocked_log_write_does_not_block_the_caller_and_still_arrives(stuck_root: StuckHandler) -> None:
    before = logging.getLogger().handlers[:]
    with logging_off_the_loop():
        assert logging.getLogger().handlers != before
        started = time.perf_counter()
        for index in range(100):
            logging.getLogger("tests.serve").info("request %d", index)
        took = time.perf_counter() - started
        assert took < 1.0, f"logging waited on the stuck handler ({took:.2f}s)"
        assert stuck_root.written == []
        stuck_root.unblock.set()
    assert stuck_root.written == [f"request {index}" for index in range(100)]
    assert logging.getLogger().handlers == before, "the original handlers are back"
