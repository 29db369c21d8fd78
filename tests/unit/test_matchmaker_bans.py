"""Expelled members: the signed ``expel`` report, the ban book and the Grouper honouring it."""

from __future__ import annotations

from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization

from crowdd import wire
from crowdd.hyperparams import GroupSettings, Job
from crowdd.matchmaker.grouping import Grouper, Waiter
from crowdd.matchmaker.bans import Bans
from crowdd.plan import DatasetRef, MemberPorts, PlanMember
from crowdd.protocol import matchmaker as mmp
from crowdd.testing.identities import identity

GID = "0123456789abcdef"
JOB = Job(workers=1, min_workers=1, wait=60.0)
DATASET = DatasetRef("cd" * 32, 4096, "digits")
SETTINGS = GroupSettings()
HOST_PORTS = MemberPorts(7001, 7002, (7003, 7004))


def fp(name: str) -> str:
    return identity(name).fingerprint


def key(name: str) -> Any:
    return serialization.load_pem_private_key(identity(name).key_path.read_bytes(), password=None)


def report(name: str = "h", member: str = "a", *, group_id: str = GID, reason: str = "diverged",
           cert_of: str | None = None) -> dict[str, Any]:
    """``name`` signs a report; ``cert_of`` puts another identity's certificate in it."""
    who = identity(cert_of or name)
    return mmp.make_expel(key(name), who.cert_pem, who.fingerprint, group_id, fp(member), reason)


# --------------------------------------------------------------------------- the report


def test_a_signed_report_is_checked() -> None:
    got = mmp.check_expel(report())
    assert got == mmp.Expel(host=fp("h"), group_id=GID, member=fp("a"), reason="diverged")


def test_a_report_signed_by_another_key_is_refused() -> None:
    """A member holds the host's certificate (the group frame carries it), not its key."""
    with pytest.raises(wire.WireError) as exc:
        mmp.check_expel(report("b", cert_of="h"))
    assert exc.value.code == wire.ErrorCode.UNAUTHORIZED and exc.value.field == "signature"


@pytest.mark.parametrize("name,value", [("group_id", "fedcba9876543210"), ("member", "sha256:" + "0" * 64),
                                        ("reason", "something else")])
def test_a_changed_field_breaks_the_signature(name: str, value: str) -> None:
    frame = {**report(), name: value}
    with pytest.raises(wire.WireError) as exc:
        mmp.check_expel(frame)
    assert exc.value.code == wire.ErrorCode.UNAUTHORIZED and exc.value.field == "signature"


@pytest.mark.parametrize("name,value,field", [
    ("group_id", "", "group_id"),
    ("group_id", 7, "group_id"),
    ("member", "a", "member"),
    ("member", None, "member"),
    ("reason", "x" * (mmp.MAX_REASON + 1), "reason"),
    ("reason", "two\nlines", "reason"),
    ("cert", "not a certificate", "cert"),
    ("fingerprint", "sha256:" + "1" * 64, "fingerprint"),
    ("signature", "XYZ", "signature"),
    ("signature", "", "signature"),
    ("signature", "ab" * 129, "signature"),
])
def test_a_bad_report_names_the_field(name: str, value: Any, field: str) -> None:
    with pytest.raises(wire.WireError) as exc:
        mmp.check_expel({**report(), name: value})
    assert exc.value.field == field and exc.value.code in (wire.ErrorCode.BAD_FIELD, wire.ErrorCode.UNAUTHORIZED)


def test_a_report_needs_the_protocol_version() -> None:
    with pytest.raises(wire.WireError) as exc:
        mmp.check_expel({**report(), "proto": "crowdd/0"})
    assert exc.value.code == wire.ErrorCode.VERSION


def test_the_answer_must_be_about_the_report() -> None:
    mmp.check_expelled(mmp.make_expelled(GID, fp("a")), GID, fp("a"))
    with pytest.raises(wire.WireError) as exc:
        mmp.check_expelled(mmp.make_expelled(GID, fp("b")), GID, fp("a"))
    assert exc.value.field == "member"


# --------------------------------------------------------------------------- the ban book


def test_only_the_groups_host_bans_a_member_placed_in_it() -> None:
    bans = Bans()
    bans.placed(fp("h"), GID, [fp("a"), fp("b")])
    for host, group_id in (("b", GID), ("outsider", GID), ("h", "fedcba9876543210")):
        with pytest.raises(wire.WireError) as exc:
            bans.expel(fp(host), group_id, fp("a"))
        assert exc.value.code == wire.ErrorCode.UNAUTHORIZED and exc.value.field == "group_id"
    for member in ("outsider", "h"):
        with pytest.raises(wire.WireError) as exc:
            bans.expel(fp("h"), GID, fp(member))
        assert exc.value.code == wire.ErrorCode.BAD_FIELD and exc.value.field == "member"
    assert len(bans) == 0 and not bans.banned(fp("h"), fp("a"))
    bans.expel(fp("h"), GID, fp("a"))
    assert bans.banned(fp("h"), fp("a")) and len(bans) == 1
    assert not bans.banned(fp("h"), fp("b")) and not bans.banned(fp("other"), fp("a"))
    bans.expel(fp("h"), GID, fp("a"))  # again: nothing more
    assert len(bans) == 1


