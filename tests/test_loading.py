"""`adv_soups.load(workdir)`: predict / soup / attack at any alpha, EMA, single-domain, errors."""
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import adv_soups
from adv_soups import data as data_lib
from adv_soups.attacks.pgd import pgd
from conftest import tiny_digits_config, write_untrained_workdir


@pytest.fixture(scope="module")
def loaded(trained_workdir):
  return adv_soups.load(pathlib.Path(trained_workdir))


@pytest.fixture(scope="module")
def digits(trained_run, loaded):
  batch = next(data_lib.eval_batches(loaded.config.data, batch_size=32, num_examples=32))
  return batch["image"], batch["label"]


def test_load_restores_the_run(loaded, trained_workdir):
  assert adv_soups.__version__
  assert loaded.step == 150 and loaded.params_item == "params" and loaded.num_domains == 2
  assert loaded.config.train.steps == 150 and loaded.workdir == trained_workdir
  devices = {d for x in jax.tree.leaves(loaded.params) for d in x.devices()}
  assert devices == {jax.devices()[0]}


def test_predict_is_the_soup_and_compiles_once(loaded, digits):
  images, _ = digits
  for alpha in (0.0, 0.3, 1.0):
    logits = np.asarray(loaded.predict(images, alpha))
    assert logits.shape == (32, 10)
    model, params = loaded.soup(alpha)
    expected = model.apply({"params": params}, images, None, train=False)
    np.testing.assert_allclose(logits, np.asarray(expected), atol=1e-5)
  # Per-example alphas: row i at alpha[i].
  alphas = np.linspace(0, 1, 32)
  mixed = np.asarray(loaded.predict(images, alphas))
  np.testing.assert_allclose(mixed[-1], np.asarray(loaded.predict(images, 1.0))[-1], atol=1e-5)
  assert loaded._predict._cache_size() == 1  # pylint: disable=protected-access


def test_attack_targets_the_soup(loaded, digits):
  images, labels = digits
  eps = 0.03
  x_adv = np.asarray(loaded.attack(images, labels, eps="0.03", alpha=0.5, steps=3))
  assert x_adv.shape == images.shape and x_adv.min() >= 0 and x_adv.max() <= 1
  assert np.abs(x_adv - images).max() <= eps + 1e-6
  model, params = loaded.soup(0.5)
  expected = pgd(lambda x: model.apply({"params": params}, x, None, train=False), images, labels,
                 jax.random.PRNGKey(0), eps=eps, num_steps=3)
  # Same attack, same random starts, same model up to float rounding in the mixing.
  assert np.mean(np.isclose(x_adv, np.asarray(expected), atol=1e-5)) > 0.99
  x_apgd = np.asarray(loaded.attack(images, labels, alpha=1.0, attack="apgd-ce", steps=3))
  assert np.abs(x_apgd - images).max() <= loaded.config.attack.eps + 1e-6
  with pytest.raises(ValueError, match="unknown attack 'fgsm'"):
    loaded.attack(images, labels, attack="fgsm")
  with pytest.raises(ValueError, match=r"shape \[B, 8, 8, 1\]"):
    loaded.predict(images[..., :4, :])


def test_attack_dispatches_through_the_registry(loaded, digits):
  """A toy attack registered from this file runs through load().attack (no package change);
  an unregistered name and a budget below 1 are refused."""
  from adv_soups.attacks import registry
  images, labels = digits
  calls = []

  def stage(f, x, y, rng, *, eps, norm, budget, settings, index, rank, step_size):
    calls.append((budget, norm))
    return jnp.clip(x - eps, 0.0, 1.0)
  registry.register(registry.Attack("toy-darken", "Toy", stage, default_steps=7))
  try:
    x_adv = np.asarray(loaded.attack(images, labels, eps=0.05, attack="toy-darken"))
    np.testing.assert_allclose(x_adv, np.clip(images - 0.05, 0, 1), atol=1e-7)
    assert calls == [(7, loaded.config.attack.norm)]
  finally:
    registry.unregister("toy-darken")
  with pytest.raises(ValueError, match="unknown attack 'toy-darken': allowed pgd"):
    loaded.attack(images, labels, attack="toy-darken")
  with pytest.raises(ValueError, match="budget of square=0 must be an integer >= 1"):
    loaded.attack(images, labels, attack="square", steps=0)


def test_load_errors(trained_workdir, tmp_path):
  with pytest.raises(FileNotFoundError, match="no config.json"):
    adv_soups.load(str(tmp_path / "nothing"))
  with pytest.raises(ValueError, match=r"step 7 does not exist.*\[150\]"):
    adv_soups.load(trained_workdir, step=7)


def test_single_domain_workdir_has_no_alpha(single_domain_workdir):
  loaded = adv_soups.load(single_domain_workdir)
  assert loaded.num_domains == 1
  images = np.random.default_rng(0).uniform(size=(4, 8, 8, 1)).astype(np.float32)
  assert loaded.predict(images).shape == (4, 10)
  assert loaded.soup(0.0) == (loaded.model, loaded.params)
  with pytest.raises(ValueError, match="single-domain model.*alpha must be 0"):
    loaded.predict(images, alpha=0.5)
  with pytest.raises(ValueError, match="single-domain"):
    loaded.soup(1.0)


def test_ema_params_are_used_when_present(trained_run, tmp_path):
  config = tiny_digits_config(trained_run[1])
  _, saved = write_untrained_workdir(tmp_path / "ema", config, step=5, noise=0.1, ema_noise=0.1)
  loaded = adv_soups.load(str(tmp_path / "ema"))
  assert loaded.params_item == "ema_params" and loaded.step == 5
  for x, y in zip(jax.tree.leaves(loaded.params), jax.tree.leaves(saved["ema_params"])):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.slow
def test_quickstart_notebook_runs(trained_run, tmp_path, monkeypatch):
  """notebooks/quickstart.ipynb end to end on the trained workdir (install cell skipped), in a
  kernel running this interpreter (a kernelspec written to a temporary JUPYTER_PATH)."""
  import json as json_lib
  import sys

  import nbclient
  import nbformat
  workdir, _ = trained_run
  repo = pathlib.Path(__file__).resolve().parent.parent
  spec_dir = tmp_path / "jupyter" / "kernels" / "adv_soups_test"
  spec_dir.mkdir(parents=True)
  (spec_dir / "kernel.json").write_text(json_lib.dumps({
      "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
      "display_name": "adv_soups test", "language": "python"}))
  monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
  monkeypatch.setenv("ADV_SOUPS_SKIP_INSTALL", "1")
  monkeypatch.setenv("ADV_SOUPS_WORKDIR", workdir)
  monkeypatch.delenv("MPLBACKEND", raising=False)  # the kernel's inline backend shows the figures
  notebook = nbformat.read(repo / "notebooks" / "quickstart.ipynb", as_version=4)
  client = nbclient.NotebookClient(notebook, kernel_name="adv_soups_test", timeout=300,
                                   resources={"metadata": {"path": str(repo / "notebooks")}})
  client.execute()
  outputs = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.outputs]
  text = "".join(o.get("text", "") for o in outputs)
  assert "ADV_SOUPS_SKIP_INSTALL is set" in text
  assert "robust %" in text and "PGD-2" in text and "max |x_adv - x|" in text
  assert sum("image/png" in o.get("data", {}) for o in outputs) == 2
  assert not any(o.output_type == "error" for o in outputs)
