"""Synthetic B-mode ultrasound scans of skin, fat and muscle with known lesions.

The built-in dataset for the demo and the tests. The images are made the way a scanner makes them, so a
model that learns on them has to cope with speckle, not with blobs in Gaussian noise:

1. a tissue model in beam coordinates (rows = depth along a beam, columns = beams): backscatter amplitude,
   specular (coherent) reflectors and attenuation for skin, fat with septa, muscle with fibres, fascia,
   sometimes bone, and lobulated lesions with vascular channels;
2. random sub-resolution scatterers (a complex Gaussian per pixel is the sum of many scatterers per cell)
   scaled by that amplitude, convolved with the point-spread function, envelope-detected;
3. round-trip attenuation (so lesions enhance or shadow what lies below them), partial time-gain
   compensation, log compression to 8 bits over a dynamic range;
4. for curvilinear probes, scan conversion of the beams into a sector; outside it is black.

The point-spread function is a Gaussian-windowed cosine axially and a Gaussian laterally. It is applied in
complex baseband: |h * s| with h = g(z) exp(ikz) equals |g * (s exp(-ikz))|, and for scatterers with random
phase s exp(-ikz) has the same law as s, so the speckle only needs real Gaussian filters; the carrier is
kept for the coherent reflectors, where it matters (a thick uniform layer echoes only at its edges).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, fields
from functools import lru_cache
from pathlib import Path

import numpy as np
from scipy import ndimage
from tqdm import tqdm

from hemaseg.io import save_png

log = logging.getLogger(__name__)

_NEPER_DB = 20.0 / math.log(10.0)  # dB per neper of amplitude
_REF_SIZE = 256.0  # sizes in pixels below are for a 256-pixel scan and scale with the scan


def _as_range(name: str, value: float | tuple[float, float]) -> tuple[float, float]:
    lo, hi = (value, value) if np.isscalar(value) else tuple(value)
    if not lo <= hi:
        raise ValueError(f"SynthConfig.{name}={value!r}: need low <= high (or one number for a fixed value)")
    return float(lo), float(hi)


@dataclass(frozen=True)
class SynthConfig:
    """Knobs of the generator; (low, high) pairs are drawn uniformly per scan, one number fixes the value."""

    p_empty: float = 0.15  # share of scans with no lesion
    max_lesions: int = 2
    p_extra_lesion: float = 0.3  # chance of each lesion after the first, up to max_lesions
    lesion_radius: tuple[float, float] = (0.04, 0.30)  # fraction of image width, drawn log-uniformly
    # chance of a hypo-, iso- or hyperechoic lesion (iso lesions differ in texture and margin, not mean)
    echogenicity_weights: tuple[float, float, float] = (0.5, 0.2, 0.3)
    # chance of no posterior effect, posterior acoustic enhancement, or shadowing
    posterior_weights: tuple[float, float, float] = (0.35, 0.45, 0.2)
    p_ill_defined: float = 0.4  # blurred echogenicity transition at the margin
    p_vessels: float = 0.6  # internal anechoic vascular channels, as in infantile hemangioma
    p_sector: float = 0.25  # curvilinear probe: sector field of view
    p_bone: float = 0.15  # a bright bone surface with a shadow, deep in the scan
    dynamic_range_db: float | tuple[float, float] = (50.0, 60.0)
    attenuation_db: float | tuple[float, float] = (25.0, 45.0)  # round trip over the full depth
    tgc_fraction: float | tuple[float, float] = (0.6, 0.9)  # share of the attenuation the TGC undoes
    psf_sigma: tuple[float, float] = (1.2, 2.4)  # axial, lateral Gaussian sigma in pixels at 256 px
    wavelength: float = 2.5  # axial wavelength of the pulse in pixels at 256 px

    def __post_init__(self) -> None:
        for name in ("dynamic_range_db", "attenuation_db", "tgc_fraction", "lesion_radius"):
            object.__setattr__(self, name, _as_range(name, getattr(self, name)))
        for f in fields(self):
            if f.name.startswith("p_") and not 0.0 <= getattr(self, f.name) <= 1.0:
                raise ValueError(f"SynthConfig.{f.name}={getattr(self, f.name)} must be in [0, 1]")
        if self.max_lesions < 0:
            raise ValueError(f"SynthConfig.max_lesions={self.max_lesions} must be >= 0")
        for name in ("echogenicity_weights", "posterior_weights"):
            w = getattr(self, name)
            if len(w) != 3 or min(w) < 0 or sum(w) <= 0:
                raise ValueError(f"SynthConfig.{name}={w!r} must be three non-negative weights, not all 0")
        if not (0 < self.lesion_radius[0] and self.lesion_radius[1] <= 0.5):
            raise ValueError(f"SynthConfig.lesion_radius={self.lesion_radius} must lie in (0, 0.5]")
        if self.dynamic_range_db[0] <= 0:
            raise ValueError(f"SynthConfig.dynamic_range_db={self.dynamic_range_db} must be > 0")
        if min(self.psf_sigma) <= 0 or self.wavelength <= 0:
            raise ValueError("SynthConfig.psf_sigma and SynthConfig.wavelength must be > 0")


# ---------------------------------------------------------------------------------------------- noise


@lru_cache(maxsize=1024)
def _interp_bands(n: int, cell: float) -> tuple[np.ndarray, tuple[tuple[int, int], ...]]:
    """(n, knots) Gaussian interpolation weights from knots every `cell` px, cut at 3 sigma, rows of unit
    norm so the field has unit variance; plus the row span each knot touches."""
    knots = (np.arange(int(np.ceil(n / cell)) + 5) - 2.0) * cell
    offset = (np.arange(n)[:, None] - knots[None, :]) / (0.75 * cell)
    w = np.where(np.abs(offset) <= 3.0, np.exp(-0.5 * offset**2), 0.0)
    w /= np.sqrt((w**2).sum(axis=1, keepdims=True))
    nonzero = w > 0
    spans = tuple(
        (int(col.argmax()), int(n - col[::-1].argmax())) if col.any() else (0, 0) for col in nonzero.T
    )
    return w.astype(np.float32), spans


def _smooth_noise(
    rng: np.random.Generator, shape: tuple[int, int], cell: float | tuple[float, float]
) -> np.ndarray:
    """Smooth Gaussian random field (H, W), unit variance, correlation length ~cell px (or (cy, cx)).

    Interpolates random knots with banded Gaussian weights, looping over knots, not pixels: a dense
    matmul would be as cheap in flops but hands the work to a multithreaded BLAS, which on a shared,
    CPU-limited machine is often 100x slower than this.
    """
    cy, cx = (cell, cell) if np.isscalar(cell) else cell
    wy, spans_y = _interp_bands(shape[0], max(round(float(cy), 1), 1.0))
    wx, spans_x = _interp_bands(shape[1], max(round(float(cx), 1), 1.0))
    z = rng.standard_normal((wx.shape[1], wy.shape[1]), dtype=np.float32)
    cols = np.zeros((shape[1], wy.shape[1]), dtype=np.float32)  # knots interpolated along x
    for j, (lo, hi) in enumerate(spans_x):
        if hi > lo:
            cols[lo:hi] += wx[lo:hi, j, None] * z[j]
    out = np.zeros(shape, dtype=np.float32)
    for j, (lo, hi) in enumerate(spans_y):  # contiguous row blocks of the output
        if hi > lo:
            out[lo:hi] += wy[lo:hi, j, None] * cols[:, j]
    return out


def _wavy(rng: np.random.Generator, n: int, mean: float, amp: float, cell: float) -> np.ndarray:
    """A gently wavy boundary depth per beam, in pixels, (n,)."""
    w, _ = _interp_bands(n, max(round(cell, 1), 1.0))
    z = rng.standard_normal(w.shape[1], dtype=np.float32)
    return (mean + amp * (w * z).sum(axis=1)).astype(np.float32)


def _step(depth: np.ndarray, boundary: np.ndarray) -> np.ndarray:
    """0 above a per-beam boundary, 1 below, a one-pixel ramp between (no staircase aliasing)."""
    return np.clip(depth - boundary[None, :] + 0.5, 0.0, 1.0)


def _add_line(target: np.ndarray, boundary: np.ndarray, width: float, amp: float) -> None:
    """Adds a bright line of Gaussian profile along a per-beam boundary, touching only the rows near it."""
    lo = max(int(boundary.min() - 4 * width), 0)
    hi = min(int(boundary.max() + 4 * width) + 2, target.shape[0])
    if hi > lo:
        depth = np.arange(lo, hi, dtype=np.float32)[:, None]
        target[lo:hi] += amp * np.exp(-0.5 * ((depth - boundary[None, :]) / width) ** 2)


# ------------------------------------------------------------------------------------------- geometry


@dataclass(frozen=True)
class _Geometry:
    """Where the beams lie in the output image: linear (beams = columns) or a curvilinear sector."""

    height: int  # output image
    width: int
    n_depth: int  # beam samples
    n_beams: int
    radius: float = 0.0  # probe radius in px; 0 for a linear probe
    half_angle: float = 0.0

    @property
    def sector(self) -> bool:
        return self.radius > 0

    def beam_xy(self) -> tuple[np.ndarray, np.ndarray]:
        """Image coordinates (x, y) of every beam sample, each (n_depth, n_beams)."""
        d = np.arange(self.n_depth, dtype=np.float32)[:, None]
        b = np.arange(self.n_beams, dtype=np.float32)[None, :]
        shape = (self.n_depth, self.n_beams)
        if not self.sector:
            return np.broadcast_to(b, shape), np.broadcast_to(d, shape)
        theta = (b / (self.n_beams - 1) * 2.0 - 1.0) * self.half_angle
        r = self.radius + d
        x = (self.width - 1) / 2.0 + r * np.sin(theta)
        y = r * np.cos(theta) - self.radius * np.cos(self.half_angle)
        return x.astype(np.float32), y.astype(np.float32)

    def image_to_beam(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(depth, beam) sample coordinates of every image pixel and the in-sector mask, each (H, W)."""
        y, x = np.mgrid[0 : self.height, 0 : self.width].astype(np.float32)
        dx = x - (self.width - 1) / 2.0
        dy = y + self.radius * math.cos(self.half_angle)
        depth = np.sqrt(dx * dx + dy * dy) - self.radius
        theta = np.arctan2(dx, dy)
        beam = (theta / self.half_angle + 1.0) / 2.0 * (self.n_beams - 1)
        inside = (depth >= 0) & (depth <= self.n_depth - 1) & (np.abs(theta) <= self.half_angle)
        return depth, beam, inside


