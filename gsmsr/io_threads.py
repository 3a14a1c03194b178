"""Decoding and encoding beside the GPU work: a read-ahead thread and writer threads with bounded queues.

``gsmsr infer`` spends host time decoding input frames and, above all, encoding 4x-upscaled output frames
(PNG compression of a 33-megapixel frame takes about a second). Both release the GIL (PyAV, OpenCV), so they
run in threads while the main thread drives the network:

* :class:`ReadAhead` iterates a source in a thread, at most ``depth`` items ahead of the consumer.
* :class:`FrameWriter` takes finished frames as uint8 tensors on the compute device. On CUDA it copies each
  into a pinned host buffer with ``non_blocking=True`` and records an event, so the main thread goes on queueing
  GPU work while the copy runs; a writer thread waits for the event, then hands the frame to the sink. On the
  CPU the tensor itself is handed over.

Both queues are bounded, so host memory does not grow with the video. An exception in a thread is re-raised
in the main thread (the reader's at the position where the failed item would have been consumed, a writer's
at the next :meth:`FrameWriter.submit` or at :meth:`FrameWriter.finish`), as the same exception object, so
messages are those of the sequential path. :meth:`ReadAhead.close` and :meth:`FrameWriter.abort` stop and join
the threads; call them (in ``finally``) before closing the source or aborting the sink.
"""

from __future__ import annotations

import queue
import threading
from typing import Callable, Generic, Iterable, Iterator, List, Optional, TypeVar

import numpy as np
import torch
from torch import Tensor

__all__ = ['ReadAhead', 'FrameWriter']

T = TypeVar('T')
_POLL_S = 0.1  # how often a blocked thread checks whether it was told to stop


class _Failure:
    def __init__(self, error: BaseException) -> None:
        self.error = error


_END = object()


class ReadAhead(Generic[T]):
    """Iterate ``items`` in a daemon thread, at most ``depth`` items ahead; iterate this object to consume."""

    def __init__(self, items: Iterable[T], depth: int, name: str = 'gsmsr-reader') -> None:
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, depth))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._produce, args=(items,), name=name, daemon=True)
        self._thread.start()

    def _put(self, item: object) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=_POLL_S)
                return True
            except queue.Full:
                continue
        return False

    def _produce(self, items: Iterable[T]) -> None:
        try:
            for item in items:
                if not self._put(item):
                    return
        except BaseException as e:  # handed to the consumer, raised there
            self._put(_Failure(e))
            return
        self._put(_END)

    def __iter__(self) -> Iterator[T]:
        while True:
            item = self._queue.get()
            if item is _END:
                return
            if isinstance(item, _Failure):
                raise item.error
            yield item

    def close(self) -> None:
        """Stop the thread (after the item it is reading) and join it; items not consumed are dropped."""
        self._stop.set()
        while self._thread.is_alive():
            try:  # unblock a producer waiting on a full queue
                while True:
                    self._queue.get_nowait()
            except queue.Empty:
                pass
            self._thread.join(_POLL_S)


class FrameWriter:
    """Hand frames to ``write(rgb, tag)`` in ``threads`` worker threads, at most ``depth`` frames pending.

    ``write`` receives an (H, W, 3) uint8 array; with ``threads == 1`` frames arrive in submission order (video
    encoders need that), with more they are written concurrently (files of a folder). The array is only valid
    during the call (its buffer is reused). Host memory: at most ``depth + threads`` frames.
    """

    def __init__(self, write: Callable[[np.ndarray, object], None], threads: int, depth: int) -> None:
        self._write = write
        self._pending: queue.Queue = queue.Queue(maxsize=max(1, depth))
        self._free: queue.Queue = queue.Queue()  # pinned host buffers ready for reuse (CUDA only)
        self._buffers = 0
        self._max_buffers = max(1, depth) + max(1, threads)
        self._error: Optional[BaseException] = None
        self._stop = threading.Event()
        self._threads: List[threading.Thread] = [
            threading.Thread(target=self._work, name=f'gsmsr-writer-{i}', daemon=True) for i in range(max(1, threads))
        ]
        for t in self._threads:
            t.start()

    # -- main thread ---------------------------------------------------------------------------------------------
    def submit(self, frame: Tensor, tag: object) -> None:
        """Queue ``frame`` (H, W, 3) uint8 on any device; blocks while ``depth`` frames are pending."""
        self._raise_error()
        if frame.device.type == 'cuda':
            host = self._host_buffer(frame)
            host.copy_(frame, non_blocking=True)
            done = torch.cuda.Event()
            done.record(torch.cuda.current_stream(frame.device))
            item = (host, done, tag)
        else:
            item = (frame, None, tag)
        while True:
            try:
                self._pending.put(item, timeout=_POLL_S)
                return
            except queue.Full:
                self._raise_error()

    def _host_buffer(self, frame: Tensor) -> Tensor:
        while True:
            try:
                host = self._free.get_nowait()
            except queue.Empty:
                if self._buffers < self._max_buffers:
                    self._buffers += 1
                    return torch.empty(frame.shape, dtype=frame.dtype, pin_memory=True)
                try:
                    host = self._free.get(timeout=_POLL_S)
                except queue.Empty:
                    self._raise_error()
                    continue
            if host.shape == frame.shape:
                return host
            self._buffers -= 1  # a frame of another size: drop the buffer

    def finish(self) -> None:
        """Wait until every frame is written, join the threads; re-raise a writer's exception."""
        for _ in self._threads:
            while True:
                try:
                    self._pending.put(_END, timeout=_POLL_S)
                    break
                except queue.Full:
                    if self._error is not None:
                        break
        self._join()
        self._raise_error()

    def abort(self) -> None:
        """Drop the frames not yet written and join the threads (a write in progress completes first)."""
        self._stop.set()
        self._join()

    def _join(self) -> None:
        for t in self._threads:
            while t.is_alive():
                if self._stop.is_set() or self._error is not None:
                    try:  # unblock the main thread's view of the queue; the workers exit on _stop
                        while True:
                            self._pending.get_nowait()
                    except queue.Empty:
                        pass
                t.join(_POLL_S)

    def _raise_error(self) -> None:
        if self._error is not None:
            raise self._error

    # -- writer threads ------------------------------------------------------------------------------------------
    def _work(self) -> None:
        while not self._stop.is_set():
            try:
                item = self._pending.get(timeout=_POLL_S)
            except queue.Empty:
                continue
            if item is _END:
                return
            if self._error is not None:
                continue  # another writer failed: drain without writing
            data, done, tag = item
            try:
                if done is not None:
                    done.synchronize()
                self._write(data.numpy(), tag)
            except BaseException as e:
                if self._error is None:
                    self._error = e
                self._stop.set()
                return
            finally:
                if done is not None:
                    self._free.put(data)
