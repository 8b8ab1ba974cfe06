"""
The MAML family's extra pieces for meta.py's one engine: option checks, the MAML++ preset, the
multi-step loss schedule, the extra meta-parameters, and Reptile's meta-gradient.

    Meta(config, imgc=1, imgsz=28, **MAMLPP, total_steps=50000)  # MAML++ (Antoniou et al. 2019)
    Meta(config, imgc=1, imgsz=28, algo='anil')                   # or 'metasgd', 'reptile'

Options (OPTIONS, all off by default, which is plain MAML):
    algo         'maml'; 'anil' adapts only the last linear layer in the inner loop (Raghu et al.
                 2020); 'metasgd' learns an inner learning rate per weight (Li et al. 2017), starting
                 at update_lr; 'reptile' (Nichol et al. 2018) runs first-order inner SGD and takes
                 theta - mean over tasks of the adapted weights as the meta-gradient, which the meta
                 optimizer (Adam) applies like any gradient
    msl_steps    MSL: for the first msl_steps meta-steps the meta-loss is a weighted sum of the query
                 losses after every inner step (`msl_weights`), then the last step's alone
    da_steps     DA: first-order meta-gradients for the first da_steps meta-steps, then second-order
    lslr         LSLR: a learned inner learning rate per parameter tensor and inner step
    bnwb         BNWB: batch-norm weights and biases per inner step, meta-learned, not adapted
                 (they stand in for the net's own, which then stay unused)
    bnrs         BNRS: batch-norm running statistics per inner step, tracked in meta-training and
                 used in evaluation (finetune, predict) instead of the batch's statistics
    cosine       CA: cosine annealing of meta_lr to min_meta_lr over total_steps meta-steps
    head         what the last linear layer starts each inner loop from, for a task of N classes:
                 'learned', the paper's, its N rows (at most its out features; a task with fewer
                 classes uses the first N rows); 'zero', zeros (Kao et al. 2022, the zeroing trick);
                 'unicorn', one learned row and bias copied N times (Ye & Chao 2022, UNICORN-MAML);
                 'proto', the support set's class means c_k of the features, W_k = 2 c_k and
                 b_k = -||c_k||^2 (Triantafillou et al. 2020, Proto-MAML). The last three serve any
                 N from 2 at test, and their network's linear layer holds one row (`head_config`):
                 UNICORN's learned row; for 'zero' and 'proto' a row kept at zero that no step reads
Per-step pieces have one slot per inner step (learning rates: update_step; batch norm: one per
weight version, 0..update_step); evaluation with more steps (update_step_test) reuses the last slot.
"""
import torch
import torch.nn as nn

from .errors import FlagError

ALGOS = ('maml', 'anil', 'metasgd', 'reptile')
HEADS = ('learned', 'zero', 'unicorn', 'proto')
UNLEARNED_HEADS = ('zero', 'proto')   # their head is not a meta-parameter
ANY_WAY_HEADS = ('zero', 'unicorn', 'proto')
TEST_HEADS = ('zero', 'proto')        # what a 'learned' checkpoint can be evaluated with instead of its own head
OPTIONS = dict(algo='maml', msl_steps=0, da_steps=0, lslr=False, bnwb=False, bnrs=False, cosine=False, min_meta_lr=1e-5,
               total_steps=None, head='learned')   # total_steps None: the run's --epoch
BN_MOMENTUM = 0.1   # as nn.BatchNorm2d
MSL_FLOOR = 0.03    # MAML++'s floor of each non-final step's weight, times the number of steps

