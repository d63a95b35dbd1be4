import numpy as np
import pytest
import torch

from hemaseg.data.batch_augment import BatchAugment
from hemaseg.data.transforms import (
    AugmentConfig,
    augment,
    build_augmentation,
    letterbox,
    letterbox_geometry,
    normalize,
    preprocess,
    unletterbox,
)


@pytest.mark.parametrize("h,w", [(37, 91), (91, 37), (64, 64), (24, 200), (301, 123)])
def test_letterbox_round_trip_recovers_a_mask_on_the_original_grid(h, w):
    yy, xx = np.mgrid[:h, :w]
    mask = ((yy - h / 2) / (h / 3)) ** 2 + ((xx - w / 2) / (w / 3)) ** 2 < 1
    boxed_img, boxed_mask, box = letterbox(mask.astype(np.float32), 128, mask)
    assert boxed_img.shape == boxed_mask.shape == (128, 128)
    assert max(box.new_h, box.new_w) == 128 and abs(box.new_h / box.new_w - h / w) < 0.05 + 2 / min(box.new_h, box.new_w)
    back = unletterbox(boxed_mask, box) >= 0.5
    assert back.shape == (h, w)
    agreement = (back == mask).mean()
    assert agreement > 0.97


def test_letterbox_pads_with_zeros_and_keeps_content_centred():
    box = letterbox_geometry(50, 100, 64)
    assert (box.new_h, box.new_w, box.top, box.left) == (32, 64, 16, 0)
    img, _, _ = letterbox(np.ones((50, 100), np.float32), 64)
    assert img[:16].max() == 0 and img[48:].max() == 0 and img[16:48].min() > 0.99


@pytest.mark.parametrize("h,w", [(240, 480), (480, 240), (100, 100), (90, 400)])
def test_a_non_square_input_fits_the_scan_and_inverts_exactly(h, w):
    """Letterboxing into height x width: the scale is the one that fits both sides, the content is
    centred, padding only where the aspect ratios differ, and the way back lands on the original grid."""
    yy, xx = np.mgrid[:h, :w]
    mask = ((yy - h / 2) / (h / 3)) ** 2 + ((xx - w / 2) / (w / 3)) ** 2 < 1
    image, boxed_mask, box = letterbox(mask.astype(np.float32), (64, 128), mask)
    assert image.shape == boxed_mask.shape == (64, 128) and (box.height, box.width) == (64, 128)
    scale = min(64 / h, 128 / w)
    assert (box.new_h, box.new_w) == (min(64, round(h * scale)), min(128, round(w * scale)))
    assert (box.top, box.left) == ((64 - box.new_h) // 2, (128 - box.new_w) // 2)
    if h * 2 == w:  # a 2:1 scan fills a 2:1 input: no padding at all
        assert (box.top, box.left, box.new_h, box.new_w) == (0, 0, 64, 128)
    back = unletterbox(boxed_mask, box) >= 0.5
    assert back.shape == (h, w) and (back == mask).mean() > 0.97
    x, same = preprocess(mask.astype(np.float32), (64, 128))
    assert x.shape == (64, 128) and same == box


def test_zscore_uses_only_real_pixels():
    image = np.random.default_rng(0).random((40, 80)).astype(np.float32)
    x, box = preprocess(image, 64)
    region = x[box.top:box.top + box.new_h, box.left:box.left + box.new_w]
    assert abs(region.mean()) < 1e-4 and abs(region.std() - 1) < 1e-3
    assert normalize(np.full((4, 4), 0.5, np.float32), None, "unit").max() == 0


def _augment_copies(path: str, cfg: AugmentConfig, image: np.ndarray, mask: np.ndarray, seed: int, n: int):
    """n augmented copies of one (image, mask) pair as (n, 1, H, W) tensors: by the MONAI path, one pair
    per seed (seed, seed + 1, ...), or by the batch path (BatchAugment on the CPU), one call per batch."""
    size = image.shape[-1]
    if path == "monai":
        pipe = build_augmentation(cfg, size)
        pairs = [augment(pipe, image.copy(), mask.copy(), seed + i) for i in range(n)]
        return torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])
    images = torch.from_numpy(image)[None, None].repeat(n, 1, 1, 1)
    masks = torch.from_numpy(mask)[None, None].repeat(n, 1, 1, 1)
    return BatchAugment(cfg, size)(images, masks, torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("path", ["monai", "batch"])
def test_augmentation_moves_image_and_mask_together(path):
    """Augment a mask-shaped image: afterwards the image's bright pixels must still be the mask."""
    mask = np.zeros((64, 64), np.float32)
    mask[10:30, 20:50] = 1
    mask[40:55, 5:15] = 1
    cfg = AugmentConfig(hflip=0.5, vflip=0.5, affine_p=1.0, gamma_p=0, contrast_p=0, blur_p=0, noise_p=0, speckle_p=0)
    images, masks = _augment_copies(path, cfg, mask, mask, 0, 12)
    assert images.shape == masks.shape == (12, 1, 64, 64)
    moved = 0
    for i, (img_t, mask_t) in enumerate(zip(images, masks)):
        agree = ((img_t[0] > 0.5) == (mask_t[0] > 0.5)).float().mean().item()
        assert agree > 0.99, f"sample {i}: image and mask disagree on {1 - agree:.1%} of pixels"
        moved += not np.array_equal(mask_t[0].numpy(), mask)
    assert moved >= 10  # the geometric transforms really did something


@pytest.mark.parametrize("path", ["monai", "batch"])
def test_intensity_augmentation_leaves_the_mask_untouched_and_is_seeded(path):
    cfg = AugmentConfig(hflip=0, affine_p=0, gamma_p=1, contrast_p=1, blur_p=1, noise_p=1, speckle_p=1)
    image = np.random.default_rng(0).standard_normal((32, 32)).astype(np.float32)
    mask = (np.random.default_rng(1).random((32, 32)) > 0.7).astype(np.float32)
    a_img, a_mask = _augment_copies(path, cfg, image, mask, 7, 1)
    b_img, _ = _augment_copies(path, cfg, image, mask, 7, 1)
    c_img, _ = _augment_copies(path, cfg, image, mask, 8, 1)
    assert torch.equal(a_mask[0, 0], torch.from_numpy(mask))
    assert torch.equal(a_img, b_img) and not torch.equal(a_img, c_img)
    assert not torch.allclose(a_img[0, 0], torch.from_numpy(image))
