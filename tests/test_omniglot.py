"""OmniglotNShot on the real data: the episode contract, the preprocessing, the rotations, the class
splits (the paper's and Lake et al.'s), the cache and the download; and the group task drawing."""
import collections
import functools
import hashlib
import http.server
import os
import shutil
import socket
import threading
import zipfile

import numpy as np
import pytest
import torch
from PIL import Image

import omniglotNShot
from conftest import shared_data
from maml.episodes import draw_group_tasks, group_table
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


@pytest.mark.parametrize('rotate', [True, 'classes'])
def test_rotation_adds_three_rotated_copies_of_each_training_class(omniglot_root, rotate):
    rotated = OmniglotNShot(omniglot_root, batchsz=2, n_way=5, k_shot=1, k_query=1, rotate=rotate)
    train = rotated.data['train'].view(4800, DRAWINGS, 28, 28)
    assert torch.equal(train[1200:2400], train[:1200].rot90(1, dims=(-2, -1)))
    assert rotated.data['test'].shape == (423 * DRAWINGS, 1, 28, 28)


@pytest.mark.parametrize('mode', ['train', 'test'])
def test_per_task_rotation_turns_each_class_of_a_task_as_one(omniglot_root, mode):
    db = OmniglotNShot(omniglot_root, batchsz=40, n_way=5, k_shot=2, k_query=3, rotate='per_task')
    assert db.data['train'].shape == (1200 * DRAWINGS, 1, 28, 28), 'no extra classes'
    x_spt, y_spt, x_qry, y_qry, classes, spt, qry = db.next(mode, return_indices=True)
    images, labels, positions = (torch.cat(pair, 1) for pair in ((x_spt, x_qry), (y_spt, y_qry), (spt, qry)))
    originals = db.data[mode][positions].float() / 255
    # fits[k, b, i]: image i of task b is its original turned k quarter turns
    fits = torch.stack([(images == originals.rot90(k, dims=(-2, -1))).flatten(2).all(-1) for k in range(4)])
    seen = set()
    for b in range(40):
        assert len(set(classes[b].tolist())) == 5, 'a character appears at most once per task'
        for label in range(5):
            turns = fits[:, b, labels[b] == label].all(-1).nonzero().flatten().tolist()
            assert turns, 'all images of a class share one rotation, in support and query alike'
            seen.update(turns if len(turns) == 1 else ())
    assert seen == {0, 1, 2, 3}


