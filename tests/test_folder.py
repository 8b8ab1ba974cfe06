"""
maml/folder.py on real images: its three layouts, Omniglot's extracted tree decoded exactly as
omniglotNShot decodes it, mini-ImageNet's CSV layout decoded to its very cache, the image formats
and modes it reads, the cache key, the pixel statistics, and each kind of bad data ending in its
one sentence.

Folders are built in temporary directories from the real files of ../shared/data (conftest): the
mini-ImageNet JPEGs linked into class folders (or converted to other formats), the Omniglot PNGs
as their zips extract.
"""
import os
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

import omniglotNShot
from conftest import class_folders, miniimagenet_classes, shared_miniimagenet, unpacked_split
from maml.folder import SPLITS, ImageFolder
from maml.imagecache import ImageFormat, miniimagenet_format
from MiniImagenet import MiniImagenetCache

RGB32 = ImageFormat(3, 32, 'bilinear', None, None)   # mean and std: the train classes'


@pytest.fixture(scope='module')
def val_classes():
    """16 classes of 30 real JPEGs each, from mini-ImageNet's val split."""
    return miniimagenet_classes('val', 16, 30)


def test_a_root_of_class_folders_is_split_by_seeded_fractions_of_the_classes(val_classes, tmp_path):
    root = class_folders(tmp_path / 'data', val_classes)
    folder = ImageFolder(root, tmp_path / 'cache')
    assert folder.layout == 'seeded' and list(folder.parts['all']) == sorted(val_classes)
    splits = folder.split([64, 16, 20], seed=0)
    assert [len(splits[s]) for s in SPLITS] == [10, 3, 3]      # 16 classes: 2.56 and 3.2 rounded
    assert sorted(sum(splits.values(), [])) == sorted(val_classes), 'every class in exactly one split'
    assert folder.split([0.64, 0.16, 0.2], seed=0) == splits and folder.split([64, 16, 20], seed=1) != splits
    assert ImageFolder(root).stored(splits, 'seeded', 'a checkpoint') == splits


def test_train_val_test_folders_are_the_splits(val_classes, tmp_path):
    names = sorted(val_classes)
    chosen = {'train': names[:8], 'val': names[8:12], 'test': names[12:]}
    for split, classes in chosen.items():
        class_folders(tmp_path / 'data' / split, {c: val_classes[c] for c in classes})
    folder = ImageFolder(tmp_path / 'data', tmp_path / 'cache')
    assert folder.layout == 'folders' and folder.split([1, 1, 1], seed=5) == chosen, 'fractions play no part'
    assert folder.evaluation_classes('test')[0] == names[12:]


def test_samplers_draw_their_splits_classes_normalised_by_the_train_pixels(val_classes, tmp_path):
    folder = ImageFolder(class_folders(tmp_path / 'data', val_classes), tmp_path / 'cache')
    splits = folder.split([64, 16, 20], seed=0)
    samplers, fmt = folder.samplers(splits, RGB32, 'cpu', seed=3)
    train = np.stack([RGB32.decode(path) for c in splits['train'] for path in folder.parts['all'][c]]) / 255
    np.testing.assert_allclose(fmt.mean, train.mean((0, 2, 3)), rtol=0, atol=1e-12)
    np.testing.assert_allclose(fmt.std, train.std((0, 2, 3)), rtol=0, atol=1e-12)
    for split, sampler in samplers.items():
        *batch, classes = sampler.sample(4, 3, 2, 3, return_classes=True)
        assert batch[0].shape == (4, 6, 3, 32, 32) and batch[2].shape == (4, 9, 3, 32, 32)
        assert {sampler.class_names[c] for c in classes.flatten().tolist()} <= set(splits[split])
    x = samplers['train'].sample(200, 3, 5, 5)[0]
    assert x.mean().abs() < 0.1 and (x.std() - 1).abs() < 0.1, "the train classes' pixels come out standardised"
    assert all(sampler.images is samplers['train'].images for sampler in samplers.values()), 'one store, one copy'


