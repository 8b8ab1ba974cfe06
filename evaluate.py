"""
Evaluate a saved MAML checkpoint on the test split: accuracy after each fine-tuning step as
mean +- 95% confidence interval over many tasks. The model and the data settings come from the
checkpoint alone; flags change the evaluation protocol.

    python evaluate.py checkpoints/best.pth                          # 600 test tasks, as trained
    python evaluate.py checkpoints/best.pth --tasks 2000 --update_step_test 10 --json result.json
    python evaluate.py checkpoints/best.pth --k_spt 5 --k_qry_test 5 # another shot count, same model
    python evaluate.py checkpoints/best.pth --ensemble 5             # top-5 checkpoints of its run (MAML++)
    python evaluate.py checkpoints/best.pth --data ~/cub             # another data set's classes

With the default --seed the tasks are those of the training script's final report, so a run's
best.pth gives the test_acc it stored. --data FOLDER evaluates any checkpoint on another data set
(cross-domain, e.g. mini-ImageNet models on CUB): the classes of FOLDER's test/ or test.csv, else
all its classes, converted to the checkpoint's channels, size and normalisation (maml/folder.py).
--ensemble K averages the query-set class probabilities of the K best ranked checkpoints
(maml_step*_acc*.pth) in the checkpoint's folder, each fine-tuned on the support set, as MAML++
reports its results.
"""
import argparse
import json
import os
import sys

import torch

import miniimagenet_train
import omniglot_train
from maml.checkpoints import RANKED, load_checkpoint, portable_path
from maml.devices import available_device, device_name, tune
from maml.errors import FlagError, MissingError
from maml.family import TEST_HEADS
from maml.flags import HelpFormatter
from maml.folder import ImageFolder, checkpoint_format
from maml.presets import DEFAULTS
from maml.trainer import EVAL_SEED, evaluate, format_accs, mean_ci, run_main
from meta import Meta
from MiniImagenet import MiniImagenetCache
from omniglotNShot import holds_omniglot

DATA_ROOTS = {'omniglot': omniglot_train.DATA_ROOT, 'miniimagenet': miniimagenet_train.DATA_ROOT}


def task_sampler(settings, ckpt, path, device, split):
    """next_batch() over a fixed, seeded sequence of `split` tasks, and a phrase saying whose:
    the checkpoint's data set, or a folder of images (maml/folder.py) when it was trained on one or
    --data names one that its own data set's loader does not read."""
    n_way, k_spt, k_qry = settings.n_way, settings.k_spt, settings.k_qry_test
    if settings.dataset == 'folder' or settings.data_given and not own_data(settings.dataset, settings.data, split):
        return folder_sampler(settings, ckpt, path, device, split)
    if settings.dataset == 'omniglot':
        # the training script draws its evaluation tasks task_num at a time: the same draw gives the same tasks
        # the training-time k_qry plays no part here: only the evaluation's counts are checked
        db = omniglot_train.make_loader(argparse.Namespace(**{**vars(settings), 'k_qry': k_qry}), device)
        return (omniglot_train.fixed_tasks(db, split, k_qry, settings.seed),
                f'the Omniglot {split} characters in {settings.data}')
    cache = MiniImagenetCache(settings.data, split, resize=settings.imgsz, device=device,
                              pixel_norm=settings.pixel_norm)
    return (miniimagenet_train.fixed_tasks(cache, n_way, k_spt, k_qry, settings.seed),
            f'the mini-ImageNet {split}.csv of {settings.data}')


def own_data(dataset, root, split):
    """Whether root holds the data set `dataset` in the layout its loader reads."""
    if dataset == 'omniglot':
        return holds_omniglot(root)
    return os.path.isdir(os.path.join(root, 'images')) and os.path.isfile(os.path.join(root, f'{split}.csv'))


