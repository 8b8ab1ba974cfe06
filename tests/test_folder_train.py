"""
folder_train.py, evaluate.py and classify.py on folders of real images: a run on a mini-ImageNet
folder learns and its best.pth evaluates to the test figure it stored; resume keeps the folder's
settings; bad data ends in one sentence and leaves the run folder as it was; evaluate.py converts
any checkpoint to another data set's images; classify.py predicts what Meta.adapt and predict give.
"""
import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import classify
import evaluate
import folder_train
import omniglot_train
import omniglotNShot
from conftest import CLASSES, PER_CLASS, QUICK, REPO, class_folders, miniimagenet_classes
from maml.errors import UserError
from maml.flags import parse_args
from maml.folder import checkpoint_format, find_classes
from maml.imagecache import normalize
from maml.trainer import plain_dict
from meta import Meta

# the smallest run that goes through everything: 2 meta-steps, one evaluation, the test report
TINY = ['--epoch', '2', '--eval_every', '2', '--log_every', '1', '--imgsz', '16', '--num_filters', '8',
        '--task_num', '2', '--update_step', '1', '--update_step_test', '2', '--k_qry', '3', '--eval_tasks', '8',
        '--test_tasks', '16', '--split_fractions', '5', '5', '5', '--device', 'cpu']


def snapshot(folder):
    """Every file of a folder, by name, with its bytes (the lock file aside)."""
    return {p.name: p.read_bytes() for p in Path(folder).iterdir() if p.name != '.lock'}


@pytest.fixture(scope='module')
def tiny_run(tmp_path_factory):
    """A finished tiny run on 15 classes of 20 real JPEGs (5 train, 5 val, 5 test): its data
    folder, run folder and cache folder."""
    base = tmp_path_factory.mktemp('tiny')
    root = class_folders(base / 'data', miniimagenet_classes('val', 15, 20))
    folder_train.main(['--data', str(root), '--save_dir', str(base / 'run'), '--cache_dir', str(base / 'cache'), *TINY])
    return root, base / 'run', base / 'cache'


def copy_of(root, tmp_path):
    """A copy of a data folder whose images are files of their own (so they can be damaged)."""
    copy = tmp_path / 'copy'
    shutil.copytree(root, copy)
    return copy


def test_a_folder_run_stores_what_evaluation_needs_and_evaluates_to_its_report(tiny_run, tmp_path):
    root, run, _ = tiny_run
    best = torch.load(run / 'best.pth', weights_only=True)
    data = best['data']
    assert data['root'] == str(root) and data['layout'] == 'seeded'
    assert sorted(sum(data['classes'].values(), [])) == sorted(os.listdir(root)) and len(data['classes']['test']) == 5
    assert data['format']['channels'] == 3 and data['format']['size'] == 16 and len(data['format']['mean']) == 3
    assert best['args']['channels'] == 3 and best['args']['network'] == 'miniimagenet'
    assert best['config'][0] == ('conv2d', [8, 3, 3, 3, 1, 1])
    result = tmp_path / 'result.json'
    mean, _ = evaluate.main([str(run / 'best.pth'), '--tasks', '16', '--device', 'cpu', '--json', str(result)])
    assert mean[-1] == pytest.approx(best['test_acc'], abs=1e-9), "the same classes, images and tasks as the report"
    report = json.loads(result.read_text())
    assert report['classes'].startswith('the 5 test classes that') and report['data'] == str(root)


def test_resume_keeps_the_folders_settings(tiny_run, tmp_path):
    _, run, cache = tiny_run
    for flag, value in (('--channels', '1'), ('--split_seed', '4'), ('--preprocess', 'binary'), ('--imgsz', '20')):
        with pytest.raises(UserError, match=rf"--{flag[2:]} .* differs from the .* that .*last\.pth was trained with"):
            folder_train.main(['--resume', str(run / 'last.pth'), '--epoch', '3', '--cache_dir', str(cache), flag, value])
    branch = tmp_path / 'branch'
    folder_train.main(['--resume', str(run / 'last.pth'), '--epoch', '4', '--save_dir', str(branch),
                       '--cache_dir', str(cache), '--channels', '3', '--split_fractions', '5', '5', '5'])
    resumed = torch.load(branch / 'last.pth', weights_only=True)
    assert resumed['step'] == 4 and resumed['data'] == torch.load(run / 'last.pth', weights_only=True)['data']


