import dataclasses

import numpy as np
import pytest
import torch
from monai.transforms import AdjustContrast, Affine, GaussianSmooth

from hemaseg.config import AugmentConfig
from hemaseg.data.batch_augment import BatchAugment, adjust_gamma, affine_grid, gaussian_blur, warp
from hemaseg.data.transforms import augment, build_augmentation

OFF = AugmentConfig.off()
INTENSITY_ONLY = dataclasses.replace(OFF, gamma_p=1, contrast_p=1, blur_p=1, noise_p=1, speckle_p=1)
# the probability field of each step
STEPS = ["hflip", "vflip", "affine_p", "gamma_p", "contrast_p", "blur_p", "noise_p", "speckle_p"]


def _batch(n: int, size: int, seed: int = 0, dtype=torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """n random z-scored-like images and blob masks, (n, 1, size, size)."""
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(n, 1, size, size, generator=g, dtype=dtype)
    masks = torch.zeros(n, 1, size, size, dtype=dtype)
    masks[:, :, size // 5:size // 2, size // 3:size * 4 // 5] = 1
    return images, masks


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_every_probability_zero_is_the_exact_identity():
    images, masks = _batch(8, 32)
    out_img, out_mask = BatchAugment(OFF, 32)(images, masks, _gen(0))
    assert torch.equal(out_img, images) and torch.equal(out_mask, masks)


def test_flips_reverse_the_right_axis_of_image_and_mask():
    x = torch.tensor([[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11], [0, 0, 0, 0.0]])[None, None]  # asymmetric
    m = (x > 5).float()
    for cfg, want in [
        (dataclasses.replace(OFF, hflip=1.0), [[3, 2, 1, 0], [7, 6, 5, 4], [11, 10, 9, 8], [0, 0, 0, 0]]),
        (dataclasses.replace(OFF, vflip=1.0), [[0, 0, 0, 0], [8, 9, 10, 11], [4, 5, 6, 7], [0, 1, 2, 3]]),
        (dataclasses.replace(OFF, hflip=1.0, vflip=1.0), [[0, 0, 0, 0], [11, 10, 9, 8], [7, 6, 5, 4], [3, 2, 1, 0]]),
    ]:
        img, mask = BatchAugment(cfg, 4)(x, m, _gen(0))
        assert img[0, 0].tolist() == want
        assert torch.equal(mask, (img > 5).float())


@pytest.mark.parametrize("angle,scale,shift", [(0.2, (1.1, 0.9), (3.0, -2.0)), (-0.26, (0.86, 1.14), (-1.5, 2.5))])
def test_affine_matches_monais_affine_for_the_same_parameters(angle, scale, shift):
    images, masks = _batch(1, 48, seed=3)
    params = [torch.tensor([v], dtype=torch.float64) for v in (angle, scale, shift)]
    grid = affine_grid(*params, (48, 48), images)
    common = {"rotate_params": angle, "scale_params": scale, "translate_params": shift,
              "padding_mode": "zeros", "image_only": True}
    want_img = Affine(mode="bilinear", **common)(images[0]).as_tensor()
    want_mask = Affine(mode="nearest", **common)(masks[0]).as_tensor()
    assert torch.allclose(warp(images, grid, "bilinear")[0], want_img, atol=1e-4)
    assert (warp(masks, grid, "nearest")[0] != want_mask).float().mean() < 1e-3


def test_gamma_and_blur_match_monai():
    images, _ = _batch(3, 40, seed=4)
    gamma = torch.tensor([0.7, 1.0, 1.5])
    sigma = torch.tensor([[0.25, 1.0], [0.6, 0.3], [0.99, 0.37]])  # (row, column) pixels
    got_gamma = adjust_gamma(images, gamma.view(-1, 1, 1, 1))
    got_blur = gaussian_blur(images, sigma)
    for i in range(3):
        assert torch.allclose(got_gamma[i], AdjustContrast(gamma[i].item())(images[i]).as_tensor(), atol=1e-6)
        want = GaussianSmooth(sigma=tuple(sigma[i].tolist()))(images[i]).as_tensor()
        assert torch.allclose(got_blur[i], want, atol=1e-6)
    constant = torch.full((1, 1, 8, 8), 2.5)
    assert torch.equal(adjust_gamma(constant, torch.tensor(1.3)), constant)


def test_intensity_steps_leave_masks_untouched_and_geometry_keeps_them_binary():
    images, masks = _batch(16, 32)
    _, out_mask = BatchAugment(INTENSITY_ONLY, 32)(images, masks, _gen(1))
    assert torch.equal(out_mask, masks)
    _, out_mask = BatchAugment(AugmentConfig(hflip=0.5, vflip=0.5, affine_p=1.0), 32)(images, masks, _gen(1))
    assert set(out_mask.unique().tolist()) <= {0.0, 1.0}
    assert not torch.equal(out_mask, masks)


def test_same_generator_state_same_output_and_the_inputs_are_not_modified():
    images, masks = _batch(8, 32)
    before = images.clone(), masks.clone()
    cfg = AugmentConfig(vflip=0.5)
    a = BatchAugment(cfg, 32)(images, masks, _gen(7))
    b = BatchAugment(cfg, 32)(images, masks, _gen(7))
    c = BatchAugment(cfg, 32)(images, masks, _gen(8))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])
    assert torch.equal(images, before[0]) and torch.equal(masks, before[1])


