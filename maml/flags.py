"""
The flags of the training scripts: the common ones, presets (presets.py), and what --resume does
with them. A resumed run takes its settings from the checkpoint, as nanoGPT does, and refuses a
flag that would make it another run.

    parser = make_parser('Meta-train MAML on Omniglot', 'omniglot', DATA_ROOT)
    parser.add_argument('--rotate', ...)          # the script's own flags
    args = parse_args(parser, 'omniglot')         # preset, checkpoint settings on --resume, checks
    args.resume_ckpt                              # the loaded checkpoint, or None
"""
import argparse
import copy
import os
import sys

import torch

from .checkpoints import load_checkpoint
from .errors import FlagError
from .family import ALGOS, HEADS
from .presets import DEFAULTS, HPARAMS, PRESETS

# Flags a resumed run may change: where and how fast it runs, how long (and so where a cosine schedule
# ends), how often it reports. Any other flag defines the run, so it is taken from the checkpoint, and
# giving it another value is refused. Those of OPERATIONAL that are not given are taken from the
# checkpoint too, except the machine's own (MACHINE): they keep this machine's defaults, so a GPU run
# resumes on a CPU-only one, and the time budget of one part of a run does not end the next part.
OPERATIONAL = {'epoch', 'time_budget', 'log_every', 'eval_every', 'device', 'data', 'save_dir', 'resume',
               'compile', 'amp', 'test_tasks', 'keep', 'cache_dir', 'total_steps'}
MACHINE = {'device', 'compile', 'amp', 'resume', 'save_dir', 'time_budget', 'cache_dir'}
MIN_IMGSZ = 16   # both networks halve the image four times


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends a flag's default to its help unless there is none or the help already states it."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False or '(default' in (action.help or ''):
            return action.help
        return super()._get_help_string(action)


def make_parser(description, dataset, data_root):
    """The flags both scripts take, with `dataset`'s defaults from presets.py."""
    p = argparse.ArgumentParser(description=description, allow_abbrev=False,
                                formatter_class=HelpFormatter)
    p.add_argument('--preset', choices=sorted(PRESETS[dataset]),
                   help="all settings of one of the paper's experiments (presets.py); explicit flags override")
    p.add_argument('--epoch', type=int, help='meta-training steps')
    p.add_argument('--time_budget', type=float,
                   help='minutes of wall-clock time from the first training step of this invocation '
                        '(evaluations included, earlier parts of a resumed run not) after which the run '
                        'evaluates, saves and ends as at --epoch; checked every --log_every steps')
    p.add_argument('--n_way', type=int, help='classes per task')
    p.add_argument('--k_spt', type=int, help='support images per class')
    p.add_argument('--k_qry', type=int, help='query images per class in training')
    p.add_argument('--k_qry_test', type=int, help='query images per class when evaluating (None: k_qry)')
    p.add_argument('--imgsz', type=int, help='image side in pixels')
    p.add_argument('--task_num', type=int, help='tasks per meta-batch')
    p.add_argument('--meta_lr', type=float, help='Adam learning rate of the meta-update (beta)')
    p.add_argument('--update_lr', type=float, help='inner SGD learning rate (alpha), on the mean cross-entropy')
    p.add_argument('--update_step', type=int, help='inner steps in meta-training')
    p.add_argument('--update_step_test', type=int, help='inner steps when evaluating')
    p.add_argument('--num_filters', type=int, help='channels of each conv layer')
    p.add_argument('--first_order', action='store_true', help='first-order MAML (no second derivatives)')
    p.add_argument('--algo', choices=ALGOS,
                   help='anil: adapt only the last layer; metasgd: learned per-weight inner rates; reptile: '
                        'meta-gradient theta - mean adapted weights (see maml/family.py)')
    p.add_argument('--head', choices=HEADS,
                   help="what the last layer starts each task from: learned (the paper's, for --n_way classes); zero, "
                        "unicorn (one learned row copied per class) or proto (the support set's class means) also "
                        "serve any number of classes at test (docs/heads.md)")
    p.add_argument('--msl_steps', type=int,
                   help="MAML++ MSL: weight every inner step's query loss, annealed to the last over this many steps (0: off)")
    p.add_argument('--da_steps', type=int,
                   help='MAML++ DA: first-order for this many meta-steps, then second-order (0: off)')
    p.add_argument('--lslr', action='store_true', help='MAML++ LSLR: learned inner rate per layer and step')
    p.add_argument('--bnwb', action='store_true', help='MAML++ BNWB: batch-norm weights and biases per inner step')
    p.add_argument('--bnrs', action='store_true',
                   help='MAML++ BNRS: per-step batch-norm running statistics, used in evaluation')
    p.add_argument('--cosine', action='store_true', help='MAML++ CA: cosine annealing of --meta_lr to --min_meta_lr')
    p.add_argument('--min_meta_lr', type=float, help='where --cosine ends')
    p.add_argument('--total_steps', type=int, help='meta-steps that --cosine anneals over (default: --epoch)')
    p.add_argument('--compile', nargs='?', const='default', metavar='MODE',
                   help="torch.compile the meta-step; MODE 'reduce-overhead' adds CUDA graphs")
    p.add_argument('--amp', action='store_true', help='bf16 autocast on CUDA (fp32 master weights)')
    p.add_argument('--grad_clip', type=float, help='clip the meta-gradient norm (0: off)')
    p.add_argument('--data', default=data_root, help='data root (see README, Data)')
    p.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu',
                   help='torch device to train on: cpu, cuda, cuda:1, ...')
    p.add_argument('--seed', type=int, default=222, help='seed of the initial weights and the training tasks')
    p.add_argument('--log_every', type=int, help='steps between training log lines')
    p.add_argument('--eval_every', type=int, help='steps between evaluations')
    p.add_argument('--eval_tasks', type=int, help='tasks per evaluation')
    p.add_argument('--test_tasks', type=int, default=600, help='test tasks of the final report of best.pth')
    p.add_argument('--save_dir', default='checkpoints', help='folder of this run\'s checkpoints and metrics')
    p.add_argument('--keep', type=int, default=3, help='ranked checkpoints kept, best first')
    p.add_argument('--resume', help='checkpoint to continue from, e.g. checkpoints/last.pth')
    p.set_defaults(**{**HPARAMS, **DEFAULTS[dataset]})
    return p


