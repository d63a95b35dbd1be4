import numpy as np
import pytest

import hemaseg
from hemaseg.data.images import to_gray


@pytest.mark.parametrize("h,w", [(37, 91), (101, 33), (64, 64)])
def test_predict_returns_masks_at_the_original_odd_size(tiny_run, h, w):
    model = hemaseg.load_model(tiny_run)
    image = np.random.default_rng(0).integers(0, 255, (h, w), dtype=np.uint8)
    pred = model.predict(image)
    assert pred.prob.shape == pred.mask.shape == (h, w)
    assert pred.prob.dtype == np.float32 and 0 <= pred.prob.min() and pred.prob.max() <= 1
    assert np.array_equal(pred.mask, pred.prob >= model.threshold)
    assert np.array_equal(model.predict(image, threshold=0.0).mask, np.ones((h, w), bool))


def test_rgb_and_16bit_inputs_are_accepted(tiny_run):
    model = hemaseg.load_model(tiny_run)
    gray = np.random.default_rng(0).integers(0, 255, (40, 50), dtype=np.uint8)
    rgb = np.repeat(gray[..., None], 3, axis=2)
    np.testing.assert_allclose(model.predict(rgb).prob, model.predict(gray).prob, atol=1e-5)
    np.testing.assert_allclose(to_gray(gray.astype(np.uint16) * 257), to_gray(gray), atol=1e-6)
