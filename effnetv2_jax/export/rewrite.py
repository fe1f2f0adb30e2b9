"""1x1 convolutions as convolutions again, for the TFLite converter.

The models compute a 1x1 convolution as a matmul over the channels
(`kernels.pointwise`: x [N, H, W, C] . kernel [C, D]), which XLA runs faster.
The TFLite converter (TF 2.21) turns such a dot_general into a
`tfl.batch_matmul` and then rejects it ("invalid output rank, expected 3 but
got 4") when the leading dimensions are all 1: at batch 1, the
squeeze-and-excite convolutions on their [1, 1, 1, C] pooled vector. The
converter folds reshapes around the dot back into the same op, so flattening
the rows does not help. A 1x1 `conv_general_dilated` is what the layer means
and what TFLite has a kernel for (CONV_2D, int8 included), so the serving
function is re-traced with every such dot_general replaced by one.

The rewrite evaluates the function's jaxpr equation by equation (the
custom-interpreter pattern of the JAX documentation), inlining `jit`
calls and the primal of custom_vjp/custom_jvp calls: an export carries no
gradient, so their derivative rules are not needed.
"""

from __future__ import annotations

from typing import Callable

# Higher-order primitives whose body is evaluated inline, and the parameter
# holding it.
_INLINED = {'jit': 'jaxpr', 'pjit': 'jaxpr', 'custom_vjp_call': 'call_jaxpr',
            'custom_jvp_call': 'call_jaxpr'}


def pointwise_dots_as_convolutions(fn: Callable) -> Callable:
  """`fn` (one NHWC array in, any outputs) with each channel matmul of a
  4-D tensor by a 2-D kernel computed as a 1x1 NHWC convolution."""
  import jax

  def rewritten(x):
    closed, shapes = jax.make_jaxpr(fn, return_shape=True)(
        jax.ShapeDtypeStruct(x.shape, x.dtype))
    outputs = _evaluate(closed.jaxpr, closed.consts, [x])
    return jax.tree.unflatten(jax.tree.structure(shapes), outputs)

  return rewritten


def _evaluate(jaxpr, consts, args) -> list:
  from jax.extend import core

  env = {}

  def read(var):
    return var.val if isinstance(var, core.Literal) else env[var]

  for var, value in zip(jaxpr.constvars, consts):
    env[var] = value
  for var, value in zip(jaxpr.invars, args):
    env[var] = value
  for eqn in jaxpr.eqns:
    inputs = [read(v) for v in eqn.invars]
    name = eqn.primitive.name
    if name in _INLINED and _INLINED[name] in eqn.params:
      body = eqn.params[_INLINED[name]]
      outputs = _evaluate(body.jaxpr, body.consts, inputs)
    elif name == 'dot_general' and _is_pointwise(eqn):
      outputs = [_convolution_1x1(*inputs, eqn.params)]
    else:
      outputs = eqn.primitive.bind(*inputs, **eqn.params)
      if not eqn.primitive.multiple_results:
        outputs = [outputs]
    for var, value in zip(eqn.outvars, outputs):
      env[var] = value
  return [read(v) for v in jaxpr.outvars]


def _is_pointwise(eqn) -> bool:
  """x [N, H, W, C] . kernel [C, D], contracting C, no batch dimensions."""
  lhs, rhs = (v.aval for v in eqn.invars)
  (lhs_contract, rhs_contract), (lhs_batch, rhs_batch) = (
      eqn.params['dimension_numbers'])
  return (lhs.ndim == 4 and rhs.ndim == 2 and tuple(lhs_contract) == (3,)
          and tuple(rhs_contract) == (0,) and not lhs_batch and not rhs_batch)


def _convolution_1x1(x, kernel, params):
  from jax import lax

  return lax.conv_general_dilated(
      x, kernel.reshape((1, 1) + kernel.shape), window_strides=(1, 1),
      padding='VALID', dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
      precision=params.get('precision'),
      preferred_element_type=params.get('preferred_element_type'))
