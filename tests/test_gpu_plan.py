"""gpu/plan.py run on the CPU as a dry run of what it does on a lent GPU: its checks train, evaluate
and resume on the real Omniglot, a failing check is reported as failed with the line that says why,
and the full plan's export unpacks into the repository's layout."""
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


@pytest.mark.slow
def test_the_whole_plan_exports_a_reproduction_part_that_unpacks_into_the_repository(omniglot_root, tmp_path):
    out = tmp_path / 'out'
    run = run_plan(out, '--omniglot', omniglot_root, '--only', 'omniglot', '--bench_workloads', 'omniglot-paper-so',
                   '--bench_impls', 'reference', 'meta', '--experiment', 'omniglot/paper-5w1s', '--minutes', '20',
                   '--runs', str(tmp_path / 'runs'), '--results', str(tmp_path / 'results'),
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
    repository = tmp_path / 'repository'
    repository.mkdir()
    pieces = b''.join((out / piece).read_bytes() for piece in outcome['export'])
    with tarfile.open(fileobj=io.BytesIO(pieces)) as tar:
        tar.extractall(repository, filter='data')
    assert torch.load(repository / 'runs' / 'omniglot-paper-5w1s' / 'last.pth', weights_only=True)['step'] == 4
    assert json.loads((repository / 'results' / 'omniglot-paper-5w1s-test.json').read_text()) == outcome['test']
    assert 'reproduce: {"experiment": "omniglot/paper-5w1s"' in run.stdout
