"""Helpers imported by tests."""
from tests.conftest import rel_err  # noqa: F401
