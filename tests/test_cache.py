"""The training cache: letterboxed uint16 scans in memory-mapped files, built once, shared and reused."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import hemaseg.data.dataset as dataset
from hemaseg.data.cache import ScanCache, open_or_build
from hemaseg.data.dataset import load_dataset, load_sample
from hemaseg.data.transforms import letterbox, preprocess
from hemaseg.training.train import CachedSet

REPO = Path(__file__).resolve().parents[1]


def _build(data, cache_dir, size=32, **kw):
    loaded = load_dataset(data)
    return loaded, open_or_build(loaded.samples, loaded.fingerprint, size, kw.get("mask_threshold"), None, None,
                                 cache_dir)


def test_the_cache_holds_each_scan_letterboxed_and_is_reused_not_rebuilt(tiny_data, tmp_path, monkeypatch):
    loaded, cache = _build(tiny_data, tmp_path)
    assert isinstance(cache.images, np.memmap) and cache.images.dtype == np.uint16 and cache.images.shape == (16, 32, 32)
    for i, sample in enumerate(loaded.samples[:4]):
        image, mask = load_sample(sample)
        boxed, boxed_mask, box = letterbox(image, 32, mask)
        assert cache.boxes[i] == box
        assert np.abs(cache.images[i] / 65535 - boxed).max() <= 0.5 / 65535 + 1e-6  # one rounding step
        assert np.array_equal(cache.masks[i], boxed_mask.astype(np.uint8))
        assert np.array_equal(cache.original_mask(i), mask)
        # what training feeds the network is the preprocessing inference uses, up to that rounding
        assert np.abs(CachedSet(cache, [sample.name], "zscore").image(0) - preprocess(image, 32)[0]).max() < 1e-3

    def no_decoding(*args, **kwargs):
        raise AssertionError("the cache was built again")

    monkeypatch.setattr(dataset, "load_sample", no_decoding)
    again = open_or_build(loaded.samples, loaded.fingerprint, 32, None, None, None, tmp_path)
    assert again.path == cache.path  # another run, fold or process of the same data and size
    monkeypatch.undo()
    other = open_or_build(loaded.samples, loaded.fingerprint, 32, 0.5, None, None, tmp_path)
    assert other.path != cache.path  # other mask settings, another cache
    import pickle

    pickled = pickle.dumps(cache)
    assert len(pickled) < cache.nbytes / 4  # a worker process gets the path and maps the files itself
    assert np.array_equal(pickle.loads(pickled).images, cache.images)


@pytest.mark.parametrize("method", ["zscore", "unit"])
def test_a_16_bit_scan_trains_on_the_pixels_inference_sees(tmp_path, method):
    """A 12-bit scan stored in 16 bits spans 0..4095 of 65535: a uint8 cache kept ~17 grey levels of it
    while the predictor normalised all 4096. Training and inference must see the same input."""
    from hemaseg.data.pixels import to_gray

    rng = np.random.default_rng(0)
    (tmp_path / "data" / "images").mkdir(parents=True)
    (tmp_path / "data" / "masks").mkdir()
    raw = rng.integers(0, 4096, (40, 56)).astype(np.uint16)
    Image.fromarray(raw).save(tmp_path / "data" / "images" / "a.png")
    mask = np.zeros((40, 56), np.uint8)
    mask[10:20, 10:30] = 255
    Image.fromarray(mask).save(tmp_path / "data" / "masks" / "a.png")
    loaded, cache = _build(tmp_path / "data", tmp_path / "cache")
    trained = CachedSet(cache, ["a"], method).image(0)
    inferred = preprocess(to_gray(raw), 32, method)[0]
    assert len(np.unique(trained)) > 200  # the grey levels survive the cache
    _, _, box = letterbox(to_gray(raw), 32)
    divisor = 0.25 if method == "unit" else float(np.std(letterbox(to_gray(raw), 32)[0][
        box.top:box.top + box.new_h, box.left:box.left + box.new_w]))  # what the normalisation divides by
    assert np.abs(trained - inferred).max() <= 1 / 65535 / divisor  # within one stored step


def test_a_build_that_fails_leaves_no_cache_behind(tiny_data, tmp_path, monkeypatch):
    loaded = load_dataset(tiny_data)
    calls = []
    real = dataset.load_sample

    def fails_on_the_fifth(sample, *args):
        calls.append(sample.name)
        if len(calls) == 5:
            raise OSError("disk went away")
        return real(sample, *args)

    monkeypatch.setattr(dataset, "load_sample", fails_on_the_fifth)
    with pytest.raises(OSError, match="disk went away"):
        open_or_build(loaded.samples, loaded.fingerprint, 32, None, None, None, tmp_path)
    assert list(tmp_path.iterdir()) == []  # neither a half cache nor its temp folder
    monkeypatch.undo()
    assert len(_build(tiny_data, tmp_path)[1]) == 16


# Train one epoch in a process whose private memory may grow by CAP_MB only (RLIMIT_DATA: heap and
# anonymous mappings; a read-only memory map of a file does not count), on a dataset whose cache is larger
# than that. A first tiny run warms up torch's one-off allocations, so the cap measures what the data costs.
# Training as it was before the cache (every scan decoded and kept as float32, twice) would need ~130 MB.
CAP_MB = 16
CAPPED = r'''
import json, resource, sys
from pathlib import Path
import torch
torch.set_num_threads(1)
from hemaseg.config import resolve_config
from hemaseg.training.train import fit

small, big, out, cap_mb, settings = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]), int(sys.argv[4]), json.loads(sys.argv[5])
fit(resolve_config(small, "seed", None, "cpu", settings), out / "warm", progress=False, review=False)
vm_data = next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmData:"))
resource.setrlimit(resource.RLIMIT_DATA, (vm_data + cap_mb * 2**20, resource.RLIM_INFINITY))
# the training alone (review=False): the review decision fitted afterwards scores the validation scans at
# their full size, outside what this cap measures
summary = fit(resolve_config(big, "seed", None, "cpu", settings), out / "big", progress=False, review=False)
print(json.dumps(summary))
'''


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="RLIMIT_DATA counts anonymous memory on Linux only")
def test_an_epoch_trains_with_a_cache_larger_than_the_memory_cap(tiny_data, tmp_path):
    rng = np.random.default_rng(0)
    big = tmp_path / "big"
    for sub in ("images", "mask"):
        (big / sub).mkdir(parents=True)
    for i in range(600):
        mask = np.zeros((128, 128), np.uint8)
        y, x = rng.integers(10, 100, 2)
        mask[y:y + 16, x:x + 16] = 255
        Image.fromarray(rng.integers(0, 255, (128, 128), dtype=np.uint8)).save(big / "images" / f"{i}.png",
                                                                              compress_level=1)
        Image.fromarray(mask).save(big / "mask" / f"{i}.png")
    (tmp_path / "capped.py").write_text(CAPPED)
    settings = {"size": 128, "epochs": 1, "batch_size": 4, "base_width": 2, "depth": 2, "augment": False,
                "precision": "fp32"}
    env = {**os.environ, "HEMASEG_CACHE_DIR": str(tmp_path / "cache"), "MALLOC_ARENA_MAX": "2",
           "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, str(tmp_path / "capped.py"), str(tiny_data), str(big), str(tmp_path / "runs"),
                           str(CAP_MB), json.dumps(settings)], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["epochs"] == 1 and summary["n_train"] + summary["n_val"] == 600
    cache = max((ScanCache.open(p) for p in (tmp_path / "cache").iterdir()), key=len)
    assert len(cache) == 600 and cache.nbytes > CAP_MB * 2**20


def test_an_unwritable_default_cache_folder_falls_back_to_the_temp_folder(tiny_data, tmp_path, monkeypatch, caplog):
    import hemaseg.data.cache as cache_module

    blocked = tmp_path / "home-is-a-file"
    blocked.write_text("")  # a folder cannot be made here
    monkeypatch.setattr(cache_module, "default_cache_dir", lambda: blocked / "hemaseg")
    monkeypatch.setattr(cache_module.tempfile, "gettempdir", lambda: str(tmp_path / "tmp"))
    loaded = load_dataset(tiny_data)
    cache = open_or_build(loaded.samples, loaded.fingerprint, 32, None, None, None)
    assert cache.path.is_relative_to(tmp_path / "tmp") and len(cache) == 16
    assert "cannot write the training cache" in caplog.text


def test_a_waiting_process_maps_the_cache_another_one_builds(tiny_data, tmp_path):
    """torchrun's other ranks on a machine: they watch for the cache instead of building it too."""
    import threading

    loaded = load_dataset(tiny_data)
    got = {}

    def waiter():
        got["cache"] = open_or_build(loaded.samples, loaded.fingerprint, 32, None, None, None, tmp_path, wait=True,
                                     poll_s=0.01)

    thread = threading.Thread(target=waiter)
    thread.start()
    assert thread.is_alive()  # nothing to map yet: it waits
    built = open_or_build(loaded.samples, loaded.fingerprint, 32, None, None, None, tmp_path)
    thread.join(timeout=30)
    assert not thread.is_alive() and got["cache"].path == built.path and len(got["cache"]) == 16
