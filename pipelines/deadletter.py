"""Dead-letter records: where bad input ends, with the reason, instead of crashing a stage."""

from __future__ import annotations

from typing import Any

MAX_PAYLOAD = 512 * 1024  # keep the dead-letter topic below the broker's message limit


def dead_letter_record(topic: str, partition: int, offset: int, stage: str, reason: str,
                       key: bytes | None, value: bytes | None, ts_ms: int) -> dict[str, Any]:
    return {
        "source_topic": topic,
        "source_partition": int(partition),
        "source_offset": int(offset),
        "stage": stage,
        "reason": reason[:4000],
        "key": key[:MAX_PAYLOAD] if key else None,
        "value": value[:MAX_PAYLOAD] if value else None,
        "ts_ms": ts_ms,
    }
