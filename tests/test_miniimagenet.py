"""
Tests of MiniImagenet.py: the episode contract of the Dataset and of the cached sampler on a tiny
split written here in the real layout, their clear errors, and both on the real val split.

Every tiny image is one solid colour that encodes (class, image), so a sampled tensor says which
image it is: red = 20 + 25 * class, green = 20 + 9 * image (JPEG keeps solid colours within +-2),
hence at most 10 classes of at most 26 images.
The real-data test finds miniimagenet/ with conftest's shared_data ($MAML_DATA, else
<repo>/../shared/data; skips when absent, fails with MAML_REQUIRE_DATA=1) and unpacks
images_val.tar.gz once into $MAML_TEST_CACHE (default ~/.cache/maml-pytorch-tests).
"""
import csv
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms

import MiniImagenet as mi
from conftest import shared_miniimagenet, unpacked_split
from maml import imagecache
from maml.folder import read_split
from maml.imagecache import IMAGENET_MEAN, IMAGENET_STD
from MiniImagenet import MiniImagenet, MiniImagenetCache, check_splits

MEAN = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
STD = torch.tensor(IMAGENET_STD).view(3, 1, 1)


def wnid(c):
    return f'n{c:08d}'


def write_split(root, mode='train', counts=(25,) * 8):
    """A split in the real layout: root/images/<wnid><image>.jpg and root/{mode}.csv."""
    (root / 'images').mkdir(parents=True, exist_ok=True)
    rows = [['filename', 'label']]
    for c, count in enumerate(counts):
        for i in range(count):
            name = f'{wnid(c)}{i:08d}.jpg'
            Image.new('RGB', (84, 84), (20 + 25 * c, 20 + 9 * i, 128)).save(root / 'images' / name, quality=95)
            rows.append([name, wnid(c)])
    with open(root / f'{mode}.csv', 'w', newline='') as f:
        csv.writer(f).writerows(rows)
    return root


@pytest.fixture
def root(tmp_path):
    return write_split(tmp_path / 'miniimagenet')


def identify(x):
    """Normalised images [..., 3, r, r] -> (class, image) codes [..., 2] of the tiny split."""
    rgb = ((x * STD + MEAN) * 255).mean(dim=(-2, -1))
    return torch.stack([((rgb[..., 0] - 20) / 25).round(), ((rgb[..., 1] - 20) / 9).round()], -1).long()


def check_tasks(x_spt, y_spt, x_qry, y_qry, n_way, k_shot, k_query, resize=84, classes=None):
    """The episode contract, task by task, on a batch [b, ...] of tiny-split tasks."""
    b = x_spt.shape[0]
    assert x_spt.shape == (b, n_way * k_shot, 3, resize, resize) and x_spt.dtype == torch.float32
    assert x_qry.shape == (b, n_way * k_query, 3, resize, resize) and x_qry.dtype == torch.float32
    assert y_spt.shape == (b, n_way * k_shot) and y_spt.dtype == torch.int64
    assert y_qry.shape == (b, n_way * k_query) and y_qry.dtype == torch.int64
    for t in range(b):
        ids_spt, ids_qry = identify(x_spt[t]), identify(x_qry[t])
        for y, k in ((y_spt[t], k_shot), (y_qry[t], k_query)):
            assert y.min() >= 0 and y.max() < n_way
            assert torch.bincount(y, minlength=n_way).tolist() == [k] * n_way
        # each label is one class, the same in support and query, and the classes are distinct
        label_class = {}
        for ids, y in ((ids_spt, y_spt[t]), (ids_qry, y_qry[t])):
            for (c, _), label in zip(ids.tolist(), y.tolist()):
                assert label_class.setdefault(label, c) == c
        assert len(set(label_class.values())) == n_way
        if classes is not None:
            assert [label_class[j] for j in range(n_way)] == classes[t].tolist()
        images_spt, images_qry = {tuple(i) for i in ids_spt.tolist()}, {tuple(i) for i in ids_qry.tolist()}
        assert len(images_spt) == n_way * k_shot and len(images_qry) == n_way * k_query
        assert not images_spt & images_qry


