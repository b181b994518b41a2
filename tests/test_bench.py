"""Benchmark helpers whose arithmetic the printed figures rest on."""

import os

import pytest

from clipray.bench.data import cpu_split


def test_cpu_split_groups_processes_by_role_over_the_window():
    me = os.getpid()
    before = {me: ("python bench", 10.0), 101: ("ray::MapWorker(MapBatches(ClipDecoder))", 5.0),
              102: ("raylet", 1.0), 104: ("ray::MapWorker(MapBatches(ClipDecoder))", 0.0)}
    after = {me: ("python bench", 10.5), 101: ("ray::MapWorker(MapBatches(ClipDecoder))", 8.0),
             102: ("raylet", 1.5),
             103: ("gcs_server", 0.5),  # started inside the window: all its time counts
             104: ("ray::MapWorker(MapBatches(ClipDecoder))", 4.0)}
    # pid 105 exited inside the window: its time is unknown and not counted
    split = cpu_split(before | {105: ("ray::IDLE", 2.0)}, after, wall=5.0)
    assert split["decode actors"] == pytest.approx((3.0 + 4.0) / 5.0)
    assert split["consumer"] == pytest.approx(0.5 / 5.0)
    assert split["Ray + system"] == pytest.approx((0.5 + 0.5) / 5.0)
    assert split["idle"] == pytest.approx(max(0.0, (os.cpu_count() or 1) - 1.4 - 0.1 - 0.2))
