"""The Task Interface: seed-format calling conventions, filters, failures, loading errors."""

from __future__ import annotations

import itertools
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from offload import ItemContext, PipelineError, current_item, load_pipeline
from offload._pipeline import Status, run_tasks

from ..helpers import CTX, GOOD_TASKS, install


def test_args_conventions_tuple_unpacked_none_no_argument_single_value() -> None:
    calls: list[tuple[Any, ...]] = []

    def t0() -> Any:
        return True, (1, 2)

    def t1(a: int, b: int) -> Any:
        calls.append((a, b))
        return True, None

    def t2() -> Any:
        calls.append(())
        return True, [3, 4]  # a list is one argument, not unpacked

    def t3(single: list[int]) -> Any:
        calls.append((single,))
        return True, {"done": sum(single)}

    pipeline = load_pipeline(install("conv_app", tasks=[t0, t1, t2, t3]))
    outcome = run_tasks(pipeline, 0, 4, None, CTX)
    assert outcome.status is Status.COMPLETED
    assert outcome.value == {"done": 7}
    assert calls == [(1, 2), (), ([3, 4],)]
    assert [i for i, _ in outcome.task_seconds] == [0, 1, 2, 3]


def test_a_range_stops_with_continue_and_resumes_with_the_same_value() -> None:
    pipeline = load_pipeline(
        install(
            "resume_app",
            tasks=[lambda: (True, 2), lambda x: (True, (x, x)), lambda a, b: (True, a * b)],
        )
    )
    first = run_tasks(pipeline, 0, 2, None, CTX)
    assert first.status is Status.CONTINUE and first.value == (2, 2)
    assert run_tasks(pipeline, 2, 3, first.value, CTX).value == 4


@pytest.mark.parametrize("filtered", [False, (False, "ignored")])
def test_bare_false_and_ok_false_filter_the_item(filtered: Any) -> None:
    pipeline = load_pipeline(
        install("filter_app", tasks=[lambda: (True, 1), lambda x: filtered, lambda x: (True, x)])
    )
    outcome = run_tasks(pipeline, 0, 3, None, CTX)
    assert (outcome.status, outcome.task) == (Status.FILTERED, 1)


def test_end_of_stream_is_task_zero_saying_false() -> None:
    pipeline = load_pipeline(install("eos_app", tasks=[lambda: (False, None), lambda x: (True, x)]))
    outcome = run_tasks(pipeline, 0, 1, None, CTX)
    assert (outcome.status, outcome.task) == (Status.FILTERED, 0)


def test_an_exception_fails_the_item_with_task_and_message() -> None:
    def broken(x: int) -> Any:
        raise ZeroDivisionError("division by zero")

    pipeline = load_pipeline(install("broken_app", tasks=[lambda: (True, 1), broken]))
    outcome = run_tasks(pipeline, 0, 2, None, CTX)
    assert outcome.status is Status.FAILED
    assert outcome.task == 1
    assert outcome.error == "ZeroDivisionError: division by zero"


def test_a_wrong_return_shape_fails_the_item_and_says_what_is_expected() -> None:
    pipeline = load_pipeline(install("shape_app", tasks=[lambda: (True, 1), lambda x: x + 1]))
    outcome = run_tasks(pipeline, 0, 2, None, CTX)
    assert outcome.status is Status.FAILED
    assert "must return (ok, args) or False" in outcome.error


def test_current_item_is_visible_inside_tasks_only() -> None:
    seen: list[ItemContext] = []

    def aggregate(x: int) -> Any:
        seen.append(current_item())
        return True, x

    pipeline = load_pipeline(install("ctx_app", tasks=[lambda: (True, 1), aggregate]))
    run_tasks(pipeline, 0, 2, None, CTX)
    assert seen == [CTX]
    with pytest.raises(RuntimeError, match="only available inside a task"):
        current_item()


