"""The config-built network: every layer of the vocabulary, functional calls, batch norm, errors."""
import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

from conftest import make_meta, make_tasks, meta_grad
from learner import Learner, batch_norm, conv2d_matmul, max_pool2d

EVERY_LAYER = [
    ('conv2d', [4, 3, 3, 3, 1, 1]), ('bn', [4]), ('leakyrelu', [0.2, True]),
    ('max_pool2d', [2, 2, 0]), ('convt2d', [4, 2, 2, 2, 2, 0]), ('tanh', []),
    ('avg_pool2d', [2, 2, 0]), ('upsample', [2]), ('sigmoid', []), ('relu', [True]),
    ('flatten', []), ('linear', [32, 2 * 8 * 8]), ('reshape', [2, 4, 4]), ('flatten', []),
    ('linear', [5, 32]),
]


def test_every_layer_of_the_vocabulary_builds_and_runs():
    net = Learner(EVERY_LAYER, imgc=3, imgsz=8)
    assert net(torch.randn(6, 3, 8, 8)).shape == (6, 5)
    shapes = [tuple(p.shape) for p in net.parameters()]
    assert shapes[:6] == [(4, 3, 3, 3), (4,), (4,), (4,), (4, 2, 2, 2), (2,)]
    assert not list(net.buffers()), 'batch norm must keep no running statistics'


def test_params_argument_and_functional_call_agree_with_own_weights():
    net = Learner(EVERY_LAYER, imgc=3, imgsz=8)
    x = torch.randn(6, 3, 8, 8)
    own = net(x)
    params = {name: p.detach() * 1.5 for name, p in net.named_parameters()}
    by_dict, by_list = net(x, params=params), net(x, params=list(params.values()))
    assert torch.equal(own, net(x, params=dict(net.named_parameters())))
    assert torch.equal(by_dict, by_list)
    assert torch.equal(by_dict, functional_call(net, params, (x,)))
    assert not torch.equal(own, by_dict)


def test_batch_norm_normalises_with_the_statistics_of_the_batch():
    net = Learner([('conv2d', [3, 1, 1, 1, 1, 0]), ('bn', [3])], imgc=1, imgsz=5)
    out = net(10 * torch.randn(7, 1, 5, 5) + 3)
    assert torch.allclose(out.mean((0, 2, 3)), torch.zeros(3), atol=1e-5)
    assert torch.allclose(out.var((0, 2, 3), unbiased=False), torch.ones(3), atol=1e-3)


def test_unknown_layer_and_mismatched_sizes_are_clear_errors():
    with pytest.raises(ValueError, match="'dropout', which is not a known layer"):
        Learner([('dropout', [0.5])], imgc=1, imgsz=4)
    with pytest.raises(ValueError, match=r"layer 2 \('linear', \[5, 99\]\) does not fit"):
        Learner([('conv2d', [2, 1, 3, 3, 1, 1]), ('flatten', []), ('linear', [5, 99])], imgc=1, imgsz=4)


@pytest.mark.parametrize('stride, padding', [(1, 0), (1, 1), (2, 1), (3, 2)])
def test_matmul_convolution_equals_native_with_first_and_second_derivatives(stride, padding):
    g = torch.Generator().manual_seed(0)
    x, w, b = (torch.randn(*shape, generator=g, dtype=torch.float64, requires_grad=True)
               for shape in [(2, 3, 7, 6), (4, 3, 3, 2), (4,)])
    outs = [conv(x, w, b, stride, padding) for conv in (F.conv2d, conv2d_matmul)]
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-13, atol=1e-13)
    probe = torch.randn(outs[0].shape, generator=g, dtype=torch.float64)
    derivatives = []
    for out in outs:
        first = torch.autograd.grad((out * probe).sum(), (x, w, b), create_graph=True)
        second = torch.autograd.grad(sum(d.square().sum() for d in first), (x, w))   # b enters linearly
        derivatives.append(first + second)
    for native, matmul in zip(*derivatives):
        torch.testing.assert_close(matmul, native, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize('first_order', [False, True])
def test_matmul_convolution_gives_the_same_vectorised_meta_gradient(first_order):
    tasks = make_tasks()
    native, matmul = make_meta(first_order=first_order), make_meta(first_order=first_order)
    matmul.net.conv = 'matmul'
    (loss, grad, accs), (loss_m, grad_m, accs_m) = meta_grad(native, tasks), meta_grad(matmul, tasks)
    torch.testing.assert_close(loss_m, loss, rtol=1e-13, atol=0)
    torch.testing.assert_close(grad_m, grad, rtol=1e-10, atol=1e-12 * grad.abs().max().item())
    assert torch.equal(accs, accs_m)


def test_unknown_convolution_formulation_is_a_clear_error():
    with pytest.raises(ValueError, match="'fft', which is not a convolution formulation"):
        Learner([('conv2d', [2, 1, 3, 3, 1, 1])], imgc=1, imgsz=4, conv='fft')


def test_fused_batch_norm_is_the_primitive_one_to_first_order_under_vmap():
    """What lets Meta use torch's fused batch norm in every pass it differentiates once."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(3, 4, 5, 6, 6, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(3, 5, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(3, 5, generator=g, dtype=torch.float64, requires_grad=True)
    probe = torch.randn(3, 4, 5, 6, 6, generator=g, dtype=torch.float64)
    results = []
    for fused in (False, True):
        out = torch.vmap(lambda x, w, b: batch_norm(x, w, b, fused=fused))(x, w, b)
        results.append((out, *torch.autograd.grad((out * probe).sum(), (x, w, b))))
    for primitive, fused in zip(*results):
        torch.testing.assert_close(fused, primitive, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize('size', [(8, 8), (7, 9)])
def test_forward_only_max_pool_gives_the_kernels_values_under_vmap(size):
    """The pairwise maximum that evaluation's forward-only passes take is torch's pool, bit for bit,
    NaN and an odd last row or column included."""
    x = torch.randn(3, 4, 5, *size, generator=torch.Generator().manual_seed(4))
    x[0, 0, 0, 0, :2] = 1.5   # a tie
    x[1, 2, 3, 2, 2] = float('nan')
    with torch.no_grad():
        pooled = torch.vmap(lambda x: max_pool2d(x, 2, 2, 0))(x)
    torch.testing.assert_close(pooled, F.max_pool2d(x.flatten(0, 1), 2).view_as(pooled), rtol=0, atol=0,
                               equal_nan=True)
    side = size[0]
    net = Learner([('max_pool2d', [2, 2, 0]), ('flatten', []), ('linear', [3, 5 * (side // 2) ** 2])], imgc=5, imgsz=side)
    images = x[2, ..., :side, :side]
    with torch.no_grad():
        forward_only = net(images)
    assert torch.equal(forward_only, net(images).detach()), 'a differentiated pass takes the kernel, to the same logits'
