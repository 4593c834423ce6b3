from __future__ import annotations

import pytest

from ._tiny import make_folder


@pytest.fixture(scope="session")
def tiny_t5_dir(tmp_path_factory):
    return make_folder("t5", tmp_path_factory.mktemp("tiny_t5"))


@pytest.fixture(scope="session")
def tiny_bart_dir(tmp_path_factory):
    return make_folder("bart", tmp_path_factory.mktemp("tiny_bart"))


@pytest.fixture(scope="session")
def tiny_flan_dir(tmp_path_factory):
    return make_folder("flan", tmp_path_factory.mktemp("tiny_flan"))
