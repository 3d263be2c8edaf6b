"""ERP files (csv, json, xlsx) and merchant-facing text / HTML from exported documents.

Every writer is deterministic: same documents, same bytes (sorted rows, "\\n" line ends,
no timestamps; the xlsx is written with the standard library and fixed zip dates).
"""

from __future__ import annotations

import csv
import html
import io
import json
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from xml.sax.saxutils import escape

DOC_COLUMNS = ["doc_id", "doc_type", "refers_to", "account_id", "mall_id", "merchant_name", "period", "period_kind",
               "currency", "opening_minor", "net_minor", "closing_minor", "line_count"]
LINE_COLUMNS = ["doc_id", "line_id", "refers_to_line", "section", "description", "amount_minor", "kwh", "rate",
                "tou_period", "tier", "quantity", "entry_ids"]


def money(minor: int, exponent: int = 2) -> str:
    sign = "-" if minor < 0 else ""
    major, rest = divmod(abs(minor), 10**exponent)
    return f"{sign}{major}.{rest:0{exponent}d}"


def tables(docs: Sequence[dict[str, Any]]) -> tuple[list[list[Any]], list[list[Any]]]:
    doc_rows = [[d.get(c) if c != "line_count" else len(d["lines"]) for c in DOC_COLUMNS] for d in docs]
    line_rows = [[d["doc_id"], x["line_id"], x.get("refers_to_line"), x["section"], x["description"],
                  x["amount_minor"], x.get("kwh"), x.get("rate"), x.get("tou_period"), x.get("tier"),
                  x.get("quantity"), " ".join(x["entry_ids"])] for d in docs for x in d["lines"]]
    return doc_rows, line_rows


def _csv(header: list[str], rows: list[list[Any]]) -> bytes:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    w.writerows([["" if v is None else v for v in r] for r in rows])
    return buf.getvalue().encode("utf-8")


def write_csv(docs: Sequence[dict[str, Any]], out: Path, stem: str) -> list[Path]:
    doc_rows, line_rows = tables(docs)
    paths = [out / f"{stem}-documents.csv", out / f"{stem}-lines.csv"]
    paths[0].write_bytes(_csv(DOC_COLUMNS, doc_rows))
    paths[1].write_bytes(_csv(LINE_COLUMNS, line_rows))
    return paths


def write_json(docs: Sequence[dict[str, Any]], out: Path, stem: str) -> list[Path]:
    path = out / f"{stem}.json"
    path.write_text(json.dumps({"documents": list(docs)}, sort_keys=True, indent=1, ensure_ascii=False) + "\n",
                    encoding="utf-8")
    return [path]


# --- xlsx (SpreadsheetML, inline strings; no third-party dependency) ----------------------------


def _col(i: int) -> str:
    s = ""
    i += 1
    while i:
        i, r = divmod(i - 1, 26)
        s = chr(65 + r) + s
    return s


def _sheet(header: list[str], rows: list[list[Any]]) -> str:
    out = ['<?xml version="1.0" encoding="UTF-8" standalone="yes"?>\n'
           '<worksheet xmlns="http://schemas.openxmlformats.org/spreadsheetml/2006/main"><sheetData>']
    for r, row in enumerate([header, *rows], start=1):
        cells = []
        for c, v in enumerate(row):
            ref = f"{_col(c)}{r}"
            if v is None:
                continue
            if isinstance(v, int) and not isinstance(v, bool):
                cells.append(f'<c r="{ref}"><v>{v}</v></c>')
            else:
                cells.append(f'<c r="{ref}" t="inlineStr"><is><t xml:space="preserve">{escape(str(v))}</t></is></c>')
        out.append(f'<row r="{r}">{"".join(cells)}</row>')
    out.append("</sheetData></worksheet>")
    return "".join(out)


