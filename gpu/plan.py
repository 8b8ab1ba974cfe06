"""
The GPU plan: what to check and measure in the first minutes a GPU machine is lent, as one
command of at most --minutes (README, GPU plan).

    python3 gpu/plan.py --out $OUT --experiment omniglot/paper-20w1s      # there: all three stages
    python gpu/plan.py --device cpu --stages checks --only omniglot evaluate --out /tmp/plan   # a dry run here

1. checks: every CUDA path of the scripts for a few steps (all_checks), each in processes of its own
   with a timeout of its own, --jobs at a time, the compiled one first (it compiles for minutes,
   beside the others); a table of which ran and which failed, with the last line of the error.
2. bench: the uncompiled benchmarks/bench.py --quick rows (--bench_impls on --bench_workloads, in
   that order), each in a fresh process, until --bench_minutes are spent (a step's FLOPs, the same
   on every device, are left to bench.py on a CPU).
3. reproduce: reproduce.py EXPERIMENT (resumed from its run folder if carried into runs/, else from
   the results/<run>-last.pth the repository ships, else started) for the minutes left less
   RESERVE_S for its final evaluations; flags after `--` go to it as after its own `--`. Its run
   folder and results are exported in the repository's layout.
What it measured goes into --out as it goes (the run tool brings back at most 8 files of 16 MiB):
gpu-plan-<time>.json (device, torch, CUDA, each stage's seconds, the check table, the bench rows,
the reproduction's outcome), gpu-plan-<time>.log (every command's output) and export.tar.0, .1, ...,
pieces of one tar of the exported run: `cat export.tar.* | tar -x` in the repository unpacks it.
"""
import argparse
import concurrent.futures
import datetime
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import threading
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path[:0] = [REPO, os.path.join(REPO, 'benchmarks')]   # the repository's modules, and bench.py
import bench
import miniimagenet_train
import omniglot_train
import reproduce
from carry import MINI_SAMPLE
from maml.devices import available_device, device_name
from maml.errors import FlagError, MissingError, UserError
from maml.trainer import format_duration, run_main
from omniglotNShot import load_images

STAGES = ('checks', 'bench', 'reproduce')
# a few steps of each path: 2 inner steps, 4 tasks (2 per rank under torchrun), evaluation and the final report included
TINY = ['--epoch', '4', '--task_num', '4', '--k_qry', '2', '--num_filters', '16', '--update_step', '2',
        '--update_step_test', '2', '--log_every', '2', '--eval_every', '4', '--eval_tasks', '8', '--test_tasks', '8']
# seconds per check; a compiled run compiles each of its step's variants, and a full mini-ImageNet
# (joined from its parts) decodes 60,000 JPEGs first
CHECK_S, COMPILE_S, MINI_S = 150, 200, 200
RESERVE_S = 90   # a reproduction part's start, its last --log_every steps, final evaluations, evaluate.py, export
PIECE_BYTES = 15 << 20   # the run tool brings back files of at most 16 MiB
ERROR_LINE = re.compile(r'^error: |^[A-Za-z_][\w.]*(Error|Exception|Interrupt|Failed)\b')


class Check:
    """A named path to try: commands run in turn, all within `timeout` seconds; `skip` says why not."""

    def __init__(self, name, commands, timeout=CHECK_S, cuda_only=False, skip=None):
        self.name, self.commands, self.timeout, self.cuda_only, self.skip = name, commands, timeout, cuda_only, skip


