"""Under CI a skip that means a broken install is a failure. .ci/run sets LRQGRAPH_REQUIRE_NATIVE=1
(the native library must build and load) and LRQGRAPH_CI=1 (the examples extra must import); then
a skip whose reason starts with one of MUST_NOT_SKIP fails its test, or its module's collection."""
import contextlib
import os
import shutil
import tempfile

import pytest

from lrqgraph.cache import fixture_dir
from lrqgraph.methods import METHODS
from lrqgraph.passmanager import ANALYSES, PASSES

# Tests derive calibration statistics, latency tables and checkpoints in a folder of their own (not
# the developer's cache, whose entries another version of the code may have made), and keep the
# exported real models where they are, so that a second run does not export them again.
os.environ.setdefault("LRQGRAPH_FIXTURES", str(fixture_dir()))
_DERIVED = tempfile.mkdtemp(prefix="lrqgraph-test-cache-")
os.environ["LRQGRAPH_CACHE"] = _DERIVED


def pytest_unconfigure(config):
    shutil.rmtree(_DERIVED, ignore_errors=True)


# Tests that register a toy method, pass or analysis do it inside restored_registries(), so that
# the registries other tests see are lrqgraph's own; the session fails if one was left changed.
_REGISTRIES = {"methods": METHODS, "passes": PASSES, "analyses": ANALYSES}
_AT_START = {name: dict(registry) for name, registry in _REGISTRIES.items()}


@contextlib.contextmanager
def restored_registries():
    saved = {name: dict(registry) for name, registry in _REGISTRIES.items()}
    try:
        yield
    finally:
        for name, registry in _REGISTRIES.items():
            registry.clear()
            registry.update(saved[name])


def pytest_sessionfinish(session, exitstatus):
    changed = [name for name, registry in _REGISTRIES.items() if registry != _AT_START[name]]
    if changed:
        print(f"\nconftest: the {' and '.join(changed)} registry was left changed by a test")
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


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
