"""
A SentEval-style probe (Conneau & Kiela, arXiv 1803.05449): freeze the encoder, mean-pool its last layer, and fit a
logistic regression whose L2 strength is picked on held-out data. It trains no encoder weight, so it is cheap and
varies little across seeds: it measures what pre-training put into the features, which is the lab's question.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F


def logistic_regression(x, y, n_classes, l2, max_iter=200, start=None):
    """Multinomial logistic regression by full-batch L-BFGS: min_W,b mean CE(x W^T + b, y) + l2/2 |W|^2 (no penalty
    on b). x (n, d), y (n,). Deterministic: no sampling anywhere. Returns the fitted nn.Linear. start: a fitted
    nn.Linear to start from (a warm start: the answer of a nearby l2 is close), else zero."""
    lin = nn.Linear(x.shape[1], n_classes, dtype=x.dtype)
    nn.init.zeros_(lin.weight), nn.init.zeros_(lin.bias)  # convex problem: one answer, whatever the start
    if start is not None:
        lin.load_state_dict(start.state_dict())
    opt = torch.optim.LBFGS(lin.parameters(), max_iter=max_iter, tolerance_grad=1e-8, tolerance_change=1e-12,
                            line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(lin(x), y) + 0.5 * l2 * lin.weight.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return lin


def macro_f1(pred, y, n_classes):
    """The mean over classes of F1 = 2 TP / (2 TP + FP + FN), over the classes present in pred or y (as sklearn)."""
    f1 = []
    for c in range(n_classes):
        tp = ((pred == c) & (y == c)).sum().item()
        wrong = ((pred == c) != (y == c)).sum().item()  # FP + FN
        if tp + wrong:
            f1.append(2 * tp / (2 * tp + wrong))
    return sum(f1) / max(len(f1), 1)


PROBE_L2 = (1e-5, 1e-4, 1e-3, 1e-2, 1e-1)  # SentEval's grid of L2 strengths, picked on validation


def probe(features, labels, n_classes, grid=PROBE_L2):
    """features/labels: dicts over "train", "dev", "test" of (n, d) float and (n,) long tensors. Standardises with the
    training statistics, fits one classifier per L2 strength, keeps the best on dev (ties: the stronger penalty).
    Returns {"dev_acc", "test_acc", "test_f1", "l2", "pred": the test predictions}."""
    mu, sd = features["train"].mean(0), features["train"].std(0).clamp(min=1e-6)
    x = {k: ((v - mu) / sd).float() for k, v in features.items()}  # float64 takes twice as long for the same scores
    best = None
    lin = None
    for l2 in sorted(grid, reverse=True):  # the regularisation path, each fit starting at the previous answer
        lin = logistic_regression(x["train"], labels["train"], n_classes, l2, start=lin)
        with torch.no_grad():
            dev_acc = (lin(x["dev"]).argmax(-1) == labels["dev"]).double().mean().item()
        if best is None or dev_acc > best[0]:
            best = dev_acc, l2, lin
    dev_acc, l2, lin = best
    with torch.no_grad():
        pred = lin(x["test"]).argmax(-1)
    return {"dev_acc": dev_acc, "test_acc": (pred == labels["test"]).double().mean().item(),
            "test_f1": macro_f1(pred, labels["test"], n_classes), "l2": l2, "pred": pred}


def probe_cv(x, y, n_classes, folds=10, seed=0):
    """SentEval's protocol for tasks without a fixed split, such as MR and SUBJ: K-fold cross-validation (Sec. 4 of
    arXiv 1803.05449). Fold k is the test set once, fold k+1 picks the L2 strength, the other K-2 folds train; the
    scores pool every example's prediction. SentEval picks L2 by an inner cross-validation instead: one held-out
    fold is K times cheaper. Folds are stratified: each class's examples, shuffled, are dealt round the folds."""
    g, fold = torch.Generator().manual_seed(seed), torch.empty_like(y)
    for c in range(n_classes):
        idx = (y == c).nonzero().squeeze(1)
        fold[idx[torch.randperm(len(idx), generator=g)]] = torch.arange(len(idx)) % folds
    pred, dev_acc = torch.empty_like(y), []
    for k in range(folds):
        part = {"test": fold == k, "dev": fold == (k + 1) % folds}
        part["train"] = ~(part["test"] | part["dev"])
        res = probe({s: x[m] for s, m in part.items()}, {s: y[m] for s, m in part.items()}, n_classes)
        pred[part["test"]] = res["pred"]
        dev_acc.append(res["dev_acc"])
    return {"dev_acc": sum(dev_acc) / folds, "test_acc": (pred == y).double().mean().item(),
            "test_f1": macro_f1(pred, y, n_classes), "pred": pred, "fold": fold}
