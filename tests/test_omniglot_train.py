"""omniglot_train.py and evaluate.py end to end on the real Omniglot: training learns, selection
stays off the test characters, a checkpoint evaluates to what training reported, bad input is one line."""
import csv
import json
import os
import signal
import subprocess
import sys

import pytest
import torch

from conftest import REPO
from maml.flags import parse_args
from meta import Meta
from omniglot_train import build_parser, make_loader

# The seed's defaults made small, for runs of a few steps
QUICK = ['--epoch', '300', '--num_filters', '32', '--task_num', '8', '--update_step', '1',
         '--update_step_test', '3', '--meta_lr', '3e-3', '--log_every', '50', '--eval_every', '150',
         '--eval_tasks', '200', '--test_tasks', '200', '--device', 'cpu']


def script(name, *flags, timeout=900):
    return subprocess.run([sys.executable, os.path.join(REPO, name), *flags], capture_output=True, text=True,
                          timeout=timeout)


def train(*flags):
    return script('omniglot_train.py', *flags)


def metrics(save_dir):
    with open(os.path.join(save_dir, 'metrics.csv')) as f:
        return list(csv.DictReader(f))


# The official 5-way 1-shot protocol (1 + 1 images per class, one inner step at update_lr 2.0, binary
# inverted images, a rotation per class and task), narrowed and sped up to learn in under a minute.
PAPER_QUICK = ['--preset', 'paper-5w1s', '--epoch', '400', '--task_num', '8', '--num_filters', '32', '--meta_lr', '1e-2',
               '--log_every', '50', '--eval_every', '200', '--eval_tasks', '300', '--test_tasks', '300', '--device', 'cpu']


@pytest.mark.slow
def test_a_paper_preset_run_learns_selects_on_validation_and_evaluate_py_reproduces_its_report(omniglot_root, tmp_path):
    save_dir = str(tmp_path / 'ckpt')
    run = train('--data', omniglot_root, '--save_dir', save_dir, *PAPER_QUICK)
    assert run.returncode == 0, run.stderr
    rows = metrics(save_dir)
    assert [int(r['step']) for r in rows] == [200, 400] and 'val_acc' in rows[0]
    final = float(rows[-1]['val_acc'])
    print(f"\nOmniglot paper-5w1s quick run: val acc {final:.4f} +- {float(rows[-1]['val_ci']):.4f} over 300 tasks")
    assert final >= 0.60, f'5-way 1-shot accuracy {final:.3f} after 400 steps; chance is 0.20'
    assert run.stdout.count('test acc') == 1, 'the test characters are used once, for the selected model'
    best = torch.load(os.path.join(save_dir, 'best.pth'), weights_only=True)
    assert best['acc'] == max(float(r['val_acc']) for r in rows) and best['hparams']['first_order'] is False
    assert best['args']['k_qry'] == 1 and best['args']['rotate'] == 'per_task'
    assert best['test_acc'] - best['test_ci'] > 0.45 and best['test_by_step'][0] < 0.3, \
        'adaptation, not the initialisation, works'
    assert os.path.getsize(os.path.join(save_dir, 'learning_curve.png')) > 0

    result = tmp_path / 'result.json'
    evaluated = script('evaluate.py', os.path.join(save_dir, 'best.pth'), '--data', omniglot_root,
                       '--tasks', '300', '--json', str(result), '--device', 'cpu')
    assert evaluated.returncode == 0, evaluated.stderr
    report = json.loads(result.read_text())
    assert report['acc_by_step'][-1] == pytest.approx(best['test_acc'], abs=1e-9), \
        'evaluate.py rebuilds the model and the test tasks of the final report from the checkpoint alone'
    assert len(report['acc_by_step']) == 4 and report['ci_by_step'][-1] > 0

    more_steps = script('evaluate.py', os.path.join(save_dir, 'best.pth'), '--data', omniglot_root, '--tasks', '50',
                        '--update_step_test', '5', '--k_spt', '2', '--n_way', '4', '--json', str(result))
    assert more_steps.returncode == 0, more_steps.stderr
    report = json.loads(result.read_text())
    assert (report['n_way'], report['k_spt'], len(report['acc_by_step'])) == (4, 2, 6)
    ensemble = script('evaluate.py', os.path.join(save_dir, 'best.pth'), '--data', omniglot_root, '--tasks', '50',
                      '--ensemble', '2', '--json', str(result))
    assert ensemble.returncode == 0, ensemble.stderr
    assert 0.5 < json.loads(result.read_text())['acc_by_step'][-1] <= 1

    resumed = train('--data', omniglot_root, '--save_dir', save_dir, '--epoch', '410', '--eval_every', '10',
                    '--device', 'cpu', '--resume', os.path.join(save_dir, 'last.pth'))
    assert resumed.returncode == 0, resumed.stderr
    assert 'resumed from' in resumed.stdout and [int(r['step']) for r in metrics(save_dir)] == [200, 400, 410]


def test_ranking_on_test_characters_is_said_plainly(omniglot_root, tmp_path):
    run = train('--data', omniglot_root, '--save_dir', str(tmp_path), *QUICK, '--epoch', '4', '--eval_every', '2',
                '--eval_tasks', '16', '--val_classes', '0')
    assert run.returncode == 0, run.stderr
    assert 'ranked on the TEST characters' in run.stdout and 'test acc of best.pth' not in run.stdout
    assert 'test_acc' in metrics(str(tmp_path))[0]


