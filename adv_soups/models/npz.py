"""Public ViT checkpoints (.npz) in and out: the google-research/vision_transformer and big_vision
layouts, position-embedding resampling, and the export of a single-domain model.

Reading (`load_pretrained`, `check_pretrained`): a file is first brought to the *reference layout*,
the flat key names of google-research/vision_transformer (`embedding/kernel`, `cls`,
`Transformer/posembed_input/pos_embedding` with a class-token row, `Transformer/encoderblock_{i}/
{LayerNorm_0, MultiHeadDotProductAttention_1, LayerNorm_2, MlpBlock_3}`, `Transformer/encoder_norm`,
`head`). Accepted files:
- vision_transformer (AugReg, ImageNet-21k, ...): as is; a `pre_logits` layer (21k files) is
  dropped as the reference loaders drop it, and then the head is not loaded either.
- big_vision with `pool_type='tok'`: keys optionally under `params/` (or `opt/target/`), blocks
  `encoderblock_{i}` or scanned (`Transformer/encoderblock/...` stacked on a leading depth axis),
  `MultiHeadDotProductAttention_0`, `LayerNorm_1`, `MlpBlock_0`, a top-level `pos_embedding` over
  the patch grid only. Its class token gets no position embedding, so a zero row is prepended for
  it: the function computed is unchanged.
- refused with one line: big_vision `gap` / `0` pooling (no class token, and our head reads the
  class token: a zero token would not compute the file's function), `map` pooling (an attention-
  pooling head we do not have), sin-cos position embeddings (no `pos_embedding` in the file), hybrid
  ResNet stems and any other unknown key.

The reference layout is then mapped onto our parameters by name (`reference_key`): the class token
goes into every domain's token, LayerNorm scale / bias into every domain's slot of the `norm`
adapter, the head into every domain's head of the `head` adapter; the position grid is resampled
bilinearly when the configured grid differs (the class-token row kept); the head keeps its fresh
initialisation when the number of classes differs. Inputs: the files expect images normalised as
(x - mean) / std, [-1, 1] for every vision_transformer and big_vision release (mean = std = 0.5);
our model normalises inside with `config.model.mean` / `std`, which must match (a JSON sidecar
`NAME.json` beside `NAME.npz`, as `export` writes, names a file's own normalisation).
"""
from __future__ import annotations

import io
import json
import os
import re
import zipfile
from typing import Any, Callable

import jax
import numpy as np
from etils import epath
from absl import logging

from adv_soups.models.adapters import DOMAIN_PREFIX

REFERENCE_LAYOUT = "vision_transformer"
BIG_VISION_LAYOUT = "big_vision"
FILE_NORMALISATION = {"mean": (0.5,), "std": (0.5,)}  # [-1, 1]: every public release
_PREFIXES = ("params/", "opt/target/")
# big_vision block module names -> the reference's.
_BIG_VISION_BLOCK = {"LayerNorm_0": "LayerNorm_0", "MultiHeadDotProductAttention_0":
                     "MultiHeadDotProductAttention_1", "LayerNorm_1": "LayerNorm_2",
                     "MlpBlock_0": "MlpBlock_3"}


# ------------------------------------------------------------------------------------------------
# Files.

def sidecar_path(npz_path: str) -> str:
  """`dir/soup.npz` -> `dir/soup.json` (the normalisation / resolution / classes sidecar)."""
  root, ext = os.path.splitext(npz_path)
  return (root if ext == ".npz" else npz_path) + ".json"


def _open(path: str):
  if not epath.Path(path).exists():
    raise ValueError(f"init_from={path!r}: no such file")
  if "://" in path:  # remote: np.load and zipfile need seeks; read it once into memory
    with epath.Path(path).open("rb") as f:
      return io.BytesIO(f.read())
  return open(path, "rb")


def read_npz(path: str) -> dict[str, np.ndarray]:
  """Every array of an .npz file (any path etils.epath reads), flat keys -> arrays.

  `allow_pickle=False`: an object array in the file is an error, never code execution.
  """
  with _open(path) as f:
    try:
      with np.load(f, allow_pickle=False) as data:
        return {k: data[k] for k in data.files}
    except (ValueError, zipfile.BadZipFile, OSError) as e:
      raise ValueError(f"init_from={path!r} is not a readable .npz file ({e})") from None


