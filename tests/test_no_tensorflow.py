"""Runs without TensorFlow: the in-memory data path (positions from (seed, step), process shards,
registered numpy arrays), and training, exact resume, `load()` and the sweep in a subprocess where
tensorflow and tensorflow_datasets cannot be imported."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from adv_soups import checkpoints, data as data_lib, writers
from adv_soups.data import digits as digits_lib, memory, registry

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# `sys.modules[name] = None` is what an absent package looks like to both `import` (it raises
# ModuleNotFoundError) and `importlib.util.find_spec` (it returns None).
BLOCK = "import sys\nfor _m in ('tensorflow', 'tensorflow_datasets'):\n  sys.modules[_m] = None\n"

WORKER = BLOCK + r'''
import json, os, shutil
import jax, numpy as np
sys.path.insert(0, os.path.join(sys.argv[1], "tests"))
from conftest import tiny_digits_config
import adv_soups
from adv_soups import checkpoints, sweep, train

root = sys.argv[2]
config = tiny_digits_config(os.path.join(root, "no_data_dir"), steps=6, checkpoint_every=3,
                            log_every=3)
config.optimizer.ema_decay = 0.9
full_dir, crashed_dir = os.path.join(root, "full"), os.path.join(root, "crashed")
full = train.train_and_evaluate(config, full_dir)
# A crash after the step-3 checkpoint: a copy of the run without what step 6 wrote.
shutil.copytree(full_dir, crashed_dir)
manager = checkpoints.Checkpoints(crashed_dir)
manager._manager.delete(6)
manager.close()
shutil.rmtree(os.path.join(crashed_dir, "data_state", "6"))
os.remove(os.path.join(crashed_dir, "FINISHED"))
resumed = train.train_and_evaluate(config, crashed_dir)
same = all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(
    jax.tree.leaves((full.state.params, full.state.opt_state, full.state.ema_params)),
    jax.tree.leaves((resumed.state.params, resumed.state.opt_state, resumed.state.ema_params))))
model = adv_soups.load(full_dir)
logits = model.predict(np.zeros((2, 8, 8, 1), np.float32), alpha=0.5)
report = sweep.run_sweep(full_dir, "0,1", attack="pgd", steps=2, num_examples=32, progress=False,
                         checks=False)
# Numpy arrays registered under a name train like any dataset (same pipeline, same step).
from adv_soups import data as data_lib
from adv_soups.data import digits as digits_lib
x, y = digits_lib.split_arrays("train")
data_lib.register_arrays("my_arrays", {"train": (x[:300], y[:300]), "test": (x[300:400],
                                                                          y[300:400])},
                         num_classes=10, preprocess="digits")
config.data.name = "my_arrays"
config.train.update(steps=2, checkpoint_every=0)
arrays_run = train.train_and_evaluate(config, os.path.join(root, "arrays"))
loaded = sorted(m for m, v in sys.modules.items() if v is not None and
                m.split(".")[0] in ("tensorflow", "tensorflow_datasets"))
print("RESULT " + json.dumps({
    "resumed_step": int(resumed.state.step), "bitwise_equal": same,
    "logits_shape": list(np.shape(logits)), "eval_metrics": full.eval_metrics,
    "sweep_rows": len(report["results"]), "arrays_step": int(arrays_run.state.step),
    "arrays_eval": arrays_run.eval_metrics, "sweep_files": sorted(report["files"]),
    "tensorflow_modules": loaded}))
'''


@pytest.mark.slow
def test_train_resume_load_and_sweep_without_tensorflow(tmp_path):
  """Digits training (6 steps, checkpoints at 3 and 6), a resume after a simulated crash at step
  3 (bit-identical parameters, optimizer and EMA state), `load()`, a PGD sweep and 2 steps on
  registered numpy arrays, all in a process where tensorflow / tensorflow_datasets are
  unimportable; none of them gets imported.
  (Mutation: a top-level `import tensorflow` back in workdir.py fails it.)"""
  env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu")
  env["XLA_FLAGS"] = env.get("XLA_FLAGS", "").replace(
      "--xla_force_host_platform_device_count=8", "")  # one device: the fastest on 2 cores
  proc = subprocess.run([sys.executable, "-c", WORKER, REPO, str(tmp_path)], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stderr[-3000:]
  result = json.loads(proc.stdout.split("RESULT ", 1)[1])
  assert result["tensorflow_modules"] == []
  assert result["resumed_step"] == 6 and result["bitwise_equal"]
  assert result["logits_shape"] == [2, 10]
  assert set(result["eval_metrics"]) and all(0 <= v <= 1 for v in result["eval_metrics"].values())
  assert result["sweep_rows"] == 2 and "json" in result["sweep_files"]
  assert result["arrays_step"] == 2 and set(result["arrays_eval"]) == set(result["eval_metrics"])
  # The in-memory position sits where the tf.data iterator state would, one per checkpoint.
  for step in (3, 6):
    position = json.loads((tmp_path / "full" / "data_state" / str(step) / "process_0" /
                           memory.POSITION_FILE).read_text())
    assert position["batches_consumed"] == step
  assert list((tmp_path / "full").glob("events.out.tfevents.*"))


# ------------------------------------------------------------------------------------------------
# The in-memory pipeline, in this process (TensorFlow present: `memory` is called directly).

def digits_spec():
  return registry.get_spec("digits")


def iterator(process_index=0, process_count=1, seed=3, batch=50, spec=None):
  spec = spec or digits_spec()
  return memory.MemoryTrainIterator(spec, local_batch_size=batch, seed=seed,
                                    image_size=spec.image_size, process_index=process_index,
                                    process_count=process_count)


def test_a_batch_is_a_function_of_seed_process_and_step(tmp_path):
  """Save after 4 batches, restore into a fresh iterator: the next batches equal the original's;
  another seed gives other batches. (Mutation: key the augmentation on a counter kept in the
  iterator instead of the step -> the restored batches differ.)"""
  first = iterator()
  for _ in range(4):
    next(first)
  first.save(str(tmp_path))
  expected = [next(first) for _ in range(3)]
  restored = iterator()
  restored.restore(str(tmp_path))
  assert restored.batches_consumed == 4
  for want in expected:
    got = next(restored)
    np.testing.assert_array_equal(got["image"], want["image"])
    np.testing.assert_array_equal(got["label"], want["label"])
  assert not np.array_equal(iterator(seed=4).batch(4)["image"], iterator().batch(4)["image"])


def test_each_epoch_reads_every_example_once_and_augments_within_one_pixel():
  """Batches of 50 over 1,437 examples: the first 1,437 stream positions are a permutation of
  the train split; each image is its source shifted by at most 1 px (zero fill)."""
  it = iterator(batch=1437)
  batch = it.batch(0)
  images, labels = digits_lib.split_arrays("train")
  assert sorted(batch["label"].tolist()) == sorted(labels.tolist())
  assert batch["image"].dtype == np.float32 and batch["label"].dtype == np.int32
  assert 0.0 <= batch["image"].min() and batch["image"].max() <= 1.0
  sources = images.astype(np.float32) / 255.0
  order = it._order(0)
  shifted = 0
  for k in range(0, 1437, 97):
    src = np.pad(sources[order[k]], ((1, 1), (1, 1), (0, 0)))
    windows = [src[t:t + 8, l:l + 8] for t in range(3) for l in range(3)]
    match = [np.array_equal(w, batch["image"][k]) for w in windows]
    assert any(match)
    shifted += not match[4]
  assert shifted > 0  # the crop does move images
  # The next epoch is another permutation of the same examples.
  assert not np.array_equal(it._order(1), it._order(0))


def test_processes_read_disjoint_training_slices_and_cover_evaluation_once():
  """2 processes: their training shards are disjoint halves (one example dropped); evaluation
  slices, padded with mask False to equal batch counts, cover every test example exactly once."""
  shards = [iterator(i, 2, batch=718).batch(0)["label"] for i in range(2)]
  assert [len(s) for s in shards] == [718, 718]
  parts = [iterator(i, 2)._labels for i in range(2)]
  _, labels = digits_lib.split_arrays("train")
  np.testing.assert_array_equal(np.concatenate(parts), labels[:1436])
  seen, batches = [], []
  for i in range(2):
    out = list(memory.eval_batches(digits_spec(), split="test[:101]", batch_size=16,
                                   num_examples=None, image_size=8, process_index=i,
                                   process_count=2))
    batches.append(len(out))
    seen += [b["label"][b["mask"]] for b in out]
    assert memory.process_slice(101, i, 2)[0] == (0, 51)[i]
  assert batches == [data_lib.num_eval_batches(101, 16, 2)] * 2
  np.testing.assert_array_equal(np.concatenate(seen), digits_lib.split_arrays("test")[1][:101])


def test_a_position_of_another_pipeline_or_seed_is_a_mismatch_not_damage(tmp_path):
  """A tf.data iterator checkpoint where an in-memory position is expected, or a position saved
  with another seed, raises RestoreMismatch (never moved aside as damage); nothing at all is a
  plain FileNotFoundError."""
  with pytest.raises(FileNotFoundError):
    iterator().restore(str(tmp_path / "none"))
  tf_dir = tmp_path / "tf" / "process_0"
  tf_dir.mkdir(parents=True)
  (tf_dir / "iterator.index").write_bytes(b"")
  with pytest.raises(checkpoints.RestoreMismatch, match="TensorFlow"):
    iterator().restore(str(tmp_path / "tf"))
  iterator(seed=1).save(str(tmp_path / "seed"))
  with pytest.raises(checkpoints.RestoreMismatch, match="seed"):
    iterator(seed=2).restore(str(tmp_path / "seed"))


def test_digits_are_read_from_memory_only_where_tensorflow_is_missing(monkeypatch):
  assert not memory.uses_memory(digits_spec())  # numbers of TFDS-path runs stand
  monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)
  assert memory.uses_memory(digits_spec())
  assert not memory.uses_memory(registry.get_spec("cifar10"))


def test_randaugment_is_refused_on_the_memory_path(monkeypatch):
  monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)
  config = {"name": "digits", "randaugment": {"num_ops": 2}}
  with pytest.raises(ValueError, match="randaugment.num_ops=2"):
    data_lib.check_available(config)
  data_lib.check_available({"name": "digits"})


@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("tfds"))
  data_lib.prepare_digits(path)
  return path


def test_a_tf_data_iterator_refuses_an_in_memory_position(tfds_dir, tmp_path):
  """The reverse of the test above: a run that read the digits from memory does not resume on
  the TFDS pipeline (RestoreMismatch, so the checkpoint is not moved aside as damaged)."""
  iterator().save(str(tmp_path))
  tf_iterator = data_lib.train_iterator({"name": "digits", "data_dir": tfds_dir},
                                        global_batch_size=8, seed=3)
  with pytest.raises(checkpoints.RestoreMismatch, match="in-memory"):
    tf_iterator.restore(str(tmp_path))


def test_memory_digits_hold_the_tfds_examples(tfds_dir):
  """The in-memory test split is the TFDS builder's, example for example (sorted by index)."""
  builder = data_lib.prepare_digits(tfds_dir)
  examples = sorted(builder.as_dataset(split="test").as_numpy_iterator(), key=lambda e: e["index"])
  images, labels = digits_lib.split_arrays("test")
  np.testing.assert_array_equal(np.stack([e["image"] for e in examples]), images)
  np.testing.assert_array_equal([e["label"] for e in examples], labels)


