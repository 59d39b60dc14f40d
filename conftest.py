"""Root pytest configuration: notebook runs through nbval where it is installed, plain pytest where it is not."""

from __future__ import annotations


def pytest_configure(config) -> None:
    """Run notebooks as ``--nbval-lax --nbval-current-env`` would, when the nbval plugin is present."""
    option = config.option
    if hasattr(option, "nbval_lax"):
        if not getattr(option, "nbval", False):
            option.nbval_lax = True
        option.nbval_current_env = True