def _geometry(rng: np.random.Generator, height: int, width: int, cfg: SynthConfig) -> _Geometry:
    if rng.random() >= cfg.p_sector:
        return _Geometry(height, width, height, width)
    radius = rng.uniform(0.5, 1.5) * height
    # the top corners touch y=0, the bottom of the centre beam touches y=H-1, the widest arc fits in W
    half = min(np.arcsin(min((width / 2.0 - 1.0) / (radius + height), 1.0)), np.radians(38.0))
    n_depth = int(height - radius * (1.0 - np.cos(half)))
    half = min(np.arcsin(min((width / 2.0 - 1.0) / (radius + n_depth - 1.0), 1.0)), np.radians(38.0))
    n_beams = max(int(round(2.0 * half * (radius + n_depth / 2.0))), 16)
    return _Geometry(height, width, n_depth, n_beams, float(radius), float(half))


# --------------------------------------------------------------------------------------------- tissue


@dataclass
class _Tissue:
    """Acoustic maps in beam coordinates, each (n_depth, n_beams)."""

    echo: np.ndarray  # backscatter amplitude of the diffuse scatterers
    coherent: np.ndarray  # amplitude of specular reflectors (interfaces, septa)
    attenuation: np.ndarray  # round-trip amplitude attenuation, nepers per pixel of depth
    density: np.ndarray | None  # scatterers per pixel relative to fully developed speckle; None = 1
    skin: np.ndarray  # depth of the skin surface per beam
    fat: np.ndarray  # depth of the fat/muscle fascia per beam
    floor: float  # deepest depth lesions may reach (bone, or the bottom)


