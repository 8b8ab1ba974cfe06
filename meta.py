"""
The MAML meta-learner (Finn, Abbeel, Levine 2017, Algorithm 2), all tasks of a meta-batch at once.

    maml = Meta(config, imgc=1, imgsz=28, update_lr=0.4, update_step=1)   # keywords, or the seed's
    maml = Meta(args, config)               # Meta(args, config), args an argparse Namespace
    accs = maml(x_spt, y_spt, x_qry, y_qry) # one meta-update; x_*: [task_num, setsz, c, h, w]
    accs = maml.finetune(x_spt, y_spt, x_qry, y_qry)      # evaluate, meta-parameters untouched

    maml = Meta.from_checkpoint('checkpoints/best.pth')    # in a notebook
    fast_weights = maml.adapt(x_spt, y_spt)                # one task: [setsz, c, h, w]
    logits = maml.predict(x_qry, fast_weights)
    fast_weights = maml.adapt(x_spt, y_spt, n_way=20)      # any number of classes, with a head that allows it

The family (ANIL, Meta-SGD, Reptile, and MAML++'s MSL, DA, LSLR, BNWB, BNRS, CA) and the heads
that serve any number of classes (zero, UNICORN, Proto-MAML) are options of this one engine, off
by default; maml/family.py describes them and holds their extra pieces.

Algorithm 2, line by line:
    line 3   sample a batch of tasks                  -> the caller (the episode loaders)
    lines 5-6 theta'_i = theta - alpha grad L_Ti(theta) -> `_task`, `update_step` times (the head
                                                           first set up for the task's classes, `_head`)
    line 8   query loss L_Ti(theta'_i)                -> `_task` (and `meta_loss`, for MSL's weights)
    line 10  theta <- theta - beta grad sum_i L_Ti      -> `meta_update` (Adam, as in the paper),
                                                           on the mean over tasks rather than the
                                                           sum, so that meta_lr does not depend on
                                                           task_num
The loop over tasks (line 4) is `torch.func.vmap`. Inner gradients come from `torch.func.grad`,
whose result stays differentiable with respect to theta, so `loss.backward()` yields the true
second-order meta-gradient; with `first_order` they are detached (the paper's first-order MAML).
The query passes after intermediate inner steps, which only report accuracies (the seed's `forward`
returns them), run outside the meta-gradient's graph; MSL, whose loss weighs them, keeps them in.
"""
import contextlib

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import grad, vmap

from learner import Learner
from maml import family
from maml.checkpoints import load_checkpoint
from maml.devices import tune_cpu
from maml.errors import DamagedError, FlagError
from maml.presets import HPARAMS

DEFAULTS = HPARAMS          # Meta's hyperparameters and their defaults (maml/presets.py)
SHAPE = ('imgc', 'imgsz')   # the network's input, which has no default
TASK_SHAPE = ('k_spt', 'k_qry', 'task_num')   # stored in hparams by older checkpoints, unused by Meta


