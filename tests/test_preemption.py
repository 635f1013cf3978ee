"""Preemption (SIGTERM -> one checkpoint, exit 75, FINISHED marker), what a resume may change,
the multi-process start settings, and the launchers' command lines (launch/*.sh --dry_run)."""
import json
import os
import shlex
import signal
import subprocess
import sys

import pytest

from adv_soups import parallel, preemption, training, training_cli, workdir as workdir_lib
from adv_soups.data import pipeline
from conftest import tiny_digits_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ------------------------------------------------------------------------------------------------
# What a resume may change.

def test_resume_allows_trajectory_neutral_fields_and_refuses_the_rest():
  old = {"train": {"steps": 10, "log_every": 5, "checkpoint_every": 5, "keep_checkpoints": 3},
         "data": {"data_dir": "/a", "shuffle_buffer": 8}, "eval": {"attack_steps": 2},
         "evals": {"val": {"every": 0}}, "model": {"width": 32}}
  new = json.loads(json.dumps(old))
  new["train"].update(log_every=7, checkpoint_every=0, keep_checkpoints=1)
  new["data"]["data_dir"] = "/b"
  new["eval"]["attack_steps"] = 5
  new["evals"]["val"]["every"] = 2
  new["evals"]["test"] = {"every": 4}  # a new evaluator
  allowed, refused = workdir_lib.resume_differences(old, new)
  assert refused == [] and len(allowed) == 7
  new["train"]["steps"], new["model"]["width"], new["data"]["shuffle_buffer"] = 11, 16, 4
  allowed, refused = workdir_lib.resume_differences(old, new)
  assert len(allowed) == 7
  assert refused == ["data.shuffle_buffer: 8 -> 4", "model.width: 32 -> 16",
                     "train.steps: 10 -> 11"]


def test_prepare_workdir_says_which_fields_changed_in_one_line_or_refuses(tmp_path, capsys):
  config = training.resolve_config(tiny_digits_config(tmp_path / "tfds"))
  workdir = str(tmp_path / "run")
  workdir_lib.save_config(workdir, config)
  training.prepare_workdir(config, workdir, overwrite=False)
  assert capsys.readouterr().err == ""  # the same config: nothing to say
  changed = config.copy_and_resolve_references()
  changed.data.data_dir = str(tmp_path / "elsewhere")
  changed.evals.val.every = 3
  training.prepare_workdir(changed, workdir, overwrite=False)
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and "leave its trajectory alone" in err[0]
  assert "data.data_dir" in err[0] and "evals.val.every: 0 -> 3" in err[0]
  for field, value in (("train.steps", 151), ("model.width", 16)):
    other = config.copy_and_resolve_references()
    section, name = field.split(".")
    other[section][name] = value
    with pytest.raises(ValueError, match=f"{field}: .* -> {value}"):
      training.prepare_workdir(other, workdir, overwrite=False)


# ------------------------------------------------------------------------------------------------
# Preemption in one process.

def test_watch_traps_sigterm_and_restores_the_previous_handler():
  before = signal.getsignal(signal.SIGTERM)
  with preemption.PreemptionWatch() as watch:
    assert not watch.reached(1)
    os.kill(os.getpid(), signal.SIGTERM)
    assert watch.reached(2) and watch.reached(3)
  assert signal.getsignal(signal.SIGTERM) == before


@pytest.mark.slow
def test_sigterm_saves_the_step_stops_and_the_rerun_finishes(tmp_path, monkeypatch):
  config = tiny_digits_config(tmp_path / "tfds", steps=8, log_every=4)
  workdir = str(tmp_path / "run")
  real_next = pipeline.TrainIterator.__next__

  def next_then_sigterm(self):
    batch = real_next(self)
    if self.batches_consumed == 3:
      os.kill(os.getpid(), signal.SIGTERM)  # the handler only sets a flag: step 3 is the last
    return batch

  monkeypatch.setattr(pipeline.TrainIterator, "__next__", next_then_sigterm)
  result = training.train_and_evaluate(config, workdir)
  assert result.preempted_at == 3 and int(result.state.step) == 3
  assert os.listdir(os.path.join(workdir, "checkpoints")) == ["3"]
  assert not preemption.is_finished(workdir)
  monkeypatch.setattr(pipeline.TrainIterator, "__next__", real_next)
  result = training.train_and_evaluate(config, workdir)
  assert result.preempted_at is None and int(result.state.step) == 8
  assert preemption.is_finished(workdir)
  with open(os.path.join(workdir, preemption.FINISHED_FILE)) as f:
    assert json.load(f)["step"] == 8


