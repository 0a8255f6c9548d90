"""The Task Interface: loading a pipeline and running a range of its tasks.

A pipeline is an ordered list of plain functions (the 2019 "seed" format, kept unchanged):

* task 0 takes no argument and returns ``(ok, args)``; ``ok`` False means the stream has ended;
* every later task receives the previous task's ``args``: a tuple is unpacked into positional
  arguments, ``None`` means no argument, anything else is the single argument;
* a task returns ``(ok, args)``; ``ok`` False, or a bare ``False``, filters the item (no more work);
* the last task's ``args`` is the item's result;
* a task that keeps state across items is marked ``@stateful``: with several device workers it
  still runs one item at a time, in item order (the last task always does: it aggregates).

``run_tasks`` is the one code path that executes tasks, used by the client, the server and the
embedded server alike, so that a result cannot depend on where it was computed.
"""

from __future__ import annotations

import contextvars
import enum
import functools
import hashlib
import importlib
import importlib.util
import inspect
import re
import sys
import threading
import time
import traceback
import types
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from .exceptions import PipelineError, StateUnavailable

Task = Callable[..., Any]

DEFAULT_PIPELINE = "examples.ball_tracking"


@dataclass(frozen=True)
class ItemContext:
    """What a task may want to know about the item it is processing (see ``current_item``)."""

    device_id: str  # --device-id; on a server with mutual TLS, the certificate's name
    run_id: str  # new for each run of a client: key state kept across items by (device, run)
    item: int  # the item's number in its run, from 0
    capture_time: float  # time.time() on the device when task 0 began the item
    on_server: bool  # whether this task runs on the server


_current: contextvars.ContextVar[ItemContext | None] = contextvars.ContextVar(
    "offload_item", default=None
)


_STATEFUL = "__offload_stateful__"


def stateful(task: Task) -> Task:
    """Mark ``task`` as keeping state across items (a running mean, a tracker, a counter).

    Several device workers (``--device-workers``) run tasks for several items at once; a
    stateful task still runs for one item at a time, in item order, so its results are those
    of one worker. Returns the task itself, so it is a decorator.
    """
    try:
        setattr(task, _STATEFUL, True)
    except (AttributeError, TypeError):  # a builtin or a slotted object takes no attribute
        raise PipelineError(
            f"cannot mark {_name(task)} as stateful: it takes no attribute; wrap it in a "
            "function and mark that"
        ) from None
    return task


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

    @property
    def serial_tasks(self) -> frozenset[int]:
        """Tasks that run for one item at a time, in item order: those marked ``@stateful``,
        and the last (it aggregates across items)."""
        marked = (i for i, t in enumerate(self.tasks) if getattr(t, _STATEFUL, False) is True)
        return frozenset(marked) | {len(self.tasks) - 1}

    def task_name(self, index: int) -> str:
        return _name(self.tasks[index])

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


def fingerprint(name: str, tasks: Sequence[Task], version: str = "", module: Any = None) -> str:
    """A short hash of the pipeline's name, version and code.

    The code is the source of ``module`` (the one ``--pipeline`` names) and of every module that
    defines a task (their helpers and constants), and each task's own source: text, so that the
    same files give the same fingerprint in any process and on any Python. Only a task without
    source (a .pyc-only install) falls back to its bytecode, which differs between Pythons.
    """
    parts = [name, version, str(len(tasks))]
    modules = [module] if module is not None else []
    for task in tasks:
        function = _function(task)
        parts.append(f"{getattr(function, '__module__', '?')}.{_qualname(function)}")
        parts.append(_source(function))
        owner = sys.modules.get(getattr(function, "__module__", None) or "")
        if owner is not None and all(owner is not m for m in modules):
            modules.append(owner)
    parts += [_source(m, fallback=False) for m in modules]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


def _function(task: Task) -> Any:
    """What a task runs: a partial's function, a callable object's class."""
    while isinstance(task, functools.partial):
        task = task.func
    if inspect.isroutine(task) or inspect.isclass(task):
        return task
    return type(task)


def _qualname(function: Any) -> str:
    return str(getattr(function, "__qualname__", None) or type(function).__qualname__)


def _source(thing: Any, fallback: bool = True) -> str:
    try:
        return inspect.getsource(thing)
    except (OSError, TypeError):  # no file (built in, or a module made in memory)
        pass
    code = getattr(thing, "__code__", None)
    if not fallback or code is None:
        return ""
    return _code_text(code)


