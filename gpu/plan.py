"""
Check a CUDA machine in one command: every CUDA path of the scripts, and the benchmark rows timed.
With --experiment it then trains a part of a paper experiment in the minutes left and exports it.

    python gpu/plan.py --out plan-report                                     # checks and bench
    python gpu/plan.py --out plan-report --experiment omniglot/paper-20w1s   # then a reproduction part
    python gpu/plan.py --device cpu --stages checks --only omniglot evaluate --out plan-dry-run   # on a CPU

1. checks: every CUDA path of the scripts for a few steps (all_checks), each in processes of its own
   with a timeout of its own, --jobs at a time, the compiled one first (it compiles for minutes,
   beside the others); a table of which ran and which failed, with the last line of the error.
2. bench: the uncompiled benchmarks/bench.py --quick rows (--bench_impls on --bench_workloads, in
   that order), each in a fresh process, until --bench_minutes are spent (a step's FLOPs, the same
   on every device, are left to bench.py on a CPU).
3. reproduce, with --experiment only: reproduce.py EXPERIMENT (resumed from its folder in --runs,
   else from the results/<run>-last.pth the repository ships, else started) for the minutes left
   less RESERVE_S for its final evaluations; flags after `--` go to it as after its own `--`. Its
   run folder and results are exported in the repository's layout (reproduce.py's --export), then
   packed as one tar cut into pieces of at most --piece-mb, for a transfer that bounds file sizes.
What it measured goes into --out as it goes: gpu-plan-<time>.json (device, torch, CUDA, each
stage's seconds, the check table, the bench rows, the reproduction's outcome), gpu-plan-<time>.log
(every command's output) and export.tar.0, .1, ...: `cat export.tar.* | tar -x` in the repository
unpacks them. With the defaults every file is under 16 MiB, and a paper run's export (seven
checkpoints of about 1.4 MB, its metrics and curves) is one piece: three files in all.
"""
import argparse
import concurrent.futures
import datetime
import glob
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
from maml.flags import HelpFormatter
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
              skip=None if mini else f'no mini-ImageNet: pass --miniimagenet, or make the sample in '
                                     f'{os.path.relpath(MINI_SAMPLE, REPO)} with `python gpu/carry.py prepare`'),
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
    """The check table: one row per check, its result, its seconds and the line that says why it failed."""
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
        """The JSON report as it stands, replaced whole so that a plan cut short leaves a readable one."""
        with self.lock:
            with open(self.json_path + '.tmp', 'w') as f:
                json.dump(self.result, f, indent=1)
            os.replace(self.json_path + '.tmp', self.json_path)

    def left(self):
        """Seconds to the plan's deadline."""
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
        """The checks stage: the selected checks' table, and each check's output into the log."""
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
        """The bench stage: one row per workload and implementation, in order, while time is left."""
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
        """The reproduce stage: a part of --experiment in the minutes left, its run exported into --out."""
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
            outcome['export'] = pack(export, flags.out, int(flags.piece_mb * 1e6))
        self.say(f"reproduce {name}: {status}, steps {steps_before} -> {steps_after} in {format_duration(seconds)}"
                 + (f"; {message}" if message else '') + (f"; exported as {', '.join(outcome['export'])}"
                                                           if 'export' in outcome else ''))


