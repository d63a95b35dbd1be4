"""Paired augmentation of a whole batch on the batch's own device, in torch only.

The GPU twin of `build_augmentation` / `augment` in transforms.py: the same steps, in the same order,
with the same distributions, read from the same `AugmentConfig` (each step's MONAI counterpart is
named in its comment). It exists so a GPU does not wait for the CPU loader to augment pair by pair.

Randomness: every per-sample parameter (whether a step fires, angle, scales, gamma, sigmas, noise std)
is drawn from the caller's CPU `torch.Generator`, so the parameters do not depend on the device and
deciding which samples a step touches needs no device-to-host sync. The noise fields, the only big
random draws, are drawn on the batch's device from a generator seeded by one more draw from the same
CPU generator. The same generator state gives a bit-identical result on the CPU (on CUDA too, up to
cuDNN's choice of convolution algorithm for the blur); the noise fields, not the parameters, differ
between CPU and CUDA, whose generators are different algorithms.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from hemaseg.config import AugmentConfig, input_hw

# Columns of the (N, _N_DRAWS) table of uniform draws made per call, one row per sample.
(_HFLIP, _VFLIP, _AFFINE, _ANGLE, _SCALE_Y, _SCALE_X, _SHIFT_Y, _SHIFT_X, _GAMMA, _GAMMA_VALUE,
 _CONTRAST, _FACTOR, _BLUR, _SIGMA_Y, _SIGMA_X, _NOISE, _NOISE_STD, _SPECKLE) = range(18)
_N_DRAWS = _SPECKLE + 1

BLUR_SIGMA = (0.25, 1.0)  # pixels, each axis drawn separately (RandGaussianSmoothd's sigma_x/sigma_y)
_BLUR_TRUNCATE = 4.0  # MONAI's GaussianFilter default: the kernel spans +-int(4 sigma + 0.5) pixels
_BLUR_RADIUS = int(_BLUR_TRUNCATE * BLUR_SIGMA[1] + 0.5)


class BatchAugment:
    """Augment (image, mask) batches with the meaning of `build_augmentation(cfg, size)`.

    Geometric steps (flips, affine) move image and mask together; intensity steps touch the image
    only. Each sample draws its own parameters, as the per-pair MONAI path does.
    """

    def __init__(self, cfg: AugmentConfig, size: int | tuple[int, int]):
        self.cfg = cfg
        self.hw = input_hw(size)  # the batches' (height, width)

    def __call__(
        self, images: torch.Tensor, masks: torch.Tensor, generator: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """images (N, C, H, W) floating (z-scored), masks (N, K, H, W) floating in {0, 1}
        (K = 1 for the lesion mask), both on one device; `generator` is a CPU generator (see the module docstring).

        Returns (images, masks) of the same shape, dtype and device. The inputs are never written to
        (a tensor no step touched comes back as it is); the masks stay exactly in {0, 1}, as they are
        only flipped and nearest-resampled."""
        self._check(images, masks, generator)
        cfg, n, dev = self.cfg, images.shape[0], images.device
        u = torch.rand(n, _N_DRAWS, generator=generator, dtype=torch.float64)  # (N, 18) in [0, 1)
        noise_seed = int(torch.randint(2**62, (), generator=generator))

        def fires(col: int, p: float) -> torch.Tensor:  # (N,) bool on the CPU
            return u[:, col] < p

        def span(col: int, lo: float, hi: float) -> torch.Tensor:  # (N,) float64, U(lo, hi)
            return lo + (hi - lo) * u[:, col]

        # RandFlipd(spatial_axis=1), then RandFlipd(spatial_axis=0): one draw moves image and mask.
        for which, dim in ((fires(_HFLIP, cfg.hflip), -1), (fires(_VFLIP, cfg.vflip), -2)):
            if which.any():
                keep = which.to(dev).view(-1, 1, 1, 1)
                images = torch.where(keep, images.flip(dim), images)
                masks = torch.where(keep, masks.flip(dim), masks)

        # RandAffined(rotate_range=r, scale_range=(s, s), translate_range=(t * H, t * W)):
        # one angle U(-r, r); each axis's scale 1 + U(-s, s) and shift U(-t * side, t * side) px apart.
        which = fires(_AFFINE, cfg.affine_p)
        if which.any():
            r, s = math.radians(cfg.rotate_deg), cfg.scale
            ty, tx = (cfg.translate * side for side in self.hw)
            angle = span(_ANGLE, -r, r)
            scale = torch.stack([span(_SCALE_Y, 1 - s, 1 + s), span(_SCALE_X, 1 - s, 1 + s)], 1)  # (N, 2)
            shift = torch.stack([span(_SHIFT_Y, -ty, ty), span(_SHIFT_X, -tx, tx)], 1)  # (N, 2) pixels
            idx = which.nonzero().squeeze(1)
            grid = affine_grid(angle[idx], scale[idx], shift[idx], images.shape[-2:], images)
            images = _put(images, idx, warp(_take(images, idx), grid, "bilinear"))
            masks = _put(masks, idx, warp(_take(masks, idx), grid.to(masks.dtype), "nearest"))

        # RandAdjustContrastd: gamma on the image rescaled to [0, 1] by its own min and max, and back.
        which = fires(_GAMMA, cfg.gamma_p)
        if which.any():
            idx = which.nonzero().squeeze(1)
            gamma = span(_GAMMA_VALUE, min(cfg.gamma), max(cfg.gamma))[idx]
            images = _put(images, idx, adjust_gamma(_take(images, idx), _per_sample(gamma, images)))

        # RandScaleIntensityd(factors=c): x * (1 + f), f ~ U(-c, c). A factor of 0 is exact, so all go.
        which = fires(_CONTRAST, cfg.contrast_p)
        if which.any():
            factor = torch.where(which, span(_FACTOR, -cfg.contrast, cfg.contrast), 0.0)
            images = images * (1 + _per_sample(factor, images))

        # RandGaussianSmoothd(sigma_x=(0.25, 1), sigma_y=(0.25, 1)): separable, zero padded as in MONAI.
        which = fires(_BLUR, cfg.blur_p)
        if which.any():
            idx = which.nonzero().squeeze(1)
            sigma = torch.stack([span(_SIGMA_Y, *BLUR_SIGMA), span(_SIGMA_X, *BLUR_SIGMA)], 1)[idx]
            images = _put(images, idx, gaussian_blur(_take(images, idx), sigma))

        # The noise fields: drawn on the device, for the samples that fire only, in a fixed order.
        noise_gen = torch.Generator(device=dev)
        noise_gen.manual_seed(noise_seed)

        # RandGaussianNoised(std=sd): x + N(0, std^2), std ~ U(0, sd) (MONAI's sample_std=True default).
        which = fires(_NOISE, cfg.noise_p)
        if which.any():
            idx = which.nonzero().squeeze(1)
            std = _per_sample(span(_NOISE_STD, 0.0, cfg.noise_std)[idx], images)
            x = _take(images, idx)
            images = _put(images, idx, x + std * _randn_like(x, noise_gen))

        # RandSpeckled (transforms.py): x * (1 + sd * n), n ~ N(0, 1).
        which = fires(_SPECKLE, cfg.speckle_p)
        if which.any():
            idx = which.nonzero().squeeze(1)
            x = _take(images, idx)
            images = _put(images, idx, x * (1 + cfg.speckle_std * _randn_like(x, noise_gen)))
        return images, masks

    def _check(self, images: torch.Tensor, masks: torch.Tensor, generator: torch.Generator) -> None:
        h, w = want = self.hw
        if images.ndim != 4 or tuple(images.shape[-2:]) != want:
            raise ValueError(f"images must be (N, C, {h}, {w}), got {tuple(images.shape)}")
        if masks.ndim != 4 or masks.shape[0] != images.shape[0] or tuple(masks.shape[-2:]) != want:
            raise ValueError(f"masks must be (N, K, {h}, {w}) with N = {images.shape[0]}, "
                             f"got {tuple(masks.shape)}")
        if not (images.is_floating_point() and masks.is_floating_point()):
            raise TypeError(f"images and masks must be floating point, got {images.dtype} and {masks.dtype}")
        if masks.device != images.device:
            raise ValueError(f"images are on {images.device} but masks on {masks.device}; move both to one")
        if generator.device.type != "cpu":
            raise ValueError(f"the generator must be a CPU generator (torch.Generator()), got one on "
                             f"{generator.device}; the noise fields are still drawn on the batch's device")


def affine_grid(
    angle: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, hw: tuple[int, int] | torch.Size,
    like: torch.Tensor,
) -> torch.Tensor:
    """Sampling grid (n, H, W, 2) for `F.grid_sample(align_corners=False)`, MONAI's Affine convention.

    angle (n,) radians, scale (n, 2) and shift (n, 2) pixels, both in (row, column) order. As in MONAI
    (rotate @ translate @ scale, backward mapping about the image centre), output pixel p (rows and
    columns measured from the centre) samples the input at rot(angle) @ (scale * p + shift). With
    align_corners=False the normalised coordinate of pixel i is (2i + 1) / W - 1, MONAI's pixel-centre
    convention, so a zero transform samples the pixel centres. Built in float64 on the CPU, then cast
    to `like`'s dtype and device."""
    h, w = hw
    cos, sin = torch.cos(angle), torch.sin(angle)
    # MONAI's matrix on (row, col): [[cos, -sin], [sin, cos]] @ diag(scale), offset rot @ shift.
    a00, a01 = cos * scale[:, 0], -sin * scale[:, 1]
    a10, a11 = sin * scale[:, 0], cos * scale[:, 1]
    b0 = cos * shift[:, 0] - sin * shift[:, 1]
    b1 = sin * shift[:, 0] + cos * shift[:, 1]
    # theta works on normalised (x = col, y = row): swap the axes and rescale pixels to [-1, 1].
    theta = torch.stack([
        torch.stack([a11, a10 * h / w, 2 * b1 / w], 1),
        torch.stack([a01 * w / h, a00, 2 * b0 / h], 1),
    ], 1)  # (n, 2, 3)
    theta = theta.to(device=like.device, dtype=like.dtype)
    return F.affine_grid(theta, [theta.shape[0], 1, h, w], align_corners=False)


