"""The one table of attacks: names, display names, default budgets, and named suites.

Everything that runs or names an attack (the runner, the evaluation engine, `load()`, the demo,
the command lines) reads this table, so an attack is added in one place.

A *suite* is an ordered tuple of attack names run in sequence, each on the points every earlier
one failed on; a point is robust only if all of them fail. A request names a suite as one of
`SUITES` ('autoattack' is AutoAttack's standard version: APGD-CE, APGD-T, FAB-T, Square;
'autoattack-rand' its version for randomised defences: APGD-CE and APGD-DLR with EOT) or as a
comma list of attacks ('apgd-ce,apgd-t', AutoAttack's white-box core), or 'none' (clean only).

A suite name also fixes per-(suite, norm) settings (`suite_settings`), as AutoAttack's
`set_version` does: the standard version at l_1 runs APGD-CE with 5 restarts and APGD-T with 5
targets, both with the 3 / 2 / 1 eps schedule (`largereps`); the rand version runs both APGD
attacks with EOT over 20 draws of the model's randomness per gradient.
"""
from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Attack:
  """One attack of the table.

  name: the name requests use ('apgd-t'); display: the name reports print ('APGD-T').
  budget: what `steps` counts, 'iterations' (gradient attacks) or 'queries' (Square).
  default_steps: AutoAttack's default budget; None = the run's config.eval.attack_steps (PGD).
  targeted: one runner stage per target class (9 runner-up classes in AutoAttack).
  min_classes: the fewest classes the attack's loss is defined for.
  norms: the threat models it has a form for (PGD, a training attack, has no l_1 step).
  """
  name: str
  display: str
  budget: str = "iterations"
  default_steps: int | None = 100
  targeted: bool = False
  min_classes: int = 2
  description: str = ""
  norms: tuple[str, ...] = ("linf", "l2", "l1")


ATTACKS: dict[str, Attack] = {a.name: a for a in (
    Attack("pgd", "PGD", default_steps=None, norms=("linf", "l2"),
           description="PGD-k on the cross-entropy, random start, step 2.5 eps / k"),
    Attack("apgd-ce", "APGD-CE", description="APGD on the cross-entropy (Croce & Hein 2020)"),
    Attack("apgd-dlr", "APGD-DLR", min_classes=3, description="APGD on the DLR loss"),
    Attack("apgd-t", "APGD-T", targeted=True, min_classes=4,
           description="APGD on the targeted DLR loss, 9 runner-up targets"),
    Attack("fab-t", "FAB-T", targeted=True,
           description="targeted FAB, minimal-distortion points counted only within eps"),
    Attack("square", "Square", budget="queries", default_steps=5000,
           description="score-based Square attack (no gradients), margin loss"),
)}

STANDARD_AUTOATTACK = ("apgd-ce", "apgd-t", "fab-t", "square")
WHITE_BOX_CORE = ("apgd-ce", "apgd-t")
RAND_AUTOATTACK = ("apgd-ce", "apgd-dlr")
SUITES: dict[str, tuple[str, ...]] = {
    "autoattack": STANDARD_AUTOATTACK,  # AutoAttack's standard version
    "autoattack-rand": RAND_AUTOATTACK,  # its version for randomised defences (EOT)
    "none": (),
}
VERSIONS = {"autoattack": "standard", "autoattack-rand": "rand"}
NUM_TARGETS = 9  # AutoAttack's targets for APGD-T and FAB-T (at most K - 1)
L1_RESTARTS = 5  # AutoAttack's standard version at l_1: APGD-CE restarts ...
L1_TARGETS = 5  # ... and APGD-T targets, both with the 3 / 2 / 1 eps schedule
EOT_DRAWS = 20  # the rand version's draws per gradient
EOT_ATTACKS = ("apgd-ce", "apgd-dlr")  # the attacks with an EOT form


def version_of(text) -> str | None:
  """'standard' for 'autoattack', 'rand' for 'autoattack-rand', else None (a list of attacks)."""
  return VERSIONS.get(text.strip()) if isinstance(text, str) else None


def check_norm(names: tuple[str, ...], norm: str) -> None:
  """ValueError (one line) when an attack of `names` has no form for `norm`."""
  for n in names:
    if norm not in ATTACKS[n].norms:
      have = [a for a in ATTACKS if norm in ATTACKS[a].norms]
      suites = [s for s, members in SUITES.items() if members and all(
          norm in ATTACKS[m].norms for m in members)]
      raise ValueError(f"attack {n!r} has no {norm} form: for norm={norm} use "
                       f"{', '.join(have + suites)}")


def suite_settings(version: str | None, norm: str, names: tuple[str, ...],
                   eot_draws: int | None = None) -> dict[str, dict]:
  """Per-attack settings {name: {'restarts', 'num_targets', 'largereps', 'eot_draws'}} that a
  suite fixes at `norm` (AutoAttack's set_version), plus `eot_draws` when asked for (the rand
  version's default is 20; EOT exists for APGD-CE and APGD-DLR only: ValueError otherwise)."""
  out: dict[str, dict] = {}
  if version == "standard" and norm == "l1":
    out["apgd-ce"] = dict(restarts=L1_RESTARTS, largereps=True)
    out["apgd-t"] = dict(num_targets=L1_TARGETS, largereps=True)
  if version == "rand" and eot_draws is None:
    eot_draws = EOT_DRAWS
  if eot_draws is not None:
    from adv_soups.attacks import eot  # pylint: disable=import-outside-toplevel
    eot.check_draws(eot_draws)
    other = [n for n in names if n not in EOT_ATTACKS]
    if other:
      raise ValueError(f"EOT draws (--eot_draws={eot_draws}) apply to {', '.join(EOT_ATTACKS)} "
                       f"only, not {', '.join(other)}: use --attack=autoattack-rand or "
                       f"{','.join(EOT_ATTACKS)}")
    for n in names:
      out.setdefault(n, {})["eot_draws"] = int(eot_draws)
  return out


