"""The threat comparison's plan: which runs, with which domains and threats (no training)."""
import pytest

from adv_soups import threats as threats_lib
from adv_soups.experiments import threats as experiment
from configs import digits_threats


def test_runs_and_their_configs(tmp_path):
  base = digits_threats.get_config()
  base.data.data_dir = str(tmp_path / "tfds")
  runs = experiment.plan_runs(threats_lib.names(base), 2)
  assert [r.name for r in runs[:4]] == ["clean-seed0", "linf-seed0", "l2-seed0", "all-seed0"]
  assert len(runs) == 8
  by_name = {r.name: r for r in runs}
  clean = experiment.run_config(base, by_name["clean-seed1"])
  assert clean.train.mode == "clean" and clean.model.num_domains == 1 and clean.seed == 1
  l2 = experiment.run_config(base, by_name["l2-seed0"])
  assert l2.model.num_domains == 2 and list(threats_lib.normalise(l2)) == ["l2"]
  assert l2.threats.l2.eps == 0.5 and l2.evals.val.domains == "clean,l2"
  both = experiment.run_config(base, by_name["all-seed0"])
  assert both.model.num_domains == 3 and list(threats_lib.normalise(both)) == ["linf", "l2"]


def test_one_threat_is_refused():
  with pytest.raises(ValueError, match="needs at least 2"):
    experiment.plan_runs(["linf"], 1)


def test_summary_compares_union_of_the_best_rows():
  runs = experiment.plan_runs(["a", "b"], 1)
  row = lambda u: dict(clean=0.9, a=0.5, b=0.5, union=u)
  records = {
      "clean-seed0": dict(figures=dict(rows={"domain model": row(0.0)})),
      "a-seed0": dict(figures=dict(rows={"domain a": row(0.2), "selected soup":
                                         dict(row(0.25), weights="0.5,0.5")})),
      "b-seed0": dict(figures=dict(rows={"domain b": row(0.3)})),
      "all-seed0": dict(figures=dict(rows={"domain a": row(0.1), "selected soup":
                                           dict(row(0.4), weights="0.2,0.4,0.4")})),
  }
  summary = experiment.summarize(runs, records, ["a", "b"])
  best = experiment.best_union(summary)
  assert (best["best_specialist"]["run"], best["best_specialist"]["row"]) == ("b", "domain b")
  assert best["best_all"]["row"] == "selected soup" and best["best_all"]["union_mean"] == 0.4
  text = experiment.format_markdown(summary, dict(
      dataset="digits", train_steps=1, batch_size=2, seeds=1, attack="PGD-2",
      threats={"a": dict(norm="linf", eps=0.1), "b": dict(norm="l2", eps=0.5)},
      threat_names=["a", "b"], reported_text="half"))
  assert "40.0 +- 0.0% vs the best specialist (b, domain b) 30.0 +- 0.0%" in text
