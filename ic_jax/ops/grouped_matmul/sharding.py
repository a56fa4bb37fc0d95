"""The routed experts on a device mesh: experts over "expert", each expert's hidden dim over "tensor", tokens over
"data".

A device holds its experts' slices [*, E/e, D, F/t] of the weight stacks (as `runtime.sharding` places them) and
every token of its sequences; it multiplies the tokens routed to its experts by its slices (`local_ffn`, with the
number of its first expert) and the partial outputs are summed over "expert" and "tensor": one all-reduce of
[N, D] per MoE layer, and no device reads another's experts.
"""

from __future__ import annotations

import jax
from jax.sharding import PartitionSpec as P

from ic_jax.ops.common import per_shard, split_axes


def expert_parallel(mesh, local_ffn, x, experts, weights, w_gate, w_up, w_down, layer):
    """local_ffn(x [n, D], experts [n, k], weights [n, k], (w_gate, w_up, w_down) local slices, layer, first) ->
    this device's share of the routed output [n, D] (float32), run per shard of `mesh` and summed. The stacks are
    [R, E, D, F] / [R, E, F, D] with `layer` (an int, traced or not), or [E, D, F] / [E, F, D] with layer None."""
    stack = (None,) * (w_gate.ndim - 3)
    E, _, F = w_gate.shape[-3:]
    n = split_axes(mesh, x.shape[0], "data")
    e, f = split_axes(mesh, E, "expert"), split_axes(mesh, F, "tensor")
    summed = (e or ()) + (f or ())
    rows = P(n, None)

    def local(x, experts, weights, w_gate, w_up, w_down, layer):
        first = jax.lax.axis_index("expert") * w_gate.shape[-3] if e else 0
        y = local_ffn(x, experts, weights, (w_gate, w_up, w_down), layer, first)
        return jax.lax.psum(y, summed) if summed else y

    in_specs = (rows, rows, rows, P(*stack, e, None, f), P(*stack, e, None, f), P(*stack, e, f, None),
                None if layer is None else P())
    return per_shard(local, mesh, in_specs=in_specs, out_specs=rows)(x, experts, weights, w_gate, w_up, w_down, layer)
