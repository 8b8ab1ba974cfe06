"""reproduce.py on the real Omniglot: a part starts a preset's run, the next part resumes it, the
results are collected with evaluate.py and exported in the repository's layout."""
import csv
import json
import os
import subprocess
import sys

import pytest
import torch

import reproduce
from conftest import REPO
from maml.checkpoints import portable_path
from maml.errors import FlagError

TINY = ['--task_num', '2', '--num_filters', '8', '--log_every', '2', '--eval_every', '2', '--eval_tasks', '20',
        '--test_tasks', '20']


def part(tmp_path, *flags, extra=()):
    return subprocess.run([sys.executable, os.path.join(REPO, 'reproduce.py'), *flags, '--runs', str(tmp_path / 'runs'),
                           '--results', str(tmp_path / 'results'), '--device', 'cpu', '--', *extra],
                          capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_parts_start_continue_and_collect_a_presets_run(omniglot_root, tmp_path):
    first = part(tmp_path, 'omniglot/paper-5w1s', '--export', str(tmp_path / 'out'),
                 extra=['--data', omniglot_root, '--epoch', '4', *TINY])
    assert first.returncode == 0, first.stderr
    folder = tmp_path / 'runs' / 'omniglot-paper-5w1s'
    assert torch.load(folder / 'last.pth', weights_only=True)['step'] == 4
    report = json.loads((tmp_path / 'results' / 'omniglot-paper-5w1s-test.json').read_text())
    best = torch.load(folder / 'best.pth', weights_only=True)
    assert (report['preset'], report['checkpoint_step'], report['tasks']) == ('paper-5w1s', best['step'], 20)
    assert report['acc_by_step'][-1] == pytest.approx(best['test_acc'], abs=1e-9), 'the final report, reproduced'
    assert report['selected_on'] == 'val' and len(report['acc_by_step']) == 4, 'the preset: 3 fine-tuning steps'
    for path in ('runs/omniglot-paper-5w1s/last.pth', 'runs/omniglot-paper-5w1s/metrics.csv',
                 'results/omniglot-paper-5w1s-test.json', 'results/omniglot-paper-5w1s.csv',
                 'results/omniglot-paper-5w1s.pth'):
        assert (tmp_path / 'out' / path).is_file(), f'{path} is exported in the repository layout'
    results = tmp_path / 'results'
    shipped = torch.load(results / 'omniglot-paper-5w1s.pth', weights_only=True)
    assert (shipped['step'], shipped['test_by_step']) == (best['step'], report['acc_by_step']), 'the figure, stored'
    assert report['rule'] == 'chosen on validation' and shipped['rule'] == 'validation'
    final = torch.load(results / 'omniglot-paper-5w1s-final.pth', weights_only=True)
    final_report = json.loads((results / 'omniglot-paper-5w1s-final-test.json').read_text())
    assert (final['step'], final['rule'], final_report['checkpoint_step']) == (4, 'final', 4), 'the paper\'s rule too'
    assert final_report['rule'] == "the final step (the paper's rule)" and final['test_by_step'] == final_report['acc_by_step']
    assert not (results / 'omniglot-paper-5w1s-last.pth').exists(), 'a run at its end ships no in-progress copy'

    second = part(tmp_path, 'omniglot/paper-5w1s', '--minutes', '1e-6', extra=['--data', omniglot_root, '--epoch', '8'])
    assert second.returncode == 0, second.stderr
    assert 'resumed from' in second.stdout and '--time_budget of 1e-06 min reached' in second.stdout
    assert 'trained to step 6 in' in second.stdout and 'of wall time (evaluations included; the run so far' in second.stdout
    with open(tmp_path / 'results' / 'omniglot-paper-5w1s.csv') as f:
        assert [r['step'] for r in csv.DictReader(f)] == ['2', '4', '6'], 'the budget ends the part at its first log'
    latest = torch.load(results / 'omniglot-paper-5w1s-last.pth', weights_only=True)
    assert (latest['step'], latest['rule']) == (6, 'latest') and 'test_acc' in latest, 'unfinished: shipped, scored'
    assert not (results / 'omniglot-paper-5w1s-final.pth').exists(), 'step 4 is no longer the final step'

    (tmp_path / 'results' / 'omniglot-paper-5w1s-test.json').unlink()
    collected = part(tmp_path, 'omniglot/paper-5w1s', '--collect', extra=['--data', omniglot_root])
    assert collected.returncode == 0 and 'resumed from' not in collected.stdout, collected.stderr
    assert (tmp_path / 'results' / 'omniglot-paper-5w1s-test.json').is_file(), 'evaluated, not trained'

    for f in folder.iterdir():   # the machine is gone: the next part starts from what results/ ships
        f.unlink()
    folder.rmdir()
    table = lambda: reproduce.status(str(tmp_path / 'runs'), str(tmp_path / 'results'))   # what the bare command prints
    assert 'omniglot/paper-5w1s' in table().split('6 of 8')[0], 'the table reads the shipped run'
    third = part(tmp_path, 'omniglot/paper-5w1s', extra=['--data', omniglot_root])
    assert third.returncode == 0, third.stderr
    assert 'rebuilt from' in third.stdout and 'resumed from' in third.stdout and 'at step 6' in third.stdout
    assert not (results / 'omniglot-paper-5w1s-last.pth').exists(), 'at its end the in-progress copy goes'
    assert torch.load(results / 'omniglot-paper-5w1s-final.pth', weights_only=True)['step'] == 8
    assert torch.load(folder / 'last.pth', weights_only=True)['step'] == 8, 'without a budget, to the end'
    assert reproduce.next_unfinished(str(tmp_path / 'runs')) == 'omniglot/paper-5w5s'
    finished = table()
    assert '8 of 8' in finished and 'no checkpoint' in finished and '98.7 +- 0.4%' in finished and 'stale' not in finished
    report_path = tmp_path / 'results' / 'omniglot-paper-5w1s-test.json'
    report_path.write_text(json.dumps({**json.loads(report_path.read_text()), 'checkpoint_step': 2 * 10 ** 6}))
    assert 'stale: --collect' in table(), 'a report of another best.pth says so'


def test_reports_and_shipped_checkpoints_write_this_machines_paths_as_another_machine_reads_them(tmp_path, monkeypatch):
    work = tmp_path / 'home' / 'work'
    work.mkdir(parents=True)
    monkeypatch.setenv('HOME', str(tmp_path / 'home'))
    monkeypatch.chdir(work)
    assert portable_path(f'{work}/data/omniglot') == 'data/omniglot'
    assert portable_path(f'the Omniglot test characters in {tmp_path}/home/omniglot') == \
        'the Omniglot test characters in ~/omniglot'
    assert portable_path('/srv/data/omniglot') == '/srv/data/omniglot', 'a path elsewhere stays as it is'


def test_the_training_scripts_flags_are_read_as_argparse_reads_them():
    flags = reproduce.script_flags(['--epoch=70000', '--data', '/x', '--meta_lr', '1e-3', '--epoch', '80000'])
    assert (flags.epoch, flags.data) == (80000, '/x'), 'the = form, and the last of a repeated flag'


def test_an_unknown_experiment_is_refused_by_name():
    with pytest.raises(FlagError, match="'omniglot/paper-1w1s' is not an experiment; use one of omniglot/paper-5w1s"):
        reproduce.experiment('omniglot/paper-1w1s')
