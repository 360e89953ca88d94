"""The task functions ``tests/tests.py`` enqueues, by the names it uses."""

import time
from typing import Any

from django.tasks import TaskContext, task


@task()
def noop_task(*args: Any, **kwargs: Any) -> None:
    """Does nothing with whatever it is given."""


@task()
async def noop_task_async(*args: Any, **kwargs: Any) -> None:
    """The coroutine flavour of ``noop_task``."""


@task()
def calculate_meaning_of_life() -> int:
    return 42


@task()
def failing_task_value_error() -> None:
    raise ValueError("This task failed due to ValueError")


@task()
def failing_task_system_exit() -> None:
    raise SystemExit("This task failed due to SystemExit")


@task()
def failing_task_keyboard_interrupt() -> None:
    raise KeyboardInterrupt("This task failed due to KeyboardInterrupt")


@task()
def complex_exception() -> None:
    """An exception whose argument is itself an exception."""
    raise ValueError(ValueError("This task failed"))


@task()
def complex_return_value() -> Any:
    """A return value that neither JSON nor pickle can store."""
    return lambda: True


@task()
def exit_task() -> None:
    exit(1)


@task()
def hang() -> None:
    """Runs until the worker is stopped (5 minutes at most)."""
    time.sleep(300)


@task()
def sleep_for(seconds: float) -> None:
    time.sleep(seconds)


@task(takes_context=True)
def get_task_id(context: TaskContext) -> str:
    return context.task_result.id


@task(takes_context=True)
def test_context(context: TaskContext, attempt: int) -> None:
    if not isinstance(context, TaskContext) or context.attempt != attempt:
        raise AssertionError(f"unexpected context {context!r} for attempt {attempt}")
