"""The CLI subcommands that talk to (or are) the daemon: daemon, status, donate, pause, resume,
host, stop, reload. Each takes the argparse namespace from :mod:`crowdd.cli` and returns an exit code.

Exit codes: 0 fine; 1 the daemon refused the request; 2 bad arguments; 3 no daemon running.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TextIO

from crowdd import wire
from crowdd.client.resolve import client_endpoint, resolve_config
from crowdd.client.control import HOST_TIMEOUT, ControlClient
from crowdd.errors import InputError, Unavailable
from crowdd.data.handoff import OpenFiles, can_hand_over, open_dataset
from crowdd.job.card import usage_hint
from crowdd.hyperparams import HyperparamError, parse_hidden, validate_job
from crowdd.protocol.control import format_pause, parse_duration
from crowdd.text import PlainWriter, plain

logger = logging.getLogger(__name__)

EXIT_OK = 0
EXIT_REFUSED = 1
EXIT_USAGE = 2
EXIT_NO_DAEMON = 3
FOLLOW_PROGRESS_EVERY = 5.0  # seconds between progress lines of `crowdd host --follow`

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
    from crowdd.node.entry import run  # the daemon's modules only when running it

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
        print(wire.dumps(st, indent=2, sort_keys=True))
    else:
        format_status(st, sys.stdout)
    return EXIT_OK


printable = plain  # a peer's words never reach the terminal raw


def _pct(done: Any, total: Any) -> str:
    try:
        return f"{100.0 * float(done) / float(total):.0f}%" if total else "-"
    except (TypeError, ValueError):
        return "-"


def _num(value: Any, fmt: str = ".3f") -> str:
    return format(value, fmt) if isinstance(value, (int, float)) and not isinstance(value, bool) else "-"


def score(d: dict[str, Any]) -> str:
    """A result's or evaluation's score: test MAE/MSE for regression, else test accuracy."""
    if isinstance(d.get("test_mae"), (int, float)):
        return f"test MAE {_num(d.get('test_mae'), '.4g')}, MSE {_num(d.get('test_mse'), '.4g')}"
    return f"test accuracy {_num(d.get('test_accuracy'), '.4f')}"


def format_status(st: dict[str, Any], out: TextIO) -> None:
    """Human-readable status (what ``crowdd status`` prints); peers' words are printed plain."""
    out = PlainWriter(out)  # type: ignore[assignment]
    role = f" as {st['role']}" if st.get("role") else ""
    out.write(f"crowdd {st.get('version', '?')}: {st.get('state', '?')}{role}\n")
    idle = st.get("idle") or {}
    donating = "on" if st.get("donating") else "off"
    verdict = "allowed" if idle.get("allowed") else "held back"
    rule = f" by {idle['rule']}" if idle.get("rule") and not idle.get("allowed") else ""
    reason = f" ({idle['reason']})" if idle.get("reason") else ""
    out.write(f"  donation:  {donating}; idle policy: {verdict}{rule}{reason}\n")
    until = idle.get("paused_until")
    if isinstance(until, (int, float)) and not isinstance(until, bool):
        out.write(f"  pause:     {format_pause(until)}; `crowdd resume` ends it\n")
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
            if m.get("state") == "expelled" and m.get("note"):
                out.write(f"        expelled: {printable(str(m['note']))}\n")
    tr = st.get("training")
    if tr:
        out.write(
            f"  training:  epoch {tr.get('epoch')}/{tr.get('epochs')} step {tr.get('step')} "
            f"loss {_num(tr.get('loss'))} accuracy {_num(tr.get('accuracy'))} "
            f"test {_num(tr.get('test_accuracy'))} {_num(tr.get('samples_per_sec'), '.0f')} samples/s\n"
        )
    res = st.get("result")
    if res:
        out.write(f"  result:    {score(res)}; model: {res.get('model_path') or '-'}\n")
        if res.get("model_path"):
            for line in usage_hint(str(res["model_path"])):
                out.write(f"             {line}\n")
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
    code, reply = _call(args, lambda c: c.stop())
    if code == EXIT_OK:
        if reply.get("keeps_model"):
            print("stopping this host's session: the whole group's training ends now; the latest checkpoint "
                  "is kept and the model trained so far is written (its path: `crowdd status`)")
        else:
            print("the current session is stopping (donation stays as it was)")
    return code


def pause(args: argparse.Namespace) -> int:
    """``crowdd pause [DURATION]``: a bad duration is refused here (exit 2), before the daemon
    is asked anything, so a running pause stays as it was."""
    try:
        hours = parse_duration(args.duration)
    except InputError as exc:
        print(f"crowdd pause: {exc.message}", file=sys.stderr)
        return EXIT_USAGE
    code, reply = _call(args, lambda c: c.pause(hours))
    if code == EXIT_OK:
        until = reply.get("paused_until")
        shown = format_pause(until) if isinstance(until, (int, float)) else "paused"
        print(f"{shown}: this machine does no work for the crowd until then (a running session is suspended "
              "or left, per [idle] on_busy; one you host goes on); `crowdd resume` ends the pause early")
    return code


