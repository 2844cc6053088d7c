"""L2-regularised multinomial logistic regression solved along a path of C values by L-BFGS, for many paths at
once (vmapped): the solver behind the linear probe (``train_jax.logreg``).

The objective at C (scikit-learn's ``LogisticRegression(C=C)`` scaled by 1/n, so that its tolerance means the
same) is ``mean_i CE(x_i W^T + b, y_i) + ||W||^2 / (2 C n)``; the intercept b is not penalised.

One path is one training set (one seed's rows) and its C values in ascending order. Each C's solve starts where
the previous one stopped (a warm start) and keeps the L-BFGS memory, with each stored gradient difference y
corrected for the change of the penalty (``y += (1/(C' n) - 1/(C n)) s`` on W: exact, the penalty is quadratic),
so a path of 25 C values costs a few times one cold solve instead of 25. A solve stops, as scikit-learn's
``lbfgs`` does, when every gradient entry is at most ``tol`` or after ``max_iter`` iterations; a warm start that
already meets the tolerance takes 0 iterations. Every loop step evaluates the objective once for every path (a
trial point of a backtracking line search: Armijo's test, or Hager and Zhang's approximate Wolfe
test where float32 cannot resolve the decrease; the objective is convex, so every accepted step gives a usable
curvature pair). Paths are solved in vmapped groups (on a CPU one at a time: there every path costs its own
iterations only).

Each path's features are centred on its rows' mean before solving: exact, since the intercept is free
(``x W^T + b = (x - m) W^T + (b + W m)``, the penalty does not change), and far better conditioned (image features
share a large common component: a 16-shot path on the offline demo's raw features takes ~5x fewer iterations);
the stopping rule is tested on the gradient in the uncentred parameters, as scikit-learn's, and b is returned
uncentred.

Rows: a path's training rows are its first ``n`` of N (the rest pad, so that one compiled program serves every
row count up to N); the objective runs over blocks of ``block`` rows and only over the ``ceil(n / block)`` blocks
that hold real rows, so a padded program costs what the real rows need, up to one block.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

MAX_ITER = 1000  # scikit-learn's max_iter as CoOp sets it
TOL = 1e-4  # scikit-learn's tol: stop when every gradient entry is at most this
MEMORY = 10  # L-BFGS pairs kept (scipy's L-BFGS-B default, behind scikit-learn)
ARMIJO = 1e-4  # sufficient decrease of the line search
F_EPS = 1e-6  # relative change of f below float32's resolution (a few ulps)
MIN_STEP = 1e-10  # a line search that needs a smaller step has hit float32 precision: the solve stops there
BLOCK_FLOPS = 1 << 20  # rows per block: at least this many multiply-adds per block's logits (amortise the loop)


def block_rows(rows: int, dim: int, classes: int) -> int:
    """Rows per block of the objective for N = ``rows`` padded rows: enough that one block's logits are
    ``BLOCK_FLOPS`` multiply-adds (at least 64 rows), at most N, a multiple of 8."""
    want = max(64, -(-BLOCK_FLOPS // max(1, dim * classes)))
    return min(-(-rows // 8) * 8, -(-want // 8) * 8)


def value_and_grad(theta: jax.Array, x: jax.Array, y: jax.Array, n: jax.Array, inv_cn: jax.Array, block: int
                   ) -> tuple[jax.Array, jax.Array]:
    """The objective and its gradient at theta [C, D+1] (W then b in the last column) on the first n rows of
    x [N, D] (N a multiple of ``block``), y [N] int; inv_cn = 1 / (C n). Only the blocks holding rows < n are
    computed -> (value, gradient [C, D+1])."""
    classes, dim = theta.shape[0], x.shape[1]
    w, b = theta[:, :dim], theta[:, dim]

    def one_block(i, acc):
        loss, gw, gb = acc
        xs = jax.lax.dynamic_slice_in_dim(x, i * block, block)
        ys = jax.lax.dynamic_slice_in_dim(y, i * block, block)
        valid = (i * block + jnp.arange(block)) < n
        z = xs @ w.T + b
        lse = jax.nn.logsumexp(z, axis=-1)
        onehot = jax.nn.one_hot(ys, classes, dtype=z.dtype)
        ce = lse - jnp.sum(z * onehot, axis=-1)
        resid = jnp.where(valid[:, None], jnp.exp(z - lse[:, None]) - onehot, 0.0)
        return loss + jnp.sum(jnp.where(valid, ce, 0.0)), gw + resid.T @ xs, gb + jnp.sum(resid, axis=0)

    zero = (jnp.zeros((), theta.dtype), jnp.zeros((classes, dim), theta.dtype), jnp.zeros((classes,), theta.dtype))
    blocks = (n + block - 1) // block
    loss, gw, gb = jax.lax.fori_loop(0, blocks, one_block, zero)
    nf = n.astype(theta.dtype)
    value = loss / nf + 0.5 * inv_cn * jnp.sum(w * w)
    return value, jnp.concatenate([gw / nf + inv_cn * w, (gb / nf)[:, None]], axis=1)


class _State(NamedTuple):
    """One path's solver state at one C. theta/f/g: the current point, its value and gradient; d, t: the search
    direction and the step being tried; s, yv [M, C, D+1]: the L-BFGS pairs, oldest first (unused ones zero, at
    the front); it: iterations at this C; halt: the line search cannot decrease the objective any more (float32
    precision); fresh: d and t are to be computed for the current point before the next trial."""

    theta: jax.Array
    f: jax.Array
    g: jax.Array
    d: jax.Array
    t: jax.Array
    s: jax.Array
    yv: jax.Array
    it: jax.Array
    halt: jax.Array
    fresh: jax.Array


def _inverse_hessian_times(s: jax.Array, yv: jax.Array, g: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(H g, whether any pair is used) for the L-BFGS inverse Hessian of the pairs s, yv [M, ...] (oldest first;
    all-zero pairs unused), in the compact form of Byrd, Nocedal and Schnabel (1994), H_0 = gamma I from the
    newest pair."""
    m = s.shape[0]
    s2, y2, g1 = s.reshape(m, -1), yv.reshape(m, -1), g.reshape(-1)
    sy, yy = s2 @ y2.T, y2 @ y2.T
    used = jnp.diagonal(sy) > 0
    gamma = jnp.where(used[-1], sy[-1, -1] / jnp.where(used[-1], yy[-1, -1], 1.0), 1.0)
    r = jnp.triu(sy) + jnp.diag(jnp.where(used, 0.0, 1.0))  # unused pairs: an identity row, decoupled
    u, v = s2 @ g1, y2 @ g1
    p = jax.scipy.linalg.solve_triangular(r, u, lower=False)
    top = jax.scipy.linalg.solve_triangular(r, jnp.diagonal(sy) * p + gamma * (yy @ p) - gamma * v, trans=1,
                                            lower=False)
    return (gamma * g1 + top @ s2 - gamma * (p @ y2)).reshape(g.shape), used[-1]


