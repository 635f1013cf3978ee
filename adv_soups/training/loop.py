"""The training loop: checkpoints (save / restore, exact resume), `train_and_evaluate` and the
workdir checks of a launch (`prepare_workdir`).

Re-running on an existing workdir resumes from its latest checkpoint. On SIGTERM every process
saves one checkpoint at the same step and `train_and_evaluate` returns with `preempted_at` set (the
programs then exit 75, `preemption.exit_preempted`); a finished run leaves WORKDIR/FINISHED.
"""
from __future__ import annotations

import dataclasses
import os
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from etils import epath
from absl import logging

from adv_soups import checkpoints as ckpt_lib
from adv_soups import memory as memory_lib
from adv_soups import data as data_lib
from adv_soups import disk_space, screen
from adv_soups import parallel, preemption as preemption_lib, workdir as workdir_lib
from adv_soups import threats as threats_lib
from adv_soups import writers as writers_lib
from adv_soups.evaluation import periodic
from adv_soups.models import create_model
from adv_soups.training.config import resolve_config
from adv_soups.training.state import TrainState, init_state, learning_rate_schedule, make_optimizer
from adv_soups.training.step import make_train_step


# ------------------------------------------------------------------------------------------------
# Checkpointing: orbax for the arrays, the input position (tf.data iterator or in-memory) beside it.

def data_state_dir(workdir: str, step: int) -> str:
  return os.path.join(workdir, "data_state", str(step))


def save_checkpoint(manager: ckpt_lib.Checkpoints, workdir: str, state: TrainState,
                    train_iter: data_lib.TrainIterator) -> int:
  """Saves the state and the input position at `state.step`; prunes stale data states."""
  step = int(state.step)
  train_iter.save(data_state_dir(workdir, step))
  manager.save(step, {"rng": np.asarray(state.rng).tolist(),
                      "batches_consumed": train_iter.batches_consumed},
               params=state.params, opt_state=state.opt_state, ema_params=state.ema_params)
  keep = {str(s) for s in manager.all_steps()}
  root = os.path.join(workdir, "data_state")
  if jax.process_index() == 0:
    for entry in epath.Path(root).iterdir():
      if entry.name not in keep:
        entry.rmtree()
  return step


def save_or_explain(manager: ckpt_lib.Checkpoints, workdir: str, state: TrainState,
                    train_iter: data_lib.TrainIterator) -> int:
  """`save_checkpoint`, where a failure for lack of space (`disk_space.is_out_of_space`: the
  error and the free space, never any error) becomes `disk_space.DiskFull` with its one line,
  after process 0 (the workdir's lock holder) removed the partial save. Other errors propagate
  unchanged, traceback and all."""
  last_good = manager.latest_step()
  try:
    return save_checkpoint(manager, workdir, state, train_iter)
  except Exception as e:  # pylint: disable=broad-except  (re-raised unless it is a full disk)
    needed = disk_space.tree_bytes((state.params, state.opt_state, state.ema_params))
    if not disk_space.is_out_of_space(e, workdir, needed):
      raise
    step = int(state.step)
    manager.wait_quietly()  # a background thread may still write the partial save
    if jax.process_index() == 0:
      disk_space.remove_partial_saves(ckpt_lib.checkpoint_dir(workdir))
      orphan = data_state_dir(workdir, step)
      if step != last_good and epath.Path(orphan).exists():
        epath.Path(orphan).rmtree()
    message = disk_space.save_failed_message(workdir, step, last_good, needed,
                                             disk_space.free_bytes(workdir))
    raise disk_space.DiskFull(message, step) from e


