"""The one training loop: init sharded state, restore if a checkpoint exists, step, evaluate, checkpoint,
write the run record (``docs/interfaces.md``, "Run directory contract").

``train(cfg, workdir, progress=True) -> summary dict``. The schedule's horizon is the run's own: ``steps =
cfg.train.steps`` or ``cfg.train.tokens // (batch * (enc_len + dec_len))``. Metrics are fetched one step
late so the device never waits on the host.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import signal
import statistics
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils
from tqdm import tqdm

from medscale import accounting, hardware, rundir
from medscale.configs import spec_from_config
from medscale.data.pipeline import build_data
from medscale.errors import UserError
from medscale.model.attention import IMPLEMENTATIONS
from medscale.model.encdec import DTYPES, REMAT_POLICIES
from medscale.model.sharding import make_mesh, maybe_initialize_distributed, process_rows, resolve_mesh_shape
from medscale.train.metrics import MetricWriter
from medscale.train.step import LossScale, OptConfig, build, schedule_hyperparams

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------- files
def _finite_or_none(x):
    return None if x is None or not math.isfinite(x) else float(x)


# ---------------------------------------------------------------------------------------------- time
_COMPILE_S = [0.0]  # seconds this process spent tracing, lowering and compiling (JAX's compile events)


def _count_compile(event: str, duration: float, **_):
    if event.startswith("/jax/core/compile/"):
        _COMPILE_S[0] += duration


jax.monitoring.register_event_duration_secs_listener(_count_compile)

TIME_PARTS = ("startup_s", "compile_s", "train_s", "eval_s", "checkpoint_s", "task_eval_s")


class Clock:
    """A run's wall time split by part (the summary's ``time``): :meth:`to` charges the seconds since the last
    call to ``part``, less the compilation inside them, which goes to ``compile_s``."""

    def __init__(self):
        self.parts = dict.fromkeys(TIME_PARTS, 0.0)
        self.t, self.c = time.perf_counter(), _COMPILE_S[0]

    def to(self, part: str) -> None:
        now, c = time.perf_counter(), _COMPILE_S[0]
        dc = c - self.c
        self.parts["compile_s"] += dc
        self.parts[part] += max(0.0, now - self.t - dc)
        self.t, self.c = now, c


KILL_POINTS = ("after_last_eval", "after_last_checkpoint", "before_summary")


def test_kill(point: str, step: int | None = None) -> None:
    """Test hook: SIGKILL this process at a named point of a run, as a power cut would.

    ``MEDSCALE_TEST_KILL_AT`` names the point: one of :data:`KILL_POINTS` or ``step:N`` (after step N's
    metrics are handled, between checkpoints). ``MEDSCALE_TEST_KILL_PARENT=1`` first kills the parent process
    (a sweep launcher, whose workers then die with it). ``MEDSCALE_TEST_KILL_ONCE=FILE`` fires only while FILE
    does not exist, and creates it when firing, so a relaunch with the same environment goes through.
    ``MEDSCALE_TEST_KILL_PROCESS=I``: only process I of a multi-process run fires (a node dying). Unset (the
    default), nothing happens."""
    want = os.environ.get("MEDSCALE_TEST_KILL_AT")
    if not want or (want != point and want != f"{point}:{step}"):
        return
    only = os.environ.get("MEDSCALE_TEST_KILL_PROCESS", "")
    if only and int(only) != jax.process_index():
        return
    once = os.environ.get("MEDSCALE_TEST_KILL_ONCE")
    if once:
        try:
            os.close(os.open(once, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            return
    log.warning("test hook: SIGKILL at %s", want)
    if os.environ.get("MEDSCALE_TEST_KILL_PARENT") == "1":
        os.kill(os.getppid(), signal.SIGKILL)
    os.kill(os.getpid(), signal.SIGKILL)


# ---------------------------------------------------------------------------------------------- config
def run_length(cfg) -> int:
    """Number of steps of a run: ``train.steps`` when set, else its token budget over tokens per step."""
    t = cfg.train
    if t.get("steps"):
        steps = int(t.steps)
    else:
        steps = int(t.tokens) // (int(t.batch_size) * (int(cfg.data.enc_len) + int(cfg.data.dec_len)))
    if steps < 1:
        raise UserError(f"train.tokens {t.tokens} is less than one step of batch {t.batch_size} x "
                        f"{cfg.data.enc_len}+{cfg.data.dec_len} tokens; raise train.tokens or set train.steps")
    return steps


def validate(cfg, n_devices: int | None = None):
    """Check a config before anything is written; returns (spec, mesh_shape, steps). UserError otherwise."""
    spec = spec_from_config(cfg)  # heads / d_model and the modalities
    n_devices = n_devices or jax.device_count()
    shape = resolve_mesh_shape(cfg.mesh.shape, n_devices)
    dp = shape[0] * shape[1]
    bs = int(cfg.train.batch_size)
    if bs <= 0 or bs % dp:
        raise UserError(f"train.batch_size {bs} is not divisible by the data axes (data x fsdp = {dp}) of "
                        f"mesh {shape}; change train.batch_size or mesh.shape")
    mb = int(cfg.train.get("microbatches", 1))
    if mb < 1:
        raise UserError(f"train.microbatches must be positive, not {mb}")
    if bs % (mb * dp):
        raise UserError(f"train.batch_size {bs} is not divisible by train.microbatches x the data axes "
                        f"({mb} x {dp} = {mb * dp}); change train.batch_size, train.microbatches or mesh.shape")
    if bs % jax.process_count():
        raise UserError(f"train.batch_size {bs} is not divisible by the {jax.process_count()} processes")
    ebs = eval_batch_size(cfg)
    if ebs <= 0 or ebs % dp or ebs % jax.process_count():
        raise UserError(f"train.eval_batch_size {ebs} is not divisible by the data axes (data x fsdp = {dp}) "
                        f"and the {jax.process_count()} processes; change train.eval_batch_size")
    if cfg.model.dtype not in DTYPES:
        raise UserError(f"model.dtype must be one of {', '.join(DTYPES)}, not {cfg.model.dtype!r}")
    hardware.check_compute_dtype(cfg.get("hardware", "auto"), cfg.model.dtype)  # e.g. bfloat16 on a V100
    if cfg.model.remat not in REMAT_POLICIES:
        raise UserError(f"model.remat must be one of {', '.join(REMAT_POLICIES)}, not {cfg.model.remat!r}")
    if cfg.model.attention not in IMPLEMENTATIONS:
        raise UserError(f"model.attention {cfg.model.attention!r} is not available; known: "
                        f"{', '.join(IMPLEMENTATIONS)}")
    for key in ("eval_every", "ckpt_every", "log_every"):
        if int(cfg.train[key]) <= 0:
            raise UserError(f"train.{key} must be positive")
    if not cfg.train.lr > 0:
        raise UserError("train.lr must be positive")
    if cfg.model.dtype == "float16":
        ls = loss_scale_config(cfg)
        if not (math.isfinite(ls.init) and ls.init >= 1):
            raise UserError(f"train.loss_scale_init must be a finite number >= 1, not {ls.init}")
        if not (math.isfinite(ls.factor) and ls.factor > 1):
            raise UserError(f"train.loss_scale_factor must be a finite number > 1, not {ls.factor}")
        if ls.period < 1:
            raise UserError(f"train.loss_scale_period must be positive, not {ls.period}")
    return spec, shape, run_length(cfg)


def eval_batch_size(cfg) -> int:
    """Examples per evaluation batch: ``train.eval_batch_size``, or the training batch when it is 0."""
    return int(cfg.train.get("eval_batch_size", 0) or 0) or int(cfg.train.batch_size)


def loss_scale_config(cfg) -> LossScale:
    """The dynamic loss scaling of a float16 run from ``train.loss_scale_*`` (defaults: :class:`LossScale`)."""
    t, d = cfg.train, LossScale()
    return LossScale(init=float(t.get("loss_scale_init", d.init)), factor=float(t.get("loss_scale_factor", d.factor)),
                     period=int(t.get("loss_scale_period", d.period)))


def opt_config(cfg, steps: int):
    t = cfg.train
    return OptConfig(lr=float(t.lr), warmup_steps=int(t.warmup_steps), total_steps=steps,
                     final_lr_ratio=float(t.final_lr_ratio), weight_decay=float(t.weight_decay),
                     b1=float(t.b1), b2=float(t.b2), clip_norm=float(t.clip_norm))


# ---------------------------------------------------------------------------------------------- accounting
def _accounting(spec, cfg):
    """(params dict, model_flops/step, hardware_flops/step) from medscale.accounting (None when absent)."""
    params = accounting.param_counts(spec)
    opts = {"remat": cfg.model.remat, "attention": cfg.model.attention}
    if cfg.model.attention == "local":
        opts["window"] = int(cfg.model.attention_window)
    f = accounting.step_flops(spec, int(cfg.train.batch_size), **opts)
    return params, float(f["model_flops"]), float(f["hardware_flops"])


def _peak(cfg):
    """(hardware name, peak FLOP/s per device) from medscale.hardware; (name, None) when unknown."""
    name, peak = hardware.device_peak(cfg.get("hardware", "auto"), cfg.model.dtype)
    if peak is None:
        log.warning("no peak FLOP/s for %s (%s, %s): MFU will be null", jax.devices()[0].device_kind, name,
                    cfg.model.dtype)
    return name, peak


# ---------------------------------------------------------------------------------------------- metrics
def _modality_losses(names, sums, counts) -> dict:
    out = {}
    for name, s, c in zip(names, sums, counts):
        out[name] = float(s) / float(c) if c > 0 else None
    return out


# ---------------------------------------------------------------------------------------------- train
def train(cfg, workdir: str, progress: bool = True, data=None, finish=None, locked: bool = False,
          cache: dict | None = None) -> dict:
    """Run (or resume) one training run in ``workdir``; returns the summary (also in summary.json).

    ``finish(workdir, data) -> dict``, when given, runs after a run that finished (status done), before the
    summary is written; the keys it returns are added to the summary (the end-of-run task evaluation:
    ``medscale.generate.evaluate.task_eval``). A failure inside it is the caller's to record.
    The run's lock (``rundir.RunLock``) is taken for the run's duration unless ``locked`` says the caller (a
    sweep launcher) already holds it; a run locked by a live process is a UserError. ``cache``, when given, is a
    dict kept by the caller between runs (a sweep worker): the compiled programs (keyed by everything
    ``medscale.train.step.build`` depends on; the schedule is in the train state) and the data (keyed by the data
    config and the sequence lengths) are built once and reused."""
    maybe_initialize_distributed()
    spec, mesh_shape, steps = validate(cfg)
    os.makedirs(workdir, exist_ok=True)
    summary = rundir.read_summary(workdir)
    if _agree(summary is not None):  # process 0's view decides, so every process takes the same path
        summary = summary if summary is not None else rundir.read_summary(workdir)
        log.info("%s already has a summary; not training again", workdir)
        return summary
    cfg_dict = json.loads(json.dumps(cfg.to_dict(), default=rundir.json_default))
    old = rundir.read_config(workdir)
    if old is not None and old != cfg_dict:
        changed = sorted(k for k in set(old) | set(cfg_dict) if old.get(k) != cfg_dict.get(k))
        raise UserError(f"{workdir} holds a run with a different config (differs in {', '.join(changed)}); "
                        "use another --workdir or the same config")
    is_main = jax.process_index() == 0
    lock = None
    if not locked:
        lock = rundir.RunLock(workdir)
        if not _agree(lock.acquire() if is_main else True):  # only process 0 holds the run's lock
            raise UserError(f"{workdir} is being trained by {lock.holder()} ({rundir.LOCK}); wait for it or "
                            "use another --workdir")
        lock = lock if is_main else None
    try:
        return _train_locked(cfg, workdir, progress, data, finish, spec, mesh_shape, steps, cfg_dict, is_main,
                             cache)
    finally:
        if lock is not None:
            lock.release()


def _agree(flag: bool) -> bool:
    """Process 0's ``flag``, on every process of a multi-process run (``flag`` itself in a single process)."""
    if jax.process_count() == 1:
        return bool(flag)
    return bool(multihost_utils.broadcast_one_to_all(np.int32(bool(flag))))


