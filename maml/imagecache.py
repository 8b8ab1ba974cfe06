"""
Images decoded once into a uint8 cache and N-way K-shot tasks sampled from it: the machinery that
mini-ImageNet (MiniImagenet.py) and any folder of images (folder.py) share.

    fmt = ImageFormat(channels=3, size=84, resample='bilinear', mean=IMAGENET_MEAN, std=IMAGENET_STD)
    part = group_files({'cat': ['cat/1.jpg', ...], 'dog': [...]})   # filenames, counts, index_table
    images = cached_images(part['filenames'], 'cache/all.npy', fmt)  # decoded once, memory-mapped
    store = place(images, device)                  # on the device, or pinned host memory if it does not fit
    tasks = TaskSampler(store, select(part, ['cat', 'dog']), fmt, device, seed=0, mode='test', what='folder')
    x_spt, y_spt, x_qry, y_qry = tasks.sample(4, n_way=2, k_shot=1, k_query=15)

An ImageFormat says how a file becomes the network's input: channels (1 or 3), the side in pixels,
the resampling, and the per-channel mean and std (of x / 255) that normalise it. Resampling:
'bilinear' converts to grey or RGB and resizes with PIL's antialiased bilinear filter (the seed's
mini-ImageNet decoding); 'binary' is Omniglot's official preprocessing: a 1-bit image (others are
thresholded at 128 first) resized by nearest neighbour and inverted, so ink is 255 on 0; 'lanczos'
is the seed's Omniglot decoding, grey with an antialiased LANCZOS resize. 16-bit grey images (TIFF,
PNG) are scaled to 8 bits first. A file that cannot be decoded does not stop a cache's build: all
of them are named at its end, counted, with the first few paths.
"""
import multiprocessing
import os
import re
import warnings
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from .episodes import draw_tasks, set_generator_state, to_device
from .errors import DamagedError, FlagError, RunError
from .scratch import remove_orphans

RESAMPLING = ('bilinear', 'binary', 'lanczos')
OMNIGLOT_RESAMPLING = {'official': 'binary', 'greyscale': 'lanczos'}   # omniglotNShot's --preprocess choices
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
PIXEL_NORMS = ('imagenet', 'unit')   # mini-ImageNet's --pixel_norm choices
# what PIL raises on a file that is not an image, or is cut short or damaged
UNREADABLE = (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError)
DECODE_CHUNK = 512      # most images per decoder job: enough that hand-offs cost little
SHOWN = 3               # paths named in a message about many files


class ImageFormat(NamedTuple):
    channels: int
    size: int
    resample: str = 'bilinear'
    mean: tuple = (0.0,)
    std: tuple = (1.0,)

    def decode(self, path):
        """The image at path as uint8 [channels, size, size]; PIL's exception when it cannot be read."""
        with Image.open(path) as im:
            if im.mode.startswith('I'):   # 16- or 32-bit integer grey: 0..65535 to 0..255
                im = Image.fromarray((np.clip(np.asarray(im), 0, 65535) / 257).round().astype(np.uint8))
            elif im.mode == 'P' and 'transparency' in im.info:
                im = im.convert('RGBA')   # what PIL asks for before such a palette becomes RGB or grey
            if self.resample == 'binary':
                if im.mode != '1':
                    im = im.convert('L').convert('1', dither=Image.Dither.NONE)
                # PIL resizes a 1-bit image by nearest neighbour whatever filter is asked (Omniglot's
                # official code asks for LANCZOS), so it stays binary
                pixels = 255 - np.asarray(im.resize((self.size, self.size), Image.NEAREST).convert('L'))
            elif self.resample == 'lanczos':
                pixels = np.asarray(im.convert('L').resize((self.size, self.size), Image.LANCZOS))
            else:
                im = im.convert('L' if self.channels == 1 else 'RGB')
                if im.size != (self.size, self.size):
                    im = im.resize((self.size, self.size), Image.BILINEAR)
                pixels = np.asarray(im)
        if pixels.ndim == 2:
            pixels = np.repeat(pixels[None], self.channels, axis=0)
        else:
            pixels = pixels.transpose(2, 0, 1)
        return np.ascontiguousarray(pixels)   # a writable copy, unlike np.asarray of an image

    def normalizer(self, device):
        """(scale, shift) [channels, 1, 1] on device for `normalize`: (x / 255 - mean) / std."""
        mean, std = (torch.tensor(s, dtype=torch.float32, device=device).view(-1, 1, 1) for s in (self.mean, self.std))
        return 1 / (255 * std), -mean / std

    def describe(self):
        return f"{'grey' if self.channels == 1 else 'RGB'} {self.size}x{self.size} ({self.resample})"


