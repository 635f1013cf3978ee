"""The soup sweep: all alphas in one pass equals one soup at a time and compiles once, outputs
named by their settings, alpha selection on a shift, single-domain workdirs, bad input (one line,
exit 2, nothing written or compiled)."""
import csv
import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

from adv_soups import cli, data as data_lib, loading, sweep
from adv_soups.attacks import suites
from adv_soups.evaluation import engine, reports

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ------------------------------------------------------------------------------------------------
# Parsing.

@pytest.mark.parametrize("text,expected", [
    ("0:1:11", [i / 10 for i in range(11)]), ("0,0.25,1", [0.0, 0.25, 1.0]), ("0.5", [0.5]),
    ("0:1:2", [0.0, 1.0]), ("1/3", [round(1 / 3, 10)]), ("1:0:3", [1.0, 0.5, 0.0])])
def test_parse_alphas(text, expected):
  np.testing.assert_allclose(cli.parse_alphas(text), expected, atol=1e-12)


@pytest.mark.parametrize("text,match", [
    ("0:2:3", "outside"), ("-0.5,1", "outside"), ("0:1:x", "malformed"), ("0:1:0", "malformed"),
    ("a,b", "malformed"), ("", "malformed"), ("0:1", "malformed")])
def test_parse_alphas_rejects(text, match):
  with pytest.raises(ValueError, match=match):
    cli.parse_alphas(text)


def test_parse_alphas_extrapolate():
  assert cli.parse_alphas("-0.5,1.5", extrapolate=True) == [-0.5, 1.5]
  for text in ("0,inf", "nan", "0:inf:3"):
    with pytest.raises(ValueError, match="non-finite|malformed"):
      cli.parse_alphas(text, extrapolate=True)


def test_parse_eps():
  assert cli.parse_eps("4/255") == pytest.approx(4 / 255)
  assert cli.parse_eps("0.1") == 0.1
  assert cli.parse_eps("2.5", "l2") == 2.5
  for bad in ("4//255", "x", "1/0", "2"):
    with pytest.raises(ValueError, match="eps"):
      cli.parse_eps(bad)


def test_describe_names_what_ran():
  budgets = suites.resolve_steps(suites.parse_suite("autoattack"), None, 20)
  assert budgets == {"apgd-ce": 100, "apgd-t": 100, "fab-t": 100, "square": 5000}
  text = suites.describe(suites.parse_suite("autoattack"), budgets)
  assert text.startswith("AutoAttack, standard version: APGD-CE + APGD-T + FAB-T + Square")
  core = suites.parse_suite("apgd-ce,apgd-t")
  text = suites.describe(core, suites.resolve_steps(core, None, 20))
  assert "white-box core" in text and "not the full AutoAttack" in text
  assert not suites.describe(core, {"apgd-ce": 100, "apgd-t": 100}).startswith("AutoAttack")
  assert suites.describe(("pgd",), {"pgd": 20}) == "PGD-20"
  for bad, match in (("fgsm", "unknown attack 'fgsm'"), ("pgd,pgd", "twice"),
                     ("apgd-ce,autoattack", "cannot be part")):
    with pytest.raises(ValueError, match=match):
      suites.parse_suite(bad)


# ------------------------------------------------------------------------------------------------
# All alphas at once == one soup at a time.

def test_sweep_equals_separate_soups(trained_workdir):
  """Each sweep column equals that soup evaluated on its own (a standalone one-domain model
  built by parameter interpolation), with the same random starts: the starts are keyed by the
  example, shared by its columns. Tolerance: one example, since the two paths compile different
  programs (float rounding may flip a point at the boundary)."""
  alphas = [0.0, 0.5, 1.0]
  n = 48
  result = sweep.run_sweep(trained_workdir, alphas, attack="pgd", steps=2, num_examples=n,
                           progress=False, write=False)
  assert result["alphas"] == alphas and result["num_examples"] == n
  loaded = loading.load(trained_workdir)
  config = loaded.config
  for a, row in zip(alphas, result["results"]):
    model, params = loaded.soup(a)  # a standalone single-domain model
    assert model.num_domains == 1
    batches = data_lib.eval_batches(config.data, batch_size=64, num_examples=n)
    single = engine.evaluate_columns(model, params, batches, np.zeros([1], np.int32),
                                     attacks=("pgd",), budgets={"pgd": 2},
                                     eps=config.attack.eps, seed=config.seed)
    assert row["clean_accuracy"] == pytest.approx(single.clean_correct.mean(), abs=1.01 / n)
    assert row["robust_accuracy"] == pytest.approx(single.robust.mean(), abs=1.01 / n)
  # The grid is not degenerate: the clean and the robust mode differ.
  assert result["results"][0] != result["results"][-1]


