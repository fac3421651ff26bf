"""Train the example MSA decoder: indexer warm-up in dense mode, then sparse, with KL loss.

    python examples/flax_model/train.py --preset cpu --steps 200 --ckpt-dir /tmp/msa_ckpt
    python examples/flax_model/train.py --preset cpu --ckpt-dir /tmp/msa_ckpt --resume
    python examples/flax_model/train.py --preset gpu --attention dense-cudnn   # dense baseline

Loss = LM cross-entropy + kl_weight * (sum of the MSA layers' KL index-alignment losses).
The first `warmup_steps` steps call the model with mode="dense" (full causal attention,
KL over every visible key), the rest with mode="sparse". The mode is a static argument of
one jitted step, so a run compiles exactly two versions of it; `TrainStep.traces` counts
the traces and the run warns if any mode traced twice.

Importable: `preset`, `build_model`, `make_optimizer`, `TrainStep`, `Checkpoints` and
`train` are what `tests/test_flax_example.py` drives with a tiny config.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import math
import os
import signal
import sys
import threading
import time
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax import nnx

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import data  # noqa: E402
from model import ModelConfig, MSATransformer  # noqa: E402


ATTENTIONS = ("msa", "dense-cudnn")
# 256 bytes + 3 specials (data.BYTE_VOCAB), padded to a multiple of 64 for the matmuls.
VOCAB_SIZE = 320


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Everything that decides the numbers of a run (the ModelConfig aside).

    steps: optimizer steps of the run. warmup_steps: the first steps run mode="dense".
    kl_weight: lambda of the KL term. lr_decay_steps: horizon of the cosine decay; None
    means `steps`, fixed when the run starts so that extending a resumed run keeps it.
    attention: "msa" or "dense-cudnn" (every layer dense GQA, the speed baseline).
    dtype: compute dtype of the model ("float32" or "bfloat16"); parameters stay float32.
    """

    steps: int = 200
    batch_size: int = 8
    seq_len: int = 256
    warmup_steps: int = 50
    kl_weight: float = 1.0
    learning_rate: float = 3e-3
    lr_warmup_steps: int = 20
    lr_decay_steps: int | None = None
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    seed: int = 0
    dtype: str = "float32"
    attention: str = "msa"
    corpus_bytes: int = 2_000_000

    def __post_init__(self):
        for name in ("steps", "batch_size", "seq_len"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.warmup_steps < 0 or self.lr_warmup_steps < 0:
            raise ValueError(
                f"warmup_steps and lr_warmup_steps must be >= 0, got {self.warmup_steps}, {self.lr_warmup_steps}"
            )
        if self.attention not in ATTENTIONS:
            raise ValueError(f"attention must be one of {ATTENTIONS}, got {self.attention!r}")
        if self.dtype not in ("float32", "bfloat16"):
            raise ValueError(f"dtype must be 'float32' or 'bfloat16', got {self.dtype!r}")
        if not (math.isfinite(self.kl_weight) and self.kl_weight >= 0):
            raise ValueError(f"kl_weight must be a finite float >= 0, got {self.kl_weight}")


def preset(name: str) -> tuple[ModelConfig, TrainConfig]:
    """The "cpu" (minutes on 2 cores) or "gpu" (32K tokens per sequence, one H100) setup."""
    if name == "cpu":
        # seq 256 with 16-token blocks is 16 blocks per sequence and top_k 4 keeps 4 of
        # them: most queries really drop blocks, so sparse mode differs from dense.
        # index_head_dim 32, not 16: after the index RMSNorm, index logits are bounded by
        # sqrt(Di) x the norm gains, and at Di = 16 (bound 4) the KL climbs back from ~0.4
        # to ~1.1 in 200 steps as the main branch sharpens; at 32 it stays near 0.45.
        model = ModelConfig(
            vocab_size=VOCAB_SIZE, d_model=64, num_layers=3, num_q_heads=4, num_kv_heads=2, head_dim=16,
            ffn_dim=192, index_head_dim=32, top_k=4, block_size=16, dense_layers=1,
        )
        return model, TrainConfig()
    if name == "gpu":
        # G = 8, D = Di = 128, Bk = 128, K = 16 (config A but for G, which is 16 there) with fewer
        # heads and layers so that T = 32768 trains on one GPU. implementation=None lets
        # msa_jax pick (msa_jax.dispatch.default_order): on a Hopper GPU, cuda, whose
        # backward and KL run the Pallas kernels.
        model = ModelConfig(
            vocab_size=VOCAB_SIZE, d_model=1024, num_layers=8, num_q_heads=16, num_kv_heads=2, head_dim=128,
            ffn_dim=2816, index_head_dim=128, top_k=16, block_size=128, dense_layers=1, rope_theta=500000.0,
        )
        train_cfg = TrainConfig(
            steps=1000, batch_size=1, seq_len=32768, warmup_steps=100, learning_rate=3e-4, lr_warmup_steps=50,
            dtype="bfloat16", corpus_bytes=8_000_000,
        )
        return model, train_cfg
    raise ValueError(f"preset must be 'cpu' or 'gpu', got {name!r}")


def effective_model_config(model_cfg: ModelConfig, train_cfg: TrainConfig) -> ModelConfig:
    """The ModelConfig a run builds and saves: `attention="dense-cudnn"` makes every layer dense."""
    if train_cfg.attention == "dense-cudnn":
        return dataclasses.replace(model_cfg, dense_layers=model_cfg.num_layers)
    return model_cfg


def build_model(model_cfg: ModelConfig, train_cfg: TrainConfig) -> MSATransformer:
    """The model of a run (see `effective_model_config`), initialised from `train_cfg.seed`.
    """
    model_cfg = effective_model_config(model_cfg, train_cfg)
    dtype = jnp.dtype(train_cfg.dtype)
    return MSATransformer(model_cfg, rngs=nnx.Rngs(train_cfg.seed), dtype=dtype, param_dtype=jnp.float32)


def lr_schedule(train_cfg: TrainConfig) -> optax.Schedule:
    decay = train_cfg.lr_decay_steps or train_cfg.steps
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=train_cfg.learning_rate, warmup_steps=train_cfg.lr_warmup_steps,
        decay_steps=max(decay, train_cfg.lr_warmup_steps + 1),
        end_value=train_cfg.learning_rate * train_cfg.min_lr_ratio,
    )


