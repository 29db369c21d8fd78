"""Namespaced hosts on a bridge, for tests and benchmarks (root only).

:class:`NetnsLab` builds N network namespaces ("hosts"), each with one veth link to a
bridge that lives in its own namespace (nothing touches the root namespace's links,
routes or firewall), gives host i the address ``10.<a>.<b>.<c>/16`` and can shape each
host's uplink and downlink with ``tc tbf`` (egress of the host's end = uplink; egress of
the bridge's end = downlink). Names carry a random per-run prefix, so several labs can
exist at once. :meth:`NetnsLab.close` (also on context exit, also after a failure) kills
every process started through the lab and every other process left in its namespaces,
then deletes the namespaces, which removes their links.

    with NetnsLab(8, rate="100mbit") as lab:
        proc = lab.popen(3, ["python", "-m", "http.server"])
        lab.run(0, ["ping", "-c1", lab.hosts[3].ip])
"""

from __future__ import annotations

import logging
import os
import secrets
import shutil
import signal
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from crowdd.platform.process import group_options, kill_group

logger = logging.getLogger(__name__)

IP = "ip"
TC = "tc"
NFT = "nft"


class NetnsError(Exception):
    """The lab could not be built (or a command inside it failed)."""


class NetnsUnavailable(NetnsError):
    """Not root, or the kernel/tools lack network namespaces."""


def require_root() -> None:
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        raise NetnsUnavailable("network namespaces need root (run as root or under sudo)")


@dataclass(frozen=True)
class Host:
    index: int
    netns: str
    ip: str
    ifname: str  # inside the host namespace
    bridge_port: str  # the peer end, inside the bridge namespace


@dataclass(frozen=True)
class Shape:
    """tc tbf parameters (``rate`` like ``100mbit``; ``burst`` like ``256kb``).

    Keep ``burst`` above the largest GSO packet (64 KiB): tbf splits a packet bigger than
    its bucket into MTU-sized segments, which multiplies the per-packet CPU cost of the
    emulated network several times (measured: a 16-node chain at 100 Mbit/s took twice as
    long with a 64 KiB bucket on a 2-core machine). The long-run rate is the same.
    """

    rate: str
    burst: str = "256kb"
    latency: str = "50ms"


def host_ip(base: tuple[int, int], i: int) -> str:
    n = i + 1
    return f"{base[0]}.{base[1]}.{n >> 8}.{n & 255}"


#: each open lab's owner: ``<prefix>`` holding the pid of the process that built it
OWNERS = Path("/run/crowdd-netns-labs")


def sweep_stale_labs() -> list[str]:
    """Delete the namespaces of every lab whose owner died without closing it (a test run
    killed with SIGKILL); returns the namespaces deleted."""
    removed: list[str] = []
    if not OWNERS.is_dir():
        return removed
    for owner in OWNERS.iterdir():
        try:
            os.kill(int(owner.read_text().strip()), 0)
            continue  # alive: its lab is in use
        except ProcessLookupError:
            pass
        except (OSError, ValueError):
            continue
        names = [n for n in os.listdir(NETNS_DIR) if n.startswith(f"{owner.name}-")] if NETNS_DIR.is_dir() else []
        for name in names:
            pids = subprocess.run([IP, "netns", "pids", name], check=False, capture_output=True, text=True, timeout=10)
            for pid in pids.stdout.split():  # what the dead run left running in there
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except (ProcessLookupError, ValueError):
                    pass
            if subprocess.run([IP, "netns", "del", name], check=False, capture_output=True, timeout=10).returncode == 0:
                removed.append(name)
        owner.unlink(missing_ok=True)
        logger.info("removed a dead run's network namespaces: %s", removed)
    return removed


NETNS_DIR = Path("/run/netns")


