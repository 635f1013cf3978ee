"""The evaluation engine: FAB's within-eps rule in the runner, resumable reports, the smallest
batch, the periodic evaluation of `config.evals`, and the gradient-masking warnings recorded in
every report."""
import os

import jax.numpy as jnp
import numpy as np
import pytest

from adv_soups import evaluate, loading, sweep, training
from adv_soups.attacks import checks, robust_accuracy
from adv_soups.evaluation import engine, periodic, requests, run
from conftest import tiny_digits_config


# ------------------------------------------------------------------------------------------------
# FAB-T in the runner: a point counts as broken only when misclassified *and* within eps.

def _linear_two_class(margin):
  """logits = [0, w.x - margin] on 4x4x1 images: class 1 wins once sum(x) exceeds `margin`; at
  x = 0.25 everywhere the l_inf distance to the boundary is (margin - 4) / 16."""
  def fn(images):
    s = jnp.sum(images.reshape(images.shape[0], -1), -1)
    return jnp.stack([jnp.zeros_like(s), s - margin], -1)
  return fn


@pytest.mark.parametrize("eps,broken", [(0.1, False), (0.3, True)])
def test_fab_point_outside_eps_counts_as_robust(eps, broken):
  """The minimal boundary distance is 0.125 in l_inf: FAB finds a misclassified point there,
  which breaks the example at eps 0.3 but not at eps 0.1. (Mutation: drop the within-eps test
  from the runner's FAB stage, and the eps-0.1 case reports the point broken.)"""
  fn = _linear_two_class(margin=6.0)
  images = np.full((8, 4, 4, 1), 0.25, np.float32)
  labels = np.zeros(8, np.int32)
  result = robust_accuracy(fn, [dict(image=images, label=labels)], eps=eps, attacks=("fab-t",),
                           num_steps=20)
  assert result.clean_accuracy == 1.0
  assert result.robust_accuracy == (0.0 if broken else 1.0)


# ------------------------------------------------------------------------------------------------
# Long evaluations resume where they stopped.

def test_interrupted_evaluation_resumes_with_the_same_numbers(workdir_copy, monkeypatch):
  """Kill a sweep after two saved chunks; the relaunch evaluates only the rest and its report
  equals an uninterrupted run's. (Mutation: skip no batches on resume, or restart the example
  keys at 0, and the numbers or the work done differ.)"""
  kwargs = dict(attack="apgd-ce", steps=2, num_examples=40, batch_size=24, progress=False,
                save_every=1, checks=False)  # 8 examples per data batch, a chunk per batch
  reference = sweep.run_sweep(workdir_copy, "0:1:3", out_dir=os.path.join(workdir_copy, "ref"),
                              **kwargs)  # the same chunks, uninterrupted
  original = requests.Request.batches
  seen = []

  def counting(self, *a, **k):
    for i, batch in enumerate(original(self, *a, **k)):
      seen.append(i)
      if len(seen) == 3 and os.environ.get("KILL_EVAL") == "1":
        raise KeyboardInterrupt("killed")
      yield batch
  monkeypatch.setattr(requests.Request, "batches", counting)
  monkeypatch.setenv("KILL_EVAL", "1")
  with pytest.raises(KeyboardInterrupt):
    sweep.run_sweep(workdir_copy, "0:1:3", **kwargs)
  partial = [d for d in os.listdir(os.path.join(workdir_copy, "sweep")) if d.endswith(".partial")]
  assert len(partial) == 1
  assert len(os.listdir(os.path.join(workdir_copy, "sweep", partial[0]))) == 2  # 2 chunks saved
  monkeypatch.setenv("KILL_EVAL", "0")
  seen.clear()
  resumed = sweep.run_sweep(workdir_copy, "0:1:3", **kwargs)
  assert len(seen) == 5  # 5 data batches of 8, all read; the 2 done ones were skipped unattacked
  for a, b in zip(reference["results"], resumed["results"]):
    assert a["clean_accuracy"] == b["clean_accuracy"]
    assert a["robust_accuracy"] == b["robust_accuracy"]
  assert not os.path.exists(os.path.join(workdir_copy, "sweep", partial[0]))