def test_registered_arrays_train_and_evaluate_through_the_pipeline_functions():
  """Numpy arrays registered under a name go through `train_iterator` / `eval_batches` / the
  split sizes like any dataset; float images stay as given; bad arrays are one ValueError."""
  rng = np.random.default_rng(0)
  train_x = rng.random((40, 4, 4, 3)).astype(np.float32)
  test_x = rng.random((10, 4, 4, 3)).astype(np.float32)
  spec = data_lib.register_arrays("toy_arrays", {
      "train": (train_x, np.arange(40) % 3), "test": (test_x, np.arange(10) % 3)},
      num_classes=3, preprocess="none")
  assert spec.image_shape == (4, 4, 3) and "toy_arrays" in data_lib.dataset_names()
  assert data_lib.dataset_info("toy_arrays") == (3, (4, 4, 3))
  it = data_lib.train_iterator("toy_arrays", global_batch_size=8, seed=0)
  batch = next(it)
  rows = [int(np.flatnonzero((train_x == img).all(axis=(1, 2, 3)))[0]) for img in batch["image"]]
  np.testing.assert_array_equal(batch["label"], np.arange(40)[rows] % 3)
  out = list(data_lib.eval_batches("toy_arrays", batch_size=4))
  assert len(out) == 3 and int(sum(b["mask"].sum() for b in out)) == 10
  np.testing.assert_array_equal(np.concatenate([b["image"][b["mask"]] for b in out]), test_x)
  assert data_lib.split_size("toy_arrays", "test[2:7]", None) == 5
  with pytest.raises(ValueError, match="allowed are train, test"):
    data_lib.eval_batches("toy_arrays", split="validation", batch_size=4)
  with pytest.raises(ValueError, match=r"labels must lie in \[0, 3\)"):
    data_lib.register_arrays("bad", {"train": (train_x, np.arange(40)), "test": (test_x,
                                                                                 np.zeros(10))},
                             num_classes=3)
  with pytest.raises(ValueError, match="taken"):
    data_lib.register_arrays("cifar10", {"train": (train_x, np.zeros(40)),
                                         "test": (test_x, np.zeros(10))}, num_classes=3)