def all_checks(device, work, omniglot, mini):
    """Every path the scripts take on a GPU, in the order they start (the compiled one first)."""
    py = sys.executable
    script = lambda name: os.path.join(REPO, name)
    folder = lambda name: os.path.join(work, name)

    def train(name, *flags, on=device):
        return [py, script('omniglot_train.py'), '--data', omniglot, '--device', on, '--save_dir', folder(name),
                *TINY, *flags]

    def sync(variant):
        return Check(f'sync-{variant}', [[py, os.path.join(HERE, 'sync_check.py'), variant, '--data', omniglot,
                                          '--device', device]])

    def torchrun(ranks, skip=None):
        return Check(f'torchrun-{ranks}', [[py, '-m', 'torch.distributed.run', '--standalone',
                                            f'--nproc_per_node={ranks}', *train(f'torchrun-{ranks}')[1:],
                                            '--time_budget', '0.001']], skip=skip)

    gpus = torch.cuda.device_count() if device.startswith('cuda') else 0
    return [
        Check('compile', [train('compile', '--compile', 'reduce-overhead')], COMPILE_S, cuda_only=True),
        Check('omniglot', [train('omniglot')]),
        Check('miniimagenet', [[py, script('miniimagenet_train.py'), '--data', mini or '', '--device', device,
                                '--save_dir', folder('miniimagenet'), *TINY]], MINI_S,
              skip=None if mini else f'no mini-ImageNet here: carry {os.path.relpath(MINI_SAMPLE, REPO)} '
                                     f'(python gpu/carry.py prepare), or join data/miniimagenet from its parts'),
        Check('amp', [train('amp', '--amp')], cuda_only=True),
        *(Check(algo, [train(algo, '--algo', algo)]) for algo in ('anil', 'metasgd', 'reptile')),
        Check('maml++', [train('maml++', '--preset', 'maml++')]),
        Check('first-order', [train('first-order', '--first_order')]),
        Check('evaluate', [train('evaluate'), [py, script('evaluate.py'), os.path.join(folder('evaluate'), 'best.pth'),
                                               '--data', omniglot, '--device', device, '--tasks', '8']]),
        Check('resume-cpu', [train('resume-cpu', on='cpu'),
                             [py, script('omniglot_train.py'), '--resume', os.path.join(folder('resume-cpu'),
                                                                                       'last.pth'),
                              '--epoch', '8', '--data', omniglot, '--device', device]]),
        torchrun(1),
        torchrun(2, skip=None if gpus != 1 else 'one GPU: NCCL puts each rank on a GPU of its own'),
        *(sync(variant) for variant in ('meta', 'maml++', 'from-checkpoint', 'sampling')),
    ]


def error_line(output):
    """The line that says why a command failed: the project's one-sentence 'error: ...' or the last
    exception line (not torchrun's ChildFailedError, which only says that a rank failed), else the
    last line."""
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    said = [line for line in lines if ERROR_LINE.match(line) and 'ChildFailedError' not in line]
    return (said or lines or ['(no output)'])[-1][:300]


def run_command(command, timeout, log, threads=None):
    """Run command in a process group of its own (so that a timeout also ends torchrun's ranks and
    compile workers), with `threads` CPU threads if given, its output appended to log; returns
    (status, seconds, message)."""
    start = time.perf_counter()
    env = dict(os.environ, PYTHONUNBUFFERED='1', **({'OMP_NUM_THREADS': str(threads)} if threads else {}))
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                            cwd=REPO, start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=max(timeout, 0))
        status = 'ok' if proc.returncode == 0 else 'FAILED'
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        status = 'TIMEOUT'
    log.write(f"$ {' '.join(command)}\n{output}\n")
    seconds = time.perf_counter() - start
    message = '' if status == 'ok' else (error_line(output) if status == 'FAILED' else
                                         f'no end within {timeout:.0f} s; last line: {error_line(output)}')
    return status, seconds, message


def run_check(check, deadline, device, logs, threads=None):
    """One check's row of the table: name, status (ok, FAILED, TIMEOUT, skipped, not run), seconds, message."""
    row = dict(name=check.name, status='skipped', seconds=0.0, message=check.skip or '')
    if check.cuda_only and not device.startswith('cuda'):
        return dict(row, message='needs CUDA')
    if check.skip:
        return row
    end = min(deadline, time.time() + check.timeout)
    if end - time.time() < 1:
        return dict(row, status='not run', message='the checks stage had no time left')
    with open(os.path.join(logs, f'{check.name}.log'), 'w') as log:
        for command in check.commands:
            status, seconds, message = run_command(command, end - time.time(), log, threads)
            row = dict(row, status=status, seconds=round(row['seconds'] + seconds, 1), message=message)
            if status != 'ok':
                break
    return row


