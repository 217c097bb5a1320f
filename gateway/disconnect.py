"""Disconnect stage: run gateway work while watching the client, and cancel the work if it leaves."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import TypeVar

from starlette.types import Receive

from gateway.errors import ClientDisconnected

T = TypeVar("T")


async def _wait_for_disconnect(receive: Receive) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return


async def unless_disconnected(receive: Receive, work: Awaitable[T]) -> T:
    """Await `work`; if the client disconnects first, cancel it (its cleanup closes the worker request).

    Used for every wait before the response starts: the queue, the worker's status line, the first
    token, and whole non-streaming calls, where otherwise nothing would notice the client is gone.
    """
    work_task = asyncio.ensure_future(work)
    watch_task = asyncio.ensure_future(_wait_for_disconnect(receive))
    try:
        await asyncio.wait({work_task, watch_task}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        work_task.cancel()
        watch_task.cancel()
        raise
    if work_task.done():
        watch_task.cancel()
        return work_task.result()
    work_task.cancel()
    # Let the work's own cleanup (closing the upstream response) finish before we report.
    await asyncio.gather(work_task, return_exceptions=True)
    raise ClientDisconnected()