def shuffled(y):
    """Whether some task of y [b, m] lists its labels out of class order."""
    return any(not torch.equal(labels.sort().values, labels) for labels in y)


# the Dataset path

def test_dataset_items_keep_the_episode_contract(root):
    db = MiniImagenet(str(root), 'train', batchsz=6, n_way=5, k_shot=2, k_query=3)
    assert len(db) == 6
    batch = [torch.stack(parts) for parts in zip(*(db[i] for i in range(len(db))))]
    check_tasks(*batch, 5, 2, 3, classes=db.episode_classes)
    assert shuffled(batch[1]) and shuffled(batch[3])
    small = MiniImagenet(str(root), 'train', batchsz=2, n_way=3, k_shot=1, k_query=2, resize=32)
    check_tasks(*(t.unsqueeze(0) for t in small[1]), 3, 1, 2, resize=32)


def test_dataset_is_seeded_and_works_through_dataloader_workers(root):
    db = MiniImagenet(str(root), 'train', batchsz=6, n_way=5, k_shot=1, k_query=4, seed=3)
    assert torch.equal(db.support_idx, MiniImagenet(str(root), 'train', 6, 5, 1, 4, seed=3).support_idx)
    assert not torch.equal(db.support_idx, MiniImagenet(str(root), 'train', 6, 5, 1, 4, seed=4).support_idx)
    loader = torch.utils.data.DataLoader(db, batch_size=3, num_workers=2)
    batches = list(loader)
    assert len(batches) == 2
    for i, batch in enumerate(batches):
        check_tasks(*batch, 5, 1, 4, classes=db.episode_classes[3 * i:3 * i + 3])
    assert torch.equal(batches[1][2][0], db[3][2])


# the cached path

def test_cache_samples_keep_the_episode_contract(root):
    cache = MiniImagenetCache(str(root), 'train')
    assert cache.n_classes == 8 and cache.class_names == [wnid(c) for c in range(8)]
    *batch, classes = cache.sample(8, n_way=5, k_shot=2, k_query=3, return_classes=True)
    assert classes.shape == (8, 5)
    check_tasks(*batch, 5, 2, 3, classes=classes)
    assert shuffled(batch[1]) and shuffled(batch[3])
    # the whole split in one task: every image once, none missed or repeated
    x_spt, _, x_qry, _ = cache.sample(1, n_way=8, k_shot=10, k_query=15)
    everything = {tuple(i) for i in torch.cat([identify(x_spt[0]), identify(x_qry[0])]).tolist()}
    assert everything == {(c, i) for c in range(8) for i in range(25)}


def test_cache_built_by_worker_processes_equals_the_one_built_in_process(root, tmp_path):
    forked = MiniImagenetCache(str(root), 'train', cache_dir=str(tmp_path / 'forked'), num_workers=2)
    inline = MiniImagenetCache(str(root), 'train', cache_dir=str(tmp_path / 'inline'), num_workers=1)
    assert torch.equal(forked.images, inline.images)


def test_cache_kept_in_host_memory_gives_the_same_tasks(root):
    resident = MiniImagenetCache(str(root), 'train', seed=2)
    host = MiniImagenetCache(str(root), 'train', seed=2, keep_on_device=False)
    assert resident.on_device and not host.on_device
    for a, b in zip(resident.sample(3, 5, 2, 3), host.sample(3, 5, 2, 3)):
        assert torch.equal(a, b)


def test_cache_handles_classes_of_unequal_size(tmp_path):
    root = write_split(tmp_path / 'uneven', counts=(25, 6, 13, 7, 20, 6))
    cache = MiniImagenetCache(str(root), 'train')
    *batch, classes = cache.sample(40, n_way=4, k_shot=2, k_query=4, return_classes=True)
    check_tasks(*batch, 4, 2, 4, classes=classes)


