"""Writes tests/data/apgd_reference.npz: AutoAttack's own APGD-CE / APGD-T outputs on a tiny model.

Run once, outside the package's environment (PyTorch is no dependency of ours):

  python3.11 -m venv /tmp/aa_venv && /tmp/aa_venv/bin/pip install torch==2.13.0 numpy
  # (the stored file was made with /work/main/.venv-torch: Python 3.11.7, torch 2.13.0+cpu)
  # fra31/auto-attack, autoattack/autopgd_base.py + autoattack/other_utils.py (unmodified) saved
  # as /tmp/aa_ref/autoattack/{__init__.py (empty), autopgd_base.py, other_utils.py}
  PYTHONPATH=/tmp/aa_ref /tmp/aa_venv/bin/python tests/data/make_apgd_reference.py \
      --digits_csv=.venv/lib/python3.12/site-packages/sklearn/datasets/data/digits.csv.gz

What it does (all float32, CPU, deterministic):
  1. a 2-layer MLP 64 -> 32 (ReLU) -> 10 on sklearn's 8x8 digits (pixels / 16, NHWC [B, 8, 8, 1]),
     trained by full-batch Adam (lr 1e-2, 300 steps, torch seed 0) on a fixed 1,437-image split;
  2. 128 held-out images, and fixed random starts from numpy (seed 0): l_inf uniform in the cube,
     l_2 uniform in the ball, each clipped to [0, 1];
  3. AutoAttack's APGDAttack / APGDAttack_targeted `attack_single_run(x, y, x_init=start)` with the
     control flow of their `perturb` (only the points still robust are attacked; APGD-T tries the
     runner-up classes 2..10 of the clean logits in turn). `perturb` itself draws its own random
     start and takes no x_init, hence this driver: the start is the only thing we choose.

Stored: x, y, w1, b1, w2, b2, start_linf, start_l2, and for each run NAME in RUNS:
  NAME_robust (bool [n], clean-correct and never misclassified), NAME_adv (the last misclassified
  iterate, x where none), NAME_loss (AutoAttack's best loss of the last run that attacked the
  example; CE for APGD-CE, targeted DLR for APGD-T; NaN for clean errors).
"""
import argparse
import gzip

import numpy as np
import torch

from autoattack.autopgd_base import APGDAttack, APGDAttack_targeted

N_ITER = 100
RUNS = {  # name: (attack, norm, eps)
    "apgd_ce_linf": ("ce", "Linf", 0.08),
    "apgd_ce_l2": ("ce", "L2", 0.35),
    "apgd_t_linf": ("t", "Linf", 0.08),
}


def load_digits(path):
  rows = np.loadtxt(gzip.open(path), delimiter=",", dtype=np.float32)
  x = (rows[:, :64] / 16.0).reshape(-1, 8, 8, 1).astype(np.float32)
  return x, rows[:, 64].astype(np.int64)


class MLP(torch.nn.Module):
  def __init__(self):
    super().__init__()
    self.fc1, self.fc2 = torch.nn.Linear(64, 32), torch.nn.Linear(32, 10)

  def forward(self, x):
    return self.fc2(torch.relu(self.fc1(x.reshape(x.shape[0], -1))))


def random_starts(x, eps_linf, eps_l2, seed=0):
  rs = np.random.RandomState(seed)
  linf = np.clip(x + eps_linf * rs.uniform(-1, 1, x.shape), 0, 1).astype(np.float32)
  g = rs.normal(size=x.shape)
  g /= np.sqrt((g ** 2).reshape(len(x), -1).sum(1)).reshape(-1, 1, 1, 1)
  r = rs.uniform(size=(len(x), 1, 1, 1)) ** (1 / 64)
  l2 = np.clip(x + eps_l2 * r * g, 0, 1).astype(np.float32)
  return linf, l2


def run_attack(model, kind, norm, eps, x, y, start):
  """AutoAttack's perturb loop with our start: (robust [n], adv [n, ...], best loss [n])."""
  if kind == "ce":
    attack = APGDAttack(model, n_iter=N_ITER, norm=norm, eps=eps, loss="ce", seed=0,
                        device="cpu")
    targets = [None]
  else:
    attack = APGDAttack_targeted(model, n_iter=N_ITER, norm=norm, eps=eps, seed=0,
                                 n_target_classes=9, device="cpu")
    targets = range(2, 11)
  attack.init_hyperparam(x)
  with torch.no_grad():
    acc = model(x).max(1)[1] == y
  adv, loss = x.clone(), torch.full((len(y),), float("nan"))
  for target_class in targets:
    ind = acc.nonzero().squeeze(1)
    if ind.numel() == 0:
      break
    if target_class is not None:
      with torch.no_grad():
        attack.y_target = model(x[ind]).sort(dim=1)[1][:, -target_class]
    _, acc_curr, loss_curr, adv_curr = attack.attack_single_run(x[ind], y[ind],
                                                                x_init=start[ind])
    broken = (acc_curr == 0).nonzero().squeeze(1)
    acc[ind[broken]] = False
    adv[ind[broken]] = adv_curr[broken]
    loss[ind] = loss_curr.detach()
  return acc.numpy(), adv.detach().numpy(), loss.numpy()


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--digits_csv", required=True)
  parser.add_argument("--out", default="tests/data/apgd_reference.npz")
  parser.add_argument("--num_examples", type=int, default=128)
  args = parser.parse_args()
  torch.manual_seed(0)
  torch.set_num_threads(1)
  x, y = load_digits(args.digits_csv)
  perm = np.random.RandomState(0).permutation(len(y))
  x, y = x[perm], y[perm]
  x_tr, y_tr = torch.from_numpy(x[:1437]), torch.from_numpy(y[:1437])
  x_te, y_te = x[1437:1437 + args.num_examples], y[1437:1437 + args.num_examples]
  model = MLP()
  opt = torch.optim.Adam(model.parameters(), lr=1e-2)
  for _ in range(300):
    opt.zero_grad()
    torch.nn.functional.cross_entropy(model(x_tr), y_tr).backward()
    opt.step()
  model.eval()
  for p in model.parameters():
    p.requires_grad_(False)
  start_linf, start_l2 = random_starts(x_te, RUNS["apgd_ce_linf"][2], RUNS["apgd_ce_l2"][2])
  out = dict(x=x_te, y=y_te.astype(np.int32),
             w1=model.fc1.weight.numpy().T.copy(), b1=model.fc1.bias.numpy().copy(),
             w2=model.fc2.weight.numpy().T.copy(), b2=model.fc2.bias.numpy().copy(),
             start_linf=start_linf, start_l2=start_l2, n_iter=np.int32(N_ITER))
  xt, yt = torch.from_numpy(x_te), torch.from_numpy(y_te)
  with torch.no_grad():
    clean = (model(xt).max(1)[1] == yt).numpy()
  print(f"clean accuracy {clean.mean():.4f} on {len(y_te)}")
  for name, (kind, norm, eps) in RUNS.items():
    start = torch.from_numpy(start_linf if norm == "Linf" else start_l2)
    robust, adv, loss = run_attack(model, kind, norm, eps, xt, yt, start)
    out[f"{name}_robust"], out[f"{name}_adv"], out[f"{name}_loss"] = robust, adv, loss
    out[f"{name}_eps"] = np.float32(eps)
    print(f"{name}: eps {eps}, robust accuracy {robust.mean():.4f}")
  out["torch_version"] = np.array(torch.__version__)
  np.savez_compressed(args.out, **out)
  print("wrote", args.out)


if __name__ == "__main__":
  main()
