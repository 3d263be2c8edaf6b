"""One Modbus TCP connection per gateway, one request at a time (an RS-485 bus behind it).

This is a lean Modbus TCP client (MBAP framing on an asyncio.Protocol), not pymodbus:
profiling showed pymodbus' client costing most of a poll's CPU (transaction manager,
PDU objects, logging hooks, a task per timeout). Here a request is one `write`, one
future and one timer handle, and a read returns the raw register bytes so the poller
decodes a whole block with one precompiled struct. Transaction ids tell a late answer
to an earlier (timed-out) request from the current one, so a silent device does not
cost the connection. pymodbus stays in use for the simulator, and
`collectors.link_pymodbus.PymodbusLink` keeps the old path for comparison
(`PollerConfig(client="pymodbus")`).

Retries, back-off and device health belong to the poller, which knows which device on
the bus failed; this module only reports what happened (LinkError).
"""

from __future__ import annotations

import asyncio
import struct
from collections.abc import Callable

_MBAP = struct.Struct(">HHHB")  # transaction id, protocol 0, length, unit id
_READ = struct.Struct(">BHH")  # function code, address, count (FC01/03/04)
_WRITE = struct.Struct(">BHH")  # function code, address, value (FC05/06)
READ_FC = {"read_coil": 1, "read_holding": 3, "read_input": 4}
TABLE_FC = {"coil": 1, "holding": 3, "input": 4}
MAX_FRAME = 260  # MBAP length field of the largest legal Modbus TCP frame


class LinkError(Exception):
    """A request failed; `timeout` tells a silent device from an error answer."""

    def __init__(self, msg: str, *, timeout: bool = False, gateway: bool = False) -> None:
        super().__init__(msg)
        self.timeout = timeout
        self.gateway = gateway  # the gateway itself is unreachable, not just this device