def allowed_text() -> str:
  """'pgd, apgd-ce, ..., autoattack, none, or a comma list such as apgd-ce,apgd-t'."""
  return (", ".join(list(ATTACKS) + list(SUITES)) +
          ", or a comma list of attacks such as apgd-ce,apgd-t")


def parse_suite(text: str | tuple[str, ...] | list[str] | None) -> tuple[str, ...]:
  """The attacks a request runs, in order: 'autoattack' -> the four of the standard version,
  'apgd-ce,apgd-t' -> those two, 'none' / '' / None -> (). ValueError naming the bad part."""
  if text is None:
    return ()
  if isinstance(text, (tuple, list)):
    items = [str(t) for t in text]
  else:
    items = [t.strip() for t in str(text).split(",")]
  if len(items) == 1 and items[0] in SUITES:
    return SUITES[items[0]]
  if len(items) == 1 and items[0] == "":
    return ()
  names: list[str] = []
  for item in items:
    if item in SUITES and len(items) > 1:
      raise ValueError(f"--attack={text!r}: the suite {item!r} cannot be part of a comma list; "
                       f"allowed {allowed_text()}")
    if item not in ATTACKS:
      raise ValueError(f"unknown attack {item!r}: allowed {allowed_text()}")
    if item in names:
      raise ValueError(f"--attack={text!r} names {item!r} twice")
    names.append(item)
  return tuple(names)


def suite_label(names: tuple[str, ...], version: str | None = None) -> str:
  """A short, file-name-safe label: 'autoattack' for the standard version, 'autoattack-rand'
  for the rand version, 'apgd-ce+apgd-t' otherwise, 'none' for clean accuracy only."""
  if not names:
    return "none"
  if version == "rand" and tuple(names) == RAND_AUTOATTACK:
    return "autoattack-rand"
  if tuple(names) == STANDARD_AUTOATTACK:
    return "autoattack"
  return "+".join(names)


def resolve_steps(names: tuple[str, ...], steps: int | None, pgd_steps: int,
                  square_queries: int | None = None) -> dict[str, int]:
  """The budget of each attack: `steps` (when given) for the iteration attacks, else the table's
  default (PGD: `pgd_steps`, the run's config.eval.attack_steps); Square's queries from
  `square_queries` (default 5,000)."""
  out = {}
  for name in names:
    attack = ATTACKS[name]
    if attack.budget == "queries":
      out[name] = int(square_queries or attack.default_steps)
    elif steps is not None:
      out[name] = int(steps)
    else:
      out[name] = int(pgd_steps if attack.default_steps is None else attack.default_steps)
  return out


def describe(names: tuple[str, ...], budgets: dict[str, int],
             settings: dict[str, dict] | None = None, version: str | None = None,
             norm: str | None = None) -> str:
  """What ran, in words: 'PGD-20', 'APGD-CE + APGD-T (100 iterations each)', or
  "AutoAttack, standard version: APGD-CE + APGD-T + FAB-T (100 iterations each) + Square
  (5000 queries)". A partial suite is never called AutoAttack, nor the rand version with other
  than its 20 draws. `settings` (`suite_settings`) adds restarts, targets, the l_1 eps schedule
  and EOT draws to the attacks' names."""
  if not names:
    return "none (clean accuracy only)"
  settings = settings or {}
  if tuple(names) == ("pgd",):
    return f"PGD-{budgets['pgd']}"
  parts = []
  iters = sorted({budgets[n] for n in names if ATTACKS[n].budget == "iterations"})
  for n in names:
    a = ATTACKS[n]
    extra = []
    s = settings.get(n, {})
    if s.get("restarts", 1) > 1:
      extra.append(f"{s['restarts']} restarts")
    if "num_targets" in s:
      extra.append(f"{s['num_targets']} targets")
    if s.get("largereps"):
      extra.append("eps schedule 3/2/1 eps")
    if s.get("eot_draws"):
      extra.append(f"EOT {s['eot_draws']} draws")
    label = f"{a.display}-{budgets[n]}" if n == "pgd" else a.display
    parts.append(label + (f" [{', '.join(extra)}]" if extra else ""))
  text = " + ".join(parts)
  details = []
  if iters and not (len(names) == 1 and names[0] == "pgd"):
    details.append(f"{iters[0]} iterations" + (" each" if len(names) > 1 else "")
                   if len(iters) == 1 else "iterations " + "/".join(map(str, iters)))
  if "square" in names:
    details.append(f"Square {budgets['square']} queries")
  text += f" ({'; '.join(details)})" if details else ""
  at_norm = f" ({norm})" if norm == "l1" else ""
  if tuple(names) == STANDARD_AUTOATTACK and (
      version == "standard" or (version is None and norm != "l1")):  # l_1: only with its settings
    return f"AutoAttack, standard version{at_norm}: " + text
  if (tuple(names) == RAND_AUTOATTACK and version == "rand"
      and all(settings.get(n, {}).get("eot_draws") == EOT_DRAWS for n in names)):
    return "AutoAttack, rand version (randomised defences): " + text
  if tuple(names) == WHITE_BOX_CORE:
    return text + ", AutoAttack's white-box core, not the full AutoAttack"
  return text


def display(name: str) -> str:
  """'apgd-ce' -> 'APGD-CE'."""
  return ATTACKS[name].display if name in ATTACKS else name.upper()
