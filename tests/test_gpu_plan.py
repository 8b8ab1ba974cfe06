"""gpu/plan.py run on the CPU as a dry run of what it does on a CUDA machine: its checks train,
evaluate and resume on the real Omniglot, a failing check is reported as failed with the line that
says why, its flags pick the stages, and the full plan's export, packed in pieces of at most
--piece-mb, unpacks into the repository's layout."""
import io
import json
import os
import re
import subprocess
import sys
import tarfile
import time

import pytest
import torch

import plan
from conftest import REPO
from maml.errors import FlagError

TRAIN = ['--epoch', '4', '--task_num', '2', '--num_filters', '8', '--log_every', '2', '--eval_every', '2',
         '--eval_tasks', '8', '--test_tasks', '8']


def run_plan(out, *flags, timeout=600):
    return subprocess.run([sys.executable, os.path.join(REPO, 'gpu', 'plan.py'), '--device', 'cpu', '--out', str(out),
                           '--jobs', '2', *flags], capture_output=True, text=True, timeout=timeout)


def written(out):
    [path] = [p for p in os.listdir(out) if p.endswith('.json')]
    with open(os.path.join(out, path)) as f:
        return json.load(f)


def test_the_checks_run_on_real_omniglot_and_a_failing_one_says_why(omniglot_root, tmp_path):
    nowhere = tmp_path / 'no-miniimagenet'
    run = run_plan(tmp_path / 'out', '--stages', 'checks', '--omniglot', omniglot_root, '--miniimagenet', str(nowhere),
                   '--only', 'omniglot', 'miniimagenet', 'amp', 'sync-from-checkpoint')
    assert run.returncode == 0, run.stderr
    result = written(tmp_path / 'out')
    rows = {row['name']: row for row in result['checks']}
    assert list(rows) == ['omniglot', 'miniimagenet', 'amp', 'sync-from-checkpoint'], 'in the order of the plan'
    assert rows['omniglot']['status'] == rows['sync-from-checkpoint']['status'] == 'ok', rows
    assert rows['miniimagenet']['status'] == 'FAILED'
    assert rows['miniimagenet']['message'].startswith(f"error: MiniImagenet root '{nowhere}' does not exist;")
    assert (rows['amp']['status'], rows['amp']['message']) == ('skipped', 'needs CUDA')
    assert result['device'].startswith('CPU') and result['torch'] == torch.__version__ and 'checks' in result['stages']
    assert re.search(r"\nminiimagenet +FAILED +[\d.]+  error: MiniImagenet root .* does not exist", run.stdout), \
        'the table printed last says which check failed and why'
    [log] = [p for p in os.listdir(tmp_path / 'out') if p.endswith('.log')]
    log = (tmp_path / 'out' / log).read_text()
    assert 'val acc' in log and 'test acc of best.pth' in log, "each check's output is in the log"
    assert 'from-checkpoint: 3 meta-steps on CPU' in log


def test_a_check_past_its_time_is_ended_and_tracebacks_give_their_last_exception(tmp_path):
    python = sys.executable
    checks = [plan.Check('crashes', [[python, '-c', "print('starting'); raise RuntimeError('no backend for cpu')"]]),
              plan.Check('hangs', [[python, '-c', "print('waiting', flush=True); import time; time.sleep(60)"]],
                         timeout=2),
              plan.Check('second-fails', [[python, '-c', 'pass'], [python, '-c', "import sys; sys.exit('error: no')"]]),
              plan.Check('skipped', [], skip='one GPU')]
    start = time.time()
    rows = plan.run_checks(checks, time.time() + 120, 'cpu', str(tmp_path), jobs=4)
    assert time.time() - start < 30, 'the hanging check is ended at its timeout'
    assert [(r['name'], r['status']) for r in rows] == [('crashes', 'FAILED'), ('hangs', 'TIMEOUT'),
                                                         ('second-fails', 'FAILED'), ('skipped', 'skipped')]
    assert rows[0]['message'] == 'RuntimeError: no backend for cpu'
    assert rows[1]['message'] == 'no end within 2 s; last line: waiting'
    assert rows[2]['message'] == 'error: no' and rows[3]['message'] == 'one GPU'
    torchrun_output = ('error: --task_num 3 cannot be split evenly over 2 ranks; pass a multiple of 2.\n'
                       'torch.distributed.elastic.multiprocessing.errors.ChildFailedError: \n'
                       '=====\nomniglot_train.py FAILED\n  traceback : To enable traceback see: https://x\n=====\n')
    assert plan.error_line(torchrun_output).startswith('error: --task_num 3 cannot be split'), \
        "a rank's error, not torchrun's summary"


