"""
mini-ImageNet N-way K-shot episodes (Ravi & Larochelle split) for MAML, two ways.

    # the seed's interface: one task per item, JPEGs decoded per item (DataLoader workers help)
    db = MiniImagenet('miniimagenet', mode='train', batchsz=10000, n_way=5, k_shot=1, k_query=15,
                      resize=84, seed=0)
    loader = DataLoader(db, batch_size=4, shuffle=True, num_workers=4, pin_memory=True)
    for x_spt, y_spt, x_qry, y_qry in loader:   # x_spt: [4, n_way*k_shot, 3, 84, 84] float32
        ...                                       # y_spt: [4, n_way*k_shot] int64 in 0..n_way-1

    # the fast path: the split decoded once into a uint8 .npy cache, tasks gathered on the device
    check_splits('miniimagenet', {'train': (5, 1, 15), 'val': (5, 1, 1), 'test': (5, 1, 1)})  # before decoding
    cache = MiniImagenetCache('miniimagenet', mode='train', resize=84, device='cuda')
    x_spt, y_spt, x_qry, y_qry = cache.sample(4, n_way=5, k_shot=1, k_query=15)
    cache.reset(seed=0)                           # a fixed sequence of tasks, e.g. for evaluation
    *batch, classes = cache.sample(4, 5, 1, 15, return_classes=True)  # cache.class_names[classes]

root holds the layout of the MAML-Pytorch README: root/images/*.jpg (84x84 RGB) and
root/{train,val,test}.csv with the header `filename,label`. Both paths share the CSV checks, the
decoder, the normalisation and the task drawing: a CPU cache seeded like a Dataset gives its first
tasks (up to DRAW_CHUNK) in one sample() call, bit for bit. The cache and the sampler are
imagecache.py's, which folder.py uses for any folder of images. pixel_norm='imagenet' (default, as in
the seed) normalises with the ImageNet mean and std; pixel_norm='unit' only divides by 255, as the
official MAML code does.
"""
import csv
import hashlib
import os

import numpy as np
import torch

from errors import DamagedError, FlagError, MissingError
from episodes import draw_tasks
from imagecache import (UNREADABLE, ImageFormat, TaskSampler, cached_images, check_task, group_files, normalize,
                        place, undecodable)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
PIXEL_NORMS = ('imagenet', 'unit')
CSV_HEADER = ['filename', 'label']
LAYOUT_HELP = ("get the mini-ImageNet data (Ravi & Larochelle split; here the shared archive "
               "images_{train,val,test}.tar.gz plus its CSVs) and lay it out as in the MAML-Pytorch "
               "README: root/images/*.jpg and root/{train,val,test}.csv")
MISSING_HELP = "unpack images_{mode}.tar.gz so that root/images/ holds them"
DAMAGED_HELP = "replace it with the file from the archive"
DRAW_CHUNK = 1024       # tasks drawn at once when pre-drawing a Dataset, to bound the score tensor


def read_split(root, mode, layout_help=LAYOUT_HELP, missing_help=MISSING_HELP):
    """Read and check root/{mode}.csv against root/images/; the classes in order of first appearance.

    Returns a dict: class_names [n_classes], filenames (all images, grouped by class), counts
    [n_classes] (images per class), index_table [n_classes, max(counts)] (class, i) -> position in
    filenames (padded with 0 past a class's count), csv_sha (sha256 hex of the CSV bytes).
    The help texts say how to get the data (folder.py reads its own CSV layout with this).
    """
    csv_path, image_dir = os.path.join(root, f'{mode}.csv'), os.path.join(root, 'images')
    if not os.path.isdir(root):
        raise MissingError(f"MiniImagenet root '{root}' does not exist; {layout_help}.")
    for path in (csv_path, image_dir):
        if not os.path.exists(path):
            raise MissingError(f"MiniImagenet root '{root}' has no {os.path.basename(path)}; {layout_help}.")
    with open(csv_path, 'rb') as f:
        csv_bytes = f.read()
    rows = list(csv.reader(csv_bytes.decode('utf-8-sig').splitlines()))
    if not rows or [field.strip() for field in rows[0]] != CSV_HEADER:
        raise DamagedError(f"{csv_path} starts with {rows[0] if rows else 'nothing'}, not the header "
                           f"'filename,label'; use the split CSVs of the mini-ImageNet release.")
    by_class = {}
    for line, row in enumerate(rows[1:], start=2):
        if len(row) != 2:
            raise DamagedError(f"line {line} of {csv_path} has {len(row)} fields, not 2 "
                               f"(filename,label); fix or replace the CSV.")
        by_class.setdefault(row[1], []).append(row[0])
    present = set(os.listdir(image_dir))
    missing = [name for names in by_class.values() for name in names if name not in present]
    if missing:
        raise MissingError(f"{len(missing)} of the images listed in {csv_path} are missing from "
                           f"{image_dir} (first: {', '.join(missing[:3])}); {missing_help.format(mode=mode)}.")
    split = group_files({label: [os.path.join(image_dir, name) for name in names] for label, names in by_class.items()})
    return {**split, 'csv_sha': hashlib.sha256(csv_bytes).hexdigest()}


