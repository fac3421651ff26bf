"""FP8 E4M3 storage for the paged caches: one float32 scale per cached token (and head).

Granularity, and why. Each token's vector (per kv head for K and V: D values; the single
index key head: Di values) is scaled by its own amax, `scale = amax / 448`, and stored as
`float8_e4m3fn` beside a float32 scale of shape [P, page, Hkv] (K, V) or [P, page] (index
keys). This is the granularity of JAX's own Pallas GPU paged attention
(`jax.experimental.pallas.ops.gpu.paged_attention`, per (head, page, token) scales), chosen
here over the two alternatives the issue names:
  - per (page, head): a token appended to a partly filled page can raise the page's amax,
    which forces a read-quantise-write of the page's earlier tokens (double rounding, and a
    data-dependent extra pass in every decode step);
  - per tensor (static): needs a calibrated scale and clips or wastes range when the
    activations drift; no protection against one outlier token.
Per token, appending writes only the new tokens' slots (no read of older data), no scale
ever changes after it is written, and the error of a token depends on that token alone.
Cost: 4 bytes of scale per D bytes of FP8 (3.1% at D = 128), and one multiply per score
column in the kernels (the scale is constant along the contracted D axis: it factors out
of <q, k>, and for V it folds into the probabilities before the P V product).

Error (round to nearest even; E4M3 has 3 mantissa bits, normals from 2^-6, subnormal
spacing 2^-9, largest finite 448). With y = x / scale, |y| <= 448 by construction:
  |dequantize(quantize(x)) - x| <= max(2^-4 * |x|, 2^-10 * scale)   per element,
i.e. a relative error of at most 1/16 for every element larger than amax * 2^-6 / 448 and an
absolute error of at most amax / 458752 below that (plus float32 rounding of x / scale and
y * scale, ~2^-24 relative). `error_bound` returns this bound. How it propagates into
attention and selection is measured in tests/test_paged.py and benchmarks/bench_decode.py.
"""

from __future__ import annotations

import jax.numpy as jnp

FP8_DTYPE = jnp.float8_e4m3fn
FP8_MAX = 448.0  # largest finite float8_e4m3fn


def is_fp8(dtype) -> bool:
    return jnp.dtype(dtype) == jnp.dtype(FP8_DTYPE)


def quantize(x, axis: int = -1):
    """(values float8_e4m3fn, scale float32) with x ~= values * scale, one scale per vector.

    Args:
      x: any float array; the scale is taken over `axis` (the head dim D or Di).
      axis: the axis each scale covers.

    Returns:
      values: x's shape, float8_e4m3fn. scale: float32, x's shape without `axis`. An
      all-zero vector gets scale 1 (and zeros).
    """
    x = x.astype(jnp.float32)
    amax = jnp.max(jnp.abs(x), axis=axis, keepdims=True)
    # tiny: an amax so small that amax / 448 underflows must not divide by zero.
    scale = jnp.where(amax > 0, jnp.maximum(amax / FP8_MAX, jnp.finfo(jnp.float32).tiny), 1.0)
    # The division may round a hair above 448; clip so nothing converts to NaN (E4M3FN has no inf).
    values = jnp.clip(x / scale, -FP8_MAX, FP8_MAX).astype(FP8_DTYPE)
    return values, jnp.squeeze(scale, axis)


def dequantize(values, scale, dtype=jnp.float32, axis: int = -1):
    """values * scale in `dtype` (scale broadcast along `axis`, the axis `quantize` reduced)."""
    return (values.astype(jnp.float32) * jnp.expand_dims(scale, axis)).astype(dtype)


def error_bound(x, axis: int = -1):
    """float32, x's shape: the bound above on |dequantize(quantize(x)) - x| (float32 dequantisation)."""
    x = jnp.abs(x.astype(jnp.float32))
    amax = jnp.max(x, axis=axis, keepdims=True)
    return jnp.maximum(x * 2.0**-4, amax / FP8_MAX * 2.0**-10) * (1 + 2.0**-16)
