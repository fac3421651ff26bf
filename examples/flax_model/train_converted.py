"""Index warm-up and sparse continued training of a converted dense model (convert.py's output).

    python examples/flax_model/train_converted.py MODEL_DIR --ckpt-dir /tmp/warm --steps 300
    python examples/flax_model/train_converted.py MODEL_DIR --ckpt-dir /tmp/warm --resume --steps 400
    python examples/flax_model/train_converted.py MODEL_DIR --ckpt-dir /tmp/sparse --stage full \\
        --init-from /tmp/warm --steps 100 --learning-rate 1e-5

Why this file exists: `train.py` trains the byte-level toy from scratch; a converted model
needs the route the paper takes for existing models: first warm the index branch up
against the frozen dense model, then (optionally) train everything in sparse mode.

  - stage "index" (stage 1): only the index branch (index_q_proj, index_k_proj and their
    RMSNorms) is trainable; the model runs in dense mode (full causal attention: the backbone
    computes exactly the source model's function) and the loss is the sum over layers of the
    KL index-alignment loss. Gradients are taken only with respect to the index parameters
    (`nnx.DiffState` with `INDEX_PARAMS`): no backbone gradient is computed, and the backbone
    parameters stay bit for bit what convert.py wrote (the tests check both).
  - stage "full" (stage 2): every parameter, sparse mode, loss = LM + kl_weight * KL.
    `--init-from` starts it from a stage-1 run's latest checkpoint.

Data: `text_data.py` (the Python reference bundled with CPython, or `--text-files`),
tokenised with the model's own tokenizer (the tokenizer.json convert.py copied next to the
model), packed into rows of `--seq-len` tokens with `segment_ids`. Progress line,
checkpoints (`--ckpt-dir`, `--ckpt-every`), exact resume (`--resume`) and `--metrics-out`
JSON work as in train.py; batches depend on (seed, step) only.

Importable: `WarmupConfig`, `INDEX_PARAMS`, `WarmupStep`, `warm_up` and `load_model` are what
the tests and evaluate.py use.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import convert as convert_lib  # noqa: E402
import text_data  # noqa: E402
import train as train_lib  # noqa: E402

STAGES = {"index": "dense", "full": "sparse"}  # stage -> attention mode of its steps


def INDEX_PARAMS(path, value) -> bool:
    """nnx filter: the index branch's parameters (index_q_proj, index_k_proj, index_*_norm)."""
    return isinstance(value, nnx.Param) and any(isinstance(p, str) and p.startswith("index_") for p in path)


@dataclasses.dataclass(frozen=True)
class WarmupConfig:
    """Everything that decides the numbers of a run besides the model it starts from.

    model_dir: the convert.py output. stage: "index" or "full" (module docstring).
    init_from: a train_converted.py --ckpt-dir whose latest parameters replace model_dir's
    (stage 2 after stage 1), or None. text_files: training text (empty: the Python
    reference, text_data.py). kl_weight: lambda of the KL term (stage "full"; stage "index"
    trains on the KL alone). Learning rate: linear warm-up for lr_warmup_steps, then cosine
    to min_lr_ratio by lr_decay_steps (None: steps, fixed when the run starts).
    """

    model_dir: str
    stage: str = "index"
    init_from: str | None = None
    steps: int = 300
    batch_size: int = 1
    seq_len: int = 2048
    learning_rate: float = 3e-3
    lr_warmup_steps: int = 20
    lr_decay_steps: int | None = None
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    kl_weight: float = 1.0
    seed: int = 0
    text_files: tuple = ()

    def __post_init__(self):
        object.__setattr__(self, "text_files", tuple(self.text_files))  # JSON gives a list back
        if self.stage not in STAGES:
            raise ValueError(f"stage must be one of {tuple(STAGES)}, got {self.stage!r}")
        for name in ("steps", "batch_size", "seq_len"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.lr_warmup_steps < 0:
            raise ValueError(f"lr_warmup_steps must be >= 0, got {self.lr_warmup_steps}")
        if not (math.isfinite(self.learning_rate) and self.learning_rate > 0):
            raise ValueError(f"learning_rate must be a finite float > 0, got {self.learning_rate}")
        if not (math.isfinite(self.kl_weight) and self.kl_weight >= 0):
            raise ValueError(f"kl_weight must be a finite float >= 0, got {self.kl_weight}")

    @property
    def mode(self) -> str:
        return STAGES[self.stage]


def lr_schedule(cfg: WarmupConfig) -> optax.Schedule:
    decay = cfg.lr_decay_steps or cfg.steps
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=cfg.learning_rate, warmup_steps=cfg.lr_warmup_steps,
        decay_steps=max(decay, cfg.lr_warmup_steps + 1), end_value=cfg.learning_rate * cfg.min_lr_ratio)


