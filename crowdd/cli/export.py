"""``crowdd model [export DEST]``: the last trained model of this node — where it is, what
its card says, how to load it — and a copy of it (model + card) somewhere handy."""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
from pathlib import Path
from typing import Any, TextIO

from crowdd.cli.commands import EXIT_OK, EXIT_REFUSED, EXIT_USAGE, _call
from crowdd.job.card import CARD_NAME, usage_hint


def describe(model: Path, out: TextIO) -> None:
    """The model's path, its card's summary and how to load it."""
    out.write(f"model: {model}\n")
    card_path = model.with_name(CARD_NAME)
    try:
        card: dict[str, Any] = json.loads(card_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        card = {}
    if card:
        output = card.get("output") or {}
        ds = card.get("dataset") or {}
        if output.get("kind") == "regression":
            score = f"test MAE {card.get('test_mae')}, MSE {card.get('test_mse')}"
        else:
            score = f"test accuracy {card.get('test_accuracy')}; classes {', '.join(output.get('classes') or [])}"
        out.write(f"  {score}\n")
        out.write(f"  dataset {ds.get('name')} ({str(ds.get('digest') or '-')[:12]}); input {card.get('input', {}).get('shape')} "
                  f"raw features; {card.get('steps')} steps in {card.get('seconds')} s"
                  f"{' (stopped early)' if card.get('stopped_early') else ''}\n")
    for line in usage_hint(str(model)):
        out.write(f"  {line}\n")


def _unchanged(model_path: Path, expected: object) -> bool:
    """Whether ``model_path`` is still the file training ended with (its SHA-256 then, from the
    daemon); says why not on stderr."""
    if not isinstance(expected, str) or not expected:
        return True  # a daemon from before the digest: nothing to check against
    digest = hashlib.sha256()
    try:
        with model_path.open("rb") as f:
            while block := f.read(1 << 20):
                digest.update(block)
    except OSError as exc:
        print(f"crowdd model: cannot read {model_path}: {exc.strerror or exc}", file=sys.stderr)
        return False
    if digest.hexdigest() != expected:
        print(f"crowdd model: {model_path} is not the model training ended with (sha256 {digest.hexdigest()}, "
              f"expected {expected}); it changed since: train again, or restore it from a copy",
              file=sys.stderr)
        return False
    return True


def model(args: argparse.Namespace) -> int:
    code, st = _call(args, lambda c: c.status())
    if code != EXIT_OK:
        return code
    res = st.get("result") or {}
    path = res.get("model_path")
    if not path:
        print("crowdd model: this node has no trained model to show (host a dataset first; a worker keeps none)",
              file=sys.stderr)
        return EXIT_REFUSED
    model_path = Path(path)
    if not _unchanged(model_path, res.get("model_sha256")):
        return EXIT_REFUSED
    dest = getattr(args, "dest", None)
    if dest is None:
        describe(model_path, sys.stdout)
        return EXIT_OK
    dest = Path(dest).expanduser().absolute()
    try:
        dest.mkdir(parents=True, exist_ok=True)
        shutil.copy2(model_path, dest / model_path.name)
        card = model_path.with_name(CARD_NAME)
        if card.exists():
            shutil.copy2(card, dest / CARD_NAME)
    except OSError as exc:
        print(f"crowdd model export: cannot copy {model_path} to {dest}: {exc.strerror or exc}", file=sys.stderr)
        return EXIT_USAGE
    describe(dest / model_path.name, sys.stdout)
    return EXIT_OK


__all__ = ["describe", "model"]
