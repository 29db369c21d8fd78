"""``python -m crowdd.job.images DIR OUT.npz`` — decode a folder of images with TensorFlow.

The daemon never imports TensorFlow, so :func:`crowdd.data.datasets.load_image_dir` runs this in
a child process. ``DIR`` holds one subdirectory per class (PNG or JPEG files), or ``train/``
and ``test/`` each holding those. Every image becomes uint8 ``HxWxC`` at ``--size`` (default:
the first image's size; then every image must have it) and ``--color`` (default: the first
image's: grayscale, else rgb). Writes ``x_train``, ``y_train``, ``x_test``, ``y_test`` (empty
without a test folder) and ``class_names``; on a bad file prints one line to stderr naming
it and exits 2.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np

EXTENSIONS = (".png", ".jpg", ".jpeg")
EXIT_BAD = 2


class ImageError(Exception):
    pass


def class_dirs(root: Path) -> list[Path]:
    return sorted((p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")), key=lambda p: p.name)


def images_of(directory: Path) -> list[Path]:
    return sorted(p for p in directory.rglob("*") if p.is_file() and p.suffix.lower() in EXTENSIONS)


def decode(path: Path, channels: int):
    import tensorflow as tf

    try:
        raw = tf.io.read_file(str(path))
        return tf.io.decode_image(raw, channels=channels, expand_animations=False).numpy()
    except (tf.errors.InvalidArgumentError, tf.errors.OpError) as exc:
        message = str(getattr(exc, "message", exc)).splitlines()[0]
        raise ImageError(f"{path}: not a readable PNG or JPEG image ({message})") from None


def load_split(root: Path, names: list[str], size: tuple[int, int] | None, channels: int):
    import tensorflow as tf

    xs, ys = [], []
    for label, name in enumerate(names):
        directory = root / name
        files = images_of(directory) if directory.is_dir() else []
        for f in files:
            img = decode(f, channels)
            if size is not None and tuple(img.shape[:2]) != size:
                img = tf.cast(tf.round(tf.image.resize(img, size)), tf.uint8).numpy()
            xs.append(img)
            ys.append(label)
    return xs, ys


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m crowdd.job.images")
    p.add_argument("directory", type=Path)
    p.add_argument("out", type=Path)
    p.add_argument("--size", help="HxW")
    p.add_argument("--color", choices=("rgb", "grayscale"))
    args = p.parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    root: Path = args.directory
    split = (root / "train").is_dir() and (root / "test").is_dir()
    train_root = root / "train" if split else root
    names = [d.name for d in class_dirs(train_root)]
    try:
        if len(names) < 2:
            raise ImageError(f"{train_root}: needs one subdirectory per class (at least 2), found {len(names)}")
        for name in names:
            if not images_of(train_root / name):
                raise ImageError(f"{train_root / name}: no PNG or JPEG images in this class folder")
        if split:
            extra = sorted({d.name for d in class_dirs(root / "test")} - set(names))
            if extra:
                raise ImageError(f"{root / 'test'}: class folder(s) {', '.join(extra)} are not in {train_root}")
        size: tuple[int, int] | None = None
        if args.size:
            h, w = (int(v) for v in args.size.lower().split("x"))
            size = (h, w)
        first = images_of(train_root / names[0])[0]
        probe = decode(first, 0)
        channels = {"rgb": 3, "grayscale": 1}.get(args.color or "", 1 if probe.shape[-1] == 1 else 3)
        if size is None:
            size_of_first = tuple(probe.shape[:2])
            for name in names:
                for f in images_of(train_root / name) + (images_of(root / "test" / name) if split else []):
                    shape = tuple(decode(f, channels).shape[:2])
                    if shape != size_of_first:
                        raise ImageError(
                            f"{f}: {shape[0]}x{shape[1]} pixels but {first} is {size_of_first[0]}x{size_of_first[1]}; "
                            "give --image-size HxW to resize them all"
                        )
        x_train, y_train = load_split(train_root, names, size, channels)
        x_test, y_test = load_split(root / "test", names, size, channels) if split else ([], [])
    except ImageError as exc:
        print(str(exc), file=sys.stderr)
        return EXIT_BAD
    shape = x_train[0].shape
    empty = np.zeros((0, *shape), np.uint8)
    np.savez(
        args.out,
        x_train=np.stack(x_train).astype(np.uint8), y_train=np.asarray(y_train, np.int32),
        x_test=np.stack(x_test).astype(np.uint8) if x_test else empty, y_test=np.asarray(y_test, np.int32),
        class_names=np.asarray(names, dtype=str),
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
