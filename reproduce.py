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
training script ends: best.pth evaluated once on the test split. Then `evaluate.py` scores two
checkpoints over the same test tasks, each by a rule of its own (RULES):
    validation   best.pth, chosen on the validation split: results/<name>.pth, <name>-test.json
    final        last.pth at the run's last step, as the paper's code tests (it never chooses):
                 results/<name>-final.pth, <name>-final-test.json; while the run has not reached
                 its --epoch, its latest step instead: results/<name>-last.pth, <name>-last-test.json
                 (so that the run also outlives its machine)
Each shipped checkpoint stores its figure. The run's metrics.csv and learning curve are copied to
results/ too. A run that has reached its --epoch only gets evaluated; `-- --epoch N` extends it.
--export DIR copies the run folder and its results, in this repository's layout, to DIR: what
another machine needs for a later part to continue there (copy DIR's contents into its
repository; docs/gpu.md). Flags after `--` go to the training script (`--data` also to evaluate.py).
"""
import argparse
import json
import os
import shutil
import subprocess
import sys

import torch

from maml.checkpoints import atomic_save, load_checkpoint, portable_path, read_metrics
from maml.errors import FlagError, RunError
from maml.flags import HelpFormatter
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
    With `results`, a run this machine lacks is read from what results/ ships (a shipped final
    checkpoint is a run that has ended)."""
    last = os.path.join(run_folder(runs, name), 'last.pth')
    if not os.path.exists(last) and results is not None:
        shipped_files = shipped(results, name)
        last = next((shipped_files[rule] for rule in ('final', 'latest') if os.path.exists(shipped_files[rule])), last)
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
    best = best if os.path.exists(best) else shipped(results, name)['validation']
    return load_checkpoint(best, map_location='cpu')['step'] if os.path.exists(best) else None


def next_unfinished(runs):
    """The first experiment of the table whose run in `runs` has not reached its --epoch."""
    for name in PAPER:
        done, total = progress(runs, name)
        if done < total:
            return name
    raise RunError('every experiment of the paper has reached its end; nothing is left to run.')


# the rules by which a checkpoint of a run is chosen to be scored: its file in the run folder, the
# stem of what results/ ships of it (+ .pth, -test.json), and how a figure's label names the rule
RULES = {'validation': ('best.pth', '', 'chosen on validation'),
         'final': ('last.pth', '-final', "the final step (the paper's rule)"),
         'latest': ('last.pth', '-last', 'the latest step (the run has not ended)')}


def shipped(results, name):
    """{rule: the checkpoint results/ ships of the run by that rule} (RULES)."""
    stem = os.path.join(results, name.replace('/', '-'))
    return {rule: f'{stem}{suffix}.pth' for rule, (_, suffix, _) in RULES.items()}


def restore(name, runs, results):
    """Rebuild a run folder this machine lacks from what results/ ships (the latest checkpoint,
    best.pth, also as its ranked file so that a better evaluation is needed to displace it, and
    metrics.csv), so the run resumes where its last part stopped on whatever machine ran it."""
    folder, files = run_folder(runs, name), shipped(results, name)
    if os.path.exists(os.path.join(folder, 'last.pth')) or not os.path.exists(files['latest']):
        return
    os.makedirs(folder, exist_ok=True)
    copies = [(files['latest'], 'last.pth'), (f"{files['validation'][:-len('.pth')]}.csv", 'metrics.csv')]
    if os.path.exists(files['validation']):
        selected = load_checkpoint(files['validation'], map_location='cpu')
        copies += [(files['validation'], 'best.pth'),
                   (files['validation'], f"maml_step{selected['step']}_acc{selected['acc']:.4f}.pth")]
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
    """evaluate.py on best.pth (chosen on validation) and on last.pth (the final step, or the
    latest while the run goes on), over the test tasks of the run's own final report, into
    results/<name>[-final|-last]-test.json, each checkpoint shipped beside its report with its figure
    stored in it (`ship`); the run's metrics and curve into results/. Returns {rule: report path}."""
    folder, stem = run_folder(runs, name), name.replace('/', '-')
    if not os.path.exists(os.path.join(folder, 'best.pth')):
        raise RunError(f'{folder} holds no best.pth yet (no evaluation has run); train it longer.')
    os.makedirs(results, exist_ok=True)
    done, total = progress(runs, name)
    rules = ('validation', 'final' if done >= total else 'latest')
    reports = {rule: score(name, folder, results, rule, device, extra) for rule in rules}
    for rule in set(RULES) - set(rules) - {'validation'}:   # a run that ended ships no 'latest', and the reverse
        for path in (shipped(results, name)[rule], shipped(results, name)[rule][:-len('.pth')] + '-test.json'):
            if os.path.exists(path):
                os.remove(path)
    for name_in_run, name_in_results in (('metrics.csv', f'{stem}.csv'), ('learning_curve.png', f'{stem}.png')):
        if os.path.exists(os.path.join(folder, name_in_run)):
            shutil.copyfile(os.path.join(folder, name_in_run), os.path.join(results, name_in_results))
    return reports


