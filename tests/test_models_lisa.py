"""LISA adapter: a tiny random-weight LISA in the published folder layout, loaded by the real loader."""
from __future__ import annotations

import importlib.util
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from amodal.models.base import MissingCheckpointError
from amodal.models.lisa import (
    IMAGE_PLACEHOLDER,
    Generation,
    LisaGrounder,
    encode_prompt,
    prompt_text,
    write_tiny,
)
from amodal.models.registry import LISA_DIR, ModelSet
from amodal.settings import Settings
from tests.lisascript import scripted
from tests.paths import EXAMPLES

PHOTO = EXAMPLES / "images" / "cat-7875506_640_cat.jpg"
QUERY = "what is the mammal in this image?"
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def image() -> np.ndarray:
    return np.asarray(Image.open(PHOTO).convert("RGB"))


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("models") / LISA_DIR
    write_tiny(path)
    return path


@pytest.fixture(scope="module")
def grounder(folder) -> LisaGrounder:
    return LisaGrounder.from_pretrained(folder, device=CPU, dtype=torch.float32)


def shard_state(folder: Path) -> dict[str, torch.Tensor]:
    index = json.loads((folder / "pytorch_model.bin.index.json").read_text())
    state = {}
    for name in set(index["weight_map"].values()):
        state.update(torch.load(folder / name, weights_only=True))
    return state


def test_tiny_checkpoint_has_the_published_layout(folder):
    config = json.loads((folder / "config.json").read_text())
    assert config["architectures"] == ["LISAForCausalLM"] and config["model_type"] == "llava"
    assert config["mm_vision_tower"] == "openai/clip-vit-large-patch14"
    assert config["out_dim"] == 256 and config["mm_vision_select_layer"] == -2 and config["mm_use_im_start_end"]
    index = json.loads((folder / "pytorch_model.bin.index.json").read_text())
    assert sorted(set(index["weight_map"].values())) == [
        "pytorch_model-00001-of-00002.bin", "pytorch_model-00002-of-00002.bin"
    ]
    state = shard_state(folder)
    assert set(state) == set(index["weight_map"])
    hidden = config["hidden_size"]
    assert state["model.embed_tokens.weight"].shape == (config["vocab_size"], hidden)
    assert state["lm_head.weight"].shape == (config["vocab_size"], hidden)
    assert state["model.mm_projector.weight"].shape == (hidden, config["mm_hidden_size"])
    assert state["model.text_hidden_fcs.0.0.weight"].shape == (hidden, hidden)
    assert state["model.text_hidden_fcs.0.2.weight"].shape == (256, hidden)
    assert state["model.layers.1.self_attn.rotary_emb.inv_freq"].dtype == torch.float32
    assert state["model.layers.0.self_attn.q_proj.weight"].dtype == torch.bfloat16
    for part in ("image_encoder", "prompt_encoder", "mask_decoder"):
        assert any(k.startswith(f"model.visual_model.{part}.") for k in state)
    assert not any("vision_tower" in k for k in state)  # CLIP is read from its own folder
    assert json.loads((folder / "added_tokens.json").read_text()) == {
        "[SEG]": config["vocab_size"] - 3, "<im_start>": config["vocab_size"] - 2, "<im_end>": config["vocab_size"] - 1
    }
    for name in ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json"):
        assert (folder / name).is_file()
    clip = folder / "clip-vit-large-patch14"
    assert json.loads((clip / "config.json").read_text())["model_type"] == "clip"
    assert json.loads((clip / "preprocessor_config.json").read_text())["size"] == 224


def test_tiny_checkpoint_loads_every_tensor(folder, grounder):
    state = shard_state(folder)
    loaded = {
        "lm_head.weight": grounder.llm.lm_head.weight,
        "model.layers.1.mlp.down_proj.weight": grounder.llm.model.layers[1].mlp.down_proj.weight,
        "model.mm_projector.bias": grounder.extras.mm_projector.bias,
        "model.text_hidden_fcs.0.2.weight": grounder.extras.text_hidden_fcs[0][2].weight,
        "model.visual_model.mask_decoder.iou_token.weight": grounder.sam.model.mask_decoder.iou_token.weight,
        "model.visual_model.image_encoder.pos_embed": grounder.sam.model.image_encoder.pos_embed,
    }
    for key, tensor in loaded.items():
        assert torch.equal(tensor, state[key].float()), key
    assert grounder.sam.model.image_encoder.img_size == 256  # read from the tiny SAM's tensors
    assert grounder.seg_token_id == grounder.tokenizer.convert_tokens_to_ids("[SEG]") == 320


