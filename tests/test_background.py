"""in_background: the CPU DALI path's producer thread (order, errors, early stop, torch thread counts)."""

import threading

import pytest
import torch

from fastmae.data.background import in_background


def test_yields_everything_in_order_with_one_intra_op_thread_in_the_worker():
    seen = {}

    def make():
        seen["thread"] = threading.current_thread().name
        for i in range(7):
            yield torch.full((2,), float(i))  # [2]
            if i == 0:  # the consumer has restored the process default by now; run a parallel op, then look
                torch.randn(512, 512).sum()
                seen["intra_op"] = torch.get_num_threads()

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        out = list(in_background(make, depth=2))
        assert [int(t[0]) for t in out] == list(range(7))
        assert seen == {"thread": "fastmae-data", "intra_op": 1}
        assert torch.get_num_threads() == 2  # the consumer's own count is untouched
        later = {}
        t = threading.Thread(target=lambda: later.setdefault("n", torch.get_num_threads()))
        t.start()
        t.join()
        assert later["n"] == 2  # and threads created afterwards start with the process default again
    finally:
        torch.set_num_threads(before)


def test_a_worker_error_is_raised_in_the_consumer():
    def make():
        yield 1
        raise OSError("disk gone")

    it = in_background(make)
    assert next(it) == 1
    with pytest.raises(OSError, match="disk gone"):
        next(it)


def test_closing_early_stops_the_worker_and_cleans_up_in_its_thread():
    cleaned = {}

    def make():
        try:
            for i in range(10**6):
                yield i
        finally:
            cleaned["thread"] = threading.current_thread().name

    it = in_background(make, depth=3)
    assert [next(it) for _ in range(5)] == [0, 1, 2, 3, 4]
    it.close()  # what dropping a half-read epoch iterator does
    assert cleaned == {"thread": "fastmae-data"}
    assert not any(t.name == "fastmae-data" for t in threading.enumerate())


def test_depth_must_be_positive():
    with pytest.raises(ValueError, match="depth must be >= 1"):
        next(in_background(lambda: iter([1]), depth=0))


def test_an_error_building_the_iterator_is_raised_too():
    def make():
        raise RuntimeError("no pipeline here")

    with pytest.raises(RuntimeError, match="no pipeline here"):
        next(in_background(make))
    assert not any(t.name == "fastmae-data" for t in threading.enumerate())
