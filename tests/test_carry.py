"""gpu/carry.py on the real mini-ImageNet files: split into parts, kept one part at a time, joined
into the loader's layout; a damaged or missing part is one sentence and nothing is laid out."""
import hashlib
import os
import shutil
import subprocess
import sys

import pytest

import carry
from conftest import REPO, shared_miniimagenet
from maml.errors import DamagedError, FlagError, MissingError
from maml.folder import read_split

VAL = ['images_val.tar.gz', 'val.csv']   # 32 MB: three parts of at most 12 MB


@pytest.fixture(scope='module')
def parts(tmp_path_factory):
    dest = tmp_path_factory.mktemp('split') / 'parts'
    manifest = carry.split(str(shared_miniimagenet()), str(dest), max_mb=12, names=VAL)
    return dest, manifest


def flip_a_byte(path):
    with open(path, 'r+b') as f:
        f.seek(1000)
        byte = f.read(1)
        f.seek(1000)
        f.write(bytes([byte[0] ^ 1]))


def test_split_cuts_the_listed_files_into_checked_parts(parts):
    dest, manifest = parts
    source = shared_miniimagenet()
    assert [p['bytes'] for p in manifest['parts']] == [12_000_000, 12_000_000, 8_062_672]
    assert sorted(os.listdir(dest)) == ['1', '2', '3']
    for k, entry in enumerate(manifest['parts'], 1):
        path = dest / str(k) / f'miniimagenet.part{k}'
        assert hashlib.sha256(path.read_bytes()).hexdigest() == entry['sha256']
        assert (dest / str(k) / 'manifest.json').is_file(), 'each part travels with the manifest'
    whole = b''.join((dest / str(k) / f'miniimagenet.part{k}').read_bytes() for k in (1, 2, 3))
    assert whole == b''.join((source / name).read_bytes() for name in VAL)
    sums = dict(line.split()[::-1] for line in (source / 'SHA256SUMS').read_text().splitlines())
    assert [(f['name'], f['sha256']) for f in manifest['files']] == [(name, sums[name]) for name in VAL]


def test_parts_kept_one_by_one_join_into_the_loaders_layout(parts, tmp_path):
    dest, _ = parts
    carried = tmp_path / 'carried'   # where the parts arrive: keep moves each out of it
    shutil.copytree(dest, carried)
    kept, layout = tmp_path / 'kept', tmp_path / 'data' / 'miniimagenet'
    layout.parent.mkdir()

    assert carry.keep(str(carried / '1'), str(kept)) == [1]
    assert carry.keep(str(carried / '3'), str(kept)) == [1, 3]
    with pytest.raises(MissingError, match=r"part 2 of 3 \(miniimagenet\.part2\) is missing from .*kept; send "
                                           r".*parts/2 and keep it"):
        carry.join(str(kept), str(layout))
    assert os.listdir(layout.parent) == []

    flip_a_byte(carried / '2' / 'miniimagenet.part2')
    with pytest.raises(DamagedError, match=r"part 2 of 3 .* has SHA-256 .* it was damaged on the way; delete it, "
                                           r"then send .*parts/2 again"):
        carry.keep(str(carried / '2'), str(kept))
    assert (carried / '2' / 'miniimagenet.part2').is_file() and not (kept / 'miniimagenet.part2').exists()
    shutil.copyfile(dest / '2' / 'miniimagenet.part2', carried / '2' / 'miniimagenet.part2')   # sent again
    assert carry.keep(str(carried / '2'), str(kept)) == [1, 2, 3]

    flip_a_byte(kept / 'miniimagenet.part3')
    with pytest.raises(DamagedError, match='part 3 of 3 .* damaged on the way'):
        carry.join(str(kept), str(layout))
    assert os.listdir(layout.parent) == [], 'no layout, half-built or not'
    shutil.copyfile(dest / '3' / 'miniimagenet.part3', kept / 'miniimagenet.part3')

    assert carry.join(str(kept), str(layout)) is True
    assert sorted(os.listdir(layout)) == ['images', 'val.csv']
    assert (layout / 'val.csv').read_bytes() == (shared_miniimagenet() / 'val.csv').read_bytes()
    split = read_split(str(layout), 'val')
    assert len(split['class_names']) == 16 and split['counts'].tolist() == [600] * 16
    assert len(os.listdir(layout / 'images')) == 9600
    assert carry.join(str(kept), str(layout)) is False, 'a second join finds it in place'


def test_a_missing_part_stops_the_command_line_in_one_sentence(parts, tmp_path):
    dest, _ = parts
    kept = tmp_path / 'kept'
    kept.mkdir()
    shutil.copyfile(dest / '1' / 'manifest.json', kept / 'manifest.json')
    run = subprocess.run([sys.executable, os.path.join(REPO, 'gpu', 'carry.py'), 'join', str(kept),
                          str(tmp_path / 'miniimagenet')], capture_output=True, text=True, timeout=300)
    assert run.returncode == 1
    assert run.stderr.strip().splitlines() == [
        f"error: part 1 of 3 (miniimagenet.part1) is missing from {kept}; send {dest}/1 and keep it with "
        f"`python gpu/carry.py keep`."]


def test_a_part_size_with_no_room_is_refused(tmp_path):
    with pytest.raises(FlagError, match=r"--max-mb 0 gives no room for a part; pass a positive size such as 60"):
        carry.split(str(shared_miniimagenet()), str(tmp_path / 'parts'), max_mb=0, names=VAL)
    assert os.listdir(tmp_path) == []


def test_any_part_size_is_taken(tmp_path):
    manifest = carry.split(str(shared_miniimagenet()), str(tmp_path / 'parts'), max_mb=100, names=VAL)
    assert [p['bytes'] for p in manifest['parts']] == [32_062_672], 'one part: no bound beside --max-mb'


def test_a_source_that_fails_its_checksum_is_not_split(tmp_path):
    source = tmp_path / 'miniimagenet'
    source.mkdir()
    shutil.copyfile(shared_miniimagenet() / 'val.csv', source / 'val.csv')
    sums = (shared_miniimagenet() / 'SHA256SUMS').read_text().splitlines()
    (source / 'SHA256SUMS').write_text(next(line for line in sums if line.endswith('val.csv')) + '\n')
    flip_a_byte(source / 'val.csv')
    with pytest.raises(DamagedError, match=r'val\.csv does not match its SHA-256 in SHA256SUMS'):
        carry.split(str(source), str(tmp_path / 'parts'))
    assert sorted(os.listdir(tmp_path)) == ['miniimagenet'], 'no parts, finished or not'


def test_the_sample_holds_the_first_classes_of_each_split_in_the_loaders_layout(tmp_path):
    carry.sample_miniimagenet(str(shared_miniimagenet()), str(tmp_path / 'sample'), n_classes=5, per_class=20)
    for mode in ('train', 'val', 'test'):
        labels = [row.split(',')[1] for row in (shared_miniimagenet() / f'{mode}.csv').read_text().splitlines()[1:]]
        split = read_split(str(tmp_path / 'sample'), mode)
        assert split['class_names'] == list(dict.fromkeys(labels))[:5] and split['counts'].tolist() == [20] * 5
    assert len(os.listdir(tmp_path / 'sample' / 'images')) == 300
    assert sorted(os.listdir(tmp_path)) == ['sample'], 'no scratch folder left'