def write_xlsx(docs: Sequence[dict[str, Any]], out: Path, stem: str) -> list[Path]:
    doc_rows, line_rows = tables(docs)
    sheets = [("documents", _sheet(DOC_COLUMNS, doc_rows)), ("lines", _sheet(LINE_COLUMNS, line_rows))]
    ns = "http://schemas.openxmlformats.org"
    files = {
        "[Content_Types].xml": (
            f'<?xml version="1.0" encoding="UTF-8" standalone="yes"?>\n<Types xmlns="{ns}/package/2006/content-types">'
            '<Default Extension="rels" ContentType="application/vnd.openxmlformats-package.relationships+xml"/>'
            '<Default Extension="xml" ContentType="application/xml"/>'
            '<Override PartName="/xl/workbook.xml" '
            'ContentType="application/vnd.openxmlformats-officedocument.spreadsheetml.sheet.main+xml"/>'
            + "".join(f'<Override PartName="/xl/worksheets/sheet{i}.xml" '
                      'ContentType="application/vnd.openxmlformats-officedocument.spreadsheetml.worksheet+xml"/>'
                      for i in range(1, len(sheets) + 1)) + "</Types>"),
        "_rels/.rels": (
            f'<?xml version="1.0" encoding="UTF-8" standalone="yes"?>\n<Relationships xmlns="{ns}/package/2006/relationships">'
            f'<Relationship Id="rId1" Type="{ns}/officeDocument/2006/relationships/officeDocument" '
            'Target="xl/workbook.xml"/></Relationships>'),
        "xl/workbook.xml": (
            f'<?xml version="1.0" encoding="UTF-8" standalone="yes"?>\n<workbook xmlns="{ns}/spreadsheetml/2006/main" '
            f'xmlns:r="{ns}/officeDocument/2006/relationships"><sheets>'
            + "".join(f'<sheet name="{name}" sheetId="{i}" r:id="rId{i}"/>' for i, (name, _) in enumerate(sheets, 1))
            + "</sheets></workbook>"),
        "xl/_rels/workbook.xml.rels": (
            f'<?xml version="1.0" encoding="UTF-8" standalone="yes"?>\n<Relationships xmlns="{ns}/package/2006/relationships">'
            + "".join(f'<Relationship Id="rId{i}" Type="{ns}/officeDocument/2006/relationships/worksheet" '
                      f'Target="worksheets/sheet{i}.xml"/>' for i in range(1, len(sheets) + 1))
            + "</Relationships>"),
    } | {f"xl/worksheets/sheet{i}.xml": body for i, (_, body) in enumerate(sheets, 1)}
    path = out / f"{stem}.xlsx"
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for name, body in files.items():
            info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))  # fixed: byte-identical re-exports
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = 0o644 << 16
            z.writestr(info, body.encode("utf-8"))
    path.write_bytes(buf.getvalue())
    return [path]


WRITERS = {"csv": write_csv, "json": write_json, "xlsx": write_xlsx}


# --- merchant-facing ---------------------------------------------------------------------------


def render_text(doc: dict[str, Any]) -> str:
    cur = doc["currency"]
    head = f"{doc['doc_type'].replace('_', ' ').title()} {doc['doc_id']}"
    if doc.get("refers_to"):
        head += f" (corrects {doc['refers_to']})"
    out = [head, f"Account {doc['account_id']} {doc['merchant_name']}  mall {doc['mall_id']}  period {doc['period']}",
           ""]
    for x in doc["lines"]:
        out.append(f"  {x['description'][:72]:<72} {money(x['amount_minor']):>12} {cur}")
    label = "Change in closing balance" if doc.get("refers_to") else "Closing balance"
    out.append(f"  {label:<72} {money(doc['closing_minor']):>12} {cur}")
    return "\n".join(out) + "\n"


def render_html(doc: dict[str, Any]) -> str:
    e = html.escape
    rows = "".join(
        f"<tr><td>{e(x['description'])}</td><td class=n>{e(x.get('kwh') or '')}</td>"
        f"<td class=n>{money(x['amount_minor'])}</td><td class=ids>{e(' '.join(x['entry_ids']))}</td></tr>"
        for x in doc["lines"])
    corr = f"<p>Corrects {e(doc['refers_to'])}</p>" if doc.get("refers_to") else ""
    return (
        "<!doctype html><html><head><meta charset=utf-8>"
        f"<title>{e(doc['doc_id'])}</title><style>body{{font-family:sans-serif;max-width:60em}}"
        "td.n{text-align:right}td.ids{font-size:70%;color:#777}td,th{padding:.2em .6em}</style></head><body>"
        f"<h1>{e(doc['merchant_name'] or doc['account_id'])}</h1>"
        f"<p>{e(doc['doc_type'].replace('_', ' '))} {e(doc['doc_id'])}, account {e(doc['account_id'])}, "
        f"period {e(doc['period'])}, amounts in {e(doc['currency'])}</p>{corr}"
        "<table><tr><th>item</th><th>kWh</th><th>amount</th><th>ledger entries</th></tr>"
        f"{rows}<tr><th>Closing balance</th><td></td><th class=n>{money(doc['closing_minor'])}</th><td></td></tr>"
        "</table></body></html>\n")
