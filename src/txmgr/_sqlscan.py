"""Find SQL statements a branch must not run, without a full parser.

Inside a transaction block PostgreSQL ends the transaction only with a
top-level ``COMMIT``/``END``/``ROLLBACK``/``ABORT``/``PREPARE TRANSACTION``
(procedures and ``DO`` blocks cannot commit inside a block), so it is enough
to look at the first words of every statement of a query string
(:func:`transaction_control_statement`). Changing the session's role is
refused too (:func:`role_change_statement`): only the role that prepared a
branch may finish it. Strings, quoted identifiers, dollar quotes and comments
are skipped so that a literal ``'commit'`` never counts.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

__all__ = ["role_change_statement", "transaction_control_statement"]

_WORD = re.compile(r"[A-Za-z_][A-Za-z0-9_$]*")
_DOLLAR_TAG = re.compile(r"\$(?:[A-Za-z_][A-Za-z0-9_]*)?\$")
_ENDING = {"COMMIT", "END", "ABORT", "ROLLBACK"}
# Fast paths: most statements contain none of these words anywhere.
_CANDIDATE = re.compile(r"(?<![A-Za-z0-9_$])(?:commit|end|abort|rollback|prepare)(?![A-Za-z0-9_$])",
                        re.IGNORECASE)
_ROLE_CANDIDATE = re.compile(
    r"(?<![A-Za-z0-9_$])(?:role|authorization|session_authorization|set_config)"
    r"(?![A-Za-z0-9_$])",
    re.IGNORECASE,
)
# The settings that change who the session acts as. Both are GUC_NO_RESET_ALL,
# so RESET ALL leaves them alone.
_ROLE_SETTINGS = {"role", "session_authorization"}

# A token: (kind, text). Kinds: "word" (an unquoted word, as written), "ident"
# (a quoted identifier, its content), "string" (a '…' literal, its content),
# "other" (anything else: numbers, operators, dollar-quoted text).
Token = tuple[str, str]


def transaction_control_statement(query: str, *, standard_strings: bool = True) -> str | None:
    """The first statement of ``query`` that would end the transaction, or None.

    ``ROLLBACK TO [SAVEPOINT] x`` and ``PREPARE name AS …`` (a prepared
    statement) are allowed: they do not end the transaction.
    ``standard_strings`` is the session's ``standard_conforming_strings``: when
    off, a backslash escapes a quote inside an ordinary ``'…'`` string too.
    """
    if _CANDIDATE.search(query) is None:
        return None
    for tokens in _statements(query, standard_strings):
        first, second = (_keyword(tokens, i) for i in (0, 1))
        if first == "ROLLBACK" and second == "TO":
            continue
        if first in _ENDING:
            return first
        if first == "PREPARE" and second == "TRANSACTION":
            return "PREPARE TRANSACTION"
    return None


def role_change_statement(query: str, *, standard_strings: bool = True) -> str | None:
    """The first statement of ``query`` that changes the session's role, or None.

    Finds ``SET [LOCAL|SESSION] ROLE``, ``SET [LOCAL|SESSION] SESSION
    AUTHORIZATION``, ``RESET ROLE``, ``RESET SESSION AUTHORIZATION``, the
    same settings by name (``SET role = x``, ``SET "role" TO x``) and
    ``set_config('role', …)`` with a literal name. A role changed from inside
    a function or a ``DO`` block, or ``set_config`` with the name as a
    parameter, is not seen.
    """
    if _ROLE_CANDIDATE.search(query) is None:
        return None
    for tokens in _statements(query, standard_strings):
        found = _role_change(tokens)
        if found is not None:
            return found
    return None


def _role_change(tokens: list[Token]) -> str | None:
    verb = _keyword(tokens, 0)
    if verb in ("SET", "RESET"):
        i = 1
        # SET LOCAL ROLE, SET SESSION ROLE; but SET SESSION AUTHORIZATION is a name.
        if verb == "SET" and _keyword(tokens, 1) in ("LOCAL", "SESSION") and not (
            _keyword(tokens, 1) == "SESSION" and _keyword(tokens, 2) == "AUTHORIZATION"
        ):
            i = 2
        if _keyword(tokens, i) == "SESSION" and _keyword(tokens, i + 1) == "AUTHORIZATION":
            return f"{verb} SESSION AUTHORIZATION"
        name = _setting_name(tokens, i)
        if name == "role":
            return f"{verb} ROLE"
        if name == "session_authorization":
            return f"{verb} SESSION AUTHORIZATION"
    for i, (kind, text) in enumerate(tokens[:-1]):
        if kind == "word" and text.lower() == "set_config":
            arg_kind, arg = tokens[i + 1]
            if arg_kind == "string" and arg.strip().lower() in _ROLE_SETTINGS:
                return f"set_config('{arg.strip().lower()}', …)"
    return None


def _keyword(tokens: list[Token], i: int) -> str:
    """Token ``i`` upper-cased if it is an unquoted word (a keyword can be), else ""."""
    if i < len(tokens) and tokens[i][0] == "word":
        return tokens[i][1].upper()
    return ""


def _setting_name(tokens: list[Token], i: int) -> str:
    """Token ``i`` as a setting name: unquoted words fold to lower case, quoted keep it."""
    if i >= len(tokens):
        return ""
    kind, text = tokens[i]
    return text.lower() if kind == "word" else text if kind == "ident" else ""


def _statements(query: str, standard_strings: bool) -> Iterator[list[Token]]:
    """The tokens of every non-empty statement in ``query``."""
    tokens: list[Token] = []
    for token in _tokens(query, standard_strings):
        if token[0] == ";":
            if tokens:
                yield tokens
            tokens = []
        else:
            tokens.append(token)
    if tokens:
        yield tokens


def _tokens(query: str, standard_strings: bool) -> Iterator[Token]:
    i, n = 0, len(query)
    while i < n:
        c = query[i]
        if c == ";":
            yield ";", c
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
            end = _skip_quoted(query, i + 1, "'", backslash=backslash)
            yield "string", query[i + 1 : end - 1].replace("''", "'")
            i = end
        elif c == '"':
            end = _skip_quoted(query, i + 1, '"', backslash=False)
            yield "ident", query[i + 1 : end - 1].replace('""', '"')
            i = end
        elif c == "$" and (m := _DOLLAR_TAG.match(query, i)):
            j = query.find(m.group(), m.end())
            i = n if j < 0 else j + len(m.group())
            yield "other", "$"
        elif m := _WORD.match(query, i):
            i = m.end()
            # E'…': the E belongs to the string literal, it is no word of its own.
            if not (m.group() in ("E", "e") and i < n and query[i] == "'"):
                yield "word", m.group()
        else:
            yield "other", c
            i += 1


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
    return n + 1  # unterminated: the rest of the query is inside the quotes


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