def make_optimizer(model: MSATransformer, train_cfg: TrainConfig) -> nnx.Optimizer:
    """AdamW on a warmup-cosine schedule, global-norm clipping; norm scales are not decayed."""
    decay_mask = lambda params: jax.tree.map(lambda p: p.ndim > 1, params)
    tx = optax.chain(
        optax.clip_by_global_norm(train_cfg.grad_clip),
        optax.adamw(lr_schedule(train_cfg), b1=0.9, b2=0.95, weight_decay=train_cfg.weight_decay, mask=decay_mask),
    )
    return nnx.Optimizer(model, tx, wrt=nnx.Param)


def mode_at(step: int, warmup_steps: int) -> str:
    """Attention mode of 0-based optimizer step `step`: dense for the first warmup_steps."""
    return "dense" if step < warmup_steps else "sparse"


class TrainStep:
    """One jitted optimizer step over (model, optimizer) state; `mode` is static.

    Call `step(state, tokens, targets, mode)` -> (new_state, metrics); `state` is
    `nnx.split((model, optimizer))[1]` and is donated. `traces[mode]` counts how often the
    step was traced for each mode: 1 each after any number of steps, or something recompiles.
    """

    def __init__(self, graphdef, kl_weight: float):
        self.traces: collections.Counter = collections.Counter()

        def step(state, tokens, targets, mode):
            self.traces[mode] += 1  # Python side effect: runs only while tracing
            model, optimizer = nnx.merge(graphdef, state)

            def loss_fn(model):
                out = model(tokens, mode=mode)
                lm = optax.softmax_cross_entropy_with_integer_labels(out.logits, targets).mean()
                kl = jnp.sum(out.kl_losses)
                return lm + kl_weight * kl, (lm, kl, out.kl_losses)

            grads, (lm, kl, kl_layers) = nnx.grad(loss_fn, has_aux=True)(model)
            optimizer.update(model, grads)
            metrics = dict(loss=lm + kl_weight * kl, lm_loss=lm, kl_loss=kl, kl_per_layer=kl_layers,
                           grad_norm=optax.tree.norm(grads))
            return nnx.state((model, optimizer)), metrics

        self.jitted = jax.jit(step, static_argnames="mode", donate_argnums=0)

    def __call__(self, state, tokens, targets, mode: str):
        return self.jitted(state, tokens, targets, mode=mode)


