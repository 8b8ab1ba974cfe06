"""
The seed's algorithm as a Python loop over tasks: the reference that Meta is checked against
(tests/test_meta.py, tests/test_bench.py) and timed against (bench.py), and the seed's code as it
really runs (dragen1860/MAML-Pytorch: first-order by a missing create_graph, the meta-loss of the
last task only).

    loss, _ = per_task_meta_loss(maml.net, list(maml.net.parameters()), tasks, 0.4, 5, create_graph=True)
    accs = reference_step(maml, x_spt, y_spt, x_qry, y_qry)   # the exact per-task meta-update
    reference_step(maml, x_spt, y_spt, x_qry, y_qry, track_steps=False)   # the same, no per-step accuracies
    accs = seed_step(maml, seed_forward(seed_network(5), w), x_spt, y_spt, x_qry, y_qry)   # the seed's
"""
import numpy as np
import torch
import torch.nn.functional as F


def per_task_meta_loss(forward, params, tasks, update_lr, update_step, create_graph, track_steps=False,
                       last_task_only=False):
    """Algorithm 2 as a Python loop over tasks with autograd.grad inner steps, `forward(x, params)`
    being the network. With `track_steps`, also the query accuracy before and after every inner
    step, read with .item() as the seed does. `last_task_only` reproduces the seed's meta-loss,
    which keeps the last task's query loss alone (divided by task_num). Returns (meta-loss,
    accuracies per step or None)."""
    corrects = np.zeros(update_step + 1)
    losses = []
    for x_spt, y_spt, x_qry, y_qry in zip(*tasks):
        fast = params
        if track_steps:
            with torch.no_grad():
                corrects[0] += (forward(x_qry, fast).argmax(1) == y_qry).sum().item()
        for k in range(update_step):
            grads = torch.autograd.grad(F.cross_entropy(forward(x_spt, fast), y_spt), fast, create_graph=create_graph)
            fast = [w - update_lr * g for w, g in zip(fast, grads)]
            if track_steps or k == update_step - 1:
                logits = forward(x_qry, fast)
            if track_steps:
                corrects[k + 1] += (logits.argmax(1) == y_qry).sum().item()
        losses.append(F.cross_entropy(logits, y_qry))
    loss = losses[-1] / len(losses) if last_task_only else torch.stack(losses).mean()
    return loss, corrects / tasks[3].numel() if track_steps else None


def reference_step(maml, x_spt, y_spt, x_qry, y_qry, track_steps=True):
    """The seed's Meta.forward with create_graph, so that it computes the same (second-order, unless
    maml.first_order) meta-gradient as Meta; returns the query accuracy after each inner step, or
    None without `track_steps` (then only the last step's query pass runs, as in Meta's untracked step)."""
    loss, accs = per_task_meta_loss(maml.net, list(maml.net.parameters()), (x_spt, y_spt, x_qry, y_qry),
                                    maml.update_lr, maml.update_step, not maml.first_order, track_steps=track_steps)
    maml.meta_update(loss)
    return accs


def seed_network(n_way):
    """The seed's Omniglot network: 3 x [conv 3x3 stride 2 unpadded, ReLU, batch norm], conv 2x2, ReLU,
    batch norm, linear: 28x28 shrinks to 1x1, so it costs about 60% of the FLOPs of the paper's net."""
    config = []
    for ch_in, k, stride in [(1, 3, 2), (64, 3, 2), (64, 3, 2), (64, 2, 1)]:
        config += [('conv2d', [64, ch_in, k, k, stride, 0]), ('relu', [True]), ('bn', [64])]
    return config + [('flatten', []), ('linear', [n_way, 64])]


def seed_forward(config, like):
    """forward(x, params) of a seed-style net for `config`: F.batch_norm updating running statistics
    in training mode, in-place ReLU, as the seed runs it. The statistics take `like`'s dtype and device."""
    running = {i: (like.new_zeros(p[0]), like.new_ones(p[0])) for i, (name, p) in enumerate(config) if name == 'bn'}

    def forward(x, params):
        params = iter(params)
        for i, (name, p) in enumerate(config):
            if name == 'conv2d':
                x = F.conv2d(x, next(params), next(params), stride=p[4], padding=p[5])
            elif name == 'relu':
                x = F.relu(x, inplace=True)
            elif name == 'bn':
                x = F.batch_norm(x, *running[i], next(params), next(params), training=True)
            elif name == 'flatten':
                x = x.flatten(1)
            else:
                x = F.linear(x, next(params), next(params))
        return x
    return forward


def seed_step(maml, forward, x_spt, y_spt, x_qry, y_qry):
    """The seed's Meta.forward as it runs: inner gradients without create_graph (so first-order
    whatever maml.first_order says), and the meta-loss of the last task only."""
    if maml.update_step < 2:
        raise RuntimeError("the seed's code fails at update_step 1: its last query loss is computed "
                           "under no_grad, so backward() has nothing to differentiate")
    loss, accs = per_task_meta_loss(forward, list(maml.net.parameters()), (x_spt, y_spt, x_qry, y_qry),
                                    maml.update_lr, maml.update_step, create_graph=False, track_steps=True,
                                    last_task_only=True)
    maml.meta_update(loss)
    return accs
