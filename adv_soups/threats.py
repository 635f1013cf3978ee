"""Named threat models, one domain each: `config.threats` and its one-threat form `config.attack`.

Domain 0 is clean and domain i the i-th entry of `config.threats`, in order:

  config.threats.linf = dict(norm="linf", eps=0.1, num_steps=5)
  config.threats.l2 = dict(norm="l2", eps=0.5, num_steps=5, loss="trades", beta=6.0)

Fields of a threat (`THREAT_DEFAULTS`): norm and eps (required; eps in pixel units, l_inf in
[0, 1], l_2 >= 0), num_steps and step_size of the training PGD (None = 2.5 * eps / num_steps),
eps_warmup_steps (eps and step size ramp linearly from 0; 0 = off), loss ("ce": the adversarial
cross-entropy; "trades": Zhang et al. 2019's objective inside the threat's domain, see
`attacks/trades.py`), beta (TRADES' KL weight) and weight (scales the threat's whole objective).

`config.threats` is an insertion-ordered ConfigDict (`ordered()`; a plain ConfigDict sorts its
keys). A config without `threats` (every config and workdir older than them) is one threat named by its
norm, read from `config.attack` with loss "ce" and weight `train.adv_weight`: `normalise` gives
both forms the same shape, so everything that reads threats reads old workdirs unchanged. The
resolved config records each threat's domain in a `domain` field (config.json sorts its keys).
"""
from __future__ import annotations

import re
from typing import Any

import ml_collections

from adv_soups.attacks.pgd import NORMS

LOSSES = ("ce", "trades")
THREAT_DEFAULTS = dict(norm=None, eps=None, num_steps=10, step_size=None, eps_warmup_steps=0,
                       loss="ce", beta=6.0, weight=1.0)
REQUIRED = ("norm", "eps")
RESERVED_NAMES = ("clean", "union")  # domain 0's name and the union column of the reports
_NAME = re.compile(r"[a-z][a-z0-9_]*")


def ordered(entries: dict | None = None) -> ml_collections.ConfigDict:
  """A ConfigDict that keeps its keys in insertion order (ConfigDict sorts them by default): the
  type of `config.threats`, whose order is the domains' order."""
  return ml_collections.ConfigDict(entries or {}, sort_keys=False)


def threat(norm: str, eps: float, **fields: Any) -> ml_collections.ConfigDict:
  """One entry of `config.threats` (the other fields at `THREAT_DEFAULTS`), e.g.
  `config.threats.l2 = threats.threat("l2", 0.5, num_steps=5)`."""
  entry = dict(THREAT_DEFAULTS, norm=norm, eps=eps)
  entry.update(fields)
  return ml_collections.ConfigDict(entry)


def _as_dict(value: Any) -> dict:
  if value is None:
    return {}
  return value.to_dict() if hasattr(value, "to_dict") else dict(value)


def has_threats(config: Any) -> bool:
  """True when `config` (ConfigDict or dict) lists threats (not the one-threat `config.attack`)."""
  return bool(_as_dict(_get(config, "threats")))


def _get(config: Any, name: str, default: Any = None) -> Any:
  getter = getattr(config, "get", None)
  return getter(name, default) if getter else default


def _check_one(name: str, entry: dict) -> dict:
  """The threat `name` with its defaults filled; ValueError (one line) on a bad field."""
  where = f"config.threats.{name}"
  if not _NAME.fullmatch(name) or name in RESERVED_NAMES:
    raise ValueError(f"{where}: a threat's name must be lower-case letters, digits and _ "
                     f"(starting with a letter), not {', '.join(RESERVED_NAMES)}")
  unknown = sorted(set(entry) - set(THREAT_DEFAULTS) - {"domain"})
  if unknown:
    raise ValueError(f"{where}.{unknown[0]} is not a field of a threat; allowed: "
                     f"{', '.join(THREAT_DEFAULTS)}")
  for field in REQUIRED:
    if entry.get(field) is None:
      raise ValueError(f"{where} has no {field}: every threat needs norm and eps")
  out = dict(THREAT_DEFAULTS)
  out.update({k: v for k, v in entry.items() if v is not None or k == "step_size"})
  if out["norm"] not in NORMS:
    raise ValueError(f"{where}.norm={out['norm']!r} is unknown: allowed {', '.join(NORMS)}")
  eps = out["eps"]
  if isinstance(eps, bool) or not isinstance(eps, (int, float)):
    raise ValueError(f"{where}.eps={eps!r} must be a number (pixel units)")
  high = 1.0 if out["norm"] == "linf" else float("inf")
  if not 0.0 <= eps <= high:
    allowed = "[0, 1] for linf" if out["norm"] == "linf" else ">= 0"
    raise ValueError(f"{where}.eps={eps} is out of range: allowed {allowed}")
  out["eps"] = float(eps)
  for field, low in (("num_steps", 1), ("eps_warmup_steps", 0)):
    value = out[field]
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
      raise ValueError(f"{where}.{field} must be an integer >= {low}, got {value!r}")
  if out["step_size"] is not None and not out["step_size"] > 0:
    raise ValueError(f"{where}.step_size={out['step_size']} must be > 0 (or None)")
  if out["loss"] not in LOSSES:
    raise ValueError(f"{where}.loss={out['loss']!r} is unknown: allowed {', '.join(LOSSES)}")
  for field in ("beta", "weight"):
    value = out[field]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
      raise ValueError(f"{where}.{field}={value!r} must be a number >= 0")
    out[field] = float(value)
  out.pop("domain", None)
  return out


