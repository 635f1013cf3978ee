"""Sweeps over soup weights with one column per threat and their union; old single-threat
workdirs; bad input on the command lines (one line, exit 2, nothing written)."""
import json
import os

import jax
import numpy as np
import pytest

from adv_soups import evaluate, loading, sweep, threats as threats_lib, training
from adv_soups import workdir as workdir_lib
from adv_soups.evaluation import threat_sweep, union
from configs import digits_threats
from tests.conftest import tiny_digits_config, write_untrained_workdir


def _threats_config(data_dir):
  config = digits_threats.get_config()
  config.data.data_dir = str(data_dir)
  config.model.update(depth=1, width=32, num_heads=2, mlp_dim=64)
  config.threats = threats_lib.ordered(dict(
      a=threats_lib.threat("linf", 0.05, num_steps=2), b=threats_lib.threat("linf", 0.1),
      c=threats_lib.threat("l2", 0.5)))
  config.evals.val.domains = "clean,a"
  config.eval.update(num_examples=24, batch_size=96, attack_steps=2)
  return config


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("tfds"))


@pytest.fixture(scope="module")
def threats_workdir(data_dir, tmp_path_factory):
  """An untrained (noisy parameters) 4-domain workdir: clean, a = l_inf 0.05, b = l_inf 0.1,
  c = l_2 0.5."""
  workdir = tmp_path_factory.mktemp("threats") / "workdir"
  write_untrained_workdir(workdir, _threats_config(data_dir), noise=0.3)
  return str(workdir)


@pytest.fixture(scope="module")
def old_workdir(data_dir, tmp_path_factory):
  """An untrained two-domain workdir whose config.json has no `threats` (written before them)."""
  workdir = tmp_path_factory.mktemp("old") / "workdir"
  config, _ = write_untrained_workdir(workdir, tiny_digits_config(data_dir), noise=0.3)
  path = os.path.join(workdir, "config.json")
  with open(path) as f:
    saved = json.load(f)
  saved.pop("threats")
  with open(path, "w") as f:
    json.dump(saved, f)
  return str(workdir), config


@pytest.mark.slow
def test_sweep_compiles_once_per_attack_and_norm(threats_workdir):
  """Threat b has threat a's norm and attack (eps is traced): evaluating it compiles nothing;
  threat c (l_2) compiles its own programs; a second grid of other weights compiles nothing.
  (Mutation: pass eps as a static value, and b recompiles.)"""
  compiles = []
  jax.monitoring.register_event_duration_secs_listener(
      lambda event, *a, **k: compiles.append(event) if "backend_compile" in event else None)
  kw = dict(attack="pgd", steps=2, num_examples=24, batch_size=96)

  def run(names, weights="simplex:0.5"):
    before = len(compiles)
    threat_sweep.run(threat_sweep.plan(threats_workdir, weights, threat_names=names, **kw),
                     write=False)
    return len(compiles) - before

  assert run(["a"]) > 0
  assert run(["b"]) == 0
  assert run(["c"]) > 0
  grid = "0.4,0.2,0.2,0.2;0.1,0.3,0.3,0.3;0,0,0.5,0.5;1,0,0,0;0,1,0,0;0,0,1,0;0,0,0,1;" \
         "0.25,0.25,0.25,0.25;0.7,0.1,0.1,0.1;0.1,0.1,0.1,0.7"
  assert len(threat_sweep.plan(threats_workdir, "simplex:0.5", **kw).weights) == 10
  assert run(None, grid) == 0


@pytest.mark.slow
def test_threat_sweep_report_columns_union_and_selection(threats_workdir, tmp_path):
  sweep_plan = threat_sweep.plan(threats_workdir, "simplex:0.5", attack="pgd", steps=2,
                                 num_examples=24, batch_size=96, threat_names=["a", "c"],
                                 select_on="union")
  report = threat_sweep.run(sweep_plan, out_dir=str(tmp_path))
  rows = report["results"]
  assert len(rows) == 10 and list(report["threats"]) == ["a", "c"]
  for r in rows:
    assert r["union_accuracy"] <= min(r["robust_accuracy"].values()) + 1e-9
  with np.load(report["files"]["npz"]) as saved:
    u = union.union_correct({"a": saved["robust_a"], "c": saved["robust_c"]})
  np.testing.assert_allclose([r["union_accuracy"] for r in rows], u.mean(0))
  sel = report["selection"]
  assert sel["selection_examples"] == sel["reported_examples"] == 12
  assert sel["index"] == int(np.argmax(u[:12].mean(0)))
  assert sel["reported"]["union"] == pytest.approx(u[12:, sel["index"]].mean())
  with open(report["files"]["csv"]) as f:
    header = f.readline().strip().split(",")
  assert header == ["column", "w_clean", "w_a", "w_b", "w_c", "clean_accuracy",
                    "robust_accuracy_a", "robust_accuracy_c", "union_accuracy"]
  assert "png" not in report["files"]  # four domains: no triangle