def check_splits(root, tasks):
    """Fail before any decoding unless every split's CSV and images exist and each split can give
    its tasks: tasks maps a mode to (n_way, k_shot, k_query), e.g. {'train': (5, 1, 15), 'val':
    (5, 1, 1), 'test': (5, 1, 1)}, so that a run does not stop at its test split after training."""
    for mode, (n_way, k_shot, k_query) in tasks.items():
        check_task(read_split(root, mode), f'{mode}.csv', n_way, k_shot, k_query)


def image_format(resize, pixel_norm='imagenet'):
    """How mini-ImageNet's images become the network's input: RGB, resized like the seed (PIL
    bilinear, antialiased), normalised by `pixel_norm`."""
    if pixel_norm not in PIXEL_NORMS:
        raise FlagError(f"pixel_norm={pixel_norm!r} is not one of {', '.join(map(repr, PIXEL_NORMS))}; "
                        f"pick one of those.")
    stats = (IMAGENET_MEAN, IMAGENET_STD) if pixel_norm == 'imagenet' else ((0.0,) * 3, (1.0,) * 3)
    return ImageFormat(3, resize, 'bilinear', *stats)


def load_image(path, resize):
    """One image as uint8 [3, resize, resize], resized like the seed (PIL bilinear, antialiased)."""
    try:
        return image_format(resize).decode(path)
    except UNREADABLE as e:   # PIL.UnidentifiedImageError and truncated files are OSErrors
        raise DamagedError(undecodable([(path, e)], 1, DAMAGED_HELP)) from None


def normalizer(pixel_norm, device):
    """(scale, shift) [3, 1, 1] on device for `normalize`: from the ImageNet mean and std
    ('imagenet'), or mean 0 and std 1, i.e. x / 255 only ('unit')."""
    return image_format(0, pixel_norm).normalizer(device)


class MiniImagenet(torch.utils.data.Dataset):
    """batchsz tasks drawn once in __init__ from a seeded generator; images decoded per item."""

    def __init__(self, root, mode, batchsz, n_way, k_shot, k_query, resize=84, seed=0, pixel_norm='imagenet'):
        self.root, self.mode, self.resize = root, mode, resize
        self.batchsz, self.n_way, self.k_shot, self.k_query = batchsz, n_way, k_shot, k_query
        self.scale, self.shift = normalizer(pixel_norm, 'cpu')
        split = read_split(root, mode)
        check_task(split, f'{mode}.csv', n_way, k_shot, k_query)
        self.class_names, self.filenames = split['class_names'], split['filenames']
        generator = torch.Generator().manual_seed(seed)
        index_table, counts = torch.from_numpy(split['index_table']), torch.from_numpy(split['counts'])
        chunks = [draw_tasks(index_table, counts, min(DRAW_CHUNK, batchsz - start), n_way, k_shot,
                             k_query, generator) for start in range(0, batchsz, DRAW_CHUNK)]
        (self.episode_classes, self.support_idx, self.support_y,
         self.query_idx, self.query_y) = (torch.cat(parts) for parts in zip(*chunks))

    def __len__(self):
        return self.batchsz

    def _images(self, indices):
        stacked = np.stack([load_image(self.filenames[i], self.resize) for i in indices.tolist()])
        return normalize(torch.from_numpy(stacked), self.scale, self.shift)

    def __getitem__(self, i):
        # clone: a view would carry the storage of all batchsz tasks through the DataLoader's pipes
        return (self._images(self.support_idx[i]), self.support_y[i].clone(),
                self._images(self.query_idx[i]), self.query_y[i].clone())


class MiniImagenetCache(TaskSampler):
    """A split decoded once into root/cache/{mode}_{resize}_{csv sha}.npy; tasks sampled in batches
    (imagecache.TaskSampler). The uint8 images live on `device` when they fit (keep_on_device=None:
    on CUDA, under half its free memory; on CPU, always, in RAM); otherwise (or with
    keep_on_device=False) they stay in host memory, pinned for CUDA, and each batch is gathered on
    the host and copied with non_blocking=True.
    """

    def __init__(self, root, mode, resize=84, device='cpu', seed=0, cache_dir=None, num_workers=None,
                 keep_on_device=None, pixel_norm='imagenet'):
        fmt = image_format(resize, pixel_norm)
        split = read_split(root, mode)
        cache_dir = cache_dir or os.path.join(root, 'cache')
        self.root, self.resize = root, resize
        self.cache_path = os.path.join(cache_dir, f"{mode}_{resize}_{split['csv_sha'][:12]}.npy")
        images = cached_images(split['filenames'], self.cache_path, fmt, num_workers, f'MiniImagenet {mode}',
                               DAMAGED_HELP)
        super().__init__(place(images, device, keep_on_device), split, fmt, device, seed, mode, 'mini-ImageNet',
                         f'{mode}.csv', on_device=keep_on_device)
