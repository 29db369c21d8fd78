"""The matchmaker protocol's messages (docs/protocol.md), used by the matchmaker and the daemon.

A node says ``hello`` (:func:`make_hello`; the matchmaker checks it with :func:`check_hello`),
hears ``wait`` while queued (:func:`make_wait` / :func:`check_wait`) and finally one ``group``
frame (:func:`make_group`), which the node checks once on arrival with :func:`check_group` and
turns into its :class:`crowdd.plan.SessionPlan`.

A running session with free places stays known to the matchmaker: its host says a host hello
with ``open`` (:func:`make_open`; :class:`OpenSession`), tells it when its free count changes
(``slots``: :func:`make_slots` / :func:`check_slots`) and hears ``joined`` (:func:`make_joined`
/ :func:`check_joined`) for each newcomer, whom the matchmaker sends a ``group`` frame with
``join: true`` (:func:`make_join`; the plan's ``joining``).

A host that expelled a member (its changes kept failing validation) reports it on a connection
of its own: ``expel`` (:func:`make_expel`, signed with the host's identity key;
:func:`check_expel`), answered ``expelled`` (:func:`make_expelled` / :func:`check_expelled`).
"""

from __future__ import annotations

import dataclasses
import ipaddress
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TYPE_CHECKING

from crowdd import wire
from crowdd.protocol import fields
from crowdd.errors import InputError
from crowdd.hyperparams import GroupSettings, HyperparamError, Job, validate_job, validate_settings
from crowdd.trust.identity import check_certificate
from crowdd.plan import DatasetRef, MemberPorts, PlanMember, SessionPlan

if TYPE_CHECKING:  # cryptography loads when a key or certificate is used (a daemon at rest holds none)
    from cryptography.hazmat.primitives.asymmetric import ec, ed25519

HOST = "host"
WORKER = "worker"
ROLES = (HOST, WORKER)
TF_PORTS = {HOST: 2, WORKER: 1}
MAX_NAME = 64
MAX_TAG = 64
MAX_DATASET_NAME = 255
MAX_MEMBERS = 1 + 1024
MAX_REASON = 200
_DIGEST = re.compile(r"[0-9a-f]{64}")
_FINGERPRINT = re.compile(r"sha256:[0-9a-f]{64}")
#: a group id (``matchmaker.new_group_id``): it names directories on every member
_GROUP_ID = re.compile(r"[0-9a-f]{16}")
_SIGNATURE = re.compile(r"(?:[0-9a-f]{2}){1,128}")
_HOSTNAME = re.compile(r"(?=.{1,253}\.?$)[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*\.?")


# --------------------------------------------------------------------------- hello


@dataclass(frozen=True, slots=True)
class OpenSession:
    """A running session that takes newcomers: its id and token, its members so far (the host
    first; gone ones included: an index is never reused) and how many more it takes now."""

    group_id: str
    token: str
    members: tuple[PlanMember, ...]
    free: int


@dataclass(frozen=True, slots=True)
class Hello:
    """A validated hello: who this client is and where its peers can reach it."""

    role: str
    name: str
    address: str
    ports: dict[str, Any]
    tag: str = ""
    want_tag: str = ""
    job: Job | None = None
    dataset: dict[str, Any] | None = None
    settings: GroupSettings | None = None
    cert: str = ""
    fingerprint: str = ""
    reachable: bool = True
    open: OpenSession | None = None

    def member(self, index: int) -> dict[str, Any]:
        return {"index": index, "role": self.role, "name": self.name, "address": self.address, "ports": self.ports,
                "cert": self.cert, "fingerprint": self.fingerprint, "reachable": self.reachable}

    def plan_member(self, index: int) -> PlanMember:
        """This client as member ``index`` of a group (what :meth:`member` says, typed)."""
        p = self.ports
        return PlanMember(
            index=index, role=self.role, name=self.name, address=self.address,
            ports=MemberPorts(int(p["data"]), int(p["session"]), tuple(int(t) for t in p["tf"])),
            cert=self.cert.encode("ascii"), fingerprint=self.fingerprint, reachable=self.reachable,
        )






def _group_id(frame: Mapping[str, Any]) -> str:
    value = frame.get("group_id")
    if not isinstance(value, str) or not _GROUP_ID.fullmatch(value):
        raise fields.bad("group_id", "field 'group_id' must be 16 lowercase hex digits")
    return value




