"""Matmul precision inside Mosaic kernels.

Mosaic accepts full float32 contraction only for float32 operands; a bf16 matmul asked for
HIGHEST precision (as `jax_default_matmul_precision="highest"` asks of every dot) fails to
compile ("Bad lhs type"). Kernels therefore say what they want: exact float32 for float32
operands, one native MXU pass for bf16 ones, and operands of one dtype (`same_dtype`).
"""

import jax
import jax.numpy as jnp


def mxu(*operands):
    """`precision=` for a dot of `operands` inside a kernel."""
    if any(jnp.dtype(x.dtype) == jnp.float32 for x in operands):
        return jax.lax.Precision.HIGHEST
    return jax.lax.Precision.DEFAULT


def same_dtype(a, b):
    """Both operands in their common dtype: Mosaic matmuls take one operand dtype (a float32
    cotangent meets bf16 weights in a backward pass; the bf16 side is widened, exactly)."""
    dtype = jnp.promote_types(a.dtype, b.dtype)
    return a.astype(dtype), b.astype(dtype)
