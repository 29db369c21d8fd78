"""Open sessions (join in progress): the frames, made and checked, and the Grouper's rule."""

from __future__ import annotations

import copy
import dataclasses
from typing import Any

import pytest

from crowdd import wire
from crowdd.hyperparams import GroupSettings, Job
from crowdd.matchmaker.grouping import Grouper, Waiter, join_frames
from crowdd.plan import DatasetRef, MemberPorts, PlanMember, SessionPlan
from crowdd.protocol import matchmaker as mmp
from crowdd.testing.identities import identity

DIGEST = "cd" * 32
TOKEN = "t" * 32
GID = "0123456789abcdef"
JOB = Job(model="mlp", hidden=(32,), epochs=2, workers=3, min_workers=1, wait=5.0)
DATASET = DatasetRef(DIGEST, 4096, "digits")
SETTINGS = GroupSettings(route="chain", sync_every=10, steps_per_function=100, merge="sum", chunk_size=4096)
HOST_PORTS = MemberPorts(7001, 7002, (7003, 7004))


def _who(name: str) -> dict[str, Any]:
    ident = identity(name)
    return {"cert": ident.cert_pem, "fingerprint": ident.fingerprint}


def member(index: int, name: str, *, reachable: bool = True) -> PlanMember:
    role = "host" if index == 0 else "worker"
    ports = HOST_PORTS if index == 0 else MemberPorts(8000 + index, 8100 + index, (8200 + index,))
    return PlanMember(index, role, name, f"10.0.0.{index + 1}", ports, reachable=reachable, **_who(name))


def host_hello(name: str = "h", **kw: Any) -> dict[str, Any]:
    return mmp.make_hello("host", name, HOST_PORTS, job=JOB, dataset=DATASET, settings=SETTINGS, **_who(name), **kw)


def worker_hello(name: str = "w", **kw: Any) -> dict[str, Any]:
    return mmp.make_hello("worker", name, MemberPorts(9001, 9002, (9003,)), **_who(name), **kw)


def open_hello(members: tuple[PlanMember, ...] | None = None, free: int = 2, name: str = "h", **kw: Any) -> dict[str, Any]:
    if members is None:
        members = (member(0, name), member(1, "gone", reachable=False))
    return mmp.make_open(host_hello(name, **kw), GID, TOKEN, members, free)


def field_of(exc: pytest.ExceptionInfo[wire.WireError]) -> str | None:
    return exc.value.field


# --------------------------------------------------------------------------- open hello


def test_open_hello_round_trip() -> None:
    members = (member(0, "h"), member(1, "gone", reachable=False), member(2, "w2"))
    frame = open_hello(members, free=3, tag="lab")
    wire.encode(frame)  # a valid frame
    h = mmp.check_hello(frame, "192.0.2.7")
    assert h.role == "host" and h.tag == "lab" and h.job == JOB and h.settings == SETTINGS
    # member 0 is the host where the matchmaker sees it, whatever it wrote
    seen = (dataclasses.replace(members[0], address="192.0.2.7"), *members[1:])
    assert h.open == mmp.OpenSession(group_id=GID, token=TOKEN, members=seen, free=3)
    assert h.open.members[1].reachable is False


def test_a_plain_hello_opens_nothing() -> None:
    assert mmp.check_hello(host_hello(), "192.0.2.7").open is None


def test_make_open_is_for_a_host_and_a_count() -> None:
    with pytest.raises(ValueError, match="host"):
        mmp.make_open(worker_hello(), GID, TOKEN, (member(0, "h"),), 1)
    with pytest.raises(ValueError, match="free"):
        mmp.make_open(host_hello(), GID, TOKEN, (member(0, "h"),), -1)


def test_a_host_can_only_open_its_own_session() -> None:
    """Another host's hello (its own certificate) claiming the session of host "h"."""
    frame = mmp.make_open(host_hello("intruder"), GID, TOKEN, (member(0, "h"), member(1, "w1")), 1)
    with pytest.raises(wire.WireError) as exc:
        mmp.check_hello(frame, "192.0.2.7")
    assert field_of(exc) == "open.members[0].cert" and "its own session" in exc.value.message
    assert exc.value.code == wire.ErrorCode.BAD_FIELD


