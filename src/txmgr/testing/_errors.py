"""Exceptions of the harness (kept apart so every module can raise them)."""

from __future__ import annotations

__all__ = ["PgServerError"]


class PgServerError(RuntimeError):
    """A PostgreSQL program failed; the message includes its output and the server log."""