def test_cache_and_dataset_give_the_same_tasks_for_the_same_seed(root):
    db = MiniImagenet(str(root), 'train', batchsz=5, n_way=4, k_shot=2, k_query=3, seed=7)
    cache = MiniImagenetCache(str(root), 'train', seed=7)
    batch = cache.sample(5, 4, 2, 3)
    for i in range(5):
        for from_cache, from_dataset in zip(batch, db[i]):
            assert torch.equal(from_cache[i], from_dataset)


def test_cache_reset_and_generator_repeat_tasks(root):
    cache = MiniImagenetCache(str(root), 'train')
    cache.reset(11)
    first = cache.sample(3, 5, 1, 2)
    assert not torch.equal(first[0], cache.sample(3, 5, 1, 2)[0])
    cache.reset(11)
    assert all(torch.equal(a, b) for a, b in zip(first, cache.sample(3, 5, 1, 2)))
    again = cache.sample(3, 5, 1, 2, generator=torch.Generator().manual_seed(11))
    assert all(torch.equal(a, b) for a, b in zip(first, again))


def test_cache_draws_on_the_cpu_whatever_the_training_device(root):
    caches = [MiniImagenetCache(str(root), 'train', seed=4, device=device) for device in ('cpu', 'meta')]
    for cache in caches:
        batch = cache.sample(3, 5, 1, 2)
        assert all(t.device == cache.device for t in batch)
    on_cpu, on_meta = (cache.state_dict()['generator'] for cache in caches)
    assert torch.equal(on_cpu, on_meta) and on_cpu.numel() == torch.Generator().get_state().numel()
    older_gpu_run = {'generator': torch.arange(16, dtype=torch.uint8)}
    caches[0].load_state_dict(older_gpu_run)
    first = caches[0].sample(3, 5, 1, 2)
    caches[0].load_state_dict(older_gpu_run)
    assert all(torch.equal(a, b) for a, b in zip(first, caches[0].sample(3, 5, 1, 2)))


def test_cache_is_built_once_then_memory_mapped(root, monkeypatch):
    cache = MiniImagenetCache(str(root), 'train', seed=1)
    path = Path(cache.cache_path)
    assert path.parent == root / 'cache' and path.name.startswith('train_84_') and path.suffix == '.npy'
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]   # no tmp file left behind
    expected = cache.sample(2, 5, 1, 3)

    def no_decoding(fmt, path):
        raise AssertionError('the cache was decoded again')
    mmap_modes = []
    real_load = np.load
    monkeypatch.setattr(imagecache.ImageFormat, 'decode', no_decoding)
    monkeypatch.setattr(mi.np, 'load', lambda *a, **kw: mmap_modes.append(kw.get('mmap_mode')) or real_load(*a, **kw))
    reloaded = MiniImagenetCache(str(root), 'train', seed=1)
    assert mmap_modes == ['r']
    assert all(torch.equal(a, b) for a, b in zip(expected, reloaded.sample(2, 5, 1, 3)))


def counting_decoder(monkeypatch):
    """A list that records each decoded path; with num_workers=1 the decoding stays in this process."""
    calls = []
    real = imagecache.ImageFormat.decode
    monkeypatch.setattr(imagecache.ImageFormat, 'decode', lambda fmt, path: calls.append(path) or real(fmt, path))
    return calls


def test_cache_is_rebuilt_when_resize_changes(root, monkeypatch):
    first = MiniImagenetCache(str(root), 'train').cache_path
    calls = counting_decoder(monkeypatch)
    cache = MiniImagenetCache(str(root), 'train', resize=32, num_workers=1)
    assert len(calls) == 200 and cache.cache_path != first and os.path.exists(first)
    check_tasks(*cache.sample(2, 5, 1, 2), 5, 1, 2, resize=32)


