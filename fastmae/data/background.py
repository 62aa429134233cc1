"""Produce batches in a background thread, a few ahead of the consumer.

The CPU DALI path finishes its crops with torch ops (host_resize.py). Run in the training thread, that work
adds to every step (the README's CPU pretraining logged 30% of its time waiting for data); in a thread it
overlaps the step (0% waiting), since torch ops release the GIL. The thread uses one
intra-op thread: per-image ops are too small to split, and with 2 cores, DALI's 2 decoding threads plus 2
intra-op threads measured 438 images per CPU-second against 683 with one.
"""

import queue
import threading
from collections.abc import Callable, Iterator
from typing import TypeVar

import torch

T = TypeVar("T")
_DONE = object()


class _Failed:
    def __init__(self, exc: BaseException):
        self.exc = exc


def in_background(make: Callable[[], Iterator[T]], depth: int = 2, name: str = "fastmae-data") -> Iterator[T]:
    """Iterates make() in a daemon thread, up to `depth` items ahead. The worker's exception is raised here;
    closing this generator (or dropping it) stops the worker and closes make()'s iterator in its thread."""
    if depth < 1:
        raise ValueError(f"depth must be >= 1, got {depth}")
    items: queue.Queue = queue.Queue(maxsize=depth)
    stop, ready = threading.Event(), threading.Event()

    def put(item) -> bool:
        while not stop.is_set():
            try:
                items.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def work() -> None:
        it = None
        try:
            # torch.set_num_threads is per thread for the OpenMP pool and MKL, but also sets the default that
            # threads created later start with; the consumer restores that once `ready` is set. A thread
            # takes that default at its first torch threading call, so make that call first
            # (get_num_threads), or the first parallel op here would reset this thread to the restored default.
            torch.get_num_threads()
            torch.set_num_threads(1)
            ready.set()
            it = make()
            for item in it:
                if not put(item):
                    return
            put(_DONE)
        except BaseException as e:  # noqa: BLE001 - handed to the consumer, raised there
            put(_Failed(e))
        finally:
            ready.set()  # also when the setup above failed: the consumer then finds the error in the queue
            if it is not None and hasattr(it, "close"):
                it.close()  # runs make()'s cleanup (e.g. freeing a DALI pipeline) in the thread that used it

    threads_before = torch.get_num_threads()
    worker = threading.Thread(target=work, name=name, daemon=True)
    worker.start()
    ready.wait()
    torch.set_num_threads(threads_before)
    try:
        while True:
            item = items.get()
            if item is _DONE:
                return
            if isinstance(item, _Failed):
                raise item.exc
            yield item
    finally:
        stop.set()
        worker.join()