def _tissue(rng: np.random.Generator, geo: _Geometry, scale: float, alpha0: float, p_bone: float) -> _Tissue:
    """Skin, subcutaneous fat with septa, muscle with fibres, fascia and sometimes bone."""
    nd, nb = geo.n_depth, geo.n_beams
    depth = np.arange(nd, dtype=np.float32)[:, None]

    standoff = rng.uniform(0.0, 0.05) * nd if rng.random() < 0.5 else rng.uniform(0.0, 0.01) * nd
    skin = _wavy(rng, nb, standoff + 1.0, 0.004 * nd, 0.3 * nb)
    dermis = skin + _wavy(rng, nb, rng.uniform(0.04, 0.08) * nd, 0.008 * nd, 0.15 * nb)
    fat = dermis + np.maximum(_wavy(rng, nb, rng.uniform(0.12, 0.35) * nd, 0.025 * nd, 0.2 * nb), 0.04 * nd)
    deep = fat + _wavy(rng, nb, rng.uniform(0.25, 0.5) * nd, 0.03 * nd, 0.25 * nb)
    has_deep = rng.random() < 0.6
    bone = _wavy(rng, nb, rng.uniform(0.72, 0.92) * nd, 0.04 * nd, 0.35 * nb)
    has_bone = rng.random() < p_bone and bone.min() > fat.max() + 0.1 * nd

    below_skin, below_dermis, below_fat = _step(depth, skin), _step(depth, dermis), _step(depth, fat)
    # fat rows lie above f1, muscle rows below m0: each texture is only made where it can show
    f1, m0 = min(int(fat.max()) + 3, nd), max(int(fat.min()) - 2, 0)

    # slow variations of brightness; the layers are disjoint, so one field serves all three
    patches = _smooth_noise(rng, (nd, nb), 10.0 * scale)
    # fat: hypoechoic lobules between thin echogenic septa (zero crossings of a flat random field)
    septa_field = _smooth_noise(rng, (f1, nb), (0.05 * nd, rng.uniform(0.12, 0.3) * nb))
    septa = np.exp(-((septa_field / rng.uniform(0.06, 0.12)) ** 2))
    layers = np.zeros((nd, nb), dtype=np.float32)
    layers[:f1] = rng.uniform(0.035, 0.07) * (1.0 + 0.4 * patches[:f1] ** 2) + rng.uniform(0.4, 0.8) * septa
    # muscle: hypoechoic fascicles between bright perimysium striations, long, slightly oblique and
    # irregularly spaced: zero crossings of a field stretched along the fibres, sheared to the pennation
    slope = math.tan(rng.uniform(-0.3, 0.3))
    shift = np.round(slope * (np.arange(nb) - nb / 2.0)).astype(np.intp)
    shift -= shift.min()
    fibre_cell = (rng.uniform(4.0, 7.0) * scale, 0.35 * nb)
    fibre_field = _smooth_noise(rng, (nd - m0 + int(shift.max()), nb), fibre_cell)
    fibre_field = np.take_along_axis(fibre_field, np.arange(nd - m0)[:, None] + shift[None, :], axis=0)
    dashes = np.clip(0.6 + 0.6 * _smooth_noise(rng, (nd - m0, nb), (3.0 * scale, 0.1 * nb)), 0.0, 1.0)
    muscle = rng.uniform(0.1, 0.18) * np.exp(0.3 * patches[m0:])
    muscle += rng.uniform(0.6, 1.0) * np.exp(-((fibre_field / rng.uniform(0.12, 0.2)) ** 2)) * dashes
    layers[m0:] += below_fat[m0:] * (muscle - layers[m0:])
    # dermis: bright, heterogeneous
    dermis_echo = rng.uniform(0.7, 1.0) * np.exp(0.3 * patches)
    echo = below_skin * dermis_echo + below_dermis * (layers - dermis_echo)

    coherent = np.zeros((nd, nb), dtype=np.float32)
    coherent[:f1] = 0.25 * (below_dermis[:f1] - below_fat[:f1]) * septa  # septa are partly specular
    _add_line(coherent, skin, 0.6, 1.2)  # entry echo of the skin surface
    _add_line(coherent, fat, 0.8, 0.8)  # superficial fascia
    _add_line(echo, fat, 1.0, 0.6)
    _add_line(echo, dermis, 1.5, 0.3)
    attenuation = alpha0 * (below_skin * (1.0 + 0.2 * (1 - below_dermis) - 0.2 * (below_dermis - below_fat)))
    if has_deep:
        _add_line(coherent, deep, 0.8, 0.6)
        _add_line(echo, deep, 1.2, 0.5)
    floor = float(nd)
    if has_bone:
        under = _step(depth, bone)
        echo *= 1 - under
        _add_line(coherent, bone, 1.0, 2.0)
        _add_line(echo, bone, 1.5, 1.5)
        attenuation += 0.8 * under  # nothing gets through bone
        floor = float(bone.min()) - 2.0
    return _Tissue(echo, coherent, attenuation, None, skin, fat, floor)


