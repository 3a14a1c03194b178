"""How gsmsr's commands meet faults: one-line errors with exit codes, signals, and never touching the input.

* :func:`run_reporting_errors` runs a command body and turns every failure into one line on stderr and an exit
  code: 2 bad input or settings (:class:`InputError`), 1 the environment (full disk, unwritable folder, read
  errors: :class:`OSError`, :class:`FaultError`) or an unexpected error, ``128 + signum`` for SIGINT / SIGTERM /
  SIGHUP. Tracebacks only with ``debug`` (``--debug``) or ``GSMSR_DEBUG=1``.
* :func:`abort_on_signals`: inside it SIGTERM and SIGHUP behave like Ctrl-C, raising :class:`Interrupted` in
  the main thread, so the ``finally`` blocks that abort half-written outputs run.
* :func:`input_overlap`: whether writing an output could touch the input (same file through links, or one
  folder inside the other), compared on the files themselves, not on their spelling.
* :func:`check_writable` and :func:`check_free_space`: cheap checks made before a network loads.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import os
import shutil
import signal
import sys
import tempfile
import threading
import traceback
from typing import Callable, Iterator, Optional, Sequence

__all__ = [
    'InputError',
    'FaultError',
    'Interrupted',
    'one_line',
    'os_error_cause',
    'describe_os_error',
    'abort_on_signals',
    'output_complete',
    'run_reporting_errors',
    'add_debug_argument',
    'debug_requested',
    'input_overlap',
    'check_writable',
    'check_free_space',
]

DEBUG_ENV = 'GSMSR_DEBUG'
HANDLED_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class InputError(Exception):
    """Bad user input (file, shape, option): reported in one line, exit code 2."""


class FaultError(Exception):
    """The environment failed or will (no free space, write or read error): reported in one line, exit code 1.
    The message names the path and the cause."""


class Interrupted(KeyboardInterrupt):
    """A handled signal (SIGINT, SIGTERM, SIGHUP) arrived; a KeyboardInterrupt so every cleanup path runs."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def one_line(text: object, limit: int = 500) -> str:
    """An error message folded onto one line, cut at ``limit`` characters."""
    text = ' '.join(part.strip() for part in str(text).splitlines() if part.strip())
    return text if len(text) <= limit else text[:limit] + ' ...'


def os_error_cause(err: OSError) -> str:
    """The cause of an OSError in lower case ('no space left on device'), or its message when it has no errno."""
    if err.errno is None or not err.strerror:
        return one_line(err, 300)
    return err.strerror[:1].lower() + err.strerror[1:]


def describe_os_error(err: OSError) -> str:
    """'PATH: cause' for an OSError, e.g. 'out/frames: no space left on device'."""
    cause = os_error_cause(err)
    return f'{err.filename}: {cause}' if err.filename and err.errno is not None else cause


def debug_requested(debug: bool = False) -> bool:
    return bool(debug) or os.environ.get(DEBUG_ENV, '').strip().lower() not in ('', '0', 'false', 'no')


def add_debug_argument(parser: argparse.ArgumentParser) -> None:
    """``--debug``: tracebacks with the one-line errors. SUPPRESS keeps a parent parser's value in subparsers."""
    parser.add_argument(
        '--debug',
        action='store_true',
        default=argparse.SUPPRESS,
        help=f'print the traceback of an error (also {DEBUG_ENV}=1)',
    )


