"""Find SQL statements that would end a transaction, without a full parser.

Inside a transaction block PostgreSQL ends the transaction only with a
top-level ``COMMIT``/``END``/``ROLLBACK``/``ABORT``/``PREPARE TRANSACTION``
(procedures and ``DO`` blocks cannot commit inside a block), so it is enough
to look at the first words of every statement of a query string. Strings,
quoted identifiers, dollar quotes and comments are skipped so that a literal
``'commit'`` never counts.
"""

from __future__ import annotations

import re

__all__ = ["transaction_control_statement"]

_WORD = re.compile(r"[A-Za-z_][A-Za-z0-9_$]*")
_DOLLAR_TAG = re.compile(r"\$(?:[A-Za-z_][A-Za-z0-9_]*)?\$")
_ENDING = {"COMMIT", "END", "ABORT", "ROLLBACK"}
# Fast path: most statements contain none of these words anywhere.
_CANDIDATE = re.compile(r"(?<![A-Za-z0-9_$])(?:commit|end|abort|rollback|prepare)(?![A-Za-z0-9_$])",
                        re.IGNORECASE)


def transaction_control_statement(query: str, *, standard_strings: bool = True) -> str | None:
    """The first statement of ``query`` that would end the transaction, or None.

    ``ROLLBACK TO [SAVEPOINT] x`` and ``PREPARE name AS …`` (a prepared
    statement) are allowed: they do not end the transaction.
    ``standard_strings`` is the session's ``standard_conforming_strings``: when
    off, a backslash escapes a quote inside an ordinary ``'…'`` string too.
    """
    if _CANDIDATE.search(query) is None:
        return None
    for words in _statement_heads(query, standard_strings):
        first = words[0].upper() if words else ""
        second = words[1].upper() if len(words) > 1 else ""
        if first == "ROLLBACK" and second == "TO":
            continue
        if first in _ENDING:
            return first
        if first == "PREPARE" and second == "TRANSACTION":
            return "PREPARE TRANSACTION"
    return None


def _statement_heads(query: str, standard_strings: bool) -> list[list[str]]:
    """The first two words of every statement in ``query``."""
    heads: list[list[str]] = [[]]
    i, n = 0, len(query)
    while i < n:
        c = query[i]
        if c == ";":
            heads.append([])
            i += 1
        elif c.isspace() or c == "(":
            i += 1
        elif query.startswith("--", i):
            j = query.find("\n", i)
            i = n if j < 0 else j + 1
        elif query.startswith("/*", i):
            i = _skip_block_comment(query, i)
        elif c == "'":
            backslash = not standard_strings or _is_escape_string(query, i)
            i = _skip_quoted(query, i + 1, "'", backslash=backslash)
            _mark_seen(heads)
        elif c == '"':
            i = _skip_quoted(query, i + 1, '"', backslash=False)
            _mark_seen(heads)
        elif c == "$" and (m := _DOLLAR_TAG.match(query, i)):
            j = query.find(m.group(), m.end())
            i = n if j < 0 else j + len(m.group())
            _mark_seen(heads)
        elif m := _WORD.match(query, i):
            if len(heads[-1]) < 2:
                heads[-1].append(m.group())
            i = m.end()
        else:
            _mark_seen(heads)
            i += 1
    return [h for h in heads if h and h[0] != ""]


def _mark_seen(heads: list[list[str]]) -> None:
    # Something that is not a word came first or second: pad so no later word
    # is mistaken for the statement's first or second keyword.
    while len(heads[-1]) < 2:
        heads[-1].append("")


def _is_escape_string(query: str, quote: int) -> bool:
    return quote > 0 and query[quote - 1] in "eE" and (
        quote == 1 or not (query[quote - 2].isalnum() or query[quote - 2] == "_")
    )


def _skip_quoted(query: str, i: int, quote: str, *, backslash: bool) -> int:
    n = len(query)
    while i < n:
        c = query[i]
        if backslash and c == "\\":
            i += 2
        elif c == quote:
            if i + 1 < n and query[i + 1] == quote:  # doubled quote is an escaped quote
                i += 2
            else:
                return i + 1
        else:
            i += 1
    return n


def _skip_block_comment(query: str, i: int) -> int:
    depth, i, n = 0, i, len(query)  # PostgreSQL block comments nest
    while i < n:
        if query.startswith("/*", i):
            depth += 1
            i += 2
        elif query.startswith("*/", i):
            depth -= 1
            i += 2
            if depth == 0:
                return i
        else:
            i += 1
    return n