def read_npz_shapes(path: str) -> dict[str, np.ndarray]:
  """The arrays of an .npz file as zero-stride placeholders of the right shape and dtype (reads
  only the .npy headers, so checking a ViT-L file costs kilobytes, not gigabytes)."""
  out = {}
  with _open(path) as f:
    try:
      with zipfile.ZipFile(f) as archive:
        for name in archive.namelist():
          with archive.open(name) as member:
            version = np.lib.format.read_magic(member)
            read = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                    else np.lib.format.read_array_header_2_0)
            shape, _, dtype = read(member)
          if dtype.hasobject:
            raise ValueError(f"init_from={path!r}: array {name!r} holds Python objects")
          key = name[:-4] if name.endswith(".npy") else name
          out[key] = np.broadcast_to(np.zeros((), dtype), shape)
    except (zipfile.BadZipFile, OSError) as e:
      raise ValueError(f"init_from={path!r} is not a readable .npz file ({e})") from None
  return out


def write_npz(path: str, arrays: dict[str, np.ndarray]) -> None:
  """Writes flat `arrays` as an uncompressed .npz (etils.epath: local or gs://)."""
  buffer = io.BytesIO()
  np.savez(buffer, **arrays)
  with epath.Path(path).open("wb") as f:
    f.write(buffer.getvalue())


def file_normalisation(path: str) -> dict[str, tuple[float, ...]]:
  """The input normalisation a checkpoint expects: its JSON sidecar's `mean` / `std` when there
  is one (our exports), else [-1, 1] (mean = std = 0.5), the convention of every public release."""
  side = sidecar_path(path)
  if side != path and epath.Path(side).exists():
    with epath.Path(side).open() as f:
      meta = json.load(f)
    if "mean" in meta and "std" in meta:
      return {"mean": tuple(meta["mean"]), "std": tuple(meta["std"])}
  return dict(FILE_NORMALISATION)


# ------------------------------------------------------------------------------------------------
# Layouts.

def _short(keys, limit: int = 6) -> str:
  keys = sorted(keys)
  more = f" and {len(keys) - limit} more" if len(keys) > limit else ""
  return "[" + ", ".join(keys[:limit]) + "]" + more


def _strip_prefix(flat: dict[str, Any]) -> dict[str, Any]:
  for prefix in _PREFIXES:
    if prefix + "embedding/kernel" in flat:
      return {k[len(prefix):]: v for k, v in flat.items() if k.startswith(prefix)}
  return flat


def detect_layout(flat: dict[str, Any], path: str = "checkpoint") -> str:
  """'vision_transformer' or 'big_vision' for flat keys (after a `params/` prefix is stripped);
  ValueError (one line naming the keys expected and found) for anything else."""
  if "Transformer/posembed_input/pos_embedding" in flat and any(
      "/MultiHeadDotProductAttention_1/" in k for k in flat):
    return REFERENCE_LAYOUT
  if any(k.startswith("Transformer/encoderblock") and "/MultiHeadDotProductAttention_0/" in k
         for k in flat):
    return BIG_VISION_LAYOUT
  raise ValueError(
      f"{path} is not a ViT checkpoint in the vision_transformer layout (keys embedding/kernel, "
      "Transformer/posembed_input/pos_embedding, Transformer/encoderblock_0/"
      "MultiHeadDotProductAttention_1/...) or the big_vision layout (keys [params/]pos_embedding, "
      "Transformer/encoderblock[_0]/MultiHeadDotProductAttention_0/...); found keys "
      f"{_short(flat)}")