def test_the_csv_layout_is_miniimagenets_and_decodes_to_its_very_cache(tmp_path):
    full = unpacked_split(shared_miniimagenet(), 'val')
    root = tmp_path / 'mini'
    root.mkdir()
    (root / 'images').symlink_to(full / 'images')
    header, *rows = (full / 'val.csv').read_text().splitlines()
    labels = sorted({row.split(',')[1] for row in rows})[:5]
    (root / 'val.csv').write_text('\n'.join([header] + [r for r in rows if r.split(',')[1] in labels][::12]) + '\n')
    folder = ImageFolder(root, tmp_path / 'cache')
    names, which = folder.evaluation_classes('val')
    assert folder.layout == 'csv' and names == labels and which.endswith('val.csv')
    samplers, _ = folder.samplers({'val': names}, miniimagenet_format(84), 'cpu', seed=9)
    mini = MiniImagenetCache(str(root), 'val', seed=9, cache_dir=str(tmp_path / 'mini-cache'))
    assert torch.equal(samplers['val'].images, mini.images)
    assert all(torch.equal(a, b) for a, b in zip(samplers['val'].sample(3, 5, 1, 4), mini.sample(3, 5, 1, 4)))


def test_omniglots_extracted_tree_gives_exactly_the_images_omniglotnshot_caches(omniglot_root, tmp_path):
    _, evaluation = omniglotNShot.fetch_archives(omniglot_root)
    images, classes, n_background = omniglotNShot.load_images(omniglot_root, 28)
    folder = ImageFolder(evaluation, tmp_path / 'cache')
    assert list(folder.parts['all']) == classes[n_background:], "alphabet/character, in Omniglot's order"
    assert folder.looks() == 'drawings'
    official = ImageFormat(1, 28, 'binary', (0.0,), (1.0,))
    samplers, _ = folder.samplers({'test': list(folder.parts['all'])}, official, 'cpu')
    assert torch.equal(samplers['test'].images, images[n_background:].reshape(-1, 1, 28, 28))


def test_common_formats_sizes_and_modes_decode_and_grey_images_give_one_channel(val_classes, tmp_path):
    jpgs = next(iter(val_classes.values()))[:4]
    rgb = Image.open(jpgs[0]).convert('RGB').resize((100, 60))   # any size: not square, not 84
    grey = Image.open(jpgs[1]).convert('L')
    files = tmp_path / 'files'
    files.mkdir()
    rgb.save(files / 'reference.png')
    for name in ('rgb.bmp', 'rgb.tiff', 'rgb.webp'):
        rgb.save(files / name, **({'lossless': True} if name.endswith('webp') else {}))
    rgb.convert('RGBA').save(files / 'rgba.png')
    grey.save(files / 'grey.png')
    Image.fromarray(np.asarray(grey).astype(np.uint16) * 257).save(files / 'grey16.tif')   # 16-bit, as microscopes write
    grey.convert('P').save(files / 'grey.gif')
    rgb.quantize(64).save(files / 'colour.gif')
    colour, one = ImageFormat(3, 32), ImageFormat(1, 32)
    for name in ('rgb.bmp', 'rgb.tiff', 'rgb.webp', 'rgba.png'):
        assert np.array_equal(colour.decode(files / name), colour.decode(files / 'reference.png')), name
    assert np.array_equal(one.decode(files / 'grey16.tif'), one.decode(files / 'grey.png'))
    assert np.array_equal(colour.decode(files / 'grey.png'), np.repeat(one.decode(files / 'grey.png'), 3, 0))
    assert colour.decode(files / 'colour.gif').shape == (3, 32, 32)

    def looks(names):
        root = tmp_path / '_'.join(names)
        for i, name in enumerate(names):
            (root / f'class{i}').mkdir(parents=True)
            shutil.copy(files / name, root / f'class{i}' / name)
        return ImageFolder(root, tmp_path / 'cache').looks()
    assert looks(['grey.png', 'grey16.tif', 'grey.gif']) == 'grey'
    assert looks(['grey.png', 'grey.gif', 'colour.gif']) == 'colour'
    assert looks(['grey.png', 'rgb.webp']) == 'colour'


def decoded(monkeypatch):
    """A list of the paths that the cache decodes from now on (in this process: one worker)."""
    calls, real = [], ImageFormat.decode
    monkeypatch.setattr(ImageFormat, 'decode', lambda fmt, path: calls.append(path) or real(fmt, path))
    monkeypatch.setattr(os, 'cpu_count', lambda: 1)
    return calls


