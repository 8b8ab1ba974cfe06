"""
The MAML meta-learner (Finn, Abbeel, Levine 2017, Algorithm 2), all tasks of a meta-batch at once.

    maml = Meta(config, imgc=1, imgsz=28, update_lr=0.4, update_step=1)   # keywords, or the seed's
    maml = Meta(args, config)               # Meta(args, config), args an argparse Namespace
    accs = maml(x_spt, y_spt, x_qry, y_qry) # one meta-update; x_*: [task_num, setsz, c, h, w]
    accs = maml.finetune(x_spt, y_spt, x_qry, y_qry)      # evaluate, meta-parameters untouched

    maml = Meta.from_checkpoint('checkpoints/best.pth')    # in a notebook
    fast_weights = maml.adapt(x_spt, y_spt)                # one task: [setsz, c, h, w]
    logits = maml.net(x_qry, params=fast_weights)

Algorithm 2, line by line:
    line 3   sample a batch of tasks                  -> the caller (the episode loaders)
    lines 5-6 theta'_i = theta - alpha grad L_Ti(theta) -> `_inner_loop`, `update_step` times
    line 8   query loss L_Ti(theta'_i)                -> `_task`
    line 10  theta <- theta - beta grad sum_i L_Ti      -> `meta_update` (Adam, as in the paper),
                                                           on the mean over tasks rather than the
                                                           sum, so that meta_lr does not depend on
                                                           task_num
The loop over tasks (line 4) is `torch.func.vmap`. Inner gradients come from `torch.func.grad`,
whose result stays differentiable with respect to theta, so `loss.backward()` yields the true
second-order meta-gradient; with `first_order` they are detached (the paper's first-order MAML).
"""
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call, grad, vmap

from errors import DamagedError, FlagError, MissingError
from learner import Learner

# Meta's hyperparameters and their defaults (the seed's Omniglot settings); the network's input
# shape, imgc and imgsz, has no default. A checkpoint stores these to rebuild the learner.
DEFAULTS = dict(update_lr=0.4, meta_lr=1e-3, update_step=5, update_step_test=10, first_order=False,
                grad_clip=0.0, amp=False)