class _Protocol(asyncio.Protocol):
    """MBAP framing. At most one request is outstanding (the bus lock guarantees it)."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buf = b""
        self.waiter: asyncio.Future | None = None
        self.tid = 0
        self.closed = False
        self.stale = 0  # answers that arrived after their request timed out

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        buf = self.buf + data if self.buf else data
        while len(buf) >= 8:
            n = 6 + ((buf[4] << 8) | buf[5])
            if n > MAX_FRAME or n < 8:  # not Modbus TCP: resynchronising is guesswork
                self.buf = b""
                assert self.transport is not None
                self.transport.close()
                return
            if len(buf) < n:
                break
            frame, buf = buf[:n], buf[n:]
            w = self.waiter
            if w is not None and not w.done() and ((frame[0] << 8) | frame[1]) == self.tid:
                w.set_result(frame)
            else:
                self.stale += 1
        self.buf = buf

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        w = self.waiter
        if w is not None and not w.done():
            w.set_exception(ConnectionError(f"connection lost ({exc or 'closed by peer'})"))


class GatewayLink:
    def __init__(self, host: str, port: int, name: str, *, timeout_s: float = 1.0,
                 reconnect_min_s: float = 0.5, reconnect_max_s: float = 30.0,
                 on_state: Callable[[str, str], None] | None = None) -> None:
        self.host, self.port, self.name = host, port, name
        self.timeout_s = timeout_s
        self.lock = asyncio.Lock()  # the bus: one request at a time
        self._proto: _Protocol | None = None
        self._reconnect_min, self._reconnect_max = reconnect_min_s, reconnect_max_s
        self._reconnect_delay = reconnect_min_s
        self._next_connect = 0.0
        self._on_state = on_state or (lambda kind, detail: None)
        self.up: bool | None = None  # None until the first connect attempt
        self.requests = 0
        self.consecutive_timeouts = 0
        # One lazy watchdog instead of a timer per request: requests take milliseconds and
        # time out after seconds, so the timer fires about once per timeout and re-arms.
        self._deadline = 0.0
        self._timer: asyncio.TimerHandle | None = None

    def _watchdog(self) -> None:
        self._timer = None
        p = self._proto
        w = p.waiter if p is not None else None
        if w is None or w.done():
            return  # idle: the next request arms it again
        loop = asyncio.get_running_loop()
        if loop.time() >= self._deadline:
            w.set_result(None)  # None = no answer in time; cheaper than an exception
        else:
            self._timer = loop.call_at(self._deadline, self._watchdog)

    # --- connection ------------------------------------------------------------------
    async def _open(self) -> bool:
        loop = asyncio.get_running_loop()
        try:
            _, proto = await asyncio.wait_for(
                loop.create_connection(_Protocol, self.host, self.port), self.timeout_s * 2)
        except (TimeoutError, OSError):
            return False
        self._proto = proto
        return True

    def _is_open(self) -> bool:
        p = self._proto
        return p is not None and not p.closed

    async def _connected(self) -> None:
        if self._is_open():
            return
        loop = asyncio.get_running_loop()
        if loop.time() < self._next_connect:
            raise LinkError(f"{self.name}: reconnect back-off", gateway=True)
        self.drop()
        if not await self._open():
            self.drop()
            self._next_connect = loop.time() + self._reconnect_delay
            self._reconnect_delay = min(self._reconnect_delay * 2, self._reconnect_max)
            if self.up is not False:
                self.up = False
                self._on_state("gateway_down", f"connect to {self.host}:{self.port} failed")
            raise LinkError(f"{self.name}: cannot connect", gateway=True)
        self._reconnect_delay = self._reconnect_min
        self.consecutive_timeouts = 0
        if self.up is not True:
            self.up = True
            self._on_state("gateway_up", f"connected to {self.host}:{self.port}")

    def drop(self) -> None:
        """Close the connection (half-open TCP, garbage); the next request reconnects."""
        p, self._proto = self._proto, None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if p is not None and p.transport is not None:
            p.transport.close()

    async def close(self) -> None:
        async with self.lock:
            self.drop()

    # --- requests ----------------------------------------------------------------------
    async def _exchange(self, unit: int, pdu: bytes) -> bytes:
        """Send one PDU, return the answer frame (MBAP + PDU). Caller holds the lock."""
        await self._connected()
        p = self._proto
        assert p is not None and p.transport is not None
        self.requests += 1
        p.tid = tid = (p.tid + 1) & 0xFFFF
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        p.waiter = fut
        p.transport.write(_MBAP.pack(tid, 0, len(pdu) + 1, unit) + pdu)
        self._deadline = loop.time() + self.timeout_s
        if self._timer is None:
            self._timer = loop.call_at(self._deadline, self._watchdog)
        try:
            frame = await fut
        except ConnectionError as exc:
            self.drop()
            raise LinkError(f"{self.name}: {exc}", gateway=True) from None
        finally:
            p.waiter = None
        if frame is None:
            self.consecutive_timeouts += 1
            raise LinkError(f"{self.name} unit {unit}: no response within {self.timeout_s}s",
                            timeout=True)
        self.consecutive_timeouts = 0
        if frame[7] & 0x80:
            raise LinkError(f"{self.name} unit {unit}: exception response {frame[8]}")
        return frame

    async def read(self, fc: int, unit: int, address: int, count: int) -> bytes:
        """FC01/03/04 read under the bus lock; registers as raw big-endian bytes (FC03/04)
        or the packed coil bytes (FC01). The hot path of the poller."""
        async with self.lock:
            frame = await self._exchange(unit, _READ.pack(fc, address, count))
        want = 2 * count if fc != 1 else (count + 7) // 8
        if frame[8] != want or len(frame) < 9 + want:
            raise LinkError(f"{self.name} unit {unit}: short answer "
                            f"({frame[8]} bytes, expected {want})")
        return frame[9:9 + want]

    async def request(self, op: str, unit: int, address: int, count_or_value: int | bool):
        """One request under the bus lock. op: read_holding/read_input/read_coil/
        write_register/write_coil. Returns registers (list[int]) or bits (list[bool])."""
        if op in READ_FC:
            n = int(count_or_value)
            data = await self.read(READ_FC[op], unit, address, n)
            if op == "read_coil":
                return [bool(data[i >> 3] >> (i & 7) & 1) for i in range(n)]
            return list(struct.unpack(f">{n}H", data))
        if op == "write_coil":
            pdu = _WRITE.pack(5, address, 0xFF00 if count_or_value else 0)
        elif op == "write_register":
            pdu = _WRITE.pack(6, address, int(count_or_value) & 0xFFFF)
        else:
            raise ValueError(f"unknown op {op!r}")
        async with self.lock:
            frame = await self._exchange(unit, pdu)
        if len(frame) < 12:
            raise LinkError(f"{self.name} unit {unit}: short write echo")
        value = (frame[10] << 8) | frame[11]
        return [value == 0xFF00] if op == "write_coil" else [value]


__all__ = ["GatewayLink", "LinkError", "READ_FC", "TABLE_FC"]
