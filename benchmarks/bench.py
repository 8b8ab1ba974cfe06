"""
Speed of one MAML meta-step: the seed's per-task loop against this project's vectorised Meta.

    python benchmarks/bench.py                   # every workload x implementation on the default device
    python benchmarks/bench.py --quick           # a first look: a few rows, fewer repeats, minutes on 2 CPU cores
    python benchmarks/bench.py --quick --workloads all --impls all   # every row, fewer repeats
    python benchmarks/bench.py --device cuda --impls reference meta meta+graphs --csv bench_results.csv
    python benchmarks/bench.py --loaders         # also: episodes/s of the seed-style DataLoader vs the cache
    python benchmarks/bench.py --profile omniglot-paper so meta+graphs --trace step.json   # where a step's time goes

Workloads (the seeds' defaults otherwise): Omniglot 5-way 1-shot task_num 32, the paper's Omniglot
5-way recipe (omniglot-paper: k_qry 1, update_step 1) and MiniImagenet 5-way 1-shot task_num 4,
each second- (so) and first-order (fo); seednet-5w1s and seednet-paper are the two Omniglot ones
with the seed's own network config in every row (unpadded stride-2 convolutions, ReLU before batch
norm: what users port from the seed).

Implementations. A row that tracks (column 'tracks') also computes the query loss and accuracy
after every inner step, 0..update_step, as the seed's forward returns them and as Meta.forward
does by default; an untracked row runs only the last step's query pass, the one the meta-loss needs
(what the training scripts do on their non-logging steps). Every row tracks but the '-untracked' ones.
    seed                 the seed's code as it runs: its own (unpadded) network with running batch-norm
                         statistics, a Python loop over tasks, inner gradients without create_graph (so
                         first-order in every row, a bug), the meta-loss of the last task only (another),
                         query accuracy after every inner step with .item(); fails at update_step 1
    reference            the seed's algorithm made exact: the same loop on this project's network, with
                         create_graph (kept here, not in the training path), tracking as the seed does
    reference-untracked  reference without the per-step accuracies
    meta                 Meta's step as a notebook calls it, maml(x_spt, y_spt, x_qry, y_qry): all tasks
                         at once with torch.func, the per-step accuracies computed without a graph
    meta-untracked       meta with track_steps=False: the last step's query pass only
    notebook             meta built as a notebook builds it: in a process where nothing but Meta set
                         anything up (no trainer.tune)
    meta+matmul          meta with Learner(conv='matmul'): convolutions as im2col + batched matmul
    meta+amp             meta under bf16 autocast (CUDA only)
    meta+compile         meta with torch.compile, mode 'default'
    meta+graphs          meta with torch.compile, mode 'reduce-overhead': CUDA graphs (CUDA only)
    anil, metasgd, reptile, maml++   the MAML family's algorithms in meta (maml++ while its
                         multi-step loss is on; after that it costs what meta costs)
A row times whole steps, episode sampling included: the median over repeats after warm-up, each
row in a fresh process, so its peak memory (CUDA max_memory_allocated, else peak RSS) is its own,
warm-up (and any CUDA-graph capture) included.
'speed-up' is over the reference row and 'vs seed' over the seed row of the same workload and
the same tracking, so that a ratio compares equal work: an untracked row's speed-up is over
reference-untracked, and it has no 'vs seed' (the seed's code always tracks); '-' where that row
is missing or failed.
--quick is a first look that ends within minutes on 2 CPU cores: by default the workloads
seednet-5w1s-so and omniglot-paper-so and the implementations seed, reference, meta and
meta-untracked (what tracking costs Meta), with fewer repeats; --workloads and --impls, when
given, replace its defaults ('all': every one). --threads 1 gives steadier numbers on a CPU that
other processes keep busy. Every input a row needs (Omniglot, downloaded if missing; mini-ImageNet
for --loaders) is checked before anything is timed.
Omniglot episodes come from OmniglotNShot (downloaded into --omniglot if missing); MiniImagenet
episodes from MiniImagenetCache.synthetic, random pixels in the real split's shape (sampling and
compute cost the same as on the real images, which need not be on the machine).
The floor: FLOPs of one meta-step of the row's own algorithm (counted op by op on its per-task
form: the seed's first-order loop on its own network, the reference's loop, Meta with the row's
family options, each with the row's tracking; on one task and on two, extrapolated) over the
device's measured matmul rate (fp32; TF32 on CUDA, as training uses).
--profile also sets the step's op-by-op memory traffic against the measured copy bandwidth, counts
its element-wise passes, and replays its convolutions one by one at their shapes and layouts: the
share of the matmul rate that a step could reach if every other op were free, the ceiling that
torch's convolution kernels set (roofline.py).
"""
import argparse
import csv
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))   # the repository's modules
import miniimagenet_train
import omniglot_train
from maml.devices import available_device, device_name, tune
from maml.errors import FlagError
from maml.flags import HelpFormatter
from maml.folder import read_split
from maml.presets import DEFAULTS, PRESETS
from maml.trainer import run_main
from meta import Meta
from MiniImagenet import MiniImagenetCache
from omniglotNShot import OmniglotNShot, load_images
from reference import reference_step, seed_forward, seed_network, seed_step
from roofline import ByteCount, ConvolutionReplay, FlopCount, PassCount, copy_bandwidth, matmul_rate, sync


