"""`robust_accuracy`: clean and robust accuracy of a classifier under a sequence of attacks.

How "attack only the still-robust examples" is done: by *compaction on the host into fixed-size
batches*, as AutoAttack does, but streamed. Every stage (the clean pass, then each attack; APGD-T
is one stage per target rank) has a queue of waiting examples; whenever a queue holds a full batch
(B examples, B a multiple of the device count), that stage runs on it and the examples it did not
break move on to the next stage's queue. At the end the partial queues are flushed in stage order
(padded with masked-out rows). So an attack only spends compute on examples every earlier attack
failed on, every call of a stage has the same shape (one compilation per stage and batch shape,
cached across calls when the parameters are passed as `params`), and the host holds at most about
B examples per stage, not the dataset.

Each batch is sharded over the mesh's `data` axis and each stage runs under `jax.shard_map`, one
shard per device with no communication. Random starts are keyed by the example's index in the
stream of (unmasked) examples, so results do not depend on the mesh, the batch size or the order
in which the compaction groups examples. It is process-local: under several processes each one
runs it on its own shard on a process-local mesh, with `index_offset` = the global index of its
first example, and the per-example results are combined afterwards.

FAB-T returns minimally distorted points that may lie outside the eps ball: as in AutoAttack, a
FAB point breaks an example only when it is misclassified *and* within eps.

A randomised model (`randomised=True`: `logits_fn(..., keys)` takes one PRNG key per row, see
`attacks.eot`) draws its randomness from the row's key (its example's global index) and the
input, in every stage including the clean pass and each attack's final re-scoring pass; APGD-CE
and APGD-DLR with `eot_draws` average their gradients over that many draws per iteration.
"""
from __future__ import annotations

import collections
import dataclasses
import time
from typing import Any, Callable, Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from adv_soups import parallel
from adv_soups.attacks import apgd as apgd_lib
from adv_soups.attacks import eot as eot_lib
from adv_soups.attacks import fab as fab_lib
from adv_soups.attacks import pgd as pgd_lib
from adv_soups.attacks import square as square_lib
from adv_soups.attacks import suites

ATTACKS = tuple(suites.ATTACKS)
_CACHE_SIZE = 32
_cache: "collections.OrderedDict[Any, Any]" = collections.OrderedDict()


@dataclasses.dataclass(frozen=True)
class RobustResult:
  """Outcome of `robust_accuracy`. Per-example arrays are [N], in the order the (unmasked)
  examples came in; masked-out padding rows are not counted and have no entry.

  clean_accuracy / robust_accuracy: fractions in [0, 1].
  clean_correct: [N] bool, correct on the clean image.
  robust: [N] bool, correct on the clean image and not broken by any attack.
  broken_by: [N] int, index into `attacks` of the attack that broke the example, -1 if none did
    (also -1 for clean errors).
  accuracy_after: robust accuracy after each attack in turn (the last equals robust_accuracy).
  attacks: the attacks that ran, in order, each a dict of its name and settings.
  """
  clean_accuracy: float
  robust_accuracy: float
  clean_correct: np.ndarray
  robust: np.ndarray
  broken_by: np.ndarray
  accuracy_after: tuple[float, ...]
  attacks: tuple[dict, ...]
  num_examples: int

  def summary(self) -> dict:
    """A JSON-friendly dict without the per-example arrays."""
    return dict(clean_accuracy=self.clean_accuracy, robust_accuracy=self.robust_accuracy,
                accuracy_after=list(self.accuracy_after), attacks=list(self.attacks),
                num_examples=self.num_examples)


# ---------------------------------------------------------------------------------------------
# Compiled stage functions (cached)
# ---------------------------------------------------------------------------------------------
def _cached(key, build, store=None):
  """A small LRU cache (`store`, default the module's); unhashable keys are not cached."""
  store = _cache if store is None else store
  try:
    hash(key)
  except TypeError:
    return build()
  if key in store:
    store.move_to_end(key)
    return store[key]
  value = build()
  store[key] = value
  if len(store) > _CACHE_SIZE:
    store.popitem(last=False)
  return value


def _bind(logits_fn, params, domain, has_params, has_domain, model_keys=None):
  """images -> logits, closing over params (replicated) and the per-example domain; for a
  randomised model (`model_keys` [B], one key per row) each pass is keyed by the row's key and
  its input (`eot.input_keys`)."""
  def f(images):
    args = ((params,) if has_params else ()) + (images,) + ((domain,) if has_domain else ())
    if model_keys is not None:
      args += (eot_lib.input_keys(model_keys, images),)
    return logits_fn(*args)
  return f


