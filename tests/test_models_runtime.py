"""Torch's CPU threads in a process whose models run on a GPU (amodal.models.runtime)."""
import pytest
import torch

from amodal.models.runtime import GPU_PROCESS_CPU_THREADS, limit_cpu_threads


@pytest.fixture
def threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_a_gpu_process_keeps_few_cpu_threads(threads):
    torch.set_num_threads(GPU_PROCESS_CPU_THREADS + 2)
    limit_cpu_threads(torch.device("cuda"))
    assert torch.get_num_threads() == GPU_PROCESS_CPU_THREADS


def test_fewer_threads_are_not_raised(threads):
    torch.set_num_threads(1)
    limit_cpu_threads(torch.device("cuda"))
    assert torch.get_num_threads() == 1


def test_a_cpu_process_keeps_its_threads(threads):
    torch.set_num_threads(GPU_PROCESS_CPU_THREADS + 2)
    limit_cpu_threads(torch.device("cpu"))
    assert torch.get_num_threads() == GPU_PROCESS_CPU_THREADS + 2


class _Scale(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x: torch.Tensor, context: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        return self.conv(x) * scale + context


def test_a_batch_dynamic_module_compiles_once_for_every_batch_above_one():
    """The first call, of a full batch of 8, compiles the graph that every later batch from 2 to 8 runs, its keyword
    tensors' batch marked too; a batch of 1 compiles its own once."""
    from torch._dynamo.utils import counters

    from amodal.models.runtime import compile_batch_dynamic

    torch._dynamo.reset()
    counters.clear()
    module = _Scale()
    compile_batch_dynamic(module, fullgraph=True)
    eager = _Scale()
    eager.load_state_dict(module.state_dict())

    def call(m: torch.nn.Module, n: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(n)
        return m(torch.randn(n, 3, 8, 8, generator=g), context=torch.randn(n, 4, 8, 8, generator=g), scale=torch.tensor(2.0))

    call(module, 8)
    with torch._dynamo.config.patch(error_on_recompile=True):
        for n in (2, 5, 3, 7):
            torch.testing.assert_close(call(module, n), call(eager, n))
    assert counters["stats"]["unique_graphs"] == 1
    call(module, 1)
    assert counters["stats"]["unique_graphs"] == 2
    with torch._dynamo.config.patch(error_on_recompile=True):
        call(module, 1), call(module, 4)


def test_precision_gives_the_papers_dtypes_on_cuda_and_float32_on_the_cpu():
    from amodal.models.runtime import resolve_dtype

    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert resolve_dtype("auto", cuda, "paper", half=True) == torch.float16  # SD, CLIP, LISA
    assert resolve_dtype("auto", cuda, "paper", half=False) == torch.float32  # G-DINO, SAM, InstaOrder, RAM++
    assert resolve_dtype("auto", cpu, "paper", half=True) == resolve_dtype("auto", cpu, "bf16") == torch.float32
    assert resolve_dtype("bfloat16", cuda, "paper", half=False) == torch.bfloat16  # a named dtype wins
