"""The one preprocessing path shared by train, evaluate, predict and serve, its exact inverse,
and the paired augmentation used in training.

Preprocessing letterboxes: the image is resized as large as fits the network input (a square, or
height x width fitted to the data's shape by the plan) with its aspect ratio kept, then padded (zeros,
like the black outside an ultrasound sector) to the input's shape.
`Letterbox` remembers the geometry so a prediction maps back to the original pixel grid exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from monai.transforms import (
    Compose,
    MapTransform,
    RandAdjustContrastd,
    RandAffined,
    RandFlipd,
    RandGaussianNoised,
    RandGaussianSmoothd,
    RandScaleIntensityd,
    RandomizableTransform,
)

from hemaseg.config import NORMALIZATIONS, AugmentConfig, input_hw


@dataclass(frozen=True)
class Letterbox:
    """Where the resized image sits inside the padded input (all in pixels)."""

    orig_h: int
    orig_w: int
    height: int  # the network input's shape
    width: int
    top: int
    left: int
    new_h: int
    new_w: int


def letterbox_geometry(orig_h: int, orig_w: int, size: int | tuple[int, int]) -> Letterbox:
    """`size`: a square side or (height, width)."""
    height, width = input_hw(size)
    scale = min(height / orig_h, width / orig_w)
    new_h = min(height, max(1, round(orig_h * scale)))
    new_w = min(width, max(1, round(orig_w * scale)))
    return Letterbox(orig_h, orig_w, height, width, (height - new_h) // 2, (width - new_w) // 2, new_h, new_w)


def _resize(x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Bilinear resize of (N, C, H, W); antialiased when shrinking so speckle does not alias."""
    if tuple(x.shape[-2:]) == (h, w):
        return x
    shrink = h < x.shape[-2] or w < x.shape[-1]
    return F.interpolate(x, size=(h, w), mode="bilinear", align_corners=False, antialias=shrink)


def letterbox(image: np.ndarray, size: int | tuple[int, int], mask: np.ndarray | None = None):
    """Resize (aspect kept) and pad an HxW image in [0, 1] (and optionally its bool mask) to the input's
    shape (`size`: a square side or (height, width)).

    Returns (image float32 height x width, mask float32 in {0, 1} of the same shape or None, Letterbox).
    """
    box = letterbox_geometry(image.shape[0], image.shape[1], size)
    out = np.zeros((box.height, box.width), np.float32)
    t = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))[None, None]
    out[box.top:box.top + box.new_h, box.left:box.left + box.new_w] = _resize(t, box.new_h, box.new_w)[0, 0].numpy()
    out_mask = None
    if mask is not None:
        out_mask = np.zeros((box.height, box.width), np.float32)
        m = torch.from_numpy(np.ascontiguousarray(mask, dtype=np.float32))[None, None]
        resized = _resize(m, box.new_h, box.new_w)[0, 0].numpy() >= 0.5
        out_mask[box.top:box.top + box.new_h, box.left:box.left + box.new_w] = resized
    return out, out_mask, box


def unletterbox(prob: torch.Tensor | np.ndarray, box: Letterbox) -> np.ndarray:
    """Map a network-input-shaped probability map back to the original HxW grid (crop the pad, resize back)."""
    p = torch.as_tensor(prob, dtype=torch.float32)
    p = p.reshape(1, 1, *p.shape[-2:])[..., box.top:box.top + box.new_h, box.left:box.left + box.new_w]
    return _resize(p, box.orig_h, box.orig_w)[0, 0].clamp_(0, 1).numpy()


def normalize(image: np.ndarray, box: Letterbox | None, method: str = "zscore") -> np.ndarray:
    """Intensity normalisation. `zscore` uses the statistics of the real (unpadded) pixels only, so
    the amount of padding does not shift the scan's intensities."""
    if method == "unit":
        return ((image - 0.5) / 0.25).astype(np.float32)
    if method != "zscore":
        raise ValueError(f"unknown normalization {method!r}; choose one of {', '.join(NORMALIZATIONS)}")
    region = image if box is None else image[box.top:box.top + box.new_h, box.left:box.left + box.new_w]
    mean, std = float(region.mean()), float(region.std())
    return ((image - mean) / max(std, 1e-6)).astype(np.float32)


