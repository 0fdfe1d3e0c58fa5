"""model=laplace against laplace-torch: the same MAP network, the same prior precision, diag and kron.

Trains ``model=laplace`` once (the MAP network), then for each Hessian structure fits our last-layer
posterior and laplace-torch's (``Laplace(last_layer, "classification", subset_of_weights="all")`` on
the same penultimate features, which is the last-layer Laplace of the same network) with the same
prior precision: ours fitted by the Laplace evidence unless ``--prior-precision`` is given. Prints
test acc / NLL / ECE of both for the probit and MC links, their differences and ratios, the relative
difference of the two posterior covariances, and laplace-torch's own evidence-fitted prior precision.
The diag posteriors should agree to float precision. The kron ones differ slightly by design: ours
Kronecker-factors weights and bias jointly (the bias as a constant 1 feature), laplace-torch's
curvlinops backend factors the bias as a block of its own, so its kron has no weight-bias covariance.

laplace-torch 0.3 needs torchvision, which does not import beside the project's torch: it lives in a
separate venv, and only the ``--reference`` half of this script (run by that venv's Python) imports it::

    python3 -m venv /work/venv-laplace
    /work/venv-laplace/bin/pip install torch==2.14.1 torchvision==0.29.1 && /work/venv-laplace/bin/pip install laplace-torch
    .venv/bin/python benchmarks/laplace_reference.py --reference-python /work/venv-laplace/bin/python [overrides]

Without ``--reference-python`` only our numbers are printed.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

HESSIANS = ("diag", "kron")


def reference(inputs: Path, outputs: Path, samples: int) -> None:
    """laplace-torch's side, run in its own venv: fit and predict from the saved features."""
    from laplace import Laplace  # only here: the project's venv has no laplace-torch

    d = np.load(inputs)
    weights = torch.as_tensor(d["weights"])  # [K, F + 1], bias last
    layer = torch.nn.Linear(weights.shape[1] - 1, weights.shape[0])
    with torch.no_grad():
        layer.weight.copy_(weights[:, :-1])
        layer.bias.copy_(weights[:, -1])
    train = torch.utils.data.TensorDataset(torch.as_tensor(d["train_a"]), torch.as_tensor(d["train_y"]))
    test_a = torch.as_tensor(d["test_a"])
    out = {}
    for hessian in HESSIANS:
        la = Laplace(layer, "classification", subset_of_weights="all", hessian_structure=hessian,
                     prior_precision=float(d[f"delta_{hessian}"]))
        la.fit(torch.utils.data.DataLoader(train, batch_size=256))
        torch.manual_seed(0)
        out[f"{hessian}_probit"] = la(test_a, pred_type="glm", link_approx="probit").detach().numpy()
        out[f"{hessian}_mc"] = la(test_a, pred_type="glm", link_approx="mc", n_samples=samples).detach().numpy()
        cov = (torch.diag(la.posterior_variance) if hessian == "diag"
               else la.posterior_precision.to_matrix(exponent=-1))
        out[f"{hessian}_cov"] = cov.detach().numpy()
        out[f"{hessian}_backend"] = np.array(type(la.backend).__name__)
        la.optimize_prior_precision(method="marglik")
        out[f"{hessian}_own_delta"] = np.array(float(la.prior_precision))
    np.savez(outputs, **out)


def _to_ours(cov_theirs: np.ndarray, classes: int, inputs: int) -> np.ndarray:
    """laplace-torch orders a Linear's parameters as [weight row-major, bias]; ours as [K, F + 1] rows."""
    order = [k * (inputs - 1) + j if j < inputs - 1 else classes * (inputs - 1) + k
             for k in range(classes) for j in range(inputs)]
    return cov_theirs[np.ix_(order, order)]


