"""Streaming frame sources (video file or image folder) and atomic sinks (video file or PNG folder).

Frames travel as RGB ``uint8`` arrays of shape (H, W, 3), one at a time, so nothing here holds more than a
frame or two. Videos are decoded and encoded with PyAV (FFmpeg); image folders are read and written with
OpenCV. A sink writes to a hidden temporary name next to the output and renames it into place only in
``commit()``; ``abort()`` deletes it, so a failed run leaves nothing that looks like a result.

Partial outputs. The temporary name is ``.<output name>.<pid>.<random>.partial[.ext]`` and the writing process
holds an exclusive ``flock`` on it until commit or abort. The kernel drops the lock when the process dies, even
by SIGKILL or a power cut, so the next run for the same output (:func:`check_output`) knows a stale partial
(no lock: removed, with a note) from one another live run is writing (locked: refused). Where the file system
has no flock the partial is reported, never removed. ``--force`` over a PNG folder moves the old frames into an
unlocked partial before deleting them, so a run killed meanwhile leaves them to the next run's cleanup. A write
error names the output and the cause, e.g. ``out/frames: cannot write (no space left on device)``.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import re
import shutil
import sys
import tempfile
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from fractions import Fraction
from typing import Iterator, List, Optional, Tuple

import cv2
import numpy as np

from gsmsr.faults import FaultError, InputError, check_writable, input_overlap, os_error_cause, output_complete
from gsmsr.utils import fsync_path

# PyAV, imported by _require_av when the first video file is opened: it is needed for video files only, and
# importing it takes ~0.2 s of every launch that folders of frames do not need to wait for.
av = None

__all__ = [
    'InputError',
    'FrameTag',
    'SourceInfo',
    'open_source',
    'output_kind',
    'check_output',
    'clear_stale_partials',
    'estimated_output_bytes',
    'VideoSink',
    'FolderSink',
    'open_sink',
    'IMAGE_EXTENSIONS',
    'VIDEO_EXTENSIONS',
]

IMAGE_EXTENSIONS = ('.png', '.jpg', '.jpeg', '.bmp', '.tif', '.tiff', '.webp')
EXIF_ORIENTATION = 0x0112  # the EXIF tag by which OpenCV turns an image as it decodes it
# image files of a folder decoded at once (OpenCV releases the GIL). A 1080p PNG takes ~35 ms on one core, and
# gsmsr infer's first chunk waits for its frames and one stride more (40 frames at 1080p x 40, the GPU idle).
DECODE_THREADS = 4
# Output container extension -> preferred encoder (fallback mpeg4 where the preferred one is missing).
VIDEO_EXTENSIONS = {'.mp4': 'libx264', '.mkv': 'libx264', '.mov': 'libx264', '.avi': 'mpeg4', '.webm': 'libvpx-vp9'}
ENCODER_OPTIONS = {
    'libx264': {'crf': '16', 'preset': 'medium'},  # visually lossless, normal speed
    'libvpx-vp9': {'crf': '20', 'b': '0'},
}
DEFAULT_FOLDER_FPS = Fraction(25)


@dataclass(frozen=True)
class FrameTag:
    """Where a frame came from: its index, presentation time in seconds (video) and a name for PNG output."""

    index: int
    time: Optional[Fraction]
    name: str


@dataclass(frozen=True)
class SourceInfo:
    path: str
    kind: str  # 'video' or 'folder'
    height: int
    width: int
    frames: Optional[int]  # declared frame count; None when the container does not say
    rate: Optional[Fraction]  # average frame rate (video only)
    has_audio: bool


def _turned_a_quarter(im) -> bool:
    """Whether OpenCV decodes the opened PIL image ``im`` turned by 90 degrees: its EXIF orientation (a camera's JPEG,
    also WebP and PNG) is 5-8. Read from the EXIF block PIL found in the header (``getexif()`` would decode a
    whole PNG looking for one)."""
    from PIL import Image

    raw = im.info.get('exif')
    if not raw:
        return False
    exif = Image.Exif()
    try:
        exif.load(raw)
    except Exception:  # a damaged EXIF block: the image itself may still be fine, and OpenCV then leaves it unturned
        return False
    return exif.get(EXIF_ORIENTATION) in (5, 6, 7, 8)


def _natural_key(name: str):
    # 'frame2.png' sorts before 'frame10.png'.
    return [int(part) if part.isdigit() else part for part in re.split(r'(\d+)', name)]


class VideoSource:
    """Decodes the first video stream of a file, frame by frame."""

    def __init__(self, path: str):
        _require_av(path)
        try:
            self.container = av.open(path)
        except (av.error.FFmpegError, UnicodeDecodeError) as e:
            if isinstance(e, OSError) and e.errno is not None:  # the file could not be read (EIO...): environment
                raise FaultError(f'{path}: reading failed ({os_error_cause(e)})') from None
            raise InputError(f'{path}: cannot open as a video ({e})') from None
        if not self.container.streams.video:
            self.container.close()
            raise InputError(f'{path}: cannot open as a video (it contains no video stream)')
        stream = self.container.streams.video[0]
        stream.thread_type = 'AUTO'
        ctx = stream.codec_context
        rate = stream.average_rate or stream.guessed_rate or stream.base_rate
        if not ctx.width or not ctx.height:
            self.container.close()
            raise InputError(f'{path}: video stream has no frame size (corrupt header?)')
        self.stream = stream
        self.info = SourceInfo(
            path=path,
            kind='video',
            height=ctx.height,
            width=ctx.width,
            frames=stream.frames or None,
            rate=Fraction(rate) if rate else None,
            has_audio=bool(self.container.streams.audio),
        )

    def __iter__(self) -> Iterator[Tuple[np.ndarray, FrameTag]]:
        info, count = self.info, 0
        try:
            for frame in self.container.decode(self.stream):
                if (frame.height, frame.width) != (info.height, info.width):
                    raise InputError(
                        f'{info.path}: frame {count} is {frame.height}x{frame.width}, '
                        f'the video started at {info.height}x{info.width}'
                    )
                time = frame.pts * frame.time_base if frame.pts is not None and frame.time_base else None
                yield frame.to_ndarray(format='rgb24'), FrameTag(count, time, f'{count:08d}')
                count += 1
        except av.error.FFmpegError as e:
            if isinstance(e, OSError) and e.errno is not None:  # the file could not be read (EIO...): environment
                raise FaultError(f'{info.path}: reading failed at frame {count} ({os_error_cause(e)})') from None
            raise InputError(f'{info.path}: decoding failed at frame {count} ({e})') from None
        if info.frames and count < info.frames:
            raise InputError(f'{info.path}: decoded only {count} of {info.frames} frames (truncated or corrupt)')

    def close(self) -> None:
        self.container.close()


class FolderSource:
    """Reads the image files of a folder in natural order. All headers are checked up front, so a folder
    with mixed sizes or an unreadable file fails before any work is done."""

    def __init__(self, path: str):
        from PIL import Image  # header-only size check (torchvision dependency); OpenCV decodes

        names = sorted(
            (
                n
                for n in os.listdir(path)
                if n.lower().endswith(IMAGE_EXTENSIONS) and os.path.isfile(os.path.join(path, n))
            ),
            key=_natural_key,
        )
        if not names:
            raise InputError(f'{path}: folder contains no image files ({", ".join(IMAGE_EXTENSIONS)})')
        stems = [os.path.splitext(n)[0] for n in names]
        if len(set(stems)) != len(stems):
            dup = next(s for s in stems if stems.count(s) > 1)
            raise InputError(f'{path}: several images share the name {dup!r} (output names would collide)')
        size = None
        for name in names:
            file = os.path.join(path, name)
            try:
                with Image.open(file) as im:
                    w, h = im.size
                    if _turned_a_quarter(im):
                        w, h = h, w
            except OSError as e:
                if e.errno is not None:  # the file could not be read (EIO, EACCES...): environment, named
                    raise
                raise InputError(f'{file}: cannot read image ({e})') from None  # PIL's own: not an image
            except Exception as e:  # PIL raises many types for bad files
                raise InputError(f'{file}: cannot read image ({e})') from None
            if size is None:
                size = (h, w)
            elif (h, w) != size:
                raise InputError(
                    f'{file}: image is {h}x{w} but {os.path.join(path, names[0])} is '
                    f'{size[0]}x{size[1]}; all frames must have the same size'
                )
        self.files = [os.path.join(path, n) for n in names]
        self.stems = stems
        self.info = SourceInfo(
            path=path, kind='folder', height=size[0], width=size[1], frames=len(names), rate=None, has_audio=False
        )

    def __iter__(self) -> Iterator[Tuple[np.ndarray, FrameTag]]:
        """Frames in order, DECODE_THREADS decoded ahead of the one yielded (threads joined when the iteration ends
        or is closed); a file that fails raises at its place, after the frames before it."""
        with ThreadPoolExecutor(DECODE_THREADS, thread_name_prefix='gsmsr-decode') as pool:
            pending: deque = deque()
            try:
                for i in range(len(self.files)):
                    pending.append(pool.submit(self._decode, i))
                    if len(pending) > DECODE_THREADS:
                        yield pending.popleft().result()
                while pending:
                    yield pending.popleft().result()
            finally:  # closed early: drop what has not started (the pool then waits for the decodes under way)
                for future in pending:
                    future.cancel()

    def _decode(self, i: int) -> Tuple[np.ndarray, FrameTag]:
        file = self.files[i]
        with open(file, 'rb') as f:  # read here, not by cv2.imread: a read error is an OSError naming the file
            data = np.frombuffer(f.read(), np.uint8)
        bgr = cv2.imdecode(data, cv2.IMREAD_COLOR) if data.size else None
        if bgr is None:
            raise InputError(f'{file}: cannot decode image')
        if bgr.shape[:2] != (self.info.height, self.info.width):
            raise InputError(
                f'{file}: decoded size {bgr.shape[0]}x{bgr.shape[1]} differs from {self.info.height}x{self.info.width}'
            )
        return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB), FrameTag(i, None, self.stems[i])

    def close(self) -> None:
        pass


def _require_av(path: str) -> None:
    global av
    if av is not None:
        return
    try:
        import av as pyav
    except ImportError:  # pragma: no cover - exercised on machines without PyAV
        raise InputError(f'{path}: video files need PyAV (pip install av); folders of frames work without it') from None
    av = pyav


def open_source(path: str):
    """A :class:`VideoSource` for a file, a :class:`FolderSource` for a directory (``.info``, iterable)."""
    if not os.path.exists(path):
        raise InputError(f'{path}: no such file or folder')
    if os.path.isdir(path):
        return FolderSource(path)
    if not os.access(path, os.R_OK):
        raise InputError(f'{path}: not readable (permission denied)')
    return VideoSource(path)


def output_kind(path: str) -> str:
    """'video' for a known video extension, 'folder' for a path without extension or an existing folder."""
    ext = os.path.splitext(path)[1].lower()
    if ext in VIDEO_EXTENSIONS:
        return 'video'
    if os.path.isdir(path) or not ext:
        return 'folder'
    raise InputError(
        f'{path}: unknown output type {ext!r}; use a video extension '
        f'({", ".join(VIDEO_EXTENSIONS)}) or a folder name without extension'
    )


def _is_frame_folder(path: str) -> bool:
    """True for a folder holding only image files (what a previous run would have written)."""
    entries = [os.path.join(path, n) for n in os.listdir(path)]
    return all(os.path.isfile(e) and e.lower().endswith(IMAGE_EXTENSIONS) for e in entries)


OVERLAP_MESSAGES = {
    'is the input': 'output is the same as the input',
    'contains the input': 'output folder contains the input',
    'is inside the input folder': 'output is inside the input folder',
}


def check_output(path: str, input_path: str, force: bool) -> str:
    """Validate the output path before any work; returns the output kind ('video' or 'folder').

    Refuses an output that is the input or overlaps it (links resolved, see :func:`gsmsr.faults.input_overlap`),
    an unwritable folder, and an existing output without ``force``; clears stale partials of this output.
    """
    kind = output_kind(path)
    overlap = input_overlap(path, input_path)
    if overlap is not None:
        raise InputError(f'{path}: {OVERLAP_MESSAGES[overlap]} {input_path}')
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise InputError(f'{path}: parent folder {parent} does not exist')
    check_writable(parent, path)
    if os.path.lexists(path):
        if not force:
            raise InputError(f'{path}: output exists (use --force to overwrite)')
        if kind == 'video' and os.path.isdir(path):
            raise InputError(f'{path}: is a folder, refusing to replace it with a video file')
        if kind == 'folder' and os.path.isdir(path) and not _is_frame_folder(path):
            raise InputError(f'{path}: folder holds more than image files, refusing to overwrite it')
    clear_stale_partials(path, keep=input_path)
    return kind


def estimated_output_bytes(path: str, width: int, height: int, frames: int) -> int:
    """Rough upper bound of the bytes ``frames`` output frames of ``width`` x ``height`` take: raw RGB for PNG
    frames (PNG of natural images is smaller), a tenth of that for video (our CRF 16 is far smaller still)."""
    raw = width * height * 3 * frames
    return raw // 10 if output_kind(path) == 'video' else raw


# ----------------------------------------------------------------------------------------------- partials
def _partial_prefix(path: str) -> str:
    return '.' + os.path.basename(os.path.normpath(path)) + '.'


def _partial_place(path: str, ext: str = '') -> dict:
    """``tempfile.mkstemp`` / ``mkdtemp`` arguments for a partial of output ``path``: beside it, named as
    :func:`_partial_name` recognises (prefix, this process's pid, the random part, '.partial', ``ext``)."""
    return dict(
        dir=os.path.dirname(os.path.abspath(path)),
        prefix=_partial_prefix(path) + f'{os.getpid()}.',
        suffix='.partial' + ext,
    )


def _partial_name(path: str) -> re.Pattern:
    """Names of this output's partials: prefix, writer pid, mkstemp's random part, '.partial', extension."""
    return re.compile(re.escape(_partial_prefix(path)) + r'(\d+)\.[A-Za-z0-9_]+\.partial(\.[A-Za-z0-9]+)?')


def _lock_partial(tmp: str) -> int:
    """Hold an exclusive flock on ``tmp`` (file or folder) until the returned descriptor is closed."""
    fd = os.open(tmp, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):  # a fresh name cannot be locked by anyone else
            os.close(fd)
            raise
        # no flock on this file system: the partial can only be reported as stale, never removed
    return fd


def _partial_state(partial: str) -> str:
    """'stale' (no process holds its lock), 'live' (one does) or 'unknown' (no flock here)."""
    try:
        fd = os.open(partial, os.O_RDONLY)
    except OSError:
        return 'unknown'
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return 'stale'
    except OSError as e:
        return 'live' if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN) else 'unknown'
    finally:
        os.close(fd)  # also releases a lock taken just now


