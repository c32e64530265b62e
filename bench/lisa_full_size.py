"""Time and peak GPU memory of one LISA-13B grounding at full size, with random weights.

Builds LISA-13B's arithmetic directly on the GPU (no checkpoint file): LLaMA-2-13B (hidden 5120,
40 layers, 40 heads, MLP 13824, 32000 + 3 added tokens), CLIP ViT-L/14 at 224 px and SAM ViT-H,
in bfloat16 (SAM's prompt encoder and mask decoder in float32, as the adapter runs them). One photo
goes through ``LisaGrounder.ground_batch`` (``--batch`` copies of it, one call) with a fixed number of
new tokens, the last one ``[SEG]``, so
every stage runs: CLIP, the prompt's prefill, the decoding steps, SAM's encoder and mask decoder.
Random weights would not say ``[SEG]``: a hook on LLaMA's output layer picks the tokens, after the
layer has computed its logits. The tokenizer is the tiny test one (the real LLaMA tokenizer cannot be
downloaded here); it spells the prompt in more tokens than LLaMA's does, and the JSON records how many.

With ``--checkpoint``, LISA is loaded instead from a folder in the published layout (as
``bench/fullsize.write_full_size_lisa`` writes it) through ``LisaGrounder.from_pretrained``, the workers'
own path, which also takes ``--quantization 8bit`` or ``4bit`` (bitsandbytes).

    python bench/lisa_full_size.py [--new-tokens 32] [--repeats 3] [--batch 1] [--image PHOTO]
    python bench/lisa_full_size.py --checkpoint MODELS/LISA-13B-llama2-v1 --quantization 8bit --batch 8 --out OUT.json

Writes ``bench/results/lisa_full_size.json``.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import transformers
from PIL import Image
from transformers import CLIPImageProcessorPil, CLIPVisionConfig, CLIPVisionModel, LlamaForCausalLM, LlamaTokenizer

from amodal.models.lisa import LisaGrounder, encode_prompt, prompt_text
from amodal.models.lisa_checkpoint import LisaExtras, config_dict, llama_config
from amodal.models.lisa_tiny import write_tiny_tokenizer
from amodal.models.sam import PROMPT_DIM, VIT_H, build_sam

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.lisascript import scripted  # noqa: E402  (the tests' scripted decoding)
from tests.paths import EXAMPLES  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "lisa_full_size.json"
PHOTO = EXAMPLES / "images" / "cat-7875506_640_cat.jpg"
QUERY = "what is the mammal in this image?"
LLAMA_2_13B = {"hidden_size": 5120, "intermediate_size": 13824, "num_hidden_layers": 40, "num_attention_heads": 40}
VOCAB_SIZE = 32003  # LLaMA's 32000 and [SEG], <im_start>, <im_end>
CLIP_VIT_L_14 = CLIPVisionConfig(
    hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
    image_size=224, patch_size=14, projection_dim=768,
)


def build(device: torch.device, dtype: torch.dtype, new_tokens: int, tokenizer_dir: Path) -> LisaGrounder:
    """A random-weight full-size LISA, initialised on the GPU."""
    write_tiny_tokenizer(tokenizer_dir)
    config = config_dict(vocab_size=VOCAB_SIZE, mm_hidden_size=CLIP_VIT_L_14.hidden_size, **LLAMA_2_13B)
    with torch.device(device):
        llm = LlamaForCausalLM._from_config(llama_config(config), dtype=dtype)
        vision = CLIPVisionModel._from_config(CLIP_VIT_L_14, dtype=dtype)
        extras = LisaExtras(build_sam(VIT_H), CLIP_VIT_L_14.hidden_size, config["hidden_size"], PROMPT_DIM)
    return LisaGrounder(
        llm, vision, extras, LlamaTokenizer.from_pretrained(tokenizer_dir), CLIPImageProcessorPil(),
        device, dtype, max_new_tokens=new_tokens,
    )


def timed(fn):
    """``fn()``'s result and its seconds, the GPU (where there is one) synchronised before and after."""
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    sync()
    start = time.perf_counter()
    result = fn()
    sync()
    return result, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--new-tokens", type=int, default=32, help="tokens generated, the last one [SEG]")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch", type=int, default=1, help="jobs grounded in one call")
    parser.add_argument("--image", type=Path, default=PHOTO)
    parser.add_argument("--checkpoint", type=Path, help="load LISA from this folder (published layout)")
    parser.add_argument("--quantization", choices=("", "8bit", "4bit"), default="",
                        help="LLaMA's bitsandbytes quantization (with --checkpoint)")
    parser.add_argument("--device", default="cuda", help="cuda, or cpu (float32) to check the script on a "
                                                            "small --checkpoint")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("bench/lisa_full_size.py needs a CUDA GPU; none is visible to torch on this machine")
    if device.type != "cuda" and not args.checkpoint:
        sys.exit("--device cpu needs --checkpoint (a full-size LISA is built on the GPU)")
    cuda = device.type == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    image = np.asarray(Image.open(args.image).convert("RGB"))
    images, queries = [image] * args.batch, [QUERY] * args.batch

    if args.checkpoint:
        grounder, build_s = timed(lambda: LisaGrounder.from_pretrained(
            args.checkpoint, device, dtype, load_in_8bit=args.quantization == "8bit",
            load_in_4bit=args.quantization == "4bit", max_new_tokens=args.new_tokens))
    elif args.quantization:
        sys.exit("--quantization needs --checkpoint (bitsandbytes quantizes while loading)")
    else:
        with tempfile.TemporaryDirectory() as tokenizer_dir:
            grounder, build_s = timed(lambda: build(device, dtype, args.new_tokens, Path(tokenizer_dir)))
    word = grounder.tokenizer.convert_tokens_to_ids("▁the")
    script = [word] * (args.new_tokens - 1) + [grounder.seg_token_id]
    weights_gib = torch.cuda.memory_allocated() / 2**30 if cuda else None

    with scripted(grounder, script):  # warm-up
        grounder.ground_batch(images, queries)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    ground_s = []
    for _ in range(args.repeats):
        with scripted(grounder, script):
            (grounding, *_), seconds = timed(lambda: grounder.ground_batch(images, queries))
        ground_s.append(seconds)
    with scripted(grounder, script):
        generations, generate_s = timed(lambda: grounder.generate(images, queries))
    _, mask_s = timed(lambda: grounder.masks_from_generations(images, generations))
    _, sam_encoder_s = timed(lambda: grounder.sam.encode(images[:4]))
    _, clip_s = timed(lambda: grounder.image_features(images))

    parameters = {
        "llama": sum(p.numel() for p in grounder.llm.parameters()),
        "clip_vision": sum(p.numel() for p in grounder.vision.parameters()),
        "sam": sum(p.numel() for p in grounder.extras.visual_model.parameters()),
        "projector_and_text_fcs": sum(
            p.numel() for m in (grounder.extras.mm_projector, grounder.extras.text_hidden_fcs) for p in m.parameters()
        ),
    }
    result = {
        "device": torch.cuda.get_device_name(device) if cuda else "cpu",
        "dtype": str(dtype).removeprefix("torch."),
        "quantization": args.quantization or "none",
        "loaded_from": "checkpoint folder (LisaGrounder.from_pretrained)" if args.checkpoint else "built on the GPU",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "image_hw": list(image.shape[:2]),
        "query": QUERY,
        "prompt_tokens": len(encode_prompt(grounder.tokenizer, prompt_text(QUERY))) - 1 + 256,
        "new_tokens": len(generations[0].ids),
        "batch": args.batch,
        "parameters": parameters,
        "build_s": round(build_s, 3),
        "ground_s": [round(s, 4) for s in ground_s],
        "ground_median_s": round(statistics.median(ground_s), 4),
        "generate_s": round(generate_s, 4),
        "masks_from_generations_s": round(mask_s, 4),
        "sam_encoder_s_for_up_to_4": round(sam_encoder_s, 4),
        "clip_features_s": round(clip_s, 4),
        "weights_gib": round(weights_gib, 3) if cuda else None,
        "peak_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 3) if cuda else None,
        "mask_pixels": int(grounding.mask.sum()) if grounding.mask is not None else 0,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
