"""The notebook runs top to bottom on the CPU, on the shipped checkpoint, and what it measures is
what evaluate.py measures on the same tasks."""
import json
import os

import nbclient
import nbformat
import pytest

import evaluate
from conftest import REPO

NOTEBOOK = os.path.join(REPO, 'notebooks', 'checkpoint_on_new_tasks.ipynb')
CHECKPOINT = os.path.join(REPO, 'results', 'omniglot-paper-5w1s.pth')


def test_the_notebook_runs_and_measures_what_evaluate_measures(omniglot_root, monkeypatch):
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    monkeypatch.setenv('MAML_OMNIGLOT', omniglot_root)   # the kernel inherits this process's environment
    nbclient.NotebookClient(notebook, timeout=600, kernel_name='python3',
                            resources={'metadata': {'path': os.path.dirname(NOTEBOOK)}}).execute()
    outputs = [output for cell in notebook.cells if cell.cell_type == 'code' for output in cell.outputs]
    assert not [o for o in outputs if o.output_type == 'error']
    assert sum('image/png' in o.get('data', {}) for o in outputs) >= 2, 'the task and the accuracy curve, drawn'
    summary = json.loads([o.text for o in outputs if o.output_type == 'stream'][-1].strip().splitlines()[-1])
    mean, _ = evaluate.main([CHECKPOINT, '--data', omniglot_root, '--device', 'cpu', '--tasks', str(summary['tasks']),
                             '--update_step_test', str(len(summary['acc_by_step']) - 1)])
    assert summary['acc_by_step'] == pytest.approx(mean.tolist(), abs=1e-6)