def trainable(cfg: WarmupConfig):
    """The nnx filter of the parameters a stage trains."""
    return INDEX_PARAMS if cfg.stage == "index" else nnx.Param


def make_optimizer(model, cfg: WarmupConfig) -> nnx.Optimizer:
    """AdamW (b2 0.95, decay on matrices only) with global-norm clipping, over the stage's parameters."""
    decay_mask = lambda params: jax.tree.map(lambda p: p.ndim > 1, params)
    tx = optax.chain(optax.clip_by_global_norm(cfg.grad_clip),
                     optax.adamw(lr_schedule(cfg), b1=0.9, b2=0.95, weight_decay=cfg.weight_decay, mask=decay_mask))
    return nnx.Optimizer(model, tx, wrt=trainable(cfg))


class WarmupStep:
    """One jitted optimizer step: `step(state, batch) -> (state, metrics)`; state donated.

    Gradients are taken with respect to the stage's parameters only (`nnx.DiffState`), so
    in stage "index" no backbone gradient exists in the program. `traces` counts traces.
    """

    def __init__(self, graphdef, cfg: WarmupConfig):
        self.traces = 0
        wrt, mode, kl_weight, lm_in_loss = trainable(cfg), cfg.mode, cfg.kl_weight, cfg.stage == "full"

        def step(state, tokens, targets, segment_ids, loss_mask):
            self.traces += 1  # Python side effect: runs only while tracing
            model, optimizer = nnx.merge(graphdef, state)

            def loss_fn(model):
                out = model(tokens, segment_ids=segment_ids, mode=mode)
                nll = optax.softmax_cross_entropy_with_integer_labels(out.logits, targets)
                lm = jnp.sum(nll * loss_mask) / jnp.maximum(jnp.sum(loss_mask), 1.0)
                kl = jnp.sum(out.kl_losses)
                loss = lm + kl_weight * kl if lm_in_loss else kl
                return loss, (lm, kl, out.kl_losses)

            grads, (lm, kl, kl_layers) = nnx.grad(loss_fn, argnums=nnx.DiffState(0, wrt), has_aux=True)(model)
            optimizer.update(model, grads)
            metrics = dict(loss=lm + kl_weight * kl if lm_in_loss else kl, lm_loss=lm, kl_loss=kl,
                           kl_per_layer=kl_layers, grad_norm=optax.tree.norm(grads))
            return nnx.state((model, optimizer)), metrics

        self.jitted = jax.jit(step, donate_argnums=0)

    def __call__(self, state, batch: text_data.Packed):
        return self.jitted(state, batch.tokens, batch.targets, batch.segment_ids, batch.loss_mask)


def load_model(path: str, step: int | None = None):
    """(model, WarmupConfig or None) from a convert.py output or a train_converted.py --ckpt-dir.

    A --ckpt-dir gives its checkpoint `step` (default: the latest): the run's model_dir,
    loaded, with the checkpoint's parameters.
    """
    if os.path.exists(os.path.join(path, convert_lib.CONFIG_FILE)):
        if step is not None:
            raise ValueError(f"{path} is a convert.py output (one checkpoint, no steps); got step={step}")
        return convert_lib.load_converted(path), None
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{path}: no such directory")
    ckpts = train_lib.Checkpoints(path, config_cls=WarmupConfig)
    try:
        _, cfg = ckpts.configs(step)
        model = convert_lib.load_converted(cfg.model_dir)
        ckpts.restore(model, step=step)
    finally:
        ckpts.close()
    return model, cfg


class WarmupResult(NamedTuple):
    model: object
    optimizer: nnx.Optimizer
    history: list  # one dict per step of this call
    traces: int  # traces of the step (1: no recompilation)
    step: int  # optimizer steps taken in all


