-- Purpose: the audit trail: who did what, when, with what result (power orders, approvals and
--   refusals, config reloads, token issues); newest first.
-- Param: from_ts DateTime64(3) | first instant (UTC)
-- Param: to_ts DateTime64(3) | last instant (UTC, exclusive)
-- Param: principal String = | one principal (operator id, token id), or empty for all
-- Param: action String = | one action (e.g. power.order), or empty for all
-- Param: max_rows UInt32 = 1000 | at most this many rows
-- Column: ts DateTime64(3) | when (UTC)
-- Column: principal String | verified principal
-- Column: action String | what
-- Column: target String | on what
-- Column: result String | accepted, refused, sent, ...
-- Column: component String | worker, cli, portal
-- Column: detail String | details
-- Column: event_id String | the event's id
-- Source: audit_events
SELECT ts, principal, action, target, result, component, detail, event_id
FROM mallwatt.audit_events FINAL
WHERE ts >= {from_ts:DateTime64(3)}
  AND ts < {to_ts:DateTime64(3)}
  AND ({principal:String} = '' OR principal = {principal:String})
  AND ({action:String} = '' OR action = {action:String})
ORDER BY ts DESC, event_id
LIMIT {max_rows:UInt32}
