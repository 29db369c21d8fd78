"""Datasets: load a host's data and turn it into the canonical file plus its manifest.

Sources (see ``docs/dataset-format.md``):

- ``.npz`` in the Keras layout (``x_train``, ``y_train``, ``x_test``, ``y_test``);
- a directory of IDX files, gzipped or not, named as MNIST and Fashion-MNIST ship them
  (``train-images-idx3-ubyte[.gz]``, ``train-labels-idx1-ubyte[.gz]``, ``t10k-…``);
- CSV (``.csv`` or ``.csv.gz``) with the label in the first column and an optional header
  row; the test split comes from a second file or is carved off by a fraction after a
  deterministic shuffle.

:func:`convert` writes one file of fixed-length records (:class:`crowdd.data.manifest.Layout`)
that TensorFlow reads with ``tf.data.FixedLengthRecordDataset`` without this module, and a
manifest beside it, both named by the file's sha256. Everything is vectorised numpy:
Fashion-MNIST (70k × 784) converts in about a second.
"""

from __future__ import annotations

import io
import csv
import gzip
import logging
import math
import os
import subprocess
import sys
import tempfile
import warnings
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np

from crowdd.data.manifest import DEFAULT_CHUNK, Layout, Manifest
from crowdd.route import MAX_CHUNK, MAX_CHUNKS, chunk_for

log = logging.getLogger(__name__)

#: Labels must be integers in 0..MAX_CLASSES-1 (a larger label is almost surely a bug,
#: and the model would need an output unit per class).
MAX_CLASSES = 100_000
#: the largest IDX body read (uncompressed): a gzipped file is never inflated past it
MAX_IDX_BYTES = 4 << 30
#: the largest CSV read (uncompressed): a gzipped one is never inflated past it
MAX_CSV_BYTES = 4 << 30
#: the most an ``.npz`` (a zip) may hold, uncompressed, as its members declare: checked before
#: any is inflated (the zip reader stops each member at its declared size)
MAX_NPZ_BYTES = 8 << 30
#: At most this fraction of the rows may be classes: more looks like a quantity to predict
#: (a regression target such as scikit-learn's diabetes, 347 "classes" for 442 rows).
MAX_CLASS_FRACTION = 0.5
#: Class numbers 0..max may leave at most max(this, the number used) of them unused
#: (labels {0, 99999} would make a 100,000-output model for two classes).
MAX_UNUSED_CLASSES = 10
#: Fraction of a CSV carved off as the test split when neither a test file nor a fraction
#: is given.
DEFAULT_TEST_FRACTION = 0.2
#: Seed of the shuffle that carves a test split off (fixed: every run splits the same way).
SPLIT_SEED = 20180501

NPZ_KEYS = ("x_train", "y_train", "x_test", "y_test")
IDX_PREFIXES = {"train": "train", "test": "t10k"}
_IDX_DTYPES: dict[int, str] = {
    0x08: "u1",
    0x09: "i1",
    0x0B: ">i2",
    0x0C: ">i4",
    0x0D: ">f4",
    0x0E: ">f8",
}
_GZIP_MAGIC = b"\x1f\x8b"


class DatasetError(ValueError):
    """A dataset that cannot be loaded or converted; the message names the file."""


