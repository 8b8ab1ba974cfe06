"""
The floors a meta-step is measured against: the FLOPs and bytes of its ops, and the device's
measured matmul rate and copy bandwidth (bench.py's floor column and its --profile summary).

    with FlopCount() as flops, ByteCount() as traffic, PassCount() as passes:
        step()
    flops.flops / matmul_rate(device), traffic.bytes / copy_bandwidth(device)   # seconds, at best
    passes.pointwise, passes.copies   # element-wise passes over memory, the work FLOPs do not show
    with ConvolutionReplay() as convs:
        step()
    flops, seconds = convs.replay(device)   # the step's convolutions alone: what its kernels can do
"""
import collections
import math
import statistics
import time

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map
from torch.utils.flop_counter import flop_registry


def sync(device):
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


class FlopCount(TorchDispatchMode):
    """FLOPs of every matmul/convolution (forward and backward) run under it."""

    def __init__(self):
        super().__init__()
        self.flops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        counter = flop_registry.get(func._overloadpacket)
        if counter:
            shape = lambda t: t.shape if isinstance(t, torch.Tensor) else t
            self.flops += counter(*tree_map(shape, args), **tree_map(shape, kwargs or {}), out_val=tree_map(shape, out))
        return out


def distinct_bytes(t):
    """Bytes of memory a tensor covers: a broadcast (stride-0) dimension is read once."""
    n = 1
    for size, stride in zip(t.shape, t.stride()):
        n *= size if stride else 1
    return n * t.element_size()


class ByteCount(TorchDispatchMode):
    """Bytes that the ops run under it read and write, op by op, as if no cache held anything:
    every tensor argument is read (but an out= argument) and every result written, except that
    a view writes nothing and an in-place or out= op writes the arguments it mutates. Under vmap
    it sees the batched tensors."""

    def __init__(self):
        super().__init__()
        self.bytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        read, written = [], []
        for i, arg in enumerate(func._schema.arguments):
            value = args[i] if i < len(args) else kwargs.get(arg.name)
            tensors = [t for t in tree_flatten(value)[0] if isinstance(t, torch.Tensor)]
            if arg.alias_info is not None and arg.alias_info.is_write:
                written += tensors
            if not arg.is_out:
                read += tensors
        if not func._schema.is_mutable:
            storages = {t.untyped_storage().data_ptr() for t in read}
            written = [t for t in tree_flatten(out)[0]
                       if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in storages]
            if not written:
                return out   # a view: no memory traffic
        self.bytes += sum(map(distinct_bytes, read)) + sum(map(distinct_bytes, written))
        return out


COPIES = {'aten::copy_', 'aten::_to_copy', 'aten::clone', 'aten::cat', 'aten::index_select', 'aten::gather'}


class PassCount(TorchDispatchMode, collections.Counter):
    """Element-wise passes over memory of the ops run under it, counted by op name: `pointwise`
    ops (ATen's pointwise tag: mul, add, threshold_backward, ...) and `copies` (layout copies,
    concatenations, gathers), with the bytes they move (ByteCount's rule, for these ops alone)."""

    def __init__(self):
        TorchDispatchMode.__init__(self)
        collections.Counter.__init__(self)
        self.pointwise = self.copies = self.elementwise_bytes = 0
        self._bytes = ByteCount()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._overloadpacket._qualified_op_name
        copy = name in COPIES
        pointwise = not copy and torch.Tag.pointwise in func.tags
        if not (pointwise or copy):
            return func(*args, **(kwargs or {}))
        before = self._bytes.bytes
        out = self._bytes.__torch_dispatch__(func, types, args, kwargs)
        self.elementwise_bytes += self._bytes.bytes - before
        self.pointwise += pointwise
        self.copies += copy
        self[name.replace('aten::', '')] += 1
        return out


CONVOLUTIONS = {torch.ops.aten.convolution.default, torch.ops.aten.convolution_backward.default}


class Layout(collections.namedtuple('Layout', 'shape stride dtype')):
    """A recorded tensor argument: what a replay rebuilds it from."""