def workload_settings(dataset, preset=None):
    """The flags of a training script's defaults, or of one of its presets (maml/presets.py)."""
    return dict(DEFAULTS[dataset], **(PRESETS[dataset][preset] if preset else {}), imgc=IMGC[dataset], dataset=dataset)


IMGC = {'omniglot': 1, 'miniimagenet': 3}
WORKLOADS = {
    'omniglot-5w1s': workload_settings('omniglot'),                    # the seed's defaults
    'omniglot-paper': workload_settings('omniglot', 'paper-5w1s'),     # the paper's 5-way 1-shot
    'seednet-5w1s': dict(workload_settings('omniglot'), net='seed'),   # the same on the seed's network
    'seednet-paper': dict(workload_settings('omniglot', 'paper-5w1s'), net='seed'),
    'mini-5w1s': workload_settings('miniimagenet'),
}
# the MAML family on the same engine (maml/family.py); maml++ with its multi-step loss on, its costly phase
FAMILY = {'anil': dict(algo='anil'), 'metasgd': dict(algo='metasgd'), 'reptile': dict(algo='reptile'),
          'maml++': dict(msl_steps=10 ** 9, lslr=True, bnwb=True, bnrs=True, cosine=True, total_steps=10 ** 6)}
# Meta's step set up otherwise: the same algorithm, and so the same FLOPs, as meta
VARIANTS = ['notebook', 'meta+matmul', 'meta+amp', 'meta+compile', 'meta+graphs']
IMPLS = ['seed', 'reference', 'reference-untracked', 'meta', 'meta-untracked', *VARIANTS, *FAMILY]
CUDA_ONLY = {'meta+amp', 'meta+graphs'}
ALL_WORKLOADS = [f'{w}-{o}' for w in WORKLOADS for o in ('so', 'fo')]
# --quick's rows: the seed's network at its defaults and the paper's recipe, the seed's loop against
# Meta with and without the per-step accuracies; nothing that compiles
QUICK_WORKLOADS = ['seednet-5w1s-so', 'omniglot-paper-so']
QUICK_IMPLS = ['seed', 'reference', 'meta', 'meta-untracked']


def tracks(impl):
    """Whether `impl`'s step computes the query accuracy after every inner step (the seed's code always does)."""
    return not impl.endswith('-untracked')


