"""Lesion geometry: outlines traced by hand-checkable rules, areas and boxes consistent with the mask."""

import numpy as np
from scipy import ndimage

from hemaseg.measure.lesions import find_lesions, trace_outline


def test_square_outline_is_its_border_clockwise_from_top_left():
    m = np.zeros((7, 7), bool)
    m[2:5, 2:5] = True
    assert trace_outline(m) == [(2, 2), (3, 2), (4, 2), (4, 3), (4, 4), (3, 4), (2, 4), (2, 3)]


def test_lone_pixel_and_empty_and_spur():
    m = np.zeros((5, 5), bool)
    assert trace_outline(m) == []
    m[1, 3] = True
    assert trace_outline(m) == [(3, 1)]
    line = np.zeros((3, 6), bool)
    line[1, 1:4] = True  # a one-pixel-wide spur is walked out and back
    assert trace_outline(line) == [(1, 1), (2, 1), (3, 1), (2, 1)]


def test_outline_of_a_disk_is_exactly_its_border_pixels():
    yy, xx = np.mgrid[:60, :70]
    disk = (yy - 30) ** 2 + (xx - 33) ** 2 < 20**2
    outline = trace_outline(disk)
    border = disk & ~ndimage.binary_erosion(disk)
    assert set(outline) == {(int(x), int(y)) for y, x in zip(*np.nonzero(border))}
    assert len(outline) == len(set(outline))  # a convex shape is walked once
    # clockwise on screen (y down) means a positive shoelace sum in image coordinates
    xs, ys = np.array(outline).T
    assert np.sum(xs * np.roll(ys, -1) - np.roll(xs, -1) * ys) > 0


def test_find_lesions_counts_sorts_and_caps():
    m = np.zeros((40, 40), bool)
    m[2:5, 2:5] = True  # 9 px
    m[10:20, 10:30] = True  # 200 px
    m[35, 35] = True  # 1 px
    n, lesions = find_lesions(m)
    assert n == 3 == ndimage.label(m)[1]
    assert [les.area_px for les in lesions] == [200, 9, 1]
    assert lesions[0].bbox == (10, 10, 20, 10)
    assert lesions[0].centroid == (19.5, 14.5)
    n, capped = find_lesions(m, max_lesions=1)
    assert n == 3 and len(capped) == 1 and capped[0].area_px == 200
    assert find_lesions(np.zeros((4, 4), bool)) == (0, [])
