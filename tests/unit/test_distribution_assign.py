"""assign_sources: a deterministic tree of bounded fan-out over holders and fetchers."""

from __future__ import annotations

from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cowfleet.distribution.assign import BACKUPS, Holder, SourcePlan, assign_sources

IMAGE = "8b0e8b4c-3b35-4c8e-9d7e-2f4b9a1e2c11"


def _holder(host: str, complete: bool = True) -> Holder:
    return Holder(host, f"http://{host}:8775", complete)


def _parents(plans: dict[str, SourcePlan]) -> dict[str, str | None]:
    return {h: (p.peers[0] if p.peers else None) for h, p in plans.items()}


def test_without_holders_one_node_takes_the_origin_and_the_rest_stream_from_the_tree() -> None:
    fetchers = [f"n{i:02d}" for i in range(15)]
    plans = assign_sources(IMAGE, fetchers, [], fanout=2)
    parents = _parents(plans)
    assert [h for h, p in parents.items() if p is None] == ["n00"]  # one copy from the origin
    assert max(Counter(p for p in parents.values() if p).values()) <= 2
    # a full binary tree of 15 nodes: 4 levels
    depth = {}
    for h in fetchers:
        p = parents[h]
        depth[h] = 1 if p is None else depth[p] + 1
    assert max(depth.values()) == 4


def test_complete_holders_feed_first_then_nodes_still_fetching() -> None:
    holders = [_holder("a"), _holder("b")]
    plans = assign_sources(IMAGE, ["f1", "f2", "f3", "f4", "f5"], holders, fanout=2)
    parents = _parents(plans)
    first_four = [parents[h] for h in ("f1", "f2", "f3", "f4")]
    assert Counter(first_four) == {"a": 2, "b": 2}
    assert parents["f5"] in ("f1", "f2", "f3", "f4")  # both holders are full
    # fallbacks: the other complete holder, never a node placed later
    assert plans["f1"].peers[1] in ("a", "b") and plans["f1"].peers[1] != parents["f1"]
    assert "f5" not in plans["f1"].peers


def test_a_fetcher_that_holds_the_image_needs_no_source() -> None:
    plans = assign_sources(IMAGE, ["a", "f"], [_holder("a")], fanout=1)
    assert plans["a"] == SourcePlan("a", ())
    assert plans["f"].peers == ("a",)


def test_in_progress_holders_feed_new_fetchers_and_keep_their_own_place() -> None:
    holders = [_holder("x", complete=False)]
    plans = assign_sources(IMAGE, ["x", "y", "z"], holders, fanout=1)
    assert plans["x"].peers == ()  # it was fetching first: from the origin
    assert plans["y"].peers[0] == "x"
    assert plans["z"].peers[:2] == ("y", "x")  # parent, then the parent's ancestor


def test_when_the_top_of_the_tree_dies_only_one_node_falls_back_to_the_origin() -> None:
    """Kill n00 (fed by the origin), n01 and n02 (its children): each survivor's plan
    still names a live peer, except n03, the first node placed after them."""
    fetchers = [f"n{i:02d}" for i in range(16)]
    plans = assign_sources(IMAGE, fetchers, [], fanout=2)
    dead = {"n00", "n01", "n02"}
    to_origin = [h for h in fetchers[3:] if not set(plans[h].peers) - dead]
    assert to_origin == ["n03"]
    assert plans["n04"].peers[0] in dead and "n03" in plans["n04"].peers
    # never a node placed after the fetcher (no cycle, no waiting on oneself)
    for i, h in enumerate(fetchers):
        assert all(fetchers.index(p) < i for p in plans[h].peers), (h, plans[h].peers)


def test_the_plan_is_deterministic_and_spreads_images_over_holders() -> None:
    holders = [_holder(f"h{i}") for i in range(8)]
    one = assign_sources(IMAGE, ["f"], holders, fanout=2)
    assert one == assign_sources(IMAGE, ["f"], list(holders), fanout=2)
    picked = {
        assign_sources(f"00000000-0000-0000-0000-{i:012d}", ["f"], holders, fanout=2)["f"].peers[0]
        for i in range(40)
    }
    assert len(picked) > 3


@pytest.mark.parametrize("fanout", [0, -1, True, 1.5])
def test_fanout_must_be_positive(fanout: object) -> None:
    with pytest.raises(ValueError, match="fanout"):
        assign_sources(IMAGE, ["a"], [], fanout=fanout)  # type: ignore[arg-type]


hosts = st.sampled_from([f"h{i}" for i in range(30)])


@settings(max_examples=200, deadline=None)
@given(
    fetchers=st.lists(hosts, max_size=30),
    holders=st.lists(st.tuples(hosts, st.booleans()), max_size=10),
    fanout=st.integers(1, 5),
)
def test_properties(fetchers: list[str], holders: list[tuple[str, bool]], fanout: int) -> None:
    hs = [_holder(h, c) for h, c in holders]
    plans = assign_sources(IMAGE, fetchers, hs, fanout=fanout)
    assert set(plans) == set(fetchers)
    assert plans == assign_sources(IMAGE, fetchers, hs, fanout=fanout)
    parents = _parents(plans)
    # bounded fan-out
    children = Counter(p for p in parents.values() if p is not None)
    assert all(n <= fanout for n in children.values())
    complete = {h for h, c in holders if c}
    listed = {h for h, _ in holders}
    origin = [h for h, p in parents.items() if p is None and h not in complete]
    in_progress_fetchers = {h for h in fetchers if h in listed and h not in complete}
    assert len(origin) <= 1 + len(in_progress_fetchers)
    for h, plan in plans.items():
        assert h not in plan.peers and len(plan.peers) <= 1 + BACKUPS
        assert len(set(plan.peers)) == len(plan.peers)
        assert all(p in listed or p in plans for p in plan.peers)
    # no cycle: following parents always ends
    for h in plans:
        seen = set()
        while h is not None and h in parents:
            assert h not in seen
            seen.add(h)
            h = parents[h]  # type: ignore[assignment]
