"""Fixtures come from jupyter_stream.pytest_plugin (registered as a pytest11 plugin)."""

import sys

import cloudpickle
import pytest


@pytest.fixture(autouse=True)
def _pickle_test_module_by_value(request):
    """Test modules are not importable on worker kernels: send their functions by value."""
    module = sys.modules[request.module.__name__]
    cloudpickle.register_pickle_by_value(module)
    yield
    cloudpickle.unregister_pickle_by_value(module)
