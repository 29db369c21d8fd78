"""Where crowdd's log lines go, and reading them back (``crowdd logs [-f]``).

- **stderr**, always. Under systemd (``JOURNAL_STREAM`` names our stderr) each line starts
  with its syslog priority, ``<3>`` ... ``<7>``, which journald turns into the entry's
  priority (``journalctl -p warning -u crowdd``); the journal stamps the time itself.
- **a rotating file**, ``crowdd.log`` in the node's log directory (``/var/log/crowdd`` for
  the system service, the user's log directory, ``ROOT/log``), for the long-running commands
  (the daemon). 5 MiB, 3 old copies: at most 20 MiB. ``crowdd logs`` reads it back, so a
  member of group ``crowdd`` can read the service's log without journal access.

Nothing here runs at import time; the CLI calls :func:`configure` once.
"""

from __future__ import annotations

import argparse
import logging
import logging.handlers
import os
import sys
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import IO, TextIO

from crowdd.config import Paths

LOG_FILE = "crowdd.log"
MAX_BYTES = 5 << 20
BACKUPS = 3
FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

#: logging level -> syslog priority (sd-daemon(3): SD_ERR ... SD_DEBUG)
_PRIORITIES = ((logging.CRITICAL, 2), (logging.ERROR, 3), (logging.WARNING, 4), (logging.INFO, 6))


def syslog_priority(levelno: int) -> int:
    """The syslog priority journald gives a line logged at ``levelno``."""
    for level, priority in _PRIORITIES:
        if levelno >= level:
            return priority
    return 7


class JournalFormatter(logging.Formatter):
    """``<N>name: message``, every line of a multi-line record prefixed (journald splits them)."""

    def __init__(self) -> None:
        super().__init__("%(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        prefix = f"<{syslog_priority(record.levelno)}>"
        return "\n".join(prefix + line for line in super().format(record).split("\n"))


def under_journal(stream: IO[str] | None = None, env: Mapping[str, str] | None = None) -> bool:
    """True when ``stream`` (stderr) is connected to journald: ``JOURNAL_STREAM`` is
    ``DEVICE:INODE`` of that very stream (systemd.exec(5)); a child that redirected its
    stderr elsewhere inherits the variable but not the match."""
    env = os.environ if env is None else env
    value = env.get("JOURNAL_STREAM", "")
    dev, sep, ino = value.partition(":")
    if not sep or not dev.isdigit() or not ino.isdigit():
        return False
    try:
        st = os.fstat((stream or sys.stderr).fileno())
    except (OSError, ValueError, AttributeError):
        return False
    return (st.st_dev, st.st_ino) == (int(dev), int(ino))


def stderr_handler(stream: IO[str] | None = None, env: Mapping[str, str] | None = None) -> logging.Handler:
    stream = stream or sys.stderr
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JournalFormatter() if under_journal(stream, env) else logging.Formatter(FORMAT))
    return handler


def file_handler(log_dir: Path) -> logging.Handler:
    """The rotating ``crowdd.log`` in ``log_dir`` (made if missing). Raises OSError."""
    log_dir.mkdir(parents=True, exist_ok=True)
    handler = logging.handlers.RotatingFileHandler(
        log_dir / LOG_FILE, maxBytes=MAX_BYTES, backupCount=BACKUPS, encoding="utf-8"
    )
    handler.setFormatter(logging.Formatter(FORMAT))
    return handler


_MINE = "_crowdd_handler"


def _mine(handler: logging.Handler) -> logging.Handler:
    setattr(handler, _MINE, True)  # configure() replaces only its own handlers (not a test runner's)
    return handler


def configure(level: int, *, log_dir: Path | None = None, stream: IO[str] | None = None,
              env: Mapping[str, str] | None = None) -> None:
    """Replace the root logger's crowdd handlers: stderr (journal priorities under systemd), and the
    rotating file in ``log_dir`` when given. A log directory that cannot be written is said
    on stderr and skipped: logging must never stop the daemon."""
    root = logging.getLogger()
    for old in [h for h in root.handlers if getattr(h, _MINE, False)]:
        root.removeHandler(old)
        old.close()
    root.addHandler(_mine(stderr_handler(stream, env)))
    root.setLevel(level)
    if log_dir is not None:
        try:
            root.addHandler(_mine(file_handler(log_dir)))
        except OSError as exc:
            logging.getLogger(__name__).warning("not logging to %s: %s", log_dir / LOG_FILE, exc.strerror or exc)


