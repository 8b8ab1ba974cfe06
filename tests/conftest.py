"""Shared test helpers: where the real data sets are, and a private copy of Omniglot.

Real data comes from $MAML_DATA or else ../shared/data beside the repository. Without it the
tests that need it skip, unless MAML_REQUIRE_DATA=1 (set by .ci/run), which makes them fail.
"""
import os
import shutil
import tarfile
import tempfile
from pathlib import Path

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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