def _ports(frame: Mapping[str, Any], role: str) -> dict[str, Any]:
    ports = frame.get("ports")
    if not isinstance(ports, dict):
        raise fields.bad("ports", "field 'ports' must be an object {data, session, tf}")
    tf = ports.get("tf")
    want = TF_PORTS[role]
    if not isinstance(tf, list) or len(tf) != want:
        raise fields.bad("ports.tf", f"a {role} advertises exactly {want} TF port(s) in 'ports.tf'")
    return {
        "data": fields.port(ports.get("data"), "ports.data"),
        "session": fields.port(ports.get("session"), "ports.session"),
        "tf": [fields.port(p, "ports.tf") for p in tf],
    }


def _advertised(value: Any) -> str:
    if not isinstance(value, str):
        raise fields.bad("advertise", "field 'advertise' must be a string")
    try:
        return str(ipaddress.ip_address(value))
    except ValueError:
        pass
    if not _HOSTNAME.fullmatch(value):
        raise fields.bad("advertise", f"field 'advertise' must be an IP address or a DNS name, got {value!r}")
    return value


def _dataset(value: Any) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise fields.bad("dataset", "a host sends 'dataset' = {digest, size, name}")
    digest = value.get("digest")
    if not isinstance(digest, str) or not _DIGEST.fullmatch(digest):
        raise fields.bad("dataset.digest", "field 'dataset.digest' must be 64 lowercase hex characters (sha256)")
    size = value.get("size")
    if isinstance(size, bool) or not isinstance(size, int) or size < 0:
        raise fields.bad("dataset.size", f"field 'dataset.size' must be an integer >= 0, got {size!r}")
    name = value.get("name")
    if not isinstance(name, str) or not 1 <= len(name) <= MAX_DATASET_NAME or not name.isprintable():
        raise fields.bad("dataset.name", f"field 'dataset.name' must be 1..{MAX_DATASET_NAME} printable characters")
    return {"digest": digest, "size": size, "name": name}


def _cert(value: Any, where: str = "") -> tuple[str, str]:
    """A member's certificate (PEM text) and its fingerprint; ``where`` prefixes the field."""
    name = f"{where}.cert" if where else "cert"
    if not isinstance(value, str):
        raise fields.bad(name, f"field {name!r} must be the node's certificate (PEM)")
    try:
        return value, check_certificate(value.encode("ascii", "replace"))
    except InputError as exc:
        raise fields.bad(name, f"field {name!r}: {exc.message}") from None


def _fingerprint_matches(frame: Mapping[str, Any], fingerprint: str, where: str = "") -> None:
    name = f"{where}.fingerprint" if where else "fingerprint"
    if frame.get("fingerprint") != fingerprint:
        raise fields.bad(name, f"field {name!r} must be the certificate's fingerprint {fingerprint}")


def _settings(value: Any) -> GroupSettings:
    try:
        return validate_settings(value)
    except HyperparamError as exc:
        raise fields.bad(exc.field, f"group settings: {exc.message}") from None


def observed_address(peer_ip: str) -> str:
    """The address as peers should use it (an IPv4-mapped IPv6 address becomes plain IPv4)."""
    try:
        ip = ipaddress.ip_address(peer_ip.split("%", 1)[0])
    except ValueError:
        return peer_ip
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return str(ip.ipv4_mapped)
    return peer_ip


