"""The export register: what was sent to the ERP, and correcting documents for what changed.

A JSON file (sorted keys, no timestamps, so an unchanged register is rewritten byte for byte).
For each statement it keeps the document as first exported and the *effective* lines (the
original plus every correction since). Exporting a period again:

* a statement never exported is registered as is;
* a statement equal to its effective version changes nothing;
* otherwise a correcting document ``<doc_id>-CN01`` (credit note: the merchant's balance goes
  up), ``-DN01`` (debit note) or ``-CR01`` (lines moved, net 0) is registered with one line
  per changed line (the difference, referencing the original line id).

The ERP files of a period are always written from the register, so exported documents are
never silently changed and a re-export of an unchanged period is byte-identical.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

VERSION = 1


def content_hash(doc: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _effective(doc: dict[str, Any]) -> dict[str, Any]:
    return {"opening_minor": doc["opening_minor"], "closing_minor": doc["closing_minor"],
            "lines": {x["line_id"]: {"amount_minor": x["amount_minor"], "entry_ids": list(x["entry_ids"]),
                                     "description": x["description"], "section": x["section"]}
                      for x in doc["lines"]}}


class ExportRegister:
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.data: dict[str, Any] = {"version": VERSION, "statements": {}, "documents": {}}
        if self.path.exists():
            self.data = json.loads(self.path.read_text(encoding="utf-8"))

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        text = json.dumps(self.data, sort_keys=True, indent=1, ensure_ascii=False) + "\n"
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(self.path)  # a crash never leaves half a register

    def documents(self, period: str) -> list[dict[str, Any]]:
        docs = [d for d in self.data["documents"].values() if d["period"] == period]
        return sorted(docs, key=lambda d: d["doc_id"])

    def record(self, statement: dict[str, Any]) -> dict[str, Any] | None:
        """Register one current statement; the new document (original or correction), or None."""
        doc_id = statement["doc_id"]
        entry = self.data["statements"].get(doc_id)
        digest = content_hash(statement)
        if entry is None:
            self.data["statements"][doc_id] = {"hash": digest, "corrections": [], "effective": _effective(statement)}
            self.data["documents"][doc_id] = statement
            return statement
        if entry["hash"] == digest:
            return None
        note = correction(statement, entry["effective"], len(entry["corrections"]) + 1)
        entry["hash"], entry["effective"] = digest, _effective(statement)
        if note is None:  # only cosmetic differences (e.g. a description): nothing owed either way
            return None
        entry["corrections"].append(note["doc_id"])
        self.data["documents"][note["doc_id"]] = note
        return note


def correction(current: dict[str, Any], effective: dict[str, Any], n: int) -> dict[str, Any] | None:
    """The correcting document taking `effective` to `current`, or None if no amount changed."""
    old, new = effective["lines"], {x["line_id"]: x for x in current["lines"]}
    deltas = []
    for line_id in sorted(set(old) | set(new)):
        was = old.get(line_id, {"amount_minor": 0, "entry_ids": []})
        now = new.get(line_id, {"amount_minor": 0, "entry_ids": [], **{k: was.get(k) for k in ("description", "section")}})
        delta = now["amount_minor"] - was["amount_minor"]
        changed_ids = sorted(set(now["entry_ids"]) ^ set(was["entry_ids"]))
        if delta or changed_ids:
            deltas.append((line_id, now, delta, changed_ids))
    movement = sum(d for lid, now, d, _ in deltas if now["section"] != "opening")
    if not any(d for *_, d, _ in deltas):
        return None
    kind, tag = ("credit_note", "CN") if movement > 0 else ("debit_note", "DN") if movement < 0 else ("correction", "CR")
    doc_id = f"{current['doc_id']}-{tag}{n:02d}"
    lines = [{"line_id": f"{doc_id}/{lid.split('/', 1)[1]}", "refers_to_line": lid, "section": now["section"],
              "description": f"correction: {now['description']}", "amount_minor": d, "kwh": None, "rate": None,
              "tou_period": None, "tier": None, "quantity": 1, "detail": {}, "entry_ids": ids}
             for lid, now, d, ids in deltas]
    return {**{k: current[k] for k in ("account_id", "mall_id", "merchant_name", "period", "period_kind", "currency")},
            "doc_id": doc_id, "doc_type": kind, "refers_to": current["doc_id"],
            "opening_minor": current["opening_minor"] - effective["opening_minor"],
            "closing_minor": current["closing_minor"] - effective["closing_minor"],
            "net_minor": movement, "lines": lines}
