"""Fresh CPU memory populated before its first write, beside the forward (Linux MADV_POPULATE_WRITE).

The CPU arena reserves address space and the OS commits a page at its first write: a forward
that writes new pages (a prompt's, or pages fetched from Redis) took that page fault per 4 KiB
inside the forward (24 MiB of fetched pages: ~6 ms of a ~9 ms insert). `populate` hands a range
of a tensor to one background thread that asks the kernel to fault it in writable, which changes
no byte (safe while the range is being written); the forward then writes into present pages.
Nothing happens off Linux, or where the kernel lacks the call (older than 5.14).
"""

from __future__ import annotations

import ctypes
import os
import queue
import sys
import threading

MADV_POPULATE_WRITE = 23
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
_lock = threading.Lock()
_state: dict = {"madvise": None, "queue": None}


def populate(t, offset: int, length: int) -> None:
    """Fault in bytes [offset, offset + length) of CPU tensor `t`'s storage, on the background thread."""
    if length <= 0 or not sys.platform.startswith("linux"):
        return
    fn = _madvise()
    if not fn:
        return
    start = (t.data_ptr() + offset + _PAGE - 1) & ~(_PAGE - 1)
    end = t.data_ptr() + offset + length
    if end > start:  # (addresses only: no tensor on the thread, see `_work`)
        _queue().put((start, end))


def drain(timeout: float = 10.0) -> bool:
    """Wait until the requests so far are done (at most `timeout` s). True: done."""
    q = _state["queue"]
    if q is None:
        return True
    done = threading.Event()
    threading.Thread(target=lambda: (q.join(), done.set()), daemon=True).start()
    return done.wait(timeout)


def _madvise():
    if _state["madvise"] is None:
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
            _state["madvise"] = libc.madvise
        except (OSError, AttributeError):
            _state["madvise"] = False
    return _state["madvise"]


def _queue() -> queue.Queue:
    with _lock:
        if _state["queue"] is None:
            _state["queue"] = queue.Queue()
            threading.Thread(target=_work, args=(_state["queue"],), name="llmcache-prefault", daemon=True).start()
        return _state["queue"]


def _work(q: queue.Queue) -> None:
    # The thread holds addresses, not the tensor: freeing a torch tensor here could run its C++
    # destructor while the interpreter shuts down (this thread is a daemon). If the memory was
    # freed meanwhile, the call fails (ENOMEM) or faults in pages of whatever now lives there,
    # which changes no byte either.
    while True:
        start, end = q.get()
        try:
            fn = _state["madvise"]
            if fn and fn(start, end - start, MADV_POPULATE_WRITE) != 0 and ctypes.get_errno() == 22:
                _state["madvise"] = False  # (EINVAL: a kernel without MADV_POPULATE_WRITE)
        finally:
            q.task_done()


def _after_fork() -> None:  # a forked child has no thread: the next request starts one
    _state["queue"] = None


os.register_at_fork(after_in_child=_after_fork)