def _big_vision_to_reference(flat: dict[str, Any], path: str) -> dict[str, Any]:
  if any(k.startswith("MAPHead_0/") or k == "probe" for k in flat):
    raise ValueError(f"{path} is a big_vision ViT with pool_type='map' (keys MAPHead_0/...): "
                     "only pool_type='tok' (a class token, key cls) loads into our model")
  if "cls" not in flat:
    raise ValueError(f"{path} is a big_vision ViT without a class token (pool_type 'gap' or '0', "
                     "no key cls): our head reads the class token, so only pool_type='tok' files "
                     "load")
  out = {}
  for key, value in flat.items():
    if key.startswith("Transformer/encoderblock/"):  # scanned: a leading depth axis
      rest = key[len("Transformer/encoderblock/"):]
      for i in range(value.shape[0]):
        out[f"Transformer/encoderblock_{i}/{rest}"] = value[i]
    else:
      out[key] = value
  renamed = {}
  for key, value in out.items():
    match = re.fullmatch(r"(Transformer/encoderblock_\d+)/([^/]+)/(.*)", key)
    if match and match.group(2) in _BIG_VISION_BLOCK:
      key = f"{match.group(1)}/{_BIG_VISION_BLOCK[match.group(2)]}/{match.group(3)}"
    renamed[key] = value
  for old in ("pos_embedding", "Transformer/pos_embedding"):  # big_vision's (and its older) place
    if old in renamed:
      renamed["Transformer/posembed_input/pos_embedding"] = renamed.pop(old)
  pos = renamed.get("Transformer/posembed_input/pos_embedding")
  if pos is None:
    raise ValueError(f"{path} has no learned position embedding (key pos_embedding; a sin-cos "
                     "big_vision model?): only learned position embeddings load")
  rows = pos.shape[1]
  if int(np.sqrt(rows)) ** 2 == rows:  # grid only: the class token had no position embedding
    zero = np.zeros((1, 1, pos.shape[2]), pos.dtype)
    renamed["Transformer/posembed_input/pos_embedding"] = np.concatenate([zero, pos], axis=1)
  return renamed


def to_reference_layout(flat: dict[str, Any], path: str = "checkpoint") -> tuple[dict, str]:
  """(flat arrays in the vision_transformer layout, the file's layout name) for a file's flat
  arrays in either supported layout. ValueError (one line) for any other file."""
  flat = _strip_prefix(dict(flat))
  layout = detect_layout(flat, path)
  if layout == BIG_VISION_LAYOUT:
    flat = _big_vision_to_reference(flat, path)
  return flat, layout


# ------------------------------------------------------------------------------------------------
# Position embeddings.

def _bilinear_matrix(old: int, new: int) -> np.ndarray:
  """[new, old] weights of 1-D linear interpolation with the end points aligned (as
  scipy.ndimage.zoom(order=1), which the reference loaders use)."""
  if old == 1:
    return np.ones((new, 1))
  coords = np.arange(new) * ((old - 1) / (new - 1)) if new > 1 else np.zeros(1)
  low = np.clip(np.floor(coords).astype(int), 0, old - 2)
  frac = coords - low
  weights = np.zeros((new, old))
  weights[np.arange(new), low] = 1.0 - frac
  weights[np.arange(new), low + 1] += frac
  return weights


def resample_posemb(posemb: np.ndarray, grid: int) -> np.ndarray:
  """Position embedding [1, 1 + g*g, W] (class-token row first) -> [1, 1 + grid*grid, W]: the
  class-token row unchanged, the g x g grid resampled bilinearly (float64 arithmetic, returned in
  the input dtype). The identity (the same array) when the grid already has `grid` x `grid`."""
  rows, width = posemb.shape[1], posemb.shape[2]
  old = int(round(np.sqrt(rows - 1)))
  if old * old != rows - 1:
    raise ValueError(f"position embedding of shape {tuple(posemb.shape)} has no square grid after "
                     "its class-token row")
  if old == grid:
    return posemb
  logging.info("position embedding resampled from a %dx%d to a %dx%d grid", old, old, grid, grid)
  matrix = _bilinear_matrix(old, grid)
  cells = np.asarray(posemb[0, 1:], np.float64).reshape(old, old, width)
  cells = np.einsum("ai,bj,ijw->abw", matrix, matrix, cells).reshape(1, grid * grid, width)
  return np.concatenate([np.asarray(posemb[:, :1], np.float64), cells], axis=1).astype(posemb.dtype)


# ------------------------------------------------------------------------------------------------
# Our parameter names <-> the reference layout.

