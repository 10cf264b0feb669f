"""Mapped classes of the ORM tests (sync, asyncio and crash): participant "a"
holds ``orders`` and ``accounts``, participant "b" another ``accounts`` and
``uniq``, each participant's tables under a base of its own."""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from txmgr.hooks import Hooks


class BaseA(DeclarativeBase):
    """Tables of participant "a"."""


class BaseB(DeclarativeBase):
    """Tables of participant "b" (also named "accounts": another MetaData)."""


class Order(BaseA):
    __tablename__ = "orders"
    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    total: Mapped[int]


class AccountA(BaseA):
    __tablename__ = "accounts"
    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    balance: Mapped[int]


class AccountB(BaseB):
    __tablename__ = "accounts"
    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    balance: Mapped[int]


# Its unique constraint is checked at PREPARE TRANSACTION: the branch votes no.
uniq = sa.Table("uniq", BaseB.metadata, sa.Column("k", sa.Integer))

# Mapped classes by their base, a Core table by itself (as SQLAlchemy binds engines).
BINDS = {BaseA: "a", BaseB: "b", uniq: "b"}


class Recorder(Hooks):
    """Hooks that record who wrote and who was prepared."""

    def __init__(self) -> None:
        self.writers: list[list[str]] = []
        self.prepared: list[str] = []

    def after_vote(self, txid: str, writers: list[str]) -> None:
        self.writers.append(sorted(writers))

    def after_prepare(self, txid: str, participant: str, gid: str) -> None:
        self.prepared.append(participant)