def _model_keys(rng, index, randomised):
  """Per-row keys of a randomised model's randomness [B] (None for a deterministic model)."""
  return pgd_lib.example_keys(jax.random.fold_in(rng, _MODEL_TAG), index) if randomised else None


_MODEL_TAG = 0x6D6F64  # folds the model's randomness apart from the attacks' random starts


def _clean_fn(logits_fn, has_params, has_domain, mesh, randomised=False):
  def inner(params, images, labels, domain, mask, index, rng):
    keys = _model_keys(rng, index, randomised)
    logits = _bind(logits_fn, params, domain, has_params, has_domain, keys)(images)
    return mask & (jnp.argmax(logits, axis=-1) == labels)
  d = P(parallel.DATA_AXIS)
  sm = jax.shard_map(inner, mesh=mesh, in_specs=(P(), d, d, d, d, d, P()), out_specs=d,
                     check_vma=False)  # exact GELU (erfc) fails the vma check in jax 0.12
  return jax.jit(sm)


def _attack_fn(logits_fn, has_params, has_domain, mesh, attack, settings):
  """Compiled stage: (params, images, labels, domain, mask, index, rng, rank, eps, step_size)
  -> survived [B]. eps and step_size are traced: one compilation serves every eps."""
  s = dict(settings)

  def inner(params, images, labels, domain, mask, index, rng, rank, eps, step_size):
    keys = _model_keys(rng, index, s.get("randomised", False))
    f = _bind(logits_fn, params, domain, has_params, has_domain, keys)
    common = dict(eps=eps, num_steps=s["num_steps"], norm=s["norm"],
                  restarts=s["restarts"], example_index=index)
    largereps = s.get("largereps", False)
    if attack == "pgd":
      x_adv = pgd_lib.pgd(f, images, labels, rng, step_size=step_size, loss="ce", **common)
    elif attack in ("apgd-ce", "apgd-dlr"):
      factory = None
      if s.get("eot_draws"):  # EOT: each draw keyed by the row, restart, iteration and draw
        g = lambda x, ks: logits_fn(*(((params,) if has_params else ()) + (x,) + (
            (domain,) if has_domain else ()) + (ks,)))
        if keys is None:  # a deterministic model: every draw is the same pass
          g = lambda x, ks: f(x)
          keys_eot = pgd_lib.example_keys(rng, index)
        else:
          keys_eot = keys
        factory = eot_lib.eot_state_factory(g, keys_eot, s["eot_draws"])
      x_adv = apgd_lib.apgd(f, images, labels, rng, loss=attack[5:], largereps=largereps,
                            state_factory=factory, **common)
    elif attack == "apgd-t":  # one target rank
      x_adv = apgd_lib.apgd_t_single(f, images, labels, rng, rank, largereps=largereps,
                                     **common)[0]
    elif attack == "fab-t":  # one target rank; its points may lie outside the eps ball
      x_adv = fab_lib.fab_t_single(f, images, labels, rng, rank, **common)[0]
      wrong = jnp.argmax(f(x_adv), axis=-1) != labels
      return mask & ~(wrong & fab_lib.within_eps(x_adv, images, eps, s["norm"]))
    else:  # square: num_steps counts queries
      x_adv = square_lib.square(f, images, labels, rng, eps=eps, num_queries=s["num_steps"],
                                norm=s["norm"], example_index=index)
    return mask & (jnp.argmax(f(x_adv), axis=-1) == labels)
  d = P(parallel.DATA_AXIS)
  sm = jax.shard_map(inner, mesh=mesh, in_specs=(P(), d, d, d, d, d, P(), P(), P(), P()),
                     out_specs=d, check_vma=False)  # exact GELU (erfc) fails the vma check
  return jax.jit(sm)


# ---------------------------------------------------------------------------------------------
# Host-side queues
# ---------------------------------------------------------------------------------------------
class _Queue:
  """Examples waiting for a stage: a dict of numpy arrays with a common leading axis."""

  def __init__(self):
    self._chunks: list[dict] = []
    self.size = 0

  def push(self, rows: dict) -> None:
    n = len(rows["index"])
    if n:
      self._chunks.append(rows)
      self.size += n

  def pop(self, n: int) -> dict:
    rows = {k: np.concatenate([c[k] for c in self._chunks]) for k in self._chunks[0]}
    head = {k: v[:n] for k, v in rows.items()}
    tail = {k: v[n:] for k, v in rows.items()}
    self._chunks = [tail] if len(tail["index"]) else []
    self.size = len(tail["index"])
    return head


