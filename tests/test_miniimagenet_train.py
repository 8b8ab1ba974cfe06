"""miniimagenet_train.py end to end on real mini-ImageNet images: it learns above chance, selects
on validation, and reports the selected model on test."""
import csv
import os
import subprocess
import sys

import pytest
import torch

from conftest import CLASSES, PER_CLASS, QUICK, REPO, miniimagenet_classes

def subset_root(tmp_path):
    """A data root in the real layout holding the first CLASSES[mode] classes of each split with
    PER_CLASS images each, linked from the archives unpacked by conftest.unpacked_split."""
    (tmp_path / 'images').mkdir(parents=True)
    for mode, n_classes in CLASSES.items():
        rows = []
        for label, paths in miniimagenet_classes(mode, n_classes, PER_CLASS).items():
            for path in paths:
                os.symlink(path, tmp_path / 'images' / path.name)
                rows.append(f'{path.name},{label}')
        (tmp_path / f'{mode}.csv').write_text('\n'.join(['filename,label'] + rows) + '\n')
    return tmp_path


@pytest.mark.slow
def test_training_on_real_miniimagenet_learns_and_reports_test_once(tmp_path):
    root, save_dir = subset_root(tmp_path / 'data'), tmp_path / 'ckpt'
    run = subprocess.run([sys.executable, os.path.join(REPO, 'miniimagenet_train.py'), '--data', str(root),
                          '--save_dir', str(save_dir), *QUICK], capture_output=True, text=True, timeout=1200)
    assert run.returncode == 0, run.stderr
    with open(save_dir / 'metrics.csv') as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ['step', 'train_acc', 'val_acc', 'val_ci', 'ms_per_step', 'elapsed_s']
    val = max(float(r['val_acc']) for r in rows)
    best = torch.load(save_dir / 'best.pth', weights_only=True)
    assert best['split'] == 'val' and best['acc'] == val
    assert best['test_acc'] - best['test_ci'] > 0.21, f"test accuracy {best['test_acc']:.3f} is not above 5-way chance"
    last_line = run.stdout.strip().splitlines()[-1]
    print(f'\nmini-ImageNet quick run: {last_line}')   # shown by pytest -s; the README quotes it
    assert last_line.startswith(f"test acc of best.pth (step {best['step']}") and 'over 100 tasks' in last_line
    assert run.stdout.count('test acc') == 1, 'the test split is used once, for the selected model'


def test_missing_data_is_one_clear_line(tmp_path):
    run = subprocess.run([sys.executable, os.path.join(REPO, 'miniimagenet_train.py'), '--data',
                          str(tmp_path / 'nowhere'), '--save_dir', str(tmp_path / 'ckpt'), '--device', 'cpu'],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 1
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and 'does not exist' in lines[0] and 'images/*.jpg' in lines[0]

