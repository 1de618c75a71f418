"""R-GAP: closed-form recovery of one input from its gradient, layer by layer, without optimisation.

Zhu & Blaschko, "R-GAP: Recursive Gradient Attack on Privacy", ICLR 2021 (arXiv:2010.07733); the
ReLU case follows R-CONV (2024): where a ReLU unit is off its forward equation is lost, but the
weight gradient still constrains the layer's input. Two further facts of a ReLU output are used here:
it is non-negative with many exact zeros (the layer above's input is solved with h >= 0), and the
bias gradient of the layer below sums dL/dz over each channel (which checks the on/off split).

For batch size 1 the output layer's input is exact: h = dW[c] / db[c], and db is the gradient with
respect to the logits. Walking back, each affine layer (Conv2d or Linear) z = A h + b gives two sets
of equations that are linear in its input h once z and dL/dz are known:

- the forward equations A h = z - b, with z read off the recovered output by inverting the
  activation (rows of units whose pre-activation is unknown, e.g. inactive ReLUs, are dropped);
- the weight-gradient equations dW = G(dL/dz) h, observed in the shared update.

Both are stacked (each block scaled to unit RMS right-hand side, so neither dominates by units) and
solved by least squares; rank, condition number and equations against unknowns are reported per
layer, so a caller sees how far the gradient determines the input. dL/dh = A^T dL/dz, times the
activation's derivative below, gives the next layer's dL/dz.

The model is traced once with forward hooks on a deep copy; the user's model is never touched.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Sequence

import torch
from torch import nn

from leakkit.client.observation import Observation
from leakkit.engine import analytic
from leakkit.engine.matching import Recovery
from leakkit.engine.objectives import relative_distance
from leakkit.errors import ConfigError
from leakkit.registry import Registry
from leakkit.tasks.base import Task

# Pre-activations closer than this to a saturated sigmoid/tanh end are clamped before inversion.
_EPS = 1e-15
# Above this condition number a layer's input counts as undetermined: float32 gradients carry ~1e-7 relative error.
ILL_CONDITIONED = 1e6
# Layers with at most this many unknowns are solved densely (normal equations, Cholesky); larger ones by LSQR.
DENSE_LIMIT = 6144
# Weight of the smoothness prior in a layer the equations do not determine, relative to the equations:
# small enough that whatever the gradient determines wins, large enough to fix the free directions.
SMOOTH_WEIGHT = 1e-4
# The identity's share in the smoothness operator (differences alone leave constant inputs free).
SMOOTH_RIDGE = 1e-2
# A recovered ReLU output below this log10 fraction of the largest one can only be an off unit's rounding.
RELU_TINY = -7.0
# Relative misfit at which a ReLU on-set's dL/dz sums to the bias gradient of its channel (float32 rounding, with margin).
RELU_FIT = 1e-4
# A ReLU output below 0 by more than this fraction of its largest entry is a wrong direction of the
# solve, not rounding: the non-negative solve starts.
BOUND_SLACK = 1e-6
# Re-solves of the non-negative (active-set) solve: each holds entries at 0 or frees them.
BOUND_ITERATIONS = 40
# The non-negative solve stops once the equations' relative residual is this small (float32 gradients' floor).
FIT_RESIDUAL = 5e-7


# inverse(module, h) -> (z, known): the pre-activation, and a mask of the units where it is
# determined (False where the activation forgot it, as ReLU does for negative inputs).
Inverse = Callable[[nn.Module, torch.Tensor], "tuple[torch.Tensor, torch.Tensor]"]
# Keyed by the activation module's class name, so a user's own activation can be registered.
ACTIVATIONS: Registry[Inverse] = Registry("invertible activation")


def _all_known(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return z, torch.ones_like(z, dtype=torch.bool)


def _monotone_inverse(fn: Callable[[torch.Tensor], torch.Tensor], h: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
    """Elementwise inverse of an increasing fn on [lo, hi] by bisection (float64: 80 halvings reach rounding)."""
    a = torch.full_like(h, lo)
    b = torch.full_like(h, hi)
    for _ in range(80):
        mid = (a + b) / 2
        below = fn(mid) < h
        a = torch.where(below, mid, a)
        b = torch.where(below, b, mid)
    return (a + b) / 2


@ACTIVATIONS.register("Sigmoid", description="logit, exact")
def _sigmoid_inverse(m: nn.Module, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return _all_known(torch.logit(h.clamp(_EPS, 1 - _EPS)))


@ACTIVATIONS.register("Tanh", description="atanh, exact")
def _tanh_inverse(m: nn.Module, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return _all_known(torch.atanh(h.clamp(-1 + _EPS, 1 - _EPS)))


def _active(h: torch.Tensor) -> torch.Tensor:
    """Which ReLU outputs are on, from a recovered (slightly inexact) output.

    The layer below is solved to about 1e-6 relative, so off units come back as tiny values spread
    over many decades rather than 0, while on units sit within a few decades of the largest. The
    cut between the two groups of log-magnitudes is Otsu's (the split with the largest
    between-group variance); on LeNet-ReLU off units reach 8e-6 of the largest output and the
    smallest on unit 6e-5. Without any tiny value (an exact solve) every positive output is on; entries
    at or below 0 are always off.
    """
    top = float(h.abs().max().clamp_min(1e-300))
    # entries at or below 0 are off (the bounded solve holds many at exactly 0); the cut is sought among the rest
    positive = h[h > 0].double()
    if positive.numel() < 2:
        return h > 0
    logs = (positive / top).clamp_min(1e-16).log10()
    if float(logs.min()) > RELU_TINY:
        return h > 0
    values = torch.sort(logs).values
    n = len(values)
    counts = torch.arange(1, n, dtype=torch.float64)
    cums = torch.cumsum(values, 0)[:-1]
    mean_lo, mean_hi = cums / counts, (float(values.sum()) - cums) / (n - counts)
    between = counts * (n - counts) * (mean_hi - mean_lo) ** 2
    k = int(between.argmax())
    cut = 10 ** float((values[k] + values[k + 1]) / 2)
    return h > cut * top


def _consistent_active(h: torch.Tensor, active: torch.Tensor, dh: torch.Tensor, bias_grad: torch.Tensor) -> torch.Tensor:
    """Correct the on/off split of a ReLU output with the bias gradient of the layer below it.

    The bias gradient sums dL/dz over each output channel's positions, and dL/dz is dL/dh on the
    units that are on, 0 elsewhere. An on unit whose output is as small as the off units' rounding
    (seed 11's LeNet-ReLU: 1.7e-5 of the largest, off units up to 3e-8) falls on the wrong side of
    any cut, and its missing dL/dz makes the next layer's weight-gradient equations inconsistent. Per
    channel, the units are ranked by output and the on set is taken as the largest k whose dL/dh sum
    matches the bias gradient, the k nearest to the magnitude split's; where no k matches (a noisy
    update) the split stands.

    Shape: h, active, dh: [*unit_shape] with channels first; bias_grad: [C].
    """
    channels = bias_grad.numel()
    values, slopes = h.reshape(channels, -1).double(), dh.reshape(channels, -1).double()
    out = active.reshape(channels, -1).clone()
    for c in range(channels):
        order = torch.argsort(values[c], descending=True)
        positive = int((values[c] > 0).sum())
        sums = torch.cat([torch.zeros(1, dtype=torch.float64), torch.cumsum(slopes[c][order], 0)])[: positive + 1]
        scale = float(slopes[c].abs().sum() + bias_grad[c].abs()) or 1.0
        misfit = (sums - float(bias_grad[c])).abs() / scale
        k0 = int(out[c].sum())
        if k0 > positive or float(misfit[k0]) <= RELU_FIT:
            continue
        fits = torch.nonzero(misfit <= RELU_FIT).flatten()
        if len(fits) == 0:
            continue
        k = int(fits[(fits - k0).abs().argmin()])
        out[c] = False
        out[c, order[:k]] = True
    return out.reshape(active.shape)


@ACTIVATIONS.register("ReLU", description="active units exact; inactive units drop their forward equation (R-CONV)")
def _relu_inverse(m: nn.Module, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    active = _active(h)
    # inactive units: the pre-activation is some negative number we cannot know; 0 gives ReLU's zero slope
    return torch.where(active, h, torch.zeros_like(h)), active


@ACTIVATIONS.register("LeakyReLU", description="piecewise linear with a positive slope, exact")
def _leaky_inverse(m: nn.Module, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    slope = float(m.negative_slope)
    if slope <= 0:
        return _relu_inverse(m, h)
    return _all_known(torch.where(h >= 0, h, h / slope))


# GELU's minimum sits at z ~ -0.7518; outputs are inverted on the increasing branch to its right.
_GELU_ARGMIN = -0.751791524693564


@ACTIVATIONS.register("GELU", description="bisection on the increasing branch z > -0.75 (the other branch is ambiguous)")
def _gelu_inverse(m: nn.Module, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    top = float(h.max().clamp_min(0)) + 10.0
    return _all_known(_monotone_inverse(m, h, _GELU_ARGMIN, top))


@ACTIVATIONS.register("Identity", description="nothing to invert")
def _identity_inverse(m: nn.Module, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return _all_known(h)


_RESHAPES = (nn.Flatten, nn.Unflatten, nn.Dropout)

# Activations whose output is non-negative with many entries exactly 0 (keyed like ACTIVATIONS): the
# input of the layer above is solved with h >= 0, which pins down directions its equations leave free.
SPARSE_NONNEGATIVE = ("ReLU",)


def _sparse_nonnegative(module: nn.Module) -> bool:
    kind = type(module).__name__
    if kind == "LeakyReLU":
        return float(module.negative_slope) <= 0
    return kind in SPARSE_NONNEGATIVE


@dataclass
class LayerReport:
    """How far the gradient determines one layer's input.

    layer: module name; unknowns: entries of the layer's input; forward_equations: rows of
    z = A h + b used (units with a known pre-activation); gradient_equations: entries of the weight
    gradient; rank: numerical rank of the stacked system (None unless computed exactly, a dense SVD);
    condition: its condition number (exact with the rank, else LSQR's estimate; inf when singular);
    residual: relative residual of the least-squares solution; iterations: LSQR iterations (0 for a
    dense solve); prior: the equations did not determine the input, so a smoothness prior chose among
    the inputs that fit them; bounded: entries of a ReLU output held at 0 by the non-negative solve
    (0 where the first solution had no negative entry).
    """

    layer: str
    unknowns: int
    forward_equations: int
    gradient_equations: int
    rank: int | None
    condition: float
    residual: float
    iterations: int = 0
    prior: bool = False
    bounded: int = 0

    @property
    def equations(self) -> int:
        return self.forward_equations + self.gradient_equations

    @property
    def determined(self) -> bool:
        """Enough independent equations for every unknown (estimated from the condition without a rank)."""
        if self.rank is not None:
            return self.rank >= self.unknowns
        return self.equations >= self.unknowns and self.condition < ILL_CONDITIONED

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["equations"] = self.equations
        out["determined"] = self.determined
        # JSON has no infinity
        out["condition"] = self.condition if math.isfinite(self.condition) else None
        return out


@dataclass
class Inversion:
    """The closed form's result for one example.

    inputs: [1, *input_shape] float64; label: class id read off the output layer;
    layers: one report per affine layer, output layer first (the walk's order).
    """

    inputs: torch.Tensor
    label: int
    layers: list[LayerReport] = field(default_factory=list)

    @property
    def determined(self) -> bool:
        return all(layer.determined for layer in self.layers)


@dataclass
class _Step:
    name: str
    module: nn.Module
    role: str  # "affine", "activation" or "reshape"
    in_shape: tuple[int, ...]


def trace_chain(model: nn.Module, input_shape: Sequence[int]) -> list[_Step]:
    """The model as a chain of affine layers and elementwise activations, input to output.

    Traced with forward hooks on a float64 deep copy. Raises ConfigError naming the first module
    that is not part of such a chain (normalisation, pooling, a residual connection, a module used
    twice, or an activation applied as a function).
    """
    work = copy.deepcopy(model).to(torch.float64).eval()
    calls: list[tuple[str, nn.Module, torch.Tensor, torch.Tensor]] = []
    handles = []
    for name, module in work.named_modules():
        if next(module.children(), None) is None:
            handles.append(module.register_forward_hook(
                lambda m, args, out, name=name: calls.append((name, m, args[0].detach(), out.detach()))))
    x = torch.rand((1, *input_shape), dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    try:
        with torch.no_grad():
            y = work(x)
    finally:
        for h in handles:
            h.remove()
    steps: list[_Step] = []
    previous = x
    seen: set[str] = set()
    for name, module, inp, out in calls:
        kind = type(module).__name__
        if name in seen:
            raise ConfigError(f"rgap cannot invert a model that calls module {name!r} twice")
        seen.add(name)
        if type(module) in _SYSTEMS:
            role = "affine"
            if isinstance(module, nn.Conv2d) and (module.groups != 1 or module.padding_mode != "zeros"):
                raise ConfigError(f"rgap inverts Conv2d layers with groups=1 and zero padding; {name!r} is not one")
        elif isinstance(module, _RESHAPES):
            role = "reshape"
        elif kind in ACTIVATIONS:
            role = "activation"
        else:
            raise ConfigError(
                f"rgap inverts chains of Conv/Linear layers with elementwise activations "
                f"({', '.join(ACTIVATIONS.names())}); module {name!r} is a {kind}"
            )
        if inp.numel() != previous.numel() or not torch.equal(inp.flatten(), previous.flatten()):
            raise ConfigError(
                f"rgap needs a plain chain of layers; the input of module {name!r} is not the previous layer's output "
                "(a residual connection, pooling or an activation called as a function?)"
            )
        steps.append(_Step(name, module, role, tuple(inp.shape[1:])))
        previous = out
    if not torch.equal(previous.flatten(), y.flatten()):
        raise ConfigError("rgap needs a plain chain of layers; the model's output is not its last layer's output")
    if not steps or steps[-1].role != "affine" or not isinstance(steps[-1].module, nn.Linear):
        raise ConfigError("rgap needs a model whose last layer is an nn.Linear output layer")
    return steps


def _conv_system(module: nn.Conv2d, shape: tuple[int, ...], dz: torch.Tensor) -> tuple[Any, Any, torch.Tensor]:
    """Sparse matrices of a Conv2d's forward map (A) and of its weight gradient as a map of the input (G).

    Both read the same patches: output unit (o, p) sums W[o, k] * h[U[k, p]], and weight entry (o, k)
    of the gradient sums dz[o, p] * h[U[k, p]], where U holds the input index under each kernel
    tap k at each output position p (-1 in the zero padding).
    """
    import scipy.sparse as sparse

    n = math.prod(shape)
    index = (torch.arange(n, dtype=torch.float64) + 1).view(1, *shape)
    U = torch.nn.functional.unfold(index, module.kernel_size, dilation=module.dilation, padding=module.padding,
                                   stride=module.stride)[0].round().long() - 1
    taps, positions = U.shape
    out_channels = module.out_channels
    weight = module.weight.detach().double().reshape(out_channels, taps)
    o, k, p = torch.meshgrid(torch.arange(out_channels), torch.arange(taps), torch.arange(positions), indexing="ij")
    keep = (U >= 0).expand(out_channels, taps, positions)
    o, k, p = o[keep], k[keep], p[keep]
    cols = U[k, p].numpy()
    A = sparse.csr_matrix((weight[o, k].numpy(), ((o * positions + p).numpy(), cols)), shape=(out_channels * positions, n))
    G = sparse.csr_matrix((dz.view(out_channels, positions)[o, p].numpy(), ((o * taps + k).numpy(), cols)), shape=(out_channels * taps, n))
    bias = module.bias.detach().double() if module.bias is not None else torch.zeros(out_channels, dtype=torch.float64)
    return A, G, bias.repeat_interleave(positions)


def _linear_system(module: nn.Linear, shape: tuple[int, ...], dz: torch.Tensor) -> tuple[Any, Any, torch.Tensor]:
    """A = W (dense rows), G: dW[o, i] = dz[o] * h[i]."""
    import scipy.sparse as sparse

    weight = module.weight.detach().double()
    out_f, in_f = weight.shape
    o, i = torch.meshgrid(torch.arange(out_f), torch.arange(in_f), indexing="ij")
    G = sparse.csr_matrix((dz[o.flatten()].numpy(), ((o * in_f + i).flatten().numpy(), i.flatten().numpy())), shape=(out_f * in_f, in_f))
    bias = module.bias.detach().double() if module.bias is not None else torch.zeros(out_f, dtype=torch.float64)
    return sparse.csr_matrix(weight.numpy()), G, bias


# Affine layer type -> builder of its (forward matrix, weight-gradient matrix, bias per output unit).
_SYSTEMS: dict[type[nn.Module], Callable[[Any, tuple[int, ...], torch.Tensor], tuple[Any, Any, torch.Tensor]]] = {
    nn.Conv2d: _conv_system,
    nn.Linear: _linear_system,
}


def _smoothness(shape: tuple[int, ...]) -> Any:
    """Sparse operator whose rows are the differences between neighbouring entries of a [C, H, W]
    input (rows and columns of every channel), plus a small identity so that it has no null space;
    the identity alone for a flat input."""
    import scipy.sparse as sparse

    n = math.prod(shape)
    eye = sparse.identity(n, format="csr")
    if len(shape) != 3:
        return eye
    index = torch.arange(n).view(shape)
    rows = []
    for a, b in ((index[:, 1:, :], index[:, :-1, :]), (index[:, :, 1:], index[:, :, :-1])):
        a, b = a.flatten().numpy(), b.flatten().numpy()
        m = len(a)
        ones = torch.ones(m, dtype=torch.float64).numpy()
        rows.append(sparse.csr_matrix((ones, (range(m), a)), shape=(m, n)) - sparse.csr_matrix((ones, (range(m), b)), shape=(m, n)))
    return sparse.vstack([*rows, SMOOTH_RIDGE * eye]).tocsr()


def _cholesky(matrix: torch.Tensor) -> torch.Tensor:
    """Lower Cholesky factor of a symmetric positive semi-definite matrix. Where rounding makes it
    indefinite (a noisy update's normal equations with the smoothness prior lose definiteness at
    float64's last digits), a ridge from 1e-12 of the mean diagonal up, a hundredfold per try, is added."""
    factor, info = torch.linalg.cholesky_ex(matrix)
    ridge = 1e-12 * max(float(matrix.diagonal().mean()), 1e-300)
    eye = None
    while int(info) != 0 and ridge < float(matrix.diagonal().abs().max()):
        eye = torch.eye(len(matrix), dtype=matrix.dtype) if eye is None else eye
        factor, info = torch.linalg.cholesky_ex(matrix + ridge * eye)
        ridge *= 100
    if int(info) != 0:
        raise ConfigError("rgap: a layer's normal equations are not positive definite even with a ridge (a NaN in the update?)")
    return factor


def _cholesky_solve(factor: Any, b: Any) -> Any:
    """x with L L^T x = b (numpy, lower factor L): scipy's triangular solves (torch's CPU ones took
    0.4-1 s each at 3,072 unknowns here, scipy's milliseconds; torch's factorisation is the faster one)."""
    from scipy.linalg import solve_triangular

    return solve_triangular(factor.T, solve_triangular(factor, b, lower=True, check_finite=False), lower=False, check_finite=False)


def _condition_spd(matrix: torch.Tensor, factor: Any, iterations: int = 15) -> float:
    """Condition number of a symmetric positive definite matrix from power iterations on it and, through
    its Cholesky factor, on its inverse (an estimate from below; exact enough to tell 1e3 from 1e12)."""
    import numpy as np

    v = torch.randn(matrix.shape[0], generator=torch.Generator().manual_seed(0), dtype=matrix.dtype)
    w = v.numpy().copy()
    for _ in range(iterations):
        v = matrix @ v
        v /= v.norm()
        w = _cholesky_solve(factor, w)
        w /= np.linalg.norm(w)
    wt = torch.from_numpy(w)
    largest, smallest = float(v @ matrix @ v), float(wt @ matrix @ wt)
    return largest / smallest if smallest > 0 else math.inf


def _nonnegative_solve(normal: torch.Tensor, c: Any, y: Any, residual: Callable[[Any], float]) -> tuple[Any, int]:
    """Least squares on the normal equations `normal y = c` with y >= 0, from the free solution y.

    An active set: negative entries are held at 0 and the rest re-solved (Cholesky of the free block);
    once none is negative, held entries whose gradient points into the feasible side are freed again.
    A ReLU output has about a third of its entries exactly 0, so holding them there removes the free
    directions the equations leave (seed 11's LeNet-ReLU, 3,072 unknowns: relative error 0.13 from the
    smoothness prior alone, 1.6e-6 after ten re-solves). Stops when nothing moves, when the fit
    reaches float32 rounding (FIT_RESIDUAL), or after BOUND_ITERATIONS re-solves.
    Returns (y, entries held at 0).
    """
    import numpy as np

    n = len(y)
    held = np.zeros(n, dtype=bool)
    N = normal.numpy()
    grad_tol = 1e-10 * max(float(np.abs(c).max()), 1e-300)
    for _ in range(BOUND_ITERATIONS):
        negative = ~held & (y < 0)
        if negative.any():
            held |= negative
        else:
            if residual(y) <= FIT_RESIDUAL:
                break
            release = held & (N @ y - c < -grad_tol)  # raising such an entry lowers the residual
            if not release.any():
                break
            held &= ~release
        free = ~held
        y = np.where(held, 0.0, y)
        if not free.any():
            break
        mask = torch.from_numpy(free)
        block = normal[mask][:, mask]
        factor = _cholesky(block)  # a free block that lost rank gets a ridge at rounding level
        y[free] = _cholesky_solve(factor.numpy(), c[free] - N[np.ix_(free, held)] @ y[held])
    return np.maximum(y, 0.0), int(held.sum())


def _solve_layer(
    step: _Step, z: torch.Tensor, known: torch.Tensor, dz: torch.Tensor, weight_grad: torch.Tensor, *, exact_rank: bool,
    trust: torch.Tensor | None = None, nonnegative: bool = False,
) -> tuple[torch.Tensor, Any, LayerReport]:
    """Input of one affine layer from its output z (rows `known`), dL/dz and the observed dW.

    Columns are scaled to unit norm (a diagonal preconditioner). Up to DENSE_LIMIT unknowns the
    normal equations are solved by Cholesky (a 32 px LeNet image takes about 0.9 s in all on an idle
    2-core machine), and where the equations do not determine the input (fewer equations than unknowns,
    or a singular or ill-conditioned system) the solve adds a smoothness prior with weight
    SMOOTH_WEIGHT (relative): the gradient leaves those directions free, so the smoothest input
    that fits the equations is taken, as image priors do in the optimisation attacks (LeNet-ReLU's
    first layer, where off units drop their forward equations). With `nonnegative` (h is a ReLU
    output) a dense solution with negative entries is re-solved with h >= 0. Larger layers use LSQR,
    without a prior or the bound.
    Returns (h flat, forward matrix A, report).
    """
    import numpy as np
    import scipy.sparse as sparse
    from scipy.sparse.linalg import lsqr

    shape = step.in_shape
    n = math.prod(shape)
    A, G, bias = _SYSTEMS[type(step.module)](step.module, shape, dz)
    rows = known.numpy()
    # a pre-activation read through a flat part of the activation (a saturated sigmoid) carries the
    # error of the layer above divided by the slope: its forward equation is weighted by the slope
    w = np.ones(int(known.sum())) if trust is None or not bool(known.any()) else (trust[known] / trust[known].max().clamp_min(1e-300)).numpy()
    forward = sparse.diags(w) @ A[rows]
    blocks, rhs = [], []
    for M, r in ((forward, w * (z - bias)[known].numpy()), (G, weight_grad.flatten().double().numpy())):
        if len(r) == 0:
            continue
        # each block scaled to unit RMS right-hand side: forward values and gradients differ by orders of magnitude
        scale = float(np.sqrt(np.mean(r**2))) or 1.0
        blocks.append(M / scale)
        rhs.append(r / scale)
    M = sparse.vstack(blocks).tocsr()
    r = np.concatenate(rhs)
    norms = np.sqrt(np.asarray(M.multiply(M).sum(axis=0))).ravel()
    norms[norms == 0] = 1.0
    Ms = M @ sparse.diags(1.0 / norms)
    iterations, rank, condition, prior, bounded = 0, None, math.inf, False, 0
    if n <= DENSE_LIMIT:
        normal = torch.from_numpy((Ms.T @ Ms).toarray())
        factor, info = torch.linalg.cholesky_ex(normal)
        if int(info) == 0:
            condition = math.sqrt(_condition_spd(normal, factor.numpy()))  # the normal matrix squares it
        if int(info) != 0 or M.shape[0] < n or condition >= ILL_CONDITIONED:
            prior = True
            D = _smoothness(shape) @ sparse.diags(1.0 / norms)
            # the prior's weight relative to the equations' (both Frobenius norms)
            weight = SMOOTH_WEIGHT * float(sparse.linalg.norm(Ms)) / max(float(sparse.linalg.norm(D)), 1e-300)
            normal = normal + weight**2 * torch.from_numpy((D.T @ D).toarray())
            factor = _cholesky(normal)
        c = Ms.T @ r
        y = _cholesky_solve(factor.numpy(), c)
        if nonnegative and bool(np.any(y < -BOUND_SLACK * np.abs(y).max())):
            y, bounded = _nonnegative_solve(normal, c, y, lambda v: float(np.linalg.norm(Ms @ v - r) / max(np.linalg.norm(r), 1e-300)))
    else:
        # no prior here: with it LSQR ran for minutes on a 64 px LeNet layer and still missed the image
        out = lsqr(Ms, r, atol=1e-15, btol=1e-15, conlim=1e12, iter_lim=20 * n)
        y, iterations, condition = out[0], int(out[2]), float(out[6])
    h = y / norms
    residual = float(np.linalg.norm(M @ h - r) / max(np.linalg.norm(r), 1e-300))
    if exact_rank:
        s = np.linalg.svd(M.toarray(), compute_uv=False)
        rank = int((s > s[0] * max(M.shape) * np.finfo(np.float64).eps).sum())
        condition = float(s[0] / s[-1]) if rank == n else math.inf
    report = LayerReport(step.name, n, int(known.sum()), G.shape[0], rank, condition, residual, iterations, prior, bounded)
    return torch.from_numpy(h), A, report


def _param(module_name: str, kind: str) -> str:
    """A parameter's name in the gradients dict: `body.0` + `weight` -> `body.0.weight` (a bare model: `weight`)."""
    return f"{module_name}.{kind}" if module_name else kind


def _nonnegative_inputs(steps: list[_Step]) -> set[str]:
    """Names of the affine layers whose input is the output of a sparse non-negative activation (ReLU)."""
    out: set[str] = set()
    below: nn.Module | None = None
    for step in steps:
        if step.role == "activation":
            below = step.module
        elif step.role == "affine":
            if below is not None and _sparse_nonnegative(below):
                out.add(step.name)
            below = None
    return out


def invert(
    model: nn.Module, gradients: dict[str, torch.Tensor], input_shape: Sequence[int], *, exact_rank: bool = False
) -> Inversion:
    """Recover one example's input (batch size 1) from its gradient in closed form.

    Args:
        model: the attacker's copy of the shared model (deep-copied again here, never modified).
        gradients: parameter name -> observed gradient of the example's cross-entropy loss.
        input_shape: one example's input shape, e.g. (3, 32, 32).
        exact_rank: compute each layer's rank and condition number with a dense SVD (seconds per
            layer at 32 px) instead of LSQR's condition estimate.
    Returns:
        The input ([1, *input_shape], float64), the label, and a determinacy report per layer.
    Raises:
        ConfigError: the model is not a chain this closed form inverts, or its output layer has no bias.
    """
    steps = trace_chain(model, input_shape)
    nonnegative = _nonnegative_inputs(steps)
    top = steps[-1]
    if top.module.bias is None:
        raise ConfigError("rgap needs the output layer to have a bias (its gradient gives the logits' gradient)")
    missing = [n for n in (_param(top.name, "weight"), _param(top.name, "bias")) if n not in gradients]
    if missing:
        raise ConfigError(f"rgap needs the gradient of {missing[0]!r}, which the update does not hold")
    gW = gradients[_param(top.name, "weight")].double()
    gb = gradients[_param(top.name, "bias")].double()
    label = analytic.label_single(gW, gb, top.module.weight.detach(), top.module.bias.detach())
    h = analytic.linear_layer_input(gW, gb)
    dz = gb  # batch 1: the bias gradient is the gradient with respect to the logits
    reports = [LayerReport(top.name, h.numel(), 0, gW.numel(), h.numel(), 1.0,
                           float((torch.outer(gb, h) - gW).norm() / gW.norm().clamp_min(1e-300)))]
    # dL/dh of the output layer's input
    dh = top.module.weight.detach().double().T @ dz
    # activation name -> the affine layer whose output it takes (its bias gradient sums dL/dz per channel)
    feeds: dict[str, str] = {}
    for lower, upper in zip(steps, steps[1:]):
        if lower.role == "affine" and upper.role == "activation":
            feeds[upper.name] = lower.name
    known: torch.Tensor | None = None  # units of the current h whose pre-activation is determined
    trust: torch.Tensor | None = None  # how well each unit's pre-activation is known (the activation's slope)
    for step in reversed(steps[:-1]):
        if step.role == "reshape":
            continue
        if step.role == "activation":
            z, known = ACTIVATIONS.get(type(step.module).__name__)(step.module, h)
            below = feeds.get(step.name)
            bias_grad = gradients.get(_param(below, "bias")) if below is not None else None
            if not bool(known.all()) and bias_grad is not None and bias_grad.numel() > 0 and h.numel() % bias_grad.numel() == 0:
                known = _consistent_active(h, known, dh, bias_grad.double())
                z = torch.where(known, h, torch.zeros_like(h))
            zg = z.detach().clone().requires_grad_(True)
            with torch.enable_grad():
                slope = torch.autograd.grad(step.module(zg).sum(), zg)[0]
            h, dz = z, dh * slope
            trust = slope
            continue
        weight = _param(step.name, "weight")
        if weight not in gradients:
            raise ConfigError(f"rgap needs the gradient of {weight}, which the update does not hold")
        if known is None:  # two affine layers in a row: the output is the pre-activation itself
            known = torch.ones_like(h, dtype=torch.bool)
        h, A, report = _solve_layer(step, h, known, dz, gradients[weight], exact_rank=exact_rank, trust=trust,
                                nonnegative=step.name in nonnegative)
        reports.append(report)
        dh = torch.from_numpy(A.T @ dz.numpy())
        known, trust = None, None
    return Inversion(inputs=h.view(1, *input_shape), label=label, layers=reports)


def rgap_attack(task: Task, observation: Observation) -> Recovery:
    """R-GAP as an attack family: the result type of `leakkit.engine.reconstruct`, no settings.

    Deterministic (no search, so no seed or attack settings); the solve runs in float64 on the CPU.
    The per-layer determinacy report is in `Recovery.report["layers"]`.

    Raises:
        ConfigError: batch size other than 1, a FedAvg update, or a model outside the closed form.
    """
    observation.check_against(task.model)
    if observation.batch_size != 1:
        raise ConfigError(f"rgap inverts one example's gradient (batch size 1), got batch size {observation.batch_size}")
    if observation.extra.get("fedavg"):
        raise ConfigError("rgap needs a single-gradient (FedSGD) update, not a FedAvg weight difference")
    started = time.perf_counter()
    work = task.prepare(observation).copy_to(dtype=torch.float64, device="cpu")
    grads = {n: g.double() for n, g in observation.upcast().gradients.items()}
    result = invert(work.model, grads, task.input_shape)
    labels = torch.nn.functional.one_hot(torch.tensor([result.label]), task.num_classes).double()
    names = [n for n, _ in work.matched_parameters() if n in grads]
    x = result.inputs.detach()
    with torch.enable_grad():
        pred = work.gradients(x, labels, reduction=observation.reduction, matched=True)
    matched = [n for n, _ in work.matched_parameters()]
    distance = relative_distance([p for p, n in zip(pred, matched) if n in grads], [grads[n] for n in names])
    seconds = time.perf_counter() - started
    return Recovery(
        inputs=x.to("cpu", torch.float32),
        labels=labels.to(torch.float32),
        distance=distance,
        restart=0,
        status="closed-form",
        steps=0,
        seconds=seconds,
        restart_status=["closed-form"],
        trace=[{"restart": 0, "step": 0, "distance": distance, "seconds": round(seconds, 4)}],
        report={"method": "rgap", "determined": result.determined, "layers": [layer.as_dict() for layer in result.layers]},
    )