@pytest.mark.parametrize(
    "change, key",
    [
        ("reshape", "model.layers.1.mlp.up_proj.weight"),
        ("reshape", "model.text_hidden_fcs.0.2.weight"),
        ("drop", "lm_head.weight"),
        ("drop", "model.visual_model.mask_decoder.iou_token.weight"),
        ("add", "model.vision_tower.vision_tower.vision_model.post_layernorm.weight"),
    ],
)
def test_a_checkpoint_that_does_not_match_fails_naming_the_key(folder, tmp_path, change, key):
    broken = tmp_path / LISA_DIR
    shutil.copytree(folder, broken)
    index = json.loads((broken / "pytorch_model.bin.index.json").read_text())
    shard = broken / index["weight_map"].get(key, "pytorch_model-00002-of-00002.bin")
    state = torch.load(shard, weights_only=True)
    if change == "reshape":
        state[key] = torch.zeros(state[key].shape[0] + 1, *state[key].shape[1:])
    elif change == "drop":
        del state[key]
    else:
        state[key] = torch.zeros(3)
    torch.save(state, shard)
    with pytest.raises(ValueError, match=re.escape(key)):
        LisaGrounder.from_pretrained(broken, device=CPU, dtype=torch.float32)


def test_a_missing_folder_is_a_missing_checkpoint(tmp_path):
    with pytest.raises(MissingCheckpointError):
        LisaGrounder.from_pretrained(tmp_path / LISA_DIR, device=CPU, dtype=torch.float32)


def test_quantized_loading_without_bitsandbytes_is_a_clear_error(folder):
    if importlib.util.find_spec("bitsandbytes") is not None:
        pytest.skip("bitsandbytes is installed")
    with pytest.raises(ImportError, match="bitsandbytes"):
        LisaGrounder.from_pretrained(folder, device=CPU, dtype=torch.float32, load_in_8bit=True)


def test_prompt_text_is_the_llava_v1_template_with_the_query_verbatim():
    assert prompt_text(QUERY) == (
        "A chat between a curious human and an artificial intelligence assistant. The assistant gives helpful,"
        " detailed, and polite answers to the human's questions. USER: <im_start><image><im_end>\n"
        "what is the mammal in this image? ASSISTANT:"
    )


def test_prompt_ids_strip_whitespace_at_the_added_tokens(grounder):
    tokenizer = grounder.tokenizer
    ids = encode_prompt(tokenizer, prompt_text(QUERY))
    start, end = tokenizer.convert_tokens_to_ids(["<im_start>", "<im_end>"])
    at = ids.index(IMAGE_PLACEHOLDER)
    assert ids.count(IMAGE_PLACEHOLDER) == 1 and ids[at - 1 : at + 2] == [start, IMAGE_PLACEHOLDER, end]
    assert ids[0] == tokenizer.bos_token_id and tokenizer.bos_token_id not in ids[1:]
    head = tokenizer("A chat between a curious human and an artificial intelligence assistant. The assistant"
                     " gives helpful, detailed, and polite answers to the human's questions. USER:",
                     add_special_tokens=False).input_ids
    tail = tokenizer(f"{QUERY} ASSISTANT:", add_special_tokens=False).input_ids
    assert ids == [tokenizer.bos_token_id, *head, start, IMAGE_PLACEHOLDER, end, *tail]
    assert tokenizer.convert_tokens_to_ids("<0x0A>") not in ids  # the newline after <im_end> is stripped


def test_image_features_are_256_projected_patches(grounder, image):
    features = grounder.image_features([image, image[::-1].copy()])
    assert features.shape == (2, 256, grounder.llm.config.hidden_size)
    assert torch.isfinite(features).all()


def test_seg_prompt_comes_from_the_state_that_predicted_the_first_seg(grounder):
    seg, eos = grounder.seg_token_id, grounder.tokenizer.eos_token_id
    ids = torch.tensor([5, seg, 7, seg, eos])
    hidden = torch.randn(5, grounder.llm.config.hidden_size, generator=torch.Generator().manual_seed(0))
    prompt = grounder.seg_prompt(Generation(ids, hidden))
    assert prompt.shape == (256,) and prompt.dtype == torch.float32
    assert torch.allclose(prompt, grounder.extras.seg_embedding(hidden[1]))
    others = hidden.clone()
    others[[0, 2, 3, 4]] += 1.0
    assert torch.equal(grounder.seg_prompt(Generation(ids, others)), prompt)
    assert grounder.seg_prompt(Generation(torch.tensor([5, 7, eos]), hidden[:3])) is None


