"""crowdd.data.datasets: every source format, the canonical file, and every bad-input case."""

from __future__ import annotations

import gzip
import json
import struct
from pathlib import Path

import numpy as np
import pytest

from crowdd.data import datasets
from crowdd.data.datasets import (
    ArraySet,
    DatasetError,
    read_idx,
    convert,
    load,
    read_canonical,
    write_canonical,
)
from crowdd.data.manifest import Manifest

FASHION = Path("/usr/share/datasets/fashion-mnist")


# ---------------------------------------------------------------- helpers


def idx_bytes(arr: np.ndarray, code: int = 0x08) -> bytes:
    header = bytes([0, 0, code, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape)
    dtype = {0x08: "u1", 0x0C: ">i4", 0x0D: ">f4"}[code]
    return header + arr.astype(dtype).tobytes()


def small_arrays(n_train: int = 12, n_test: int = 5, shape: tuple[int, ...] = (3, 2)) -> ArraySet:
    rng = np.random.default_rng(1)
    return ArraySet(
        rng.integers(0, 256, size=(n_train, *shape), dtype=np.uint8),
        np.arange(n_train) % 3,
        rng.integers(0, 256, size=(n_test, *shape), dtype=np.uint8),
        np.arange(n_test) % 3,
    )


def write_idx_dir(d: Path, arrays: ArraySet, *, gz: bool = True, dotted: bool = False) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    sep = "." if dotted else "-"
    for prefix, x, y in (("train", arrays.x_train, arrays.y_train), ("t10k", arrays.x_test, arrays.y_test)):
        for kind, arr, dims in (("images", x, 3), ("labels", y, 1)):
            name = f"{prefix}-{kind}{sep}idx{dims}-ubyte" + (".gz" if gz else "")
            raw = idx_bytes(np.asarray(arr))
            (d / name).write_bytes(gzip.compress(raw) if gz else raw)
    return d


def write_csv(path: Path, rows: list[list[object]], header: str | None = None) -> Path:
    lines = ([header] if header else []) + [",".join(str(v) for v in r) for r in rows]
    path.write_text("\n".join(lines) + "\n")
    return path


def assert_same(a: ArraySet, b: ArraySet) -> None:
    for field in ("x_train", "y_train", "x_test", "y_test"):
        np.testing.assert_array_equal(getattr(a, field), getattr(b, field), err_msg=field)


# ---------------------------------------------------------------- sources


def test_npz_round_trip(tmp_path: Path) -> None:
    arrays = small_arrays()
    src = tmp_path / "toy.npz"
    np.savez(src, **vars(arrays))
    prepared = convert(src, tmp_path / "out")
    m = prepared.manifest
    assert m.name == "toy"
    assert prepared.data_path == tmp_path / "out" / f"{m.sha256}.data"
    assert prepared.manifest_path == tmp_path / "out" / f"{m.sha256}.manifest.json"
    assert m.layout is not None
    assert m.layout.feature_shape == (3, 2)
    assert m.layout.feature_dtype == "uint8"
    assert m.layout.num_classes == 3
    assert (m.layout.train_count, m.layout.test_count) == (12, 5)
    assert m.layout.record_bytes == 4 + 6
    assert_same(read_canonical(prepared.data_path, m.layout), arrays)
    # the manifest on disk is the canonical JSON, so its sha256 is the digest
    raw = prepared.manifest_path.read_bytes()
    assert Manifest.from_json(raw, expect_digest=m.digest()) == m
    m.verify_file(prepared.data_path)
    assert not [p for p in (tmp_path / "out").iterdir() if p.name.startswith(".")]


def test_record_bytes_on_disk(tmp_path: Path) -> None:
    arrays = ArraySet(
        np.array([[1, 2], [3, 4]], np.uint8), np.array([1, 0]), np.array([[5, 6]], np.uint8), np.array([1])
    )
    layout = write_canonical(arrays, tmp_path / "f.data")
    raw = (tmp_path / "f.data").read_bytes()
    assert raw == (
        struct.pack("<i", 1) + bytes([1, 2]) + struct.pack("<i", 0) + bytes([3, 4]) + struct.pack("<i", 1) + bytes([5, 6])
    )
    assert layout.scale == pytest.approx(1 / 6)
    assert layout.test_offset == 12


def test_float_features_are_float32_le(tmp_path: Path) -> None:
    arrays = ArraySet(
        np.array([[0.5, -1.25], [300.0, 2.0]]), np.array([0, 1]), np.array([[1.0, 2.0]]), np.array([1])
    )
    layout = write_canonical(arrays, tmp_path / "f.data")
    assert (layout.feature_dtype, layout.scale) == ("float32", 1.0)
    raw = (tmp_path / "f.data").read_bytes()
    assert raw[:12] == struct.pack("<iff", 0, 0.5, -1.25)
    back = read_canonical(tmp_path / "f.data", layout)
    assert back.x_train.dtype == np.float32
    np.testing.assert_array_equal(back.x_train, arrays.x_train.astype(np.float32))


def test_integral_floats_become_uint8(tmp_path: Path) -> None:
    arrays = ArraySet(np.array([[0.0, 16.0], [3.0, 4.0]]), np.array([0.0, 1.0]), np.zeros((0, 2)), np.zeros(0))
    layout = write_canonical(arrays, tmp_path / "f.data")
    assert (layout.feature_dtype, layout.scale, layout.test_count) == ("uint8", 1 / 16, 0)
    back = read_canonical(tmp_path / "f.data", layout)
    np.testing.assert_array_equal(back.x_train, [[0, 16], [3, 4]])
    assert back.x_test.shape == (0, 2)


def test_mixed_dtypes_pick_one_encoding(tmp_path: Path) -> None:
    # uint8 train but non-integral float test: both must be float32, nothing truncated
    arrays = ArraySet(np.array([[1, 2]], np.uint8), np.array([1]), np.array([[0.5, 2.0]]), np.array([0]))
    layout = write_canonical(arrays, tmp_path / "f.data")
    assert layout.feature_dtype == "float32"
    back = read_canonical(tmp_path / "f.data", layout)
    np.testing.assert_array_equal(back.x_test, [[0.5, 2.0]])
    # bool features and a scalar per sample
    arrays = ArraySet(np.array([True, False, True]), np.array([0, 1, 1]), np.array([False]), np.array([0]))
    layout = write_canonical(arrays, tmp_path / "g.data")
    assert (layout.feature_shape, layout.feature_dtype, layout.scale) == ((1,), "uint8", 1.0)
    back = read_canonical(tmp_path / "g.data", layout)
    np.testing.assert_array_equal(back.x_train, [[1], [0], [1]])


@pytest.mark.parametrize("gz", [True, False])
@pytest.mark.parametrize("dotted", [True, False])
def test_idx_dir(tmp_path: Path, gz: bool, dotted: bool) -> None:
    arrays = small_arrays(shape=(4, 4))
    d = write_idx_dir(tmp_path / "mnistish", arrays, gz=gz, dotted=dotted)
    assert_same(load(d), arrays)
    prepared = convert(d, tmp_path / "out")
    assert prepared.manifest.name == "mnistish"
    assert prepared.manifest.layout is not None
    assert prepared.manifest.layout.feature_shape == (4, 4)


def test_idx_other_dtypes(tmp_path: Path) -> None:
    x = np.arange(24, dtype=np.float32).reshape(2, 3, 4) / 7
    p = tmp_path / "a.idx"
    p.write_bytes(idx_bytes(x, 0x0D))
    np.testing.assert_array_equal(datasets.read_idx(p), x)
    y = np.array([70000, 2], dtype=np.int32)
    p.write_bytes(idx_bytes(y, 0x0C))
    np.testing.assert_array_equal(datasets.read_idx(p), y)


def test_csv_with_test_file_and_header(tmp_path: Path) -> None:
    train = write_csv(tmp_path / "train.csv", [[1, 0, 5], [0, 2, 3], [2, 255, 0]], header="label,a,b")
    test = write_csv(tmp_path / "test.csv", [[1, 9, 9]])
    arrays = load(train, test_file=test)
    np.testing.assert_array_equal(arrays.x_train, [[0, 5], [2, 3], [255, 0]])
    np.testing.assert_array_equal(arrays.y_train, [1, 0, 2])
    np.testing.assert_array_equal(arrays.x_test, [[9, 9]])
    prepared = convert(train, tmp_path / "out", test_file=test)
    assert prepared.manifest.name == "train"
    layout = prepared.manifest.layout
    assert layout is not None
    assert (layout.feature_shape, layout.feature_dtype, layout.num_classes) == ((2,), "uint8", 3)


def test_csv_quoted_fields_and_crlf(tmp_path: Path) -> None:
    src = tmp_path / "q.csv"
    src.write_bytes(b'"label","a"\r\n"1","2"\r\n0, 3\r\n1,4\r\n')
    arrays = load(src, test_fraction=1 / 3)
    assert sorted(arrays.x_train[:, 0].tolist() + arrays.x_test[:, 0].tolist()) == [2, 3, 4]


def test_csv_fraction_is_deterministic(tmp_path: Path) -> None:
    rows = [[i % 4, i, i * 0.5] for i in range(50)]
    src = write_csv(tmp_path / "d.csv", rows)
    a = load(src, test_fraction=0.3)
    b = load(src, test_fraction=0.3)
    assert_same(a, b)
    assert (len(a.x_train), len(a.x_test)) == (35, 15)
    # every row lands in exactly one split
    seen = sorted(a.x_train[:, 0].tolist() + a.x_test[:, 0].tolist())
    assert seen == list(range(50))
    # default fraction
    c = load(src)
    assert len(c.x_test) == round(50 * datasets.DEFAULT_TEST_FRACTION)
    p1 = convert(src, tmp_path / "o1", test_fraction=0.3)
    p2 = convert(src, tmp_path / "o2", test_fraction=0.3)
    assert p1.manifest.digest() == p2.manifest.digest()
    assert p1.manifest.layout is not None and p1.manifest.layout.feature_dtype == "float32"


def test_csv_gz(tmp_path: Path) -> None:
    src = tmp_path / "d.csv.gz"
    src.write_bytes(gzip.compress(b"0,1,2\n1,3,4\n0,5,6\n1,7,8\n"))
    arrays = load(src, test_fraction=0.25)
    assert (len(arrays.x_train), len(arrays.x_test)) == (3, 1)


def test_digits() -> None:
    arrays = datasets.load_digits()
    layout = datasets.check(arrays)
    assert layout.feature_shape == (8, 8)
    assert (layout.feature_dtype, layout.scale, layout.num_classes) == ("uint8", 1 / 16, 10)
    assert layout.train_count + layout.test_count == 1797
    assert_same(arrays, datasets.load_digits())


def test_convert_arrays_and_chunking(tmp_path: Path) -> None:
    arrays = small_arrays(n_train=100, n_test=20, shape=(10,))
    prepared = convert(arrays, tmp_path, chunk_size=100, name="toy")
    m = prepared.manifest
    assert m.name == "toy"
    assert m.size == 120 * 14
    assert m.num_chunks == -(-m.size // 100)
    data = prepared.data_path.read_bytes()
    for i in range(m.num_chunks):
        off, length = m.chunk_span(i)
        assert m.chunk_ok(i, data[off : off + length])
    # converting again is idempotent: same names, same bytes
    again = convert(arrays, tmp_path, chunk_size=100, name="toy")
    assert again == prepared
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [prepared.data_path.name, prepared.manifest_path.name]
    )


@pytest.mark.skipif(not FASHION.is_dir(), reason="Debian's dataset-fashion-mnist is not installed")
def test_fashion_mnist(tmp_path: Path) -> None:
    prepared = convert(FASHION, tmp_path)
    layout = prepared.manifest.layout
    assert layout is not None
    assert layout.feature_shape == (28, 28)
    assert (layout.train_count, layout.test_count, layout.num_classes) == (60000, 10000, 10)
    assert (layout.feature_dtype, layout.scale) == ("uint8", 1 / 255)
    assert prepared.manifest.size == 70000 * 788
    back = read_canonical(prepared.data_path, layout)
    raw = datasets.load_idx_dir(FASHION)
    assert_same(back, raw)
    # each class has 6000 training images in Fashion-MNIST
    assert np.bincount(back.y_train).tolist() == [6000] * 10


def test_tf_reads_it_without_crowdd(tmp_path: Path) -> None:
    """The snippet in docs/dataset-format.md, against a converted file."""
    tf = pytest.importorskip("tensorflow")
    arrays = ArraySet(
        np.arange(5 * 6, dtype=np.uint8).reshape(5, 2, 3) * 8,
        np.array([0, 1, 2, 1, 0]),
        np.arange(2 * 6, dtype=np.uint8).reshape(2, 2, 3),
        np.array([2, 2]),
    )
    floats = ArraySet(
        arrays.x_train.astype(np.float64) - 0.5, arrays.y_train, arrays.x_test - 0.25, arrays.y_test
    )
    for src in (arrays, floats):
        prepared = convert(src, tmp_path / "out")
        manifest = json.loads(prepared.manifest_path.read_bytes())
        lay = manifest["layout"]
        feature_dtype = {"uint8": tf.uint8, "float32": tf.float32}[lay["feature_dtype"]]
        r = lay["record_bytes"]

        def parse(record, r=r, lay=lay, feature_dtype=feature_dtype):  # type: ignore[no-untyped-def]
            label = tf.io.decode_raw(tf.strings.substr(record, 0, 4), tf.int32, little_endian=True)[0]
            x = tf.io.decode_raw(tf.strings.substr(record, 4, r - 4), feature_dtype, little_endian=True)
            x = tf.reshape(tf.cast(x, tf.float32) * lay["scale"], lay["feature_shape"])
            return x, label

        path = str(prepared.data_path)
        train = tf.data.FixedLengthRecordDataset(path, r, header_bytes=0, footer_bytes=lay["test_count"] * r)
        test = tf.data.FixedLengthRecordDataset(path, r, header_bytes=lay["test_offset"], footer_bytes=0)
        for ds, x, y in ((train, src.x_train, src.y_train), (test, src.x_test, src.y_test)):
            got = list(ds.map(parse).as_numpy_iterator())
            assert [int(lbl) for _, lbl in got] == list(y)
            np.testing.assert_allclose(
                np.stack([g for g, _ in got]), x.astype(np.float32) * np.float32(lay["scale"]), rtol=1e-6
            )


# ---------------------------------------------------------------- bad input


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match=r"nope\.npz: no such file"):
        load(tmp_path / "nope.npz")
    with pytest.raises(DatasetError, match=r"nope\.npz: no such file"):
        convert(tmp_path / "nope.npz", tmp_path / "out")
    src = write_csv(tmp_path / "d.csv", [[0, 1], [1, 2]])
    with pytest.raises(DatasetError, match=r"t\.csv: no such file"):
        load(src, test_file=tmp_path / "t.csv")