def test_attribute_form_and_fingerprint() -> None:
    tasks = [lambda: (True, 1), lambda x: (True, x)]
    install("attr_app", flow=tasks, tasks=tasks[:1] * 3)
    by_attr = load_pipeline("attr_app:flow")
    assert len(by_attr) == 2
    assert by_attr.fingerprint != load_pipeline("attr_app").fingerprint
    assert by_attr.fingerprint == load_pipeline("attr_app:flow").fingerprint


CASES = itertools.count()


@pytest.mark.parametrize(
    ("source", "message"),
    [
        ("import no_such_package_xyz\n", "imports 'no_such_package_xyz', which is not installed"),
        ("window = sensor.read()\n", "failed to import: NameError: name 'sensor' is not defined"),
        ("def capture(:\n", "failed to import: SyntaxError:"),
        ("from os import no_such_name\n", "failed to import: ImportError: cannot import name"),
        ("tasks = [1, 2]\n", "task 0 is int 1, not a function"),
        (
            GOOD_TASKS + "tasks = [capture, keep(1)]\n",
            r"task 1 is tuple \(True, 1\), not a function",
        ),
        ("tasks = 'capture'\n", "tasks must be a list of functions .*, got str 'capture'"),
        ("tasks = None\n", "tasks must be a list of functions .*, got NoneType None"),
        ("import numpy\ntasks = numpy.zeros((2, 2))\n", r"got ndarray array\(\[\[0\., 0\.\], \[0"),
        ("tasks = []\n", "at least 2 tasks .*, it has 0"),
        (
            "def capture(frame):\n    return True, frame\ntasks = [capture, capture]\n",
            r"task 0 \(capture\(frame\)\) must take no argument",
        ),
        (
            "tasks = [lambda x: (True, x), lambda x: (True, x)]\n",
            r"task 0 \(<lambda>\(x\)\) must take no argument",
        ),
        (
            GOOD_TASKS
            + "def scaled(x, *, factor):\n    return True, x\ntasks = [capture, scaled]\n",
            r"task 1 \(scaled\(x, \*, factor\)\) needs keyword-only argument factor",
        ),
        (
            GOOD_TASKS + "async def later(x):\n    return True, x\ntasks = [capture, later]\n",
            r"task 1 \(later\) is an async function",
        ),
        (
            GOOD_TASKS + "def frames():\n    yield True, 1\ntasks = [frames, keep]\n",
            r"task 0 \(frames\) is a generator function",
        ),
    ],
)
def test_loading_checks_the_task_interface_and_says_what_is_wrong_in_one_line(
    module_dir: Callable[..., Path], source: str, message: str
) -> None:
    name = f"load_case_{next(CASES)}"
    module_dir(name, source)
    with pytest.raises(PipelineError, match=message) as error:
        load_pipeline(name)
    assert "\n" not in str(error.value)
    assert name in str(error.value)


@pytest.mark.parametrize(
    ("path", "message"),
    [
        ("no_such_module_xyz", "cannot import pipeline module 'no_such_module_xyz': no module"),
        ("no_such_pkg_xyz.pipeline", "cannot import pipeline module 'no_such_pkg_xyz.pipeline'"),
        ("missing_attr_app:nope", "has no attribute 'nope'"),
        ("mypump/pipeline.py", "--pipeline mypump.pipeline"),
        (":tasks", "is not a module name"),
        (".relative", "is not a module name"),
    ],
)
def test_a_module_that_cannot_be_found_says_how_to_name_it(path: str, message: str) -> None:
    install("missing_attr_app", tasks=[])
    with pytest.raises(PipelineError, match=message) as error:
        load_pipeline(path)
    assert "\n" not in str(error.value)


def test_set_source_without_a_hook_is_a_clear_error() -> None:
    pipeline = load_pipeline(
        install("nosource_app", tasks=[lambda: (True, 1), lambda x: (True, x)])
    )
    with pytest.raises(PipelineError, match="does not accept --source"):
        pipeline.set_source("clip.mp4")