def test_a_worker_cannot_open_a_session() -> None:
    frame = {**worker_hello(), "open": open_hello()["open"]}
    with pytest.raises(wire.WireError) as exc:
        mmp.check_hello(frame, "192.0.2.7")
    assert field_of(exc) == "open"


def _set(path: list[Any], value: Any) -> Any:
    def mutate(f: dict[str, Any]) -> None:
        d: Any = f
        for k in path[:-1]:
            d = d[k]
        d[path[-1]] = value
    return mutate


def _del(path: list[Any]) -> Any:
    def mutate(f: dict[str, Any]) -> None:
        d: Any = f
        for k in path[:-1]:
            d = d[k]
        del d[path[-1]]
    return mutate


BAD_OPENS = [
    (_set(["open"], "yes"), "open"),
    (_set(["open"], None), "open"),
    (_del(["open", "group_id"]), "open.group_id"),
    (_set(["open", "group_id"], ""), "open.group_id"),
    (_set(["open", "group_id"], "g" * 65), "open.group_id"),
    (_set(["open", "token"], "short"), "open.token"),
    (_set(["open", "token"], 7), "open.token"),
    (_del(["open", "members"]), "open.members"),
    (_set(["open", "members"], []), "open.members"),
    (_set(["open", "members"], {"0": {}}), "open.members"),
    (_set(["open", "members", 1], "w1"), "open.members[1]"),
    (_set(["open", "members", 1, "index"], 2), "open.members[1].index"),
    (_set(["open", "members", 1, "role"], "host"), "open.members[1].role"),
    (_set(["open", "members", 0, "role"], "worker"), "open.members[0].role"),
    (_del(["open", "members", 1, "ports", "data"]), "open.members[1].ports.data"),
    (_set(["open", "members", 1, "ports", "tf"], [1, 2]), "open.members[1].ports.tf"),
    (_set(["open", "members", 1, "address"], ""), "open.members[1].address"),
    (_set(["open", "members", 1, "name"], ""), "open.members[1].name"),
    (_set(["open", "members", 1, "cert"], "hello"), "open.members[1].cert"),
    (_set(["open", "members", 1, "fingerprint"], "sha256:" + "0" * 64), "open.members[1].fingerprint"),
    (_set(["open", "members", 1, "reachable"], "no"), "open.members[1].reachable"),
    (_del(["open", "free"]), "open.free"),
    (_set(["open", "free"], -1), "open.free"),
    (_set(["open", "free"], True), "open.free"),
    (_set(["open", "free"], 1.0), "open.free"),
    (_set(["open", "free"], mmp.MAX_MEMBERS + 1), "open.free"),
    (_set(["open", "free"], mmp.MAX_MEMBERS - 1), "open.free"),  # 2 members + 1024 free > 1025
]


@pytest.mark.parametrize(("mutate", "field"), BAD_OPENS)
def test_a_bad_open_names_the_field(mutate: Any, field: str) -> None:
    frame = copy.deepcopy(open_hello())
    mutate(frame)
    with pytest.raises(wire.WireError) as exc:
        mmp.check_hello(frame, "192.0.2.7")
    assert field_of(exc) == field
    assert exc.value.code == wire.ErrorCode.BAD_FIELD


def test_an_open_session_with_a_shared_certificate_is_refused() -> None:
    frame = open_hello()
    frame["open"]["members"][1].update(cert=frame["open"]["members"][0]["cert"],
                                       fingerprint=frame["open"]["members"][0]["fingerprint"])
    with pytest.raises(wire.WireError, match="same certificate") as exc:
        mmp.check_hello(frame, "192.0.2.7")
    assert field_of(exc) == "open.members"