class NetnsLab:
    def __init__(
        self,
        n_hosts: int,
        *,
        shape: Shape | None = None,
        prefix: str | None = None,
        base: tuple[int, int] = (10, 77),
    ) -> None:
        if n_hosts < 1 or n_hosts > 60000:
            raise ValueError(f"n_hosts must be in 1..60000, got {n_hosts}")
        self.n_hosts = n_hosts
        self.shape = shape
        self.prefix = prefix or f"cd{secrets.token_hex(3)}"
        self.base = base
        self.bridge_ns = f"{self.prefix}-br"
        self.hosts = [
            Host(i, f"{self.prefix}-h{i}", host_ip(base, i), "eth0", f"v{i}") for i in range(n_hosts)
        ]
        self._created: list[str] = []
        self._procs: list[subprocess.Popen[Any]] = []
        self._open = False

    # -- building

    def __enter__(self) -> NetnsLab:  # noqa: PYI034 - 3.10 has no typing.Self
        self.setup()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def setup(self) -> None:
        require_root()
        sweep_stale_labs()
        self._open = True
        OWNERS.mkdir(parents=True, exist_ok=True)
        (OWNERS / self.prefix).write_text(str(os.getpid()))
        try:
            self._add_ns(self.bridge_ns)
            self._batch(self.bridge_ns, ["link set lo up", "link add br0 type bridge", "link set br0 up"])
            for h in self.hosts:
                self._add_ns(h.netns)
                _run([IP, "link", "add", h.ifname, "netns", h.netns, "type", "veth",
                      "peer", "name", h.bridge_port, "netns", self.bridge_ns])
                self._batch(h.netns, ["link set lo up", f"addr add {h.ip}/16 dev {h.ifname}",
                                      f"link set {h.ifname} up"])
            self._batch(self.bridge_ns, [c for h in self.hosts for c in (
                f"link set {h.bridge_port} master br0", f"link set {h.bridge_port} up")])
            if self.shape is not None:
                for h in self.hosts:
                    self.shape_host(h.index, self.shape)
        except BaseException:
            self.close()
            raise

    def _add_ns(self, name: str) -> None:
        _run([IP, "netns", "add", name])
        self._created.append(name)

    def _batch(self, netns: str, commands: Sequence[str]) -> None:
        _run([IP, "-n", netns, "-batch", "-"], input="\n".join(commands) + "\n")

    def shape_host(self, index: int, shape: Shape) -> None:
        """Shape host ``index``'s uplink and downlink with tbf (replacing any earlier shape)."""
        h = self.hosts[index]
        for ns, dev in ((h.netns, h.ifname), (self.bridge_ns, h.bridge_port)):
            _run([IP, "netns", "exec", ns, TC, "qdisc", "replace", "dev", dev, "root", "tbf",
                  "rate", shape.rate, "burst", shape.burst, "latency", shape.latency])

    def add_home_router(self, router: int, lan_hosts: int, subnet: str = "192.168.77") -> list[Host]:
        """Make host ``router`` a home NAT router with ``lan_hosts`` new hosts behind it.

        The router's internet leg is its lab interface; a LAN bridge (``lan0``, ``SUBNET.1/24``)
        joins the new hosts (``SUBNET.10``, ``.11``, ...; default route via the router). nftables
        masquerades what leaves the internet leg, and a forward chain (``fwdchain``) passes
        only LAN → internet and established/related replies: unsolicited inbound is dropped, as
        a home router does. The new hosts are appended to :attr:`hosts` (run things in them
        with :meth:`popen`) and removed with the lab. Needs ``nft`` (nftables).
        """
        if shutil.which(NFT) is None:
            raise NetnsUnavailable("nft not found (install nftables)")
        r = self.hosts[router]
        self._batch(r.netns, ["link add lan0 type bridge", f"addr add {subnet}.1/24 dev lan0", "link set lan0 up"])
        _run([IP, "netns", "exec", r.netns, "sysctl", "-q", "-w", "net.ipv4.ip_forward=1"])
        added = []
        for k in range(lan_hosts):
            index = len(self.hosts)
            h = Host(index, f"{self.prefix}-lan{k}", f"{subnet}.{10 + k}", "eth0", f"l{k}")
            self._add_ns(h.netns)
            _run([IP, "link", "add", h.ifname, "netns", h.netns, "type", "veth", "peer", "name", h.bridge_port,
                  "netns", r.netns])
            self._batch(h.netns, ["link set lo up", f"addr add {h.ip}/24 dev {h.ifname}", f"link set {h.ifname} up",
                                  f"route add default via {subnet}.1"])
            self._batch(r.netns, [f"link set {h.bridge_port} master lan0", f"link set {h.bridge_port} up"])
            self.hosts.append(h)
            added.append(h)
        rules = (
            "table ip crowdd_nat {\n"
            "  chain postrouting { type nat hook postrouting priority 100; policy accept;\n"
            f'    oifname "{r.ifname}" masquerade\n  }}\n'
            "}\n"
            "table inet crowdd_filter {\n"
            "  chain fwdchain { type filter hook forward priority 0; policy drop;\n"
            "    ct state established,related accept\n"
            '    iifname "lan0" accept\n  }\n'
            "}\n"
        )
        _run([IP, "netns", "exec", r.netns, NFT, "-f", "-"], input=rules)
        return added

    # -- running things

    def argv(self, index: int, argv: Sequence[str]) -> list[str]:
        return [IP, "netns", "exec", self.hosts[index].netns, *argv]

    def run(self, index: int, argv: Sequence[str], *, check: bool = True, timeout: float = 60.0,
            **kw: Any) -> subprocess.CompletedProcess[str]:
        return _run(self.argv(index, argv), check=check, timeout=timeout, **kw)

    def popen(self, index: int, argv: Sequence[str], **kw: Any) -> subprocess.Popen[Any]:
        """Start a process in host ``index`` (own process group; killed by :meth:`close`)."""
        proc: subprocess.Popen[Any] = subprocess.Popen(self.argv(index, argv), **group_options(), **kw)
        self._procs.append(proc)
        return proc

    # -- teardown

    def close(self) -> None:
        if not self._open and not self._created:
            return
        (OWNERS / self.prefix).unlink(missing_ok=True)
        self._open = False
        for proc in self._procs:
            _kill_group(proc)
        self._procs.clear()
        for name in self._created:
            try:
                out = subprocess.run([IP, "netns", "pids", name], check=False, capture_output=True, text=True, timeout=10)
                for pid in out.stdout.split():
                    try:
                        os.kill(int(pid), signal.SIGKILL)
                    except (ProcessLookupError, ValueError):
                        pass
            except (OSError, subprocess.SubprocessError):
                pass
        for name in reversed(self._created):
            for attempt in range(5):
                res = subprocess.run([IP, "netns", "del", name], check=False, capture_output=True, text=True, timeout=10)
                if res.returncode == 0 or "No such file" in res.stderr:
                    break
                time.sleep(0.1 * (attempt + 1))
            else:
                logger.warning("could not delete netns %s: %s", name, res.stderr.strip())
        self._created.clear()


def _kill_group(proc: subprocess.Popen[Any]) -> None:
    if proc.poll() is None:
        kill_group(proc, grace=0)
    for stream in (proc.stdin, proc.stdout, proc.stderr):
        if stream is not None:
            try:
                stream.close()
            except OSError:
                pass


def _run(argv: Sequence[str], *, check: bool = True, timeout: float = 30.0, input: str | None = None,
         **kw: Any) -> subprocess.CompletedProcess[str]:
    try:
        res = subprocess.run(list(argv), check=False, capture_output=True, text=True, timeout=timeout, input=input, **kw)
    except FileNotFoundError as exc:
        raise NetnsUnavailable(f"{argv[0]} not found (install iproute2)") from exc
    except subprocess.TimeoutExpired as exc:
        raise NetnsError(f"{' '.join(argv)} timed out after {timeout} s") from exc
    if check and res.returncode != 0:
        raise NetnsError(f"{' '.join(argv)} failed ({res.returncode}): {res.stderr.strip()}")
    return res
