"""Building blocks: parameters with logical axes, norms, RoPE, the dense SwiGLU FFN and the MoE.

Every parameter carries `logical_axes` metadata (one name per dim, "layers" first when stacked), which
`ic_jax.runtime.sharding` maps to mesh axes. Modules take `stack=(R,)` to create R stacked copies at once.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Float, Int

from ic_jax.model.config import ModelConfig
from ic_jax.ops.grouped_matmul import gathered_matmul, grouped_matmul
from ic_jax.ops.grouped_matmul.sharding import expert_parallel


def param(rngs: nnx.Rngs, shape: tuple[int, ...], axes: tuple[str, ...], dtype, stack=(), std: float | None = None,
          value: float | None = None) -> nnx.Param:
    """A parameter of `stack + shape`; normal(0, std) (std defaults to 1/sqrt(first dim)) or a constant."""
    full = tuple(stack) + tuple(shape)
    if value is not None:
        x = jnp.full(full, value, dtype)
    else:
        std = shape[0] ** -0.5 if std is None else std
        x = (std * jax.random.normal(rngs.params(), full, jnp.float32)).astype(dtype)
    return nnx.Param(x, logical_axes=("layers",) * len(stack) + tuple(axes))


def dtype_of(cfg: ModelConfig):
    return jnp.dtype(cfg.dtype)


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, eps: float, rngs: nnx.Rngs, stack=()):
        self.scale = param(rngs, (dim,), ("norm",), jnp.float32, stack, value=1.0)
        self.eps = eps

    def __call__(self, x: Float[Array, "... D"]) -> Float[Array, "... D"]:
        xf = x.astype(jnp.float32)
        y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        return (y * self.scale[...]).astype(x.dtype)


class LayerNorm(nnx.Module):
    def __init__(self, dim: int, eps: float, rngs: nnx.Rngs, stack=()):
        self.scale = param(rngs, (dim,), ("norm",), jnp.float32, stack, value=1.0)
        self.bias = param(rngs, (dim,), ("norm",), jnp.float32, stack, value=0.0)
        self.eps = eps

    def __call__(self, x: Float[Array, "... D"]) -> Float[Array, "... D"]:
        xf = x.astype(jnp.float32)
        mu = jnp.mean(xf, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(xf - mu), axis=-1, keepdims=True)
        y = (xf - mu) * jax.lax.rsqrt(var + self.eps)
        return (y * self.scale[...] + self.bias[...]).astype(x.dtype)


def rope_inv_freq(cfg: ModelConfig, dim: int) -> Float[Array, "dim/2"]:
    """RoPE inverse frequencies, with YaRN interpolation when `rope_scaling.type == "yarn"`."""
    inv = 1.0 / (cfg.rope_theta ** (jnp.arange(0, dim, 2, dtype=jnp.float32) / dim))
    rs = cfg.rope_scaling_dict
    if rs.get("type", rs.get("rope_type")) != "yarn":
        return inv
    factor, orig = rs["factor"], rs["original_max_position_embeddings"]
    beta_fast, beta_slow = rs.get("beta_fast", 32.0), rs.get("beta_slow", 1.0)

    def correction_dim(rot):
        return dim * math.log(orig / (rot * 2 * math.pi)) / (2 * math.log(cfg.rope_theta))

    lo = max(math.floor(correction_dim(beta_fast)), 0)
    hi = min(math.ceil(correction_dim(beta_slow)), dim - 1)
    ramp = jnp.clip((jnp.arange(dim // 2, dtype=jnp.float32) - lo) / max(hi - lo, 1e-3), 0.0, 1.0)
    return inv / factor * ramp + inv * (1.0 - ramp)


def apply_rope(x: Float[Array, "B T *H R"], positions: Int[Array, "B T"], inv_freq: Array,
               interleave: bool) -> Float[Array, "B T *H R"]:
    """Rotates pairs of x: (2i, 2i+1) when `interleave`, else (i, i + R/2)."""
    ang = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, R/2]
    ang = ang.reshape(ang.shape[:2] + (1,) * (x.ndim - 3) + ang.shape[-1:])
    cos, sin = jnp.cos(ang), jnp.sin(ang)
    xf = x.astype(jnp.float32)
    if interleave:
        a, b = xf[..., 0::2], xf[..., 1::2]
        out = jnp.stack([a * cos - b * sin, a * sin + b * cos], axis=-1).reshape(x.shape)
    else:
        a, b = jnp.split(xf, 2, axis=-1)
        out = jnp.concatenate([a * cos - b * sin, a * sin + b * cos], axis=-1)
    return out.astype(x.dtype)


def hadamard(n: int) -> Array:
    """The orthonormal Sylvester Hadamard matrix of size n (a power of two)."""
    h = jnp.ones((1, 1), jnp.float32)
    while h.shape[0] < n:
        h = jnp.block([[h, h], [h, -h]])
    return h * n**-0.5


class DenseFFN(nnx.Module):
    """SwiGLU: down(silu(x @ gate) * (x @ up))."""

    def __init__(self, dim: int, hidden: int, dtype, rngs: nnx.Rngs, stack=(), out_std: float | None = None):
        self.w_gate = param(rngs, (dim, hidden), ("embed", "mlp"), dtype, stack)
        self.w_up = param(rngs, (dim, hidden), ("embed", "mlp"), dtype, stack)
        self.w_down = param(rngs, (hidden, dim), ("mlp", "embed"), dtype, stack, std=out_std)

    def __call__(self, x: Float[Array, "... D"]) -> Float[Array, "... D"]:
        h = jax.nn.silu(x @ self.w_gate[...]) * (x @ self.w_up[...])
        return h @ self.w_down[...]


class MoE(nnx.Module):
    """DeepSeek MoE: sigmoid router with a correction bias, grouped top-k, a shared expert, routed scaling.

    Tokens are sorted by expert and run through `grouped_matmul`, one per projection; its "xla"
    implementation (`jax.lax.ragged_dot`) is differentiable, "pallas_gpu" is forward only. With fewer
    routed rows than experts (decode), each routed row is multiplied by its expert's weights
    (`gathered_matmul`), so a step reads only the chosen experts rather than all of them.
    """

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs, stack=(), out_std: float | None = None):
        D, F, E, dt = cfg.hidden_size, cfg.moe_intermediate_size, cfg.n_routed_experts, dtype_of(cfg)
        self.cfg = cfg
        self.router = param(rngs, (D, E), ("embed", "experts"), jnp.float32, stack)
        self.router_bias = param(rngs, (E,), ("experts",), jnp.float32, stack, value=0.0)
        self.w_gate = param(rngs, (E, D, F), ("experts", "embed", "mlp"), dt, stack, std=D**-0.5)
        self.w_up = param(rngs, (E, D, F), ("experts", "embed", "mlp"), dt, stack, std=D**-0.5)
        self.w_down = param(rngs, (E, F, D), ("experts", "mlp", "embed"), dt, stack, std=out_std or F**-0.5)
        self.shared = (DenseFFN(D, F * cfg.n_shared_experts, dt, rngs, stack, out_std)
                       if cfg.n_shared_experts else None)

    def route(self, x: Float[Array, "N D"]) -> tuple[Int[Array, "N k"], Float[Array, "N k"]]:
        cfg = self.cfg
        scores = jax.nn.sigmoid(x.astype(jnp.float32) @ self.router[...])
        choice = scores + self.router_bias[...]
        if cfg.n_group > 1:
            N, E = choice.shape
            grouped = choice.reshape(N, cfg.n_group, E // cfg.n_group)
            group_score = jax.lax.top_k(grouped, 2)[0].sum(-1)
            keep_groups = jax.lax.top_k(group_score, cfg.topk_group)[1]
            group_mask = jnp.zeros((N, cfg.n_group), bool).at[jnp.arange(N)[:, None], keep_groups].set(True)
            choice = jnp.where(jnp.repeat(group_mask, E // cfg.n_group, axis=1), choice, -jnp.inf)
        experts = jax.lax.top_k(choice, cfg.num_experts_per_tok)[1]
        weights = jnp.take_along_axis(scores, experts, axis=-1)
        if cfg.norm_topk_prob:
            weights = weights / (weights.sum(-1, keepdims=True) + 1e-20)
        return experts, weights * cfg.routed_scaling_factor

    def __call__(self, x: Float[Array, "... D"], implementation: str = "xla", interpret: bool = False,
                 stacked: tuple | None = None, mesh=None) -> Float[Array, "... D"]:
        """`stacked` (w_gate, w_up, w_down, layer): inside a scan over stacked layers, the stacks [R, E, ...] and
        this layer's index. The expert kernels then read this layer's weights in place from the stacks (see
        `ic_jax.ops.grouped_matmul`). With a `mesh`, each device runs its own experts' slices
        (`ic_jax.ops.grouped_matmul.sharding`)."""
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        experts, weights = self.route(x)
        if stacked is None:  # this layer's own weights
            stacked = (self.w_gate[...], self.w_up[...], self.w_down[...], None)
        *ws, layer = stacked
        run = dict(implementation=implementation, interpret=interpret)
        if mesh is None:
            own = (self.w_gate[...], self.w_up[...], self.w_down[...])
            y = routed_ffn(x, experts, weights, ws, layer, 0, own=own, **run)
        else:
            y = expert_parallel(mesh, functools.partial(routed_ffn, **run), x, experts, weights, *ws, layer)
        out = y.astype(x.dtype)
        if self.shared is not None:
            out = out + self.shared(x)
        return out.reshape(shape)


def routed_ffn(x: Float[Array, "N D"], experts: Int[Array, "N k"], weights: Float[Array, "N k"], ws, layer, first,
               n_experts: int | None = None, own=None, implementation: str = "xla",
               interpret: bool = False) -> Float[Array, "N D"]:
    """The weighted sum over each token's routed experts, counting only experts first .. first + E - 1, those of
    the weights `ws` (w_gate, w_up, w_down: [*R, E, ...], all experts or one device's share of the `n_experts`);
    float32. With fewer routed rows than experts (decode) each row is multiplied by its expert's weights
    (`_gathered`), else the rows are sorted by expert (`_grouped`). The choice counts all `n_experts`, not this
    device's share: a share gets its fraction of the rows, so splitting the experts does not turn a decode step's
    few rows into a grouped matmul of mostly empty groups."""
    n_local = ws[0].shape[-3]
    mine = (experts >= first) & (experts < first + n_local)
    local = jnp.where(mine, experts - first, n_local)  # n_local: no expert of these weights
    weights = jnp.where(mine, weights, 0.0)
    run = dict(implementation=implementation, interpret=interpret)
    if x.shape[0] * experts.shape[-1] < (n_experts or n_local):
        y = _gathered(x, local, ws, layer, **run)
    else:
        y = _grouped(x, local, ws, layer, own, n_local, **run)
    return jnp.einsum("nkd,nk->nd", y.astype(jnp.float32), weights)


def _grouped(x, experts, ws, layer, own, n_experts, implementation, interpret) -> Float[Array, "N k D"]:
    """Tokens sorted by expert, one grouped matmul per projection; rows of expert `n_experts` (none of these
    weights) sort last and give 0. The layer's own weights go with the stack: an XLA matmul multiplies by them, so
    that the gradient stays with this layer's (scanned) weights."""
    own = own or (None, None, None)
    k = experts.shape[-1]
    flat = experts.reshape(-1)
    order = jnp.argsort(flat, stable=True)
    sizes = jnp.bincount(flat, length=n_experts).astype(jnp.int32)  # drops the rows of no expert
    xs = x[order // k]
    gmm = functools.partial(grouped_matmul, group_sizes=sizes, layer=layer, implementation=implementation,
                            interpret=interpret)
    h = jax.nn.silu(gmm(xs, ws[0], own=own[0])) * gmm(xs, ws[1], own=own[1])
    ys = gmm(h.astype(x.dtype), ws[2], own=own[2])
    # back to token order by a gather with the inverse permutation, which XLA runs faster than a scatter
    inverse = jnp.zeros_like(order).at[order].set(jnp.arange(order.size, dtype=order.dtype), unique_indices=True)
    return ys[inverse].reshape(-1, k, x.shape[-1])


def _gathered(x, experts, ws, layer, implementation, interpret) -> Float[Array, "N k D"]:
    """Few routed rows (decode): each row times its chosen expert's weights, read in place; a row of no expert of
    these weights (index E: another device's) gives 0 and reads nothing."""
    n, k = experts.shape
    rows = jnp.repeat(x, k, axis=0)
    gm = functools.partial(gathered_matmul, groups=experts.reshape(-1), layer=layer, implementation=implementation,
                           interpret=interpret)
    h = jax.nn.silu(gm(rows, ws[0])) * gm(rows, ws[1])
    return gm(h.astype(x.dtype), ws[2]).reshape(n, k, -1)
