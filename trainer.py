"""
What omniglot_train.py and miniimagenet_train.py share: the common flags, device set-up,
evaluation as mean +- 95% confidence interval, checkpoints that lose nothing, and the loop.

A run writes into --save_dir:
    maml_step{step}_acc{acc:.4f}.pth   the top --keep evaluations by accuracy (others deleted)
    best.pth                           the best evaluation so far
    last.pth                           the latest evaluation, to --resume from
    metrics.csv                        one row per evaluation
Every file is written to a temporary name and renamed, so a crash never leaves half a checkpoint.
"""
import argparse
import csv
import math
import os
import re
import sys
import time

import numpy as np
import scipy.stats
import torch

from errors import FlagError, RunError, UserError
from meta import Meta, load_checkpoint


def common_args(description, **defaults):
    """The flags both scripts take; `defaults` sets each data set's own defaults."""
    p = argparse.ArgumentParser(description=description,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument('--epoch', type=int, help='meta-training steps')
    p.add_argument('--n_way', type=int, help='classes per task')
    p.add_argument('--k_spt', type=int, help='support images per class')
    p.add_argument('--k_qry', type=int, help='query images per class')
    p.add_argument('--imgsz', type=int, help='image side in pixels')
    p.add_argument('--imgc', type=int, help='image channels')
    p.add_argument('--task_num', type=int, help='tasks per meta-batch')
    p.add_argument('--meta_lr', type=float, help='Adam learning rate of the meta-update (beta)')
    p.add_argument('--update_lr', type=float, help='inner SGD learning rate (alpha)')
    p.add_argument('--update_step', type=int, help='inner steps in meta-training')
    p.add_argument('--update_step_test', type=int, help='inner steps when evaluating')
    p.add_argument('--num_filters', type=int, help='channels of each conv layer')
    p.add_argument('--first_order', action='store_true', help='first-order MAML (no second derivatives)')
    p.add_argument('--algo', default='maml', choices=['maml', 'anil', 'metasgd', 'reptile'],
                   help='anil: adapt only the last layer; metasgd: learned per-weight inner rates; reptile: '
                        'meta-gradient theta - mean adapted weights (see family.py)')
    p.add_argument('--msl_steps', type=int, default=0,
                   help="MAML++ MSL: weight every inner step's query loss, annealed to the last over this many steps (0: off)")
    p.add_argument('--da_steps', type=int, default=0,
                   help='MAML++ DA: first-order for this many meta-steps, then second-order (0: off)')
    p.add_argument('--lslr', action='store_true', help='MAML++ LSLR: learned inner rate per layer and step')
    p.add_argument('--bnwb', action='store_true', help='MAML++ BNWB: batch-norm weights and biases per inner step')
    p.add_argument('--bnrs', action='store_true',
                   help='MAML++ BNRS: per-step batch-norm running statistics, used in evaluation')
    p.add_argument('--cosine', action='store_true', help='MAML++ CA: cosine annealing of --meta_lr to --min_meta_lr')
    p.add_argument('--min_meta_lr', type=float, default=1e-5, help='where --cosine ends')
    p.add_argument('--total_steps', type=int, help='meta-steps that --cosine anneals over (default: --epoch)')
    p.add_argument('--compile', nargs='?', const='default', metavar='MODE',
                   help="torch.compile the meta-step; MODE 'reduce-overhead' adds CUDA graphs")
    p.add_argument('--amp', action='store_true', help='bf16 autocast on CUDA (fp32 master weights)')
    p.add_argument('--grad_clip', type=float, default=0.0, help='clip the meta-gradient norm (0: off)')
    p.add_argument('--data', help='data root')
    p.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    p.add_argument('--seed', type=int, default=222)
    p.add_argument('--log_every', type=int, help='steps between training log lines')
    p.add_argument('--eval_every', type=int, default=500, help='steps between evaluations')
    p.add_argument('--eval_tasks', type=int, default=600, help='tasks per evaluation')
    p.add_argument('--test_tasks', type=int, default=600,
                   help='test tasks for the final report, when checkpoints are ranked on a validation split')
    p.add_argument('--save_dir', default='checkpoints')
    p.add_argument('--keep', type=int, default=3, help='checkpoints kept, best first')
    p.add_argument('--resume', help='checkpoint to continue from, e.g. checkpoints/last.pth')
    p.set_defaults(**defaults)
    return p


def check_args(args):
    for name in ('epoch', 'n_way', 'k_spt', 'k_qry', 'imgsz', 'task_num', 'update_step',
                 'update_step_test', 'log_every', 'eval_every', 'eval_tasks', 'test_tasks', 'keep'):
        if getattr(args, name) < 1:
            raise FlagError(f"--{name} is {getattr(args, name)} but must be at least 1.")
    if args.n_way < 2:
        raise FlagError("--n_way must be at least 2: a task needs two classes to tell apart.")


def setup_device(args):
    """The torch.device of --device, seeded; on CUDA with the cuDNN autotuner and TF32 on."""
    device = torch.device(args.device)
    if device.type == 'cuda' and not torch.cuda.is_available():
        raise FlagError(f"--device {args.device} was asked for but this machine has no CUDA GPU; use --device cpu.")
    if args.amp and device.type != 'cuda':
        raise FlagError("--amp (bf16 autocast) is for CUDA devices; drop it on the CPU.")
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    if device.type == 'cuda':
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.set_float32_matmul_precision('high')
    return device


def describe(device):
    name = torch.cuda.get_device_name(device) if device.type == 'cuda' else f'CPU ({torch.get_num_threads()} threads)'
    return f'{name}, torch {torch.__version__}'


def mean_ci(accs):
    """accs [tasks, steps] -> (mean [steps], half-width of the 95% CI [steps]) with Student's t."""
    accs = np.asarray(accs, dtype=np.float64)
    n = accs.shape[0]
    half = scipy.stats.t.ppf(0.975, n - 1) * accs.std(0, ddof=1) / math.sqrt(n) if n > 1 else np.full(accs.shape[1:], np.nan)
    return accs.mean(0), half


def evaluate(maml, next_batch, n_tasks):
    """Query accuracy after each fine-tuning step on `n_tasks` tasks: a numpy array [n_tasks, steps+1]."""
    accs, n = [], 0
    while n < n_tasks:
        accs.append(maml.finetunning(*next_batch()))
        n += len(accs[-1])
    return torch.cat(accs)[:n_tasks].cpu().numpy()


def format_accs(accs):
    return ' '.join(f'{a:.3f}' for a in accs)


def atomic_save(obj, path):
    torch.save(obj, path + '.tmp')
    os.replace(path + '.tmp', path)


class Checkpoints:
    """The files of one run in `save_dir`; see the module docstring."""
    RANKED = re.compile(r'^maml_step(\d+)_acc(\d+\.\d+)\.pth$')

    def __init__(self, save_dir, keep):
        self.dir, self.keep = save_dir, keep
        os.makedirs(save_dir, exist_ok=True)
        self.ranked = sorted(((float(m[2]), int(m[1]), os.path.join(save_dir, f))
                              for f in os.listdir(save_dir) if (m := self.RANKED.match(f))), reverse=True)

    def path(self, name):
        return os.path.join(self.dir, name)

    def is_empty(self):
        return not self.ranked and not any(os.path.exists(self.path(f)) for f in ('best.pth', 'last.pth'))

    def save(self, ckpt, step, acc):
        """Write last.pth, and the ranked and best files if `acc` enters the top `keep`."""
        atomic_save(ckpt, self.path('last.pth'))
        if len(self.ranked) == self.keep and acc <= self.ranked[-1][0]:
            return
        if not self.ranked or acc > self.ranked[0][0]:
            atomic_save(ckpt, self.path('best.pth'))
        path = self.path(f'maml_step{step}_acc{acc:.4f}.pth')
        atomic_save(ckpt, path)
        self.ranked = sorted(self.ranked + [(acc, step, path)], reverse=True)
        for _, _, dropped in self.ranked[self.keep:]:
            if dropped != path and os.path.exists(dropped):
                os.remove(dropped)
        self.ranked = self.ranked[:self.keep]


class Metrics:
    """metrics.csv beside the checkpoints, one row appended per evaluation."""

    def __init__(self, path, split):
        self.path, self.fields = path, ['step', 'train_acc', f'{split}_acc', f'{split}_ci', 'ms_per_step']

    def append(self, **row):
        new = not os.path.exists(self.path)
        with open(self.path, 'a', newline='') as f:
            writer = csv.DictWriter(f, self.fields)
            if new:
                writer.writeheader()
            writer.writerow(row)


def restore(maml, loader, path, device):
    """Load a checkpoint into `maml` and the loader's sampler; returns the step it was saved at."""
    ckpt = load_checkpoint(path, map_location=device)
    try:
        maml.load_state(ckpt)   # also the family's extra meta-parameters and schedule
    except (RuntimeError, ValueError):
        raise RunError(f"{path} holds a network of another shape or options ({ckpt['hparams']}); resume with "
                           f"the flags it was trained with.") from None
    if 'sampler' in ckpt:
        loader.load_state_dict(ckpt['sampler'])
    return ckpt['step']


def fit(maml, loader, next_train_batch, validate, args, split='test'):
    """Meta-train for --epoch steps. `validate()` returns accs [tasks, steps+1] on `split`, which
    ranks the checkpoints. Returns the checkpoint store."""
    device = next(maml.parameters()).device
    ckpts = Checkpoints(args.save_dir, args.keep)
    start = 0
    if args.resume:
        start = restore(maml, loader, args.resume, device)
        print(f'resumed from {args.resume} at step {start}')
    elif not ckpts.is_empty():
        raise RunError(f"{args.save_dir} already holds checkpoints of an earlier run; continue it with "
                           f"--resume {ckpts.path('last.pth')}, or pass another --save_dir.")
    metrics = Metrics(ckpts.path('metrics.csv'), split)
    images_per_step = args.task_num * args.n_way * (args.k_spt + args.k_qry)
    train_accs, ms_per_step = float('nan'), float('nan')
    tic, tic_step = time.perf_counter(), start
    for step in range(start + 1, args.epoch + 1):
        log = step % args.log_every == 0
        evaluate_now = step % args.eval_every == 0 or step == args.epoch
        loss, accs = maml.meta_loss(*next_train_batch(), track_steps=log)
        maml.meta_update(loss)
        if log or evaluate_now:   # the only steps that wait for the device
            loss = loss.item()
            if not math.isfinite(loss):
                raise RunError(f"The meta-loss became {loss} at step {step}; lower --meta_lr or "
                                   f"--update_lr, or set --grad_clip (saved checkpoints are untouched).")
        if log:
            accs = accs.tolist()
            train_accs = accs[-1]
            ms_per_step = 1e3 * (time.perf_counter() - tic) / (step - tic_step)
            tic, tic_step = time.perf_counter(), step
            print(f'step {step:6d}  loss {loss:.4f}  train acc {format_accs(accs)}  '
                  f'{ms_per_step:.1f} ms/step  {1e3 * images_per_step / ms_per_step:.0f} img/s')
        if evaluate_now:
            t = time.perf_counter()
            mean, half = mean_ci(validate())
            acc, ci = float(mean[-1]), float(half[-1])
            print(f'step {step:6d}  {split} acc {acc:.4f} +- {ci:.4f} over {args.eval_tasks} tasks '
                  f'({time.perf_counter() - t:.1f} s)  by step: {format_accs(mean)}')
            ckpts.save(maml.checkpoint(step=step, acc=acc, ci=ci, split=split, sampler=loader.state_dict(),
                                       args=plain_dict(args)), step, acc)
            metrics.append(step=step, train_acc=train_accs, **{f'{split}_acc': acc, f'{split}_ci': ci},
                           ms_per_step=ms_per_step)
            tic, tic_step = time.perf_counter(), step
    return ckpts


def report_test(ckpts, test_accs, n_tasks, device):
    """Evaluate the selected model, best.pth, once on the test split: `test_accs(maml)` returns
    accs [tasks, steps+1]. Prints the result and adds it to best.pth as test_acc and test_ci."""
    best_path = ckpts.path('best.pth')
    selected = load_checkpoint(best_path, map_location=device)
    mean, half = mean_ci(test_accs(Meta.from_state(selected)))
    print(f"test acc of best.pth (step {selected['step']}, {selected['split']} acc {selected['acc']:.4f}): "
          f"{mean[-1]:.4f} +- {half[-1]:.4f} over {n_tasks} tasks  by step: {format_accs(mean)}")
    atomic_save({**selected, 'test_acc': float(mean[-1]), 'test_ci': float(half[-1])}, best_path)


def plain_dict(args):
    return {k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool, type(None)))}


def run_main(main):
    """Run `main()`; a problem this project names (errors.UserError: flags, data, files, a diverged
    run) ends in its one-sentence message, anything else in its traceback (MAML_TRACEBACK=1 shows
    the traceback for the named problems too)."""
    try:
        main()
    except UserError as e:
        if os.environ.get('MAML_TRACEBACK'):
            raise
        sys.exit(f'error: {e}')
    except KeyboardInterrupt:
        sys.exit('interrupted; the checkpoints written so far are complete (resume from last.pth).')