# -------------------------------------------------------------------------------------------- lesions


@dataclass(frozen=True)
class _Lesion:
    x: float  # centre in image pixels
    y: float
    a: float  # semi-axes in px before lobulation
    b: float
    angle: float
    harmonics: tuple[tuple[int, float, float], ...]  # (k, amplitude, phase) of the radius

    def extent(self) -> float:
        return max(self.a, self.b) * (1.0 + sum(c for _, c, _ in self.harmonics)) + 2.0

    def level(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """Normalised radius: < 1 inside the lesion, 1 on its boundary."""
        dx, dy = x - self.x, y - self.y
        cos, sin = math.cos(self.angle), math.sin(self.angle)
        u, v = (dx * cos + dy * sin) / self.a, (dy * cos - dx * sin) / self.b
        theta = np.arctan2(v, u)
        radius = 1.0
        for k, c, phi in self.harmonics:
            radius = radius + c * np.cos(k * theta + phi)
        return np.sqrt(u * u + v * v) / radius


def _crop(x: np.ndarray, y: np.ndarray, lesion: _Lesion) -> tuple[slice, slice] | None:
    """The bounding box of the lesion (plus margin) in a grid of coordinates, None if it is not there."""
    r = lesion.extent() * 1.3
    near = (np.abs(x - lesion.x) <= r) & (np.abs(y - lesion.y) <= r)
    rows, cols = np.flatnonzero(near.any(axis=1)), np.flatnonzero(near.any(axis=0))
    if rows.size == 0 or cols.size == 0:
        return None
    return slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1)


