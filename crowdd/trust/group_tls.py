"""TLS between the members of one group: mutual, pinned to exactly the identities the
matchmaker's ``group`` frame names (:class:`crowdd.plan.PlanMember` ``cert``/``fingerprint``).

A server presents this node's identity and accepts only a client that presents one of the
other members' certificates; a client pins the one member it dials. Because any member may
claim any index in its first frame, a server also checks that the certificate presented is
the one of the index claimed (:meth:`GroupTLS.check`): a member cannot speak for another.
"""

from __future__ import annotations

import asyncio
import logging
import ssl

from crowdd.trust.auth import AuthError
from crowdd.trust.identity import Identity
from crowdd.plan import PlanMember, SessionPlan
from crowdd.trust.tls import HANDSHAKE_TIMEOUT, client_context, pin, peer_fingerprint, server_context

logger = logging.getLogger(__name__)


class GroupTLS:
    """The TLS contexts and the identity check for one node in one group."""

    handshake_timeout = HANDSHAKE_TIMEOUT

    def __init__(self, identity: Identity, plan: SessionPlan) -> None:
        if plan.me.fingerprint and plan.me.fingerprint != identity.fingerprint:
            raise AuthError("the group frame names another certificate for this node")
        self.identity = identity
        self.index = plan.index
        self.fingerprints = tuple(m.fingerprint for m in plan.members)
        self._certs = tuple(m.cert for m in plan.members)
        others = [m.cert for m in plan.members if m.index != plan.index]
        self._server = server_context(identity, peers=others)
        self._clients: dict[int, ssl.SSLContext] = {}

    def add(self, member: PlanMember) -> None:
        """A newcomer joined the running session (the matchmaker vouched for it): pin its
        certificate too, at its index (the next one)."""
        if member.index != len(self.fingerprints):
            raise ValueError(f"a newcomer takes index {len(self.fingerprints)}, not {member.index}")
        pin(self._server, [member.cert])
        self.fingerprints = (*self.fingerprints, member.fingerprint)
        self._certs = (*self._certs, member.cert)

    def server(self) -> ssl.SSLContext:
        """For this node's listeners: only the group's other members get through the handshake."""
        return self._server

    def client(self, index: int) -> ssl.SSLContext:
        """For dialling member ``index``: only that member's certificate is accepted."""
        ctx = self._clients.get(index)
        if ctx is None:
            ctx = self._clients[index] = client_context(self.identity, pinned=[self._certs[index]])
        return ctx

    def check(self, writer: asyncio.StreamWriter, index: int) -> None:
        """Raise :class:`AuthError` unless the peer on ``writer`` is member ``index``."""
        got = peer_fingerprint(writer)
        if got is None or not 0 <= index < len(self.fingerprints) or got != self.fingerprints[index]:
            peer = writer.get_extra_info("peername")
            logger.warning("refused %s: it claims to be member %s but presents certificate %s", peer, index, got)
            raise AuthError(f"the certificate presented is not member {index}'s")

    def member_of(self, writer: asyncio.StreamWriter) -> int | None:
        """The index of the member whose certificate the peer on ``writer`` presented."""
        got = peer_fingerprint(writer)
        return self.fingerprints.index(got) if got in self.fingerprints else None


__all__ = ["GroupTLS"]
