"""Multi-host evaluation: `evaluate` and `sweep` on 2 local processes (jax.distributed on CPU,
launch/local.sh) give exactly the 1-process numbers, with an odd number of examples, and write
one copy of each report."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from test_multihost import subprocess_env

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(module, flags, processes):
  env = dict(subprocess_env(2), PYTHON=sys.executable)
  if processes == 1:
    command = [sys.executable, "-m", module] + flags
  else:
    command = ["bash", os.path.join(REPO, "launch", "local.sh"), str(processes),
               f"--module={module}", "--"] + flags
  proc = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return proc


def _report(out_dir):
  (name,) = [n for n in os.listdir(out_dir) if n.endswith(".json")]  # one copy only
  with open(os.path.join(out_dir, name)) as f:
    report = json.load(f)
  per_example = np.load(os.path.join(out_dir, name[:-5] + ".npz"))
  return report, per_example


@pytest.mark.slow
@pytest.mark.parametrize("module,extra", [
    ("adv_soups.sweep", ["--alphas=0,0.5,1", "--attack=apgd-ce,square", "--square_queries=10"]),
    ("adv_soups.evaluate", ["--domain=1", "--attack=pgd"]),
])
def test_two_processes_give_the_one_process_numbers(module, extra, trained_workdir, tmp_path):
  """37 examples: process 0 attacks 19, process 1 18, each on its own devices with its global
  example indices; the gathered per-example results equal one process's exactly. (Mutation:
  number each process's examples from 0 — `Request.offset` returning 0 — and the random starts,
  hence some outcomes, differ; or gather without trimming the padding, and the counts differ.)"""
  common = [f"--workdir={trained_workdir}", "--num_examples=37", "--steps=2",
            "--batch_size=16"] + extra
  one, two = str(tmp_path / "one"), str(tmp_path / "two")
  _run(module, common + [f"--out_dir={one}"], 1)
  proc = _run(module, common + [f"--out_dir={two}"], 2)
  r1, e1 = _report(one)
  r2, e2 = _report(two)
  assert r1["num_examples"] == r2["num_examples"] == 37
  np.testing.assert_array_equal(e1["clean_correct"], e2["clean_correct"])
  np.testing.assert_array_equal(e1["broken_by"], e2["broken_by"])
  assert [r["robust_accuracy"] for r in r1["results"]] == [
      r["robust_accuracy"] for r in r2["results"]]
  assert 0 < r2["results"][-1]["clean_accuracy"] and e2["broken_by"].max() >= 0  # not trivial
  assert proc.stdout.count("written to") == 1  # process 0 reports, process 1 does not
