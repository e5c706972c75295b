"""Background work in the index process (re-embed jobs, FAISS builds) yields the CPU to the requests beside it."""

from __future__ import annotations

import os
import threading

# Linux nice is per thread: with a job's threads at the model's priority, search p99 during a re-embed on a busy
# 2-core machine was 2.1x idle (bench/reembed.py).
BACKGROUND_NICE = 10


def lower_priority() -> None:
    """Run this thread at a lower CPU priority (Linux: nice applies per thread); elsewhere, as it is."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), BACKGROUND_NICE)
    except (AttributeError, OSError):  # no per-thread priorities here, or not allowed: run as is
        pass