_RULES: tuple[tuple[str, Callable[[re.Match], str]], ...] = (
    (r"embedding/(kernel|bias)", lambda m: f"embedding/{m[1]}"),
    (r"cls_token/(domain_)?cls", lambda m: "cls"),
    (r"pos_embedding", lambda m: "Transformer/posembed_input/pos_embedding"),
    (r"block(\d+)/norm([12])/(?:ln/|domain_)(scale|bias)",
     lambda m: f"Transformer/encoderblock_{int(m[1])}/LayerNorm_{0 if m[2] == '1' else 2}/{m[3]}"),
    (r"block(\d+)/attention/(query|key|value|out)/(kernel|bias)",
     lambda m: (f"Transformer/encoderblock_{int(m[1])}/MultiHeadDotProductAttention_1/"
                f"{m[2]}/{m[3]}")),
    (r"block(\d+)/mlp/Dense_([01])/(kernel|bias)",
     lambda m: f"Transformer/encoderblock_{int(m[1])}/MlpBlock_3/Dense_{m[2]}/{m[3]}"),
    (r"final_norm/(?:ln/|domain_)(scale|bias)", lambda m: f"Transformer/encoder_norm/{m[1]}"),
    (r"head/(?:dense/|domain_)(kernel|bias)", lambda m: f"head/{m[1]}"),
)


def param_name(path) -> str:
  """'block00/attention/query/kernel' for a jax key path of our parameter tree."""
  return "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path)


def reference_key(name: str) -> str:
  """The vision_transformer key of our parameter `name` (e.g. 'block03/mlp/Dense_0/kernel' ->
  'Transformer/encoderblock_3/MlpBlock_3/Dense_0/kernel'); a domain-specific leaf maps to the key
  of the shared parameter it is one copy of per domain. ValueError for a name with no counterpart
  (the model's parameter tree changed: update `_RULES`)."""
  for pattern, key in _RULES:
    match = re.fullmatch(pattern, name)
    if match:
      return key(match)
  raise ValueError(f"model parameter {name!r} has no counterpart in the vision_transformer layout "
                   "(the model's parameter tree changed? update adv_soups/models/npz.py _RULES)")


def _is_domain(name: str) -> bool:
  return name.rsplit("/", 1)[-1].startswith(DOMAIN_PREFIX)


def _grid_of(pos_shape) -> int:
  return int(round(np.sqrt(pos_shape[1] - 1)))


# ------------------------------------------------------------------------------------------------
# Import.

def _check_normalisation(path: str, model_config: Any, channels: int) -> None:
  expected = file_normalisation(path)
  for key in ("mean", "std"):
    ours = np.broadcast_to(np.asarray(model_config.get(key) or (0.5,), np.float64), (channels,))
    theirs = np.broadcast_to(np.asarray(expected[key], np.float64), (channels,))
    if not np.allclose(ours, theirs, rtol=0, atol=1e-6):
      raise ValueError(
          f"{path} expects inputs normalised with mean={tuple(expected['mean'])} "
          f"std={tuple(expected['std'])} but config.model.{key}={tuple(model_config.get(key))}: "
          f"set --config.model.mean='{tuple(expected['mean'])}' "
          f"--config.model.std='{tuple(expected['std'])}'")


