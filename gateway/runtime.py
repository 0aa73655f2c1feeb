"""The mutable state of one running gateway process, beside its store and its planes.

One :class:`Runtime` per application (``app[RUNTIME]``): whether the process drains, the
background tasks of the planes' reactions, the futures that end a monitor's chat streams and
the open ``/v1/events`` websockets. It holds no domain state (that is the store's).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from aiohttp import web

log = logging.getLogger(__name__)


class BackgroundTasks:
    """Async work that must not hold up whoever started it (a plane's reaction to an event, a
    chat note beside an answer): a reference is kept until it ends, and what it raised is
    logged, never lost."""

    def __init__(self) -> None:
        self._tasks: set[asyncio.Task[Any]] = set()

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> None:
        task = asyncio.ensure_future(coro)
        task.add_done_callback(_log_failure)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def cancel_all(self) -> None:
        """Cancel what still runs (at shutdown, while the planes it uses still exist)."""
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def _log_failure(task: asyncio.Task[Any]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("background task failed", exc_info=task.exception())


@dataclass
class Runtime:
    """What the API, the wiring and the entry point share in one process (``app[RUNTIME]``)."""

    #: Set on SIGTERM: readiness fails, new monitors, listeners and SIP calls are refused.
    draining: bool = False
    background: BackgroundTasks = field(default_factory=BackgroundTasks)
    #: One future per monitor whose chat is streamed; resolves with the monitor's end reason.
    monitor_ends: dict[str, asyncio.Future[str]] = field(default_factory=dict)
    #: The open ``/v1/events`` websockets (closed with 1001 at shutdown).
    event_sockets: set[web.WebSocketResponse] = field(default_factory=set)

    def monitor_end(self, mid: str) -> asyncio.Future[str]:
        """The future that ends every chat stream of monitor ``mid`` (shared by its reconnects)."""
        ended = self.monitor_ends.get(mid)
        if ended is None:
            ended = self.monitor_ends[mid] = asyncio.get_running_loop().create_future()
        return ended

    def end_monitor_streams(self, mid: str, reason: str) -> None:
        ended = self.monitor_ends.pop(mid, None)
        if ended is not None and not ended.done():
            ended.set_result(reason)
