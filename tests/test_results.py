"""The figures of the README's reproduction table can be checked: each comes with the checkpoint it
was measured on, shipped in results/, and evaluate.py on that checkpoint gives the figure again."""
import json
import os
import re

import pytest
import torch

import evaluate
from conftest import REPO

RESULTS = os.path.join(REPO, 'results')
SELECTED = sorted(f for f in os.listdir(RESULTS) if f.endswith('.pth') and not f.endswith('-last.pth'))


def table_rows():
    """The rows of the README's reproduction table, as lists of cells."""
    with open(os.path.join(REPO, 'README.md')) as f:
        section = f.read().split('## Reproducing the paper')[1].split('\n## ')[0]
    rows = [line.split(' | ') for line in section.splitlines() if line.startswith('| ') and ' --- ' not in line]
    return [[cell.strip(' |') for cell in row] for row in rows[1:]]


def figure(ckpt):
    return f"{100 * ckpt['test_acc']:.2f} ± {100 * ckpt['test_ci']:.2f}%"


def test_every_figure_in_the_table_comes_with_a_shipped_checkpoint_that_stores_it():
    rows = table_rows()
    assert len(rows) >= 7 and SELECTED, 'the table and at least one shipped checkpoint'
    for row in rows:
        figures = re.findall(r'\d+\.\d\d ± \d+\.\d\d%', row[-3])
        shipped = re.findall(r'results/[\w.-]+\.pth', row[-2])
        if not figures:
            continue
        assert shipped, f'the figure {figures[0]} of row {row[0]!r} has no checkpoint to check it with'
        ckpt = torch.load(os.path.join(REPO, shipped[0]), map_location='cpu', weights_only=True)
        assert figure(ckpt) == figures[0], f'{shipped[0]} stores {figure(ckpt)}, the README says {figures[0]}'
        assert f"{ckpt['step']:,}" in row[2], f"the row names the step of {shipped[0]} ({ckpt['step']:,})"


@pytest.mark.parametrize('name', SELECTED)
def test_evaluate_on_a_shipped_checkpoint_reproduces_its_figure(name, omniglot_root, tmp_path):
    path = os.path.join(RESULTS, name)
    ckpt = torch.load(path, map_location='cpu', weights_only=True)
    if ckpt['args']['dataset'] != 'omniglot':
        pytest.fail(f"{name}: this test evaluates Omniglot checkpoints only; give it {ckpt['args']['dataset']}'s data")
    with open(os.path.join(RESULTS, name.replace('.pth', '-test.json'))) as f:
        report = json.load(f)
    mean, _ = evaluate.main([path, '--data', omniglot_root, '--device', 'cpu', '--tasks', str(report['tasks']),
                             '--json', str(tmp_path / 'again.json')])
    # another CPU may round a few borderline logits the other way: allow two flipped predictions
    predictions = report['tasks'] * report['n_way'] * report['k_qry_test']
    assert mean.tolist() == pytest.approx(report['acc_by_step'], abs=2 / predictions + 1e-9)
    assert mean[-1] == pytest.approx(ckpt['test_acc'], abs=2 / predictions + 1e-9)
