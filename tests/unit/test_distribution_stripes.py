"""assign_sources with stripes: one tree per stripe, interiors disjoint, acyclic."""

from __future__ import annotations

from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cowfleet.distribution.assign import Holder, SourcePlan, assign_sources

IMAGE = "8b0e8b4c-3b35-4c8e-9d7e-2f4b9a1e2c11"


def _holder(host: str, complete: bool = True) -> Holder:
    return Holder(host, f"http://{host}:8775", complete)


def _acyclic(edges: dict[str, set[str]]) -> bool:
    """Whether the graph ``node -> sources`` has no cycle."""
    state: dict[str, int] = {}

    def visit(n: str) -> bool:
        if state.get(n) == 1:
            return False
        if state.get(n) == 2:
            return True
        state[n] = 1
        ok = all(visit(m) for m in edges.get(n, ()))
        state[n] = 2
        return ok

    return all(visit(n) for n in list(edges))


def _check(plans: dict[str, SourcePlan], holders: list[Holder], k: int, fanout: int) -> None:
    complete = {h.host for h in holders if h.complete}
    feeding = {h.host for h in holders}
    fetching = [h for h in plans if h not in complete]
    shared: Counter[str] = Counter()
    union = {h: {p for chain in plans[h].stripes for p in chain} for h in fetching}
    assert _acyclic(union), "the stripes' sources together have a cycle"
    for t in range(k):
        parents = Counter(plans[h].stripes[t][0] for h in fetching if plans[h].stripes[t])
        for p, n in parents.items():
            if p in feeding:
                shared[p] += n
            else:
                assert n <= fanout, f"{p} feeds {n} in stripe {t}"
    assert all(n <= fanout for n in shared.values())
    for h in fetching:
        assert len(plans[h].stripes) == k  # a source for every stripe (empty: the origin)
        assert plans[h].peers == plans[h].stripes[0]
        assert h not in {p for chain in plans[h].stripes for p in chain}


def test_a_fresh_image_takes_one_copy_from_the_origin_and_each_tree_has_its_own_interior() -> None:
    fetchers = [f"n{i:03d}" for i in range(100)]
    plans = assign_sources(IMAGE, fetchers, [], fanout=3, stripes=2)
    _check(plans, [], 2, 3)
    assert Counter(plans[h].home for h in fetchers) == {0: 50, 1: 50}
    # every stripe from the origin to n000 only, which then feeds every stripe
    for t in range(2):
        assert [h for h in fetchers if not plans[h].stripes[t]] == ["n000"]
        interior = {plans[h].stripes[t][0] for h in fetchers if plans[h].stripes[t]}
        assert "n000" in interior
        assert all(plans[p].home == t for p in interior - {"n000"})
    assert plans["n001"].stripes == (("n000",), ("n000",))

    def depth(h: str) -> int:  # in the union of the trees: the slowest stripe's
        return 1 + max((depth(c[0]) if c else 0) for c in plans[h].stripes)

    assert max(depth(h) for h in fetchers) <= 12  # log-deep, not a chain


def test_one_stripe_is_exactly_the_unstriped_plan() -> None:
    fetchers = [f"n{i}" for i in range(30)]
    holders = [_holder("a"), _holder("n3", complete=False)]
    assert assign_sources(IMAGE, fetchers, holders, fanout=2, stripes=1) == assign_sources(
        IMAGE, fetchers, holders, fanout=2
    )
    assert all(p.stripes == () for p in assign_sources(IMAGE, fetchers, [], fanout=2).values())


def test_complete_holders_feed_every_stripe_with_shared_slots_and_no_origin() -> None:
    holders = [_holder("a"), _holder("b")]
    fetchers = [f"f{i}" for i in range(10)]
    plans = assign_sources(IMAGE, fetchers, holders, fanout=2, stripes=2)
    _check(plans, holders, 2, 2)
    assert all(all(chain for chain in plans[h].stripes) for h in fetchers)  # no origin
    firsts = Counter(plans[h].stripes[t][0] for h in fetchers for t in range(2))
    assert firsts["a"] == 2 and firsts["b"] == 2  # four slots, shared by the trees


def test_a_holder_fetcher_keeps_an_empty_plan_and_pending_ones_take_earlier_sources() -> None:
    holders = [_holder("a"), _holder("x", complete=False)]
    plans = assign_sources(IMAGE, ["a", "x", "y", "z"], holders, fanout=2, stripes=2)
    assert plans["a"] == SourcePlan("a", ())
    assert plans["x"].home is None  # fetching already: feeds any stripe
    assert all(chain and chain[0] == "a" for chain in plans["x"].stripes)
    _check(plans, holders, 2, 2)


@pytest.mark.parametrize("bad", [0, 9, True, "2"])
def test_stripes_out_of_range_is_refused(bad: object) -> None:
    with pytest.raises(ValueError, match="stripes"):
        assign_sources(IMAGE, ["a"], [], fanout=2, stripes=bad)  # type: ignore[arg-type]


@settings(max_examples=150, deadline=None)
@given(
    n=st.integers(1, 60),
    k=st.integers(2, 4),
    extra=st.integers(0, 2),
    holders=st.lists(st.tuples(st.integers(0, 70), st.booleans()), max_size=6),
)
def test_every_striped_plan_is_acyclic_bounded_and_deterministic(
    n: int, k: int, extra: int, holders: list[tuple[int, bool]]
) -> None:
    fanout = max(1, k - 1 + extra)  # fan-out k-1 .. k+1: slots may run short
    fetchers = [f"n{i}" for i in range(n)]
    hs = [_holder(f"n{i}", c) for i, c in holders]
    plans = assign_sources(IMAGE, fetchers, hs, fanout=fanout, stripes=k)
    assert plans == assign_sources(IMAGE, fetchers, hs, fanout=fanout, stripes=k)
    seen: dict[str, Holder] = {}
    for h in hs:
        if h.host not in seen or h.complete:
            seen[h.host] = h
    _check(plans, list(seen.values()), k, fanout)
    new = [h for h in fetchers if h not in seen]
    counts = Counter(plans[h].home for h in new)
    assert max(counts.values(), default=0) - min(counts.values(), default=0) <= 1
    if not seen and new and fanout >= k:  # the origin: every stripe to the first only
        for t in range(k):
            assert [h for h in new if not plans[h].stripes[t]] == new[:1]
    if not seen and k == 2 and fanout > k:  # interiors disjoint (but the first's)
        for t in range(k):
            interior = {plans[h].stripes[t][0] for h in new if plans[h].stripes[t]}
            assert all(plans[p].home == t for p in interior - set(new[:1]))