# MAML++'s Omniglot setting, from the official configs (5-way 1-shot: 100 epochs of 500 steps,
# task_num 8): MSL over the first 10 epochs, meta_lr 1e-3 annealed to 1e-5 over the run (--epoch),
# learned rates starting at 0.1, 5 inner steps in training and evaluation. DA is off: the configs
# set first_order_to_second_order_epoch to -1, i.e. second order throughout. BNRS is off too: the
# official code tracks per-step running statistics but normalises with each batch's statistics in
# evaluation as well (F.batch_norm(..., training=True)), so its reported numbers never used them;
# evaluating with them (--bnrs) took a short Omniglot run to chance (docs/family.md).
MAMLPP = dict(msl_steps=5000, da_steps=0, lslr=True, bnwb=True, bnrs=False, cosine=True, min_meta_lr=1e-5,
              update_lr=0.1, meta_lr=1e-3, update_step=5, update_step_test=5)


def check_options(s):
    """Refuse settings that contradict each other, in one sentence each."""
    if s['algo'] not in ALGOS:
        raise FlagError(f"--algo is '{s['algo']}', which is not an algorithm here; use one of {', '.join(ALGOS)}.")
    if s['msl_steps'] < 0 or s['da_steps'] < 0:
        raise FlagError("--msl_steps and --da_steps count meta-steps and must be 0 (off) or more.")
    if s['algo'] == 'reptile':
        bad = [f'--{name}' for name in ('msl_steps', 'da_steps', 'lslr', 'bnwb') if s[name]]
        if bad:
            raise FlagError(f"--algo reptile takes no gradient through the inner loop, so {', '.join(bad)} "
                            f"cannot learn anything; drop them.")
    if s['algo'] == 'metasgd' and s['lslr']:
        raise FlagError("--algo metasgd already learns the inner learning rates; drop --lslr.")
    if s['da_steps'] and s['first_order']:
        raise FlagError("--da_steps switches from first to second order, which --first_order forbids; drop one.")
    if s['cosine'] and not s['total_steps']:
        raise FlagError("--cosine anneals over the run's meta-steps, so it needs --total_steps (or --epoch).")
    if s['head'] not in HEADS:
        raise FlagError(f"--head is '{s['head']}', which is not a head here; use one of {', '.join(HEADS)}.")
    if s['head'] == 'unicorn' and s['algo'] == 'reptile':
        raise FlagError("--head unicorn learns its row through the inner loop's gradient, which --algo reptile "
                        "does not take; use --head zero or proto with Reptile.")


def msl_weights(steps, progress, device=None, dtype=torch.float64):
    """MSL's weights of the query losses after inner steps 1..steps, `progress` (0 to 1) into the
    annealing: uniform at 0; each non-final weight falls linearly to MSL_FLOOR / steps, reached
    just before 1, and the final step takes the rest (the weights always sum to 1). Filled in on
    `device` from Python numbers: a tensor copied from the host would make a GPU step wait."""
    non_final = max((1 - progress) / steps, MSL_FLOOR / steps)
    weights = torch.full((steps,), non_final, dtype=dtype, device=device)
    weights[-1] = 1 - non_final * (steps - 1)
    return weights


def with_gradient(value, params, directions):
    """A tensor equal to `value` whose gradient with respect to `params` is `directions`: what
    lets Reptile's meta-update go through the same backward() and meta-optimizer as MAML's."""
    surrogate = sum((p * d.detach()).sum() for p, d in zip(params, directions) if p.requires_grad)
    return value.detach() + (surrogate - surrogate.detach())


def head_names(net, algo):
    """The (weight, bias) names of the head, the network's last layer when it is linear (the only
    layer ANIL adapts), or () when it is not (then the network serves only its own classes)."""
    if net.config[-1][0] == 'linear':
        return net.names_of('linear')[-1]
    if algo == 'anil':
        raise FlagError("--algo anil adapts the last linear layer, but the network does not end in "
                        "one; end the config with a ('linear', ...) layer.")
    return ()