def _code_text(code: types.CodeType) -> str:
    """Bytecode, names and constants, without addresses or hash-randomised set orders."""

    def const(value: Any) -> str:
        if isinstance(value, types.CodeType):
            return f"<code {_code_text(value)}>"
        if isinstance(value, tuple):
            return "(" + ",".join(const(v) for v in value) + ")"
        if isinstance(value, frozenset):
            return "frozenset(" + ",".join(sorted(const(v) for v in value)) + ")"
        return repr(value)

    return " ".join([code.co_code.hex(), ",".join(code.co_names), const(code.co_consts)])


# ``package.module`` or ``package.module:attribute``: names Python can import.
_PATH = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*(:[A-Za-z_]\w*)?")
_MISSING = object()


def load_pipeline(path: str = DEFAULT_PIPELINE) -> Pipeline:
    """Import ``package.module`` (its ``tasks``) or ``package.module:attribute`` (a task list).

    Everything the Task Interface can tell before running is checked here, each with a one-line
    message: the import, the list, and each task's signature.
    """
    if not _PATH.fullmatch(path):
        hint = ""
        if (path.endswith(".py") or "/" in path) and not path.startswith("/"):
            module = path.removesuffix(".py").strip("/").replace("/", ".")
            top = module.partition(".")[0]
            hint = f" (for the file {path}: --pipeline {module}, run from the folder holding {top})"
        raise PipelineError(
            f"--pipeline {path!r} is not a module name: give it as package.module or "
            f"package.module:attribute{hint}"
        )
    module_name, _, attribute = path.partition(":")
    attribute = attribute or "tasks"
    # `python -m offload.client` puts the working directory on sys.path; an installed console
    # script does not, and users expect their own pipeline module next to them to be found.
    cwd = str(Path.cwd())
    if cwd not in sys.path:
        sys.path.append(cwd)
    if path == DEFAULT_PIPELINE and importlib.util.find_spec("examples") is None:
        raise PipelineError(
            f"the default pipeline {DEFAULT_PIPELINE} is the demo, not installed with offload: "
            "run from the root of a checkout, or give --pipeline package.module"
        )
    module = _import(module_name, cwd)
    tasks = getattr(module, attribute, _MISSING)
    if tasks is _MISSING:
        raise PipelineError(
            f"pipeline module {module_name!r} has no attribute {attribute!r}; a seed-format "
            "module exports `tasks = [capture, ..., aggregate]`"
        )
    checked = check_tasks(path, attribute, tasks)
    version = str(getattr(module, "__version__", ""))
    return Pipeline(path, checked, fingerprint(path, checked, version, module), module=module)


def _import(module_name: str, cwd: str) -> Any:
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        missing = exc.name or ""
        if missing and (module_name == missing or module_name.startswith(missing + ".")):
            raise PipelineError(
                f"cannot import pipeline module {module_name!r}: no module {missing!r} in the "
                f"working directory ({cwd}) or on the Python path; give --pipeline as "
                "package.module or package.module:attribute"
            ) from None
        if missing == "cv2" and module_name.startswith("examples."):
            raise PipelineError(
                f"the demo pipeline {module_name!r} needs OpenCV, which the core install leaves "
                "out: pip install '.[demo]' in the checkout"
            ) from None
        if missing:
            raise PipelineError(
                f"pipeline module {module_name!r} imports {missing!r}, which is not installed "
                "here: install the package that provides it (on the device and the server)"
            ) from None
        raise PipelineError(_import_failure(module_name, exc)) from None
    except Exception as exc:  # the module's own code failed: say what, and where
        raise PipelineError(_import_failure(module_name, exc)) from None


def _import_failure(module_name: str, exc: Exception) -> str:
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if not f.filename.startswith("<")]
    where = f" ({frames[-1].filename}:{frames[-1].lineno})" if frames else ""
    if isinstance(exc, SyntaxError):  # its own message already says the file and line
        where = ""
    text = " ".join(f"{type(exc).__name__}: {exc}".split())  # one line
    return f"pipeline module {module_name!r} failed to import: {text}{where}"


