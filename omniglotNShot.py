"""
N-way K-shot Omniglot episodes, gathered on the device that trains.

    db = OmniglotNShot('data/omniglot', batchsz=32, n_way=5, k_shot=1, k_query=15, imgsz=28,
                       device='cuda')
    x_spt, y_spt, x_qry, y_qry = db.next('train')   # or 'test' (or 'val', with val_classes)
    # x_spt [32, 5*1, 1, 28, 28] float32 in [0, 1], y_spt [32, 5] int64 in 0..4, already on `device`
    x_spt, y_spt, x_qry, y_qry = db.next('test', k_query=1)   # another query count, e.g. at test

Where the data comes from, first match wins:
    <root>/omniglot_<imgsz>_<preprocess>.pt           a cache of this loader (uint8, ~25 MB at 28x28)
    <root>/images_background/, images_evaluation/     an extraction (also under <root>/processed/)
    <root>/images_background.zip, images_evaluation.zip  the official archives, extracted here
    BASE_URL                                          downloaded into <root>, MD5-checked

preprocess: 'official' (default) resizes the 105x105 1-bit PNG as the official code's
resize_images.py does (PIL resamples a 1-bit image by nearest neighbour whatever filter is asked,
so it stays binary) and inverts it: ink 1, background 0. 'greyscale' is the seed's: the PNG as
greyscale, LANCZOS-resized (antialiased), background 1 and ink near 0.

split: 'random' (default) splits the 1623 characters by a seeded permutation (never filesystem
order) into 1200 for meta-training and 423 for test, as in the paper; `val_classes=100` holds 100
of the 1200 out as a 'val' split for choosing checkpoints (the official code's 1100 + 100).
'lake' is Omniglot's own benchmark (Lake et al. 2015): meta-training on the 30 images_background
alphabets, test on the 20 images_evaluation alphabets; `val_alphabets=5` holds 5 whole background
alphabets (chosen by a seeded permutation) out as 'val', so that validation, like the test, meets
unseen alphabets. `within_alphabet=('val', 'test')` draws every task of those splits from one
alphabet (the benchmark's 20-way 1-shot tasks); alphabets with fewer than n_way characters are
never drawn. It works with either split.

rotate: 'classes' (or True) adds each training character rotated by 90, 180 and 270 degrees as
three new classes; 'per_task' is the official code's draw: in every task of every split, each
class gets one random rotation out of 0/90/180/270, the same for its support and query images,
so a character appears at most once per task. `rotate_modes=('train',)` keeps that draw to the
training tasks, for Lake et al.'s benchmark, whose characters are tested as drawn: a quarter turn
per test class is an orientation cue that tells apart the characters of one alphabet.

The whole set lives on `device` as uint8 and each episode is one gather there; only the drawn
indices (a few kB) cross from the CPU, where tasks are drawn so that a seed gives the same tasks on
every device (maml/episodes.py). That is why no pinned-memory loader is needed for Omniglot.
"""
import os
import shutil
import urllib.error
import zipfile
import zlib

import numpy as np
import torch
from tqdm import tqdm

from maml.episodes import draw_group_tasks, draw_tasks, group_table, set_generator_state, to_device
from maml.errors import DamagedError, FlagError, MissingError
from maml.imagecache import OMNIGLOT_RESAMPLING, UNREADABLE, ImageFormat
from maml.scratch import remove_orphans

BASE_URL = 'https://raw.githubusercontent.com/brendenlake/omniglot/master/python/'
ARCHIVE_MD5 = {'images_background': '68d2efa1b9178cc56df9314c21c6e718',
               'images_evaluation': '6b91aef0f799c5bb55b94e3f2daec811'}
DRAWINGS = 20            # every Omniglot character is drawn by 20 people
N_TRAIN_CLASSES = 1200   # the paper's meta-training split; the other 423 characters are for test
SPLIT_SEED = 0           # fixed so that every run and every checkpoint sees the same test characters
PREPROCESSING = tuple(OMNIGLOT_RESAMPLING)   # 'official', 'greyscale'
SPLITS = ('random', 'lake')
ROTATIONS = (None, 'classes', 'per_task')
SCRATCH_PREFIX = '.extracting-'   # + '<pid>-<part>': an extraction under way, or killed midway


def fetch_archives(root, download=True, base_url=BASE_URL, md5=ARCHIVE_MD5):
    """Make sure <root>/images_background and images_evaluation exist (or their seed-style
    <root>/processed/ copies); returns their two paths."""
    folders = []
    for part in ARCHIVE_MD5:
        found = [d for d in (os.path.join(root, part), os.path.join(root, 'processed', part)) if os.path.isdir(d)]
        if found:
            folders.append(found[0])
            continue
        archive = os.path.join(root, part + '.zip')
        if not os.path.isfile(archive):
            if not download:
                raise MissingError(missing_data_message(root))
            _download(base_url + part + '.zip', root, archive, md5[part])
        folders.append(_extract(archive, root, part))
    return folders


