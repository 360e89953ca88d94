#!/usr/bin/env python
"""Command-line entry point of the sample project (``python sample/manage.py <command>``)."""

import os
import sys
from pathlib import Path


def main() -> None:
    # the repository root, so that ``sample`` and ``otel_taskctx`` import from a plain checkout
    here = Path(__file__).resolve().parent
    root = str(here.parent)
    # Python put this folder first on the path: drop it, so that the sample's packages import
    # only as ``sample.*`` and never twice under two names
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != here]
    if root not in sys.path:
        sys.path.insert(0, root)
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "sample.config.settings")
    from django.core.management import execute_from_command_line

    execute_from_command_line(sys.argv)


if __name__ == "__main__":
    main()