def test_the_stages_are_checks_and_bench_unless_an_experiment_is_named(tmp_path):
    flags = plan.parse_flags(['--device', 'cpu', '--out', str(tmp_path)])
    assert flags.stages == ['checks', 'bench'] and flags.experiment is None and flags.piece_mb == 15
    assert os.path.isabs(flags.runs) and os.path.isabs(flags.omniglot), 'the commands run in the repository'
    flags = plan.parse_flags(['--device', 'cpu', '--out', str(tmp_path), '--experiment', 'omniglot/paper-20w1s'])
    assert flags.stages == ['checks', 'bench', 'reproduce']
    with pytest.raises(FlagError, match=r"--stages reproduce needs --experiment; name one such as "):
        plan.parse_flags(['--device', 'cpu', '--out', str(tmp_path), '--stages', 'checks', 'reproduce'])
    with pytest.raises(FlagError, match=r"--piece-mb 0 gives no room for a piece; pass a positive size"):
        plan.parse_flags(['--device', 'cpu', '--out', str(tmp_path), '--piece-mb', '0'])


def test_the_export_is_packed_in_pieces_that_cat_joins_in_order(tmp_path):
    export, out = tmp_path / 'export', tmp_path / 'out'
    (export / 'runs' / 'run').mkdir(parents=True)
    (export / 'results').mkdir()
    (export / 'runs' / 'run' / 'last.pth').write_bytes(os.urandom(9000))
    (export / 'results' / 'run-test.json').write_text('{"acc": 0.5}')
    out.mkdir()
    pieces = plan.pack(str(export), str(out), 1000)
    assert len(pieces) > 10 and pieces[:2] == ['export.tar.00', 'export.tar.01'], 'one width: the glob sorts them'
    assert sorted(os.listdir(out)) == pieces and all((out / p).stat().st_size <= 1000 for p in pieces)
    with tarfile.open(fileobj=io.BytesIO(b''.join((out / p).read_bytes() for p in sorted(pieces)))) as tar:
        tar.extractall(tmp_path / 'unpacked', filter='data')
    assert (tmp_path / 'unpacked' / 'runs' / 'run' / 'last.pth').read_bytes() == \
        (export / 'runs' / 'run' / 'last.pth').read_bytes()
    assert (tmp_path / 'unpacked' / 'results' / 'run-test.json').read_text() == '{"acc": 0.5}'
    assert plan.pack(str(export), str(tmp_path), 10 ** 6) == ['export.tar.0']


def test_an_earlier_export_in_out_is_refused_before_anything_runs(omniglot_root, tmp_path):
    (tmp_path / 'export.tar.0').write_bytes(b'earlier')
    with pytest.raises(FlagError, match=r"export\.tar\.0 is a piece of an earlier export; move that export's "):
        plan.main(['--device', 'cpu', '--out', str(tmp_path), '--omniglot', omniglot_root,
                   '--stages', 'reproduce', '--experiment', 'omniglot/paper-5w1s'])
    assert os.listdir(tmp_path) == ['export.tar.0'], 'no report started'


@pytest.mark.slow
def test_the_whole_plan_exports_a_reproduction_part_that_unpacks_into_the_repository(omniglot_root, tmp_path):
    out = tmp_path / 'out'
    run = run_plan(out, '--omniglot', omniglot_root, '--only', 'omniglot', '--bench_workloads', 'omniglot-paper-so',
                   '--bench_impls', 'reference', 'meta', '--experiment', 'omniglot/paper-5w1s', '--minutes', '20',
                   '--runs', str(tmp_path / 'runs'), '--results', str(tmp_path / 'results'), '--piece-mb', '0.1',
                   '--', '--data', omniglot_root, *TRAIN)
    assert run.returncode == 0, run.stderr
    result = written(out)
    assert [row['status'] for row in result['checks']] == ['ok']
    assert [row['impl'] for row in result['bench']] == ['reference', 'meta'] and result['bench'][1]['ms_per_step'] > 0
    assert 'speedup' in result['bench'][1], 'rows compared with the reference row'
    outcome = result['reproduce']
    assert (outcome['status'], outcome['steps']) == ('ok', [0, 4])
    assert outcome['test']['checkpoint_step'] in (2, 4), 'best.pth is one of its two evaluations'
    assert len(outcome['test']['acc_by_step']) == 4, "after 0..3 fine-tuning steps, the preset's"
    assert sorted(os.listdir(out)) == sorted(outcome['export'] + [p for p in os.listdir(out) if 'gpu-plan' in p])
    assert len(outcome['export']) > 1 and all((out / p).stat().st_size <= 100_000 for p in outcome['export'])
    repository = tmp_path / 'repository'
    repository.mkdir()
    pieces = b''.join((out / piece).read_bytes() for piece in outcome['export'])
    with tarfile.open(fileobj=io.BytesIO(pieces)) as tar:
        tar.extractall(repository, filter='data')
    assert torch.load(repository / 'runs' / 'omniglot-paper-5w1s' / 'last.pth', weights_only=True)['step'] == 4
    assert json.loads((repository / 'results' / 'omniglot-paper-5w1s-test.json').read_text()) == outcome['test']
    assert 'reproduce: {"experiment": "omniglot/paper-5w1s"' in run.stdout