class ConvolutionReplay(TorchDispatchMode):
    """Records every convolution and convolution gradient run under it (under vmap: the grouped
    convolutions it makes), by shapes, strides and settings, with their FLOPs. `replay` runs each
    alone on fresh inputs of the same layout and returns (FLOPs, seconds) of them all: the time
    a step would take if every other op were free, its convolutions' caches as warm as repetition
    makes them, so the most of the matmul rate that torch's convolution kernels allow a step.
    After it, `timings` holds each kind of call's (seconds for all its calls, calls, FLOPs per
    call, description), slowest first."""

    def __init__(self):
        super().__init__()
        self.calls = collections.Counter()
        self.flops_per_call = {}
        self.timings = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func in CONVOLUTIONS:
            record = lambda a: (Layout(tuple(a.shape), a.stride(), a.dtype) if isinstance(a, torch.Tensor)
                                else tuple(a) if isinstance(a, list) else a)
            signature = (func, tuple(map(record, args)))
            self.calls[signature] += 1
            self.flops_per_call[signature] = convolution_flops(func, args, out)
        return out

    def replay(self, device, repeats=5):
        self.timings = []
        for (func, recorded), count in self.calls.items():
            args = [_random_strided(*a, device) if isinstance(a, Layout) else list(a) if isinstance(a, tuple) else a
                    for a in recorded]
            seconds = _median_seconds(lambda: func(*args), device, repeats + 1)
            self.timings.append((count * seconds, count, self.flops_per_call[func, recorded], describe(func, recorded)))
        self.timings.sort(reverse=True)
        return sum(n * f for _, n, f, _ in self.timings), sum(t for t, *_ in self.timings)


def describe(func, recorded):
    """'convolution [5, 32, 28, 28] * [2048, 1, 3, 3], groups 32' and the like, from a recorded call."""
    shapes = [list(a.shape) for a in recorded if isinstance(a, Layout)]
    if func == torch.ops.aten.convolution.default:
        kind = 'transposed convolution' if recorded[6] else 'convolution'
        return f'{kind} {shapes[0]} * {shapes[1]}, groups {recorded[8]}'
    wanted = ' and '.join(name for name, on in zip(('input', 'weight'), recorded[10]) if on)
    return f'{wanted} gradient of {shapes[1]} * {shapes[2]}, groups {recorded[9]}'


def _random_strided(shape, stride, dtype, device):
    """A random tensor of this layout, a broadcast (stride-0) dimension included."""
    storage = 1 + sum((size - 1) * step for size, step in zip(shape, stride) if size)
    return torch.randn(storage, dtype=dtype, device=device).as_strided(shape, stride)


def convolution_flops(func, args, out):
    """FLOPs of one convolution or convolution_backward call, groups counted right (torch's
    counter takes a grouped weight gradient for a dense one): each element on the output side
    of the forward form costs 2 x (input channels per group) x kernel size, and a backward call
    computes one such convolution for each gradient it returns (input, weight)."""
    if func == torch.ops.aten.convolution.default:
        x, weight, transposed = args[0], args[1], args[6]
        outputs, gradients = (x if transposed else out).numel(), 1
    else:
        grad_out, x, weight, transposed, mask = args[0], args[1], args[2], args[7], args[10]
        outputs, gradients = (x if transposed else grad_out).numel(), mask[0] + mask[1]
    return 2 * outputs * weight.shape[1] * math.prod(weight.shape[2:]) * gradients


def matmul_rate(device):
    """Measured fp32 matmul FLOP/s (TF32 on CUDA): the ceiling the FLOP floor is computed against."""
    n = 8192 if device.type == 'cuda' else 2048
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    return 2 * n ** 3 / _median_seconds(lambda: a @ b, device)


def copy_bandwidth(device):
    """Measured bytes/s of copying one large tensor into another (read + write)."""
    n = (1 << 28) if device.type == 'cuda' else (1 << 26)   # 1 GiB / 256 MiB of float32
    a, b = torch.ones(n, device=device), torch.empty(n, device=device)
    return 2 * 4 * n / _median_seconds(lambda: b.copy_(a), device)


def _median_seconds(fn, device, repeats=6):
    times = []
    for _ in range(repeats):
        sync(device)
        t = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t)
    return statistics.median(times[1:])
