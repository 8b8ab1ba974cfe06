"""
Few-shot tasks from your own folder of images, for folder_train.py, evaluate.py and classify.py:
classes are folders of images, split into meta-training, validation and test classes, decoded
once into a uint8 cache and sampled by mini-ImageNet's machinery (imagecache.py).

    folder = ImageFolder('~/microscope')               # the layout, its classes and their images
    splits = folder.split((64, 16, 20), seed=0)         # {'train': [class names], 'val': [...], 'test': [...]}
    splits = folder.usable(splits, {'train': (5, 1, 15), 'val': (5, 1, 15), 'test': (5, 1, 15)})
    samplers, fmt = folder.samplers(splits, ImageFormat(3, 84), 'cuda')   # fmt: + the train pixel mean/std
    x_spt, y_spt, x_qry, y_qry = samplers['train'].sample(4, 5, 1, 15)

Layouts, first match wins:
    root/train/, root/val/, root/test/   a folder of class folders per split
    root/{train,val,test}.csv            mini-ImageNet's: `filename,label` rows naming root/images/<filename>
    root/                                class folders only: split by seeded fractions of the classes

A class is a folder that holds images (.png .jpg .jpeg .bmp .gif .tif .tiff .webp, any case) at any
depth, `cat/*.jpg` or Omniglot's `alphabet/character/*.png`; its name is its path under the root
(or under the split's folder). Splits are of classes, never of images. Hidden files and folders are
skipped; other files are counted in a note, never decoded. Each part of the layout (a split folder,
a CSV, or the whole root) is cached as one file, <cache_dir>/<root hash>/<part>_<format>_<key>.npy,
whose key hashes the decoding and every file's path, size and modification time: a folder that
changed is decoded again, and the cache of its earlier state is removed.
"""
import csv
import hashlib
import os

import numpy as np
import torch
from PIL import Image

from .errors import DamagedError, FlagError, MissingError
from .imagecache import (
    OMNIGLOT_RESAMPLING,
    SHOWN,
    UNREADABLE,
    ImageFormat,
    TaskSampler,
    cached_images,
    group_files,
    miniimagenet_format,
    pixel_stats,
    place,
    select,
)
from .presets import DEFAULTS

IMAGE_EXTENSIONS = {'.png', '.jpg', '.jpeg', '.bmp', '.gif', '.tif', '.tiff', '.webp'}
SPLITS = ('train', 'val', 'test')
CACHE_HOME = os.path.join(os.environ.get('XDG_CACHE_HOME') or os.path.join(os.path.expanduser('~'), '.cache'),
                          'maml-pytorch', 'folders')
GREY_MODES = {'1', 'L', 'LA', 'La', 'I', 'I;16', 'I;16L', 'I;16B', 'I;16N', 'F'}
LAYOUTS_HELP = "README, Your own data"
UNDECODABLE_HELP = "replace those files with readable copies or delete them"


# mini-ImageNet's layout; a folder of the user's own in this layout passes help texts of its own
CSV_HEADER = ['filename', 'label']
LAYOUT_HELP = ("get mini-ImageNet (Ravi & Larochelle split: its 84x84 JPEGs and the three split CSVs) and lay "
               "it out as root/images/*.jpg and root/{train,val,test}.csv (docs/data.md)")
MISSING_HELP = "put every image that {mode}.csv lists into root/images/"


