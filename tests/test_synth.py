"""Tests for the synthetic ultrasound generator: shapes, determinism, speckle physics, lesions, files."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage, stats

from hemaseg.data.synth import SynthConfig, speckle_envelope, synth_scan, write_synthetic_dataset

RAYLEIGH_SNR = float(np.sqrt(np.pi / (4 - np.pi)))  # mean/std of a Rayleigh variable, 1.913
LINEAR = SynthConfig(p_sector=0.0)


def _scans(n: int, size, config: SynthConfig | None = None, seed: int = 0):
    config = config or SynthConfig()
    return [synth_scan(np.random.default_rng([seed, i]), size, config) for i in range(n)]


@pytest.mark.parametrize("size, shape", [(64, (64, 64)), ((96, 130), (96, 130)), ((130, 96), (130, 96))])
def test_shapes_dtypes_and_binary_mask(size, shape):
    for config in (LINEAR, SynthConfig(p_sector=1.0)):
        for image, mask in _scans(4, size, config):
            assert image.shape == shape and mask.shape == shape
            assert image.dtype == np.uint8 and mask.dtype == np.uint8
            assert set(np.unique(mask)) <= {0, 255}


def test_same_seed_same_scan_different_seed_different_scan():
    a_img, a_mask = synth_scan(np.random.default_rng(3), 96)
    b_img, b_mask = synth_scan(np.random.default_rng(3), 96)
    c_img, _ = synth_scan(np.random.default_rng(4), 96)
    np.testing.assert_array_equal(a_img, b_img)
    np.testing.assert_array_equal(a_mask, b_mask)
    assert not np.array_equal(a_img, c_img)


def test_speckle_envelope_is_rayleigh():
    envelope = speckle_envelope(np.random.default_rng(0), (320, 512))
    assert envelope.shape == (320, 512) and np.all(envelope >= 0)
    # neighbours share the point-spread function; keep samples ~3 sigma apart so they are near independent
    sample = envelope[::5, ::8].ravel().astype(np.float64)
    scale = np.sqrt(np.mean(sample**2) / 2.0)  # maximum-likelihood Rayleigh scale
    assert stats.kstest(sample, stats.rayleigh(scale=scale).cdf).pvalue > 0.01
    assert envelope.mean() / envelope.std() == pytest.approx(RAYLEIGH_SNR, abs=0.05)


def test_few_scatterers_per_cell_is_not_rayleigh():
    """The check above has power: sparse scatterers (pre-Rayleigh speckle) fail it."""
    envelope = speckle_envelope(np.random.default_rng(0), (320, 512), density=0.01)
    sample = envelope[::5, ::8].ravel().astype(np.float64)
    scale = np.sqrt(np.mean(sample**2) / 2.0)
    assert stats.kstest(sample, stats.rayleigh(scale=scale).cdf).pvalue < 0.01
    assert envelope.mean() / envelope.std() < RAYLEIGH_SNR - 0.2


def test_some_scans_empty_some_with_lesions_of_bounded_size():
    size = 96
    masks = [mask > 0 for _, mask in _scans(60, size)]
    n_empty = sum(not m.any() for m in masks)
    assert 2 <= n_empty <= 25  # p_empty = 0.15 of 60 -> 9 expected
    n_lesions = [ndimage.label(m)[1] for m in masks]
    assert max(n_lesions) <= 3  # at most 2 lesions; a lesion cut by the border may split in two
    areas = [m.sum() / m.size for m in masks if m.any()]
    assert max(areas) < 0.6 and max(areas) > 0.02 and min(areas) < 0.02  # small and large lesions


def _lesion_vs_ring(image: np.ndarray, mask: np.ndarray) -> tuple[float, float]:
    """Mean intensity inside the mask and beside it: a ring a few pixels out, at the lesion's mid depths
    (above and below lie other layers and the posterior shadow or enhancement)."""
    inside = mask > 0
    ring = ndimage.binary_dilation(inside, iterations=6) & ~ndimage.binary_dilation(inside, iterations=2)
    lo, hi = np.percentile(np.nonzero(inside)[0], [25, 75])
    ring[: int(lo)] = ring[int(hi) + 1 :] = False
    return float(image[inside].mean()), float(image[ring].mean())


@pytest.mark.parametrize("weights, darker", [((1, 0, 0), True), ((0, 0, 1), False)])
def test_hypoechoic_lesions_darker_hyperechoic_brighter(weights, darker):
    config = SynthConfig(p_empty=0.0, max_lesions=1, p_sector=0.0, echogenicity_weights=weights)
    pairs = [_lesion_vs_ring(img, mask) for img, mask in _scans(20, 128, config) if mask.any()]
    assert len(pairs) >= 15
    contrast = np.array([inside - ring for inside, ring in pairs]) * (-1 if darker else 1)
    # vessels, shadowing inside the lesion and neighbouring layers make a few exceptions, not many
    assert np.mean(contrast > 0) >= 0.7
    assert np.median(contrast) > 10  # grey levels


def test_posterior_shadow_darker_than_enhancement():
    """Same scatterers, only the lesion's attenuation differs: the column below it follows."""
    base = dict(p_empty=0.0, max_lesions=1, p_sector=0.0, p_bone=0.0)
    shadow = _scans(12, 128, SynthConfig(posterior_weights=(0, 0, 1), **base))
    enhance = _scans(12, 128, SynthConfig(posterior_weights=(0, 1, 0), **base))
    darker = []
    for (img_s, mask_s), (img_e, mask_e) in zip(shadow, enhance, strict=True):
        np.testing.assert_array_equal(mask_s, mask_e)
        rows, cols = np.nonzero(mask_s)
        if rows.max() > 110:  # nothing below the lesion to compare
            continue
        column = (slice(rows.max() + 3, None), slice(cols.min(), cols.max() + 1))
        darker.append(img_s[column].mean() < img_e[column].mean())
    assert len(darker) >= 6 and np.mean(darker) >= 0.8


