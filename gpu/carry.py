"""
Move data to a CUDA machine: the inputs of gpu/plan.py's checks, and a data set in checksummed parts.
The parts fit a transfer that bounds the size of a file or an upload; they are joined there whole.

    python gpu/carry.py prepare                                       # the Omniglot cache, a mini-ImageNet sample
    python gpu/carry.py split ../shared/data/miniimagenet .gpu/parts  # parts of at most 60 MB
    python gpu/carry.py keep .gpu/parts/2 .gpu/kept                   # on the CUDA machine, as each part arrives
    python gpu/carry.py join .gpu/kept data/miniimagenet              # there, once all have arrived

prepare makes what gpu/plan.py's checks read: data/omniglot/omniglot_28_official.pt (decoded from
the official zips, copied from $MAML_DATA/omniglot, default ../shared/data beside the repository,
when data/omniglot has neither) and .gpu/mini-sample/, a few real classes of each mini-ImageNet
split in the loader's layout; both are small enough to copy with the repository.

`split` cuts the files listed in the source's SHA256SUMS (each checked against it first) into
consecutive parts of at most --max-mb MB, one folder per part (<dest>/1/, <dest>/2/, ...), each
with manifest.json: every part's and every whole file's size and SHA-256. Where each upload also
holds other files (the repository, say), leave room for them in --max-mb. On the CUDA machine
`keep` checks a part folder as it arrives and moves its part into the folder of kept parts, so
that a part damaged on the way is sent again at once and the next part can arrive in the same place.
`join` checks every part's checksum, rebuilds and checks every whole file, unpacks the archives and
lays out <dest>/images/*.jpg and the CSVs, checks that every CSV row has its image, and only then
renames the result into place: <dest> appears whole or not at all.
"""
import argparse
import csv
import hashlib
import json
import os
import shutil
import sys
import tarfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))   # the repository's modules
import omniglot_train
from maml.errors import DamagedError, FlagError, MissingError
from maml.folder import read_split
from maml.trainer import run_main
from omniglotNShot import load_images

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.environ.get('MAML_DATA', os.path.join(REPO, '..', 'shared', 'data'))
OMNIGLOT_ROOT = omniglot_train.DATA_ROOT
OMNIGLOT_ZIPS = ('images_background.zip', 'images_evaluation.zip')
MINI_SAMPLE = os.path.join(REPO, '.gpu', 'mini-sample')
SAMPLE_CLASSES, SAMPLE_PER_CLASS = 5, 20   # per split: enough for the plan's 5-way 1-shot check
MANIFEST, SUMS = 'manifest.json', 'SHA256SUMS'
ARCHIVE_SUFFIXES = ('.tar.gz', '.tgz', '.tar')
BLOCK = 1 << 20


def format_mb(n_bytes):
    """n_bytes in MB of 10^6 bytes, as --max-mb counts them."""
    return f'{n_bytes / 1e6:.1f} MB'


def sha256(path):
    """The SHA-256 of the file at path, as hex."""
    digest = hashlib.sha256()
    with open(path, 'rb') as f:
        while block := f.read(BLOCK):
            digest.update(block)
    return digest.hexdigest()


def staged(dest, what):
    """A fresh scratch folder beside dest, named for this process, into which `what` is built."""
    scratch = f'{dest.rstrip(os.sep)}.{what}-{os.getpid()}'
    shutil.rmtree(scratch, ignore_errors=True)   # left by a dead process that had our pid
    os.makedirs(scratch)
    return scratch


def refuse_existing(dest):
    """Raise one sentence if dest exists: nothing is laid out over an earlier result."""
    if os.path.exists(dest):
        raise FlagError(f"{dest} already exists; delete it or pass another destination, so that nothing "
                        f"in it is overwritten.")


# prepare -------------------------------------------------------------------------------------------

def prepare(shared):
    """The Omniglot cache and the mini-ImageNet sample gpu/plan.py's checks read; returns their paths."""
    cache = os.path.join(OMNIGLOT_ROOT, 'omniglot_28_official.pt')
    if not os.path.exists(cache) and not all(os.path.exists(os.path.join(OMNIGLOT_ROOT, z)) for z in OMNIGLOT_ZIPS):
        os.makedirs(OMNIGLOT_ROOT, exist_ok=True)
        for name in OMNIGLOT_ZIPS:
            source = os.path.join(shared, 'omniglot', name)
            if not os.path.exists(source):
                raise MissingError(f"{source} does not exist; set MAML_DATA to the folder holding omniglot/ "
                                   f"and miniimagenet/.")
            shutil.copyfile(source, os.path.join(OMNIGLOT_ROOT, name))
    load_images(OMNIGLOT_ROOT, 28, 'official', download=False)
    if not os.path.isdir(MINI_SAMPLE):
        sample_miniimagenet(os.path.join(shared, 'miniimagenet'), MINI_SAMPLE)
    return [cache, MINI_SAMPLE]


