"""One stripe of a base: ``GET /peer/v1/images/{id}?stripe=t&stripes=k&leaf=SIZE``.

A node fetching in stripes (:mod:`cowfleet.fetch.stripes`) asks each of its stripe's
sources for stripe ``t`` only: with ``Range: bytes=a-`` (``a`` on a leaf boundary) the
answer is ``206`` whose body is the leaves ``i >= a / SIZE`` with ``i % k == t``,
concatenated in order (each waited for, as a plain range is, while the download is in
progress). ``Content-Range`` names the first byte of the first leaf sent and the last
byte of the last; ``Content-Length`` the bytes of the body (the leaves between are not
in it); ``X-Cowfleet-Stripe: t/k`` says the stripe was understood.

The leaf size comes with the request (the asking node has the image's hash tree and
checks every leaf; this node only cuts bytes, so it need not know the tree). Bad
parameters are ``400`` naming the problem: not integers, not ``0 <= t < k``, ``k`` not
2-8, a leaf size not a power of two from 64 KiB to 1 GiB, no ``Range`` or one not from
a leaf boundary. A range past the last leaf of the stripe is ``416``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

from cowfleet.errors import UsageError
from cowfleet.fetch.stripes import MAX_STRIPES, MIN_STRIPES, STRIPE_HEADER
from cowfleet.hashtree import check_leaf_size, leaf_count

PARAMS = ("stripe", "stripes", "leaf")
_INT = re.compile(r"^\d{1,12}$")
_FROM = re.compile(r"^bytes=(\d+)-$")


class BadStripe(ValueError):
    """A stripe request this node does not take (400)."""


class PastEnd(ValueError):
    """The stripe has no leaf at or after the range's start (416)."""


@dataclass(frozen=True)
class StripeRequest:
    stripe: int
    stripes: int
    leaf_size: int
    start: int  # first byte asked for (a leaf boundary)

    def leaves(self, size: int) -> list[tuple[int, int]]:
        """(first byte, bytes) of each leaf to send, in order."""
        first = self.start // self.leaf_size
        first += (self.stripe - first) % self.stripes
        out = []
        for i in range(first, leaf_count(size, self.leaf_size), self.stripes):
            begin = i * self.leaf_size
            out.append((begin, min(self.leaf_size, size - begin)))
        return out

    def headers(self, size: int) -> dict[str, str]:
        leaves = self.leaves(size)
        if not leaves:
            raise PastEnd
        first, last = leaves[0][0], leaves[-1][0] + leaves[-1][1] - 1
        return {
            "Content-Range": f"bytes {first}-{last}/{size}",
            "Content-Length": str(sum(n for _, n in leaves)),
            STRIPE_HEADER: f"{self.stripe}/{self.stripes}",
        }


def wants_stripe(query: Mapping[str, str]) -> bool:
    return any(p in query for p in PARAMS)


def _int(query: Mapping[str, str], name: str) -> int:
    raw = query.get(name)
    if raw is None:
        raise BadStripe(f"a stripe request needs '{name}' (stripe, stripes and leaf)")
    if not _INT.match(raw):
        raise BadStripe(f"'{name}' must be a whole number, not {raw!r}")
    return int(raw)


def parse_stripe(query: Mapping[str, str], range_header: str | None) -> StripeRequest:
    """The stripe asked for (see the module doc); :class:`BadStripe` when it is not one
    this node takes."""
    stripe, stripes, leaf = (_int(query, n) for n in PARAMS)
    if not MIN_STRIPES <= stripes <= MAX_STRIPES:
        raise BadStripe(f"'stripes' must be {MIN_STRIPES}-{MAX_STRIPES}, not {stripes}")
    if not 0 <= stripe < stripes:
        raise BadStripe(f"'stripe' must be 0-{stripes - 1}, not {stripe}")
    try:
        check_leaf_size(leaf)
    except UsageError as exc:
        raise BadStripe(f"'leaf': {exc}") from None
    m = _FROM.match((range_header or "").strip().replace(" ", ""))
    if m is None:
        raise BadStripe("a stripe request needs 'Range: bytes=a-' (a on a leaf boundary)")
    start = int(m.group(1))
    if start % leaf:
        raise BadStripe(f"range start {start} is not on a leaf boundary (leaf {leaf} bytes)")
    return StripeRequest(stripe, stripes, leaf, start)
