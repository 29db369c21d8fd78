"""``python -m crowdd.job host|worker --spec FILE`` — see docs/job-spec.md."""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from crowdd.job import EXIT_BAD_SPEC, EXIT_FAILED
from crowdd.job.events import EventWriter
from crowdd.job.spec import SpecError, load_layout, load_spec
from crowdd.platform.process import undumpable


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        EventWriter(sys.stdout).error(f"usage: {message}")
        self.print_usage(sys.stderr)
        sys.exit(EXIT_BAD_SPEC)


def private_tmp(workdir: Path | None) -> Path:
    """Point this job's (and its TF servers') temporary files into ``workdir/tmp`` (or a
    fresh directory of its own when the spec names no workdir); the caller removes it.

    TensorFlow's autograph writes a ``__autograph_generated_file*.py`` per traced function
    and never removes them; kept below the job's own directory they go with it instead of
    piling up in the volunteer's /tmp. Must run before TensorFlow is imported.
    """
    if workdir is None:
        scratch = Path(tempfile.mkdtemp(prefix="crowdd-job-"))
    else:
        scratch = workdir / "tmp"
        scratch.mkdir(exist_ok=True)
    os.environ["TMPDIR"] = str(scratch)
    tempfile.tempdir = None  # recomputed from TMPDIR on next use
    return scratch


def main(argv: Sequence[str] | None = None) -> int:
    p = _Parser(prog="python -m crowdd.job", description="Run one member's part of a crowdd training session.")
    p.add_argument("role", choices=("host", "worker"))
    p.add_argument("--spec", required=True, help="the job spec (JSON, see docs/job-spec.md)")
    p.add_argument("-v", "--verbose", action="store_true")
    args = p.parse_args(argv)
    undumpable()  # before anything a graph could reach: its TF servers are its children
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        stream=sys.stderr,
        format=f"%(asctime)s {args.role} %(name)s: %(message)s",
    )
    events = EventWriter(sys.stdout)
    try:
        spec = load_spec(args.spec, role=args.role)
        if spec.workdir is not None:
            os.chdir(spec.workdir)
        layout = load_layout(Path(spec.manifest), Path(spec.data))
    except SpecError as exc:
        events.error(str(exc), field=exc.field)
        return EXIT_BAD_SPEC
    except OSError as exc:
        events.error(f"cannot enter workdir: {exc}", field="workdir")
        return EXIT_BAD_SPEC
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    scratch = private_tmp(Path(spec.workdir) if spec.workdir is not None else None)
    try:
        if spec.role == "worker":
            from crowdd.job.worker import run_worker

            return run_worker(spec, events)
        from crowdd.job.host import run_host

        code = run_host(spec, layout, events)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    # Skip TF's teardown: it would try (and loudly fail) to reach servers already killed.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        sys.exit(EXIT_FAILED)
