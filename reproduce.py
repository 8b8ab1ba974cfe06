"""
Run the paper's experiments (maml/presets.py) to their end, one part at a time, and collect the results.

    python reproduce.py                                    # where each experiment stands
    python reproduce.py omniglot/paper-5w5s --minutes 120  # start or continue one for 2 h, then evaluate
    python reproduce.py next --minutes 8 --device cuda --export out     # the first unfinished run in runs/
    python reproduce.py omniglot/paper-5w1s --collect      # evaluate and collect a run as it stands

A run lives in runs/<dataset>-<preset>/. A part starts the run (or resumes it from its last.pth;
on a machine without that folder, from the results/<name>-last.pth this repository ships),
trains until --minutes have passed (the training script's --time_budget: checked every
--log_every steps; data preparation and the final evaluations come on top), and ends as the
training script ends: best.pth evaluated once on the test split. Then `evaluate.py` scores
best.pth again, over the same test tasks, into results/<name>-test.json, and the run's
metrics.csv and learning curve are copied to results/, with the checkpoints anyone can check the
figure with: results/<name>.pth (best.pth, its test figure stored in it) and, while the run has
not reached its --epoch, results/<name>-last.pth (so that the run outlives its machine). A run
that has reached its --epoch only gets evaluated; `-- --epoch N` extends it. --export DIR copies
the run folder and its results, in this repository's layout, to DIR: what a lent machine must send
back for a later part to continue elsewhere (copy them into the repository). Flags after `--` go
to the training script (`--data` also to evaluate.py).
"""
import argparse
import json
import os
import shutil
import subprocess
import sys

import torch

from maml.checkpoints import atomic_save, load_checkpoint, read_metrics
from maml.errors import FlagError, RunError
from maml.presets import PRESETS
from maml.trainer import format_duration, run_main

REPO = os.path.dirname(os.path.abspath(__file__))
SCRIPTS = {'omniglot': 'omniglot_train.py', 'miniimagenet': 'miniimagenet_train.py'}
# Table 1 of the paper (and Lake et al. 2015 for the within-alphabet benchmark), in its order
PAPER = {
    'omniglot/paper-5w1s': '98.7 +- 0.4%',
    'omniglot/paper-5w5s': '99.9 +- 0.1%',
    'omniglot/paper-20w1s': '95.8 +- 0.3%',
    'omniglot/paper-20w5s': '98.9 +- 0.2%',
    'omniglot/lake-20w1s': 'people 95.5%, BPL 96.7%, Siamese net 92.0%',
    'miniimagenet/paper-5w1s': '48.70 +- 1.84%',
    'miniimagenet/paper-5w5s': '63.11 +- 0.92%',
}
RUN_FILES = ('last.pth', 'best.pth', 'metrics.csv', 'learning_curve.png')


def experiment(name):
    """(dataset, preset) of 'dataset/preset', refused by name when no such preset exists."""
    dataset, _, preset = name.partition('/')
    if preset not in PRESETS.get(dataset, {}):
        known = ', '.join(f'{d}/{p}' for d in PRESETS for p in PRESETS[d])
        raise FlagError(f"'{name}' is not an experiment; use one of {known}, or 'next'.")
    return dataset, preset


def run_folder(runs, name):
    return os.path.join(runs, name.replace('/', '-'))


def progress(runs, name, results=None):
    """(steps done, steps of the run) from the run's last.pth, or (0, the preset's) before it starts.
    With `results`, a run this machine lacks is read from what results/ ships (a shipped best.pth
    without a last.pth is a run that has ended)."""
    last = os.path.join(run_folder(runs, name), 'last.pth')
    if not os.path.exists(last) and results is not None:
        best, last = shipped(results, name)
        if not os.path.exists(last) and os.path.exists(best):
            total = load_checkpoint(best, map_location='cpu')['args']['epoch']
            return total, total
    if not os.path.exists(last):
        dataset, preset = experiment(name)
        return 0, PRESETS[dataset][preset]['epoch']
    ckpt = load_checkpoint(last, map_location='cpu')
    return ckpt['step'], ckpt['args']['epoch']


def script_flags(extra):
    """The --epoch and --data among the flags for the training script, parsed as the script would."""
    p = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    p.add_argument('--epoch', type=int)
    p.add_argument('--data')
    return p.parse_known_args(extra)[0]


def best_step(runs, name, results):
    """The step of the run's best.pth (the shipped one on a machine without the run), or None
    before its first evaluation."""
    best = os.path.join(run_folder(runs, name), 'best.pth')
    best = best if os.path.exists(best) else shipped(results, name)[0]
    return load_checkpoint(best, map_location='cpu')['step'] if os.path.exists(best) else None


def next_unfinished(runs):
    """The first experiment of the table whose run in `runs` has not reached its --epoch."""
    for name in PAPER:
        done, total = progress(runs, name)
        if done < total:
            return name
    raise RunError('every experiment of the paper has reached its end; nothing is left to run.')