class Meta(nn.Module):

    def __init__(self, args=None, config=None, **hparams):
        """Meta(config, imgc=..., imgsz=..., **hparams) or, as in the seed, Meta(args, config) with an
        argparse Namespace whose attributes named in DEFAULTS and SHAPE are read (others ignored);
        keywords override args. `compile=MODE` compiles the step (see `compile`)."""
        super().__init__()
        if config is None and isinstance(args, (list, tuple)):
            args, config = None, args
        if config is None:
            raise TypeError("Meta needs a network config list: Meta(config, imgc=..., imgsz=...).")
        compile_mode = hparams.pop('compile', getattr(args, 'compile', None))
        unknown = set(hparams) - set(DEFAULTS) - set(SHAPE)
        if unknown:
            raise TypeError(f"Meta got unknown hyperparameters {sorted(unknown)}; it takes "
                            f"{', '.join([*DEFAULTS, *SHAPE])}.")
        from_args = {name: getattr(args, name) for name in (*DEFAULTS, *SHAPE)
                     if getattr(args, name, None) is not None}
        settings = {**DEFAULTS, **from_args, **hparams}
        if settings['total_steps'] is None:
            settings['total_steps'] = getattr(args, 'epoch', None)
        missing = [name for name in SHAPE if name not in settings]
        if missing:
            raise TypeError(f"Meta needs the input shape: pass {' and '.join(missing)}.")
        self.update_lr, self.meta_lr = float(settings['update_lr']), float(settings['meta_lr'])
        self.update_step, self.update_step_test = int(settings['update_step']), int(settings['update_step_test'])
        if self.update_step < 1 or self.update_step_test < 1:
            raise FlagError(f"update_step ({self.update_step}) and update_step_test "
                            f"({self.update_step_test}) must be at least 1.")
        self.first_order, self.amp = bool(settings['first_order']), bool(settings['amp'])
        self.grad_clip = float(settings['grad_clip'] or 0.0)
        family.check_options(settings)
        for name in ('algo', 'msl_steps', 'da_steps', 'lslr', 'bnwb', 'bnrs', 'cosine', 'min_meta_lr', 'total_steps',
                     'head'):
            setattr(self, name, settings[name])
        config, self.n_way = family.head_config(config, self.head, settings['n_way'])
        self.net = Learner(config, settings['imgc'], settings['imgsz'])
        self.head_names = family.head_names(self.net, self.algo)
        if self.head in family.UNLEARNED_HEADS:   # never read (`_head`): kept at zero, out of the meta-update
            for name in self.head_names:
                self.net.get_parameter(name).requires_grad_(False).zero_()
        bn = {name for pair in self.net.names_of('bn') for name in pair} if self.bnwb else set()
        # the parameters adapted in the inner loop; the others only by the meta-update
        self.adapted = (list(self.head_names) if self.algo == 'anil' else
                        [name for name, _ in self.net.named_parameters() if name not in bn])
        self.extras = family.Extras(self.net, self.adapted, self.update_lr, self.update_step, self.algo,
                                    self.lslr, self.bnwb, self.bnrs)
        # the net's, then the extras'
        self.meta_optim = torch.optim.Adam([p for p in self.parameters() if p.requires_grad], lr=self.meta_lr)
        self.scheduler = (torch.optim.lr_scheduler.CosineAnnealingLR(self.meta_optim, self.total_steps,
                                                                     self.min_meta_lr) if self.cosine else None)
        self.meta_steps_done = 0
        self.grad_reducer = None   # distributed.attach: averages the meta-gradient over ranks
        tune_cpu()
        if compile_mode:
            self.compile(compile_mode)

    def serve(self, n_way, head=None):
        """Adapt to n_way-way tasks from now on (finetune, adapt, predict), with `head` in place of the
        one trained: 'zero' or 'proto' serve any n_way from 2 with any checkpoint. Refused in one
        sentence when the head cannot serve n_way classes. Returns self."""
        if head not in (None, self.head) and head not in family.TEST_HEADS:
            raise FlagError(f"a '{self.head}' head can be replaced at test time by {' or '.join(family.TEST_HEADS)}, "
                            f"which need nothing learned, not by '{head}'.")
        head = head or self.head
        if n_way < 2:
            raise FlagError(f"a task needs two classes to tell apart, not {n_way}.")
        rows = self.net.config[-1][1][0] if self.head_names else self.n_way
        if head == 'learned' and n_way > rows:
            raise FlagError(family.too_many_classes(n_way, rows))
        self.head, self.n_way = head, n_way
        return self

    def compile(self, mode='default'):
        """torch.compile the batched tasks (training and evaluation); mode 'reduce-overhead' also
        replays them as CUDA graphs. Each new shape or setting compiles once, taking a minute or two."""
        self._batched = torch.compile(self._batched, mode=mode, dynamic=False)
        return self

    def hparams(self):
        """The hyperparameters as a plain dict (what a checkpoint stores to rebuild this object)."""
        return {**{name: getattr(self, name) for name in DEFAULTS},
                'imgc': self.net.imgc, 'imgsz': self.net.imgsz}

    def _forward(self, params, x, version, train, twice=False, head=True):
        """Logits of the net with weights `params` after `version` inner steps (without `head`: the
        features the head takes), and, when tracking BNRS in meta-training, the batch statistics at
        each batch norm ([] otherwise). `twice`: the meta-gradient will differentiate this pass twice
        (a support pass of second-order training), so batch norm keeps its primitive form; every
        other pass takes torch's fused kernels."""
        if train and self.bnrs:
            return self.net(x, params=params, with_stats=True, fused_bn=not twice, head=head)
        return self.net(x, params=params, bn_stats=None if train else self.extras.running(version),
                        fused_bn=not twice, head=head), []

    def _head(self, theta, x_spt, y_spt, n_way, train):
        """The head's weight and bias [n_way, features], [n_way] that the inner loop of a task with
        n_way classes starts from: 'learned', its first n_way rows; 'unicorn', its one learned row
        copied n_way times (so its meta-gradient is the sum over the copies); 'zero', zeros; 'proto',
        from the support set's class means c_k of the features, W_k = 2 c_k, b_k = -||c_k||^2."""
        if not self.head_names:   # a network that does not end in a linear layer serves its own classes
            return ()
        weight, bias = (theta[name] for name in self.head_names)
        if self.head == 'learned':
            if n_way > weight.shape[0]:
                raise FlagError(family.too_many_classes(n_way, weight.shape[0]))
            return weight[:n_way], bias[:n_way]
        if self.head == 'unicorn':
            return weight.expand(n_way, -1), bias.expand(n_way)
        if self.head == 'zero':
            return weight.new_zeros(n_way, weight.shape[1]), bias.new_zeros(n_way)
        features = self._forward({**theta, **self.extras.bn_params(0)}, x_spt, 0, train, head=False)[0].to(weight.dtype)
        one_hot = F.one_hot(y_spt, n_way).to(features.dtype)
        means = one_hot.t() @ features / one_hot.sum(0).unsqueeze(1)
        return 2 * means, -means.square().sum(1)

    def _task(self, theta, x_spt, y_spt, x_qry, y_qry, n_way, steps, inside, outside, graph_at, first_order, train):
        """One n_way-way task: `steps` SGD steps on the support loss from theta with the head set up
        for the task (`_head`; only the names in `self.adapted` move). The query loss and accuracy are
        taken after each number of steps in `inside`; those not in `graph_at` (the steps whose loss
        the meta-gradient does not use) without a graph. Returns (query losses, query accuracies,
        adapted weights, batch statistics of the support set after 0..steps-1 steps and of the query
        set after `steps`, and the adapted weights after each number of steps in `outside`, stacked,
        for the passes that `_report` takes)."""
        theta = dict(zip(self.head_names, self._head(theta, x_spt, y_spt, n_way, train)), **{
            name: p for name, p in theta.items() if name not in self.head_names})
        fast = {name: theta[name] for name in self.adapted}
        frozen = {name: p for name, p in theta.items() if name not in fast}
        losses, accs, stats, kept = [], [], [], []

        def support_loss(fast, version):
            logits, batch = self._forward({**frozen, **fast, **self.extras.bn_params(version)}, x_spt, version, train,
                                          twice=train and not first_order)
            return F.cross_entropy(logits, y_spt), batch

        for version in range(steps + 1):
            if version in inside:
                with torch.set_grad_enabled(torch.is_grad_enabled() and version in graph_at):
                    params = {**frozen, **fast, **self.extras.bn_params(version)}
                    logits, batch = self._forward(params, x_qry, version, train)
                    losses.append(F.cross_entropy(logits, y_qry))
                    accs.append((logits.argmax(-1) == y_qry).float().mean())
            if version in outside:
                kept.append({name: p.detach() for name, p in fast.items()})
            if version == steps:
                kept = {name: torch.stack([weights[name] for weights in kept]) for name in fast} if kept else {}
                return torch.stack(losses), torch.stack(accs), fast, stats + [batch], kept
            grads, batch = grad(support_loss, has_aux=True)(fast, version)
            stats.append(batch)
            if first_order:
                grads = {name: g.detach() for name, g in grads.items()}
            fast = {name: p - self._lr(name, version, p) * grads[name] for name, p in fast.items()}

    @torch.no_grad()
    def _report(self, kept, versions, x_qry, y_qry, train):
        """Query losses and accuracies [tasks, len(versions)] of the weights `kept` after each number
        of steps in `versions` ({name: [tasks, len(versions), ...]}, the rest theta): the passes that
        only report, without a graph. On the CPU task by task, whose dense convolutions run faster
        there than the grouped ones that vmap makes (docs/speed.md); elsewhere under vmap."""
        theta = {name: p.detach() for name, p in self.net.named_parameters()}

        def task(weights, x, y):
            losses, accs = [], []
            for i, version in enumerate(versions):
                params = {**theta, **{name: w[i] for name, w in weights.items()}, **self.extras.bn_params(version)}
                logits = self._forward(params, x, version, train)[0]
                losses.append(F.cross_entropy(logits, y))
                accs.append((logits.argmax(-1) == y).float().mean())
            return torch.stack(losses), torch.stack(accs)
        if x_qry.device.type != 'cpu':
            return vmap(task)(kept, x_qry, y_qry)
        per_task = [task({name: w[t] for name, w in kept.items()}, x_qry[t], y_qry[t]) for t in range(len(x_qry))]
        return tuple(torch.stack(parts) for parts in zip(*per_task))

    def _lr(self, name, version, p):
        """The inner learning rate of `name` at inner step `version`; Meta-SGD's per-weight rates of a
        learned head serving fewer classes than its rows, cut to the rows in use."""
        lr = self.extras.lr(name, version)
        return lr[:p.shape[0]] if torch.is_tensor(lr) and lr.dim() == p.dim() and name in self.head_names else lr

    def _batched(self, x_spt, y_spt, x_qry, y_qry, n_way, steps, query_at, graph_at, first_order, train):
        """`_task` on every task under vmap: (query losses and accuracies [tasks, len(query_at)], adapted
        weights, batch statistics). The query passes after `steps` and those the meta-gradient
        differentiates (`graph_at`) run inside; the others, which only report, in `_report`."""
        theta = dict(self.net.named_parameters())
        inside = tuple(v for v in query_at if v == steps or v in graph_at)
        outside = tuple(v for v in query_at if v not in inside)
        task = lambda *data: self._task(theta, *data, n_way, steps, inside, outside, graph_at, first_order, train)
        with self._autocast(x_spt.device):
            losses, accs, adapted, stats, kept = vmap(task)(x_spt, y_spt, x_qry, y_qry)
            if outside:
                reported = self._report(kept, outside, x_qry, y_qry, train)
                order = sorted(range(len(query_at)), key=(inside + outside).__getitem__)
                losses, accs = (torch.cat([a, b], 1)[:, order] for a, b in zip((losses, accs), reported))
        return losses, accs, adapted, stats

    def _autocast(self, device):
        """bf16 autocast with --amp; no context otherwise, so that Meta runs on any device (even 'meta')."""
        return torch.autocast(device.type, dtype=torch.bfloat16) if self.amp else contextlib.nullcontext()

    def step_weights(self):
        """MSL's weights of the query losses after inner steps 1..update_step at this meta-step, on
        the meta-parameters' device, or None when only the last step's counts (MSL off or annealed)."""
        if self.meta_steps_done >= self.msl_steps:
            return None
        like = self.net.vars[0]
        return family.msl_weights(self.update_step, self.meta_steps_done / self.msl_steps, like.device, like.dtype)

    def meta_loss(self, x_spt, y_spt, x_qry, y_qry, track_steps=True):
        """The differentiable meta-loss (mean over tasks of the query loss after `update_step`
        inner steps, or MSL's weighted sum over steps) and the query accuracy, mean over tasks:
        after each inner step 0..update_step when `track_steps`, else after the last only (one
        entry, and less work). With Reptile the loss is the query loss, and its gradient is
        theta - the mean adapted weights. With BNRS it also updates the running statistics."""
        steps, weights = self.update_step, self.step_weights()
        # the query losses the meta-gradient differentiates: the last step's, MSL's every step's, none of Reptile's
        graph_at = () if self.algo == 'reptile' else tuple(range(1, steps + 1)) if weights is not None else (steps,)
        query_at = tuple(range(steps + 1)) if track_steps else graph_at or (steps,)
        first_order = self.first_order or self.meta_steps_done < self.da_steps or self.algo == 'reptile'
        losses, accs, adapted, stats = self._batched(x_spt, y_spt, x_qry, y_qry, self.n_way, steps, query_at,
                                                     graph_at, first_order, True)
        if self.bnrs:
            self.extras.track(stats)
        if weights is None:
            loss = losses[:, -1].mean()
        else:
            loss = (losses[:, -steps:].mean(0) * weights).sum()
        if self.algo == 'reptile':
            theta = dict(self.net.named_parameters())
            loss = family.with_gradient(loss, theta.values(), [p.detach() - adapted[name].mean(0)
                                                               for name, p in theta.items()])
        accs = accs.mean(0)
        return loss, accs if track_steps else accs[-1:]

    def meta_update(self, loss):
        """Line 10 of Algorithm 2: one Adam step on the meta-parameters along -grad(loss)."""
        self.meta_optim.zero_grad(set_to_none=True)
        loss.backward()
        if self.grad_reducer is not None:   # before clipping, which must see the whole meta-batch's gradient
            self.grad_reducer(self)
        if self.grad_clip > 0:
            nn.utils.clip_grad_norm_(self.parameters(), self.grad_clip, foreach=True)
        self.meta_optim.step()
        if self.scheduler is not None:
            self.scheduler.step()
        self.meta_steps_done += 1

    def forward(self, x_spt, y_spt, x_qry, y_qry, track_steps=True):
        """One meta-training step; returns the query accuracies (a tensor, left on the device)."""
        loss, accs = self.meta_loss(x_spt, y_spt, x_qry, y_qry, track_steps)
        self.meta_update(loss)
        return accs

    @torch.no_grad()
    def finetune(self, x_spt, y_spt, x_qry, y_qry, n_way=None):
        """Query accuracy after each of 0..update_step_test fine-tuning steps on n_way-way tasks
        (default: the training tasks' classes): [steps + 1] for one task ([setsz, c, h, w] inputs),
        [tasks, steps + 1] for a batch of tasks."""
        single = x_spt.dim() == 4
        if single:
            x_spt, y_spt, x_qry, y_qry = (t.unsqueeze(0) for t in (x_spt, y_spt, x_qry, y_qry))
        steps = self.update_step_test
        _, accs, _, _ = self._batched(x_spt, y_spt, x_qry, y_qry, n_way or self.n_way, steps, tuple(range(steps + 1)),
                                      (), True, False)
        accs = accs.clone()   # a CUDA-graph replay (--compile reduce-overhead) reuses its output buffers
        return accs[0] if single else accs

    finetunning = finetune   # the seed's name

    @torch.no_grad()
    def adapt(self, x_spt, y_spt, steps=None, n_way=None):
        """The weights of the net after `steps` (default update_step_test) SGD steps on one task's
        support set of n_way classes (default: the training tasks'), labels 0..n_way-1, as a dict for
        `predict` (or, without BNRS, `self.net(x, params=...)`)."""
        steps = self.update_step_test if steps is None else steps
        theta = {name: p.detach() for name, p in self.net.named_parameters()}
        adapted = self._task(theta, x_spt, y_spt, x_spt, y_spt, n_way or self.n_way, steps, (steps,), (), (), True,
                             False)[2]
        return {**theta, **adapted, **self.extras.bn_params(steps)}

    def predict(self, x, weights, steps=None):
        """Logits of the net with `weights` from `adapt(..., steps)`, normalised as in evaluation."""
        return self._forward(weights, x, self.update_step_test if steps is None else steps, train=False)[0]

    @torch.no_grad()
    def query_probabilities(self, x_spt, y_spt, x_qry, steps=None, n_way=None):
        """Class probabilities of the query images [tasks, n_query, n_way] after `steps` (default
        update_step_test) fine-tuning steps on each task's support set; for ensembles of learners."""
        def task(xs, ys, xq):
            return self.predict(xq, self.adapt(xs, ys, steps, n_way), steps).float().softmax(-1)
        with self._autocast(x_spt.device):
            return vmap(task)(x_spt, y_spt, x_qry)

    def checkpoint(self, **extra):
        """A dict that `torch.load(..., weights_only=True)` reads and `from_checkpoint` rebuilds."""
        family_state = {'extras': self.extras.state_dict(), 'meta_steps_done': self.meta_steps_done,
                        'scheduler': self.scheduler.state_dict() if self.scheduler else None}
        return {'model': self.net.state_dict(), 'config': self.net.config, 'hparams': self.hparams(),
                'optimizer': self.meta_optim.state_dict(), 'family': family_state,
                'torch_version': str(torch.__version__), **extra}

    def load_state(self, ckpt):
        """Load a checkpoint dict's weights, extra meta-parameters, optimizer and schedule into this
        Meta (built with the same hyperparameters); what a resumed run needs."""
        self.net.load_state_dict(ckpt['model'])
        self.meta_optim.load_state_dict(ckpt['optimizer'])
        for state in self.meta_optim.state.values():
            # a checkpoint loaded onto a GPU brings Adam's step counts there, and Adam then reads each
            # back to the host at every update (36 syncs a step): keep them on the CPU, as a fresh Adam does
            if torch.is_tensor(state.get('step')):
                state['step'] = state['step'].cpu()
        saved = ckpt.get('family')   # absent in plain-MAML checkpoints written before the family
        if saved:
            self.extras.load_state_dict(saved['extras'])
            self.meta_steps_done = saved['meta_steps_done']
            if self.scheduler is not None:
                self.scheduler.load_state_dict(saved['scheduler'])
                # a resumed run may end later than the one that saved the schedule: past T_max the
                # cosine climbs again, so the schedule is stretched to end where this run ends
                self.scheduler.T_max = self.total_steps

    @classmethod
    def from_checkpoint(cls, path, map_location=None):
        """A ready Meta (weights and meta-optimizer state) from a checkpoint file."""
        return cls.from_state(load_checkpoint(path, map_location))

    @classmethod
    def from_state(cls, ckpt):
        """A ready Meta from a checkpoint dict already loaded by `load_checkpoint`; refused in one
        sentence when the checkpoint names an option this version does not know (it would load as
        another model)."""
        unknown = sorted(set(ckpt['hparams']) - set(DEFAULTS) - set(SHAPE) - set(TASK_SHAPE))
        if unknown:
            raise DamagedError(f"this checkpoint was trained with {', '.join(unknown)}, which this version of the "
                               f"code does not know, so it would load as another model; update the repository "
                               f"to the version that wrote it.")
        maml = cls(ckpt['config'], **{k: v for k, v in ckpt['hparams'].items() if k not in TASK_SHAPE})
        saved = next(iter(ckpt['model'].values()))
        maml.to(saved.device, saved.dtype)
        maml.amp = maml.amp and saved.device.type == 'cuda'   # bf16 autocast is for CUDA only
        maml.load_state(ckpt)
        return maml
