"""The golden outputs of the official generators, kept in the repository (tests/data/golden; see
its README). A missing file fails the test that needs it: the equivalence checks behind the
README's claims must never turn into skips."""

import os

import pytest

GOLDEN = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "golden")
NAMES = ("2008_000101", "2008_000102", "2008_000103")


def golden_path(*parts: str) -> str:
    path = os.path.join(GOLDEN, *parts)
    if not os.path.exists(path):
        pytest.fail(f"golden data missing: {path} (tests/data/golden belongs to the repository)",
                    pytrace=False)
    return path
