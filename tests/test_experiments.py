"""The adapter experiment: end to end on a tiny config, resuming, reuse, and its parameter counts."""
import json
import os

import numpy as np
import pytest

from tests.conftest import tiny_digits_config


def _tiny(data_dir):
  return tiny_digits_config(data_dir, steps=30, log_every=10, checkpoint_every=10)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  """A TFDS data_dir of this module (the digits are prepared there on first use)."""
  return str(tmp_path_factory.mktemp("tfds"))


SETTINGS = dict(adapters=("token", "norm"), seeds=1, attack="apgd-ce", steps=2, num_examples=32)


@pytest.fixture(scope="module")
def experiment(tmp_path_factory, data_dir):
  """Runs the tiny experiment three times: killed during its second run, resumed, re-run.
  Returns (workdir, data_dir, base config, {phase: train calls}, {phase: evaluations}, results)."""
  from adv_soups import evaluation, preemption, training
  from adv_soups.experiments import adapters
  workdir = str(tmp_path_factory.mktemp("experiment") / "dir")
  base = _tiny(data_dir)
  real_train, real_eval = training.train_and_evaluate, evaluation.run_request
  calls = {"train": [], "eval": []}

  def counting_train(config, run_dir, *args, **kwargs):
    calls["train"].append(os.path.basename(run_dir))
    if len(calls["train"]) == 2 and phase == "killed":  # SIGTERM at step 10 of the 2nd run
      original = preemption.PreemptionWatch.reached
      preemption.PreemptionWatch.reached = lambda self, step: step >= 10
      try:
        return real_train(config, run_dir, *args, **kwargs)
      finally:
        preemption.PreemptionWatch.reached = original
    return real_train(config, run_dir, *args, **kwargs)

  def counting_eval(request, *args, **kwargs):
    calls["eval"].append(os.path.basename(request.loaded.workdir))
    return real_eval(request, *args, **kwargs)

  mp = pytest.MonkeyPatch()
  mp.setattr(training, "train_and_evaluate", counting_train)
  mp.setattr(evaluation, "run_request", counting_eval)
  counts = {}
  try:
    phase = "killed"
    with pytest.raises(SystemExit) as exit_info:
      adapters.run_experiment(base, workdir, **SETTINGS)
    assert exit_info.value.code == preemption.EXIT_PREEMPTED
    counts["killed"] = (list(calls["train"]), list(calls["eval"]))
    killed_state = {r: preemption.is_finished(os.path.join(workdir, r))
                    for r in ("clean-none-seed0", "adversarial-none-seed0")}
    for phase in ("resumed", "again"):
      calls["train"].clear()
      calls["eval"].clear()
      results = adapters.run_experiment(base, workdir, **SETTINGS)
      counts[phase] = (list(calls["train"]), list(calls["eval"]))
  finally:
    mp.undo()
  return workdir, data_dir, base, counts, killed_state, results