def test_a_changed_folder_is_decoded_again_and_its_stale_cache_removed(val_classes, tmp_path, monkeypatch, capsys):
    root = class_folders(tmp_path / 'data', {c: val_classes[c] for c in sorted(val_classes)[:3]})
    names = {'test': sorted(val_classes)[:3]}
    fmt = RGB32._replace(mean=(0.5,), std=(0.25,))
    build = lambda: ImageFolder(root, tmp_path / 'cache').samplers(names, fmt, 'cpu')[0]['test']
    first = build()
    calls = decoded(monkeypatch)
    assert torch.equal(build().images, first.images) and not calls, 'an unchanged folder is not decoded again'
    added = root / names['test'][0] / 'added.jpg'
    shutil.copy(val_classes[names['test'][1]][0], added)
    changed = build()
    assert len(calls) == 91 and len(changed.images) == 91
    assert np.array_equal(changed.images[0].numpy(), RGB32.decode(added)), "added.jpg comes first in its class"
    assert 'changed since they were cached, so they are decoded again' in capsys.readouterr().out
    os.utime(added, ns=(1, 1))   # the same files, one modified
    calls.clear()
    build()
    assert len(calls) == 91
    caches = [p for p in (tmp_path / 'cache').rglob('*') if p.is_file()]
    assert len(caches) == 1, 'the caches of earlier states of the folder are gone'


BAD_IMAGE = b'\x89PNG\r\n\x1a\nnot really a png'


def test_unreadable_and_truncated_images_are_counted_and_named_and_leave_no_cache(val_classes, tmp_path):
    classes = {c: val_classes[c][:6] for c in sorted(val_classes)[:3]}
    root = tmp_path / 'data'
    for label, paths in classes.items():
        (root / label).mkdir(parents=True)
        for path in paths:
            shutil.copy(path, root / label / path.name)
    first, second, third = (root / label / classes[label][1].name for label in classes)
    first.write_bytes(BAD_IMAGE)
    second.write_bytes(second.read_bytes()[:600])        # a JPEG cut short
    third.write_bytes(b'')
    folder = ImageFolder(root, tmp_path / 'cache')
    with pytest.raises(RuntimeError, match=rf"cannot decode 3 of the 18 images \(first: {first} \(.*\), {second} "
                                           rf"\(Truncated File Read\), {third} \(cannot identify image file .*\)\); "
                                           rf"replace those files"):
        folder.samplers({'test': list(classes)}, RGB32._replace(mean=(0.5,), std=(0.25,)), 'cpu')
    assert not [p for p in (tmp_path / 'cache').rglob('*') if p.is_file()], 'no partial cache is left'


def test_non_image_files_are_counted_and_never_decoded(val_classes, tmp_path):
    root = class_folders(tmp_path / 'data', {c: val_classes[c] for c in sorted(val_classes)[:3]})
    for name in ('notes.txt', 'labels.csv'):
        (root / sorted(val_classes)[0] / name).write_text('not an image')
    (root / 'README.md').write_text('my data')
    (root / '.DS_Store').write_bytes(b'hidden')
    folder = ImageFolder(root, tmp_path / 'cache')
    assert sorted(os.path.basename(p) for p in folder.others) == ['README.md', 'labels.csv', 'notes.txt']
    assert all(len(files) == 30 for files in folder.parts['all'].values())
    assert folder.describe({'test': list(folder.parts['all'])}, '')[-1].startswith(
        'note: 3 files of the folder are not images and were left out (first: ')


def write_csv(root, split, rows):
    (root / f'{split}.csv').write_text('\n'.join(['filename,label'] + [f'{name},{label}' for name, label in rows]) + '\n')


@pytest.mark.parametrize('case', ['missing', 'empty', 'images in the root', 'images beside class folders',
                                  'class in two split folders', 'class in two csvs', 'csv names missing files',
                                  'split folder missing', 'too few classes', 'classes too small'])
