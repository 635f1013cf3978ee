"""`python -m adv_soups.evaluate` and distribution shifts by name (offline, with TFDS mock data)."""
import json
import os

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds

from adv_soups import data as data_lib, evaluate, loading
from adv_soups.evaluation import engine, reports, requests
from conftest import tiny_digits_config, write_untrained_workdir


# ------------------------------------------------------------------------------------------------
# Shift names.

def test_parse_shifts_expands_corrupted_families():
  groups = dict(requests.parse_shifts(
      "imagenet_r, imagenet2012_corrupted,cifar10_corrupted/*,imagenet2012_corrupted/fog_3"))
  assert groups["imagenet_r"] == ["imagenet_r"]
  assert len(groups["imagenet2012_corrupted"]) == 75 and len(groups["cifar10_corrupted"]) == 75
  assert groups["imagenet2012_corrupted"][0] == "imagenet2012_corrupted/gaussian_noise_1"
  assert groups["imagenet2012_corrupted/fog_3"] == ["imagenet2012_corrupted/fog_3"]
  for bad in ("imagenet_q", "imagenet2012_corrupted/fog_9", "imagenet2012_corrupted/foo_1"):
    with pytest.raises(ValueError, match="Unknown dataset"):
      requests.parse_shifts(bad)


# ------------------------------------------------------------------------------------------------
# ImageNet-family evaluation on mock data: a tiny 1000-class ViT at 16 px.

@pytest.fixture(scope="module")
def imagenet_workdir(tmp_path_factory):
  config = tiny_digits_config(str(tmp_path_factory.mktemp("tfds_unused")))
  config.data.name = "imagenet2012"
  config.model.update(num_classes=1000, image_size=16, patch_size=8, variant="tiny/8")
  workdir = tmp_path_factory.mktemp("imagenet") / "workdir"
  write_untrained_workdir(workdir, config, noise=0.5)  # a random, not zero, head
  return str(workdir)


def _mock_batches(name, n):
  return list(data_lib.eval_batches(name, batch_size=n, num_examples=n, image_size=16))


def test_imagenet_r_restricts_predictions_to_its_200_classes(imagenet_workdir):
  subset = data_lib.get_spec("imagenet_r").class_subset
  with tfds.testing.mock_data(num_examples=24):
    report = evaluate.evaluate_one(imagenet_workdir, alpha=0.5, attack="none",
                                   shifts="imagenet_r", num_examples=24, progress=False)
    batch = _mock_batches("imagenet_r", 24)[0]
  loaded = loading.load(imagenet_workdir)
  logits = np.asarray(loaded.predict(batch["image"], 0.5))
  restricted = np.asarray(data_lib.subset_predictions(logits, subset))
  unrestricted = logits.argmax(-1)
  assert np.isin(restricted, subset).all()
  assert (~np.isin(unrestricted, subset)).any()  # so the restriction changes predictions
  entry = report["shifts"]["imagenet_r"]
  assert entry["num_examples"] == {"imagenet_r": 24}
  assert entry["mean"] == pytest.approx(np.mean(restricted == batch["label"]))
  # The evaluation scores the restricted prediction: labelled with it, every example is right;
  # labelled with an out-of-subset unrestricted argmax, those examples are wrong.
  weights = np.asarray([[0.5, 0.5]], np.float32)
  for labels, expected in ((restricted, 1.0), (unrestricted, np.isin(unrestricted, subset))):
    correct = engine.evaluate_columns(
        loaded.model, loaded.params, [dict(batch, label=labels.astype(np.int32))], weights,
        class_subset=subset).clean_correct
    np.testing.assert_array_equal(correct[:, 0], np.broadcast_to(expected, (24,)))
  assert report["files"]["json"] == os.path.join(
      imagenet_workdir, "eval", "eval_imagenet2012-validation_n24_clean_alpha0.5_shifts-imagenet_r"
      "_step1.json")
  assert os.path.exists(report["files"]["json"])


def test_corrupted_family_reports_the_mean_and_per_corruption(imagenet_workdir, monkeypatch):
  names = [f"imagenet2012_corrupted/{c}_{s}" for c in ("gaussian_noise", "fog") for s in (1, 2)]
  monkeypatch.setattr(data_lib, "corrupted_datasets", lambda base: names)  # 4 of the 75
  with tfds.testing.mock_data(num_examples=8):
    report = evaluate.evaluate_one(imagenet_workdir, domain=1, attack="none", write=False,
                                   shifts="imagenet2012_corrupted/*", num_examples=8,
                                   progress=False)
  entry = report["shifts"]["imagenet2012_corrupted"]
  assert entry["datasets"] == 4 and sorted(entry["per_dataset"]) == sorted(names)
  assert entry["mean"] == pytest.approx(np.mean(list(entry["per_dataset"].values())))
  assert list(entry["per_corruption"]) == ["gaussian_noise", "fog"]
  assert entry["per_corruption"]["fog"] == pytest.approx(
      np.mean([entry["per_dataset"][n] for n in names[2:]]))
  assert "(mean of 4)" in reports.format_table(report)


# ------------------------------------------------------------------------------------------------
# The command line on the trained workdir.