def restore_checkpoint(manager: ckpt_lib.Checkpoints, workdir: str, state: TrainState,
                       train_iter: data_lib.TrainIterator) -> TrainState | None:
  """The latest readable checkpoint's state (into `state`'s structure and shardings), with
  `train_iter` moved to the same position; None when no checkpoint is left. A damaged step
  (unreadable arrays or input-pipeline state) is moved aside with one warning line and the
  previous one is used (`Checkpoints.restore_latest_readable`)."""
  items = ("params", "opt_state") + (("ema_params",) if state.ema_params is not None else ())

  def restore(step):
    restored = manager.restore(step, targets={name: getattr(state, name) for name in items},
                               items=items)
    directory = data_state_dir(workdir, step)
    if not epath.Path(directory, f"process_{jax.process_index()}").exists():
      raise ckpt_lib.RestoreMismatch(
          f"step {step} has no input-pipeline state for process {jax.process_index()} in "
          f"{directory}: resume with the number of processes that saved it")
    train_iter.restore(directory)
    if train_iter.batches_consumed != restored["meta"]["batches_consumed"]:
      raise RuntimeError(f"input-pipeline state of step {step} is at batch "
                         f"{train_iter.batches_consumed}, expected "
                         f"{restored['meta']['batches_consumed']}")
    return restored

  found = manager.restore_latest_readable(restore, workdir)
  if found is None:
    return None
  step, restored = found
  meta = restored["meta"]
  rng = jax.device_put(np.asarray(meta["rng"], np.uint32), state.rng.sharding)
  return state.replace(step=jax.device_put(jnp.asarray(step, jnp.int32), state.step.sharding),
                       rng=rng, **{name: restored[name] for name in items})


# ------------------------------------------------------------------------------------------------
# The loop.

@dataclasses.dataclass
class TrainResult:
  """What `train_and_evaluate` returns: the final state and the last evaluation's metrics."""
  state: TrainState
  eval_metrics: dict[str, float]
  preempted_at: int | None = None  # the step saved on SIGTERM (the run is not finished)


def _check_finite(pending: list[tuple[int, dict]]) -> list[tuple[int, dict]]:
  """Fetches pending per-step metrics; raises FloatingPointError naming the first bad step."""
  fetched = [(step, jax.device_get(m)) for step, m in pending]
  for step, m in fetched:
    if not bool(m["finite"]):
      raise FloatingPointError(f"non-finite loss or gradient at step {step} (loss={m['loss']}, "
                               f"grad_norm={m['grad_norm']}); the last checkpoint is untouched")
  return fetched


def training_programs(config: Any, model: Any, train_step: Any, state: Any, mesh: Any,
                      workdir: str = "") -> list:
  """The train step (jitted `(state, batch) -> (state, metrics)`) compiled for `state` and a
  batch {'image' float32 [B, H, W, C], 'label' int32 [B]} sharded over `mesh`, then every
  periodic evaluation of `config.evals` compiled for the evaluated parameters (the rest of the
  train state stays resident meanwhile): the train step first."""
  import jax.numpy as jnp
  from adv_soups import parallel
  from adv_soups.data import mixup as mixup_lib
  size, channels = config.model.image_size, int(config.model.channels)
  batch_size = config.train.batch_size
  sharding = parallel.batch_sharding(mesh)
  batch = {"image": jax.ShapeDtypeStruct((batch_size, size, size, channels), jnp.float32,
                                         sharding=sharding),
           "label": jax.ShapeDtypeStruct((batch_size,), jnp.int32, sharding=sharding)}
  compiled = train_step.lower(state, batch).compile()
  state_bytes = memory_lib.tree_bytes(state)
  mix = config.data.get("mixup")
  programs = [memory_lib.Program(
      name=f"the train step ({config.train.mode}, {size} px)", compiled=compiled,
      field="config.train.batch_size", value=batch_size, fixed=state_bytes,
      multiple=jax.device_count() * (2 if mixup_lib.enabled(mix) else 1))]
  params = state.ema_params if state.ema_params is not None else state.params
  return programs + periodic.programs(config, model, params, workdir=workdir,
                                      resident=state_bytes - memory_lib.tree_bytes(params))


