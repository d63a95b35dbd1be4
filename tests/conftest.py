"""Tiny synthetic datasets and a tiny trained run, shared by the tests (CPU, seconds)."""

import os
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from hemaseg.config import RunConfig, resolve_config
from hemaseg.data.synth import write_synthetic_dataset

# The test tensors are tiny: splitting each op across cores costs more in OpenMP fork/join than it
# saves, and on a busy 2-core machine oversubscribed threads slow the suite several-fold.
torch.set_num_threads(1)

# training caches (data/cache.py) go to a folder of this test session, never the user's ~/.cache; the
# torchrun and CLI subprocesses inherit it
TEST_CACHE_DIR = os.environ["HEMASEG_CACHE_DIR"] = tempfile.mkdtemp(prefix="hemaseg-test-cache-")


def pytest_sessionfinish(session, exitstatus):
    import shutil

    shutil.rmtree(TEST_CACHE_DIR, ignore_errors=True)

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    """16 synthetic 64x64 scans in the seed layout."""
    return write_synthetic_dataset(tmp_path_factory.mktemp("tiny") / "data", 16, size=64, seed=3, progress=False)


def tiny_config(root: Path, epochs: int = 2, **overrides) -> RunConfig:
    """The `seed` preset at 32 px, batch 4, resolved like every run's config."""
    return resolve_config(root, "seed", None, "cpu", {"size": 32, "epochs": epochs, "batch_size": 4, **overrides})


@pytest.fixture(scope="session")
def tiny_run(tiny_data, tmp_path_factory) -> Path:
    from hemaseg.training.train import fit

    out = tmp_path_factory.mktemp("run") / "run"
    fit(tiny_config(tiny_data), out, progress=False)
    return out


def write_pair(root: Path, name: str, image: np.ndarray, mask: np.ndarray) -> None:
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "mask").mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(root / "images" / f"{name}.png")
    Image.fromarray(mask).save(root / "mask" / f"{name}.png")
