"""Child processes that die with their parent.

``smt ecosystem run --jobs N`` trains cells in spawned processes, and
``smt train --nproc-per-node N`` trains on N ranks that torchrun starts in
sessions of their own. When the main process is killed outright (SIGKILL,
the OOM killer), nothing in it runs to stop them: a worker in the middle of
a cell, or a rank holding the run folder's lock, would train on, unseen.
:func:`die_with_parent` runs first in each worker (the pool's initializer)
and in each rank:

* on Linux, ``prctl(PR_SET_PDEATHSIG, SIGTERM)``: the kernel sends the worker
  SIGTERM the moment its parent ends;
* everywhere, a daemon thread that ends the worker when ``os.getppid()``
  changes (the worker was re-parented: its parent is gone).

Both check, once set up, that the parent did not die before: a worker whose
parent is already gone exits at once. The module imports nothing heavy, so a
worker starts watching before it imports torch.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time

#: prctl option: the signal a process gets when its parent dies (linux/prctl.h)
PR_SET_PDEATHSIG = 1
#: exit status of a worker whose parent is gone (128 + SIGTERM, as if killed by it)
ORPHAN_EXIT = 128 + int(signal.SIGTERM)


def _set_pdeathsig(sig: int = signal.SIGTERM) -> bool:
    """``prctl(PR_SET_PDEATHSIG, sig)``; False where it is not available."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) == 0
    except (OSError, AttributeError):  # no libc, or no prctl in it
        return False


def _watch(parent: int, interval: float) -> None:
    while True:
        time.sleep(interval)
        if os.getppid() != parent:
            os._exit(ORPHAN_EXIT)


def die_with_parent(parent: int | None = None, interval: float = 0.5) -> None:
    """Makes the calling process end when ``parent`` (default: its parent now) does.

    Args:
        parent: the pid the process must outlive no longer (pass the main
            process's ``os.getpid()``, so a parent that died before this call
            is noticed too).
        interval: seconds between the watchdog thread's checks.
    """
    parent = os.getppid() if parent is None else parent
    _set_pdeathsig(signal.SIGTERM)
    if os.getppid() != parent:  # it died before the signal was set: nobody will send it
        os._exit(ORPHAN_EXIT)
    threading.Thread(target=_watch, args=(parent, interval), name="smt-die-with-parent", daemon=True).start()
