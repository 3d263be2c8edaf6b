"""The current BillingContext, rebuilt when the portfolio changes (no restart needed).

The portfolio is a YAML file or a directory (portfolio.yaml plus roster tables, see
docs/roster.md). A change is noticed by the files' mtimes; only changed tables are read
again. The worker awaits `reload_in_background()`: the new context is built, and its lookup
caches filled, in a worker thread, then swapped in with one assignment, so the event loop
only ever sees a whole old or a whole new context and never pauses for the rebuild.
A broken edit keeps the last good context and logs the field-named error.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import sys
import threading
import time
from pathlib import Path
from typing import Any

from pipelines.context import BillingContext, build_context
from pipelines.roster import TableFile, config_files, load_config

log = logging.getLogger("mallwatt.billing")


def warm(ctx: BillingContext) -> BillingContext:
    """Fill the lazily built lookups the stream touches on its first batch, so that cost is
    paid off the event loop (at 350,000 accounts the core's Lookup alone takes seconds)."""
    from pipelines.core.lookup import lookup

    ctx.bucket_of("")  # fills the account -> bucket map
    _ = ctx.account_meters, ctx.circuit_routes, ctx.rating.circuit_frame, ctx.rating.account_frame
    _ = ctx.time_bounds  # the time guard's per-circuit floors
    lookup(ctx.rating)
    return ctx


def release(box: list[BillingContext], wait_s: float = 2.0) -> None:
    """Free a replaced context bit by bit (run in a thread). Dropping it at once frees millions
    of objects in one C call that holds the GIL, a pause as long as building it. It is only
    taken apart once nothing else refers to it (an agent may still hold it for a moment)."""
    ctx = box.pop()
    deadline = time.monotonic() + wait_s
    while sys.getrefcount(ctx) > 2:  # this frame and getrefcount's argument
        if time.monotonic() > deadline:
            return  # still in use: whoever drops it last frees it
        time.sleep(0.05)
    rating, lookup = ctx.rating, ctx.rating.extra.get("lookup")
    parts: list[Any] = [rating.accounts, rating.circuits, ctx.circuit_meter, ctx.meter_route, ctx.account_mall,
                        ctx.load_limits, *vars(ctx).values(), *vars(rating).values(),
                        *(vars(lookup).values() if lookup is not None else ())]
    for part in parts:
        if isinstance(part, dict):
            while part:
                part.popitem()
        elif isinstance(part, list):
            while part:
                del part[-2000:]


class ContextHolder:
    """`current()` is the context to bill with; `version` counts successful loads."""

    def __init__(self, path: str | Path, partitions: int) -> None:
        self.path = Path(path)
        self.partitions = partitions
        self._tables: dict[str, tuple[int, TableFile]] = {}  # unchanged tables are not read again
        self._lock = threading.Lock()  # one build at a time (the table cache is not shared)
        self._running = False
        self._stamp = self._stamps()
        self._ctx = self._build()
        self.version = 1
        self.last_error: str | None = None  # the message of the last rejected change

    def current(self) -> BillingContext:
        return self._ctx

    def _stamps(self) -> tuple[tuple[str, int], ...]:
        out = []
        for p in config_files(self.path):
            try:
                out.append((p.name, p.stat().st_mtime_ns))
            except OSError:
                out.append((p.name, -1))
        return tuple(out)

    def _build(self) -> BillingContext:
        with self._lock:
            # A cyclic collection walks every tracked object holding the GIL: during a build of
            # millions of objects it would run again and again and pause the loop each time.
            enabled = gc.isenabled()
            gc.disable()
            try:
                ctx = warm(build_context(load_config(self.path, self._tables), self.partitions))
                # The context lives until the next change and has no cycles: keep it (and what is
                # alive now) out of later collections. Frozen BEFORE the collector is back on:
                # otherwise the build's millions of young objects made the next collection (on
                # whichever thread allocated first, the event loop too) walk them all at once.
                gc.freeze()
            finally:
                if enabled:
                    gc.enable()
            return ctx

    def _changed(self) -> bool:
        """Whether the files changed since the last look; the new stamp is taken before
        reading, so an edit landing during a rebuild is seen on the next look."""
        try:
            stamp = self._stamps()
        except Exception:  # noqa: BLE001 - e.g. a directory caught between two files
            return False
        if stamp == self._stamp:
            return False
        self._stamp = stamp
        return True

    def _rejected(self, exc: Exception) -> bool:
        self.last_error = str(exc)
        log.error("config change rejected, keeping version %s: %s", self.version, exc)
        return False

    def _swap(self, ctx: BillingContext) -> bool:
        self._ctx = ctx  # one assignment: readers see the old or the new context, never a mix
        self.version += 1
        self.last_error = None
        log.warning("config reloaded from %s (version %s)", self.path, self.version)
        return True

    def reload_if_changed(self) -> bool:
        """Rebuild now if the files changed (blocks the caller for the whole rebuild)."""
        if not self._changed():
            return False
        try:
            ctx = self._build()
        except Exception as exc:  # keep billing with the last good config
            return self._rejected(exc)
        return self._swap(ctx)

    async def reload_in_background(self) -> bool:
        """The same, rebuilt in a worker thread; the loop only stats the files and swaps."""
        if self._running or not self._changed():
            return False
        self._running = True
        try:
            ctx = await asyncio.to_thread(self._build)
        except Exception as exc:  # keep billing with the last good config
            return self._rejected(exc)
        finally:
            self._running = False
        old = [self._ctx]
        self._swap(ctx)
        del ctx
        await asyncio.to_thread(release, old)
        return True
