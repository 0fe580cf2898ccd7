"""What every test shares: `--all` for the long VM tests that the default run leaves out."""

from __future__ import annotations

import pytest


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--all", action="store_true", default=False,
                     help="also run the long VM tests marked all_only (see README: what runs where)")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "all_only: a long VM test run only by `./forge test --all`")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("--all"):
        return
    skip = pytest.mark.skip(reason="long: runs with ./forge test --all")
    for item in items:
        if "all_only" in item.keywords:
            item.add_marker(skip)
