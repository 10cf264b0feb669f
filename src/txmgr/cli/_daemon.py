"""``txmgr daemon``: recovery on an interval, metrics, one active daemon per log."""

from __future__ import annotations

import logging
import os
import signal
import threading
from types import FrameType

import click

from txmgr._logging import LOG_FORMATS, configure_logging
from txmgr.cli._common import config_option, load_config
from txmgr.daemon import Daemon
from txmgr.errors import ConfigError
from txmgr.metrics import require_prometheus

__all__ = ["daemon_cmd"]

logger = logging.getLogger("txmgr.daemon")


@click.command("daemon")
@config_option
@click.option(
    "--interval",
    type=click.FloatRange(min=0, min_open=True),
    help="Seconds between recovery passes (default: [recovery] interval, else 10).",
)
@click.option(
    "--metrics-port",
    type=click.IntRange(0, 65535),
    help="Serve Prometheus /metrics and /healthz on this port (default: [metrics] port; "
    "0 picks a free port, logged at start).",
)
@click.option(
    "--metrics-address",
    default=None,
    help="Address the metrics server binds to (default: [metrics] address, else 127.0.0.1; "
    "0.0.0.0 for every interface).",
)
@click.option(
    "--log-format", type=click.Choice(LOG_FORMATS), default="text", show_default=True,
    help="json: one JSON object per line.",
)  # fmt: skip
@click.option(
    "--log-level",
    type=click.Choice(["debug", "info", "warning", "error"]),
    default="info",
    show_default=True,
)
def daemon_cmd(
    config_path: str | None,
    interval: float | None,
    metrics_port: int | None,
    metrics_address: str | None,
    log_format: str,
    log_level: str,
) -> None:
    """Run recovery every INTERVAL seconds until SIGTERM or SIGINT.

    Several daemons may run against one decision log: one is active (it holds
    a lock in the log database), the others stand by and take over within one
    interval. SIGTERM and SIGINT finish the current pass, then exit 0; a
    second signal ends the process at once.
    """
    config = load_config(config_path)
    port = metrics_port if metrics_port is not None else config.metrics_port
    if port is not None:
        require_prometheus()  # the `metrics` extra: say so before anything starts
    configure_logging("json" if log_format == "json" else "text", log_level.upper())
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        # Only set the event here: the pass in progress finishes, then run()
        # returns. A second signal means "now": die by it (the server drops
        # the lock with the session).
        if stop.is_set():
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    daemon = Daemon(config, interval=interval, stop=stop)
    metrics_address = metrics_address or config.metrics_address
    if port is not None:
        try:
            server = daemon.serve_metrics(metrics_address, port)
        except OSError as e:
            daemon.close()
            raise ConfigError(
                f"cannot serve metrics on {metrics_address}:{port}: {e.strerror or e}; choose "
                "another --metrics-port / [metrics] port, or 0 for any free port"
            ) from None
        logger.info(
            "serving metrics on http://%s:%d/metrics and /healthz", server.host, server.port,
            extra={"event": "metrics", "metrics_address": server.host,
                   "metrics_port": server.port},
        )  # fmt: skip
    try:
        daemon.run()
    finally:
        if config.paxos_log is not None:  # its pools and round threads
            config.paxos_log.close()
