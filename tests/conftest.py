"""Shared fixtures. Tests never touch a hub: everything offline, tiny models built in-process."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_teacher():
    from tdrl.testing import tiny_teacher

    return tiny_teacher()


@pytest.fixture(scope="session")
def bundled_teacher():
    from tdrl.models import bundled_teacher

    return bundled_teacher()


@pytest.fixture(scope="session")
def markov_teacher():
    from tdrl.testing import MarkovTeacher

    return MarkovTeacher(vocab_size=4, seed=0)