def test_cache_is_rebuilt_when_the_csv_changes(root, monkeypatch):
    first = MiniImagenetCache(str(root), 'train').cache_path
    lines = (root / 'train.csv').read_text().splitlines()
    (root / 'train.csv').write_text('\n'.join(line for line in lines if wnid(7) not in line) + '\n')
    calls = counting_decoder(monkeypatch)
    cache = MiniImagenetCache(str(root), 'train', num_workers=1)
    assert len(calls) == 175 and cache.cache_path != first and cache.n_classes == 7
    *batch, classes = cache.sample(4, 7, 1, 2, return_classes=True)
    check_tasks(*batch, 7, 1, 2, classes=classes)


def third_task_from_cache(root):
    return [part[2] for part in MiniImagenetCache(str(root), 'train', seed=4, pixel_norm='unit').sample(3, 5, 2, 3)]


def third_task_from_dataset(root):
    return MiniImagenet(str(root), 'train', 3, 5, 2, 3, seed=4, pixel_norm='unit')[2]


@pytest.mark.parametrize('third_task', [third_task_from_cache, third_task_from_dataset], ids=['cache', 'dataset'])
def test_unit_pixels_are_only_divided_by_255(third_task, root):
    unit = third_task(root)
    imagenet = MiniImagenetCache(str(root), 'train', seed=4).sample(3, 5, 2, 3)
    for ours, normalised in ((unit[0], imagenet[0][2]), (unit[2], imagenet[2][2])):
        assert 0 <= ours.min() and ours.max() <= 1
        torch.testing.assert_close(ours * 255, (ours * 255).round(), rtol=0, atol=1e-4)   # a uint8 / 255
        torch.testing.assert_close(ours, normalised * STD + MEAN, rtol=0, atol=1e-6)
    assert torch.equal(unit[1], imagenet[1][2]) and torch.equal(unit[3], imagenet[3][2])
    with pytest.raises(ValueError, match="pixel_norm='none' is not one of 'imagenet', 'unit'"):
        MiniImagenetCache(str(root), 'train', pixel_norm='none')


def test_check_splits_checks_every_split_before_decoding_anything(root, monkeypatch):
    write_split(root, 'val', counts=(25,) * 5 + (10,))
    calls = counting_decoder(monkeypatch)
    check_splits(str(root), {'train': (5, 1, 15), 'val': (5, 1, 9)})
    with pytest.raises(FileNotFoundError, match=r"has no test\.csv"):
        check_splits(str(root), {'train': (5, 1, 15), 'val': (5, 1, 9), 'test': (5, 1, 1)})
    with pytest.raises(ValueError, match=rf"class {wnid(5)} of val\.csv has 10 images, fewer than k_shot \+ k_query = 16"):
        check_splits(str(root), {'train': (5, 1, 15), 'val': (5, 1, 15)})
    os.remove(root / 'images' / f'{wnid(1)}{3:08d}.jpg')
    with pytest.raises(FileNotFoundError, match=r"1 of the images listed in .*val\.csv are missing"):
        check_splits(str(root), {'val': (5, 1, 1)})
    assert not calls and not (root / 'cache').exists()


# clear errors, for both paths

def make_dataset(root, n_way=5, k_shot=1, k_query=2):
    db = MiniImagenet(str(root), 'train', batchsz=2, n_way=n_way, k_shot=k_shot, k_query=k_query)
    return [db[i] for i in range(len(db))]   # the Dataset decodes per item


def make_cache(root, n_way=5, k_shot=1, k_query=2):
    return MiniImagenetCache(str(root), 'train').sample(2, n_way, k_shot, k_query)


both_paths = pytest.mark.parametrize('make', [make_dataset, make_cache], ids=['dataset', 'cache'])


