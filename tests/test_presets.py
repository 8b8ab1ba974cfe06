"""The paper presets are the official code's README commands, translated by the rules of maml/presets.py."""
import re

import pytest

import folder_train
import miniimagenet_train
import omniglot_train
from maml.flags import parse_args
from maml.presets import PRESETS

# the commands of the official code's README (github.com/cbfinn/maml): every command runs 60,000 meta-iterations; the
# official loss is n_way times a mean cross-entropy's, so update_lr here = official update_lr * n_way.
OFFICIAL = {
    ('omniglot', 'paper-5w1s'): dict(meta_batch_size=32, num_classes=5, update_batch_size=1, update_lr=0.4,
                                     num_updates=1),
    ('omniglot', 'paper-5w5s'): dict(meta_batch_size=32, num_classes=5, update_batch_size=5, update_lr=0.4,
                                     num_updates=1),
    ('omniglot', 'paper-20w1s'): dict(meta_batch_size=16, num_classes=20, update_batch_size=1, update_lr=0.1,
                                      num_updates=5),
    ('omniglot', 'paper-20w5s'): dict(meta_batch_size=16, num_classes=20, update_batch_size=5, update_lr=0.1,
                                      num_updates=5),
    ('miniimagenet', 'paper-5w1s'): dict(meta_batch_size=4, num_classes=5, update_batch_size=1, update_lr=0.01,
                                         num_updates=5, num_filters=32),
    ('miniimagenet', 'paper-5w5s'): dict(meta_batch_size=2, num_classes=5, update_batch_size=5, update_lr=0.01,
                                         num_updates=5, num_filters=32),
}
# the paper's appendix A.1: inner steps at test time
TEST_STEPS = {'paper-5w1s': 3, 'paper-5w5s': 3, 'paper-20w1s': 5, 'paper-20w5s': 5}


@pytest.mark.parametrize('dataset, preset', sorted(OFFICIAL))
def test_paper_presets_are_the_official_commands(dataset, preset):
    official, ours = OFFICIAL[(dataset, preset)], PRESETS[dataset][preset]
    k = official['update_batch_size']
    assert ours['epoch'] == 60000 and ours['meta_lr'] == 1e-3
    assert ours['task_num'] == official['meta_batch_size'] and ours['n_way'] == official['num_classes']
    assert ours['k_spt'] == k and ours['k_qry_test'] == k
    assert ours['update_lr'] == pytest.approx(official['update_lr'] * official['num_classes'])
    assert ours['update_step'] == official['num_updates']
    if dataset == 'omniglot':
        assert ours['k_qry'] == k, 'Omniglot trains with K query images per class'
        assert ours['update_step_test'] == TEST_STEPS[preset]
        assert (ours['num_filters'], ours['imgsz']) == (64, 28)
        assert (ours['rotate'], ours['preprocess'], ours['val_classes']) == ('per_task', 'official', 100)
    else:
        assert ours['k_qry'] == 15, 'mini-ImageNet trains with 15 query images per class'
        assert ours['update_step_test'] == 10 and ours['num_filters'] == official['num_filters']
        assert ours['pixel_norm'] == 'unit', 'the official code only divides by 255'


@pytest.mark.parametrize('dataset, script', [('omniglot', omniglot_train), ('miniimagenet', miniimagenet_train),
                                             ('folder', folder_train)])
def test_every_preset_parses_and_passes_the_flag_checks(dataset, script):
    parser = script.build_parser()
    for name, preset in PRESETS[dataset].items():
        args = parse_args(parser, dataset, ['--preset', name])
        assert all(getattr(args, flag) == value for flag, value in preset.items())
        assert set(preset) <= {action.dest for action in parser._actions}, 'a preset sets only known flags'


@pytest.mark.parametrize('script', [omniglot_train, miniimagenet_train, folder_train])
def test_help_states_each_default_once_and_never_none(script):
    text = script.build_parser().format_help()
    assert '(default: None)' not in text and '(default: False)' not in text
    assert not any(flag.count('(default') > 1 for flag in re.split(r'\n  -', text)), 'a default stated twice'
    assert '(default: 500)' in ' '.join(text.split()), "a flag's default is still stated"