def _train_locked(cfg, workdir, progress, data, finish, spec, mesh_shape, steps, cfg_dict, is_main, cache=None):
    if is_main:
        rundir.write_json(rundir.path(workdir, rundir.CONFIG), cfg_dict)
    t_start = time.time()
    state = {"clock": Clock()}
    tb_dir = rundir.path(workdir, rundir.TENSORBOARD) if os.environ.get("MEDSCALE_TENSORBOARD", "1") != "0" else None
    writer = MetricWriter(rundir.path(workdir, rundir.METRICS), tb_dir, enabled=is_main)
    record = {"status": "failed", "error": None}
    try:
        result = _train(cfg, workdir, spec, mesh_shape, steps, progress, data, writer, record, state, cache)
    except BaseException as exc:
        if isinstance(exc, (UserError, KeyboardInterrupt)):
            writer.close()
            raise
        record["error"] = f"{type(exc).__name__}: {exc}"
        if is_main:
            _write_summary(cfg, cfg_dict, workdir, spec, steps, state, record, t_start)
        writer.close()
        raise
    writer.close()
    if is_main and result.get("status") == "done" and finish is not None:
        state["wall_end"] = time.time()  # wall_s is the training's; the evaluation's time is in task_eval
        state["clock"].to("checkpoint_s")
        state["extra"] = finish(workdir, state.get("data")) or {}
        state["clock"].to("task_eval_s")
    test_kill("before_summary")
    # every process returns the run's summary; only process 0 writes it
    return _write_summary(cfg, cfg_dict, workdir, spec, steps, state, result, t_start, write=is_main)


