"""Public ViT weights in (vision_transformer / big_vision .npz), adapter-only training, soups out.

Checkpoints are built here from reference-shaped trees with the reference key names (tiny: width
32, depth 2), never downloaded. The correspondence with our parameters is spelled out by hand in
`set_directly`, independently of the library's name table.
"""
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from adv_soups import checkpoints, export, loading, parallel, soups, training
from adv_soups.models import create_model, init_params, npz
from conftest import tiny_digits_config, write_untrained_workdir

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
POS = "Transformer/posembed_input/pos_embedding"
WIDTH, DEPTH, HEADS, MLP, PATCH = 32, 2, 2, 64, 4
MODEL = dict(variant="tiny/4", width=WIDTH, depth=DEPTH, num_heads=HEADS, mlp_dim=MLP,
             num_classes=10, image_size=16, num_domains=2, mean=(0.5,), std=(0.5,))


def reference_tree(seed=0, width=WIDTH, depth=DEPTH, classes=10, grid=4, channels=3):
  """Random weights under the google-research/vision_transformer key names and shapes."""
  rng = np.random.RandomState(seed)
  normal = lambda *shape: (0.2 * rng.randn(*shape)).astype(np.float32)
  head_dim = width // HEADS
  ref = {"embedding/kernel": normal(PATCH, PATCH, channels, width),
         "embedding/bias": normal(width), "cls": normal(1, 1, width),
         POS: normal(1, 1 + grid * grid, width),
         "Transformer/encoder_norm/scale": 1 + normal(width),
         "Transformer/encoder_norm/bias": normal(width),
         "head/kernel": normal(width, classes), "head/bias": normal(classes)}
  for i in range(depth):
    b = f"Transformer/encoderblock_{i}/"
    for ln in ("LayerNorm_0", "LayerNorm_2"):
      ref[f"{b}{ln}/scale"], ref[f"{b}{ln}/bias"] = 1 + normal(width), normal(width)
    for n in ("query", "key", "value"):
      ref[f"{b}MultiHeadDotProductAttention_1/{n}/kernel"] = normal(width, HEADS, head_dim)
      ref[f"{b}MultiHeadDotProductAttention_1/{n}/bias"] = normal(HEADS, head_dim)
    ref[f"{b}MultiHeadDotProductAttention_1/out/kernel"] = normal(HEADS, head_dim, width)
    ref[f"{b}MultiHeadDotProductAttention_1/out/bias"] = normal(width)
    ref[f"{b}MlpBlock_3/Dense_0/kernel"], ref[f"{b}MlpBlock_3/Dense_0/bias"] = (
        normal(width, MLP), normal(MLP))
    ref[f"{b}MlpBlock_3/Dense_1/kernel"], ref[f"{b}MlpBlock_3/Dense_1/bias"] = (
        normal(MLP, width), normal(width))
  return ref


def to_big_vision(ref, scanned):
  """The same weights as a big_vision pool_type='tok' checkpoint (keys under params/)."""
  rename = {"LayerNorm_0": "LayerNorm_0", "MultiHeadDotProductAttention_1":
            "MultiHeadDotProductAttention_0", "LayerNorm_2": "LayerNorm_1",
            "MlpBlock_3": "MlpBlock_0"}
  assert not ref[POS][0, 0].any(), "big_vision's class token has no position embedding"
  out, blocks = {"pos_embedding": ref[POS][:, 1:]}, {}
  for key, value in ref.items():
    if key.startswith("Transformer/encoderblock_"):
      index, module, rest = key[len("Transformer/encoderblock_"):].split("/", 2)
      blocks.setdefault(f"{rename[module]}/{rest}", {})[int(index)] = value
    elif key != POS:
      out[key] = value
  for rest, per_block in blocks.items():
    if scanned:
      out[f"Transformer/encoderblock/{rest}"] = np.stack([per_block[i] for i in sorted(per_block)])
    else:
      out.update({f"Transformer/encoderblock_{i}/{rest}": v for i, v in per_block.items()})
  return {f"params/{k}": v for k, v in out.items()}


