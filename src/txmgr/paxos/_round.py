"""One round: the same statement on every acceptor worth asking, until enough answered.

:class:`Round` checks out a connection per acceptor, builds one job each; the
caller runs the jobs (alone, with :func:`run_round`, or together with its own,
as the coordinator does with its votes) and calls :meth:`Round.finish`, which
hands the jobs still in flight to the collector and turns the rest into
answers. :class:`Registration` is the round that opens a transaction.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import psycopg
from psycopg import sql

from txmgr._dsn import mask, redact
from txmgr._multiplex import Job
from txmgr.paxos._acceptor import (
    Answer,
    encode,
    inline,
    parse,
    register_query,
    run_quorum,
)
from txmgr.paxos._core import Reply, Voters, registered_voters
from txmgr.paxos._errors import LogQuorumUnavailable
from txmgr.paxos._links import AcceptorLink, Collector

__all__ = [
    "Links",
    "Registration",
    "Result",
    "Round",
    "by_incarnation",
    "registered_by_quorum",
    "registration_failed",
    "reply_of",
    "run_round",
]

logger = logging.getLogger("txmgr.paxos")

_QUICK = 0.05  # seconds a healthy acceptor may take to hand out a pooled connection

#: What one acceptor answered to a round, or what went wrong with it.
Result = tuple[AcceptorLink, "Answer | str"]


class Links(Protocol):
    """What a round needs from its log."""

    links: list[AcceptorLink]
    collector: Collector
    connect_timeout: float
    round_timeout: float

    @property
    def quorum(self) -> int: ...


def checkout(
    log: Links, *, everyone: bool, only: Sequence[AcceptorLink] | None = None
) -> list[tuple[AcceptorLink, psycopg.Connection[Any]]]:
    """A connection to every acceptor worth asking now (among ``only``, if given).

    Resting acceptors are skipped, unless too few others are left (or
    ``everyone``): then they are probed. Healthy ones get a moment to hand out
    a pooled connection; those never heard from yet (their pools are still
    connecting), and all of them while fewer than a quorum are at hand, get up
    to ``connect_timeout`` in all.
    """
    now = time.monotonic()
    everyone = everyone or sum(1 for k in log.links if not k.resting(now)) < log.quorum
    held: list[tuple[AcceptorLink, psycopg.Connection[Any]]] = []
    missing: list[AcceptorLink] = []
    for link in log.links if only is None else only:
        if link.resting(now) and not everyone:
            continue
        conn = link.checkout(_QUICK if link.healthy else 0.001)
        if conn is not None:
            held.append((link, conn))
        elif link.failing():
            link.failed("cannot connect to it", unreachable=True)
        else:
            missing.append(link)
    deadline = time.monotonic() + log.connect_timeout
    for link in missing:
        if not everyone and len(held) >= log.quorum and link.incarnation is not None:
            continue  # busy or failing: not worth holding the round up
        conn = link.checkout(max(0.001, deadline - time.monotonic()))
        if conn is None:
            link.failed("no connection could be had", unreachable=link.failing())
        else:
            held.append((link, conn))
    return held


class Round:
    """One statement on every acceptor worth asking; :meth:`finish` must follow."""

    def __init__(
        self, log: Links, query: sql.Composable, enough: Callable[[list[Answer]], bool],
        *, everyone: bool = False, only: Sequence[AcceptorLink] | None = None,
    ) -> None:
        self._log = log
        self._held = checkout(log, everyone=everyone, only=only)
        self._enough = enough
        self._parsed: dict[int, Answer | str] = {}
        # Composing costs more than sending: once per encoding and form (prepared
        # statement or text, see txmgr.paxos._acceptor.Statement).
        composed: dict[tuple[str, bool], bytes] = {}
        self.jobs: list[Job] = []
        for _, conn in self._held:
            key = (conn.info.encoding, inline(conn))
            if key not in composed:
                composed[key] = query.as_bytes(conn)
            self.jobs.append(Job(conn, encode(conn, composed[key])))
        self._mine = {id(j) for j in self.jobs}

    def enough(self, finished: Sequence[Job]) -> bool:
        """Do the finished jobs of this round (others are ignored) suffice?"""
        answers = [outcome(self._parsed, j) for j in finished if id(j) in self._mine]
        return self._enough([a for a in answers if isinstance(a, Answer)])

    def finish(self, unanswered: Sequence[Job] = ()) -> list[Result]:
        """Each acceptor's answer (or problem); connections go back to their pools,
        those of ``unanswered`` jobs once the collector has read their answers."""
        later = {id(j) for j in unanswered}
        results: list[Result] = []
        seen: set[str] = set()
        for (link, conn), job in zip(self._held, self.jobs, strict=True):
            if id(job) in later:
                self._log.collector.add(link, conn, job)
                results.append((link, "no answer yet"))
                continue
            result = outcome(self._parsed, job)
            # After an error, the session may not have prepared the statements.
            link.release(conn, broken=job.error is not None or conn.broken)
            if isinstance(result, str):
                link.failed(result)
            elif result.incarnation in seen:
                result = f"same database as another listed DSN (incarnation {result.incarnation})"
                logger.error("Paxos log database %s: %s", mask(link.dsn), result)
            else:
                seen.add(result.incarnation)
                link.answered(result.incarnation)
            results.append((link, result))
        self._held = []
        return results


def outcome(cache: dict[int, Answer | str], job: Job) -> Answer | str:
    """A finished job's Answer, or its problem as text (passwords removed)."""
    key = id(job)
    if key not in cache:
        if job.error is not None:
            cache[key] = redact(str(job.error)).strip() or type(job.error).__name__
        else:
            try:
                cache[key] = parse(job.rows)
            except ValueError as e:
                cache[key] = str(e)
    return cache[key]