def check_hello(frame: Mapping[str, Any], peer_ip: str, *, trust_advertised: bool = False,
                private_ok: bool = True) -> Hello:
    """Decide whether a hello is acceptable; raise :class:`wire.WireError` saying why not.
    ``private_ok``: the matchmaker itself was reached at a loopback or private address (a LAN,
    a test), so members may be named by such addresses; reached at a public one, an ``open``
    hello may name none (:func:`check_open_addresses`)."""
    if frame.get("type") != "hello":
        raise wire.WireError(wire.ErrorCode.BAD_FRAME, f"the first frame must be a hello, got {frame.get('type')!r}")
    wire.check_proto(frame)
    role = frame.get("role")
    if role not in ROLES:
        raise fields.bad("role", f"field 'role' must be host or worker, got {role!r}")
    name = fields.text(frame, "name", 1, MAX_NAME)
    ports = _ports(frame, role)
    cert, fingerprint = _cert(frame.get("cert"))
    _fingerprint_matches(frame, fingerprint)
    tag = fields.text(frame, "tag", 0, MAX_TAG, "")
    want_tag = fields.text(frame, "want_tag", 0, MAX_TAG, "")
    address = observed_address(peer_ip)
    if frame.get("advertise") is not None:
        advertised = _advertised(frame["advertise"])
        if trust_advertised:
            address = advertised
    job: Job | None = None
    dataset: dict[str, Any] | None = None
    settings: GroupSettings | None = None
    if role == HOST:
        if "job" not in frame:
            raise fields.bad("job", "a host sends its 'job' (hyperparameters)")
        try:
            job = validate_job(frame["job"])
        except HyperparamError as exc:
            prefix = "" if exc.field == "job" else "job."
            raise fields.bad(prefix + exc.field, f"job: {exc}") from None
        dataset = _dataset(frame.get("dataset"))
        settings = _settings(frame.get("settings", {}))
    else:
        for key in ("job", "dataset", "settings", "open"):
            if key in frame:
                raise fields.bad(key, f"only a host sends {key!r}")
    opened = _open(frame["open"], cert, fingerprint) if "open" in frame else None
    if opened is not None:
        assert job is not None
        if opened.free > job.workers:  # never more newcomers at once than the job has worker places
            raise fields.bad("open.free", f"field 'open.free': the job has {job.workers} worker place(s), not {opened.free}")
        opened = check_open_addresses(opened, address, private_ok=private_ok)
    return Hello(role=role, name=name, address=address, ports=ports, tag=tag, want_tag=want_tag, job=job,
                 dataset=dataset, settings=settings, cert=cert, fingerprint=fingerprint, open=opened)


def check_open_addresses(opened: OpenSession, host_address: str, *, private_ok: bool) -> OpenSession:
    """An open session's members as newcomers will dial them: member 0 is the host at the
    address this matchmaker saw it at (``host_address``: observed, or advertised where trusted),
    whatever it wrote; every other member's address must be a public one unless ``private_ok``
    (else a third party's port, this machine's loopback or a volunteer's LAN would be dialled
    by every newcomer: a reflection)."""
    members = list(opened.members)
    members[0] = dataclasses.replace(members[0], address=host_address)
    if not private_ok:
        for m in members[1:]:
            if not is_public(m.address):
                raise fields.bad(f"open.members[{m.index}].address",
                           f"member {m.index}'s address {m.address!r} is not a public address")
    return dataclasses.replace(opened, members=tuple(members))


def is_public(address: str) -> bool:
    """Whether ``address`` is a global IP address (an IPv4-mapped IPv6 one as its IPv4)."""
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return False  # a name: newcomers would resolve it wherever they are
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_global


def _prefixed(prefix: str, exc: wire.WireError) -> wire.WireError:
    return fields.bad(f"{prefix}.{exc.field}" if exc.field else prefix, exc.message)


