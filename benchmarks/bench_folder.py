"""
The folder loader (maml/folder.py) against mini-ImageNet's on the same images: how long a folder's
cache takes to build, and what a training step costs from each loader's sampler.

    python benchmarks/bench_folder.py data/miniimagenet                    # all 60,000 JPEGs as a folder
    python benchmarks/bench_folder.py data/miniimagenet --split val --steps 20

ROOT holds mini-ImageNet in the README's layout (images/ and the three split CSVs). The images of
--split ('all': of every split) are linked into one folder per class in a temporary folder outside
ROOT; then
  1. the folder's cache is built in a fresh temporary cache folder (every JPEG decoded once, in
     worker processes): wall time, and CPU time of this process and its workers;
  2. MiniImagenetCache of the first split is built (or loaded from ROOT/cache), and the folder's
     sampler of the same classes from the cache just built, normalised as mini-ImageNet's: both
     give the same batches for the same seed (checked);
  3. --steps training steps from each sampler as fit() runs them (sample the tasks, meta_loss,
     meta_update; miniimagenet_train.py's default task shape and network), one from each in turn
     after a warm-up step: the median wall and CPU ms per step, and of the sampling alone.
"""
import argparse
import os
import resource
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))   # the repository's modules
import miniimagenet_train
from maml.devices import device_name, tune_cpu
from maml.folder import ImageFolder, read_split
from maml.imagecache import miniimagenet_format
from maml.presets import MINIIMAGENET
from meta import Meta
from MiniImagenet import MiniImagenetCache


def cpu_seconds():
    """CPU time of this process and of its finished children (the cache's decoding workers)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def link_class_folders(root, modes, target):
    """target/<label>/<image> links to the images of the modes' CSVs; the number of images."""
    count = 0
    for mode in modes:
        split = read_split(root, mode)
        files = iter(split['filenames'])
        for label, n in zip(split['class_names'], split['counts']):
            os.makedirs(os.path.join(target, label))
            for _ in range(n):
                path = next(files)
                os.symlink(os.path.abspath(path), os.path.join(target, label, os.path.basename(path)))
                count += 1
    return count


def class_by_class(sampler):
    """The uint8 images of a sampler's classes, in the order of its classes and their files."""
    rows = [sampler.index_table[c, :n] for c, n in enumerate(sampler.counts.tolist())]
    return sampler.images[torch.cat(rows)]


def step_time(sampler, maml, hp):
    """Wall and CPU seconds of one training step drawn from `sampler`, as fit() takes it, and the
    wall seconds of its sampling alone."""
    wall, cpu = time.perf_counter(), time.process_time()
    batch = sampler.sample(hp['task_num'], hp['n_way'], hp['k_spt'], hp['k_qry'])
    sampled = time.perf_counter() - wall
    loss, _ = maml.meta_loss(*batch, track_steps=False)
    maml.meta_update(loss)
    return time.perf_counter() - wall, time.process_time() - cpu, sampled


def main():
    p = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    p.add_argument('root', help='mini-ImageNet: images/ and train.csv, val.csv, test.csv')
    p.add_argument('--split', default='all', choices=['all', 'train', 'val', 'test'],
                   help="the images to arrange as a folder ('all': the 60,000)")
    p.add_argument('--imgsz', type=int, default=MINIIMAGENET['imgsz'])
    p.add_argument('--steps', type=int, default=10, help='training steps timed per sampler, alternating')
    p.add_argument('--threads', type=int, default=1,
                   help='CPU threads; 1 by default, so that CPU time counts work, not threads waiting for each other')
    args = p.parse_args()
    tune_cpu()
    torch.set_num_threads(args.threads)
    modes = ['train', 'val', 'test'] if args.split == 'all' else [args.split]
    print(f'{device_name("cpu")}, torch {torch.__version__}, {os.cpu_count()} CPUs', flush=True)
    with tempfile.TemporaryDirectory() as scratch:
        images = os.path.join(scratch, 'images')
        n = link_class_folders(args.root, modes, images)
        fmt = miniimagenet_format(args.imgsz)   # mini-ImageNet's normalisation, so that both give the same tensors
        wall, cpu = time.perf_counter(), cpu_seconds()
        folder = ImageFolder(images, os.path.join(scratch, 'cache'))
        classes = read_split(args.root, modes[0])['class_names']
        samplers, fmt = folder.samplers({'train': classes}, fmt, 'cpu')
        wall, cpu = time.perf_counter() - wall, cpu_seconds() - cpu
        print(f'folder cache of {n} images ({len(folder.parts["all"])} class folders) at {fmt.describe()}: '
              f'{wall:.1f} s wall, {cpu:.1f} s CPU ({n / wall:.0f} images/s)', flush=True)

        wall, cpu = time.perf_counter(), cpu_seconds()
        mini = MiniImagenetCache(args.root, modes[0], resize=args.imgsz)
        print(f'MiniImagenetCache {modes[0]} ({len(mini.images)} images; built or loaded): '
              f'{time.perf_counter() - wall:.1f} s wall, {cpu_seconds() - cpu:.1f} s CPU', flush=True)
        loaders = {'miniimagenet': mini, 'folder': samplers['train']}
        hp = MINIIMAGENET
        shape = (hp['task_num'], hp['n_way'], hp['k_spt'], hp['k_qry'])
        same = [a.sample(*shape, generator=torch.Generator().manual_seed(1)) for a in loaders.values()]
        print(f'the same pixels in both: {torch.equal(mini.images, class_by_class(samplers["train"]))}; the same '
              f'batches for the same seed: {all(torch.equal(a, b) for a, b in zip(*same))}', flush=True)

        torch.manual_seed(0)
        maml = Meta(miniimagenet_train.network(hp['n_way'], args.imgsz, hp['num_filters']), imgc=3, imgsz=args.imgsz,
                    update_lr=hp['update_lr'], update_step=hp['update_step'])
        times = {name: [] for name in loaders}
        for name, sampler in loaders.items():
            step_time(sampler, maml, hp)   # warm-up
        for i in range(args.steps):   # one step each, in turn, the order swapped every pair: a changing load hits both
            for name in sorted(loaders, reverse=i % 2 == 1):
                times[name].append(step_time(loaders[name], maml, hp))
        print(f"medians (fastest) of {args.steps} steps; {hp['task_num']} tasks of {hp['n_way']}-way "
              f"{hp['k_spt']}-shot, {hp['k_qry']} queries, {hp['update_step']} inner steps:")
        for name, measured in times.items():
            wall, cpu, sampled = ([t[i] for t in measured] for i in range(3))
            ms = lambda values: f'{1e3 * statistics.median(values):.0f} ({1e3 * min(values):.0f})'
            print(f"{name:12s} sampler: {ms(wall)} ms/step wall, {ms(cpu)} ms/step CPU, of which sampling "
                  f"{1e3 * statistics.median(sampled):.1f} ({1e3 * min(sampled):.1f}) ms wall", flush=True)


if __name__ == '__main__':
    main()