def holds_omniglot(root):
    """Whether root holds Omniglot in a form this loader reads (see the top), rather than being a
    folder of images of some other kind."""
    entries = os.listdir(root) if os.path.isdir(root) else []
    return any(name in entries for name in ('processed', *ARCHIVE_MD5, *(part + '.zip' for part in ARCHIVE_MD5))) or \
        any(name.startswith('omniglot_') and name.endswith('.pt') for name in entries)


def _extract(archive, root, part):
    """Extract <part>.zip into a scratch folder, then rename <part>/ into place: an interrupted
    extraction never passes for a complete one, and zipfile drops absolute and '..' member paths."""
    scratch = os.path.join(root, f'{SCRATCH_PREFIX}{os.getpid()}-{part}')
    shutil.rmtree(scratch, ignore_errors=True)   # left by a dead process that had our pid
    os.makedirs(scratch)
    try:
        with zipfile.ZipFile(archive) as zf:
            for member in tqdm(zf.infolist(), desc=f'extracting {part}', unit='file', leave=False, disable=None):
                zf.extract(member, scratch)
        if not os.path.isdir(os.path.join(scratch, part)):
            raise DamagedError(f"{archive} holds no {part}/ folder; replace it with the official archive.")
        try:
            os.replace(os.path.join(scratch, part), os.path.join(root, part))
        except OSError:
            if not os.path.isdir(os.path.join(root, part)):
                raise
            # another run on this root extracted it first (its rename is atomic, so it is whole)
    except (zipfile.BadZipFile, zlib.error, EOFError):
        raise DamagedError(f"{archive} is not a valid zip file (damaged or cut short); delete it "
                           f"and run again to download it, or replace it with the official archive.") from None
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return os.path.join(root, part)


def _scratch_pid(name):
    """The pid in the name of an extraction's scratch folder, a partial download or a cache being
    written (<name>.<pid>.part|tmp); None for any other entry of the root."""
    if name.startswith(SCRATCH_PREFIX):
        return name[len(SCRATCH_PREFIX):].partition('-')[0]
    if name.endswith('.part') or (name.startswith('omniglot_') and name.endswith('.tmp')):
        return name.rpartition('.')[0].rpartition('.')[2]
    return None


def _download(url, root, archive, md5):
    """Download to a temporary name, check the MD5, then rename: a cut or corrupt download never
    takes the archive's place."""
    from torchvision.datasets.utils import download_url  # here: importing torchvision costs every start 1.8 s
    partial = f'{os.path.basename(archive)}.{os.getpid()}.part'   # concurrent first runs download apart
    try:
        download_url(url, root, filename=partial, md5=md5)
    except (urllib.error.URLError, OSError) as e:
        raise MissingError(missing_data_message(root, f" (downloading {url} failed: {e})")) from None
    except RuntimeError:
        os.remove(os.path.join(root, partial))
        raise DamagedError(f"The download of {url} does not match its MD5 {md5}; it was deleted, so "
                           f"run again, or put the official archive at {archive} by hand.") from None
    os.replace(os.path.join(root, partial), archive)


def missing_data_message(root, reason=''):
    return (f"Omniglot is not in {root}{reason}: put images_background.zip and images_evaluation.zip "
            f"(from {BASE_URL}) there, or pass the folder that holds them as the data root (--data; "
            f"benchmarks/bench.py: --omniglot).")


def load_images(root, imgsz, preprocess='official', download=True):
    """uint8 tensor [1623, 20, imgsz, imgsz], the 'alphabet/character' name of each class and how
    many of them (the first ones) come from images_background; decoded once and cached at
    <root>/omniglot_<imgsz>_<preprocess>.pt."""
    if os.path.isdir(root):
        remove_orphans(root, _scratch_pid)
    cache = os.path.join(root, f'omniglot_{imgsz}_{preprocess}.pt')
    if os.path.isfile(cache):
        try:
            saved = torch.load(cache, weights_only=True)
            return saved['images'], saved['classes'], saved['background']
        except Exception:
            print(f"Omniglot cache {cache} is unreadable; rebuilding it from the images.")
    images, classes = [], []
    for folder in fetch_archives(root, download):
        subfolders = lambda path: sorted(f for f in os.listdir(path) if os.path.isdir(os.path.join(path, f)))
        characters = [(alphabet, character) for alphabet in subfolders(folder)   # no stray files (.DS_Store)
                      for character in subfolders(os.path.join(folder, alphabet))]
        for alphabet, character in tqdm(characters, desc=f'decoding {os.path.basename(folder)}', unit='class',
                                        leave=False, disable=None):
            path = os.path.join(folder, alphabet, character)
            files = sorted(f for f in os.listdir(path) if f.endswith('.png'))
            if len(files) != DRAWINGS:
                raise DamagedError(f"{path} holds {len(files)} drawings instead of {DRAWINGS}; "
                                   f"the extraction is incomplete, so delete it and run again.")
            images.append(np.stack([_read_png(os.path.join(path, f), imgsz, preprocess) for f in files]))
            classes.append(f'{alphabet}/{character}')
        if os.path.basename(folder) == 'images_background':
            background = len(classes)
    images = torch.from_numpy(np.stack(images))
    scratch = f'{cache}.{os.getpid()}.tmp'   # a name of this process's own: concurrent first runs do not collide
    torch.save({'images': images, 'classes': classes, 'background': background}, scratch)
    os.replace(scratch, cache)
    return images, classes, background