def build(workload, order, impl, device, omniglot_root):
    """(maml, next_batch) for one row."""
    hp = WORKLOADS[workload]
    args = argparse.Namespace(**hp, **FAMILY.get(impl, {}), first_order=order == 'fo', amp=impl == 'meta+amp')
    if impl == 'seed' or hp.get('net') == 'seed':
        if hp['dataset'] != 'omniglot':
            raise RuntimeError("the seed's own network is timed on Omniglot only")
        config = seed_network(hp['n_way'])
        db = OmniglotNShot(omniglot_root, hp['task_num'], hp['n_way'], hp['k_spt'], hp['k_qry'], hp['imgsz'],
                           device=device)
        next_batch = lambda: db.next('train')
    elif hp['dataset'] == 'omniglot':
        config = omniglot_train.network(hp['n_way'], hp['imgsz'], hp['num_filters'])
        db = OmniglotNShot(omniglot_root, hp['task_num'], hp['n_way'], hp['k_spt'], hp['k_qry'], hp['imgsz'],
                           device=device, rotate=None if hp['rotate'] == 'none' else hp['rotate'],
                           preprocess=hp['preprocess'])
        next_batch = lambda: db.next('train')
    else:
        config = miniimagenet_train.network(hp['n_way'], hp['imgsz'], hp['num_filters'])
        cache = MiniImagenetCache.synthetic(64, 600, hp['imgsz'], device)
        next_batch = lambda: cache.sample(hp['task_num'], hp['n_way'], hp['k_spt'], hp['k_qry'])
    maml = Meta(args, config).to(device)
    if impl == 'meta+matmul':
        maml.net.conv = 'matmul'
    if impl in ('meta+compile', 'meta+graphs'):
        maml.compile('default' if impl == 'meta+compile' else 'reduce-overhead')
    return maml, next_batch


def row_step(impl, maml):
    """step(x_spt, y_spt, x_qry, y_qry) of `impl` on `maml` (from `build`): one meta-update, returning
    the query accuracies it computed (after each inner step where `impl` tracks them)."""
    if impl == 'seed':
        forward = seed_forward(maml.net.config, next(maml.net.parameters()))
        return lambda *batch: seed_step(maml, forward, *batch)
    if impl.startswith('reference'):
        return lambda *batch: reference_step(maml, *batch, track_steps=tracks(impl))
    return lambda *batch: maml(*batch, track_steps=tracks(impl))


