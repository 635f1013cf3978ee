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
input, in every stage, the clean pass and each stage's final re-scoring included (with draws of
its own: keyed like the attack's queries, the re-scoring would repeat the very draw in which the
attack saw its point misclassified, and count the best of its draws); the attacks with an EOT
form (APGD-CE, APGD-DLR) average their gradients over `eot_draws` draws.
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


def _bind(logits_fn, params, domain, has_params, has_domain, model_keys=None):
  """images -> logits, closing over params (replicated) and the per-example domain. For a
  randomised model (`model_keys` [B], one key per row) each pass is keyed by the row's key and
  its input (`eot.input_keys`), and f carries `keyed(images, keys)` and `model_keys` for EOT."""
  def call(images, *keys):
    args = ((params,) if has_params else ()) + (images,) + ((domain,) if has_domain else ())
    return logits_fn(*(args + keys))

  if model_keys is None:
    return call

  def f(images):
    return call(images, eot_lib.input_keys(model_keys, images))
  f.keyed, f.model_keys = call, model_keys
  return f


_MODEL_TAG = 0x6D6F64  # folds the model's randomness apart from the attacks' random starts
_SCORE_TAG = 0x73636F  # the final re-scoring pass: draws independent of the attack's queries


def _model_keys(rng, index, randomised):
  """Per-row keys of a randomised model's randomness [B] (None for a deterministic model)."""
  return pgd_lib.example_keys(jax.random.fold_in(rng, _MODEL_TAG), index) if randomised else None


def _clean_fn(logits_fn, has_params, has_domain, mesh, randomised=False):
  def inner(params, images, labels, domain, mask, index, rng):
    with jax.default_matmul_precision("highest"):  # inside the body: jit retraces per context
      keys = _model_keys(rng, index, randomised)
      logits = _bind(logits_fn, params, domain, has_params, has_domain, keys)(images)
      return mask & (jnp.argmax(logits, axis=-1) == labels)
  d = P(parallel.DATA_AXIS)
  sm = jax.shard_map(inner, mesh=mesh, in_specs=(P(), d, d, d, d, d, P()), out_specs=d,
                     check_vma=False)  # exact GELU (erfc) fails the vma check in jax 0.12
  return jax.jit(sm)


