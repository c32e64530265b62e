"""Device and precision selection shared by every adapter."""
from __future__ import annotations

import functools

import torch


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device, precision: str = "bf16", half: bool = True) -> torch.dtype:
    """A model's dtype: ``dtype`` if it names one; else float32 on the CPU; on CUDA, with ``precision="paper"``,
    float16 for the models the paper's code runs in half precision (``half``: SD, CLIP, LISA) and float32 for
    the others; with ``"bf16"``, bfloat16 (float16 where the card lacks it)."""
    if dtype != "auto":
        return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[dtype]
    if device.type != "cuda":
        return torch.float32
    if precision == "paper":
        return torch.float16 if half else torch.float32
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


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


def compile_batch_dynamic(module: torch.nn.Module, **options) -> None:
    """Put ``module``'s forward through ``torch.compile`` with its inputs' batch dimension dynamic from the first call.

    Left to itself, torch.compile first compiles a graph for the batch size it meets, then one with a dynamic
    batch at the next size, and keeps a batch of 1 static: three compiles for a worker to warm. Marked dynamic
    from the start, a batch above 1 compiles one graph for every size above 1 (on one H200 the SD2 UNet's static
    graph took 79 s to compile and its dynamic one 103 s; bench/results/gpu_throughput_warm_serial.json). Every
    tensor argument whose first dimension is the first one's batch is marked; a batch of 1 stays static."""
    compiled = torch.compile(module.forward, **options)

    @functools.wraps(module.forward)
    def forward(*args, **kwargs):
        tensors = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor) and a.dim()]
        batch = tensors[0].shape[0] if tensors else 1
        if batch > 1:
            for tensor in tensors:
                if tensor.shape[0] == batch:
                    torch._dynamo.mark_dynamic(tensor, 0)
        return compiled(*args, **kwargs)

    module.forward = forward