@both_paths
def test_missing_root_csv_or_images_folder_say_how_to_get_the_data(make, root):
    with pytest.raises(FileNotFoundError, match=r"does not exist; get mini-ImageNet .*root/images/\*\.jpg"):
        make(root.parent / 'nowhere')
    os.rename(root / 'train.csv', root / 'other.csv')
    with pytest.raises(FileNotFoundError, match=r"has no train\.csv; get mini-ImageNet "):
        make(root)
    os.rename(root / 'other.csv', root / 'train.csv')
    os.rename(root / 'images', root / 'jpgs')
    with pytest.raises(FileNotFoundError, match=r"has no images; .*root/\{train,val,test\}\.csv"):
        make(root)


@both_paths
def test_a_csv_with_the_wrong_header_is_rejected(make, root):
    text = (root / 'train.csv').read_text()
    (root / 'train.csv').write_text(text.replace('filename,label', 'image,class', 1))
    with pytest.raises(RuntimeError, match=r"not the header 'filename,label'"):   # a damaged file
        make(root)


@both_paths
def test_missing_images_are_named_and_counted(make, root):
    for i in (3, 4, 5):
        os.remove(root / 'images' / f'{wnid(2)}{i:08d}.jpg')
    with pytest.raises(FileNotFoundError, match=rf"3 of the images .* missing .*first: {wnid(2)}00000003\.jpg"):
        make(root)


def make_cache_in_process(root, n_way=5, k_shot=1, k_query=2):
    return MiniImagenetCache(str(root), 'train', num_workers=1).sample(2, n_way, k_shot, k_query)


@pytest.mark.parametrize('make', [make_dataset, make_cache, make_cache_in_process],
                         ids=['dataset', 'cache', 'cache-in-process'])
def test_an_unreadable_image_is_named(make, root):
    bad = root / 'images' / f'{wnid(0)}{0:08d}.jpg'
    bad.write_bytes(b'not a jpeg')
    with pytest.raises(RuntimeError, match=rf"cannot decode image .*{bad.name}"):
        make(root, n_way=8, k_shot=10, k_query=15)   # tasks of every image: the bad one is met
    assert not (root / 'cache').exists() or not any((root / 'cache').iterdir())


@both_paths
def test_a_class_too_small_for_the_task_is_named(make, tmp_path):
    root = write_split(tmp_path / 'small', counts=(25, 25, 25, 4, 25, 25))
    with pytest.raises(ValueError, match=rf"class {wnid(3)} of train\.csv has 4 images, fewer than k_shot \+ k_query = 5"):
        make(root, k_shot=1, k_query=4)


@both_paths
def test_more_ways_than_classes_is_rejected(make, root):
    with pytest.raises(ValueError, match=r"n_way=9 is more than the 8 classes of train\.csv"):
        make(root, n_way=9)


def test_an_unwritable_cache_folder_says_to_pass_another(root):
    (root / 'blocker').write_text('a file, not a folder')
    with pytest.raises(RuntimeError, match=r"cannot write the image cache .*pass cache_dir="):
        MiniImagenetCache(str(root), 'train', cache_dir=str(root / 'blocker' / 'cache'))


def test_a_full_disk_is_named_before_decoding_and_leaves_no_partial_cache(root, tmp_path, monkeypatch):
    def full(fd, offset, length):
        raise OSError(28, 'No space left on device')
    monkeypatch.setattr(os, 'posix_fallocate', full)
    with pytest.raises(RuntimeError, match=r"cannot write the image cache .*No space left on device.*free space"):
        MiniImagenetCache(str(root), 'train', cache_dir=str(tmp_path / 'cache'))
    assert os.listdir(tmp_path / 'cache') == []


def test_a_killed_builds_partial_cache_is_removed_by_the_next_build(root):
    cache_path = Path(MiniImagenetCache(str(root), 'train', num_workers=1).cache_path)
    cache_path.unlink()
    killed, running = (Path(f'{cache_path}.tmp{pid}') for pid in (999999999, os.getppid()))
    killed.write_bytes(b'cut short')
    running.write_bytes(b'under way')
    MiniImagenetCache(str(root), 'train', num_workers=1)
    assert cache_path.exists() and not killed.exists()
    assert running.exists(), "another live process's build of the same cache is left alone"