class Checkpoints:
    """Orbax checkpoints of a run: items "params", "opt_state" (pure dicts) and "config" (JSON).

    The step number of a checkpoint is the number of optimizer steps taken. Saves are
    synchronous so that a returned save is on disk (and the donated state may be reused).
    """

    def __init__(self, directory: str, max_to_keep: int = 3, config_cls=None):
        """config_cls: the dataclass of the run's settings (default TrainConfig; train_converted.py
        saves its WarmupConfig here)."""
        options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, enable_async_checkpointing=False, create=True)
        self.manager = ocp.CheckpointManager(os.path.abspath(directory), options=options)
        self.config_cls = TrainConfig if config_cls is None else config_cls

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, model, optimizer, model_cfg: ModelConfig, train_cfg: TrainConfig):
        config = {"model": json.loads(model_cfg.to_json()), "train": dataclasses.asdict(train_cfg)}
        self.manager.save(step, args=ocp.args.Composite(
            params=ocp.args.StandardSave(nnx.to_pure_dict(nnx.state(model))),
            opt_state=ocp.args.StandardSave(nnx.to_pure_dict(nnx.state(optimizer))),
            config=ocp.args.JsonSave(config),
        ), force=True)

    def raw_config(self, step: int | None = None) -> dict:
        """The JSON saved with checkpoint `step` (default: the latest): {"model": ..., "train": ...}."""
        return self.manager.restore(self._step(step), args=ocp.args.Composite(config=ocp.args.JsonRestore())).config

    def configs(self, step: int | None = None) -> tuple[ModelConfig, TrainConfig]:
        """(ModelConfig, the run's config_cls) saved with checkpoint `step` (default: the latest)."""
        config = self.raw_config(step)
        return ModelConfig(**config["model"]), self.config_cls(**config["train"])

    def restore(self, model, optimizer=None, step: int | None = None) -> int:
        """Loads checkpoint `step` (default: the latest) into model (and optimizer); returns the step."""
        step = self._step(step)
        abstract = lambda module: jax.tree.map(ocp.utils.to_shape_dtype_struct, nnx.to_pure_dict(nnx.state(module)))
        items = dict(params=ocp.args.StandardRestore(abstract(model)))
        if optimizer is not None:
            items["opt_state"] = ocp.args.StandardRestore(abstract(optimizer))
        restored = self.manager.restore(step, args=ocp.args.Composite(**items))
        for module, name in ((model, "params"), (optimizer, "opt_state")):
            if module is not None:
                state = nnx.state(module)
                nnx.replace_by_pure_dict(state, restored[name])
                nnx.update(module, state)
        return step

    def _step(self, step):
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.manager.directory}")
        return step

    def close(self):
        self.manager.close()


