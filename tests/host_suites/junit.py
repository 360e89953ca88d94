"""pytest's junit files: each test's outcome, and the node id that runs a test again."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path


def junit_outcomes(path: Path) -> dict[str, str]:
    if not path.exists():
        return {}
    outcomes = {}
    for case in ET.parse(path).getroot().iter("testcase"):
        test_id = f"{case.get('classname')}::{case.get('name')}"
        tags = {child.tag for child in case}
        if "failure" in tags:
            outcomes[test_id] = "failed"
        elif "error" in tags:
            outcomes[test_id] = "error"
        elif "skipped" in tags:
            outcomes[test_id] = "skipped"
        else:
            outcomes[test_id] = "passed"
    return outcomes


def node_id(test_id: str, root: Path | None = None) -> str:
    """pytest's node id of a junit test id (``django_q.tests.test_x::test_y[p]``); with the
    suite's ``root``, a class's name is told from its module's (``t.unit.m.test_C::test_y``
    is ``t/unit/m.py::test_C::test_y``)."""
    module, name = test_id.split("::", 1)
    parts = module.split(".")
    if root is not None:
        for end in range(len(parts), 0, -1):
            if (root / Path(*parts[:end])).with_suffix(".py").is_file():
                return "::".join(["/".join(parts[:end]) + ".py", *parts[end:], name])
    return f"{module.replace('.', '/')}.py::{name}"
