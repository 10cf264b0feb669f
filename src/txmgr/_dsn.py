"""DSN helpers: showing them without their passwords, adding session options."""

from __future__ import annotations

import re

import psycopg

__all__ = ["mask", "redact", "session_options"]

# "user:secret@" in a URL, "password=secret" or "password='se cret'" in key/value
# form (or a URL's query string); "sslpassword" (the client key's) likewise.
# The URL form runs to the *last* "@" of the word: a password with an unencoded
# "@" must not leave its tail visible. A quote left open runs to the end.
_URL_PASSWORD = re.compile(r"(?P<head>[a-z][a-z0-9+.-]*://[^:/@\s]*:)\S*(?P<tail>@)", re.I)
_KV_PASSWORD = re.compile(
    r"(?P<head>\b(?:ssl)?password\s*=\s*)('(?:[^'\\]|\\.)*(?:'|$)|\S+)", re.I
)
_MASK = "****"


def mask(dsn: str) -> str:
    """Return ``dsn`` with its password replaced by ``****``, keeping everything else."""
    return redact(dsn)


def redact(text: str) -> str:
    """Remove anything that looks like a password from free text (error messages)."""
    text = _URL_PASSWORD.sub(lambda m: f"{m['head']}{_MASK}{m['tail']}", text)
    return _KV_PASSWORD.sub(lambda m: f"{m['head']}{_MASK}", text)


def session_options(dsn: str, settings: dict[str, str]) -> str:
    """libpq ``options`` setting ``settings`` for the session, after the DSN's own
    ``options`` (so ours win where both set the same parameter)."""
    try:
        own = psycopg.conninfo.conninfo_to_dict(dsn).get("options") or ""
    except (psycopg.ProgrammingError, psycopg.OperationalError):
        own = ""
    ours = " ".join(f"-c {k}={v}" for k, v in settings.items())
    return f"{own} {ours}".strip()
