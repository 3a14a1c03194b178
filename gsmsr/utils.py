"""Small helpers shared by the commands: atomic file writes, device choice (error reporting: gsmsr.faults)."""

from __future__ import annotations

import errno
import os
import tempfile
from typing import Callable, Union

import torch

from gsmsr.faults import InputError


def fsync_path(path: str) -> None:
    """Flush a file's data, or a folder's entries, to the disk. A file is synced before the rename that publishes
    it, its folder after: otherwise a power cut can leave the new name on an empty file. A filesystem that cannot
    sync a folder (EINVAL) is passed over."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as e:
        if not (e.errno == errno.EINVAL and os.path.isdir(path)):
            raise
    finally:
        os.close(fd)


def atomic_write(path: Union[str, os.PathLike], write: Callable[[str], None]) -> None:
    """``write(tmp)`` into a temporary file beside ``path``, then rename it over ``path``.

    A crash, a signal or a power cut leaves either the old file or the new one, never a partial one (the data is
    synced before the rename, the folder after it). The result gets the usual permissions (0666 minus the umask),
    not mkstemp's 0600. An OSError that names no file (a write to a full disk) is raised again naming ``path``.
    """
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f'.{os.path.basename(path)}.', suffix='.partial')
    os.close(fd)
    try:
        write(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        fsync_path(tmp)
        os.replace(tmp, path)
        fsync_path(folder)
    except BaseException as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        if isinstance(e, OSError) and e.errno is not None and e.filename is None:
            # a failed write (full disk) names no file: name the target, not the hidden temporary
            raise OSError(e.errno, e.strerror, path) from e
        raise


def atomic_write_bytes(path: Union[str, os.PathLike], data: bytes) -> None:
    def write(tmp: str) -> None:
        with open(tmp, 'wb') as f:
            f.write(data)

    atomic_write(path, write)


def atomic_write_text(path: Union[str, os.PathLike], text: str) -> None:
    atomic_write_bytes(path, text.encode('utf-8'))


def resolve_device(device: Union[str, torch.device, None]) -> torch.device:
    """``None`` -> CUDA when available, else CPU; an unusable device is an :class:`InputError`."""
    if device is None or device == 'auto':
        return torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    try:
        device = torch.device(device)
    except RuntimeError:
        raise InputError(f'--device {device}: not a valid device') from None
    if device.type == 'cuda' and not torch.cuda.is_available():
        raise InputError(f'--device {device}: CUDA is not available')
    if device.type == 'cuda' and (device.index or 0) >= torch.cuda.device_count():
        raise InputError(f'--device {device}: only {torch.cuda.device_count()} CUDA device(s)')
    return device
