"""Django's test runner, writing each test's outcome to ``$HOST_SUITE_OUTCOMES`` (JSON).

``run.py`` copies it into the unpacked sdist and runs ``manage.py test --testrunner
outcome_runner.OutcomeRunner``: the suite runs exactly as with Django's own runner.
"""

import json
import os
import unittest

from django.test.runner import DiscoverRunner


class OutcomeResult(unittest.TextTestResult):
    outcomes: dict = {}

    def _set(self, test, outcome):
        OutcomeResult.outcomes[test.id()] = outcome

    def addSuccess(self, test):  # noqa: N802 - unittest's names
        super().addSuccess(test)
        self._set(test, "passed")

    def addFailure(self, test, err):  # noqa: N802
        super().addFailure(test, err)
        self._set(test, "failed")

    def addError(self, test, err):  # noqa: N802
        super().addError(test, err)
        self._set(test, "error")

    def addSkip(self, test, reason):  # noqa: N802
        super().addSkip(test, reason)
        self._set(test, "skipped")

    def addExpectedFailure(self, test, err):  # noqa: N802
        super().addExpectedFailure(test, err)
        self._set(test, "passed")

    def addUnexpectedSuccess(self, test):  # noqa: N802
        super().addUnexpectedSuccess(test)
        self._set(test, "failed")

    def addSubTest(self, test, subtest, err):  # noqa: N802
        super().addSubTest(test, subtest, err)
        if err is not None:  # a failed subtest fails its test
            self._set(test, "failed")


class OutcomeRunner(DiscoverRunner):
    def get_resultclass(self):
        return OutcomeResult

    def run_suite(self, suite, **kwargs):
        try:
            return super().run_suite(suite, **kwargs)
        finally:
            with open(os.environ["HOST_SUITE_OUTCOMES"], "w") as out:
                json.dump(OutcomeResult.outcomes, out, indent=1, sort_keys=True)