def test_unknown_format(tmp_path: Path) -> None:
    p = tmp_path / "data.parquet"
    p.write_bytes(b"x")
    with pytest.raises(DatasetError, match=r"data\.parquet: unknown dataset format"):
        load(p)


def test_idx_dir_missing_file(tmp_path: Path) -> None:
    d = write_idx_dir(tmp_path / "d", small_arrays())
    (d / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DatasetError, match=r"no t10k-labels-idx1-ubyte\[\.gz\]"):
        load(d)


def test_wrong_idx_magic(tmp_path: Path) -> None:
    d = write_idx_dir(tmp_path / "d", small_arrays(), gz=False)
    bad = d / "train-images-idx3-ubyte"
    bad.write_bytes(b"\x12\x34" + bad.read_bytes()[2:])
    with pytest.raises(DatasetError, match=r"train-images-idx3-ubyte: not an IDX file \(bad magic 1234"):
        load(d)
    bad.write_bytes(b"\x00\x00\x07\x03" + bytes(100))  # unknown element type
    with pytest.raises(DatasetError, match="not an IDX file"):
        load(d)
    bad.write_bytes(b"")
    with pytest.raises(DatasetError, match="bad magic empty"):
        load(d)


def test_idx_count_mismatch(tmp_path: Path) -> None:
    arrays = small_arrays()
    d = write_idx_dir(tmp_path / "d", arrays)
    (d / "train-labels-idx1-ubyte.gz").write_bytes(gzip.compress(idx_bytes(np.zeros(11, np.uint8))))
    with pytest.raises(DatasetError, match=r"train-images-idx3-ubyte\.gz has 12 images but .*train-labels.* has 11"):
        load(d)