def _cached(cache, kind, key, make, keep: int = 16):
    """``make()``, or the value kept in ``cache[kind]`` under ``key`` (the ``keep`` latest kept)."""
    if cache is None:
        return make()
    store = cache.setdefault(kind, {})
    if key in store:
        store[key] = store.pop(key)  # most recently used last
        return store[key]
    value = store[key] = make()
    while len(store) > keep:
        store.pop(next(iter(store)))
    return value


def _train(cfg, workdir, spec, mesh_shape, steps, progress, data, writer, record, state, cache=None):
    rules = tuple(tuple(r) for r in cfg.mesh.rules)
    opts = {"dtype": cfg.model.dtype, "remat": cfg.model.remat, "attention": cfg.model.attention,
            "attention_block": int(cfg.model.attention_block), "attention_window": int(cfg.model.attention_window),
            "microbatches": int(cfg.train.get("microbatches", 1)), "loss_scale": loss_scale_config(cfg)}
    oc = opt_config(cfg, steps)
    # the schedule's numbers (peak rate, warmup, length) are in the train state, not in the programs
    compiled_opt = dataclasses.replace(oc, lr=0.0, warmup_steps=0, total_steps=0, final_lr_ratio=0.0)
    prog = _cached(cache, "programs", repr((spec, tuple(mesh_shape), rules, sorted(opts.items()), compiled_opt)),
                   lambda: build(spec, oc, mesh=make_mesh(mesh_shape), rules=rules, **opts))
    bs = int(cfg.train.batch_size)
    tokens_per_step = bs * (spec.enc_len + spec.dec_len)
    params, model_flops, hw_flops = _accounting(spec, cfg)
    hw_name, peak = _peak(cfg)
    n_dev = jax.device_count()
    state.update(params=params, model_flops=model_flops, hardware_flops=hw_flops, hardware=hw_name,
                 device_kind=jax.devices()[0].device_kind, device_count=n_dev, tokens_per_step=tokens_per_step)
    names = [m.name for m in spec.modalities]

    if data is None:
        data_key = json.dumps([cfg.data.to_dict(), spec.enc_len, spec.dec_len, repr(spec.modalities)],
                              sort_keys=True, default=rundir.json_default)
        data = _cached(cache, "data", data_key, lambda: build_data(cfg, spec), keep=2)
    state["data"] = data  # reused by the task evaluation at the end of the run
    seed = int(cfg.seed)
    # The data of a run does not depend on how many processes train it: every process reads the whole global
    # batch (one stream, one masking) and feeds its devices its own rows, so a run on N processes sees the
    # examples a single process would, and a checkpoint's iterator state restores on any number of processes.
    it = data.iterator("train", bs, seed, 0, 1)
    rows = process_rows(prog.batch_sharding, bs)
    ebs = eval_batch_size(cfg)
    eval_rows = process_rows(prog.batch_sharding, ebs)
    eval_host = [_rows(b, eval_rows) for b in data.eval_batches("validation", ebs, int(cfg.train.eval_batches))]
    state["caption_floor"] = data.caption_entropy_floor("validation", ebs, int(cfg.train.eval_batches))
    fixed_ref = int(cfg.train.get("fixed_eval_enc_len", 0) or 0)
    fixed_host = list(data.fixed_eval_batches(fixed_ref, "validation", ebs, int(cfg.train.eval_batches))) \
        if fixed_ref > 0 else []
    if fixed_ref > 0:
        state["fixed_eval"] = {"ref_enc_len": fixed_ref, "enc_len": spec.enc_len, "dec_len": spec.dec_len,
                               "examples": ebs * int(cfg.train.eval_batches) * jax.process_count(),
                               "split": "validation"}

    mgr = rundir.checkpoint_manager(workdir)
    start = 0
    latest = mgr.latest_step()
    if latest is not None:
        restored = mgr.restore(latest, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(prog.abstract_state), data=ocp.args.JsonRestore()))
        train_state = restored["state"]
        it.set_state(restored["data"])
        start = int(latest)
        log.info("resumed from step %d", start)
    else:
        train_state = prog.init(seed, schedule_hyperparams(oc))
    # rows an earlier attempt logged after its last checkpoint are dropped: this attempt writes them again
    kept = writer.rewind(start)
    writer.begin(start, prog.abstract_state["params"])

    clock = state["clock"]

    def save(step):
        if step in mgr.all_steps():
            return
        clock.to("train_s")
        writer.flush()  # the metrics up to a checkpoint are on disk before it exists
        mgr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(train_state),
                                                data=ocp.args.JsonSave(it.get_state())))
        mgr.wait_until_finished()
        clock.to("checkpoint_s")

    def score(batches):
        sums = np.zeros(len(names))
        counts = np.zeros(len(names))
        for b in batches:
            out = jax.device_get(prog.eval(train_state["params"], prog.put_batch(b)))
            sums += np.asarray(out["sum"], np.float64)
            counts += np.asarray(out["count"], np.float64)
        return float(sums.sum() / max(counts.sum(), 1.0)), _modality_losses(names, sums, counts)

    def evaluate(step):
        clock.to("train_s")
        loss, by_mod = score(eval_host)
        row = {"kind": "eval", "step": step, "tokens": step * tokens_per_step,
               "flops": None if model_flops is None else step * model_flops, "loss": loss}
        for name, v in by_mod.items():
            row[f"loss/{name}"] = v
        if fixed_host:  # the length-independent evaluation: the same targets at every encoder length
            fixed, fixed_by_mod = score(fixed_host)
            row["fixed_loss"] = fixed
            for name, v in fixed_by_mod.items():
                row[f"fixed_loss/{name}"] = v
        writer.write(row)
        state["final_eval"] = row
        clock.to("eval_s")
        return row

    bar = None
    if progress and jax.process_index() == 0:
        bar = tqdm(total=steps, initial=start, desc="train", unit="step", dynamic_ncols=True, leave=False)

    spike = float(cfg.train.spike_factor)
    warmup = int(cfg.train.warmup_steps)
    log_every = int(cfg.train.log_every)
    eval_every = int(cfg.train.eval_every)
    ckpt_every = int(cfg.train.ckpt_every)
    running_min = math.inf
    status = "done"
    pending = None  # (step, metrics on device) fetched one step late
    last_t = None
    compiled_steps = 0
    step_times = []

    def handle(step, metrics, t_now):
        """Host side of a finished step: metrics row, divergence check. Returns False to stop."""
        nonlocal running_min, status, last_t, compiled_steps
        m = jax.device_get(metrics)
        loss = float(m["loss"])
        step_s = (t_now - last_t) if (last_t is not None and compiled_steps > 0) else None
        compiled_steps += 1
        last_t = t_now
        if step_s is not None:
            step_times.append(step_s)
        by_mod = _modality_losses(names, m["sum"], m["count"])
        state["final_train"] = {"step": step, "loss": loss, "by_modality": by_mod}
        scaled = "loss_scale" in m
        if scaled:  # the scale after this step's update, the steps skipped so far (this one included)
            scale, skipped = float(m["loss_scale"]), int(m["skipped_steps"])
            state["loss_scale"], state["skipped_steps"] = scale, skipped
        collapsed = scaled and scale < 1
        if step % log_every == 0 or step == steps or not math.isfinite(loss) or collapsed:
            tps = tokens_per_step / step_s if step_s else None
            tflops = model_flops / step_s / n_dev / 1e12 if (step_s and model_flops) else None
            row = {"kind": "train", "step": step, "tokens": step * tokens_per_step,
                   "flops": None if model_flops is None else step * model_flops,
                   "loss": _finite_or_none(loss), "lr": float(m["lr"]), "grad_norm": _finite_or_none(float(m["grad_norm"])),
                   "step_s": step_s, "tokens_per_s": tps, "tflops_per_device": tflops,
                   "mfu": (tflops * 1e12 / peak) if (tflops and peak) else None}
            for name, v in by_mod.items():
                row[f"loss/{name}"] = v
            if scaled:
                row["loss_scale"], row["skipped_steps"] = scale, skipped
            writer.write(row)
        if bar is not None:
            bar.update(step - bar.n)
            bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{tokens_per_step / step_s:.0f}" if step_s else "-")
        if not math.isfinite(loss):
            status = "diverged"
            record["error"] = f"loss is {loss} at step {step}"
            return False
        if collapsed:
            status = "diverged"
            record["error"] = (f"float16 loss scale collapsed below 1 at step {step} ({skipped} skipped steps): "
                               "the gradient is not finite in float16 even unscaled; lower train.lr or train "
                               "in bfloat16 or float32")
            return False
        if step > warmup and loss > spike * running_min:
            status = "diverged"
            record["error"] = f"loss spike at step {step}: {loss:.4g} > {spike} x running minimum {running_min:.4g}"
            return False
        if step > warmup:
            running_min = min(running_min, loss)
        return True

    ok = True
    step = start
    finished = start >= steps  # an earlier attempt trained, evaluated and checkpointed it all
    if finished:
        _final_rows_from_metrics(kept, steps, names, state)
    clock.to("startup_s")
    while step < steps and ok:
        batch = prog.put_batch(_rows(next(it), rows))
        train_state, metrics = prog.step(train_state, batch)
        step += 1
        if pending is not None:
            jax.block_until_ready(pending[1])
            ok = handle(pending[0], pending[1], time.time())
            test_kill("step", pending[0])
        pending = (step, metrics)
        if not ok:
            break
        if step % ckpt_every == 0 or step % eval_every == 0:
            jax.block_until_ready(metrics)
            ok = handle(*pending, time.time())
            pending = None
            last_t = None  # the eval/checkpoint time is not a step time
            if not ok:
                break
            if step % eval_every == 0 and step != steps:
                evaluate(step)
            if step % ckpt_every == 0:
                save(step)
    if pending is not None and ok:
        jax.block_until_ready(pending[1])
        ok = handle(pending[0], pending[1], time.time())
    clock.to("train_s")
    if bar is not None:
        bar.close()
    if ok and not (finished and "final_eval" in state):
        evaluate(step)
        test_kill("after_last_eval")
    if ok and not finished:
        save(step)
        test_kill("after_last_checkpoint")
    mgr.close()
    clock.to("checkpoint_s")
    state["steps_done"] = step
    state["step_times"] = step_times
    state["peak"] = peak
    record["status"] = status
    return record


