"""Does the decision log stay small under load with the daemon running?

Starts two throwaway PostgreSQL servers (txmgr.testing; needs the server
binaries, see TXMGR_PG_BIN), a dedicated decision log, a ``txmgr daemon``
subprocess, and commits N global transactions over two participants from
several threads. Every ``--every`` seconds it prints the number of rows in
``txmgr_decision``, its size on disk and its dead tuples; at the end, the
largest row count seen and the bound it should stay under: the transactions
committed within one daemon interval plus those in flight.

    python3 benchmarks/decision_log_growth.py                     # 100,000 transactions
    python3 benchmarks/decision_log_growth.py --transactions 20000 --threads 4
"""

from __future__ import annotations

import argparse
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import psycopg

from txmgr import TransactionManager, migrate
from txmgr.testing import PgServer

ACCOUNTS = 10_000


def _query(dsn: str, sql: Any, params: Any = None) -> list[tuple[Any, ...]]:
    with psycopg.connect(dsn, autocommit=True) as conn:
        cur = conn.execute(sql, params)
        return cur.fetchall() if cur.description is not None else []


def _config(path: Path, participants: dict[str, str], log: str, interval: float) -> Path:
    lines = ["[log]", f'dsn = "{log}"', "", "[participants]"]
    lines += [f'{name} = "{dsn}"' for name, dsn in participants.items()]
    lines += ["", "[recovery]", f"interval = {interval}"]
    path.write_text("\n".join(lines) + "\n")
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--transactions", type=int, default=100_000)
    ap.add_argument("--threads", type=int, default=4)
    ap.add_argument("--interval", type=float, default=1.0, help="daemon interval, seconds")
    ap.add_argument("--every", type=float, default=2.0, help="report every N seconds")
    args = ap.parse_args()

    with PgServer(max_prepared_transactions=100) as s0, \
            PgServer(max_prepared_transactions=100) as s1:
        participants = {"a": s0.create_database("a"), "b": s1.create_database("b")}
        log = s0.create_database("txlog")
        for dsn in participants.values():
            _query(dsn, "CREATE TABLE accounts (id int PRIMARY KEY, balance bigint NOT NULL)")
            _query(dsn, "INSERT INTO accounts SELECT g, 0 FROM generate_series(1, %s) g",
                   (ACCOUNTS,))
        migrate(log)
        workdir = Path(tempfile.mkdtemp(prefix="txmgr-bench-"))
        config = _config(workdir / "txmgr.toml", participants, log, args.interval)
        daemon = subprocess.Popen(
            [sys.executable, "-m", "txmgr.cli", "daemon", "--config", str(config),
             "--log-level", "warning"],
        )  # fmt: skip
        deadline = time.monotonic() + 30
        while not _query(log, "SELECT 1 FROM pg_stat_activity "
                              "WHERE application_name LIKE 'txmgr-daemon%%'"):
            if time.monotonic() > deadline or daemon.poll() is not None:
                sys.exit("the daemon did not start")
            time.sleep(0.1)
        tm = TransactionManager(participants, log, pool_max_size=args.threads + 2)
        done = 0
        errors: list[BaseException] = []
        lock = threading.Lock()
        finished = threading.Event()

        def work(share: int) -> None:
            nonlocal done
            rng = random.Random(share)
            try:
                for _ in range(share):
                    a, b = rng.randint(1, ACCOUNTS), rng.randint(1, ACCOUNTS)
                    with tm.transaction() as tx:
                        tx.connection("a").execute(
                            "UPDATE accounts SET balance = balance - 1 WHERE id = %s", (a,))
                        tx.connection("b").execute(
                            "UPDATE accounts SET balance = balance + 1 WHERE id = %s", (b,))
                    with lock:
                        done += 1
            except BaseException as e:  # reported at the end; the run fails
                errors.append(e)

        shares = [args.transactions // args.threads] * args.threads
        shares[0] += args.transactions - sum(shares)
        workers = [threading.Thread(target=work, args=(n,)) for n in shares]
        started = time.monotonic()
        for w in workers:
            w.start()
        def wait_for_workers() -> None:
            for w in workers:
                w.join()
            finished.set()

        threading.Thread(target=wait_for_workers, daemon=True).start()

        print(f"{'elapsed':>8} {'committed':>10} {'tx/s':>7} {'rows':>6} {'bytes':>9} "
              f"{'dead':>6}")
        max_rows, max_rate = 0, 0.0
        last_done, last_t = 0, started
        with psycopg.connect(log, autocommit=True) as conn:
            while True:
                stop = finished.wait(args.every)
                now = time.monotonic()
                row = conn.execute(
                    "SELECT (SELECT count(*) FROM txmgr_decision), "
                    "pg_total_relation_size('txmgr_decision'), "
                    "(SELECT n_dead_tup FROM pg_stat_user_tables "
                    " WHERE relname = 'txmgr_decision')"
                ).fetchone()
                assert row is not None
                with lock:
                    committed = done
                rate = (committed - last_done) / max(1e-9, now - last_t)
                last_done, last_t = committed, now
                max_rows, max_rate = max(max_rows, row[0]), max(max_rate, rate)
                print(f"{now - started:8.1f} {committed:10d} {rate:7.0f} {row[0]:6d} "
                      f"{row[1]:9d} {row[2] or 0:6d}", flush=True)
                if stop:
                    break
            elapsed = time.monotonic() - started
            # The manager's last finished rows wait for its next decision or its
            # close(); keep it open and let the daemon clean them up.
            deadline = time.monotonic() + 3 * args.interval + 5
            while time.monotonic() < deadline:
                left = conn.execute("SELECT count(*) FROM txmgr_decision").fetchone()
                if left is not None and left[0] == 0:
                    break
                time.sleep(0.1)
            left_row = conn.execute("SELECT count(*) FROM txmgr_decision").fetchone()
            left_count = left_row[0] if left_row else -1
        tm.close()
        daemon.send_signal(signal.SIGTERM)
        code = daemon.wait(timeout=60)
        bound = max_rate * args.interval + args.threads
        print()
        print(f"transactions: {args.transactions} in {elapsed:.1f}s "
              f"({args.transactions / elapsed:.0f}/s, {args.threads} threads)")
        print(f"largest decision table seen: {max_rows} rows; bound (peak rate x interval + "
              f"in flight): {bound:.0f}")
        print(f"rows left after the daemon's next pass, with the manager still open: "
              f"{left_count}")
        print(f"daemon exit code after SIGTERM: {code}")
        total = _query(participants["a"], "SELECT sum(balance) FROM accounts")[0][0] \
            + _query(participants["b"], "SELECT sum(balance) FROM accounts")[0][0]
        print(f"sum of balances over both participants (must be 0): {total}")
        for e in errors[:3]:
            print(f"worker failed: {type(e).__name__}: {e}")
        ok = max_rows <= bound and left_count == 0 and code == 0 and total == 0 and not errors
        sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
