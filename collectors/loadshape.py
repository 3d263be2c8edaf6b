"""Daily load shapes per business type, for the meter simulator.

Hourly factors are fractions of a meter's rated power in the mall's local time; values
between hours are interpolated linearly. The shapes are plausible, not measured: a
restaurant kitchen with lunch and dinner peaks, retail following opening hours, a
cinema peaking in the evening, a supermarket with a refrigeration base load, central
HVAC following the afternoon heat, bursty elevators and public lighting.
"""

from __future__ import annotations

import random

SHAPES: dict[str, tuple[float, ...]] = {
    # 0     1     2     3     4     5     6     7     8     9    10    11
    # 12   13    14    15    16    17    18    19    20    21    22    23
    "restaurant": (
        0.12, 0.10, 0.10, 0.10, 0.10, 0.10, 0.12, 0.15, 0.25, 0.45, 0.70, 1.00,
        1.00, 0.85, 0.45, 0.40, 0.55, 0.85, 1.00, 1.00, 0.80, 0.50, 0.25, 0.15),
    "retail": (
        0.05, 0.05, 0.05, 0.05, 0.05, 0.05, 0.05, 0.05, 0.10, 0.40, 0.75, 0.80,
        0.80, 0.80, 0.80, 0.80, 0.80, 0.85, 0.90, 0.90, 0.85, 0.70, 0.20, 0.05),
    "cinema": (
        0.35, 0.15, 0.08, 0.08, 0.08, 0.08, 0.08, 0.08, 0.08, 0.15, 0.35, 0.45,
        0.50, 0.55, 0.60, 0.60, 0.65, 0.75, 0.90, 1.00, 1.00, 1.00, 0.90, 0.60),
    "supermarket": (
        0.45, 0.45, 0.45, 0.45, 0.45, 0.45, 0.50, 0.70, 0.90, 0.95, 1.00, 1.00,
        1.00, 1.00, 0.95, 0.95, 0.95, 1.00, 1.00, 1.00, 0.95, 0.85, 0.60, 0.45),
    "hvac": (
        0.10, 0.10, 0.10, 0.10, 0.10, 0.10, 0.10, 0.20, 0.50, 0.75, 0.80, 0.85,
        0.90, 0.95, 1.00, 1.00, 0.95, 0.90, 0.85, 0.80, 0.75, 0.60, 0.30, 0.10),
    "elevator": (
        0.02, 0.02, 0.02, 0.02, 0.02, 0.02, 0.02, 0.05, 0.20, 0.40, 0.55, 0.60,
        0.70, 0.65, 0.55, 0.55, 0.60, 0.70, 0.75, 0.75, 0.65, 0.50, 0.20, 0.05),
    "lighting": (
        0.15, 0.15, 0.15, 0.15, 0.15, 0.15, 0.15, 0.20, 0.40, 1.00, 1.00, 1.00,
        1.00, 1.00, 1.00, 1.00, 1.00, 1.00, 1.00, 1.00, 1.00, 1.00, 0.60, 0.15),
}

# relative noise (std dev of a multiplicative factor); elevators run in bursts
NOISE: dict[str, float] = {"elevator": 0.6, "restaurant": 0.12, "cinema": 0.08}
DEFAULT_NOISE = 0.06

# typical rated power (kW) per meter of each type
RATED_KW: dict[str, float] = {
    "restaurant": 25.0, "retail": 6.0, "cinema": 60.0, "supermarket": 120.0,
    "hvac": 250.0, "elevator": 20.0, "lighting": 30.0,
}


def shape_factor(business: str, local_hour: float) -> float:
    """Fraction of rated power at a fractional local hour (0 <= h < 24), no noise."""
    shape = SHAPES[business]
    h = local_hour % 24.0
    i = int(h)
    frac = h - i
    return shape[i] * (1.0 - frac) + shape[(i + 1) % 24] * frac


def sample_power_w(business: str, rated_kw: float, local_hour: float,
                   rng: random.Random) -> float:
    """One noisy power sample in W, never negative."""
    base = shape_factor(business, local_hour) * rated_kw * 1000.0
    sigma = NOISE.get(business, DEFAULT_NOISE)
    return max(0.0, base * (1.0 + rng.gauss(0.0, sigma)))


def daily_kwh(business: str, rated_kw: float) -> float:
    """Expected energy per day without noise (integral of the interpolated shape)."""
    shape = SHAPES[business]
    # the trapezoid rule is exact for piecewise-linear interpolation
    return rated_kw * sum((shape[i] + shape[(i + 1) % 24]) / 2.0 for i in range(24))

