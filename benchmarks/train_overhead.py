"""Training throughput through the group's tunnels against direct TF on loopback.

Two runs of the same cluster in one benchmark: a host job (worker 0 as a child process, the
coordinator, which holds the model and validates every change, in the job) and one worker
job, training Fashion-MNIST.
*Direct*: every TF server on this machine's loopback, talking directly (the reference).
*Tunneled*: each job in its own network namespace behind its relay, the coordinator's traffic
to the worker carried over pinned TLS 1.3 tunnels
(:class:`crowdd.testing.tunnel_bridge.TunnelBridge`: the daemon's tunnel code, without the
daemons). Rates come from the host's progress events in steady state. A plain local TF loop
on the same pipeline is printed for context. The cluster settings (K = ``sync_every``,
``steps_per_function``, ``merge``) default to ``crowdd.config.JobConfig()``'s, so the shipped
defaults are what is measured. Prints the ratio (tunneled / direct) last; target >= 0.85.

With ``--against REV`` (a git revision of this repository, e.g. the last commit with a
parameter server, ``cd1218d``) the benchmark also runs that revision's own ``train_overhead.py``
(its tree exported with ``git archive`` to a temporary directory, run with this interpreter)
and prints this tree's tunneled rate over that one's last; wave 3's target: >= 0.9 (the
one-way design, every change validated, against the parameter server it replaced).

With ``--sandbox`` the two runs are both tunneled and confined, the reference unsandboxed and
the other with every job in its Landlock sandbox (:mod:`crowdd.platform.sandbox`), as the
daemon runs it; prints the kernel's Landlock ABI and the ratio (sandboxed / unsandboxed) last;
target >= 0.95.

    .venv/bin/python benchmarks/train_overhead.py [--sandbox] [--against REV] [--epochs N] [--sync-every K] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from crowdd.config import JobConfig

FASHION = Path("/usr/share/datasets/fashion-mnist")


def local_rate(data: Path, manifest: Path, workdir: Path, job: dict[str, Any], spf: int, threads: int, seconds: float) -> float:
    """Samples/s of a plain in-process TF training loop on the same pipeline."""
    import keras
    import tensorflow as tf

    from crowdd.hyperparams import validate_job
    from crowdd.job.data import train_mean, worker_dataset
    from crowdd.job.models import build_model, loss_function
    from crowdd.job.spec import INDEX_FILE, load_layout

    tf.config.threading.set_intra_op_parallelism_threads(threads)
    tf.config.threading.set_inter_op_parallelism_threads(max(2, threads))
    j = validate_job(job)
    layout = load_layout(manifest, data)
    os.chdir(workdir)
    Path(INDEX_FILE).write_text("0\n")
    iterator = iter(worker_dataset(str(data), layout, "full", 1, j.batch_size))
    model = build_model(j, layout, train_mean(data, layout))
    opt = keras.optimizers.SGD(j.learning_rate)
    loss_fn = loss_function(j)

    @tf.function
    def steps(it: Any, n: int) -> Any:
        total = tf.constant(0.0)
        for _ in tf.range(n):
            x, y, _ = next(it)
            with tf.GradientTape() as tape:
                loss = loss_fn(y, model(x, training=True))
            grads = tape.gradient(loss, model.trainable_variables)
            opt.apply_gradients(zip(grads, model.trainable_variables))
            total += loss
        return total

    steps(iterator, spf).numpy()  # trace + warm up
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        steps(iterator, spf).numpy()
        n += spf
    return n * j.batch_size / (time.perf_counter() - t0)


def cluster_rate(events: list[dict[str, Any]], batch: int, skip: int = 2) -> float:
    prog = [e for e in events if e["event"] == "progress"][skip:]
    if len(prog) < 2:
        raise RuntimeError(f"too few progress events to measure ({len(prog)}); raise --epochs")
    return (prog[-1]["step"] - prog[0]["step"]) * batch / (prog[-1]["time"] - prog[0]["time"])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", type=Path, default=FASHION, help="IDX directory (Fashion-MNIST)")
    p.add_argument("--batch", type=int, default=100)
    p.add_argument("--epochs", type=int, default=6, help="each cluster run's length (600 steps per epoch at batch 100)")
    cfg = JobConfig()
    p.add_argument("--sync-every", type=int, default=cfg.sync_every, help="K: local steps per round")
    p.add_argument("--steps-per-function", type=int, default=cfg.steps_per_function)
    p.add_argument("--merge", choices=("average", "sum"), default=cfg.merge)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seconds", type=float, default=10.0, help="local loop measuring time")
    p.add_argument("--json", type=Path)
    p.add_argument("--sandbox", action="store_true", help="measure the Landlock sandbox's cost instead (see above)")
    p.add_argument("--against", metavar="REV", help="also run this git revision's benchmark; print the tunneled ratio")
    args = p.parse_args()
    if args.sandbox:
        return sandbox_main(args)

    from crowdd.data.datasets import convert
    from crowdd.testing.local_cluster import run_cluster
    from crowdd.platform.userns import probe

    job = {"model": "mlp", "hidden": [100], "learning_rate": 0.1, "batch_size": args.batch, "epochs": args.epochs}
    settings = {
        "steps_per_function": args.steps_per_function,
        "sync_every": args.sync_every,
        "threads": args.threads,
        "nice": 0,
        "checkpoint_secs": 3600.0,
        "merge": args.merge,
    }
    confinement = probe()
    with tempfile.TemporaryDirectory(prefix="crowdd-overhead-") as tmp:
        root = Path(tmp)
        prep = convert(args.dataset, root / "cache")
        direct = run_cluster(root / "direct", prep.data_path, prep.manifest_path, 1, job, settings, timeout=900)
        tunneled = tunneled_run(root / "tunneled", prep, job, settings, isolated=confinement.available)
        for name, run in (("direct", direct), ("tunneled", tunneled)):
            if run.done is None:
                print(f"{name} cluster run failed: {run.error}", file=sys.stderr)
                return 1
        direct_rate = cluster_rate(direct.events, args.batch)
        tunnel_rate = cluster_rate(tunneled.events, args.batch)
        (root / "local").mkdir()
        local = local_rate(prep.data_path, prep.manifest_path, root / "local", job, args.steps_per_function, args.threads, args.seconds)
    ratio = tunnel_rate / direct_rate
    result = {
        "model": "mlp 784-100-10",
        "batch": args.batch,
        "sync_every": args.sync_every,
        "steps_per_function": args.steps_per_function,
        "merge": args.merge,
        "threads": args.threads,
        "workers": 2,
        "confined": confinement.available,
        "local_samples_per_sec": round(local, 1),
        "direct_samples_per_sec": round(direct_rate, 1),
        "tunneled_samples_per_sec": round(tunnel_rate, 1),
        "direct_vs_local": round(direct_rate / local, 3),
        "tunneled_test_accuracy": tunneled.done["test_accuracy"] if tunneled.done else None,
        "ratio": round(ratio, 3),
        "target": 0.85,
    }
    if args.against:
        old = reference_run(args.against, args.epochs)
        result["against"] = {"revision": args.against, **old,
                             "tunneled_ratio": round(tunnel_rate / old["tunneled_samples_per_sec"], 3), "target": 0.9}
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    print(f"local loop (1 process):        {local:10.0f} samples/s")
    print(f"2-worker cluster, direct TF:   {direct_rate:10.0f} samples/s (loopback, no tunnels)")
    where = "confined, relay + TLS tunnels" if confinement.available else "relay + TLS tunnels, NOT confined"
    print(f"2-worker cluster, tunneled:    {tunnel_rate:10.0f} samples/s ({where})")
    print(f"ratio tunneled/direct: {ratio:.3f}")
    if args.against:
        a = result["against"]
        print(f"{args.against}: tunneled {a['tunneled_samples_per_sec']:10.0f} samples/s, direct "
              f"{a['direct_samples_per_sec']:.0f} (its own run, just before)")
        print(f"tunneled, this tree / {args.against}: {a['tunneled_ratio']:.3f} (target >= 0.9)")
    return 0


def reference_run(revision: str, epochs: int) -> dict[str, Any]:
    """Run ``revision``'s own train_overhead.py (its tree exported, this interpreter) and
    return its JSON."""
    import subprocess

    repo = Path(__file__).resolve().parents[1]
    with tempfile.TemporaryDirectory(prefix="crowdd-against-") as tmp:
        tree = Path(tmp) / "tree"
        tree.mkdir()
        archive = subprocess.run(["git", "-C", str(repo), "archive", revision], check=True, capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", str(tree)], input=archive, check=True)
        out = Path(tmp) / "old.json"
        env = {**os.environ, "PYTHONPATH": str(tree)}
        subprocess.run([sys.executable, str(tree / "benchmarks" / "train_overhead.py"), "--epochs", str(epochs),
                        "--json", str(out)], check=True, cwd=tree, env=env)
        data: dict[str, Any] = json.loads(out.read_text())
        return data


def tunneled_run(root: Path, prep: Any, job: dict[str, Any], settings: dict[str, Any], *, isolated: bool,
                 sandbox: bool = False) -> Any:
    from crowdd.testing.local_cluster import run_cluster
    from crowdd.node.host import tf_base
    from crowdd.testing.tunnel_bridge import TunnelBridge

    bridge = TunnelBridge(1, isolated=isolated)
    try:
        base = tf_base(1)
        return run_cluster(root, prep.data_path, prep.manifest_path, 1, job, settings, timeout=900,
                           relays=bridge.relays(base), base=base, sandbox=sandbox)
    finally:
        bridge.close()


def sandbox_main(args: argparse.Namespace) -> int:
    from crowdd.data.datasets import convert
    from crowdd.platform.sandbox import probe as landlock
    from crowdd.platform.userns import probe

    support = landlock()
    if not support.available:
        print(f"cannot measure the sandbox: {support.reason}", file=sys.stderr)
        return 1
    job = {"model": "mlp", "hidden": [100], "learning_rate": 0.1, "batch_size": args.batch, "epochs": args.epochs}
    settings = {"steps_per_function": args.steps_per_function, "sync_every": args.sync_every, "threads": args.threads,
                "nice": 0, "checkpoint_secs": 3600.0, "merge": args.merge}
    isolated = probe().available
    with tempfile.TemporaryDirectory(prefix="crowdd-sandbox-") as tmp:
        root = Path(tmp)
        prep = convert(args.dataset, root / "cache")
        plain = tunneled_run(root / "plain", prep, job, settings, isolated=isolated)
        boxed = tunneled_run(root / "sandboxed", prep, job, settings, isolated=isolated, sandbox=True)
        for name, run in (("unsandboxed", plain), ("sandboxed", boxed)):
            if run.done is None:
                print(f"{name} cluster run failed: {run.error}", file=sys.stderr)
                return 1
        plain_rate = cluster_rate(plain.events, args.batch)
        boxed_rate = cluster_rate(boxed.events, args.batch)
    ratio = boxed_rate / plain_rate
    result = {
        "model": "mlp 784-100-10", "batch": args.batch, "sync_every": args.sync_every,
        "steps_per_function": args.steps_per_function, "merge": args.merge, "threads": args.threads, "workers": 2,
        "confined": isolated, "landlock_abi": support.abi,
        "unsandboxed_samples_per_sec": round(plain_rate, 1), "sandboxed_samples_per_sec": round(boxed_rate, 1),
        "sandboxed_test_accuracy": boxed.done["test_accuracy"] if boxed.done else None,
        "ratio": round(ratio, 3), "target": 0.95,
    }
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    print(f"Landlock ABI {support.abi}; jobs {'confined' if isolated else 'NOT confined'}, tunneled")
    print(f"2-worker cluster, unsandboxed: {plain_rate:10.0f} samples/s")
    print(f"2-worker cluster, sandboxed:   {boxed_rate:10.0f} samples/s (test accuracy {result['sandboxed_test_accuracy']})")
    print(f"ratio sandboxed/unsandboxed: {ratio:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