@dataclass
class ArraySet:
    """A dataset in memory: features ``(N, *feature_shape)`` and integer labels ``(N,)``."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    class_names: tuple[str, ...] = ()
    #: "classification" (labels are class numbers) or "regression" (targets are numbers)
    task: str = "classification"


TASKS = ("classification", "regression")


@dataclass(frozen=True)
class ImageOptions:
    """How a folder of images becomes arrays: ``size`` (H, W) to resize every image to
    (None: the first image's, which every image must have) and ``color`` ("rgb",
    "grayscale"; None: the first image's)."""

    size: tuple[int, int] | None = None
    color: str | None = None


@dataclass(frozen=True)
class Prepared:
    """A converted dataset: the canonical file, its manifest file, and the manifest."""

    data_path: Path
    manifest_path: Path
    manifest: Manifest


# --------------------------------------------------------------------------- loading


def load(
    source: Path, *, test_file: Path | None = None, test_fraction: float | None = None, label: str | None = None,
    images: ImageOptions | None = None, task: str = "classification",
) -> ArraySet:
    """Load a dataset from an ``.npz``, an IDX directory or a CSV file.

    ``test_file`` and ``test_fraction`` apply to CSV only (at most one of them); a CSV with
    neither gets :data:`DEFAULT_TEST_FRACTION` carved off.
    """
    source = Path(source)
    if not source.exists():
        raise DatasetError(f"{source}: no such file or directory")
    kind = _kind(source)
    if kind not in ("csv", "images") and (test_file is not None or test_fraction is not None):
        raise DatasetError(f"{source}: a test file or test fraction applies to CSV and image folders only; "
                           f"{kind} has its own test split")
    if kind == "images" and test_file is not None:
        raise DatasetError(f"{source}: an image folder's test split is its test/ subfolder or a fraction")
    if kind != "images" and images is not None and images != ImageOptions():
        raise DatasetError(f"{source}: an image size or colour applies to a folder of images only")
    if kind != "csv" and label is not None:
        raise DatasetError(f"{source}: a label column applies to CSV only")
    if task not in TASKS:
        raise DatasetError(f"{source}: task must be one of {', '.join(TASKS)}, got {task!r}")
    if task == "regression" and kind in ("idx", "images"):
        raise DatasetError(f"{source}: {kind} datasets hold classes; regression needs a CSV or an .npz of targets")
    if kind == "idx":
        arrays = load_idx_dir(source)
    elif kind == "images":
        arrays = load_image_dir(source, images or ImageOptions(), test_fraction)
    elif kind == "npz":
        arrays = load_npz(source)
    else:
        arrays = load_csv(source, test_file=test_file, test_fraction=test_fraction, label=label,
                          regression=task == "regression")
    arrays.task = task
    check(arrays, origin=str(source))
    return arrays


def _kind(source: Path) -> str:
    if source.is_dir():
        idx = any(p.name.endswith(("-ubyte", "-ubyte.gz")) for p in source.iterdir())
        has_dirs = any(p.is_dir() and not p.name.startswith(".") for p in source.iterdir())
        return "images" if has_dirs and not idx else "idx"
    name = source.name.lower()
    if name.endswith(".npz"):
        return "npz"
    if name.endswith((".csv", ".csv.gz")):
        return "csv"
    raise DatasetError(f"{source}: unknown dataset format (expected .npz, .csv, .csv.gz or a directory of IDX files)")


def load_npz(path: Path) -> ArraySet:
    """Load an ``.npz`` in the Keras layout (no pickles); one that would inflate past
    :data:`MAX_NPZ_BYTES` is refused before anything is inflated."""
    try:
        with zipfile.ZipFile(path) as archive:
            inflated = sum(info.file_size for info in archive.infolist())
        if inflated > MAX_NPZ_BYTES:
            raise DatasetError(f"{path}: its arrays would take {inflated:,} bytes uncompressed; "
                               f"at most {MAX_NPZ_BYTES:,} are read")
        with np.load(path, allow_pickle=False) as npz:
            missing = [k for k in NPZ_KEYS if k not in npz.files]
            if missing:
                raise DatasetError(
                    f"{path}: missing array(s) {', '.join(missing)} (an .npz needs {', '.join(NPZ_KEYS)};"
                    f" found {', '.join(npz.files) or 'none'})"
                )
            arrays = {k: npz[k] for k in NPZ_KEYS}
    except DatasetError:
        raise
    except ValueError as exc:  # object arrays, pickles
        raise DatasetError(f"{path}: cannot read the arrays ({exc}); only numeric arrays are accepted") from None
    except (OSError, EOFError, zipfile.BadZipFile, zlib.error) as exc:
        raise DatasetError(f"{path}: not a readable .npz file ({exc})") from None
    return ArraySet(**arrays)


# ---- image folders


IMAGE_TIMEOUT = 3600.0


def load_image_dir(directory: Path, options: ImageOptions, test_fraction: float | None) -> ArraySet:
    """One subdirectory per class (PNG/JPEG), or ``train/`` and ``test/`` holding those; the
    test split is ``test/`` or a fraction (:data:`DEFAULT_TEST_FRACTION`). Decoded by
    TensorFlow in a child process (:mod:`crowdd.job.images`): the daemon never imports it."""
    split_dirs = (directory / "train").is_dir() and (directory / "test").is_dir()
    if split_dirs and test_fraction is not None:
        raise DatasetError(f"{directory}: has train/ and test/ folders; a test fraction does not apply")
    with tempfile.TemporaryDirectory(prefix="crowdd-images-") as tmp:
        out = Path(tmp) / "images.npz"
        argv = [sys.executable, "-m", "crowdd.job.images", str(directory), str(out)]
        if options.size is not None:
            argv += ["--size", f"{options.size[0]}x{options.size[1]}"]
        if options.color is not None:
            argv += ["--color", options.color]
        try:
            proc = subprocess.run(argv, capture_output=True, text=True, timeout=IMAGE_TIMEOUT, check=False,
                                  stdin=subprocess.DEVNULL)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise DatasetError(f"{directory}: cannot decode the images ({exc})") from None
        if proc.returncode != 0:
            lines = [x for x in proc.stderr.strip().splitlines() if x.strip()]
            why = lines[-1] if lines else f"exit code {proc.returncode}"
            raise DatasetError(why if proc.returncode == 2 else f"{directory}: cannot decode the images ({why})")
        with np.load(out, allow_pickle=False) as z:
            x_train, y_train, x_test, y_test = (z[k] for k in NPZ_KEYS)
            names = tuple(str(n) for n in z["class_names"])
    if split_dirs:
        return ArraySet(x_train, y_train, x_test, y_test, names)
    fraction = DEFAULT_TEST_FRACTION if test_fraction is None else test_fraction
    arrays = split(x_train, y_train, fraction, origin=str(directory))
    arrays.class_names = names
    return arrays


# ---- IDX


def idx_files(directory: Path) -> dict[str, Path]:
    """The four IDX files of a directory: keys ``train_images``, ``train_labels``, ``test_images``,
    ``test_labels``."""
    found: dict[str, Path] = {}
    for split, prefix in IDX_PREFIXES.items():
        for kind, dims in (("images", 3), ("labels", 1)):
            names = [f"{prefix}-{kind}-idx{dims}-ubyte", f"{prefix}-{kind}.idx{dims}-ubyte"]
            candidates = [directory / (n + gz) for n in names for gz in ("", ".gz")]
            path = next((c for c in candidates if c.is_file()), None)
            if path is None:
                raise DatasetError(f"{directory}: no {names[0]}[.gz] in this IDX directory")
            found[f"{split}_{kind}"] = path
    return found


def load_idx_dir(directory: Path) -> ArraySet:
    """Load MNIST-style IDX files (gzipped or not) from a directory."""
    files = idx_files(directory)
    out: dict[str, np.ndarray] = {}
    for split in IDX_PREFIXES:
        images_path, labels_path = files[f"{split}_images"], files[f"{split}_labels"]
        images, labels = read_idx(images_path), read_idx(labels_path)
        if images.ndim < 2:
            raise DatasetError(f"{images_path}: an image file needs at least 2 dimensions, found {images.ndim}")
        if labels.ndim != 1:
            raise DatasetError(f"{labels_path}: a label file needs 1 dimension, found {labels.ndim}")
        if images.shape[0] != labels.shape[0]:
            raise DatasetError(
                f"{images_path} has {images.shape[0]} images but {labels_path} has {labels.shape[0]} labels"
            )
        out[f"x_{split}"], out[f"y_{split}"] = images, labels
    return ArraySet(out["x_train"], out["y_train"], out["x_test"], out["y_test"])


def read_idx(path: Path) -> np.ndarray:
    """Parse one IDX file (gzipped or not) into an array with its own shape. A gzipped file is
    inflated only as far as its header says the body goes (a gzip bomb stops there)."""
    raw = _read_idx_bytes(path)
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise DatasetError(f"{path}: not an IDX file (bad magic {raw[:4].hex() or 'empty'})")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if ndim == 0 or len(raw) < header:
        raise DatasetError(f"{path}: truncated IDX header ({ndim} dimensions, {len(raw)} bytes)")
    shape, expected = _idx_shape(path, raw, ndim)
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    body = len(raw) - header
    if body < expected:
        raise DatasetError(f"{path}: truncated IDX body: shape {shape} needs {expected} bytes, found {body}")
    if body > expected:
        raise DatasetError(f"{path}: {body - expected} unexpected bytes after the IDX body of shape {shape}")
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape)