def explicit_flags(parser, argv):
    """The dests of the flags given on the command line (not filled in from defaults)."""
    bare = copy.deepcopy(parser)
    for action in bare._actions:
        action.default = argparse.SUPPRESS
    bare._defaults.clear()   # what set_defaults added
    return set(vars(bare.parse_args(argv)))


def parse_args(parser, dataset, argv=None):
    """Parse the flags; apply --preset; on --resume take the run's settings from its checkpoint
    (refusing any flag that contradicts it); check the values. Returns the Namespace, with
    `resume_ckpt` set to the loaded checkpoint or None."""
    argv = sys.argv[1:] if argv is None else argv
    args, given = parser.parse_args(argv), explicit_flags(parser, argv)
    args.resume_ckpt = None
    if args.resume:
        ckpt = load_checkpoint(args.resume, map_location='cpu')
        saved = ckpt.get('args')
        if saved is None or saved.get('dataset', dataset) != dataset:
            raise FlagError(f"{args.resume} was not written by {dataset}'s training script, so it "
                            f"cannot be resumed here; use the script that wrote it.")
        for name, value in saved.items():
            if name in MACHINE or not hasattr(args, name) or (name in OPERATIONAL and name in given):
                continue
            if name in given and getattr(args, name) != value:
                raise FlagError(f"--{name} {getattr(args, name)} differs from the {value} that {args.resume} "
                                f"was trained with; a resumed run keeps its settings, so drop --{name} or "
                                f"start a new run in another --save_dir.")
            setattr(args, name, value)
        for name in sorted(given - OPERATIONAL - saved.keys()):   # flags newer than the checkpoint
            if getattr(args, name) != parser.get_default(name):
                raise FlagError(f"--{name} {getattr(args, name)} would change {args.resume}, whose run predates "
                                f"--{name} and so ran as its default {parser.get_default(name)}; drop --{name} "
                                f"or start a new run in another --save_dir.")
        if 'data' not in given and not os.path.exists(args.data):   # the run moved to another machine
            args.data = parser.get_default('data')
        if args.epoch <= ckpt['step']:
            raise FlagError(f"--epoch {args.epoch} is not beyond step {ckpt['step']}, where {args.resume} "
                            f"stopped; pass a larger --epoch to train on.")
        args.resume_ckpt = ckpt
        if 'save_dir' not in given:   # continue in the folder the checkpoint came from
            args.save_dir = os.path.dirname(args.resume) or '.'
    elif args.preset:
        for name, value in PRESETS[dataset][args.preset].items():
            if name not in given:
                setattr(args, name, value)
    args.dataset = dataset
    check_args(args)
    return args


def check_args(args):
    """Refuse impossible values. None is a value folder_train.py decides from the images (presets.FOLDER);
    it checks them again once it has."""
    for name in ('epoch', 'n_way', 'k_spt', 'k_qry', 'task_num', 'update_step', 'update_step_test',
                 'num_filters', 'log_every', 'eval_every', 'eval_tasks', 'test_tasks', 'keep'):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise FlagError(f"--{name} is {getattr(args, name)} but must be at least 1.")
    if args.time_budget is not None and not args.time_budget > 0:
        raise FlagError(f"--time_budget is {args.time_budget} minutes but must be positive.")
    if args.k_qry_test is not None and args.k_qry_test < 1:
        raise FlagError(f"--k_qry_test is {args.k_qry_test} but must be at least 1.")
    if args.n_way < 2:
        raise FlagError("--n_way must be at least 2: a task needs two classes to tell apart.")
    if args.imgsz is not None and args.imgsz < MIN_IMGSZ:
        raise FlagError(f"--imgsz {args.imgsz} is too small: the network halves the image four times, "
                        f"so use at least {MIN_IMGSZ}.")
    for name in ('meta_lr', 'update_lr'):
        if getattr(args, name) is not None and not getattr(args, name) > 0:
            raise FlagError(f"--{name} is {getattr(args, name)} but must be positive.")
    if args.cosine and args.total_steps is not None and args.total_steps < args.epoch:
        raise FlagError(f"--epoch {args.epoch} goes past --total_steps {args.total_steps}, where the --cosine schedule of "
                        f"--meta_lr ends and would climb again; pass --total_steps {args.epoch} (or leave it out: "
                        f"the schedule then ends at --epoch), or a smaller --epoch.")
    if args.grad_clip < 0:
        raise FlagError(f"--grad_clip is {args.grad_clip}; use 0 (off) or a positive norm.")
