"""
What omniglot_train.py and miniimagenet_train.py share beside their flags (flags.py): device
set-up, evaluation as mean +- 95% confidence interval, the training loop and the final test
report. The files a run writes into --save_dir are described in checkpoints.py.

    args = flags.parse_args(parser, 'omniglot')
    device = setup_device(args)
    run = fit(maml, loader, next_train_batch, validate, args, split='val')   # the run folder, locked
    report_test(run, lambda best: test_accuracies(best), args.test_tasks, device)   # ... and closed

Under torchrun the same code trains on several processes (distributed.py): setup_device joins the
process group, fit and evaluate share out the work, and only rank 0 prints and writes files.
"""
import contextlib
import math
import os
import sys
import time

import torch
from scipy.special import stdtrit  # Student t quantiles; scipy.stats would add 1.2 s to every start
from tqdm import tqdm

from . import distributed
from .checkpoints import RunDir, atomic_save, load_checkpoint
from .devices import available_device, device_name, tune
from .errors import FlagError, RunError, UserError

EVAL_SEED = 12345   # the tasks of every evaluation of a run and of its test report, so that checkpoints compare on equal terms


def setup_device(args):
    """The torch.device of --device, seeded; on CUDA with the cuDNN autotuner and TF32 on. Under
    torchrun, this process joins the process group and gets its rank's device (distributed.init)."""
    device = available_device(args.device)
    if args.amp and device.type != 'cuda':
        raise FlagError("--amp (bf16 autocast) is for CUDA devices; drop it on the CPU.")
    device = distributed.init(device)
    distributed.local_tasks(args.task_num)   # refuses a meta-batch that does not split over the ranks
    torch.manual_seed(args.seed)
    tune(device)
    return device


def mean_ci(accs):
    """accs [tasks, steps] -> (mean [steps], half-width of the 95% CI [steps]) with Student's t."""
    accs = torch.as_tensor(accs, dtype=torch.float64)
    n = accs.shape[0]
    if n < 2:
        return accs.mean(0).numpy(), torch.full(accs.shape[1:], math.nan).numpy()
    half = stdtrit(n - 1, 0.975) * accs.std(0) / math.sqrt(n)
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


@contextlib.contextmanager
def closed_on_error(run):
    """Run the block with `run` (a RunDir or distributed.FollowerRun) open, and close it if the block
    raises: a run that stops (a refused folder, ^C, divergence, a failed save) frees its folder at
    once, not when its error's traceback, which holds the run, is freed (a notebook keeps it)."""
    try:
        yield run
    except BaseException:
        run.close()
        raise


def open_run(args, sampler):
    """The run folder, locked, with the resumed state loaded into `sampler`; (run, start step, elapsed s).
    Only rank 0 opens the folder; the other ranks get a distributed.FollowerRun."""
    run = distributed.on_main(lambda: open_run_dir(args)) or distributed.FollowerRun(args.save_dir)
    ckpt = args.resume_ckpt
    if ckpt is None:
        return run, 0, 0.0
    with closed_on_error(run):
        distributed.load_sampler_state(sampler, ckpt)
    return run, ckpt['step'], ckpt.get('elapsed_s', 0.0)


def open_run_dir(args):
    """The locked RunDir of --save_dir, checked to be empty or, on --resume, rolled back to its step."""
    run = RunDir(args.save_dir, args.keep)
    ckpt = args.resume_ckpt
    with closed_on_error(run):
        if ckpt is None:
            if not run.is_empty():
                if not os.path.exists(run.path('last.pth')):
                    raise RunError(f"{args.save_dir} holds files of an earlier run that stopped in its first "
                                   f"evaluation, before any last.pth to resume from; delete the folder or pass "
                                   f"another --save_dir.")
                raise RunError(f"{args.save_dir} already holds checkpoints of an earlier run; continue it with "
                               f"--resume {run.path('last.pth')}, or pass another --save_dir.")
        elif run.holds(args.resume):
            last = run.path('last.pth')
            if os.path.exists(last) and ckpt['step'] < load_checkpoint(last, map_location='cpu')['step']:
                raise RunError(f"{args.resume} is an earlier checkpoint of the run in {args.save_dir}; continuing "
                               f"there would discard the evaluations after it, so resume from "
                               f"{last}, or branch from it into an empty --save_dir.")
            run.rollback(ckpt['step'])
        elif not run.has_checkpoints():   # empty, or holding only what an interrupted resume had adopted
            run.adopt_metrics(os.path.dirname(args.resume), ckpt['step'])
        else:
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


