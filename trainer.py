"""
What omniglot_train.py and miniimagenet_train.py share: flags and presets, resuming, device set-up,
evaluation as mean +- 95% confidence interval, and the training loop. The files a run writes into
--save_dir are described in checkpoints.py.

    parser = make_parser('Meta-train MAML on Omniglot', 'omniglot')
    args = parse_args(parser, 'omniglot')   # preset, checkpoint settings on --resume, checks
    ...
    run = fit(maml, loader, next_train_batch, validate, args, split='val')

Under torchrun the same code trains on several processes (distributed.py): setup_device joins the
process group, fit and evaluate share out the work, and only rank 0 prints and writes files.
"""
import argparse
import copy
import ctypes
import math
import os
import sys
import time

import scipy.stats
import torch
from tqdm import tqdm

import distributed
from checkpoints import RunDir, atomic_save
from errors import FlagError, RunError, UserError
from meta import Meta, load_checkpoint
from presets import DEFAULTS, PRESETS

# Flags a resumed run may change: where and how fast it runs, how long, how often it reports. Any
# other flag defines the run, so it is taken from the checkpoint, and giving it another value is refused.
OPERATIONAL = {'epoch', 'time_budget', 'log_every', 'eval_every', 'device', 'data', 'save_dir', 'resume',
               'compile', 'amp', 'test_tasks', 'keep'}
MIN_IMGSZ = 16   # both networks halve the image four times
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3   # glibc's mallopt parameters (malloc.h)