def sample_miniimagenet(source, dest, n_classes=SAMPLE_CLASSES, per_class=SAMPLE_PER_CLASS):
    """dest/images/*.jpg and dest/{train,val,test}.csv: the first n_classes classes of each split of
    the source's archives, per_class images each, read from the archives without unpacking the rest."""
    refuse_existing(dest)
    scratch = staged(dest, 'sampling')
    try:
        os.makedirs(os.path.join(scratch, 'images'))
        for mode in ('train', 'val', 'test'):
            sample_split(source, mode, scratch, n_classes, per_class)
            read_split(scratch, mode)   # the loader's own check of the layout
        os.rename(scratch, dest)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def sample_split(source, mode, dest, n_classes, per_class):
    """dest/images/ and dest/<mode>.csv of one split: its first n_classes classes, per_class images each."""
    with open(os.path.join(source, f'{mode}.csv'), newline='') as f:
        header, *rows = list(csv.reader(f))
    by_class = {}
    for name, label in rows:
        by_class.setdefault(label, []).append(name)
    chosen = [(name, label) for label in list(by_class)[:n_classes] for name in by_class[label][:per_class]]
    wanted = {name for name, _ in chosen}
    with tarfile.open(os.path.join(source, f'images_{mode}.tar.gz')) as tar:
        for member in tar:
            name = os.path.basename(member.name)
            if member.isfile() and name in wanted:
                with tar.extractfile(member) as image, open(os.path.join(dest, 'images', name), 'wb') as out:
                    shutil.copyfileobj(image, out)
                wanted.discard(name)
                if not wanted:
                    break
    if wanted:
        raise DamagedError(f"images_{mode}.tar.gz in {source} lacks {len(wanted)} images its CSV lists "
                           f"(first: {sorted(wanted)[0]}); replace it with the release's archive.")
    with open(os.path.join(dest, f'{mode}.csv'), 'w', newline='') as f:
        csv.writer(f, lineterminator='\n').writerows([header, *chosen])


# split, keep, join ---------------------------------------------------------------------------------

def listed_files(source):
    """(name, sha256) of every line of source/SHA256SUMS, in its order."""
    sums = os.path.join(source, SUMS)
    if not os.path.isfile(sums):
        raise MissingError(f"{source} has no {SUMS}, which names the files to split and their checksums; "
                           f"split the data set's own folder, or write one there with `sha256sum FILE ... > {SUMS}`.")
    with open(sums) as f:
        return [(name.lstrip('*'), digest) for digest, name in (line.split(None, 1) for line in f.read().split('\n')
                                                                if line.strip())]


def blocks(paths):
    """The bytes of the files at paths, one after another, in blocks."""
    for path in paths:
        with open(path, 'rb') as f:
            while block := f.read(BLOCK):
                yield block


class PartWriter:
    """Writes a byte stream as consecutive parts of at most max_bytes: folder/<k>/<stem>.part<k>."""

    def __init__(self, folder, stem, max_bytes):
        self.folder, self.stem, self.max_bytes = folder, stem, max_bytes
        self.parts, self.file, self.digest = [], None, None

    def write(self, data):
        """Append data, starting a new part whenever the current one is full."""
        while data:
            if self.file is None or self.file.tell() == self.max_bytes:
                self._next()
            room = self.max_bytes - self.file.tell()
            self.file.write(data[:room])
            self.digest.update(data[:room])
            data = data[room:]

    def _next(self):
        """Close the current part and open the next one, in a folder of its own."""
        self.close()
        k = len(self.parts) + 1
        os.makedirs(os.path.join(self.folder, str(k)))
        self.file = open(os.path.join(self.folder, str(k), f'{self.stem}.part{k}'), 'wb')
        self.digest = hashlib.sha256()

    def close(self):
        """Finish the part being written; returns the parts' entries (name, bytes, sha256)."""
        if self.file is not None:
            self.file.close()
            self.parts.append({'name': os.path.basename(self.file.name), 'bytes': os.path.getsize(self.file.name),
                               'sha256': self.digest.hexdigest()})
            self.file = None
        return self.parts