def _free(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_MEMBERS:
        raise fields.bad(name, f"field {name!r} must be an integer 0..{MAX_MEMBERS}, got {value!r}")
    return value


def _open(value: Any, cert: str, fingerprint: str) -> OpenSession:
    """A host hello's ``open``: its own running session (its certificate is member 0)."""
    if not isinstance(value, dict):
        raise fields.bad("open", "field 'open' must be an object {group_id, token, members, free}")
    try:
        group_id = _group_id(value)
        token = fields.text(value, "token", 16, 256)
    except wire.WireError as exc:
        raise _prefixed("open", exc) from None
    members = _members(value.get("members"), "open.members")
    host = members[0]
    if host.cert.decode("ascii") != cert or host.fingerprint != fingerprint:
        raise fields.bad("open.members[0].cert", "a host can only open its own session: 'open.members[0]' must carry "
                   "the certificate of this hello")
    free = _free(value.get("free"), "open.free")
    if len(members) + free > MAX_MEMBERS:
        raise fields.bad("open.free", f"a session has at most {MAX_MEMBERS} members: {len(members)} + {free} free is too many")
    return OpenSession(group_id=group_id, token=token, members=members, free=free)


def make_open(
    hello: Mapping[str, Any], group_id: str, token: str, members: Sequence[PlanMember], free: int,
) -> dict[str, Any]:
    """A running host's hello that keeps its session open at the matchmaker: ``hello`` is its
    :func:`make_hello` frame, ``members`` the session's members so far (the host first, gone
    ones included, in index order) and ``free`` how many newcomers it takes now."""
    if hello.get("role") != HOST:
        raise ValueError("only a host opens its session")
    if free < 0:
        raise ValueError(f"free must be >= 0, got {free}")
    return {**hello, "open": {"group_id": group_id, "token": token, "members": [m.to_dict() for m in members],
                              "free": free}}


def make_hello(
    role: str,
    name: str,
    ports: MemberPorts,
    *,
    cert: bytes,
    fingerprint: str,
    tag: str = "",
    want_tag: str = "",
    advertise: str = "",
    job: Job | None = None,
    dataset: DatasetRef | None = None,
    settings: GroupSettings | None = None,
) -> dict[str, Any]:
    """A node's ``hello`` (``type`` and ``proto`` included): its certificate (PEM) and that
    certificate's fingerprint, which the group's peers will pin. A host also sends its job, its
    dataset's manifest digest and the group-wide settings it decided."""
    hello: dict[str, Any] = {
        "type": "hello", "proto": wire.PROTO, "role": role, "name": name, "ports": ports.to_dict(),
        "tag": tag, "want_tag": want_tag, "cert": cert.decode("ascii"), "fingerprint": fingerprint,
    }
    if advertise:
        hello["advertise"] = advertise
    if role == HOST:
        if job is None or dataset is None or settings is None:
            raise ValueError("a host's hello needs its job, dataset and settings")
        hello["job"] = job.to_dict()
        hello["dataset"] = dataset.to_dict()
        hello["settings"] = settings.to_dict()
    return hello


# --------------------------------------------------------------------------- wait


def make_wait(position: int, hosts: int, workers: int) -> dict[str, Any]:
    return {"type": "wait", "position": position, "hosts": hosts, "workers": workers}


@dataclass(frozen=True)
class Wait:
    """A node's place in its queue, and how many hosts and workers are waiting."""

    position: int
    hosts: int
    workers: int


def check_wait(frame: Mapping[str, Any]) -> Wait:
    return Wait(*(fields.integer(frame, k) for k in ("position", "hosts", "workers")))




# --------------------------------------------------------------------------- group


def make_group(
    group_id: str, token: str, index: int, members: Sequence[Hello], job: Job, dataset: Mapping[str, Any],
    settings: GroupSettings,
) -> dict[str, Any]:
    """The ``group`` frame for member ``index``; every member's is the same but for ``index``."""
    return {
        "type": "group",
        "group_id": group_id,
        "token": token,
        "index": index,
        "members": [m.member(i) for i, m in enumerate(members)],
        "job": job.to_dict(),
        "dataset": dict(dataset),
        "settings": settings.to_dict(),
    }


def _member(value: Any, i: int, where: str = "") -> PlanMember:
    """Member ``i`` of a group, found at ``where`` (default ``members[i]``)."""
    where = where or f"members[{i}]"
    if not isinstance(value, dict):
        raise fields.bad(where, f"{where} must be an object")
    if value.get("index") != i:
        raise fields.bad(f"{where}.index", f"{where} must have index {i}")
    role = value.get("role")
    if role != (HOST if i == 0 else WORKER):
        raise fields.bad(f"{where}.role", f"{where} must be {'the host' if i == 0 else 'a worker'}")
    try:
        ports = _ports(value, role)
    except wire.WireError as exc:
        raise fields.bad(f"{where}.{exc.field}", exc.message) from None
    address = value.get("address")
    if not isinstance(address, str) or not address:
        raise fields.bad(f"{where}.address", f"{where} needs an address")
    try:
        name = fields.text(value, "name", 1, MAX_NAME)
    except wire.WireError as exc:
        raise fields.bad(f"{where}.name", exc.message) from None
    cert, fingerprint = _cert(value.get("cert"), where)
    _fingerprint_matches(value, fingerprint, where)
    reachable = value.get("reachable", True)
    if not isinstance(reachable, bool):
        raise fields.bad(f"{where}.reachable", f"{where}.reachable must be true or false")
    return PlanMember(
        index=i, role=role, name=name, address=address,
        ports=MemberPorts(ports["data"], ports["session"], tuple(ports["tf"])),
        cert=cert.encode("ascii"), fingerprint=fingerprint, reachable=reachable,
    )


def _members(value: Any, name: str) -> tuple[PlanMember, ...]:
    """A member list (``name`` is where it is, for errors): the host, then workers, each with
    its own certificate."""
    if not isinstance(value, list):
        raise fields.bad(name, f"field {name!r} must be list")
    if not 1 <= len(value) <= MAX_MEMBERS:
        raise fields.bad(name, f"a group has a host and at most {MAX_MEMBERS - 1} workers")
    prefix = "" if name == "members" else name
    members = tuple(_member(m, i, f"{prefix}[{i}]" if prefix else "") for i, m in enumerate(value))
    fingerprints = [m.fingerprint for m in members]
    if len(set(fingerprints)) != len(fingerprints):
        raise fields.bad(name, "two members of the group present the same certificate")
    return members


def make_join(
    group_id: str, token: str, members: Sequence[PlanMember], job: Job, dataset: Mapping[str, Any],
    settings: GroupSettings,
) -> dict[str, Any]:
    """The ``group`` frame that sends a newcomer into a running session: ``members`` are the
    session's, the newcomer last (its index is the last one), and ``join`` is true."""
    return {
        "type": "group",
        "group_id": group_id,
        "token": token,
        "index": len(members) - 1,
        "members": [m.to_dict() for m in members],
        "job": job.to_dict(),
        "dataset": dict(dataset),
        "settings": settings.to_dict(),
        "join": True,
    }


def check_group(frame: Mapping[str, Any]) -> SessionPlan:
    """Check the matchmaker's ``group`` frame (the one trust boundary for it) and return this
    node's :class:`SessionPlan`; raise :class:`wire.WireError` naming the bad field. With
    ``join: true`` this node joins a running session: it is the last member, a worker."""
    group_id = _group_id(frame)
    token = fields.text(frame, "token", 16, 256)
    index = wire.require(frame, "index", int)
    members = wire.require(frame, "members", list)
    if not 1 <= len(members) <= MAX_MEMBERS:
        raise fields.bad("members", "a group has a host and at most 1024 workers")
    if isinstance(index, bool) or not 0 <= index < len(members):
        raise fields.bad("index", f"index {index} outside the member list")
    joining = frame.get("join", False)
    if not isinstance(joining, bool):
        raise fields.bad("join", "field 'join' must be true or false")
    if joining and not 1 <= index == len(members) - 1:
        raise fields.bad("index", "a node joining a running session is its last member, a worker")
    plan_members = _members(members, "members")
    try:
        job = validate_job(frame.get("job", {}))
    except HyperparamError as exc:
        raise fields.bad("job" if exc.field == "job" else f"job.{exc.field}", exc.message) from None
    ds = _dataset(frame.get("dataset"))
    return SessionPlan(
        group_id=group_id, token=token, index=index, members=plan_members, job=job,
        dataset=DatasetRef(ds["digest"], ds["size"], ds["name"]), settings=_settings(frame.get("settings", {})),
        joining=joining,
    )


# --------------------------------------------------------------------------- open sessions


@dataclass(frozen=True, slots=True)
class Slots:
    """An open session's new free count, as the host counted it having seen ``seen`` of the
    ``joined`` frames sent on this connection (the matchmaker subtracts the ones in flight)."""

    free: int
    seen: int


def make_slots(free: int, seen: int) -> dict[str, Any]:
    return {"type": "slots", "free": free, "seen": seen}


def check_slots(frame: Mapping[str, Any]) -> Slots:
    free = _free(frame.get("free"), "free")
    return Slots(free=free, seen=fields.integer(frame, "seen"))


def make_joined(member: PlanMember) -> dict[str, Any]:
    """What the open session's host hears of a newcomer: the member as the newcomer's group
    frame has it (its index is the next one of the session)."""
    return {"type": "joined", "member": member.to_dict()}


def check_joined(frame: Mapping[str, Any]) -> PlanMember:
    """The newcomer of a ``joined`` frame (a worker, index >= 1); :class:`wire.WireError` naming
    the bad field (``member``, ``member.index``, ``member.cert``, …) if it is malformed."""
    value = frame.get("member")
    if not isinstance(value, dict):
        raise fields.bad("member", "field 'member' must be an object")
    index = value.get("index")
    if isinstance(index, bool) or not isinstance(index, int) or not 1 <= index < MAX_MEMBERS:
        raise fields.bad("member.index", f"field 'member.index' must be a worker's index 1..{MAX_MEMBERS - 1}, got {index!r}")
    return _member(value, index, "member")


# --------------------------------------------------------------------------- expel


@dataclass(frozen=True, slots=True)
class Expel:
    """A host's checked report: ``host`` (the fingerprint whose key signed it) expelled
    ``member`` (a fingerprint) from its group ``group_id``, for ``reason``."""

    host: str
    group_id: str
    member: str
    reason: str


def expel_statement(group_id: str, member: str, reason: str) -> bytes:
    """What the host signs (the fields are printable, so newlines cannot be forged into them)."""
    return "\n".join((f"{wire.PROTO} expel", group_id, member, reason)).encode()


def make_expel(
    key: ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey, cert: bytes, fingerprint: str, group_id: str,
    member: str, reason: str,
) -> dict[str, Any]:
    """A host's report that it expelled ``member`` (its fingerprint) from group ``group_id``,
    signed with ``key``, the key of the host's certificate ``cert`` (PEM)."""
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec, ed25519

    data = expel_statement(group_id, member, reason)
    if isinstance(key, ed25519.Ed25519PrivateKey):
        signature = key.sign(data)
    else:
        signature = key.sign(data, ec.ECDSA(hashes.SHA256()))
    return {"type": "expel", "proto": wire.PROTO, "group_id": group_id, "member": member, "reason": reason,
            "cert": cert.decode("ascii"), "fingerprint": fingerprint, "signature": signature.hex()}


def _verify(cert: str, data: bytes, signature: bytes) -> None:
    from cryptography import x509
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec, ed25519

    public = x509.load_pem_x509_certificate(cert.encode("ascii")).public_key()
    try:
        if isinstance(public, ed25519.Ed25519PublicKey):
            public.verify(signature, data)
        elif isinstance(public, ec.EllipticCurvePublicKey):
            public.verify(signature, data, ec.ECDSA(hashes.SHA256()))
        else:  # pragma: no cover - check_certificate allows P-256 and Ed25519 only
            raise InvalidSignature
    except InvalidSignature:
        raise wire.WireError(wire.ErrorCode.UNAUTHORIZED, "the report is not signed by the key of 'cert'",
                             field="signature") from None


def check_expel(frame: Mapping[str, Any]) -> Expel:
    """Check a host's ``expel`` report, its signature included: the reporter is the holder of
    the key of ``cert``. Whether that is the group's host is the matchmaker's to decide."""
    if frame.get("type") != "expel":
        raise wire.WireError(wire.ErrorCode.BAD_FRAME, f"expected an expel report, got {frame.get('type')!r}")
    wire.check_proto(frame)
    group_id = _group_id(frame)
    member = frame.get("member")
    if not isinstance(member, str) or not _FINGERPRINT.fullmatch(member):
        raise fields.bad("member", "field 'member' must be the expelled member's fingerprint (sha256: + 64 hex)")
    reason = fields.text(frame, "reason", 0, MAX_REASON, "")
    cert, fingerprint = _cert(frame.get("cert"))
    _fingerprint_matches(frame, fingerprint)
    signature = frame.get("signature")
    if not isinstance(signature, str) or not _SIGNATURE.fullmatch(signature):
        raise fields.bad("signature", "field 'signature' must be the report's signature in lowercase hex")
    _verify(cert, expel_statement(group_id, member, reason), bytes.fromhex(signature))
    return Expel(host=fingerprint, group_id=group_id, member=member, reason=reason)


def make_expelled(group_id: str, member: str) -> dict[str, Any]:
    """The matchmaker's answer: ``member`` is never placed with this host again."""
    return {"type": "expelled", "group_id": group_id, "member": member}


def check_expelled(frame: Mapping[str, Any], group_id: str, member: str) -> None:
    """The answer must be about this report (``bad_field`` naming what differs)."""
    for name, want in (("group_id", group_id), ("member", member)):
        if frame.get(name) != want:
            raise fields.bad(name, f"the matchmaker answered about {name} {frame.get(name)!r}, not {want!r}")


__all__ = [
    "HOST", "MAX_MEMBERS", "MAX_REASON", "ROLES", "TF_PORTS", "WORKER", "Expel", "Hello", "OpenSession", "Slots",
    "Wait", "check_expel", "check_expelled", "check_group", "check_hello", "check_joined", "check_open_addresses", "is_public", "check_slots",
    "check_wait", "expel_statement", "make_expel", "make_expelled", "make_group", "make_hello", "make_join",
    "make_joined", "make_open", "make_slots", "make_wait", "observed_address",
]
