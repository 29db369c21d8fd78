"""The matchmaker's pure parts: hello validation, admission, queues and the grouping rule."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

from crowdd import wire
from crowdd.testing.identities import hello_identity
from crowdd.config import MatchmakerConfig
from crowdd.hyperparams import Job
from crowdd.matchmaker.grouping import Grouper, Waiter, admit, group_frames, matches, source
from crowdd.protocol.matchmaker import Hello, check_hello, observed_address

DIGEST = "0f" * 32


def host(name: str = "h", *, tag: str = "", want_tag: str = "", **job: Any) -> Hello:
    j = Job(**{"workers": 1, "min_workers": 1, "wait": 60.0, **job})
    return Hello(
        "host", name, "10.0.0.1", {"data": 1, "session": 2, "tf": [3, 4]}, tag, want_tag, j,
        {"digest": DIGEST, "size": 1, "name": "d"}, **hello_identity(name),
    )


def worker(name: str = "w", *, tag: str = "", want_tag: str = "", reachable: bool = True) -> Hello:
    return Hello("worker", name, "10.0.0.2", {"data": 5, "session": 6, "tf": [7]}, tag, want_tag,
                 reachable=reachable, **hello_identity(name))


class Queue:
    """A Grouper fed with ids in arrival order."""

    def __init__(self) -> None:
        self.g = Grouper()
        self.n = 0

    def add(self, hello: Hello, at: float = 0.0) -> int:
        self.n += 1
        self.g.add(Waiter(self.n, hello, at))
        return self.n

    def form(self, now: float = 0.0) -> list[list[str]]:
        return [[m.hello.name for m in grp.members] for grp in self.g.form_groups(now)]


# --------------------------------------------------------------------------- grouping


def test_nothing_without_hosts_or_workers() -> None:
    q = Queue()
    assert q.form() == []
    q.add(worker("w1"))
    assert q.form() == []
    q2 = Queue()
    q2.add(host("h", workers=1))
    assert q2.form() == []


def test_fifo_oldest_workers() -> None:
    q = Queue()
    for i in range(4):
        q.add(worker(f"w{i}"))
    q.add(host("h", workers=2))
    assert q.form() == [["h", "w0", "w1"]]
    assert [w.hello.name for w in q.g.workers.values()] == ["w2", "w3"]
    assert not q.g.hosts


def test_oldest_host_first_and_several_groups_at_once() -> None:
    q = Queue()
    q.add(host("h1", workers=1))
    q.add(host("h2", workers=2))
    q.add(host("h3", workers=1))
    for i in range(4):
        q.add(worker(f"w{i}"))
    assert q.form() == [["h1", "w0"], ["h2", "w1", "w2"], ["h3", "w3"]]
    assert len(q.g) == 0


def test_unsatisfiable_host_skipped_not_blocking() -> None:
    q = Queue()
    q.add(host("big", workers=3, min_workers=3))
    q.add(host("small", workers=1))
    q.add(worker("w0"))
    assert q.form() == [["small", "w0"]]
    assert [h.hello.name for h in q.g.hosts.values()] == ["big"]


def test_min_workers_after_wait() -> None:
    q = Queue()
    q.add(host("h", workers=3, min_workers=2, wait=10), at=100.0)
    q.add(worker("w0"), at=101.0)
    q.add(worker("w1"), at=102.0)
    assert q.form(now=109.9) == []
    assert q.g.next_deadline(109.9) == 110.0
    assert q.form(now=110.0) == [["h", "w0", "w1"]]


def test_min_workers_not_met_after_wait() -> None:
    q = Queue()
    q.add(host("h", workers=3, min_workers=2, wait=1), at=0.0)
    q.add(worker("w0"))
    assert q.form(now=5.0) == []
    assert q.g.next_deadline(5.0) is None  # past its wait: only a new worker can help
    q.add(worker("w1"))
    assert q.form(now=5.0) == [["h", "w0", "w1"]]


def test_full_group_before_wait() -> None:
    q = Queue()
    q.add(host("h", workers=2, min_workers=1, wait=100), at=0.0)
    q.add(worker("w0"))
    assert q.form(now=1.0) == []
    q.add(worker("w1"))
    q.add(worker("w2"))
    assert q.form(now=1.0) == [["h", "w0", "w1"]]


def test_after_wait_takes_up_to_wanted() -> None:
    q = Queue()
    q.add(host("h", workers=2, min_workers=0, wait=0), at=0.0)
    assert q.form(now=0.0) == [["h"]]  # min 0 after a wait of 0: alone


def test_zero_workers_forms_alone_at_once() -> None:
    q = Queue()
    q.add(worker("w"))
    q.add(host("solo", workers=0, min_workers=0, wait=60))
    assert q.form() == [["solo"]]
    assert len(q.g.workers) == 1


def test_host_targeting() -> None:
    q = Queue()
    q.add(host("plain"))
    q.add(host("lab", tag="lab"))
    q.add(worker("picky", want_tag="lab"))
    assert q.form() == [["lab", "picky"]]
    q.add(worker("any"))
    assert q.form() == [["plain", "any"]]


def test_host_wants_tagged_workers_skipping_older_ones() -> None:
    q = Queue()
    q.add(worker("cpu"))
    q.add(worker("gpu1", tag="gpu"))
    q.add(worker("gpu2", tag="gpu"))
    q.add(host("h", want_tag="gpu", workers=2))
    assert q.form() == [["h", "gpu1", "gpu2"]]
    assert [w.hello.name for w in q.g.workers.values()] == ["cpu"]


@pytest.mark.parametrize(
    ("h", "w", "ok"),
    [
        (host(), worker(), True),
        (host(tag="a"), worker(), True),
        (host(tag="a"), worker(want_tag="a"), True),
        (host(tag="b"), worker(want_tag="a"), False),
        (host(), worker(want_tag="a"), False),
        (host(want_tag="x"), worker(tag="x"), True),
        (host(want_tag="x"), worker(), False),
        (host(tag="a", want_tag="x"), worker(tag="x", want_tag="a"), True),
    ],
)
def test_matches(h: Hello, w: Hello, ok: bool) -> None:
    assert matches(h, w) is ok


def test_remove_and_positions() -> None:
    q = Queue()
    a, b, c = q.add(worker("a")), q.add(worker("b")), q.add(worker("c"))
    hid = q.add(host("h", workers=5))
    assert q.g.positions() == {a: 1, b: 2, c: 3, hid: 1}
    assert q.g.remove(b) is not None
    assert q.g.remove(b) is None
    assert q.g.positions() == {a: 1, c: 2, hid: 1}
    assert a in q.g and b not in q.g
    assert q.g.remove(hid) is not None and not q.g.hosts


def test_add_twice_refused() -> None:
    g = Grouper()
    g.add(Waiter(1, worker(), 0.0))
    with pytest.raises(ValueError, match="already"):
        g.add(Waiter(1, worker(), 0.0))


def test_next_deadline_earliest() -> None:
    q = Queue()
    q.add(host("a", wait=30), at=0.0)
    q.add(host("b", wait=5), at=10.0)
    assert q.g.next_deadline(0.0) == 15.0
    assert q.g.next_deadline(20.0) == 30.0
    assert q.g.next_deadline(31.0) is None


def test_group_frames_identical_but_index() -> None:
    q = Queue()
    w1, w2 = q.add(worker("w1")), q.add(worker("w2", reachable=False))  # w2 is behind a NAT
    hid = q.add(host("h", workers=2, epochs=4))
    (grp,) = q.g.form_groups(0.0)
    frames = group_frames(grp, "gid", "tok")
    assert [frames[i]["index"] for i in (hid, w1, w2)] == [0, 1, 2]
    assert len({str({**f, "index": 0}) for f in frames.values()}) == 1
    f = frames[w1]
    assert f["type"] == "group" and f["group_id"] == "gid" and f["token"] == "tok"
    assert f["members"] == [
        {"index": 0, "role": "host", "name": "h", "address": "10.0.0.1", "ports": {"data": 1, "session": 2, "tf": [3, 4]},
         **hello_identity("h"), "reachable": True},
        {"index": 1, "role": "worker", "name": "w1", "address": "10.0.0.2", "ports": {"data": 5, "session": 6, "tf": [7]},
         **hello_identity("w1"), "reachable": True},
        {"index": 2, "role": "worker", "name": "w2", "address": "10.0.0.2", "ports": {"data": 5, "session": 6, "tf": [7]},
         **hello_identity("w2"), "reachable": False},
    ]
    assert f["job"]["epochs"] == 4 and f["dataset"]["digest"] == DIGEST
    wire.encode(f)  # it is a valid frame


# --------------------------------------------------------------------------- admission


def test_admit() -> None:
    cfg = dataclasses.replace(MatchmakerConfig(), max_clients=3, max_per_ip=2)
    assert admit(0, 0, cfg) is None
    assert admit(2, 1, cfg) is None
    full = admit(3, 0, cfg)
    assert full is not None and full.code is wire.ErrorCode.BUSY and "full" in full.message
    per_ip = admit(1, 2, cfg)
    assert per_ip is not None and per_ip.code is wire.ErrorCode.BUSY and "your address" in per_ip.message


# --------------------------------------------------------------------------- hello validation


def hello_frame(role: Any = "worker", **kw: Any) -> dict[str, Any]:
    frame: dict[str, Any] = {
        "type": "hello", "proto": wire.PROTO, "role": role, "name": "n",
        "ports": {"data": 1, "session": 2, "tf": [3] if role == "worker" else [3, 4]},
        **hello_identity("n"),
    }
    if role == "host":
        frame["job"] = {"workers": 2}
        frame["dataset"] = {"digest": DIGEST, "size": 10, "name": "d"}
    frame.update(kw)
    return {k: v for k, v in frame.items() if v is not ...}


def test_check_hello_worker_and_host() -> None:
    w = check_hello(hello_frame(tag="t", want_tag="u"), "192.0.2.5")
    assert (w.role, w.name, w.address, w.tag, w.want_tag, w.job) == ("worker", "n", "192.0.2.5", "t", "u", None)
    h = check_hello(hello_frame("host", extra="ignored"), "192.0.2.6")
    assert h.job is not None and h.job.workers == 2 and h.dataset == {"digest": DIGEST, "size": 10, "name": "d"}


def test_advertise_only_when_trusted() -> None:
    f = hello_frame(advertise="peer.example.org")
    assert check_hello(f, "192.0.2.5").address == "192.0.2.5"
    assert check_hello(f, "192.0.2.5", trust_advertised=True).address == "peer.example.org"
    assert check_hello(hello_frame(advertise="2001:db8::1"), "x", trust_advertised=True).address == "2001:db8::1"


def test_observed_address() -> None:
    assert observed_address("::ffff:192.0.2.1") == "192.0.2.1"
    assert observed_address("2001:db8::1") == "2001:db8::1"
    assert observed_address("10.1.2.3") == "10.1.2.3"


@pytest.mark.parametrize(
    ("frame", "code", "field"),
    [
        (hello_frame(type="heartbeat"), "bad_frame", None),
        (hello_frame(proto=...), "version", None),
        (hello_frame(proto="crowdd/0"), "version", None),
        (hello_frame(role=...), "bad_field", "role"),
        (hello_frame(role="admin"), "bad_field", "role"),
        (hello_frame(name=...), "bad_field", "name"),
        (hello_frame(name="a\nb"), "bad_field", "name"),
        (hello_frame(name=["x"]), "bad_field", "name"),
        (hello_frame(ports=...), "bad_field", "ports"),
        (hello_frame(ports=[1, 2]), "bad_field", "ports"),
        (hello_frame(ports={"data": 1, "session": 2}), "bad_field", "ports.tf"),
        (hello_frame(ports={"data": 1, "session": 2, "tf": [3, 4]}), "bad_field", "ports.tf"),
        (hello_frame("host", ports={"data": 1, "session": 2, "tf": [3]}), "bad_field", "ports.tf"),
        (hello_frame(ports={"data": True, "session": 2, "tf": [3]}), "bad_field", "ports.data"),
        (hello_frame(ports={"data": 1, "session": "2", "tf": [3]}), "bad_field", "ports.session"),
        (hello_frame(ports={"data": 1, "session": 2, "tf": [0]}), "bad_field", "ports.tf"),
        (hello_frame(tag="x" * 65), "bad_field", "tag"),
        (hello_frame(want_tag=None), "bad_field", "want_tag"),
        (hello_frame(advertise=12), "bad_field", "advertise"),
        (hello_frame(advertise="a b"), "bad_field", "advertise"),
        (hello_frame(advertise="-bad-.example"), "bad_field", "advertise"),
        (hello_frame(job={}), "bad_field", "job"),
        (hello_frame(dataset={}), "bad_field", "dataset"),
        (hello_frame("host", job=...), "bad_field", "job"),
        (hello_frame("host", job=[]), "bad_field", "job"),
        (hello_frame("host", job={"learning_rate": 0}), "bad_field", "job.learning_rate"),
        (hello_frame("host", job={"workers": 1, "min_workers": 2}), "bad_field", "job.min_workers"),
        (hello_frame("host", job={"hidden": "x"}), "bad_field", "job.hidden"),
        (hello_frame("host", dataset=...), "bad_field", "dataset"),
        (hello_frame("host", dataset={"digest": DIGEST.upper(), "size": 1, "name": "d"}), "bad_field", "dataset.digest"),
        (hello_frame("host", dataset={"digest": DIGEST, "size": 1.0, "name": "d"}), "bad_field", "dataset.size"),
        (hello_frame("host", dataset={"digest": DIGEST, "size": 1, "name": ""}), "bad_field", "dataset.name"),
    ],
)
def test_check_hello_rejects(frame: dict[str, Any], code: str, field: str | None) -> None:
    with pytest.raises(wire.WireError) as info:
        check_hello(frame, "192.0.2.1")
    assert info.value.code.value == code
    assert info.value.field == field


def test_an_ipv6_slash_64_is_one_source_and_an_ipv4_address_is_one() -> None:
    """The per-source limits count an IPv6 /64 as one (issue 29: one host is handed a whole
    /64), each IPv4 address as one, and an IPv4-mapped address as its IPv4 address."""
    assert source("2001:db8:1:2::1") == source("2001:db8:1:2:ffff:ffff:ffff:ffff") == "2001:db8:1:2::/64"
    assert source("2001:db8:1:3::1") != source("2001:db8:1:2::1")  # the next /64: another source
    assert source("203.0.113.7") == "203.0.113.7" != source("203.0.113.8")
    assert source("::ffff:203.0.113.7") == "203.0.113.7"
    assert source("fe80::1%eth0") == "fe80::/64"
    assert source("?") == "?"

