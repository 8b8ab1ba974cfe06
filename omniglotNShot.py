"""
N-way K-shot Omniglot episodes, sampled on the device that trains.

    db = OmniglotNShot('data/omniglot', batchsz=32, n_way=5, k_shot=1, k_query=15, imgsz=28,
                       device='cuda')
    x_spt, y_spt, x_qry, y_qry = db.next('train')   # or 'test' (or 'val', with val_classes)
    # x_spt [32, 5*1, 1, 28, 28] float32 in [0, 1], y_spt [32, 5] int64 in 0..4, already on `device`

Where the data comes from, first match wins:
    <root>/omniglot_<imgsz>.pt                        a cache of this loader (uint8, ~25 MB at 28x28)
    <root>/images_background/, images_evaluation/     an extraction (also under <root>/processed/)
    <root>/images_background.zip, images_evaluation.zip  the official archives, extracted here
    BASE_URL                                          downloaded into <root>, MD5-checked
The 1623 characters are split by a seeded permutation (never filesystem order) into 1200 for
meta-training and 423 for test, as in the paper; `val_classes=100` holds 100 of the 1200 out as
a 'val' split for choosing checkpoints (the official code's 1100 + 100). `rotate=True` adds each
training character rotated by 90, 180 and 270 degrees as three new classes (the paper's augmentation).

The whole set lives on `device` as uint8 and each episode is one gather there, so training does
no per-step host-to-device copy: that is why no pinned-memory loader is needed for Omniglot.
"""
import os
import shutil
import tempfile
import urllib.error
import zipfile

import numpy as np
import torch
from PIL import Image
from torchvision.datasets.utils import download_url, extract_archive

from errors import DamagedError, FlagError, MissingError
from episodes import draw_tasks

BASE_URL = 'https://raw.githubusercontent.com/brendenlake/omniglot/master/python/'
ARCHIVE_MD5 = {'images_background': '68d2efa1b9178cc56df9314c21c6e718',
               'images_evaluation': '6b91aef0f799c5bb55b94e3f2daec811'}
DRAWINGS = 20            # every Omniglot character is drawn by 20 people
N_TRAIN_CLASSES = 1200   # the paper's meta-training split; the other 423 characters are for test
SPLIT_SEED = 0           # fixed so that every run and every checkpoint sees the same test characters


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


def _extract(archive, root, part):
    """Extract <part>.zip into a scratch folder, then rename <part>/ into place: an interrupted
    extraction never passes for a complete one, and zipfile drops absolute and '..' member paths."""
    scratch = tempfile.mkdtemp(prefix='.extracting-', dir=root)
    try:
        extract_archive(archive, scratch)
        if not os.path.isdir(os.path.join(scratch, part)):
            raise DamagedError(f"{archive} holds no {part}/ folder; replace it with the official archive.")
        os.replace(os.path.join(scratch, part), os.path.join(root, part))
    except zipfile.BadZipFile:
        raise DamagedError(f"{archive} is not a valid zip file (damaged or cut short); delete it "
                           f"and run again to download it, or replace it with the official archive.") from None
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return os.path.join(root, part)


def _download(url, root, archive, md5):
    """Download to a temporary name, check the MD5, then rename: a cut or corrupt download never
    takes the archive's place."""
    partial = os.path.basename(archive) + '.part'
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
            f"(from {BASE_URL}) there, or pass --data to the folder that holds them.")


def load_images(root, imgsz, download=True):
    """uint8 tensor [1623, 20, imgsz, imgsz] and the 'alphabet/character' name of each class,
    decoded once and cached at <root>/omniglot_<imgsz>.pt."""
    cache = os.path.join(root, f'omniglot_{imgsz}.pt')
    if os.path.isfile(cache):
        try:
            saved = torch.load(cache, weights_only=True)
            return saved['images'], saved['classes']
        except Exception:
            print(f"Omniglot cache {cache} is unreadable; rebuilding it from the images.")
    images, classes = [], []
    for folder in fetch_archives(root, download):
        for alphabet in sorted(os.listdir(folder)):
            for character in sorted(os.listdir(os.path.join(folder, alphabet))):
                path = os.path.join(folder, alphabet, character)
                files = sorted(f for f in os.listdir(path) if f.endswith('.png'))
                if len(files) != DRAWINGS:
                    raise DamagedError(f"{path} holds {len(files)} drawings instead of {DRAWINGS}; "
                                       f"the extraction is incomplete, so delete it and run again.")
                images.append(np.stack([_read_png(os.path.join(path, f), imgsz) for f in files]))
                classes.append(f'{alphabet}/{character}')
    images = torch.from_numpy(np.stack(images))
    torch.save({'images': images, 'classes': classes}, cache + '.tmp')
    os.replace(cache + '.tmp', cache)
    return images, classes