def _idx_shape(path: Path, raw: bytes, ndim: int) -> tuple[tuple[int, ...], int]:
    """The shape in an IDX header and the body's size in bytes (refused past :data:`MAX_IDX_BYTES`)."""
    shape = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    expected = math.prod(shape) * np.dtype(_IDX_DTYPES.get(raw[2], "u1")).itemsize
    if expected > MAX_IDX_BYTES:
        raise DatasetError(f"{path}: an IDX body of shape {shape} is {expected:,} bytes; at most {MAX_IDX_BYTES:,}")
    return shape, expected


def _read_idx_bytes(path: Path) -> bytes:
    try:
        size = path.stat().st_size
        if size > MAX_IDX_BYTES + 64:
            raise DatasetError(f"{path}: {size:,} bytes; an IDX file is at most {MAX_IDX_BYTES:,}")
        raw = path.read_bytes()
    except OSError as exc:
        raise DatasetError(f"{path}: cannot read ({exc.strerror or exc})") from None
    if raw[:2] != _GZIP_MAGIC:
        return raw
    inflate = zlib.decompressobj(wbits=31)
    try:
        head = inflate.decompress(raw, 4)
        if len(head) == 4 and head[0] == 0 and head[1] == 0 and head[2] in _IDX_DTYPES and head[3] > 0:
            head += inflate.decompress(inflate.unconsumed_tail, 4 * head[3])
            if len(head) == 4 + 4 * head[3]:
                _, expected = _idx_shape(path, head, head[3])
                # one byte more than the body: what follows it is an error below, not a bomb
                body = inflate.decompress(inflate.unconsumed_tail, expected + 1)
                if len(body) <= expected and not inflate.eof:
                    raise zlib.error("the stream ends early")
                return head + body
        return head
    except zlib.error as exc:
        raise DatasetError(f"{path}: truncated or corrupt gzip ({exc})") from None


