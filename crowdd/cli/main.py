"""``crowdd`` command line: argparse front end; each subcommand lives in its own module.

Modules are imported only when their subcommand runs, so ``crowdd status`` stays light.
Nothing here (nor anything it imports) loads TensorFlow.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from crowdd import __version__
from crowdd.config import ConfigError

logger = logging.getLogger(__name__)


def _lazy(module: str, func: str) -> Any:
    def call(args: argparse.Namespace) -> int:
        return int(getattr(importlib.import_module(module), func)(args))

    return call


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", type=Path, help="TOML settings file (default: the platform config dir)")
    p.add_argument("--root", type=Path, help="keep every file of this node below one directory")
    p.add_argument("--socket", type=Path, help="control socket path (default: per user or /run/crowdd)")
    p.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-vv for debug)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="crowdd",
        description="Donate this machine's idle time to train neural networks together.",
    )
    parser.add_argument("--version", action="version", version=f"crowdd {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    _services(sub)
    _client_commands(sub)
    _host(sub)
    _model(sub)
    _demo(sub)
    return parser


def _services(sub: Any) -> None:
    """The long-running ones: the matchmaker and the daemon."""
    p = sub.add_parser("matchmaker", help="run the central matchmaker that groups hosts and workers")
    _add_common(p)
    p.add_argument("--listen", help="HOST:PORT to listen on (default from config: 0.0.0.0:7700)")
    p.add_argument("--cert", type=Path, help="the operator's TLS certificate (PEM); default: a self-signed one "
                   "made once in --state-dir (its fingerprint is printed at start)")
    p.add_argument("--key", type=Path, help="the key of --cert (PEM)")
    p.add_argument("--state-dir", type=Path, help="where the self-signed identity is kept (default: the "
                   "identity directory of the state directory)")
    p.set_defaults(func=_lazy("crowdd.matchmaker.command", "main"))

    p = sub.add_parser("daemon", help="run the crowdd daemon (normally as a service)")
    _add_common(p)
    p.add_argument("--system", action="store_true", help="use the system service layout (/var/lib/crowdd, /run/crowdd)")
    p.add_argument("--matchmaker", help="HOST:PORT of the matchmaker (overrides the config)")
    p.set_defaults(func=_lazy("crowdd.cli.commands", "daemon"))


def _client_commands(sub: Any) -> None:
    """The daemon's clients: one request each (host, model and demo have their own)."""
    p = sub.add_parser("status", help="show the daemon's state")
    _add_common(p)
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=_lazy("crowdd.cli.commands", "status"))

    p = sub.add_parser("donate", help="switch donation on or off")
    _add_common(p)
    p.add_argument("state", choices=("on", "off"))
    p.set_defaults(func=_lazy("crowdd.cli.commands", "donate"))

    p = sub.add_parser("stop", help="stop the current session (ends the whole group's training when hosting; "
                       "a host keeps its checkpoint and the model trained so far)")
    _add_common(p)
    p.set_defaults(func=_lazy("crowdd.cli.commands", "stop"))

    p = sub.add_parser("pause", help="take a break from donating: suspend (or leave) the current session now and "
                       "do no work for the crowd for a while (kept across daemon restarts)")
    _add_common(p)
    p.add_argument("duration", nargs="?", default="1h",
                   help="how long: 2h, 30m, 1.5h, 90m, 1d, 1h30m; a bare number is hours (default 1h)")
    p.set_defaults(func=_lazy("crowdd.cli.commands", "pause"))

    p = sub.add_parser("resume", help="end a pause now: donate again as the idle policy allows")
    _add_common(p)
    p.set_defaults(func=_lazy("crowdd.cli.commands", "resume"))

    p = sub.add_parser("reload", help="make the daemon re-read its configuration")
    _add_common(p)
    p.set_defaults(func=_lazy("crowdd.cli.commands", "reload"))

    p = sub.add_parser("logs", help="show the daemon's log (its rotating file in the log directory)")
    _add_common(p)
    p.add_argument("--system", action="store_true", help="the system service's log (/var/log/crowdd)")
    p.add_argument("-n", "--lines", type=int, default=50, help="how many of the last lines to show (default 50)")
    p.add_argument("-f", "--follow", action="store_true", help="keep showing new lines as they come (Ctrl-C ends)")
    p.set_defaults(func=_lazy("crowdd.logs", "main"))

    p = sub.add_parser("tui", help="open the terminal UI")
    _add_common(p)
    p.set_defaults(func=_lazy("crowdd.tui", "main"))