def split(source, dest, max_mb=60, names=None):
    """Cut the files of source/SHA256SUMS (or those of them named), each checked against it, into
    parts of at most max_mb MB under dest/1/, dest/2/, ...; returns the manifest."""
    max_bytes = int(max_mb * 1e6)
    if max_bytes < 1:
        raise FlagError(f"--max-mb {max_mb:g} gives no room for a part; pass a positive size such as 60.")
    listed = dict(listed_files(source))
    unknown = [n for n in names or () if n not in listed]
    if unknown:
        raise FlagError(f"{unknown[0]} is not listed in {os.path.join(source, SUMS)}; name files it lists.")
    refuse_existing(dest)
    stem = os.path.basename(os.path.normpath(source))
    scratch = staged(dest, 'splitting')
    writer, files = PartWriter(scratch, stem, max_bytes), []
    try:
        for name in names or listed:
            digest = hashlib.sha256()
            for block in blocks([os.path.join(source, name)]):
                digest.update(block)
                writer.write(block)
            if digest.hexdigest() != listed[name]:
                raise DamagedError(f"{os.path.join(source, name)} does not match its SHA-256 in {SUMS}; the "
                                   f"source is damaged, so replace it with the release's file before splitting.")
            files.append({'name': name, 'bytes': os.path.getsize(os.path.join(source, name)), 'sha256': listed[name]})
        manifest = {'name': stem, 'split_into': dest, 'files': files, 'parts': writer.close()}
        for k in range(1, len(manifest['parts']) + 1):
            with open(os.path.join(scratch, str(k), MANIFEST), 'w') as f:
                json.dump(manifest, f, indent=1)
    except BaseException:
        writer.close()
        shutil.rmtree(scratch, ignore_errors=True)
        raise
    os.rename(scratch, dest)
    return manifest


def read_manifest(folder, what):
    """folder's manifest.json, or one sentence saying that folder is not `what` and what to pass instead."""
    path = os.path.join(folder, MANIFEST)
    if not os.path.isfile(path):
        raise MissingError(f"{folder} holds no {MANIFEST}, so it is not {what}; " + (
            "pass a part folder made by `python gpu/carry.py split`." if what == 'a part folder' else
            "keep each part there first with `python gpu/carry.py keep`."))
    with open(path) as f:
        return json.load(f)


def check_part(manifest, k, path):
    """Raise one sentence unless part k (1-based) of the manifest is at path, whole."""
    entry, n = manifest['parts'][k - 1], len(manifest['parts'])
    send_again = f"send {manifest['split_into']}/{k} again and keep it with `python gpu/carry.py keep`"
    if not os.path.isfile(path):
        raise MissingError(f"part {k} of {n} ({entry['name']}) is missing from {os.path.dirname(path)}; "
                           f"{send_again.replace(' again', '')}.")
    got = sha256(path)
    if got != entry['sha256']:
        raise DamagedError(f"part {k} of {n} ({path}) has SHA-256 {got[:16]}..., not the manifest's "
                           f"{entry['sha256'][:16]}...: it was damaged on the way; delete it, then {send_again}.")


def keep(part_folder, kept):
    """Check the part in part_folder against its manifest and move it into kept; returns the
    numbers of the parts kept has now."""
    manifest = read_manifest(part_folder, 'a part folder')
    names = [p['name'] for p in manifest['parts']]
    here = [name for name in os.listdir(part_folder) if name in names]
    if len(here) != 1:
        raise MissingError(f"{part_folder} holds {len(here)} of the parts its manifest lists instead of one; "
                           f"pass one part folder made by `python gpu/carry.py split`.")
    k = names.index(here[0]) + 1
    check_part(manifest, k, os.path.join(part_folder, here[0]))
    os.makedirs(kept, exist_ok=True)
    if os.path.isfile(os.path.join(kept, MANIFEST)):
        if read_manifest(kept, 'a folder of kept parts') != manifest:
            raise FlagError(f"{kept} holds parts of another split (its {MANIFEST} differs); delete {kept} or "
                            f"keep these parts in another folder.")
    else:
        shutil.copyfile(os.path.join(part_folder, MANIFEST), os.path.join(kept, MANIFEST))
    os.replace(os.path.join(part_folder, here[0]), os.path.join(kept, here[0]))
    return [i + 1 for i, name in enumerate(names) if os.path.isfile(os.path.join(kept, name))]


def join(kept, dest):
    """Check every part in kept, rebuild and check every whole file, and lay out dest from them
    (archives unpacked, other files beside what they unpack to, SHA256SUMS left out)."""
    manifest = read_manifest(kept, 'a folder of kept parts')
    if os.path.isdir(dest) and in_place(manifest, dest):
        return False
    refuse_existing(dest)
    parts = [os.path.join(kept, p['name']) for p in manifest['parts']]
    for k, path in enumerate(parts, 1):
        check_part(manifest, k, path)
    scratch = staged(dest, 'joining')
    try:
        whole = rebuild(manifest, parts, os.path.join(scratch, 'files'))
        unpacked = os.path.join(scratch, 'unpacked')
        for path in whole:
            if path.endswith(ARCHIVE_SUFFIXES):
                with tarfile.open(path) as tar:
                    tar.extractall(unpacked, filter='data')
        tops = os.listdir(unpacked) if os.path.isdir(unpacked) else []
        if len(tops) != 1:
            raise DamagedError(f"the archives of {kept} unpack to {len(tops)} top folders instead of one "
                               f"({', '.join(sorted(tops)) or 'none'}); split the data set's own files.")
        layout = os.path.join(unpacked, tops[0])
        for path in whole:
            if not path.endswith(ARCHIVE_SUFFIXES) and os.path.basename(path) != SUMS:
                shutil.copyfile(path, os.path.join(layout, os.path.basename(path)))
        for name in os.listdir(layout):
            if name.endswith('.csv'):
                read_split(layout, name[:-len('.csv')])   # every row's image is there
        os.rename(layout, dest)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return True