def resume(args: argparse.Namespace) -> int:
    code, reply = _call(args, lambda c: c.resume())
    if code == EXIT_OK:
        if reply.get("was_paused"):
            print("pause ended: donation goes on as the idle policy allows")
        else:
            print("not paused: nothing to resume")
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
    if job.get("workers") == 0:
        raise HyperparamError("--workers", "must be at least 1: the host trains with a crowd of workers")
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
    if getattr(args, "label", None) is not None:
        request["label"] = args.label
    if getattr(args, "task", None) is not None:
        request["task"] = args.task
    if getattr(args, "color", None) is not None:
        request["color"] = args.color
    if getattr(args, "image_size", None) is not None:
        try:
            h, w = (int(v) for v in str(args.image_size).lower().split("x"))
        except ValueError:
            print(f"crowdd host: --image-size: expected HxW like 28x28, got {args.image_size!r}", file=sys.stderr)
            return EXIT_USAGE
        request["image_size"] = [h, w]
    model_file = getattr(args, "model_file", None)
    if model_file is not None:
        model_path = Path(model_file).expanduser().absolute()
        if not model_path.is_file():
            print(f"crowdd host: --model-file: {model_path}: no such file", file=sys.stderr)
            return EXIT_USAGE
        request["model_file"] = str(model_path)
    files: OpenFiles | None = None
    if not client_endpoint(args).is_tcp and can_hand_over(dataset):
        # The dataset is opened here, with this user's permissions, and handed to the daemon
        # (crowdd.data.handoff): the system service sees no /home and reads nothing on a user's
        # behalf. Over TCP (Windows) and for image folders the daemon reads the path itself.
        try:
            files = open_dataset(dataset)
        except InputError as exc:
            print(f"crowdd host: {exc.message}", file=sys.stderr)
            return EXIT_USAGE
    try:
        if getattr(args, "follow", False):
            return _host_and_follow(args, request, files)
        code, reply = _call(args, lambda c: send_host(c, request, files))
    finally:
        if files is not None:
            files.close()
    if code == EXIT_OK:
        print(accepted_line(reply))
        print("follow it with `crowdd status` (or `crowdd host … --follow`)")
    return code


def accepted_line(reply: dict[str, Any]) -> str:
    """The user's confirmation that the daemon took the dataset, and what it made of it."""
    ds = reply.get("dataset") or {}
    what = ""
    if isinstance(ds.get("train"), int):
        shape = "x".join(str(d) for d in ds.get("shape") or [])
        what = (f": {ds['train']:,} training + {ds.get('test', 0):,} test records of {shape or '?'} features, "
                f"{ds.get('classes')} classes")
    return f"hosting {ds.get('name', '?')} ({str(ds.get('digest') or '-')[:12]}){what}; looking for workers"


async def send_host(c: ControlClient, request: dict[str, Any], files: OpenFiles | None) -> dict[str, Any]:
    """The host request, with the dataset's open files handed over when there are any."""
    if files is None:
        return await c.request(request, timeout=HOST_TIMEOUT)
    extra = {k: v for k, v in request.items() if k not in ("type", "dataset", "job", "test_fraction")}
    return await c.host_files(files, request["job"], request.get("test_fraction"), extra=extra)


def _host_and_follow(args: argparse.Namespace, request: dict[str, Any], files: OpenFiles | None) -> int:
    """Host, then stream the session's progress until it ends: 0 with a result, 1 without."""

    async def go(c: ControlClient) -> int:
        events: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()
        watcher = ControlClient.for_endpoint(client_endpoint(args))

        async def pump() -> None:
            try:
                async for ev in watcher.subscribe():
                    await events.put(ev)
            finally:
                await events.put(None)

        task = asyncio.create_task(pump())
        try:
            reply = await send_host(c, request, files)  # refused: raises, no session
            print(accepted_line(reply), flush=True)
            return await follow_session(events, sys.stdout, c)
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    code, result = _call(args, go)
    return code if code != EXIT_OK else int(result)


async def follow_session(events: asyncio.Queue[dict[str, Any] | None], out: TextIO, client: ControlClient) -> int:
    """Print one line per state change, progress (at most every few seconds), evaluation and
    warning, until the session is over; then its result or error from the status. Nothing a
    peer chose (a log line naming a member, a host's error) reaches the terminal raw."""
    out = PlainWriter(out)  # type: ignore[assignment]
    last_progress = 0.0
    began = False  # a worker's cycle that hosting ends also goes back to standby: skip it
    loop = asyncio.get_running_loop()
    while True:
        ev = await events.get()
        if ev is None:
            out.write("crowdd: the daemon went away\n")
            return EXIT_REFUSED
        kind = ev.get("event")
        if kind == "state":
            out.write(f"state: {ev.get('state')}\n")
            began = began or ev.get("state") == "registering"
            if began and ev.get("state") in ("standby", "off"):
                break
        elif kind == "progress" and loop.time() - last_progress >= FOLLOW_PROGRESS_EVERY:
            last_progress = loop.time()
            out.write(f"epoch {ev.get('epoch')}/{ev.get('epochs')} step {ev.get('step')}/{ev.get('total_steps') or '?'} "
                      f"loss {_num(ev.get('loss'))} accuracy {_num(ev.get('accuracy'))}\n")
        elif kind == "eval":
            out.write(f"epoch {ev.get('epoch')}: {score(ev)}\n")
        elif kind == "log" and ev.get("level") in ("warning", "error"):
            out.write(f"{ev.get('level')}: {ev.get('message')}\n")
        out.flush()
    st = await client.status()
    res, err = st.get("result"), st.get("error")
    if err:
        out.write(f"crowdd host: {err}\n")
        out.flush()
        return EXIT_REFUSED
    if res:
        out.write(f"done: {score(res)}; model: {res.get('model_path') or '-'}\n")
        if res.get("model_path"):
            out.write("".join(f"  {line}\n" for line in usage_hint(str(res["model_path"]))))
        out.flush()
        return EXIT_OK
    out.write("crowdd host: the session ended without a result\n")
    return EXIT_REFUSED


__all__ = ["accepted_line", "client_endpoint", "daemon", "follow_session", "donate", "format_status", "host", "job_from_args", "pause", "reload", "resume", "status",
           "stop"]