def miniimagenet_format(resize, pixel_norm='imagenet'):
    """How mini-ImageNet's images become the network's input: RGB, resized like the seed (PIL
    bilinear, antialiased), normalised by `pixel_norm`."""
    if pixel_norm not in PIXEL_NORMS:
        raise FlagError(f"pixel_norm={pixel_norm!r} is not one of {', '.join(map(repr, PIXEL_NORMS))}; "
                        f"pick one of those.")
    stats = (IMAGENET_MEAN, IMAGENET_STD) if pixel_norm == 'imagenet' else ((0.0,) * 3, (1.0,) * 3)
    return ImageFormat(3, resize, 'bilinear', *stats)


def normalize(x, scale, shift):
    """uint8 images [..., c, h, w] -> float32 (x / 255 - mean) / std, fused as x * scale + shift."""
    return torch.addcmul(shift, x.float(), scale)


def undecodable(failures, total, fix):
    """The sentence for images that cannot be decoded: failures is a list of (path, reason)."""
    if len(failures) == 1:
        (path, reason), = failures
        return f"cannot decode image {path} ({reason}); {fix}."
    shown = ', '.join(f'{path} ({reason})' for path, reason in failures[:SHOWN])
    return f"cannot decode {len(failures)} of the {total} images (first: {shown}); {fix}."


def group_files(files_by_class):
    """A part of a data set from {class name: [files]}: class_names [n], filenames (all images, grouped
    by class), counts [n] and index_table [n, max(counts)] (class, i) -> position in filenames, padded with 0."""
    counts = np.array([len(files) for files in files_by_class.values()], dtype=np.int64)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    slots = np.arange(counts.max() if len(counts) else 0)
    return {'class_names': list(files_by_class), 'counts': counts,
            'index_table': np.where(slots < counts[:, None], starts[:, None] + slots, 0),
            'filenames': [f for files in files_by_class.values() for f in files]}


def select(part, class_names):
    """The classes `class_names` of a part, as a split to sample from (positions stay the part's)."""
    row = {name: i for i, name in enumerate(part['class_names'])}
    rows = [row[name] for name in class_names]
    counts = part['counts'][rows]
    return {'class_names': list(class_names), 'counts': counts,
            'index_table': part['index_table'][rows][:, :counts.max() if len(counts) else 0]}


def check_task(split, where, n_way, k_shot, k_query):
    """Fail clearly when the split cannot give n_way-way tasks of k_shot + k_query images per class."""
    if n_way > len(split['class_names']):
        raise FlagError(f"n_way={n_way} is more than the {len(split['class_names'])} classes of {where}; lower n_way.")
    small = np.flatnonzero(split['counts'] < k_shot + k_query)
    if len(small):
        c = small[0]
        raise FlagError(f"class {split['class_names'][c]} of {where} has {split['counts'][c]} images, fewer than "
                        f"k_shot + k_query = {k_shot + k_query}; lower k_shot or k_query.")


def _decode_into(job):
    """Decode a job's images into its rows of the cache .npy being built; returns how many, and the
    (position, path, reason) of those that cannot be decoded (their rows stay 0)."""
    path, start, filenames, fmt = job
    images, failures = np.load(path, mmap_mode='r+'), []
    for i, filename in enumerate(filenames):
        try:
            images[start + i] = fmt.decode(filename)
        except UNREADABLE as e:
            failures.append((start + i, filename, str(e) or type(e).__name__))
    images.flush()
    return len(filenames), failures


def cached_images(filenames, cache_path, fmt, num_workers=None, what='images', fix='replace them'):
    """uint8 [len(filenames), channels, size, size]: the cache at cache_path, memory-mapped, or else
    every file decoded once into it. `what` names the images in the progress line, `fix` says what
    to do about files that cannot be decoded."""
    shape = (len(filenames), fmt.channels, fmt.size, fmt.size)
    if os.path.exists(cache_path):
        images = np.load(cache_path, mmap_mode='r')
        if images.shape == shape and images.dtype == np.uint8:
            return images
    _build(filenames, cache_path, shape, fmt, num_workers or os.cpu_count() or 1, what, fix)
    return np.load(cache_path, mmap_mode='r')


