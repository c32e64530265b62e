"""`models tiny` (every adapter's tiny checkpoint in the registry layout) and `models download`
(the code path up to the network, which is replaced by stand-ins here)."""
from __future__ import annotations

import http.client
import io
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from amodal.models.lpips import BACKBONE_FILE, BACKBONE_URL, LINEAR_FILE
from amodal.models import download, tiny
from amodal.models.download import DownloadError, download_models, fetch_url
from amodal.models.instaorder import InstaOrder
from amodal.models.registry import (
    CLIP_DIR,
    GROUNDING_DINO_DIR,
    INSTAORDER_FILE,
    LISA_DIR,
    RAM_PLUS_FILE,
    SAM_FILES,
    SD_INPAINT_DIR,
    ModelSet,
)
from amodal.settings import Settings
from tests.paths import EXAMPLES

PHOTO = EXAMPLES / "images" / "bird-8951872_640_bird.jpg"


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    saved = torch.load(path, map_location="cpu", weights_only=True)
    return saved.get("state_dict", saved)


def _assert_same_tensors(a: Path, b: Path) -> None:
    ta, tb = _tensors(a), _tensors(b)
    assert ta.keys() == tb.keys()
    for key in ta:
        assert torch.equal(ta[key], tb[key]), key


# ---- models tiny ------------------------------------------------------------------------------


def test_tiny_models_fill_the_registry_layout_and_load(tiny_models):
    assert (tiny_models / SAM_FILES["vit_h"]).is_file()
    assert (tiny_models / GROUNDING_DINO_DIR / "config.json").is_file()
    assert (tiny_models / CLIP_DIR / "config.json").is_file()
    assert (tiny_models / SD_INPAINT_DIR / "model_index.json").is_file()
    assert (tiny_models / INSTAORDER_FILE).is_file()
    for _, relative in tiny.TINY_MODELS:
        assert (tiny_models / relative).exists(), relative
    models = ModelSet(tiny_models, Settings(device="cpu", dtype="float32"))
    assert isinstance(models.occlusion, InstaOrder)
    image = np.asarray(Image.open(PHOTO).convert("RGB"))
    target = np.zeros(image.shape[:2], bool)
    target[100:300, 200:400] = True
    other = np.roll(target, 120, axis=1)
    (p,) = models.occlusion.occluders_of([image], [target], [[other]])
    assert p.shape == (1,) and 0 < p[0] < 1
    for name in ("segmenter", "detector", "clip", "inpainter"):
        assert getattr(models, name) is not None


@pytest.fixture
def small_table(monkeypatch):
    """Two of the adapters."""
    table = (("amodal.models.instaorder", INSTAORDER_FILE), ("amodal.models.sam", SAM_FILES["vit_h"]))
    monkeypatch.setattr(tiny, "TINY_MODELS", table)
    return table


def test_tiny_models_are_reproducible(small_table, tmp_path, tiny_models):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        first = tiny.write_tiny_models(tmp_path / "a", progress=False)
        torch.manual_seed(2)
        second = tiny.write_tiny_models(tmp_path / "b", progress=False)
        after = torch.rand(1)
        torch.manual_seed(2)
        assert torch.equal(after, torch.rand(1)), "the global random state must be left alone"
    assert first == [tmp_path / "a" / INSTAORDER_FILE, tmp_path / "a" / SAM_FILES["vit_h"]]
    for a, b in zip(first, second):
        _assert_same_tensors(a, b)
    _assert_same_tensors(first[0], tiny_models / INSTAORDER_FILE)


def test_tiny_models_show_progress(small_table, tmp_path, capsys):
    tiny.write_tiny_models(tmp_path, progress=True)
    assert "tiny models" in capsys.readouterr().err


# ---- models download --------------------------------------------------------------------------


class FakeResponse(io.BytesIO):
    """An HTTP response: ``Content-Length`` and a body that may break off after some bytes."""

    def __init__(self, body: bytes, length: int | None = None, break_after: int | None = None) -> None:
        super().__init__(body)
        self.headers = {"Content-Length": str(len(body) if length is None else length)}
        self.break_after = break_after

    def read(self, size: int = -1) -> bytes:
        if self.break_after is not None and self.tell() >= self.break_after:
            raise http.client.IncompleteRead(b"")
        limit = size if self.break_after is None else min(size, self.break_after - self.tell())
        return super().read(limit)


@pytest.fixture
def network(monkeypatch):
    """Replace every network entry point; record the calls. Unset responses fail the test."""
    calls: dict[str, list] = {"urls": [], "snapshots": [], "files": []}
    responses: dict[str, FakeResponse] = {}

    def fake_urlopen(url, timeout=None):
        calls["urls"].append(url)
        if url not in responses:
            raise AssertionError(f"unexpected request {url}")
        return responses[url]

    def fake_snapshot(repo_id, *, local_dir, **kwargs):
        calls["snapshots"].append((repo_id, Path(local_dir), kwargs))
        return str(local_dir)

    def fake_hf_file(repo_id, filename, *, local_dir, **kwargs):
        calls["files"].append((repo_id, filename, Path(local_dir)))
        return str(Path(local_dir) / filename)

    monkeypatch.setattr(download, "urlopen", fake_urlopen)
    monkeypatch.setattr(download, "snapshot_download", fake_snapshot)
    monkeypatch.setattr(download, "hf_hub_download", fake_hf_file)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv(download.INSTAORDER_URL_ENV, raising=False)
    calls["responses"] = responses
    return calls


@pytest.fixture
def bars(monkeypatch):
    created = []

    class RecordingTqdm(download.tqdm):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            created.append(self)

    monkeypatch.setattr(download, "tqdm", RecordingTqdm)
    return created