def _attack_fn(logits_fn, has_params, has_domain, mesh, attack, norm, budget, settings,
               randomised=False):
  """Compiled stage of registry entry `attack`: (params, images, labels, domain, mask, index,
  rng, rank, eps, step_size) -> survived [B]. eps, rank and step_size are traced: one
  compilation serves every eps and target. `settings` are the entry's static settings (items)."""
  entry = registry.get(attack)
  s = dict(settings)

  def inner(params, images, labels, domain, mask, index, rng, rank, eps, step_size):
    with jax.default_matmul_precision("highest"):  # inside the body: jit retraces per context
      keys = _model_keys(rng, index, randomised)
      f = _bind(logits_fn, params, domain, has_params, has_domain, keys)
      # Square and FAB-T compact their rows: the per-row domain (and a randomised model's
      # per-row keys) travel with them.
      row_args = (domain,) if keys is None else (domain, keys)
      rows_f = lambda z, dom, *k: _bind(logits_fn, params, dom, has_params, has_domain,
                                        k[0] if k else None)(z)
      x_adv = entry.run_stage(f, images, labels, rng, rows=(rows_f, row_args), eps=eps,
                              norm=norm, budget=budget, settings=s, index=index, rank=rank,
                              step_size=step_size)
      if randomised:  # re-score with a draw the attack never saw (not the one it found wrong)
        f = _bind(logits_fn, params, domain, has_params, has_domain,
                  jax.vmap(jax.random.fold_in, in_axes=(0, None))(keys, _SCORE_TAG))
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
                    index_offset: int = 0, version: str = registry.STANDARD,
                    programs: list | None = None, eot_draws: int | None = None,
                    randomised: bool = False) -> RobustResult | None:
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
    eps: threat-model radius in pixels (l_inf: [0, 1]; l_2, l_1: >= 0). eps = 0 skips no work
      but returns robust == clean_correct.
    norm: "linf", "l2" or "l1" (each attack's registry entry lists the norms it supports; every
      one but PGD has an l_1 form).
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
    version: the suite version whose per-norm settings the attacks use ('standard', or 'rand':
      APGD-CE / APGD-DLR with EOT over 20 draws).
    programs: a list to fill instead of running (the memory check): each distinct stage
      program, compiled ahead of time for full batches of the first batch's shapes, is appended
      as (stage name, `jax.stages.Compiled`) and None is returned. They stay in the cache (with
      `params`), so a later call with the same shapes executes these very objects.
    eot_draws: the draws per gradient of the attacks with an EOT form (default their version's;
      an attack without one is a ValueError).
    randomised: `logits_fn` takes one more argument, keys [b] (one PRNG key per row), and draws
      its randomness from them (`attacks.eot`).

  Returns:
    A `RobustResult` (accuracies, per-example flags, and each attack's settings: budget,
    budget kind, restarts, targets, loss; where the time went: `seconds` (running, compilation
    excluded), `compile_seconds`, `rows_attacked` (real rows) and `rows_computed` (with
    padding)). Every compiled stage runs with full-precision (float32, 'highest') matmuls.
  """
  names = _expand_attacks(attacks)
  budgets = registry.resolve_budgets(names, num_steps)
  entries = [registry.get(n) for n in names]
  registry.check_eot(names, eot_draws)
  for entry in entries:
    if norm not in entry.norms and norm in pgd_lib.ALL_NORMS:
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
    if eot_draws is not None:
      s["eot_draws"] = int(eot_draws)
    pgd_lib.check_settings(eps=eps, norm=norm, num_steps=budgets[entry.name],
                           restarts=s.get("restarts", 1), norms=pgd_lib.ALL_NORMS)
    apgd_lib.check_largereps(norm, budgets[entry.name], s.get("largereps", False))
    attack_settings.append(s)
  if not names:
    pgd_lib.check_settings(eps=eps, norm=norm, num_steps=1, restarts=restarts or 1,
                           norms=pgd_lib.ALL_NORMS)
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
  clean_key = jax.device_put(jax.random.fold_in(base_key, 2 ** 31 - 1), parallel.replicated(mesh))
  eps = float(eps)

  stages: list[tuple[int, str, int]] = []  # (attack position, attack name, rank); -1 = clean
  settings_out: list[dict] = []
  queues: list[_Queue] = []
  state = dict(b=None, has_domain=None, num_classes=None, n=0, shapes=None)
  clean_correct: list[bool] = []
  broken_by: list[int] = []
  compiles: dict[int, int] = {}  # compilations per attack position in this call

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
      if randomised:
        out["randomised"] = True
      out.update(seconds=0.0, compile_seconds=0.0, rows_attacked=0, rows_computed=0)
      stages.extend((j, entry.name, r) for r in range(n_stages))
      settings_out.append(out)
    queues.extend(_Queue() for _ in stages)

  def stage_fn(stage):
    """(cache key, builder) of the jitted function of `stage`."""
    j, a, _ = stage
    hd = state["has_domain"]
    if a == "clean":
      return (("clean", logits_fn, has_params, hd, mesh, randomised),
              lambda: _clean_fn(logits_fn, has_params, hd, mesh, randomised))
    static = tuple(sorted(attack_settings[j].items()))
    return (("attack", a, id(registry.get(a)), norm, budgets[a], static, logits_fn, has_params,
             hd, mesh, randomised),
            lambda: _attack_fn(logits_fn, has_params, hd, mesh, a, norm, budgets[a], static,
                               randomised))

  def compiled(stage, args: tuple):
    """The AOT-compiled executable of `stage` for these arguments' shapes (compiled once; the
    compilation time goes to the attack's `compile_seconds`, not its `seconds`)."""
    j = stage[0]
    fn_key, build = stage_fn(stage)
    key = ("executable", fn_key, args[1].shape[0], state["shapes"])

    def lower_and_compile():
      start = time.perf_counter()
      executable = _cached(fn_key, build, store).lower(*args).compile()
      if j >= 0:
        settings_out[j]["compile_seconds"] += time.perf_counter() - start
        compiles[j] = compiles.get(j, 0) + 1
      return executable
    return _cached(key, lower_and_compile, store)

  def call_size(k: int, n: int) -> int:
    """Rows of the call that runs stage k on n rows: the batch, or for a partial flush the
    smallest bucket that holds them (`flush_size`), unless a larger shape of the same attack is
    compiled already and its extra padding costs less than a compilation would (both measured
    on this attack as it runs). The results do not depend on it."""
    b = state["b"]
    target = b if n == b else flush_size(n, b, n_dev)
    j = stages[k][0]
    if j < 0 or target == b or not compiles.get(j) or not settings_out[j]["rows_computed"]:
      return target
    fn_key, _ = stage_fn(stages[k])
    row_cost = settings_out[j]["seconds"] / settings_out[j]["rows_computed"]
    compile_cost = settings_out[j]["compile_seconds"] / compiles[j]
    step = flush_size(1, b, n_dev)
    for size in sorted({min(b, target + i * step) for i in range(b // step + 2)}):
      if ("executable", fn_key, size, state["shapes"]) in store:
        return size if size == target or (size - target) * row_cost < compile_cost else target
    return target

  def stage_args(k: int, rows: dict, size: int) -> tuple:
    """The arguments of stage k's compiled call on `rows` padded to `size` rows."""
    sharding = parallel.batch_sharding(mesh)
    rows = _pad(rows, size)
    dev = {key: jax.device_put(v, sharding) for key, v in rows.items()}
    domain = dev["domain"] if state["has_domain"] else jax.device_put(
        np.zeros((size,), np.float32), sharding)
    j, a, rank = stages[k]
    if a == "clean":
      return (params_dev, dev["image"], dev["label"], domain, dev["mask"], dev["key"], clean_key)
    return (params_dev, dev["image"], dev["label"], domain, dev["mask"], dev["key"],
            attack_keys[j], np.int32(rank), np.float32(eps),
            np.float32(0.0 if step_size is None else step_size))

  def run_stage(k: int, rows: dict) -> np.ndarray:
    n = len(rows["index"])
    size = call_size(k, n)
    args = stage_args(k, rows, size)
    j = stages[k][0]
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
      if programs is not None:
        empty = {key: v[:0] for key, v in rows.items()}
        empty.update(index=np.zeros(0, np.int32), key=np.zeros(0, np.int32))
        for k, stage in enumerate(stages):
          fn = compiled(stage, stage_args(k, empty, state["b"]))
          if all(fn is not other for _, other in programs):
            programs.append((stage[1], fn))
        return None
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