def test_free_places_are_at_most_the_jobs_workers() -> None:
    """One connection could otherwise drain the worker queue (up to 1024 at once)."""
    assert mmp.check_hello(open_hello(free=JOB.workers), "192.0.2.7").open is not None
    with pytest.raises(wire.WireError) as exc:
        mmp.check_hello(open_hello(free=JOB.workers + 1), "192.0.2.7")
    assert field_of(exc) == "open.free" and "3 worker place(s)" in exc.value.message
    big = dataclasses.replace(JOB, workers=mmp.MAX_MEMBERS - 1)
    frame = mmp.make_open(mmp.make_hello("host", "h", HOST_PORTS, job=big, dataset=DATASET, settings=SETTINGS,
                                         **_who("h")), GID, TOKEN, (member(0, "h"), member(1, "gone")),
                          mmp.MAX_MEMBERS - 2)
    assert mmp.check_hello(frame, "192.0.2.7").open is not None  # the most members plus free


def test_an_open_session_on_a_public_matchmaker_names_only_public_addresses() -> None:
    """Reached at a public address, the matchmaker refuses an open session that would send
    newcomers to a third party's port, this machine's loopback or a volunteer's LAN; member 0
    is always the host where it is seen. The control: public members pass, and so do private
    ones on a matchmaker reached at a private address (a LAN, a test)."""
    for bad in ("192.168.1.1", "127.0.0.1", "10.0.0.2", "169.254.1.1", "::1", "fe80::1", "100.64.0.1", "lan-box"):
        members = (member(0, "h"), dataclasses.replace(member(1, "w1"), address=bad))
        with pytest.raises(wire.WireError) as exc:
            mmp.check_hello(open_hello(members, free=1), "203.0.113.7", private_ok=False)
        assert field_of(exc) == "open.members[1].address" and bad in exc.value.message, bad
    public = (dataclasses.replace(member(0, "h"), address="192.168.1.1"),  # overwritten: where it is seen
              dataclasses.replace(member(1, "w1"), address="8.8.4.4"))
    h = mmp.check_hello(open_hello(public, free=1), "1.1.1.1", private_ok=False)
    assert h.open is not None and [m.address for m in h.open.members] == ["1.1.1.1", "8.8.4.4"]
    private = (member(0, "h"), member(1, "w1"))
    assert mmp.check_hello(open_hello(private, free=1), "10.0.0.1", private_ok=True).open is not None


# --------------------------------------------------------------------------- slots, joined, the join group frame


def test_slots_round_trip() -> None:
    assert mmp.check_slots(mmp.make_slots(3, 1)) == mmp.Slots(free=3, seen=1)
    assert mmp.check_slots({"type": "slots", "free": 0, "seen": 0}) == mmp.Slots(0, 0)


@pytest.mark.parametrize(
    ("frame", "field"),
    [
        ({"seen": 0}, "free"),
        ({"free": -1, "seen": 0}, "free"),
        ({"free": "2", "seen": 0}, "free"),
        ({"free": False, "seen": 0}, "free"),
        ({"free": mmp.MAX_MEMBERS + 1, "seen": 0}, "free"),
        ({"free": 1}, "seen"),
        ({"free": 1, "seen": -1}, "seen"),
        ({"free": 1, "seen": 0.5}, "seen"),
    ],
)
def test_bad_slots_name_the_field(frame: dict[str, Any], field: str) -> None:
    with pytest.raises(wire.WireError) as exc:
        mmp.check_slots({"type": "slots", **frame})
    assert field_of(exc) == field


def test_joined_round_trip() -> None:
    m = member(3, "newcomer", reachable=False)
    frame = mmp.make_joined(m)
    wire.encode(frame)
    assert mmp.check_joined(frame) == m


