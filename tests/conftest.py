import os
import sys

import pytest

# Spawned ranks import test modules by name; make tests/ importable for them too.
sys.path.insert(0, os.path.dirname(__file__))

import training_utils  # noqa: E402


@pytest.fixture(scope="session")
def demo(tmp_path_factory) -> dict[str, str]:
    """The trainer's test data (see ``training_utils.build_demo_data``), built once per test run."""
    return training_utils.build_demo_data(tmp_path_factory.mktemp("train_data"))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """`make test` runs the suite on two pytest-xdist workers (``--dist loadgroup``). A test that
    uses a module-scoped fixture (a trained run, a converted model, the README's scratch checkout)
    joins its module's group, so that fixture is built once, on one worker, and the README's
    blocks run there in order; every other test goes to whichever worker is free."""
    for item in items:
        fixtures = getattr(item, "_fixtureinfo", None)
        if fixtures and any(defs[-1].scope == "module" for defs in fixtures.name2fixturedefs.values()):
            item.add_marker(pytest.mark.xdist_group(item.module.__name__))
