"""Tiny synthetic datasets and a tiny trained run, shared by the tests (CPU, seconds)."""

import os
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from contextlib import contextmanager
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


# --- a real browser and a real server, for the page tests -------------------------------------------------

CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = Path(__file__).parent / "artifacts"
BROWSER_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                "--no-first-run"]


def _chromium_available() -> bool:
    if CHROMIUM.exists():
        return True
    if hasattr(os, "geteuid") and os.geteuid() == 0 and shutil.which("apt-get"):
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        subprocess.run(["apt-get", "update", "-q"], check=False, env=env, capture_output=True, timeout=600)
        subprocess.run(["apt-get", "install", "-y", "-q", "chromium"], check=False, env=env,
                       capture_output=True, timeout=900)
    return CHROMIUM.exists()


@pytest.fixture(scope="session")
def browser():
    sync_api = pytest.importorskip("playwright.sync_api")
    if not _chromium_available():
        if os.environ.get("CI"):
            pytest.fail(f"{CHROMIUM} is missing and could not be installed; scripts/test.sh should install it")
        pytest.skip(f"{CHROMIUM} is missing and cannot be installed here")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), args=BROWSER_ARGS)
        yield b
        b.close()


@contextmanager
def running_server(app):
    """`app` served by uvicorn on a free loopback port in a thread; yields its base URL."""
    uvicorn = pytest.importorskip("uvicorn")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not srv.started and thread.is_alive() and time.monotonic() < deadline:
        thread.join(0.05)
    assert srv.started, "uvicorn did not start"
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        srv.should_exit = True
        thread.join(10)
