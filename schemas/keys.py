"""Message keys and the account shard function shared by producers and consumers."""

from __future__ import annotations

import zlib


def account_shard(account_id: str, partitions: int) -> int:
    """The partition that owns an account's money.

    crc32 is stable across processes and Python versions (unlike hash()), so the
    collector, the payment gateway and the workers agree without coordination.
    """
    if partitions <= 0:
        raise ValueError("partitions must be positive")
    return zlib.crc32(account_id.encode("utf-8")) % partitions


def shard_key(shard: int) -> bytes:
    return f"shard-{shard}".encode()