@pytest.mark.slow
def test_experiment_writes_the_three_outputs_with_a_row_per_run(experiment):
  workdir, _, _, _, _, results = experiment
  names = ["clean-none-seed0", "adversarial-none-seed0", "cotrain-token-seed0",
           "cotrain-norm-seed0"]
  assert [r["name"] for r in results["runs"]] == names
  assert all(r["status"] == "done" for r in results["runs"])
  on_disk = json.load(open(os.path.join(workdir, "results.json")))
  assert [r["name"] for r in on_disk["runs"]] == names
  assert [(s["mode"], s["adapter"]) for s in on_disk["summary"]] == [
      ("clean", "none"), ("adversarial", "none"), ("cotrain", "token"), ("cotrain", "norm")]
  assert on_disk["settings"]["num_examples"] == [32]
  for run in on_disk["runs"]:
    figures = run["figures"]
    assert figures["num_examples"] == 32
    assert 0 <= figures["robust_accuracy"] <= figures["clean_of_robust_domain"] <= 1
    assert os.path.exists(figures["report"])
    if run["mode"] == "cotrain":  # the 11-alpha curve: alpha 0 is the clean mode, 1 the robust
      soup = figures["soup"]
      assert [p["alpha"] for p in soup] == pytest.approx(np.linspace(0, 1, 11))
      assert soup[0]["clean_accuracy"] == figures["clean_accuracy"]
      assert soup[-1]["robust_accuracy"] == figures["robust_accuracy"]
      assert figures["robust_domain"] == 1
    else:
      assert "soup" not in figures and figures["robust_domain"] == 0
    assert os.path.isdir(run["workdir"]) and run["train_wall_s"] > 0
  md = open(os.path.join(workdir, "results.md")).read()
  assert "APGD-CE" in md and "first 32 held-out examples" in md
  table = [line for line in md.splitlines() if line.startswith("| ") and "+-" in line]
  assert [line.split("|")[1:3] for line in table] == [
      [" clean-only ", " none "], [" adversarial-only ", " none "],
      [" co-training ", " token "], [" co-training ", " norm "]]
  soup_rows = [line for line in md.splitlines() if line.startswith("| 0.") or
               line.startswith("| 1 ") or line.startswith("| 0 ")]
  assert len(soup_rows) == 11
  with open(os.path.join(workdir, "adapters.png"), "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_killed_experiment_resumes_and_a_rerun_trains_and_evaluates_nothing(experiment):
  workdir, _, _, counts, killed_state, _ = experiment
  from adv_soups import preemption
  killed_train, killed_eval = counts["killed"]
  assert killed_train == ["clean-none-seed0", "adversarial-none-seed0"]
  assert killed_eval == ["clean-none-seed0"]  # the killed run was never evaluated
  assert killed_state == {"clean-none-seed0": True, "adversarial-none-seed0": False}
  resumed_train, resumed_eval = counts["resumed"]
  assert resumed_train == ["adversarial-none-seed0", "cotrain-token-seed0", "cotrain-norm-seed0"]
  assert resumed_eval == ["adversarial-none-seed0", "cotrain-token-seed0", "cotrain-norm-seed0"]
  assert counts["again"] == ([], [])
  for name in ("clean-none-seed0", "adversarial-none-seed0", "cotrain-token-seed0"):
    assert preemption.is_finished(os.path.join(workdir, name))


@pytest.mark.slow
def test_parameter_counts_in_the_table_equal_count_params(experiment):
  workdir, _, _, _, _, results = experiment
  from adv_soups import loading, soups
  md = open(os.path.join(workdir, "results.md")).read()
  rows = {tuple(c.strip() for c in line.split("|")[1:3]): line.split("|")
          for line in md.splitlines() if line.startswith("| ") and "+-" in line}
  token = soups.count_params(loading.load(os.path.join(workdir, "cotrain-token-seed0")).params)[1]
  assert token > 0
  for adapter in ("token", "norm"):
    total, per_domain = soups.count_params(
        loading.load(os.path.join(workdir, f"cotrain-{adapter}-seed0")).params)
    cells = rows[("co-training", adapter)]
    assert int(cells[3].strip().replace(",", "")) == per_domain
    assert float(cells[4]) == pytest.approx(per_domain / token, abs=0.05)
    summary = next(s for s in results["summary"] if s["adapter"] == adapter)
    assert (summary["total_params"], summary["per_domain_params"]) == (total, per_domain)
  norm = rows[("co-training", "norm")]
  assert int(norm[3].replace(",", "")) > token  # dual norm owns more than one token


def test_bad_flags_exit_2_and_write_nothing(tmp_path, data_dir, capsys):
  from adv_soups.experiments import adapters
  workdir = tmp_path / "dir"
  common = ["prog", "--config=configs/digits.py", f"--workdir={workdir}",
            f"--config.data.data_dir={data_dir}"]
  for bad, expected in (("--adapters=token,dual", "unknown adapter 'dual'"),
                        ("--seeds=0", "--seeds=0"),
                        ("--attack=apgd-x", "unknown attack 'apgd-x'"),
                        ("--only=cotrain-head-seed0", "unknown run 'cotrain-head-seed0'"),
                        ("--num_examples=0", "--num_examples=0"),
                        ("--config.train.mode=fast", "train.mode"),
                        ("--bogus=1", "bogus")):
    with pytest.raises(SystemExit) as e:
      adapters.main(common + [bad])
    assert e.value.code == 2
    err = [line for line in capsys.readouterr().err.splitlines() if "error" in line.lower()]
    assert len(err) == 1 and err[0].startswith("error: ") and expected in err[0], (bad, err)
  assert not workdir.exists()


def test_runs_share_budget_and_data_order_per_seed(data_dir):
  from adv_soups.experiments import adapters
  base = _tiny(data_dir)
  runs = adapters.plan_runs(["token", "none"], 2)
  assert [r.name for r in runs] == [
      "clean-none-seed0", "adversarial-none-seed0", "cotrain-token-seed0", "cotrain-none-seed0",
      "clean-none-seed1", "adversarial-none-seed1", "cotrain-token-seed1", "cotrain-none-seed1"]
  configs = [adapters.run_config(base, r) for r in runs]
  for run, config in zip(runs, configs):
    assert (config.seed, config.train.mode, config.model.adapter) == (run.seed, run.mode,
                                                                      run.adapter)
    assert (config.train.steps, config.train.batch_size) == (30, 64)
    assert config.model.num_domains == (2 if run.mode == "cotrain" else 1)
  assert not adapters.Run("cotrain", "none", 0).has_soup
  assert adapters.select_runs(runs, "cotrain-none-seed1,clean-none-seed0") == [runs[0], runs[7]]
