"""The figures of the README's reproduction table can be checked: each comes with the checkpoint it
was measured on, shipped in results/, which stores the figure and the rule that chose it, and
evaluate.py on that checkpoint gives the figure again."""
import json
import os
import re

import pytest
import torch

import evaluate
from conftest import REPO

RESULTS = os.path.join(REPO, 'results')
# every shipped checkpoint that was scored: results/<run>[-final|-last].pth beside its -test.json
SCORED = sorted(f for f in os.listdir(RESULTS)
                if f.endswith('.pth') and os.path.exists(os.path.join(RESULTS, f[:-len('.pth')] + '-test.json')))
FIGURE = re.compile(r'\*\*(\d+\.\d\d ± \d+\.\d\d%)\*\* at step ([\d,]+), `(results/[\w.-]+\.pth)`')
# the table's figure columns and the rules a checkpoint in each may have been chosen by (reproduce.RULES)
COLUMNS = {2: ('final', 'latest'), 3: ('validation',)}


def table_rows():
    """The rows of the README's reproduction table, as lists of cells."""
    with open(os.path.join(REPO, 'README.md')) as f:
        section = f.read().split('## Reproducing the paper')[1].split('\n## ')[0]
    rows = [line.split(' | ') for line in section.splitlines() if line.startswith('| ') and ' --- ' not in line]
    return [[cell.strip(' |') for cell in row] for row in rows[1:]]


def as_shown(acc, ci):
    return f"{100 * acc:.2f} ± {100 * ci:.2f}%"


def figure(ckpt):
    return as_shown(ckpt['test_acc'], ckpt['test_ci'])


def test_every_figure_in_the_table_comes_with_a_shipped_checkpoint_that_stores_it_and_its_rule():
    rows = table_rows()
    assert len(rows) >= 7 and SCORED, 'the table and at least one shipped checkpoint'
    checked = 0
    for row in rows:
        for column, rules in COLUMNS.items():
            cell = row[column]
            found = FIGURE.findall(cell)
            assert len(found) == cell.count('%**'), f'a figure of row {row[0]!r} lacks its step or checkpoint: {cell}'
            for shown, step, path in found:
                ckpt = torch.load(os.path.join(REPO, path), map_location='cpu', weights_only=True)
                assert figure(ckpt) == shown, f'{path} stores {figure(ckpt)}, the README says {shown}'
                assert f"{ckpt['step']:,}" == step, f"{path} is step {ckpt['step']:,}, the README says {step}"
                assert ckpt['rule'] in rules, f"{path} was chosen by the rule {ckpt['rule']!r}, not this column's"
                checked += 1
    assert checked, 'the table shows at least one checked figure'


def reevaluate(report, root, tmp_path):
    """evaluate.py run again as the JSON report says it ran; asserts it gives the report's figures."""
    argv = [os.path.join(REPO, report['checkpoint']), '--data', root, '--device', 'cpu',
            '--tasks', str(report['tasks']), '--n_way', str(report['n_way']), '--json', str(tmp_path / 'again.json')]
    if report['head'] != report['trained_head']:
        argv += ['--head', report['head']]
    mean, _ = evaluate.main(argv)
    # another CPU may round a few borderline logits the other way: allow two flipped predictions
    predictions = report['tasks'] * report['n_way'] * report['k_qry_test']
    assert mean.tolist() == pytest.approx(report['acc_by_step'], abs=2 / predictions + 1e-9)
    return mean, predictions


@pytest.mark.parametrize('name', SCORED)
def test_evaluate_on_a_shipped_checkpoint_reproduces_its_figure(name, omniglot_root, tmp_path):
    path = os.path.join(RESULTS, name)
    ckpt = torch.load(path, map_location='cpu', weights_only=True)
    if ckpt['args']['dataset'] != 'omniglot':
        pytest.fail(f"{name}: this test evaluates Omniglot checkpoints only; give it {ckpt['args']['dataset']}'s data")
    with open(os.path.join(RESULTS, name[:-len('.pth')] + '-test.json')) as f:
        report = json.load(f)
    assert report['checkpoint'] == f'results/{name}'
    mean, predictions = reevaluate(report, omniglot_root, tmp_path)
    assert mean[-1] == pytest.approx(ckpt['test_acc'], abs=2 / predictions + 1e-9)


# docs/heads.md's table: a row per head trained with, a column per kind of test task; a figure of a
# learned-head checkpoint on 20 classes names the head it was adapted from at test
HEADS_DOC = os.path.join(REPO, 'docs', 'heads.md')
HEAD_FIGURE = re.compile(r'(?:`--head (\w+)` at test: )?\*\*(\d+\.\d\d ± \d+\.\d\d%)\*\*')
HEAD_COLUMNS = {1: ('random', 5), 2: ('random', 20), 3: ('lake', 20)}


def heads_table():
    """{(split, trained head, n_way, head at test): figure} of docs/heads.md, and the step it states."""
    with open(HEADS_DOC) as f:
        section = f.read().split('## Measured')[1]
    step = re.search(r'final step, ([\d,]+)', section).group(1)
    figures = {}
    for line in section.splitlines():
        cells = [cell.strip() for cell in line.strip('|').split('|')]
        if not line.startswith('| `'):
            continue
        trained = cells[0].strip('`')
        for column, (split, n_way) in HEAD_COLUMNS.items():
            for at_test, shown in HEAD_FIGURE.findall(cells[column]):
                figures[split, trained, n_way, at_test or trained] = shown
    return figures, int(step.replace(',', ''))


def head_report(split, trained, n_way, at_test):
    name = f'{split}-{trained}-{n_way}way' + ('' if at_test == trained else f'-{at_test}')
    with open(os.path.join(RESULTS, 'heads', name + '.json')) as f:
        return json.load(f)


def test_every_figure_of_the_heads_table_is_an_evaluation_of_a_shipped_checkpoint():
    figures, step = heads_table()
    assert {trained for _, trained, _, _ in figures} == {'learned', 'zero', 'unicorn', 'proto'}
    assert len(figures) == 4 + 2 * 5, "each head on 5 and 20 classes and on Lake's; learned with proto and zero"
    for (split, trained, n_way, at_test), shown in figures.items():
        report = head_report(split, trained, n_way, at_test)
        assert as_shown(report['acc_by_step'][-1], report['ci_by_step'][-1]) == shown
        ran = (report['trained_head'], report['head'], report['n_way'], report['tasks'])
        assert ran == (trained, at_test, n_way, 600)
        assert report['checkpoint'] == f'results/heads/{split}-{trained}.pth'
        ckpt = torch.load(os.path.join(REPO, report['checkpoint']), map_location='cpu', weights_only=True)
        assert ckpt['step'] == report['checkpoint_step'] == report['checkpoint_of'] == step, 'every head its final step'
        assert (ckpt['hparams']['head'], ckpt['args']['split']) == (trained, split)


@pytest.mark.parametrize('figure', [('random', 'proto', 5, 'proto'), ('lake', 'learned', 20, 'proto')])
def test_evaluate_reproduces_a_figure_of_the_heads_table(figure, omniglot_root, tmp_path):
    reevaluate(head_report(*figure), omniglot_root, tmp_path)
