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