def run_checks(selected, deadline, device, work, jobs, on_row=lambda row: None):
    """Rows of the selected checks, run `jobs` at a time in their order, the CPU's cores shared out
    between them (OpenMP threads that outnumber the cores wait for each other); on_row(row) as each ends."""
    logs, threads = os.path.join(work, 'logs'), max(1, len(os.sched_getaffinity(0)) // max(jobs, 1))
    os.makedirs(logs, exist_ok=True)
    rows = {}

    def one(check):
        rows[check.name] = run_check(check, deadline, device, logs, threads)
        on_row(rows[check.name])

    with concurrent.futures.ThreadPoolExecutor(max(jobs, 1)) as pool:
        list(pool.map(one, selected))
    return [rows[check.name] for check in selected]


def format_checks(rows):
    lines = [f"{'check':22} {'result':8} {'seconds':>8}  what failed"]
    lines += [f"{r['name']:22} {r['status']:8} {r['seconds']:8.1f}  {r['message']}" for r in rows]
    return '\n'.join(lines)


class Plan:
    """The stages' shared state: the deadline, the output folder and what has been measured so far."""

    def __init__(self, flags):
        self.flags, self.start = flags, time.time()
        self.deadline = self.start + 60 * flags.minutes
        os.makedirs(flags.out, exist_ok=True)
        stamp = datetime.datetime.now(datetime.timezone.utc).strftime('%Y%m%d-%H%M')
        self.json_path, self.log_path = (os.path.join(flags.out, f'gpu-plan-{stamp}.{ext}') for ext in ('json', 'log'))
        self.work = tempfile.mkdtemp(prefix='gpu-plan-')
        self.lock = threading.Lock()
        device = torch.device(flags.device)
        self.result = dict(started=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds'),
                           command=' '.join(sys.argv), device=device_name(device), torch=torch.__version__,
                           cuda=torch.version.cuda, gpus=torch.cuda.device_count(), minutes=flags.minutes,
                           stages={}, checks=[], bench=[], reproduce=None)
        if device.type == 'cuda':
            props = torch.cuda.get_device_properties(device)
            self.result.update(gpu_memory_gb=round(props.total_memory / 1e9, 1),
                               multiprocessors=props.multi_processor_count)

    def say(self, text, echo=True):
        """Into the log, and to stdout unless echo is False."""
        if echo:
            print(text, flush=True)
        with self.lock, open(self.log_path, 'a') as log:
            log.write(text + '\n')

    def save(self):
        with self.lock:
            with open(self.json_path + '.tmp', 'w') as f:
                json.dump(self.result, f, indent=1)
            os.replace(self.json_path + '.tmp', self.json_path)

    def left(self):
        return self.deadline - time.time()

    def stage(self, name, run):
        """Run one stage; a problem it names (errors.UserError) ends that stage, not the plan."""
        t = time.time()
        self.say(f'== {name} ({format_duration(self.left())} left)')
        try:
            run()
        except UserError as e:
            self.result.setdefault('errors', {})[name] = str(e)
            self.say(f'{name}: error: {e}')
        finally:
            self.result['stages'][name] = round(time.time() - t, 1)
            self.save()

    def checks(self):
        flags = self.flags
        selected = [c for c in all_checks(flags.device, self.work, flags.omniglot, flags.miniimagenet)
                    if not flags.only or c.name in flags.only]

        def done(row):
            self.result['checks'].append(row)
            self.say(f"check {row['name']}: {row['status']} {row['seconds']:.1f} s {row['message']}")
            self.save()

        deadline = min(self.deadline, time.time() + 60 * flags.check_minutes)
        rows = run_checks(selected, deadline, flags.device, self.work, flags.jobs, done)
        self.result['checks'] = rows   # in the table's order
        for row in rows:
            path = os.path.join(self.work, 'logs', f"{row['name']}.log")
            if os.path.isfile(path):
                with open(path) as f:
                    self.say(f"---- {row['name']} ({row['status']})\n{f.read()}", echo=False)
        self.say(format_checks(rows))

    def bench(self):
        flags = self.flags
        end = min(self.deadline, time.time() + 60 * flags.bench_minutes)
        rows = self.result['bench']
        for name in flags.bench_workloads:
            for impl in flags.bench_impls:
                if impl in bench.CUDA_ONLY and not flags.device.startswith('cuda'):
                    continue
                if end - time.time() < 10:
                    self.say(f'bench: out of time before {name} {impl}')
                    return
                rows.append(bench.run_row(name, impl, torch.device(flags.device), flags.omniglot, quick=True,
                                          timeout=end - time.time()))
                bench.add_speedups(rows)
                self.say(bench.format_row(rows[-1]))
                self.save()

    def reproduce(self):
        flags = self.flags
        runs, results = flags.runs, flags.results
        name = reproduce.next_unfinished(runs) if flags.experiment == 'next' else flags.experiment
        reproduce.experiment(name)
        minutes = (self.left() - RESERVE_S) / 60
        outcome = self.result['reproduce'] = dict(experiment=name, minutes=round(minutes, 2))
        if minutes < 1:
            outcome['status'] = 'not run'
            self.say(f'reproduce {name}: not run, only {format_duration(self.left())} left')
            return
        steps_before = reproduce.progress(runs, name, results)[0]   # also a run results/ ships, not yet restored
        command = [sys.executable, os.path.join(REPO, 'reproduce.py'), name, '--minutes', f'{minutes:.2f}',
                   '--device', flags.device, '--runs', runs, '--results', results, '--', *flags.train_flags]
        with open(self.log_path, 'a') as log:
            status, seconds, message = run_command(command, self.left() - 10, log)
        stem = name.replace('/', '-')
        steps_after = reproduce.progress(runs, name, results)[0]
        outcome.update(status=status, seconds=round(seconds, 1), message=message, steps=[steps_before, steps_after])
        report = os.path.join(results, f'{stem}-test.json')
        if status == 'ok' and os.path.isfile(report):
            with open(report) as f:
                outcome['test'] = json.load(f)
        if os.path.isdir(reproduce.run_folder(runs, name)):
            export = os.path.join(self.work, 'export')
            reproduce.export(name, runs, results, export)
            outcome['export'] = self.pack(export)
        self.say(f"reproduce {name}: {status}, steps {steps_before} -> {steps_after} in {format_duration(seconds)}"
                 + (f"; {message}" if message else '') + (f"; exported as {', '.join(outcome['export'])}"
                                                           if 'export' in outcome else ''))

    def pack(self, folder):
        """folder's files as one tar, cut into out/export.tar.<i> pieces of at most PIECE_BYTES."""
        buffer = io.BytesIO()
        with tarfile.open(fileobj=buffer, mode='w') as tar:
            for entry in sorted(os.listdir(folder)):
                tar.add(os.path.join(folder, entry), arcname=entry)
        data, pieces = buffer.getvalue(), []
        for i in range(0, max(len(data), 1), PIECE_BYTES):
            pieces.append(f'export.tar.{i // PIECE_BYTES}')
            with open(os.path.join(self.flags.out, pieces[-1]), 'wb') as f:
                f.write(data[i:i + PIECE_BYTES])
        return pieces


def main(argv=None):
    argv, train_flags = reproduce.split_at_dashes(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0], allow_abbrev=False,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument('--out', required=True, help='folder of what it measured ($OUT on a lent machine)')
    p.add_argument('--minutes', type=float, default=9, help='the whole plan, all stages')
    p.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    p.add_argument('--stages', nargs='+', default=list(STAGES), choices=STAGES)
    p.add_argument('--only', nargs='+', help='run only these checks')
    p.add_argument('--jobs', type=int, default=min(6, max(1, (os.cpu_count() or 2) // 2)), help='checks at a time')
    p.add_argument('--check_minutes', type=float, default=3.5, help='at most this long for the checks')
    p.add_argument('--bench_minutes', type=float, default=2, help='at most this long for the bench rows')
    p.add_argument('--bench_workloads', nargs='+', default=['omniglot-paper-so', 'omniglot-5w1s-so', 'mini-5w1s-so'])
    p.add_argument('--bench_impls', nargs='+', default=['reference', 'meta', 'meta+amp'], choices=bench.IMPLS)
    p.add_argument('--experiment', default='next', help="dataset/preset to train on (reproduce.py), or 'next': "
                                                        "the first unfinished one among the runs carried")
    p.add_argument('--runs', default=os.path.join(REPO, 'runs'), help="reproduce.py's --runs")
    p.add_argument('--results', default=os.path.join(REPO, 'results'), help="reproduce.py's --results")
    p.add_argument('--omniglot', default=omniglot_train.DATA_ROOT, help='Omniglot data root of the checks and bench')
    p.add_argument('--miniimagenet', help='mini-ImageNet root of its check (default: data/miniimagenet, joined '
                                          'from its parts, else the sample carried in .gpu/mini-sample)')
    flags = p.parse_args(argv)
    flags.train_flags = train_flags
    for name in ('out', 'runs', 'results', 'omniglot', 'miniimagenet'):   # the commands run in the repository
        if getattr(flags, name) is not None:
            setattr(flags, name, os.path.abspath(getattr(flags, name)))
    if not flags.minutes > 0:
        raise FlagError(f'--minutes is {flags.minutes} but must be positive.')
    available_device(flags.device)
    if flags.experiment != 'next':
        reproduce.experiment(flags.experiment)
    known = [c.name for c in all_checks(flags.device, '', '', None)]
    unknown = [name for name in flags.only or () if name not in known]
    if unknown:
        raise FlagError(f"--only names {unknown[0]!r}, which is no check; name some of {', '.join(known)}.")
    try:   # before anything runs
        load_images(flags.omniglot, 28, 'official', download=False)
    except MissingError:
        raise MissingError(f"Omniglot is not in {flags.omniglot}: carry data/omniglot/omniglot_28_official.pt "
                           f"(`python gpu/carry.py prepare` makes it), or pass --omniglot.") from None
    if 'bench' in flags.stages:   # the workloads' names and the device, as bench.py checks them
        bench.check_inputs(flags.bench_workloads, argparse.Namespace(device=flags.device, omniglot=flags.omniglot,
                                                                     loaders=False), torch.device(flags.device))
    if flags.miniimagenet is None:
        flags.miniimagenet = next((root for root in (miniimagenet_train.DATA_ROOT, MINI_SAMPLE)
                                   if os.path.isfile(os.path.join(root, 'train.csv'))), None)
    plan = Plan(flags)
    try:
        run_stages(plan)
    finally:   # the checks' runs and the export's copies: what matters is in --out
        shutil.rmtree(plan.work, ignore_errors=True)


def run_stages(plan):
    flags = plan.flags
    plan.say(f"GPU plan on {plan.result['device']}, torch {torch.__version__} (CUDA {torch.version.cuda}), "
             f"{plan.result['gpus']} GPU(s); stages {', '.join(flags.stages)} within {flags.minutes:g} min")
    plan.save()
    for name in flags.stages:
        plan.stage(name, getattr(plan, name))
    plan.say(format_checks(plan.result['checks']) if plan.result['checks'] else 'no checks run')
    for row in plan.result['bench']:
        plan.say(bench.format_row(row))
    if plan.result['reproduce']:
        plan.say(f"reproduce: {json.dumps({k: v for k, v in plan.result['reproduce'].items() if k != 'test'})}")
    plan.say(f"{format_duration(time.time() - plan.start)} in all; {plan.json_path}, {plan.log_path}")


if __name__ == '__main__':
    run_main(lambda: main(sys.argv[1:]))