def check_training(config: Any, model: Any, train_step: Any, state: Any, mesh: Any,
                   workdir: str = "", available: int | None = None) -> Any:
  """`memory.check`s the `training_programs` (DoesNotFit: one line; warnings are logged) and returns
  the compiled train step: the loop runs it instead of `train_step` (no second compilation),
  and the periodic evaluations find theirs in the runner's cache."""
  programs = training_programs(config, model, train_step, state, mesh, workdir)
  for line in memory_lib.check(programs, available):
    logging.warning("%s", line)
  return programs[0].compiled


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                       mesh: jax.sharding.Mesh | None = None, *,
                       show_progress: bool = False,
                       on_checked: Any = None) -> TrainResult:
  """Trains per `config` (resolved or not) in `workdir`, resuming from its latest checkpoint.
  `show_progress`: process 0 shows `screen.TrainProgress` on stdout (a bar on a terminal, plain
  lines otherwise) and one line per periodic evaluation. A save that fails for lack of space
  raises `disk_space.DiskFull` (see `save_or_explain`). `on_checked()`, if given, is called once
  the programs are compiled and fit the device's memory, before anything is written."""
  config = resolve_config(config)
  mesh = mesh or parallel.make_mesh()
  train_cfg = config.train
  model = create_model(config.model)
  optimizer = make_optimizer(config.optimizer, train_cfg.steps, train_cfg.get("trainable", "all"))
  state = jax.device_put(init_state(config, model, optimizer), parallel.replicated(mesh))
  # Compiled ahead of time and checked against the device's memory before anything is written
  # (memory.DoesNotFit, one line); the loop runs this compiled object.
  train_step = check_training(config, model, make_train_step(config, model, optimizer,
                                                                         mesh), state, mesh, workdir)
  if on_checked is not None:
    on_checked()
  logging.info("Devices: %d x %s (%d per process)", jax.device_count(),
               jax.devices()[0].device_kind, jax.local_device_count())
  if jax.process_index() == 0:
    workdir_lib.save_config(workdir, config)
  train_iter = data_lib.train_iterator(config.data, global_batch_size=train_cfg.batch_size,
                                       seed=config.seed)
  manager = ckpt_lib.Checkpoints(workdir, max_to_keep=train_cfg.keep_checkpoints)
  if manager.latest_step() is not None:
    restored = restore_checkpoint(manager, workdir, state, train_iter)
    if restored is not None:
      state = restored
      logging.info("Resumed from step %d of %s", int(state.step), workdir)
    else:  # every checkpoint was damaged (kept aside): start afresh from an untouched iterator
      train_iter = data_lib.train_iterator(config.data, global_batch_size=train_cfg.batch_size,
                                           seed=config.seed)
  start = int(state.step)
  watch = preemption_lib.PreemptionWatch().start()  # SIGTERM -> save at one step, stop
  preempted_at = None

  writer = writers_lib.create_writer(workdir, just_logging=jax.process_index() > 0)
  if start == 0:
    writer.write_hparams(_flat_hparams(config))
  progress = writers_lib.progress_report(train_cfg.steps, writer, train_cfg.log_every)
  bar = screen.TrainProgress(train_cfg.steps, start,
                             enabled=show_progress and jax.process_index() == 0)
  if 0 < start < train_cfg.steps:
    bar.write(f"resumed from step {start} of {workdir}")
  pending: list[tuple[int, dict]] = []
  eval_metrics: dict[str, float] = {}
  t0, images_seen = time.time(), 0
  for step in range(start + 1, train_cfg.steps + 1):
    batch = parallel.shard_batch(mesh, next(train_iter))
    state, metrics = train_step(state, batch)
    pending.append((step, metrics))
    images_seen += train_cfg.batch_size
    progress(step)
    bar.update(step)
    last = step == train_cfg.steps
    preempted = watch.reached(step) and not last  # every step, on every process
    if step % train_cfg.log_every == 0 or last or len(pending) >= 10:
      fetched = _check_finite(pending)  # also paces dispatch (XLA:CPU collectives on jax 0.10)
      pending = []
      if step % train_cfg.log_every == 0 or last:
        summary = {k: float(np.mean([m[k] for _, m in fetched])) for k in fetched[-1][1]
                   if k != "finite"}
        summary["learning_rate"] = float(learning_rate_schedule(config.optimizer,
                                                                train_cfg.steps)(step - 1))
        summary["images_per_sec"] = images_seen / (time.time() - t0)
        writer.write_scalars(step, summary)
        bar.metrics(step, summary)
        t0, images_seen = time.time(), 0
    due = periodic.due(config, step, last)
    do_eval = bool(due)
    do_save = (train_cfg.checkpoint_every and step % train_cfg.checkpoint_every == 0) or last
    bar.pause()  # steps/s excludes evaluation and checkpointing
    if do_save or preempted:  # before evaluating: a failed evaluation must not cost the save
      _check_finite(pending)  # never save a non-finite state
      try:
        save_or_explain(manager, workdir, state, train_iter)
      except disk_space.DiskFull:
        bar.close()
        watch.close()
        raise
    if preempted:
      preempted_at = step
      break
    if do_eval:
      eval_metrics = periodic.evaluate(config, model, _eval_params(state), step, due, workdir)
      writer.write_scalars(step, eval_metrics)
      bar.write(screen.format_eval(step, eval_metrics))
    bar.resume()
    if do_eval or do_save:
      t0, images_seen = time.time(), 0  # throughput excludes evaluation and checkpointing
  if start >= train_cfg.steps:  # a finished run: report its evaluation again
    logging.info("%s is already trained to step %d", workdir, start)
    bar.write(f"{workdir} is already trained to step {start}: evaluating it again")
    eval_metrics = periodic.evaluate(config, model, _eval_params(state), start, None, workdir)
  bar.close()
  watch.close()
  if preempted_at is None and jax.process_index() == 0:
    preemption_lib.write_finished(workdir, train_cfg.steps)
  writer.flush()
  manager.close()
  return TrainResult(state=state, eval_metrics=eval_metrics, preempted_at=preempted_at)