def folder_sampler(settings, ckpt, path, device, split):
    """Tasks of a folder's classes, decoded to the checkpoint's channels, size and pixels: the
    classes the checkpoint stores for `split` (a folder run's, where --data, if given, holds them
    all), else the folder's own split (split/ or split.csv) or all its classes."""
    stored, classes = ckpt.get('data'), None
    root = settings.data if settings.data_given or not stored else stored['root']   # absolute, wherever this runs
    if not os.path.isdir(root):
        raise MissingError(f"the folder {root} that {path} was trained on is not on this machine; pass "
                           f"--data where it is now.")
    folder = ImageFolder(root, settings.cache_dir)
    if stored:
        try:
            classes = folder.stored({split: stored['classes'][split]}, stored['layout'], path)[split]
            which = f"the {len(classes)} {split} classes that {path} was trained with, in {folder.root}"
        except MissingError:
            if not settings.data_given:   # the checkpoint's own folder: its classes must be there
                raise
    if classes is None:
        classes, which = folder.evaluation_classes(split)
    usable = folder.usable({split: classes}, {split: (settings.n_way, settings.k_spt, settings.k_qry_test)})
    samplers, _ = folder.samplers(usable, checkpoint_format(ckpt), device)
    return miniimagenet_train.fixed_tasks(samplers[split], settings.n_way, settings.k_spt, settings.k_qry_test,
                                          settings.seed), which


def settings_of(ckpt, path, flags):
    """The checkpoint's training flags, overridden by the evaluation flags given."""
    saved = ckpt.get('args')
    if not saved or 'dataset' not in saved:
        raise FlagError(f"{path} does not record the data set and flags it was trained with (it was not "
                        f"written by a training script of this version); evaluate it from a notebook instead.")
    settings = argparse.Namespace(**{'cache_dir': None, **DEFAULTS[saved['dataset']], **saved})
    settings.k_qry_test = settings.k_qry_test or settings.k_qry
    for name in ('data', 'n_way', 'k_spt', 'k_qry_test', 'update_step_test', 'seed', 'cache_dir'):
        if getattr(flags, name) is not None:
            setattr(settings, name, getattr(flags, name))
    settings.data_given = flags.data is not None
    if flags.data is None and not os.path.exists(settings.data) and settings.dataset in DATA_ROOTS:   # another machine
        settings.data = DATA_ROOTS[settings.dataset]
    return settings


def load_model(ckpt, settings, head):
    """The checkpoint's Meta, set to fine-tune for settings.update_step_test steps on settings.n_way-way
    tasks with `head` (None: the one it was trained with)."""
    maml = Meta.from_state(ckpt).serve(settings.n_way, head)
    maml.update_step_test = settings.update_step_test
    return maml


def checkpoint_step(ckpt):
    """'step 37,000 of 60,000', and which checkpoint of its run that is when the file says."""
    step, epoch = ckpt.get('step'), (ckpt.get('args') or {}).get('epoch')
    if step is None:
        return 'no step recorded'
    text = f'step {step:,}' + (f' of {epoch:,}' if epoch else '')
    if ckpt.get('rule') == 'validation':
        return text + ', chosen on validation'
    return text + (", the run's final step" if step == epoch else '')


def describe_head(maml, ckpt):
    """'learned head', or 'proto head (at test; trained with a learned one)'."""
    trained = ckpt['hparams'].get('head', 'learned')
    return f'{maml.head} head' + (f' (at test; trained with a {trained} one)' if maml.head != trained else '')


def ensemble_members(path, k):
    """The k best ranked checkpoints of the run folder holding `path`."""
    folder = os.path.dirname(os.path.abspath(path))
    ranked = sorted(((float(m[2]), name) for name in os.listdir(folder) if (m := RANKED.match(name))), reverse=True)
    if len(ranked) < k:
        raise FlagError(f"--ensemble {k} needs {k} ranked checkpoints (maml_step*_acc*.pth) in {folder}, "
                        f"which holds {len(ranked)}; lower --ensemble or raise --keep when training.")
    return [os.path.join(folder, name) for _, name in ranked[:k]]


def ensemble_accuracy(members, next_batch, n_tasks):
    """Accuracies [n_tasks] of the averaged query-set probabilities of `members`."""
    accs, n = [], 0
    while n < n_tasks:
        x_spt, y_spt, x_qry, y_qry = next_batch()
        probs = torch.stack([m.query_probabilities(x_spt, y_spt, x_qry) for m in members]).mean(0)
        accs.append((probs.argmax(-1) == y_qry).float().mean(-1))
        n += len(accs[-1])
    return torch.cat(accs)[:n_tasks].cpu()


