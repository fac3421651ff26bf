#!/usr/bin/env bash
# What one call of the lent GPU runs (gpu.md: batch build + test + benchmark into few calls).
# Run from the repository root on the device, the pinned CUTLASS wheel carried in .whl/:
#
#   bash benchmarks/gpu_session.sh build test-cuda sanitize bench-indexer
#
# Steps, in the order given; each writes its log under $OUT and a failing step does not stop
# the later ones (the exit status is the number of failed steps). At most 8 files come back
# from $OUT (the device README's limits): build, test-cuda and bench-* write 1-2 each, train-32k
# 4 and sanitize 6, so split a call that would write more (a train-32k metrics file was lost so):
#   build          the CUDA extension for sm_90a into the device's Python (editable install)
#   test-cuda      pytest -m gpu of the cuda implementation (forward, backward, KL, packed documents, paged index scan) and
#                  the extension loader
#   test-wheel     the same tests (every test of both files, TEST_K to narrow them) against an
#                  installed wheel instead of the build step's editable install: dist/msa_jax-*.whl,
#                  built elsewhere in isolation (KEEP=dist .ci/wheel_check.sh, for the device's
#                  Python) and carried, installed into /tmp/wheel_site, tests run from outside
#                  the checkout so that msa_jax is the installed copy
#   test-pallas    pytest -m gpu of the Pallas scale tests (issue #4's acceptance at 4K / 32K)
#   test-pallas-suite  the whole conformance suite against pallas on the GPU (TestPallasGPU)
#   sanitize       compute-sanitizer memcheck and racecheck on a small case of each CUDA kernel, the
#                  paged scan, the packed-documents case and the dense-mode KL case in processes of their
#                  own (SANITIZE_TOOLS: which tools; SANITIZE_PARTS: which of unpacked, paged, packed,
#                  dense, backward (the backward alone, for racecheck; not by default))
#   bench-indexer  bench.py, config A, indexer only, cuda and pallas, 8K / 32K / 128K
#   bench-A        bench.py, config A, every op, cuda and pallas (BENCH_IMPLS="cuda" for fewer), 8K / 32K / 128K
#   bench-train    bench.py, config A, cuda, the training ops (sparse_fwd_bwd, msa_fwd_bwd_kl) against cuDNN's
#                  dense fwd+bwd, 32K and 128K
#   bench-dense    bench.py, config A, the dense warm-up's training op (msa_dense_fwd_bwd_kl: mode="dense",
#                  main branch through cuDNN; the KL on cuda's kernels or pallas's dense_kl.py) against
#                  cuDNN's dense fwd+bwd, DENSE_N (8K, 32K), DENSE_IMPLS (cuda pallas)
#   bench-B        the same for config B (BENCH_OPS="indexer sparse_fwd msa_fwd": forward ops only)
#   breakdown      the forward's stages (work list, kernel, combine) at 32K and 128K, config A
#                  (BREAKDOWN_IMPLS="cuda" for fewer; ITEM_STEPS="32 64" sweeps cuda's work-item length)
#   breakdown-kl   breakdown_kl.py: the KL's work list, value pass and value + gradient alone, cuda, 32K and 128K
#   profile-train  profile_ops.py: GPU time per kernel of msa_fwd_bwd_kl (cuda) and cuDNN's dense fwd+bwd
#                  (PROFILE_OPS, PROFILE_N), config A, 32K and 128K, one JSON per case
#   ncu-train      Nsight Compute sections of the first launches of the training kernels (NCU_KERNELS, NCU_COUNT)
#                  in msa_fwd_bwd_kl, config A, 32K
#   ncu-source     per-instruction (SASS) warp-stall samples of one launch of NCU_KERNELS (default the KL
#                  gradient pass) at 32K, as CSV in ncu-source-csv.log
#   train-32k      issue #3's measurement: the GPU preset's train step at 32K tokens, MSA with
#                  implementation="cuda" (2 dense warm-up steps, then sparse) and the same model with
#                  dense cuDNN attention, one metrics JSON each (tokens/s per mode, first step excluded);
#                  TRAIN_STEPS / TRAIN_WARMUP_STEPS (12 / 2): more dense steps to time the warm-up
#   bench-1m       config A at 1M tokens, cuda: indexer, sparse forward, MSA forward (with XLA's
#                  memory plan of each) against one cuDNN dense forward
#   bench-1m-train config A at 1M tokens, cuda: msa_fwd_bwd_kl alone (with XLA's memory plan; no dense baseline)
#   bench-cp       bench_cp.py: config A at CP_N tokens (default 1M) split over every GPU of the machine
#                  (forward and training step), against one GPU where it fits, and the split ops again
#                  fetching only the selected K/V blocks (CP_FETCH: capacities, default "128 256");
#                  for the kinds with several GPUs (issue #16)
#   bench-decode   bench_decode.py: one decode step (T = 1), config A, B 1 at 1M and B 32 at 128K, paged bf16 and fp8 caches (DECODE_IMPLS, default "cuda pallas"), against dense cuDNN decode, with the FP8-vs-bf16 selection disagreement
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/msa_out}
mkdir -p "$OUT"
# MSA_JAX_COMMIT (bench.py records it): the HEAD whose clean tree the caller sent, as a literal
# sha from the caller's machine: the device's copy of .git can be stale, so never $(git rev-parse HEAD) there.
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD"
failed=0