def test_a_file_is_streamed_with_a_progress_bar_then_renamed_into_place(network, bars, tmp_path):
    body = bytes(range(256)) * 9000  # > 2 chunks
    network["responses"]["https://example.test/w.pth"] = FakeResponse(body)
    target = tmp_path / "sam" / "w.pth"
    assert fetch_url("https://example.test/w.pth", target) == target
    assert target.read_bytes() == body
    assert list(target.parent.iterdir()) == [target]
    (bar,) = bars
    assert (bar.total, bar.n, bar.desc) == (len(body), len(body), "w.pth")


@pytest.mark.parametrize(
    "response",
    [
        FakeResponse(b"x" * 5000, break_after=3000),  # connection lost
        FakeResponse(b"x" * 5000, length=8000),  # body shorter than announced
    ],
    ids=["broken", "truncated"],
)
def test_a_failed_download_leaves_no_file(network, tmp_path, response):
    network["responses"]["https://example.test/w.pth"] = response
    target = tmp_path / "w.pth"
    with pytest.raises(DownloadError, match="example.test"):
        fetch_url("https://example.test/w.pth", target)
    assert list(tmp_path.iterdir()) == []


def test_an_http_error_is_a_download_error(monkeypatch, tmp_path):
    def not_found(url, timeout=None):
        raise urllib.error.HTTPError(url, 404, "Not Found", {}, None)

    monkeypatch.setattr(download, "urlopen", not_found)
    with pytest.raises(DownloadError, match="404"):
        fetch_url("https://example.test/gone.pth", tmp_path / "gone.pth")
    assert list(tmp_path.iterdir()) == []


def test_a_present_file_is_not_fetched_again(network, tmp_path):
    target = tmp_path / SAM_FILES["vit_h"]
    target.parent.mkdir(parents=True)
    target.write_bytes(b"already here")
    download_models(tmp_path, which=["sam"])
    assert network["urls"] == []
    assert target.read_bytes() == b"already here"
    (tmp_path / RAM_PLUS_FILE).parent.mkdir(parents=True)
    (tmp_path / RAM_PLUS_FILE).write_bytes(b"ram")
    download_models(tmp_path, which=["ram_plus"])
    assert network["files"] == []


def test_every_model_lands_at_its_registry_path(network, tmp_path, monkeypatch):
    sam_url = "https://dl.fbaipublicfiles.com/segment_anything/sam_vit_l_0b3195.pth"
    instaorder_url = "https://mirror.example.test/InstaOrder_InstaOrderNet_od.pth.tar"
    network["responses"].update({sam_url: FakeResponse(b"sam"), instaorder_url: FakeResponse(b"order"),
                                 BACKBONE_URL: FakeResponse(b"alexnet")})
    monkeypatch.setenv(download.INSTAORDER_URL_ENV, instaorder_url)
    download_models(tmp_path, sam_variant="vit_l")

    assert network["urls"] == [sam_url, BACKBONE_URL, instaorder_url]
    assert (tmp_path / BACKBONE_FILE).read_bytes() == b"alexnet"
    assert (tmp_path / LINEAR_FILE).is_file()
    assert (tmp_path / SAM_FILES["vit_l"]).read_bytes() == b"sam"
    assert (tmp_path / INSTAORDER_FILE).read_bytes() == b"order"
    snapshots = {repo: (local_dir, kwargs) for repo, local_dir, kwargs in network["snapshots"]}
    assert {repo: d for repo, (d, _) in snapshots.items()} == {
        "IDEA-Research/grounding-dino-tiny": tmp_path / GROUNDING_DINO_DIR,
        "openai/clip-vit-base-patch32": tmp_path / CLIP_DIR,
        "sd2-community/stable-diffusion-2-inpainting": tmp_path / SD_INPAINT_DIR,
        "xinlai/LISA-13B-llama2-v1": tmp_path / LISA_DIR,
        "openai/clip-vit-large-patch14": tmp_path / LISA_DIR / "clip-vit-large-patch14",  # LISA's vision tower
    }
    assert "*.ckpt" in snapshots["sd2-community/stable-diffusion-2-inpainting"][1]["ignore_patterns"]
    ((repo, filename, local_dir),) = network["files"]
    assert repo == "xinyu1205/recognize-anything-plus-model"
    assert local_dir / filename == tmp_path / RAM_PLUS_FILE


def test_instaorder_without_a_url_prints_where_to_put_it(network, tmp_path, capsys):
    download_models(tmp_path, which=["instaorder"])
    err = capsys.readouterr().err
    assert str(tmp_path / INSTAORDER_FILE) in err
    assert "drive.google.com" in err and download.INSTAORDER_URL_ENV in err
    assert network["urls"] == [] and not (tmp_path / INSTAORDER_FILE).exists()


def test_which_selects_models_and_bad_names_are_refused(network, tmp_path):
    download_models(tmp_path, which=["clip"])
    assert [repo for repo, _, _ in network["snapshots"]] == ["openai/clip-vit-base-patch32"]
    with pytest.raises(ValueError, match="no_such_model"):
        download_models(tmp_path, which=["no_such_model"])
    with pytest.raises(ValueError, match="vit_x"):
        download_models(tmp_path, which=["sam"], sam_variant="vit_x")
    assert network["urls"] == [] and len(network["snapshots"]) == 1


def test_offline_mode_is_a_clear_error(network, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DownloadError, match="HF_HUB_OFFLINE"):
        download_models(tmp_path)
    assert network["urls"] == network["snapshots"] == network["files"] == []
    assert list(tmp_path.iterdir()) == []