def set_directly(ref, adapter, domains=2):
  """Our parameter tree holding the reference weights, assigned by hand."""
  per_domain = lambda x: np.stack([x] * domains)

  def norm(prefix):
    scale, bias = ref[prefix + "/scale"], ref[prefix + "/bias"]
    if adapter == "norm":
      return {"domain_scale": per_domain(scale), "domain_bias": per_domain(bias)}
    return {"ln": {"scale": scale, "bias": bias}}

  params = {"embedding": {"kernel": ref["embedding/kernel"], "bias": ref["embedding/bias"]},
            "pos_embedding": ref[POS], "final_norm": norm("Transformer/encoder_norm")}
  params["cls_token"] = ({"domain_cls": np.concatenate([ref["cls"]] * domains)}
                         if adapter == "token" else {"cls": ref["cls"]})
  params["head"] = ({"domain_kernel": per_domain(ref["head/kernel"]),
                     "domain_bias": per_domain(ref["head/bias"])} if adapter == "head"
                    else {"dense": {"kernel": ref["head/kernel"], "bias": ref["head/bias"]}})
  for i in range(DEPTH):
    b = f"Transformer/encoderblock_{i}/"
    mha = b + "MultiHeadDotProductAttention_1/"
    params[f"block{i:02d}"] = {
        "norm1": norm(b + "LayerNorm_0"), "norm2": norm(b + "LayerNorm_2"),
        "attention": {n: {"kernel": ref[f"{mha}{n}/kernel"], "bias": ref[f"{mha}{n}/bias"]}
                      for n in ("query", "key", "value", "out")},
        "mlp": {f"Dense_{j}": {"kernel": ref[f"{b}MlpBlock_3/Dense_{j}/kernel"],
                               "bias": ref[f"{b}MlpBlock_3/Dense_{j}/bias"]} for j in (0, 1)}}
  return params


def images(n=4, size=16, channels=3, seed=1):
  return np.random.RandomState(seed).rand(n, size, size, channels).astype(np.float32)


def logits_per_domain(model, params, x):
  return [np.asarray(model.apply({"params": params}, x, np.full(len(x), d, np.int32)))
          for d in range(model.num_domains)]


def fresh(config):
  model = create_model(config)
  return model, init_params(model, jax.random.key(7))


@pytest.mark.parametrize("layout", ["vision_transformer", "big_vision", "big_vision_scanned"])
@pytest.mark.parametrize("adapter", ["token", "norm", "head"])
def test_each_layout_loads_with_the_logits_of_the_same_weights_set_directly(
    layout, adapter, tmp_path):
  ref = reference_tree()
  if layout.startswith("big_vision"):
    ref[POS][0, 0] = 0.0
    flat = to_big_vision(ref, scanned=layout.endswith("scanned"))
  else:
    flat = ref
  path = str(tmp_path / "w.npz")
  np.savez(path, **flat)
  config = dict(MODEL, adapter=adapter)
  model, init = fresh(config)
  loaded = npz.load_pretrained(init, path, config)
  direct = set_directly(ref, adapter)
  assert jax.tree.structure(loaded) == jax.tree.structure(jax.tree.map(np.asarray, direct))
  x = images()
  for got, want in zip(logits_per_domain(model, loaded, x), logits_per_domain(model, direct, x)):
    np.testing.assert_array_equal(got, want)
  assert np.abs(want).max() > 0.1  # a loaded head, not the zero-initialised one


