"""Meta-gradients of the vectorised learner against independent float64 references."""
import os
import platform
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from conftest import CONFIG, SIDE, TASKS, flat, make_meta, make_tasks, meta_grad, rel_err
from maml.errors import DamagedError
from meta import Meta
from reference import per_task_meta_loss


def reference_net(x, w):
    """The CONFIG network written independently of Learner, with torch's own batch norm (exact outside vmap)."""
    for i in (0, 4):
        x = F.conv2d(x, w[i], w[i + 1], stride=2, padding=1)
        x = F.relu(F.batch_norm(x, None, None, w[i + 2], w[i + 3], training=True))
    return F.linear(x.flatten(1), w[8], w[9])


def reference_meta_grad(maml, tasks, first_order):
    """Algorithm 2 with a Python loop over tasks and autograd.grad(create_graph=...) inner steps."""
    theta = list(maml.net.parameters())
    loss, _ = per_task_meta_loss(reference_net, theta, tasks, maml.update_lr, maml.update_step,
                                 create_graph=not first_order)
    return loss, flat(torch.autograd.grad(loss, theta))


@pytest.mark.parametrize('update_step', [1, 3])
def test_second_order_meta_gradient_matches_reference(update_step):
    maml, tasks = make_meta(update_step), make_tasks()
    loss, grad, accs = meta_grad(maml, tasks)
    ref_loss, ref_grad = reference_meta_grad(maml, tasks, first_order=False)
    assert abs(loss.item() - ref_loss.item()) < 1e-12
    assert rel_err(grad, ref_grad) < 1e-8
    assert accs.shape == (update_step + 1,)


def test_first_order_matches_reference_and_differs_from_second_order():
    tasks = make_tasks()
    first = make_meta(first_order=True)
    _, grad_fo, _ = meta_grad(first, tasks)
    _, ref_fo = reference_meta_grad(first, tasks, first_order=True)
    assert rel_err(grad_fo, ref_fo) < 1e-8
    _, grad_so, _ = meta_grad(make_meta(first_order=False), tasks)
    assert rel_err(grad_fo, grad_so) > 1e-3, 'second-order terms are missing from the meta-gradient'


def test_vectorised_batch_equals_per_task_loop():
    maml, tasks = make_meta(), make_tasks()
    loss, grad, accs = meta_grad(maml, tasks)
    per_task = [meta_grad(maml, [t[i:i + 1] for t in tasks]) for i in range(TASKS)]
    assert torch.allclose(loss, torch.stack([l for l, _, _ in per_task]).mean(), rtol=1e-12, atol=0)
    assert rel_err(grad, torch.stack([g for _, g, _ in per_task]).mean(0)) < 1e-10
    assert torch.allclose(accs, torch.stack([a for _, _, a in per_task]).mean(0))


def graph_convolutions(tensor):
    """The convolution nodes that backward() from `tensor` visits: one per pass through a conv layer."""
    seen, todo = set(), [tensor.grad_fn]
    while todo:
        node = todo.pop()
        if node is not None and node not in seen:
            seen.add(node)
            todo += [next_node for next_node, _ in node.next_functions]
    return sum('Convolution' in node.name() for node in seen)


def test_tracked_steps_report_each_accuracy_without_adding_to_the_meta_gradients_graph():
    """The seed's forward reports the query accuracy after every inner step; those extra query passes
    must not enter the graph that backward() walks (and keeps alive), as they once did."""
    maml, tasks = make_meta(), make_tasks()
    loss, accs = maml.meta_loss(*tasks, track_steps=True)
    loss_fast, accs_fast = maml.meta_loss(*tasks, track_steps=False)
    assert torch.equal(loss, loss_fast) and accs_fast.shape == (1,) and accs_fast[0] == accs[-1]
    assert graph_convolutions(loss) == graph_convolutions(loss_fast) > 0
    assert torch.equal(meta_grad(maml, tasks)[1], flat(torch.autograd.grad(loss_fast, list(maml.net.parameters()))))
    with torch.no_grad():   # the accuracies after 0..update_step steps, as evaluation computes them
        assert torch.equal(accs, maml._batched(*tasks, maml.n_way, maml.update_step, tuple(range(4)), (), False,
                                               True)[1].mean(0))
        in_one_pass = maml._batched(*tasks, maml.n_way, maml.update_step, tuple(range(4)), tuple(range(4)), False, True)
        assert torch.equal(accs, in_one_pass[1].mean(0)), "reported task by task on the CPU, or under vmap"


def test_forward_takes_one_adam_step_and_finetunning_leaves_parameters_alone():
    maml, tasks = make_meta(), make_tasks()
    before = [p.detach().clone() for p in maml.net.parameters()]
    accs = maml.finetunning(*tasks)
    assert accs.shape == (TASKS, maml.update_step_test + 1)
    assert maml.finetunning(*(t[0] for t in tasks)).shape == (maml.update_step_test + 1,)
    assert all(torch.equal(a, b) for a, b in zip(before, maml.net.parameters()))
    assert ((accs >= 0) & (accs <= 1)).all()
    accs = maml(*tasks)
    assert accs.shape == (maml.update_step + 1,)
    moved = [(a - b).abs().max().item() for a, b in zip(before, maml.net.parameters())]
    assert all(0 < m < 1e-2 for m in moved), 'Adam moves every parameter by about meta_lr'