def test_idx_wrong_dims(tmp_path: Path) -> None:
    d = write_idx_dir(tmp_path / "d", small_arrays())
    (d / "train-labels-idx1-ubyte.gz").write_bytes(gzip.compress(idx_bytes(np.zeros((12, 2), np.uint8))))
    with pytest.raises(DatasetError, match="label file needs 1 dimension"):
        load(d)


def test_truncated_gzip(tmp_path: Path) -> None:
    d = write_idx_dir(tmp_path / "d", small_arrays())
    p = d / "t10k-images-idx3-ubyte.gz"
    raw = p.read_bytes()
    p.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(DatasetError, match=r"t10k-images-idx3-ubyte\.gz: truncated or corrupt gzip"):
        load(d)
    p.write_bytes(raw[:-4] + b"\xff\xff\xff\xff")  # bad size trailer
    with pytest.raises(DatasetError, match="truncated or corrupt gzip"):
        load(d)


def test_truncated_idx_body_and_header(tmp_path: Path) -> None:
    d = write_idx_dir(tmp_path / "d", small_arrays(), gz=False)
    p = d / "train-images-idx3-ubyte"
    raw = p.read_bytes()
    p.write_bytes(raw[:-5])
    with pytest.raises(DatasetError, match=r"train-images-idx3-ubyte: truncated IDX body: shape \(12, 3, 2\) needs 72"):
        load(d)
    p.write_bytes(raw + b"zz")
    with pytest.raises(DatasetError, match="2 unexpected bytes after the IDX body"):
        load(d)
    p.write_bytes(raw[:9])
    with pytest.raises(DatasetError, match="truncated IDX header"):
        load(d)


