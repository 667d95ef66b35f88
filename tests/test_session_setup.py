"""The test session's own setup (tests/conftest.py): each xdist worker's share of the CPUs."""

from conftest import pin_xdist_worker


def test_xdist_workers_get_disjoint_cpu_shares():
    assert [pin_xdist_worker([0, 1], f"gw{i}", 2) for i in range(2)] == [[0], [1]]  # make test on 2 cores
    assert [pin_xdist_worker(list(range(8)), f"gw{i}", 2) for i in range(2)] == [[0, 2, 4, 6], [1, 3, 5, 7]]
    assert pin_xdist_worker([4, 5, 6], "gw2", 3) == [6]  # the CPUs the session may use, not 0..n-1
    assert pin_xdist_worker([0, 1], None, 0) is None  # not under xdist: the whole machine
    assert pin_xdist_worker([0, 1], "gw0", 1) is None  # one worker: the whole machine
    assert pin_xdist_worker([0, 1], "gw0", 4) is None  # more workers than CPUs: no pinning
