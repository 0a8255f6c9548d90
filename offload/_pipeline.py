"""The Task Interface: loading a pipeline and running a range of its tasks.

A pipeline is an ordered list of plain functions (the 2019 "seed" format, kept unchanged):

* task 0 takes no argument and returns ``(ok, args)``; ``ok`` False means the stream has ended;
* every later task receives the previous task's ``args``: a tuple is unpacked into positional
  arguments, ``None`` means no argument, anything else is the single argument;
* a task returns ``(ok, args)``; ``ok`` False, or a bare ``False``, filters the item (no more work);
* the last task's ``args`` is the item's result.

``run_tasks`` is the one code path that executes tasks, used by the client, the server and the
embedded server alike, so that a result cannot depend on where it was computed.
"""

from __future__ import annotations

import contextvars
import enum
import functools
import hashlib
import importlib
import inspect
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ._emulation import SlowDevice
from .exceptions import PipelineError

Task = Callable[..., Any]

DEFAULT_PIPELINE = "examples.ball_tracking"


@dataclass(frozen=True)
class ItemContext:
    """What a task may want to know about the item it is processing (see ``current_item``)."""

    device_id: str
    run_id: str
    item: int
    capture_time: float
    on_server: bool


_current: contextvars.ContextVar[ItemContext | None] = contextvars.ContextVar(
    "offload_item", default=None
)


def current_item() -> ItemContext:
    """The item the calling task is processing: its device, run, sequence number, capture time.

    Seed-format tasks never need it; aggregating tasks use it to keep per-device state.
    """
    ctx = _current.get()
    if ctx is None:
        raise RuntimeError("current_item() is only available inside a task run by offload")
    return ctx


@dataclass(frozen=True)
class Pipeline:
    """A loaded pipeline: its name, tasks and fingerprint."""

    name: str
    tasks: tuple[Task, ...]
    fingerprint: str
    # The last task aggregates across items and devices; serialising it keeps seed-format
    # aggregators (module globals, no locks) correct on a multi-threaded server.
    aggregate_lock: threading.Lock = field(default_factory=threading.Lock, compare=False)
    module: Any = field(default=None, compare=False, repr=False)

    def __len__(self) -> int:
        return len(self.tasks)

    def task_name(self, index: int) -> str:
        return getattr(self.tasks[index], "__name__", f"task{index}")

    def describe(self) -> str:
        """``0: capture, 1: blur_hsv, ...``: for error messages and summaries."""
        return ", ".join(f"{i}: {self.task_name(i)}" for i in range(len(self.tasks)))

    def set_source(self, spec: str) -> None:
        """Tell task 0 where to capture from, through the module's optional ``set_source``."""
        hook = getattr(self.module, "set_source", None)
        if not callable(hook):
            raise PipelineError(
                f"pipeline {self.name} does not accept --source: its module defines no "
                "set_source(spec) function"
            )
        hook(spec)


def fingerprint(name: str, tasks: Sequence[Task], version: str = "") -> str:
    """A short hash of the pipeline's name, version and task names.

    Bytecode is left out on purpose: it differs between Python versions, and a device and a
    server on different Pythons running the same pipeline must accept each other.
    """
    parts = [name, version, str(len(tasks))]
    parts += [
        f"{getattr(t, '__module__', '?')}.{getattr(t, '__qualname__', repr(t))}" for t in tasks
    ]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


def load_pipeline(path: str = DEFAULT_PIPELINE) -> Pipeline:
    """Import ``package.module`` (its ``tasks``) or ``package.module:attribute`` (a task list)."""
    module_name, _, attribute = path.partition(":")
    attribute = attribute or "tasks"
    # `python -m offload.client` puts the working directory on sys.path; an installed console
    # script does not, and users expect their own pipeline module next to them to be found.
    cwd = str(Path.cwd())
    if cwd not in sys.path:
        sys.path.append(cwd)
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise PipelineError(
            f"cannot import pipeline module {module_name!r} ({exc}); give --pipeline as "
            "package.module or package.module:attribute, importable from the working directory"
        ) from exc
    tasks = getattr(module, attribute, None)
    if tasks is None:
        raise PipelineError(
            f"pipeline module {module_name!r} has no attribute {attribute!r}; a seed-format "
            "module exports `tasks = [capture, ..., aggregate]`"
        )
    if not isinstance(tasks, (list, tuple)) or not all(callable(t) for t in tasks):
        raise PipelineError(f"{path}: expected a list of functions, got {type(tasks).__name__}")
    if len(tasks) < 2:
        raise PipelineError(
            f"{path}: a pipeline needs at least 2 tasks (capture on the device, aggregate on "
            f"the server), it has {len(tasks)}"
        )
    version = str(getattr(module, "__version__", ""))
    return Pipeline(path, tuple(tasks), fingerprint(path, tasks, version), module=module)


