"""Co-training one tiny ViT on digits against two threats: domain 0 clean, 1 l_inf, 2 l_2.

  python -m adv_soups.train --config=configs/digits_threats.py --workdir=workdirs/digits_threats
  python -m adv_soups.sweep --workdir=workdirs/digits_threats --weights=simplex:0.1

configs/digits.py with `config.threats` in place of `config.attack`: l_inf eps 0.1 (the digits
default) and l_2 eps 0.5, both PGD-5 (step 2.5 * eps / 5). Our choice of radii: on 8x8 images an
l_2 ball of 0.5 neither contains the l_inf ball of 0.1 (whose corners are 0.8 away) nor lies in
it, so the two threats differ. Each step attacks every image twice (once per threat), so a step
costs about 1.7x the two-domain one.
`get_config("loss=trades")` trains both threats with TRADES (beta 6) instead of the
adversarial cross-entropy; `get_config("threats=linf")` (or `l2`) keeps only that threat.
"""
from adv_soups import config_base, threats
from configs import digits


def get_config(arg=None):
  config = digits.get_config()
  # The threats replace config.attack: a config that sets both is refused, so it goes back to
  # its default here.
  default = config_base.base_config()
  config.attack = default.attack
  config.train.adv_weight = default.train.adv_weight
  options = dict(item.split("=") for item in arg.split(",")) if arg else {}
  unknown = sorted(set(options) - {"loss", "threats"})
  if unknown:
    raise ValueError(f"unknown config argument {unknown[0]!r}: allowed 'loss', 'threats'")
  loss = options.get("loss", "ce")
  chosen = options.get("threats", "linf+l2").split("+")
  available = dict(linf=threats.threat("linf", 0.1, num_steps=5, loss=loss),
                   l2=threats.threat("l2", 0.5, num_steps=5, loss=loss))
  config.threats = threats.ordered({name: available[name] for name in chosen})
  config.evals.val.update(domains="clean," + ",".join(chosen))
  return config