@pytest.mark.slow
def test_old_single_threat_workdir_evaluates_sweeps_loads_and_resumes(old_workdir, tmp_path):
  workdir, config = old_workdir
  saved = workdir_lib.load_config(workdir)
  assert "threats" not in saved and list(threats_lib.normalise(saved)) == ["linf"]
  # evaluate and the two-domain sweep, as before
  one = evaluate.evaluate_one(workdir, alpha=0.5, attack="pgd", steps=2, num_examples=16,
                              write=False, progress=False)
  assert one["norm"] == "linf" and one["eps"] == pytest.approx(config.attack.eps)
  curve = sweep.run_sweep(workdir, "0:1:3", attack="pgd", steps=2, num_examples=16,
                          write=False, progress=False, checks=False)
  assert len(curve["results"]) == 3
  # the sweep over weights: its one threat named by its norm; the union is that threat
  report = threat_sweep.run(threat_sweep.plan(workdir, "0.5,0.5;0,1", attack="pgd", steps=2,
                                              num_examples=16), write=False)
  assert list(report["threats"]) == ["linf"]
  assert report["results"][0]["union_accuracy"] == report["results"][0]["robust_accuracy"]["linf"]
  # the soup at alpha 0.5 scores the same both ways (same keys, same examples)
  assert report["results"][0]["clean_accuracy"] == pytest.approx(one["clean_accuracy"])
  model = loading.load(workdir)
  images = np.zeros((2, 8, 8, 1), np.float32)
  np.testing.assert_allclose(model.predict(images, alpha=0.5), model.predict(images, alpha=0.5))
  assert model.attack(images, np.zeros(2, np.int32), alpha=1.0, steps=1).shape == images.shape
  # resuming under today's schema: the same run, spelt without threats, is accepted
  training.prepare_workdir(training.resolve_config(tiny_digits_config(config.data.data_dir)),
                           workdir, overwrite=False)


def _fail(main, argv, capsys):
  with pytest.raises(SystemExit) as info:
    main(argv)
  assert info.value.code == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith("error: ")
  return err[0]


@pytest.mark.parametrize("flags, message", [
    (["--weights=0.2,0.3,0.4,0.2"], "sums to 1.1"),
    (["--weights=0.5,0.5"], "has 2 values; the model has 4 domains"),
    (["--weights=1.5,-0.5,0,0"], "--extrapolate"),
    (["--weights=simplex:0.5", "--alphas=0:1:3"], "exclude each other"),
    (["--select_on=l7"], "allowed union, clean, a, b, c"),
])
def test_sweep_bad_weights_are_one_line_exit_2_nothing_written(flags, message, threats_workdir,
                                                                capsys):
  before = sorted(os.listdir(threats_workdir))
  line = _fail(sweep.main, ["sweep", f"--workdir={threats_workdir}", *flags], capsys)
  assert message in line, line
  assert sorted(os.listdir(threats_workdir)) == before


@pytest.mark.parametrize("change, message", [
    ("config.threats.l2.norm = 'l7'", "norm='l7' is unknown"),
    ("config.threats.linf = dict(norm='linf')", "config.threats.linf has no eps"),
    ("config.attack.eps = 0.2", "changes config.attack.eps"),
])
def test_train_bad_threats_are_one_line_exit_2_nothing_written(change, message, data_dir,
                                                               tmp_path, capsys):
  from adv_soups import training_cli
  path = tmp_path / "bad_config.py"
  path.write_text("from configs import digits_threats\n\n\ndef get_config():\n"
                  "  config = digits_threats.get_config()\n"
                  f"  {change}\n  return config\n")
  workdir = tmp_path / "run"
  line = _fail(training_cli.main, ["train", f"--workdir={workdir}", f"--config={path}",
                                   f"--config.data.data_dir={data_dir}"], capsys)
  assert message in line, line
  assert not workdir.exists()