def ours(args: argparse.Namespace) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    from omegaconf import OmegaConf

    from dl_uncertainty.config.compose import load_config
    from dl_uncertainty.data.tables import prepare
    from dl_uncertainty.families import laplace as L
    from dl_uncertainty.training.loop import train_model
    from dl_uncertainty.uncertainty import metrics as M

    cfg = load_config(["model=laplace", *args.overrides])
    splits = prepare(cfg.data, cfg.seed)
    train, val, test = splits["train"], splits["val"], splits["test"]
    model = train_model(cfg, train, val, quiet=True).model
    features = {name: L.split_features(model, s.x).float() for name, s in (("train", train), ("test", test))}
    saved = {"weights": model.weights().numpy(), "train_a": features["train"][:, :-1].numpy(), "train_y": train.y,
             "test_a": features["test"][:, :-1].numpy()}
    probs, covs = {}, {}
    for hessian in HESSIANS:
        fit = "none" if args.prior_precision else "marglik"
        c = OmegaConf.merge(cfg, {"model": {"hessian": hessian, "prior_precision_fit": fit,
                                            "prior_precision": args.prior_precision or 1.0}})
        model.hessian = hessian
        L.FAMILY.after_training(model, train, val, c)
        saved[f"delta_{hessian}"] = np.array(float(model.prior_precision))
        with torch.inference_mode():
            probs[f"{hessian}_probit"] = L.probit_log_probs(model, features["test"]).exp().numpy()
            lp = torch.log_softmax(L.sample_logits(model, features["test"], args.samples, seed=0), -1)
            probs[f"{hessian}_mc"] = lp.exp().mean(0).numpy()
            covs[hessian] = model.covariance().numpy()
        print(f"{hessian}: prior precision {float(model.prior_precision):.4g}"
              f" ({'given' if args.prior_precision else 'ours, Laplace evidence on train'})")

    theirs = None
    if args.reference_python:
        with tempfile.TemporaryDirectory() as tmp:
            inputs, outputs = Path(tmp) / "inputs.npz", Path(tmp) / "outputs.npz"
            np.savez(inputs, **saved)
            subprocess.run([args.reference_python, __file__, "--reference", str(inputs), str(outputs),
                            "--samples", str(args.samples)], check=True)
            theirs = dict(np.load(outputs))
    else:
        print("laplace-torch: not run (give --reference-python, the Python of a venv with laplace-torch)")

    y = test.y

    def scores(p: np.ndarray) -> tuple[float, float, float]:
        lp = np.log(np.maximum(p, 1e-300))[None]
        return M.accuracy(lp, y), M.nll(lp, y), M.ece(lp, y)

    print(f"\ntest split: {len(y)} rows, {len(train.y)} training rows, MC samples {args.samples}")
    print(f"{'posterior':<14}{'ours acc':>9}{'nll':>8}{'ece':>8}" + (
        f"{'ref acc':>9}{'nll':>8}{'ece':>8}{'d acc':>8}{'nll ratio':>10}{'d ece':>8}" if theirs else ""))
    for key, p in probs.items():
        acc, nll, ece = scores(p)
        line = f"{key:<14}{acc:>9.4f}{nll:>8.4f}{ece:>8.4f}"
        if theirs:
            r_acc, r_nll, r_ece = scores(theirs[key])
            line += f"{r_acc:>9.4f}{r_nll:>8.4f}{r_ece:>8.4f}{acc - r_acc:>+8.4f}{nll / r_nll:>10.3f}{ece - r_ece:>+8.4f}"
        print(line)
    if theirs:
        print()
        for hessian in HESSIANS:
            cov = _to_ours(theirs[f"{hessian}_cov"], *model.variance.shape)
            rel = np.linalg.norm(covs[hessian] - cov) / np.linalg.norm(cov)
            gap = np.abs(probs[f"{hessian}_probit"] - theirs[f"{hessian}_probit"]).max()
            print(f"{hessian}: posterior covariance |ours - ref| / |ref| = {rel:.2e};  probit probs max |diff| "
                  f"{gap:.2e};  laplace-torch backend {theirs[f'{hessian}_backend']}, its own evidence-fitted "
                  f"prior precision {float(theirs[f'{hessian}_own_delta']):.4g} (ours {float(saved[f'delta_{hessian}']):.4g})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reference-python", help="the Python of a venv with laplace-torch")
    parser.add_argument("--prior-precision", type=float, help="use this prior precision (default: ours, by evidence)")
    parser.add_argument("--samples", type=int, default=1000, help="MC samples of both predictives")
    parser.add_argument("--reference", nargs=2, type=Path, help=argparse.SUPPRESS)  # laplace-torch's half
    parser.add_argument("overrides", nargs="*", help="config overrides, e.g. train.weight_decay=1e-3")
    args = parser.parse_args()
    if args.reference:
        reference(*args.reference, args.samples)
    else:
        ours(args)


if __name__ == "__main__":
    main()