def score(name, folder, results, rule, device, extra):
    """evaluate.py on the run's checkpoint of `rule`, shipped as results/ names it (RULES); returns
    the report's path."""
    source = os.path.join(folder, RULES[rule][0])
    selected = shipped(results, name)[rule]
    report = selected[:-len('.pth')] + '-test.json'
    snapshot = os.path.join(results, f'.{os.path.basename(selected)}.evaluating')   # a running part may replace it
    shutil.copyfile(source, snapshot)
    try:
        data_root = script_flags(extra).data
        data = ['--data', data_root] if data_root else []
        tasks = load_checkpoint(snapshot, map_location='cpu')['args']['test_tasks']   # the run's final report's
        cmd = [sys.executable, os.path.join(REPO, 'evaluate.py'), snapshot, '--json', report, '--device', device,
               '--tasks', str(tasks)] + data
        if subprocess.run(cmd).returncode != 0:
            raise RunError(f'evaluate.py could not score {source} (its message is above).')
        ship(snapshot, selected, report, rule, data_root)
    finally:
        if os.path.exists(snapshot):
            os.remove(snapshot)
    return report


def ship(evaluated, selected, report, rule, data_root=None):
    """The checkpoint evaluate.py scored into `report`, with that figure and its rule stored in it
    and its data root (the one evaluate.py was given, else its own) as another machine reads it, as
    `selected` (results/...); the report names it."""
    with open(report) as f:
        r = json.load(f)
    ckpt = load_checkpoint(evaluated, map_location='cpu')
    data = data_root or ckpt['args'].get('data')
    args = {**ckpt['args'], 'data': portable_path(data)} if data else ckpt['args']
    atomic_save({**ckpt, 'args': args, 'test_acc': r['acc_by_step'][-1], 'test_ci': r['ci_by_step'][-1],
                 'test_by_step': r['acc_by_step'], 'test_tasks': r['tasks'], 'rule': rule}, selected)
    with open(report, 'w') as f:
        json.dump({**r, 'checkpoint': os.path.relpath(selected), 'rule': RULES[rule][2]}, f, indent=1)


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


def figure(results, name, rule):
    """'98.43 +- 0.44% (step 58000)' of the run's shipped report by `rule`, or None."""
    path = shipped(results, name)[rule][:-len('.pth')] + '-test.json'
    if not os.path.exists(path):
        return None
    with open(path) as f:
        r = json.load(f)
    return f"{100 * r['acc_by_step'][-1]:.2f} +- {100 * r['ci_by_step'][-1]:.2f}% (step {r['checkpoint_step']})"


def status(runs, results):
    """One line per experiment: steps, wall time, the test accuracy of its final (or latest) step
    and of its checkpoint chosen on validation, and the paper's."""
    lines = [f"{'experiment':25} {'steps':>15} {'wall':>7} {'final step (paper):':>28} "
             f"{'chosen on validation:':>28}  paper"]
    for name in PAPER:
        done, total = progress(runs, name, results)
        rows = read_metrics(run_folder(runs, name)) or read_metrics(results, name.replace('/', '-') + '.csv')
        final = figure(results, name, 'final') or (f'latest {figure(results, name, "latest")}'
                                                   if figure(results, name, 'latest') else 'not evaluated')
        chosen = figure(results, name, 'validation') or 'not evaluated'
        best = best_step(runs, name, results)
        if chosen != 'not evaluated' and best is not None and f'(step {best})' not in chosen:
            chosen += ' (stale: --collect)'
        steps = f'{done} of {total}' if done else 'no checkpoint'
        wall = format_duration(float(rows[-1]['elapsed_s'])) if rows else '-'
        lines.append(f'{name:25} {steps:>15} {wall:>7} {final:>28} {chosen:>28}  {PAPER[name]}')
    return '\n'.join(lines)


def split_at_dashes(argv):
    """(this script's flags, the training script's flags): argv before and after its first '--'."""
    return (argv[:argv.index('--')], argv[argv.index('--') + 1:]) if '--' in argv else (argv, [])


def main(argv=None):
    argv, extra = split_at_dashes(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0], allow_abbrev=False,
                                formatter_class=HelpFormatter)
    p.add_argument('experiment', nargs='?', help="dataset/preset (e.g. omniglot/paper-20w1s) or 'next'; "
                                                 "none: print where each experiment stands")
    p.add_argument('--minutes', type=float, help='training time of this part (default: to the end)')
    p.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    p.add_argument('--runs', default='runs', help='folder of the run folders')
    p.add_argument('--results', default='results', help='folder of the collected results')
    p.add_argument('--export', help='also copy the run and its results here, in this repository\'s layout, to '
                                    'continue the run on another machine (gpu/plan.py packs them in pieces for a '
                                    'transfer that bounds file sizes)')
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
        reports = collect(name, flags.runs, flags.results, flags.device, extra)
    finally:
        if flags.export and os.path.isdir(run_folder(flags.runs, name)):
            export(name, flags.runs, flags.results, flags.export)
    for rule in reports:
        print(f"{name}: test acc of {RULES[rule][2]}: {figure(flags.results, name, rule)}")
    print(f"{name}: the paper: {PAPER.get(name, '-')}")


if __name__ == '__main__':
    run_main(main)
