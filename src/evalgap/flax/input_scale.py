"""Does a Flax model change its input's scale before its first layer? Read from the training trace's jaxpr.

:func:`input_transform` follows the model's input through the jaxpr of the training-mode trace
(:mod:`evalgap.flax.forward` makes it) to the first Conv/Dense/Embed call: an Embed embeds its input; another
layer's input computed from the input by anything but :data:`PASS_THROUGH` is a candidate, which :func:`confirm`
settles on the first batch's values (only the equations that input depends on are evaluated) by
:func:`evalgap.engine.scale_changed`, as the PyTorch and Keras probes judge. No side effect.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ..engine import scale_changed
from .layers import path_name

#: Primitives that pass values on as they are (layout, dtype, selection, order, repetition, padding): an output is the
#: input's when every operand computed from the model's input is the input's (pad's padding value, gather's indices and
#: concatenate's other pieces may be constants).
PASS_THROUGH = frozenset({
    "reshape", "squeeze", "expand_dims", "broadcast_in_dim", "transpose", "convert_element_type", "copy", "rev",
    "slice", "dynamic_slice", "device_put", "sharding_constraint", "stop_gradient", "pad", "concatenate", "tile", "gather",
})


def input_transform(model: str, first: list, jaxpr: Any, inputs: int, embed: type) -> tuple[str | None, Any]:
    """Where the model may transform its input itself, and the jaxpr to confirm it by value (:func:`confirm`).

    ``first``: ``(path, class, input)`` of the first Conv/Dense/Embed call (``input`` None inside
    a lifted transform: not known), the traced function's first output. An Embed embeds its
    input (sure: no jaxpr to confirm by); another layer's input is a candidate when it is
    computed from the model's input (the last ``inputs`` arguments of ``jaxpr``) by anything but
    :data:`PASS_THROUGH` (``x / 255``, ``(x - mean) / std``, but also a resize or a pooling,
    which keep the input's range): then ``jaxpr`` comes back with it, else None.
    """
    if not first:
        return None, None
    path, cls, value = first[0]
    layer = path_name(path) or cls.__name__
    if issubclass(cls, embed):
        return f"{layer} (an embedding)", None
    if value is None or not jaxpr.out_avals:
        return None, None
    invars = jaxpr.jaxpr.invars
    label = _labels(jaxpr.jaxpr, [None] * (len(invars) - inputs) + ["input"] * inputs)[0]
    return (f"{model}.__call__, before {layer}", jaxpr) if label == "changed" else (None, None)


def confirm(transform: str | None, jaxpr: Any, args: Any, x: Any) -> str | None:
    """``transform`` where the first layer's input, computed from the first batch, changes the input's scale.

    As PyTorch's check (:func:`evalgap.torch.layers.input_transforms`): the first layer's input
    (the first output of ``jaxpr`` on ``args``, only the equations it depends on evaluated) against
    the input ``x`` (one floating or uint8 array) by :func:`evalgap.engine.scale_changed` (a resize,
    a pooling, a crop keep the scale). Where the values cannot be had (several inputs, a failure,
    non-float or non-finite values), the jaxpr's verdict stands.
    """
    if transform is None or jaxpr is None:
        return transform
    leaves = jax.tree.leaves(x)
    if len(leaves) != 1 or not hasattr(leaves[0], "dtype") or np.size(leaves[0]) == 0:
        return transform
    if not (jnp.issubdtype(leaves[0].dtype, jnp.floating) or leaves[0].dtype == jnp.uint8):
        return transform
    try:
        got = _first_output(jaxpr, jax.tree.leaves(args))
        if not jnp.issubdtype(got.dtype, jnp.floating) or got.size == 0:
            return transform
        wide = [jnp.asarray(v).astype(jnp.promote_types(jnp.asarray(v).dtype, jnp.float32)) for v in (leaves[0], got)]
        stats = [f(v) for v in wide for f in (jnp.min, jnp.max, jnp.std)]
        values = [float(v) for v in jax.device_get(stats)]  # six numbers move, not the batch
    except Exception:  # the value is not needed to run the model: the jaxpr's verdict stands
        return transform
    if not np.all(np.isfinite(values)):
        return transform
    return transform if scale_changed(tuple(values[:3]), tuple(values[3:])) else None


def _first_output(closed: Any, args: list) -> Any:
    """The first output of the closed jaxpr ``closed`` on ``args``: only the equations it depends on, one op each."""
    jaxpr, literal = closed.jaxpr, jax.extend.core.Literal
    needed = {v for v in jaxpr.outvars[:1] if not isinstance(v, literal)}
    kept = []
    for eqn in reversed(jaxpr.eqns):
        if any(not isinstance(v, literal) and v in needed for v in eqn.outvars):
            kept.append(eqn)
            needed.update(v for v in eqn.invars if not isinstance(v, literal))
    env = dict(zip(jaxpr.constvars, closed.consts))
    env.update(zip(jaxpr.invars, args))

    def read(v: Any) -> Any:
        return v.val if isinstance(v, literal) else env[v]

    for eqn in reversed(kept):
        bound = eqn.primitive.get_bind_params(eqn.params)
        subfuns, params = bound if isinstance(bound, tuple) else ((), bound)  # older JAX: (subfuns, params)
        out = eqn.primitive.bind(*subfuns, *[read(v) for v in eqn.invars], **params)
        env.update(zip(eqn.outvars, out if eqn.primitive.multiple_results else [out]))
    return jnp.asarray(read(jaxpr.outvars[0]))


def _labels(jaxpr: Any, given: list) -> list:
    """Per output of ``jaxpr``: ``"input"`` (an input passed through), ``"changed"`` (computed from one) or None (neither)."""
    labels = dict(zip(jaxpr.invars, given))

    def of(v: Any) -> Any:
        return None if isinstance(v, jax.extend.core.Literal) else labels.get(v)

    for eqn in jaxpr.eqns:
        ins = [of(v) for v in eqn.invars]
        inner = [p for p in eqn.params.values() if hasattr(p, "eqns") or hasattr(getattr(p, "jaxpr", None), "eqns")]
        inner = [getattr(p, "jaxpr", p) for p in inner]
        if len(inner) == 1 and len(inner[0].invars) == len(ins) and len(inner[0].outvars) == len(eqn.outvars):
            outs = _labels(inner[0], ins)  # a nested jit/call: followed inside
        elif eqn.primitive.name in PASS_THROUGH and "input" in ins and all(a in (None, "input") for a in ins):
            outs = ["input"] * len(eqn.outvars)
        else:
            outs = ["changed" if any(a is not None for a in ins) else None] * len(eqn.outvars)
        labels.update(zip(eqn.outvars, outs))
    return [of(v) for v in jaxpr.outvars]