def warm_up(cfg: WarmupConfig, *, ckpt_dir: str | None = None, ckpt_every: int = 0, resume: bool = False,
            log_every: int = 10, progress: bool = True, packed: text_data.Packed | None = None) -> WarmupResult:
    """Runs (or, with resume, continues) a stage up to cfg.steps steps (module docstring).

    `packed` overrides the training rows (tests); by default text_data's, tokenised with the
    model's tokenizer. Checkpoints, resume and Ctrl-C behave as in train.train.
    """
    if cfg.lr_decay_steps is None:  # fixed now, so a resumed run with more steps keeps it
        cfg = dataclasses.replace(cfg, lr_decay_steps=cfg.steps)
    ckpts = train_lib.Checkpoints(ckpt_dir, config_cls=WarmupConfig) if ckpt_dir else None
    if ckpts is not None and not resume and ckpts.latest_step() is not None:
        raise ValueError(f"{ckpt_dir} already holds checkpoints (latest step {ckpts.latest_step()}): "
                         "pass resume=True (--resume) to continue that run, or use another directory")
    model = convert_lib.load_converted(cfg.model_dir)
    if cfg.init_from is not None:
        init, _ = load_model(cfg.init_from)
        nnx.update(model, nnx.state(init, nnx.Param))
        del init
    optimizer = make_optimizer(model, cfg)
    start = 0
    if resume and ckpts is not None and ckpts.latest_step() is not None:
        saved_model, saved = ckpts.configs()
        if saved_model != model.cfg:
            raise ValueError(f"--resume: the checkpoint's model {saved_model} differs from {cfg.model_dir}'s")
        diff = {k: (v, getattr(cfg, k)) for k, v in dataclasses.asdict(saved).items()
                if k != "steps" and v != getattr(cfg, k)}
        if diff:
            raise ValueError(f"--resume: settings differ from the checkpoint's (saved, now): {diff}")
        start = ckpts.restore(model, optimizer)
        if progress:
            print(f"resumed from step {start} ({ckpt_dir})", file=sys.stderr)
    if packed is None:
        tok = text_data.load_tokenizer(cfg.model_dir)  # convert.py copied it there
        packed = text_data.pack(text_data.tokenize(tok, text_data.load_documents(list(cfg.text_files) or None)),
                                cfg.seq_len)
        if progress:
            print(f"data: {packed.tokens.shape[0]} rows of {cfg.seq_len} tokens "
                  f"({packed.tokens.size:,} tokens)", file=sys.stderr)

    graphdef, state = nnx.split((model, optimizer))
    step_fn = WarmupStep(graphdef, cfg)
    bar = train_lib._Progress(cfg.steps, log_every, progress)
    tokens_per_step = cfg.batch_size * cfg.seq_len
    history, step = [], start
    stop = train_lib._StopOnInterrupt()
    with stop:
        while step < cfg.steps and not stop.requested:
            batch = text_data.batch_at(packed, step, batch_size=cfg.batch_size, seed=cfg.seed)
            traced = step_fn.traces
            t0 = time.perf_counter()
            state, metrics = step_fn(state, batch)
            metrics = jax.device_get(metrics)
            seconds = time.perf_counter() - t0
            step += 1
            rec = dict(step=step, mode=cfg.mode, seconds=seconds, lr=float(lr_schedule(cfg)(step - 1)),
                       **{k: float(v) if np.ndim(v) == 0 else np.asarray(v).tolist() for k, v in metrics.items()})
            history.append(rec)
            bar.update(rec, tokens_per_step, seconds, compiled=step_fn.traces > traced)
            if not math.isfinite(rec["loss"]):
                raise FloatingPointError(f"loss is {rec['loss']} at step {step}")
            if ckpts is not None and ckpt_every and step % ckpt_every == 0 and step < cfg.steps:
                nnx.update((model, optimizer), state)
                ckpts.save(step, model, optimizer, model.cfg, cfg)
    bar.close()
    if stop.requested:
        print(f"interrupted after step {step}" + (": saving; --resume continues" if ckpts else ""), file=sys.stderr)
    nnx.update((model, optimizer), state)
    if ckpts is not None:
        if ckpts.latest_step() != step:  # a periodic save may already hold this step
            ckpts.save(step, model, optimizer, model.cfg, cfg)
        ckpts.close()
    if step_fn.traces > 1:
        print(f"warning: the step recompiled ({step_fn.traces} traces)", file=sys.stderr)
    return WarmupResult(model, optimizer, history, step_fn.traces, step)


