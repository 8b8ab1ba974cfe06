"""The benchmark's seed-style rows compute what they claim (the same meta-update as Meta, or the
seed's first-order last-task update), rows that track the per-step accuracies compute the same ones,
ratios set equal work side by side, --quick picks a few rows, and FLOPs count right."""
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import bench
from conftest import REPO, make_meta, make_tasks
from learner import Learner
from reference import per_task_meta_loss, reference_step, seed_forward, seed_network, seed_step
from roofline import ByteCount, ConvolutionReplay, FlopCount, PassCount


@pytest.mark.parametrize('first_order', [False, True])
def test_reference_step_makes_the_same_meta_update_as_meta(first_order):
    tasks = make_tasks()
    ours, ref = make_meta(first_order=first_order), make_meta(first_order=first_order)
    accs = ours(*tasks)
    ref_accs = reference_step(ref, *tasks)
    grads = [(a.grad, b.grad) for a, b in zip(ours.net.parameters(), ref.net.parameters())]
    scale = max(g.abs().max().item() for g, _ in grads)
    for g, g_ref in grads:
        torch.testing.assert_close(g, g_ref, rtol=1e-9, atol=1e-10 * scale)
    # A conv bias feeds batch norm, so its exact meta-gradient is 0 and Adam turns the rounding
    # noise of either side into a step of about meta_lr: compare the update only where the
    # gradient is well defined.
    for (a, b), (g, _) in zip(zip(ours.net.parameters(), ref.net.parameters()), grads):
        if g.abs().max() > 1e-6 * scale:
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
    assert accs.tolist() == pytest.approx(ref_accs.tolist())


def test_tracked_rows_compute_the_seeds_per_step_accuracies_and_untracked_rows_the_same_update():
    """What a row's tracking changes: the per-step accuracies computed, never the meta-update."""
    tasks, accs, grads = make_tasks(), {}, {}
    for impl in ('seed', 'reference', 'reference-untracked', 'meta', 'meta-untracked'):
        maml = make_meta()
        accs[impl] = bench.row_step(impl, maml)(*tasks)
        grads[impl] = [p.grad for p in maml.net.parameters()]
    meta = accs['meta'].tolist()
    assert len(meta) == make_meta().update_step + 1, 'after each inner step, 0..update_step, as the seed returns them'
    assert list(accs['seed']) == pytest.approx(meta) and list(accs['reference']) == pytest.approx(meta)
    assert accs['reference-untracked'] is None and accs['meta-untracked'].tolist() == pytest.approx(meta[-1:])
    for tracked, untracked in (('reference', 'reference-untracked'), ('meta', 'meta-untracked')):
        scale = max(g.abs().max().item() for g in grads[tracked])
        for g, g_untracked in zip(grads[tracked], grads[untracked]):
            torch.testing.assert_close(g_untracked, g, rtol=1e-9, atol=1e-10 * scale)


def test_ratios_are_taken_between_rows_of_the_same_workload_and_tracking():
    row = lambda impl, ms, workload='a-so': dict(workload=workload, impl=impl, tracks=bench.yes_no(bench.tracks(impl)),
                                                 ms_per_step=ms, images_per_s=1, peak_mem_mb=1)
    rows = [row('seed', 800), row('reference', 400), row('reference-untracked', 200), row('meta', 100),
            row('meta-untracked', 50), row('meta', 300, 'b-so'), row('meta+compile', 100, 'b-so'),
            dict(workload='b-so', impl='seed', tracks='yes', error='fails at update_step 1')]
    bench.add_speedups(rows)
    ratios = [(r['impl'], r['workload'], r.get('speedup'), r.get('vs_seed')) for r in rows[:-1]]
    assert ratios == [('seed', 'a-so', 0.5, 1.0), ('reference', 'a-so', 1.0, 2.0),
                      ('reference-untracked', 'a-so', 1.0, None), ('meta', 'a-so', 4.0, 8.0),
                      ('meta-untracked', 'a-so', 4.0, None),   # over reference-untracked, and no seed row untracked
                      ('meta', 'b-so', None, None), ('meta+compile', 'b-so', None, None)]   # no baseline timed
    line = bench.format_row(rows[4])
    assert line.split()[:3] == ['a-so', 'meta-untracked', 'no'] and line.split()[-2:] == ['4.00x', '-']
    assert 'same workload and the same' in bench.HEADER, 'the table states the rule'