@pytest.mark.parametrize("step", STEPS)
def test_each_step_fires_with_its_probability(step):
    images, masks = _batch(400, 16, seed=5)
    cfg = dataclasses.replace(OFF, **{step: 0.3})
    out_img, out_mask = BatchAugment(cfg, 16)(images, masks, _gen(11))
    changed = (out_img != images).flatten(1).any(1)
    assert 0.2 < changed.float().mean() < 0.4, f"{step}=0.3 changed {changed.float().mean():.0%} of the samples"
    mask_changed = (out_mask != masks).flatten(1).any(1)
    if step in ("hflip", "vflip"):  # the (asymmetric) mask moves with exactly those images
        assert torch.equal(mask_changed, changed)
    elif step == "affine_p":  # a small warp can leave a 16 px mask's nearest samples as they were
        assert not (mask_changed & ~changed).any() and mask_changed.sum() > 0.8 * changed.sum()
    else:
        assert not mask_changed.any()


def test_noise_speckle_and_contrast_have_monais_spread():
    """On a constant image: additive noise std ~ U(0, noise_std) per sample (MONAI's sample_std),
    speckle std = speckle_std, contrast factors in 1 +- contrast."""
    ones = torch.ones(64, 1, 32, 32)
    cfg = dataclasses.replace(OFF, noise_p=1.0, noise_std=0.1)
    std = BatchAugment(cfg, 32)(ones, ones, _gen(2))[0].flatten(1).std(1)
    assert std.max() < 0.1 * 1.1 and std.min() < 0.02 and 0.04 < std.mean() < 0.06
    cfg = dataclasses.replace(OFF, speckle_p=1.0, speckle_std=0.15)
    std = BatchAugment(cfg, 32)(ones, ones, _gen(2))[0].flatten(1).std(1)
    assert torch.allclose(std, torch.full_like(std, 0.15), atol=0.02)
    cfg = dataclasses.replace(OFF, contrast_p=1.0, contrast=0.25)
    factor = BatchAugment(cfg, 32)(ones, ones, _gen(2))[0][:, 0, 0, 0]
    assert 0.75 <= factor.min() < 0.85 and 1.15 < factor.max() <= 1.25