def _place_lesions(
    rng: np.random.Generator, geo: _Geometry, tissue: _Tissue, cfg: SynthConfig
) -> list[_Lesion]:
    """0..max_lesions lobulated lesions, mostly in the fat and muscle, not overlapping."""
    if cfg.max_lesions == 0 or rng.random() < cfg.p_empty:
        return []
    n = 1
    while n < cfg.max_lesions and rng.random() < cfg.p_extra_lesion:
        n += 1
    bx, by = geo.beam_xy()
    lesions: list[_Lesion] = []
    for _ in range(n):
        for _attempt in range(6):
            lo, hi = cfg.lesion_radius
            r = float(np.exp(rng.uniform(np.log(lo), np.log(hi)))) * geo.width
            aspect = rng.uniform(1.0, 2.2)  # hemangiomas spread along the skin more than into depth
            a, b = r * math.sqrt(aspect), r / math.sqrt(aspect)
            angle = float(np.clip(rng.normal(0.0, 0.2), -0.5, 0.5))
            ks = np.arange(2, 8)
            amps = rng.uniform(0.0, 1.0, ks.size) * rng.uniform(0.05, 0.25) / ks**0.7
            amps *= min(1.0, 0.35 / amps.sum())  # stays star-shaped: the radius never folds over
            phases = rng.uniform(0.0, 2.0 * math.pi, ks.size)
            harmonics = tuple((int(k), float(c), float(p)) for k, c, p in zip(ks, amps, phases, strict=True))
            lobes = 1.0 + float(amps.sum())
            # vertical half-extent in beam samples; shrink the lesion if the tissue is too thin for it
            beam = int(rng.uniform(0.12, 0.88) * (geo.n_beams - 1))
            top, floor = float(tissue.skin[beam]) + 2.0, min(tissue.floor, geo.n_depth - 2.0)
            half = math.hypot(a * math.sin(angle), b * math.cos(angle)) * lobes
            shrink = min(1.0, 0.5 * (floor - top) / half)
            a, b, half = a * shrink, b * shrink, half * shrink
            superficial = rng.random() < 0.6
            lo_d = top + half if superficial else max(float(tissue.fat[beam]), top + half)
            hi_d = float(tissue.fat[beam]) + (0.3 * half if superficial else 0.6 * (floor - tissue.fat[beam]))
            hi_d = min(hi_d, floor - half)
            d = rng.uniform(lo_d, max(lo_d, hi_d))
            d = int(np.clip(d, 0, geo.n_depth - 1))
            lesion = _Lesion(float(bx[d, beam]), float(by[d, beam]), float(a), float(b), angle, harmonics)
            clear = (
                math.hypot(lesion.x - o.x, lesion.y - o.y) > lesion.extent() + o.extent() for o in lesions
            )
            if all(clear):
                lesions.append(lesion)
                break
    return lesions


