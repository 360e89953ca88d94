"""Progress with a fraction: ``"chapter 4/5 synced (80%)"``.

powercrud stores a task's progress as one string (``AsyncManager.update_progress`` rejects
anything else), and its progress endpoint returns that string as ``progress``. Its modal
draws a bar for a running job but never sets its width: it reads nothing but ``status`` and
``progress`` from the endpoint. So the fraction travels in the string, readable as it is on
the dashboard and in logs: a progress message that ends in ``(NN%)`` is NN percent done.
The script ``otel_taskctx/powercrud_progress.html`` (include it once in the site's base
template) fills powercrud's bar from it.
"""

from __future__ import annotations

import re

#: a progress message ending in "(NN%)" is NN percent done
PERCENT = re.compile(r"\((\d{1,3})%\)\s*$")


def progress_text(message: object, done: int | None = None, total: int | None = None) -> str:
    """``message``, with ``" (NN%)"`` appended when ``done`` of ``total`` is given.

    The percentage is rounded down (100% only when ``done == total``). ``done`` and ``total``
    come together, ``total >= 1`` and ``0 <= done <= total``; anything else is a ``ValueError``.
    """
    text = str(message)
    if done is None and total is None:
        return text
    if done is None or total is None:
        raise ValueError("report_progress: give both done= and total=, or neither")
    if isinstance(done, bool) or isinstance(total, bool):
        raise ValueError("report_progress: done and total are counts, not booleans")
    done, total = int(done), int(total)
    if total < 1 or not 0 <= done <= total:
        raise ValueError(
            f"report_progress: need 0 <= done <= total and total >= 1, got {done}/{total}"
        )
    return f"{text} ({done * 100 // total}%)"


def percent(text: str) -> int | None:
    """The percentage a progress message ends with, or None."""
    match = PERCENT.search(text)
    return min(100, int(match.group(1))) if match else None