def damage(root, case):
    """A variant of a data folder with one kind of bad data; the sentence it must end in."""
    classes = sorted(os.listdir(root))
    if case == 'missing':
        shutil.rmtree(root)
        return r"the folder .*copy does not exist; pass --data the folder that holds your class folders"
    if case == 'classes gone':
        for name in classes[:2]:
            shutil.rmtree(root / name)
        return (r"of the \d+ (train|val|test) classes that .*last\.pth was trained with are not in .*copy \(first: .*\); "
                r"pass --data the folder it was trained on")
    if case == 'class too small':
        for name in classes:
            for image in sorted(os.listdir(root / name))[3:]:
                os.remove(root / name / image)
        return (r"only 0 of the 5 train classes of .*copy have the 4 images a task takes from a class "
                r"\(k_spt \+ k_qry\), fewer than --n_way 5")
    bad = [root / name / sorted(os.listdir(root / name))[0] for name in classes[:4]]
    for path in bad[:2]:
        path.write_bytes(path.read_bytes()[:500])
    for path in bad[2:]:
        path.write_bytes(b'GIF89a, then nothing')
    return r"cannot decode 4 of the 300 images \(first: .*\(Truncated File Read\).*\); replace those files"


@pytest.mark.parametrize('case', ['missing', 'classes gone', 'class too small', 'unreadable images'])
def test_resuming_on_bad_data_is_one_sentence_and_changes_no_saved_file(case, tiny_run, tmp_path):
    root, run, _ = tiny_run
    data, cache = copy_of(root, tmp_path), tmp_path / 'cache'
    match = damage(data, case)
    before = snapshot(run)
    with pytest.raises(UserError, match=match):
        folder_train.main(['--resume', str(run / 'last.pth'), '--epoch', '3', '--data', str(data), '--cache_dir', str(cache)])
    assert snapshot(run) == before
    assert not cache.exists() or not [p for p in cache.rglob('*') if p.is_file()], 'no partial cache'