def _build(filenames, cache_path, shape, fmt, num_workers, what, fix):
    """Decode every image once into a tmp .npy, in worker processes, then rename it into place.

    Processes, not threads: on 84x84 JPEGs the per-image Python work holds the GIL, so threads
    were no faster than one, while 16 processes decode about 5x faster (16-core machine).
    """
    tmp_path = f'{cache_path}.tmp{os.getpid()}'
    try:
        os.makedirs(os.path.dirname(cache_path), exist_ok=True)
        build = re.escape(os.path.basename(cache_path)) + r'\.tmp(\d+)'   # each as large as the cache
        remove_orphans(os.path.dirname(cache_path), lambda name: (m := re.fullmatch(build, name)) and m[1])
        np.lib.format.open_memmap(tmp_path, mode='w+', dtype=np.uint8, shape=shape).flush()
        with open(tmp_path, 'r+b') as f:   # reserve the blocks now: a full disk is an error here,
            os.posix_fallocate(f.fileno(), 0, os.path.getsize(tmp_path))   # not a SIGBUS in a worker
    except OSError as e:
        if os.path.exists(tmp_path):
            os.remove(tmp_path)
        raise RunError(f"cannot write the image cache {cache_path} ({e}); free space there or pass "
                       f"cache_dir= a writable folder.") from None
    total = shape[0]
    # about 4 jobs per worker, so that a slow worker does not hold up the end
    chunk = max(1, min(DECODE_CHUNK, -(-total // (4 * num_workers))))
    jobs = [(tmp_path, start, filenames[start:start + chunk], fmt) for start in range(0, total, chunk)]
    print(f"{what}: decoding {total} images to {fmt.describe()} into {cache_path}", flush=True)
    pool, failures = None, []
    bar = tqdm(total=total, desc=f'decoding {what}', unit='image', leave=False, disable=None)
    try:
        if min(num_workers, len(jobs)) > 1:
            with warnings.catch_warnings():
                # Python 3.12+ warns on forking a multi-threaded process (torch's thread pools);
                # the workers run only PIL and numpy, which take none of those threads' locks,
                # and fork, unlike spawn, does not re-run a training script lacking a main guard
                warnings.filterwarnings('ignore', r'This process .* is multi-threaded', DeprecationWarning)
                pool = multiprocessing.get_context('fork').Pool(min(num_workers, len(jobs)))
        for count, failed in pool.imap_unordered(_decode_into, jobs) if pool else map(_decode_into, jobs):
            bar.update(count)
            failures += failed
        if failures:
            raise DamagedError(undecodable([(path, reason) for _, path, reason in sorted(failures)], total, fix))
        os.replace(tmp_path, cache_path)   # atomic: readers see a whole cache or none
    finally:
        bar.close()
        if pool:
            pool.terminate()
        if os.path.exists(tmp_path):
            os.remove(tmp_path)


def place(images, device, keep_on_device=None):
    """The uint8 images as a torch tensor where sampling gathers them: on `device` when they fit
    (keep_on_device=None: on CUDA, under half its free memory; on the CPU, always, in RAM), else in
    host memory, pinned for CUDA. Copied from the memory-mapped array in slices, not all at once."""
    device = torch.device(device)
    if keep_on_device is None:
        keep_on_device = device.type != 'cuda' or images.nbytes < torch.cuda.mem_get_info(device)[0] / 2
    out = torch.empty(images.shape, dtype=torch.uint8, device=device if keep_on_device else 'cpu',
                      pin_memory=not keep_on_device and device.type == 'cuda')
    for start in range(0, len(images), 4096):
        out[start:start + 4096] = torch.from_numpy(np.array(images[start:start + 4096]))
    return out


def pixel_stats(images, index_table, counts):
    """Per-channel mean and std of x / 255 over the images of a split's classes (index_table, counts),
    summed in int64, so every machine and every rank gets the same numbers bit for bit."""
    positions = torch.from_numpy(index_table)[torch.arange(index_table.shape[1]) < torch.from_numpy(counts)[:, None]]
    total, squares = torch.zeros(images.shape[1], dtype=torch.int64), torch.zeros(images.shape[1], dtype=torch.int64)
    for chunk in positions.split(1024):
        x = images.index_select(0, chunk.to(images.device)).long().cpu()
        total += x.sum((0, 2, 3))
        squares += x.square().sum((0, 2, 3))
    n = len(positions) * images.shape[2] * images.shape[3]
    mean = total.double() / n
    std = (squares.double() / n - mean.square()).clamp(min=0).sqrt()
    return tuple((mean / 255).tolist()), tuple((std / 255).clamp(min=1 / 255).tolist())


class TaskSampler:
    """N-way K-shot tasks from the classes of one split of a decoded image store.

    Tasks are drawn on the CPU (episodes.py: a seed gives the same tasks on every device) and their
    images gathered where the store is (`place`): on the device, or on the host and then copied
    with non_blocking=True. `mode` and `what` name the split in messages ('train', 'mini-ImageNet').
    """

    def __init__(self, images, split, fmt, device, seed=0, mode='train', what='images', where=None, on_device=None):
        self.device, self.mode, self.what, self.where = torch.device(device), mode, what, where or f'the {mode} split'
        self.images = images
        self.on_device = images.device.type == self.device.type if on_device is None else on_device
        self.split, self.class_names, self.n_classes = split, split['class_names'], len(split['class_names'])
        self.index_table, self.counts = torch.from_numpy(split['index_table']), torch.from_numpy(split['counts'])
        self.format = fmt
        self.scale, self.shift = fmt.normalizer(self.device)
        self._checked_task = None
        self.generator = torch.Generator()
        self.reset(seed)

    @staticmethod
    def synthetic(n_classes=64, per_class=600, resize=84, device='cpu', seed=0):
        """A sampler over random pixels shaped like a mini-ImageNet split, for benchmarks: the same
        memory and sampling work as the real data, with no files."""
        part = group_files({f'class{c}': [None] * per_class for c in range(n_classes)})
        images = np.random.default_rng(seed).integers(0, 256, (n_classes * per_class, 3, resize, resize), np.uint8)
        return TaskSampler(place(images, device), part, ImageFormat(3, resize), device, seed, 'synthetic')

    def reset(self, seed):
        """Re-seed the sampler: the same seed gives the same sequence of batches (e.g. for evaluation)."""
        self.generator.manual_seed(seed)

    def state_dict(self):
        return {'generator': self.generator.get_state()}

    def load_state_dict(self, state):
        set_generator_state(self.generator, state['generator'], f'the {self.what} {self.mode} task stream')

    def _gather(self, indices):
        """Images at indices [b, m] (CPU, or self.device when the images are there) -> normalised
        float32 [b, m, c, r, r] on self.device."""
        if self.on_device:
            batch = self.images.index_select(0, indices.reshape(-1))
        else:
            batch = torch.empty((indices.numel(), *self.images.shape[1:]), dtype=torch.uint8,
                                pin_memory=self.images.is_pinned())
            torch.index_select(self.images, 0, indices.reshape(-1), out=batch)
            batch = batch.to(self.device, non_blocking=True)
        return normalize(batch, self.scale, self.shift).view(*indices.shape, *self.images.shape[1:])

    def sample(self, batchsz, n_way, k_shot, k_query, generator=None, return_classes=False):
        """batchsz tasks: x_spt [b, n_way*k_shot, c, r, r], y_spt [b, n_way*k_shot], x_qry, y_qry.

        generator: a CPU torch.Generator, instead of the sampler's own.
        return_classes: also return classes [b, n_way], indices into class_names, label order (CPU).
        """
        if (n_way, k_shot, k_query) != self._checked_task:   # once per task shape, not every step
            check_task(self.split, self.where, n_way, k_shot, k_query)
            self._checked_task = (n_way, k_shot, k_query)
        classes, support, y_spt, query, y_qry = draw_tasks(
            self.index_table, self.counts, batchsz, n_way, k_shot, k_query, generator or self.generator)
        if self.on_device:
            support, y_spt, query, y_qry = to_device((support, y_spt, query, y_qry), self.device)
        else:
            y_spt, y_qry = to_device((y_spt, y_qry), self.device)
        batch = (self._gather(support), y_spt, self._gather(query), y_qry)
        return (*batch, classes) if return_classes else batch