def test_bad_data_is_one_sentence(case, val_classes, tmp_path):
    names = sorted(val_classes)
    root = tmp_path / 'data'
    split, tasks = lambda f: f.split([64, 16, 20], seed=0), None
    if case == 'missing':
        error, match = FileNotFoundError, r"the folder .*data does not exist; pass --data the folder that holds your class folders"
    elif case == 'empty':
        (root / 'empty class').mkdir(parents=True)
        error, match = FileNotFoundError, r"data holds no class folders of images; put each class's images in a folder"
    elif case == 'images in the root':
        class_folders(root, {'.': val_classes[names[0]][:2]})
        error, match = RuntimeError, r"data holds images directly \(first: .*\.jpg\); put each class's images in a folder"
    elif case == 'images beside class folders':
        class_folders(root, {'cats': val_classes[names[0]][:3], 'cats/big': val_classes[names[1]][:3]})
        error, match = RuntimeError, r"cats holds images and also a folder of images, cats/big; a class is one folder"
    elif case == 'class in two split folders':
        for s in SPLITS:
            classes = {c: val_classes[c][:5] for c in names[:5]} if s != 'val' else {names[6]: val_classes[names[6]]}
            class_folders(root / s, classes)
        error, match = RuntimeError, rf"class {names[0]} is in both train/ and test/ of .* \(5 such classes\); a class belongs"
    elif case == 'class in two csvs':
        class_folders(root, {'images': val_classes[names[0]][:4] + val_classes[names[1]][:4]})
        write_csv(root, 'train', [(p.name, names[0]) for p in val_classes[names[0]][:4]])
        write_csv(root, 'val', [(p.name, names[1]) for p in val_classes[names[1]][:2]])
        write_csv(root, 'test', [(p.name, names[0]) for p in val_classes[names[1]][2:4]])
        error, match = RuntimeError, rf"class {names[0]} is in both train\.csv and test\.csv of .*; a class belongs to one split"
    elif case == 'csv names missing files':
        class_folders(root, {'images': val_classes[names[0]][:4]})
        write_csv(root, 'test', [(p.name, names[0]) for p in val_classes[names[0]][:6]])
        split = lambda f: f.evaluation_classes('test')
        error, match = FileNotFoundError, (r"2 of the images listed in .*test\.csv are missing from .*images \(first: .*\); "
                                           r"add them to root/images/ or remove their rows")
    elif case == 'split folder missing':
        class_folders(root / 'train', {names[0]: val_classes[names[0]][:3]})
        class_folders(root / 'test', {names[1]: val_classes[names[1]][:3]})
        error, match = FileNotFoundError, r"data has train/, test/ but no val/; add it, or put all class folders directly"
    elif case == 'too few classes':
        class_folders(root, {c: val_classes[c] for c in names[:12]})   # 8 / 2 / 2 classes
        tasks = {s: (3, 1, 5) for s in SPLITS}
        error, match = ValueError, r"the val split of .*data has 2 classes, fewer than --n_way 3; lower --n_way or add classes"
    else:
        class_folders(root, {c: val_classes[c][:(6 if i % 4 else 4)] for i, c in enumerate(names)})   # 10 / 3 / 3
        tasks = {s: (3, 1, 4) for s in SPLITS}
        error, match = ValueError, (r"only 1 of the 3 val classes of .*data has the 5 images a task takes from a class "
                                    r"\(k_spt \+ k_qry\), fewer than --n_way 3 \(too small: n01855672 \(4\), n02174001 "
                                    r"\(4\)\); lower --k_spt or --k_qry, or add images")
    with pytest.raises(error, match=match):
        folder = ImageFolder(root, tmp_path / 'cache')
        chosen = split(folder)
        if tasks:
            folder.usable(chosen, tasks)
    assert not (tmp_path / 'cache').exists(), 'found before anything is decoded'


def test_classes_too_small_are_left_out_with_a_warning_when_enough_remain(val_classes, tmp_path, capsys):
    names = sorted(val_classes)
    root = class_folders(tmp_path / 'data', {c: val_classes[c][:(3 if i == 1 else 30)] for i, c in enumerate(names)})
    folder = ImageFolder(root)
    splits = folder.split([64, 16, 20], seed=0)
    kept = folder.usable(splits, {s: (2, 1, 5) for s in SPLITS})
    where = next(s for s in SPLITS if names[1] in splits[s])
    assert kept[where] == [c for c in splits[where] if c != names[1]]
    assert f"warning: 1 {where} class has fewer than the 6 images a task takes from a class (k_spt + k_qry) " \
           f"and is left out: {names[1]} (3)." in capsys.readouterr().out
