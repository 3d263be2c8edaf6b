"""A faust Table whose writes the agent can wait for.

faust commits an input offset once the event is acked and `producer.flush()` returns, but
that flush gives up on a message that takes longer than 0.1 s to leave its buffer
(faust/transport/producer.py, flush_atmost), so under load an offset can be committed
before the state change it caused is in the changelog; a kill -9 then loses the change.
The billing agents therefore wait for their own changelog writes to be acknowledged by
the broker before they let their events be acked: a committed offset always has its
state change (and the outputs in its outbox) durable.
"""

from __future__ import annotations

import asyncio
from typing import Any

import faust


class DurableTable(faust.Table):
    """faust.Table that remembers its changelog writes until `written()` is awaited."""

    def __post_init__(self) -> None:
        super().__post_init__()
        self._unacknowledged: list[asyncio.Future[Any]] = []

    def on_key_set(self, key: Any, value: Any) -> None:
        # faust.Table.on_key_set, keeping the future of the changelog write
        fut = self.send_changelog(self.partition_for_key(key), key, value)
        self._unacknowledged.append(fut)
        partition = fut.message.partition
        assert partition is not None
        self._maybe_set_key_ttl(key, partition)
        self._sensor_on_set(self, key, value)

    async def written(self) -> None:
        """Wait until the broker has acknowledged every write made so far (raises if one failed)."""
        pending, self._unacknowledged = self._unacknowledged, []
        if pending:
            await asyncio.gather(*pending)
