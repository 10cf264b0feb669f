"""The wait-for graph over global transactions, and which ones to cancel (pure logic).

Input: what each participant's server says of its backends (:class:`Backend`:
its tag, whom it waits for). A node is a global transaction (``tx <txid>``,
all its branches on every server together), a session that is not txmgr's
(``pid N on P``: a cycle through it is still a deadlock), or a prepared
transaction (``prepared on P``: ``pg_blocking_pids`` names it 0). A prepared
transaction waits for nothing, so no cycle passes through it: a wait behind a
prepared branch ends when its decision is carried out.

Every strongly connected component with a cycle is a deadlock. Its victim is
the youngest global transaction in it that has not voted (a transaction that
voted is inside the commit protocol: only its decision may end it); it is
taken out and the rest looked at again, until no cycle is left that has a
candidate. As in Citus, youngest: the latest first-branch start. Servers'
clocks differ a little; that only changes which transaction is chosen.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

from txmgr._tag import Tag

__all__ = ["Backend", "Deadlock", "Wait", "WaitGraph", "node_of"]

_OLDEST = datetime.min.replace(tzinfo=UTC)


@dataclass(frozen=True, slots=True)
class Backend:
    """One backend of a participant's database that is tagged, waiting, or both."""

    participant: str
    pid: int
    tag: Tag | None
    xact_start: datetime | None  # None when the server hides it (another role)
    blockers: tuple[int, ...] = ()  # pg_blocking_pids; 0 is a prepared transaction
    relations: tuple[str, ...] = ()  # the tables of the locks it waits for
    waited: float | None = None  # seconds it has waited so far


@dataclass(frozen=True, slots=True)
class Wait:
    """One edge: ``waiter`` (node) waits on ``participant`` for ``holder`` (node)."""

    waiter: str
    holder: str
    participant: str
    pid: int  # the waiting backend
    relations: tuple[str, ...]
    waited: float | None  # seconds, by the server's clock

    def to_json(self) -> dict[str, object]:
        """The wait as ``txmgr status --json`` prints it."""
        return {
            "participant": self.participant, "pid": self.pid,
            "waiter": _name(self.waiter), "blocked_by": _name(self.holder),
            "relations": list(self.relations), "waited_seconds": self.waited,
        }


@dataclass(frozen=True, slots=True)
class Deadlock:
    """A cycle, and the transaction chosen to break it (None: nobody may be cancelled)."""

    members: tuple[str, ...]  # nodes, sorted
    victim: str | None  # a txid
    waits: tuple[Wait, ...]  # the victim's waits inside the cycle (what to cancel)
    relations: tuple[str, ...]  # every table of the cycle's waits

    @property
    def others(self) -> tuple[str, ...]:
        """Whom the victim waited for, directly or not: txids, or foreign sessions."""
        node = _tx(self.victim) if self.victim else None
        return tuple(_name(m) for m in self.members if m != node)


def _tx(txid: str) -> str:
    return f"tx {txid}"


def _name(node: str) -> str:
    return node[3:] if node.startswith("tx ") else node


def node_of(participant: str, pid: int, tags: dict[tuple[str, int], Tag]) -> str:
    """The node of backend ``pid`` on ``participant``."""
    if pid == 0:
        return f"prepared on {participant}"
    tag = tags.get((participant, pid))
    return _tx(tag.txid) if tag is not None else f"pid {pid} on {participant}"


class WaitGraph:
    """Nodes and wait edges of one detector pass."""

    def __init__(self, backends: Iterable[Backend]) -> None:
        backends = list(backends)
        tags = {(b.participant, b.pid): b.tag for b in backends if b.tag is not None}
        self.voted: set[str] = set()
        self.started: dict[str, datetime] = {}  # txid -> its first branch's start
        for b in backends:
            if b.tag is None:
                continue
            if b.tag.voted:
                self.voted.add(b.tag.txid)
            start = b.xact_start or _OLDEST
            self.started[b.tag.txid] = min(self.started.get(b.tag.txid, start), start)
        self.waits: list[Wait] = []
        for b in backends:
            waiter = node_of(b.participant, b.pid, tags)
            for pid in dict.fromkeys(b.blockers):
                self.waits.append(Wait(
                    waiter, node_of(b.participant, pid, tags), b.participant, b.pid,
                    b.relations, b.waited,
                ))

    def deadlocks(self) -> list[Deadlock]:
        """Every cycle and its victim; cycles left after the victims are gone are
        reported with victim None (only voted transactions and foreign sessions)."""
        found: list[Deadlock] = []
        work = [c for c in _components(self.waits) if _cyclic(c, self.waits)]
        while work:
            comp = work.pop()
            inside = [w for w in self.waits if w.waiter in comp and w.holder in comp]
            relations = tuple(sorted({r for w in inside for r in w.relations}))
            candidates = [n for n in comp if n.startswith("tx ") and n[3:] not in self.voted]
            if not candidates:
                found.append(Deadlock(tuple(sorted(comp)), None, (), relations))
                continue
            victim = max(candidates, key=lambda n: (self.started.get(n[3:], _OLDEST), n))
            found.append(Deadlock(
                tuple(sorted(comp)), victim[3:],
                tuple(w for w in inside if w.waiter == victim), relations,
            ))
            rest = [w for w in inside if victim not in (w.waiter, w.holder)]
            work.extend(c for c in _components(rest) if _cyclic(c, rest))
        return found


def _cyclic(comp: set[str], waits: Sequence[Wait]) -> bool:
    if len(comp) > 1:
        return True
    (node,) = comp
    return any(w.waiter == node and w.holder == node for w in waits)


def _components(waits: Sequence[Wait]) -> list[set[str]]:
    """Strongly connected components of the graph the waits draw (Tarjan, iterative)."""
    succ: dict[str, list[str]] = {}
    for w in waits:
        succ.setdefault(w.waiter, []).append(w.holder)
        succ.setdefault(w.holder, [])
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    result: list[set[str]] = []
    counter = 0
    for root in succ:
        if root in index:
            continue
        work: list[tuple[str, int]] = [(root, 0)]
        while work:
            node, i = work.pop()
            if i == 0:
                index[node] = low[node] = counter
                counter += 1
                stack.append(node)
                on_stack.add(node)
            children = succ[node]
            if i < len(children):
                work.append((node, i + 1))
                child = children[i]
                if child not in index:
                    work.append((child, 0))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            if low[node] == index[node]:
                comp: set[str] = set()
                while True:
                    top = stack.pop()
                    on_stack.discard(top)
                    comp.add(top)
                    if top == node:
                        break
                result.append(comp)
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[node])
    return result