@contextlib.contextmanager
def abort_on_signals(signals: Sequence[int] = HANDLED_SIGNALS) -> Iterator[None]:
    """Raise :class:`Interrupted` in the main thread on the first of ``signals``; later ones are ignored while
    the stack unwinds, so cleanup finishes. Outside the main thread (signals cannot be set there) a no-op."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    fired = []

    def handler(signum: int, frame) -> None:
        if not fired:
            fired.append(signum)
            raise Interrupted(signum)

    previous = {s: signal.signal(s, handler) for s in signals}
    try:
        yield
    finally:
        for s, old in previous.items():
            signal.signal(s, old)


@contextlib.contextmanager
def output_complete(path: str) -> Iterator[None]:
    """Inside: the output ``path`` is complete, so an interruption here is reported as coming after it (by
    :func:`run_reporting_errors`), not as 'no output written'."""
    try:
        yield
    except KeyboardInterrupt as e:
        e.output_complete = path
        raise


def run_reporting_errors(
    prog: str, body: Callable[[], int], interrupted: str = 'interrupted', debug: bool = False
) -> int:
    """Run a command body under :func:`abort_on_signals`; every failure is one line on stderr.

    Exit codes: 2 :class:`InputError`; 1 :class:`OSError` / :class:`FaultError` (environment) and unexpected
    errors; 128 + signal number when interrupted (130 for Ctrl-C), with the line ``interrupted`` (e.g.
    'interrupted, no output written'), or 'interrupted after PATH was complete' inside :func:`output_complete`,
    and the signal's name. With ``debug`` or ``GSMSR_DEBUG=1`` the
    traceback is printed first.
    """
    show_traceback = debug_requested(debug)
    try:
        with abort_on_signals():
            return int(body() or 0)
    except InputError as e:
        caught, message, code = e, f'error: {one_line(e, sys.maxsize)}', 2  # our own message: never cut
    except KeyboardInterrupt as e:
        signum = e.signum if isinstance(e, Interrupted) else signal.SIGINT
        complete = getattr(e, 'output_complete', None)
        what = f'interrupted after {complete} was complete' if complete else interrupted
        caught, message, code = e, f'{what} ({signal.Signals(signum).name})', 128 + signum
    except FaultError as e:
        caught, message, code = e, f'error: {one_line(e, sys.maxsize)}', 1
    except OSError as e:
        caught, message, code = e, f'error: {describe_os_error(e)}', 1
    except Exception as e:
        hint = '' if show_traceback else f' (--debug or {DEBUG_ENV}=1 shows the traceback)'
        caught, message, code = e, f'unexpected error: {type(e).__name__}: {one_line(e, 300)}{hint}', 1
    if show_traceback:
        traceback.print_exception(type(caught), caught, caught.__traceback__)
    print(f'{prog}: {message}', file=sys.stderr, flush=True)
    return code


# ----------------------------------------------------------------------------------------------- paths
def _inside(path: str, folder: str) -> bool:
    """True when real path ``path`` lies strictly inside real path ``folder``."""
    return path != folder and os.path.commonpath([path, folder]) == folder


def input_overlap(output: str, input_path: str) -> Optional[str]:
    """Why writing ``output`` could overwrite or delete ``input_path`` ('is the input', 'contains the input',
    'is inside the input folder'), or None. Links are resolved and existing files compared by identity
    (device and inode), so symbolic links, hard links and bind mounts of the input are all caught."""
    if os.path.exists(output) and os.path.exists(input_path):
        with contextlib.suppress(OSError):
            if os.path.samefile(output, input_path):
                return 'is the input'
    out_real, in_real = os.path.realpath(output), os.path.realpath(input_path)
    if out_real == in_real:
        return 'is the input'
    if _inside(in_real, out_real):
        return 'contains the input'
    if _inside(out_real, in_real):
        return 'is inside the input folder'
    return None


def check_writable(folder: str, what: str) -> None:
    """Create and delete a file in ``folder``; a :class:`FaultError` (the environment: exit code 1, as any write
    error) naming ``what`` and the cause otherwise.

    A real write, not ``os.access``: permission bits say nothing for root, nor for read-only file systems.
    """
    try:
        fd, probe = tempfile.mkstemp(dir=folder, prefix='.gsmsr-write-test.')
        os.close(fd)
        os.remove(probe)
    except OSError as e:
        raise FaultError(f'{what}: cannot write to folder {folder} ({os_error_cause(e)})') from None


def check_free_space(folder: str, needed: int, what: str) -> None:
    """A :class:`FaultError` when ``folder``'s file system has less than ``needed`` bytes free."""
    free = shutil.disk_usage(folder).free
    if free < needed:
        raise FaultError(
            f'{what}: not enough free space ({os.strerror(errno.ENOSPC).lower()}): about '
            f'{needed / 2**20:.0f} MiB needed, {free / 2**20:.0f} MiB free in {folder}'
        )
