"""The pymodbus client behind the GatewayLink interface, kept for comparison.

`PollerConfig(client="pymodbus")` selects it; `mallwatt bench collect --client pymodbus`
measures it. pymodbus' own retry and auto-disconnect logic is switched off: the poller
decides about retries, back-off and reconnects.
"""

from __future__ import annotations

import asyncio
import struct

from pymodbus.client import AsyncModbusTcpClient
from pymodbus.exceptions import ConnectionException, ModbusException, ModbusIOException

from collectors.link import GatewayLink, LinkError

_OPS = {1: "read_coil", 3: "read_holding", 4: "read_input"}


class PymodbusLink(GatewayLink):
    _client: AsyncModbusTcpClient | None = None

    async def _open(self) -> bool:
        c = AsyncModbusTcpClient(self.host, port=self.port, timeout=self.timeout_s,
                                 retries=0, reconnect_delay=0, name=self.name)
        c.set_max_no_responses(1 << 30)
        try:
            ok = await asyncio.wait_for(c.connect(), self.timeout_s * 2)
        except (TimeoutError, OSError, ModbusException):
            ok = False
        if not ok:
            c.close()
            return False
        self._client = c
        return True

    def _is_open(self) -> bool:
        return self._client is not None and self._client.connected

    def drop(self) -> None:
        c, self._client = self._client, None
        if c is not None:
            c.close()

    async def read(self, fc: int, unit: int, address: int, count: int) -> bytes:
        out = await self.request(_OPS[fc], unit, address, count)
        if fc == 1:
            return bytes(sum(1 << j for j, b in enumerate(out[i:i + 8]) if b)
                         for i in range(0, count, 8))
        return struct.pack(f">{count}H", *out)

    async def request(self, op: str, unit: int, address: int, count_or_value: int | bool):
        async with self.lock:
            await self._connected()
            c = self._client
            assert c is not None
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


__all__ = ["PymodbusLink"]
