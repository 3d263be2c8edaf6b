"""Which relay commands to send, given every reason a meter is held open.

A meter may be held open for several independent reasons at once: credit (the wallet),
operator (remote power control), overload or banned appliance (load control). Each reason
is a *hold*; the relay is closed only when no hold remains. So a top-up that clears the
credit hold never closes a meter an operator opened, and an operator's "on" never closes
a meter whose merchant is out of credit.

Pure: state is a plain dict meter_id -> sorted list of hold names.
"""

from __future__ import annotations

from dataclasses import dataclass

Holds = dict[str, list[str]]


@dataclass(frozen=True)
class GateCommand:
    meter_id: str
    action: str  # TRIP | RECONNECT
    reason: str  # the hold added or removed that caused it
    command_id: str


def set_hold(holds: Holds, meter_ids: list[str], hold: str, on: bool, cause_id: str,
             reason: str | None = None) -> list[GateCommand]:
    """Add (on=True) or remove a hold on meters; returns the relay commands that changes.

    The commands' reason is `reason` (what happened, e.g. "topup") or else the hold's name.
    """
    commands: list[GateCommand] = []
    for meter in meter_ids:
        current = set(holds.get(meter, []))
        was_open = bool(current)
        if on:
            current.add(hold)
        else:
            current.discard(hold)
        if current:
            holds[meter] = sorted(current)
        else:
            holds.pop(meter, None)
        if on and not was_open:
            commands.append(GateCommand(meter, "TRIP", reason or hold, f"{cause_id}:{meter}:trip"))
        elif not on and was_open and not current:
            commands.append(GateCommand(meter, "RECONNECT", reason or hold, f"{cause_id}:{meter}:reconnect"))
    return commands


def held_by(holds: Holds, meter_id: str) -> list[str]:
    return list(holds.get(meter_id, []))
