"""When this process started, for the launch timeline in ``gsmsr infer``'s statistics (``timeline``).

``gsmsr/__init__.py`` imports this module first, so :data:`GSMSR_IMPORT_START` is the earliest time gsmsr itself
sees: the Python interpreter has started, nothing heavy (torch, BasicSR) is imported yet. The process's own start
comes from the OS (:func:`process_start`). Only the standard library here: importing it costs nothing.
"""

from __future__ import annotations

import os
import time
from typing import Dict, Optional, Tuple


def _proc_start() -> Optional[float]:
    """Linux: the start time in ``/proc/self/stat`` (clock ticks since boot, 10 ms steps) as Unix time.

    Converted through ``CLOCK_BOOTTIME`` (the clock the kernel counts it on), not ``/proc/stat``'s ``btime``,
    which is whole seconds.
    """
    try:
        with open('/proc/self/stat', encoding='ascii') as f:
            stat = f.read()
        ticks = int(stat[stat.rindex(')') + 2 :].split()[19])  # field 22; the name in (...) may hold spaces
        since_start = time.clock_gettime(time.CLOCK_BOOTTIME) - ticks / os.sysconf('SC_CLK_TCK')
    except (OSError, ValueError, IndexError, AttributeError):  # no /proc, or no CLOCK_BOOTTIME (not Linux)
        return None
    return time.time() - since_start


GSMSR_IMPORT_START = time.time()
# Read now, next to GSMSR_IMPORT_START: the wall clock and the boot clock drift apart over a long-lived process (a
# test runner: minutes later, the start computed through them came out after the import).
_PROC_START = _proc_start()


def _psutil_start() -> Optional[float]:
    try:
        import psutil
    except ImportError:
        return None
    try:
        return float(psutil.Process().create_time())
    except Exception:  # psutil.Error, or a platform it does not support
        return None


def process_start() -> Tuple[float, str]:
    """Unix time at which this process started, and where it comes from.

    ``'proc'`` (Linux), ``'psutil'`` (elsewhere, if installed), else ``'gsmsr_import'``: the best gsmsr can see,
    :data:`GSMSR_IMPORT_START`, which misses the interpreter's start-up (tens of milliseconds).
    """
    for source, read in (('proc', lambda: _PROC_START), ('psutil', _psutil_start)):
        start = read()
        if start is not None and start <= GSMSR_IMPORT_START:
            return start, source
    return GSMSR_IMPORT_START, 'gsmsr_import'


def launch_timeline() -> Tuple[Dict[str, float], str]:
    """``{'process_start': ..., 'gsmsr_import_start': ...}`` (Unix times) and the source of ``process_start``."""
    start, source = process_start()
    return {'process_start': start, 'gsmsr_import_start': GSMSR_IMPORT_START}, source
