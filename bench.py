"""
Speed of one MAML meta-step: the seed's per-task loop against this project's vectorised Meta.

    python bench.py                   # every workload x implementation on the default device
    python bench.py --quick           # fewer repeats, for a first look
    python bench.py --device cuda --csv bench_results.csv

Workloads (the seeds' defaults otherwise): Omniglot 5-way 1-shot task_num 32 and MiniImagenet
5-way 1-shot task_num 4, each second- and first-order. Implementations:
    reference     the seed's algorithm: a Python loop over tasks, the query loss and accuracy
                  after every inner step with .item() (kept here, not in the training path)
    meta          Meta, all tasks at once with torch.func; per-step accuracies off, as on the
                  training script's non-logging steps
    meta+compile  Meta with torch.compile (mode 'default')
    meta+graphs   Meta with torch.compile(mode='reduce-overhead'): CUDA graphs (CUDA only)
Each row times the whole step, episode sampling included: the median over repeats after warm-up.
Episodes come from the project's own on-device samplers, filled with random pixels when
--data does not hold the real sets (sampling costs the same either way).
"""
import argparse
import csv
import os
import resource
import statistics
import time

import numpy as np
import torch
import torch.nn.functional as F


def reference_step(maml, x_spt, y_spt, x_qry, y_qry):
    """The seed's Meta.forward, with create_graph so that it computes the same (second-order, unless
    maml.first_order) meta-gradient as Meta; returns the query accuracy after each inner step."""
    task_num, querysz = x_spt.shape[0], x_qry.shape[1]
    params = list(maml.net.parameters())
    losses_q = [0.0] * (maml.update_step + 1)
    corrects = [0] * (maml.update_step + 1)
    for i in range(task_num):
        fast = params
        with torch.no_grad():
            corrects[0] += (maml.net(x_qry[i], fast).argmax(1) == y_qry[i]).sum().item()
        for k in range(maml.update_step):
            loss = F.cross_entropy(maml.net(x_spt[i], fast), y_spt[i])
            grads = torch.autograd.grad(loss, fast, create_graph=not maml.first_order)
            fast = [w - maml.update_lr * g for w, g in zip(fast, grads)]
            logits_q = maml.net(x_qry[i], fast)
            losses_q[k + 1] = losses_q[k + 1] + F.cross_entropy(logits_q, y_qry[i])
            corrects[k + 1] += (logits_q.argmax(1) == y_qry[i]).sum().item()
    maml.meta_optim.zero_grad(set_to_none=True)
    (losses_q[-1] / task_num).backward()
    maml.meta_optim.step()
    return np.array(corrects) / (task_num * querysz)
