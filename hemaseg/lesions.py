"""What a lesion is, and its geometry: area, bounding box, centroid and outline polygon per lesion.

A lesion is an 8-connected component of a mask (`LESION_CONNECTIVITY`): two pixels touching at a corner
belong to one lesion. Every path that counts or separates lesions (metrics, postprocessing, predict,
serve, measurement) labels through `label_lesions`, so a mask has the same lesions everywhere. Outlines are
traced on the pixel grid by Moore-neighbour border following, so every vertex is the centre of a mask
pixel on the lesion's outer border (holes count in the area but are not outlined). This keeps the service
free of scikit-image, and a polygon drawn through pixel centres is what a clinician expects to see on
a pixel image.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

LESION_CONNECTIVITY = 2  # scipy's rank-2 connectivity on a 2-D grid: the 8 neighbours
_STRUCTURE = ndimage.generate_binary_structure(2, LESION_CONNECTIVITY)


def label_lesions(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """Bool HxW mask -> (int32 labels 1..n, 0 = background; n lesions)."""
    labels, n = ndimage.label(np.asarray(mask, bool), structure=_STRUCTURE)
    return labels, int(n)


def count_lesions(mask: np.ndarray) -> int:
    return label_lesions(mask)[1]


# The 8 neighbours as (dy, dx), clockwise on screen (y grows downwards), starting west.
_RING = ((0, -1), (-1, -1), (-1, 0), (-1, 1), (0, 1), (1, 1), (1, 0), (1, -1))
_RING_INDEX = {d: i for i, d in enumerate(_RING)}


@dataclass(frozen=True)
class Lesion:
    """One connected lesion; coordinates are pixels of the original image, x to the right, y down."""

    area_px: int
    bbox: tuple[int, int, int, int]  # x, y, width, height
    centroid: tuple[float, float]  # x, y
    contour: list[tuple[int, int]]  # (x, y) border pixel centres, clockwise on screen, implicitly closed


def trace_outline(component: np.ndarray) -> list[tuple[int, int]]:
    """Outer border of one connected bool HxW component as (x, y) pixel centres, clockwise on screen.

    Starts at the top-most, then left-most pixel and stops when the first step repeats (a pixel can
    appear twice where the border runs out along a one-pixel-wide spur and back). Empty -> [].
    """
    comp = np.pad(np.asarray(component, bool), 1)
    ys, xs = np.nonzero(comp)  # row-major, so the first pixel is top-most, then left-most
    if ys.size == 0:
        return []
    start = (int(ys[0]), int(xs[0]))

    def step(c: tuple[int, int], back: int) -> tuple[tuple[int, int], int] | None:
        """Next border pixel clockwise from the backtrack direction, and the new backtrack seen from it."""
        for k in range(1, 9):
            i = (back + k) % 8
            p = (c[0] + _RING[i][0], c[1] + _RING[i][1])
            if comp[p]:
                prev = _RING[(i - 1) % 8]  # the background pixel checked just before p: a neighbour of p too
                return p, _RING_INDEX[(c[0] + prev[0] - p[0], c[1] + prev[1] - p[1])]
        return None

    first = step(start, 0)  # the pixel west of the start is background, so backtrack from there
    if first is None:
        return [(start[1] - 1, start[0] - 1)]  # a lone pixel
    path = [start]
    c, back = first
    limit = 4 * int(ys.size) + 8  # each border pixel is entered at most 4 times
    while len(path) <= limit:
        path.append(c)
        nxt = step(c, back)
        assert nxt is not None  # c has at least the neighbour we came from
        if c == start and nxt[0] == first[0]:
            path.pop()  # back at the start about to repeat the first step: closed
            break
        c, back = nxt
    return [(x - 1, y - 1) for y, x in path]


def find_lesions(mask: np.ndarray, max_lesions: int | None = None) -> tuple[int, list[Lesion]]:
    """Bool HxW mask -> (number of lesions, the largest `max_lesions` of them, largest first).

    Counting is cheap; tracing is per border pixel, so a noisy mask with thousands of specks is capped.
    """
    labels, n = label_lesions(mask)
    if n == 0:
        return 0, []
    areas = np.bincount(labels.ravel(), minlength=n + 1)[1:]
    order = np.argsort(-areas, kind="stable")[: n if max_lesions is None else max_lesions]
    slices = ndimage.find_objects(labels)
    lesions = []
    for idx in order:
        sl = slices[idx]
        comp = labels[sl] == idx + 1
        y0, x0 = sl[0].start, sl[1].start
        cy, cx = ndimage.center_of_mass(comp)
        contour = [(x + x0, y + y0) for x, y in trace_outline(comp)]
        lesions.append(Lesion(
            area_px=int(areas[idx]),
            bbox=(int(x0), int(y0), int(sl[1].stop - x0), int(sl[0].stop - y0)),
            centroid=(round(float(cx) + x0, 2), round(float(cy) + y0, 2)),
            contour=contour,
        ))
    return int(n), lesions