run() {  # run NAME CMD...: log to $OUT/NAME.log, echo a one-line status
  local name=$1; shift
  local start=$SECONDS
  "$@" >"$OUT/$name.log" 2>&1
  local rc=$?
  echo "[$name] exit $rc in $((SECONDS - start)) s; tail:"
  tail -n 15 "$OUT/$name.log"
  [ $rc -eq 0 ] || failed=$((failed + 1))
}

# A small select_blocks call (bf16 and fp16 index heads), a block_sparse_attention on its rows and
# its gradients (both backward modes), the KL (student and gradient passes, then the value pass
# alone): what the sanitizer tools watch (the part "unpacked"; "paged" and "backward" below). The platform allocator gives
# each buffer its own cudaMalloc, so memcheck sees an access one byte past a buffer.
sanitize_case='
import numpy as np, jax, jax.numpy as jnp, msa_jax
r = np.random.default_rng(0)
iq = jnp.asarray(r.standard_normal((2, 300, 2, 128)), jnp.bfloat16)
ik = jnp.asarray(r.standard_normal((2, 700, 128)), jnp.bfloat16)
out = msa_jax.select_blocks(iq, ik, top_k=16, block_size=128, q_offset=np.array([400, -50], np.int32),
                            kv_length=np.array([700, 200], np.int32), implementation="cuda")
print(np.asarray(out)[0, -1, 0])
out16 = msa_jax.select_blocks(iq.astype(jnp.float16), ik.astype(jnp.float16), top_k=16, block_size=128,
                              q_offset=np.array([400, -50], np.int32), kv_length=np.array([700, 200], np.int32),
                              implementation="cuda")
print(np.asarray(out16)[0, -1, 0])
q = jnp.asarray(r.standard_normal((2, 300, 8, 128)), jnp.bfloat16)
kv = jnp.asarray(r.standard_normal((2, 700, 2, 128)), jnp.bfloat16)
o, lse = msa_jax.block_sparse_attention(q, kv, kv, out[:, :, :, :4], block_size=128, q_offset=np.array([400, -50], np.int32),
                                        kv_length=np.array([700, 200], np.int32), return_lse=True, implementation="cuda")
print(np.asarray(o, np.float32)[0, -1, 0, :4], np.asarray(lse)[0, -1])
for det in (False, True):
    loss = lambda q, k, v: jnp.sum(msa_jax.block_sparse_attention(
        q, k, v, out[:, :, :, :4], block_size=128, q_offset=np.array([400, -50], np.int32),
        kv_length=np.array([700, 200], np.int32), deterministic=det, implementation="cuda").astype(jnp.float32))
    dq, dk, dv = jax.grad(loss, argnums=(0, 1, 2))(q, kv, kv)
    print("backward", det, float(jnp.abs(dq.astype(jnp.float32)).sum()), float(jnp.abs(dk.astype(jnp.float32)).sum()))
    kl = lambda a, b: msa_jax.index_kl_loss(q, kv, a, b, out[:, :, :, :4], block_size=128,
        q_offset=np.array([400, -50], np.int32), kv_length=np.array([700, 200], np.int32), deterministic=det,
        implementation="cuda")
    value, (diq, dik) = jax.value_and_grad(kl, argnums=(0, 1))(iq, ik)
    print("kl", det, float(value), float(kl(iq, ik)), float(jnp.abs(diq.astype(jnp.float32)).sum()),
          float(jnp.abs(dik.astype(jnp.float32)).sum()))'