# ------------------------------------------------------------------------------------------------
# The multi-process start settings.

def test_initialize_needs_all_three_explicit_settings(monkeypatch):
  for name in ("COORDINATOR_ADDRESS", "NUM_PROCESSES", "PROCESS_ID"):
    monkeypatch.delenv("ADV_SOUPS_" + name, raising=False)
  with pytest.raises(ValueError, match="missing num_processes, process_id"):
    parallel.initialize(coordinator_address="127.0.0.1:1234")
  monkeypatch.setenv("ADV_SOUPS_NUM_PROCESSES", "2")
  monkeypatch.setenv("ADV_SOUPS_PROCESS_ID", "2")
  with pytest.raises(ValueError, match=r"--process_id=2 must be in \[0, 2\)"):
    parallel.initialize(coordinator_address="127.0.0.1:1234")
  monkeypatch.setenv("ADV_SOUPS_NUM_PROCESSES", "two")
  with pytest.raises(ValueError, match="ADV_SOUPS_NUM_PROCESSES='two' is not an integer"):
    parallel.initialize()
  assert parallel.initialize(num_processes=1) is False  # one process: nothing to start


def test_cluster_detection_reads_slurm_and_open_mpi_variables(monkeypatch):
  for name in list(os.environ):
    if name.startswith(("SLURM_", "OMPI_")):
      monkeypatch.delenv(name)
  monkeypatch.setattr(parallel.os.path, "exists", lambda p: False)
  monkeypatch.setattr(parallel.glob, "glob", lambda p: [])
  assert parallel.detected_cluster() is None
  slurm = dict(SLURM_JOB_ID="7", SLURM_STEP_NODELIST="n[1-2]", SLURM_NTASKS="2",
               SLURM_PROCID="0", SLURM_LOCALID="0")
  for k, v in slurm.items():
    monkeypatch.setenv(k, v)
  assert parallel.detected_cluster() == "SLURM"
  monkeypatch.setenv("SLURM_NTASKS", "1")  # a single task: no multi-process start
  assert parallel.detected_cluster() is None
  monkeypatch.setenv("OMPI_MCA_orte_hnp_uri", "x")
  monkeypatch.setenv("OMPI_COMM_WORLD_SIZE", "4")
  assert parallel.detected_cluster() == "Open MPI"


def test_train_rejects_an_incomplete_multi_process_setting_with_exit_2(tmp_path):
  result = subprocess.run(
      [sys.executable, "-m", "adv_soups.train", "--config=configs/digits.py",
       f"--workdir={tmp_path / 'run'}", "--coordinator_address=127.0.0.1:1234"],
      cwd=REPO, capture_output=True, text=True, timeout=300)
  assert result.returncode == 2
  assert result.stderr.strip().splitlines()[-1].startswith(
      "error: a multi-process start needs --coordinator_address, --num_processes and --process_id")
  assert not (tmp_path / "run").exists()


def test_importing_train_and_demo_defines_no_flags():
  """training.train_and_evaluate is a library function: the programs' flags live in
  training_cli.define_flags()."""
  code = ("from absl import flags; import adv_soups.train, adv_soups.demo, "
          "adv_soups.experiments.adapters; "
          "print(sorted(n for n in ('config', 'workdir', 'overwrite', 'coordinator_address', "
          "'num_processes', 'process_id', 'attack', 'num_examples') if n in flags.FLAGS))")
  result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                          timeout=300)
  assert result.returncode == 0, result.stderr[-2000:]
  assert result.stdout.strip().splitlines()[-1] == "[]"
  values = training_cli.define_flags()
  assert {"config", "workdir", "overwrite", "coordinator_address", "num_processes",
          "process_id"} <= set(values)