def test_the_tensorflow_free_writer_writes_readable_events(tmp_path):
  """`writers.EventWriter` (used where TensorFlow is absent): scalars read back with TensorBoard's
  own event loader."""
  from tensorboard.backend.event_processing import event_file_loader
  writer = writers.EventWriter(str(tmp_path))
  writer.write_hparams({"seed": 0, "model.variant": "tiny/2"})
  writer.write_scalars(3, {"loss": 1.5, "accuracy": 0.25})
  writer.close()
  files = list(tmp_path.glob("events.out.tfevents.*"))
  assert len(files) == 1
  scalars = {(v.tag, e.step): v.simple_value for e in event_file_loader.LegacyEventFileLoader(
      str(files[0])).Load() for v in e.summary.value if v.HasField("simple_value")}
  assert scalars == {("loss", 3): 1.5, ("accuracy", 3): 0.25}


def test_cifar_augmentation_is_a_4px_crop_and_sometimes_a_mirror():
  """preprocess='cifar' on registered arrays: each training image is a 4-px-padded crop of its
  source, mirrored left-right for about half of them. (Mutation: flip along the height axis.)"""
  rng = np.random.default_rng(1)
  x = rng.integers(0, 256, (64, 6, 6, 3), dtype=np.uint8)
  spec = data_lib.register_arrays("toy_cifar", {"train": (x, np.arange(64) % 10),
                                                "test": (x[:4], np.zeros(4))},
                                  num_classes=10, preprocess="cifar")
  it = iterator(spec=spec, batch=64)
  batch, order = it.batch(0), it._order(0)
  mirrored = 0
  for k in range(64):
    src = np.pad(x[order[k]].astype(np.float32) / 255.0, ((4, 4), (4, 4), (0, 0)))
    windows = [src[t:t + 6, l:l + 6] for t in range(9) for l in range(9)]
    plain = any(np.array_equal(w, batch["image"][k]) for w in windows)
    mirror = any(np.array_equal(w[:, ::-1], batch["image"][k]) for w in windows)
    assert plain or mirror
    mirrored += mirror and not plain
  assert 16 <= mirrored <= 48


def test_other_image_sizes_are_resized():
  """image_size 16 on the 8x8 digits: [b, 16, 16, 1] batches in [0, 1]; a constant image stays
  constant (linear, antialiased resize)."""
  batch = next(memory.eval_batches(digits_spec(), split="test[:5]", batch_size=5,
                                   num_examples=None, image_size=16, process_index=0,
                                   process_count=1))
  assert batch["image"].shape == (5, 16, 16, 1)
  assert 0.0 <= batch["image"].min() and batch["image"].max() <= 1.0
  np.testing.assert_allclose(memory._resize(np.full((2, 8, 8, 1), 0.5, np.float32), 16), 0.5,
                             atol=1e-6)
  assert iterator().batch(0)["image"].shape == (50, 8, 8, 1)
