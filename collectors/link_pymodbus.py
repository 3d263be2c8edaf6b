"""One Modbus TCP connection per gateway, one request at a time (an RS-485 bus behind it).

pymodbus' own retry and auto-disconnect logic is switched off: the poller decides about
retries, back-off and reconnects, because it knows which device on the bus failed.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from pymodbus.client import AsyncModbusTcpClient
from pymodbus.exceptions import ConnectionException, ModbusException, ModbusIOException


class LinkError(Exception):
    """A request failed; `timeout` tells a silent device from an error answer."""

    def __init__(self, msg: str, *, timeout: bool = False, gateway: bool = False) -> None:
        super().__init__(msg)
        self.timeout = timeout
        self.gateway = gateway  # the gateway itself is unreachable, not just this device


class GatewayLink:
    def __init__(self, host: str, port: int, name: str, *, timeout_s: float = 1.0,
                 reconnect_min_s: float = 0.5, reconnect_max_s: float = 30.0,
                 on_state: Callable[[str, str], None] | None = None) -> None:
        self.host, self.port, self.name = host, port, name
        self.timeout_s = timeout_s
        self.lock = asyncio.Lock()  # the bus: one request at a time
        self._client: AsyncModbusTcpClient | None = None
        self._reconnect_min, self._reconnect_max = reconnect_min_s, reconnect_max_s
        self._reconnect_delay = reconnect_min_s
        self._next_connect = 0.0
        self._on_state = on_state or (lambda kind, detail: None)
        self.up: bool | None = None  # None until the first connect attempt
        self.requests = 0
        self.consecutive_timeouts = 0

    async def _connected(self) -> AsyncModbusTcpClient:
        c = self._client
        if c is not None and c.connected:
            return c
        loop = asyncio.get_running_loop()
        if loop.time() < self._next_connect:
            raise LinkError(f"{self.name}: reconnect back-off", gateway=True)
        if c is not None:
            c.close()
        c = AsyncModbusTcpClient(self.host, port=self.port, timeout=self.timeout_s,
                                 retries=0, reconnect_delay=0, name=self.name)
        c.set_max_no_responses(1 << 30)
        ok = False
        try:
            ok = await asyncio.wait_for(c.connect(), self.timeout_s * 2)
        except (TimeoutError, OSError, ModbusException):
            ok = False
        if not ok:
            c.close()
            self._client = None
            self._next_connect = loop.time() + self._reconnect_delay
            self._reconnect_delay = min(self._reconnect_delay * 2, self._reconnect_max)
            if self.up is not False:
                self.up = False
                self._on_state("gateway_down", f"connect to {self.host}:{self.port} failed")
            raise LinkError(f"{self.name}: cannot connect", gateway=True)
        self._client = c
        self._reconnect_delay = self._reconnect_min
        self.consecutive_timeouts = 0
        if self.up is not True:
            self.up = True
            self._on_state("gateway_up", f"connected to {self.host}:{self.port}")
        return c

    def drop(self) -> None:
        """Close the connection (stale responses, half-open TCP); next request reconnects."""
        if self._client is not None:
            self._client.close()
            self._client = None

    async def close(self) -> None:
        async with self.lock:
            self.drop()

    async def request(self, op: str, unit: int, address: int, count_or_value: int | bool):
        """One request under the bus lock. op: read_holding/read_input/read_coil/
        write_register/write_coil. Returns registers (list[int]) or bits (list[bool])."""
        async with self.lock:
            c = await self._connected()
            self.requests += 1
            try:
                if op == "read_holding":
                    call = c.read_holding_registers(address, count=count_or_value, device_id=unit)
                elif op == "read_input":
                    call = c.read_input_registers(address, count=count_or_value, device_id=unit)
                elif op == "read_coil":
                    call = c.read_coils(address, count=count_or_value, device_id=unit)
                elif op == "write_register":
                    call = c.write_register(address, int(count_or_value), device_id=unit)
                elif op == "write_coil":
                    call = c.write_coil(address, bool(count_or_value), device_id=unit)
                else:
                    raise ValueError(f"unknown op {op!r}")
                rr = await call  # pymodbus applies timeout_s itself
            except (ModbusIOException, TimeoutError) as exc:
                self.consecutive_timeouts += 1
                raise LinkError(f"{self.name} unit {unit}: no response ({exc})",
                                timeout=True) from None
            except (ConnectionException, OSError) as exc:
                self.drop()
                raise LinkError(f"{self.name}: connection lost ({exc})", gateway=True) from None
            self.consecutive_timeouts = 0
            if rr.isError():
                code = getattr(rr, "exception_code", "?")
                raise LinkError(f"{self.name} unit {unit}: exception response {code}")
            if op == "read_coil":
                return list(rr.bits[:count_or_value])
            if op.startswith("write"):
                return list(rr.bits) if op == "write_coil" else list(rr.registers)
            return list(rr.registers)
