"""Lesion geometry: outlines traced by hand-checkable rules, areas and boxes consistent with the mask."""

import numpy as np
import torch
from scipy import ndimage

from hemaseg.lesions import count_lesions, find_lesions, trace_outline


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


def _diagonal(h=12, w=12):
    m = np.zeros((h, w), bool)
    m[4:6, 4:6] = True
    m[6:8, 6:8] = True  # touches the first square at one corner only
    return m


class _Fixed(torch.nn.Module):
    """A 'network' whose probability map is the diagonal mask itself (input size = scan size)."""

    def __init__(self, mask):
        super().__init__()
        self.logits = torch.from_numpy(np.where(mask, 10.0, -10.0).astype(np.float32))

    def forward(self, x):
        return self.logits.expand(x.shape[0], 1, *self.logits.shape).clone()


def test_two_squares_touching_at_a_corner_are_one_lesion_on_every_path(tmp_path):
    from fastapi.testclient import TestClient
    from PIL import Image

    from hemaseg.config import DataConfig, RunConfig
    from hemaseg.evaluation.metrics import match_lesions
    from hemaseg.inference.files import predict_files
    from hemaseg.inference.postprocess import keep_largest, remove_small
    from hemaseg.inference.predictor import Predictor
    from hemaseg.serve import Settings, create_app

    mask = _diagonal(16, 16)
    assert count_lesions(mask) == 1 and find_lesions(mask)[0] == 1
    assert match_lesions(mask, mask) == {"tp": 1, "fp": 0, "fn": 0}  # evaluate
    assert remove_small(mask, 8).sum() == 8 and keep_largest(mask).sum() == 8  # postprocess keeps it whole
    predictor = Predictor(_Fixed(mask), RunConfig(data=DataConfig(size=16)), device="cpu", backend="torch")
    assert predictor.predict(np.zeros((16, 16), np.uint8)).n_lesions == 1  # Python API
    Image.fromarray(np.zeros((16, 16), np.uint8)).save(tmp_path / "scan.png")
    result = predict_files(predictor, [tmp_path / "scan.png"], tmp_path / "out", progress=False)
    assert result.rows[0]["n_lesions"] == 1  # predict / predictions.csv
    with TestClient(create_app(predictor, Settings(allowed_hosts=("testserver",)))) as client:
        body = client.post("/v1/segment", files={"file": ("s.png", (tmp_path / "scan.png").read_bytes(),
                                                           "image/png")}).json()
    assert body["n_lesions"] == len(body["lesions"]) == 1 and body["lesions"][0]["area_px"] == 8  # serve
