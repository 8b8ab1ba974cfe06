"""
Learning curves of one or several runs from their metrics.csv (training scripts call this after
every evaluation, writing <save_dir>/learning_curve.png; matplotlib is optional).

    python plot.py checkpoints                           # -> checkpoints/learning_curve.png
    python plot.py runs/maml runs/fo -o compare.png      # several runs on one figure

Each run draws its training query accuracy (after the last inner step, at the logging step before
the evaluation) and its validation or test accuracy with the 95% confidence band, against the
meta-training step.
"""
import argparse
import os

from maml.curves import save


def main():
    p = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    p.add_argument('runs', nargs='+', help='run folders (--save_dir of the training scripts)')
    p.add_argument('-o', '--out', help='PNG to write (default: learning_curve.png in the first run folder)')
    args = p.parse_args()
    out = args.out or os.path.join(args.runs[0], 'learning_curve.png')
    save(args.runs, out)
    print(f'wrote {out}')


if __name__ == '__main__':
    main()