def test_finetunning_adapts_on_the_support_set():
    maml, tasks = make_meta(), make_tasks()
    x_spt, y_spt = tasks[0][0], tasks[1][0]
    accs = maml.finetunning(x_spt, y_spt, x_spt, y_spt)
    assert accs[-1] == 1.0 > accs[0], 'fine-tuning should fit the support set it is trained on'
    fast = maml.adapt(x_spt, y_spt)
    assert (maml.net(x_spt, params=fast).argmax(1) == y_spt).all()


def test_gradient_clipping_bounds_the_meta_gradient():
    maml, tasks = make_meta(), make_tasks()
    maml.grad_clip = 1e-3
    loss, _ = maml.meta_loss(*tasks)
    maml.meta_update(loss)
    assert flat([p.grad for p in maml.net.parameters()]).norm() <= 1e-3 * (1 + 1e-6)


def test_inner_steps_below_one_are_refused():
    with pytest.raises(ValueError, match='at least 1'):
        make_meta(update_step=0)


def test_compiled_meta_step_matches_eager():
    tasks = [t.float() if t.is_floating_point() else t for t in make_tasks()]
    eager, compiled = make_meta(update_step=2).float(), make_meta(update_step=2).float().compile()
    loss, accs = eager.meta_loss(*tasks)
    loss_c, accs_c = compiled.meta_loss(*tasks)
    grad = flat(torch.autograd.grad(loss, list(eager.net.parameters())))
    grad_c = flat(torch.autograd.grad(loss_c, list(compiled.net.parameters())))
    assert abs(loss.item() - loss_c.item()) < 1e-5 and torch.equal(accs, accs_c)
    assert rel_err(grad_c, grad) < 1e-4



class HostTraffic(TorchDispatchMode):
    """Records every op that takes a host (CPU) tensor with elements into a result on another device,
    i.e. a host-to-device copy, and every read of a value back to the host (.item())."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        outputs = [t for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
        if (any(t.device.type == 'cpu' and t.dim() > 0 for t in inputs)
                and any(t.device.type != 'cpu' for t in outputs)) or func is torch.ops.aten._local_scalar_dense.default:
            self.seen.append(str(func))
        return out


@pytest.mark.parametrize('options', [{}, dict(msl_steps=10, lslr=True, bnwb=True)])
def test_a_meta_step_needs_nothing_from_the_host(options):
    """On a device of its own ('meta' here, a GPU in use) a meta-step copies nothing from the host
    and reads nothing back, so the host can queue steps ahead of the device (MAML++'s multi-step
    loss weights used to be built on the CPU and copied at every step)."""
    maml = Meta(CONFIG, imgc=1, imgsz=SIDE, update_step=2, **options).to('meta')
    x_spt, y_spt, x_qry, y_qry = (t.to('meta') for t in make_tasks())
    with HostTraffic() as traffic:
        for _ in range(2):
            maml(x_spt.float(), y_spt, x_qry.float(), y_qry, track_steps=False)
    assert traffic.seen == []


KEEPS_HEAP = r'''
import ctypes, sys, torch
sys.path.insert(0, {repo!r})
class MallInfo(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in ('arena', 'ordblks', 'smblks', 'hblks', 'hblkhd', 'usmblks',
                                                   'fsmblks', 'uordblks', 'fordblks', 'keepcost')]
libc = ctypes.CDLL('libc.so.6')
libc.mallinfo2.restype = MallInfo
if {build}:
    from meta import Meta
    Meta([('flatten', []), ('linear', [2, 4])], imgc=1, imgsz=2)
before = libc.mallinfo2().hblks
block = torch.empty(16 << 20)   # 64 MB, above glibc's largest dynamic mmap threshold (32 MB)
print(libc.mallinfo2().hblks - before)
'''


@pytest.mark.skipif(platform.libc_ver()[0] != 'glibc', reason='glibc only: another C library is left as it is')
def test_a_meta_built_anywhere_keeps_freed_memory_in_the_heap():
    """A Meta built in a fresh interpreter (a notebook) gets what the scripts used to apply alone:
    a large block comes from the heap instead of a fresh mmap that is page-faulted in at every step."""
    def mapped_blocks(build):
        code = KEEPS_HEAP.format(repo=os.path.dirname(os.path.dirname(os.path.abspath(__file__))), build=build)
        return int(subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, check=True).stdout)
    assert mapped_blocks(build=False) == 1, 'without Meta glibc maps the block (the check can fail)'
    assert mapped_blocks(build=True) == 0


def test_a_checkpoint_with_an_option_this_version_lacks_is_refused_not_loaded_as_plain_maml():
    ckpt = make_meta().checkpoint()
    ckpt['hparams']['inner_momentum'] = 0.9   # an option of a later version
    with pytest.raises(DamagedError, match=r"trained with inner_momentum, which this version of the code does not "
                                           r"know, so it would load as another model"):
        Meta.from_state(ckpt)