def read_split(root, mode, layout_help=LAYOUT_HELP, missing_help=MISSING_HELP):
    """Read and check root/{mode}.csv against root/images/; the classes in order of first appearance.

    Returns a dict: class_names [n_classes], filenames (all images, grouped by class), counts
    [n_classes] (images per class), index_table [n_classes, max(counts)] (class, i) -> position in
    filenames (padded with 0 past a class's count), csv_sha (sha256 hex of the CSV bytes).
    The help texts say how to get the data (a folder of one's own in this layout passes its own).
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


def is_image(name):
    return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def listing(items, shown=SHOWN):
    """'a, b, c and 4 more' of a list."""
    more = f' and {len(items) - shown} more' if len(items) > shown else ''
    return ', '.join(map(str, items[:shown])) + more


def counted(n, noun, nouns=None):
    """'1 class', '3 classes'."""
    return f"{n} {noun if n == 1 else nouns or noun + 's'}"


def not_images_note(others, where):
    """The note on files that were left out because they are not images."""
    verb = 'is not an image and was' if len(others) == 1 else 'are not images and were'
    return f"note: {counted(len(others), 'file')} {where} {verb} left out (first: {listing(others)})."


def walk(folder):
    """(path, image paths, other file paths) of `folder` and of every folder below it, in sorted
    order at every level; hidden files and folders are skipped."""
    for path, dirs, files in os.walk(folder, followlinks=True):
        dirs[:] = sorted(d for d in dirs if not d.startswith('.'))
        files = sorted(f for f in files if not f.startswith('.'))
        yield (path, [os.path.join(path, f) for f in files if is_image(f)],
               [os.path.join(path, f) for f in files if not is_image(f)])


def find_classes(folder):
    """{class name: [image paths]} of the folders under `folder` that hold images (names and files
    sorted, at every level) and the paths of the other files met."""
    classes, others = {}, []
    for path, images, other in walk(folder):
        others += other
        if images:
            if path == folder:
                raise DamagedError(f"{folder} holds images directly (first: {os.path.basename(images[0])}); "
                                   f"put each class's images in a folder of its own under it ({LAYOUTS_HELP}).")
            classes[os.path.relpath(path, folder)] = images
    for name in classes:
        inner = next((other for other in classes if other.startswith(name + os.sep)), None)
        if inner:
            raise DamagedError(f"{os.path.join(folder, name)} holds images and also a folder of images, {inner}; "
                               f"a class is one folder of images, so move its own images into a folder of their own.")
    return classes, others


class ImageFolder:
    """The classes of a folder of images, found once: `layout` ('folders', 'csv' or 'seeded'),
    `parts` {part: {class name: [image paths]}} (the split folders or CSVs, or 'all' of a root of
    class folders), and `others`, the files that are not images."""

    def __init__(self, root, cache_dir=None):
        self.root = os.path.abspath(os.path.expanduser(root))
        if not os.path.isdir(self.root):
            raise MissingError(f"the folder {root} does not exist; pass --data the folder that holds your class "
                               f"folders ({LAYOUTS_HELP}).")
        self.cache_dir = os.path.join(cache_dir or CACHE_HOME, hashlib.sha256(self.root.encode()).hexdigest()[:12])
        folders = [s for s in SPLITS if os.path.isdir(os.path.join(self.root, s))]
        csvs = [s for s in SPLITS if os.path.isfile(os.path.join(self.root, f'{s}.csv'))]
        self.others = []
        if folders:
            self.layout, self.parts = 'folders', {}
            for s in folders:
                self.parts[s], others = find_classes(os.path.join(self.root, s))
                self.others += others
        elif csvs:
            self.layout = 'csv'
            if not os.path.isdir(os.path.join(self.root, 'images')):
                raise MissingError(f"{self.root} has {csvs[0]}.csv but no images/ folder beside it; put the "
                                   f"images its rows name in {os.path.join(self.root, 'images')}.")
            self.parts = {s: self._read_csv(s) for s in csvs}
        else:
            self.layout = 'seeded'
            classes, self.others = find_classes(self.root)
            self.parts = {'all': classes}
        for part, classes in self.parts.items():
            if not classes and self.layout == 'csv':
                raise MissingError(f"{os.path.join(self.root, part)}.csv lists no images; add its rows "
                                   f"(filename,label) or remove it.")
            if not classes:
                where = self.root if part == 'all' else os.path.join(self.root, part)
                raise MissingError(f"{where} holds no class folders of images; put each class's images in a folder "
                                   f"of its own there ({LAYOUTS_HELP}).")

    def _read_csv(self, split):
        part = read_split(self.root, split, missing_help="add them to root/images/ or remove their rows")
        files = iter(part['filenames'])
        return {name: [next(files) for _ in range(count)] for name, count in zip(part['class_names'], part['counts'])}

    def source(self, split):
        """Where the split's classes are listed: 'train/', 'train.csv' or the root."""
        return {'folders': f'{split}/', 'csv': f'{split}.csv', 'seeded': 'the class folders'}[self.layout]

    def split(self, fractions, seed):
        """{'train', 'val', 'test': [class names]}: the layout's own, or the classes of a root of class
        folders split by the seeded fractions (e.g. (64, 16, 20), mini-ImageNet's classes)."""
        if self.layout == 'seeded':
            names = list(self.parts['all'])
            if len(fractions) != 3 or min(fractions) < 0 or not sum(fractions) > 0:
                raise FlagError(f"--split_fractions {' '.join(map(str, fractions))} must be three numbers, none "
                                f"negative, for train, val and test (e.g. 64 16 20).")
            n_val, n_test = (round(len(names) * f / sum(fractions)) for f in fractions[1:])
            order = torch.randperm(len(names), generator=torch.Generator().manual_seed(seed)).tolist()
            n_train = len(names) - n_val - n_test
            cuts = {'train': order[:n_train], 'val': order[n_train:n_train + n_val], 'test': order[n_train + n_val:]}
            return {s: [names[i] for i in sorted(positions)] for s, positions in cuts.items()}
        missing = [s for s in SPLITS if s not in self.parts]
        if missing:
            have = ', '.join(self.source(s) for s in self.parts)
            raise MissingError(f"{self.root} has {have} but no {' or '.join(self.source(s) for s in missing)}; "
                               f"add {'them' if len(missing) > 1 else 'it'}, or put all class folders directly "
                               f"in the root to split them by --split_fractions ({LAYOUTS_HELP}).")
        for i, a in enumerate(SPLITS):
            for b in SPLITS[i + 1:]:
                shared = sorted(set(self.parts[a]) & set(self.parts[b]))
                if shared:
                    raise DamagedError(f"class {shared[0]} is in both {self.source(a)} and {self.source(b)} of "
                                       f"{self.root} ({len(shared)} such classes); a class belongs to one split, "
                                       f"so move or rename {'it' if len(shared) == 1 else 'them'}.")
        return {s: list(self.parts[s]) for s in SPLITS}

    def part_of(self, split):
        return 'all' if self.layout == 'seeded' else split

    def stored(self, classes, layout, what):
        """The splits a checkpoint (`what`) recorded, {split: [class names]}, found in this folder."""
        for split, names in classes.items():
            part = self.parts.get(self.part_of(split), {}) if self.layout == layout else {}
            missing = [name for name in names if name not in part]
            if missing:
                raise MissingError(f"{len(missing)} of the {len(names)} {split} classes that {what} was trained "
                                   f"with are not in {self.root} (first: {listing(missing)}); pass --data the "
                                   f"folder it was trained on.")
        return classes

    def evaluation_classes(self, split='test'):
        """Another data set's classes to evaluate on: the split's own (test/ or test.csv) when the
        layout has it, else all the classes; and a phrase saying which."""
        if self.layout == 'seeded':
            names = list(self.parts['all'])
            return names, f"all {len(names)} classes of {self.root} (it has no {split}/ or {split}.csv)"
        if split not in self.parts:
            raise MissingError(f"{self.root} has no {self.source(split)}; evaluate on a folder with one, or on a "
                               f"folder of class folders to use all its classes.")
        where = os.path.join(self.root, self.source(split))
        return list(self.parts[split]), f"the {len(self.parts[split])} classes of {where}"

    def count(self, split, names):
        return sum(len(self.parts[self.part_of(split)][name]) for name in names)

    def usable(self, splits, tasks):
        """The classes of each split that can give its tasks, tasks[split] = (n_way, k_shot, k_query):
        classes with fewer than k_shot + k_query images are left out with a warning, or refused
        when fewer than n_way classes would remain."""
        kept = {}
        for split, names in splits.items():
            n_way, k_shot, k_query = tasks[split]
            if len(names) < n_way:
                raise FlagError(f"the {split} split of {self.root} has {counted(len(names), 'class', 'classes')}, "
                                f"fewer than --n_way {n_way}; lower --n_way or add classes.")
            files = self.parts[self.part_of(split)]
            small = [f'{name} ({len(files[name])})' for name in names if len(files[name]) < k_shot + k_query]
            kept[split] = [name for name in names if len(files[name]) >= k_shot + k_query]
            if len(kept[split]) < n_way:
                raise FlagError(f"only {len(kept[split])} of the {len(names)} {split} classes of {self.root} "
                                f"{'has' if len(kept[split]) == 1 else 'have'} the {k_shot + k_query} images a task "
                                f"takes from a class (k_spt + k_qry), fewer than --n_way {n_way} (too small: "
                                f"{listing(small)}); lower --k_spt or --k_qry, or add images.")
            if small:
                print(f"warning: {counted(len(small), f'{split} class', f'{split} classes')} "
                      f"{'has' if len(small) == 1 else 'have'} fewer than the {k_shot + k_query} images a task takes "
                      f"from a class (k_spt + k_qry) and {'is' if len(small) == 1 else 'are'} left out: "
                      f"{listing(small, 10)}.", flush=True)
        return kept

    def looks(self):
        """'drawings' when every image is 1-bit, 'grey' when every one is grey, else 'colour'
        (from the files' headers; the scan stops at the first colour image)."""
        kinds = set()
        for classes in self.parts.values():
            for files in classes.values():
                for path in files:
                    kind = _kind(path)
                    if kind == 'colour':
                        return kind
                    kinds.add(kind)
        return 'drawings' if 'drawings' in kinds and kinds <= {'drawings', None} else 'grey'

    def describe(self, splits, how):
        """Lines saying what was found: classes and images per split, and how they were split."""
        total = sum(len(files) for classes in self.parts.values() for files in classes.values())
        lines = [f"folder {self.root}: {sum(map(len, splits.values()))} classes, {total} images ({how})"]
        for split, names in splits.items():
            lines.append(f"  {split}: {len(names)} classes, {self.count(split, names)} images: {listing(names, 8)}")
        if self.others:
            lines.append(not_images_note(self.others, 'of the folder'))
        return lines

    def samplers(self, splits, fmt, device, seed=0, keep_on_device=None):
        """{split: TaskSampler} of the classes `splits` {split: [names]}, decoded to `fmt` and cached;
        fmt is returned with the mean and std of the train classes' pixels when it has none."""
        stores, parts = {}, {}
        for part in dict.fromkeys(self.part_of(split) for split in splits):
            parts[part] = group_files(self.parts[part])
            images = cached_images(parts[part]['filenames'], self.cache_path(part, parts[part]['filenames'], fmt), fmt,
                                   what=f'folder {part}', fix=UNDECODABLE_HELP)
            stores[part] = place(images, device, keep_on_device)
        chosen = {split: select(parts[self.part_of(split)], names) for split, names in splits.items()}
        if fmt.mean is None:
            train = chosen['train']
            mean, std = pixel_stats(stores[self.part_of('train')], train['index_table'], train['counts'])
            fmt = fmt._replace(mean=mean, std=std)
        return {split: TaskSampler(stores[self.part_of(split)], chosen[split], fmt, device, seed, split, 'folder',
                                   f'the {split} classes of {self.root}', on_device=keep_on_device)
                for split in splits}, fmt

    def cache_path(self, part, filenames, fmt):
        """The part's cache file for fmt's decoding; caches of an earlier state of the folder go."""
        key = hashlib.sha256(repr((fmt.channels, fmt.size, fmt.resample)).encode())
        for path in filenames:
            stat = os.stat(path)
            key.update(f'{os.path.relpath(path, self.root)}\0{stat.st_size}\0{stat.st_mtime_ns}\n'.encode())
        prefix = f'{part}_{fmt.channels}x{fmt.size}_{fmt.resample}_'
        name = f'{prefix}{key.hexdigest()[:16]}.npy'
        if os.path.isdir(self.cache_dir):
            stale = [f for f in os.listdir(self.cache_dir) if f.startswith(prefix) and f.endswith('.npy') and f != name]
            for f in stale:
                os.remove(os.path.join(self.cache_dir, f))
            if stale:
                print(f"note: the images of {self.root} changed since they were cached, so they are decoded again.",
                      flush=True)
        return os.path.join(self.cache_dir, name)

    def record(self, splits, fmt, fractions, seed):
        """What a checkpoint stores to find the same classes and decode them the same way again."""
        return {'dataset': 'folder', 'root': self.root, 'layout': self.layout, 'split_fractions': list(fractions),
                'split_seed': seed, 'classes': {split: list(names) for split, names in splits.items()},
                'format': dict(fmt._asdict())}