# the real val split

def test_absent_real_data_skips_unless_required(tmp_path, monkeypatch):
    monkeypatch.setenv('MAML_DATA', str(tmp_path))
    monkeypatch.delenv('MAML_REQUIRE_DATA', raising=False)
    with pytest.raises(pytest.skip.Exception, match='miniimagenet data not found'):
        shared_miniimagenet()
    monkeypatch.setenv('MAML_REQUIRE_DATA', '1')
    with pytest.raises(pytest.fail.Exception, match='miniimagenet data not found'):
        shared_miniimagenet()


@pytest.fixture(scope='module')
def val_subset(tmp_path_factory):
    """6 of the 16 val classes, all 600 images each, with the real images (linked) and CSV rows."""
    source = shared_miniimagenet()
    full = unpacked_split(source, 'val')
    assert len(read_split(str(full), 'val')['filenames']) == 9600   # every row resolves
    root = tmp_path_factory.mktemp('val-subset')
    (root / 'images').symlink_to(full / 'images')
    lines = (full / 'val.csv').read_text().splitlines()
    chosen = sorted({line.split(',')[1] for line in lines[1:]})[::3][:6]
    (root / 'val.csv').write_text('\n'.join([lines[0]] + [l for l in lines[1:] if l.split(',')[1] in chosen]) + '\n')
    return source, root, chosen


def test_real_val_split_builds_reloads_and_samples_its_own_classes(val_subset, monkeypatch):
    source, root, chosen = val_subset
    cache = MiniImagenetCache(str(root), 'val', seed=5)
    assert cache.class_names == chosen and os.path.getsize(cache.cache_path) > 3600 * 3 * 84 * 84
    *batch, classes = cache.sample(6, n_way=5, k_shot=1, k_query=15, return_classes=True)
    x_spt, y_spt, x_qry, y_qry = batch
    assert x_spt.shape == (6, 5, 3, 84, 84) and x_qry.shape == (6, 75, 3, 84, 84)
    assert torch.isfinite(x_qry).all() and -2.2 < x_qry.mean() < 2.7 and x_qry.std() > 0.3
    for t in range(6):
        assert torch.bincount(y_qry[t], minlength=5).tolist() == [15] * 5
        assert len(set(classes[t].tolist())) == 5
    sampled = {cache.class_names[c] for c in classes.flatten().tolist()}
    other_splits = set()
    for mode in ('train', 'test'):
        with open(source / f'{mode}.csv') as f:
            other_splits |= {row['label'] for row in csv.DictReader(f)}
    assert sampled <= set(chosen) and not sampled & other_splits

    # the real JPEGs through the Dataset give the very same tasks for the same seed
    db = MiniImagenet(str(root), 'val', batchsz=2, n_way=5, k_shot=1, k_query=15, seed=9)
    cache.reset(9)
    batch = cache.sample(2, 5, 1, 15)
    assert all(torch.equal(from_cache[1], from_dataset) for from_cache, from_dataset in zip(batch, db[1]))

    # decoded and normalised as the seed's Resize, ToTensor and Normalize would
    seed_transform = lambda resize: transforms.Compose([
        lambda path: Image.open(path).convert('RGB'), transforms.Resize((resize, resize)),
        transforms.ToTensor(), transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    for resize in (84, 60):
        scale, shift = mi.normalizer('imagenet', 'cpu')
        for path in db.filenames[:3]:
            ours = mi.normalize(torch.from_numpy(mi.load_image(path, resize)), scale, shift)
            torch.testing.assert_close(ours, seed_transform(resize)(path), rtol=0, atol=1e-5)

    monkeypatch.setattr(imagecache.ImageFormat, 'decode', lambda fmt, path: pytest.fail('decoded again'))
    reloaded = MiniImagenetCache(str(root), 'val', seed=9)
    assert all(torch.equal(a, b) for a, b in zip(batch, reloaded.sample(2, 5, 1, 15)))