@pytest.mark.parametrize("change", ["classes", "pre_logits"])
def test_head_is_reinitialised_when_classes_differ_or_pre_logits_is_dropped(change, tmp_path):
  ref = reference_tree(classes=21 if change == "classes" else 10)
  if change == "pre_logits":  # an ImageNet-21k file: a tanh layer before the head
    ref["pre_logits/kernel"], ref["pre_logits/bias"] = np.ones((WIDTH, WIDTH), np.float32), \
        np.ones(WIDTH, np.float32)
  path = str(tmp_path / "w.npz")
  np.savez(path, **ref)
  config = dict(MODEL, adapter="token")
  _, init = fresh(config)
  loaded = npz.load_pretrained(init, path, config)
  np.testing.assert_array_equal(loaded["head"]["dense"]["kernel"], init["head"]["dense"]["kernel"])
  np.testing.assert_array_equal(loaded["embedding"]["kernel"], ref["embedding/kernel"])
  report = npz.check_pretrained(jax.eval_shape(lambda: init), path, config, 3)
  assert report["head_loaded"] is False


def test_resampling_keeps_the_class_row_and_is_the_identity_on_the_same_grid():
  rng = np.random.RandomState(0)
  posemb = rng.randn(1, 1 + 16, 8).astype(np.float32)
  assert npz.resample_posemb(posemb, 4) is posemb
  # A linear function of the grid position is reproduced exactly by bilinear resampling with
  # aligned end points (cell (a, b) of 7x7 sits at (a, b) * 3/6 on the 4x4 grid).
  i, j = np.meshgrid(np.arange(4), np.arange(4), indexing="ij")
  coef = rng.randn(3, 8)
  grid = i[..., None] * coef[0] + j[..., None] * coef[1] + coef[2]
  linear = np.concatenate([posemb[:, :1], grid.reshape(1, 16, 8)], axis=1).astype(np.float32)
  out = npz.resample_posemb(linear, 7)
  assert out.shape == (1, 50, 8)
  np.testing.assert_array_equal(out[:, 0], linear[:, 0])
  a, b = np.meshgrid(np.arange(7) * 0.5, np.arange(7) * 0.5, indexing="ij")
  want = a[..., None] * coef[0] + b[..., None] * coef[1] + coef[2]
  np.testing.assert_allclose(out[0, 1:], want.reshape(49, 8), atol=1e-5)
  scipy_ndimage = pytest.importorskip("scipy.ndimage")  # what the reference loaders call
  zoomed = scipy_ndimage.zoom(posemb[0, 1:].reshape(4, 4, 8).astype(np.float64), (7 / 4, 7 / 4, 1),
                              order=1)
  np.testing.assert_allclose(npz.resample_posemb(posemb, 7)[0, 1:], zoomed.reshape(49, 8),
                             atol=1e-5)


def test_a_larger_input_resamples_the_grid_on_import(tmp_path):
  ref = reference_tree(grid=4)
  path = str(tmp_path / "w.npz")
  np.savez(path, **ref)
  config = dict(MODEL, adapter="token", image_size=24)  # 6x6 patches
  _, init = fresh(config)
  loaded = npz.load_pretrained(init, path, config)
  assert loaded["pos_embedding"].shape == (1, 37, WIDTH)
  np.testing.assert_array_equal(loaded["pos_embedding"][:, 0], ref[POS][:, 0])


def _error(tmp_path, flat, config=None):
  path = str(tmp_path / "w.npz")
  np.savez(path, **flat)
  config = config or dict(MODEL, adapter="token")
  _, init = fresh(config)
  with pytest.raises(ValueError) as info:
    npz.load_pretrained(init, path, config)
  with pytest.raises(ValueError) as checked:  # the header-only check says the same
    npz.check_pretrained(jax.eval_shape(lambda: init), path, config, 3)
  message = str(info.value)
  assert message == str(checked.value) and "\n" not in message
  return message


