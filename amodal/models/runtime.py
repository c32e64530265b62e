"""Device and precision selection shared by every adapter."""
from __future__ import annotations

import torch


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """``auto`` is fp16 on CUDA (bf16 where the card has it) and fp32 on the CPU."""
    if dtype == "auto":
        if device.type != "cuda":
            return torch.float32
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[dtype]


# CPU threads of torch in a process that runs models on a GPU: its CPU work is pre- and post-processing
# (transformers' torchvision image processors, mask resizes), and several such processes share the host. A
# pool of every core stalls at each parallel region while any core is busy elsewhere: Grounding DINO's
# preprocessing of 4 images took 0.19 s beside one running UNet process against 0.024 s alone (H200, 16
# cores; bench/gpu_profile.py).
GPU_PROCESS_CPU_THREADS = 2


def limit_cpu_threads(device: torch.device) -> None:
    """Cap torch's CPU threads in a process whose models run on a GPU (``GPU_PROCESS_CPU_THREADS``)."""
    if device.type == "cuda" and torch.get_num_threads() > GPU_PROCESS_CPU_THREADS:
        torch.set_num_threads(GPU_PROCESS_CPU_THREADS)