# ------------------------------------------------------------------------------------------------
# Small evaluations use a small batch.

def test_small_evaluation_uses_the_smallest_device_multiple_batch(trained_workdir):
  """64 examples at eval batch 512 run in calls of 64 rows, not 512 (8 devices)."""
  assert engine.smallest_batch(512, 64, 8) == 64
  assert engine.smallest_batch(512, 61, 8) == 64
  assert engine.smallest_batch(512, 5000, 8) == 512
  assert engine.smallest_batch(500, None, 8) == 504
  request = evaluate.plan_one(trained_workdir, alpha=0.5, attack="pgd", num_examples=64,
                              batch_size=512)
  assert run.batch_rows(request, request.dataset, request.split, request.num_examples, 1) == 64
  request = sweep.plan_sweep(trained_workdir, "0:1:3", attack="pgd", num_examples=64,
                             batch_size=512)
  assert run.batch_rows(request, request.dataset, request.split, request.num_examples, 3) == 192


# ------------------------------------------------------------------------------------------------
# Periodic evaluation: config.evals.

def test_periodic_evaluation_measures_what_it_names(trained_run):
  """'<entry>/<model>/clean_accuracy' is the model's accuracy (checked against predict), the
  robust one is at most it, and an entry per alpha evaluates that soup."""
  workdir, data_dir = trained_run
  loaded = loading.load(workdir)
  config = loaded.config
  config.evals = dict(
      a=training.eval_entry(every=10, attack="pgd", domains="clean,adversarial", num_examples=40),
      b=training.eval_entry(every=0, attack="none", domains="0.5", num_examples=40))
  periodic.validate(config)
  assert periodic.due(config, 20, last=False) == ["a"]
  assert periodic.due(config, 21, last=True) == ["a", "b"]
  metrics = periodic.evaluate(config, loaded.model, loaded.params, loaded.step)
  assert sorted(metrics) == ["a/adversarial/clean_accuracy", "a/adversarial/robust_accuracy",
                             "a/clean/clean_accuracy", "a/clean/robust_accuracy",
                             "b/alpha0.5/clean_accuracy"]
  from adv_soups import data as data_lib
  (batch,) = list(data_lib.eval_batches("digits", batch_size=40, num_examples=40,
                                        data_dir=data_dir))
  for key, alpha in (("a/clean", 0.0), ("a/adversarial", 1.0), ("b/alpha0.5", 0.5)):
    predictions = np.argmax(np.asarray(loaded.predict(batch["image"], alpha)), -1)
    assert metrics[f"{key}/clean_accuracy"] == pytest.approx(np.mean(predictions == batch["label"]))
  for key in ("a/clean", "a/adversarial"):
    assert metrics[f"{key}/robust_accuracy"] <= metrics[f"{key}/clean_accuracy"]
  assert metrics["a/clean/robust_accuracy"] < metrics["a/adversarial/robust_accuracy"] + 0.5


def test_periodic_evaluation_clamps_num_examples_to_the_split(trained_run, caplog):
  """A config asking more examples than the split holds evaluates the whole split with one note
  line (it used to crash with a TFDS traceback after training)."""
  workdir, _ = trained_run
  loaded = loading.load(workdir)
  config = loaded.config
  config.evals = dict(big=training.eval_entry(attack="none", domains="clean", num_examples=5000))
  with caplog.at_level("WARNING"):
    metrics = periodic.evaluate(config, loaded.model, loaded.params, loaded.step)
  notes = [r.getMessage() for r in caplog.records if "exceeds" in r.getMessage()]
  assert len(notes) == 1 and "num_examples=5000 exceeds the 360 examples" in notes[0]
  assert 0 < metrics["big/clean/clean_accuracy"] <= 1