def _draw_lesion(
    rng: np.random.Generator,
    tissue: _Tissue,
    xy: tuple[np.ndarray, np.ndarray],
    lesion: _Lesion,
    cfg: SynthConfig,
    scale: float,
    alpha0: float,
) -> None:
    """Writes a lesion into the tissue maps: echogenicity, texture, margin, channels, attenuation."""
    bx, by = xy
    box = _crop(bx, by, lesion)
    kind = rng.choice(3, p=np.asarray(cfg.echogenicity_weights) / sum(cfg.echogenicity_weights))
    posterior = rng.choice(3, p=np.asarray(cfg.posterior_weights) / sum(cfg.posterior_weights))
    ill_defined = kind != 1 and rng.random() < cfg.p_ill_defined  # an iso lesion needs its margin
    vessels = rng.random() < cfg.p_vessels
    if box is None:
        return
    s = lesion.level(bx[box], by[box])
    shape = s.shape
    r_px = float(np.sqrt(lesion.a * lesion.b))
    echo, coherent = tissue.echo[box], tissue.coherent[box]
    ref = float(np.median(echo[s < 1])) if (s < 1).any() else float(np.median(echo))

    if ill_defined:  # a blurred, irregular transition; the mask stays the thresholded shape
        width = rng.uniform(0.15, 0.4)
        s_edge = s + 0.12 * _smooth_noise(rng, shape, max(2.0, r_px / 3))
        w = np.clip((1.0 - s_edge) / width + 0.5, 0.0, 1.0)
        w = w * w * (3 - 2 * w)
    else:
        w = np.clip((1.0 - s) * r_px + 0.5, 0.0, 1.0)

    heterogeneity = _smooth_noise(rng, shape, max(2.0, r_px / rng.uniform(2.0, 5.0)))
    density = 1.0
    if kind == 0:  # hypoechoic
        inner = ref * rng.uniform(0.12, 0.45) * np.exp(rng.uniform(0.2, 0.5) * heterogeneity)
    elif kind == 1:  # isoechoic: same mean, coarse sparse texture, lobular septa, a rim or halo
        inner = ref * rng.uniform(0.8, 1.2) * np.exp(0.6 * heterogeneity)
        density = rng.uniform(0.15, 0.4)
    else:  # hyperechoic
        inner = ref * rng.uniform(2.0, 4.0) * np.exp(rng.uniform(0.2, 0.5) * heterogeneity)
    if rng.random() < 0.5 or kind == 1:  # echogenic septa between lobules
        lobules = _smooth_noise(rng, shape, max(2.5, r_px / 2.5))
        inner = inner + ref * rng.uniform(0.5, 1.5) * np.exp(-((lobules / 0.1) ** 2))
    if vessels:  # thin curved anechoic tubes: zero crossings of a smooth field, inside only
        channels = _smooth_noise(rng, shape, max(3.0 * scale, r_px / rng.uniform(2.0, 4.0)))
        inner = inner * (1.0 - np.exp(-((channels / 0.12) ** 2)) * (s < 0.92))
    echo[...] = echo * (1 - w) + inner * w
    coherent *= 1 - w
    if not ill_defined and (kind == 1 or rng.random() < 0.35):
        rim = (s - 1.0) * r_px / (rng.uniform(1.2, 2.0) * scale)  # signed distance to the margin, px-ish
        if rng.random() < 0.6 or ref < 0.1:  # echogenic capsule, partly specular (a halo hides in fat)
            capsule = np.exp(-(rim**2))
            echo += ref * rng.uniform(3.0, 5.0) * capsule
            coherent += 0.3 * float(np.sqrt(ref)) * capsule
        else:  # hypoechoic halo just outside the margin
            echo *= 1.0 - rng.uniform(0.8, 0.95) * np.exp(-(((rim - 1.5) / 1.5) ** 2))
    if density < 1.0:
        if tissue.density is None:
            tissue.density = np.ones_like(tissue.echo)
        tissue.density[box] = tissue.density[box] * (1 - w) + density * w

    # posterior effect from attenuation alone: low attenuation enhances, high shadows, the column below;
    # a shadow is sized in total dB through the lesion so a big lesion is not dark inside itself
    # (both are drawn every time so that changing posterior_weights leaves the scatterers as they were)
    enhance_rel, shadow_db = rng.uniform(0.0, 0.3), rng.uniform(8.0, 20.0)
    shadow_rel = 1.0 + shadow_db / _NEPER_DB / alpha0 / (2.0 * lesion.b)
    rel = (1.0, enhance_rel, shadow_rel)[posterior]
    tissue.attenuation[box] = tissue.attenuation[box] * (1 - w) + alpha0 * rel * w