SHAPE = ('imgc', 'imgsz')


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
        self.net = Learner(config, settings['imgc'], settings['imgsz'])
        self.meta_optim = torch.optim.Adam(self.net.parameters(), lr=self.meta_lr)
        self.grad_reducer = None   # distributed.attach: averages the meta-gradient over ranks
        if compile_mode:
            self.compile(compile_mode)

    def compile(self, mode='default'):
        """torch.compile the batched tasks (training and evaluation); mode 'reduce-overhead' also
        replays them as CUDA graphs. Each new shape or setting compiles once, taking a minute or two."""
        self._batched = torch.compile(self._batched, mode=mode, dynamic=False)
        return self

    def hparams(self):
        """The hyperparameters as a plain dict (what a checkpoint stores to rebuild this object)."""
        return {**{name: getattr(self, name) for name in DEFAULTS},
                'imgc': self.net.imgc, 'imgsz': self.net.imgsz}

    def _loss(self, params, x, y):
        return F.cross_entropy(functional_call(self.net, params, (x,)), y)

    def _accuracy(self, params, x, y):
        return (functional_call(self.net, params, (x,)).argmax(-1) == y).float().mean()

    def _inner_loop(self, params, x_spt, y_spt, steps, x_qry=None, y_qry=None):
        """`steps` SGD steps on one task's support loss; with a query set, also its accuracy
        before each step. Returns (adapted params, list of query accuracies)."""
        accs = []
        for _ in range(steps):
            if x_qry is not None:
                accs.append(self._accuracy(params, x_qry, y_qry))
            grads = grad(self._loss)(params, x_spt, y_spt)
            if self.first_order:
                grads = {name: g.detach() for name, g in grads.items()}
            params = {name: p - self.update_lr * grads[name] for name, p in params.items()}
        return params, accs

    def _task(self, params, x_spt, y_spt, x_qry, y_qry, steps, track_steps):
        """One task: adapt on the support set, then the query loss and accuracy of the adapted net."""
        tracked_query = (x_qry, y_qry) if track_steps else (None, None)
        params, accs = self._inner_loop(params, x_spt, y_spt, steps, *tracked_query)
        logits = functional_call(self.net, params, (x_qry,))
        accs.append((logits.argmax(-1) == y_qry).float().mean())
        return F.cross_entropy(logits, y_qry), torch.stack(accs)

    def _batched(self, x_spt, y_spt, x_qry, y_qry, steps, track_steps):
        params = dict(self.net.named_parameters())
        task = lambda *data: self._task(params, *data, steps=steps, track_steps=track_steps)
        with torch.autocast(x_spt.device.type, dtype=torch.bfloat16, enabled=self.amp):
            return vmap(task)(x_spt, y_spt, x_qry, y_qry)

    def meta_loss(self, x_spt, y_spt, x_qry, y_qry, track_steps=True):
        """The differentiable meta-loss (mean over tasks of the query loss after `update_step`
        inner steps) and the query accuracy, mean over tasks: after each inner step 0..update_step
        when `track_steps`, else after the last only (one entry, and less work)."""
        losses, accs = self._batched(x_spt, y_spt, x_qry, y_qry, self.update_step, track_steps)
        return losses.mean(), accs.mean(0)

    def meta_update(self, loss):
        """Line 10 of Algorithm 2: one Adam step on the meta-parameters along -grad(loss)."""
        self.meta_optim.zero_grad(set_to_none=True)
        loss.backward()
        if self.grad_reducer is not None:   # before clipping, which must see the whole meta-batch's gradient
            self.grad_reducer(self.net.parameters())
        if self.grad_clip > 0:
            nn.utils.clip_grad_norm_(self.net.parameters(), self.grad_clip, foreach=True)
        self.meta_optim.step()

    def forward(self, x_spt, y_spt, x_qry, y_qry, track_steps=True):
        """One meta-training step; returns the query accuracies (a tensor, left on the device)."""
        loss, accs = self.meta_loss(x_spt, y_spt, x_qry, y_qry, track_steps)
        self.meta_update(loss)
        return accs

    @torch.no_grad()
    def finetune(self, x_spt, y_spt, x_qry, y_qry):
        """Query accuracy after each of 0..update_step_test fine-tuning steps: [steps + 1] for one
        task ([setsz, c, h, w] inputs), [tasks, steps + 1] for a batch of tasks."""
        single = x_spt.dim() == 4
        if single:
            x_spt, y_spt, x_qry, y_qry = (t.unsqueeze(0) for t in (x_spt, y_spt, x_qry, y_qry))
        _, accs = self._batched(x_spt, y_spt, x_qry, y_qry, self.update_step_test, track_steps=True)
        accs = accs.clone()   # a CUDA-graph replay (--compile reduce-overhead) reuses its output buffers
        return accs[0] if single else accs

    finetunning = finetune   # the seed's name

    def adapt(self, x_spt, y_spt, steps=None):
        """The fast weights of one task after `steps` (default update_step_test) SGD steps on its
        support set, as a dict for `self.net(x, params=...)`."""
        params = {name: p.detach() for name, p in self.net.named_parameters()}
        return self._inner_loop(params, x_spt, y_spt, steps or self.update_step_test)[0]

    @torch.no_grad()
    def predict(self, x_spt, y_spt, x_qry, steps=None):
        """Class probabilities of the query images [tasks, n_query, n_way] after `steps` (default
        update_step_test) fine-tuning steps on each task's support set; for ensembles of learners."""
        params = {name: p.detach() for name, p in self.net.named_parameters()}

        def task(xs, ys, xq):
            fast, _ = self._inner_loop(params, xs, ys, steps or self.update_step_test)
            return functional_call(self.net, fast, (xq,)).float().softmax(-1)
        with torch.autocast(x_spt.device.type, dtype=torch.bfloat16, enabled=self.amp):
            return vmap(task)(x_spt, y_spt, x_qry)

    def checkpoint(self, **extra):
        """A dict that `torch.load(..., weights_only=True)` reads and `from_checkpoint` rebuilds."""
        return {'model': self.net.state_dict(), 'config': self.net.config, 'hparams': self.hparams(),
                'optimizer': self.meta_optim.state_dict(), 'torch_version': str(torch.__version__), **extra}

    @classmethod
    def from_checkpoint(cls, path, map_location=None):
        """A ready Meta (weights and meta-optimizer state) from a checkpoint file."""
        return cls.from_state(load_checkpoint(path, map_location))

    @classmethod
    def from_state(cls, ckpt):
        """A ready Meta from a checkpoint dict already loaded by `load_checkpoint`."""
        known = {k: v for k, v in ckpt['hparams'].items() if k in DEFAULTS or k in SHAPE}
        maml = cls(ckpt['config'], **known)   # older checkpoints also list the task shape: not Meta's
        saved = next(iter(ckpt['model'].values()))
        maml.to(saved.device, saved.dtype)
        maml.amp = maml.amp and saved.device.type == 'cuda'   # bf16 autocast is for CUDA only
        maml.net.load_state_dict(ckpt['model'])
        maml.meta_optim.load_state_dict(ckpt['optimizer'])
        return maml


def load_checkpoint(path, map_location=None):
    """torch.load with weights_only=True, and one clear sentence for a missing or damaged file.
    On a machine without CUDA, tensors saved on a GPU are loaded onto the CPU."""
    if map_location is None and not torch.cuda.is_available():
        map_location = 'cpu'
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise MissingError(f"Checkpoint {path} does not exist; check the path.") from None
    except Exception as e:
        raise DamagedError(f"Checkpoint {path} cannot be read ({type(e).__name__}); the file is damaged "
                           f"or not a MAML checkpoint, so load another one such as best.pth.") from None
    if not isinstance(ckpt, dict) or not {'model', 'config', 'hparams'} <= ckpt.keys():
        raise DamagedError(f"Checkpoint {path} is not a MAML checkpoint of this project (it lacks "
                           f"model/config/hparams); load one written by the training scripts.")
    return ckpt