def make_parser(description, dataset, data_root):
    """The flags both scripts take, with `dataset`'s defaults from presets.py."""
    p = argparse.ArgumentParser(description=description, allow_abbrev=False,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument('--preset', choices=sorted(PRESETS[dataset]),
                   help="all settings of one of the paper's experiments (presets.py); explicit flags override")
    p.add_argument('--epoch', type=int, help='meta-training steps')
    p.add_argument('--time_budget', type=float,
                   help='minutes of wall-clock time (evaluations included) after which the run evaluates, '
                        'saves and ends as at --epoch; checked at logging steps')
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
    p.set_defaults(**DEFAULTS[dataset])
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
            if name in OPERATIONAL or not hasattr(args, name):
                continue
            if name in given and getattr(args, name) != value:
                raise FlagError(f"--{name} {getattr(args, name)} differs from the {value} that {args.resume} "
                                f"was trained with; a resumed run keeps its settings, so drop --{name} or "
                                f"start a new run in another --save_dir.")
            setattr(args, name, value)
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
    for name in ('epoch', 'n_way', 'k_spt', 'k_qry', 'task_num', 'update_step', 'update_step_test',
                 'num_filters', 'log_every', 'eval_every', 'eval_tasks', 'test_tasks', 'keep'):
        if getattr(args, name) < 1:
            raise FlagError(f"--{name} is {getattr(args, name)} but must be at least 1.")
    if args.time_budget is not None and not args.time_budget > 0:
        raise FlagError(f"--time_budget is {args.time_budget} minutes but must be positive.")
    if args.k_qry_test is not None and args.k_qry_test < 1:
        raise FlagError(f"--k_qry_test is {args.k_qry_test} but must be at least 1.")
    if args.n_way < 2:
        raise FlagError("--n_way must be at least 2: a task needs two classes to tell apart.")
    if args.imgsz < MIN_IMGSZ:
        raise FlagError(f"--imgsz {args.imgsz} is too small: the network halves the image four times, "
                        f"so use at least {MIN_IMGSZ}.")
    for name in ('meta_lr', 'update_lr'):
        if not getattr(args, name) > 0:
            raise FlagError(f"--{name} is {getattr(args, name)} but must be positive.")
    if args.grad_clip < 0:
        raise FlagError(f"--grad_clip is {args.grad_clip}; use 0 (off) or a positive norm.")


def setup_device(args):
    """The torch.device of --device, seeded; on CUDA with the cuDNN autotuner and TF32 on. Under
    torchrun, this process joins the process group and gets its rank's device (distributed.init)."""
    device = torch.device(args.device)
    if device.type == 'cuda' and not torch.cuda.is_available():
        raise FlagError(f"--device {args.device} was asked for but this machine has no CUDA GPU; use --device cpu.")
    if args.amp and device.type != 'cuda':
        raise FlagError("--amp (bf16 autocast) is for CUDA devices; drop it on the CPU.")
    device = distributed.init(device)
    distributed.local_tasks(args.task_num)   # refuses a meta-batch that does not split over the ranks
    torch.manual_seed(args.seed)
    if device.type == 'cuda':
        tune_cuda()
    else:
        tune_cpu()
    return device


def tune_cpu():
    """Keep freed memory in the heap (glibc only). By default glibc maps each block of more than
    128 kB to 32 MB afresh and returns it when freed, so every activation tensor of a meta-step (tens
    of MB at the seed's defaults) is page-faulted in again at every step; with the heap kept, a
    second-order Omniglot step ran 1.1-1.5x faster on a 2-core AMD EPYC (README, Speed)."""
    try:
        libc = ctypes.CDLL('libc.so.6')
    except OSError:   # another C library (macOS, musl): left as it is
        return
    libc.mallopt(M_MMAP_THRESHOLD, 1 << 30)
    libc.mallopt(M_TRIM_THRESHOLD, 2 ** 31 - 1)


def tune_cuda():
    """cuDNN picks the fastest convolution algorithm per shape; fp32 matmuls and convolutions use TF32."""
    torch.backends.cudnn.benchmark = True
    torch.backends.cudnn.allow_tf32 = True
    torch.set_float32_matmul_precision('high')   # TF32 for matmuls


def device_name(device):
    device = torch.device(device)
    if device.type == 'cuda':
        return torch.cuda.get_device_name(device)
    threads = torch.get_num_threads()
    return f"CPU ({threads} thread{'s' if threads > 1 else ''})"


def mean_ci(accs):
    """accs [tasks, steps] -> (mean [steps], half-width of the 95% CI [steps]) with Student's t."""
    accs = torch.as_tensor(accs, dtype=torch.float64)
    n = accs.shape[0]
    if n < 2:
        return accs.mean(0).numpy(), torch.full(accs.shape[1:], math.nan).numpy()
    half = scipy.stats.t.ppf(0.975, n - 1) * accs.std(0) / math.sqrt(n)
    return accs.mean(0).numpy(), half.numpy()


def progress_bar(**kwargs):
    """A tqdm bar on rank 0 (when stderr is a terminal); none on the other ranks."""
    return tqdm(disable=None if distributed.is_main() else True, **kwargs)


def evaluate(maml, next_batch, n_tasks, desc='evaluating'):
    """Query accuracy after each fine-tuning step on `n_tasks` tasks: a numpy array [n_tasks, steps+1].
    With several ranks each draws every batch, so that all see the same tasks, but fine-tunes only
    every world_size-th; the accuracies are gathered back in the order drawn, so every rank returns
    what one process would."""
    accs, n, batch_index = [], 0, 0
    with progress_bar(total=n_tasks, desc=desc, unit='task', leave=False) as bar:
        while n < n_tasks:
            batch = next_batch()
            if batch_index % distributed.world_size() == distributed.rank():
                accs.append(maml.finetune(*batch))
            bar.update(min(len(batch[0]), n_tasks - n))
            n += len(batch[0])
            batch_index += 1
    return torch.cat(distributed.gather_in_order(accs))[:n_tasks].cpu().numpy()


def format_accs(accs):
    return ' '.join(f'{a:.3f}' for a in accs)


def format_duration(seconds):
    minutes = seconds / 60
    return f'{seconds:.0f} s' if minutes < 2 else f'{minutes:.0f} min' if minutes < 120 else f'{minutes / 60:.1f} h'


def open_run(args, sampler):
    """The run folder, locked, with the resumed state loaded into `sampler`; (run, start step, elapsed s).
    Only rank 0 opens the folder; the other ranks get a distributed.FollowerRun."""
    run = distributed.on_main(lambda: open_run_dir(args)) or distributed.FollowerRun(args.save_dir)
    ckpt = args.resume_ckpt
    if ckpt is None:
        return run, 0, 0.0
    distributed.load_sampler_state(sampler, ckpt)
    return run, ckpt['step'], ckpt.get('elapsed_s', 0.0)


def open_run_dir(args):
    """The locked RunDir of --save_dir, checked to be empty or, on --resume, rolled back to its step."""
    run = RunDir(args.save_dir, args.keep)
    ckpt = args.resume_ckpt
    if ckpt is None:
        if not run.is_empty():
            run.close()
            raise RunError(f"{args.save_dir} already holds checkpoints of an earlier run; continue it with "
                           f"--resume {run.path('last.pth')}, or pass another --save_dir.")
        return run
    if run.holds(args.resume):
        run.rollback(ckpt['step'])
    elif run.is_empty():
        run.adopt_metrics(os.path.dirname(args.resume), ckpt['step'])
    else:
        run.close()
        raise RunError(f"--save_dir {args.save_dir} holds another run's checkpoints, not those of "
                       f"{args.resume}; resume into the folder it came from or into an empty --save_dir.")
    return run


def check_loss(loss, step, n_way):
    """A loss that is not finite, or a hundred times chance's, means the run diverged: stop it."""
    chance = math.log(n_way)
    if not math.isfinite(loss) or loss > 100 * chance:
        raise RunError(f"The meta-loss became {loss:.4g} at step {step} (chance is {chance:.2f}), so the run "
                       f"diverged; lower --meta_lr or --update_lr, or set --grad_clip (saved checkpoints "
                       f"are untouched).")


def fit(maml, sampler, next_train_batch, validate, args, split='val'):
    """Meta-train for --epoch steps. `validate()` returns accs [tasks, steps+1] on `split`, which
    ranks the checkpoints. Returns the RunDir (still locked)."""
    device = next(maml.parameters()).device
    run, start, elapsed = open_run(args, sampler)
    if args.resume_ckpt is not None:
        maml.load_state(args.resume_ckpt)   # weights, optimizer, the family's extras and schedule
        print(f'resumed from {args.resume} at step {start}')
    distributed.attach(maml)
    images_per_step = args.task_num * args.n_way * (args.k_spt + args.k_qry)
    train_acc, ms_per_step = math.nan, math.nan
    run_start, tic, tic_step = time.perf_counter(), time.perf_counter(), start
    step = start
    bar = progress_bar(total=args.epoch, initial=start, desc='meta-training', unit='step', dynamic_ncols=True)
    try:
        for step in range(start + 1, args.epoch + 1):
            log = step % args.log_every == 0
            evaluate_now = step % args.eval_every == 0 or step == args.epoch
            estimate = step == start + 3 and step < args.epoch
            loss, accs = maml.meta_loss(*next_train_batch(), track_steps=log)
            maml.meta_update(loss)
            bar.update()
            if log or evaluate_now or estimate or step == start + 1:   # the only steps that wait for the device
                loss, accs = distributed.mean_over_ranks(loss.detach(), accs)   # the whole meta-batch's
                loss = loss.item()
                check_loss(loss, step, args.n_way)
            if step == start + 1:
                tic_estimate = time.perf_counter()   # the first step includes warm-up (and compilation)
            if estimate:
                print_estimate((time.perf_counter() - tic_estimate) / 2, step, args, device)
            out_of_time = log and over_budget(args.time_budget, elapsed + time.perf_counter() - run_start)
            if log:
                accs = accs.tolist()
                train_acc = accs[-1]
                ms_per_step = 1e3 * (time.perf_counter() - tic) / (step - tic_step)
                tic, tic_step = time.perf_counter(), step
                log_line(bar, f'step {step:6d}  loss {loss:.4f}  train acc {format_accs(accs)}  '
                              f'{ms_per_step:.1f} ms/step  {1e3 * images_per_step / ms_per_step:.0f} img/s')
            if evaluate_now or out_of_time:
                t = time.perf_counter()
                mean, half = mean_ci(validate())
                acc, ci = float(mean[-1]), float(half[-1])
                log_line(bar, f'step {step:6d}  {split} acc {acc:.4f} +- {ci:.4f} over {args.eval_tasks} tasks '
                              f'({time.perf_counter() - t:.1f} s)  by step: {format_accs(mean)}')
                wall = elapsed + time.perf_counter() - run_start
                ckpt = maml.checkpoint(step=step, acc=acc, ci=ci, split=split, args=plain_dict(args), elapsed_s=wall,
                                       **distributed.sampler_states(sampler))
                row = {'step': step, 'train_acc': train_acc, f'{split}_acc': acc, f'{split}_ci': ci,
                       'ms_per_step': ms_per_step, 'elapsed_s': round(wall, 1)}
                distributed.on_main(lambda: record(run, ckpt, row))
                tic, tic_step = time.perf_counter(), step
            if out_of_time:
                log_line(bar, f'step {step:6d}  --time_budget of {args.time_budget:g} min reached: training ends here')
                break
    except KeyboardInterrupt:
        saved = os.path.exists(run.path('last.pth'))
        raise RunError(f"interrupted at step {step}; " + (
            f"resume with --resume {run.path('last.pth')} (its files are complete)." if saved else
            "no checkpoint had been written yet.")) from None
    finally:
        bar.close()
    return run


def over_budget(budget_minutes, seconds):
    """Whether `seconds` of wall time exceed --time_budget; the same answer on every rank (their mean)."""
    if budget_minutes is None:
        return False
    (mean_seconds,) = distributed.mean_over_ranks(torch.tensor(seconds, dtype=torch.float64))
    return mean_seconds.item() > 60 * budget_minutes


def log_line(bar, text):
    """Print above the progress bar, flushed so that a log file shows it at once."""
    bar.write(text)
    sys.stdout.flush()


def print_estimate(seconds_per_step, step, args, device):
    left = args.epoch - step
    first_eval = min(args.eval_every, args.epoch)
    print(f'{seconds_per_step * 1e3:.0f} ms/step on {device_name(device)}: the {left} steps left take about '
          f'{format_duration(left * seconds_per_step)} without evaluations; first evaluation at step '
          f'{first_eval} (in about {format_duration(max(first_eval - step, 0) * seconds_per_step)}).', flush=True)


def record(run, ckpt, row):
    """Save an evaluation's checkpoint and metrics row, and redraw the learning curve."""
    run.save(ckpt, row)
    draw_learning_curve(run.dir)


def draw_learning_curve(folder):
    """learning_curve.png beside metrics.csv, when matplotlib is installed (plot.py)."""
    try:
        import plot
    except ImportError:
        return
    plot.save([folder], os.path.join(folder, 'learning_curve.png'))


def report_test(run, test_accs, n_tasks, device):
    """Evaluate the selected model, best.pth, once on the test split: `test_accs(maml)` returns
    accs [tasks, steps+1]. Prints the result and adds it to best.pth as test_acc and test_ci.
    With several ranks, all evaluate their share of the tasks, and rank 0 writes."""
    best_path = run.path('best.pth')
    selected = distributed.load_shared_checkpoint(best_path, map_location=device)
    mean, half = mean_ci(test_accs(Meta.from_state(selected)))
    if not distributed.is_main():
        return
    print(f"test acc of best.pth (step {selected['step']}, {selected['split']} acc {selected['acc']:.4f}): "
          f"{mean[-1]:.4f} +- {half[-1]:.4f} over {n_tasks} tasks  by step: {format_accs(mean)}")
    atomic_save({**selected, 'test_acc': float(mean[-1]), 'test_ci': float(half[-1]),
                 'test_by_step': [float(m) for m in mean]}, best_path)


def plain_dict(args):
    return {k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool, type(None)))}


def run_main(main):
    """Run `main()`; a problem this project names (errors.UserError: flags, data, files, a diverged
    run) ends in its one-sentence message, anything else in its traceback (MAML_TRACEBACK=1 shows
    the traceback for the named problems too). Under torchrun only rank 0 prints the message."""
    try:
        main()
    except UserError as e:
        if os.environ.get('MAML_TRACEBACK'):
            raise
        sys.exit(f'error: {e}' if distributed.is_main() else 1)
    except KeyboardInterrupt:
        sys.exit('interrupted before training started; nothing was written.')
    finally:
        distributed.leave()