# ---- CSV


def load_csv(
    path: Path, *, test_file: Path | None = None, test_fraction: float | None = None, label: str | None = None,
    regression: bool = False,
) -> ArraySet:
    """Load a CSV with the label first, or in the header's column ``label``; the test split
    from ``test_file`` (same columns) or a fraction."""
    if test_file is not None and test_fraction is not None:
        raise DatasetError(f"{path}: give a test file or a test fraction, not both")
    table = label_first(path, read_csv_table(path), label, regression)
    if test_file is not None:
        test_file = Path(test_file)
        if not test_file.exists():
            raise DatasetError(f"{test_file}: no such file or directory")
        test = label_first(test_file, read_csv_table(test_file), label, regression)
        if test.shape[1] != table.shape[1]:
            raise DatasetError(f"{test_file} has {test.shape[1]} columns but {path} has {table.shape[1]}")
        return ArraySet(table[:, 1:], table[:, 0], test[:, 1:], test[:, 0])
    fraction = DEFAULT_TEST_FRACTION if test_fraction is None else test_fraction
    return split(table[:, 1:], table[:, 0], fraction, origin=str(path))


def split(x: np.ndarray, y: np.ndarray, fraction: float, *, origin: str = "dataset") -> ArraySet:
    """Shuffle deterministically (:data:`SPLIT_SEED`) and carve ``fraction`` off as the test split."""
    if not isinstance(fraction, (int, float)) or not 0.0 < fraction < 1.0:
        raise DatasetError(f"{origin}: test fraction must be between 0 and 1 (exclusive), got {fraction!r}")
    n = len(x)
    n_test = round(n * fraction)
    if n_test < 1 or n - n_test < 1:
        raise DatasetError(f"{origin}: {n} rows are too few to carve off a test fraction of {fraction}")
    order = np.random.default_rng(SPLIT_SEED).permutation(n)
    test, train = order[:n_test], order[n_test:]
    return ArraySet(x[train], y[train], x[test], y[test])