# The paged index scan (bf16 and FP8 pages, several pages per split, garbage page-table entries
# past the rows' pages): its own part, so that racecheck can watch it without the rest.
sanitize_paged_case='
import numpy as np, jax, jax.numpy as jnp, msa_jax
r = np.random.default_rng(0)
import msa_jax.paged_scan
msa_jax.paged_scan.TARGET_PROGRAMS = 4  # two splits per row: several pages each
lengths = np.array([20 * 128 + 5, 9 * 128], np.int32)
table, P = msa_jax.make_page_table(lengths + 128, 128, permutation=r.permutation(32))  # 22 + 10 pages
table[:, -1] = [-7, 2**31 - 1]  # never read: past both rows pages
pages = jnp.asarray(r.standard_normal((P, 128, 128)), jnp.bfloat16)
piq = jnp.asarray(r.standard_normal((2, 5, 2, 128)), jnp.bfloat16)
for keys, scale in ((pages, None), msa_jax.quantize_fp8(pages)):
    rows = msa_jax.paged_select_blocks(piq, keys, page_table=jnp.asarray(table), kv_length=lengths, top_k=16,
                                       index_k_scale=scale, implementation="cuda")
    print("paged", np.asarray(rows)[0, -1, 0])'
# The block-sparse backward alone (both modes; G 4, D 128, dQ split over both warpgroups), for
# racecheck: the whole unpacked case ran past 300 s under it.
sanitize_backward_case='
import numpy as np, jax, jax.numpy as jnp, msa_jax
r = np.random.default_rng(0)
q = jnp.asarray(r.standard_normal((2, 300, 8, 128)), jnp.bfloat16)
kv = jnp.asarray(r.standard_normal((2, 700, 2, 128)), jnp.bfloat16)
iq = jnp.asarray(r.standard_normal((2, 300, 2, 128)), jnp.bfloat16)
ik = jnp.asarray(r.standard_normal((2, 700, 128)), jnp.bfloat16)
bi = msa_jax.select_blocks(iq, ik, top_k=4, block_size=128, q_offset=np.array([400, -50], np.int32),
                           kv_length=np.array([700, 200], np.int32), implementation="cuda")
for det in (False, True):
    loss = lambda q, k, v: jnp.sum(msa_jax.block_sparse_attention(
        q, k, v, bi, block_size=128, q_offset=np.array([400, -50], np.int32),
        kv_length=np.array([700, 200], np.int32), deterministic=det, implementation="cuda").astype(jnp.float32))
    dq, dk, dv = jax.grad(loss, argnums=(0, 1, 2))(q, kv, kv)
    print("backward", det, float(jnp.abs(dq.astype(jnp.float32)).sum()), float(jnp.abs(dk.astype(jnp.float32)).sum()))'
# Packed documents starting inside blocks: every kernel reads tiles from any key. A process of
# its own: memcheck's one run of both parts crashed (SIGSEGV in the host process, while XLA
# compiled this part) before printing a summary (benchmarks/NOTES.md).
sanitize_packed_case='
import numpy as np, jax, jax.numpy as jnp, msa_jax
r = np.random.default_rng(0)
seg = jnp.asarray(np.repeat(np.arange(3), (300, 77, 323))[None], jnp.int32)
xs = [jnp.asarray(r.standard_normal(s), jnp.bfloat16) for s in ((1, 700, 8, 128), (1, 700, 2, 128), (1, 700, 2, 128),
                                                                 (1, 700, 2, 128), (1, 700, 128))]
for det in (False, True):
    def packed(*xs):
        res = msa_jax.sparse_attention(*xs, top_k=4, block_size=128, segment_ids=seg, deterministic=det,
                                       implementation="cuda")
        return jnp.sum(res.out.astype(jnp.float32)) + res.kl_loss
    grads = jax.grad(packed, argnums=(0, 1, 2, 3, 4))(*xs)
    print("packed", det, [float(jnp.abs(g.astype(jnp.float32)).sum()) for g in grads])'

# Dense mode over plain causal positions: the KL over the causal triangle without work lists
# (dense_kl_sm90.cuh; the student's lse and the teacher's from cuDNN), G 4, a partial last tile.
# racecheck reports 2 hazards inside cuDNN's own flash forward kernel here (its exit status is
# then 1; logs/h100-20261207-sanitize-racecheck-dense-2225eed.log): read the log for ours.
sanitize_dense_case='
import numpy as np, jax, jax.numpy as jnp, msa_jax
r = np.random.default_rng(0)
n = lambda *s: jnp.asarray(r.standard_normal(s), jnp.bfloat16)
q, k, iq, ik = n(2, 300, 8, 128), n(2, 300, 2, 128), n(2, 300, 2, 64), n(2, 300, 64)
bi = jnp.zeros((2, 300, 2, 1), jnp.int32)  # dense mode reads no selection
kl = lambda a, b: msa_jax.index_kl_loss(q, k, a, b, bi, block_size=128, mode="dense", implementation="cuda")
value, (diq, dik) = jax.value_and_grad(kl, argnums=(0, 1))(iq, ik)
print("dense kl", float(value), float(jnp.abs(diq.astype(jnp.float32)).sum()), float(jnp.abs(dik.astype(jnp.float32)).sum()))'