def test_a_new_run_on_bad_data_is_one_line_and_writes_nothing(tmp_path):
    (tmp_path / 'data' / 'only class').mkdir(parents=True)
    run = subprocess.run([sys.executable, os.path.join(REPO, 'folder_train.py'), '--data', str(tmp_path / 'data'),
                          '--save_dir', str(tmp_path / 'run'), '--cache_dir', str(tmp_path / 'cache'), '--device', 'cpu'],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 1 and run.stderr.strip().splitlines() == [
        f"error: {tmp_path / 'data'} holds no class folders of images; put each class's images in a folder of its "
        f"own there (README, Your own data)."]
    assert not (tmp_path / 'run').exists() and not (tmp_path / 'cache').exists()
    nothing = subprocess.run([sys.executable, os.path.join(REPO, 'folder_train.py'), '--device', 'cpu'],
                             capture_output=True, text=True, timeout=300)
    assert nothing.returncode == 1 and 'folder_train.py needs --data, the folder that holds your class folders' in nothing.stderr


def moved_run(run, tmp_path, name):
    """A copy of a run folder whose checkpoint `name` says it was trained on tmp_path/elsewhere (absent)."""
    moved = tmp_path / 'moved'
    shutil.copytree(run, moved, ignore=shutil.ignore_patterns('.lock'))
    ckpt = torch.load(moved / name, weights_only=True)
    ckpt['data']['root'] = ckpt['args']['data'] = str(tmp_path / 'elsewhere')
    torch.save(ckpt, moved / name)
    return moved / name, ckpt


def test_resuming_a_run_whose_folder_is_not_on_this_machine_says_to_pass_data(tiny_run, tmp_path):
    last, _ = moved_run(tiny_run[1], tmp_path, 'last.pth')
    before = snapshot(last.parent)
    with pytest.raises(UserError, match=r"the folder .*elsewhere that .*last\.pth was trained on is not on this machine; "
                                        r"pass --data where it is now"):
        folder_train.main(['--resume', str(last), '--epoch', '3'])
    assert snapshot(last.parent) == before


def test_evaluate_refuses_in_one_sentence_when_the_stored_test_classes_are_gone(tiny_run, tmp_path):
    best, ckpt = moved_run(tiny_run[1], tmp_path, 'best.pth')
    with pytest.raises(UserError, match=r"the folder .*elsewhere that .*best\.pth was trained on is not on this machine"):
        evaluate.main([str(best), '--tasks', '4', '--device', 'cpu'])
    gone = copy_of(tiny_run[0], tmp_path)
    shutil.rmtree(gone / ckpt['data']['classes']['test'][0])
    os.rename(gone, tmp_path / 'elsewhere')
    with pytest.raises(UserError, match=r"1 of the 5 test classes that .*best\.pth was trained with are not in .*elsewhere"):
        evaluate.main([str(best), '--tasks', '4', '--device', 'cpu'])


def omniglot_checkpoint(path):
    """A checkpoint as omniglot_train.py writes one (untrained weights: its inputs are what matters)."""
    args = parse_args(omniglot_train.build_parser(), 'omniglot', ['--num_filters', '8', '--update_step_test', '1'])
    maml = Meta(args, omniglot_train.network(args.n_way, args.imgsz, args.num_filters), imgc=1)
    torch.save(maml.checkpoint(step=0, acc=0.0, args=plain_dict(args)), path)
    return path


def first_batch(checkpoint, *flags):
    settings = evaluate.settings_of(torch.load(checkpoint, weights_only=True), checkpoint,
                                    evaluate.build_parser().parse_args([str(checkpoint), *flags]))
    next_batch, which = evaluate.task_sampler(settings, torch.load(checkpoint, weights_only=True), checkpoint, 'cpu', 'test')
    return next_batch(), which


def test_evaluate_converts_any_checkpoint_to_another_data_sets_images(tiny_run, omniglot_root, tmp_path):
    root, run, cache = tiny_run
    omniglot = omniglot_checkpoint(tmp_path / 'omniglot.pth')
    (x_spt, _, x_qry, _), which = first_batch(omniglot, '--data', str(root), '--cache_dir', str(cache))
    assert which == f'all 15 classes of {root} (it has no test/ or test.csv)'
    ink = (x_qry - 1).abs() < 1e-6
    assert x_spt.shape == (8, 5, 1, 28, 28) and ((x_qry == 0) | ink).all() and 0 < ink.float().mean() < 1, \
        "RGB photographs become Omniglot's 28x28 binary images, ink 1 on 0"
    result = tmp_path / 'result.json'
    evaluate.main([str(omniglot), '--data', str(root), '--cache_dir', str(cache), '--tasks', '8', '--device', 'cpu',
                   '--json', str(result)])
    assert json.loads(result.read_text())['classes'] == which

    _, evaluation = omniglotNShot.fetch_archives(omniglot_root)
    alphabets = tmp_path / 'alphabets'
    for name in sorted(os.listdir(evaluation))[:2]:
        shutil.copytree(os.path.join(evaluation, name), alphabets / name)
    (x_spt, _, x_qry, _), which = first_batch(run / 'best.pth', '--data', str(alphabets), '--cache_dir', str(cache))
    n_characters = len(find_classes(str(alphabets))[0])
    assert which == f'all {n_characters} classes of {alphabets} (it has no test/ or test.csv)'
    assert x_spt.shape == (8, 5, 3, 16, 16)
    fmt = checkpoint_format(torch.load(run / 'best.pth', weights_only=True))
    pixels = (x_qry * torch.tensor(fmt.std).view(3, 1, 1) + torch.tensor(fmt.mean).view(3, 1, 1)) * 255
    assert torch.allclose(pixels[..., 0, :, :], pixels[..., 1, :, :], atol=1e-3) and \
        torch.allclose(pixels[..., 1, :, :], pixels[..., 2, :, :], atol=1e-3), "grey drawings become 3 equal channels"


def support_and_queries(root, classes, tmp_path):
    """support/<class>/ with 1, 2, 3, ... images of each class, and a folder of query images."""
    support, queries = tmp_path / 'support', tmp_path / 'queries'
    queries.mkdir()
    for shots, name in enumerate(classes, start=1):
        images = sorted(os.listdir(root / name))
        class_folders(support, {name: [root / name / image for image in images[:shots]]})
        for image in images[10:12]:
            os.symlink(root / name / image, queries / image)
    return support, queries


def test_classify_predicts_what_adapt_and_predict_give_on_the_same_tensors(tiny_run, tmp_path):
    root, run, _ = tiny_run
    ckpt = torch.load(run / 'best.pth', weights_only=True)
    classes = ckpt['data']['classes']['test'][:3]   # fewer classes than the head's 5 outputs, unequal shots
    support, queries = support_and_queries(root, classes, tmp_path)
    extra = root / classes[0] / sorted(os.listdir(root / classes[0]))[15]
    result = tmp_path / 'predictions.json'
    classify.main([str(run / 'best.pth'), str(queries), str(extra), '--support', str(support), '--json', str(result),
                   '--device', 'cpu'])
    predictions = json.loads(result.read_text())

    maml, fmt = Meta.from_checkpoint(run / 'best.pth'), checkpoint_format(ckpt)
    assert fmt.mean == tuple(ckpt['data']['format']['mean']), "the training cache's normalisation"
    scale, shift = fmt.normalizer('cpu')
    images = lambda paths: normalize(torch.from_numpy(np.stack([fmt.decode(p) for p in paths])), scale, shift)
    support_paths = [support / name / image for name in classes for image in sorted(os.listdir(support / name))]
    labels = torch.tensor([classes.index(p.parent.name) for p in support_paths])
    query_paths = [queries / name for name in sorted(os.listdir(queries))] + [extra]
    with torch.no_grad():   # 3 classes: the learned head's first 3 rows, in the loss and the prediction
        weights = maml.adapt(images(support_paths), labels, n_way=3)
        expected = maml.predict(images(query_paths), weights).softmax(-1)
    assert [p['path'] for p in predictions] == list(map(str, query_paths))
    got = torch.tensor([[p['probabilities'][name] for name in classes] for p in predictions])
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
    assert [p['class'] for p in predictions] == [classes[i] for i in expected.argmax(-1).tolist()]

    table = tmp_path / 'predictions.csv'
    classify.main([str(run / 'best.pth'), str(queries), str(extra), '--support', str(support), '--csv', str(table),
                   '--device', 'cpu'])
    with open(table) as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ['path', 'class', 'probability', *(f'p({name})' for name in classes)]
    assert [(r['path'], r['class']) for r in rows] == [(p['path'], p['class']) for p in predictions]


def test_classify_takes_a_support_folder_of_images_only_and_more_classes_with_a_proto_head(tiny_run, tmp_path,
                                                                                           capsys):
    """A benchmark's or a user's support set as files (support/cat.jpg, support/dog.jpg): each image a
    class named by its stem; eight of them, more than the learned head's 5 rows, with --head proto."""
    root, run, _ = tiny_run
    names = sorted(os.listdir(root))[:8]
    support, queries = tmp_path / 'support', tmp_path / 'queries'
    support.mkdir(), queries.mkdir()
    for name in names:
        first, second = sorted(os.listdir(root / name))[:2]
        os.symlink(root / name / first, support / f'{name}.jpg')
        os.symlink(root / name / second, queries / f'{name}.jpg')
    rows = classify.main([str(run / 'best.pth'), str(queries), '--support', str(support), '--head', 'proto',
                          '--device', 'cpu'])
    out, err = capsys.readouterr()
    assert 'holds images only, so each is a class of its own, named by its file\'s stem (one shot each)' in err
    assert 'from a proto head at test (trained with a learned one)' in out
    assert sorted(rows[0][3]) == sorted(names), 'eight classes, named by the support files'
    os.symlink(root / names[0] / sorted(os.listdir(root / names[0]))[3], support / f'{names[0]}.png')
    with pytest.raises(UserError, match=rf"{names[0]}\.jpg and {names[0]}\.png share one; rename one of them"):
        classify.main([str(run / 'best.pth'), str(queries), '--support', str(support), '--head', 'proto'])


def test_classify_refuses_bad_input_in_one_sentence(tiny_run, tmp_path):
    root, run, _ = tiny_run
    names = sorted(os.listdir(root))
    support, queries = support_and_queries(root, names[:6], tmp_path)
    clf = classify.FewShotClassifier(run / 'best.pth')
    with pytest.raises(UserError, match=r"learned head tells apart 5 classes, fewer than the 6 asked for; .*--head "
                                        r"zero or --head proto"):
        clf.adapt(support)
    with pytest.raises(UserError, match=r"the support set has 1 class; a task needs at least 2"):
        clf.adapt({names[0]: [root / names[0] / sorted(os.listdir(root / names[0]))[0]]})
    with pytest.raises(UserError, match=r"the support folder .*nowhere does not exist"):
        clf.adapt(tmp_path / 'nowhere')
    shutil.rmtree(support / names[5])
    clf.adapt(support)
    with pytest.raises(UserError, match=r"the query .*missing\.jpg does not exist"):
        clf.classify([tmp_path / 'missing.jpg'])
    broken = tmp_path / 'broken.png'
    broken.write_bytes(b'not a png')
    with pytest.raises(UserError, match=rf"cannot decode image {broken} \(cannot identify image file .*\); replace"):
        clf.classify([queries, broken])
    mixed = tmp_path / 'mixed'
    shutil.copytree(support, mixed)
    os.symlink(queries / sorted(os.listdir(queries))[0], mixed / 'loose.jpg')
    with pytest.raises(UserError, match=r"mixed holds images directly \(first: loose\.jpg\); put each class's images"):
        clf.adapt(mixed)
    from_a_notebook = tmp_path / 'notebook.pth'
    torch.save(Meta(omniglot_train.network(5, 28, 8), imgc=1, imgsz=28).checkpoint(), from_a_notebook)
    with pytest.raises(UserError, match=r"does not record the data set it was trained on .*; use one that folder_train"):
        classify.FewShotClassifier(from_a_notebook)


@pytest.mark.slow
def test_a_run_on_a_miniimagenet_folder_learns_and_best_pth_evaluates_to_its_report(tmp_path):
    """26 mini-ImageNet classes of real JPEGs as train/ val/ test/ class folders, trained with
    miniimagenet_train.py's quick settings: the folder path learns what the benchmark's does."""
    for split, n_classes in CLASSES.items():
        class_folders(tmp_path / 'data' / split, miniimagenet_classes(split, n_classes, PER_CLASS))
    save_dir = tmp_path / 'run'
    run = subprocess.run([sys.executable, os.path.join(REPO, 'folder_train.py'), '--data', str(tmp_path / 'data'),
                          '--save_dir', str(save_dir), '--cache_dir', str(tmp_path / 'cache'), *QUICK],
                         capture_output=True, text=True, timeout=1200)
    assert run.returncode == 0, run.stderr
    best = torch.load(save_dir / 'best.pth', weights_only=True)
    assert best['split'] == 'val' and best['data']['layout'] == 'folders' and best['hparams']['imgc'] == 3
    assert best['test_acc'] - best['test_ci'] > 0.21 and best['test_by_step'][0] < best['test_acc'], \
        f"test accuracy {best['test_acc']:.3f} after 300 steps; 5-way chance is 0.2"
    print(f'\nmini-ImageNet folder quick run: {run.stdout.strip().splitlines()[-1]}')   # pytest -s
    evaluated = subprocess.run([sys.executable, os.path.join(REPO, 'evaluate.py'), str(save_dir / 'best.pth'),
                                '--tasks', '100', '--json', str(tmp_path / 'result.json'), '--device', 'cpu'],
                               capture_output=True, text=True, timeout=600)
    assert evaluated.returncode == 0, evaluated.stderr
    report = json.loads((tmp_path / 'result.json').read_text())
    assert report['acc_by_step'][-1] == pytest.approx(best['test_acc'], abs=1e-9)
