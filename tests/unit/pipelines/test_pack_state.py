"""pipelines.envelope.pack_state: one msgpack Packer per thread, the same bytes as packb."""

from __future__ import annotations

import threading

import msgpack

from pipelines.envelope import pack_state

VALUES = [None, 0, -1, 2**63 - 1, 1.5, "", "é" * 300, b"\x00\xff", [], {}, [[1, "a", None, [2, 3]]],
          {"load": {"A1": {"circuits": {"c": {"ts": 1784081157585, "p": 18927.9, "mm": False}}}}},
          list(range(70_000)),  # larger than the Packer's first buffer
          "x" * 300_000]


def test_pack_state_gives_packbs_bytes_call_after_call() -> None:
    for value in VALUES + VALUES[::-1]:  # a big value between small ones: no bytes left over
        assert pack_state(value) == msgpack.packb(value, use_bin_type=True)


def test_each_thread_packs_its_own_values() -> None:
    wrong: list[int] = []

    def run(n: int) -> None:
        for i in range(2000):
            value = [n, i, "t" * (n + i % 7)]
            if pack_state(value) != msgpack.packb(value, use_bin_type=True):
                wrong.append(n)

    threads = [threading.Thread(target=run, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert wrong == []