# ------------------------------------------------------------------------------------------- scanner


def _beamform(
    rng: np.random.Generator,
    amplitude: np.ndarray,
    psf_sigma: tuple[float, float],
    wavelength: float,
    coherent: np.ndarray | None = None,
    density: np.ndarray | float | None = None,
) -> np.ndarray:
    """Envelope |PSF * scatterers| of (depth, beam) maps, before log compression.

    Scatterers are complex Gaussian per pixel (many scatterers per resolution cell) with std `amplitude`;
    `density` < 1 keeps only that share of pixels (at the same mean power), giving fewer scatterers per
    cell and non-Rayleigh statistics. Coherent reflectors keep the carrier phase exp(-ikz).
    """
    shape = amplitude.shape
    field = rng.standard_normal((2, *shape), dtype=np.float32)
    scale = amplitude * np.float32(np.sqrt(0.5))
    if density is not None and np.any(np.asarray(density) < 1.0):
        u = rng.random(shape, dtype=np.float32)
        density = np.maximum(density, 1e-3)
        scale = scale * ((u < density) / np.sqrt(density)).astype(np.float32)
    field *= scale
    if coherent is not None:
        phase = (2 * np.pi / wavelength) * np.arange(shape[0], dtype=np.float32)[:, None]
        field[0] += coherent * np.cos(phase)
        field[1] -= coherent * np.sin(phase)
    field = ndimage.gaussian_filter1d(field, psf_sigma[0], axis=1, truncate=3.0, mode="nearest")
    field = ndimage.gaussian_filter1d(field, psf_sigma[1], axis=2, truncate=3.0, mode="nearest")
    return np.sqrt(field[0] ** 2 + field[1] ** 2)


def speckle_envelope(
    rng: np.random.Generator,
    shape: tuple[int, int],
    psf_sigma: tuple[float, float] = SynthConfig.psf_sigma,
    density: float = 1.0,
) -> np.ndarray:
    """Envelope (before log compression) of homogeneous tissue, float32 (H, W), same path as synth_scan.

    With many scatterers per resolution cell (density=1) it is Rayleigh distributed, mean/std ~ 1.91.
    """
    # simulate a margin and cut it: near the border the filter sees fewer scatterers, not stationary
    pad = [int(math.ceil(3.0 * sigma)) + 1 for sigma in psf_sigma]
    amplitude = np.ones((shape[0] + 2 * pad[0], shape[1] + 2 * pad[1]), dtype=np.float32)
    envelope = _beamform(rng, amplitude, psf_sigma, SynthConfig.wavelength, density=density)
    return envelope[pad[0] : pad[0] + shape[0], pad[1] : pad[1] + shape[1]]


