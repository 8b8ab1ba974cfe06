"""
Meta-train MAML on your own folder of images (N-way K-shot classification of its classes).

    python folder_train.py --data ~/microscope                   # defaults that suit the images found
    python folder_train.py --data ~/microscope --k_spt 5 --time_budget 60
    python folder_train.py --data ~/microscope --preset paper-5w1s   # mini-ImageNet's protocol (maml/presets.py)
    python folder_train.py --resume checkpoints/last.pth
    torchrun --standalone --nproc_per_node=4 folder_train.py --data ~/microscope --task_num 32   # maml/distributed.py

--data holds class folders of images (maml/folder.py): in train/ val/ test/ folders, listed by
train.csv val.csv test.csv, or else split by --split_fractions of the classes with --split_seed.
Images become --channels channels (auto: 1 when every image is grey, else 3) of --imgsz pixels,
decoded once into a uint8 cache under --cache_dir, normalised by the mean and std of the training
classes' pixels. Defaults that no flag or preset sets are mini-ImageNet's (84x84, its max-pool
network), or Omniglot's for line drawings (every image 1-bit: 28x28, its strided network).
Checkpoints store the classes of each split, the decoding and the pixel statistics, so that
evaluate.py and classify.py see images exactly as training did; as in miniimagenet_train.py they
are ranked on the validation classes and the selected one is reported once on the test classes.
"""
import os

import miniimagenet_train
import omniglot_train
from maml import distributed
from maml.errors import MissingError
from maml.flags import check_args, make_parser, parse_args
from maml.folder import LAYOUTS_HELP, ImageFolder
from maml.imagecache import ImageFormat
from maml.presets import PROFILES
from maml.trainer import run_main, setup_device
from meta import Meta

NETWORKS = {'miniimagenet': miniimagenet_train.network, 'omniglot': omniglot_train.network}


def channels_flag(value):
    return value if value == 'auto' else int(value)


def build_parser():
    """The common flags (flags.make_parser) and the folder's own."""
    parser = make_parser(__doc__.strip().splitlines()[0], 'folder', None)
    parser.add_argument('--channels', type=channels_flag, choices=['auto', 1, 3],
                        help='image channels: 1 (grey) or 3 (RGB); auto: 1 when every image is grey')
    parser.add_argument('--preprocess', choices=['bilinear', 'binary'],
                        help="'bilinear': grey or RGB, antialiased resize (mini-ImageNet's); 'binary': 1-bit, "
                             "nearest-neighbour resize, ink 1 on 0 (Omniglot's official preprocessing)")
    parser.add_argument('--network', choices=sorted(NETWORKS),
                        help="'miniimagenet': 4 conv + max-pool blocks; 'omniglot': 4 strided conv blocks "
                             "(None: Omniglot's for line drawings, else mini-ImageNet's)")
    parser.add_argument('--split_fractions', type=float, nargs=3, metavar=('TRAIN', 'VAL', 'TEST'),
                        help='shares of the classes for train, val and test, when the folder has no splits of its own')
    parser.add_argument('--split_seed', type=int, help='seed of that split of the classes')
    parser.add_argument('--cache_dir',
                        help='where the decoded images are cached (default: ~/.cache/maml-pytorch/folders)')
    return parser


def choose_defaults(args, folder):
    """Decide what the flags, the preset and the checkpoint left to the images (None, or channels
    'auto'): the channels, and the settings of the data set the images resemble (presets.PROFILES).
    Returns a line saying what was found and decided (None when nothing was left)."""
    if args.channels != 'auto' and all(getattr(args, name) is not None for name in PROFILES['photos']):
        return None
    looks = folder.looks()
    profile = 'drawings' if looks == 'drawings' else 'photos'
    if args.channels == 'auto':
        args.channels = 3 if looks == 'colour' else 1
    decided = {name: value for name, value in PROFILES[profile].items() if getattr(args, name) is None}
    vars(args).update(decided)
    check_args(args)
    found = {'drawings': 'every one 1-bit (line drawings)', 'grey': 'every one grey', 'colour': 'in colour'}[looks]
    return (f"images: {found}, so {args.channels} channel{'s' if args.channels > 1 else ''} and "
            f"{'Omniglot' if profile == 'drawings' else 'mini-ImageNet'}'s settings: "
            f"{', '.join(f'--{k} {v}' for k, v in decided.items()) or 'all given'}")


def main(argv=None):
    args = parse_args(build_parser(), 'folder', argv)
    saved = args.resume_ckpt and args.resume_ckpt.get('data')
    if args.data is None and saved and os.path.isdir(saved['root']):   # run from another folder than it was
        args.data = saved['root']
    if args.data is None:
        raise MissingError(f"the folder {saved['root']} that {args.resume} was trained on is not on this machine; "
                           f"pass --data where it is now." if saved else
                           f"folder_train.py needs --data, the folder that holds your class folders ({LAYOUTS_HELP}).")
    folder = ImageFolder(args.data, args.cache_dir)
    if saved:
        splits, how = folder.stored(saved['classes'], saved['layout'], args.resume), f'the splits of {args.resume}'
    else:
        splits = folder.split(args.split_fractions, args.split_seed)
        how = (f"classes split {'/'.join(f'{f:g}' for f in args.split_fractions)} by --split_seed {args.split_seed}"
               if folder.layout == 'seeded' else f"splits from its {', '.join(folder.source(s) for s in splits)}")
    decided = choose_defaults(args, folder)
    device = setup_device(args)   # once the images decided --task_num; under torchrun rank 0 alone prints from here
    if decided:
        print(decided, flush=True)
    usable = folder.usable(splits, miniimagenet_train.split_tasks(args))
    print('\n'.join(folder.describe(usable, how)), flush=True)
    fmt = (ImageFormat(**saved['format']) if saved else
           ImageFormat(args.channels, args.imgsz, args.preprocess, mean=None, std=None))   # from the train classes
    with distributed.in_turn():
        samplers, fmt = folder.samplers(usable, fmt, device, distributed.rank_seed(args.seed))
    print(f"images as {fmt.describe()}, normalised by the train classes' pixels: mean "
          f"{', '.join(f'{m:.4f}' for m in fmt.mean)}, std {', '.join(f'{s:.4f}' for s in fmt.std)}", flush=True)
    config = NETWORKS[args.network](args.n_way, args.imgsz, args.num_filters, args.channels)
    maml = Meta(args, config, imgc=args.channels).to(device)
    miniimagenet_train.meta_train(maml, samplers, args, device,
                                  data=folder.record(splits, fmt, args.split_fractions, args.split_seed))


if __name__ == '__main__':
    run_main(main)