def test_ragged_csv(tmp_path: Path) -> None:
    src = tmp_path / "r.csv"
    src.write_text("label,a,b\n0,1,2\n1,3,4\n\n0,5\n1,6,7\n")
    with pytest.raises(DatasetError, match=r"r\.csv line 5: ragged row: 2 columns, expected 3"):
        load(src)


def test_non_numeric_csv(tmp_path: Path) -> None:
    src = tmp_path / "n.csv"
    src.write_text("0,1,2\n1,3,x4\n")
    with pytest.raises(DatasetError, match=r"n\.csv line 2, column 3: non-numeric value 'x4'"):
        load(src)


def test_csv_test_file_columns_differ(tmp_path: Path) -> None:
    src = write_csv(tmp_path / "a.csv", [[0, 1, 2], [1, 2, 3]])
    test = write_csv(tmp_path / "b.csv", [[0, 1]])
    with pytest.raises(DatasetError, match=r"b\.csv has 2 columns but .*a\.csv has 3"):
        load(src, test_file=test)


def test_csv_split_options(tmp_path: Path) -> None:
    src = write_csv(tmp_path / "a.csv", [[0, 1], [1, 2], [0, 3]])
    with pytest.raises(DatasetError, match="not both"):
        load(src, test_file=src, test_fraction=0.5)
    for bad in (0.0, 1.0, -0.1, 2):
        with pytest.raises(DatasetError, match="test fraction must be between 0 and 1"):
            load(src, test_fraction=bad)
    with pytest.raises(DatasetError, match="too few"):
        load(src, test_fraction=0.01)
    npz = tmp_path / "a.npz"
    np.savez(npz, **vars(small_arrays()))
    with pytest.raises(DatasetError, match="applies to CSV and image folders only"):
        load(npz, test_fraction=0.5)


