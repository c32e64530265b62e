"""Full-size random-weight models in the published formats, for speed and memory measurements.

Each model's tiny writer lays out its folder (tokenizers, scheduler, processor files); the weights
and configs are then replaced by the published architectures, built on the GPU (fast random init)
and saved in the published formats. Results from them are noise; their arithmetic is the real one.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from transformers import BertTokenizer

from amodal.models import clip, grounding_dino, instaorder, sam, sd_inpaint
from amodal.models.lisa_checkpoint import VISION_TOWER, LisaExtras, config_dict, llama_config
from amodal.models.lisa_tiny import OPENAI_CLIP_PREPROCESSOR, write_shards, write_tiny_tokenizer
from amodal.models.ram_plus import tag_list
from amodal.models.ram_plus_net import PUBLISHED, RamPlusNet, checkpoint_state
from amodal.models.registry import (
    CLIP_DIR,
    GROUNDING_DINO_DIR,
    INSTAORDER_FILE,
    RAM_PLUS_FILE,
    SAM_FILES,
    SD_INPAINT_DIR,
)

# LISA-13B (xinlai/LISA-13B-llama2-v1): LLaMA-2-13B with LLaMA's 32000 tokens and LISA's 3 added ones,
# CLIP ViT-L/14 at 224 px, SAM ViT-H
LLAMA_2_13B = {"hidden_size": 5120, "intermediate_size": 13824, "num_hidden_layers": 40, "num_attention_heads": 40}
LISA_VOCAB_SIZE = 32003
CLIP_VIT_L_14 = {"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24, "num_attention_heads": 16,
                 "image_size": 224, "patch_size": 14}
CLIP_TEXT_L_14 = {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12}
LISA_SHARDS = 3  # as published


def write_full_size_models(model_dir: Path, device: str = "cuda") -> None:
    from transformers import CLIPConfig, CLIPModel
    from transformers import GroundingDinoConfig, GroundingDinoForObjectDetection

    model_dir = Path(model_dir)
    torch.manual_seed(0)
    with torch.device(device):
        # SAM ViT-H: a plain fp32 state dict, as published
        path = model_dir / SAM_FILES["vit_h"]
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save({k: v.cpu() for k, v in sam.build_sam(sam.VIT_H).state_dict().items()}, path)

        # Grounding DINO Swin-T (transformers' defaults are grounding-dino-tiny), published preprocessing
        folder = model_dir / GROUNDING_DINO_DIR
        grounding_dino.write_tiny(folder)
        write_word_tokenizer(folder)
        GroundingDinoForObjectDetection(GroundingDinoConfig()).save_pretrained(folder)
        pre = json.loads((folder / "preprocessor_config.json").read_text())
        pre["size"] = {"shortest_edge": 800, "longest_edge": 1333}
        (folder / "preprocessor_config.json").write_text(json.dumps(pre, indent=2))

        # CLIP ViT-B/32 (transformers' defaults)
        folder = model_dir / CLIP_DIR
        clip.write_tiny(folder)
        CLIPModel(CLIPConfig()).save_pretrained(folder)

        write_full_size_inpainter(model_dir / SD_INPAINT_DIR)

        # RAM++ Swin-L at 384 px with the 4585 tag descriptions, in the training script's checkpoint dict
        net = RamPlusNet(PUBLISHED)
        with torch.no_grad():
            net.label_embed.copy_(torch.nn.functional.normalize(torch.randn_like(net.label_embed), dim=-1))
        path = model_dir / RAM_PLUS_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"model": {k: v.cpu() for k, v in checkpoint_state(net).items()}}, path)

        # InstaOrder: ResNet-50 layout in the released tar format
        net = instaorder.InstaOrderNet()
        path = model_dir / INSTAORDER_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"step": 0, "state_dict": {f"module.{k}": v.cpu() for k, v in net.state_dict().items()}}, path)


def write_full_size_inpainter(folder: Path) -> None:
    """SD2 inpainting's UNet, VAE and OpenCLIP ViT-H text tower in its folder layout, saved in fp16 (built on
    the current default device)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    folder = Path(folder)
    sd_inpaint.write_tiny(folder)
    UNet2DConditionModel(
        sample_size=64, in_channels=9, out_channels=4, layers_per_block=2,
        block_out_channels=(320, 640, 1280, 1280), attention_head_dim=(5, 10, 20, 20),
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        cross_attention_dim=1024, use_linear_projection=True,
    ).half().save_pretrained(folder / "unet")
    AutoencoderKL(
        block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=2, latent_channels=4, sample_size=512,
        scaling_factor=0.18215,
    ).half().save_pretrained(folder / "vae")
    text = json.loads((folder / "text_encoder" / "config.json").read_text())
    CLIPTextModel(CLIPTextConfig(
        vocab_size=49408, hidden_size=1024, intermediate_size=4096, num_hidden_layers=23,
        num_attention_heads=16, max_position_embeddings=77, hidden_act="gelu", projection_dim=512,
        bos_token_id=text["bos_token_id"], eos_token_id=text["eos_token_id"], pad_token_id=text["pad_token_id"],
    )).half().save_pretrained(folder / "text_encoder")


def write_word_tokenizer(folder: Path) -> None:
    """Grounding DINO's WordPiece tokenizer with every word of RAM++'s tag list whole, as in
    ``bert-base-uncased`` (the tiny one spells most words letter by letter, which would overstate the
    tokens of a prompt of tags and split it into more forward passes than the published tokenizer does)."""
    words = {w for tag in tag_list() for w in re.findall(r"\w+|[^\w\s]", tag.lower())}
    vocab = grounding_dino.tiny_vocabulary()
    vocab += sorted(words - set(vocab))
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    BertTokenizer(vocab=str(folder / "vocab.txt"), do_lower_case=True).save_pretrained(folder)


def write_full_size_lisa(folder: Path, device: str = "cuda") -> None:
    """LISA-13B in the published layout (``amodal.models.lisa_checkpoint``): bf16 ``.bin`` shards, the CLIP
    tower beside them. The tokenizer is the tiny test one (LLaMA's own cannot be fetched here): it spells
    prompts in more tokens than LLaMA's does."""
    from transformers import CLIPConfig, CLIPModel, LlamaForCausalLM

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    write_tiny_tokenizer(folder)
    config = config_dict(vocab_size=LISA_VOCAB_SIZE, mm_hidden_size=CLIP_VIT_L_14["hidden_size"], **LLAMA_2_13B)
    (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    torch.manual_seed(0)
    with torch.device(device):
        llm = LlamaForCausalLM._from_config(llama_config(config), dtype=torch.bfloat16)
        state = {k: v.cpu() for k, v in llm.state_dict().items()}
        del llm
        extras = LisaExtras(sam.build_sam(sam.VIT_H), config["mm_hidden_size"], config["hidden_size"], sam.PROMPT_DIM)
        state.update({"model." + k: v.to(torch.bfloat16).cpu() for k, v in extras.state_dict().items()})
        del extras
        tower = CLIPModel(CLIPConfig(text_config=CLIP_TEXT_L_14, vision_config=CLIP_VIT_L_14, projection_dim=768))
        tower.save_pretrained(folder / Path(VISION_TOWER).name)
    (folder / Path(VISION_TOWER).name / "preprocessor_config.json").write_text(json.dumps(OPENAI_CLIP_PREPROCESSOR))
    write_shards(folder, state, shards=LISA_SHARDS)
    torch.cuda.empty_cache()