def test_masks_from_generations(grounder, image):
    seg, eos = grounder.seg_token_id, grounder.tokenizer.eos_token_id
    hidden = torch.randn(3, grounder.llm.config.hidden_size, generator=torch.Generator().manual_seed(1))
    generation = Generation(torch.tensor([5, seg, eos]), hidden)
    mask = grounder.masks_from_generations([image], [generation])[0]
    assert mask.shape == image.shape[:2] and mask.dtype == bool
    assert 0 < mask.mean() < 1
    assert grounder.masks_from_generations([image], [Generation(torch.tensor([5, eos]), hidden[:2])]) == [None]


def test_generation_keeps_the_normed_last_state_that_predicted_each_token(grounder, image):
    seg, eos = grounder.seg_token_id, grounder.tokenizer.eos_token_id
    with scripted(grounder, [seg, eos]):
        (generation,) = grounder.generate([image], [QUERY])
    assert generation.ids.tolist() == [seg, eos]
    ids = encode_prompt(grounder.tokenizer, prompt_text(QUERY)) + [seg]
    at = ids.index(IMAGE_PLACEHOLDER)
    with torch.inference_mode():
        tokens = grounder.llm.get_input_embeddings()(torch.tensor(ids).clamp(min=0))
        embeds = torch.cat([tokens[:at], grounder.image_features([image])[0], tokens[at + 1 :]])[None]
        states = grounder.llm.model(inputs_embeds=embeds).last_hidden_state[0]
    assert len(states) == len(ids) - 1 + 256
    assert torch.allclose(generation.hidden, states[-2:], atol=1e-5)


def test_ground_end_to_end_on_a_photo(grounder, image):
    seg, eos = grounder.seg_token_id, grounder.tokenizer.eos_token_id
    with scripted(grounder, [seg, eos] * 2):
        first = grounder.ground(image, QUERY)
        second = grounder.ground(image, QUERY)
    assert first.mask.shape == image.shape[:2] and first.mask.dtype == bool
    assert 0 < first.mask.mean() < 1
    assert np.array_equal(first.mask, second.mask)
    assert first.text == "[SEG]"


def test_an_answer_without_seg_has_no_mask(grounder, image):
    word, eos = grounder.tokenizer.convert_tokens_to_ids("▁the"), grounder.tokenizer.eos_token_id
    with scripted(grounder, [word, eos]):
        grounding = grounder.ground(image, QUERY)
    assert grounding.mask is None
    assert grounding.text == "the"


def test_bad_inputs_are_refused(grounder, image):
    with pytest.raises(ValueError, match="uint8 RGB"):
        grounder.ground(image[..., 0], QUERY)
    with pytest.raises(ValueError, match="empty query"):
        grounder.ground(image, "  ")


def test_the_quantization_setting_is_checked(folder):
    models = ModelSet(folder.parent,
                      Settings(grounder="lisa", lisa_quantization="2bit", device="cpu", dtype="float32"))
    with pytest.raises(ValueError, match="lisa_quantization"):
        models.grounder


@pytest.mark.skipif(not torch.cuda.is_available() or importlib.util.find_spec("bitsandbytes") is None,
                    reason="8-bit and 4-bit loading need a CUDA device and bitsandbytes")
@pytest.mark.parametrize("bits", ["8bit", "4bit"])
def test_quantized_llama_grounds_on_cuda(folder, image, bits):
    import bitsandbytes as bnb

    models = ModelSet(folder.parent,
                      Settings(grounder="lisa", lisa_quantization=bits, device="cuda", dtype="float16"))
    grounder = models.grounder
    quantized = bnb.nn.Linear8bitLt if bits == "8bit" else bnb.nn.Linear4bit
    assert isinstance(grounder.llm.model.layers[0].self_attn.q_proj, quantized)
    assert isinstance(grounder.llm.model.layers[1].mlp.down_proj, quantized)
    with scripted(grounder, [grounder.seg_token_id, grounder.tokenizer.eos_token_id]):
        grounding = grounder.ground(image, QUERY)
    assert grounding.text == "[SEG]"
    assert grounding.mask.shape == image.shape[:2] and grounding.mask.dtype == bool