class _StopOnInterrupt:
    """Turns the first Ctrl-C into a request to stop between steps (the state in flight is
    donated, so it cannot be saved mid-step); a second Ctrl-C raises KeyboardInterrupt."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def _handler(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print("\nCtrl-C: stopping after this step (again to abort)", file=sys.stderr)

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handler)
        return self

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)


class TrainResult(NamedTuple):
    model: MSATransformer
    optimizer: nnx.Optimizer
    history: list  # one dict per step taken in this call: step, mode, loss, lm_loss, kl_loss, ...
    traces: dict  # mode -> number of traces of the train step (1 each: no recompilation)
    step_fn: TrainStep  # the jitted step this call used
    step: int  # optimizer steps taken in all (< train_cfg.steps when interrupted)


class _Progress:
    """A one-line progress display: carriage-return updates on a terminal, plain lines otherwise."""

    def __init__(self, total: int, every: int, enabled: bool, stream=sys.stderr):
        self.total, self.every, self.enabled, self.stream = total, every, enabled, stream
        self.tty = stream.isatty()
        self.start = time.perf_counter()
        self.recent = collections.deque(maxlen=20)  # (tokens, seconds) of steps that did not compile

    def update(self, rec: dict, tokens: int, seconds: float, compiled: bool):
        if not compiled:
            self.recent.append((tokens, seconds))
        if not self.enabled or (rec["step"] % self.every and rec["step"] != self.total and not self.tty):
            return
        rate = sum(t for t, _ in self.recent) / max(sum(s for _, s in self.recent), 1e-9) if self.recent else 0.0
        elapsed = time.perf_counter() - self.start
        line = (f"step {rec['step']:>{len(str(self.total))}}/{self.total} [{rec['mode']:>6}] loss {rec['loss']:.4f} "
                f"lm {rec['lm_loss']:.4f} kl {rec['kl_loss']:.4f} | {rate:,.0f} tok/s | {elapsed:.0f}s")
        self.stream.write(("\r" + line + "\x1b[K") if self.tty else line + "\n")
        self.stream.flush()

    def close(self):
        if self.enabled and self.tty:
            self.stream.write("\n")


def train(model_cfg: ModelConfig, train_cfg: TrainConfig, *, ckpt_dir: str | None = None, ckpt_every: int = 0,
          resume: bool = False, log_every: int = 10, progress: bool = True, corpus: np.ndarray | None = None,
          ) -> TrainResult:
    """Runs (or, with resume=True, continues) training up to `train_cfg.steps` steps.

    With `ckpt_dir`, saves every `ckpt_every` steps (0: only at the end) and at the end;
    `resume` loads the latest checkpoint there (configs must match; `steps` may differ)
    and continues bit for bit: batches depend on the step only. Ctrl-C (in the main
    thread) stops after the step in flight, saves and returns; a second Ctrl-C aborts.
    """
    if train_cfg.lr_decay_steps is None:  # fixed now, so a resumed run with more steps keeps it
        train_cfg = dataclasses.replace(train_cfg, lr_decay_steps=train_cfg.steps)
    model_cfg = effective_model_config(model_cfg, train_cfg)
    if train_cfg.seq_len <= model_cfg.top_k * model_cfg.block_size and train_cfg.attention == "msa" and progress:
        print(f"note: seq_len {train_cfg.seq_len} <= top_k * block_size = {model_cfg.top_k * model_cfg.block_size}: "
              "sparse mode keeps every block (equals dense)", file=sys.stderr)
    ckpts = Checkpoints(ckpt_dir) if ckpt_dir else None
    if ckpts is not None and not resume and ckpts.latest_step() is not None:
        raise ValueError(f"{ckpt_dir} already holds checkpoints (latest step {ckpts.latest_step()}): "
                         "pass resume=True (--resume) to continue that run, or use another directory")
    model = build_model(model_cfg, train_cfg)
    optimizer = make_optimizer(model, train_cfg)
    start = 0
    if resume and ckpts is not None and ckpts.latest_step() is not None:
        saved_model, saved_train = ckpts.configs()
        _check_same(saved_model, model_cfg, saved_train, train_cfg)
        start = ckpts.restore(model, optimizer)
        if progress:
            print(f"resumed from step {start} ({ckpt_dir})", file=sys.stderr)
    if corpus is None:
        corpus = data.load_corpus(train_cfg.corpus_bytes)

    has_msa = model_cfg.dense_layers < model_cfg.num_layers  # else mode changes nothing: one version
    graphdef, state = nnx.split((model, optimizer))
    step_fn = TrainStep(graphdef, train_cfg.kl_weight)
    tokens_per_step = train_cfg.batch_size * train_cfg.seq_len
    bar = _Progress(train_cfg.steps, log_every, progress)
    history, step = [], start
    stop = _StopOnInterrupt()

    with stop:
        while step < train_cfg.steps and not stop.requested:
            tokens, targets = data.batch_at(corpus, step, batch_size=train_cfg.batch_size,
                                            seq_len=train_cfg.seq_len, seed=train_cfg.seed)
            mode = mode_at(step, train_cfg.warmup_steps) if has_msa else "dense"
            traced = sum(step_fn.traces.values())
            t0 = time.perf_counter()
            state, metrics = step_fn(state, tokens, targets, mode)
            metrics = jax.device_get(metrics)  # waits for the step
            seconds = time.perf_counter() - t0
            step += 1
            rec = dict(step=step, mode=mode, seconds=seconds, lr=float(lr_schedule(train_cfg)(step - 1)),
                       **{k: float(v) if np.ndim(v) == 0 else np.asarray(v).tolist() for k, v in metrics.items()})
            history.append(rec)
            bar.update(rec, tokens_per_step, seconds, compiled=sum(step_fn.traces.values()) > traced)
            if not math.isfinite(rec["loss"]):
                raise FloatingPointError(f"loss is {rec['loss']} at step {step}")
            if ckpts is not None and ckpt_every and step % ckpt_every == 0 and step < train_cfg.steps:
                nnx.update((model, optimizer), state)  # the donated arrays' successors
                ckpts.save(step, model, optimizer, model_cfg, train_cfg)
    bar.close()
    if stop.requested:
        print(f"interrupted after step {step}" + (": saving; --resume continues" if ckpts else ""), file=sys.stderr)
    nnx.update((model, optimizer), state)
    if ckpts is not None:
        if ckpts.latest_step() != step:  # a periodic save may already hold this step
            ckpts.save(step, model, optimizer, model_cfg, train_cfg)
        ckpts.close()
    traces = dict(step_fn.traces)
    if any(n > 1 for n in traces.values()):
        print(f"warning: the train step recompiled: traces per mode {traces}", file=sys.stderr)
    return TrainResult(model, optimizer, history, traces, step_fn, step)


# Fields a resumed run may change: they decide how far it runs, not what any step computes.
_RUN_FIELDS = ("steps",)


def _check_same(saved_model, model_cfg, saved_train, train_cfg):
    if saved_model != model_cfg:
        raise ValueError(f"--resume: the checkpoint's model config {saved_model} differs from this run's {model_cfg}")
    a = {k: v for k, v in dataclasses.asdict(saved_train).items() if k not in _RUN_FIELDS}
    b = {k: v for k, v in dataclasses.asdict(train_cfg).items() if k not in _RUN_FIELDS}
    diff = {k: (a[k], b[k]) for k in a if a[k] != b[k]}
    if diff:
        raise ValueError(f"--resume: training settings differ from the checkpoint's (saved, now): {diff}")


def summarize(history: list, tokens_per_step: int) -> dict:
    """Mean tokens/s per mode over the steps that did not compile (the first step of each mode)."""
    out = {}
    for mode in ("dense", "sparse"):
        secs = [r["seconds"] for r in history if r["mode"] == mode][1:]
        if secs:
            out[mode] = dict(steps=len(secs), tokens_per_s=tokens_per_step * len(secs) / sum(secs),
                             step_s=float(np.median(secs)))
    return out


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", choices=("cpu", "gpu"), default="cpu")
    # Defaults of None mean "the preset's value"; an explicit flag overrides the preset.
    p.add_argument("--steps", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--seq-len", type=int)
    p.add_argument("--warmup-steps", type=int, help="indexer warm-up: the first steps run mode='dense'")
    p.add_argument("--kl-weight", type=float, help="lambda of the KL index-alignment loss (default 1.0)")
    p.add_argument("--learning-rate", type=float)
    p.add_argument("--lr-warmup-steps", type=int)
    p.add_argument("--seed", type=int)
    p.add_argument("--dtype", choices=("float32", "bfloat16"))
    p.add_argument("--attention", choices=ATTENTIONS,
                   help="msa (default) or dense-cudnn: every layer dense GQA (cuDNN on GPU), the speed baseline")
    p.add_argument("--num-layers", type=int)
    p.add_argument("--top-k", type=int)
    p.add_argument("--block-size", type=int)
    p.add_argument("--implementation", help="msa_jax implementation (default: the fastest available)")
    p.add_argument("--ckpt-dir")
    p.add_argument("--ckpt-every", type=int, default=0, help="also save every N steps (0: only at the end)")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --ckpt-dir")
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--metrics-out", help="write the per-step history and the tokens/s summary here (JSON)")
    return p.parse_args(argv)


def configs_from_args(args) -> tuple[ModelConfig, TrainConfig]:
    """The preset with explicit flags applied; with --resume, the checkpoint's configs instead."""
    model_cfg, train_cfg = preset(args.preset)
    model_flags = dict(num_layers=args.num_layers, top_k=args.top_k, block_size=args.block_size,
                       implementation=args.implementation)
    train_flags = dict(steps=args.steps, batch_size=args.batch_size, seq_len=args.seq_len,
                       warmup_steps=args.warmup_steps, kl_weight=args.kl_weight, learning_rate=args.learning_rate,
                       lr_warmup_steps=args.lr_warmup_steps, seed=args.seed, dtype=args.dtype,
                       attention=args.attention)
    model_flags = {k: v for k, v in model_flags.items() if v is not None}
    train_flags = {k: v for k, v in train_flags.items() if v is not None}
    if args.resume and args.ckpt_dir and Checkpoints(args.ckpt_dir).latest_step() is not None:
        model_cfg, train_cfg = Checkpoints(args.ckpt_dir).configs()  # flags may only agree, or change steps
    else:
        train_flags.setdefault("lr_decay_steps", train_flags.get("steps", train_cfg.steps))
    if "num_layers" in model_flags:
        model_flags.setdefault("dense_layers", min(model_cfg.dense_layers, model_flags["num_layers"]))
    return dataclasses.replace(model_cfg, **model_flags), dataclasses.replace(train_cfg, **train_flags)