def _read_png(path, imgsz):
    try:
        with Image.open(path) as img:
            return np.asarray(img.convert('L').resize((imgsz, imgsz), Image.LANCZOS), dtype=np.uint8)
    except OSError:
        raise DamagedError(f"Cannot read {path}; the file is damaged, so delete the extracted "
                           f"folders and run again to extract the archives anew.") from None


class OmniglotNShot:

    def __init__(self, root, batchsz, n_way, k_shot, k_query, imgsz=28, device='cpu',
                 rotate=False, download=True, seed=0, val_classes=0):
        if k_shot < 1 or k_query < 1 or k_shot + k_query > DRAWINGS:
            raise FlagError(f"Omniglot has {DRAWINGS} drawings per character, so k_spt={k_shot} and "
                             f"k_qry={k_query} cannot both be drawn; use k_spt, k_qry >= 1 with "
                             f"k_spt + k_qry <= {DRAWINGS}.")
        self.batchsz, self.n_way, self.k_shot, self.k_query = batchsz, n_way, k_shot, k_query
        self.imgsz, self.device = imgsz, torch.device(device)
        images, self.classes = load_images(root, imgsz, download)
        if not 0 <= val_classes <= N_TRAIN_CLASSES - n_way:
            raise FlagError(f"val_classes={val_classes} must lie between 0 and {N_TRAIN_CLASSES - n_way}, "
                             f"so that {n_way}-way training tasks remain.")
        order = torch.randperm(len(images), generator=torch.Generator().manual_seed(SPLIT_SEED))
        n_train = N_TRAIN_CLASSES - val_classes
        self.class_ids = {'train': order[:n_train], 'val': order[n_train:N_TRAIN_CLASSES],
                          'test': order[N_TRAIN_CLASSES:]}
        if not val_classes:
            del self.class_ids['val']
        # each split as a flat store [classes * 20, 1, s, s] and the table of its classes' positions
        self.data, self.index_table, self.counts = {}, {}, {}
        for mode, ids in self.class_ids.items():
            split = images[ids]
            if mode == 'train' and rotate:
                split = torch.cat([split.rot90(k, dims=(-2, -1)) for k in range(4)])
                self.class_ids[mode] = ids.repeat(4)
            if n_way > len(split):
                raise FlagError(f"n_way={n_way} is more than the {len(split)} Omniglot {mode} classes; "
                                 f"lower --n_way.")
            self.data[mode] = split.reshape(-1, 1, imgsz, imgsz).to(self.device)
            self.index_table[mode] = torch.arange(len(split) * DRAWINGS, device=self.device).view(-1, DRAWINGS)
            self.counts[mode] = torch.full((len(split),), DRAWINGS, device=self.device)
        self.generators = {mode: torch.Generator(self.device) for mode in self.data}
        for i, mode in enumerate(self.data):
            self.reset(mode, seed + i)

    def reset(self, mode, seed):
        """Restart the episode stream of `mode` (e.g. to evaluate on the same tasks every time)."""
        self.generators[mode].manual_seed(seed)

    def state_dict(self):
        return {mode: g.get_state() for mode, g in self.generators.items()}

    def load_state_dict(self, state):
        for mode, g in self.generators.items():
            g.set_state(state[mode])

    def next(self, mode='train', return_indices=False):
        """One meta-batch of `batchsz` tasks from the `mode` classes. With return_indices, also
        `classes` [b, n_way] (label j of task i is class classes[i, j] of this split) and the
        positions of the support and query images in self.data[mode]."""
        classes, spt, y_spt, qry, y_qry = draw_tasks(self.index_table[mode], self.counts[mode], self.batchsz,
                                                     self.n_way, self.k_shot, self.k_query, self.generators[mode])
        x_spt, x_qry = (self.data[mode][i].float().div_(255) for i in (spt, qry))
        batch = (x_spt, y_spt, x_qry, y_qry)
        return batch + (classes, spt, qry) if return_indices else batch
