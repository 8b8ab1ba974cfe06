"""
Classify images with a meta-learned checkpoint, after adapting it to a few labelled examples.

    python classify.py checkpoints/best.pth --support support/ photo.jpg more_photos/
    python classify.py checkpoints/best.pth --support support/ queries/ --steps 10 --json predictions.json
    python classify.py checkpoints/best.pth --support support/ queries/ --csv -      # CSV on stdout
    python classify.py checkpoints/best.pth --support support/ queries/ --head proto # any number of classes

support/ holds one folder per class, named as the class, with one or more images each (any number
of shots, not necessarily equal), or else images only, each its own class named by its file's stem
(support/cat.jpg, support/dog.jpg: one shot each). A checkpoint trained with a zero, unicorn or
proto head takes any number of classes from two; a learned head, the paper's, at most its n_way
outputs (with fewer, its first outputs, as in evaluate.py --n_way), unless --head zero or proto
replaces it. The meta-learned weights take --steps SGD steps (default: the checkpoint's
update_step_test) on the support images; then every query image (a file, or every image in a
folder) gets the support class of highest probability. Any checkpoint of the three training scripts works: images are
decoded to its channels, size and normalisation by the decoder its training cache used
(folder.checkpoint_format), so the network sees them as it saw its training images.

Batch norm normalises each batch with the batch's own statistics, in training and evaluation alike
(the paper's transductive setting), so the queries are classified together, --batch_size at a time
(default: the checkpoint's evaluation query set, n_way * k_qry_test images), and one image's
prediction can depend on the images classified beside it.

In a notebook:

    from classify import FewShotClassifier
    clf = FewShotClassifier('checkpoints/best.pth', device='cpu')   # head='proto': any number of classes
    clf.adapt('support/')                     # or clf.adapt({'cat': ['a.jpg', 'b.jpg'], 'dog': ['c.jpg']})
    for path, label, probability, by_class in clf.classify(['x.jpg', 'queries/']):
        print(path, label, round(probability, 3))
"""
import argparse
import csv
import json
import os
import sys

import numpy as np
import torch

from maml.checkpoints import load_checkpoint
from maml.devices import available_device, device_name, tune
from maml.errors import DamagedError, FlagError, MissingError
from maml.family import TEST_HEADS
from maml.flags import HelpFormatter
from maml.folder import LAYOUTS_HELP, checkpoint_format, counted, find_classes, listing, not_images_note, walk
from maml.imagecache import UNREADABLE, normalize, undecodable
from maml.presets import DEFAULTS
from maml.trainer import run_main
from meta import Meta


class FewShotClassifier:
    """A checkpoint's learner, adapted to support classes by `adapt`, classifying image files."""

    def __init__(self, checkpoint, device='cpu', steps=None, batch_size=None, head=None):
        self.device = available_device(device)
        ckpt = load_checkpoint(checkpoint, map_location=self.device)
        self.format, self.maml = checkpoint_format(ckpt), Meta.from_state(ckpt)
        self.scale, self.shift = self.format.normalizer(self.device)
        self.head, self.trained_head = head, self.maml.head
        self.maml.serve(self.maml.n_way, head)   # a head it cannot take is named before any image is read
        args = {**DEFAULTS[ckpt['args']['dataset']], **ckpt['args']}
        self.steps = self.maml.update_step_test if steps is None else steps
        self.batch_size = batch_size or args['n_way'] * (args['k_qry_test'] or args['k_qry'])
        self.classes, self.weights = None, None

    def images(self, paths):
        """The files at paths as the network's input [n, c, s, s] on the device."""
        pixels, failures = [], []
        for path in paths:
            try:
                pixels.append(self.format.decode(path))
            except UNREADABLE as e:
                failures.append((path, e))
        if failures:
            raise DamagedError(undecodable(failures, len(paths), "replace those files or leave them out"))
        return normalize(torch.from_numpy(np.stack(pixels)).to(self.device), self.scale, self.shift)

    def adapt(self, support):
        """Fine-tune on the support set: a folder of class folders or of images only (each a class), or
        {class name: [image paths]}."""
        if isinstance(support, (str, os.PathLike)):
            support = support_classes(os.fspath(support))
        if len(support) < 2:
            raise FlagError(f"the support set has {counted(len(support), 'class', 'classes')}; a task needs at "
                            f"least 2 to tell apart, so give it 2 or more class folders or images ({LAYOUTS_HELP}).")
        self.maml.serve(len(support), self.head)
        paths = [path for files in support.values() for path in files]
        labels = torch.tensor([label for label, files in enumerate(support.values()) for _ in files],
                              device=self.device)
        self.weights = self.maml.adapt(self.images(paths), labels, self.steps)
        self.classes = list(support)
        return self

    @torch.no_grad()
    def probabilities(self, paths):
        """[len(paths), classes] probabilities of the support classes, --batch_size images at a time."""
        if self.weights is None:
            raise RuntimeError("call adapt(support) before classifying")
        return torch.cat([self.maml.predict(self.images(paths[start:start + self.batch_size]), self.weights,
                                            self.steps).float().softmax(-1).cpu()
                          for start in range(0, len(paths), self.batch_size)])

    def classify(self, queries):
        """[(path, class, its probability, {class: probability})] of each image among queries (files,
        or folders of images)."""
        paths = query_paths(queries)
        probabilities = self.probabilities(paths)
        best = probabilities.max(-1)
        return [(path, self.classes[c], p, dict(zip(self.classes, probs))) for path, c, p, probs in
                zip(paths, best.indices.tolist(), best.values.tolist(), probabilities.tolist())]