# ------------------------------------------------------------------------------------------------
# The launchers.

def test_tpu_pod_dry_run_prints_well_formed_gcloud_commands_with_the_overrides():
  overrides = ["--config.train.steps=1000", "--config.attack.eps=4/255",
               "--config.data.data_dir=gs://bucket/tfds"]
  result = subprocess.run(
      ["bash", "launch/tpu_pod.sh", "--dry_run", "--name=pod1", "--zone=us-central2-b",
       "--accelerator_type=v4-32", "--workdir=gs://bucket/runs/vit", "--spot", "--relaunch",
       "--config=configs/imagenet_vit_b16.py", "--", *overrides],
      cwd=REPO, capture_output=True, text=True, timeout=60)
  assert result.returncode == 0, result.stderr
  commands = [shlex.split(line) for line in result.stdout.splitlines()
              if line.startswith("gcloud compute tpus ")]
  verbs = [tuple(c[1:5]) for c in commands]
  assert ("compute", "tpus", "tpu-vm", "create") in verbs
  assert {("compute", "tpus", "tpu-vm", "ssh"), ("compute", "tpus", "tpu-vm", "scp")} <= set(verbs)
  create = next(c for c in commands if c[4] == "create")
  assert create[5] == "pod1" and {"--zone=us-central2-b", "--accelerator-type=v4-32",
                                  "--spot"} <= set(create)
  ssh = [c for c in commands if c[4] == "ssh"]
  assert all(c[5] == "pod1" and "--worker=all" in c and "--zone=us-central2-b" in c for c in ssh)
  train_cmd = next(shlex.split(c[-1].split("=", 1)[1]) for c in ssh if "adv_soups.train" in c[-1])
  start = train_cmd.index("adv_soups.train")
  assert train_cmd[start + 1:] == ["--config=configs/imagenet_vit_b16.py",
                                   "--workdir=gs://bucket/runs/vit", *overrides]
  assert "gcloud storage ls gs://bucket/runs/vit/FINISHED" in result.stdout  # the relaunch's end
  queued = subprocess.run(
      ["bash", "launch/tpu_pod.sh", "--dry_run", "--queued", "--name=pod1", "--zone=z",
       "--workdir=gs://b/r", "--config=configs/imagenet_vit_b16.py"],
      cwd=REPO, capture_output=True, text=True, timeout=60)
  assert queued.returncode == 0, queued.stderr
  assert "gcloud compute tpus queued-resources create pod1" in queued.stdout


@pytest.mark.parametrize("args, message", [
    (["--dry_run", "--zone=z", "--workdir=gs://b/r"], "--name is required"),
    (["--dry_run", "--name=p", "--zone=z", "--workdir=/local/dir"], "--workdir must be gs://"),
    (["--dry_run", "--name=p", "--zone=z", "--workdir=gs://b/r", "--colour=red"],
     "unknown flag '--colour=red'"),
])
def test_tpu_pod_rejects_bad_flags_with_one_line(args, message):
  result = subprocess.run(["bash", "launch/tpu_pod.sh", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=60)
  assert result.returncode == 2 and result.stdout == ""
  assert len(result.stderr.strip().splitlines()) == 1 and message in result.stderr


def test_local_launcher_rejects_bad_arguments():
  for args, message in ((["zero"], "N must be an integer >= 1"),
                        (["2", "--module=adv_soups.export"], "unknown --module=adv_soups.export"),
                        (["2", "--devices_per_process=0"], "--devices_per_process must be")):
    result = subprocess.run(["bash", "launch/local.sh", *args], cwd=REPO, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 2 and message in result.stderr