def solve_paths(feats: jax.Array, labels: jax.Array, rows: jax.Array, cs: jax.Array, n: jax.Array | int, *,
                classes: int, max_iter: int = MAX_ITER, tol: float = TOL, block: int | None = None,
                memory: int = MEMORY, group: int | None = None) -> tuple[dict, jax.Array, jax.Array]:
    """Solve P paths: pool feats [M,D], labels [M], each path's rows [P,N] of which the first n (a traced scalar:
    one program serves every n <= N) are its own, and its C values cs [P,L] in ascending order -> (params
    {"W": [P,L,C,D], "b": [P,L,C]} at every C, objective [P,L], iterations [P,L]). ``block``: rows per block of
    the objective (default ``block_rows``). ``group``: paths solved at once (vmapped), the groups one after
    another; default: 1 on a CPU (no path waits for another, and a path's result does not depend on the others
    it is solved with), all P on an accelerator."""
    block = block or block_rows(rows.shape[1], feats.shape[1], classes)
    group = group or (1 if jax.default_backend() == "cpu" else rows.shape[0])
    return _solve_paths(feats, labels, rows, cs, jnp.asarray(n, jnp.int32), classes=classes, max_iter=max_iter,
                        tol=tol, block=block, memory=memory, group=group)


@functools.partial(jax.jit, static_argnames=("classes", "max_iter", "tol", "block", "memory", "group"))
def _solve_paths(feats, labels, rows, cs, n, *, classes, max_iter, tol, block, memory, group):
    dim, length = feats.shape[1], cs.shape[1]
    rows = jnp.pad(rows, ((0, 0), (0, -rows.shape[1] % block)))  # to whole blocks; past n, never read as real
    shape = (classes, dim + 1)
    mask = jnp.ones(shape, jnp.float32).at[:, -1].set(0.0)  # the penalty's entries: W, not b

    def path(r, c_path):
        x, y = feats[r], labels[r]
        real = (jnp.arange(x.shape[0]) < n)[:, None]
        mean = jnp.sum(jnp.where(real, x, 0.0), axis=0) / n.astype(jnp.float32)
        x = x - mean  # exact: the intercept is free (b = b' - W mean); far better conditioned
        inv_cn = 1.0 / (c_path * n.astype(jnp.float32))  # [L]

        def direction(st):
            """The L-BFGS direction at the current point and its first trial step (1; 1 / ||g|| without pairs,
            which are dropped when the direction is not a descent one)."""
            hg, paired = _inverse_hessian_times(st.s, st.yv, st.g)
            descent = jnp.vdot(hg, st.g) > 0
            d = jnp.where(descent, -hg, -st.g)
            first = ~descent | ~paired
            t = jnp.where(first, jnp.minimum(1.0, 1.0 / jnp.maximum(jnp.linalg.norm(st.g), 1e-30)), 1.0)
            return st._replace(d=d, t=t, s=jnp.where(descent, st.s, 0.0), yv=jnp.where(descent, st.yv, 0.0),
                               fresh=jnp.bool_(False))

        def going(st):
            """The stopping rule of scikit-learn's lbfgs, or the line search stalled; never before the first
            evaluation (it = -1)."""
            # scikit-learn's rule on the gradient in the uncentred parameters: dW = dW' + db mean^T, db = db'
            g = st.g.at[:, :dim].add(st.g[:, dim:] * mean)
            done = (jnp.max(jnp.abs(g)) <= tol) | (st.it >= max_iter) | st.halt | ~jnp.isfinite(st.f)
            return (st.it < 0) | ~done

        def solve_one(st, inv):
            """Iterate at one C (1 / (C n) = inv) until ``going`` says stop; each step is one evaluation: a
            trial step of the line search, taken (Armijo's test, or where float32 cannot resolve the decrease
            of f, Hager and Zhang's approximate Wolfe test on the directional derivative: for a convex f, no
            overshoot of the minimum) or shortened."""

            def step(st):
                st = jax.tree.map(lambda a, b: jnp.where(st.fresh, a, b), direction(st), st)
                trial = st.theta + st.t * st.d
                f_t, g_t = value_and_grad(trial, x, y, n, inv, block)
                slope, slope_t = jnp.vdot(st.g, st.d), jnp.vdot(g_t, st.d)
                flat = (f_t <= st.f + F_EPS * jnp.abs(st.f)) & (slope_t <= -(1.0 - 2.0 * ARMIJO) * slope)
                ok = jnp.isfinite(f_t) & ((f_t <= st.f + ARMIJO * st.t * slope) | flat)
                s_new, y_new = trial - st.theta, g_t - st.g
                keep = ok & (jnp.vdot(s_new, y_new) > 1e-10 * jnp.vdot(y_new, y_new))
                roll = lambda buf, new: jnp.where(keep, jnp.concatenate([buf[1:], new[None]]), buf)  # noqa: E731
                moved = st._replace(theta=trial, f=f_t, g=g_t, s=roll(st.s, s_new), yv=roll(st.yv, y_new),
                                    it=st.it + 1, fresh=jnp.bool_(True))
                secant = st.t * slope / (slope - slope_t)  # where the directional derivative would reach 0
                t_new = jnp.clip(jnp.where(jnp.isfinite(secant) & (slope_t > slope), secant, 0.5 * st.t),
                                 0.1 * st.t, 0.5 * st.t)
                shorter = st._replace(t=t_new, halt=t_new < MIN_STEP)
                return jax.tree.map(lambda a, b: jnp.where(ok, a, b), moved, shorter)

            return jax.lax.while_loop(going, step, st)

        def per_c(st, j):
            """Solve at C_j from where C_(j-1) stopped, then correct value, gradient and pairs for C_(j+1)'s
            penalty (exact: it is quadratic) and start its first step."""
            st = solve_one(st, inv_cn[j])
            out = (st.theta, st.f, st.it)
            delta = inv_cn[jnp.minimum(j + 1, length - 1)] - inv_cn[j]
            st = st._replace(f=st.f + 0.5 * delta * jnp.sum((st.theta * mask) ** 2),
                             g=st.g + delta * st.theta * mask, yv=st.yv + delta * st.s * mask, it=jnp.int32(0),
                             halt=jnp.bool_(False), fresh=jnp.bool_(True))
            return st, out

        zeros = jnp.zeros(shape, jnp.float32)
        # the first evaluation is a step of length 0 from zero, accepted (f = inf): it sets f and g, iteration 0
        st = _State(zeros, jnp.float32(jnp.inf), zeros, zeros, jnp.float32(0.0), jnp.zeros((memory,) + shape),
                    jnp.zeros((memory,) + shape), jnp.int32(-1), jnp.bool_(False), jnp.bool_(False))
        theta, value, iters = jax.lax.scan(per_c, st, jnp.arange(length))[1]
        return theta.at[..., dim].add(-theta[..., :dim] @ mean), value, iters

    theta, value, iters = jax.lax.map(lambda a: path(*a), (rows, cs), batch_size=group)
    return {"W": theta[..., :dim], "b": theta[..., dim]}, value, iters
