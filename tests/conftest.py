"""Under CI a skip that means a broken install is a failure. .ci/run sets LRQGRAPH_REQUIRE_NATIVE=1
(the native library must build and load) and LRQGRAPH_CI=1 (the examples extra must import); then
a skip whose reason starts with one of MUST_NOT_SKIP fails its test, or its module's collection."""
import os

import pytest

MUST_NOT_SKIP = {"native ops not built": "LRQGRAPH_REQUIRE_NATIVE",
                 "needs the examples extra": "LRQGRAPH_CI"}


def _fail_forbidden_skip(report) -> None:
    if not report.skipped or not isinstance(report.longrepr, tuple):
        return
    reason = report.longrepr[2].removeprefix("Skipped: ")
    for prefix, var in MUST_NOT_SKIP.items():
        if reason.startswith(prefix) and os.environ.get(var) == "1":
            report.outcome = "failed"
            report.longrepr = f"{var}=1, so this must not skip: {reason}"


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    report = yield
    _fail_forbidden_skip(report)
    return report


@pytest.hookimpl(wrapper=True)
def pytest_make_collect_report(collector):
    report = yield
    _fail_forbidden_skip(report)
    return report