def fit(maml, sampler, next_train_batch, validate, args, split='val', data=None):
    """Meta-train for --epoch steps. `validate()` returns accs [tasks, steps+1] on `split`, which
    ranks the checkpoints; `data`, when given, is stored in every checkpoint (what evaluation needs
    to find and decode the images again, folder.ImageFolder.record). Returns the RunDir still locked,
    for report_test, which closes it; if training stops with an error, the RunDir is closed first."""
    device = next(maml.parameters()).device
    run, start, elapsed = open_run(args, sampler)
    with closed_on_error(run):
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
                out_of_time = log and over_budget(args.time_budget, time.perf_counter() - run_start)
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
                    ckpt = maml.checkpoint(step=step, acc=acc, ci=ci, split=split, args=plain_dict(args),
                                           elapsed_s=wall, **({'data': data} if data else {}),
                                           **distributed.sampler_states(sampler))
                    row = {'step': step, 'train_acc': train_acc, f'{split}_acc': acc, f'{split}_ci': ci,
                           'ms_per_step': ms_per_step, 'elapsed_s': round(wall, 1)}
                    distributed.on_main(lambda: record(run, ckpt, row))
                    tic, tic_step = time.perf_counter(), step
                if out_of_time:
                    log_line(bar, f'step {step:6d}  --time_budget of {args.time_budget:g} min reached: '
                                  f'training ends here')
                    break
        except KeyboardInterrupt:
            saved = os.path.exists(run.path('last.pth'))
            raise RunError(f"interrupted at step {step}; " + (
                f"resume with --resume {run.path('last.pth')} (its files are complete)." if saved else
                "no checkpoint had been written yet.")) from None
        finally:
            bar.close()
        if step > start and distributed.is_main():
            print(f'trained to step {step} in {format_duration(time.perf_counter() - run_start)} of wall time '
                  f'(evaluations included; the run so far: '
                  f'{format_duration(elapsed + time.perf_counter() - run_start)})', flush=True)
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
    next_eval = min((step // args.eval_every + 1) * args.eval_every, args.epoch)
    print(f'{seconds_per_step * 1e3:.0f} ms/step on {device_name(device)}: the {left} steps left take about '
          f'{format_duration(left * seconds_per_step)} without evaluations; next evaluation at step '
          f'{next_eval} (in about {format_duration((next_eval - step) * seconds_per_step)}).', flush=True)


def record(run, ckpt, row):
    """Save an evaluation's checkpoint and metrics row, and redraw the learning curve."""
    run.save(ckpt, row)
    draw_learning_curve(run.dir)


def draw_learning_curve(folder):
    """learning_curve.png beside metrics.csv, when matplotlib is installed (curves.py)."""
    try:
        from .curves import save
    except ImportError:
        return
    save([folder], os.path.join(folder, 'learning_curve.png'))


def report_test(run, test_accs, n_tasks, device):
    """Evaluate the selected model, best.pth, once on the test split: `test_accs(ckpt)` returns
    accs [tasks, steps+1] of the model that checkpoint dict holds. Prints the result and adds it to best.pth as test_acc and test_ci.
    With several ranks, all evaluate their share of the tasks, and rank 0 writes. The report is the
    run's last step: `run` (from fit, still locked) is closed when it ends, however it ends."""
    with run:
        best_path = run.path('best.pth')
        selected = distributed.load_shared_checkpoint(best_path, map_location=device)
        mean, half = mean_ci(test_accs(selected))
        if not distributed.is_main():
            return
        print(f"test acc of best.pth (step {selected['step']}, {selected['split']} acc {selected['acc']:.4f}): "
              f"{mean[-1]:.4f} +- {half[-1]:.4f} over {n_tasks} tasks  by step: {format_accs(mean)}")
        atomic_save({**selected, 'test_acc': float(mean[-1]), 'test_ci': float(half[-1]),
                     'test_by_step': [float(m) for m in mean]}, best_path)


PLAIN = (int, float, str, bool, type(None))


def plain_dict(args):
    """The flags a checkpoint stores: those whose values are plain, or lists of plain values."""
    return {k: list(v) if isinstance(v, (list, tuple)) else v for k, v in vars(args).items()
            if isinstance(v, PLAIN) or isinstance(v, (list, tuple)) and all(isinstance(x, PLAIN) for x in v)}


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
        sys.exit('interrupted outside training; every file written so far is complete.')
    finally:
        distributed.leave()