def _pad(rows: dict, size: int) -> dict:
  n = len(rows["index"])
  out = {}
  for k, v in rows.items():
    pad = np.zeros((size - n,) + v.shape[1:], v.dtype)
    out[k] = np.concatenate([v, pad])
  out["mask"] = np.arange(size) < n
  return out


# ---------------------------------------------------------------------------------------------
# robust_accuracy
# ---------------------------------------------------------------------------------------------
def _expand_attacks(attacks: Sequence[str] | str) -> tuple[str, ...]:
  return suites.parse_suite(",".join(attacks) if not isinstance(attacks, str) else attacks)


def robust_accuracy(logits_fn: Callable[..., jax.Array], batches: Iterable[dict], *, eps: float,
                    norm: str = "linf", attacks: Sequence[str] | str = ("apgd-ce", "apgd-t"),
                    num_steps: int | dict[str, int] = 100, restarts: int = 1,
                    step_size: float | None = None, num_targets: int = suites.NUM_TARGETS,
                    mesh=None, seed: int = 0, params: Any = None, batch_size: int | None = None,
                    index_offset: int = 0, attack_settings: dict[str, dict] | None = None,
                    randomised: bool = False) -> RobustResult:
  """Clean accuracy, then robust accuracy under `attacks` run in sequence on the survivors.

  Args:
    logits_fn: `logits_fn(images)` or, when the batches carry 'domain',
      `logits_fn(images, domain)` -> logits [b, K]. With `params` given it is called as
      `logits_fn(params, images[, domain])` and `params` is passed to the compiled function as an
      argument (replicated), so new parameters (e.g. during training) reuse the compilation.
      Only then are compiled stages cached across calls, by (logits_fn, attack, norm, num_steps,
      restarts, mesh; eps and step size are traced): pass the same function object to compile
      once. Without `params` every call compiles afresh (a jitted function freezes the arrays
      its closure holds at its first trace, so a cache keyed on the function object would keep
      evaluating old weights after the closure's weights changed). With `params`, logits_fn must
      depend on nothing else that changes between calls.
    batches: iterable of dicts: 'image' [b, H, W, C] float32 in [0, 1], 'label' [b] int,
      optional 'mask' [b] bool (False = padding, ignored), optional 'domain' (any per-example
      array, e.g. int [b] or mixing weights [b, D]), optional 'key' [b] int (the index that keys
      each row's random starts; default its position in the stream plus `index_offset`: rows
      that share a key, e.g. one example under several soups, share their starts). Batch sizes
      may vary.
    eps: threat-model radius in pixels (l_inf: [0, 1]; l_2, l_1: >= 0). eps = 0 skips no work
      but returns robust == clean_correct.
    norm: "linf", "l2" or "l1" (every attack but PGD has an l_1 form).
    attacks: names of `suites.ATTACKS`: "pgd" (PGD-k, CE, step 2.5 eps / k unless `step_size`),
      "apgd-ce", "apgd-dlr", "apgd-t" (targeted DLR over `num_targets` runner-up classes, one
      stage per target), "fab-t" (targeted FAB, one stage per target; a point counts only within
      eps), "square" (score-based); or a suite name ("autoattack" = the standard version:
      APGD-CE, APGD-T, FAB-T, Square), or a comma list.
    num_steps: iterations of every iteration attack (PGD-k's k; APGD's and FAB's N, 100 in
      AutoAttack) and Square's queries, or a dict {attack name: budget}.
    restarts: random restarts of every attack.
    mesh: a `jax.sharding.Mesh` with a `data` axis (default: this process's devices).
    seed: random starts use fold_in(fold_in(PRNGKey(seed), attack position), example index).
    index_offset: the index of the first example (a process's or a resumed chunk's offset in
      the global stream), so random starts do not depend on how the stream is split.
    batch_size: examples per compiled call (default: the first batch's size), rounded up to a
      multiple of the number of devices.
    attack_settings: per-attack overrides {name: {'restarts', 'num_targets', 'largereps',
      'eot_draws'}} (`suites.suite_settings`: what a suite fixes per norm).
    randomised: `logits_fn` takes one more argument, keys [b] (one PRNG key per row), and draws
      its randomness from them (`attacks.eot`).

  Returns:
    A `RobustResult` (accuracies, per-example flags, the attacks and their settings).
  """
  names = _expand_attacks(attacks)
  budgets = (dict(num_steps) if isinstance(num_steps, dict)
             else {n: int(num_steps) for n in names})
  overrides = {n: dict(v) for n, v in (attack_settings or {}).items()}
  suites.check_norm(names, norm)
  for n in names:
    if n not in budgets:
      raise ValueError(f"num_steps has no budget for attack {n!r}")
    o = overrides.get(n, {})
    pgd_lib.check_settings(eps=eps, norm=norm, num_steps=budgets[n],
                           restarts=o.get("restarts", restarts), norms=pgd_lib.ALL_NORMS)
    apgd_lib.check_largereps(norm, budgets[n], o.get("largereps", False))
    if "eot_draws" in o:
      eot_lib.check_draws(o["eot_draws"])
  if not names:
    pgd_lib.check_settings(eps=eps, norm=norm, num_steps=1, restarts=restarts,
                           norms=pgd_lib.ALL_NORMS)
  mesh = parallel.make_mesh(jax.local_devices()) if mesh is None else mesh
  n_dev = mesh.devices.size
  has_params = params is not None
  # Cross-call cache only when the parameters are arguments; else one cache for this call.
  store = _cache if has_params else collections.OrderedDict()
  params_arg = params if has_params else jnp.zeros((), jnp.float32)
  params_dev = jax.device_put(params_arg, parallel.replicated(mesh))
  base_key = jax.random.PRNGKey(seed)
  attack_keys = [jax.device_put(jax.random.fold_in(base_key, j), parallel.replicated(mesh))
                 for j in range(len(names))]
  clean_key = jax.device_put(jax.random.fold_in(base_key, -1 % 2 ** 31),
                             parallel.replicated(mesh))
  eps = float(eps)

  stages: list[tuple[int, str, int]] = []  # (attack position, attack name, rank); -1 = clean
  settings_out: list[dict] = []
  queues: list[_Queue] = []
  state = dict(b=None, has_domain=None, num_classes=None, n=0)
  clean_correct: list[bool] = []
  broken_by: list[int] = []

  def setup(first: dict):
    has_domain = "domain" in first
    b = batch_size if batch_size is not None else len(first["label"])
    if int(b) != b or b < 1:
      raise ValueError(f"batch_size must be an integer >= 1, got batch_size={b}")
    b = parallel.pad_to_multiple(int(b), n_dev)
    spec_img = jax.ShapeDtypeStruct((b,) + first["image"].shape[1:], jnp.float32)
    spec_dom = (jax.ShapeDtypeStruct((b,) + first["domain"].shape[1:], first["domain"].dtype)
                if has_domain else None)
    key_c = ("num_classes", logits_fn, has_params, spec_img.shape,
             None if spec_dom is None else (spec_dom.shape, str(spec_dom.dtype)))
    num_classes = _cached(key_c, lambda: int(jax.eval_shape(
        lambda p, x, dd: _bind(logits_fn, p, dd, has_params, has_domain, _model_keys(
            base_key, jnp.arange(x.shape[0]), randomised))(x),
        params_arg, spec_img, spec_dom).shape[-1]), store)
    state.update(b=b, has_domain=has_domain, num_classes=num_classes)
    stages.append((-1, "clean", 0))
    for j, a in enumerate(names):
      steps = budgets[a]
      o = overrides.get(a, {})
      s = dict(name=a, norm=norm, eps=eps, num_steps=int(steps),
               restarts=int(o.get("restarts", restarts)))
      if o.get("largereps"):
        s["largereps"] = True
      if o.get("eot_draws"):
        s["eot_draws"] = int(o["eot_draws"])
      if randomised:
        s["randomised"] = True
      if num_classes < suites.ATTACKS[a].min_classes:
        raise ValueError(f"{a} needs >= {suites.ATTACKS[a].min_classes} classes, got "
                         f"num_classes={num_classes}")
      if a == "pgd":
        s.update(loss="ce", step_size=(2.5 * eps / steps if step_size is None
                                       else float(step_size)))
        stages.append((j, a, 0))
      elif a in ("apgd-ce", "apgd-dlr"):
        s.update(loss=a[5:])
        stages.append((j, a, 0))
      elif a == "square":
        s.update(loss="margin", num_queries=int(steps), restarts=1)
        stages.append((j, a, 0))
      else:  # targeted: one stage per runner-up class
        want = int(o.get("num_targets", num_targets))
        n_t = (apgd_lib.num_apgd_targets(num_classes, want) if a == "apgd-t"
               else min(want, num_classes - 1))
        s.update(loss="dlr-targeted" if a == "apgd-t" else "fab-targeted", num_targets=n_t)
        stages.extend((j, a, r) for r in range(n_t))
      settings_out.append(s)
    queues.extend(_Queue() for _ in stages)

  def compiled(stage):
    j, a, _ = stage
    hd = state["has_domain"]
    if a == "clean":
      return _cached(("clean", logits_fn, has_params, hd, mesh, randomised),
                     lambda: _clean_fn(logits_fn, has_params, hd, mesh, randomised), store)
    s = settings_out[j]
    static = {k: s[k] for k in ("norm", "num_steps", "restarts", "largereps", "eot_draws",
                                "randomised") if k in s}
    return _cached(("attack", a, tuple(sorted(static.items())), logits_fn, has_params, hd, mesh),
                   lambda: _attack_fn(logits_fn, has_params, hd, mesh, a, static), store)

  def run_stage(k: int, rows: dict) -> np.ndarray:
    sharding = parallel.batch_sharding(mesh)
    b = state["b"]
    rows = _pad(rows, b)
    dev = {key: jax.device_put(v, sharding) for key, v in rows.items()}
    domain = dev["domain"] if state["has_domain"] else jax.device_put(
        np.zeros((b,), np.float32), sharding)
    j, a, rank = stages[k]
    fn = compiled(stages[k])
    start = time.perf_counter()
    if a == "clean":
      out = fn(params_dev, dev["image"], dev["label"], domain, dev["mask"], dev["key"], clean_key)
    else:
      out = fn(params_dev, dev["image"], dev["label"], domain, dev["mask"], dev["key"],
               attack_keys[j], np.int32(rank), np.float32(eps),
               np.float32(settings_out[j].get("step_size", 0.0)))
    survived = np.asarray(out)[: int(rows["mask"].sum())]  # waits for the device
    if j >= 0:  # where the time goes: seconds and rows per attack (compilation included)
      settings_out[j]["seconds"] = settings_out[j].get("seconds", 0.0) + (
          time.perf_counter() - start)
      settings_out[j]["rows_attacked"] = settings_out[j].get("rows_attacked", 0) + len(survived)
    return survived

  def drain(flush: bool):
    while True:
      ready = []
      for k, q in enumerate(queues):
        if q.size >= state["b"]:
          ready.append(k)
        elif flush and q.size and all(queues[i].size == 0 for i in range(k)):
          ready.append(k)
      if not ready:
        return
      k = max(ready)
      rows = queues[k].pop(state["b"])
      survived = run_stage(k, rows)
      j = stages[k][0]
      for i, ok in zip((rows["index"] - index_offset).tolist(), survived.tolist()):
        if j < 0:
          clean_correct[i] = ok
        elif not ok:
          broken_by[i] = j
      if k + 1 < len(stages):
        queues[k + 1].push({key: v[survived] for key, v in rows.items()})

  for batch in batches:
    images = np.asarray(batch["image"], np.float32)
    labels = np.asarray(batch["label"]).astype(np.int32)
    if images.ndim < 2 or labels.shape != images.shape[:1]:
      raise ValueError(f"batch 'image' [b, ...] and 'label' [b] disagree: image shape "
                       f"{images.shape}, label shape {labels.shape}")
    keep = (np.ones(len(labels), bool) if batch.get("mask") is None
            else np.asarray(batch["mask"]).astype(bool))
    rows = dict(image=images[keep], label=labels[keep])
    if "key" in batch:
      rows["key"] = np.asarray(batch["key"]).astype(np.int32)[keep]
    if "domain" in batch:
      rows["domain"] = np.asarray(batch["domain"])[keep]
    if not stages:
      setup(dict(batch, image=images, label=labels))
    if ("domain" in rows) != state["has_domain"]:
      raise ValueError("either every batch or none must carry 'domain'")
    pgd_lib.check_data(rows["image"], rows["label"], state["num_classes"])
    m = len(rows["label"])
    rows["index"] = np.arange(index_offset + state["n"], index_offset + state["n"] + m,
                              dtype=np.int32)
    if "key" not in rows:
      rows["key"] = rows["index"]
    state["n"] += m
    clean_correct.extend([False] * m)
    broken_by.extend([-1] * m)
    queues[0].push(rows)
    drain(flush=False)
  if not stages or state["n"] == 0:
    raise ValueError("robust_accuracy got no (unmasked) examples")
  drain(flush=True)

  cc = np.asarray(clean_correct, bool)
  bb = np.asarray(broken_by, np.int32)
  robust = cc & (bb < 0)
  after = tuple(float(np.mean(cc & ((bb < 0) | (bb > j)))) for j in range(len(names)))
  return RobustResult(
      clean_accuracy=float(cc.mean()), robust_accuracy=float(robust.mean()), clean_correct=cc,
      robust=robust, broken_by=bb, accuracy_after=after, attacks=tuple(settings_out),
      num_examples=int(state["n"]))