def pack(folder, out, piece_bytes):
    """folder's files as one tar, cut into out/export.tar.<i> pieces of at most piece_bytes, their
    numbers zero-padded to one width so that `cat export.tar.*` joins them in order; returns their names."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode='w') as tar:
        for entry in sorted(os.listdir(folder)):
            tar.add(os.path.join(folder, entry), arcname=entry)
    data = buffer.getvalue()
    starts = range(0, max(len(data), 1), piece_bytes)
    names = [f'export.tar.{i:0{len(str(len(starts) - 1))}d}' for i in range(len(starts))]
    for name, start in zip(names, starts):
        with open(os.path.join(out, name), 'wb') as f:
            f.write(data[start:start + piece_bytes])
    return names


def parse_flags(argv):
    """The plan's flags, checked before anything runs (its data is checked in main)."""
    argv, train_flags = reproduce.split_at_dashes(argv)
    p = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0], allow_abbrev=False,
                                formatter_class=HelpFormatter)
    p.add_argument('--out', required=True, help='folder of the report (JSON and log) and of the export pieces')
    p.add_argument('--minutes', type=float, default=9, help='the whole plan, all stages')
    p.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    p.add_argument('--stages', nargs='+', choices=STAGES,
                   help='stages to run, in this order (none given: checks and bench, then reproduce with --experiment)')
    p.add_argument('--only', nargs='+', help='run only these checks')
    p.add_argument('--jobs', type=int, default=min(6, max(1, (os.cpu_count() or 2) // 2)), help='checks at a time')
    p.add_argument('--check_minutes', type=float, default=3.5, help='at most this long for the checks')
    p.add_argument('--bench_minutes', type=float, default=2, help='at most this long for the bench rows')
    p.add_argument('--bench_workloads', nargs='+', default=['omniglot-paper-so', 'omniglot-5w1s-so', 'mini-5w1s-so'])
    p.add_argument('--bench_impls', nargs='+', default=['reference', 'meta', 'meta+amp'], choices=bench.IMPLS)
    p.add_argument('--experiment', help="dataset/preset to train a part of in the minutes left (reproduce.py), e.g. "
                                        "omniglot/paper-20w1s, or 'next': the first unfinished run in --runs")
    p.add_argument('--piece-mb', type=float, default=15,
                   help='largest piece of the packed export, in MB of 10^6 bytes, for a transfer that bounds '
                        'file sizes')
    p.add_argument('--runs', default=os.path.relpath(os.path.join(REPO, 'runs')), help="reproduce.py's --runs")
    p.add_argument('--results', default=os.path.relpath(os.path.join(REPO, 'results')), help="reproduce.py's --results")
    p.add_argument('--omniglot', default=os.path.relpath(omniglot_train.DATA_ROOT),
                   help='Omniglot data root of the checks and bench')
    p.add_argument('--miniimagenet', help='mini-ImageNet root of its check (none given: data/miniimagenet if '
                                          'it is there, else the sample `python gpu/carry.py prepare` makes)')
    flags = p.parse_args(argv)
    flags.train_flags = train_flags
    # the defaults are relative to where it started (shorter in --help); the commands run in the repository
    for name in ('out', 'runs', 'results', 'omniglot', 'miniimagenet'):
        if getattr(flags, name) is not None:
            setattr(flags, name, os.path.abspath(getattr(flags, name)))
    if flags.stages is None:
        flags.stages = ['checks', 'bench'] + ['reproduce'] * (flags.experiment is not None)
    if 'reproduce' in flags.stages and flags.experiment is None:
        raise FlagError("--stages reproduce needs --experiment; name one such as omniglot/paper-20w1s, or 'next'.")
    if not flags.minutes > 0:
        raise FlagError(f'--minutes is {flags.minutes} but must be positive.')
    if int(flags.piece_mb * 1e6) < 1:
        raise FlagError(f'--piece-mb {flags.piece_mb:g} gives no room for a piece; pass a positive size such as 15.')
    available_device(flags.device)
    if flags.experiment not in (None, 'next'):
        reproduce.experiment(flags.experiment)
    known = [c.name for c in all_checks(flags.device, '', '', None)]
    unknown = [name for name in flags.only or () if name not in known]
    if unknown:
        raise FlagError(f"--only names {unknown[0]!r}, which is no check; name some of {', '.join(known)}.")
    return flags


def main(argv=None):
    flags = parse_flags(sys.argv[1:] if argv is None else argv)
    try:   # before anything runs
        load_images(flags.omniglot, 28, 'official', download=False)
    except MissingError:
        raise MissingError(f"Omniglot is not in {flags.omniglot}: copy there the two official zips, or the "
                           f"omniglot_28_official.pt that `python gpu/carry.py prepare` makes in data/omniglot, "
                           f"or pass --omniglot.") from None
    if 'bench' in flags.stages:   # the workloads' names and the device, as bench.py checks them
        bench.check_inputs(flags.bench_workloads, argparse.Namespace(device=flags.device, omniglot=flags.omniglot,
                                                                     loaders=False), torch.device(flags.device))
    earlier = sorted(glob.glob(os.path.join(flags.out, 'export.tar.*')))
    if 'reproduce' in flags.stages and earlier:   # `cat export.tar.*` would join them with the new pieces
        raise FlagError(f"{earlier[0]} is a piece of an earlier export; move that export's pieces out of --out or "
                        f"pass another --out.")
    if flags.miniimagenet is None:
        flags.miniimagenet = next((root for root in (miniimagenet_train.DATA_ROOT, MINI_SAMPLE)
                                   if os.path.isfile(os.path.join(root, 'train.csv'))), None)
    plan = Plan(flags)
    try:
        run_stages(plan)
    finally:   # the checks' runs and the export's copies: what matters is in --out
        shutil.rmtree(plan.work, ignore_errors=True)


def run_stages(plan):
    """The selected stages in turn, then the check table, the bench rows and the reproduction's outcome."""
    flags = plan.flags
    plan.say(f"gpu/plan.py on {plan.result['device']}, torch {torch.__version__} (CUDA {torch.version.cuda}), "
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