def preprocess(image: np.ndarray, size: int | tuple[int, int], method: str = "zscore") -> tuple[np.ndarray, Letterbox]:
    """Image HxW in [0, 1] -> network input of `size` (normalised) and the geometry to undo it."""
    boxed, _, box = letterbox(image, size)
    return normalize(boxed, box, method), box


# --- augmentation -------------------------------------------------------------------------------


class RandSpeckled(RandomizableTransform, MapTransform):
    """Multiplicative noise x * (1 + s * n), n ~ N(0, 1): speckle-like, unlike MONAI's additive noise."""

    def __init__(self, keys, prob: float, std: float):
        MapTransform.__init__(self, keys)
        RandomizableTransform.__init__(self, prob)
        self.std = std

    def __call__(self, data):
        d = dict(data)
        self.randomize(None)
        if not self._do_transform:
            return d
        for key in self.keys:
            x = torch.as_tensor(d[key])
            noise = torch.from_numpy(self.R.standard_normal(x.shape).astype(np.float32))
            d[key] = x * (1 + self.std * noise)
        return d


def build_augmentation(cfg: AugmentConfig, size: int | tuple[int, int]) -> Compose:
    """MONAI dictionary transforms over {"image": (1, H, W), "mask": (1, H, W)} tensors of the input's
    shape (`size`: a square side or (height, width)); shifts are a fraction of each side.

    The images arrive z-scored; the gamma step needs non-negative input, which MONAI's
    RandAdjustContrast handles by rescaling to the input's own range and back.
    """
    both = ("image", "mask")
    height, width = input_hw(size)
    steps = []
    if cfg.hflip > 0:
        steps.append(RandFlipd(both, prob=cfg.hflip, spatial_axis=1))
    if cfg.vflip > 0:
        steps.append(RandFlipd(both, prob=cfg.vflip, spatial_axis=0))
    if cfg.affine_p > 0:
        steps.append(RandAffined(
            both, prob=cfg.affine_p, spatial_size=(height, width),
            rotate_range=np.deg2rad(cfg.rotate_deg), scale_range=(cfg.scale, cfg.scale),
            translate_range=(cfg.translate * height, cfg.translate * width),
            mode=("bilinear", "nearest"), padding_mode="zeros", cache_grid=True,  # fixed output size
        ))
    if cfg.gamma_p > 0:
        steps.append(RandAdjustContrastd("image", prob=cfg.gamma_p, gamma=cfg.gamma))
    if cfg.contrast_p > 0:
        steps.append(RandScaleIntensityd("image", factors=cfg.contrast, prob=cfg.contrast_p))
    if cfg.blur_p > 0:
        steps.append(RandGaussianSmoothd("image", sigma_x=(0.25, 1.0), sigma_y=(0.25, 1.0), prob=cfg.blur_p))
    if cfg.noise_p > 0:
        steps.append(RandGaussianNoised("image", prob=cfg.noise_p, std=cfg.noise_std))
    if cfg.speckle_p > 0:
        steps.append(RandSpeckled("image", prob=cfg.speckle_p, std=cfg.speckle_std))
    return Compose(steps)


def augment(pipeline: Compose, image: np.ndarray, mask: np.ndarray, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Apply the pipeline to one (image, mask) pair with its own seed, so a sample's augmentation
    depends only on (run seed, epoch, index): identical across workers and after a resume.

    All steps draw from one RandomState built from the seed: Compose.set_random_state would build one
    per step, which cost more than the augmentation itself (5.5 -> 3.3 ms per 256 px pair)."""
    state = np.random.RandomState(seed % (2**32))
    for step in pipeline.transforms:
        step.set_random_state(state=state)
    out = pipeline({"image": torch.from_numpy(image)[None], "mask": torch.from_numpy(mask)[None]})
    image_t = torch.as_tensor(out["image"]).as_subclass(torch.Tensor).float()
    mask_t = (torch.as_tensor(out["mask"]).as_subclass(torch.Tensor) > 0.5).float()
    return image_t, mask_t
