"""Encode and decode the Avro contracts with fastavro.

Wire format: one version byte, then the schemaless Avro body. The byte names the writer
schema version, so a reader with a newer schema can still resolve an older message.
Evolution rule (docs/contracts.md): only add fields that have defaults; never remove,
rename or change the type of a field; bump WRITER_VERSION and keep the old schema file
under schemas/history/ so old messages stay readable.
"""

from __future__ import annotations

import io
import json
from functools import cache
from pathlib import Path
from typing import Any

import fastavro

SCHEMA_DIR = Path(__file__).parent
#: Version 2: LedgerBatch and LedgerEntry carry debt_change_minor; IntervalBatch is new.
#: Version 3: RelayCommand carries key_id and signature (signed by the worker, checked by collectors);
#: OperatorCommand carries the order's operator signatures (checked by the worker); Payment and
#: LedgerPosting carry operator_id, key_id and signature (manual money, checked by the claim step).
WRITER_VERSION = 3
HISTORY_DIR = SCHEMA_DIR / "history"

# Order matters: later schemas refer to named types defined by earlier ones.
SCHEMA_FILES: dict[str, str] = {
    "ReadingBatch": "reading_batch.avsc",
    "Payment": "payment.avsc",
    "LedgerEntry": "ledger_entry.avsc",
    "Alert": "alert.avsc",
    "RelayCommand": "relay_command.avsc",
    "RelayOutcome": "relay_outcome.avsc",
    "CollectorEvent": "collector_event.avsc",
    "OperatorCommand": "operator_command.avsc",
    "DeadLetter": "dead_letter.avsc",
    "LedgerPosting": "ledger_posting.avsc",
    "LedgerBatch": "ledger_batch.avsc",
    "IntervalBatch": "interval_batch.avsc",
    "AlertPreferences": "alert_preferences.avsc",
    "AuditEvent": "audit_event.avsc",
}


class DecodeError(ValueError):
    """A message that is not a valid instance of the expected contract."""


@cache
def _parsed() -> dict[str, Any]:
    named: dict[str, Any] = {}
    parsed: dict[str, Any] = {}
    for name, filename in SCHEMA_FILES.items():
        raw = json.loads((SCHEMA_DIR / filename).read_text())
        parsed[name] = fastavro.parse_schema(raw, named_schemas=named)
    return parsed


@cache
def _writer_schema(name: str, version: int) -> Any:
    """The schema `name` was written with at an older `version`: its history file
    `schemas/history/<file>.v<N>.avsc` for the first version after N that changed it, else
    (unchanged since) the current one. None when `name` did not exist yet at `version`."""
    current = SCHEMA_FILES[name]
    stem = current.removesuffix(".avsc")
    for v in range(version, WRITER_VERSION):
        path = HISTORY_DIR / f"{stem}.v{v}.avsc"
        if path.exists():
            raw = json.loads(path.read_text())
            return fastavro.parse_schema(raw, named_schemas={})
    if name in INTRODUCED and INTRODUCED[name] > version:
        return None
    return schema(name)


#: Contracts added after version 1, and the version that introduced them.
INTRODUCED: dict[str, int] = {"IntervalBatch": 2, "AuditEvent": 3}


def schema(name: str) -> Any:
    try:
        return _parsed()[name]
    except KeyError:
        raise KeyError(f"unknown schema {name!r}; known: {sorted(SCHEMA_FILES)}") from None


def encode(name: str, record: dict[str, Any]) -> bytes:
    buf = io.BytesIO()
    buf.write(bytes([WRITER_VERSION]))
    try:
        fastavro.schemaless_writer(buf, schema(name), record, strict_allow_default=True)
    except (ValueError, TypeError, KeyError, AttributeError) as exc:
        raise ValueError(f"cannot encode {name}: {exc}") from exc
    return buf.getvalue()


def decode(name: str, data: bytes | None) -> dict[str, Any]:
    if not data:
        raise DecodeError(f"{name}: empty message")
    version = data[0]
    if not 1 <= version <= WRITER_VERSION:
        raise DecodeError(f"{name}: unknown writer schema version {version}")
    writer = schema(name) if version == WRITER_VERSION else _writer_schema(name, version)
    if writer is None:
        raise DecodeError(f"{name}: unknown writer schema version {version} (the contract is newer)")
    reader = schema(name) if version != WRITER_VERSION else None
    try:
        record = fastavro.schemaless_reader(io.BytesIO(data[1:]), writer, reader)
    except Exception as exc:  # fastavro raises many types on corrupt input
        raise DecodeError(f"{name}: undecodable Avro body ({type(exc).__name__}: {exc})") from exc
    if not isinstance(record, dict):
        raise DecodeError(f"{name}: decoded to {type(record).__name__}, not a record")
    return record