@pytest.mark.parametrize("case, expected", [
    ("layout", ["not a ViT checkpoint", "weights/w1"]),
    ("width", ["does not fit", "encoderblock_0/MultiHeadDotProductAttention_1/key/bias: file "
               "(2, 24), model (2, 16)", "more"]),
    ("depth", ["has keys the configured model lacks", "encoderblock_2"]),
    ("patch", ["embedding/kernel: file (2, 2, 3, 32), model (4, 4, 3, 32)"]),
    ("gap", ["pool_type 'gap'", "no key cls"]),
    ("map", ["pool_type='map'"]),
    ("mean", ["expects inputs normalised with mean=(0.5,)", "config.model.mean=(0.4,)"]),
])
def test_wrong_files_give_one_line_naming_keys_or_shapes(case, expected, tmp_path):
  config = None
  if case == "layout":
    flat = {"weights/w1": np.zeros(3), "weights/w2": np.zeros(3)}
  elif case == "width":
    flat = reference_tree(width=48)
  elif case == "depth":
    flat = reference_tree(depth=3)
  elif case == "patch":
    flat = reference_tree()
    flat["embedding/kernel"] = np.zeros((2, 2, 3, WIDTH), np.float32)
  elif case in ("gap", "map"):
    ref = reference_tree()
    ref[POS][0, 0] = 0.0
    flat = to_big_vision(ref, scanned=True)
    if case == "gap":
      del flat["params/cls"]
    else:
      flat["params/MAPHead_0/probe"] = np.zeros((1, 1, WIDTH), np.float32)
  else:
    flat, config = reference_tree(), dict(MODEL, adapter="token", mean=(0.4,))
  message = _error(tmp_path, flat, config)
  for text in expected:
    assert text in message, message


def test_a_missing_file_is_one_line(tmp_path):
  config = dict(MODEL, adapter="token")
  _, init = fresh(config)
  with pytest.raises(ValueError, match="no such file"):
    npz.load_pretrained(init, str(tmp_path / "nope.npz"), config)


# ------------------------------------------------------------------------------------------------
# Training with config.model.init_from and config.train.trainable.

def test_adapters_training_keeps_every_shared_parameter_bit_identical(tmp_path):
  config = tiny_digits_config(tmp_path / "tfds", trainable="adapters", steps=4, batch_size=16)
  config.attack.num_steps = 1  # the backbone is attacked all the same; keeps the compile small
  raw_model = create_model(training.resolve_config(config).model)
  rng = np.random.RandomState(0)
  source = jax.tree.map(lambda x: (0.1 * rng.randn(*x.shape)).astype(np.float32),
                        jax.eval_shape(lambda: init_params(raw_model, jax.random.key(3), 1)))
  source["block00"]["mlp"]["Dense_0"]["bias"][0] = -0.0  # p + 0.0 would flip its sign bit
  path = str(tmp_path / "start.npz")
  npz.write_npz(path, npz.export_arrays(soups.interpolate(source, [1.0, 0.0])))
  config.model.init_from = path
  config = training.resolve_config(config)
  assert config.train.trainable == training.ADAPTERS_REGEX  # the head comes from the file
  model = create_model(config.model)
  optimizer = training.make_optimizer(config.optimizer, config.train.steps, config.train.trainable)
  mesh = parallel.make_mesh(jax.devices()[:1])
  state = jax.device_put(training.init_state(config, model, optimizer), parallel.replicated(mesh))
  start = jax.tree.map(np.array, state.params)
  np.testing.assert_array_equal(start["block00"]["mlp"]["Dense_0"]["kernel"],
                                source["block00"]["mlp"]["Dense_0"]["kernel"])
  assert np.signbit(start["block00"]["mlp"]["Dense_0"]["bias"][0])
  # No optimizer state for the frozen leaves: Adam's two moments cover the tokens only.
  state_size = sum(x.size for x in jax.tree.leaves(state.opt_state) if x.ndim > 0)
  assert state_size == 2 * start["cls_token"]["domain_cls"].size
  step = training.make_train_step(config, model, optimizer, mesh)
  for _ in range(3):
    batch = {"image": rng.rand(16, 8, 8, 1).astype(np.float32),
             "label": rng.randint(0, 10, 16).astype(np.int32)}
    batch = parallel.shard_batch(mesh, batch)
    state, _ = step(state, batch)
  end = jax.tree.map(np.array, state.params)
  specific = soups.domain_specific(end)
  for (path_, before), after, own in zip(jax.tree_util.tree_leaves_with_path(start),
                                         jax.tree.leaves(end), jax.tree.leaves(specific)):
    if own:
      assert not np.array_equal(before, after), path_
    else:
      assert before.tobytes() == after.tobytes(), jax.tree_util.keystr(path_)
  # No gradient for the frozen leaves (stop_gradient): fewer matmuls than the same step training
  # everything, whose extra ones are the backbone's weight gradients.
  all_config = config.copy_and_resolve_references()
  all_config.train.trainable = "all"
  all_optimizer = training.make_optimizer(all_config.optimizer, 4)
  all_state = jax.eval_shape(lambda: training.init_state(all_config, model, all_optimizer))
  count = lambda text: text.count("dot_general")
  frozen_dots = count(step.lower(state, batch).as_text())
  all_dots = count(training.make_train_step(all_config, model, all_optimizer, mesh)
                   .lower(all_state, batch).as_text())
  assert frozen_dots < all_dots
  manager = checkpoints.Checkpoints(str(tmp_path / "run"))  # the masked state checkpoints
  manager.save(3, {}, params=state.params, opt_state=state.opt_state)
  restored = manager.restore(3, targets={"opt_state": state.opt_state}, items=("opt_state",))
  manager.close()
  assert jax.tree.structure(restored["opt_state"]) == jax.tree.structure(state.opt_state)


