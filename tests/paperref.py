"""The paper's own code (``shared/reference/saraao-amodal/main.py``), run unchanged on a :class:`World`.

Its model libraries (Grounding DINO, SAM, InstaOrder, RAM++, CLIP, diffusers, the LISA server's client,
LaMa) are replaced in ``sys.modules`` by small modules that answer from the world, through the same calls and
tensor shapes the paper's code makes; everything else it imports (torch, OpenCV, scikit-image, Pillow) is
real. :func:`run_reference` runs its ``run_pipeline`` on one image and returns what it wrote.
"""
from __future__ import annotations

import importlib.util
import json
import os
import sys
import types
from argparse import Namespace
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from PIL import Image

from tests.paperworld import World
from tests.paths import REFERENCE as REFERENCE_DIR

REFERENCE = REFERENCE_DIR / "main.py"


class _Held:
    """A tensor-like stand-in the code moves to devices and indexes; it carries an image array."""

    def __init__(self, value) -> None:
        self.value = value

    def to(self, *_args, **_kwargs) -> "_Held":
        return self

    def unsqueeze(self, _dim: int) -> "_Held":
        return self

    def __getitem__(self, _index) -> "_Held":
        return self


class _Model:
    """A model object: every setup call (eval, to, load_state_dict, ...) is accepted and returns itself."""

    def __init__(self, **attributes) -> None:
        self.__dict__.update(attributes)

    def __getattr__(self, _name):
        return lambda *args, **kwargs: self


class _GroundingDino(_Model):
    """Grounding DINO's model: boxes (normalised centre and size) and token logits for a caption."""

    def __init__(self, world: World) -> None:
        super().__init__(world=world)

    def tokenizer(self, caption: str) -> list[str]:
        return caption[:-1].split(". ")

    def __call__(self, images: _Held, captions: list[str]) -> dict:
        image = images.value
        classes = self.tokenizer(captions[0])
        found = self.world.detect_one(image, classes)
        logits = torch.full((max(len(found), 1), 256), -10.0)
        boxes = torch.zeros((max(len(found), 1), 4))
        h, w = image.shape[:2]
        for row, (label, (x0, y0, x1, y1)) in enumerate(found):
            logits[row, classes.index(label)] = 2.2  # sigmoid: 0.90
            boxes[row] = torch.tensor([(x0 + x1) / 2 / w, (y0 + y1) / 2 / h, (x1 - x0) / w, (y1 - y0) / h])
        return {"pred_logits": logits[None], "pred_boxes": boxes[None]}


def _phrases(posmap: torch.Tensor, tokenized: list[str], _tokenizer) -> str:
    return " ".join(tokenized[i] for i in torch.nonzero(posmap).flatten().tolist())


class _SamPredictor:
    def __init__(self, world: World) -> None:
        self.world = world
        self.transform = _Model(apply_boxes_torch=lambda boxes, _shape: _Held(boxes))

    def set_image(self, image: np.ndarray) -> None:
        self.image = image

    def predict_torch(self, point_coords, point_labels, boxes: _Held, multimask_output: bool):
        if len(boxes.value) == 0:
            raise RuntimeError("no boxes")  # the paper's code catches this and skips the image
        masks = np.stack([self.world.segment_one(self.image, box.tolist()) for box in boxes.value])
        return torch.from_numpy(masks)[:, None], None, None


def _occlusion_orders(world: World, image, modal, bboxes, **_kwargs):
    """InstaOrder's ``infer_order_sup_occ_depth``: order[a, b] = 1 when a is over b."""
    masks = modal > 0
    n = len(masks)
    order = np.zeros((n, n), int)
    for a in range(n):
        for b in range(n):
            if a != b and world.over(np.asarray(image), masks[a], masks[b]):
                order[a, b] = 1
    return order, np.zeros((n, n), int)


class _Clip:
    """OpenAI CLIP's ``load``/``tokenize``: texts are kept in a list and tokens are their indices."""

    def __init__(self, world: World) -> None:
        self.world = world
        self.texts: list[str] = []

    def tokenize(self, text: str) -> torch.Tensor:
        self.texts.append(text)
        return torch.tensor([[len(self.texts) - 1]])

    def load(self, _name: str, _device):
        model = _Model(
            encode_image=lambda held: torch.from_numpy(self.world.features(held.value))[None].float(),
            encode_text=lambda tokens: torch.from_numpy(
                np.stack([self.world.text_feature(self.texts[int(t)]) for t in tokens[:, 0]])).float())
        return model, lambda image: _Held(np.asarray(image))


class _Inpainter:
    def __init__(self, world: World) -> None:
        self.world = world

    def __call__(self, image: Image.Image, mask_image: Image.Image, prompt: str):
        out = self.world.inpaint_one(np.asarray(image), np.asarray(mask_image) > 0, prompt)
        return types.SimpleNamespace(images=[Image.fromarray(out)])

    def enable_attention_slicing(self) -> None:
        pass

    def to(self, _device) -> "_Inpainter":
        return self


