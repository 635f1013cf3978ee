"""The sweep and the eps-grid check with the l_1 threat model and with the rand version on a
randomised model; reports name the version, the norm and every setting."""
from __future__ import annotations

import pytest

from adv_soups import evaluate, sweep
from adv_soups.evaluation import periodic, reports


@pytest.fixture(scope="module")
def untrained_workdir(tmp_path_factory):
  from conftest import tiny_digits_config, write_untrained_workdir
  root = tmp_path_factory.mktemp("l1reports")
  write_untrained_workdir(root / "workdir", tiny_digits_config(root / "tfds"), noise=0.05)
  return str(root / "workdir")


@pytest.mark.slow  # compiles ViT attacks: about a minute on a loaded 2-core machine
def test_sweep_and_eps_grid_with_l1_and_the_rand_version(untrained_workdir, tmp_path):
  l1 = sweep.run_sweep(untrained_workdir, "0,1", attack="apgd-ce", norm="l1", eps=1.0, steps=3,
                       num_examples=4, progress=False, out_dir=str(tmp_path), checks=False)
  assert l1["norm"] == "l1" and "_l1-eps1_" in l1["files"]["json"]
  assert l1["attack"]["attacks"][0]["restarts"] == 5 and l1["attack"]["attacks"][0]["largereps"]
  assert "eps schedule 3/2/1 eps" in reports.format_table(l1)
  rand = evaluate.evaluate_one(untrained_workdir, alpha=1.0, attack="autoattack-rand", steps=3,
                               eot_draws=2, dropout=0.1, num_examples=4, progress=False,
                               write=False, eps_grid="0.05,0.1")
  assert rand["attack"]["version"] == "rand" and rand["attack"]["eot_draws"] == 2
  assert rand["randomised_model"]["dropout"] == 0.1
  assert [a["eot_draws"] for a in rand["attack"]["attacks"]] == [2, 2]
  assert len(rand["eps_grid"]["robust_accuracy"]["alpha1"]) == 2
  table = reports.format_table(rand)
  assert "Version: rand" in table and "Model: randomised (dropout 0.1" in table
  assert "not AutoAttack's rand version" in table  # 3 iterations and 2 draws: not the reference


def test_config_evals_take_norm_l1_with_its_own_eps(tmp_path):
  from conftest import tiny_digits_config
  config = tiny_digits_config(tmp_path)
  config.evals.val.update(attack="apgd-ce", norm="l1", eps=1.0)
  periodic.validate(config)
  config.evals.val.eps = None
  with pytest.raises(ValueError, match="norm=l1 needs its own"):
    periodic.validate(config)
  config.evals.val.update(attack="pgd", eps=1.0)
  with pytest.raises(ValueError, match="'pgd' has no l1 form"):
    periodic.validate(config)