def test_lake_benchmark_trains_on_background_alphabets_and_tests_within_one_alphabet(omniglot_root, tmp_path):
    run = train('--preset', 'lake-20w1s', '--data', omniglot_root, '--save_dir', str(tmp_path), '--epoch', '2',
                '--task_num', '2', '--num_filters', '8', '--update_step', '1', '--update_step_test', '1',
                '--eval_every', '2', '--eval_tasks', '8', '--test_tasks', '8', '--device', 'cpu')
    assert run.returncode == 0, run.stderr
    best = torch.load(tmp_path / 'best.pth', weights_only=True)
    assert best['args']['split'] == 'lake' and best['split'] == 'val' and 0 <= best['test_acc'] <= 1
    assert Meta.from_state(best).net.config[-1] == ('linear', [20, 8 * 2 * 2])


@pytest.mark.parametrize('preset, rotated', [('lake-20w1s', {'train'}),
                                             ('paper-20w1s', {'train', 'val', 'test'})])
def test_lake_tasks_are_turned_in_training_only_and_the_papers_in_every_split(omniglot_root, preset, rotated):
    """Lake et al.'s benchmark tests characters as drawn: with its preset the loader that training,
    the final report and evaluate.py all build (make_loader) rotates training tasks only."""
    args = parse_args(build_parser(), 'omniglot', ['--preset', preset, '--data', omniglot_root, '--device', 'cpu'])
    db = make_loader(args, torch.device('cpu'))
    assert set(db.data) == {'train', 'val', 'test'}
    for mode in db.data:
        x_spt, _, x_qry, _, _, spt, qry = db.next(mode, return_indices=True)
        images = torch.cat([x_spt, x_qry], 1)
        drawn = db.data[mode][torch.cat([spt, qry], 1)].float() / 255
        # turned[k, b, i]: image i of task b is its drawing turned k quarter turns
        turned = torch.stack([(images == drawn.rot90(k, dims=(-2, -1))).flatten(2).all(-1) for k in range(4)])
        if mode in rotated:
            assert turned.any(0).all() and not turned[0].all(), f'{preset} {mode} tasks are turned'
        else:
            assert turned[0].all(), f'{preset} {mode} tasks show every character as drawn'


def test_ctrl_c_names_the_checkpoint_to_resume_from(omniglot_root, tmp_path):
    proc = subprocess.Popen([sys.executable, os.path.join(REPO, 'omniglot_train.py'), '--data', omniglot_root,
                             '--save_dir', str(tmp_path), *QUICK, '--epoch', '100000', '--eval_every', '2',
                             '--eval_tasks', '8'], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            # a suite started in the background (`cmd &`) hands its children SIGINT ignored,
                            # and Python then installs no KeyboardInterrupt handler: give the child Ctrl-C back
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    evaluations = 0
    for line in proc.stdout:
        evaluations += 'val acc' in line
        if evaluations == 2:   # the first evaluation's files are written by now
            break
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 1
    assert err.strip().splitlines()[-1].startswith('error: interrupted at step ')
    assert f"resume with --resume {tmp_path / 'last.pth'}" in err
    assert torch.load(tmp_path / 'last.pth', weights_only=True)['step'] >= 2


@pytest.mark.parametrize('flags, problem', [
    (['--k_spt', '10', '--k_qry', '15'], 'Omniglot has 20 drawings per character, so k_spt=10 and k_qry=15 cannot '
                                         'both be drawn; use k_spt, k_qry >= 1 with k_spt + k_qry <= 20.'),
    (['--update_step', '0'], '--update_step is 0 but must be at least 1.'),
    (['--imgsz', '3'], '--imgsz 3 is too small'),
    (['--update_lr', '-0.4'], '--update_lr is -0.4 but must be positive.'),
])
def test_impossible_flags_end_in_one_clear_line(omniglot_root, tmp_path, flags, problem):
    run = train('--data', omniglot_root, '--save_dir', str(tmp_path), '--device', 'cpu', *flags)
    assert run.returncode == 1
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f'error: {problem}')


def test_evaluate_py_refuses_what_a_checkpoint_cannot_serve(omniglot_root, tmp_path):
    train('--data', omniglot_root, '--save_dir', str(tmp_path), *QUICK, '--epoch', '2', '--eval_every', '2',
          '--eval_tasks', '8', '--test_tasks', '8')
    run = script('evaluate.py', str(tmp_path / 'best.pth'), '--data', omniglot_root, '--n_way', '20')
    assert run.returncode == 1
    assert run.stderr.strip().splitlines() == [
        "error: this checkpoint's learned head tells apart 5 classes, fewer than the 20 asked for; use at most 5 "
        "classes, or adapt a head to any number of them at test time with --head zero or --head proto (in a "
        "notebook: maml.serve(n_way, head='proto'))."]
    run = script('evaluate.py', str(tmp_path / 'best.pth'), '--data', omniglot_root, '--n_way', '20', '--head',
                 'proto', '--tasks', '4')
    assert run.returncode == 0 and 'omniglot 20-way 1-shot' in run.stdout, run.stderr
    assert 'proto head (at test; trained with a learned one)' in run.stdout
    run = script('evaluate.py', str(tmp_path / 'best.pth'), '--data', omniglot_root, '--ensemble', '4')
    assert run.returncode == 1 and 'needs 4 ranked checkpoints' in run.stderr and 'Traceback' not in run.stderr