def test_query_count_can_change_per_call(db):
    x_spt, y_spt, x_qry, y_qry, classes, spt, qry = db.next('test', k_query=1, return_indices=True)
    assert x_spt.shape == (6, 10, 1, 28, 28) and x_qry.shape == (6, 5, 1, 28, 28) and y_qry.shape == (6, 5)
    for b in range(6):
        assert sorted(y_qry[b].tolist()) == list(range(5))
        assert torch.equal(qry[b] // DRAWINGS, classes[b, y_qry[b]])
    assert db.next('train', k_query=18)[2].shape == (6, 90, 1, 28, 28)
    assert db.next('train')[2].shape == (6, 15, 1, 28, 28), "the constructor's count stays the default"
    with pytest.raises(ValueError, match='k_spt=2 and k_qry=19 cannot both be drawn'):
        db.next('test', k_query=19)


@pytest.fixture(scope='module')
def lake(omniglot_root):
    return OmniglotNShot(omniglot_root, batchsz=300, n_way=20, k_shot=1, k_query=1, split='lake',
                         val_alphabets=5, within_alphabet=('val', 'test'))


def test_lake_split_trains_on_background_alphabets_and_tests_on_evaluation_ones(lake, omniglot_root):
    background, evaluation = (set(os.listdir(os.path.join(omniglot_root, part)))
                              for part in ('images_background', 'images_evaluation'))
    alphabets = {mode: {lake.alphabets[c] for c in ids.tolist()} for mode, ids in lake.class_ids.items()}
    assert alphabets['test'] == evaluation and len(lake.class_ids['test']) == 659
    assert alphabets['train'] | alphabets['val'] == background and not alphabets['train'] & alphabets['val']
    assert len(alphabets['val']) == 5 and len(lake.class_ids['train']) + len(lake.class_ids['val']) == 964
    names = {mode: {lake.classes[c] for c in ids.tolist()} for mode, ids in lake.class_ids.items()}
    assert not names['test'] & (names['train'] | names['val']), 'no background character in test'


@pytest.mark.parametrize('mode', ['val', 'test'])
def test_lake_tasks_take_all_their_classes_from_one_alphabet(lake, mode):
    x_spt, y_spt, x_qry, y_qry, classes, spt, qry = lake.next(mode, return_indices=True)
    assert x_spt.shape == (300, 20, 1, 28, 28) and x_qry.shape == (300, 20, 1, 28, 28)
    task_alphabets = []
    for b in range(300):
        assert len(set(classes[b].tolist())) == 20
        assert torch.equal(spt[b] // DRAWINGS, classes[b, y_spt[b]])
        alphabet = {lake.alphabets[lake.class_ids[mode][c]] for c in classes[b].tolist()}
        assert len(alphabet) == 1
        task_alphabets += alphabet
    assert len(set(task_alphabets)) == (5 if mode == 'val' else 20), 'every alphabet of >= 20 characters is drawn'
    train_ids = lake.class_ids['train'].tolist()
    mixed = [len({lake.alphabets[train_ids[c]] for c in task}) > 1 for task in lake.next('train', return_indices=True)[4].tolist()]
    assert all(mixed), 'training tasks mix alphabets unless asked otherwise'


def test_alphabets_smaller_than_n_way_are_never_drawn(omniglot_root):
    db = OmniglotNShot(omniglot_root, batchsz=200, n_way=30, k_shot=1, k_query=1, split='lake',
                       within_alphabet=('train', 'test'))
    for mode in ('train', 'test'):
        ids = db.class_ids[mode].tolist()
        sizes = collections.Counter(db.alphabets[c] for c in ids)
        drawn = {db.alphabets[ids[c]] for c in db.next(mode, return_indices=True)[4][:, 0].tolist()}
        assert drawn == {alphabet for alphabet, n in sizes.items() if n >= 30}
    with pytest.raises(ValueError, match='no Omniglot test alphabet has 50 characters'):
        OmniglotNShot(omniglot_root, batchsz=2, n_way=50, k_shot=1, k_query=1, split='lake', within_alphabet=('test',))


def test_bad_options_are_clear_errors(omniglot_root):
    make = functools.partial(OmniglotNShot, omniglot_root, batchsz=2, n_way=5, k_shot=1, k_query=1)
    with pytest.raises(ValueError, match="rotate='sometimes' is not one of None, 'classes', 'per_task'"):
        make(rotate='sometimes')
    with pytest.raises(ValueError, match="preprocess='colour' is not one of 'official', 'greyscale'"):
        make(preprocess='colour')
    with pytest.raises(ValueError, match="split='lake' holds out whole background alphabets .* use val_alphabets"):
        make(split='lake', val_classes=100)
    with pytest.raises(ValueError, match="with the random split use val_classes"):
        make(val_alphabets=3)
    with pytest.raises(ValueError, match="val_alphabets=30 must lie between 0 and 29"):
        make(split='lake', val_alphabets=30)
    with pytest.raises(ValueError, match="within_alphabet names split 'val', which this loader does not have"):
        make(split='lake', within_alphabet=('val',))
    with pytest.raises(ValueError, match="rotate_modes names split 'val', which this loader does not have"):
        make(rotate='per_task', rotate_modes=('train', 'val'))


def test_group_tasks_draw_distinct_classes_of_one_large_enough_group():
    group_of_class = ['a'] * 3 + ['b'] * 5 + ['c'] * 2 + ['d'] * 8
    members, sizes = group_table(group_of_class)
    assert sizes.tolist() == [3, 5, 2, 8]
    index_table, counts = torch.arange(18 * 4).view(18, 4), torch.full((18,), 4)
    classes, support, support_y, query, query_y = draw_group_tasks(
        index_table, counts, 500, 4, 1, 2, torch.Generator().manual_seed(0), members, sizes)
    groups = {frozenset(group_of_class[c] for c in task) for task in classes.tolist()}
    assert groups == {frozenset('b'), frozenset('d')}
    assert all(len(set(task)) == 4 for task in classes.tolist())
    assert torch.equal(support // 4, classes.gather(1, support_y))
    assert torch.equal(query // 4, classes.gather(1, query_y))


def test_sampling_is_reproducible_after_reset(db):
    db.reset('test', 3)
    first = db.next('test')
    db.reset('test', 3)
    assert all(torch.equal(a, b) for a, b in zip(first, db.next('test')))


def test_tasks_are_drawn_on_the_cpu_whatever_the_training_device(omniglot_root):
    """A seed means the same tasks on every device, and the saved stream has one format: the draws
    (rotations included) consume the same CPU stream for the 'meta' device as for the CPU."""
    loaders = [OmniglotNShot(omniglot_root, batchsz=4, n_way=5, k_shot=1, k_query=2, seed=5, device=device,
                             rotate='per_task') for device in ('cpu', 'meta')]
    for db in loaders:
        for _ in range(3):
            batch = db.next('train', return_indices=True)
        assert all(t.device == db.device for t in batch)
    on_cpu, on_meta = (db.state_dict()['train'] for db in loaders)
    assert torch.equal(on_cpu, on_meta) and on_cpu.numel() == torch.Generator().get_state().numel()


def test_a_stream_saved_by_an_older_gpu_run_resumes_reseeded_from_it(db, capsys):
    cuda_state = torch.arange(16, dtype=torch.uint8)   # what a CUDA generator's get_state() gives
    state = {**db.state_dict(), 'train': cuda_state}
    db.load_state_dict(state)
    first = db.next('train')
    assert 'saved by a GPU run of an older version' in capsys.readouterr().out
    db.load_state_dict(state)
    assert all(torch.equal(a, b) for a, b in zip(first, db.next('train')))


def test_impossible_requests_are_clear_errors(omniglot_root):
    with pytest.raises(ValueError, match='k_spt=5 and k_qry=16 cannot both be drawn'):
        OmniglotNShot(omniglot_root, batchsz=2, n_way=5, k_shot=5, k_query=16)
    with pytest.raises(ValueError, match='n_way=500 is more than the 423 Omniglot test classes'):
        OmniglotNShot(omniglot_root, batchsz=2, n_way=500, k_shot=1, k_query=1)


def drawings(root, name, imgsz, preprocess):
    """The 20 drawings of character `name`, decoded here independently of the loader, as uint8."""
    part = next(p for p in ('images_background', 'images_evaluation') if os.path.isdir(os.path.join(root, p, name)))
    folder = os.path.join(root, part, name)
    images = []
    for png in sorted(os.listdir(folder)):
        with Image.open(os.path.join(folder, png)) as img:
            if preprocess == 'official':
                # 1-bit PIL resizing is nearest neighbour: pixel i takes source pixel (i + 1/2) * 105 / s
                nearest = ((np.arange(imgsz) + 0.5) * img.size[0] / imgsz).astype(int)
                background = np.asarray(img)[np.ix_(nearest, nearest)]
                images.append(np.where(background, 0, 255).astype(np.uint8))
            else:
                images.append(np.asarray(img.convert('L').resize((imgsz, imgsz), Image.LANCZOS)))
    return torch.from_numpy(np.stack(images))


def test_official_preprocessing_is_binary_with_ink_one(db, omniglot_root):
    store = db.data['train'].view(-1, DRAWINGS, 28, 28)
    assert set(store.unique().tolist()) == {0, 255}
    assert 0.8 < (store == 0).float().mean() < 0.97, 'mostly background, which is 0'
    for i in (0, 1, 600):
        name = db.classes[db.class_ids['train'][i]]
        assert torch.equal(store[i], drawings(omniglot_root, name, 28, 'official'))


def test_cache_is_reused_and_each_size_and_preprocessing_has_its_own(db, omniglot_root, tmp_path, monkeypatch):
    root = tmp_path / 'root'
    shutil.copytree(omniglot_root, root)
    grey = OmniglotNShot(str(root), batchsz=2, n_way=5, k_shot=1, k_query=1, imgsz=14, preprocess='greyscale')
    assert (root / 'omniglot_14_greyscale.pt').stat().st_size < 1623 * DRAWINGS * 14 * 14 + 200_000
    store = grey.data['test'].view(-1, DRAWINGS, 14, 14)
    assert torch.equal(store[5], drawings(str(root), grey.classes[grey.class_ids['test'][5]], 14, 'greyscale'))
    assert (store == 255).float().mean() > 0.5 and len(store.unique()) > 100, 'white background, antialiased'
    for name in ('images_background', 'images_evaluation'):
        shutil.rmtree(root / name)
        os.remove(root / f'{name}.zip')
    monkeypatch.setattr(omniglotNShot, '_read_png', None)   # a reload must not decode anything
    small = OmniglotNShot(str(root), batchsz=2, n_way=5, k_shot=1, k_query=1, imgsz=14, preprocess='greyscale')
    assert small.data['train'].dtype == torch.uint8 and small.data['train'].shape == (1200 * DRAWINGS, 1, 14, 14)
    assert torch.equal(small.data['test'], grey.data['test'])
    assert sorted(os.listdir(root)) == ['omniglot_14_greyscale.pt', 'omniglot_28_official.pt']


def test_a_killed_extractions_scratch_folder_is_removed_by_the_next_run(omniglot_root, tmp_path):
    root = tmp_path / 'root'
    shutil.copytree(omniglot_root, root)
    dead, legacy, alive = (root / n for n in ('.extracting-999999999-images_background', '.extracting-x1b2',
                                              f'.extracting-{os.getppid()}-images_evaluation'))
    for scratch in (dead, legacy, alive):
        (scratch / 'images_background').mkdir(parents=True)
    dead_download, live_download = root / 'images_background.zip.999999999.part', root / f'x.zip.{os.getppid()}.part'
    dead_download.write_bytes(b'cut short')
    live_download.write_bytes(b'under way')
    dead_cache, live_cache = root / 'omniglot_28_official.pt.999999999.tmp', root / f'omniglot_28_x.pt.{os.getppid()}.tmp'
    dead_cache.write_bytes(b'cut short')
    live_cache.write_bytes(b'under way')
    OmniglotNShot(str(root), batchsz=2, n_way=5, k_shot=1, k_query=1)
    assert not dead.exists() and not legacy.exists() and not dead_download.exists() and live_download.exists()
    assert not dead_cache.exists() and live_cache.exists()
    assert alive.exists(), "a running extraction's folder (another live process's) is left alone"


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



def test_a_damaged_member_of_a_zip_is_named(tmp_path):
    with zipfile.ZipFile(tmp_path / 'images_background.zip', 'w', zipfile.ZIP_DEFLATED) as z:
        z.writestr('images_background/A/c/1.png', bytes(range(256)) * 200)
    data = bytearray((tmp_path / 'images_background.zip').read_bytes())
    data[80:120] = b'\xaa' * 40   # inside the member's deflate stream: zlib fails, not the CRC check
    (tmp_path / 'images_background.zip').write_bytes(bytes(data))
    with pytest.raises(RuntimeError, match='images_background.zip is not a valid zip file'):
        fetch_archives(str(tmp_path), download=False)


def test_stray_files_beside_the_alphabets_are_ignored(tmp_path):
    for part, alphabet in (('images_background', 'Latin'), ('images_evaluation', 'Greek')):
        character = tmp_path / part / alphabet / 'character01'
        character.mkdir(parents=True)
        for i in range(DRAWINGS):
            Image.new('1', (105, 105), 1).save(character / f'{i:02d}.png')
        (tmp_path / part / '.DS_Store').write_bytes(b'finder')
        (tmp_path / part / alphabet / 'notes.txt').write_text('a stray file')
    images, classes, background = omniglotNShot.load_images(str(tmp_path), 28)
    assert classes == ['Latin/character01', 'Greek/character01'] and background == 1
    assert images.shape == (2, DRAWINGS, 28, 28)