def support_classes(folder):
    """{class name: [image paths]} of a support folder: its class folders, or, when it holds images
    only, each image as a class named by its file's stem (one shot each, said on stderr)."""
    if not os.path.isdir(folder):
        raise MissingError(f"the support folder {folder} does not exist; pass --support a folder of class folders, "
                           f"or of one image per class.")
    _, images, others = next(walk(folder))
    if images and not any(inner for _, inner, _ in list(walk(folder))[1:]):
        stems = {}
        for path in images:
            stems.setdefault(os.path.splitext(os.path.basename(path))[0], []).append(path)
        twice = [paths for paths in stems.values() if len(paths) > 1]
        if twice:
            raise DamagedError(f"{folder} holds images only, each a class named by its file's stem, but "
                               f"{' and '.join(os.path.basename(p) for p in twice[0])} share one; rename one of them.")
        print(f"note: {folder} holds images only, so each is a class of its own, named by its file's stem "
              f"(one shot each).", file=sys.stderr)
    else:
        stems, others = find_classes(folder)
    if others:
        print(not_images_note(others, 'of the support folder'), file=sys.stderr)
    return stems


def query_paths(queries):
    """The image files among queries: files as given, folders as every image below them (sorted)."""
    paths, others = [], []
    for query in map(os.fspath, queries):
        if os.path.isdir(query):
            for _, images, other in walk(query):
                paths += images
                others += other
        elif os.path.isfile(query):
            paths.append(query)
        else:
            raise MissingError(f"the query {query} does not exist; pass image files or folders of images.")
    if others:
        print(not_images_note(others, 'of the query folders'), file=sys.stderr)
    if not paths:
        raise MissingError(f"no images among the queries {listing(list(map(os.fspath, queries)))}; pass image files "
                           f"or folders that hold images.")
    return paths


def write(rows, classes, path, kind):
    """The predictions as CSV or JSON, into path ('-': standard output)."""
    out = sys.stdout if path == '-' else open(path, 'w', newline='')
    try:
        if kind == 'csv':
            writer = csv.writer(out)
            writer.writerow(['path', 'class', 'probability', *(f'p({c})' for c in classes)])
            writer.writerows([path, label, f'{p:.6f}', *(f'{q:.6f}' for q in probs.values())]
                             for path, label, p, probs in rows)
        else:
            json.dump([{'path': path, 'class': label, 'probability': p, 'probabilities': probs}
                       for path, label, p, probs in rows], out, indent=1)
            out.write('\n')
    finally:
        if out is not sys.stdout:
            out.close()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0], allow_abbrev=False,
                                formatter_class=HelpFormatter)
    p.add_argument('checkpoint', help='a .pth written by one of the training scripts')
    p.add_argument('queries', nargs='+', metavar='QUERY', help='image files, or folders of images, to classify')
    p.add_argument('--support', required=True, help='a folder with one folder of images per class, or of images '
                                                     'only, each its own class named by its file\'s stem')
    p.add_argument('--head', choices=TEST_HEADS, help="adapt from this head instead of the checkpoint's own: zero or "
                                                     "proto take any number of support classes")
    p.add_argument('--steps', type=int, help="fine-tuning steps on the support set (default: the checkpoint's)")
    p.add_argument('--batch_size', type=int, help="query images classified together (default: the checkpoint's "
                                                  "evaluation query set, n_way * k_qry_test)")
    out = p.add_mutually_exclusive_group()
    out.add_argument('--csv', metavar='FILE', help="write the predictions as CSV ('-': standard output)")
    out.add_argument('--json', metavar='FILE', help="write the predictions as JSON ('-': standard output)")
    p.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu', help='torch device')
    flags = p.parse_args(argv)
    for name in ('steps', 'batch_size'):
        if getattr(flags, name) is not None and getattr(flags, name) < 1:
            raise FlagError(f"--{name} is {getattr(flags, name)} but must be at least 1.")
    clf = FewShotClassifier(flags.checkpoint, flags.device, flags.steps, flags.batch_size, flags.head)
    tune(clf.device)
    rows = clf.adapt(flags.support).classify(flags.queries)
    if flags.csv != '-' and flags.json != '-':
        head = f'{clf.maml.head} head' + (f' at test (trained with a {clf.trained_head} one)'
                                          if clf.maml.head != clf.trained_head else '')
        print(f"{flags.checkpoint} adapted to {len(clf.classes)} classes of {flags.support} in {clf.steps} steps "
              f"from a {head}, images as {clf.format.describe()}; {device_name(clf.device)}, torch {torch.__version__}")
        width = max(len(path) for path, *_ in rows)
        for path, label, p, _ in rows:
            print(f'{path:{width}}  {label}  {p:.3f}')
    if flags.csv or flags.json:
        write(rows, clf.classes, flags.csv or flags.json, 'csv' if flags.csv else 'json')
    return rows


if __name__ == '__main__':
    run_main(lambda: main(sys.argv[1:]))