# --------------------------------------------------------------------------- reading back


def tail(path: Path, lines: int) -> list[str]:
    """The last ``lines`` lines of ``path`` (with their newlines). Raises OSError."""
    if lines <= 0:
        return []
    with path.open("r", encoding="utf-8", errors="replace") as fh:
        return list(deque(fh, maxlen=lines))


def follow(path: Path, *, opened: TextIO | None = None, interval: float = 0.25,
           should_stop: Callable[[], bool] = lambda: False,
           sleep: Callable[[float], None] = time.sleep) -> Iterator[str]:
    """Lines appended to ``path`` from now on (or from where ``opened``, a handle on it, has
    read to; it is closed at the end), across rotations (the file replaced or cut short),
    until ``should_stop()``. A file that is missing for a while is waited for."""
    fh: TextIO | None = opened
    ident: tuple[int, int] | None = None
    try:
        if fh is None:
            try:
                fh = path.open("r", encoding="utf-8", errors="replace")
                fh.seek(0, os.SEEK_END)
            except FileNotFoundError:
                fh = None
        if fh is not None:
            st = os.fstat(fh.fileno())
            ident = (st.st_dev, st.st_ino)
        pending = ""
        while not should_stop():
            if fh is not None:
                chunk = fh.read()
                if chunk:
                    pending += chunk
                    *complete, pending = pending.split("\n")
                    for line in complete:
                        yield line + "\n"
                    continue
            # nothing new: has the file been rotated or truncated?
            try:
                st = os.stat(path)
            except FileNotFoundError:
                sleep(interval)
                continue
            if fh is None or (st.st_dev, st.st_ino) != ident or st.st_size < fh.tell():
                if fh is not None:
                    rest = fh.read()  # whatever was written before the rotation
                    if pending + rest:
                        yield pending + rest + ("" if (pending + rest).endswith("\n") else "\n")
                    pending = ""
                    fh.close()
                fh = path.open("r", encoding="utf-8", errors="replace")
                new = os.fstat(fh.fileno())
                ident = (new.st_dev, new.st_ino)
                continue
            sleep(interval)
    finally:
        if fh is not None:
            fh.close()


# --------------------------------------------------------------------------- crowdd logs


def log_file_for(args: argparse.Namespace) -> Path:
    """The log file ``crowdd logs`` reads: ``--root``'s, ``--system``'s, else this user's
    daemon's, else the system service's when only that one exists (as clients fall back to
    the system socket)."""
    from crowdd.client.resolve import node_paths

    mine = node_paths(args).log_dir / LOG_FILE
    if getattr(args, "root", None) or getattr(args, "system", False) or mine.exists():
        return mine
    system = Paths.for_system().log_dir / LOG_FILE
    return system if system.exists() else mine


def main(args: argparse.Namespace, out: TextIO | None = None) -> int:
    """``crowdd logs [-n N] [-f]``: the last N lines of the daemon's log, then (``-f``) new ones."""
    out = out or sys.stdout
    if args.lines < 0:
        print(f"crowdd logs: -n: expected 0 or more lines, got {args.lines}", file=sys.stderr)
        return 2
    path = log_file_for(args)
    fh: TextIO | None = None
    try:
        try:
            fh = path.open("r", encoding="utf-8", errors="replace")
            out.writelines(deque(fh, maxlen=args.lines))  # read to the end: -f goes on from exactly there
            out.flush()
        except FileNotFoundError:
            if not args.follow:
                print(f"crowdd logs: {path}: no log yet (has the daemon run? under systemd also: "
                      "journalctl -u crowdd)", file=sys.stderr)
                return 1
        if args.follow:
            opened, fh = fh, None  # follow() owns it now
            for line in follow(path, opened=opened):
                out.write(line)
                out.flush()
        return 0
    except KeyboardInterrupt:
        return 0
    except PermissionError:
        print(f"crowdd logs: {path}: permission denied (the service's log is readable by group crowdd; "
              "or: journalctl -u crowdd)", file=sys.stderr)
        return 1
    except IsADirectoryError:
        print(f"crowdd logs: {path}: is a directory", file=sys.stderr)
        return 1
    finally:
        if fh is not None:
            fh.close()

__all__ = ["BACKUPS", "LOG_FILE", "MAX_BYTES", "JournalFormatter", "configure", "file_handler", "follow",
           "log_file_for", "main",
           "stderr_handler", "syslog_priority", "tail", "under_journal"]