def test_evaluate_cli_reports_each_attack(workdir_copy, capsys):
  evaluate.main(["evaluate", f"--workdir={workdir_copy}", "--alpha=1/2",
                 "--attack=apgd-ce,apgd-t", "--steps=2", "--num_examples=16"])
  out = capsys.readouterr().out
  assert "APGD-CE + APGD-T" in out and "white-box core" in out and "not the full" in out
  assert "after APGD-CE %" in out and "robust %" in out
  path = os.path.join(workdir_copy, "eval",
                      "eval_digits-test_n16_apgd-ce2+apgd-t2_linf-eps0.03_alpha0.5_step150.json")
  with open(path) as f:
    report = json.load(f)
  after = report["robust_accuracy_after"]
  assert list(after) == ["APGD-CE", "APGD-T"]
  assert report["clean_accuracy"] >= after["APGD-CE"] >= after["APGD-T"]
  assert after["APGD-T"] == report["robust_accuracy"]
  assert [a["name"] for a in report["attack"]["attacks"]] == ["apgd-ce", "apgd-t"]
  assert report["num_examples"] == 16 and report["attack"]["budgets"] == {"apgd-ce": 2,
                                                                          "apgd-t": 2}


def test_autoattack_is_the_standard_suite(workdir_copy):
  """--attack=autoattack runs APGD-CE, APGD-T, FAB-T, Square in that order, each on the points
  all earlier ones failed on, and the report names all four with the accuracy after each."""
  report = evaluate.evaluate_one(workdir_copy, domain=1, attack="autoattack", steps=2,
                                 square_queries=30, num_examples=24, progress=False)
  after = report["robust_accuracy_after"]
  assert list(after) == ["APGD-CE", "APGD-T", "FAB-T", "Square"]
  values = [report["clean_accuracy"]] + list(after.values())
  assert values == sorted(values, reverse=True) and values[-1] == report["robust_accuracy"]
  # Other budgets than the reference's: reported under the attacks' names, never AutoAttack.
  description = report["attack"]["description"]
  assert description.startswith("APGD-CE + APGD-T + FAB-T + Square (2 iterations each; "
                                "Square 30 queries)") and "not AutoAttack's standard" in description
  assert report["attack"]["suite"] == "apgd-ce+apgd-t+fab-t+square"
  assert [(a["name"], a["budget"], a["restarts"], a.get("targets")) for a in
          report["attack"]["attacks"]] == [("apgd-ce", 2, 1, None), ("apgd-t", 2, 1, 9),
                                           ("fab-t", 2, 1, 9), ("square", 30, 1, None)]
  assert report["precision"]["compute_dtype"] == "float32"
  assert os.path.basename(report["files"]["json"]).startswith(
      "eval_digits-test_n24_apgd-ce2+apgd-t2+fab-t2+square30_linf-eps0.03_domain1_step150")


def test_reports_of_other_settings_do_not_overwrite(workdir_copy):
  """A cheap run never overwrites a costlier one: the file names state the settings."""
  common = dict(alpha=0.5, num_examples=16, progress=False)
  costly = evaluate.evaluate_one(workdir_copy, attack="apgd-ce", steps=3, **common)
  with open(costly["files"]["json"]) as f:
    saved = f.read()
  cheap = [evaluate.evaluate_one(workdir_copy, attack="none", **common),
           evaluate.evaluate_one(workdir_copy, attack="apgd-ce", steps=1, **common),
           evaluate.evaluate_one(workdir_copy, attack="apgd-ce", steps=3, eps=0.01, **common),
           evaluate.evaluate_one(workdir_copy, attack="apgd-ce", steps=3, num_examples=8,
                                 alpha=0.5, progress=False)]
  paths = {r["files"]["json"] for r in cheap}
  assert len(paths) == 4 and costly["files"]["json"] not in paths
  with open(costly["files"]["json"]) as f:
    assert f.read() == saved


def test_domain_and_alpha_name_the_same_model(trained_workdir):
  kwargs = dict(attack="none", num_examples=64, progress=False, write=False)
  by_domain = evaluate.evaluate_one(trained_workdir, domain=1, **kwargs)
  by_alpha = evaluate.evaluate_one(trained_workdir, alpha=1.0, **kwargs)
  assert by_domain["clean_accuracy"] == by_alpha["clean_accuracy"]
  assert by_domain["model_label"] == "domain1" and by_alpha["model_label"] == "alpha1"


@pytest.mark.parametrize("args,message", [
    (["--alpha=0.5", "--domain=1"], "exactly one of"),
    ([], "exactly one of"),
    (["--domain=2"], "--domain=2 is out of range"),
    (["--alpha=0.5", "--attack=square2"], "unknown attack 'square2'"),
    (["--alpha=5"], "outside [0, 1]"),
    (["--alpha=nan"], "outside [0, 1]"),
    (["--alpha=0.5", "--eps_grid=0.1"], "at least two eps"),
    (["--alpha=0.5", "--steps=0"], "--steps=0 must be"),
    (["--alpha=0.5", "--square_queries=0"], "--square_queries=0 must be"),
    (["--alpha=0.5", "--attack=apgd-ce,nope"], "unknown attack 'nope': allowed pgd, apgd-ce"),
    (["--alpha=0.5", "--precision=half"], "--precision='half': allowed float32, model"),
])
def test_evaluate_bad_input(args, message, trained_workdir, capsys):
  """One line on stderr, exit 2, nothing written, nothing compiled."""
  compiles = []
  jax.monitoring.register_event_duration_secs_listener(
      lambda event, *a, **k: compiles.append(event) if "backend_compile" in event else None)
  before = sorted(os.walk(trained_workdir))
  with pytest.raises(SystemExit) as exit_info:
    evaluate.main(["evaluate", f"--workdir={trained_workdir}"] + args)
  err = capsys.readouterr().err.strip().splitlines()
  assert exit_info.value.code == 2 and len(err) == 1 and message in err[0], err
  assert sorted(os.walk(trained_workdir)) == before
  assert not compiles
