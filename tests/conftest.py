import os
import sys

import pytest

# Spawned ranks import test modules by name; make tests/ importable for them too.
sys.path.insert(0, os.path.dirname(__file__))

import training_utils  # noqa: E402


@pytest.fixture(scope="package")
def demo(tmp_path_factory) -> dict[str, str]:
    """The trainer's test data (see ``training_utils.build_demo_data``), built once for the whole tests folder."""
    return training_utils.build_demo_data(tmp_path_factory.mktemp("train_data"))