def test_sweep_compiles_once_for_all_alphas(trained_workdir):
  """One compiled program per stage and shape serves every alpha: a second sweep over other
  alphas (same number of rows) compiles nothing. (Mutation: make the alphas static, e.g. close
  the runner's logits function over the domain values, and every sweep recompiles.) The
  gradient-masking checks compile their own small program per request: off here."""
  compiles = []
  jax.monitoring.register_event_duration_secs_listener(
      lambda event, *a, **k: compiles.append(event) if "backend_compile" in event else None)
  kwargs = dict(attack="pgd", steps=1, num_examples=40, progress=False, write=False,
                batch_size=40, checks=False)
  sweep.run_sweep(trained_workdir, "0:1:5", **kwargs)
  assert compiles  # the listener sees this run's compilations
  before = len(compiles)
  sweep.run_sweep(trained_workdir, "0.1,0.3,0.6,0.7,0.9", **kwargs)
  assert len(compiles) == before


# ------------------------------------------------------------------------------------------------
# Outputs.

def test_sweep_writes_table_csv_json_png(workdir_copy, tmp_path):
  out = str(tmp_path / "sweep")
  result = sweep.run_sweep(workdir_copy, "0:1:5", attack="pgd", num_examples=32, out_dir=out,
                           progress=False)
  name = "sweep_digits-test_n32_pgd2_linf-eps0.03_alphas0-1x5_step150"
  assert sorted(os.listdir(out)) == sorted(name + ext for ext in (".csv", ".json", ".npz",
                                                                   ".png"))
  with open(os.path.join(out, name + ".json")) as f:
    saved = json.load(f)
  for key in ("attack", "eps", "norm", "checkpoint_step", "num_examples", "alphas", "results",
              "warnings", "wall_time_s"):
    assert key in saved, key
  assert saved["alphas"] == [0.0, 0.25, 0.5, 0.75, 1.0]
  assert saved["attack"]["names"] == ["PGD"] and saved["attack"]["description"] == "PGD-2"
  assert saved["attack"]["budgets"] == {"pgd": 2} and saved["eps"] == pytest.approx(0.03)
  assert saved["checkpoint_step"] == 150 and saved["num_examples"] == 32
  with open(os.path.join(out, name + ".csv")) as f:
    rows = list(csv.DictReader(f))
  assert [float(r["alpha"]) for r in rows] == saved["alphas"]
  assert float(rows[2]["robust_accuracy"]) == pytest.approx(result["results"][2]["robust_accuracy"])
  with open(os.path.join(out, name + ".png"), "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"
  per_example = np.load(os.path.join(out, name + ".npz"))
  assert per_example["clean_correct"].shape == (32, 5)
  np.testing.assert_allclose(per_example["clean_correct"].mean(0),
                             [r["clean_accuracy"] for r in saved["results"]])
  assert not os.path.exists(os.path.join(out, name + ".partial"))  # cleaned up when done
  table = reports.format_table(result)
  assert "PGD-2" in table and "robust %" in table and len(table.splitlines()) >= 2 + 1 + 5


def test_single_domain_workdir_is_one_alpha_free_row(single_domain_workdir):
  result = sweep.run_sweep(single_domain_workdir, "0,1", attack="none", num_examples=16,
                           progress=False, write=False)
  assert result["single_domain"] and result["alphas"] is None and len(result["results"]) == 1
  assert "single-domain" in result["notes"][0] and "ignored" in result["notes"][0]
  assert "single-domain" in reports.format_table(result)


# ------------------------------------------------------------------------------------------------
# Choosing alpha on a shift, scored on disjoint examples.

def test_select_alpha_on_disjoint_examples(trained_run):
  workdir, data_dir = trained_run
  alphas = [0.0, 0.5, 1.0]
  n_select, n_score = 40, 50
  result = sweep.run_sweep(workdir, alphas, attack="none", num_examples=n_score,
                           select_alpha_on=f"digits:test:{n_select}", progress=False, write=False)
  sel = result["selection"]
  assert sel["selection_split"] == "test[:40]" and sel["heldout_split"] == "test[40:90]"
  assert sel["num_selection"] == n_select and sel["num_heldout"] == n_score
  assert sel["chosen_alpha"] == alphas[int(np.argmax(sel["selection_accuracy"]))]

  def images(split):
    batches = data_lib.eval_batches("digits", split=split, batch_size=100, data_dir=data_dir)
    return np.concatenate([b["image"][b["mask"]] for b in batches])
  everything = images("test[:90]")
  chosen_on, scored_on = images(sel["selection_split"]), images(sel["heldout_split"])
  # By position: the first 40 examples choose, the next 50 score; no example does both.
  np.testing.assert_array_equal(chosen_on, everything[:40])
  np.testing.assert_array_equal(scored_on, everything[40:])
  # The reported held-out accuracies are those of the soups on the scoring examples.
  loaded = loading.load(workdir)
  labels = np.concatenate([b["label"][b["mask"]] for b in data_lib.eval_batches(
      "digits", split=sel["heldout_split"], batch_size=100, data_dir=data_dir)])
  for key, a in (("chosen", sel["chosen_alpha"]), ("alpha_0", 0.0), ("alpha_1", 1.0)):
    predictions = np.argmax(np.asarray(loaded.predict(scored_on, a)), -1)
    assert sel["heldout_accuracy"][key] == pytest.approx(np.mean(predictions == labels))
  assert "held-out" in reports.format_table(result)


# ------------------------------------------------------------------------------------------------
# Bad input: one line on stderr, exit 2, nothing written, nothing compiled.

@pytest.fixture
def no_config_workdir(tmp_path):
  return str(tmp_path / "empty")


@pytest.fixture(scope="module")
def no_checkpoint_workdir(trained_workdir, tmp_path_factory):
  workdir = tmp_path_factory.mktemp("nockpt") / "workdir"
  os.makedirs(workdir)
  shutil.copy(os.path.join(trained_workdir, "config.json"), workdir)
  return str(workdir)


BAD = [
    (["--alphas=0:2:3"], "outside [0, 1]"),
    (["--alphas=0:1:x"], "malformed --alphas"),
    (["--eps=4//255"], "malformed --eps"),
    (["--eps=2"], "out of range"),
    (["--attack=fgsm"], "unknown attack 'fgsm'"),
    (["--attack=apgd-t", "--dataset=digits", "--num_examples=0"], "--num_examples=0"),
    (["--square_queries=0"], "--square_queries=0"),
    (["--dataset=mnist"], "Unknown dataset 'mnist'"),
    (["--dataset=cifar10"], "3-channel images"),
    (["--shifts=imagenet_r"], "1000 classes"),
    (["--step=7"], "checkpoint step 7 does not exist"),
    (["--select_alpha_on=digits"], "malformed --select_alpha_on"),
    (["--bogus_flag=1"], "bogus_flag"),
]


@pytest.mark.parametrize("args,message", BAD, ids=[a[0] for a, _ in BAD])
def test_bad_input_in_process(args, message, trained_workdir, capsys, monkeypatch):
  compiles = []
  jax.monitoring.register_event_duration_secs_listener(
      lambda event, *a, **k: compiles.append(event) if "backend_compile" in event else None)
  before = set(os.listdir(trained_workdir))
  with pytest.raises(SystemExit) as exit_info:
    sweep.main(["sweep", f"--workdir={trained_workdir}"] + args)
  err = capsys.readouterr().err.strip().splitlines()
  assert exit_info.value.code == 2
  assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err
  assert set(os.listdir(trained_workdir)) == before  # no sweep/ directory
  assert not compiles


@pytest.mark.parametrize("case", ["alphas", "no_config", "no_checkpoint"])
def test_bad_input_command_line(case, trained_workdir, no_config_workdir, no_checkpoint_workdir):
  workdir, extra, message = {
      "alphas": (trained_workdir, ["--alphas=-1,0.5"], "outside [0, 1]"),
      "no_config": (no_config_workdir, [], "no config.json"),
      "no_checkpoint": (no_checkpoint_workdir, [], "no checkpoints"),
  }[case]
  before = set(os.listdir(workdir)) if os.path.isdir(workdir) else None
  proc = subprocess.run([sys.executable, "-m", "adv_soups.sweep", f"--workdir={workdir}"] + extra,
                        cwd=REPO, capture_output=True, text=True, timeout=120)
  assert proc.returncode == 2, proc.stderr
  errors = [l for l in proc.stderr.splitlines() if l.startswith("error:")]
  assert len(errors) == 1 and message in errors[0], proc.stderr
  # Our line comes first: TensorFlow's C++ banner is silenced before TensorFlow loads
  # (mutation: drop the TF_CPP_MIN_LOG_LEVEL / TF_ENABLE_ONEDNN_OPTS defaults in adv_soups/).
  assert proc.stderr.splitlines()[0] == errors[0], proc.stderr
  assert (set(os.listdir(workdir)) if os.path.isdir(workdir) else None) == before
