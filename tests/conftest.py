"""Shared test helpers: a small float64 meta-learning problem (a network, its tasks, a Meta and the
training loop's flags on it), where the real data sets are, and a private copy of Omniglot.

Real data comes from $MAML_DATA or else ../shared/data beside the repository. Without it the
tests that need it skip, unless MAML_REQUIRE_DATA=1 (set by .ci/run), which makes them fail.
"""
import argparse
import os
import shutil
import tarfile
import tempfile
from pathlib import Path

import pytest
import torch

from maml.checkpoints import load_checkpoint
from maml.trainer import fit
from meta import Meta

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TASKS, N_WAY, K_SPT, K_QRY, SIDE = 3, 4, 2, 3, 12
CONFIG = [('conv2d', [6, 1, 3, 3, 2, 1]), ('bn', [6]), ('relu', [True]),
          ('conv2d', [6, 6, 3, 3, 2, 1]), ('bn', [6]), ('relu', [True]),
          ('flatten', []), ('linear', [N_WAY, 6 * 3 * 3])]


def make_meta(update_step=3, first_order=False, seed=0):
    args = argparse.Namespace(update_lr=0.3, meta_lr=1e-3, n_way=N_WAY, k_spt=K_SPT, k_qry=K_QRY,
                              task_num=TASKS, update_step=update_step, update_step_test=4, imgc=1,
                              imgsz=SIDE, first_order=first_order)
    torch.manual_seed(seed)
    return Meta(args, CONFIG).double()


def make_tasks(seed=1):
    g = torch.Generator().manual_seed(seed)
    x_spt = torch.randn(TASKS, N_WAY * K_SPT, 1, SIDE, SIDE, generator=g, dtype=torch.float64)
    x_qry = torch.randn(TASKS, N_WAY * K_QRY, 1, SIDE, SIDE, generator=g, dtype=torch.float64)
    y_spt = torch.arange(N_WAY).repeat_interleave(K_SPT).repeat(TASKS, 1)
    y_qry = torch.arange(N_WAY).repeat_interleave(K_QRY)[torch.randperm(N_WAY * K_QRY, generator=g)].repeat(TASKS, 1)
    return x_spt, y_spt, x_qry, y_qry


def meta_grad(maml, tasks):
    loss, accs = maml.meta_loss(*tasks)
    return loss, flat(torch.autograd.grad(loss, list(maml.net.parameters()))), accs


def flat(grads):
    return torch.cat([g.reshape(-1) for g in grads])


def rel_err(a, b):
    return ((a - b).norm() / b.norm()).item()


class ListLoader:
    """A stand-in episode source with the sampler-state interface of the loaders."""

    def __init__(self):
        self.tasks, self.calls = make_tasks(), 0

    def next(self):
        self.calls += 1
        return self.tasks

    def state_dict(self):
        return {'calls': self.calls}

    def load_state_dict(self, state):
        self.calls = state['calls']


def fit_args(save_dir, epoch, resume=None, **flags):
    """What parse_args gives the loop, for the float64 stand-in problem above."""
    args = argparse.Namespace(epoch=epoch, task_num=3, n_way=4, k_spt=2, k_qry=3, log_every=2, eval_every=2,
                              eval_tasks=3, save_dir=str(save_dir), keep=2, resume=resume, resume_ckpt=None,
                              time_budget=None)
    if resume:
        args.resume_ckpt = load_checkpoint(resume)
    vars(args).update(flags)
    return args


def run_fit(save_dir, epoch, resume=None, maml=None, loader=None):
    maml, loader = maml or make_meta(), loader or ListLoader()
    run = fit(maml, loader, loader.next, lambda: maml.finetune(*loader.tasks).numpy(),
              fit_args(save_dir, epoch, resume))
    run.close()
    return maml, loader


def shared_data(name):
    """The folder of data set `name` (e.g. 'omniglot'), or skip/fail the test when it is missing."""
    root = os.environ.get('MAML_DATA', os.path.join(REPO, '..', 'shared', 'data'))
    path = os.path.join(root, name)
    if not os.path.isdir(path):
        reason = f"real {name} data not found at {path} (set MAML_DATA to the folder holding {name}/)"
        if os.environ.get('MAML_REQUIRE_DATA') == '1':
            pytest.fail(reason)
        pytest.skip(reason)
    return path


@pytest.fixture(scope='session')
def omniglot_root(tmp_path_factory):
    """A private data root holding copies of the two Omniglot zips (the shared folder stays untouched)."""
    src = shared_data('omniglot')
    root = tmp_path_factory.mktemp('omniglot')
    for name in ('images_background.zip', 'images_evaluation.zip'):
        shutil.copyfile(os.path.join(src, name), root / name)
    return str(root)


def shared_miniimagenet():
    """The shared mini-ImageNet folder (shared_data skips, or fails, when it is absent)."""
    return Path(shared_data('miniimagenet'))


def unpacked_split(source, mode):
    """root/{images/, mode.csv} of one split, unpacked once into the test cache (never into source)."""
    cache = Path(os.environ.get('MAML_TEST_CACHE') or Path.home() / '.cache' / 'maml-pytorch-tests')
    root = cache / f'miniimagenet-{mode}'
    if not (root / f'{mode}.csv').is_file():
        cache.mkdir(parents=True, exist_ok=True)
        unpacking = Path(tempfile.mkdtemp(prefix=f'.unpack-{mode}-', dir=cache))
        try:
            with tarfile.open(source / f'images_{mode}.tar.gz') as tar:
                tar.extractall(unpacking, filter='data')
            shutil.copy(source / f'{mode}.csv', unpacking / 'miniimagenet')
            try:
                os.rename(unpacking / 'miniimagenet', root)   # atomic: a root is whole or absent
            except OSError:
                assert (root / f'{mode}.csv').is_file()        # a concurrent run got there first
        finally:
            shutil.rmtree(unpacking, ignore_errors=True)
    return root


def miniimagenet_classes(mode, n_classes, per_class):
    """{label: [image paths]}: the first n_classes classes (by label) of a mini-ImageNet split with
    their first per_class images, in the archive unpacked by unpacked_split."""
    full = unpacked_split(shared_miniimagenet(), mode)
    by_class = {}
    for row in (full / f'{mode}.csv').read_text().splitlines()[1:]:
        name, label = row.split(',')
        by_class.setdefault(label, []).append(full / 'images' / name)
    return {label: by_class[label][:per_class] for label in sorted(by_class)[:n_classes]}


def class_folders(root, classes):
    """root/<class>/<image>, linked to the images of classes {class: [paths]}; returns root."""
    for label, paths in classes.items():
        (Path(root) / label).mkdir(parents=True)
        for path in paths:
            os.symlink(path, Path(root) / label / Path(path).name)
    return Path(root)


# mini-ImageNet quick runs (tests/test_miniimagenet_train.py, test_folder_train.py): classes per split,
# images per class, and the flags
CLASSES = {'train': 16, 'val': 5, 'test': 5}
PER_CLASS = 120
# Small enough for 2 CPU cores (42x42 images, 16 filters, 5 query images per class, one inner step),
# still second-order MAML.
QUICK = ['--epoch', '300', '--imgsz', '42', '--num_filters', '16', '--k_qry', '5', '--update_step', '1',
         '--update_step_test', '3', '--update_lr', '0.4', '--meta_lr', '1e-2', '--log_every', '50',
         '--eval_every', '150', '--eval_tasks', '50', '--test_tasks', '100', '--device', 'cpu']
