import numpy as np
import torch

from hemaseg.config import RunConfig
from hemaseg.inference.postprocess import (
    PostprocessPlan,
    apply_plan,
    confidence,
    fill_holes,
    keep_largest,
    remove_small,
)
from hemaseg.data.transforms import letterbox_geometry
from hemaseg.evaluation.decisions import decide_plan
from hemaseg.inference.predictor import Predictor, predict_boxed


def forward_probs(models, batch, flips=()):
    """predict_boxed on square inputs that need no letterbox: (N, S, S) -> (N, S, S) probabilities."""
    models = models if isinstance(models, list) else [models]
    boxes = [letterbox_geometry(batch.shape[1], batch.shape[2], batch.shape[1])] * len(batch)
    return torch.from_numpy(np.stack(predict_boxed(models, batch, boxes, flips)))


def _blobs():
    m = np.zeros((40, 40), bool)
    m[5:20, 5:20] = True  # 225 px
    m[30:33, 30:33] = True  # 9 px
    return m


def test_steps():
    m = _blobs()
    assert keep_largest(m).sum() == 225
    assert remove_small(m, 10).sum() == 225 and remove_small(m, 9).sum() == 234
    ring = m.copy()
    ring[10:12, 10:12] = False
    assert fill_holes(ring).sum() == m.sum()
    assert np.array_equal(apply_plan(m, PostprocessPlan()), m)


def test_decision_keeps_only_steps_that_help(tmp_path):
    ref = np.zeros((40, 40), bool)
    ref[5:20, 5:20] = True
    prob = np.where(_blobs(), 0.9, 0.05).astype(np.float32)  # the true lesion + a spurious speck
    plan, evidence = decide_plan([prob] * 3, [ref] * 3)
    assert plan.min_component_px > 0 or plan.keep_largest
    assert evidence["chosen"] > evidence["none"]
    clean = np.where(ref, 0.9, 0.05).astype(np.float32)  # nothing to fix: nothing is kept
    plan2, _ = decide_plan([clean], [ref])
    assert plan2.is_identity
    plan.save(tmp_path / "pp.json", evidence)
    assert PostprocessPlan.load(tmp_path / "pp.json") == plan


def test_the_lesion_present_decision_empties_faint_blobs_on_normal_scans_only_when_it_pays():
    lesion = np.zeros((40, 40), bool)
    lesion[5:20, 5:20] = True
    normal = np.zeros((40, 40), bool)
    sure = np.where(lesion, 0.97, 0.02).astype(np.float32)  # a lesion scan: confident
    faint = np.where(_blobs(), 0.6, 0.02).astype(np.float32)  # a normal scan: a faint false blob
    plan, evidence = decide_plan([sure, faint, sure], [lesion, normal, lesion])
    assert 0.6 < plan.lesion_min_prob <= 0.97 and evidence["chosen"] > evidence["none"]
    assert not apply_plan(faint >= 0.5, plan, faint).any() and apply_plan(sure >= 0.5, plan, sure).sum() == 225
    weak_lesion = np.where(lesion, 0.65, 0.02).astype(np.float32)  # a real lesion the gate would miss
    plan2, _ = decide_plan([weak_lesion, weak_lesion, faint], [lesion, lesion, normal])
    assert plan2.lesion_min_prob == 0  # emptying two lesion scans to fix one normal one does not pay


def test_confidence_is_high_for_sharp_and_low_for_uncertain_maps():
    sharp = np.where(_blobs(), 0.99, 0.01)
    vague = np.where(_blobs(), 0.55, 0.3)
    assert confidence(sharp) > 0.9 > confidence(vague)
    assert confidence(np.zeros((8, 8))) == 1.0


class _Lopsided(torch.nn.Module):
    """Logits that depend on the column: not flip-invariant, so TTA changes its output."""

    def forward(self, x):
        cols = torch.linspace(-3, 3, x.shape[-1])
        return x * 0 + cols


def test_tta_is_invariant_on_a_symmetric_input_with_a_symmetric_model():
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(1, 1, 3, padding=1, bias=False)
    with torch.no_grad():  # a kernel symmetric under both flips
        k = torch.rand(3, 3)
        k = (k + k.flip(0) + k.flip(1) + k.flip(0).flip(1)) / 4
        conv.weight.copy_(k[None, None])
    img = torch.rand(16, 16)
    img = (img + img.flip(0) + img.flip(1) + img.flip(0).flip(1)).numpy()[None] / 4
    plain = forward_probs(conv, img)
    tta = forward_probs(conv, img, [(-1,), (-2,)])
    torch.testing.assert_close(plain, tta)
    lop = _Lopsided()
    a, b = forward_probs(lop, img), forward_probs(lop, img, [(-1,)])
    assert not torch.allclose(a, b)


def test_ensemble_averages_probabilities():
    class Const(torch.nn.Module):
        def __init__(self, logit):
            super().__init__()
            self.logit = logit

        def forward(self, x):
            return torch.full_like(x, self.logit)

    x = np.zeros((2, 16, 16), np.float32)
    p = forward_probs([Const(2.0), Const(-1.0)], x)
    expected = (torch.sigmoid(torch.tensor(2.0)) + torch.sigmoid(torch.tensor(-1.0))) / 2
    torch.testing.assert_close(p, torch.full((2, 16, 16), expected.item()))
    predictor = Predictor([Const(2.0), Const(-1.0)], RunConfig(), device="cpu", backend="torch")
    prob = predictor.predict(np.zeros((20, 30), np.uint8)).prob
    assert prob.shape == (20, 30) and np.allclose(prob, expected.item(), atol=1e-6)


def test_tta_uses_only_the_flips_seen_in_training():
    import dataclasses

    from hemaseg.config import AugmentConfig

    default = Predictor(torch.nn.Identity(), RunConfig(), device="cpu", tta=True, backend="torch")
    assert default.tta_flips == [(-1,)]  # ultrasound: no vertical flip unless trained with one
    both = RunConfig(augment=dataclasses.replace(AugmentConfig(), vflip=0.5))
    assert Predictor(torch.nn.Identity(), both, device="cpu", tta=True, backend="torch").tta_flips == [(-1,), (-2,)]
