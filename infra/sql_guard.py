"""What analyst SQL may do: one read statement, nothing that reaches outside the warehouse.

The check runs on ClickHouse's *own* canonical text of the statement (`formatQuery`, see
`infra.warehouse_readonly`), never on what the user typed: comments (`--`, `#`, nested
`/* */`), heredocs (`$$...$$`), quoted function names (`"file"(...)`) and case tricks are
resolved by the engine's parser, and the text the engine then executes is that canonical
text. This module is pure: it lexes canonical text and says yes or why not.

Refused for reads (besides "not a read statement"):
* `INTO OUTFILE` (chDB writes the file even under readonly=1: measured) and `FROM INFILE`;
* a `SETTINGS` clause (readonly=1 refuses it anyway; this says why in plain words);
* any call of a function that reaches files, URLs, other servers or programs: every table
  function except the few synthetic ones in SAFE_TABLE_FUNCTIONS (the engine's own list is
  passed in, so a new engine's table functions are refused until reviewed), the scalar
  `file()`, which readonly=1 does not stop (measured on chDB 26.9), and the scalar
  functions that call other servers (ai*() LLM calls, hasColumnInTable on a remote host).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from dataclasses import dataclass

READ_KEYWORDS = frozenset({"SELECT", "WITH", "SHOW", "DESCRIBE", "DESC", "EXPLAIN", "EXISTS"})

# Table functions that only make rows from their arguments or read local tables the
# analyst could read anyway. `format` is here because it is also the string function
# format('{}', x); as a table function it only parses its own argument.
SAFE_TABLE_FUNCTIONS = frozenset({
    "numbers", "numbers_mt", "zeros", "zeros_mt", "values", "generaterandom",
    "generateseries", "generate_series", "null", "view", "primes", "format", "merge",
})

# Reach outside the warehouse: files, URLs, object stores, other servers, programs, the
# host process (chDB's python()). The table functions of chDB 26.9 (system.table_functions)
# minus the safe ones, plus scalar functions that read files. Kept static so the guard also
# refuses them when the engine's list is not at hand; names compare lower-cased.
OUTSIDE_FUNCTIONS = frozenset(name.lower() for name in (
    # files and the host
    "file", "fileCluster", "filesystem", "input", "python", "arrowstream", "eval",
    "executable", "catboostEvaluate",
    # URLs and object stores
    "url", "urlCluster", "s3", "s3Cluster", "gcs", "oss", "cosn", "hdfs", "hdfsCluster",
    "azureBlobStorage", "azureBlobStorageCluster",
    "iceberg", "icebergS3", "icebergS3Cluster", "icebergAzure", "icebergAzureCluster",
    "icebergHDFS", "icebergHDFSCluster", "icebergLocal", "icebergLocalCluster", "icebergCluster",
    "deltaLake", "deltaLakeS3", "deltaLakeS3Cluster", "deltaLakeAzure", "deltaLakeAzureCluster",
    "deltaLakeLocal", "deltaLakeCluster", "hudi", "hudiCluster",
    "paimon", "paimonS3", "paimonS3Cluster", "paimonAzure", "paimonAzureCluster", "paimonHDFS",
    "paimonHDFSCluster", "paimonLocal", "paimonCluster",
    # other servers
    "remote", "remoteSecure", "cluster", "clusterAllReplicas", "mysql", "postgresql",
    "sqlite", "mongodb", "redis", "jdbc", "odbc", "bigquery", "ytsaurus",
    "prometheusQuery", "prometheusQueryRange",
    # scalar functions that reach other servers: LLM providers, a remote server's tables
    "aiClassify", "aiEmbed", "aiExtract", "aiFilter", "aiGenerate", "aiRedact", "aiSimilarity",
    "aiTranslate", "hasColumnInTable",
    # local but not for analysts (directory listings, fuzzers, endless loops, internals)
    "dictionary", "loop", "fuzzJSON", "fuzzQuery", "viewIfPermitted", "viewExplain",
    "mergeTreeIndex", "mergeTreeProjection", "mergeTreeTextIndex", "mergeTreeAnalyzeIndexes",
    "mergeTreeAnalyzeIndexesUUID", "mergeTreeCodecBlockCounts", "SQLStandardValues",
    "timeSeriesData", "timeSeriesMetricFamilies", "timeSeriesMetrics", "timeSeriesSamples",
    "timeSeriesSelector", "timeSeriesTags",
))

ADMIN_ROLE = "admin"
ROLE_ENV = "MALLWATT_ROLE"
DEFAULT_ROLE = "analyst"


class QueryRefused(ValueError):
    """The statement is not allowed; the message says which part and why."""


@dataclass(frozen=True)
class Token:
    kind: str  # "word" (bare identifier/keyword), "quoted" (`identifier`), "string", "punct", "number"
    text: str  # words and quoted identifiers unescaped; punctuation as is
    offset: int


_WORD = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_NUMBER = re.compile(r"[0-9][0-9A-Za-z_.]*")


def _quoted(text: str, i: int, quote: str) -> tuple[str, int]:
    """The unescaped body of a quoted run starting at i, and the offset after it."""
    out: list[str] = []
    j, n = i + 1, len(text)
    while j < n:
        ch = text[j]
        if ch == "\\" and j + 1 < n:
            out.append(text[j + 1])
            j += 2
        elif ch == quote:
            if j + 1 < n and text[j + 1] == quote:  # doubled quote
                out.append(quote)
                j += 2
                continue
            return "".join(out), j + 1
        else:
            out.append(ch)
            j += 1
    raise QueryRefused(f"unterminated quote at offset {i}")


def tokenize(canonical: str) -> list[Token]:
    """Tokens of ClickHouse's canonical formatting (no comments, no heredocs).

    Anything canonical text never holds (comment openers, `$`, `#`) is refused rather
    than guessed at: a lexer that disagreed with the engine could hide a call.
    """
    tokens: list[Token] = []
    i, n = 0, len(canonical)
    while i < n:
        ch = canonical[i]
        if ch.isspace():
            i += 1
        elif ch == "'":
            body, i2 = _quoted(canonical, i, "'")
            tokens.append(Token("string", body, i))
            i = i2
        elif ch in "`\"":
            body, i2 = _quoted(canonical, i, ch)
            tokens.append(Token("quoted", body, i))
            i = i2
        elif canonical.startswith(("--", "/*"), i) or ch in "#$":
            raise QueryRefused(f"unexpected {canonical[i:i + 2]!r} at offset {i} of the canonical statement")
        elif m := _WORD.match(canonical, i):
            tokens.append(Token("word", m.group(), i))
            i = m.end()
        elif m := _NUMBER.match(canonical, i):
            tokens.append(Token("number", m.group(), i))
            i = m.end()
        else:
            tokens.append(Token("punct", ch, i))
            i += 1
    return tokens


def called_functions(tokens: list[Token]) -> list[str]:
    """Names written as `name(` or `` `name`( `` (functions and table functions)."""
    out: list[str] = []
    for tok, nxt in zip(tokens, tokens[1:], strict=False):
        if tok.kind in ("word", "quoted") and nxt.kind == "punct" and nxt.text == "(":
            # `a.b(` is not a call of b in ClickHouse SQL (no qualified function names)
            out.append(tok.text)
    return out


def forbidden_functions(engine_table_functions: Iterable[str] = ()) -> frozenset[str]:
    """Lower-cased names an analyst may not call: the static list plus every table
    function the engine reports that is not reviewed as safe."""
    engine = {name.lower() for name in engine_table_functions}
    return OUTSIDE_FUNCTIONS | (engine - SAFE_TABLE_FUNCTIONS)


def first_keyword(tokens: list[Token]) -> str:
    for tok in tokens:
        if tok.kind == "word":
            return tok.text.upper()
        if not (tok.kind == "punct" and tok.text == "("):
            break
    return ""


def _is_word(tok: Token, word: str) -> bool:
    return tok.kind == "word" and tok.text.upper() == word


def _has_clause(tokens: list[Token], first: str, second: str) -> bool:
    return any(_is_word(a, first) and _is_word(b, second) for a, b in zip(tokens, tokens[1:], strict=False))


def _has_settings_clause(tokens: list[Token]) -> bool:
    """`SETTINGS name =` (a column called settings is not a clause)."""
    return any(
        _is_word(a, "SETTINGS") and b.kind in ("word", "quoted") and c.kind == "punct" and c.text == "="
        for a, b, c in zip(tokens, tokens[1:], tokens[2:], strict=False))


def check_statement(
    canonical: str, *, write: bool = False, engine_table_functions: Iterable[str] = ()
) -> str:
    """Refuse (QueryRefused) or return the statement's first keyword.

    `write` allows statements other than reads (the caller checked the write flag and
    role); OUTFILE/INFILE and functions reaching outside are refused either way.
    """
    tokens = tokenize(canonical)
    keyword = first_keyword(tokens)
    if not keyword:
        raise QueryRefused("empty statement")
    if not write and keyword not in READ_KEYWORDS:
        raise QueryRefused(
            f"{keyword} changes the warehouse; analyst SQL is read-only "
            f"({'/'.join(sorted(READ_KEYWORDS))}). Writes need --write and the admin role")
    if _has_clause(tokens, "INTO", "OUTFILE"):
        raise QueryRefused("INTO OUTFILE is refused: results go to the caller, never to a file on the warehouse host")
    if _has_clause(tokens, "FROM", "INFILE"):
        raise QueryRefused("FROM INFILE is refused: the warehouse does not read files of its host")
    if not write and _has_settings_clause(tokens):
        raise QueryRefused("a SETTINGS clause is refused: analyst SQL runs with fixed read-only settings")
    banned = forbidden_functions(engine_table_functions)
    for name in called_functions(tokens):
        if name.lower() in banned:
            raise QueryRefused(
                f"{name}() is refused: it reaches files, URLs, other servers or programs "
                "outside the warehouse")
    return keyword


def caller_role(env: dict[str, str] | None = None) -> str:
    """The role the CLI caller declares (MALLWATT_ROLE, default analyst)."""
    source = os.environ if env is None else env
    return (source.get(ROLE_ENV) or DEFAULT_ROLE).strip().lower()


WRITE_PERMISSION = "sql.write"


def role_may_write(role: str) -> bool:
    """Whether `role` holds the sql.write permission of the roles table
    (pipelines.security_config.DEFAULT_ROLES: admin only by default)."""
    try:
        from pipelines.security_config import DEFAULT_ROLES
    except ImportError:  # infra used without the pipelines package
        return role == ADMIN_ROLE
    return WRITE_PERMISSION in DEFAULT_ROLES.get(role, {}).get("permissions", [])


def require_write_role(role: str) -> None:
    if not role_may_write(role):
        raise QueryRefused(
            f"--write needs the {ADMIN_ROLE} role ({WRITE_PERMISSION} permission; {ROLE_ENV}={ADMIN_ROLE}); "
            f"the caller's role is {role!r}")
