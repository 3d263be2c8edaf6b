"""Collector loss -> `collector_offline` alerts (pure: no Kafka, no clock).

Three causes open an *episode*; each episode gives one alert when it opens and one when it
ends (the same id plus `:resolved`), so the notifier's dedup collapses any replay:

| cause        | opened by                                         | ended by                     | alert id                                       |
|--------------|---------------------------------------------------|------------------------------|------------------------------------------------|
| gateway_down | a `gateway_down` collector event                  | `gateway_up` from that gateway | `collector_offline:<mall>:<gateway>:<since_ms>` |
| spool_growing| a `spool_growing` event (Kafka unreachable)       | `spool_drained`              | `collector_offline:<collector>:spool:<since_ms>` |
| silent       | nothing from the collector (no reading batch, no event) for `silent_after_ms` | anything from it | `collector_offline:<collector>:silent:<last_seen_ms>` |

`since_ms` is the opening event's own time and `last_seen_ms` the collector's last message
time, so the same input gives the same ids whenever and however often it is processed.
A silent collector's alert names every gateway it was seen with. Times: events carry the
collector's `ts_ms`; reading batches the broker time of their message; `tick(now_ms)` is
the only place a clock enters. At start the watcher `restore`s its own recent alerts, so
episodes survive its restarts.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

KIND = "collector_offline"
OPEN, RESOLVED = "open", "resolved"
SEVERITY = {"gateway_down": "CRITICAL", "silent": "CRITICAL", "spool_growing": "WARNING"}


@dataclass(frozen=True)
class WatchConfig:
    silent_after_ms: int = 300_000  # a collector quiet this long is offline
    max_collectors: int = 10_000  # limits: state never grows with input volume
    max_gateways_per_collector: int = 1_000


@dataclass
class _Collector:
    mall_id: str
    last_ms: int
    gateways: set[str] = field(default_factory=set)


@dataclass
class WatchState:
    collectors: dict[str, _Collector] = field(default_factory=dict)
    episodes: dict[str, dict[str, Any]] = field(default_factory=dict)  # episode key -> alert
    dropped: int = 0  # observations refused by the limits


def _alert(alert_id: str, severity: str, mall_id: str, ts_ms: int, message: str,
           details: dict[str, str]) -> dict[str, Any]:
    return {"alert_id": alert_id, "kind": KIND, "severity": severity, "mall_id": mall_id,
            "account_id": None, "meter_id": None, "ts_ms": ts_ms, "message": message,
            "details": details}


def _resolve(state: WatchState, key: str, ts_ms: int, why: str) -> list[dict[str, Any]]:
    opened = state.episodes.pop(key, None)
    if opened is None:
        return []
    details = {**opened["details"], "state": RESOLVED, "until_ms": str(ts_ms), "resolved_by": why}
    return [_alert(opened["alert_id"] + ":resolved", "INFO", opened["mall_id"], ts_ms,
                   f"{opened['message']}: back ({why})", details)]


def _open(state: WatchState, key: str, alert: dict[str, Any]) -> list[dict[str, Any]]:
    if key in state.episodes:
        return []  # one alert per episode
    state.episodes[key] = alert
    return [alert]


def _seen(state: WatchState, config: WatchConfig, collector_id: str, mall_id: str | None,
          ts_ms: int) -> tuple[_Collector | None, list[dict[str, Any]]]:
    c = state.collectors.get(collector_id)
    if c is None:
        if len(state.collectors) >= config.max_collectors:
            state.dropped += 1
            return None, []
        c = state.collectors[collector_id] = _Collector(mall_id or "", ts_ms)
    if mall_id and not c.mall_id:
        c.mall_id = mall_id
    c.last_ms = max(c.last_ms, ts_ms)
    silent = state.episodes.get(f"silent:{collector_id}")
    if silent is None or ts_ms <= int(silent["details"]["since_ms"]):
        return c, []  # a replayed old message is no sign of life
    return c, _resolve(state, f"silent:{collector_id}", ts_ms, "messages again")


def observe_event(state: WatchState, config: WatchConfig, event: dict[str, Any]
                  ) -> list[dict[str, Any]]:
    """One CollectorEvent record; returns the alerts it opens or resolves."""
    cid, mall, kind, ts = event["collector_id"], event["mall_id"], event["kind"], event["ts_ms"]
    gateway = event.get("gateway_id")
    c, out = _seen(state, config, cid, mall, ts)
    if c is None:
        return out
    if gateway and len(c.gateways) < config.max_gateways_per_collector:
        c.gateways.add(gateway)
    detail = str(event.get("detail") or "")[:500]
    base = {"collector_id": cid, "since_ms": str(ts), "detail": detail}
    if kind == "gateway_down" and gateway:
        out += _open(state, f"gw:{mall}:{gateway}", _alert(
            f"{KIND}:{mall}:{gateway}:{ts}", SEVERITY["gateway_down"], mall, ts,
            f"gateway {gateway} of mall {mall} is down",
            {**base, "cause": "gateway_down", "gateway_id": gateway, "state": OPEN}))
    elif kind == "gateway_up" and gateway:
        out += _resolve(state, f"gw:{mall}:{gateway}", ts, "gateway_up")
    elif kind == "spool_growing":
        out += _open(state, f"spool:{cid}", _alert(
            f"{KIND}:{cid}:spool:{ts}", SEVERITY["spool_growing"], mall, ts,
            f"collector {cid} cannot reach Kafka; readings wait in its spool",
            {**base, "cause": "spool_growing", "state": OPEN}))
    elif kind == "spool_drained":
        out += _resolve(state, f"spool:{cid}", ts, "spool_drained")
    return out


def observe_batch(state: WatchState, config: WatchConfig, collector_id: str,
                  mall_id: str | None, ts_ms: int) -> list[dict[str, Any]]:
    """A reading batch from `collector_id` at (broker) time ts_ms: a sign of life."""
    return _seen(state, config, collector_id, mall_id, ts_ms)[1]


def tick(state: WatchState, config: WatchConfig, now_ms: int) -> list[dict[str, Any]]:
    """Open a `silent` episode for every collector quiet for longer than silent_after_ms."""
    out: list[dict[str, Any]] = []
    for cid, c in state.collectors.items():
        if now_ms - c.last_ms <= config.silent_after_ms:
            continue
        gateways = ",".join(sorted(c.gateways))
        # time and text follow from last_ms alone: a replay gives the same alert
        out += _open(state, f"silent:{cid}", _alert(
            f"{KIND}:{cid}:silent:{c.last_ms}", SEVERITY["silent"], c.mall_id or "?",
            c.last_ms + config.silent_after_ms,
            f"collector {cid} silent for more than {config.silent_after_ms // 1000} s",
            {"cause": "silent", "collector_id": cid, "since_ms": str(c.last_ms),
             "gateways": gateways, "state": OPEN, "silent_after_ms": str(config.silent_after_ms)}))
    return out


def _episode_key(alert: dict[str, Any]) -> str | None:
    d = alert.get("details") or {}
    cause, cid = d.get("cause"), d.get("collector_id", "")
    if cause == "gateway_down":
        return f"gw:{alert['mall_id']}:{d.get('gateway_id')}"
    if cause in ("spool_growing", "silent"):
        return f"{'spool' if cause == 'spool_growing' else 'silent'}:{cid}"
    return None


def restore(state: WatchState, config: WatchConfig, alert: dict[str, Any]) -> None:
    """Re-read one of our own published alerts (at start): open and resolved episodes
    come back as they were, so a restart neither repeats an alert nor opens a silent
    episode under a new id for a collector whose readings are older than the history read."""
    key = _episode_key(alert) if alert.get("kind") == KIND else None
    if key is None:
        return
    d = alert["details"]
    if d.get("state") == RESOLVED:
        if key in state.episodes and state.episodes[key]["alert_id"] + ":resolved" == alert["alert_id"]:
            del state.episodes[key]
        return
    state.episodes[key] = alert
    cid = d.get("collector_id")
    if cid and cid not in state.collectors and len(state.collectors) < config.max_collectors:
        since = int(d.get("since_ms") or alert["ts_ms"])
        state.collectors[cid] = _Collector(alert["mall_id"], since)


def open_episodes(state: WatchState) -> dict[str, int]:
    """Open episodes per cause (for the metrics)."""
    counts = {"gateway_down": 0, "spool_growing": 0, "silent": 0}
    for alert in state.episodes.values():
        counts[alert["details"]["cause"]] += 1
    return counts


__all__ = ["KIND", "WatchConfig", "WatchState", "observe_batch", "observe_event",
           "open_episodes", "restore", "tick"]