@pytest.mark.parametrize(
    ("mutate", "field"),
    [
        (_del(["member"]), "member"),
        (_set(["member"], [1]), "member"),
        (_del(["member", "index"]), "member.index"),
        (_set(["member", "index"], 0), "member.index"),
        (_set(["member", "index"], True), "member.index"),
        (_set(["member", "index"], "3"), "member.index"),
        (_set(["member", "index"], mmp.MAX_MEMBERS), "member.index"),
        (_set(["member", "role"], "host"), "member.role"),
        (_set(["member", "name"], "a\nb"), "member.name"),
        (_set(["member", "address"], None), "member.address"),
        (_del(["member", "ports"]), "member.ports"),
        (_set(["member", "ports", "session"], 0), "member.ports.session"),
        (_set(["member", "ports", "tf"], [1, 2]), "member.ports.tf"),
        (_set(["member", "cert"], None), "member.cert"),
        (_set(["member", "fingerprint"], "sha256:" + "1" * 64), "member.fingerprint"),
        (_set(["member", "reachable"], 1), "member.reachable"),
    ],
)
def test_a_bad_joined_names_the_field(mutate: Any, field: str) -> None:
    frame = copy.deepcopy(mmp.make_joined(member(3, "newcomer")))
    mutate(frame)
    with pytest.raises(wire.WireError) as exc:
        mmp.check_joined(frame)
    assert field_of(exc) == field
    assert exc.value.code == wire.ErrorCode.BAD_FIELD


def join_frame() -> dict[str, Any]:
    members = (member(0, "h"), member(1, "gone"), member(2, "newcomer"))
    return mmp.make_join(GID, TOKEN, members, JOB, DATASET.to_dict(), SETTINGS)


def test_a_join_group_frame_gives_a_joining_plan() -> None:
    plan = mmp.check_group(join_frame())
    assert plan == SessionPlan(GID, TOKEN, 2, (member(0, "h"), member(1, "gone"), member(2, "newcomer")), JOB, DATASET,
                               SETTINGS, joining=True)
    assert plan.me.name == "newcomer" and not plan.is_host


def test_a_plain_group_frame_is_not_joining() -> None:
    frame = join_frame()
    del frame["join"]
    assert mmp.check_group(frame).joining is False
    frame["join"] = False
    assert mmp.check_group(frame).joining is False


@pytest.mark.parametrize(
    ("mutate", "field"),
    [
        (_set(["join"], "yes"), "join"),
        (_set(["join"], 1), "join"),
        (_set(["index"], 1), "index"),  # a newcomer is the last member
        (_set(["index"], 0), "index"),
        (_set(["members"], [join_frame()["members"][0]]), "index"),  # ... and never the host
        (_set(["members", 2, "fingerprint"], "sha256:" + "2" * 64), "members[2].fingerprint"),
    ],
)
def test_a_bad_join_group_frame_names_the_field(mutate: Any, field: str) -> None:
    frame = join_frame()
    mutate(frame)
    with pytest.raises(wire.WireError) as exc:
        mmp.check_group(frame)
    assert field_of(exc) == field


def test_a_session_plan_built_without_joining_is_not_joining() -> None:
    plan = SessionPlan(GID, TOKEN, 0, (member(0, "h"),), JOB, DATASET, SETTINGS)
    assert plan.joining is False


# --------------------------------------------------------------------------- the Grouper


class Queue:
    """A Grouper fed with ids in arrival order."""

    def __init__(self) -> None:
        self.g = Grouper()
        self.n = 0

    def hello(self, frame: dict[str, Any]) -> mmp.Hello:
        return mmp.check_hello(frame, f"10.1.0.{self.n}")

    def add(self, frame: dict[str, Any], at: float = 0.0) -> int:
        self.n += 1
        self.g.add(Waiter(self.n, self.hello(frame), at))
        return self.n

    def open(self, frame: dict[str, Any], at: float = 0.0) -> int:
        self.n += 1
        place, replaced = self.g.open_session(Waiter(self.n, self.hello(frame), at))
        assert replaced is None and place == len(self.g.open)
        return self.n

    def form(self, now: float = 0.0) -> tuple[list[tuple[str, str, int]], list[list[str]]]:
        joins, groups = self.g.form(now)
        return ([(j.host.hello.name, j.worker.hello.name, j.member.index) for j in joins],
                [[m.hello.name for m in grp.members] for grp in groups])


def test_an_open_session_is_filled_before_a_new_group_forms() -> None:
    q = Queue()
    q.add(host_hello("new"))  # wants 3 workers, takes 1 after its wait
    q.open(open_hello(free=1))
    q.add(worker_hello("w1"))
    q.add(worker_hello("w2"))
    # past its wait, the new host would take both: the open session comes first
    assert q.form(now=10.0) == ([("h", "w1", 2)], [["new", "w2"]])


