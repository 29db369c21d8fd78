"""The matchmaker protocol's messages: hello, wait and group, made and checked."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from crowdd import wire
from crowdd.testing.identities import identity
from crowdd.hyperparams import GroupSettings, Job
from crowdd.plan import DatasetRef, MemberPorts
from crowdd.protocol import matchmaker as mmp

DIGEST = "cd" * 32
TOKEN = "t" * 32
JOB = Job(model="mlp", hidden=(32, 16), epochs=2, workers=2, min_workers=1, wait=5.0)
DATASET = DatasetRef(DIGEST, 4096, "digits")
SETTINGS = GroupSettings(route="chain", sync_every=10, steps_per_function=100, merge="sum", chunk_size=4096)
HOST_PORTS = MemberPorts(7001, 7002, (7003, 7004))


def worker_ports(i: int) -> MemberPorts:
    return MemberPorts(8000 + i, 8100 + i, (8200 + i,))


def host_hello(**kw: Any) -> dict[str, Any]:
    return mmp.make_hello("host", "h", HOST_PORTS, job=JOB, dataset=DATASET, settings=SETTINGS, **_who("h"), **kw)


def worker_hello(i: int = 1) -> dict[str, Any]:
    return mmp.make_hello("worker", f"w{i}", worker_ports(i), tag="lab", **_who(f"w{i}"))


def _who(name: str) -> dict[str, Any]:
    ident = identity(name)
    return {"cert": ident.cert_pem, "fingerprint": ident.fingerprint}


def field_of(exc: pytest.ExceptionInfo[wire.WireError]) -> str | None:
    return exc.value.field


# --------------------------------------------------------------------------- hello


def test_host_hello_round_trip() -> None:
    frame = host_hello(tag="t1", want_tag="lab", advertise="node1.example.org")
    assert frame["type"] == "hello" and frame["proto"] == wire.PROTO
    h = mmp.check_hello(frame, "192.0.2.7", trust_advertised=True)
    assert (h.role, h.name, h.tag, h.want_tag) == ("host", "h", "t1", "lab")
    assert h.address == "node1.example.org"
    assert h.ports == {"data": 7001, "session": 7002, "tf": [7003, 7004]}
    assert h.job == JOB
    assert h.dataset == DATASET.to_dict()
    assert h.settings == SETTINGS


def test_advertised_address_is_used_only_when_trusted() -> None:
    h = mmp.check_hello(host_hello(advertise="node1.example.org"), "::ffff:192.0.2.7")
    assert h.address == "192.0.2.7"


def test_worker_hello_round_trip() -> None:
    frame = worker_hello(3)
    assert "job" not in frame and "settings" not in frame and "dataset" not in frame
    h = mmp.check_hello(frame, "192.0.2.9")
    assert (h.role, h.name, h.tag, h.address) == ("worker", "w3", "lab", "192.0.2.9")
    assert h.ports == {"data": 8003, "session": 8103, "tf": [8203]}
    assert h.job is None and h.dataset is None and h.settings is None


def test_make_hello_for_a_host_needs_job_dataset_and_settings() -> None:
    with pytest.raises(ValueError):
        mmp.make_hello("host", "h", HOST_PORTS, job=JOB, dataset=DATASET, **_who("h"))


@pytest.mark.parametrize("key", ["settings", "job", "dataset"])
def test_a_worker_sending_host_fields_is_refused(key: str) -> None:
    frame = worker_hello()
    frame[key] = host_hello()[key]
    with pytest.raises(wire.WireError) as exc:
        mmp.check_hello(frame, "192.0.2.9")
    assert field_of(exc) == key
    assert exc.value.code == wire.ErrorCode.BAD_FIELD


@pytest.mark.parametrize(
    ("settings", "field"),
    [
        ({"route": "ring"}, "settings.route"),
        ({"sync_every": 200, "steps_per_function": 100}, "settings.sync_every"),
        ({"merge": "max"}, "settings.merge"),
        ({"chunk_size": 0}, "settings.chunk_size"),
        ({"colour": "red"}, "settings.colour"),
        ([1, 2], "settings"),
    ],
)
def test_a_hosts_bad_settings_are_refused(settings: Any, field: str) -> None:
    frame = host_hello()
    frame["settings"] = settings
    with pytest.raises(wire.WireError) as exc:
        mmp.check_hello(frame, "192.0.2.7")
    assert field_of(exc) == field


@pytest.mark.parametrize(
    ("mutate", "field"),
    [
        (lambda f: f.pop("job"), "job"),
        (lambda f: f["job"].update(model="rnn"), "job.model"),
        (lambda f: f.update(job=7), "job"),
        (lambda f: f.pop("dataset"), "dataset"),
        (lambda f: f["dataset"].update(digest="XY" * 32), "dataset.digest"),
        (lambda f: f["dataset"].update(size=-1), "dataset.size"),
        (lambda f: f["dataset"].update(name=""), "dataset.name"),
        (lambda f: f.update(role="boss"), "role"),
        (lambda f: f.update(name=""), "name"),
        (lambda f: f["ports"].update(tf=[1]), "ports.tf"),
        (lambda f: f["ports"].update(data=0), "ports.data"),
        (lambda f: f.update(advertise="not a host!"), "advertise"),
    ],
)
def test_bad_host_hellos_name_the_field(mutate: Any, field: str) -> None:
    frame = copy.deepcopy(host_hello())
    mutate(frame)
    with pytest.raises(wire.WireError) as exc:
        mmp.check_hello(frame, "192.0.2.7")
    assert field_of(exc) == field


def test_a_host_without_settings_gets_the_defaults() -> None:
    frame = host_hello()
    del frame["settings"]
    assert mmp.check_hello(frame, "192.0.2.7").settings == GroupSettings()


def test_hello_must_be_a_hello() -> None:
    frame = worker_hello()
    frame["type"] = "heartbeat"
    with pytest.raises(wire.WireError) as exc:
        mmp.check_hello(frame, "192.0.2.7")
    assert exc.value.code == wire.ErrorCode.BAD_FRAME


# --------------------------------------------------------------------------- wait


def test_wait_round_trip() -> None:
    assert mmp.check_wait(mmp.make_wait(3, 1, 7)) == mmp.Wait(position=3, hosts=1, workers=7)
    assert mmp.check_wait({"type": "wait", "position": 0, "hosts": 0, "workers": 0}) == mmp.Wait(0, 0, 0)


@pytest.mark.parametrize(
    ("frame", "field"),
    [
        ({"position": -1, "hosts": 0, "workers": 0}, "position"),
        ({"position": 1, "hosts": True, "workers": 0}, "hosts"),
        ({"position": 1, "hosts": 0, "workers": "2"}, "workers"),
        ({"position": 1, "hosts": 0}, "workers"),
        ({"position": 1.5, "hosts": 0, "workers": 0}, "position"),
    ],
)
def test_bad_wait_names_the_field(frame: dict[str, Any], field: str) -> None:
    with pytest.raises(wire.WireError) as exc:
        mmp.check_wait({"type": "wait", **frame})
    assert field_of(exc) == field


# --------------------------------------------------------------------------- group


def hellos(workers: int = 2) -> list[mmp.Hello]:
    out = [mmp.check_hello(host_hello(), "10.0.0.1")]
    out += [mmp.check_hello(worker_hello(i), f"10.0.0.{i + 1}") for i in range(1, workers + 1)]
    return out


def group(index: int = 1, workers: int = 2) -> dict[str, Any]:
    hs = hellos(workers)
    host = hs[0]
    assert host.job is not None and host.dataset is not None and host.settings is not None
    return mmp.make_group("0123456789abcdef", TOKEN, index, hs, host.job, host.dataset, host.settings)


def test_group_round_trip_gives_each_member_the_same_plan_but_its_index() -> None:
    plans = [mmp.check_group(group(i)) for i in range(3)]
    for i, p in enumerate(plans):
        assert p.index == i
        assert p.me.index == i
        assert p.is_host == (i == 0)
        assert p.group_id == "0123456789abcdef" and p.token == TOKEN
        assert p.job == JOB and p.settings == SETTINGS and p.dataset == DATASET
        assert p.members == plans[0].members
    host, w1, w2 = plans[0].members
    assert (host.role, host.name, host.address) == ("host", "h", "10.0.0.1")
    assert host.ports == HOST_PORTS
    assert (w2.role, w2.name, w2.address, w2.ports) == ("worker", "w2", "10.0.0.3", worker_ports(2))
    assert w1.ports.tf == (8201,)


def test_a_group_of_the_host_alone_is_fine() -> None:
    p = mmp.check_group(group(0, workers=0))
    assert p.size == 1 and p.is_host


def _del(path: list[Any]) -> Any:
    def mutate(f: dict[str, Any]) -> None:
        d: Any = f
        for k in path[:-1]:
            d = d[k]
        del d[path[-1]]
    return mutate


def _set(path: list[Any], value: Any) -> Any:
    def mutate(f: dict[str, Any]) -> None:
        d: Any = f
        for k in path[:-1]:
            d = d[k]
        d[path[-1]] = value
    return mutate


BAD_GROUPS = [
    (_set(["index"], 3), "index"),
    (_set(["index"], -1), "index"),
    (_set(["index"], True), "index"),
    (_del(["index"]), "index"),
    (_set(["group_id"], ""), "group_id"),
    # it names each member's job directory: a matchmaker (or a host re-opening its session) must
    # not steer a volunteer's daemon into writing elsewhere
    (_set(["group_id"], "../../../tmp/x"), "group_id"),
    (_set(["group_id"], "0123456789ABCDEF"), "group_id"),
    (_set(["group_id"], "0123456789abcdef0"), "group_id"),
    (_set(["token"], "short"), "token"),
    (_del(["token"]), "token"),
    (_set(["members"], []), "members"),
    (_set(["members"], "all"), "members"),
    (_set(["members", 1], "w1"), "members[1]"),
    (_set(["members", 0, "role"], "worker"), "members[0].role"),
    (_set(["members", 1, "role"], "host"), "members[1].role"),
    (_set(["members", 2, "index"], 1), "members[2].index"),
    (_del(["members", 1, "ports"]), "members[1].ports"),
    (_del(["members", 1, "ports", "data"]), "members[1].ports.data"),
    (_del(["members", 2, "ports", "session"]), "members[2].ports.session"),
    (_set(["members", 0, "ports", "tf"], [7003]), "members[0].ports.tf"),
    (_set(["members", 1, "ports", "tf"], [70000]), "members[1].ports.tf"),
    (_set(["members", 1, "address"], ""), "members[1].address"),
    (_set(["dataset", "digest"], "ab" * 31), "dataset.digest"),
    (_set(["dataset", "digest"], "AB" * 32), "dataset.digest"),
    (_del(["dataset"]), "dataset"),
    (_set(["dataset", "size"], "big"), "dataset.size"),
    (_set(["job", "optimizer"], "lbfgs"), "job.optimizer"),
    (_set(["job", "epochs"], 0), "job.epochs"),
    (_set(["job", "learning_rate"], -1), "job.learning_rate"),
    (_set(["job", "colour"], "red"), "job.colour"),
    (_set(["settings", "route"], "ring"), "settings.route"),
    (_set(["settings", "sync_every"], 101), "settings.sync_every"),
    (_set(["settings", "merge"], "max"), "settings.merge"),
    (_set(["settings", "chunk_size"], 0), "settings.chunk_size"),
    (_set(["settings", "chunk_size"], 1 << 30), "settings.chunk_size"),  # every receiver would hold 1 GiB
]


@pytest.mark.parametrize(("mutate", "field"), BAD_GROUPS)
def test_a_malformed_group_names_the_field(mutate: Any, field: str) -> None:
    frame = group(1)
    mutate(frame)
    with pytest.raises(wire.WireError) as exc:
        mmp.check_group(frame)
    assert field_of(exc) == field
    assert exc.value.code == wire.ErrorCode.BAD_FIELD


def test_observed_address_unmaps_ipv4() -> None:
    assert mmp.observed_address("::ffff:10.1.2.3") == "10.1.2.3"
    assert mmp.observed_address("fe80::1%eth0") == "fe80::1%eth0"
    assert mmp.observed_address("10.1.2.3") == "10.1.2.3"


def test_a_members_bad_name_names_the_member() -> None:
    frame = group(1)
    frame["members"][2]["name"] = ""
    with pytest.raises(wire.WireError) as exc:
        mmp.check_group(frame)
    assert field_of(exc) == "members[2].name"


def test_a_group_job_that_is_not_an_object_names_job() -> None:
    frame = group(1)
    frame["job"] = 7
    with pytest.raises(wire.WireError) as exc:
        mmp.check_group(frame)
    assert field_of(exc) == "job"


# --------------------------------------------------------------------------- identities


def test_hello_and_group_carry_each_members_certificate() -> None:
    plan = mmp.check_group(group(1))
    for m, name in zip(plan.members, ("h", "w1", "w2")):
        assert m.cert == identity(name).cert_pem and m.fingerprint == identity(name).fingerprint
        assert m.reachable is True


def _expired_pem() -> bytes:
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "old")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(1).not_valid_before(now - datetime.timedelta(days=9))
            .not_valid_after(now - datetime.timedelta(days=1)).sign(key, hashes.SHA256()))
    return cert.public_bytes(serialization.Encoding.PEM)


@pytest.mark.parametrize(
    ("change", "field", "words"),
    [
        ({"cert": None}, "cert", "certificate"),
        ({"cert": "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n"}, "cert", "malformed"),
        ({"cert": "hello"}, "cert", "PEM"),
        ({"fingerprint": "sha256:" + "0" * 64}, "fingerprint", "fingerprint"),
        ({"fingerprint": None}, "fingerprint", "fingerprint"),
        ({"cert": _expired_pem().decode()}, "cert", "expired"),
    ],
)
def test_a_hello_with_a_bad_identity_is_refused(change: dict[str, Any], field: str, words: str) -> None:
    frame = {**worker_hello(), **change}
    frame = {k: v for k, v in frame.items() if v is not None}
    with pytest.raises(wire.WireError) as exc:
        mmp.check_hello(frame, "192.0.2.7")
    assert field_of(exc) == field and words in exc.value.message


def test_a_group_frame_with_a_bad_or_shared_identity_is_refused() -> None:
    frame = group(1)
    frame["members"][2]["fingerprint"] = frame["members"][1]["fingerprint"]
    with pytest.raises(wire.WireError) as exc:
        mmp.check_group(frame)
    assert field_of(exc) == "members[2].fingerprint"
    frame = group(1)
    frame["members"][2].update(cert=frame["members"][1]["cert"], fingerprint=frame["members"][1]["fingerprint"])
    with pytest.raises(wire.WireError, match="same certificate"):
        mmp.check_group(frame)
    frame = group(1)
    frame["members"][1]["reachable"] = "yes"
    with pytest.raises(wire.WireError) as exc:
        mmp.check_group(frame)
    assert field_of(exc) == "members[1].reachable"
