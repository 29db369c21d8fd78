"""One TensorFlow server in its own process: ``python -m crowdd.job.server``.

A TF server cannot be stopped cleanly and runs any graph it is sent, so it lives only in a
child of the job: it forbids itself every file write (a Landlock layer over the job's sandbox:
:func:`crowdd.platform.sandbox.forbid_writes`), lowers its own priority, caps its threads, and
exits as soon as its parent (the job) dies (PR_SET_PDEATHSIG on Linux, plus a polling thread everywhere:
:func:`crowdd.platform.process.exit_with_parent`).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import socket
import subprocess
import sys
import tempfile
from collections.abc import Sequence

from crowdd.config import parse_hostport
from crowdd.platform.process import SAFE_PATH, exit_with_parent, lower_priority, undumpable
from crowdd.platform.sandbox import forbid_writes

log = logging.getLogger(__name__)


def reachable(address: str, timeout: float = 2.0) -> bool:
    """Whether a TCP connection to ``host:port`` opens (a killed TF server refuses at once)."""
    host, port = parse_hostport(address, 0)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def cap_threads(threads: int) -> None:
    """Cap TF's pools; inter-op keeps >= 2 threads (a cross-device Recv must not starve)."""
    os.environ["OMP_NUM_THREADS"] = str(threads)
    os.environ["TF_NUM_INTRAOP_THREADS"] = str(threads)
    os.environ["TF_NUM_INTEROP_THREADS"] = str(max(2, threads))


def run_server(cluster: dict, job_name: str, task: int, threads: int) -> None:
    """Serve ``job_name`` task ``task``; ``cluster`` names only this server's own task (a
    member's server has nothing of anyone else's to reach)."""
    import tensorflow as tf

    cluster = {job: ({int(t): a for t, a in tasks.items()} if isinstance(tasks, dict) else tasks)
               for job, tasks in cluster.items()}
    config = tf.compat.v1.ConfigProto(
        intra_op_parallelism_threads=threads, inter_op_parallelism_threads=max(2, threads)
    )
    server = tf.distribute.Server(
        tf.train.ClusterSpec(cluster), job_name=job_name, task_index=task, protocol="grpc", config=config, start=True
    )
    log.info("%s %d serving at %s", job_name, task, server.target)
    print("ready", flush=True)
    server.join()


def spawn(
    cluster: dict, job_name: str, task: int, *, threads: int, nice: int, cwd: str | None = None
) -> subprocess.Popen:
    """Start a server child of this process; its stdout says ``ready`` once it listens."""
    cmd = [
        sys.executable, SAFE_PATH, "-m", "crowdd.job.server",
        "--cluster", json.dumps(cluster), "--job", job_name, "--task", str(task),
        "--threads", str(threads), "--nice", str(nice), "--parent", str(os.getpid()),
    ]
    env = dict(os.environ)
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, cwd=cwd, env=env, text=True)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m crowdd.job.server")
    p.add_argument("--cluster", required=True)
    p.add_argument("--job", required=True, choices=("worker",))
    p.add_argument("--task", type=int, required=True)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--nice", type=int, default=19)
    p.add_argument("--parent", type=int, default=0)
    args = p.parse_args(argv)
    # its graphs come from the group: first (one thread yet), they may write no file at all;
    # the temporary directory is found before (TF's imports ask for one, and tempfile finds
    # it by writing a probe file there)
    tempfile.gettempdir()
    unrestricted = forbid_writes()
    undumpable()  # its graphs run here: its /proc files stay closed to the job's other processes
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format=f"[{args.job}{args.task}] %(message)s")
    if unrestricted is not None:
        log.warning("this server's graphs may write files (no Landlock: %s)", unrestricted)
    if args.parent:
        exit_with_parent(args.parent)
    lower_priority(args.nice)
    cap_threads(args.threads)
    run_server(json.loads(args.cluster), args.job, args.task, args.threads)
    return 0


if __name__ == "__main__":
    sys.exit(main())
