"""Fixtures come from jupyter_stream.pytest_plugin (opt-in, as for any project that builds
on jupyter-stream: name it in ``pytest_plugins``)."""

import sys

import cloudpickle
import pytest

pytest_plugins = ["jupyter_stream.pytest_plugin"]


@pytest.fixture(autouse=True)
def _pickle_test_module_by_value(request):
    """Test modules are not importable on worker kernels: send their functions by value."""
    module = sys.modules[request.module.__name__]
    cloudpickle.register_pickle_by_value(module)
    yield
    cloudpickle.unregister_pickle_by_value(module)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """On failure, attach the tail of the shared server's log (worker errors show there)."""
    outcome = yield
    report = outcome.get_result()
    server = item.funcargs.get("jstream_server") if hasattr(item, "funcargs") else None
    if report.failed and server is not None:
        report.sections.append(("jupyter server log (tail)", "".join(server.log().splitlines(True)[-60:])))
