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
tasks (up to DRAW_CHUNK) in one sample() call, bit for bit. pixel_norm='imagenet' (default, as in
the seed) normalises with the ImageNet mean and std; pixel_norm='unit' only divides by 255, as the
official MAML code does.
"""
import csv
import hashlib
import multiprocessing
import os
import re
import warnings

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from errors import DamagedError, FlagError, MissingError, RunError
from episodes import draw_tasks, set_generator_state, to_device
from scratch import remove_orphans

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
PIXEL_NORMS = ('imagenet', 'unit')
CSV_HEADER = ['filename', 'label']
LAYOUT_HELP = ("get the mini-ImageNet data (Ravi & Larochelle split; here the shared archive "
               "images_{train,val,test}.tar.gz plus its CSVs) and lay it out as in the MAML-Pytorch "
               "README: root/images/*.jpg and root/{train,val,test}.csv")
DECODE_CHUNK = 512      # most images per decoder job: enough that hand-offs cost little
DRAW_CHUNK = 1024       # tasks drawn at once when pre-drawing a Dataset, to bound the score tensor


def read_split(root, mode):
    """Read and check root/{mode}.csv against root/images/; the classes in order of first appearance.

    Returns a dict: class_names [n_classes], filenames (all images, grouped by class), counts
    [n_classes] (images per class), index_table [n_classes, max(counts)] (class, i) -> position in
    filenames (padded with 0 past a class's count), csv_sha (sha256 hex of the CSV bytes).
    """
    csv_path, image_dir = os.path.join(root, f'{mode}.csv'), os.path.join(root, 'images')
    if not os.path.isdir(root):
        raise MissingError(f"MiniImagenet root '{root}' does not exist; {LAYOUT_HELP}.")
    for path in (csv_path, image_dir):
        if not os.path.exists(path):
            raise MissingError(f"MiniImagenet root '{root}' has no {os.path.basename(path)}; "
                                    f"{LAYOUT_HELP}.")
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
                                f"{image_dir} (first: {', '.join(missing[:3])}); unpack "
                                f"images_{mode}.tar.gz so that root/images/ holds them.")
    counts = np.array([len(names) for names in by_class.values()], dtype=np.int64)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    slots = np.arange(counts.max() if len(counts) else 0)
    index_table = np.where(slots < counts[:, None], starts[:, None] + slots, 0)
    return {'class_names': list(by_class), 'counts': counts, 'index_table': index_table,
            'filenames': [os.path.join(image_dir, name) for names in by_class.values() for name in names],
            'csv_sha': hashlib.sha256(csv_bytes).hexdigest()}


def check_splits(root, tasks):
    """Fail before any decoding unless every split's CSV and images exist and each split can give
    its tasks: tasks maps a mode to (n_way, k_shot, k_query), e.g. {'train': (5, 1, 15), 'val':
    (5, 1, 1), 'test': (5, 1, 1)}, so that a run does not stop at its test split after training."""
    for mode, (n_way, k_shot, k_query) in tasks.items():
        check_task(read_split(root, mode), mode, n_way, k_shot, k_query)


def check_task(split, mode, n_way, k_shot, k_query):
    """Fail clearly when the split cannot give n_way-way tasks of k_shot + k_query images per class."""
    if n_way > len(split['class_names']):
        raise FlagError(f"n_way={n_way} is more than the {len(split['class_names'])} classes of "
                         f"{mode}.csv; lower n_way.")
    small = np.flatnonzero(split['counts'] < k_shot + k_query)
    if len(small):
        c = small[0]
        raise FlagError(f"class {split['class_names'][c]} of {mode}.csv has {split['counts'][c]} "
                         f"images, fewer than k_shot + k_query = {k_shot + k_query}; lower k_shot "
                         f"or k_query.")


def load_image(path, resize):
    """One image as uint8 [3, resize, resize], resized like the seed (PIL bilinear, antialiased)."""
    try:
        with Image.open(path) as im:
            im = im.convert('RGB')
            if im.size != (resize, resize):
                im = im.resize((resize, resize), Image.BILINEAR)
            return np.array(im).transpose(2, 0, 1)   # a writable copy, unlike np.asarray
    except OSError as e:    # PIL.UnidentifiedImageError and truncated files are OSErrors
        raise DamagedError(f"cannot decode image {path} ({e}); replace it with the file from the "
                           f"archive.") from None


def _decode_into(job):
    """Decode a job's images into its rows of the cache .npy being built; returns how many."""
    path, start, filenames, resize = job
    images = np.load(path, mmap_mode='r+')
    for i, filename in enumerate(filenames):
        images[start + i] = load_image(filename, resize)
    images.flush()
    return len(filenames)


def normalize(x, scale, shift):
    """uint8 images [..., 3, h, w] -> float32 (x / 255 - mean) / std, fused as x * scale + shift."""
    return torch.addcmul(shift, x.float(), scale)


def normalizer(pixel_norm, device):
    """(scale, shift) [3, 1, 1] on device for `normalize`: from the ImageNet mean and std
    ('imagenet'), or mean 0 and std 1, i.e. x / 255 only ('unit')."""
    if pixel_norm not in PIXEL_NORMS:
        raise FlagError(f"pixel_norm={pixel_norm!r} is not one of {', '.join(map(repr, PIXEL_NORMS))}; "
                        f"pick one of those.")
    mean, std = ((IMAGENET_MEAN, IMAGENET_STD) if pixel_norm == 'imagenet' else ((0.0,) * 3, (1.0,) * 3))
    mean, std = (torch.tensor(s, device=device).view(3, 1, 1) for s in (mean, std))
    return 1 / (255 * std), -mean / std


class MiniImagenet(torch.utils.data.Dataset):
    """batchsz tasks drawn once in __init__ from a seeded generator; images decoded per item."""

    def __init__(self, root, mode, batchsz, n_way, k_shot, k_query, resize=84, seed=0, pixel_norm='imagenet'):
        self.root, self.mode, self.resize = root, mode, resize
        self.batchsz, self.n_way, self.k_shot, self.k_query = batchsz, n_way, k_shot, k_query
        self.scale, self.shift = normalizer(pixel_norm, 'cpu')
        split = read_split(root, mode)
        check_task(split, mode, n_way, k_shot, k_query)
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


class MiniImagenetCache:
    """A split decoded once into root/cache/{mode}_{resize}_{csv sha}.npy; tasks sampled in batches.

    Tasks are drawn on the CPU (episodes.py: a seed gives the same tasks on every device). The
    uint8 images live on `device` when they fit (keep_on_device=None: on CUDA, under half its free
    memory; on CPU, always, in RAM), and the drawn indices are gathered there; otherwise (or with
    keep_on_device=False) the images stay in host memory, pinned for CUDA, and each batch is
    gathered on the host and copied with non_blocking=True.
    """

    def __init__(self, root, mode, resize=84, device='cpu', seed=0, cache_dir=None, num_workers=None,
                 keep_on_device=None, pixel_norm='imagenet'):
        self.root, self.mode, self.resize, self.device = root, mode, resize, torch.device(device)
        self.scale, self.shift = normalizer(pixel_norm, self.device)
        split = read_split(root, mode)
        cache_dir = cache_dir or os.path.join(root, 'cache')
        self.cache_path = os.path.join(cache_dir, f"{mode}_{resize}_{split['csv_sha'][:12]}.npy")
        shape = (len(split['filenames']), 3, resize, resize)
        images = self._load(shape)
        if images is None:
            self._build(split['filenames'], shape, num_workers or os.cpu_count() or 1)
            images = self._load(shape)
        self._place(images, split, seed, keep_on_device)

    @classmethod
    def synthetic(cls, n_classes=64, per_class=600, resize=84, device='cpu', seed=0):
        """A sampler over random pixels shaped like a split, for benchmarks: the same memory and
        sampling work as the real data, with no files."""
        counts = np.full(n_classes, per_class)
        split = {'class_names': [f'class{c}' for c in range(n_classes)], 'counts': counts,
                 'index_table': np.arange(n_classes * per_class).reshape(n_classes, per_class)}
        cache = cls.__new__(cls)
        cache.root, cache.mode, cache.resize, cache.device = None, 'synthetic', resize, torch.device(device)
        cache.scale, cache.shift = normalizer('imagenet', cache.device)
        images = np.random.default_rng(seed).integers(0, 256, (n_classes * per_class, 3, resize, resize), np.uint8)
        cache._place(images, split, seed, keep_on_device=None)
        return cache

    def _place(self, images, split, seed, keep_on_device):
        """Put the uint8 images [N, 3, r, r] where sampling will gather them (see the class doc)."""
        self.split, self.class_names, self.n_classes = split, split['class_names'], len(split['class_names'])
        self._checked_task = None
        if keep_on_device is None:
            keep_on_device = (self.device.type != 'cuda'
                              or images.nbytes < torch.cuda.mem_get_info(self.device)[0] / 2)
        self.on_device = keep_on_device
        self.images = self._to_torch(images, self.device if keep_on_device else torch.device('cpu'),
                                     pin=not keep_on_device and self.device.type == 'cuda')
        self.index_table = torch.from_numpy(split['index_table'])
        self.counts = torch.from_numpy(split['counts'])
        self.generator = torch.Generator()
        self.reset(seed)

    def _load(self, shape):
        """The cached array, memory-mapped; None when absent or of another shape (then rebuilt)."""
        if not os.path.exists(self.cache_path):
            return None
        images = np.load(self.cache_path, mmap_mode='r')
        return images if images.shape == shape and images.dtype == np.uint8 else None

    def _build(self, filenames, shape, num_workers):
        """Decode every image once into a tmp .npy, in worker processes, then rename it into place.

        Processes, not threads: on 84x84 JPEGs the per-image Python work holds the GIL, so threads
        were no faster than one, while 16 processes decode about 5x faster (16-core machine).
        """
        tmp_path = f'{self.cache_path}.tmp{os.getpid()}'
        try:
            os.makedirs(os.path.dirname(self.cache_path), exist_ok=True)
            build = re.escape(os.path.basename(self.cache_path)) + r'\.tmp(\d+)'   # each as large as the cache
            remove_orphans(os.path.dirname(self.cache_path), lambda name: (m := re.fullmatch(build, name)) and m[1])
            np.lib.format.open_memmap(tmp_path, mode='w+', dtype=np.uint8, shape=shape).flush()
            with open(tmp_path, 'r+b') as f:   # reserve the blocks now: a full disk is an error here,
                os.posix_fallocate(f.fileno(), 0, os.path.getsize(tmp_path))   # not a SIGBUS in a worker
        except OSError as e:
            if os.path.exists(tmp_path):
                os.remove(tmp_path)
            raise RunError(f"cannot write the image cache {self.cache_path} ({e}); free space there or pass "
                           f"cache_dir= a writable folder.") from None
        total = shape[0]
        # about 4 jobs per worker, so that a slow worker does not hold up the end
        chunk = max(1, min(DECODE_CHUNK, -(-total // (4 * num_workers))))
        jobs = [(tmp_path, start, filenames[start:start + chunk], self.resize)
                for start in range(0, total, chunk)]
        print(f"MiniImagenet {self.mode}: decoding {total} images at {self.resize}x{self.resize} "
              f"into {self.cache_path}", flush=True)
        pool, bar = None, tqdm(total=total, desc=f'decoding {self.mode}', unit='image', leave=False, disable=None)
        try:
            if min(num_workers, len(jobs)) > 1:
                with warnings.catch_warnings():
                    # Python 3.12+ warns on forking a multi-threaded process (torch's thread pools);
                    # the workers run only PIL and numpy, which take none of those threads' locks,
                    # and fork, unlike spawn, does not re-run a training script lacking a main guard
                    warnings.filterwarnings('ignore', r'This process .* is multi-threaded', DeprecationWarning)
                    pool = multiprocessing.get_context('fork').Pool(min(num_workers, len(jobs)))
            for count in pool.imap_unordered(_decode_into, jobs) if pool else map(_decode_into, jobs):
                bar.update(count)
            os.replace(tmp_path, self.cache_path)   # atomic: readers see a whole cache or none
        finally:
            bar.close()
            if pool:
                pool.terminate()                    # after a bad image, decode no further
            if os.path.exists(tmp_path):
                os.remove(tmp_path)

    @staticmethod
    def _to_torch(images, device, pin):
        """Copy the memory-mapped array to device (or pinned host memory) in slices, not all at once."""
        out = torch.empty(images.shape, dtype=torch.uint8, device=device, pin_memory=pin)
        for start in range(0, len(images), 4096):
            out[start:start + 4096] = torch.from_numpy(np.array(images[start:start + 4096]))
        return out

    def reset(self, seed):
        """Re-seed the sampler: the same seed gives the same sequence of batches (e.g. for evaluation)."""
        self.generator.manual_seed(seed)

    def state_dict(self):
        return {'generator': self.generator.get_state()}

    def load_state_dict(self, state):
        set_generator_state(self.generator, state['generator'], f'the mini-ImageNet {self.mode} task stream')

    def _gather(self, indices):
        """Images at indices [b, m] (CPU, or self.device when the images are there) -> normalised
        float32 [b, m, 3, r, r] on self.device."""
        if self.on_device:
            batch = self.images.index_select(0, indices.reshape(-1))
        else:
            batch = torch.empty((indices.numel(), *self.images.shape[1:]), dtype=torch.uint8,
                                pin_memory=self.images.is_pinned())
            torch.index_select(self.images, 0, indices.reshape(-1), out=batch)
            batch = batch.to(self.device, non_blocking=True)
        return normalize(batch, self.scale, self.shift).view(*indices.shape, *self.images.shape[1:])

    def sample(self, batchsz, n_way, k_shot, k_query, generator=None, return_classes=False):
        """batchsz tasks: x_spt [b, n_way*k_shot, 3, r, r], y_spt [b, n_way*k_shot], x_qry, y_qry.

        generator: a CPU torch.Generator, instead of the sampler's own.
        return_classes: also return classes [b, n_way], indices into class_names, label order (CPU).
        """
        if (n_way, k_shot, k_query) != self._checked_task:   # once per task shape, not every step
            check_task(self.split, self.mode, n_way, k_shot, k_query)
            self._checked_task = (n_way, k_shot, k_query)
        classes, support, y_spt, query, y_qry = draw_tasks(
            self.index_table, self.counts, batchsz, n_way, k_shot, k_query, generator or self.generator)
        if self.on_device:
            support, y_spt, query, y_qry = to_device((support, y_spt, query, y_qry), self.device)
        else:
            y_spt, y_qry = to_device((y_spt, y_qry), self.device)
        batch = (self._gather(support), y_spt, self._gather(query), y_qry)
        return (*batch, classes) if return_classes else batch