def test_csv_only_label_column(tmp_path: Path) -> None:
    src = write_csv(tmp_path / "a.csv", [[0], [1]])
    with pytest.raises(DatasetError, match="at least one feature column"):
        load(src)


@pytest.mark.parametrize(
    ("labels", "pattern", "csv_pattern"),
    [
        ([0, 1, -1], r"y_train: negative label -1 at index 2", r"line 3, column 1 \(the label\): label -1 is negative"),
        ([0, 1.5, 1], r"y_train: non-integer label 1\.5 at index 1",
         r"line 2, column 1 \(the label\): label 1\.5 is not a class number .*--task regression"),
        ([0, 1, 10**9], r"y_train: label 1000000000 at index 2 out of range 0\.\.99999",
         r"line 3, column 1 \(the label\): label 1000000000 is out of range 0\.\.99999"),
        ([0, 0, 0], r"every label is 0", r"every label is 0"),
    ],
)
def test_bad_labels(tmp_path: Path, labels: list[float], pattern: str, csv_pattern: str) -> None:
    npz = tmp_path / "l.npz"
    np.savez(npz, x_train=np.ones((3, 2)), y_train=np.array(labels), x_test=np.ones((1, 2)), y_test=np.array([0]))
    with pytest.raises(DatasetError, match=rf"l\.npz: {pattern}"):
        load(npz)
    rows = [[lab, 1, 2] for lab in labels]
    src = write_csv(tmp_path / "l.csv", rows)
    test = write_csv(tmp_path / "t.csv", [[0, 1, 2]])
    with pytest.raises(DatasetError, match=rf"l\.csv:? {csv_pattern}"):
        load(src, test_file=test)