def _host(sub: Any) -> None:
    """`crowdd host`: the dataset and the job's hyperparameters."""
    p = sub.add_parser("host", help="host a dataset: find workers and train a model on it")
    _add_common(p)
    p.add_argument("dataset", type=Path, help=".npz (Keras layout), a directory of IDX files, a CSV (label first, "
                   "or --label), or a folder of images with one subfolder per class")
    p.add_argument("--workers", type=int, help="workers wanted (default 2)")
    p.add_argument("--min-workers", type=int, help="fewest workers to accept after --wait seconds")
    p.add_argument("--wait", type=float, help="seconds to wait for the full group")
    p.add_argument("--lr", "--learning-rate", dest="learning_rate", type=float, help="learning rate")
    p.add_argument("--batch", "--batch-size", dest="batch_size", type=int, help="batch size")
    p.add_argument("--epochs", type=int, help="passes over each worker's shard")
    p.add_argument("--hidden", help="hidden layer sizes, e.g. 100 or 128,64")
    p.add_argument("--model", choices=("mlp", "cnn"), help="a preset network (default mlp)")
    p.add_argument("--model-file", type=Path,
                   help="your own Keras 3 model (.keras; weights, when saved, are the starting point); "
                        "it takes the raw features and ends in a softmax with one unit per class")
    p.add_argument("--optimizer", choices=("sgd", "adam"))
    p.add_argument("--sharding", choices=("overlap", "disjoint", "full"))
    p.add_argument("--test-fraction", type=float, help="CSV and image folders: carve this fraction off as the test "
                   "split (default 0.2; an image folder with train/ and test/ uses those)")
    p.add_argument("--image-size", metavar="HxW", help="image folders: resize every image to this (default: "
                   "the first image's size, which all must have)")
    p.add_argument("--color", choices=("rgb", "grayscale"), help="image folders: colour mode (default: the first image's)")
    p.add_argument("--task", choices=("classification", "regression"),
                   help="regression: the label column is a number to predict (MSE/MAE reported); default classification")
    p.add_argument("--label", metavar="COLUMN", help="CSV with a header: the label column's name (default: the first)")
    p.add_argument("--follow", action="store_true",
                   help="stay and print the session's progress until it ends (exit 1 if it fails)")
    p.set_defaults(func=_lazy("crowdd.cli.commands", "host"))



def _model(sub: Any) -> None:
    """`crowdd model [export DEST]`."""
    p = sub.add_parser("model", help="the last trained model: where it is, its card, how to load it")
    _add_common(p)
    msub = p.add_subparsers(dest="model_command", metavar="ACTION")
    e = msub.add_parser("export", help="copy the model and its card into a directory")
    _add_common(e)
    e.add_argument("dest", type=Path, help="directory to copy model.keras and model.card.json into")
    p.set_defaults(func=_lazy("crowdd.cli.export", "model"), dest=None)



def _demo(sub: Any) -> None:
    """`crowdd demo`: a whole crowd on this machine."""
    p = sub.add_parser("demo", help="run a whole crowd on this machine and train a model")
    p.add_argument("-v", "--verbose", action="count", default=0)
    p.add_argument("--workers", type=int, default=3, help="worker daemons (default 3)")
    p.add_argument("--dataset", type=Path, help="dataset to host (default: Fashion-MNIST if installed, else digits)")
    p.add_argument("--epochs", type=int,
                   help="epochs (default 2; 20 for an .npz under 2 MiB, e.g. the digits fallback)")
    p.add_argument("--root", type=Path, help="where the nodes keep their files (default: a temporary directory)")
    p.add_argument("--model-file", type=Path, help="the host's own Keras 3 model (.keras), as for `crowdd host`")
    p.add_argument("--task", choices=("classification", "regression"), help="as for `crowdd host`")
    p.add_argument("--label", metavar="COLUMN", help="CSV: the label column's name, as for `crowdd host`")
    p.add_argument("--lr", "--learning-rate", dest="learning_rate", type=float, help="learning rate (default 0.5)")
    p.set_defaults(func=_lazy("crowdd.cli.demo", "main"))


_SERVICES = ("matchmaker", "daemon")


def setup_logging(verbosity: int, *, service: bool = False) -> None:
    """WARNING for clients, INFO for long-running services; each -v goes one level further."""
    verbosity += 1 if service else 0
    level = logging.WARNING if verbosity <= 0 else logging.INFO if verbosity == 1 else logging.DEBUG
    from crowdd import logs

    logs.configure(level)  # stderr; with journal priorities under systemd


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    setup_logging(args.verbose, service=args.command in _SERVICES)
    try:
        return int(args.func(args))
    except ConfigError as exc:
        print(f"crowdd: bad configuration: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
