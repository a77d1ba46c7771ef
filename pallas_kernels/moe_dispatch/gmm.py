"""Grouped matmul `gmm` and its transpose `tgmm`, with an `implementation=` switch.

Rows of `lhs` are grouped contiguously by `group_sizes` (group e owns rows
[sum(sizes[:e]), sum(sizes[:e+1]))); rows past sum(group_sizes) belong to no group and give 0.
`gmm` carries a `custom_vjp` whose backward uses the same implementation:
    d lhs = gmm(grad, rhs, transpose_rhs=True),   d rhs = tgmm(lhs, grad).
"""

import functools

import jax
import jax.numpy as jnp

from pallas_kernels import _mesh
from pallas_kernels.moe_dispatch import reference

IMPLEMENTATIONS = (
    "xla", "xla_ragged", "xla_blocked", "pallas_tpu", "pallas_gpu", "interpret", "reference"
)  # fmt: skip


def default_implementation():
    """`xla` everywhere until the Pallas paths are validated on hardware.

    `xla` is `xla_ragged` (`jax.lax.ragged_dot`, native on TPU and GPU) off CPU and
    `xla_blocked` (a scan over row tiles) on CPU, where XLA's ragged_dot computes every group
    on every row. Choose `pallas_tpu` / `pallas_gpu` explicitly.
    """
    return "xla"


def _resolve(implementation):
    if implementation not in (None, *IMPLEMENTATIONS):
        raise ValueError(f"implementation must be one of {IMPLEMENTATIONS}, got {implementation!r}")
    implementation = implementation or default_implementation()
    if implementation == "xla":
        return "xla_blocked" if _mesh.target_platform() == "cpu" else "xla_ragged"
    return implementation


def _check(name, lhs, rhs_or_grad, group_sizes_E, implementation, *, rhs_is_grouped):
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"implementation must be one of {IMPLEMENTATIONS}, got {implementation!r}")
    if lhs.ndim != 2:
        raise ValueError(f"{name}: lhs must be [M, K], got shape {lhs.shape}")
    if group_sizes_E.ndim != 1 or not jnp.issubdtype(group_sizes_E.dtype, jnp.integer):
        raise ValueError(
            f"{name}: group_sizes must be an integer [E] array, got {group_sizes_E.dtype}"
            f"{group_sizes_E.shape}"
        )
    if rhs_is_grouped and (rhs_or_grad.ndim != 3 or rhs_or_grad.shape[0] != group_sizes_E.shape[0]):
        raise ValueError(
            f"{name}: rhs must be [E={group_sizes_E.shape[0]}, ., .], got shape {rhs_or_grad.shape}"
        )
    if not rhs_is_grouped and (rhs_or_grad.ndim != 2 or rhs_or_grad.shape[0] != lhs.shape[0]):
        raise ValueError(
            f"{name}: grad must be [M={lhs.shape[0]}, N], got shape {rhs_or_grad.shape}"
        )


def _gmm_impl(lhs_MxK, rhs, group_sizes_E, implementation, transpose_rhs, tiling, out_dtype):
    """Forward only. rhs is [E, K, N], or [E, N, K] when transpose_rhs."""
    group_sizes_E = group_sizes_E.astype(jnp.int32)
    if implementation == "xla_blocked":
        from pallas_kernels.moe_dispatch import tiling as blocked

        tm = tiling[0] if tiling else 128
        return blocked.gmm_blocked(
            lhs_MxK, rhs, group_sizes_E, transpose_rhs=transpose_rhs, out_dtype=out_dtype, tm=tm
        )
    if implementation == "xla_ragged":
        contract_rhs = 2 if transpose_rhs else 1
        dims = jax.lax.RaggedDotDimensionNumbers(
            dot_dimension_numbers=(((1,), (contract_rhs,)), ((), ())),
            lhs_ragged_dimensions=[0],
            rhs_group_dimensions=[0],
        )
        return jax.lax.ragged_dot_general(
            lhs_MxK, rhs, group_sizes_E, dims, preferred_element_type=out_dtype
        )
    if implementation == "reference":
        rhs_ExKxN = jnp.swapaxes(rhs, 1, 2) if transpose_rhs else rhs
        return reference.gmm_reference(
            lhs_MxK, rhs_ExKxN, group_sizes_E, preferred_element_type=out_dtype
        )
    if implementation in ("pallas_tpu", "interpret"):
        from pallas_kernels.moe_dispatch import kernel_tpu

        return kernel_tpu.gmm(
            lhs_MxK,
            rhs,
            group_sizes_E,
            transpose_rhs=transpose_rhs,
            tiling=tiling,
            out_dtype=out_dtype,
            interpret=implementation == "interpret",
        )
    from pallas_kernels.moe_dispatch import kernel_gpu

    return kernel_gpu.gmm(
        lhs_MxK, rhs, group_sizes_E, transpose_rhs=transpose_rhs, tiling=tiling, out_dtype=out_dtype
    )