def test_log_compression_uses_the_grey_range():
    for image, _ in _scans(8, 128, LINEAR):
        lo, hi = np.percentile(image, [1, 99])
        assert lo < 50 and hi > 190 and hi - lo > 150


def test_skin_line_bright_and_tgc_keeps_depth_visible():
    images = np.stack([img for img, _ in _scans(16, 128, SynthConfig(p_sector=0.0, p_bone=0.0))])
    profile = images.mean(axis=(0, 2))  # mean brightness per depth row
    assert profile[:16].max() > 1.3 * np.median(profile)  # bright skin / dermis at the top
    assert profile[-20:].mean() > 25  # deep tissue is still shown, not attenuated to black


def test_tgc_compensates_attenuation():
    """Same scatterers, with and without time-gain compensation: without it the deep part is darker."""
    base = dict(p_sector=0.0, p_bone=0.0, attenuation_db=45.0)
    with_tgc = np.stack([img for img, _ in _scans(8, 128, SynthConfig(tgc_fraction=0.9, **base))])
    without = np.stack([img for img, _ in _scans(8, 128, SynthConfig(tgc_fraction=0.0, **base))])
    deep = slice(96, None)
    top = slice(16, 40)
    ratio_with = with_tgc[:, deep].mean() / with_tgc[:, top].mean()
    ratio_without = without[:, deep].mean() / without[:, top].mean()
    assert ratio_without < ratio_with - 0.2


def test_sector_outside_is_black_in_image_and_mask():
    config = SynthConfig(p_sector=1.0, p_empty=0.0, p_bone=0.0, posterior_weights=(1, 0, 0))
    n_lesion_pixels = 0
    for image, mask in _scans(10, (96, 130), config):
        h, w = image.shape
        # the region outside the fan is the black area connected to the bottom corners
        labels, _ = ndimage.label(image == 0)
        outside = np.isin(labels, [labels[h - 1, 0], labels[h - 1, w - 1]]) & (labels > 0)
        assert outside[h - 1, 0] and outside[h - 1, w - 1]
        assert 0.05 < outside.mean() < 0.6
        assert not mask[outside].any()
        assert image[: h // 3, w // 2].max() > 120  # the skin near the top of the fan is visible
        n_lesion_pixels += int((mask > 0).sum())
    assert n_lesion_pixels > 0


def test_write_synthetic_dataset(tmp_path):
    out = write_synthetic_dataset(tmp_path / "a", n=3, size=64, seed=5, progress=False)
    assert out == tmp_path / "a"
    for folder in ("images", "mask"):
        assert sorted(p.name for p in (out / folder).iterdir()) == ["1.png", "2.png", "3.png"]
    for i in (1, 2, 3):
        image = Image.open(out / "images" / f"{i}.png")
        mask = Image.open(out / "mask" / f"{i}.png")
        assert image.mode == "L" and mask.mode == "L" and image.size == (64, 64)
        # scan i can be regenerated alone from (seed, i)
        expected_image, expected_mask = synth_scan(np.random.default_rng([5, i]), 64)
        np.testing.assert_array_equal(np.asarray(image), expected_image)
        np.testing.assert_array_equal(np.asarray(mask), expected_mask)

    again = write_synthetic_dataset(tmp_path / "b", n=3, size=64, seed=5, progress=False)
    other = write_synthetic_dataset(tmp_path / "c", n=3, size=64, seed=6, progress=False)
    for i in (1, 2, 3):
        same = (out / "images" / f"{i}.png").read_bytes() == (again / "images" / f"{i}.png").read_bytes()
        assert same and (out / "mask" / f"{i}.png").read_bytes() == (again / "mask" / f"{i}.png").read_bytes()
    assert (out / "images" / "1.png").read_bytes() != (other / "images" / "1.png").read_bytes()


def test_config_validation_names_the_field():
    with pytest.raises(ValueError, match="p_empty"):
        SynthConfig(p_empty=1.5)
    with pytest.raises(ValueError, match="dynamic_range_db"):
        SynthConfig(dynamic_range_db=(60.0, 50.0))
    assert SynthConfig(dynamic_range_db=55.0).dynamic_range_db == (55.0, 55.0)
