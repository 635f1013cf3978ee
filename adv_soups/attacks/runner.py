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
from adv_soups.attacks import pgd as pgd_lib
from adv_soups.attacks import registry

ATTACKS = registry.ATTACKS  # the registry itself: attacks registered later appear here too
FLUSH_BUCKETS = 16
_CACHE_SIZE = 64
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


def _bind(logits_fn, params, domain, has_params, has_domain):
  """images -> logits, closing over params (replicated) and the per-example domain."""
  def f(images):
    args = ((params,) if has_params else ()) + (images,) + ((domain,) if has_domain else ())
    return logits_fn(*args)
  return f


def _clean_fn(logits_fn, has_params, has_domain, mesh):
  def inner(params, images, labels, domain, mask):
    with jax.default_matmul_precision("highest"):  # inside the body: jit retraces per context
      logits = _bind(logits_fn, params, domain, has_params, has_domain)(images)
      return mask & (jnp.argmax(logits, axis=-1) == labels)
  d = P(parallel.DATA_AXIS)
  sm = jax.shard_map(inner, mesh=mesh, in_specs=(P(), d, d, d, d), out_specs=d,
                     check_vma=False)  # exact GELU (erfc) fails the vma check in jax 0.12
  return jax.jit(sm)


def _attack_fn(logits_fn, has_params, has_domain, mesh, attack, norm, budget, settings):
  """Compiled stage of registry entry `attack`: (params, images, labels, domain, mask, index,
  rng, rank, eps, step_size) -> survived [B]. eps, rank and step_size are traced: one
  compilation serves every eps and target. `settings` are the entry's static settings (items)."""
  entry = registry.get(attack)
  s = dict(settings)

  def inner(params, images, labels, domain, mask, index, rng, rank, eps, step_size):
    with jax.default_matmul_precision("highest"):  # inside the body: jit retraces per context
      f = _bind(logits_fn, params, domain, has_params, has_domain)
      x_adv = entry.stage(f, images, labels, rng, eps=eps, norm=norm, budget=budget, settings=s,
                          index=index, rank=rank, step_size=step_size)
      return mask & ~entry.breaks(f, x_adv, images, labels, eps=eps, norm=norm)
  d = P(parallel.DATA_AXIS)
  sm = jax.shard_map(inner, mesh=mesh, in_specs=(P(), d, d, d, d, d, P(), P(), P(), P()),
                     out_specs=d, check_vma=False)  # exact GELU (erfc) fails the vma check
  return jax.jit(sm)


