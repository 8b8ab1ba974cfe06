"""OmniglotNShot on the real data: the episode contract, the class split, the cache and the download."""
import functools
import hashlib
import http.server
import os
import shutil
import socket
import threading
import zipfile

import pytest
import torch

import omniglotNShot
from conftest import shared_data
from omniglotNShot import DRAWINGS, OmniglotNShot, fetch_archives


@pytest.fixture(scope='module')
def db(omniglot_root):
    return OmniglotNShot(omniglot_root, batchsz=6, n_way=5, k_shot=2, k_query=3, imgsz=28, seed=0)


@pytest.mark.parametrize('mode', ['train', 'test'])
def test_episode_contract(db, mode):
    x_spt, y_spt, x_qry, y_qry, classes, spt, qry = db.next(mode, return_indices=True)
    assert x_spt.shape == (6, 10, 1, 28, 28) and x_qry.shape == (6, 15, 1, 28, 28)
    assert x_spt.dtype == x_qry.dtype == torch.float32 and y_spt.dtype == y_qry.dtype == torch.int64
    assert all(t.device == db.device for t in (x_spt, y_spt, x_qry, y_qry))
    assert 0 <= x_spt.min() and x_spt.max() <= 1 and x_spt.std() > 0.1
    store = db.data[mode].float() / 255
    assert torch.equal(x_spt, store[spt]) and torch.equal(x_qry, store[qry])
    for b in range(6):
        assert torch.equal(y_spt[b].bincount(minlength=5), torch.full((5,), 2))
        assert torch.equal(y_qry[b].bincount(minlength=5), torch.full((5,), 3))
        assert len(set(classes[b].tolist())) == 5, 'the classes of a task must be distinct'
        assert torch.equal(spt[b] // DRAWINGS, classes[b, y_spt[b]]), 'labels follow the classes'
        assert torch.equal(qry[b] // DRAWINGS, classes[b, y_qry[b]])
        assert not set(spt[b].tolist()) & set(qry[b].tolist()), 'support and query are other drawings'
        assert len(set(qry[b].tolist())) == 15
    assert not all(torch.equal(y, torch.arange(5).repeat_interleave(2)) for y in y_spt), 'sets are shuffled'


def test_class_split_is_the_papers_and_seeded(db, omniglot_root):
    train, test = db.class_ids['train'], db.class_ids['test']
    assert len(db.classes) == 1623 and len(train) == 1200 and len(test) == 423
    assert not set(train.tolist()) & set(test.tolist())
    assert train.tolist() != sorted(train.tolist()), 'the split must not follow filesystem order'
    again = OmniglotNShot(omniglot_root, batchsz=2, n_way=5, k_shot=1, k_query=1, seed=7)
    assert torch.equal(again.class_ids['test'], test)


def test_validation_characters_come_out_of_the_training_split(db, omniglot_root):
    held_out = OmniglotNShot(omniglot_root, batchsz=2, n_way=5, k_shot=1, k_query=1, val_classes=100)
    train, val, test = (set(held_out.class_ids[m].tolist()) for m in ('train', 'val', 'test'))
    assert (len(train), len(val), len(test)) == (1100, 100, 423)
    assert train | val == set(db.class_ids['train'].tolist()) and not train & val
    assert set(held_out.class_ids['test'].tolist()) == set(db.class_ids['test'].tolist())
    assert held_out.next('val')[0].shape == (2, 5, 1, 28, 28)
    with pytest.raises(ValueError, match='val_classes=1199 must lie between 0 and 1195'):
        OmniglotNShot(omniglot_root, batchsz=2, n_way=5, k_shot=1, k_query=1, val_classes=1199)


def test_rotation_adds_three_rotated_copies_of_each_training_class(omniglot_root):
    rotated = OmniglotNShot(omniglot_root, batchsz=2, n_way=5, k_shot=1, k_query=1, rotate=True)
    train = rotated.data['train'].view(4800, DRAWINGS, 28, 28)
    assert torch.equal(train[1200:2400], train[:1200].rot90(1, dims=(-2, -1)))
    assert rotated.data['test'].shape == (423 * DRAWINGS, 1, 28, 28)


def test_sampling_is_reproducible_after_reset(db):
    db.reset('test', 3)
    first = db.next('test')
    db.reset('test', 3)
    assert all(torch.equal(a, b) for a, b in zip(first, db.next('test')))


def test_impossible_requests_are_clear_errors(omniglot_root):
    with pytest.raises(ValueError, match='k_spt=5 and k_qry=16 cannot both be drawn'):
        OmniglotNShot(omniglot_root, batchsz=2, n_way=5, k_shot=5, k_query=16)
    with pytest.raises(ValueError, match='n_way=500 is more than the 423 Omniglot test classes'):
        OmniglotNShot(omniglot_root, batchsz=2, n_way=500, k_shot=1, k_query=1)


def test_cache_is_reused_and_each_size_has_its_own(omniglot_root, tmp_path, monkeypatch):
    root = tmp_path / 'root'
    shutil.copytree(omniglot_root, root)
    OmniglotNShot(str(root), batchsz=2, n_way=5, k_shot=1, k_query=1, imgsz=14)
    assert (root / 'omniglot_14.pt').stat().st_size < 1623 * DRAWINGS * 14 * 14 + 200_000
    for name in ('images_background', 'images_evaluation'):
        shutil.rmtree(root / name)
        os.remove(root / f'{name}.zip')
    monkeypatch.setattr(omniglotNShot, '_read_png', None)   # a reload must not decode anything
    small = OmniglotNShot(str(root), batchsz=2, n_way=5, k_shot=1, k_query=1, imgsz=14)
    assert small.data['train'].dtype == torch.uint8 and small.data['train'].shape == (1200 * DRAWINGS, 1, 14, 14)
    assert sorted(os.listdir(root)) == ['omniglot_14.pt', 'omniglot_28.pt']


def test_seed_style_processed_extraction_is_used_without_network(omniglot_root, tmp_path):
    for folder in fetch_archives(omniglot_root, download=False):
        shutil.copytree(folder, tmp_path / 'processed' / os.path.basename(folder))
    folders = fetch_archives(str(tmp_path), download=False)
    assert folders == [str(tmp_path / 'processed' / n) for n in ('images_background', 'images_evaluation')]


@pytest.fixture
def served_omniglot():
    """An http.server on 127.0.0.1 serving the shared Omniglot zips; yields (base_url, md5s)."""
    src = shared_data('omniglot')
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=src)
    handler.log_message = lambda *a: None
    server = http.server.ThreadingHTTPServer(('127.0.0.1', 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    md5 = {}
    for name in ('images_background', 'images_evaluation'):
        with open(os.path.join(src, name + '.zip'), 'rb') as f:
            md5[name] = hashlib.md5(f.read()).hexdigest()
    yield f'http://127.0.0.1:{server.server_address[1]}/', md5
    server.shutdown()


def test_download_verifies_and_extracts(served_omniglot, tmp_path):
    base_url, md5 = served_omniglot
    folders = fetch_archives(str(tmp_path / 'omniglot'), base_url=base_url, md5=md5)
    assert [os.path.basename(f) for f in folders] == ['images_background', 'images_evaluation']
    assert len(os.listdir(folders[0])) == 30 and len(os.listdir(folders[1])) == 20
    assert not [f for f in os.listdir(tmp_path / 'omniglot') if f.endswith('.part')]
    db = OmniglotNShot(str(tmp_path / 'omniglot'), batchsz=2, n_way=5, k_shot=1, k_query=1, download=False)
    assert len(db.classes) == 1623


def test_a_corrupt_download_is_deleted_and_named(served_omniglot, tmp_path):
    base_url, md5 = served_omniglot
    with pytest.raises(RuntimeError, match='does not match its MD5'):
        fetch_archives(str(tmp_path), base_url=base_url, md5={**md5, 'images_background': '0' * 32})
    assert not os.listdir(tmp_path)


def test_no_data_and_no_network_is_one_clear_error(tmp_path):
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        closed_port = s.getsockname()[1]
    with pytest.raises(FileNotFoundError, match='put images_background.zip and images_evaluation.zip'):
        fetch_archives(str(tmp_path), base_url=f'http://127.0.0.1:{closed_port}/')
    with pytest.raises(FileNotFoundError, match=f'Omniglot is not in {tmp_path}'):
        OmniglotNShot(str(tmp_path / 'empty'), batchsz=2, n_way=5, k_shot=1, k_query=1, download=False)


def test_a_damaged_zip_is_named(tmp_path):
    (tmp_path / 'images_background.zip').write_bytes(b'not a zip')
    with pytest.raises(RuntimeError, match='images_background.zip is not a valid zip file'):
        fetch_archives(str(tmp_path), download=False)


def test_extraction_stays_inside_root_and_needs_the_expected_folder(tmp_path):
    root = tmp_path / 'root'
    root.mkdir()
    with zipfile.ZipFile(root / 'images_background.zip', 'w') as z:
        z.writestr('../../escaped.txt', 'outside')
        z.writestr('something_else/a.png', '')
    with pytest.raises(RuntimeError, match='holds no images_background/ folder'):
        fetch_archives(str(root), download=False)
    assert not list(tmp_path.rglob('escaped.txt')) and not list(tmp_path.rglob('something_else'))
    assert sorted(os.listdir(root)) == ['images_background.zip']