def build_parser():
    p = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0], allow_abbrev=False,
                                formatter_class=HelpFormatter)
    p.add_argument('checkpoint', help='a .pth written by omniglot_train.py, miniimagenet_train.py or folder_train.py')
    p.add_argument('--data', help="data root (default: the checkpoint's, else the training script's DATA_ROOT); "
                                  "a folder of images that is not the checkpoint's data set: its test/ or test.csv "
                                  "classes, else all its classes, converted to the checkpoint's images")
    p.add_argument('--cache_dir', help="where a folder's decoded images are cached (default: the checkpoint's, "
                                       "else ~/.cache/maml-pytorch/folders)")
    p.add_argument('--split', default='test', choices=['test', 'val'], help='split to evaluate on')
    p.add_argument('--tasks', type=int, default=600, help='tasks to average over')
    p.add_argument('--n_way', type=int, help="classes per task (default: the checkpoint's; more than a learned head's "
                                             "rows with --head zero or proto)")
    p.add_argument('--head', choices=TEST_HEADS, help="adapt from this head instead of the checkpoint's own: zero or "
                                                     "proto serve any --n_way, also with a learned head's checkpoint")
    p.add_argument('--k_spt', type=int, help="support images per class (default: the checkpoint's)")
    p.add_argument('--k_qry_test', type=int, help="query images per class (default: the checkpoint's)")
    p.add_argument('--update_step_test', type=int, help="fine-tuning steps (default: the checkpoint's)")
    p.add_argument('--seed', type=int, default=EVAL_SEED,
                   help="seed of the task sequence (the default gives the training script's final report)")
    p.add_argument('--ensemble', type=int, default=1, help='average the top-K ranked checkpoints of the run')
    p.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu', help='torch device')
    p.add_argument('--json', help='also write the result to this JSON file')
    return p


def main(argv=None):
    flags = build_parser().parse_args(argv)
    if flags.tasks < 2:
        raise FlagError(f"--tasks {flags.tasks} gives no confidence interval; use at least 2 (the paper: 600).")
    device = available_device(flags.device)
    tune(device)
    ckpt = load_checkpoint(flags.checkpoint, map_location=device)
    settings = settings_of(ckpt, flags.checkpoint, flags)
    maml = load_model(ckpt, settings, flags.head)
    next_batch, which = task_sampler(settings, ckpt, flags.checkpoint, device, flags.split)
    images = 'image' if settings.k_qry_test == 1 else 'images'
    shape = f'{settings.n_way}-way {settings.k_spt}-shot, {settings.k_qry_test} query {images} per class'
    print(f'{flags.checkpoint} ({checkpoint_step(ckpt)}): {settings.dataset} {shape}, {flags.tasks} {flags.split} '
          f'tasks, seed {settings.seed}, {device_name(device)}, torch {torch.__version__}\n'
          f'data: {which}, as {checkpoint_format(ckpt).describe()}; {describe_head(maml, ckpt)}')
    if flags.ensemble > 1:
        members = [load_model(load_checkpoint(path, map_location=device), settings, flags.head)
                   for path in ensemble_members(flags.checkpoint, flags.ensemble)]
        accs = ensemble_accuracy(members, next_batch, flags.tasks)[:, None]
    else:
        accs = evaluate(maml, next_batch, flags.tasks, desc=f'{flags.split} tasks')
    mean, half = mean_ci(accs)
    what = f'ensemble of {flags.ensemble}' if flags.ensemble > 1 else f'by step: {format_accs(mean)}'
    print(f'{flags.split} acc {100 * mean[-1]:.2f} +- {100 * half[-1]:.2f}% after {settings.update_step_test} '
          f'steps  ({what})')
    if flags.json:
        result = dict(checkpoint=flags.checkpoint, dataset=settings.dataset, data=portable_path(settings.data),
                      classes=portable_path(which), split=flags.split, tasks=flags.tasks, head=maml.head,
                      trained_head=ckpt['hparams'].get('head', 'learned'), n_way=settings.n_way, k_spt=settings.k_spt,
                      k_qry_test=settings.k_qry_test,
                      update_step_test=settings.update_step_test, seed=settings.seed, ensemble=flags.ensemble,
                      preset=getattr(settings, 'preset', None), checkpoint_step=ckpt.get('step'),
                      checkpoint_of=(ckpt.get('args') or {}).get('epoch'),
                      selected_on=ckpt.get('split'), selection_acc=ckpt.get('acc'),
                      acc_by_step=[float(m) for m in mean], ci_by_step=[float(h) for h in half],
                      device=device_name(device), torch=torch.__version__)
        with open(flags.json, 'w') as f:
            json.dump(result, f, indent=1)
    return mean, half


if __name__ == '__main__':
    run_main(lambda: main(sys.argv[1:]))