def _convert(params: Any, flat_file: dict[str, Any], path: str, materialise: bool) -> tuple:
  """(new params or None, report dict): the core of `load_pretrained` / `check_pretrained`."""
  ref, layout = to_reference_layout(flat_file, path)
  dropped = sorted(k for k in ref if k.startswith("pre_logits/"))
  for key in dropped:
    del ref[key]
  leaves = jax.tree_util.tree_leaves_with_path(params)
  names = [param_name(p) for p, _ in leaves]
  keys = [reference_key(n) for n in names]
  missing = sorted({k for k in keys if k not in ref and not k.startswith("head/")})
  if missing:
    raise ValueError(f"{path} ({layout} layout) lacks keys the configured model needs: "
                     f"{_short(missing)}; found keys {_short(ref)}")
  extra = sorted(set(ref) - set(keys))
  if extra:
    raise ValueError(f"{path} ({layout} layout) has keys the configured model lacks: "
                     f"{_short(extra)} (a deeper model, a hybrid ResNet stem or another head?)")
  head_keys = [k for k in keys if k.startswith("head/")]
  load_head = not dropped and all(k in ref for k in head_keys)
  mismatched, values = [], []
  for name, key, (_, leaf) in zip(names, keys, leaves):
    domain = _is_domain(name)
    expected = tuple(leaf.shape[1:] if domain else leaf.shape)
    if key == "cls":  # [1, 1, W] in the file; ours [1, 1, W] shared or [D, 1, W] per domain
      expected = (1, 1) + tuple(leaf.shape[2:])
    if key.startswith("head/"):
      if not load_head:
        values.append(None)
        continue
      if ref[key].shape[:-1] == expected[:-1] and ref[key].shape != expected:  # other classes
        load_head = False
        values.append(None)
        continue
    value = ref[key]
    if key == "Transformer/posembed_input/pos_embedding" and value.shape != expected:
      if value.shape[0] == 1 and value.shape[2:] == expected[2:]:
        value = resample_posemb(value, _grid_of(expected))
    if tuple(value.shape) != expected:
      mismatched.append(f"{key}: file {tuple(value.shape)}, model {expected}")
      values.append(None)
      continue
    if domain:
      value = np.broadcast_to(value.reshape((1,) + tuple(leaf.shape[1:])), leaf.shape)
    values.append(value)
  if mismatched:
    more = f" (and {len(mismatched) - 3} more)" if len(mismatched) > 3 else ""
    raise ValueError(f"{path} ({layout} layout) does not fit the configured model: "
                     f"{'; '.join(mismatched[:3])}{more}")
  if not load_head:
    values = [None if k.startswith("head/") else v for k, v in zip(keys, values)]
  report = {"layout": layout, "head_loaded": load_head, "dropped": dropped}
  if not materialise:
    return None, report
  treedef = jax.tree.structure(params)
  new = [leaf if v is None else np.asarray(v, dtype=leaf.dtype)
         for v, (_, leaf) in zip(values, leaves)]
  return jax.tree.unflatten(treedef, new), report


def check_pretrained(abstract_params: Any, path: str, model_config: Any, channels: int) -> dict:
  """Checks, from the file's headers only, that `path` loads into parameters shaped like
  `abstract_params` (ShapeDtypeStructs); returns {'layout', 'head_loaded', 'dropped'}. ValueError
  with one line naming the keys or shapes expected and found, or the normalisation mismatch."""
  _check_normalisation(path, model_config, channels)
  return _convert(abstract_params, read_npz_shapes(path), path, materialise=False)[1]


def load_pretrained(params: Any, path: str, model_config: Any, channels: int = 3) -> Any:
  """`params` (our freshly initialised tree, any number of domains) with every parameter the
  checkpoint `path` provides copied in (numpy arrays in each leaf's dtype); the head stays as
  initialised when the number of classes differs or the file has a `pre_logits` layer. Logs what
  it did; ValueError (one line) when the file does not fit."""
  _check_normalisation(path, model_config, channels)
  new, report = _convert(params, read_npz(path), path, materialise=True)
  logging.info("init_from %s: %s layout%s%s", path, report["layout"],
               "" if report["head_loaded"] else "; head re-initialised",
               f"; dropped {report['dropped']}" if report["dropped"] else "")
  return new


# ------------------------------------------------------------------------------------------------
# Export.

def export_arrays(params: Any) -> dict[str, np.ndarray]:
  """Flat vision_transformer-layout arrays (float32) of a single-domain parameter tree (e.g. a
  soup from `soups.interpolate`): domain leaves [1, ...] lose their domain axis, the class token
  becomes `cls` [1, 1, W]."""
  out = {}
  for path, leaf in jax.tree_util.tree_leaves_with_path(params):
    name = param_name(path)
    value = np.asarray(leaf, np.float32)
    if _is_domain(name):
      if value.shape[0] != 1:
        raise ValueError(f"export needs a single-domain model; {name} has {value.shape[0]} domains "
                         "(build the soup first: soups.interpolate)")
      value = value[0]
    key = reference_key(name)
    out[key] = value.reshape(1, 1, -1) if key == "cls" else value
  return out