def rebuild(manifest, parts, folder):
    """The whole files of the manifest, cut back out of the concatenated parts into folder and checked."""
    os.makedirs(folder)
    stream, pending, paths = blocks(parts), b'', []
    for entry in manifest['files']:
        path, left, digest = os.path.join(folder, entry['name']), entry['bytes'], hashlib.sha256()
        with open(path, 'wb') as out:
            while left:
                if not pending:
                    pending = next(stream, b'')
                    if not pending:
                        raise DamagedError(f"the parts end before {entry['name']} is whole; the manifest does "
                                           f"not belong to these parts, so split again.")
                piece, pending = pending[:left], pending[left:]
                out.write(piece)
                digest.update(piece)
                left -= len(piece)
        if digest.hexdigest() != entry['sha256']:
            raise DamagedError(f"{entry['name']} rebuilt from the parts does not match its SHA-256; the parts "
                               f"do not belong to this manifest, so split again.")
        paths.append(path)
    return paths


def in_place(manifest, dest):
    """Whether dest already holds this manifest's join: its loose files, checked, and their rows' images."""
    loose = [f for f in manifest['files'] if not f['name'].endswith(ARCHIVE_SUFFIXES) and f['name'] != SUMS]
    for entry in loose:
        path = os.path.join(dest, entry['name'])
        if not os.path.isfile(path) or sha256(path) != entry['sha256']:
            return False
    for entry in loose:
        if entry['name'].endswith('.csv'):
            read_split(dest, entry['name'][:-len('.csv')])
    return True


def main(argv=None):
    """The four commands: prepare, split, keep, join."""
    p = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0], allow_abbrev=False)
    sub = p.add_subparsers(dest='command', required=True)
    sub.add_parser('prepare', help="the Omniglot cache and a mini-ImageNet sample that gpu/plan.py's checks read")
    s = sub.add_parser('split', help="cut a data set's files into parts")
    s.add_argument('source', help='a folder with SHA256SUMS, e.g. ../shared/data/miniimagenet')
    s.add_argument('dest', help='folder of the parts, e.g. .gpu/parts (must not exist)')
    s.add_argument('--max-mb', type=float, default=60,
                   help='largest part, in MB of 10^6 bytes, for a transfer that bounds the size of a file or upload')
    s.add_argument('--files', nargs='+', help='only these files of SHA256SUMS')
    k = sub.add_parser('keep', help='check a part folder that has arrived and move its part into the kept folder')
    k.add_argument('part_folder')
    k.add_argument('kept')
    j = sub.add_parser('join', help='check all parts and lay out the data set')
    j.add_argument('kept')
    j.add_argument('dest', help='e.g. data/miniimagenet (must not exist)')
    args = p.parse_args(argv)
    if args.command == 'prepare':
        paths = prepare(SHARED)
        sizes = {path: sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)
                 if os.path.isdir(path) else os.path.getsize(path) for path in paths}
        print('made: ' + ', '.join(f'{os.path.relpath(path, REPO)} ({format_mb(size)})' for path, size in sizes.items())
              + "; copy them to the same paths of the repository's copy on the CUDA machine")
    elif args.command == 'split':
        manifest = split(args.source, args.dest, args.max_mb, args.files)
        print(f"{len(manifest['files'])} files, {format_mb(sum(f['bytes'] for f in manifest['files']))}, in "
              f"{len(manifest['parts'])} parts: " + ', '.join(f"{args.dest}/{i} ({format_mb(p['bytes'])})"
                                                            for i, p in enumerate(manifest['parts'], 1)))
    elif args.command == 'keep':
        have, n = keep(args.part_folder, args.kept), len(read_manifest(args.kept, 'a folder of kept parts')['parts'])
        missing = sorted(set(range(1, n + 1)) - set(have))
        print(f"{args.kept} holds {len(have)} of {n} parts" + (f"; still to send: {missing}" if missing else
                                                                "; all there: join them"))
    elif args.command == 'join':
        print(f'{args.dest}: ' + ('laid out, every checksum checked' if join(args.kept, args.dest) else
                                  'already in place (its files match the manifest)'))


if __name__ == '__main__':
    run_main(lambda: main(sys.argv[1:]))