def _eval_params(state: TrainState) -> Any:
  return state.ema_params if state.ema_params is not None else state.params


def _flat_hparams(config: ml_collections.ConfigDict) -> dict[str, Any]:
  flat = {}

  def walk(prefix, value):
    if isinstance(value, dict):
      for k, v in value.items():
        walk(f"{prefix}{k}.", v)
    else:
      flat[prefix[:-1]] = value if isinstance(value, (int, float, str, bool)) else str(value)

  walk("", config.to_dict())
  return flat


# ------------------------------------------------------------------------------------------------
# Workdir checks.

def prepare_workdir(config: ml_collections.ConfigDict, workdir: str, overwrite: bool) -> None:
  """With `overwrite`, moves an earlier run aside (never deletes it; process 0 moves, the others
  wait); else checks that an earlier run in `workdir` has the same resolved config, so re-running
  resumes it: fields that leave the trajectory alone (`workdir_lib.TRAJECTORY_NEUTRAL`) may
  differ, with one line saying which; any other difference is a ValueError naming them."""
  if overwrite:
    if jax.process_index() == 0:
      moved = workdir_lib.move_aside(workdir)
      if moved:
        print(f"moved the previous run aside to {moved}", file=sys.stderr)
    parallel.barrier("adv_soups.train moved the previous run aside")
  elif epath.Path(os.path.join(workdir, workdir_lib.CONFIG_FILE)).exists():
    # Both spelt one way first: an old workdir (no `threats`) resumes under today's schema.
    saved = threats_lib.canonical(workdir_lib.config_to_dict(workdir_lib.load_config(workdir)))
    allowed, refused = workdir_lib.resume_differences(
        saved, threats_lib.canonical(workdir_lib.config_to_dict(config)))
    if refused:
      raise ValueError(f"{workdir} holds a run with a different config ({'; '.join(refused)}); "
                       "resume with the same config, use a new --workdir, or pass --overwrite")
    if allowed and jax.process_index() == 0:
      print(f"resuming {workdir} with changed fields that leave its trajectory alone: "
            f"{'; '.join(allowed)}", file=sys.stderr)
