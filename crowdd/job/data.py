"""Reading the canonical dataset file with tf.data, and the paper's sharding modes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import tensorflow as tf

from crowdd.job.shards import holdout_count, holdout_every, segments, shard_bounds, steps_per_epoch
from crowdd.job.spec import INDEX_FILE
from crowdd.data.manifest import Layout


def _decode(layout: Layout):
    feat_len = layout.record_bytes - layout.label_bytes
    out_dtype = tf.uint8 if layout.feature_dtype == "uint8" else tf.float32
    label_dtype = tf.float32 if layout.task == "regression" else tf.int32
    shape = [-1, *layout.feature_shape]

    def decode(records: tf.Tensor, widx: tf.Tensor):
        labels = tf.io.decode_raw(tf.strings.substr(records, 0, 4), label_dtype, little_endian=True)
        feats = tf.io.decode_raw(tf.strings.substr(records, 4, feat_len), out_dtype, little_endian=True)
        x = tf.reshape(tf.cast(feats, tf.float32), shape)  # raw: the model scales (build_model)
        return x, tf.reshape(labels, [-1]), widx

    return decode


def worker_dataset(path: str, layout: Layout, sharding: str, num_workers: int, batch: int,
                   holdout_every: int = 0) -> tf.data.Dataset:
    """Infinite shuffled batches ``(x, y, worker_index)`` of this worker's shard, without the
    records the host holds back (every ``holdout_every``-th training record, :func:`holdout`).

    Runs ON THE WORKER: ``path`` and :data:`INDEX_FILE` resolve against the worker
    process's working directory.
    """
    n = layout.train_count
    rb = layout.record_bytes
    widx = tf.strings.to_number(tf.strings.strip(tf.io.read_file(INDEX_FILE)), out_type=tf.int32)
    count, span = segments(sharding, num_workers)
    if sharding == "full":
        start, end = tf.constant(0, tf.int64), tf.constant(n, tf.int64)
    else:
        seg = n // count
        w = tf.cast(widx, tf.int64)
        start = w * seg
        end = tf.where(w + span >= count, tf.constant(n, tf.int64), (w + span) * seg)
    header = start * rb
    footer = (n - end) * rb + layout.test_count * rb
    ds = tf.data.FixedLengthRecordDataset(path, rb, header_bytes=header, footer_bytes=footer, buffer_size=1 << 20)
    if holdout_every > 1:
        every = tf.constant(holdout_every, tf.int64)
        ds = ds.enumerate().filter(lambda i, _r: (start + i) % every != 0).map(lambda _i, r: r)
    ds = ds.cache().shuffle(tf.maximum(end - start, 1), reshuffle_each_iteration=True).repeat()
    ds = ds.batch(batch).map(lambda r: _decode(layout)(r, widx), num_parallel_calls=1)
    return ds.prefetch(2)


def read_split(path: Path, layout: Layout, split: str) -> tuple[np.ndarray, np.ndarray]:
    """The train or test split as float32 features (raw, as the user gave them: the model
    scales them itself) and int32 labels, with numpy."""
    feat = np.dtype("u1") if layout.feature_dtype == "uint8" else np.dtype("<f4")
    label = np.dtype("<f4") if layout.task == "regression" else np.dtype("<i4")
    rec = np.dtype([("y", label), ("x", feat, (layout.feature_count,))])
    offset, count = (0, layout.train_count) if split == "train" else (layout.test_offset, layout.test_count)
    arr = np.fromfile(path, dtype=rec, count=count, offset=offset)
    if len(arr) != count:
        raise ValueError(f"{path}: expected {count} {split} records, found {len(arr)}")
    x = arr["x"].astype(np.float32)
    y = arr["y"].astype(np.float32 if layout.task == "regression" else np.int32)
    return x.reshape(count, *layout.feature_shape), y


def read_holdout(path: Path, layout: Layout, every: int) -> tuple[np.ndarray, np.ndarray]:
    """The held-back training records (every ``every``-th), as :func:`read_split` gives them."""
    feat = np.dtype("u1") if layout.feature_dtype == "uint8" else np.dtype("<f4")
    label = np.dtype("<f4") if layout.task == "regression" else np.dtype("<i4")
    rec = np.dtype([("y", label), ("x", feat, (layout.feature_count,))])
    arr = np.memmap(path, dtype=rec, mode="r", shape=(layout.train_count,))[::every]
    x = np.asarray(arr["x"], np.float32).reshape(len(arr), *layout.feature_shape)
    y = np.asarray(arr["y"]).astype(np.float32 if layout.task == "regression" else np.int32)
    return x, y


def target_stats(path: Path, layout: Layout) -> tuple[float, float]:
    """Mean and standard deviation of the training targets (regression); the model predicts
    in these units and the loss is measured in standard deviations."""
    _, y = read_split(path, layout, "train")
    std = float(np.std(y, dtype=np.float64))
    return float(np.mean(y, dtype=np.float64)), std if std > 0 else 1.0


def train_mean(path: Path, layout: Layout, chunk: int = 10_000) -> np.ndarray:
    """Per-feature mean of the training split's raw features, float32, in chunks."""
    return train_moments(path, layout, chunk)[0]


def train_moments(path: Path, layout: Layout, chunk: int = 10_000) -> tuple[np.ndarray, np.ndarray]:
    """Per-feature mean and variance of the training split's raw features (float32, shape
    ``feature_shape``), in chunks."""
    feat = np.dtype("u1") if layout.feature_dtype == "uint8" else np.dtype("<f4")
    rec = np.dtype([("y", "<i4"), ("x", feat, (layout.feature_count,))])  # the label's bytes, whatever its type
    n = layout.train_count
    total = np.zeros(layout.feature_count, np.float64)
    squares = np.zeros(layout.feature_count, np.float64)
    for start in range(0, n, chunk):
        count = min(chunk, n - start)
        arr = np.fromfile(path, dtype=rec, count=count, offset=start * rec.itemsize)
        if len(arr) != count:
            raise ValueError(f"{path}: expected {n} training records, found {start + len(arr)}")
        x = arr["x"].astype(np.float64)
        total += x.sum(axis=0)
        squares += np.square(x).sum(axis=0)
    mean = total / max(n, 1)
    var = np.maximum(squares / max(n, 1) - np.square(mean), 0.0)
    shape = layout.feature_shape
    return mean.astype(np.float32).reshape(shape), var.astype(np.float32).reshape(shape)


__all__ = ["holdout_count", "holdout_every", "read_holdout", "read_split", "segments", "shard_bounds", "steps_per_epoch", "target_stats", "train_mean", "train_moments",
           "worker_dataset"]