def time_row(workload, order, impl, device, omniglot_root, quick):
    """One row: ms per meta-step (median), images/s and peak memory, as a dict."""
    maml, next_batch = build(workload, order, impl, device, omniglot_root)
    step_on = row_step(impl, maml)
    step = lambda: step_on(*next_batch())
    warmup, repeats, per_repeat = (1, 3, 1) if quick else (3, 7, 5)
    if impl in ('seed', 'reference', 'reference-untracked') and device.type == 'cpu':
        warmup, per_repeat = 1, 1   # seconds a step: one is warm-up enough
    t = time.perf_counter()
    for _ in range(warmup):
        step()
    sync(device)
    warmup_s = time.perf_counter() - t
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        for _ in range(per_repeat):
            step()
        sync(device)
        times.append((time.perf_counter() - t) / per_repeat)
    hp = WORKLOADS[workload]
    ms = 1e3 * statistics.median(times)
    peak = (torch.cuda.max_memory_allocated(device) if device.type == 'cuda'
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    return dict(workload=f'{workload}-{order}', impl=impl, tracks=yes_no(tracks(impl)), device=device_name(device),
                torch=torch.__version__, ms_per_step=round(ms, 3), spread_ms=round(1e3 * (max(times) - min(times)), 3),
                images_per_s=round(hp['task_num'] * hp['n_way'] * (hp['k_spt'] + hp['k_qry']) / ms * 1e3),
                peak_mem_mb=round(peak / 2**20), warmup_s=round(warmup_s, 1))


def algorithm(impl):
    """The impl whose FLOPs `impl`'s step has: meta for Meta's variants, itself otherwise."""
    return 'meta' if impl in VARIANTS else impl


def count_flops(workload, order, impl, omniglot_root):
    """FLOPs of one meta-step of the row's own algorithm (`flops_on`) on the workload's tasks, on the
    CPU. They are affine in the number of tasks (a loop over tasks, plus the seed's backward pass
    through its last task alone), so they are counted on one task and on two and extrapolated: a
    fraction of the work of counting the whole step, which costs a step of the per-task loop."""
    impl = algorithm(impl)
    maml, next_batch = build(workload, order, impl, torch.device('cpu'), omniglot_root)
    batch = next_batch()
    if len(batch[0]) <= 2:   # one task and then two would cost more than counting the step itself
        return flops_on(impl, maml, batch)
    one, two = (flops_on(impl, maml, [t[:tasks] for t in batch]) for tasks in (1, 2))
    return one + (len(batch[0]) - 1) * (two - one)


def flops_on(impl, maml, batch):
    """FLOPs of one meta-step of `impl` on `maml` over the tasks of `batch`, counted task by task
    (vmap's batched convolutions are grouped convolutions that torch's counter miscounts): the
    seed's and the reference's loops as they run; Meta's (and the family's) per-task form otherwise,
    with the row's tracking."""
    with FlopCount() as counter:
        if impl == 'seed' or impl.startswith('reference'):
            row_step(impl, maml)(*batch)
        else:
            params, steps = dict(maml.net.named_parameters()), maml.update_step
            first_order = maml.first_order or maml.algo == 'reptile'
            query_at = tuple(range(steps + 1)) if tracks(impl) else (steps,)
            losses = [maml._task(params, *(t[i] for t in batch), maml.n_way, steps, query_at, (), (steps,),
                                 first_order, True)[0][-1] for i in range(len(batch[0]))]
            torch.stack(losses).mean().backward()
    return counter.flops


def one_step_under(mode, workload, order, impl, device, omniglot_root):
    """`mode` (a roofline dispatch mode) after one meta-step of `impl` on `device` run under it,
    uncompiled: a compiled row is measured on its eager step, so fused kernels do less than this."""
    maml, next_batch = build(workload, order, impl.replace('+compile', '').replace('+graphs', ''), device,
                             omniglot_root)
    batch = next_batch()
    with mode:
        row_step(impl, maml)(*batch)
    return mode


def profile_row(workload, order, impl, device, omniglot_root, steps=5, top=12, trace=None):
    """Where one meta-step's time goes: torch.profiler over `steps` steps after warm-up (and any
    compilation or CUDA-graph capture). Prints the ops (CUDA: kernels) by self time, the share of
    the wall time the device is busy (the rest is launch gaps and host work), and the step's FLOPs
    and op-by-op memory traffic against the device's measured matmul rate and copy bandwidth."""
    from torch.profiler import ProfilerActivity, profile
    maml, next_batch = build(workload, order, impl, device, omniglot_root)
    step = row_step(impl, maml)
    for _ in range(3):
        step(*next_batch())
    sync(device)
    cuda = device.type == 'cuda'
    with profile(activities=[ProfilerActivity.CPU] + [ProfilerActivity.CUDA] * cuda) as prof:
        t = time.perf_counter()
        for _ in range(steps):
            step(*next_batch())
        sync(device)
        wall_ms = 1e3 * (time.perf_counter() - t) / steps
    if trace:
        prof.export_chrome_trace(trace)
    self_us = (lambda e: e.self_device_time_total) if cuda else (lambda e: e.self_cpu_time_total)
    events = sorted(prof.key_averages(), key=self_us, reverse=True)
    busy_ms = sum(map(self_us, events)) / 1e3 / steps
    row = (workload, order, impl, device, omniglot_root)
    flops, traffic = count_flops(workload, order, impl, omniglot_root), one_step_under(ByteCount(), *row).bytes
    passes, convs = one_step_under(PassCount(), *row), one_step_under(ConvolutionReplay(), *row)
    conv_flops, conv_seconds = convs.replay(device)
    rate, bandwidth = matmul_rate(device), copy_bandwidth(device)
    print(f'{workload}-{order} {impl} (per-step accuracies: {yes_no(tracks(impl))}) on {device_name(device)}, '
          f'torch {torch.__version__}: {wall_ms:.2f} ms/step; {"kernels" if cuda else "ops"} busy {busy_ms:.2f} '
          f'ms/step ({100 * busy_ms / wall_ms:.0f}% of the wall time)')
    flop_share, bandwidth_share = flops / wall_ms * 1e3 / rate, traffic / wall_ms * 1e3 / bandwidth
    print(f'{flops / 1e9:.2f} GFLOP/step: {flops / wall_ms / 1e9:.3f} TFLOP/s, {100 * flop_share:.1f}% of the '
          f'measured matmul rate ({rate / 1e12:.2f} TFLOP/s); {traffic / 1e9:.2f} GB/step op by op: '
          f'{traffic / wall_ms / 1e6:.1f} GB/s, {100 * bandwidth_share:.0f}% of the measured copy bandwidth '
          f'({bandwidth / 1e9:.1f} GB/s)')
    print(f'element-wise passes per step: {passes.pointwise} pointwise ops and {passes.copies} copies over '
          f'{passes.elementwise_bytes / 1e9:.2f} GB; most: '
          + ', '.join(f'{n} {name}' for name, n in passes.most_common(6)))
    ceiling = flops / conv_seconds / rate
    print(f'convolutions: {conv_flops / 1e9:.2f} of the {flops / 1e9:.2f} GFLOP; replayed one by one at the step\'s '
          f'shapes and layouts they take {1e3 * conv_seconds:.1f} ms, {100 * conv_flops / conv_seconds / rate:.0f}% '
          f'of the matmul rate: with every other op free the step would reach {100 * ceiling:.0f}% of it, the '
          f'ceiling of these kernels; the slowest:')
    for seconds, calls, flops_per_call, what in convs.timings[:top // 2]:
        print(f'{1e3 * seconds:9.3f} ms/step {calls:6d} calls/step  '
              f'{flops_per_call / seconds * calls / 1e9:6.1f} GFLOP/s  {what}')
    print('ops by self time:')
    for e in events[:top]:
        print(f'{self_us(e) / 1e3 / steps:9.3f} ms/step {e.count // steps:6d} calls/step  {e.key[:90]}')
    return dict(wall_ms=wall_ms, busy_ms=busy_ms, calls_per_step=sum(e.count for e in events) / steps,
                gflop=flops / 1e9, gbytes=traffic / 1e9, flop_share=flop_share, bandwidth_share=bandwidth_share,
                pointwise=passes.pointwise, copies=passes.copies, conv_gflop=conv_flops / 1e9,
                conv_ms=1e3 * conv_seconds, ceiling=ceiling)


def loader_rates(mini_root, device, quick):
    """Episodes/s (task_num 4, 5-way 1-shot) of the seed's path, PIL decode per item through a
    DataLoader, against the cached sampler on `device`."""
    from MiniImagenet import MiniImagenet
    hp = WORKLOADS['mini-5w1s']
    n = 40 if quick else 200
    rows = []
    for workers in sorted({1, 2, os.cpu_count()}):
        db = MiniImagenet(mini_root, 'train', n * hp['task_num'], hp['n_way'], hp['k_spt'], hp['k_qry'], hp['imgsz'])
        loader = torch.utils.data.DataLoader(db, batch_size=hp['task_num'], num_workers=workers,
                                             pin_memory=device.type == 'cuda')
        t = time.perf_counter()
        for batch in loader:
            [x.to(device, non_blocking=True) for x in batch]
        sync(device)
        rows.append((f'seed-style DataLoader, {workers} workers', n * hp['task_num'] / (time.perf_counter() - t)))
    cache = MiniImagenetCache(mini_root, 'train', hp['imgsz'], device)
    sample = lambda: cache.sample(hp['task_num'], hp['n_way'], hp['k_spt'], hp['k_qry'])
    sample()
    t = time.perf_counter()
    for _ in range(n):
        sample()
    sync(device)
    rows.append((f'decode-once cache on {device.type}', n * hp['task_num'] / (time.perf_counter() - t)))
    return rows


def check_inputs(workloads, args, device):
    """Fail in one sentence, before anything is timed, when a row would lack its input: the
    workloads' names, the device, Omniglot (downloaded and decoded here once if missing) and, for
    --loaders, the mini-ImageNet split."""
    available_device(args.device)
    for name in workloads:
        workload, _, order = name.rpartition('-')
        if workload not in WORKLOADS or order not in ('so', 'fo'):
            raise FlagError(f"workload '{name}' is not one of " + ', '.join(f'{w}-so, {w}-fo' for w in WORKLOADS)
                            + '; pick among those.')
    omniglot = {(WORKLOADS[name.rpartition('-')[0]]['imgsz'], WORKLOADS[name.rpartition('-')[0]]['preprocess'])
                for name in workloads if WORKLOADS[name.rpartition('-')[0]]['dataset'] == 'omniglot'}
    for imgsz, preprocess in sorted(omniglot):
        load_images(args.omniglot, imgsz, preprocess)
    if args.loaders:
        read_split(args.mini, 'train')


def run_row(name, impl, device, omniglot_root, quick=False, threads=0, timeout=None):
    """The row of workload `name` (e.g. omniglot-paper-so) and `impl`, timed in a fresh process so
    that its peak memory is its own: time_row's dict, or one holding the error or the timeout."""
    workload, order = name.rsplit('-', 1)
    cmd = [sys.executable, __file__, '--row', workload, order, impl, '--device', str(device),
           '--omniglot', omniglot_root, '--threads', str(threads)] + ['--quick'] * quick
    failed = dict(workload=name, impl=impl, tracks=yes_no(tracks(impl)), device=device_name(device),
                  torch=torch.__version__)
    try:
        run = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return dict(failed, error=f'no result within {timeout:.0f} s')
    if run.returncode == 0:
        return json.loads(run.stdout.strip().splitlines()[-1])
    return dict(failed, error=(run.stderr.strip().splitlines() or [f'exit status {run.returncode}'])[-1][:200])


def add_speedups(rows):
    """Each timed row's speed-up over the reference row and over the seed row of its workload that do
    the same work: the same tracking (column 'tracks'), so an untracked row is set against
    reference-untracked and against no seed row. A ratio without such a row is left out ('-')."""
    for row in rows:
        for column, baselines in (('speedup', ('reference', 'reference-untracked')), ('vs_seed', ('seed',))):
            ref = next((r for r in rows if r['workload'] == row['workload'] and r['impl'] in baselines
                        and r['tracks'] == row['tracks'] and 'ms_per_step' in r), None)
            if ref and 'ms_per_step' in row:
                row[column] = round(ref['ms_per_step'] / row['ms_per_step'], 2)


def parse_flags(argv=None):
    """The command line's flags; --workloads and --impls resolved to lists of names: those given
    ('all': every one), else --quick's small set, else every one."""
    p = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0], allow_abbrev=False,
                                formatter_class=HelpFormatter)
    p.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu',
                   help='torch device to time on: cpu, cuda, cuda:1, ...')
    p.add_argument('--quick', action='store_true',
                   help=f"a first look, minutes on 2 CPU cores: fewer repeats per row and, unless named, the workloads "
                        f"{' '.join(QUICK_WORKLOADS)} and the impls {' '.join(QUICK_IMPLS)}")
    p.add_argument('--workloads', nargs='+', metavar='WORKLOAD',
                   help="workloads to time, each 'name-so' (second order) or 'name-fo' (first order), names among "
                        f"{', '.join(WORKLOADS)}, or 'all' (none named: --quick's, else all)")
    p.add_argument('--impls', nargs='+', choices=IMPLS + ['all'], metavar='IMPL',
                   help=f"implementations to time (see the top of this file): {', '.join(IMPLS)}, or 'all' "
                        "(none named: --quick's, else all)")
    p.add_argument('--omniglot', default=omniglot_train.DATA_ROOT, help='Omniglot data root')
    p.add_argument('--mini', default=miniimagenet_train.DATA_ROOT, help='mini-ImageNet root, for --loaders')
    p.add_argument('--loaders', action='store_true', help='also time the mini-ImageNet episode loaders')
    p.add_argument('--csv', default='bench_results.csv', help='CSV file the rows are written to')
    p.add_argument('--threads', type=int, default=0,
                   help='CPU threads per row (0: torch\'s default, one per core); on a CPU shared with other '
                        'busy processes, 1 avoids waiting on descheduled OpenMP threads')
    p.add_argument('--profile', nargs=3, metavar=('WORKLOAD', 'ORDER', 'IMPL'),
                   help='profile one row instead (e.g. omniglot-paper so meta+graphs): the top ops or kernels')
    p.add_argument('--trace', help='with --profile: also write a Chrome trace here')
    p.add_argument('--row', nargs=3, metavar=('WORKLOAD', 'ORDER', 'IMPL'), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.workloads = ALL_WORKLOADS if 'all' in (args.workloads or ()) else args.workloads or (
        QUICK_WORKLOADS if args.quick else ALL_WORKLOADS)
    args.impls = IMPLS if 'all' in (args.impls or ()) else args.impls or (QUICK_IMPLS if args.quick else IMPLS)
    return args


def main():
    args = parse_flags()
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    if not (args.row and args.row[2] == 'notebook'):
        tune(device)   # as the training scripts do; a notebook's Meta gets only what Meta itself sets up
    if args.row:
        print(json.dumps(time_row(*args.row, device, args.omniglot, args.quick)))
        return
    if args.profile:
        check_inputs(['-'.join(args.profile[:2])], args, device)
        profile_row(*args.profile, device, args.omniglot, trace=args.trace)
        return
    check_inputs(args.workloads, args, device)

    print(HEADER)
    rows = []
    for name in args.workloads:
        for impl in args.impls:
            if impl in CUDA_ONLY and device.type != 'cuda':
                continue
            rows.append(run_row(name, impl, device, args.omniglot, args.quick, args.threads))
            print(format_row(rows[-1]), flush=True)
    add_speedups(rows)

    rate = matmul_rate(device)
    print(f'\n{device_name(device)}, torch {torch.__version__}; measured matmul rate {rate / 1e12:.2f} TFLOP/s; '
          f"each row's floor is its own algorithm's FLOPs at that rate")
    print(HEADER + '  floor')
    flops = {}
    for row in rows:
        workload, order = row['workload'].rsplit('-', 1)
        if 'ms_per_step' in row:
            kind = algorithm(row['impl'])
            if (row['workload'], kind) not in flops:
                flops[row['workload'], kind] = count_flops(workload, order, kind, args.omniglot)
            row['gflop_per_step'] = round(flops[row['workload'], kind] / 1e9, 2)
            row['share_of_peak'] = round(flops[row['workload'], kind] / (row['ms_per_step'] / 1e3) / rate, 4)
        print(format_row(row, rate))
    with open(args.csv, 'w', newline='') as f:
        fields = list(dict.fromkeys(k for r in rows for k in r))
        writer = csv.DictWriter(f, fields)
        writer.writeheader()
        writer.writerows(rows)
    print(f'rows written to {args.csv}')
    if args.loaders:
        for name, rate in loader_rates(args.mini, device, args.quick):
            print(f'{name:45} {rate:8.1f} episodes/s')


def yes_no(flag):
    """A boolean as the table and the CSV show it."""
    return 'yes' if flag else 'no'


def ratio(value):
    """A speed-up column: '-' where it is not known yet (rows print as they are timed), or there is no
    timed baseline row of the same workload and tracking (the seed at update_step 1, or untracked)."""
    return f'{value:7.2f}x' if value is not None and not math.isnan(value) else f"{'-':>8}"


# the ratios' rule, printed above the table
HEADER = ("'speed-up' over reference, 'vs seed' over seed: the row of the same workload and the same 'tracks' "
          "(per-step accuracies), else '-'\n"
          f"{'workload':20} {'impl':19} {'tracks':6} {'ms/step':>9} {'img/s':>8} {'peak MB':>8} {'speed-up':>8} "
          f"{'vs seed':>8}")


def format_row(row, rate=None):
    """One row of the table: its timing and ratios, and with the matmul `rate` its FLOPs and floor."""
    if 'error' in row:
        return f"{row['workload']:20} {row['impl']:19} {row['tracks']:6} failed: {row['error']}"
    text = (f"{row['workload']:20} {row['impl']:19} {row['tracks']:6} {row['ms_per_step']:9.2f} "
            f"{row['images_per_s']:8d} {row['peak_mem_mb']:8d} {ratio(row.get('speedup'))} {ratio(row.get('vs_seed'))}")
    if rate is not None:
        text += (f"  {row['gflop_per_step']:.1f} GFLOP, floor {1e3 * row['gflop_per_step'] * 1e9 / rate:.2f} ms, "
                 f"{100 * row['share_of_peak']:.1f}% of peak")
    return text


if __name__ == '__main__':
    run_main(main)