def _tgmm_impl(lhs_MxK, grad_MxN, group_sizes_E, implementation, tiling, out_dtype):
    group_sizes_E = group_sizes_E.astype(jnp.int32)
    if implementation == "xla_blocked":
        from pallas_kernels.moe_dispatch import tiling as blocked

        tm = tiling[0] if tiling else 128
        return blocked.tgmm_blocked(lhs_MxK, grad_MxN, group_sizes_E, out_dtype=out_dtype, tm=tm)
    if implementation == "xla_ragged":
        # Ragged contracting dimension: the output gains the group dimension in front.
        dims = jax.lax.RaggedDotDimensionNumbers(
            dot_dimension_numbers=(((0,), (0,)), ((), ())),
            lhs_ragged_dimensions=[0],
            rhs_group_dimensions=[],
        )
        return jax.lax.ragged_dot_general(
            lhs_MxK, grad_MxN, group_sizes_E, dims, preferred_element_type=out_dtype
        )
    if implementation == "reference":
        return reference.tgmm_reference(
            lhs_MxK, grad_MxN, group_sizes_E, preferred_element_type=out_dtype
        )
    if implementation in ("pallas_tpu", "interpret"):
        from pallas_kernels.moe_dispatch import kernel_tpu

        return kernel_tpu.tgmm(
            lhs_MxK,
            grad_MxN,
            group_sizes_E,
            tiling=tiling,
            out_dtype=out_dtype,
            interpret=implementation == "interpret",
        )
    from pallas_kernels.moe_dispatch import kernel_gpu

    return kernel_gpu.tgmm(lhs_MxK, grad_MxN, group_sizes_E, tiling=tiling, out_dtype=out_dtype)


def _varying_axes(aval):
    """Manual mesh axes a value varies over inside shard_map (attribute moved across jax)."""
    mat = getattr(aval, "manual_axis_type", None)  # jax 0.10
    if mat is not None:
        return frozenset(mat.varying)
    return frozenset(getattr(aval, "vma", ()))


def _match_vma(*xs):
    """Inside shard_map, casts operands to their joint varying-axes type before the custom_vjp.

    The weight gradient of rows that vary over a data axis varies over it too; the custom_vjp
    must return it typed like the primal, so the primal is made varying first and autodiff of
    that cast (a psum) reduces the gradient over the data axis.
    """
    typeof = getattr(jax, "typeof", None)
    if typeof is None:
        return xs
    vmas = [_varying_axes(typeof(x)) for x in xs]
    joint = frozenset().union(*vmas)
    if not joint:
        return xs
    if hasattr(jax.lax, "pcast"):
        cast = lambda x, axes: jax.lax.pcast(x, axes, to="varying")
    else:
        cast = jax.lax.pvary
    return tuple(cast(x, tuple(sorted(joint - v))) if joint - v else x for x, v in zip(xs, vmas))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6))
def _gmm(lhs_MxK, rhs, group_sizes_E, implementation, transpose_rhs, tiling, out_dtype):
    return _gmm_impl(lhs_MxK, rhs, group_sizes_E, implementation, transpose_rhs, tiling, out_dtype)


