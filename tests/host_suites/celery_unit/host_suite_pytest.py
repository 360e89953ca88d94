"""pytest for Celery's suite, with its missing test extras after the environment on
``sys.path`` (``$HOST_SUITE_EXTRAS``), where pytest's plugin discovery finds them."""

import os
import sys

sys.path.append(os.environ["HOST_SUITE_EXTRAS"])

import pytest  # noqa: E402

sys.exit(pytest.main(sys.argv[1:]))
