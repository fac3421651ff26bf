"""The `pallas` implementation against the conformance suite.

On CPU the kernels run in Pallas interpret mode: exact but slow, so the CPU run uses small
shapes that still cover every feature of the sweep (G 1..16, T < S, ragged kv_length,
packed documents, decode, bf16, fp16, block 64, top_k 32). The `gpu`-marked class runs the
full sweep on a GPU.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import msa_jax
from conformance import Case, ConformanceSuite, make_inputs, position_kwargs
from msa_jax.kv_outer import partials as kv_partials

SMALL_CASES = (
    Case(1, 64, 64, 2, 2, 16, 16, 16, 3, "float32"),
    Case(2, 40, 96, 4, 2, 32, 16, 16, 3, "bfloat16"),
    Case(2, 80, 80, 16, 4, 16, 16, 16, 4, "float32", q_offset=(0, 0), kv_length=(80, 50)),
    Case(1, 96, 96, 8, 1, 16, 32, 32, 2, "bfloat16"),
    Case(1, 64, 64, 16, 1, 16, 16, 16, 1, "float32"),
    Case(2, 70, 70, 4, 1, 16, 16, 16, 3, "float32", segments=(20, 30, 20)),
    Case(2, 8, 100, 8, 2, 16, 16, 16, 4, "bfloat16", q_offset=(92, 40)),
    Case(2, 1, 90, 16, 2, 16, 16, 16, 3, "float32", kv_length=(90, 50)),
    Case(1, 320, 320, 4, 1, 64, 64, 64, 3, "float16"),  # block 64, fp16
    Case(1, 560, 560, 2, 1, 16, 16, 16, 32, "float32"),  # top_k 32: queries past 512 choose 31 of up to 34
)


class TestPallas(ConformanceSuite):
    implementation = "pallas"
    CASES = SMALL_CASES
    GRAD_CASES = (SMALL_CASES[5],)
    # Dense mode differs from sparse only in which blocks are read; interpret mode is slow, so
    # it runs where positions differ most: ragged rows, packed documents, chunked prefill,
    # block 64 in fp16.
    DENSE_CASES = (SMALL_CASES[2], SMALL_CASES[5], SMALL_CASES[6], SMALL_CASES[8])


@pytest.mark.gpu
@pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a GPU (Triton lowering)")
class TestPallasGPU(ConformanceSuite):
    implementation = "pallas"


def _pallas_kernels(jaxpr) -> list[str]:
    """Names of the pallas_call kernels in a jaxpr, nested jaxprs included."""
    names = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "pallas_call":
            names.append(eqn.params["name"])
        for param in eqn.params.values():
            for sub in param if isinstance(param, (list, tuple)) else (param,):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    names.extend(_pallas_kernels(inner))
    return names


def test_training_step_runs_each_kl_pass_once(rng):
    """Under differentiation the KL's two passes run once, with the gradient, in the forward
    rule; kl_bwd only scales what they saved (before, the backward ran both passes again)."""
    case = Case(1, 64, 64, 4, 2, 16, 16, 16, 2, "float32")
    xs, _ = make_inputs(rng, case)

    def loss(*a):
        res = msa_jax.sparse_attention(*a, top_k=case.top_k, block_size=case.block_size, implementation="pallas")
        return jnp.sum(res.out) + res.kl_loss

    step = jax.value_and_grad(loss, argnums=tuple(range(5)))
    names = _pallas_kernels(jax.make_jaxpr(step)(*xs.values()).jaxpr)
    assert names.count("msa_kl_student_lse") == 1 and names.count("msa_kl") == 1, names
    assert "msa_sparse_attention_fwd" in names and "msa_sparse_attention_bwd" in names, names


def test_query_chunks_equal_one_pass(rng, monkeypatch):
    """A partial budget small enough to split the queries into chunks (forward, lse-only,
    backward and KL each chunk the queries) gives what one pass gives, values and grads."""
    case = Case(2, 70, 70, 4, 2, 16, 16, 16, 3, "float32", segments=(20, 30, 20))
    xs, _ = make_inputs(rng, case)
    kw = position_kwargs(case)
    w = jnp.asarray(rng.standard_normal((case.B, case.T, case.Hq, case.D)), jnp.float32)

    def loss(*a):
        r = msa_jax.sparse_attention(*a, top_k=case.top_k, block_size=case.block_size, implementation="pallas", **kw)
        return jnp.sum(r.out * w) + jnp.sum(jnp.where(jnp.isfinite(r.lse), r.lse, 0.0)) + r.kl_loss, r

    run = jax.value_and_grad(loss, argnums=tuple(range(5)), has_aux=True)
    jax.clear_caches()
    (_, one), grads_one = run(*xs.values())
    # 70 queries in chunks of 24, 24, 22 at the largest per-query footprint (the backward's).
    monkeypatch.setattr(kv_partials, "PARTIAL_BUDGET_BYTES", 25 * case.top_k * case.Hq * case.D * 4)
    assert kv_partials.query_chunk(case.T, case.top_k * case.Hq * case.D * 4) == 24
    jax.clear_caches()
    (_, chunked), grads_chunked = run(*xs.values())
    jax.clear_caches()
    for name in ("out", "lse", "kl_loss"):
        np.testing.assert_allclose(getattr(chunked, name), getattr(one, name), rtol=1e-6, atol=1e-6, err_msg=name)
    for name, g, h in zip(xs, grads_chunked, grads_one):
        np.testing.assert_allclose(g, h, rtol=1e-5, atol=1e-6, err_msg=name)
