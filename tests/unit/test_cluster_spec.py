"""host.cluster_spec / tf_base: the TF cluster every member's job sees (its private loopback)."""

from __future__ import annotations

import random

from crowdd.node.host import cluster_spec, tf_base
from crowdd.protocol.session import check_host_frame


def test_every_task_is_a_port_on_the_private_loopback() -> None:
    # worker task 0 is the host's, tasks 1.. its workers'; there is no parameter server
    assert cluster_spec(3, 21000) == {
        "worker": ["127.0.0.1:21000", "127.0.0.1:21001", "127.0.0.1:21002", "127.0.0.1:21003"],
    }
    assert cluster_spec(0, 30000) == {"worker": ["127.0.0.1:30000"]}


def test_the_cluster_passes_the_workers_check_of_a_train_frame() -> None:
    spec = cluster_spec(2, 22000)
    msg = check_host_frame({"type": "train", "cluster": spec, "index": 2})
    assert msg.cluster == spec  # type: ignore[union-attr]


def test_tf_base_leaves_room_for_every_task() -> None:
    rng = random.Random(1)
    for workers in (0, 1, 1024):
        for _ in range(200):
            base = tf_base(workers, rng)
            assert 20000 <= base and base + 1 + workers < 40000