def test_csv_errors_name_the_line_and_column_in_the_file_not_the_shuffled_split(tmp_path: Path) -> None:
    rows = "".join(f"{i % 3},{i},{i * 0.5}\n" for i in range(40))
    src = tmp_path / "s.csv"
    src.write_text("label,a,b\n" + rows + "\n2.5,1,1\n")  # a blank line, then a float target on line 43
    with pytest.raises(DatasetError, match=r"s\.csv line 43, column 1 \(the label\): label 2\.5 is not a class number"):
        load(src)
    src.write_text("label,a,b\n" + rows.replace("7,3.5", "7,nan") )  # NaN parses as a float: named anyway
    with pytest.raises(DatasetError, match=r"s\.csv line 9, column 3: nan is not a finite number"):
        load(src)
    src.write_text("label,a,b\n" + rows.replace("\n1,10,", "\n1,inf,"))
    with pytest.raises(DatasetError, match=r"s\.csv line 12, column 2: inf is not a finite number"):
        load(src)


def test_a_regression_target_is_not_silently_a_classifier(tmp_path: Path) -> None:
    """scikit-learn's diabetes: 442 rows, integer targets 25..346 — not 347 classes."""
    rng = np.random.default_rng(0)
    y = rng.integers(25, 347, 442)
    x = rng.normal(size=(442, 10))
    src = write_csv(tmp_path / "diabetes.csv", np.column_stack([y, x]).tolist())
    with pytest.raises(DatasetError, match=r"diabetes\.csv: labels: \d+ distinct values up to \d+ make \d+ classes for "
                                           r"442 rows \(at most 221\): this looks like a quantity to predict: use --task regression"):
        load(src)
    arrays = load(src, task="regression")  # what the host meant
    layout = datasets.check(arrays)
    assert layout.task == "regression" and layout.num_classes == 1
    prepared = datasets.convert(src, tmp_path / "out", task="regression")
    back = datasets.read_canonical(prepared.data_path, prepared.manifest.layout)
    assert back.y_train.dtype == np.float32 and set(back.y_train.tolist()) <= set(y.astype(float).tolist())


def test_regression_targets_are_any_finite_number(tmp_path: Path) -> None:
    src = tmp_path / "r.csv"
    src.write_text("x,price\n" + "".join(f"{i},{i * 1.5 - 3}\n" for i in range(30)))
    arrays = load(src, label="price", task="regression")
    assert sorted(np.concatenate([arrays.y_train, arrays.y_test]).tolist()) == [i * 1.5 - 3 for i in range(30)]
    src.write_text("x,price\n" + "".join(f"{i},{i * 1.5}\n" for i in range(30)) + "4,inf\n")
    with pytest.raises(DatasetError, match=r"r\.csv line 32, column 2: inf is not a finite number"):
        load(src, label="price", task="regression")
    with pytest.raises(DatasetError, match="task must be one of classification, regression"):
        load(src, task="ranking")


def test_labels_with_wide_gaps_are_refused(tmp_path: Path) -> None:
    rows = [[0 if i % 2 else 99999, i, 1] for i in range(50)]
    src = write_csv(tmp_path / "gaps.csv", rows)
    with pytest.raises(DatasetError, match=r"gaps\.csv: labels: \{0, 99999\} leave 99998 of the class numbers "
                                           r"0\.\.99999 unused \(the model would need 100000 outputs for 2 classes\)"):
        load(src)
    ok = write_csv(tmp_path / "ok.csv", [[1 + i % 3, i, 1] for i in range(50)])  # 0 unused: fine
    assert datasets.check(load(ok)).num_classes == 4


def test_bad_label_shapes() -> None:
    arrays = small_arrays()
    arrays.y_train = np.eye(3)[arrays.y_train]  # one-hot
    with pytest.raises(DatasetError, match="one class index per sample"):
        datasets.check(arrays)
    arrays = small_arrays()
    arrays.y_train = arrays.y_train[:, None]  # (N, 1) is fine
    datasets.check(arrays)


def test_empty_dataset(tmp_path: Path) -> None:
    npz = tmp_path / "e.npz"
    np.savez(npz, x_train=np.zeros((0, 4)), y_train=np.zeros(0), x_test=np.zeros((0, 4)), y_test=np.zeros(0))
    with pytest.raises(DatasetError, match=r"e\.npz: empty dataset"):
        load(npz)
    empty = tmp_path / "e.csv"
    empty.write_text("label,a\n")
    with pytest.raises(DatasetError, match=r"e\.csv: no data rows"):
        load(empty)
    empty.write_text("")
    with pytest.raises(DatasetError, match=r"e\.csv: no data rows"):
        load(empty)


