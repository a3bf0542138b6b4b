"""StampSynchronizer: approximate-time pairing, drops per reason, bounded queues."""

import pytest

from recon_slam.io.sync import StampSynchronizer


def _feed(sync, events):
    out = []
    for stream, stamp, item in events:
        out.extend(sync.add(stream, stamp, item))
    return out


def test_offset_stamps_within_tolerance_are_paired():
    sync = StampSynchronizer(["image", "depth"], tolerance=0.02)
    events = []
    for i in range(10):
        events.append(("image", 10 + i / 30, f"i{i}"))
        events.append(("depth", 10 + i / 30 + 0.007, f"d{i}"))
    out = _feed(sync, events) + sync.flush()
    assert [m.items for m in out] == [(f"i{i}", f"d{i}") for i in range(10)]
    assert [m.stamp for m in out] == sorted(m.stamp for m in out)
    assert all(abs(m.stamps[1] - m.stamps[0]) <= 0.02 for m in out)
    assert sum(sync.drops.values()) == 0 and sync.matched == 10


def test_depth_arriving_first_and_closest_partner_wins():
    sync = StampSynchronizer(2, tolerance=0.02)
    out = _feed(sync, [(1, 0.990, "d0"), (1, 1.004, "d1"), (1, 1.030, "d2"), (0, 1.000, "i0"), (0, 1.033, "i1")])
    out += sync.flush()
    assert [m.items for m in out] == [("i0", "d1"), ("i1", "d2")]
    assert sync.drops["unmatched"] == 1  # d0 lost to the closer d1
    assert sync.drops_by_stream[1]["unmatched"] == 1


def test_outside_tolerance_dropped():
    sync = StampSynchronizer(["image", "depth"], tolerance=0.01)
    events = []
    for i in range(6):
        events.append(("image", i * 0.1, i))
        offset = 0.05 if i in (2, 4) else 0.003
        events.append(("depth", i * 0.1 + offset, i))
    out = _feed(sync, events) + sync.flush()
    assert [m.items[0] for m in out] == [0, 1, 3, 5]
    assert sync.drops_by_stream["image"]["unmatched"] == 2
    assert sync.drops_by_stream["depth"]["unmatched"] == 2


def test_waits_for_partner_then_emits_in_order():
    sync = StampSynchronizer(["left", "right"], tolerance=0.005)
    assert sync.add("left", 1.0, "l0") == []  # a right message may still come
    assert sync.add("left", 1.1, "l1") == []
    assert sync.add("right", 0.999, "r_early") == []  # 1.0 may get a closer one after it
    m = sync.add("right", 1.0005, "r0")  # at/after 1.0: l0 is decided (closest: r0)
    assert [x.items for x in m] == [("l0", "r0")]
    assert sync.drops["unmatched"] == 1  # r_early
    assert [x.items for x in sync.add("right", 1.1, "r1")] == [("l1", "r1")]
    assert sync.queue_lengths() == (0, 0)


def test_three_streams():
    sync = StampSynchronizer(["image", "depth", "info"], tolerance=0.02)
    out = []
    for i in range(5):
        t = 5 + i * 0.1
        out += sync.add("info", t, f"c{i}")
        out += sync.add("depth", t + 0.01, f"d{i}")
        out += sync.add("image", t + 0.005, f"i{i}")
    out += sync.flush()
    assert [m.items for m in out] == [(f"i{i}", f"d{i}", f"c{i}") for i in range(5)]


def test_backwards_and_duplicate_stamps_counted_and_rejected():
    sync = StampSynchronizer(["image", "depth"], tolerance=0.02)
    out = _feed(
        sync,
        [
            ("image", 2.0, "a"),
            ("depth", 2.0, "a"),
            ("image", 1.0, "back"),  # bag loop / clock reset
            ("image", 2.0, "dup"),
            ("image", 2.1, "b"),
            ("depth", 2.1, "b"),
            ("depth", 0.5, "back"),
        ],
    )
    out += sync.flush()
    assert [m.items for m in out] == [("a", "a"), ("b", "b")]
    assert sync.drops["backwards"] == 2 and sync.drops["duplicate"] == 1
    assert sync.drops_by_stream["image"]["backwards"] == 1
    assert sync.drops_by_stream["depth"]["backwards"] == 1
    assert sync.last_stamp("image") == 2.1
    sync.reset()
    assert sync.add("image", 0.0, "x") == [] and sync.drops["backwards"] == 2


def test_queue_bound_when_a_stream_stops():
    sync = StampSynchronizer(["image", "depth"], tolerance=0.02, queue_size=4)
    sync.add("depth", 0.0, 0)
    for i in range(20):
        sync.add("image", i * 0.1, i)
        assert max(sync.queue_lengths()) <= 4
    assert sync.matched == 1  # image 0 with depth 0
    assert sync.drops["overflow"] == 20 - 1 - 4
    left = sum(sync.queue_lengths())
    sync.flush()
    assert sync.drops["unmatched"] + sync.drops["flushed"] >= left
    assert sync.queue_lengths() == (0, 0)


def test_single_stream_and_bad_arguments():
    sync = StampSynchronizer(1, tolerance=0.0)
    assert [m.items for m in sync.add(0, 1.0, "x")] == [("x",)]
    with pytest.raises(ValueError):
        StampSynchronizer(["a", "a"])
    with pytest.raises(ValueError):
        StampSynchronizer(2, tolerance=-1)
    with pytest.raises(KeyError):
        StampSynchronizer(["a", "b"]).add("c", 0.0)
