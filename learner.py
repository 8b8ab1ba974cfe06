"""
The base network of MAML, built from a config list of (name, params) layers.

    config = [
        ('conv2d', [64, 1, 3, 3, 2, 1]),   # [ch_out, ch_in, kernel, kernel, stride, padding]
        ('bn', [64]),
        ('relu', []),                      # the seed's ('relu', [True]) also works (see below)
        ('flatten', []),
        ('linear', [5, 64 * 14 * 14]),     # [out, in]
    ]
    net = Learner(config, imgc=1, imgsz=28)
    logits = net(x)                        # its own parameters
    logits = net(x, params=fast_weights)   # a dict {name: tensor} or a list, in parameter order
    logits = net(x, params=fast_weights, fused_bn=True)   # where only first derivatives are taken
    net = Learner(config, 1, 28, conv='matmul')   # the same function, convolutions as im2col + matmul

The forward pass is a pure function of (x, params), so `torch.func.functional_call`, `grad` and
`vmap` compose with it. Batch norm normalises with the statistics of the batch it is given (the
paper's transductive setting, also at test time) and keeps no running buffers: a caller that
tracks running statistics (MAML++'s BNRS, in meta.py) reads each batch's with `with_stats=True`
and passes its own with `bn_stats`, so no buffer is written in place under `vmap`. Batch norm is
written from primitive ops on purpose: `F.batch_norm` in training mode under `vmap` gives
second-order gradients about 1% off (pytorch/functorch#534). Its first derivatives are exact, and
its fused kernels take far fewer passes over memory than the primitive form's autograd graph, so
a pass that is differentiated once at most (MAML's query passes, evaluation, first-order training)
asks for it with `fused_bn=True` (meta.py does).

`conv` picks how a conv2d layer is computed; both give the same function and gradients of every
order. 'native' is F.conv2d: under vmap with per-task weights it becomes one grouped convolution.
'matmul' gathers the windows of a channels-last copy of the input (im2col) and multiplies them by
the weight, so that under vmap every convolution and every gradient of it is a batched matmul.
'native' is the default on every device: on a 2-core AMD EPYC CPU (torch 2.14.1) 'matmul' took
5-20% longer per meta-step, and on CUDA cuDNN's grouped convolutions are the tuned path.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from maml.errors import FlagError

BN_EPS = 1e-5

# layers that own a (weight, bias) pair of parameters
_PARAMETRIC = {'conv2d', 'convt2d', 'linear', 'bn'}
# layers without parameters: functions of x and the layer's config params p. relu's params, the
# seed's in-place flag [True], are accepted and ignored: an in-place op would overwrite a value that
# the second-order backward pass still needs.
_FUNCTIONS = {
    'relu': lambda x, p: F.relu(x),
    'leakyrelu': lambda x, p: F.leaky_relu(x, negative_slope=p[0] if p else 0.01),
    'tanh': lambda x, p: torch.tanh(x),
    'sigmoid': lambda x, p: torch.sigmoid(x),
    'flatten': lambda x, p: x.flatten(1),
    'reshape': lambda x, p: x.reshape(x.shape[0], *p),
    'max_pool2d': lambda x, p: max_pool2d(x, p[0], p[1], p[2] if len(p) > 2 else 0),
    'avg_pool2d': lambda x, p: F.avg_pool2d(x, p[0], p[1], p[2] if len(p) > 2 else 0),
    'upsample': lambda x, p: F.interpolate(x, scale_factor=p[0], mode='nearest'),
}
LAYER_NAMES = sorted(_PARAMETRIC | set(_FUNCTIONS))
CONV_FORMULATIONS = ('native', 'matmul')


def max_pool2d(x, kernel, stride, padding):
    """F.max_pool2d(x, kernel, stride, padding), the same values. A forward-only 2x2 pool on the CPU
    (evaluation's query sets, predictions) is taken as the maximum of strided pairs: torch's CPU kernel
    is about 8x slower on NCHW (a 2-core Xeon, torch 2.14: 66 ms against 8 ms for 600 x 16 x 42 x 42),
    and mini-ImageNet's evaluation spent 40% of its time in it. A pass that is differentiated
    keeps the kernel, whose backward by indices costs less than the pairs' backward."""
    if torch.is_grad_enabled() or x.device.type != 'cpu' or (kernel, stride, padding) != (2, 2, 0):
        return F.max_pool2d(x, kernel, stride, padding)
    x = x[..., :x.shape[-2] // 2 * 2, :x.shape[-1] // 2 * 2]   # as the kernel, an odd last row or column is dropped
    rows = torch.maximum(x[..., 0::2, :], x[..., 1::2, :])
    return torch.maximum(rows[..., 0::2], rows[..., 1::2])


def batch_norm(x, weight, bias, stats=None, fused=False):
    """Batch norm over every dim but the channel dim (1), with the batch's own statistics, or with
    `stats` = (mean, var), one value per channel, when given. `fused`: torch's own kernels, exact
    to first order only under vmap (see the top of this file)."""
    x = x.to(torch.promote_types(x.dtype, torch.float32))   # statistics in float32 under bf16 autocast
    if fused:
        mean, var = (None, None) if stats is None else stats
        return F.batch_norm(x, mean, var, weight, bias, training=stats is None, eps=BN_EPS)
    dims = [d for d in range(x.dim()) if d != 1]
    shape = [1, -1] + [1] * (x.dim() - 2)
    if stats is None:
        centered = x - x.mean(dim=dims, keepdim=True)
        var = centered.square().mean(dim=dims, keepdim=True)
    else:
        centered, var = x - stats[0].view(shape), stats[1].view(shape)
    scale = torch.rsqrt(var + BN_EPS) * weight.view(shape)
    return torch.addcmul(bias.view(shape), centered, scale)   # one pass over x instead of three


def conv2d_matmul(x, weight, bias, stride, padding):
    """F.conv2d(x, weight, bias, stride, padding) as im2col + matmul. The windows are gathered in
    (kernel row, kernel column, channel) order from a channels-last input, so that each copied run
    is a whole channel vector; the output is NCHW in shape and channels-last in memory."""
    out_ch, _, kh, kw = weight.shape
    x = F.pad(x.permute(0, 2, 3, 1), (0, 0, padding, padding, padding, padding))
    windows = x.unfold(1, kh, stride).unfold(2, kw, stride).permute(0, 1, 2, 4, 5, 3)   # n, ho, wo, kh, kw, c
    n, ho, wo = windows.shape[:3]
    out = torch.addmm(bias, windows.reshape(n * ho * wo, -1), weight.permute(0, 2, 3, 1).reshape(out_ch, -1).t())
    return out.view(n, ho, wo, out_ch).permute(0, 3, 1, 2)


def batch_statistics(x):
    """(mean, unbiased var) per channel of a batch norm input, detached: what running statistics track."""
    x = x.detach().to(torch.promote_types(x.dtype, torch.float32))
    dims = [d for d in range(x.dim()) if d != 1]
    return x.mean(dim=dims), x.var(dim=dims, unbiased=True)


class Learner(nn.Module):

    def __init__(self, config, imgc, imgsz, conv='native'):
        super().__init__()
        if conv not in CONV_FORMULATIONS:
            raise FlagError(f"Learner conv is '{conv}', which is not a convolution formulation; "
                            f"use one of {', '.join(CONV_FORMULATIONS)}.")
        self.conv = conv
        self.config = [(name, list(param)) for name, param in config]
        self.imgc, self.imgsz = imgc, imgsz
        self.vars = nn.ParameterList()
        for i, (name, param) in enumerate(self.config):
            if name not in LAYER_NAMES:
                raise FlagError(f"Learner config layer {i} is '{name}', which is not a known layer; "
                                 f"use one of {', '.join(LAYER_NAMES)}.")
            if name in ('conv2d', 'convt2d', 'linear'):
                # conv2d weight is [out, in, k, k]; the seed stores convt2d as [in, out, k, k]
                shape = param[:4] if name != 'linear' else param[:2]
                w = torch.empty(*shape)
                nn.init.kaiming_normal_(w)
                out = param[1] if name == 'convt2d' else param[0]
                self.vars.extend([nn.Parameter(w), nn.Parameter(torch.zeros(out))])
            elif name == 'bn':
                self.vars.extend([nn.Parameter(torch.ones(param[0])), nn.Parameter(torch.zeros(param[0]))])
        self._first_param = []
        n = 0
        for name, _ in self.config:
            self._first_param.append(n)
            n += 2 if name in _PARAMETRIC else 0
        self._check_shapes()

    def _check_shapes(self):
        """Run a dummy batch once so that a config whose layer sizes do not chain fails here, clearly."""
        x = torch.zeros(2, self.imgc, self.imgsz, self.imgsz)
        params = [p.detach() for p in self.vars]
        with torch.no_grad():
            for i in range(len(self.config)):
                try:
                    x = self._layer(i, x, params)
                except RuntimeError as e:
                    name, param = self.config[i]
                    raise FlagError(f"Learner config layer {i} ('{name}', {param}) does not fit the "
                                     f"input of shape {list(x.shape[1:])} it receives ({e}); "
                                     f"change its params to match.") from None

    def _layer(self, i, x, params, bn_stats=None, fused_bn=False):
        name, p = self.config[i]
        j = self._first_param[i]
        if name == 'conv2d':
            conv2d = conv2d_matmul if self.conv == 'matmul' else F.conv2d
            return conv2d(x, params[j], params[j + 1], p[4], p[5])
        if name == 'convt2d':
            return F.conv_transpose2d(x, params[j], params[j + 1], stride=p[4], padding=p[5])
        if name == 'linear':
            return F.linear(x, params[j], params[j + 1])
        if name == 'bn':
            return batch_norm(x, params[j], params[j + 1], bn_stats, fused_bn)
        return _FUNCTIONS[name](x, p)

    def forward(self, x, params=None, bn_stats=None, with_stats=False, fused_bn=False, head=True):
        """x: [batch, imgc, imgsz, imgsz]; params: None (own), a dict by name, or a list in order.
        bn_stats: None (each batch norm uses its batch's statistics) or one (mean, var) per 'bn'
        layer to normalise with instead. with_stats: also return the batch's `batch_statistics`
        at each 'bn' layer, as (logits, [(mean, var), ...]). fused_bn: batch norm by torch's fused
        kernels, for a pass whose second derivative is never taken (see the top of this file).
        head=False: the features, the input of the last layer, instead of the logits."""
        if params is None:
            params = list(self.vars)
        elif isinstance(params, dict):
            params = [params[name] for name, _ in self.named_parameters()]
        stats, n_bn = [], 0
        for i, (name, _) in enumerate(self.config if head else self.config[:-1]):
            given = None
            if name == 'bn':
                given = bn_stats[n_bn] if bn_stats is not None else None
                if with_stats:
                    stats.append(batch_statistics(x))
                n_bn += 1
            x = self._layer(i, x, params, given, fused_bn)
        return (x, stats) if with_stats else x

    def names_of(self, layer):
        """The (weight, bias) parameter names of every layer of kind `layer` (e.g. 'bn'), in order."""
        names = [name for name, _ in self.named_parameters()]
        return [(names[j], names[j + 1]) for (kind, _), j in zip(self.config, self._first_param) if kind == layer]

    def __repr__(self):
        return 'Learner(\n  ' + self.extra_repr().replace('\n', '\n  ') + '\n)'

    def extra_repr(self):
        lines = []
        for name, p in self.config:
            if name in ('conv2d', 'convt2d'):
                ch_in, ch_out = (p[1], p[0]) if name == 'conv2d' else (p[0], p[1])
                lines.append(f"{name}(ch_in={ch_in}, ch_out={ch_out}, k={p[2]}x{p[3]}, stride={p[4]}, padding={p[5]})")
            elif name == 'linear':
                lines.append(f"linear(in={p[1]}, out={p[0]})")
            else:
                lines.append(f"{name}({', '.join(map(str, p))})")
        n = sum(p.numel() for p in self.parameters())
        return '\n'.join(lines + [f"parameters: {n:,}"])