def clear_stale_partials(path: str, keep: Optional[str] = None) -> List[str]:
    """Remove the partials of ``path`` left by dead runs (SIGKILL, power cut); returns the removed paths.

    A partial another live process is writing is an :class:`InputError`; one whose state cannot be known (no
    flock) is reported on stderr and kept. ``keep`` (the input) is never touched, even when its name matches.
    """
    folder = os.path.dirname(os.path.abspath(path))
    pattern = _partial_name(path)
    removed = []
    for name in sorted(os.listdir(folder)):
        match = pattern.fullmatch(name)
        partial = os.path.join(folder, name)
        if match is None or (keep is not None and input_overlap(partial, keep) is not None):
            continue
        state = _partial_state(partial)
        if state == 'live':
            raise InputError(
                f'{path}: another running process (pid {match.group(1)}) is writing this output ({partial})'
            )
        if state == 'unknown':
            print(
                f'warning: {partial}: partial output of an earlier run (pid {match.group(1)}); '
                f'remove it if no other run is writing {path}',
                file=sys.stderr,
            )
            continue
        if os.path.isdir(partial) and not os.path.islink(partial):
            shutil.rmtree(partial, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                os.remove(partial)
        print(f'note: removed {partial}, the partial output of an interrupted run', file=sys.stderr)
        removed.append(partial)
    return removed


def _write_error(path: str, err: OSError) -> FaultError:
    """A write failure under the output's own name (not the hidden partial's), with its cause."""
    return FaultError(f'{path}: cannot write ({os_error_cause(err)})')


class VideoSink:
    """Encodes RGB frames into a video container chosen by extension; copies the input's audio stream.

    Timing: constant frame rate ``rate``; each frame is placed at its source time rounded to that grid
    (strictly increasing), so a source that starts late or has gaps stays in sync with its audio.
    Audio packets are remuxed (not re-encoded) and interleaved with the video as it is written.
    """

    def __init__(self, path: str, width: int, height: int, rate: Fraction, audio_from: Optional[str] = None):
        _require_av(path)
        ext = os.path.splitext(path)[1].lower()
        codec = VIDEO_EXTENSIONS[ext]
        if not _has_encoder(codec):
            codec = 'mpeg4'
        if width % 2 or height % 2:
            raise InputError(
                f'{path}: output size {height}x{width} is odd; yuv420p video needs even sizes '
                f'(write a PNG folder instead)'
            )
        self.path = path
        fd, self.tmp = tempfile.mkstemp(**_partial_place(path, ext))
        os.close(fd)
        self.audio_in = self.audio_packets = self.audio_out = None
        self._lock = None
        try:
            self._lock = _lock_partial(self.tmp)
            os.chmod(self.tmp, 0o666 & ~_umask())  # mkstemp makes it private; the result should not be
        except BaseException:
            self.abort()
            raise
        self.rate = Fraction(rate)
        self._next_audio = None
        self._last_pts = -1
        try:
            # flush_packets: a write error (disk full) surfaces at the next frame, not at the end of the run
            self.container = av.open(self.tmp, 'w', options={'flush_packets': '1'})
            self.stream = self.container.add_stream(codec, rate=self.rate, options=ENCODER_OPTIONS.get(codec, {}))
            self.stream.width, self.stream.height, self.stream.pix_fmt = width, height, 'yuv420p'
            if codec not in ENCODER_OPTIONS:  # bitrate-driven encoders (mpeg4): about 0.5 bit per pixel
                self.stream.bit_rate = max(1_000_000, int(width * height * float(self.rate) * 0.5))
            if audio_from is not None:
                self._open_audio(audio_from)
        except BaseException:
            self.abort()
            raise

    def _open_audio(self, source: str) -> None:
        self.audio_in = av.open(source)
        if not self.audio_in.streams.audio:
            return
        template = self.audio_in.streams.audio[0]
        name = template.codec_context.name
        if name not in self.container.supported_codecs:
            print(
                f'warning: {self.path}: audio codec {name!r} cannot be stored in this container; audio dropped',
                file=sys.stderr,
            )
            return
        self.audio_out = self.container.add_stream_from_template(template)
        self.audio_packets = self.audio_in.demux(template)

    def _mux_audio_until(self, time: Optional[Fraction]) -> None:
        # Interleave: write the audio packets that start before the next video frame (all of them at the end).
        while self.audio_packets is not None:
            if self._next_audio is None:
                packet = next(self.audio_packets, None)
                if packet is None:
                    self.audio_packets = None
                    return
                if packet.dts is None:  # demuxer flush packet
                    continue
                self._next_audio = packet
            packet = self._next_audio
            start = packet.pts if packet.pts is not None else packet.dts
            if time is not None and start * packet.time_base > time:
                return
            packet.stream = self.audio_out
            self.container.mux(packet)
            self._next_audio = None

    def write(self, rgb: np.ndarray, tag: FrameTag) -> None:
        pts = round(tag.time * self.rate) if tag.time is not None else self._last_pts + 1
        pts = max(pts, self._last_pts + 1)  # the encoder needs strictly increasing timestamps
        self._last_pts = pts
        frame = av.VideoFrame.from_ndarray(rgb, format='rgb24')
        frame.pts = pts
        try:
            self._mux_audio_until(pts / self.rate)
            self.container.mux(self.stream.encode(frame))
        except OSError as e:
            raise _write_error(self.path, e) from e

    def commit(self) -> None:
        try:
            self.container.mux(self.stream.encode())  # flush the encoder
            self._mux_audio_until(None)
            self.container.close()
            if self.audio_in is not None:
                self.audio_in.close()
            fsync_path(self.tmp)
            os.replace(self.tmp, self.path)
            fsync_path(os.path.dirname(os.path.abspath(self.path)))
        except OSError as e:
            raise _write_error(self.path, e) from e
        self._release()

    def abort(self) -> None:
        for c in (getattr(self, 'container', None), self.audio_in):
            try:
                if c is not None:
                    c.close()
            except Exception:
                pass
        if os.path.exists(self.tmp):
            os.remove(self.tmp)
        self._release()

    def _release(self) -> None:
        if self._lock is not None:
            os.close(self._lock)
            self._lock = None


class FolderSink:
    """Writes PNG frames (named after the source frames) into a temporary folder renamed at commit."""

    def __init__(self, path: str):
        self.path = path
        self.tmp = tempfile.mkdtemp(**_partial_place(path))
        self._lock = None
        try:
            self._lock = _lock_partial(self.tmp)
            os.chmod(self.tmp, 0o777 & ~_umask())  # mkdtemp makes it private; the result should not be
        except BaseException:
            self.abort()
            raise

    def write(self, rgb: np.ndarray, tag: FrameTag) -> None:
        ok, png = cv2.imencode('.png', cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
        if not ok:
            raise ValueError(f'{self.path}: cannot encode frame {tag.name} as PNG')
        try:  # a plain write, so that a full disk is an OSError with its errno (cv2.imwrite only says False)
            with open(os.path.join(self.tmp, tag.name + '.png'), 'wb') as f:
                f.write(png.tobytes())
                f.flush()
                os.fsync(f.fileno())  # in the writer's threads, beside the network: ~4 ms for 6.6 MB of 1440p PNG
        except OSError as e:
            raise _write_error(self.path, e) from e

    def commit(self) -> None:
        parent = os.path.dirname(os.path.abspath(self.path))
        try:
            fsync_path(self.tmp)  # the frames' names, before the folder is published (their data: write())
            if os.path.isdir(self.path):  # --force was checked: swap, then delete the old frames
                # named as a partial of this output, unlocked: a run killed while deleting it leaves a stale partial,
                # which the next run for this output removes
                old = tempfile.mkdtemp(**_partial_place(self.path))
                os.replace(self.path, os.path.join(old, 'frames'))
                try:
                    os.replace(self.tmp, self.path)
                except BaseException:  # the old frames go back where they were
                    os.replace(os.path.join(old, 'frames'), self.path)
                    os.rmdir(old)
                    raise
                self.tmp = old  # what abort() removes should the deletion be interrupted (a signal)
                fsync_path(parent)  # the swap reaches the disk before the old frames leave it
                with output_complete(self.path):
                    shutil.rmtree(old)
            else:
                if os.path.lexists(self.path):
                    os.remove(self.path)
                os.replace(self.tmp, self.path)
                fsync_path(parent)
        except OSError as e:
            raise _write_error(self.path, e) from e
        self._release()

    def abort(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)
        self._release()

    def _release(self) -> None:
        if self._lock is not None:
            os.close(self._lock)
            self._lock = None


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _has_encoder(name: str) -> bool:
    try:
        av.codec.Codec(name, 'w')
        return True
    except Exception:
        return False


def open_sink(path: str, width: int, height: int, rate: Optional[Fraction] = None, audio_from: Optional[str] = None):
    """A :class:`VideoSink` or :class:`FolderSink` for ``path`` (kind by extension, see :func:`output_kind`)."""
    if output_kind(path) == 'video':
        return VideoSink(path, width, height, rate or DEFAULT_FOLDER_FPS, audio_from)
    return FolderSink(path)
