"""
Learning curves of runs from their metrics.csv: what the training scripts draw into
<save_dir>/learning_curve.png after every evaluation, and what plot.py draws on demand.

    save(['runs/maml', 'runs/fo'], 'compare.png')

Each run draws its training query accuracy (after the last inner step, at the logging step before
the evaluation) and its validation or test accuracy with the 95% confidence band, against the
meta-training step. Importing this module without matplotlib raises ImportError.
"""
import os

import matplotlib

matplotlib.use('Agg')   # files only: no display needed
import matplotlib.pyplot as plt  # noqa: E402

from .checkpoints import read_metrics  # noqa: E402


def save(folders, out):
    """Draw the runs in `folders` (each holding a metrics.csv) into the PNG `out`."""
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    for i, folder in enumerate(folders):
        rows = read_metrics(folder)
        if not rows:
            continue
        split = next(k[:-4] for k in rows[0] if k.endswith('_acc') and k != 'train_acc')
        steps = [int(r['step']) for r in rows]
        acc = [100 * float(r[f'{split}_acc']) for r in rows]
        ci = [100 * float(r[f'{split}_ci']) for r in rows]
        train = [100 * float(r['train_acc']) for r in rows]
        color, name = f'C{i}', os.path.basename(os.path.normpath(folder))
        label = f'{name}: ' if len(folders) > 1 else ''
        ax.plot(steps, acc, '-o', color=color, markersize=3, label=f'{label}{split} (mean, 95% CI)')
        ax.fill_between(steps, [a - c for a, c in zip(acc, ci)], [a + c for a, c in zip(acc, ci)],
                        color=color, alpha=0.2, linewidth=0)
        ax.plot(steps, train, '--', color=color, alpha=0.7, label=f'{label}train (query, last logged step)')
    ax.set_xlabel('meta-training step')
    ax.set_ylabel('accuracy after fine-tuning (%)')
    ax.set_title('MAML learning curve' + ('s' if len(folders) > 1 else ''))
    ax.grid(alpha=0.3)
    ax.legend(loc='lower right', fontsize=8)
    fig.tight_layout()
    fig.savefig(out + '.tmp', format='png')
    plt.close(fig)
    os.replace(out + '.tmp', out)