def warp(x: torch.Tensor, grid: torch.Tensor, mode: str) -> torch.Tensor:
    """Resample x (n, C, H, W) at `grid` (n, H, W, 2) from `affine_grid`; zeros outside, like MONAI's
    padding_mode="zeros"."""
    return F.grid_sample(x, grid, mode=mode, padding_mode="zeros", align_corners=False)


def adjust_gamma(x: torch.Tensor, gamma: torch.Tensor) -> torch.Tensor:
    """MONAI's AdjustContrast per sample: ((x - min) / (range + 1e-7)) ** gamma * range + min, with min
    and range over each sample's (C, H, W); x (n, C, H, W), gamma broadcastable (n, 1, 1, 1). A constant
    image stays as it is."""
    lo = x.amin(dim=(1, 2, 3), keepdim=True)
    span = x.amax(dim=(1, 2, 3), keepdim=True) - lo
    return ((x - lo) / (span + 1e-7)) ** gamma * span + lo


def gaussian_kernels(sigma: torch.Tensor, radius: int = _BLUR_RADIUS) -> torch.Tensor:
    """MONAI's gaussian_1d(approx="erf", truncated=4, not normalised) for each sigma (n,), as (n, 2r + 1)
    taps over -r..r; taps beyond a sigma's own tail int(4 sigma + 0.5) are 0, as MONAI's shorter kernel."""
    x = torch.arange(-radius, radius + 1, dtype=sigma.dtype, device=sigma.device)  # (2r + 1,)
    t = (0.70710678 / sigma.abs())[:, None]
    taps = (0.5 * (torch.erf(t * (x + 0.5)) - torch.erf(t * (x - 0.5)))).clamp(min=0)
    tail = (torch.clamp(sigma * _BLUR_TRUNCATE, min=0.5) + 0.5).floor()[:, None]
    return torch.where(x.abs() <= tail, taps, 0.0)


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Separable Gaussian blur of x (n, C, H, W), each sample with its own sigma (n, 2) pixels in (row,
    column) order; zero padding, as MONAI's GaussianFilter. One grouped convolution per axis."""
    n, c, h, w = x.shape
    k = gaussian_kernels(sigma.reshape(-1).to(torch.float64)).to(device=x.device, dtype=x.dtype)  # (2n, 2r + 1)
    k = k.view(n, 2, -1).repeat_interleave(c, dim=0)  # (n * C, 2, 2r + 1): every channel its sample's
    r = _BLUR_RADIUS
    y = x.reshape(1, n * c, h, w)
    y = F.conv2d(y, k[:, 0].reshape(n * c, 1, -1, 1), padding=(r, 0), groups=n * c)  # along rows
    y = F.conv2d(y, k[:, 1].reshape(n * c, 1, 1, -1), padding=(0, r), groups=n * c)  # along columns
    return y.reshape(n, c, h, w)


def _take(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """The samples idx (CPU long (k,)) of x; x itself when that is every sample."""
    return x if idx.numel() == x.shape[0] else x.index_select(0, idx.to(x.device))


def _put(x: torch.Tensor, idx: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """A copy of x with the samples idx replaced by values (x is never written in place)."""
    return values if idx.numel() == x.shape[0] else x.index_copy(0, idx.to(x.device), values)


def _per_sample(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(n,) CPU parameters -> (n, 1, 1, 1) in like's dtype and device, to broadcast over a sample."""
    return v.to(device=like.device, dtype=like.dtype).view(-1, 1, 1, 1)


def _randn_like(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    return torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