def check_tasks(path: str, attribute: str, tasks: Any) -> tuple[Task, ...]:
    """Refuse a task list that breaks the Task Interface, naming the task and what to change."""
    if not isinstance(tasks, (list, tuple)):
        raise PipelineError(
            f"{path}: {attribute} must be a list of functions [capture, ..., aggregate], got "
            f"{type(tasks).__name__} {_short(tasks)}"
        )
    for index, task in enumerate(tasks):
        if not callable(task):
            raise PipelineError(
                f"{path}: task {index} is {type(task).__name__} {_short(task)}, not a function; "
                f"{attribute} lists the functions themselves (capture, not capture())"
            )
        name = _name(task)
        if inspect.iscoroutinefunction(task) or inspect.isasyncgenfunction(task):
            raise PipelineError(
                f"{path}: task {index} ({name}) is an async function; a task is a plain function "
                "that returns (ok, args)"
            )
        if inspect.isgeneratorfunction(task):
            raise PipelineError(
                f"{path}: task {index} ({name}) is a generator function (it yields); a task "
                "returns (ok, args) once per call and keeps any iterator in module state"
            )
        try:
            signature = inspect.signature(task)
        except (TypeError, ValueError):  # some builtins have none: the call decides
            continue
        if index == 0 and not _fits(task, 0):
            raise PipelineError(
                f"{path}: task 0 ({name}{signature}) must take no argument: it captures each "
                "item and is called with none"
            )
        keyword_only = [
            p.name
            for p in signature.parameters.values()
            if p.kind is p.KEYWORD_ONLY and p.default is p.empty
        ]
        if index > 0 and keyword_only:
            raise PipelineError(
                f"{path}: task {index} ({name}{signature}) needs keyword-only "
                f"argument{'s' if len(keyword_only) > 1 else ''} {', '.join(keyword_only)}; a "
                f"task gets task {index - 1}'s output as positional arguments (give a default)"
            )
    if len(tasks) < 2:
        raise PipelineError(
            f"{path}: a pipeline needs at least 2 tasks (capture on the device, aggregate on "
            f"the server), it has {len(tasks)}"
        )
    return tuple(tasks)


def _name(task: Task) -> str:
    """A function's name, or a callable object's class name."""
    return str(getattr(task, "__name__", None) or type(task).__name__)


def _short(value: Any) -> str:
    text = " ".join(repr(value).split())  # one line, whatever its repr
    return text if len(text) <= 40 else text[:37] + "..."


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


def _fits(task: Task, count: int) -> bool:
    try:
        return _fits_cached(task, count)
    except TypeError:  # an unhashable callable object (a dataclass instance): not cached
        return _fits_cached.__wrapped__(task, count)


@functools.lru_cache(maxsize=4096)
def _fits_cached(task: Task, count: int) -> bool:
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


class Pace(Protocol):
    """How long a task takes where it runs: this machine's time, or an emulated device's."""

    def clock(self) -> float:
        """A reading to pass to ``stretch`` when the task ends."""
        ...

    def stretch(self, seconds: float, clock: float) -> float:
        """The task's duration on this pace, given its wall ``seconds`` since ``clock``."""
        ...

    def pay(self, everything: bool = False) -> None:
        """Between items: spend the time the emulated device owes (``everything``: all of it)."""
        ...


class _RealTime:
    def clock(self) -> float:
        return 0.0

    def stretch(self, seconds: float, clock: float) -> float:
        return seconds

    def pay(self, everything: bool = False) -> None:
        pass


REAL_TIME: Pace = _RealTime()


def _call_last(task: Task, args: Any, device_id: str) -> Any:
    """The last task, with the state the server gave it (``current_state``), or this process's
    own in-memory state (client-only mode, an item the device runs itself)."""
    # Imported here: _state -> _codec -> _config imports this module.
    from ._state import active, run_locally  # noqa: PLC0415

    if active() is not None:
        return call_task(task, args)
    return run_locally(device_id, lambda: call_task(task, args), _returns_well)


def _returns_well(returned: Any) -> bool:
    """Whether a task's return value follows the Task Interface (its state may be committed)."""
    return returned is False or (isinstance(returned, tuple) and len(returned) == 2)


def run_tasks(
    pipeline: Pipeline,
    start: int,
    stop: int,
    args: Any,
    context: ItemContext,
    pace: Pace = REAL_TIME,
    on_output: Callable[[int, Any], None] | None = None,
) -> Outcome:
    """Run tasks ``[start, stop)`` on one item whose input is ``args``. Never raises for a task.

    ``pace`` times the tasks: this machine's time, or an emulated slower device's
    (``offload._device.emulation.SlowDevice``), whose timings are the emulated ones and whose
    sleep is paid on return, a chunk at a time.
    ``on_output(index, args)`` sees each task's output (the scheduler samples cut sizes).
    """
    device = pace
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
                        returned = _call_last(task, args, context.device_id)
                    ok, args = _unpack(index, pipeline.task_name(index), returned)
                else:
                    ok, args = _unpack(index, pipeline.task_name(index), call_task(task, args))
            except StateUnavailable:
                raise  # not the item's fault: the server answers UNAVAILABLE, the device resends
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
        device.pay()