def test_free_decrements_and_indices_increment() -> None:
    q = Queue()
    hid = q.open(open_hello(free=3))
    for i in range(4):
        q.add(worker_hello(f"w{i}"))
    joins, groups = q.g.form(0.0)
    assert [(j.worker.hello.name, j.member.index) for j in joins] == [("w0", 2), ("w1", 3), ("w2", 4)]
    assert groups == []
    session = q.g.open[hid]
    assert session.free == 0 and session.sent == 3
    assert [m.name for m in session.members] == ["h", "gone", "w0", "w1", "w2"]
    # each join carries the session as it stood: the newcomer last, with its certificate
    assert [m.name for m in joins[1].members] == ["h", "gone", "w0", "w1"]
    assert joins[1].member.fingerprint == identity("w1").fingerprint and joins[1].member.address == "10.1.0.3"
    assert [w.hello.name for w in q.g.workers.values()] == ["w3"]


def test_free_zero_takes_nobody_until_slots_reopen_it() -> None:
    q = Queue()
    hid = q.open(open_hello(free=0))
    q.add(worker_hello("w1"))
    assert q.form() == ([], [])
    assert len(q.g.workers) == 1
    q.g.set_free(hid, mmp.Slots(free=1, seen=0))
    assert q.form() == ([("h", "w1", 2)], [])
    q.add(worker_hello("w2"))
    assert q.form() == ([], [])  # full again


def test_slots_count_the_newcomers_still_in_flight() -> None:
    q = Queue()
    hid = q.open(open_hello(free=1))
    q.add(worker_hello("w1"))
    assert q.form()[0] == [("h", "w1", 2)]
    # the host counted 3 free before it heard of w1: 2 are free
    assert q.g.set_free(hid, mmp.Slots(free=3, seen=0)).free == 2
    # having heard of w1, it says 3: 3 are free
    assert q.g.set_free(hid, mmp.Slots(free=3, seen=1)).free == 3
    assert q.g.set_free(hid, mmp.Slots(free=0, seen=0)).free == 0


def test_bad_slots_counts_are_refused() -> None:
    q = Queue()
    hid = q.open(open_hello(free=1))
    with pytest.raises(wire.WireError) as exc:
        q.g.set_free(hid, mmp.Slots(free=1, seen=1))  # nobody was sent yet
    assert field_of(exc) == "seen"
    with pytest.raises(wire.WireError) as exc:
        q.g.set_free(hid, mmp.Slots(free=mmp.MAX_MEMBERS - 1, seen=0))  # 2 members + 1024
    assert field_of(exc) == "free"
    with pytest.raises(wire.WireError) as exc:
        q.g.set_free(hid, mmp.Slots(free=JOB.workers + 1, seen=0))  # more than the job's worker places
    assert field_of(exc) == "free" and "3 worker place(s)" in exc.value.message
    assert q.g.set_free(hid, mmp.Slots(free=JOB.workers, seen=0)).free == JOB.workers  # the control
    q.g.set_free(hid, mmp.Slots(free=1, seen=0))
    assert q.g.open[hid].free == 1
    with pytest.raises(ValueError, match="no session"):
        q.g.set_free(hid + 1, mmp.Slots(free=1, seen=0))


def test_open_sessions_respect_tags_both_ways() -> None:
    q = Queue()
    q.open(open_hello(free=3, name="lab", tag="lab", want_tag="gpu"))
    q.add(worker_hello("plain"))
    q.add(worker_hello("gpu-elsewhere", tag="gpu", want_tag="other"))
    q.add(worker_hello("gpu", tag="gpu"))
    q.add(worker_hello("gpu-lab", tag="gpu", want_tag="lab"))
    assert q.form()[0] == [("lab", "gpu", 2), ("lab", "gpu-lab", 3)]
    assert [w.hello.name for w in q.g.workers.values()] == ["plain", "gpu-elsewhere"]