def _rows(batch: dict, rows: slice) -> dict:
    """This process's rows of a global host batch."""
    if rows.start == 0 and rows.stop == len(next(iter(batch.values()))):
        return batch
    return {k: v[rows] for k, v in batch.items()}


def _final_rows_from_metrics(rows, steps, names, state):
    """The final train and eval rows of a run whose last checkpoint is its last step (killed after it,
    before its summary): taken from its metrics.jsonl rather than evaluated and logged a second time."""
    for row in rows:
        if row.get("step") != steps:
            continue
        if row.get("kind") == "train":
            state["final_train"] = {"step": steps, "loss": row.get("loss"),
                                    "by_modality": {n: row.get(f"loss/{n}") for n in names}}
            if "loss_scale" in row:  # a float16 run: its scale state as the summary reports it
                state["loss_scale"], state["skipped_steps"] = row["loss_scale"], row.get("skipped_steps")
        elif row.get("kind") == "eval":
            state["final_eval"] = row
    state["logged_step_times"] = [r["step_s"] for r in rows if r.get("kind") == "train" and r.get("step_s")]


def _data_record(cfg, state, steps_done):
    """The summary's ``data``: source, distinct training examples, epochs, caption entropy floor (docs/data.md)."""
    data = state.get("data")
    if data is None:
        return None
    return data.record(int(steps_done) * int(cfg.train.batch_size), 1, state.get("caption_floor"))


