"""Damaged checkpoints: a truncated array file in the latest step makes training resume from the
previous step and `load()` load it, each with one warning line; the damaged step is kept aside."""
import logging
import os

import jax
import numpy as np
import pytest

from adv_soups import checkpoints, loading, training
from adv_soups.models import create_model, init_params
from conftest import tiny_digits_config, write_untrained_workdir


def truncate_array_file(workdir: str, step: int) -> str:
  """Halves every array data file of checkpoint `step`'s parameters (a full disk, a broken
  copy). Halving only the largest file of the step was not always enough: which arrays a data
  file holds, and where, varies between runs, and a read could miss the lost half (seen once in
  a fresh-clone CI run)."""
  root = os.path.join(workdir, "checkpoints", str(step), "params")
  files = [os.path.join(d, f) for d, _, names in os.walk(root) for f in names
           if os.path.basename(d) == "d"]  # OCDBT data files: <item>/ocdbt.process_0/d/<hash>
  assert files, f"no OCDBT data files under {root}"
  for path in files:
    with open(path, "r+b") as f:
      f.truncate(os.path.getsize(path) // 2)
  return max(files, key=os.path.getsize)


def warnings_about_damage(caplog) -> list[str]:
  return [r.getMessage() for r in caplog.records
          if r.levelno == logging.WARNING and "is unreadable" in r.getMessage()]


def test_load_skips_a_damaged_latest_checkpoint_and_keeps_it_aside(tmp_path, caplog):
  workdir = str(tmp_path / "run")
  config, saved = write_untrained_workdir(workdir, tiny_digits_config(tmp_path / "tfds"), step=1,
                                          noise=0.1)
  later = jax.tree.map(lambda x: x + 1.0, saved["params"])
  manager = checkpoints.Checkpoints(workdir)
  manager.save(2, {}, params=later)
  manager.close()
  truncate_array_file(workdir, 2)
  with caplog.at_level(logging.WARNING):
    model = loading.load(workdir)
  assert model.step == 1
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(model.params),
               jax.device_get(saved["params"]))
  lines = warnings_about_damage(caplog)
  assert len(lines) == 1 and "checkpoint step 2" in lines[0] and "using step 1" in lines[0]
  assert "\n" not in lines[0]
  assert os.listdir(os.path.join(workdir, "checkpoints")) == ["1"]
  kept = os.path.join(workdir, checkpoints.DAMAGED_DIR, "2")
  assert os.path.isdir(os.path.join(kept, "params"))  # moved, not deleted


def test_a_structure_mismatch_is_raised_not_taken_for_damage(tmp_path):
  workdir = str(tmp_path / "run")
  config, _ = write_untrained_workdir(workdir, tiny_digits_config(tmp_path / "tfds"), step=1)
  config.model.width = 16  # a caller's mistake, not a broken file
  other = jax.eval_shape(lambda: init_params(create_model(config.model), jax.random.key(0),
                                             config.model.channels))
  manager = checkpoints.Checkpoints(workdir)
  with pytest.raises(ValueError, match="not compatible with the stored shape"):
    manager.restore_latest_readable(
        lambda s: manager.restore(s, targets={"params": other}), workdir)
  manager.close()
  assert os.listdir(os.path.join(workdir, "checkpoints")) == ["1"]
  assert not os.path.exists(os.path.join(workdir, checkpoints.DAMAGED_DIR))


@pytest.mark.slow
def test_training_resumes_from_the_step_before_a_damaged_one(tmp_path, caplog):
  config = tiny_digits_config(tmp_path / "tfds", steps=4, checkpoint_every=2, log_every=2)
  workdir = str(tmp_path / "run")
  training.train_and_evaluate(config, workdir)
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["2", "4"]
  truncate_array_file(workdir, 4)
  os.remove(os.path.join(workdir, "FINISHED"))  # as if the run had died while saving step 4
  with caplog.at_level(logging.INFO):
    result = training.train_and_evaluate(config, workdir)
  lines = warnings_about_damage(caplog)
  assert len(lines) == 1 and "checkpoint step 4" in lines[0] and "using step 2" in lines[0]
  assert any("Resumed from step 2" in r.getMessage() for r in caplog.records)
  assert int(result.state.step) == 4 and os.path.exists(os.path.join(workdir, "FINISHED"))
  assert os.path.isdir(os.path.join(workdir, checkpoints.DAMAGED_DIR, "4", "params"))
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["2", "4"]  # 4 saved anew