class Status(enum.Enum):
    CONTINUE = "continue"  # the range ran; more tasks remain
    COMPLETED = "completed"  # the last task ran
    FILTERED = "filtered"
    FAILED = "failed"


@dataclass
class Outcome:
    """What running a range of tasks on one item produced."""

    status: Status
    value: Any  # the last task's args (the next task's input, or the result)
    task: int = -1  # the task that filtered or failed the item
    error: str = ""
    task_seconds: list[tuple[int, float]] = field(default_factory=list)


def arg_count(args: Any) -> int:
    """How many positional arguments ``call_task`` passes for ``args``."""
    if args is None:
        return 0
    return len(args) if isinstance(args, tuple) else 1


@functools.lru_cache(maxsize=4096)
def _fits(task: Task, count: int) -> bool:
    try:
        signature = inspect.signature(task)
    except (TypeError, ValueError):  # some builtins have none: let the call decide
        return True
    try:
        signature.bind(*([None] * count))
    except TypeError:
        return False
    return True


def arity_error(pipeline: Pipeline, index: int, count: int) -> str | None:
    """Why task ``index`` cannot take ``count`` positional arguments, or None if it can."""
    task = pipeline.tasks[index]
    if _fits(task, count):
        return None
    name = pipeline.task_name(index)
    return (
        f"TypeError: task {index} ({name}{inspect.signature(task)}) cannot take {count} "
        f"positional argument{'s' if count != 1 else ''} (what task {index - 1} returned)"
    )


def call_task(task: Task, args: Any) -> Any:
    """Call a task with the previous task's output, as the seed did."""
    if args is None:
        return task()
    if isinstance(args, tuple):
        return task(*args)
    return task(args)


def _unpack(index: int, name: str, returned: Any) -> tuple[bool, Any]:
    if returned is False:
        return False, None
    if isinstance(returned, tuple) and len(returned) == 2:
        return bool(returned[0]), returned[1]
    raise PipelineError(
        f"task {index} ({name}) returned {type(returned).__name__}; a task must return "
        "(ok, args) or False"
    )


def run_tasks(
    pipeline: Pipeline,
    start: int,
    stop: int,
    args: Any,
    context: ItemContext,
    slowdown: float | SlowDevice = 1.0,
    on_output: Callable[[int, Any], None] | None = None,
) -> Outcome:
    """Run tasks ``[start, stop)`` on one item whose input is ``args``. Never raises for a task.

    ``slowdown`` > 1 emulates a slower device: tasks sleep so that they take that many times
    the CPU time they use (the CPU stays free for other processes), and their timings are the
    emulated ones. The sleep is paid on return; a ``SlowDevice`` carries less than a chunk of it
    over to its next call, a number makes one for this call.
    ``on_output(index, args)`` sees each task's output (the scheduler samples cut sizes).
    """
    device = slowdown if isinstance(slowdown, SlowDevice) else SlowDevice(slowdown)
    token = _current.set(context)
    last = len(pipeline.tasks) - 1
    timings: list[tuple[int, float]] = []
    try:
        for index in range(start, stop):
            task = pipeline.tasks[index]
            began = time.perf_counter()
            misfit = arity_error(pipeline, index, arg_count(args))
            if misfit is not None:
                return Outcome(Status.FAILED, None, index, misfit, timings)
            cpu = device.clock()
            try:
                if index == last:
                    with pipeline.aggregate_lock:
                        ok, args = _unpack(index, pipeline.task_name(index), call_task(task, args))
                else:
                    ok, args = _unpack(index, pipeline.task_name(index), call_task(task, args))
            except Exception as exc:  # a task's bug fails this item, never the run
                timings.append((index, device.stretch(time.perf_counter() - began, cpu)))
                return Outcome(Status.FAILED, None, index, f"{type(exc).__name__}: {exc}", timings)
            timings.append((index, device.stretch(time.perf_counter() - began, cpu)))
            if not ok:
                return Outcome(Status.FILTERED, None, index, "", timings)
            if on_output is not None:
                on_output(index, args)
        status = Status.COMPLETED if stop == last + 1 else Status.CONTINUE
        return Outcome(status, args, -1, "", timings)
    finally:
        _current.reset(token)
        device.pay(everything=device is not slowdown)