def test_clipping_sees_only_the_trainable_parameters():
  config = tiny_digits_config("unused")
  opt = config.optimizer
  opt.update(name="sgd", momentum=0.0, weight_decay=0.0, grad_clip_norm=1.0, warmup_steps=0,
             schedule="constant", learning_rate=1.0)
  params = {"frozen": {"kernel": np.ones(4, np.float32)},
            "tok": {"domain_cls": np.zeros(3, np.float32)}}
  grads = {"frozen": {"kernel": np.full(4, 100.0, np.float32)},
           "tok": {"domain_cls": np.array([0.3, 0.4, 0.0], np.float32)}}  # norm 0.5: unclipped
  tx = training.make_optimizer(opt, 10, "adapters")
  updates, _ = tx.update(grads, tx.init(params), params)
  np.testing.assert_allclose(updates["tok"]["domain_cls"], [-0.3, -0.4, 0.0], rtol=1e-6)
  np.testing.assert_array_equal(updates["frozen"]["kernel"], 0.0)


@pytest.mark.parametrize("trainable, expected", [
    ("block.*/nope", "matches none of the model's parameters"),
    ("(", "allowed 'all', 'adapters' or a regex"),
])
def test_bad_trainable_is_one_line(trainable, expected, tmp_path):
  with pytest.raises(ValueError, match=expected):
    training.resolve_config(tiny_digits_config(tmp_path, trainable=trainable))


@pytest.mark.slow
def test_train_cli_refuses_a_file_that_does_not_fit_and_writes_nothing(tmp_path):
  path = str(tmp_path / "big.npz")
  np.savez(path, **reference_tree(width=48))
  workdir = tmp_path / "run"
  result = subprocess.run(
      [sys.executable, "-m", "adv_soups.train", "--config=configs/digits.py",
       f"--workdir={workdir}", f"--config.model.init_from={path}"],
      cwd=REPO, capture_output=True, text=True, timeout=300)
  assert result.returncode == 2, result.stderr[-2000:]
  last = result.stderr.strip().splitlines()[-1]
  assert last.startswith("error: ") and "does not fit" in last and "key/bias" in last
  assert "Traceback" not in result.stderr and not workdir.exists()


# ------------------------------------------------------------------------------------------------
# Export.