def test_npz_missing_keys(tmp_path: Path) -> None:
    npz = tmp_path / "k.npz"
    np.savez(npz, x_train=np.ones((2, 2)), y_train=np.array([0, 1]))
    with pytest.raises(DatasetError, match=r"k\.npz: missing array\(s\) x_test, y_test"):
        load(npz)


def test_npz_not_a_zip_and_object_arrays(tmp_path: Path) -> None:
    npz = tmp_path / "z.npz"
    npz.write_bytes(b"PK\x03\x04 not really")
    with pytest.raises(DatasetError, match=r"z\.npz: not a readable \.npz"):
        load(npz)
    np.savez(
        npz,
        x_train=np.array([{"a": 1}], dtype=object),
        y_train=np.array([0]),
        x_test=np.ones((1, 1)),
        y_test=np.array([0]),
    )
    with pytest.raises(DatasetError, match=r"z\.npz: cannot read the arrays"):
        load(npz)


def test_xy_length_mismatch(tmp_path: Path) -> None:
    npz = tmp_path / "m.npz"
    a = small_arrays()
    np.savez(npz, x_train=a.x_train, y_train=a.y_train[:-1], x_test=a.x_test, y_test=a.y_test)
    with pytest.raises(DatasetError, match=r"m\.npz: x_train has 12 samples but y_train has 11 labels"):
        load(npz)


def test_feature_problems() -> None:
    a = small_arrays()
    a.x_test = np.zeros((5, 2, 3), np.uint8)
    with pytest.raises(DatasetError, match=r"test samples have shape \(2, 3\) but training samples \(3, 2\)"):
        datasets.check(a)
    a = small_arrays()
    a.x_train = a.x_train.astype(np.float64)
    a.x_train[0, 0, 0] = np.nan
    with pytest.raises(DatasetError, match="NaN or infinity"):
        datasets.check(a)
    a = small_arrays()
    a.x_train = np.array(["a"] * 12)
    with pytest.raises(DatasetError, match="non-numeric features"):
        datasets.check(a)


def test_write_canonical_is_atomic(tmp_path: Path) -> None:
    target = tmp_path / "f.data"
    target.write_bytes(b"old")
    bad = small_arrays()
    bad.y_train = -bad.y_train - 1
    with pytest.raises(DatasetError):
        write_canonical(bad, target)
    assert target.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.data"]


def test_read_canonical_size_mismatch(tmp_path: Path) -> None:
    layout = write_canonical(small_arrays(), tmp_path / "f.data")
    with open(tmp_path / "f.data", "ab") as fh:
        fh.write(b"x")
    with pytest.raises(DatasetError, match=r"f\.data: 171 bytes, but the layout describes 170"):
        read_canonical(tmp_path / "f.data", layout)
    with pytest.raises(DatasetError, match="cannot read"):
        read_canonical(tmp_path / "gone.data", layout)


def test_bad_chunk_size(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="chunk size"):
        convert(small_arrays(), tmp_path, chunk_size=0)


def test_csv_label_column_by_name(tmp_path: Path) -> None:
    rows = "".join(f"{i},{i * 2},{i % 3}\n" for i in range(30))
    src = tmp_path / "named.csv"
    src.write_text("alcohol,ash,cultivar\n" + rows)
    arrays = load(src, label="cultivar")
    assert sorted(np.concatenate([arrays.y_train, arrays.y_test]).tolist()) == sorted(i % 3 for i in range(30))
    assert arrays.x_train.shape[1] == 2
    first = arrays.x_train[0]
    assert first[1] == 2 * first[0]  # the features keep their order, the label left them
    with pytest.raises(DatasetError, match=r"named\.csv line 1: no column named 'kind' \(the columns: alcohol, ash, cultivar\)"):
        load(src, label="kind")
    src.write_text("alcohol,ash,cultivar\n" + rows + "1,2,0.5\n")
    with pytest.raises(DatasetError, match=r"named\.csv line 32, column 3 \(the label\): label 0\.5 is not a class number"):
        load(src, label="cultivar")
    bare = write_csv(tmp_path / "bare.csv", [[0, 1, 2], [1, 2, 3]])
    with pytest.raises(DatasetError, match=r"needs a header row"):
        load(bare, label="cultivar")
    npz = tmp_path / "a.npz"
    np.savez(npz, x_train=np.ones((3, 2)), y_train=np.array([0, 1, 0]), x_test=np.ones((1, 2)), y_test=np.array([1]))
    with pytest.raises(DatasetError, match="label column applies to CSV only"):
        load(npz, label="y")