@pytest.mark.parametrize("entry,message", [
    (dict(every=-1), "every must be an integer >= 0"),
    (dict(attack="fgsm"), "unknown attack 'fgsm'"),
    (dict(domains="clean,robust"), "unknown model 'robust'"),
    (dict(domains="1.5"), "outside [0, 1]"),
    (dict(num_examples=0), "num_examples must be an integer >= 1"),
    (dict(dataset="cifar10"), "3-channel images"),
    (dict(bogus=1), "unknown field"),
])
def test_evals_config_is_checked_before_training(entry, message, tmp_path):
  config = tiny_digits_config(str(tmp_path / "tfds"))
  for key, value in entry.items():
    config.evals.val[key] = value
  with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
    training.resolve_config(config)
  config.evals.val = training.eval_entry(num_examples=10)
  training.resolve_config(config)  # a good entry passes


# ------------------------------------------------------------------------------------------------
# Gradient-masking checks: warnings recorded in the report, never a changed number.

def test_masking_warnings_are_recorded_in_the_report(workdir_copy, monkeypatch):
  """Each check's line reaches the report's warnings and the table; the numbers are those of a
  run without checks. (Mutation: drop a check from run._masking_checks.)"""
  kwargs = dict(alpha=0.5, attack="apgd-ce,square", steps=2, square_queries=20,
                num_examples=16, progress=False)
  clean_run = evaluate.evaluate_one(workdir_copy, write=False, **kwargs)
  assert clean_run["warnings"] == []  # a normal model: silent
  monkeypatch.setattr(checks, "check_randomized", lambda *a, **k: "randomised outputs")
  monkeypatch.setattr(checks, "check_square_sr", lambda before, after: "square helped")
  report = evaluate.evaluate_one(workdir_copy, **kwargs)
  assert "randomised outputs" in report["warnings"]
  assert "alpha0.5: square helped" in report["warnings"]
  assert report["robust_accuracy"] == clean_run["robust_accuracy"]
  from adv_soups.evaluation import reports
  assert "Warning: randomised outputs" in reports.format_table(report)


def test_eps_grid_check_is_opt_in_and_recorded(workdir_copy, monkeypatch):
  kwargs = dict(alpha=1.0, attack="apgd-ce", steps=2, num_examples=16, progress=False)
  report = evaluate.evaluate_one(workdir_copy, eps_grid="0,0.03,0.1", **kwargs)
  grid = report["eps_grid"]
  assert grid["eps"] == [0.0, 0.03, 0.1]
  accs = grid["robust_accuracy"]["alpha1"]
  assert accs[0] == report["clean_accuracy"] and accs[1] == report["robust_accuracy"]
  assert not any("rises" in w for w in report["warnings"])
  assert "eps_grid" not in evaluate.evaluate_one(workdir_copy, write=False, **kwargs)
  monkeypatch.setattr(checks, "check_eps_grid", lambda eps, accs: "rises with eps")
  report = evaluate.evaluate_one(workdir_copy, eps_grid="0,0.1", write=False, **kwargs)
  assert "alpha1: rises with eps" in report["warnings"]


def test_each_process_keys_its_examples_by_their_global_index(trained_workdir, monkeypatch):
  """With 2 processes, process 1's first example of a 37-example split is global example 19
  (TFDS's even split gives process 0 the extra one), for the main dataset and a clamped one.
  (Mutation: `Request.offset` returning 0.) The 2-process end-to-end check is in
  test_multihost_eval.py."""
  request = evaluate.plan_one(trained_workdir, alpha=0.5, attack="pgd", num_examples=37)
  assert request.offset("digits", "test", 37) == 0  # one process
  monkeypatch.setattr(requests.jax, "process_count", lambda: 2)
  monkeypatch.setattr(requests.jax, "process_index", lambda: 1)
  assert request.offset("digits", "test", 37) == 19
  assert request.offset("digits", "test", None) == 180
  assert request.offset("digits", "test", 5000) == 180  # clamped to the split, as `batches` is
  monkeypatch.setattr(requests.jax, "process_index", lambda: 0)
  assert request.offset("digits", "test", 37) == 0