def _kind(path):
    """'drawings' (1-bit), 'grey' or 'colour' from an image's header; None when it cannot be read
    (its decoding names it)."""
    try:
        with Image.open(path) as im:
            if im.mode == '1':
                return 'drawings'
            if im.mode in GREY_MODES:
                return 'grey'
            if im.mode in ('P', 'PA'):
                palette = np.array(im.getpalette('RGB') or [0, 0, 0]).reshape(-1, 3)
                return 'grey' if (palette == palette[:, :1]).all() else 'colour'
            return 'colour'
    except UNREADABLE:
        return None


def checkpoint_format(ckpt):
    """How images become the input of the checkpoint's network: its ImageFormat, from what the
    checkpoint stores (a folder run's 'data', else its data set's flags)."""
    if ckpt.get('data'):
        return ImageFormat(**ckpt['data']['format'])
    if 'dataset' not in (ckpt.get('args') or {}):
        raise FlagError("this checkpoint does not record the data set it was trained on (a training script of this "
                        "version did not write it), so how its images were prepared is not known; use one that "
                        "folder_train.py, omniglot_train.py or miniimagenet_train.py wrote.")
    args = {**DEFAULTS[ckpt['args']['dataset']], **ckpt['args']}
    if args['dataset'] == 'omniglot':
        return ImageFormat(1, args['imgsz'], OMNIGLOT_RESAMPLING[args['preprocess']])
    return miniimagenet_format(args['imgsz'], args['pixel_norm'])