def test_a_gzip_bomb_is_inflated_no_further_than_its_idx_header_says(tmp_path: Path) -> None:
    """A dataset handed to the daemon (a system service) that inflates without end: an IDX
    header for 100 bytes followed by 512 MiB of zeros (about 0.5 MB compressed), and a header
    that claims an enormous body. Both are refused without inflating what follows; the control
    (an honest gzipped IDX) loads."""
    import tracemalloc
    import zlib

    header = bytes([0, 0, 0x08, 2]) + np.array([10, 10], ">u4").tobytes()
    comp = zlib.compressobj(9, zlib.DEFLATED, 31)
    parts = [comp.compress(header + bytes(100))]
    zeros = bytes(1 << 20)
    parts += [comp.compress(zeros) for _ in range(512)]
    bomb = tmp_path / "bomb-idx2-ubyte.gz"
    bomb.write_bytes(b"".join(parts) + comp.flush())
    assert bomb.stat().st_size < 2 << 20
    tracemalloc.start()
    try:
        with pytest.raises(DatasetError, match="unexpected bytes after the IDX body"):
            read_idx(bomb)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 16 << 20, f"inflated {peak:,} bytes"
    huge = tmp_path / "huge-idx3-ubyte.gz"
    huge.write_bytes(gzip.compress(bytes([0, 0, 0x08, 3]) + np.array([1 << 20, 1 << 20, 1 << 10], ">u4").tobytes()))
    with pytest.raises(DatasetError, match="at most 4,294,967,296"):
        read_idx(huge)
    honest = tmp_path / "honest-idx2-ubyte.gz"
    honest.write_bytes(gzip.compress(header + bytes(range(100))))
    assert read_idx(honest).reshape(-1).tolist() == list(range(100))


def test_a_gzipped_csv_is_inflated_no_further_than_the_cap(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A .csv.gz that inflates past the cap is refused as it is read (the cap lowered to 1 MiB
    here; 4 GiB in use); the control, the same rows under the cap, loads."""
    import crowdd.data.datasets as ds

    rows = b"".join(b"%d,%d,%d\n" % (i % 2, i, i + 1) for i in range(200_000))  # about 2.6 MB
    big = tmp_path / "big.csv.gz"
    big.write_bytes(gzip.compress(rows))
    monkeypatch.setattr(ds, "MAX_CSV_BYTES", 1 << 20)
    with pytest.raises(DatasetError, match="inflates past 1,048,576 bytes"):
        ds.read_csv_table(big)
    small = tmp_path / "small.csv.gz"
    small.write_bytes(gzip.compress(b"".join(rows.splitlines(keepends=True)[:5000])))
    assert ds.read_csv_table(small).shape[1] == 3


def test_an_npz_bomb_is_refused_before_it_is_inflated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An .npz is a zip: one whose arrays inflate past the cap (here lowered to 64 MiB; 512 MiB
    of zeros compress to about 0.5 MB) is refused from the sizes its members declare, with
    nothing inflated; the control (the same arrays under the cap) loads."""
    import tracemalloc

    from crowdd.data import datasets

    bomb = tmp_path / "bomb.npz"
    zeros = np.zeros((1 << 16, 1 << 10), np.uint8)  # 64 MiB ...
    labels = np.arange(1 << 16, dtype=np.int64) % 2
    np.savez_compressed(bomb, x_train=zeros, y_train=labels, x_test=zeros[:8], y_test=labels[:8])
    assert bomb.stat().st_size < 2 << 20
    monkeypatch.setattr(datasets, "MAX_NPZ_BYTES", 32 << 20)
    tracemalloc.start()
    try:
        with pytest.raises(DatasetError, match="uncompressed; at most 33,554,432 are read"):
            load(bomb)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 8 << 20, f"inflated {peak:,} bytes"
    monkeypatch.setattr(datasets, "MAX_NPZ_BYTES", 128 << 20)
    assert load(bomb).x_train.shape == (1 << 16, 1 << 10)
