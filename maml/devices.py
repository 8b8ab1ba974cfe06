"""
The device a command runs on, and the settings that make it fast there.

    device = available_device('cuda')   # refused in one sentence on a machine without CUDA
    tune(device)                         # cuDNN autotuner and TF32 on CUDA; glibc's heap kept on the CPU
    print(device_name(device))           # 'NVIDIA H100 80GB HBM3' or 'CPU (2 threads)'
"""
import ctypes

import torch

from .errors import FlagError

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3   # glibc's mallopt parameters (malloc.h)


def available_device(name):
    """torch.device(name), refused in one sentence when it is a GPU this machine lacks."""
    device = torch.device(name)
    if device.type == 'cuda' and not torch.cuda.is_available():
        raise FlagError(f"--device {name} was asked for but this machine has no CUDA GPU; use --device cpu.")
    return device


def tune(device):
    """The speed settings of `device`'s kind: tune_cuda or tune_cpu."""
    if device.type == 'cuda':
        tune_cuda()
    else:
        tune_cpu()


def tune_cuda():
    """cuDNN picks the fastest convolution algorithm per shape; fp32 matmuls and convolutions use TF32.
    The autotuner chooses afresh in each process, some algorithms are non-deterministic, so a run
    resumed on CUDA is not bit for bit the uninterrupted one (on the CPU it is)."""
    torch.backends.cudnn.benchmark = True
    torch.backends.cudnn.allow_tf32 = True
    torch.set_float32_matmul_precision('high')   # TF32 for matmuls


def device_name(device):
    device = torch.device(device)
    if device.type == 'cuda':
        return torch.cuda.get_device_name(device)
    threads = torch.get_num_threads()
    return f"CPU ({threads} thread{'s' if threads > 1 else ''})"


def tune_cpu():
    """Keep freed memory in the heap (glibc only). By default glibc maps each block of more than
    128 kB to 32 MB afresh and returns it when freed, so every activation tensor of a meta-step (tens
    of MB at the seed's defaults) is page-faulted in again at every step; with the heap kept, a
    second-order Omniglot step ran 1.1-1.8x faster on a 2-core AMD EPYC (docs/speed.md), and 2.8x
    for a Meta built in a notebook. Every Meta applies it (it is process-wide and costs nothing to
    repeat), so the speed does not depend on the entry point."""
    try:
        libc = ctypes.CDLL('libc.so.6')
    except OSError:   # another C library (macOS, musl): left as it is
        return
    libc.mallopt(M_MMAP_THRESHOLD, 1 << 30)
    libc.mallopt(M_TRIM_THRESHOLD, 2 ** 31 - 1)