@pytest.mark.parametrize("size", [64, (48, 96)], ids=["square", "2to1"])
def test_affine_statistics_match_the_monai_path(size):
    """Mask area change and centroid shift over 200 draws: both paths draw the same distributions, on a
    square input and on one shaped like a 2:1 scan (shifts are a fraction of each side)."""
    (h, w), n = ((size, size) if isinstance(size, int) else size), 200
    mask = np.zeros((h, w), np.float32)
    mask[h * 3 // 16:h * 7 // 16, w * 15 // 32:w * 25 // 32] = 1  # off centre: rotation and scale move it too
    cfg = dataclasses.replace(OFF, affine_p=1.0)
    pipe = build_augmentation(cfg, size)
    monai_masks = torch.stack([augment(pipe, mask, mask, seed)[1] for seed in range(n)])
    assert monai_masks.shape[-2:] == (h, w)
    batch = torch.from_numpy(mask)[None, None].repeat(n, 1, 1, 1)
    batch_masks = BatchAugment(cfg, size)(batch, batch, _gen(0))[1]

    yy, xx = torch.meshgrid(torch.arange(float(h)), torch.arange(float(w)), indexing="ij")

    def area_and_shift(m: torch.Tensor, ref: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        m, ref = m.reshape(-1, h, w).double(), ref.reshape(1, h, w).double()
        area, area0 = m.sum((1, 2)), ref.sum((1, 2))
        centroid = torch.stack([(m * yy).sum((1, 2)), (m * xx).sum((1, 2))], 1) / area[:, None]
        centroid0 = torch.stack([(ref * yy).sum((1, 2)), (ref * xx).sum((1, 2))], 1) / area0[:, None]
        return area / area0, (centroid - centroid0).norm(dim=1)

    ref = torch.from_numpy(mask)
    monai_area, monai_shift = area_and_shift(monai_masks, ref)
    batch_area, batch_shift = area_and_shift(batch_masks, ref)
    assert abs(batch_area.mean() - monai_area.mean()) < 0.04
    assert 0.75 < batch_area.std() / monai_area.std() < 1.33
    assert abs(batch_shift.mean() - monai_shift.mean()) < 0.6  # pixels; the mean is about 3.3
    assert 0.7 < batch_shift.std() / monai_shift.std() < 1.4


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_output_keeps_the_inputs_device_and_dtype(dtype):
    images, masks = _batch(4, 32, dtype=dtype)
    cfg = dataclasses.replace(INTENSITY_ONLY, hflip=1.0, affine_p=1.0)
    out_img, out_mask = BatchAugment(cfg, 32)(images, masks, _gen(0))
    assert out_img.dtype == out_mask.dtype == dtype and out_img.device == images.device
    assert out_img.shape == images.shape and out_mask.shape == masks.shape


def test_bad_inputs_are_refused_with_the_shape_to_use():
    images, masks = _batch(2, 32)
    with pytest.raises(ValueError, match=r"\(N, C, 64, 64\)"):
        BatchAugment(OFF, 64)(images, masks, _gen(0))
    with pytest.raises(ValueError, match="masks"):
        BatchAugment(OFF, 32)(images, masks[:1], _gen(0))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_runs_on_cuda_with_a_cpu_generator():
    images, masks = (t.cuda() for t in _batch(16, 64))
    aug = BatchAugment(AugmentConfig(vflip=0.5), 64)
    a_img, a_mask = aug(images, masks, _gen(3))
    b_img, b_mask = aug(images, masks, _gen(3))
    assert a_img.device == a_mask.device == images.device
    assert torch.allclose(a_img, b_img, atol=1e-6) and torch.equal(a_mask, b_mask)  # cuDNN may pick its conv
    assert set(a_mask.unique().tolist()) <= {0.0, 1.0}
    _, cpu_mask = aug(images.cpu(), masks.cpu(), _gen(3))
    # the same parameters on either device (only the noise fields differ); nearest ties may round apart
    assert (cpu_mask != a_mask.cpu()).float().mean() < 1e-3