def _log_compress(envelope: np.ndarray, skin: int, dynamic_range_db: float, gain_db: float) -> np.ndarray:
    """Envelope -> [0, 1] display values; the gain puts the median tissue under the skin line at mid-grey,
    as a sonographer sets it, and the exponent is the scanner's grey map (darker lows)."""
    sample = envelope[skin::2, ::2].ravel()
    median = np.partition(sample, sample.size // 2)[sample.size // 2]
    db = 20.0 * np.log10(np.maximum(envelope, 1e-12) / max(float(median), 1e-12)) + gain_db
    return np.clip(db / dynamic_range_db + 0.42, 0.0, 1.0) ** 1.3


def synth_scan(
    rng: np.random.Generator, size: int | tuple[int, int] = 256, config: SynthConfig = SynthConfig()
) -> tuple[np.ndarray, np.ndarray]:
    """One B-mode scan with 0..max_lesions lesions.

    Returns (image uint8 (H, W), mask uint8 (H, W) with values {0, 255}); size int -> square, a pair is
    (height, width). Outside a sector field of view both are 0.
    """
    height, width = (size, size) if np.isscalar(size) else (int(size[0]), int(size[1]))
    if height < 16 or width < 16:
        raise ValueError(f"synth_scan size={size!r}: need at least 16x16 pixels")
    cfg = config
    scale = math.sqrt(height * width) / _REF_SIZE
    geo = _geometry(rng, height, width, cfg)
    alpha0 = rng.uniform(*cfg.attenuation_db) / _NEPER_DB / geo.n_depth  # nepers per pixel
    tissue = _tissue(rng, geo, scale, alpha0, cfg.p_bone)
    lesions = _place_lesions(rng, geo, tissue, cfg)
    bx, by = geo.beam_xy()
    for lesion in lesions:
        _draw_lesion(rng, tissue, (bx, by), lesion, cfg, scale, alpha0)

    # round-trip attenuation down each beam, then the TGC gives back part of the nominal loss
    loss = np.exp(-np.cumsum(tissue.attenuation, axis=0))
    depth = np.arange(geo.n_depth, dtype=np.float32)[:, None]
    gain = np.exp(rng.uniform(*cfg.tgc_fraction) * alpha0 * depth)
    # electronic noise enters before the TGC, so it is what deep, dark regions show; as independent complex
    # Gaussians add, it folds into the scatterer amplitude at no extra random draws
    noise = 10 ** (-(cfg.dynamic_range_db[1] + rng.uniform(5.0, 20.0)) / 20.0)
    amplitude = np.sqrt((tissue.echo * loss) ** 2 + (noise / gain) ** 2).astype(np.float32)
    px = max(scale, 0.6)  # the resolution cell shrinks with the scan, down to about a pixel
    psf = (cfg.psf_sigma[0] * px, cfg.psf_sigma[1] * px)
    coherent = (tissue.coherent * loss).astype(np.float32)
    envelope = _beamform(rng, amplitude, psf, cfg.wavelength * px, coherent, tissue.density) * gain
    # the scanner's post-detection video filter: softens the one-pixel nulls that log compression exposes
    envelope = ndimage.gaussian_filter(envelope, (0.55 * px, 0.7 * px), truncate=3.0)
    skin = int(tissue.skin.mean()) + 1
    display = _log_compress(envelope, skin, rng.uniform(*cfg.dynamic_range_db), rng.uniform(-3.0, 3.0))

    mask = np.zeros((height, width), dtype=bool)
    if geo.sector:
        depth_px, beam_px, inside = geo.image_to_beam()
        display = ndimage.map_coordinates(display, [depth_px, beam_px], order=1, mode="nearest") * inside
        y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    else:
        inside, x, y = True, bx, by
    for lesion in lesions:
        box = _crop(x, y, lesion)
        if box is not None:
            mask[box] |= lesion.level(x[box], y[box]) < 1.0
    mask &= inside
    image = np.round(display * 255.0).astype(np.uint8)
    return image, mask.astype(np.uint8) * 255


# -------------------------------------------------------------------------------------------- dataset


def write_synthetic_dataset(
    out: str | Path,
    n: int,
    size: int | tuple[int, int] = 256,
    seed: int = 0,
    progress: bool = True,
    config: SynthConfig = SynthConfig(),
) -> Path:
    """Writes out/images/{i}.png and out/mask/{i}.png, i in 1..n (8-bit grayscale, mask 0/255); returns out.
    `size`: a square side or (height, width).

    Scan i uses np.random.default_rng([seed, i]), so any scan can be regenerated alone and the same seed
    gives byte-identical files.
    """
    if n < 0:
        raise ValueError(f"write_synthetic_dataset n={n} must be >= 0")
    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "mask").mkdir(parents=True, exist_ok=True)
    for i in tqdm(range(1, n + 1), desc="synthetic scans", unit="scan", disable=not progress):
        image, mask = synth_scan(np.random.default_rng([seed, i]), size, config)
        save_png(out / "images" / f"{i}.png", image, compress_level=1, fsync=False)  # speed over a few % of size
        save_png(out / "mask" / f"{i}.png", mask, compress_level=1, fsync=False)
    log.info("wrote %d synthetic scans (%s px, seed %d) to %s", n, size, seed, out)
    return out
