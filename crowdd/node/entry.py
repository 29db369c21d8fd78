"""How a daemon is built and run: ``crowdd daemon`` (:func:`run`), the Windows service
(:func:`service_entry`), both through :func:`build` and :func:`serve`."""

from __future__ import annotations

import asyncio
import io
import logging
import signal
import sys
from pathlib import Path

from crowdd.aio import on_signals
from crowdd.config import Config, Paths, load_config, parse_hostport
from crowdd.protocol.endpoint import Endpoint
from crowdd.idle.policy import IdlePolicy, Policy
from crowdd.idle.probes import Probes, system_probes
from crowdd.node.daemon import Daemon
from crowdd.platform.process import raise_nofile_limit
from crowdd.platform.systemd import Notifier
from crowdd.platform.windows_service import DaemonEntry, asyncio_entry

logger = logging.getLogger(__name__)


async def serve(daemon: Daemon, stop: asyncio.Event | None = None) -> int:
    """Run ``daemon`` until SIGTERM/SIGINT (or ``stop`` is set), then shut it down cleanly.
    SIGUSR1 logs every pending asyncio task with its stack (to debug a stuck daemon)."""
    stop = stop if stop is not None else asyncio.Event()
    # a daemon holds its peers' channels, tunnels and data connections, and handshakes a public
    # port's arrivals: the common 1024 open files must not be what stops a host's run
    limit = raise_nofile_limit()
    if limit is not None:
        logger.info("open-file limit %d", limit)
    handlers = {signal.SIGTERM: stop.set, signal.SIGINT: stop.set}
    if hasattr(signal, "SIGUSR1"):  # not on Windows
        handlers[signal.SIGUSR1] = dump_tasks
    with on_signals(handlers):
        try:
            await daemon.start()
            await stop.wait()
        finally:
            await daemon.close()
    return 0


def dump_tasks() -> None:
    """Log every pending asyncio task with its stack."""
    for task in asyncio.all_tasks():
        buf = io.StringIO()
        task.print_stack(limit=8, file=buf)
        logger.warning("task %s:\n%s", task.get_name(), buf.getvalue())


def make_policy(cfg: Config, config_file: Path, probes: Probes | None = None) -> Policy:
    """The idle policy from ``[idle]`` (its defaults when the file has none): the daemon works
    only while it allows. ``probes`` default to the real machine's."""
    return IdlePolicy(cfg.idle, probes if probes is not None else system_probes(), source=str(config_file))


def build(
    cfg: Config,
    paths: Paths,
    *,
    system: bool = False,
    tcp: bool | None = None,
    matchmaker: str | None = None,
    socket_path: Path | None = None,
    config_file: Path | None = None,
    notifier: Notifier | None = None,
) -> Daemon:
    """One node, assembled the same way for ``crowdd daemon`` (:func:`run`) and the Windows
    service (:func:`service_entry`). Raises ValueError for a bad matchmaker address."""
    cfg_file = config_file or paths.config_file
    mm = parse_hostport(matchmaker or cfg.daemon.matchmaker)
    daemon = Daemon(
        cfg, paths,
        endpoint=Endpoint.for_paths(paths, system=system, socket_path=socket_path, tcp=tcp),
        matchmaker=mm,
        policy=make_policy(cfg, cfg_file),
        notifier=notifier,
        config_loader=lambda: load_config(cfg_file),
    )
    if matchmaker:
        daemon.fix_matchmaker()
    return daemon


def run(
    cfg: Config,
    paths: Paths,
    *,
    system: bool = False,
    matchmaker: str | None = None,
    socket_path: Path | None = None,
    config_file: Path | None = None,
) -> int:
    """``crowdd daemon``: run one daemon until SIGTERM/SIGINT."""
    try:
        parse_hostport(matchmaker or cfg.daemon.matchmaker)
    except ValueError as exc:
        print(f"crowdd daemon: bad --matchmaker: {exc}", file=sys.stderr)
        return 2
    notifier = Notifier.from_env()
    try:
        daemon = build(cfg, paths, system=system, matchmaker=matchmaker, socket_path=socket_path,
                       config_file=config_file, notifier=notifier)
        return asyncio.run(serve(daemon))
    except FileExistsError as exc:
        print(f"crowdd daemon: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"crowdd daemon: cannot start: {exc}", file=sys.stderr)
        return 1
    finally:
        notifier.close()


def service_entry(paths: Paths, *, system: bool = True, tcp: bool | None = None, socket_path: Path | None = None,
                  config_file: Path | None = None) -> DaemonEntry:
    """The Windows service's daemon entry point (for
    :class:`crowdd.platform.windows_service.ServiceRunner`): the config read when the service
    runs, the node :func:`build` makes, run until the service manager asks it to stop."""

    async def main(stop: asyncio.Event) -> int:
        cfg_file = config_file or paths.config_file
        daemon = build(load_config(cfg_file), paths, system=system, tcp=tcp, socket_path=socket_path,
                       config_file=cfg_file)
        return await serve(daemon, stop)

    return asyncio_entry(main)


__all__ = ["build", "make_policy", "run", "serve", "service_entry"]