def normalise(config: Any) -> dict[str, dict]:
  """The threats of `config` (a ConfigDict or the dict of a config.json), in domain order:
  {name: {norm, eps, num_steps, step_size, eps_warmup_steps, loss, beta, weight}}. Threat i of
  this dict is domain i + 1. `config.threats` is an insertion-ordered ConfigDict (`ordered()`; a plain ConfigDict sorts its
keys). A config without `threats` gives one threat named by its norm (from
  `config.attack`, loss "ce", weight `train.adv_weight`). step_size stays None where unset.
  ValueError (one line) on a bad threat."""
  entries = _as_dict(_get(config, "threats"))
  if not entries:
    attack = _as_dict(_get(config, "attack"))
    train = _as_dict(_get(config, "train"))
    entry = {k: attack[k] for k in ("norm", "eps", "num_steps", "step_size", "eps_warmup_steps")
             if k in attack}
    entry["weight"] = train.get("adv_weight", THREAT_DEFAULTS["weight"])
    return {str(entry.get("norm")): _check_one(str(entry.get("norm")), entry)}
  names = list(entries)
  if all("domain" in _as_dict(entries[n]) for n in names):  # a resolved config (sorted keys)
    names.sort(key=lambda n: entries[n]["domain"])
    if [entries[n]["domain"] for n in names] != list(range(1, len(names) + 1)):
      raise ValueError(f"config.threats: the domains {[entries[n]['domain'] for n in names]} "
                       "must be 1, 2, ... (domain 0 is clean)")
  return {name: _check_one(name, _as_dict(entries[name])) for name in names}


def check_exclusive(config: ml_collections.ConfigDict, base: ml_collections.ConfigDict) -> None:
  """ValueError (one line) when `config` sets threats and also changes `attack` or
  `train.adv_weight` from their defaults in `base` (the one-threat form: which one would win?)."""
  if not has_threats(config):
    return
  attack, default = _as_dict(config.get("attack")), _as_dict(base.get("attack"))
  changed = sorted(k for k in set(attack) | set(default) if attack.get(k) != default.get(k))
  if changed:
    raise ValueError(f"config sets threats and also changes config.attack.{changed[0]}: set the "
                     "training attack in config.threats only (leave config.attack at its default)")
  if config.train.get("adv_weight") != base.train.get("adv_weight"):
    raise ValueError("config sets threats and also changes config.train.adv_weight: give each "
                     "threat its weight in config.threats.NAME.weight")


def resolved(threats: dict[str, dict]) -> ml_collections.ConfigDict:
  """`config.threats` of a resolved config from `normalise`'s output: in order, each entry with
  its step_size (2.5 * eps / num_steps when None) and its `domain` (1, 2, ...) filled."""
  out = {}
  for i, (name, threat_) in enumerate(threats.items(), start=1):
    entry = dict(threat_, domain=i)
    if entry["step_size"] is None:
      entry["step_size"] = 2.5 * entry["eps"] / entry["num_steps"]
    out[name] = entry
  return ordered(out)


def resolve(config: ml_collections.ConfigDict) -> dict[str, dict]:
  """Validates and fills `config.threats` in place where set (`resolved`); returns
  `normalise(config)` with step sizes filled."""
  threats = normalise(config)
  filled = resolved(threats)
  if has_threats(config):
    config.threats = filled
  return {name: {k: v for k, v in entry.items() if k != "domain"}
          for name, entry in filled.to_dict().items()}


def names(config: Any) -> list[str]:
  """The threats' names in domain order (domain i + 1 is names[i])."""
  return list(normalise(config))


def num_domains(config: Any) -> int:
  """1 (clean) + the number of threats."""
  return 1 + len(normalise(config))


def canonical(config: dict) -> dict:
  """A config dict in which the threats are spelt one way: `threats` = `normalise(config)` with
  the one-threat fields (`attack`, `train.adv_weight`) removed, so that an old workdir (no
  `threats`) and the same run spelt with threats compare equal (the resume check)."""
  out = dict(config)
  threats = normalise(config)
  for threat_ in threats.values():  # resolved configs fill it; a config.json may predate that
    if threat_["step_size"] is None:
      threat_["step_size"] = 2.5 * threat_["eps"] / threat_["num_steps"]
  out["threats"] = threats
  out.pop("attack", None)
  if isinstance(out.get("train"), dict):
    out["train"] = {k: v for k, v in out["train"].items() if k != "adv_weight"}
  return out
