"""Learning curves: written beside metrics.csv by training, drawn for several runs by plot.py."""
import subprocess
import sys

from conftest import REPO, run_fit

PNG_MAGIC = b'\x89PNG\r\n\x1a\n'


def test_training_draws_its_learning_curve_and_plot_py_compares_runs(tmp_path):
    run_fit(tmp_path / 'a', epoch=4)
    run_fit(tmp_path / 'b', epoch=2)
    assert (tmp_path / 'a' / 'learning_curve.png').read_bytes().startswith(PNG_MAGIC)
    out = tmp_path / 'both.png'
    done = subprocess.run([sys.executable, f'{REPO}/plot.py', str(tmp_path / 'a'), str(tmp_path / 'b'),
                           '-o', str(out)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert out.read_bytes().startswith(PNG_MAGIC) and out.stat().st_size > 10_000


def test_training_runs_without_matplotlib(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, 'maml.curves', None)   # importing it now raises ImportError
    run_fit(tmp_path, epoch=2)
    assert (tmp_path / 'metrics.csv').exists() and not (tmp_path / 'learning_curve.png').exists()