def summarize(history: list, tokens_per_step: int) -> dict:
    """Tokens/s over the steps that did not compile (the first), and the first/last losses."""
    secs = [r["seconds"] for r in history][1:]
    out = dict(first=history[0] if history else None, last=history[-1] if history else None)
    if secs:
        out.update(steps=len(secs), tokens_per_s=tokens_per_step * len(secs) / sum(secs),
                   step_s=float(np.median(secs)))
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model_dir", help="a convert.py output directory")
    p.add_argument("--stage", choices=tuple(STAGES), default="index",
                   help="index: stage 1, index branch only, dense mode, KL loss; full: everything, sparse, LM + KL")
    p.add_argument("--init-from", help="start from this train_converted.py --ckpt-dir's latest parameters")
    defaults = WarmupConfig(model_dir="")
    for name in ("steps", "batch_size", "seq_len", "learning_rate", "lr_warmup_steps", "weight_decay",
                 "kl_weight", "seed"):
        value = getattr(defaults, name)
        p.add_argument("--" + name.replace("_", "-"), type=type(value), default=value, help=f"default {value}")
    p.add_argument("--text-files", nargs="+", default=(),
                   help="training text (default: the Python reference bundled with CPython, eval topics held out)")
    p.add_argument("--ckpt-dir")
    p.add_argument("--ckpt-every", type=int, default=0, help="also save every N steps (0: only at the end)")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --ckpt-dir")
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--metrics-out", help="write the per-step history and summary here (JSON)")
    args = p.parse_args(argv)
    if args.resume and not args.ckpt_dir:
        raise SystemExit("--resume needs --ckpt-dir")
    cfg = WarmupConfig(
        model_dir=os.path.abspath(args.model_dir), stage=args.stage,
        init_from=os.path.abspath(args.init_from) if args.init_from else None, steps=args.steps,
        batch_size=args.batch_size, seq_len=args.seq_len, learning_rate=args.learning_rate,
        lr_warmup_steps=args.lr_warmup_steps, weight_decay=args.weight_decay, kl_weight=args.kl_weight,
        seed=args.seed, text_files=tuple(os.path.abspath(f) for f in args.text_files))
    if args.resume and args.ckpt_dir and train_lib.Checkpoints(args.ckpt_dir, config_cls=WarmupConfig).latest_step():
        saved = train_lib.Checkpoints(args.ckpt_dir, config_cls=WarmupConfig).configs()[1]
        cfg = dataclasses.replace(saved, steps=args.steps)  # flags other than --steps come from the run
    print(f"backend {jax.default_backend()}, stage {cfg.stage} ({cfg.mode} mode), {cfg.steps} steps, batch "
          f"{cfg.batch_size} x seq {cfg.seq_len}, lr {cfg.learning_rate}", file=sys.stderr)
    result = warm_up(cfg, ckpt_dir=args.ckpt_dir, ckpt_every=args.ckpt_every, resume=args.resume,
                     log_every=args.log_every)
    n_train = sum(x.size for x in jax.tree.leaves(nnx.state(result.model, trainable(cfg))))
    summary = summarize(result.history, cfg.batch_size * cfg.seq_len)
    if "tokens_per_s" in summary:
        print(f"{n_train / 1e6:.2f}M trainable parameters; {summary['tokens_per_s']:,.0f} tokens/s, median step "
              f"{summary['step_s']:.2f} s (compile step excluded)", file=sys.stderr)
    if args.metrics_out:
        with open(args.metrics_out, "w") as f:
            json.dump(dict(config=dataclasses.asdict(cfg), model=json.loads(result.model.cfg.to_json()),
                           trainable_params=int(n_train), backend=jax.default_backend(),
                           device=jax.devices()[0].device_kind, jax_version=jax.__version__,
                           git_commit=os.environ.get("MSA_JAX_COMMIT", "unknown"),
                           date=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                           command=" ".join(["examples/flax_model/train_converted.py",
                                             *(sys.argv[1:] if argv is None else argv)]),
                           traces=result.traces, summary=summary, history=result.history), f, indent=1)
    if result.step < cfg.steps:
        raise SystemExit(130)


if __name__ == "__main__":
    main()
