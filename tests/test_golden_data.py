"""The golden data set is complete, inside the repository and small."""

import os

import numpy as np

from tests.golden import GOLDEN, NAMES, golden_path

MAX_FILE_BYTES = 5 * 2**20


def expected_files() -> list[str]:
    files = ["README.md", "images/labels.npy", "mctformer/weights_v1_tiny.pth",
             "mctformer/weights_v2_tiny.pth", "transcam/weights_tiny.pth"]
    for name in NAMES:
        files += [f"images/JPEGImages/{name}.jpg", f"mctformer/official_v1/{name}.npy",
                  f"mctformer/official_v2/{name}.npy", f"transcam/official_cam/{name}.npy",
                  f"transcam/official_crf_0.60/{name}.png",
                  f"transcam/official_crf_0.25/{name}.png"]
    return files


def test_every_golden_file_is_present_and_small():
    for relative in expected_files():
        path = golden_path(*relative.split("/"))
        assert 0 < os.path.getsize(path) <= MAX_FILE_BYTES, relative
    found = {os.path.relpath(os.path.join(root, f), GOLDEN).replace(os.sep, "/")
             for root, _, files in os.walk(GOLDEN) for f in files}
    assert found == set(expected_files())


def test_golden_labels_name_the_images():
    labels = np.load(golden_path("images", "labels.npy"), allow_pickle=True).item()
    assert sorted(labels) == list(NAMES)
    assert all(np.asarray(v).shape == (20,) for v in labels.values())