def flush_size(rows: int, batch_size: int, num_devices: int) -> int:
  """Rows of the compiled call that flushes a partial queue of `rows` (<= batch_size) examples:
  the smallest multiple of ceil(batch_size / 16) (itself a multiple of the device count) that
  holds them, at most `batch_size`. At most 16 shapes per stage, at most ~1/16 of a batch of
  padding (padding to the full batch wasted up to a whole batch per stage)."""
  step = parallel.pad_to_multiple(-(-batch_size // FLUSH_BUCKETS), num_devices)
  return min(batch_size, parallel.pad_to_multiple(max(int(rows), 1), step))


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


def _signature(tree) -> tuple:
  """A hashable description of a pytree's structure, shapes and dtypes (a compile-cache key)."""
  leaves, treedef = jax.tree.flatten(tree)
  return (treedef, tuple((np.shape(x), str(np.asarray(x).dtype) if not hasattr(x, "dtype")
                          else str(x.dtype)) for x in leaves))


# ---------------------------------------------------------------------------------------------
# robust_accuracy
# ---------------------------------------------------------------------------------------------
def _expand_attacks(attacks: Sequence[str] | str) -> tuple[str, ...]:
  return registry.parse_suite(",".join(attacks) if not isinstance(attacks, str) else attacks)


def robust_accuracy(logits_fn: Callable[..., jax.Array], batches: Iterable[dict], *, eps: float,
                    norm: str = "linf", attacks: Sequence[str] | str = ("apgd-ce", "apgd-t"),
                    num_steps: int | dict[str, int] | None = None, restarts: int | None = None,
                    step_size: float | None = None, num_targets: int | None = None,
                    mesh=None, seed: int = 0, params: Any = None, batch_size: int | None = None,
                    index_offset: int = 0, version: str = registry.STANDARD) -> RobustResult:
  """Clean accuracy, then robust accuracy under `attacks` run in sequence on the survivors.

  Args:
    logits_fn: `logits_fn(images)` or, when the batches carry 'domain',
      `logits_fn(images, domain)` -> logits [b, K]. With `params` given it is called as
      `logits_fn(params, images[, domain])` and `params` is passed to the compiled function as an
      argument (replicated), so new parameters (e.g. during training) reuse the compilation.
      Only then are compiled stages cached across calls, by (logits_fn, attack, norm, budget,
      settings, mesh, shapes; eps and step size are traced): pass the same function object to
      compile once. Without `params` every call compiles afresh (a jitted function freezes the
      arrays its closure holds at its first trace, so a cache keyed on the function object would
      keep evaluating old weights after the closure's weights changed). With `params`,
      logits_fn must depend on nothing else that changes between calls.
    batches: iterable of dicts: 'image' [b, H, W, C] float32 in [0, 1], 'label' [b] int,
      optional 'mask' [b] bool (False = padding, ignored), optional 'domain' (any per-example
      array, e.g. int [b] or mixing weights [b, D]), optional 'key' [b] int (the index that keys
      each row's random starts; default its position in the stream plus `index_offset`: rows
      that share a key, e.g. one example under several soups, share their starts). Batch sizes
      may vary.
    eps: threat-model radius in pixels (l_inf: [0, 1]; l_2: >= 0). eps = 0 skips no work but
      returns robust == clean_correct.
    norm: "linf" or "l2" (each attack's registry entry lists the norms it supports).
    attacks: names of the attack registry (`registry.ATTACKS`): "pgd", "apgd-ce", "apgd-dlr",
      "apgd-t" (one stage per target), "fab-t" (one stage per target; a point counts only
      within eps), "square", or any registered one; a suite name ("autoattack" = AutoAttack's
      standard version: APGD-CE, APGD-T, FAB-T, Square), or a comma list.
    num_steps: budgets. None: every attack its own default (AutoAttack's: 100 iterations,
      Square 5,000 queries; PGD has none and must be given). An integer: the budget of every
      *iteration* attack (query attacks keep theirs). A dict {attack name: budget}: those
      attacks only. A budget below 1 is a ValueError.
    restarts: random restarts of every attack that has them (default: the entry's, 1).
    step_size: PGD's step (default 2.5 eps / k).
    num_targets: targets of the targeted attacks (default the entry's, AutoAttack's 9; at most
      K - 1 run).
    mesh: a `jax.sharding.Mesh` with a `data` axis (default: this process's devices).
    seed: random starts use fold_in(fold_in(PRNGKey(seed), attack position), example index).
    index_offset: the index of the first example (a process's or a resumed chunk's offset in
      the global stream), so random starts do not depend on how the stream is split.
    batch_size: examples per compiled call (default: the first batch's size), rounded up to a
      multiple of the number of devices. A stage's last, partial call is padded only to
      `flush_size` rows.
    version: the suite version whose per-norm settings the attacks use ('standard').

  Returns:
    A `RobustResult` (accuracies, per-example flags, and each attack's settings: budget,
    budget kind, restarts, targets, loss; where the time went: `seconds` (running, compilation
    excluded), `compile_seconds`, `rows_attacked` (real rows) and `rows_computed` (with
    padding)). Every compiled stage runs with full-precision (float32, 'highest') matmuls.
  """
  names = _expand_attacks(attacks)
  budgets = registry.resolve_budgets(names, num_steps)
  entries = [registry.get(n) for n in names]
  for entry in entries:
    if norm not in entry.norms and norm in pgd_lib.NORMS:
      raise ValueError(f"attack {entry.name!r} does not support norm {norm!r}: allowed "
                       f"{', '.join(entry.norms)}")
  attack_settings = []
  for entry in entries:
    s = entry.settings_for(norm, version)
    if restarts is not None and entry.restartable:
      s["restarts"] = restarts
    if num_targets is not None and entry.targeted:
      s["targets"] = num_targets
    for key in ("restarts", "targets"):
      if key in s and (int(s[key]) != s[key] or s[key] < 1):
        raise ValueError(f"{key} must be an integer >= 1, got {key}={s[key]}")
    pgd_lib.check_settings(eps=eps, norm=norm, num_steps=budgets[entry.name],
                           restarts=s.get("restarts", 1))
    attack_settings.append(s)
  if not names:
    pgd_lib.check_settings(eps=eps, norm=norm, num_steps=1, restarts=restarts or 1)
  if step_size is not None and not float(step_size) > 0:
    raise ValueError(f"step_size must be > 0, got step_size={step_size}")
  mesh = parallel.make_mesh(jax.local_devices()) if mesh is None else mesh
  n_dev = mesh.devices.size
  has_params = params is not None
  # Cross-call cache only when the parameters are arguments; else one cache for this call.
  store = _cache if has_params else collections.OrderedDict()
  params_arg = params if has_params else jnp.zeros((), jnp.float32)
  params_dev = jax.device_put(params_arg, parallel.replicated(mesh))
  params_sig = _signature(params_arg)
  base_key = jax.random.PRNGKey(seed)
  attack_keys = [jax.device_put(jax.random.fold_in(base_key, j), parallel.replicated(mesh))
                 for j in range(len(names))]
  eps = float(eps)

  stages: list[tuple[int, str, int]] = []  # (attack position, attack name, rank); -1 = clean
  settings_out: list[dict] = []
  queues: list[_Queue] = []
  state = dict(b=None, has_domain=None, num_classes=None, n=0, shapes=None)
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
        lambda p, x, dd: _bind(logits_fn, p, dd, has_params, has_domain)(x),
        params_arg, spec_img, spec_dom).shape[-1]), store)
    shapes = (spec_img.shape[1:], None if spec_dom is None else
              (spec_dom.shape[1:], str(spec_dom.dtype)), params_sig)
    state.update(b=b, has_domain=has_domain, num_classes=num_classes, shapes=shapes)
    stages.append((-1, "clean", 0))
    for j, (entry, s) in enumerate(zip(entries, attack_settings)):
      if num_classes < entry.min_classes:
        raise ValueError(f"{entry.name} needs >= {entry.min_classes} classes, got "
                         f"num_classes={num_classes}")
      n_stages = entry.num_stages(num_classes, s.get("targets", 1))
      out = dict(name=entry.name, norm=norm, eps=eps, budget=budgets[entry.name],
                 budget_kind=entry.budget, num_steps=budgets[entry.name], **s)
      if entry.targeted:
        out.update(targets=n_stages, num_targets=n_stages)
      if step_size is not None and "step_size" in s:  # the attacks that take a step size
        out["step_size"] = float(step_size)
      out.update(seconds=0.0, compile_seconds=0.0, rows_attacked=0, rows_computed=0)
      stages.extend((j, entry.name, r) for r in range(n_stages))
      settings_out.append(out)
    queues.extend(_Queue() for _ in stages)

  def compiled(stage, args: tuple):
    """The AOT-compiled executable of `stage` for these arguments' shapes (compiled once; the
    compilation time goes to the attack's `compile_seconds`, not its `seconds`)."""
    j, a, _ = stage
    hd = state["has_domain"]
    size = args[1].shape[0]
    if a == "clean":
      fn_key = ("clean", logits_fn, has_params, hd, mesh)
      build = lambda: _clean_fn(logits_fn, has_params, hd, mesh)
    else:
      static = tuple(sorted(attack_settings[j].items()))
      fn_key = ("attack", a, norm, budgets[a], static, logits_fn, has_params, hd, mesh)
      build = lambda: _attack_fn(logits_fn, has_params, hd, mesh, a, norm, budgets[a], static)
    key = ("executable", fn_key, size, state["shapes"])

    def lower_and_compile():
      start = time.perf_counter()
      executable = _cached(fn_key, build, store).lower(*args).compile()
      if j >= 0:
        settings_out[j]["compile_seconds"] += time.perf_counter() - start
      return executable
    return _cached(key, lower_and_compile, store)

  def run_stage(k: int, rows: dict) -> np.ndarray:
    sharding = parallel.batch_sharding(mesh)
    n = len(rows["index"])
    size = state["b"] if n == state["b"] else flush_size(n, state["b"], n_dev)
    rows = _pad(rows, size)
    dev = {key: jax.device_put(v, sharding) for key, v in rows.items()}
    domain = dev["domain"] if state["has_domain"] else jax.device_put(
        np.zeros((size,), np.float32), sharding)
    j, a, rank = stages[k]
    if a == "clean":
      args = (params_dev, dev["image"], dev["label"], domain, dev["mask"])
    else:
      args = (params_dev, dev["image"], dev["label"], domain, dev["mask"], dev["key"],
              attack_keys[j], np.int32(rank), np.float32(eps),
              np.float32(0.0 if step_size is None else step_size))
    fn = compiled(stages[k], args)
    start = time.perf_counter()
    out = fn(*args)
    survived = np.asarray(out)[:n]  # waits for the device
    if j >= 0:  # where the time goes: seconds (compilation excluded) and rows per attack
      settings_out[j]["seconds"] += time.perf_counter() - start
      settings_out[j]["rows_attacked"] += n
      settings_out[j]["rows_computed"] += size
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
