"""The notebook runs top to bottom on the CPU, on the shipped checkpoint, and what it measures is
what evaluate.py measures on the same tasks, and what classify.py's FewShotClassifier gives on the
folder it builds."""
import json
import os

import nbclient
import nbformat
import pytest

import evaluate
from classify import FewShotClassifier
from conftest import REPO

NOTEBOOK = os.path.join(REPO, 'notebooks', 'checkpoint_on_new_tasks.ipynb')
CHECKPOINT = os.path.join(REPO, 'results', 'omniglot-paper-5w1s.pth')


def test_the_notebook_runs_and_measures_what_evaluate_and_classify_measure(omniglot_root, monkeypatch, tmp_path):
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    folder = tmp_path / 'my_characters'
    monkeypatch.setenv('MAML_OMNIGLOT', omniglot_root)   # the kernel inherits this process's environment
    monkeypatch.setenv('MAML_NOTEBOOK_FOLDER', str(folder))
    nbclient.NotebookClient(notebook, timeout=600, kernel_name='python3',
                            resources={'metadata': {'path': os.path.dirname(NOTEBOOK)}}).execute()
    outputs = [output for cell in notebook.cells if cell.cell_type == 'code' for output in cell.outputs]
    assert not [o for o in outputs if o.output_type == 'error']
    assert sum('image/png' in o.get('data', {}) for o in outputs) >= 3, 'the task, the accuracy curve and the folder, drawn'
    printed = {}
    for line in (line for o in outputs if o.output_type == 'stream' for line in o.text.splitlines()):
        if line.startswith('{'):
            printed.update(json.loads(line))
    mean, _ = evaluate.main([CHECKPOINT, '--data', omniglot_root, '--device', 'cpu', '--tasks', str(printed['tasks']),
                             '--update_step_test', str(len(printed['acc_by_step']) - 1)])
    assert printed['acc_by_step'] == pytest.approx(mean.tolist(), abs=1e-6)

    queries = sorted(os.listdir(folder / 'queries'))
    assert len(os.listdir(folder / 'support')) == 5 and len(queries) == 20
    clf = FewShotClassifier(CHECKPOINT).adapt(folder / 'support')
    labels = {os.path.basename(path): label for path, label, _, _ in clf.classify([folder / 'queries'])}
    assert printed['folder'] == labels
    right = sum(label == name[:-len('.png')].split('-')[1] for name, label in labels.items())
    assert right >= 12, f'{right} of 20 drawings of new characters right; chance is 4'

    many = folder / 'all_of_one_alphabet'
    classes = len(os.listdir(many / 'support'))
    proto = FewShotClassifier(CHECKPOINT, head='proto').adapt(many / 'support')
    labels = {os.path.basename(path): label for path, label, _, _ in proto.classify([many / 'queries'])}
    assert printed['many'] == labels and classes > 5, 'more characters than the learned head has rows'
    right = sum(label == name[:-len('.png')].split('-')[1] for name, label in labels.items())
    assert right >= len(labels) // 2, f'{right} of {len(labels)} drawings of {classes} characters right'
