"""Plots that do not overstate: every accuracy point carries its Wilson 95% interval, and the
trade-off axes are never zoomed below that uncertainty."""
from __future__ import annotations

import numpy as np
import pytest
from matplotlib import collections
from scipy import stats as scipy_stats

from adv_soups import stats
from adv_soups.evaluation import reports

N = 360


def sweep_report(clean, robust, shifts=None):
  alphas = [i / (len(clean) - 1) for i in range(len(clean))]
  rows = [dict(alpha=a, clean_accuracy=c, robust_accuracy=r,
               shifts={g: v[i] for g, v in (shifts or {}).items()})
          for i, (a, c, r) in enumerate(zip(alphas, clean, robust))]
  return dict(results=rows, num_examples=N, dataset="digits", norm="linf", eps=0.1,
              attack=dict(names=["APGD-CE"], description="APGD-CE (100 steps)"),
              shifts={g: dict(num_examples={"a": N // 2, "b": N // 2}) for g in shifts or {}})


def test_wilson_interval_matches_the_score_test_it_inverts():
  # The Wilson interval is where the score test's p-value is 0.05: check at its ends.
  for k, n in ((353, 360), (0, 20), (7, 9)):
    low, high = stats.wilson_interval(k / n, n)
    for p0 in (low, high):
      if 0 < p0 < 1:
        z = (k / n - p0) / np.sqrt(p0 * (1 - p0) / n)
        assert abs(2 * scipy_stats.norm.sf(abs(z)) - 0.05) < 1e-6
  assert stats.wilson_interval(0.0, 10)[0] == 0
  assert stats.wilson_interval(1.0, 10)[1] == pytest.approx(1.0)


def test_differ_beyond_noise():
  assert not stats.differ_beyond_noise(0.9805, 0.9861, N)  # two images
  assert stats.differ_beyond_noise(0.53, 0.78, N)


def _bars(container):
  """The error segments of an errorbar container: one LineCollection per direction."""
  return [c for c in container.lines[2] if isinstance(c, collections.LineCollection)]


def test_every_point_of_both_panels_has_its_interval_drawn():
  from matplotlib import pyplot as plt
  clean = [0.9861, 0.9805, 0.9833, 0.9805, 0.9861, 0.9833]
  robust = [0.53, 0.60, 0.66, 0.71, 0.75, 0.78]
  shifted = [0.70, 0.69, 0.68, 0.66, 0.65, 0.60]
  fig = reports.figure(sweep_report(clean, robust, {"digits_noise": shifted}))
  left, right = fig.axes
  for container, values, n in zip(left.containers, (clean, robust, shifted), (N, N, N)):
    (ybars,) = _bars(container)
    low, high = stats.wilson_interval(np.asarray(values), n)
    segments = ybars.get_segments()
    assert len(segments) == len(values)
    for seg, lo, hi in zip(segments, low, high):
      np.testing.assert_allclose(sorted(seg[:, 1]), [100 * lo, 100 * hi], atol=1e-9)
  (trade,) = right.containers
  xbars, ybars = _bars(trade)
  for bars, values, axis in ((xbars, clean, 0), (ybars, robust, 1)):
    low, high = stats.wilson_interval(np.asarray(values), N)
    ends = [sorted(seg[:, axis]) for seg in bars.get_segments()]
    np.testing.assert_allclose(ends, 100 * np.stack([low, high], 1), atol=1e-9)
  # Not zoomed below the uncertainty: the clean axis spans >= 3 widest intervals, holds them all.
  low, high = stats.wilson_interval(np.asarray(clean), N)
  x0, x1 = right.get_xlim()
  assert x1 - x0 >= 3 * 100 * np.max(high - low)
  assert x0 <= 100 * low.min() and x1 >= 100 * high.max() and x1 <= 100
  plt.close(fig)


def test_png_renders():
  png = reports.to_png(sweep_report([0.9, 0.8], [0.1, 0.5]))
  assert png[:8] == b"\x89PNG\r\n\x1a\n"


def test_experiment_plot_draws_each_runs_interval_and_the_soup_curves(tmp_path, monkeypatch):
  from matplotlib import pyplot as plt
  from adv_soups.experiments import aggregate, plan, render
  kept = []
  monkeypatch.setattr(plt, "close", kept.append)
  runs = [plan.Run("clean", "none", 0), plan.Run("cotrain", "token", 0)]
  soup = [dict(alpha=a, clean_accuracy=0.98 - 0.01 * a, robust_accuracy=0.5 + 0.3 * a)
          for a in (0.0, 0.5, 1.0)]
  records = {runs[0].name: {"figures": dict(clean_accuracy=0.99, robust_accuracy=0.1,
                                            num_examples=N, per_domain_params=0,
                                            total_params=100)},
             runs[1].name: {"figures": dict(clean_accuracy=0.98, robust_accuracy=0.8,
                                            num_examples=N, soup=soup, per_domain_params=32,
                                            total_params=132)}}
  for run in runs:  # the run records as results.json stores them
    records[run.name].update(mode=run.mode, adapter=run.adapter)
  summary = aggregate.summarize(runs, records, token_per_domain=32)
  render.plot(summary, [records[r.name] for r in runs], str(tmp_path / "a.png"), "t")
  (fig,) = kept
  (ax,) = fig.axes
  points = {}  # (x, y) of each one-point container -> its (x, y) interval segments
  for container in ax.containers:
    xs, ys = container.lines[0].get_data()
    if len(xs) == 1:
      points.setdefault((round(float(xs[0]), 6), round(float(ys[0]), 6)), []).append(
          _bars(container))  # the run's point, and the mean's (std over seeds) where they meet
    elif len(xs) == len(soup):  # the soup curve: an interval at every alpha
      xbars, ybars = _bars(container)
      assert len(xbars.get_segments()) == len(ybars.get_segments()) == len(soup)
  for fig_ in (records[r.name]["figures"] for r in runs):
    drawn = points[(round(100 * fig_["clean_accuracy"], 6), round(100 * fig_["robust_accuracy"], 6))]
    want = [100 * np.asarray(stats.wilson_interval(fig_[f"{k}_accuracy"], N))
            for k in ("clean", "robust")]
    got = [[sorted(b.get_segments()[0][:, axis]) for axis, b in enumerate(bars)]
           for bars in drawn if len(bars) == 2]
    assert any(np.allclose(g, want) for g in got), (got, want)
  monkeypatch.undo()
  plt.close(fig)


def test_demo_summary_says_whether_clean_accuracy_moved_beyond_noise():
  from adv_soups import demo
  clean = [0.9806, 0.9833, 0.9806, 0.9833, 0.9861, 0.9833, 0.9833, 0.9833, 0.9833, 0.9861, 0.9861]
  robust = [0.5306, 0.5528, 0.5611, 0.5889, 0.6417, 0.6722, 0.725, 0.7583, 0.7694, 0.7722, 0.775]
  lines = demo.summary_lines(sweep_report(clean, robust))
  assert lines[0].startswith("clean mode (alpha 0): clean accuracy 98.1%, robust accuracy 53.1%")
  assert lines[1].startswith("robust mode (alpha 1): clean accuracy 98.6%, robust accuracy 77.5%")
  assert "clean accuracy spans 98.1%-98.6%: within sampling noise" in lines[2]
  assert "robust accuracy spans 53.1%-77.5%: more than sampling noise" in lines[3]
  moved = demo.summary_lines(sweep_report([0.98, 0.80], [0.1, 0.5]))
  assert "clean accuracy spans 80.0%-98.0%: more than sampling noise" in moved[2]