def test_oldest_open_session_first() -> None:
    q = Queue()
    q.open(open_hello(free=1, name="old"), at=1.0)
    q.open(mmp.make_open(host_hello("young"), "fedcba9876543210", TOKEN, (member(0, "young"),), 2), at=2.0)
    for i in range(4):
        q.add(worker_hello(f"w{i}"))
    assert q.form()[0] == [("old", "w0", 2), ("young", "w1", 1), ("young", "w2", 2)]


def test_a_member_of_the_session_is_not_sent_to_it_again() -> None:
    q = Queue()
    q.open(open_hello(free=2))  # "gone" is member 1
    q.add(worker_hello("gone"))
    q.add(worker_hello("h"))  # the host's own identity, as a worker
    q.add(worker_hello("fresh"))
    assert q.form()[0] == [("h", "fresh", 2)]
    assert [w.hello.name for w in q.g.workers.values()] == ["gone", "h"]


def test_a_closed_open_session_is_gone() -> None:
    q = Queue()
    hid = q.open(open_hello(free=2))
    assert hid in q.g and len(q.g) == 1 and q.g.positions() == {hid: 1}
    removed = q.g.remove(hid)
    assert removed is not None and removed.hello.name == "h"
    assert hid not in q.g and not q.g.open
    q.add(worker_hello("w1"))
    assert q.form() == ([], [])
    assert len(q.g.workers) == 1


def test_a_host_reopening_its_session_replaces_the_older_connection() -> None:
    q = Queue()
    old = q.open(open_hello(free=1))
    q.n += 1
    place, replaced = q.g.open_session(Waiter(q.n, q.hello(open_hello(free=3)), 5.0))
    assert replaced is not None and replaced.id == old and place == 1
    assert list(q.g.open) == [q.n] and q.g.open[q.n].free == 3


def test_another_hosts_session_with_the_same_id_is_refused() -> None:
    q = Queue()
    q.open(open_hello(free=1))
    other = mmp.make_open(host_hello("other"), GID, TOKEN, (member(0, "other"),), 1)
    with pytest.raises(wire.WireError) as exc:
        q.g.open_session(Waiter(99, q.hello(other), 0.0))
    assert field_of(exc) == "open.group_id"
    assert list(q.g.open) == [1]


def test_open_and_queue_are_apart() -> None:
    g = Grouper()
    opened = mmp.check_hello(open_hello(), "10.0.0.1")
    with pytest.raises(ValueError, match="open_session"):
        g.add(Waiter(1, opened, 0.0))
    with pytest.raises(ValueError, match="add"):
        g.open_session(Waiter(1, mmp.check_hello(host_hello(), "10.0.0.1"), 0.0))
    g.add(Waiter(2, mmp.check_hello(worker_hello(), "10.0.0.2"), 0.0))
    with pytest.raises(ValueError, match="already"):
        g.open_session(Waiter(2, opened, 0.0))
    assert g.positions() == {2: 1}


def test_join_frames() -> None:
    q = Queue()
    hid = q.open(open_hello(free=1))
    wid = q.add(worker_hello("w1"))
    (join,), _ = q.g.form(0.0)
    newcomer, joined = join_frames(join)
    wire.encode(newcomer)
    wire.encode(joined)
    plan = mmp.check_group(newcomer)
    assert plan.joining and plan.index == 2 and plan.group_id == GID and plan.token == TOKEN
    assert plan.job == JOB and plan.dataset == DATASET and plan.settings == SETTINGS
    host_seen = dataclasses.replace(member(0, "h"), address=f"10.1.0.{hid}")  # where the matchmaker saw it
    assert plan.members[0] == host_seen and plan.members[1] == member(1, "gone", reachable=False)
    assert plan.me == mmp.check_joined(joined)
    assert plan.me.fingerprint == identity("w1").fingerprint
    assert (join.host.id, join.worker.id) == (hid, wid)


def test_a_reachability_mark_travels_with_the_newcomer() -> None:
    q = Queue()
    q.open(open_hello(free=1))
    q.n += 1
    q.g.add(Waiter(q.n, dataclasses.replace(q.hello(worker_hello("natd")), reachable=False), 0.0))
    (join,), _ = q.g.form(0.0)
    assert join.member.reachable is False
    assert mmp.check_group(join_frames(join)[0]).reachable == (True, False, False)