def test_quick_times_a_few_rows_unless_rows_are_named():
    quick = bench.parse_flags(['--quick'])
    assert quick.workloads == ['seednet-5w1s-so', 'omniglot-paper-so']
    assert quick.impls == ['seed', 'reference', 'meta', 'meta-untracked']
    named = bench.parse_flags(['--quick', '--workloads', 'mini-5w1s-fo', '--impls', 'meta+compile'])
    assert (named.workloads, named.impls, named.quick) == (['mini-5w1s-fo'], ['meta+compile'], True)
    assert bench.parse_flags(['--quick', '--impls', 'all']).impls == bench.IMPLS
    full, every = bench.parse_flags([]), bench.parse_flags(['--quick', '--workloads', 'all'])
    assert full.workloads == every.workloads == bench.ALL_WORKLOADS and len(bench.ALL_WORKLOADS) == 10
    assert full.impls == bench.IMPLS and every.impls == quick.impls


def test_flop_counter_counts_convolutions_and_their_gradients():
    x = torch.randn(2, 3, 8, 8)
    w = torch.randn(4, 3, 3, 3, requires_grad=True)
    with FlopCount() as forward_only:
        F.conv2d(x, w, padding=1)
    assert forward_only.flops == 2 * 2 * 4 * 3 * 9 * 8 * 8
    with FlopCount() as both:
        F.conv2d(x, w, padding=1).sum().backward()
    assert both.flops == 2 * forward_only.flops, 'the weight gradient costs one more convolution'


def test_seed_network_computes_the_learner_function_of_its_config():
    config = seed_network(n_way=5)
    net = Learner(config, imgc=1, imgsz=28).double()
    x = torch.randn(6, 1, 28, 28, dtype=torch.float64)
    forward = seed_forward(config, x)
    torch.testing.assert_close(forward(x, list(net.parameters())), net(x), rtol=1e-10, atol=1e-12)


def test_seed_step_is_the_first_order_gradient_of_the_last_task_alone():
    tasks = make_tasks()
    seed, ref = make_meta(first_order=False), make_meta()
    seed_step(seed, seed_forward(seed.net.config, tasks[0]), *tasks)
    theta = list(ref.net.parameters())
    last = [t[-1:] for t in tasks]
    loss, _ = per_task_meta_loss(ref.net, theta, last, ref.update_lr, ref.update_step, create_graph=False)
    for p, g in zip(seed.net.parameters(), torch.autograd.grad(loss / len(tasks[0]), theta)):
        torch.testing.assert_close(p.grad, g, rtol=1e-9, atol=1e-12)


def test_profile_names_where_a_step_goes(omniglot_root, capsys, monkeypatch):
    monkeypatch.setitem(bench.WORKLOADS, 'omniglot-paper', dict(bench.WORKLOADS['omniglot-paper'], task_num=4))
    result = bench.profile_row('omniglot-paper', 'so', 'meta', torch.device('cpu'), omniglot_root, steps=1, top=5)
    out = capsys.readouterr().out
    convolutions, ops = out.split('ops by self time:')
    assert 'aten::convolution_backward' in ops and ops.count(' calls/step ') == 5
    assert convolutions.count(' calls/step ') == 2 and 'GFLOP/s  ' in convolutions, 'the slowest convolutions, rated'
    assert 0 < result['busy_ms'] <= 1.1 * result['wall_ms'] and result['calls_per_step'] > 100
    assert 'GFLOP/step' in out and result['gflop'] > 1 and result['gbytes'] > 0.1
    assert 0 < result['flop_share'] < 2 and result['bandwidth_share'] > 0, 'shares of measured ceilings, not raw units'
    assert 'element-wise passes per step' in out and result['pointwise'] > 50 and result['copies'] > 0
    # the replayed convolutions are vmap's grouped ones, counted on their own: all of the FLOPs that the
    # per-task count finds but the final linear layer's
    assert 0.99 * result['gflop'] < result['conv_gflop'] <= result['gflop'] and result['conv_ms'] > 0
    assert 'the ceiling of these kernels' in out and 0 < result['ceiling'] < 2


def test_each_row_counts_its_own_algorithms_flops(omniglot_root, monkeypatch):
    """The seed row does first-order work on a smaller network: its floor is its own, not Meta's."""
    for workload in ('omniglot-5w1s', 'omniglot-paper'):   # two tasks a step: the count scales with them
        monkeypatch.setitem(bench.WORKLOADS, workload, dict(bench.WORKLOADS[workload], task_num=2))
    seed, reference, untracked = (bench.count_flops('omniglot-5w1s', 'so', impl, omniglot_root)
                                  for impl in ('seed', 'reference', 'reference-untracked'))
    assert 0 < seed < reference / 2 and untracked < reference, 'the query passes after steps 0..4 add up'
    meta, anil, notebook, meta_untracked = (bench.count_flops('omniglot-paper', 'so', impl, omniglot_root)
                                            for impl in ('meta', 'anil', 'notebook', 'meta-untracked'))
    assert 0 < anil < meta == notebook and meta_untracked < meta


