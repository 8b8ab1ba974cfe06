"""
Classify images with a meta-learned checkpoint, after adapting it to a few labelled examples.

    python classify.py checkpoints/best.pth --support support/ photo.jpg more_photos/
    python classify.py checkpoints/best.pth --support support/ queries/ --steps 10 --json predictions.json
    python classify.py checkpoints/best.pth --support support/ queries/ --csv -      # CSV on stdout

support/ holds one folder per class, named as the class, with one or more images each (any number
of shots, not necessarily equal); at least two classes and at most the n_way outputs of the
checkpoint's head (with fewer, the first outputs serve them, as in evaluate.py --n_way). The
meta-learned weights take --steps SGD steps (default: the checkpoint's update_step_test) on the
support images; then every query image (a file, or every image in a folder) gets the support
class of highest probability. Any checkpoint of the three training scripts works: images are
decoded to its channels, size and normalisation by the decoder its training cache used
(folder.checkpoint_format), so the network sees them as it saw its training images.

Batch norm normalises each batch with the batch's own statistics, in training and evaluation alike
(the paper's transductive setting), so the queries are classified together, --batch_size at a time
(default: the checkpoint's evaluation query set, n_way * k_qry_test images), and one image's
prediction can depend on the images classified beside it.

In a notebook:

    from classify import FewShotClassifier
    clf = FewShotClassifier('checkpoints/best.pth', device='cpu')
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
from maml.folder import LAYOUTS_HELP, checkpoint_format, counted, find_classes, listing, not_images_note, walk
from maml.imagecache import UNREADABLE, normalize, undecodable
from maml.presets import DEFAULTS
from maml.trainer import run_main
from meta import Meta


class FewShotClassifier:
    """A checkpoint's learner, adapted to support classes by `adapt`, classifying image files."""

    def __init__(self, checkpoint, device='cpu', steps=None, batch_size=None):
        self.device = available_device(device)
        ckpt = load_checkpoint(checkpoint, map_location=self.device)
        self.format, self.maml = checkpoint_format(ckpt), Meta.from_state(ckpt)
        self.scale, self.shift = self.format.normalizer(self.device)
        self.n_way = ckpt['config'][-1][1][0]
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
        """Fine-tune on the support set: a folder of class folders, or {class name: [image paths]}."""
        if isinstance(support, (str, os.PathLike)):
            if not os.path.isdir(support):
                raise MissingError(f"the support folder {support} does not exist; pass --support a folder holding "
                                   f"one folder of images per class.")
            support, others = find_classes(os.fspath(support))
            if others:
                print(not_images_note(others, 'of the support folder'), file=sys.stderr)
        if not 2 <= len(support) <= self.n_way:
            raise FlagError(f"the support set has {counted(len(support), 'class', 'classes')}, but this checkpoint "
                            f"tells apart 2 to {self.n_way} (its head's outputs); give it 2 to {self.n_way} class "
                            f"folders ({LAYOUTS_HELP}).")
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
                                            self.steps)[:, :len(self.classes)].float().softmax(-1).cpu()
                          for start in range(0, len(paths), self.batch_size)])

    def classify(self, queries):
        """[(path, class, its probability, {class: probability})] of each image among queries (files,
        or folders of images)."""
        paths = query_paths(queries)
        probabilities = self.probabilities(paths)
        best = probabilities.max(-1)
        return [(path, self.classes[c], p, dict(zip(self.classes, probs))) for path, c, p, probs in
                zip(paths, best.indices.tolist(), best.values.tolist(), probabilities.tolist())]


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
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument('checkpoint', help='a .pth written by one of the training scripts')
    p.add_argument('queries', nargs='+', metavar='QUERY', help='image files, or folders of images, to classify')
    p.add_argument('--support', required=True, help='a folder with one folder of images per class')
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
    clf = FewShotClassifier(flags.checkpoint, flags.device, flags.steps, flags.batch_size)
    tune(clf.device)
    rows = clf.adapt(flags.support).classify(flags.queries)
    if flags.csv != '-' and flags.json != '-':
        print(f"{flags.checkpoint} adapted to {len(clf.classes)} classes of {flags.support} in {clf.steps} steps, "
              f"images as {clf.format.describe()}; {device_name(clf.device)}, torch {torch.__version__}")
        width = max(len(path) for path, *_ in rows)
        for path, label, p, _ in rows:
            print(f'{path:{width}}  {label}  {p:.3f}')
    if flags.csv or flags.json:
        write(rows, clf.classes, flags.csv or flags.json, 'csv' if flags.csv else 'json')
    return rows


if __name__ == '__main__':
    run_main(lambda: main(sys.argv[1:]))
