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
maml/imagecache.py's, which maml/folder.py uses for any folder of images. pixel_norm='imagenet' (default, as in
the seed) normalises with the ImageNet mean and std; pixel_norm='unit' only divides by 255, as the
official MAML code does.
"""
import os

import numpy as np
import torch

from maml.episodes import draw_tasks
from maml.errors import DamagedError
from maml.folder import read_split
from maml.imagecache import (
    UNREADABLE,
    TaskSampler,
    cached_images,
    check_task,
    miniimagenet_format,
    normalize,
    place,
    undecodable,
)

DAMAGED_HELP = "replace it with the file from the archive"
DRAW_CHUNK = 1024       # tasks drawn at once when pre-drawing a Dataset, to bound the score tensor


def check_splits(root, tasks):
    """Fail before any decoding unless every split's CSV and images exist and each split can give
    its tasks: tasks maps a mode to (n_way, k_shot, k_query), e.g. {'train': (5, 1, 15), 'val':
    (5, 1, 1), 'test': (5, 1, 1)}, so that a run does not stop at its test split after training."""
    for mode, (n_way, k_shot, k_query) in tasks.items():
        check_task(read_split(root, mode), f'{mode}.csv', n_way, k_shot, k_query)


def load_image(path, resize):
    """One image as uint8 [3, resize, resize], resized like the seed (PIL bilinear, antialiased)."""
    try:
        return miniimagenet_format(resize).decode(path)
    except UNREADABLE as e:   # PIL.UnidentifiedImageError and truncated files are OSErrors
        raise DamagedError(undecodable([(path, e)], 1, DAMAGED_HELP)) from None


def normalizer(pixel_norm, device):
    """(scale, shift) [3, 1, 1] on device for `normalize`: from the ImageNet mean and std
    ('imagenet'), or mean 0 and std 1, i.e. x / 255 only ('unit')."""
    return miniimagenet_format(0, pixel_norm).normalizer(device)


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
        fmt = miniimagenet_format(resize, pixel_norm)
        split = read_split(root, mode)
        cache_dir = cache_dir or os.path.join(root, 'cache')
        self.root, self.resize = root, resize
        self.cache_path = os.path.join(cache_dir, f"{mode}_{resize}_{split['csv_sha'][:12]}.npy")
        images = cached_images(split['filenames'], self.cache_path, fmt, num_workers, f'MiniImagenet {mode}',
                               DAMAGED_HELP)
        super().__init__(place(images, device, keep_on_device), split, fmt, device, seed, mode, 'mini-ImageNet',
                         f'{mode}.csv', on_device=keep_on_device)
