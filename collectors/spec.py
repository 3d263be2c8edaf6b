"""What the poller needs to know about one meter. The lead maps portfolio config to it."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class DeviceSpec:
    meter_id: str
    profile: str  # bundled model name ("acrel_ddsy1352") or a path to a profile YAML
    host: str
    port: int
    unit_id: int
    interval_s: float = 15.0
    # profile circuit name -> circuit id used downstream; default: {"main": meter_id}
    circuits: dict[str, str] = field(default_factory=dict)
    gateway_id: str | None = None  # default "host:port"

    @property
    def gateway_key(self) -> tuple[str, int]:
        return (self.host, self.port)

    @property
    def gateway_name(self) -> str:
        return self.gateway_id or f"{self.host}:{self.port}"

    def circuit_id(self, circuit: str) -> str:
        if circuit in self.circuits:
            return self.circuits[circuit]
        return self.meter_id if circuit == "main" else f"{self.meter_id}/{circuit}"