def test_flops_are_counted_on_one_task_and_two_and_extrapolated(omniglot_root, monkeypatch):
    small = dict(task_num=3, k_qry=2, update_step=2)   # the seed's code needs two inner steps
    monkeypatch.setitem(bench.WORKLOADS, 'omniglot-5w1s', dict(bench.WORKLOADS['omniglot-5w1s'], **small))
    for impl in ('seed', 'meta'):   # the seed's loop differentiates its last task alone; Meta's per-task form, all
        maml, next_batch = bench.build('omniglot-5w1s', 'so', impl, torch.device('cpu'), omniglot_root)
        assert bench.count_flops('omniglot-5w1s', 'so', impl, omniglot_root) == bench.flops_on(impl, maml, next_batch())


def test_a_missing_input_stops_the_benchmark_before_anything_is_timed(tmp_path):
    not_a_folder = tmp_path / 'omniglot'
    not_a_folder.write_text('')
    run = subprocess.run([sys.executable, os.path.join(REPO, 'benchmarks', 'bench.py'), '--device', 'cpu', '--quick',
                          '--omniglot', str(not_a_folder), '--workloads', 'mini-5w1s-so', 'omniglot-paper-so',
                          '--impls', 'meta'], capture_output=True, text=True, timeout=300)
    assert run.returncode != 0 and run.stderr.strip().startswith('error: Omniglot is not in')
    assert 'Traceback' not in run.stderr and 'mini-5w1s' not in run.stdout, 'nothing timed, no traceback'


def test_pass_counter_counts_element_wise_passes_and_copies():
    a, b = torch.ones(1000), torch.ones(1000)
    with PassCount() as passes:
        c = a * b + 1                     # two pointwise passes
        torch.cat([a, b])                 # a copy
        a.sum()                           # a reduction: neither
        c.view(10, 100)                   # a view: neither
    assert (passes.pointwise, passes.copies) == (2, 1) and passes['mul'] == passes['add'] == passes['cat'] == 1
    assert passes.elementwise_bytes == 12000 + 8000 + 16000


def test_byte_counter_counts_what_ops_read_and_write_and_not_views():
    a, b = torch.ones(1000), torch.ones(1000)
    with ByteCount() as traffic:
        c = a + b                         # reads 2 x 4000 bytes, writes 4000
        c.view(10, 100).t()               # views: nothing
        a.expand(5, 1000).sum(0)          # reads a once (a broadcast), writes 4000
        c.copy_(b)                        # in place: reads c and b, writes c
        a.add_(1)                         # reads a, writes a
        torch.mul(a, b, out=c)            # reads a and b, writes c (an out= argument is not read)
        torch._foreach_mul_([a, b], 2.0)  # reads and writes a and b
    assert traffic.bytes == 12000 + 0 + 8000 + 12000 + 8000 + 12000 + 16000


@pytest.mark.parametrize('groups, transposed', [(1, False), (4, False), (2, True)])
def test_convolution_replay_counts_and_times_the_convolutions_of_a_step(groups, transposed):
    x = torch.randn(3, 8, 10, 10, requires_grad=True)
    w = torch.randn(8, 8 // groups, 3, 3, requires_grad=True)
    conv = lambda: (F.conv_transpose2d(x, w, stride=2, padding=1, groups=groups) if transposed
                    else F.conv2d(x, w, stride=2, padding=1, groups=groups))
    with ConvolutionReplay() as convs:
        for _ in range(2):
            conv().sum().backward()
        torch.relu(x).sum()                                           # not a convolution
    with FlopCount() as counted:
        conv()
    assert counted.flops > 0 and sorted(convs.calls.values()) == [2, 2], 'a forward and a backward call, each twice'
    flops, seconds = convs.replay(torch.device('cpu'), repeats=2)
    assert flops == 2 * (counted.flops + 2 * counted.flops), \
        'each gradient (input, weight) costs one forward, as torch counts it'
    assert seconds > 0 and len(convs.timings) == 2 and 'groups' in convs.timings[0][3]
