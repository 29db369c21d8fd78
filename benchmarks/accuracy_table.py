"""The paper's evaluation (section 5.1) on Fashion-MNIST: test accuracy vs. additional workers.

Every cell is a real crowdd cluster on this machine (host job + N worker jobs on loopback),
`full` sharding (every worker does `epochs` passes over the whole training set, the paper's
"same number of data iterations" per worker), 784-100-10 MLP, plain SGD. The default cell
is `crowdd.hyperparams.Job()`'s learning rate, epochs and batch size, and the cluster
settings are `crowdd.config.JobConfig()`'s, so what ships is what is measured (override with
the flags below). Sweeps as in the paper, each varying one value of the default cell:
learning rate 0.1-0.5, epochs 1-20, batch 100-1000. `--quick` runs the default cell and the
lr 0.1 cell only.

Writes a markdown table (`--markdown PATH`, also printed) and JSON (`--json PATH`). The
comparison against the single-machine reference (0 additional workers) is in the same run;
the last line is the default cell's accuracy with 3 additional workers and its ratio to 0.

    .venv/bin/python benchmarks/accuracy_table.py --quick --json acc.json --markdown acc.md
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from crowdd.config import JobConfig
from crowdd.hyperparams import Job

FASHION = Path("/usr/share/datasets/fashion-mnist")
TARGET = 0.88
SWEEPS: dict[str, tuple[str, list[Any]]] = {
    "learning rate": ("learning_rate", [0.1, 0.2, 0.3, 0.4, 0.5]),
    "epochs": ("epochs", [1, 5, 10, 20]),
    "batch size": ("batch_size", [100, 250, 500, 1000]),
}
QUICK: dict[str, tuple[str, list[Any]]] = {"learning rate": ("learning_rate", [0.1, 0.5])}
PAPER_MNIST = {"learning rate": (87.3, 89.7, 92.0), "epochs": (80.1, 84.7, 88.3), "batch size": (75.8, 80.8, 85.0)}


def describe(cell: dict[str, Any]) -> str:
    return f"lr {cell['learning_rate']}, {cell['epochs']} epochs, batch {cell['batch_size']}"


def key(cell: dict[str, Any], workers: int) -> str:
    return f"lr={cell['learning_rate']} epochs={cell['epochs']} batch={cell['batch_size']} extra={workers}"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", type=Path, default=FASHION)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--max-extra", type=int, default=3, help="additional workers: 0..N")
    job_d, cfg = Job(), JobConfig()
    p.add_argument("--learning-rate", type=float, default=job_d.learning_rate, help="default cell's (Job())")
    p.add_argument("--epochs", type=int, default=job_d.epochs, help="default cell's (Job())")
    p.add_argument("--batch-size", type=int, default=job_d.batch_size, help="default cell's (Job())")
    p.add_argument("--sync-every", type=int, default=cfg.sync_every, help="JobConfig() default")
    p.add_argument("--steps-per-function", type=int, default=cfg.steps_per_function, help="JobConfig() default")
    p.add_argument("--merge", choices=("average", "sum"), default=cfg.merge, help="how the PS merges pushes")
    p.add_argument("--json", type=Path)
    p.add_argument("--markdown", type=Path)
    args = p.parse_args()
    DEFAULT = {"learning_rate": args.learning_rate, "epochs": args.epochs, "batch_size": args.batch_size}

    from crowdd.data.datasets import convert
    from crowdd.testing.local_cluster import run_cluster

    sweeps = QUICK if args.quick else SWEEPS
    extras = list(range(args.max_extra + 1))
    settings = {
        "steps_per_function": args.steps_per_function,
        "sync_every": args.sync_every,
        "threads": 1,
        "nice": 0,
        "checkpoint_secs": 3600.0,
        "merge": args.merge,
    }
    results: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="crowdd-acc-") as tmp:
        root = Path(tmp)
        prep = convert(args.dataset, root / "cache")
        run_no = 0
        for field, values in sweeps.values():
            for value in values:
                cell = {**DEFAULT, field: value}
                for extra in extras:
                    k = key(cell, extra)
                    if k in results:
                        continue
                    job = {"model": "mlp", "hidden": [100], "optimizer": "sgd", "sharding": "full", **cell}
                    t0 = time.monotonic()
                    run = run_cluster(root / f"run{run_no}", prep.data_path, prep.manifest_path, extra, job, settings)
                    run_no += 1
                    if run.done is None:
                        print(f"{k}: FAILED {run.error}", file=sys.stderr)
                        results[k] = {"cell": cell, "extra": extra, "test_accuracy": None, "error": str(run.error)}
                        continue
                    acc = float(run.done["test_accuracy"])
                    results[k] = {
                        "cell": cell,
                        "extra": extra,
                        "test_accuracy": acc,
                        "steps": run.done["steps"],
                        "seconds": round(time.monotonic() - t0, 1),
                    }
                    print(f"{k}: test accuracy {acc:.4f} ({results[k]['seconds']} s)", file=sys.stderr, flush=True)

    lines = ["| sweep | value | " + " | ".join(f"+{e} workers" for e in extras) + " |"]
    lines.append("|---|---|" + "---|" * len(extras))
    averages: dict[str, list[float | None]] = {}
    for name, (field, values) in sweeps.items():
        cols: list[list[float]] = [[] for _ in extras]
        for value in values:
            cell = {**DEFAULT, field: value}
            row = []
            for i, extra in enumerate(extras):
                acc = results[key(cell, extra)]["test_accuracy"]
                row.append("failed" if acc is None else f"{acc:.4f}")
                if acc is not None:
                    cols[i].append(acc)
            lines.append(f"| {name} | {value} | " + " | ".join(row) + " |")
        avg = [sum(c) / len(c) if c else None for c in cols]
        averages[name] = avg
        lines.append(f"| **{name} average** | | " + " | ".join("-" if a is None else f"**{a:.4f}**" for a in avg) + " |")
    table = "\n".join(lines)
    print(table)
    default_accs = [results[key(DEFAULT, e)]["test_accuracy"] for e in extras]
    monotone = all(
        a is not None and b is not None and b >= a - 0.005 for a, b in itertools.pairwise(default_accs)
    )
    summary = {
        "quick": args.quick,
        "settings": settings,
        "results": list(results.values()),
        "averages": averages,
        "default": DEFAULT,
        "default_cell": dict(zip([str(e) for e in extras], default_accs)),
        "default_non_decreasing": monotone,
        "paper_mnist_averages_0_1_2_extra": PAPER_MNIST,
        "target": {"default_cell_3_extra": TARGET},
    }
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2))
    if args.markdown:
        args.markdown.write_text(table + "\n")
    last, first = default_accs[-1], default_accs[0]
    if last is None or first is None:
        print("default cell failed")
        return 1
    print(
        f"default cell accuracy, +0..+{extras[-1]} workers: " + " / ".join(f"{a:.4f}" for a in default_accs if a is not None)
        + f"; non-decreasing (0.005 slack): {'yes' if monotone else 'NO'}; +{extras[-1]} >= {TARGET}: {'yes' if last >= TARGET else 'NO'}"
    )
    print(f"default cell ({describe(DEFAULT)}) with +{extras[-1]} workers: {last:.4f} (x{last / first:.3f} vs 0 extra)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