def test_newcomers_of_an_open_session_count_as_placed() -> None:
    bans = Bans()
    bans.placed(fp("h"), GID, [fp("a")])
    bans.placed(fp("h"), GID, [fp("c")])
    bans.expel(fp("h"), GID, fp("c"))
    assert bans.banned(fp("h"), fp("c"))


def test_the_ban_book_is_bounded_forgetting_the_oldest() -> None:
    bans = Bans(max_bans=3)
    for i in range(5):
        bans.ban("host", f"w{i}")
    assert len(bans) == 3
    assert [bans.banned("host", f"w{i}") for i in range(5)] == [False, False, True, True, True]
    bans.ban("host", "w2")  # renewed: now the newest
    bans.ban("other", "w0")
    assert not bans.banned("host", "w3") and bans.banned("host", "w2") and bans.banned("other", "w0")
    for i in range(3):
        bans.ban("third", f"x{i}")
    assert bans.of("host") == frozenset() and len(bans) == 3  # an emptied host is dropped


def test_the_placed_groups_are_bounded_forgetting_the_oldest() -> None:
    bans = Bans(max_placed=4)
    bans.placed("h1", "g1", ["a", "b"])
    bans.placed("h2", "g2", ["c", "d"])
    bans.placed("h3", "g3", ["e"])
    with pytest.raises(wire.WireError):
        bans.expel("h1", "g1", "a")  # forgotten
    bans.expel("h2", "g2", "c")
    bans.expel("h3", "g3", "e")
    with pytest.raises(ValueError):
        Bans(max_bans=0)


# --------------------------------------------------------------------------- grouping


def hello(name: str, role: str = "worker", job: Job = JOB) -> mmp.Hello:
    if role == "host":
        frame = mmp.make_hello("host", name, HOST_PORTS, job=job, dataset=DATASET, settings=SETTINGS,
                               cert=identity(name).cert_pem, fingerprint=fp(name))
    else:
        frame = mmp.make_hello("worker", name, MemberPorts(9001, 9002, (9003,)), cert=identity(name).cert_pem,
                               fingerprint=fp(name))
    return mmp.check_hello(frame, "10.0.0.1")


class Queue:
    def __init__(self) -> None:
        self.g = Grouper()
        self.n = 0

    def add(self, h: mmp.Hello) -> None:
        self.n += 1
        if h.open is None:
            self.g.add(Waiter(self.n, h, 0.0))
        else:
            self.g.open_session(Waiter(self.n, h, 0.0))

    def form(self) -> tuple[list[tuple[str, str]], list[list[str]]]:
        joins, groups = self.g.form(0.0)
        return ([(j.host.hello.name, j.worker.hello.name) for j in joins],
                [[m.hello.name for m in grp.members] for grp in groups])


def test_a_banned_worker_is_never_grouped_with_that_host_but_with_another() -> None:
    q = Queue()
    q.g.bans.ban(fp("h"), fp("a"))
    q.add(hello("h", "host"))
    q.add(hello("a"))
    assert q.form() == ([], [])
    assert q.form() == ([], [])  # waits, however often it is asked
    q.add(hello("b"))
    assert q.form() == ([], [["h", "b"]])  # the younger worker goes to the host instead
    q.add(hello("h2", "host"))
    assert q.form() == ([], [["h2", "a"]])


def test_a_banned_worker_is_not_counted_when_the_wait_runs_out() -> None:
    q = Queue()
    q.g.bans.ban(fp("h"), fp("a"))
    q.add(hello("h", "host", Job(workers=2, min_workers=1, wait=1.0)))
    q.add(hello("a"))
    assert q.g.form_groups(100.0) == []


def test_an_open_session_takes_no_banned_newcomer() -> None:
    q = Queue()
    q.g.bans.ban(fp("h"), fp("a"))
    members = (PlanMember(0, "host", "h", "10.0.0.1", HOST_PORTS, cert=identity("h").cert_pem, fingerprint=fp("h")),)
    host = mmp.make_hello("host", "h", HOST_PORTS, job=Job(workers=3, min_workers=1, wait=60.0), dataset=DATASET,
                          settings=SETTINGS, cert=identity("h").cert_pem, fingerprint=fp("h"))
    q.add(mmp.check_hello(mmp.make_open(host, GID, "t" * 32, members, 2), "10.0.0.1"))
    q.add(hello("a"))
    assert q.form() == ([], [])
    q.add(hello("c"))
    assert q.form() == ([("h", "c")], [])
    q.add(hello("h2", "host"))
    assert q.form() == ([], [["h2", "a"]])