def head_config(config, head, n_way):
    """(the network config that `head` trains, the classes of a training task). A head other than
    'learned' keeps one row of the last linear layer, which must end the config; n_way defaults to
    the out features of a config built for n_way classes (e.g. omniglot_train.network(n_way))."""
    config = [(name, list(params)) for name, params in config]
    last, params = config[-1]
    if head == 'learned':
        return config, n_way or (params[0] if last == 'linear' else None)
    if last != 'linear':
        raise FlagError(f"--head {head} sets up the network's last layer for each task, which must be a "
                        f"('linear', [out, in]) layer; end the config with one.")
    n_way = n_way or (params[0] if params[0] > 1 else None)
    if n_way is None:
        raise FlagError(f"--head {head} needs the classes of a training task: pass n_way.")
    return config[:-1] + [('linear', [1, params[1]])], n_way


def too_many_classes(n_way, rows):
    """The sentence for a task of more classes than a learned head has rows."""
    return (f"this checkpoint's learned head tells apart {rows} classes, fewer than the {n_way} asked for; "
            f"use at most {rows} classes, or adapt a head to any number of them at test time with --head zero or "
            f"--head proto (in a notebook: maml.serve(n_way, head='proto')).")


class Extras(nn.Module):
    """The meta-parameters beside the network's: learned inner learning rates (LSLR, Meta-SGD),
    per-step batch-norm weights (BNWB) and running statistics (BNRS, buffers)."""

    def __init__(self, net, adapted, update_lr, update_step, algo, lslr, bnwb, bnrs):
        super().__init__()
        self.update_lr, self.update_step, self.per_step = update_lr, update_step, lslr
        params = dict(net.named_parameters())
        self.lr_index = {name: i for i, name in enumerate(adapted)} if lslr or algo == 'metasgd' else {}
        self.lrs = nn.ParameterList(
            nn.Parameter(torch.full((update_step,) if lslr else params[name].shape, update_lr))
            for name in self.lr_index)
        self.bn_names = net.names_of('bn') if bnwb or bnrs else []
        self.bnwb, self.bnrs = bnwb, bnrs
        slots = update_step + 1
        self.bn_weights = nn.ParameterList(
            nn.Parameter(params[name].detach().clone().expand(slots, -1).clone())
            for pair in (self.bn_names if bnwb else []) for name in pair)
        for layer, (weight, _) in enumerate(self.bn_names if bnrs else []):
            channels = params[weight].shape[0]
            self.register_buffer(f'running_mean_{layer}', torch.zeros(slots, channels))
            self.register_buffer(f'running_var_{layer}', torch.ones(slots, channels))

    def lr(self, name, step):
        """The inner learning rate of parameter `name` at inner step `step` (0-based)."""
        if name not in self.lr_index:
            return self.update_lr
        lr = self.lrs[self.lr_index[name]]
        return lr[min(step, self.update_step - 1)] if self.per_step else lr

    def bn_params(self, version):
        """BNWB's batch-norm weights for the network after `version` inner steps, by name ({} without)."""
        if not self.bnwb:
            return {}
        slot = min(version, self.update_step)
        return {name: self.bn_weights[2 * layer + k][slot]
                for layer, pair in enumerate(self.bn_names) for k, name in enumerate(pair)}

    def running(self, version):
        """BNRS's (mean, var) per batch-norm layer after `version` inner steps, or None without."""
        if not self.bnrs:
            return None
        slot = min(version, self.update_step)
        return [(getattr(self, f'running_mean_{layer}')[slot], getattr(self, f'running_var_{layer}')[slot])
                for layer in range(len(self.bn_names))]

    @torch.no_grad()
    def track(self, stats):
        """Move each slot's running statistics towards the batch's: `stats[version][layer]` is a
        (mean, var) pair with a leading task dim, averaged over the tasks."""
        for slot, layers in enumerate(stats):
            for layer, (mean, var) in enumerate(layers):
                for kind, batch in (('mean', mean), ('var', var)):
                    running = getattr(self, f'running_{kind}_{layer}')[slot]
                    running.lerp_(batch.mean(0).to(running.dtype), BN_MOMENTUM)