def _read_png(path, imgsz, preprocess):
    try:
        return ImageFormat(1, imgsz, OMNIGLOT_RESAMPLING[preprocess]).decode(path)[0]
    except UNREADABLE:
        raise DamagedError(f"Cannot read {path}; the file is damaged, so delete the extracted "
                           f"folders and run again to extract the archives anew.") from None


def _choice(value, allowed, what):
    if value not in allowed:
        raise FlagError(f"{what}={value!r} is not one of {', '.join(map(repr, allowed))}; pick one of those.")
    return value


class OmniglotNShot:

    def __init__(self, root, batchsz, n_way, k_shot, k_query, imgsz=28, device='cpu', rotate=None,
                 download=True, seed=0, val_classes=0, preprocess='official', split='random',
                 val_alphabets=0, within_alphabet=(), rotate_modes=None):
        self._check_shots(k_shot, k_query)
        self.rotate = _choice({True: 'classes', False: None}.get(rotate, rotate), ROTATIONS, 'rotate')
        _choice(preprocess, PREPROCESSING, 'preprocess')
        _choice(split, SPLITS, 'split')
        self.batchsz, self.n_way, self.k_shot, self.k_query = batchsz, n_way, k_shot, k_query
        self.imgsz, self.device = imgsz, torch.device(device)
        images, self.classes, n_background = load_images(root, imgsz, preprocess, download)
        self.alphabets = [name.split('/')[0] for name in self.classes]
        if split == 'random':
            self.class_ids = self._random_split(len(images), val_classes, val_alphabets, n_way)
        else:
            self.class_ids = self._lake_split(len(images), n_background, val_classes, val_alphabets)
        if not len(self.class_ids['val']):
            del self.class_ids['val']
        # each split as a flat store [classes * 20, 1, s, s] and the table of its classes' positions
        self.data, self.index_table, self.counts = {}, {}, {}
        for mode, ids in self.class_ids.items():
            split_images = images[ids]
            if mode == 'train' and self.rotate == 'classes':
                split_images = torch.cat([split_images.rot90(k, dims=(-2, -1)) for k in range(4)])
                self.class_ids[mode] = ids.repeat(4)
            if n_way > len(split_images):
                raise FlagError(f"n_way={n_way} is more than the {len(split_images)} Omniglot {mode} classes; "
                                f"lower --n_way.")
            self.data[mode] = split_images.reshape(-1, 1, imgsz, imgsz).to(self.device)
            self.index_table[mode] = torch.arange(len(split_images) * DRAWINGS).view(-1, DRAWINGS)
            self.counts[mode] = torch.full((len(split_images),), DRAWINGS)
        self.alphabet_groups = {mode: self._alphabet_groups(mode, n_way) for mode in within_alphabet}
        self.rotate_modes = self._rotate_modes(rotate_modes)
        # rotating a flat image = gathering its pixels at rot90 of the pixel positions
        positions = torch.arange(imgsz * imgsz, device=self.device).view(imgsz, imgsz)
        self.rotated_positions = torch.stack([positions.rot90(k).reshape(-1) for k in range(4)])
        self.generators = {mode: torch.Generator() for mode in self.data}   # on the CPU: see maml/episodes.py
        for i, mode in enumerate(self.data):
            self.reset(mode, seed + i)

    @staticmethod
    def _check_shots(k_shot, k_query):
        if k_shot < 1 or k_query < 1 or k_shot + k_query > DRAWINGS:
            raise FlagError(f"Omniglot has {DRAWINGS} drawings per character, so k_spt={k_shot} and "
                            f"k_qry={k_query} cannot both be drawn; use k_spt, k_qry >= 1 with "
                            f"k_spt + k_qry <= {DRAWINGS}.")

    @staticmethod
    def _random_split(n_classes, val_classes, val_alphabets, n_way):
        if val_alphabets:
            raise FlagError("val_alphabets holds out whole alphabets of split='lake'; with the random "
                            "split use val_classes.")
        if not 0 <= val_classes <= N_TRAIN_CLASSES - n_way:
            raise FlagError(f"val_classes={val_classes} must lie between 0 and {N_TRAIN_CLASSES - n_way}, "
                            f"so that {n_way}-way training tasks remain.")
        order = torch.randperm(n_classes, generator=torch.Generator().manual_seed(SPLIT_SEED))
        n_train = N_TRAIN_CLASSES - val_classes
        return {'train': order[:n_train], 'val': order[n_train:N_TRAIN_CLASSES], 'test': order[N_TRAIN_CLASSES:]}

    def _lake_split(self, n_classes, n_background, val_classes, val_alphabets):
        if val_classes:
            raise FlagError("split='lake' holds out whole background alphabets for validation; use "
                            "val_alphabets instead of val_classes.")
        background = sorted(set(self.alphabets[:n_background]))
        if not 0 <= val_alphabets < len(background):
            raise FlagError(f"val_alphabets={val_alphabets} must lie between 0 and {len(background) - 1}, "
                            f"so that some of the {len(background)} background alphabets remain for training.")
        order = torch.randperm(len(background), generator=torch.Generator().manual_seed(SPLIT_SEED))
        held_out = {background[i] for i in order[:val_alphabets].tolist()}
        is_val = torch.tensor([a in held_out for a in self.alphabets[:n_background]], dtype=torch.bool)
        ids = torch.arange(n_background)
        return {'train': ids[~is_val], 'val': ids[is_val], 'test': torch.arange(n_background, n_classes)}

    def _alphabet_groups(self, mode, n_way):
        """The classes of `mode` grouped by alphabet (rotated copies stay in their alphabet)."""
        if mode not in self.data:
            raise FlagError(f"within_alphabet names split {mode!r}, which this loader does not have "
                            f"(it has {', '.join(self.data)}); name only those.")
        members, sizes = group_table([self.alphabets[c] for c in self.class_ids[mode].tolist()])
        if not (sizes >= n_way).any():
            raise FlagError(f"no Omniglot {mode} alphabet has {n_way} characters, so no {n_way}-way task "
                            f"can come from one alphabet; lower --n_way or draw {mode} tasks across alphabets.")
        return members, sizes

    def _rotate_modes(self, modes):
        """The splits whose tasks get the per-task rotation: all of them unless `modes` names some."""
        if modes is None:
            return tuple(self.data)
        unknown = [mode for mode in modes if mode not in self.data]
        if unknown:
            raise FlagError(f"rotate_modes names split {unknown[0]!r}, which this loader does not have "
                            f"(it has {', '.join(self.data)}); name only those.")
        return tuple(modes)

    def reset(self, mode, seed):
        """Restart the episode stream of `mode` (e.g. to evaluate on the same tasks every time)."""
        self.generators[mode].manual_seed(seed)

    def state_dict(self):
        return {mode: g.get_state() for mode, g in self.generators.items()}

    def load_state_dict(self, state):
        for mode, g in self.generators.items():
            set_generator_state(g, state[mode], f'the Omniglot {mode} task stream')

    def next(self, mode='train', k_query=None, return_indices=False):
        """One meta-batch of `batchsz` tasks from the `mode` classes, with k_query query images per
        class (default: the constructor's). With return_indices, also `classes` [b, n_way] (label j
        of task i is class classes[i, j] of this split) and the positions of the support and query
        images in self.data[mode] (before any per-task rotation)."""
        k_query = self.k_query if k_query is None else k_query
        self._check_shots(self.k_shot, k_query)
        task = (self.index_table[mode], self.counts[mode], self.batchsz, self.n_way, self.k_shot, k_query,
                self.generators[mode])
        groups = self.alphabet_groups.get(mode)
        classes, spt, y_spt, qry, y_qry = draw_group_tasks(*task, *groups) if groups else draw_tasks(*task)
        drawn = [classes, spt, y_spt, qry, y_qry]
        if self.rotate == 'per_task' and mode in self.rotate_modes:
            turns = torch.randint(4, classes.shape, generator=self.generators[mode])
            drawn += [turns.gather(1, y_spt), turns.gather(1, y_qry)]
        classes, spt, y_spt, qry, y_qry, *turns_of = to_device(drawn, self.device)
        x_spt, x_qry = self.data[mode][spt], self.data[mode][qry]
        if turns_of:
            x_spt, x_qry = self._rotate(x_spt, turns_of[0]), self._rotate(x_qry, turns_of[1])
        batch = (x_spt.float().div_(255), y_spt, x_qry.float().div_(255), y_qry)
        return batch + (classes, spt, qry) if return_indices else batch

    def _rotate(self, images, turns):
        """images [b, m, 1, s, s] each rotated by turns [b, m] quarter turns, in one gather."""
        flat = images.view(*turns.shape, -1)
        return flat.gather(-1, self.rotated_positions[turns]).view(images.shape)