# pytest of the installed wheel, from outside the checkout (a subshell: the cd stays inside).
repo=$PWD
wheel_tests() (
  cd /tmp && PYTHONPATH=/tmp/wheel_site python3 -m pytest -v --durations=10 -p no:cacheprovider \
    "$repo/tests/test_ffi_loader.py" "$repo/tests/test_cuda.py" "$@"
)

for step in "$@"; do
  case $step in
    build)
      run build env MSA_JAX_CUDA=ON MSA_JAX_CUDA_ARCHS=90a CMAKE_BUILD_PARALLEL_LEVEL=16 \
        python3 -m pip install --no-build-isolation --no-deps -e . ;;
    test-cuda)
      # TEST_K: a pytest -k expression to run fewer (e.g. "attention" after a forward-kernel change).
      # -k matches substrings of test ids: "float16" also matches "bfloat16"; "-float16" does not.
      run test-cuda python3 -m pytest tests/test_cuda.py tests/test_cuda_bwd.py tests/test_cuda_kl.py tests/test_cuda_packed.py \
        tests/test_cuda_paged.py \
        tests/test_ffi_loader.py -m gpu -v \
        --durations=10 --maxfail=${MAXFAIL:-1000} \
        ${TEST_K:+-k "$TEST_K"} ;;
    test-wheel)
      rm -rf /tmp/wheel_site
      run test-wheel-install python3 -m pip install --no-deps --no-index --target /tmp/wheel_site dist/msa_jax-*.whl
      run test-wheel wheel_tests ${TEST_K:+-k "$TEST_K"} ;;
    test-pallas)
      run test-pallas python3 -m pytest tests/test_pallas_scale.py -m gpu -v --durations=15 ;;
    test-pallas-suite)
      run test-pallas-suite python3 -m pytest tests/test_pallas.py -m gpu -v --durations=15 ;;
    sanitize)
      # SANITIZE_TOOLS: fewer tools (e.g. "memcheck").
      for tool in ${SANITIZE_TOOLS:-memcheck racecheck}; do
        for part in ${SANITIZE_PARTS:-unpacked paged packed dense}; do
          case $part in
            unpacked) case_src=$sanitize_case ;;
            packed) case_src=$sanitize_packed_case ;;
            dense) case_src=$sanitize_dense_case ;;
            paged) case_src=$sanitize_paged_case ;;
            backward) case_src=$sanitize_backward_case ;;
            *) echo "unknown sanitize part: $part" >&2; failed=$((failed + 1)); continue ;;
          esac
          run "sanitize-$tool-$part" env XLA_PYTHON_CLIENT_ALLOCATOR=platform XLA_PYTHON_CLIENT_PREALLOCATE=false \
            compute-sanitizer --tool "$tool" --error-exitcode 1 python3 -c "$case_src"
        done
      done ;;
    bench-indexer)
      run bench-indexer python3 benchmarks/bench.py --config A --impl cuda pallas --ops indexer \
        --n 8192 32768 131072 --repeats 5 --warmup 2 --time-limit 60 --out "$OUT" ;;
    breakdown)
      # shellcheck disable=SC2086 (lists)
      run breakdown python3 benchmarks/breakdown_fwd.py --config A --n 32768 131072 --impl ${BREAKDOWN_IMPLS:-cuda pallas} \
        ${ITEM_STEPS:+--item-steps $ITEM_STEPS} ;;
    breakdown-kl)
      run breakdown-kl python3 benchmarks/breakdown_kl.py --config A --n 32768 131072 --impl cuda ;;
    profile-train)
      # shellcheck disable=SC2086 (PROFILE_OPS is a list)
      run profile-train python3 benchmarks/profile_ops.py --config A --n ${PROFILE_N:-32768 131072} \
        --ops ${PROFILE_OPS:-msa_fwd_bwd_kl dense_fwd_bwd} --impl cuda --out "$OUT" ;;
    ncu-train)
      # NCU_KERNELS: a regex of kernel names; the first NCU_COUNT launches that match are profiled.
      # Its first try (no --target-processes, preallocation on) segfaulted as JAX started
      # (logs/h200-20261203-ncu-train-segfault.log); application-only keeps ncu out of the child
      # processes XLA may start, a guess at the cause, not yet tried.
      run ncu-train env XLA_PYTHON_CLIENT_PREALLOCATE=false ncu --clock-control none --target-processes application-only \
        -k "regex:${NCU_KERNELS:-attention_bwd|kl_kernel}" -c "${NCU_COUNT:-3}" \
        --section SpeedOfLight --section MemoryWorkloadAnalysis --section ComputeWorkloadAnalysis \
        --section WarpStateStats --section SchedulerStats --section Occupancy \
        python3 benchmarks/bench.py --config A --impl cuda --ops msa_fwd_bwd_kl --n 32768 --repeats 1 --warmup 0 \
        --time-limit 30 --baselines --out /tmp/ncu_bench.json ;;
    ncu-source)
      # Warp-stall samples per SASS instruction of the first launch matching NCU_KERNELS
      # (default kl_grad_kernel) in msa_fwd_bwd_kl at 32K: the report, then its source page as
      # CSV (where a latency-bound kernel waits, which the sections of ncu-train do not place).
      run ncu-source env XLA_PYTHON_CLIENT_PREALLOCATE=false ncu --clock-control none --target-processes application-only \
        -k "regex:${NCU_KERNELS:-kl_grad_kernel}" -c 1 --section SourceCounters --section WarpStateStats \
        -f -o /tmp/ncu_source python3 benchmarks/bench.py --config A --impl cuda --ops msa_fwd_bwd_kl --n 32768 \
        --repeats 1 --warmup 0 --time-limit 30 --out /tmp/ncu_bench.json
      run ncu-source-csv ncu -i /tmp/ncu_source.ncu-rep --page source --csv --print-source sass ;;
    train-32k)
      for variant in "msa --implementation cuda" "dense-cudnn"; do
        name=train-32k-${variant%% *}
        # shellcheck disable=SC2086 (variant holds flags)
        run "$name" python3 examples/flax_model/train.py --preset gpu --steps "${TRAIN_STEPS:-12}" \
          --warmup-steps "${TRAIN_WARMUP_STEPS:-2}" --log-every 1 \
          --attention $variant --metrics-out "$OUT/$name.json"
      done ;;
    bench-train)
      run bench-train python3 benchmarks/bench.py --config A --impl cuda --ops sparse_fwd_bwd msa_fwd_bwd_kl \
        --n 32768 131072 --baselines dense_fwd_bwd --repeats 5 --warmup 2 --time-limit 60 --out "$OUT" ;;
    bench-dense)
      run bench-dense python3 benchmarks/bench.py --config A --impl ${DENSE_IMPLS:-cuda pallas} --ops msa_dense_fwd_bwd_kl \
        --n ${DENSE_N:-8192 32768} --baselines dense_fwd_bwd --repeats 5 --warmup 2 --time-limit 60 --out "$OUT" ;;
    bench-1m)
      run bench-1m python3 benchmarks/bench.py --config A --impl cuda --ops indexer sparse_fwd msa_fwd \
        --n 1048576 --baselines dense_fwd --repeats 1 --warmup 0 --time-limit 45 --out "$OUT" ;;
    bench-1m-train)
      run bench-1m-train python3 benchmarks/bench.py --config A --impl cuda --ops msa_fwd_bwd_kl \
        --n 1048576 --baselines --repeats 1 --warmup 0 --time-limit 60 --out "$OUT" ;;
    bench-A|bench-B)
      # shellcheck disable=SC2086 (BENCH_IMPLS is a list)
      # BENCH_OPS="indexer sparse_fwd msa_fwd" times the forward ops alone, against the dense forward.
      ops=(); [ -n "${BENCH_OPS:-}" ] && ops=(--ops $BENCH_OPS --baselines dense_fwd)
      run "$step" python3 benchmarks/bench.py --config "${step#bench-}" --impl ${BENCH_IMPLS:-cuda pallas} \
        --n 8192 32768 131072 --repeats 5 --warmup 2 --time-limit 60 --out "$OUT" "${ops[@]}" ;;
    bench-cp)
      # shellcheck disable=SC2086 (CP_FETCH holds a list)
      run bench-cp python3 benchmarks/bench_cp.py --config A --n ${CP_N:-1048576} --impl cuda --single \
        --kv-fetch-blocks ${CP_FETCH:-128 256} --out "$OUT" ;;
    bench-decode)
      # shellcheck disable=SC2086 (DECODE_IMPLS is a list)
      run bench-decode python3 benchmarks/bench_decode.py --config A --impl ${DECODE_IMPLS:-cuda pallas} \
        --repeats 10 --warmup 3 --time-limit 60 --out "$OUT" ;;
    *)
      echo "unknown step: $step" >&2; failed=$((failed + 1)) ;;
  esac
done
exit $failed
