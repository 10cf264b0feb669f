"""Showing DSNs without their passwords."""

from __future__ import annotations

import re

__all__ = ["mask", "redact"]

# "user:secret@" in a URL, "password=secret" or "password='se cret'" in key/value form.
_URL_PASSWORD = re.compile(r"(?P<head>[a-z][a-z0-9+.-]*://[^:/@\s]*:)[^@\s]*(?P<tail>@)", re.I)
_KV_PASSWORD = re.compile(r"(?P<head>\bpassword\s*=\s*)('(?:[^'\\]|\\.)*'|\S+)", re.I)
_MASK = "****"


def mask(dsn: str) -> str:
    """Return ``dsn`` with its password replaced by ``****``, keeping everything else."""
    return redact(dsn)


def redact(text: str) -> str:
    """Remove anything that looks like a password from free text (error messages)."""
    text = _URL_PASSWORD.sub(lambda m: f"{m['head']}{_MASK}{m['tail']}", text)
    return _KV_PASSWORD.sub(lambda m: f"{m['head']}{_MASK}", text)