def read_csv_table(path: Path) -> np.ndarray:
    """Parse a numeric CSV into a float64 table ``(rows, columns)``; skips one header row."""
    header = _has_header(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "input contained no data": checked below
            with _open_text(path) as fh:
                table = np.loadtxt(
                    fh,
                    delimiter=",",
                    skiprows=1 if header else 0,
                    ndmin=2,
                    dtype=np.float64,
                    comments=None,
                    quotechar='"',
                )
    except DatasetError:
        raise
    except ValueError as exc:
        _diagnose_csv(path, header)
        raise DatasetError(f"{path}: {exc}") from None
    except (EOFError, OSError, zlib.error) as exc:
        raise DatasetError(f"{path}: cannot read ({exc})") from None
    if table.size == 0:
        raise DatasetError(f"{path}: no data rows")
    if table.shape[1] < 2:
        raise DatasetError(f"{path}: needs a label column and at least one feature column")
    return table


def label_first(path: Path, table: np.ndarray, label: str | None, regression: bool = False) -> np.ndarray:
    """The table with the header's column named ``label`` moved first (None: it is first)."""
    if label is None:
        check_table(path, table, 0, regression)
        return table
    names = csv_header(path)
    if names is None:
        raise DatasetError(f"{path}: --label {label!r} needs a header row naming the columns; this file has none")
    if label not in names:
        shown = ", ".join(names[:20]) + (", …" if len(names) > 20 else "")
        raise DatasetError(f"{path} line 1: no column named {label!r} (the columns: {shown})")
    if names.count(label) > 1:
        raise DatasetError(f"{path} line 1: {names.count(label)} columns are named {label!r}")
    i = names.index(label)
    if len(names) != table.shape[1]:
        raise DatasetError(f"{path} line 1: the header names {len(names)} columns, the rows have {table.shape[1]}")
    check_table(path, table, i, regression)
    return np.concatenate([table[:, i : i + 1], table[:, :i], table[:, i + 1 :]], axis=1)


def csv_header(path: Path) -> list[str] | None:
    """The names of a CSV's columns, or None when its first row is data."""
    if not _has_header(path):
        return None
    try:
        with _open_text(path) as fh:
            for row in csv.reader(fh):
                if row and any(f.strip() for f in row):
                    return [f.strip() for f in row]
    except (EOFError, OSError, zlib.error, csv.Error, UnicodeDecodeError) as exc:
        raise DatasetError(f"{path}: cannot read ({exc})") from None
    return None


def check_table(path: Path, table: np.ndarray, label_index: int = 0, regression: bool = False) -> None:
    """Every value a finite number and every label (column ``label_index`` + 1) a class
    number 0, 1, 2, …; the first that is not is named by its file, line and column (before
    any shuffle)."""
    labels = table[:, label_index]
    bad = ~np.isfinite(table)
    if bad.any():
        row, col = np.argwhere(bad)[0]
        raise DatasetError(f"{path} line {_line_of(path, int(row))}, column {int(col) + 1}: "
                           f"{_cell(table[row, col])} is not a finite number")
    if regression:
        return  # a target is any finite number
    for mask, why in (
        (labels != np.round(labels), "is not a class number (labels are integers 0..N-1; for a quantity to "
                                     "predict, use --task regression)"),
        (labels < 0, "is negative (labels are class numbers 0..N-1)"),
        (labels >= MAX_CLASSES, f"is out of range 0..{MAX_CLASSES - 1}"),
    ):
        if mask.any():
            row = int(np.argmax(mask))
            raise DatasetError(f"{path} line {_line_of(path, row)}, column {label_index + 1} (the label): "
                               f"label {_cell(labels[row])} {why}")


def _cell(value: Any) -> str:
    f = float(value)
    return str(int(f)) if f.is_integer() else repr(f)


def _line_of(path: Path, row: int) -> int:
    """The line number (1-based) of data row ``row`` of a CSV (after its header, blank lines skipped)."""
    header = _has_header(path)
    try:
        with _open_text(path) as fh:
            reader = csv.reader(fh)
            seen = -1 if header else 0
            for fields in reader:
                if not fields or not any(f.strip() for f in fields):
                    continue
                if seen == row:
                    return reader.line_num
                seen += 1
    except (EOFError, OSError, zlib.error, csv.Error, UnicodeDecodeError):
        pass
    return row + 1 + int(header)


class _Inflated(io.RawIOBase):
    """A gzip file's content, refused past :data:`MAX_CSV_BYTES` (a gzip bomb stops there)."""

    def __init__(self, path: Path) -> None:
        super().__init__()
        self._path = path
        self._gz = gzip.open(path, "rb")  # noqa: SIM115 - closed with this stream
        self._seen = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        n = self._gz.readinto(buffer)
        self._seen += n
        if self._seen > MAX_CSV_BYTES:
            raise DatasetError(f"{self._path}: inflates past {MAX_CSV_BYTES:,} bytes; a CSV is at most that")
        return n

    def close(self) -> None:
        self._gz.close()
        super().close()


def _open_text(path: Path) -> IO[str]:
    if path.name.lower().endswith(".gz"):
        return io.TextIOWrapper(io.BufferedReader(_Inflated(path)), newline="")
    return open(path, newline="")


def _has_header(path: Path) -> bool:
    """A first row none of whose fields is a number is a header."""
    try:
        with _open_text(path) as fh:
            reader = csv.reader(fh)
            for row in reader:
                if row and any(f.strip() for f in row):
                    return not any(_is_number(f) for f in row)
    except (EOFError, OSError, zlib.error, csv.Error, UnicodeDecodeError) as exc:
        raise DatasetError(f"{path}: cannot read ({exc})") from None
    return False


def _is_number(field: str) -> bool:
    try:
        float(field)
    except ValueError:
        return False
    return True


def _diagnose_csv(path: Path, header: bool) -> None:
    """Find the first ragged row or non-numeric field and raise a DatasetError naming its line."""
    try:
        with _open_text(path) as fh:
            reader = csv.reader(fh)
            width: int | None = None
            first = True
            for row in reader:
                if not row or not any(f.strip() for f in row):
                    continue
                if first and header:
                    first = False
                    continue
                first = False
                line = reader.line_num
                if width is None:
                    width = len(row)
                elif len(row) != width:
                    raise DatasetError(
                        f"{path} line {line}: ragged row: {len(row)} columns, expected {width} like the first row"
                    )
                for col, field in enumerate(row, 1):
                    if not _is_number(field):
                        raise DatasetError(f"{path} line {line}, column {col}: non-numeric value {field.strip()!r}")
    except (EOFError, OSError, zlib.error, csv.Error, UnicodeDecodeError) as exc:
        raise DatasetError(f"{path}: cannot read ({exc})") from None


# ---- scikit-learn digits


def load_digits() -> ArraySet:
    """scikit-learn's 8×8 digits (1,797 samples, values 0..16), split 80/20 deterministically."""
    from sklearn.datasets import load_digits as sk_load_digits

    bunch: Any = sk_load_digits()
    x = np.asarray(bunch.images, dtype=np.float64)
    y = np.asarray(bunch.target, dtype=np.int64)
    return split(x, y, 0.2, origin="digits")


# --------------------------------------------------------------------------- checking


def check(arrays: ArraySet, *, origin: str = "dataset") -> Layout:
    """Validate an :class:`ArraySet` and return the layout it converts to."""
    x_train = _features(arrays.x_train, f"{origin}: x_train")
    x_test = _features(arrays.x_test, f"{origin}: x_test")
    regression = arrays.task == "regression"
    if arrays.task not in TASKS:
        raise DatasetError(f"{origin}: task must be one of {', '.join(TASKS)}, got {arrays.task!r}")
    y_train = (_targets if regression else _labels)(arrays.y_train, f"{origin}: y_train")
    y_test = (_targets if regression else _labels)(arrays.y_test, f"{origin}: y_test")
    for split_name, x, y in (("train", x_train, y_train), ("test", x_test, y_test)):
        if len(x) != len(y):
            raise DatasetError(f"{origin}: x_{split_name} has {len(x)} samples but y_{split_name} has {len(y)} labels")
    if len(x_train) == 0:
        raise DatasetError(f"{origin}: empty dataset (no training samples)")
    shape = _feature_shape(x_train)
    if len(x_test) and _feature_shape(x_test) != shape:
        raise DatasetError(
            f"{origin}: test samples have shape {_feature_shape(x_test)} but training samples {shape}"
        )
    if not shape or min(shape) < 1:
        raise DatasetError(f"{origin}: samples have no features (shape {shape})")
    if regression:
        dtype, scale = _feature_encoding(x_train, x_test)
        return Layout(feature_shape=shape, feature_dtype=dtype, scale=scale, num_classes=1,
                      train_count=len(x_train), test_count=len(x_test), task="regression")
    num_classes = int(max(y_train.max(), y_test.max() if len(y_test) else 0)) + 1
    if num_classes < 2:
        raise DatasetError(f"{origin}: every label is 0; a classifier needs at least 2 classes")
    check_classes(y_train, y_test, num_classes, origin)
    dtype, scale = _feature_encoding(x_train, x_test)
    names = tuple(arrays.class_names)
    if names and len(names) != num_classes:
        raise DatasetError(f"{origin}: {len(names)} class names for {num_classes} classes")
    return Layout(
        class_names=names,
        feature_shape=shape,
        feature_dtype=dtype,
        scale=scale,
        num_classes=num_classes,
        train_count=len(x_train),
        test_count=len(x_test),
    )


def check_classes(y_train: np.ndarray, y_test: np.ndarray, num_classes: int, origin: str) -> None:
    """Refuse labels no sane classifier has: more classes than a fraction of the rows (a
    regression target), or class numbers with wide gaps (a model with an output per number)."""
    rows = len(y_train) + len(y_test)
    used = np.unique(np.concatenate([y_train, y_test]))
    limit = max(MAX_UNUSED_CLASSES, int(rows * MAX_CLASS_FRACTION))
    unused = num_classes - len(used)
    gaps = unused > max(MAX_UNUSED_CLASSES, len(used))
    if len(used) > limit or (num_classes > limit and not gaps):
        raise DatasetError(
            f"{origin}: labels: {len(used)} distinct values up to {num_classes - 1} make {num_classes} classes for "
            f"{rows} rows (at most {limit}): this looks like a quantity to predict: use --task regression; a "
            "classifier needs class numbers 0..N-1 with several rows each"
        )
    if gaps:
        shown = ", ".join(str(int(v)) for v in used[:5]) + (", …" if len(used) > 5 else "")
        raise DatasetError(
            f"{origin}: labels: {{{shown}}} leave {unused} of the class numbers 0..{num_classes - 1} unused "
            f"(the model would need {num_classes} outputs for {len(used)} classes); number the classes 0..N-1"
        )


def _feature_shape(x: np.ndarray) -> tuple[int, ...]:
    return tuple(int(d) for d in x.shape[1:]) or (1,)


def _features(x: Any, what: str) -> np.ndarray:
    arr = np.asarray(x)
    if arr.dtype.kind not in "biuf":
        raise DatasetError(f"{what}: non-numeric features (dtype {arr.dtype})")
    if arr.ndim == 0:
        raise DatasetError(f"{what}: a scalar is not a set of samples")
    if arr.dtype.kind == "f" and arr.size and not np.isfinite(arr).all():
        raise DatasetError(f"{what}: features contain NaN or infinity")
    return arr


def _labels(y: Any, what: str) -> np.ndarray:
    arr = np.asarray(y)
    if arr.ndim == 2 and arr.shape[1] == 1:
        arr = arr[:, 0]
    if arr.ndim != 1:
        raise DatasetError(f"{what}: labels must be one class index per sample, got shape {arr.shape}")
    if arr.dtype.kind not in "biuf":
        raise DatasetError(f"{what}: non-numeric labels (dtype {arr.dtype})")
    if arr.size == 0:
        return arr.astype(np.int64)
    if arr.dtype.kind == "f":
        bad = ~np.isfinite(arr) | (arr != np.round(arr))
        if bad.any():
            i = int(np.argmax(bad))
            raise DatasetError(f"{what}: non-integer label {arr[i].item()!r} at index {i}")
    lo, hi = arr.min(), arr.max()
    if lo < 0:
        i = int(np.argmax(arr < 0))
        raise DatasetError(f"{what}: negative label {_num(arr[i])} at index {i}; labels must be 0..N-1")
    if hi >= MAX_CLASSES:
        i = int(np.argmax(arr >= MAX_CLASSES))
        raise DatasetError(f"{what}: label {_num(arr[i])} at index {i} out of range 0..{MAX_CLASSES - 1}")
    return arr.astype(np.int64)


def _targets(y: Any, what: str) -> np.ndarray:
    """Regression targets: one finite number per sample, as float32."""
    arr = np.asarray(y)
    if arr.ndim == 2 and arr.shape[1] == 1:
        arr = arr[:, 0]
    if arr.ndim != 1:
        raise DatasetError(f"{what}: targets must be one number per sample, got shape {arr.shape}")
    if arr.dtype.kind not in "biuf":
        raise DatasetError(f"{what}: non-numeric targets (dtype {arr.dtype})")
    with np.errstate(over="ignore"):
        out = arr.astype(np.float32)
    bad = ~np.isfinite(out)
    if bad.any():
        i = int(np.argmax(bad))
        raise DatasetError(f"{what}: target {arr[i].item()!r} at index {i} is not a finite float32 number")
    return out


def _num(v: Any) -> int | float:
    """A label for a message: 3 rather than 3.0 or np.int64(3)."""
    f = float(v)
    return int(f) if f.is_integer() else f


def _feature_encoding(x_train: np.ndarray, x_test: np.ndarray) -> tuple[str, float]:
    """uint8 with scale 1/max when every value is an integer 0..255, else float32 with scale 1."""
    parts = [x for x in (x_train, x_test) if x.size]
    lo = min(x.min() for x in parts)
    hi = max(x.max() for x in parts)
    small = lo >= 0 and hi <= 255
    if small:
        small = all(x.dtype.kind != "f" or bool((x == np.round(x)).all()) for x in parts)
    if small:
        return "uint8", (1.0 / float(hi) if hi > 0 else 1.0)
    return "float32", 1.0


# --------------------------------------------------------------------------- canonical file


def record_dtype(layout: Layout) -> np.dtype[Any]:
    """The numpy dtype of one canonical record (packed, little-endian)."""
    feature = "<f4" if layout.feature_dtype == "float32" else "u1"
    label = "<f4" if layout.task == "regression" else "<i4"
    dt: np.dtype[Any] = np.dtype([("label", label), ("x", feature, (layout.feature_count,))])
    if dt.itemsize != layout.record_bytes:  # pragma: no cover - numpy packs unaligned dtypes
        raise DatasetError(f"record dtype is {dt.itemsize} bytes, layout says {layout.record_bytes}")
    return dt


def _records(x: np.ndarray, y: np.ndarray, layout: Layout) -> np.ndarray:
    dt = record_dtype(layout)
    rec = np.empty(len(x), dtype=dt)
    rec["label"] = y
    feats = x.reshape(len(x), layout.feature_count)
    if layout.feature_dtype == "uint8":
        rec["x"] = feats.astype(np.uint8, copy=False)  # integral 0..255, checked by check()
    else:
        with np.errstate(over="ignore"):
            as32 = feats.astype(np.float32)
        if as32.size and not np.isfinite(as32).all():
            raise DatasetError("features overflow float32")
        rec["x"] = as32
    return rec


def write_canonical(arrays: ArraySet, path: Path) -> Layout:
    """Write the canonical file atomically (a temporary file beside ``path``, then rename)."""
    path = Path(path)
    layout = check(arrays, origin=str(path))
    labels = _targets if layout.task == "regression" else _labels
    y_train = labels(arrays.y_train, "y_train")
    y_test = labels(arrays.y_test, "y_test")
    x_train, x_test = np.asarray(arrays.x_train), np.asarray(arrays.x_test)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as fh:
            for x, y in ((x_train, y_train), (x_test, y_test)):
                if len(x):
                    fh.write(_records(x, y, layout).tobytes())
            fh.flush()
            os.fsync(fh.fileno())
        size = tmp.stat().st_size
        if size != layout.total_bytes:  # pragma: no cover - defensive
            raise DatasetError(f"{path}: wrote {size} bytes, layout says {layout.total_bytes}")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return layout


def read_canonical(path: Path, layout: Layout) -> ArraySet:
    """Read a canonical file back (features as stored, unscaled; labels int32)."""
    path = Path(path)
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise DatasetError(f"{path}: cannot read ({exc.strerror or exc})") from None
    if size != layout.total_bytes:
        raise DatasetError(f"{path}: {size} bytes, but the layout describes {layout.total_bytes}")
    rec = np.fromfile(path, dtype=record_dtype(layout))
    shape = layout.feature_shape
    n = layout.train_count
    x = rec["x"].reshape((len(rec), *shape))
    y = rec["label"].astype(np.float32 if layout.task == "regression" else np.int32)
    return ArraySet(x[:n], y[:n], x[n:], y[n:])


def convert(
    source: Path | ArraySet,
    out_dir: Path,
    *,
    chunk_size: int = DEFAULT_CHUNK,
    name: str = "",
    test_file: Path | None = None,
    test_fraction: float | None = None,
    label: str | None = None,
    images: ImageOptions | None = None,
    task: str = "classification",
) -> Prepared:
    """Load ``source`` (or take the arrays), write ``<sha>.data`` and ``<sha>.manifest.json``
    in ``out_dir``. ``name`` defaults to the source's file or directory name."""
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise DatasetError(f"chunk size must be a positive integer, got {chunk_size!r}")
    if isinstance(source, ArraySet):
        arrays = source
        if test_file is not None or test_fraction is not None or label is not None:
            raise DatasetError("a test file, fraction or label column applies to a CSV source, not to arrays")
    else:
        source = Path(source)
        arrays = load(source, test_file=test_file, test_fraction=test_fraction, label=label, images=images, task=task)
        if not name:
            name = default_name(source)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=out_dir, prefix=".convert-", suffix=".data")
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        layout = write_canonical(arrays, tmp)
        chunk_size = chunk_for(tmp.stat().st_size, chunk_size)  # the manifest must fit one frame
        if chunk_size > MAX_CHUNK:
            raise DatasetError(f"the dataset is {tmp.stat().st_size:,} bytes once converted; a group replicates "
                               f"at most {MAX_CHUNK * MAX_CHUNKS:,}")
        manifest = Manifest.build(tmp, chunk_size=chunk_size, layout=layout, name=name)
        data_path = out_dir / f"{manifest.sha256}.data"
        manifest_path = out_dir / f"{manifest.sha256}.manifest.json"
        os.replace(tmp, data_path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _write_atomic(manifest_path, manifest.to_json())
    log.info(
        "converted %s: %d train + %d test records of %d bytes -> %s (manifest %s)",
        name or "arrays",
        layout.train_count,
        layout.test_count,
        layout.record_bytes,
        data_path,
        manifest.digest()[:12],
    )
    return Prepared(data_path, manifest_path, manifest)


def default_name(source: Path) -> str:
    """A dataset's name from its file or directory name (``fashion.csv.gz`` → ``fashion``)."""
    name = source.name
    for suffix in (".csv.gz", ".csv", ".npz"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def _write_atomic(path: Path, data: bytes) -> None:
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