def _modules(world: World, lisa: "_Lisa") -> dict[str, types.ModuleType]:
    def module(name: str, **attributes) -> types.ModuleType:
        m = types.ModuleType(name)
        m.__dict__.update(attributes)
        m.__path__ = []  # a package, so that submodules import
        return m

    clip = _Clip(world)
    gdino = _GroundingDino(world)
    to_held = types.SimpleNamespace(Compose=lambda _steps: lambda image, _target: (_Held(np.asarray(image)), None),
                                    RandomResize=lambda *a, **k: None, ToTensor=lambda: None,
                                    Normalize=lambda *a: None)
    return {
        "gradio_client": module("gradio_client", Client=lambda _url: lisa),
        "diffusers": module("diffusers", StableDiffusionInpaintPipeline=types.SimpleNamespace(
            from_pretrained=lambda *a, **k: _Inpainter(world))),
        "omegaconf": module("omegaconf", OmegaConf=types.SimpleNamespace(create=lambda d: _Model())),
        "saicinpainting": module("saicinpainting"),
        "saicinpainting.training": module("saicinpainting.training"),
        "saicinpainting.training.trainers": module("saicinpainting.training.trainers",
                                                   load_checkpoint=lambda *a, **k: _Model()),
        "lama": module("lama"), "lama.bin": module("lama.bin"),
        "lama.bin.predict_for_mc": module("lama.bin.predict_for_mc", __all__=[]),
        "clip": module("clip", load=clip.load, tokenize=clip.tokenize),
        "models": module("models", InstaOrderNet_od=lambda _params: _Model()),
        "inference": module("inference", infer_order_sup_occ_depth=lambda model, image, modal, bboxes, **k:
                            _occlusion_orders(world, image, modal, bboxes)),
        "GroundingDINO": module("GroundingDINO"),
        "GroundingDINO.groundingdino": module("GroundingDINO.groundingdino"),
        "GroundingDINO.groundingdino.datasets": module("GroundingDINO.groundingdino.datasets"),
        "GroundingDINO.groundingdino.datasets.transforms": module("GroundingDINO.groundingdino.datasets.transforms",
                                                                  **vars(to_held)),
        "GroundingDINO.groundingdino.models": module("GroundingDINO.groundingdino.models",
                                                     build_model=lambda _args: gdino),
        "GroundingDINO.groundingdino.util": module("GroundingDINO.groundingdino.util"),
        "GroundingDINO.groundingdino.util.slconfig": module(
            "GroundingDINO.groundingdino.util.slconfig",
            SLConfig=types.SimpleNamespace(fromfile=lambda _path: types.SimpleNamespace())),
        "GroundingDINO.groundingdino.util.utils": module("GroundingDINO.groundingdino.util.utils",
                                                         clean_state_dict=lambda d: d,
                                                         get_phrases_from_posmap=_phrases),
        "segment_anything": module("segment_anything", build_sam=lambda checkpoint: _Model(),
                                   SamPredictor=lambda _model: _SamPredictor(world)),
        "ram": module("ram", inference_ram=lambda image, _model: (" | ".join(world.tags(image.value)),),
                      get_transform=lambda image_size: lambda image: _Held(np.asarray(image))),
        "ram.models": module("ram.models", ram_plus=lambda **k: _Model(num_class=4585)),
    }


class _Lisa:
    """The LISA server's client: answers ``predict`` with the row's visible mask (a PNG and the JSON of
    its ``pred_mask``, as the paper's modified LISA app returns them)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.mask: np.ndarray | None = None

    def predict(self, _query: str, _image_path: str, api_name: str):
        png, data = self.folder / "lisa.png", self.folder / "lisa.json"
        Image.fromarray(np.where(self.mask, 255, 0).astype(np.uint8)).save(png)
        data.write_text(json.dumps({"data": self.mask.tolist()}))
        return str(png), str(data)


@contextmanager
def _stand_ins(modules: dict[str, types.ModuleType]) -> Iterator[None]:
    saved = {name: sys.modules.get(name) for name in modules}
    environment = dict(os.environ)
    sys.modules.update(modules)
    try:
        yield
    finally:
        for name, old in saved.items():
            if old is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = old
        os.environ.clear()
        os.environ.update(environment)


def run_reference(world: World, image: np.ndarray, visible: np.ndarray, query: str, work: Path,
                  background: Path) -> Path:
    """Run the paper's ``run_pipeline`` on one image (its query, its LISA mask ``visible``) with the world's
    models; the folder it wrote for the image."""
    work.mkdir(parents=True)
    (work / "images").mkdir()
    Image.fromarray(image).save(work / "images" / "row.png")
    (work / "labels.json").write_text(json.dumps({"annotations": [{"filename": "row.png", "labels": [query]}]}))
    torch.save({"model": {}}, work / "gdino.pth")
    (work / "lama.yaml").write_text("training_model: {}\nvisualizer: {}\n")
    lisa = _Lisa(work)
    lisa.mask = visible
    with _stand_ins(_modules(world, lisa)):
        spec = importlib.util.spec_from_file_location("paper_main", REFERENCE)
        main = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(main)
        main.LISA_OUTPUT_PATH = f"{work}/"
        args = Namespace(input_dir=str(work / "images"), json_label_path=str(work / "labels.json"),
                         output_dir=str(work / "out"), gdino_config="", gdino_ckpt=str(work / "gdino.pth"),
                         sam_ckpt="", instaorder_ckpt="", lama_config_path=str(work / "lama.yaml"),
                         lama_ckpt_path="", save_interm=True, max_iter_id=3, mc_clean_bkgd_img=str(background),
                         text_query="", inpaint_prompt="")
        main.run_pipeline(args, ["row.png"], 0, 1)
    return work / "out" / "row"