def main(argv=None):
    args = parse_args(argv)
    if args.resume and not args.ckpt_dir:
        raise SystemExit("--resume needs --ckpt-dir")
    model_cfg, train_cfg = configs_from_args(args)
    print(f"backend {jax.default_backend()} ({jax.devices()[0].device_kind}), attention {train_cfg.attention}, "
          f"{train_cfg.steps} steps ({train_cfg.warmup_steps} dense warm-up), batch {train_cfg.batch_size} x "
          f"seq {train_cfg.seq_len}, {train_cfg.dtype}", file=sys.stderr)
    print(f"model {model_cfg}", file=sys.stderr)
    result = train(model_cfg, train_cfg, ckpt_dir=args.ckpt_dir, ckpt_every=args.ckpt_every,
                   resume=args.resume, log_every=args.log_every)
    n_params = sum(x.size for x in jax.tree.leaves(nnx.state(result.model, nnx.Param)))
    summary = summarize(result.history, train_cfg.batch_size * train_cfg.seq_len)
    print(f"{n_params / 1e6:.2f}M parameters; compiled versions of the train step per mode: {result.traces}",
          file=sys.stderr)
    for mode, s in summary.items():
        print(f"{mode:>6}: {s['tokens_per_s']:,.0f} tokens/s, median step {s['step_s'] * 1e3:.1f} ms "
              f"over {s['steps']} steps (compile step excluded)", file=sys.stderr)
    if args.metrics_out:
        with open(args.metrics_out, "w") as f:
            # What a results file needs (gpu.md): device, versions, commit, the exact command.
            json.dump(dict(model=json.loads(model_cfg.to_json()), train=dataclasses.asdict(train_cfg),
                           backend=jax.default_backend(), device=jax.devices()[0].device_kind,
                           jax_version=jax.__version__, git_commit=os.environ.get("MSA_JAX_COMMIT", "unknown"),
                           date=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                           command=" ".join(["examples/flax_model/train.py", *(sys.argv[1:] if argv is None else argv)]),
                           traces=result.traces, summary=summary, history=result.history), f, indent=1)
    if result.step < train_cfg.steps:
        raise SystemExit(130)  # interrupted (Ctrl-C): what was done is saved


if __name__ == "__main__":
    main()
