"""Three settings that faust does not expose (the third: idempotence of its producer, at the end).

How long a fetch may wait at the broker.

faust's aiokafka driver builds its consumer with `fetch_max_wait_ms=1500`. aiokafka sends
one fetch request per broker at a time, and leaves partitions that still have buffered
records out of it; so while the readings just fetched are being billed, the next request
may cover only quiet topics (payments, postings, operator commands) and sit at the broker
for the full 1.5 s before readings can be fetched again. Measured on the bench: steps then
received readings 1.5 s after they were produced, while a plain consumer saw them in 35 ms.
`MALLWATT_FETCH_MAX_WAIT_MS` (default 100) bounds that wait.

How hard the producer compresses. aiokafka compresses lz4 at level 9 (high compression),
which cost the worker about 9 ms per step on the bench's changelog (1 MB of bucket states
per step), about a tenth of its CPU. `MALLWATT_LZ4_LEVEL` (default 1, lz4's fast mode) makes
that under 1 ms for output about 25 % larger; the broker decompresses either the same way.
"""

from __future__ import annotations

import os
from typing import Any

import aiokafka.codec
from faust.transport.drivers import aiokafka as faust_aiokafka

try:  # aiokafka's C record builder looks the codec up in its own module
    from aiokafka.record._crecords import default_records as _c_records
except ImportError:  # pragma: no cover - aiokafka built without its C extensions
    _c_records = None
from aiokafka.record import default_records as _py_records

FETCH_MAX_WAIT_MS = int(os.environ.get("MALLWATT_FETCH_MAX_WAIT_MS", 100))
LZ4_LEVEL = int(os.environ.get("MALLWATT_LZ4_LEVEL", 1))

_original_create = faust_aiokafka.AIOKafkaConsumerThread._create_worker_consumer


def _create_worker_consumer(self: Any, transport: Any) -> Any:
    consumer = _original_create(self, transport)
    # read by AIOKafkaConsumer.start() when it creates its fetcher
    consumer._fetch_max_wait_ms = FETCH_MAX_WAIT_MS
    return consumer


def shorten_fetch_wait() -> None:
    """Apply the shorter fetch wait to every faust app created in this process."""
    faust_aiokafka.AIOKafkaConsumerThread._create_worker_consumer = _create_worker_consumer  # type: ignore[method-assign]


def _lz4_encode(payload: Any, level: int | None = None) -> bytes:
    return _original_lz4(payload, LZ4_LEVEL if level is None else level)


_original_lz4 = aiokafka.codec.lz4_encode


def faster_compression() -> None:
    """lz4 at `MALLWATT_LZ4_LEVEL` for every aiokafka producer in this process."""
    for module in (aiokafka.codec, _py_records, _c_records):
        if module is not None:
            module.lz4_encode = _lz4_encode  # type: ignore[attr-defined]


_original_extra = faust_aiokafka.Producer._settings_extra


def _idempotent_extra(self: Any) -> Any:
    return {"acks": "all", "enable_idempotence": True, **_original_extra(self)}


def idempotent_producer() -> None:
    """faust's own producer (dead letters, audit events) with acks=all and idempotence, like
    every other mallwatt producer: faust turns idempotence on only inside transactions, so a
    retried send after a broker loss could otherwise be written twice or out of order."""
    faust_aiokafka.Producer._settings_extra = _idempotent_extra  # type: ignore[method-assign]
