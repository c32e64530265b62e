"""LPIPS (AlexNet backbone, v0.1 linear layers) as torchmetrics computes it, with weights from the model folder.

torchmetrics builds its LPIPS network from torchvision's ImageNet AlexNet (downloaded through
``torch.hub`` on first use) and the linear layers it ships (``lpips_models/alex.pth``). Here both
come from the model folder instead, so nothing is fetched at run time: ``lpips/`` holds torchvision's
published backbone file and the LPIPS linear-layer file, both loaded strictly.
"""
from __future__ import annotations

import shutil
from importlib import resources
from pathlib import Path

import torch
import torchvision
from torchmetrics.functional.image.lpips import _NoTrainLpips

LPIPS_DIR = "lpips"
NET = "alex"
BACKBONE_URL = torchvision.models.AlexNet_Weights.DEFAULT.url
BACKBONE_FILE = f"{LPIPS_DIR}/{BACKBONE_URL.rsplit('/', 1)[-1]}"  # torchvision's file name
LINEAR_FILE = f"{LPIPS_DIR}/{NET}.pth"
FEATURES_PREFIX = "features."  # torchvision keys; LPIPS uses only the convolutional features


def load_lpips(model_dir: Path, device: torch.device) -> torch.nn.Module:
    """torchmetrics' LPIPS network with the backbone and linear layers of ``model_dir``.

    Call it as ``net(a, b, normalize=True)`` on ``(N, 3, H, W)`` images in [0, 1]: one distance per image.
    """
    from amodal.models.base import require

    net = _NoTrainLpips(pretrained=False, net=NET, pnet_rand=True)
    backbone = torch.load(require(model_dir / BACKBONE_FILE), map_location="cpu", weights_only=True)
    linear = torch.load(require(model_dir / LINEAR_FILE), map_location="cpu", weights_only=True)
    # The network's backbone keeps torchvision's layer indices inside its slices ("slice2.3" is features[3]).
    slice_of = {name.split(".")[1]: name.split(".")[0] for name, _ in net.net.named_modules() if name.count(".") == 1}
    state = {f"net.{slice_of[key.split('.')[1]]}.{key.removeprefix(FEATURES_PREFIX)}": value
             for key, value in backbone.items() if key.startswith(FEATURES_PREFIX)}
    # ``lins.k`` names the same layers as ``link``; the published file has only the latter.
    missing, unexpected = net.load_state_dict({**state, **linear}, strict=False)
    if unexpected or any(not key.startswith("lins.") for key in missing):
        raise ValueError(f"LPIPS weights in {model_dir / LPIPS_DIR} do not fit: missing {missing}, unexpected {unexpected}")
    return net.to(device)


def linear_layers_shipped() -> Path:
    """The LPIPS v0.1 linear layers as torchmetrics ships them (the published file)."""
    return Path(str(resources.files("torchmetrics.functional.image").joinpath(f"lpips_models/{NET}.pth")))


def install_linear_layers(model_dir: Path) -> Path:
    """Copy the published linear layers into ``model_dir`` (they come with torchmetrics: nothing to fetch)."""
    target = model_dir / LINEAR_FILE
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(linear_layers_shipped(), target)
    return target


def write_tiny(folder: Path) -> None:
    """Random backbone features and non-negative linear layers in the published files' formats."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    net = _NoTrainLpips(pretrained=False, net=NET, pnet_rand=True)
    features = torchvision.models.alexnet(weights=None).features
    torch.save({f"{FEATURES_PREFIX}{k}": v for k, v in features.state_dict().items()},
               folder / Path(BACKBONE_FILE).name)
    linear = {k: v.abs() for k, v in net.state_dict().items() if k.startswith("lin") and not k.startswith("lins.")}
    torch.save(linear, folder / Path(LINEAR_FILE).name)