def straggler_done(link: AcceptorLink, job: Job) -> None:
    """The collector's verdict on a late answer: the acceptor's health."""
    result = outcome({}, job)
    if isinstance(result, str):
        link.failed(result)
    else:
        link.answered(result.incarnation)


def run_round(
    log: Links, query: sql.Composable, *, enough: Callable[[list[Answer]], bool],
    linger: float = 0.0, everyone: bool = False, only: Sequence[AcceptorLink] | None = None,
    timeout: float | None = None,
) -> list[Result]:
    """Send ``query`` to the acceptors (or those of ``only``); return once ``enough``
    answered (plus ``linger``), or after ``timeout`` (default: the log's round timeout)."""
    batch = Round(log, query, enough, everyone=everyone, only=only)
    unanswered = run_quorum(batch.jobs, enough=batch.enough, linger=linger,
                            timeout=log.round_timeout if timeout is None else timeout)
    return batch.finish(unanswered)


def reply_of(answer: Answer, txid: str) -> Reply:
    return answer.replies.get(txid) or Reply("gone")


def by_incarnation(results: list[Result], txid: str) -> dict[str, Reply]:
    """The replies about ``txid``, by the incarnation that gave them (one each)."""
    out: dict[str, Reply] = {}
    for _, r in results:
        if isinstance(r, Answer) and txid in r.replies:
            out.setdefault(r.incarnation, r.replies[txid])
    return out


class Registration:
    """The registration of one transaction, to run along with its votes.

    >>> reg = log.registration(txid)
    >>> unanswered = run_quorum([*votes, *reg.jobs], enough=…, linger=…, timeout=…)
    >>> voters = reg.finish(unanswered)   # LogQuorumUnavailable: abort, nothing prepared
    """

    def __init__(self, log: Links, txid: str, key: int) -> None:
        self._log = log
        self.txid = txid
        self.key = key  # the coordinator's liveness key (txmgr.paxos._beacon)
        self._round = Round(log, register_query(txid, key), registered_by_quorum(log, txid))
        self.jobs = self._round.jobs

    def enough(self, finished: Sequence[Job]) -> bool:
        """A quorum registered (among ``finished``)."""
        return self._round.enough(finished)

    def finish(self, unanswered: Sequence[Job] = ()) -> Voters:
        """The voters; LogQuorumUnavailable when fewer than a majority registered.

        An acceptor that answers after this is not a voter: its slot counts for
        nobody and goes with the transaction's cleanup.
        """
        log, txid = self._log, self.txid
        results = self._round.finish(unanswered)
        replies = by_incarnation(results, txid)
        voters = registered_voters(replies, len(log.links))
        if voters is not None:
            return voters
        answered = sum(1 for r in replies.values() if r.status == "ok")
        raise registration_failed(log, results, answered=answered,
                                  what=f"transaction {txid}: ", registered="it")


def registered_by_quorum(log: Links, txid: str) -> Callable[[list[Answer]], bool]:
    """A registration round's ``enough``: a majority of the log created ``txid``'s slot."""
    q = log.quorum

    def enough(answers: list[Answer]) -> bool:
        return sum(1 for a in answers if reply_of(a, txid).status == "ok") >= q

    return enough


def registration_failed(
    log: Links, results: list[Result], *, answered: int, what: str, registered: str
) -> LogQuorumUnavailable:
    """The error of a registration round that fewer than a majority answered:
    what each log database that did not register said, or why it was not asked."""
    problems = [f"{mask(link.dsn)}: {r}" for link, r in results if isinstance(r, str)]
    problems += [f"{mask(link.dsn)}: resting after an error ({link.last_error})"
                 for link in log.links if all(k is not link for k, _ in results)]
    return LogQuorumUnavailable(
        f"{what}only {answered} of {len(log.links)} Paxos log databases could register "
        f"{registered}, {log.quorum} are needed; nothing was prepared: " + "; ".join(problems),
        answered=answered, needed=log.quorum, problems=problems,
    )