def shipped(results, name):
    """The checkpoints results/ ships of a run: (selected best.pth, last.pth of an unfinished run)."""
    stem = os.path.join(results, name.replace('/', '-'))
    return f'{stem}.pth', f'{stem}-last.pth'


def restore(name, runs, results):
    """Rebuild a run folder this machine lacks from what results/ ships (last.pth, best.pth, also as
    its ranked file so that a better evaluation is needed to displace it, and metrics.csv), so the
    run resumes where its last part stopped on whatever machine ran it."""
    folder = run_folder(runs, name)
    best, last = shipped(results, name)
    if os.path.exists(os.path.join(folder, 'last.pth')) or not os.path.exists(last):
        return
    os.makedirs(folder, exist_ok=True)
    copies = [(last, 'last.pth'), (f"{best[:-len('.pth')]}.csv", 'metrics.csv')]
    if os.path.exists(best):
        selected = load_checkpoint(best, map_location='cpu')
        copies += [(best, 'best.pth'), (best, f"maml_step{selected['step']}_acc{selected['acc']:.4f}.pth")]
    for src, dest in copies:
        if os.path.exists(src):
            shutil.copyfile(src, os.path.join(folder, dest))
    print(f'{name}: {folder} rebuilt from {results}/ (step {progress(runs, name)[0]})', flush=True)


def train_part(name, runs, minutes, device, extra):
    """Start or resume the run for `minutes` of training (None: to its --epoch), unless it has ended."""
    dataset, preset = experiment(name)
    folder = run_folder(runs, name)
    done, total = progress(runs, name)
    total = script_flags(extra).epoch or total   # a run may be extended with -- --epoch N
    if done >= total:
        print(f'{name}: complete at step {done}; evaluating only.')
        return
    script = [sys.executable, os.path.join(REPO, SCRIPTS[dataset])]
    where = (['--resume', os.path.join(folder, 'last.pth')] if done else ['--preset', preset, '--save_dir', folder])
    budget = ['--time_budget', str(minutes)] if minutes else []
    cmd = script + where + budget + ['--device', device] + extra
    print(f'{name}: step {done} of {total}; running {" ".join(cmd[1:])}', flush=True)
    if subprocess.run(cmd).returncode != 0:
        raise RunError(f'the training part of {name} failed (its message is above); its folder {folder} '
                       f'keeps every checkpoint written before, so fix the cause and run this again.')


def collect(name, runs, results, device, extra):
    """evaluate.py on best.pth, over the test tasks of the run's own final report, into
    results/<name>-test.json, and the checkpoints behind the figure into results/ (`ship`); the
    run's metrics and curve into results/."""
    folder, stem = run_folder(runs, name), name.replace('/', '-')
    best = os.path.join(folder, 'best.pth')
    if not os.path.exists(best):
        raise RunError(f'{folder} holds no best.pth yet (no evaluation has run); train it longer.')
    os.makedirs(results, exist_ok=True)
    report = os.path.join(results, f'{stem}-test.json')
    selected = shipped(results, name)[0]
    snapshot = os.path.join(results, f'.{stem}.evaluating.pth')   # a run still training may replace best.pth
    shutil.copyfile(best, snapshot)
    try:
        data_root = script_flags(extra).data
        data = ['--data', data_root] if data_root else []
        tasks = load_checkpoint(snapshot, map_location='cpu')['args']['test_tasks']   # the run's final report's
        cmd = [sys.executable, os.path.join(REPO, 'evaluate.py'), snapshot, '--json', report, '--device', device,
               '--tasks', str(tasks)] + data
        if subprocess.run(cmd).returncode != 0:
            raise RunError(f'evaluate.py could not score {best} (its message is above).')
        ship(snapshot, selected, report)
    finally:
        if os.path.exists(snapshot):
            os.remove(snapshot)
    for name_in_run, name_in_results in (('metrics.csv', f'{stem}.csv'), ('learning_curve.png', f'{stem}.png')):
        if os.path.exists(os.path.join(folder, name_in_run)):
            shutil.copyfile(os.path.join(folder, name_in_run), os.path.join(results, name_in_results))
    last = shipped(results, name)[1]
    done, total = progress(runs, name)
    if done < total:   # the run outlives its machine: the next part can start from here
        shutil.copyfile(os.path.join(folder, 'last.pth'), last + '.tmp')
        os.replace(last + '.tmp', last)
    elif os.path.exists(last):
        os.remove(last)
    return report


