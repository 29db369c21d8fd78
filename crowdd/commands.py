"""The CLI subcommands that talk to (or are) the daemon: daemon, status, donate, host, stop,
reload. Each takes the argparse namespace from :mod:`crowdd.cli` and returns an exit code.

Exit codes: 0 fine; 1 the daemon refused the request; 2 bad arguments; 3 no daemon running.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TextIO

from crowdd import wire
from crowdd.client.resolve import client_endpoint, resolve_config
from crowdd.control import (
    ControlClient,
)
from crowdd.errors import InputError, Unavailable
from crowdd.handoff import open_dataset
from crowdd.hyperparams import HyperparamError, parse_hidden, validate_job

logger = logging.getLogger(__name__)

EXIT_OK = 0
EXIT_REFUSED = 1
EXIT_USAGE = 2
EXIT_NO_DAEMON = 3

#: argparse dest → job field (the CLI flag a field comes from, for error messages)
_JOB_FLAGS: dict[str, tuple[str, str]] = {
    "workers": ("workers", "--workers"),
    "min_workers": ("min_workers", "--min-workers"),
    "wait": ("wait", "--wait"),
    "learning_rate": ("learning_rate", "--lr"),
    "batch_size": ("batch_size", "--batch"),
    "epochs": ("epochs", "--epochs"),
    "hidden": ("hidden", "--hidden"),
    "model": ("model", "--model"),
    "optimizer": ("optimizer", "--optimizer"),
    "sharding": ("sharding", "--sharding"),
}


def _call(args: argparse.Namespace, fn: Callable[[ControlClient], Awaitable[Any]]) -> tuple[int, Any]:
    """Run one client call; map failures to exit codes with a plain message on stderr."""
    client = ControlClient.for_endpoint(client_endpoint(args))

    async def go() -> Any:
        try:
            return await fn(client)
        finally:
            await client.close()

    try:
        return EXIT_OK, asyncio.run(go())
    except Unavailable as exc:
        print(f"crowdd: {exc}", file=sys.stderr)
        return EXIT_NO_DAEMON, None
    except wire.RemoteError as exc:
        where = f" ({exc.field})" if exc.field else ""
        print(f"crowdd: the daemon refused{where}: {exc.message}", file=sys.stderr)
        return (EXIT_USAGE if exc.code == wire.ErrorCode.BAD_FIELD.value else EXIT_REFUSED), None
    except wire.WireError as exc:
        print(f"crowdd: bad reply from the daemon: {exc.message}", file=sys.stderr)
        return EXIT_REFUSED, None


# --------------------------------------------------------------------------- daemon


def daemon(args: argparse.Namespace) -> int:
    from crowdd.node.daemon import run  # the daemon's modules only when running it

    from crowdd import logs

    cfg, paths = resolve_config(args)
    # a service logs its transitions by default; to stderr (the journal) and its rotating file
    level = logging.getLogger().level if getattr(args, "verbose", 0) else logging.INFO
    logs.configure(level, log_dir=paths.log_dir)
    return run(
        cfg,
        paths,
        system=bool(getattr(args, "system", False)),
        matchmaker=getattr(args, "matchmaker", None),
        socket_path=getattr(args, "socket", None),
        config_file=getattr(args, "config", None),
    )


# --------------------------------------------------------------------------- status


def status(args: argparse.Namespace) -> int:
    code, st = _call(args, lambda c: c.status())
    if code != EXIT_OK:
        return code
    if getattr(args, "json", False):
        st.pop("type", None)
        print(json.dumps(st, indent=2, sort_keys=True))
    else:
        format_status(st, sys.stdout)
    return EXIT_OK


def _pct(done: Any, total: Any) -> str:
    try:
        return f"{100.0 * float(done) / float(total):.0f}%" if total else "-"
    except (TypeError, ValueError):
        return "-"


def _num(value: Any, fmt: str = ".3f") -> str:
    return format(value, fmt) if isinstance(value, (int, float)) and not isinstance(value, bool) else "-"


def format_status(st: dict[str, Any], out: TextIO) -> None:
    """Human-readable status (what ``crowdd status`` prints)."""
    role = f" as {st['role']}" if st.get("role") else ""
    out.write(f"crowdd {st.get('version', '?')}: {st.get('state', '?')}{role}\n")
    idle = st.get("idle") or {}
    donating = "on" if st.get("donating") else "off"
    verdict = "allowed" if idle.get("allowed") else "held back"
    rule = f" by {idle['rule']}" if idle.get("rule") and not idle.get("allowed") else ""
    reason = f" ({idle['reason']})" if idle.get("reason") else ""
    out.write(f"  donation:  {donating}; idle policy: {verdict}{rule}{reason}\n")
    if st.get("queue"):
        out.write(f"  queue:     position {st['queue'].get('position')}\n")
    ds = st.get("dataset")
    if ds:
        size = ds.get("size")
        size_s = f"{size:,} bytes" if isinstance(size, int) else "size unknown"
        out.write(f"  dataset:   {ds.get('name') or '?'} ({size_s}, {str(ds.get('digest') or '-')[:12]})\n")
    job = st.get("job")
    if job:
        hidden = "-".join(str(h) for h in job.get("hidden", []))
        out.write(
            f"  job:       {job.get('model')} {hidden} {job.get('optimizer')} lr {job.get('learning_rate')} "
            f"batch {job.get('batch_size')} epochs {job.get('epochs')} sharding {job.get('sharding')}\n"
        )
    plan = st.get("settings")
    if plan:
        out.write(
            f"  plan:      route {plan.get('route')}, K {plan.get('sync_every')} of {plan.get('steps_per_function')} "
            f"steps per function, merge {plan.get('merge')} (the host's)\n"
        )
    group = st.get("group")
    if group:
        members = group.get("members") or []
        out.write(f"  group:     {group.get('id')} (this node is {group.get('index')} of {len(members)})\n")
        for m in members:
            rep = m.get("replication") or {}
            out.write(
                f"    {m.get('index')!s:>3} {m.get('role')!s:<6} {m.get('name')!s:<20} {m.get('address')!s:<15} "
                f"{m.get('state')!s:<12} data {_pct(rep.get('done'), rep.get('total'))}\n"
            )
    tr = st.get("training")
    if tr:
        out.write(
            f"  training:  epoch {tr.get('epoch')}/{tr.get('epochs')} step {tr.get('step')} "
            f"loss {_num(tr.get('loss'))} accuracy {_num(tr.get('accuracy'))} "
            f"test {_num(tr.get('test_accuracy'))} {_num(tr.get('samples_per_sec'), '.0f')} samples/s\n"
        )
    res = st.get("result")
    if res:
        out.write(f"  result:    test accuracy {_num(res.get('test_accuracy'), '.4f')}; model: {res.get('model_path') or '-'}\n")
    if st.get("error"):
        out.write(f"  error:     {st['error']}\n")


# --------------------------------------------------------------------------- donate / stop / reload


def donate(args: argparse.Namespace) -> int:
    on = args.state == "on"
    code, reply = _call(args, lambda c: c.donate(on))
    if code == EXIT_OK:
        print(f"donation is {'on' if reply.get('donating') else 'off'}")
    return code


def stop(args: argparse.Namespace) -> int:
    code, _ = _call(args, lambda c: c.stop())
    if code == EXIT_OK:
        print("the current session is stopping (donation stays as it was)")
    return code


def reload(args: argparse.Namespace) -> int:
    code, _ = _call(args, lambda c: c.reload())
    if code == EXIT_OK:
        print("the daemon re-read its configuration")
    return code


# --------------------------------------------------------------------------- host


def job_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """Only the hyperparameter flags the user gave, checked by :func:`validate_job`.

    Raises :class:`HyperparamError` whose ``field`` is the CLI flag at fault.
    """
    job: dict[str, Any] = {}
    for dest, (name, flag) in _JOB_FLAGS.items():
        value = getattr(args, dest, None)
        if value is None:
            continue
        if name == "hidden":
            try:
                value = list(parse_hidden(value))
            except HyperparamError as exc:
                raise HyperparamError(flag, exc.message) from None
        job[name] = value
    try:
        validate_job(job)
    except HyperparamError as exc:
        flag = _JOB_FLAGS.get(exc.field, (exc.field, exc.field))[1]
        raise HyperparamError(flag, exc.message) from None
    return job


def host(args: argparse.Namespace) -> int:
    try:
        job = job_from_args(args)
    except HyperparamError as exc:
        print(f"crowdd host: {exc.field}: {exc.message}", file=sys.stderr)
        return EXIT_USAGE
    dataset = Path(args.dataset).expanduser().absolute()
    try:
        dataset.stat()
    except FileNotFoundError:
        print(f"crowdd host: {dataset}: no such file or directory", file=sys.stderr)
        return EXIT_USAGE
    except PermissionError:
        print(f"crowdd host: {dataset}: permission denied (you cannot read it, so you cannot host it)", file=sys.stderr)
        return EXIT_USAGE
    except OSError as exc:
        print(f"crowdd host: {dataset}: {exc.strerror or exc}", file=sys.stderr)
        return EXIT_USAGE
    request: dict[str, Any] = {"type": "host", "dataset": str(dataset), "job": job}
    test_fraction = getattr(args, "test_fraction", None)
    if test_fraction is not None:
        if not 0 < test_fraction < 1:
            print(f"crowdd host: --test-fraction: must be between 0 and 1, got {test_fraction}", file=sys.stderr)
            return EXIT_USAGE
        request["test_fraction"] = test_fraction
    if client_endpoint(args).is_tcp:  # (Windows) the service reads the path itself
        code, _ = _call(args, lambda c: c.request(request))
    else:
        # The dataset is opened here, with this user's permissions, and handed to the daemon
        # (crowdd.handoff): the system service sees no /home and reads nothing on a user's behalf.
        try:
            files = open_dataset(dataset)
        except InputError as exc:
            print(f"crowdd host: {exc.message}", file=sys.stderr)
            return EXIT_USAGE
        try:
            code, _ = _call(args, lambda c: c.host_files(files, job, test_fraction))
        finally:
            files.close()
    if code == EXIT_OK:
        print(f"hosting {dataset}: the daemon is preparing it and looking for workers (see `crowdd status`)")
    return code


__all__ = ["client_endpoint", "daemon", "donate", "format_status", "host", "job_from_args", "reload", "status", "stop"]
