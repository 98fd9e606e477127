"""The prefetching reader: the next batches are read and built on a host thread, and copied to
the device, while the current step runs.

On a GPU each batch is pinned on the reader thread and copied on a side CUDA stream; the step
waits for its copy on the device (an event), never on the host. When the host itself runs the
step there is no thread: building is ~2% of a step there, and a second thread's torch ops
competing with the step's cost 25% of a Beauty epoch on the 2-core CPU (16.6 s against 13.3 s
inline, measured side by side in one process).
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import TypeVar

import torch

from trainer.data.batches import StepBatch

Item = TypeVar("Item")
_END = object()


class _Failure:
    def __init__(self, error: BaseException) -> None:
        self.error = error


def _host_batches(
    items: Iterable[Item], build: Callable[[Item], StepBatch], depth: int
) -> Iterator[StepBatch]:
    """``build(item)`` for each item, pinned, computed up to ``depth`` ahead on a daemon
    thread."""
    ready: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(value: object) -> bool:
        while not stop.is_set():
            try:
                ready.put(value, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def work() -> None:
        try:
            for item in items:
                batch = build(item)
                if not put(batch.pin_memory()):
                    return
            put(_END)
        except BaseException as e:  # handed to the consumer, which raises it
            put(_Failure(e))

    thread = threading.Thread(target=work, name="batch-reader", daemon=True)
    thread.start()
    try:
        while True:
            value = ready.get()
            if value is _END:
                return
            if isinstance(value, _Failure):
                raise value.error
            yield value
    finally:
        stop.set()


def prefetched(
    items: Iterable[Item],
    build: Callable[[Item], StepBatch],
    device: torch.device,
    depth: int = 2,
) -> Iterator[StepBatch]:
    """The batches ``build(item)`` of ``items`` on ``device``: on a GPU the next one is always
    read, built and copied while the current one is in use; elsewhere built when asked for."""
    if device.type != "cuda":  # the host runs the step: a reader thread would only compete
        yield from (build(item).to(device) for item in items)
        return
    host = _host_batches(items, build, depth)
    copy_stream = torch.cuda.Stream(device)

    def start_copy(batch: StepBatch) -> tuple[StepBatch, torch.cuda.Event]:
        with torch.cuda.stream(copy_stream):
            moved = batch.to(device, non_blocking=True)
            done = torch.cuda.Event()
            done.record(copy_stream)
        return moved, done

    pending = None
    for batch in host:
        started = start_copy(batch)
        if pending is not None:
            yield _ready(*pending)
        pending = started
    if pending is not None:
        yield _ready(*pending)


def _ready(batch: StepBatch, done: torch.cuda.Event) -> StepBatch:
    """Make the compute stream wait (on the device) for ``batch``'s copy, and tell the caching
    allocator that the compute stream uses its memory."""
    stream = torch.cuda.current_stream(batch.inputs.device)
    stream.wait_event(done)
    for value in vars(batch).values():
        if isinstance(value, torch.Tensor) and value.is_cuda:
            value.record_stream(stream)
    return batch