def ship(evaluated, selected, report):
    """The checkpoint evaluate.py scored into `report`, with that figure stored in it, as `selected`
    (results/<name>.pth); the report names it there."""
    with open(report) as f:
        r = json.load(f)
    atomic_save({**load_checkpoint(evaluated, map_location='cpu'), 'test_acc': r['acc_by_step'][-1],
                 'test_ci': r['ci_by_step'][-1], 'test_by_step': r['acc_by_step'], 'test_tasks': r['tasks']}, selected)
    with open(report, 'w') as f:
        json.dump({**r, 'checkpoint': os.path.relpath(selected)}, f, indent=1)


def export(name, runs, results, dest):
    """Copy the run folder's files and the run's results into dest/<runs>/<run>/ and dest/<results>/,
    the layout of this repository."""
    folder, stem = run_folder(runs, name), name.replace('/', '-')
    copies = [(folder, f, os.path.join(dest, os.path.basename(os.path.normpath(runs)), os.path.basename(folder)))
              for f in os.listdir(folder) if f in RUN_FILES or f.startswith('maml_step')]
    if os.path.isdir(results):
        copies += [(results, f, os.path.join(dest, os.path.basename(os.path.normpath(results))))
                   for f in os.listdir(results) if f.startswith(stem)]
    for src_dir, f, dest_dir in copies:
        os.makedirs(dest_dir, exist_ok=True)
        shutil.copyfile(os.path.join(src_dir, f), os.path.join(dest_dir, f))
    print(f'{name}: run files and results copied to {dest}')


def status(runs, results):
    """One line per experiment: steps, wall time, the selected checkpoint and its test accuracy, the paper's."""
    lines = [f"{'experiment':25} {'steps':>15} {'wall':>7} {'best.pth':>40} {'test accuracy (evaluate.py)':>28}  paper"]
    for name in PAPER:
        done, total = progress(runs, name, results)
        report = os.path.join(results, name.replace('/', '-') + '-test.json')
        rows = read_metrics(run_folder(runs, name)) or read_metrics(results, name.replace('/', '-') + '.csv')
        best, test = '-', 'not evaluated'
        if os.path.exists(report):
            with open(report) as f:
                r = json.load(f)
            best = 'older report'   # written before evaluate.py named the checkpoint's step
            if r.get('checkpoint_step') is not None:
                best = f"step {r['checkpoint_step']}, {r['selected_on']} {100 * r['selection_acc']:.2f}%"
                if r['checkpoint_step'] != best_step(runs, name, results):
                    best += ' (stale: --collect)'
            test = f"{100 * r['acc_by_step'][-1]:.2f} +- {100 * r['ci_by_step'][-1]:.2f}% ({r['tasks']} tasks)"
        steps = f'{done} of {total}' if done else 'no checkpoint'
        wall = format_duration(float(rows[-1]['elapsed_s'])) if rows else '-'
        lines.append(f'{name:25} {steps:>15} {wall:>7} {best:>40} {test:>28}  {PAPER[name]}')
    return '\n'.join(lines)


def split_at_dashes(argv):
    """(this script's flags, the training script's flags): argv before and after its first '--'."""
    return (argv[:argv.index('--')], argv[argv.index('--') + 1:]) if '--' in argv else (argv, [])


def main(argv=None):
    argv, extra = split_at_dashes(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0], allow_abbrev=False,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument('experiment', nargs='?', help="dataset/preset (e.g. omniglot/paper-20w1s) or 'next'; "
                                                 "none: print where each experiment stands")
    p.add_argument('--minutes', type=float, help='training time of this part (default: to the end)')
    p.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    p.add_argument('--runs', default='runs', help='folder of the run folders')
    p.add_argument('--results', default='results', help='folder of the collected results')
    p.add_argument('--export', help='also copy the run and its results here, in this repository\'s layout (on a '
                                    'lent GPU, gpu/plan.py packs them for the trip back)')
    p.add_argument('--collect', action='store_true',
                   help='train nothing: evaluate and collect the run as it stands (e.g. one stopped by hand)')
    flags = p.parse_args(argv)
    if flags.minutes is not None and not flags.minutes > 0:
        raise FlagError(f'--minutes is {flags.minutes} but must be positive.')
    if flags.experiment is None:
        print(status(flags.runs, flags.results))
        return
    name = next_unfinished(flags.runs) if flags.experiment == 'next' else flags.experiment
    experiment(name)
    restore(name, flags.runs, flags.results)
    try:
        if not flags.collect:
            train_part(name, flags.runs, flags.minutes, flags.device, extra)
        report = collect(name, flags.runs, flags.results, flags.device, extra)
    finally:
        if flags.export and os.path.isdir(run_folder(flags.runs, name)):
            export(name, flags.runs, flags.results, flags.export)
    with open(report) as f:
        r = json.load(f)
    print(f"{name}: test acc {100 * r['acc_by_step'][-1]:.2f} +- {100 * r['ci_by_step'][-1]:.2f}% "
          f"(best.pth from step {r['checkpoint_step']}); the paper: {PAPER.get(name, '-')}")


if __name__ == '__main__':
    run_main(main)