def _gmm_fwd(lhs_MxK, rhs, group_sizes_E, implementation, transpose_rhs, tiling, out_dtype):
    out = _gmm_impl(lhs_MxK, rhs, group_sizes_E, implementation, transpose_rhs, tiling, out_dtype)
    return out, (lhs_MxK, rhs, group_sizes_E)


def _gmm_bwd(implementation, transpose_rhs, tiling, out_dtype, residuals, grad_MxN):
    lhs_MxK, rhs, group_sizes_E = residuals
    # d lhs = grad @ rhs[g]^T: the same grouped matmul with the rhs read transposed.
    grad_lhs = _gmm_impl(
        grad_MxN, rhs, group_sizes_E, implementation, not transpose_rhs, tiling, lhs_MxK.dtype
    )
    if transpose_rhs:  # rhs is [E, N, K]: d rhs[e] = grad[rows e]^T @ lhs[rows e]
        grad_rhs = _tgmm_impl(grad_MxN, lhs_MxK, group_sizes_E, implementation, tiling, rhs.dtype)
    else:
        grad_rhs = _tgmm_impl(lhs_MxK, grad_MxN, group_sizes_E, implementation, tiling, rhs.dtype)
    return grad_lhs, grad_rhs, None


_gmm.defvjp(_gmm_fwd, _gmm_bwd)


def gmm(
    lhs_MxK,
    rhs_ExKxN,
    group_sizes_E,
    *,
    implementation=None,
    transpose_rhs=False,
    tiling=None,
    preferred_element_type=None,
):
    """Grouped matmul: out[m] = lhs[m] @ rhs[group(m)] -> [M, N]; differentiable in lhs and rhs.

    Args:
      lhs_MxK: rows sorted by group.
      rhs_ExKxN: one [K, N] matrix per group ([E, N, K] when `transpose_rhs`).
      group_sizes_E: int rows per group, sum <= M; rows past the sum come out 0.
      implementation: one of IMPLEMENTATIONS; None picks `default_implementation()`.
      tiling: (tm, tk, tn) for the Pallas paths; None picks per-backend defaults.
      preferred_element_type: output dtype (accumulation is float32); default lhs.dtype.
    """
    implementation = _resolve(implementation)
    _check("gmm", lhs_MxK, rhs_ExKxN, group_sizes_E, implementation, rhs_is_grouped=True)
    contract = rhs_ExKxN.shape[2] if transpose_rhs else rhs_ExKxN.shape[1]
    if contract != lhs_MxK.shape[1]:
        raise ValueError(
            f"gmm: lhs {lhs_MxK.shape} and rhs {rhs_ExKxN.shape} (transpose_rhs={transpose_rhs})"
            " disagree on the contracted dimension"
        )
    out_dtype = jnp.dtype(preferred_element_type or lhs_MxK.dtype)
    tiling = None if tiling is None else tuple(tiling)
    if implementation == "reference":  # plain autodiff: the reference is the truth for grads too
        return _gmm_impl(
            lhs_MxK, rhs_ExKxN, group_sizes_E, "reference", transpose_rhs, None, out_dtype
        )
    lhs_MxK, rhs_ExKxN = _match_vma(lhs_MxK, rhs_ExKxN)
    return _gmm(lhs_MxK, rhs_ExKxN, group_sizes_E, implementation, transpose_rhs, tiling, out_dtype)


def tgmm(
    lhs_MxK,
    grad_MxN,
    group_sizes_E,
    *,
    implementation=None,
    tiling=None,
    preferred_element_type=None,
):
    """Transposed grouped matmul: out[e] = lhs[rows e]^T @ grad[rows e] -> [E, K, N].

    The weight gradient of `gmm`. Empty groups give zeros. Forward only (no custom_vjp).
    """
    implementation = _resolve(implementation)
    _check("tgmm", lhs_MxK, grad_MxN, group_sizes_E, implementation, rhs_is_grouped=False)
    out_dtype = jnp.dtype(preferred_element_type or lhs_MxK.dtype)
    tiling = None if tiling is None else tuple(tiling)
    return _tgmm_impl(lhs_MxK, grad_MxN, group_sizes_E, implementation, tiling, out_dtype)
