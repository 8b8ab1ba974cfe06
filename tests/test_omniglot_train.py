"""omniglot_train.py end to end on the real Omniglot: it learns, its files load, bad flags are one line."""
import csv
import os
import subprocess
import sys

import torch

from conftest import REPO
from meta import Meta
from omniglotNShot import OmniglotNShot
from trainer import evaluate, mean_ci

# A small but honest configuration that learns in about a minute on 2 CPU cores: the paper's
# second-order MAML with a narrower net, one inner step and a larger meta learning rate.
QUICK = ['--epoch', '300', '--num_filters', '32', '--task_num', '8', '--update_step', '1',
         '--update_step_test', '3', '--meta_lr', '3e-3', '--log_every', '50', '--eval_every', '150',
         '--eval_tasks', '200', '--device', 'cpu']


def train(*flags):
    return subprocess.run([sys.executable, os.path.join(REPO, 'omniglot_train.py'), *flags],
                          capture_output=True, text=True, timeout=900)


def test_training_on_real_omniglot_learns_and_saves_loadable_checkpoints(omniglot_root, tmp_path):
    save_dir = str(tmp_path / 'ckpt')
    run = train('--data', omniglot_root, '--save_dir', save_dir, *QUICK)
    assert run.returncode == 0, run.stderr
    assert 'parameters:' in run.stdout and 'ms/step' in run.stdout and 'img/s' in run.stdout
    with open(os.path.join(save_dir, 'metrics.csv')) as f:
        rows = list(csv.DictReader(f))
    assert [int(r['step']) for r in rows] == [150, 300]
    final = float(rows[-1]['test_acc'])
    assert final >= 0.70, f'5-way 1-shot test accuracy {final:.3f} after 300 steps; chance is 0.20'
    print(f"\nOmniglot quick run: test acc {final:.4f} +- {float(rows[-1]['test_ci']):.4f} over 200 tasks")
    assert 0 < float(rows[-1]['test_ci']) < 0.03

    best = Meta.from_checkpoint(os.path.join(save_dir, 'best.pth'))
    saved = torch.load(os.path.join(save_dir, 'best.pth'), weights_only=True)
    assert saved['acc'] == max(float(r['test_acc']) for r in rows) and saved['hparams']['first_order'] is False
    db = OmniglotNShot(omniglot_root, batchsz=50, n_way=5, k_shot=1, k_query=15, seed=99)
    mean, _ = mean_ci(evaluate(best, lambda: db.next('test'), 200))
    assert mean[0] < 0.3 and mean[-1] >= 0.65, 'adaptation, not the initialisation, must do the work'
    assert sorted(f for f in os.listdir(save_dir) if f.endswith('.pth'))[:2] == ['best.pth', 'last.pth']

    resumed = train('--data', omniglot_root, '--save_dir', save_dir, *QUICK[2:], '--epoch', '310',
                    '--eval_every', '10', '--resume', os.path.join(save_dir, 'last.pth'))
    assert resumed.returncode == 0, resumed.stderr
    assert 'resumed from' in resumed.stdout and 'step    310' in resumed.stdout


def test_validation_characters_rank_checkpoints_and_test_is_reported_once(omniglot_root, tmp_path):
    run = train('--data', omniglot_root, '--save_dir', str(tmp_path), *QUICK, '--epoch', '20',
                '--eval_every', '10', '--eval_tasks', '20', '--test_tasks', '40', '--val_classes', '100')
    assert run.returncode == 0, run.stderr
    assert 'val acc' in run.stdout and run.stdout.count('test acc') == 1
    best = torch.load(os.path.join(str(tmp_path), 'best.pth'), weights_only=True)
    assert best['split'] == 'val' and 0 <= best['test_acc'] <= 1 and best['test_ci'] > 0
    assert run.stdout.strip().splitlines()[-1].startswith(f"test acc of best.pth (step {best['step']}, val acc")


def test_impossible_flags_end_in_one_clear_line(omniglot_root, tmp_path):
    run = train('--data', omniglot_root, '--save_dir', str(tmp_path), '--k_spt', '10', '--k_qry', '15')
    assert run.returncode == 1
    assert run.stderr.strip().splitlines() == [
        'error: Omniglot has 20 drawings per character, so k_spt=10 and k_qry=15 cannot both be drawn; '
        'use k_spt, k_qry >= 1 with k_spt + k_qry <= 20.']
    run = train('--data', omniglot_root, '--save_dir', str(tmp_path), '--update_step', '0')
    assert run.returncode == 1 and 'must be at least 1' in run.stderr and 'Traceback' not in run.stderr
