"""Shared fixtures. Per-area fixtures live in conftest.py files beside the tests."""
