"""Share links: a token that opens one endpoint and its demo page, and nothing else.

A share is made behind Jupyter's auth (``POST /api/stream/shares``) and handed to someone
as a URL. Its token is 256 random bits; the server keeps only its SHA-256 digest, finds
a presented token by that digest and compares digests in constant time, so neither the
store nor the log holds a usable token. The token is accepted by the shared endpoint's
routes only (`/stream/<name>` and `/stream/<name>/demo`), as ``?share=``, ``?token=``,
an ``Authorization: token|Bearer`` header or the page's cookie; every other route of the
server knows nothing of it and refuses it as it refuses any wrong token.

Shares live in memory, except those of ``--persist`` endpoints, which the server keeps
(their digests, `Share.record`) beside the registrations (`persist.RegistrationStore`), so
that their links work again after a restart. A share opens its endpoint as long as that
endpoint is its owner's: deleting the endpoint, or another owner registering one of the
same name, revokes it (the same owner registering it again keeps its shares).
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from dataclasses import dataclass, field
from typing import Any

COOKIE = "jupyter-stream-share"

#: How long a revoked or expired share is still known (its link then says why it stopped
#: working); after that it is forgotten, and its link is just not valid.
ENDED_SHARES_KEPT_FOR = 24 * 3600.0
#: Ended shares known at most (the oldest are forgotten first).
MAX_ENDED_SHARES = 1000


class ShareRefused(Exception):
    """A presented share token does not open this route (an HTTP 403 with this message)."""


def digest(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8", "surrogateescape")).hexdigest()


@dataclass(eq=False)
class Share:
    id: str  # public handle (for listing and revoking); not a credential
    digest: str
    endpoint: str
    created: float = field(default_factory=time.time)
    expires: float | None = None  # time.time() after which it no longer opens anything
    revoked: str | None = None  # why it stopped working, once it has
    revoked_at: float | None = None

    def ended_at(self) -> float | None:
        """When it stopped working (revoked or expired), or None while it works."""
        if self.revoked:
            return self.revoked_at or self.created
        if self.expires is not None and time.time() >= self.expires:
            return self.expires
        return None

    def state(self, now: float | None = None) -> str:
        if self.revoked:
            return "revoked"
        if self.expires is not None and (now or time.time()) >= self.expires:
            return "expired"
        return "active"

    def record(self) -> dict[str, Any]:
        """What is stored of it for a persisted endpoint: no token, only its digest."""
        return {"id": self.id, "digest": self.digest, "endpoint": self.endpoint, "created": self.created,
                "expires": self.expires, "revoked": self.revoked, "revoked_at": self.revoked_at}

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> Share:
        """A stored share again; raises ValueError for a record that is not one."""
        strings = ("id", "digest", "endpoint")
        if not all(isinstance(record.get(k), str) and record[k] for k in strings) or len(record["digest"]) != 64:
            raise ValueError(f"not a share record: {sorted(record)}")
        numbers = [record.get(k) for k in ("created", "expires", "revoked_at")]
        if not isinstance(numbers[0], (int, float)) or not all(n is None or isinstance(n, (int, float)) for n in numbers):
            raise ValueError("a share record's times must be numbers")
        revoked = record.get("revoked")
        if revoked is not None and not isinstance(revoked, str):
            raise ValueError("a share record's 'revoked' must be a string")
        return cls(record["id"], record["digest"], record["endpoint"], record["created"], record.get("expires"), revoked,
                   record.get("revoked_at"))

    def info(self) -> dict[str, Any]:
        return {"id": self.id, "endpoint": self.endpoint, "created": self.created, "expires": self.expires,
                "state": self.state(), "revoked": self.revoked}


class ShareStore:
    """The server's shares (in memory: they live as long as the server, whatever happens
    to the notebook kernel that made them)."""

    def __init__(self, on_change: Any = None) -> None:
        self.by_digest: dict[str, Share] = {}
        #: told ``(action, share)`` of each change: created, revoked, forgotten (the event stream)
        self.on_change = on_change or (lambda action, share: None)

    def create(self, endpoint: str, seconds: float | None) -> tuple[Share, str]:
        """A new share of `endpoint`; returns it and its token (shown once, never stored)."""
        token = secrets.token_urlsafe(32)
        share = Share(secrets.token_hex(8), digest(token), endpoint,
                      expires=time.time() + seconds if seconds is not None else None)
        self.by_digest[share.digest] = share
        self.on_change("created", share)
        if len(self.by_digest) > 2 * MAX_ENDED_SHARES:
            self.sweep()
        return share, token

    def list(self, endpoint: str | None = None) -> list[Share]:
        return [s for s in self.by_digest.values() if endpoint is None or s.endpoint == endpoint]

    def get(self, share_id: str) -> Share | None:
        return next((s for s in self.by_digest.values() if hmac.compare_digest(s.id, share_id)), None)

    def revoke(self, share: Share, why: str = "it was revoked") -> None:
        if not share.revoked:
            share.revoked, share.revoked_at = why, time.time()
            self.on_change("revoked", share)

    def sweep(self) -> int:
        """Forget shares that stopped working more than `ENDED_SHARES_KEPT_FOR` ago, and the
        oldest ended ones past `MAX_ENDED_SHARES` (the server runs this every few minutes);
        returns how many were forgotten."""
        now = time.time()
        ended = sorted(((s.ended_at(), s) for s in self.by_digest.values() if s.ended_at() is not None), key=lambda e: e[0])
        drop = [s for at, s in ended if now - at > ENDED_SHARES_KEPT_FOR]
        kept = [s for at, s in ended if now - at <= ENDED_SHARES_KEPT_FOR]
        drop += kept[: max(len(kept) - MAX_ENDED_SHARES, 0)]
        for share in drop:
            self.by_digest.pop(share.digest, None)
            self.on_change("forgotten", share)
        return len(drop)

    def endpoint_removed(self, endpoint: str, why: str | None = None) -> None:
        """Revoke the shares of an endpoint that was deleted (or replaced, `why`)."""
        for share in self.list(endpoint):
            if share.state() == "active":
                self.revoke(share, why or f"its endpoint {endpoint!r} was deleted")

    def restore(self, records: list[dict[str, Any]]) -> list[str]:
        """Take back stored shares (`Share.record`); returns what was wrong with records left out."""
        problems = []
        for record in records:
            try:
                share = Share.from_record(record)
            except (ValueError, TypeError) as e:
                problems.append(str(e))
                continue
            self.by_digest.setdefault(share.digest, share)
        return problems

    def find(self, token: str) -> Share | None:
        """The share whose token this is, or None (looked up by digest; digests compared
        in constant time)."""
        presented = digest(token)
        share = self.by_digest.get(presented)
        if share is not None and hmac.compare_digest(share.digest, presented):
            return share
        return None

    def check(self, token: str, endpoint: str | None) -> Share:
        """The share that opens `endpoint` (None: any, for the index page) with `token`;
        raises `ShareRefused` saying why not."""
        share = self.find(token)
        if share is None:
            raise ShareRefused("this link is not valid here: ask its owner for a new share link "
                               "(or authenticate with the server's token)")
        state = share.state()
        if state == "revoked":
            raise ShareRefused(f"this share link no longer works: {share.revoked}; ask its owner for a new one")
        if state == "expired":
            raise ShareRefused(f"this share link expired at {time.strftime('%Y-%m-%d %H:%M:%S %Z', time.localtime(share.expires))}; "
                               "ask its owner for a new one")
        if endpoint is not None and share.endpoint != endpoint:
            raise ShareRefused("this share link opens another endpoint, not this one")
        return share