@pytest.fixture(scope="module")
def workdirs(tmp_path_factory):
  """Untrained two-domain digits workdirs (noisy parameters) for each adapter."""
  out = {}
  for adapter in ("token", "norm", "head"):
    root = tmp_path_factory.mktemp(f"export_{adapter}")
    config = tiny_digits_config(root / "tfds")
    config.model.adapter = adapter
    write_untrained_workdir(root / "wd", config, noise=0.2)
    out[adapter] = str(root / "wd")
  return out


@pytest.mark.parametrize("adapter", ["token", "norm", "head"])
def test_export_then_import_gives_the_soups_logits(adapter, workdirs, tmp_path):
  run = loading.load(workdirs[adapter])
  x = images(8, size=8, channels=1)
  single_cfg = dict(run.config.model.to_dict(), num_domains=1)
  single = create_model(single_cfg)
  for alpha in (0.0, 0.5, 1.0):
    out = str(tmp_path / f"soup_{alpha}.npz")
    export.main(["export", f"--workdir={workdirs[adapter]}", f"--alpha={alpha}", f"--out={out}"])
    with open(npz.sidecar_path(out)) as f:
      meta = json.load(f)
    assert (meta["mean"], meta["std"], meta["image_size"], meta["num_classes"]) == (
        [0.5], [0.5], 8, 10)
    params = npz.load_pretrained(init_params(single, jax.random.key(9), 1), out, single_cfg, 1)
    got = np.asarray(single.apply({"params": params}, x))
    want = np.asarray(run.predict(x, alpha=alpha))
    np.testing.assert_allclose(got, want, atol=1e-5)
  assert not np.allclose(got, np.asarray(run.predict(x, alpha=0.0)), atol=1e-3)  # soups differ


@pytest.mark.parametrize("args, expected", [
    (["--alpha=1.5"], "outside [0, 1]"),
    (["--alpha=abc"], "malformed --alpha 'abc'"),
    (["--alpha=0.5", "--workdir={tmp}/nowhere"], "{tmp}/nowhere"),
    (["--alpha=0.5", "--out={tmp}/soup.bin"], "must end with .npz"),
    (["--alpha=0.5", "--bogus=1"], "bogus"),
])
def test_export_cli_bad_input_exits_2_and_writes_nothing(args, expected, workdirs, tmp_path,
                                                         capsys):
  argv = ["export", f"--workdir={workdirs['token']}", f"--out={tmp_path}/soup.npz"]
  argv += [a.format(tmp=tmp_path) for a in args]
  with pytest.raises(SystemExit) as info:
    export.main(argv)
  assert info.value.code == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith("error: ") and expected.format(tmp=tmp_path) in err[0]
  assert os.listdir(tmp_path) == []


def test_timm_loads_an_export_with_the_same_logits(workdirs, tmp_path):
  torch = pytest.importorskip("torch")
  vision_transformer = pytest.importorskip("timm.models.vision_transformer")
  run = loading.load(workdirs["token"])
  out = str(tmp_path / "soup.npz")
  meta = export.export_soup(workdirs["token"], 0.3, out)
  vit = vision_transformer.VisionTransformer(
      img_size=meta["image_size"], patch_size=meta["patch_size"], in_chans=meta["channels"],
      num_classes=meta["num_classes"], embed_dim=meta["width"], depth=meta["depth"],
      num_heads=meta["num_heads"], mlp_ratio=meta["mlp_dim"] / meta["width"], qkv_bias=True,
      class_token=True, global_pool="token")
  vit.load_pretrained(out)  # timm's own .npz loader (_load_weights)
  vit.eval()
  x = images(8, size=8, channels=1)
  normalised = (x - np.asarray(meta["mean"])) / np.asarray(meta["std"])
  with torch.no_grad():
    got = vit(torch.from_numpy(normalised.transpose(0, 3, 1, 2).astype(np.float32))).numpy()
  np.testing.assert_allclose(got, np.asarray(run.predict(x, alpha=0.3)), atol=1e-4)