def _write_summary(cfg, cfg_dict, workdir, spec, steps, state, record, t_start, write: bool = True):
    step_done = state.get("steps_done", state.get("final_train", {}).get("step", 0)) or 0
    tps = state.get("tokens_per_step") or spec.dec_len
    model_flops = state.get("model_flops")
    hw_flops = state.get("hardware_flops")
    times = state.get("step_times") or state.get("logged_step_times") or []
    step_s = statistics.median(times) if times else None
    peak = state.get("peak")
    mfu = (model_flops / step_s / (state.get("device_count") or 1) / peak) if (model_flops and step_s and peak) \
        else None
    train_row = state.get("final_train") or {}
    eval_row = state.get("final_eval") or {}
    names = [m.name for m in spec.modalities]
    summary = {
        "run_id": os.path.basename(os.path.abspath(workdir)),
        "sweep": os.path.basename(os.path.dirname(os.path.abspath(workdir))),
        "status": record.get("status", "failed"), "error": record.get("error"),
        "config": cfg_dict, "size": spec.name, "params": state.get("params"),
        "enc_len": spec.enc_len, "dec_len": spec.dec_len, "batch_size": int(cfg.train.batch_size),
        "steps": int(step_done), "planned_steps": int(steps), "tokens": int(step_done) * int(tps),
        "model_flops": None if model_flops is None else model_flops * step_done,
        "hardware_flops": None if hw_flops is None else hw_flops * step_done,
        "xla_flops": None,
        "pf_days": None if model_flops is None else model_flops * step_done / hardware.PF_DAY,
        "wall_s": state.get("wall_end", time.time()) - t_start, "step_s": step_s,
        "device_kind": state.get("device_kind") or jax.devices()[0].device_kind,
        "device_count": state.get("device_count") or jax.device_count(),
        "hardware": state.get("hardware"), "mfu": mfu,
        "peak_flops": peak, "time": {k: round(v, 3) for k, v in state["clock"].parts.items()} if "clock" in state else None,
        "final_train_loss": _finite_or_none(train_row.get("loss")),
        "final_eval_loss": _finite_or_none(eval_row.get("loss")),
        "final_train_loss_by_modality": {n: (train_row.get("by_modality") or {}).get(n) for n in names},
        "final_eval_loss_by_modality": {n: eval_row.get(f"loss/{n}") for n in names},
        # the length-independent evaluation (train.fixed_eval_enc_len > 0; docs/longseq.md)
        "final_fixed_eval_loss": _finite_or_none(eval_row.get("fixed_loss")),
        "final_fixed_eval_loss_by_modality": {n: eval_row.get(f"fixed_loss/{n}") for n in names}
        if "fixed_loss" in eval_row else None,
        "fixed_eval": state.get("fixed_eval"),
        "task_metrics": {},
        "loss_scale": state.get("loss_scale"), "skipped_steps": state.get("skipped_steps"),
        "data": _data_record(cfg, state, step_done),
    }
    summary.update(state.get("extra") or {})
    if write:
        rundir.write_json(rundir.path(workdir, rundir.SUMMARY), summary)
    return summary
