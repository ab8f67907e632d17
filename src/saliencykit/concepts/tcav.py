"""TCAV: testing with concept activation vectors (Kim et al. 2018), and TCAV over a concept bank.

As implemented here, following the paper:
  * a layer's activation is the FLATTENED feature map `f_l(x)` ([C*h*w], the paper's definition;
    not the spatial mean); any layer works, a dense one too;
  * a concept activation vector (CAV) `v_C` is the unit normal of a linear classifier
    (scikit-learn `SGDClassifier`, hinge loss, alpha 0.01 as in the paper, `random_state` from the
    seed) separating the activations of the concept's examples (label 1) from those of a random
    set (label 0), pointing towards the concept;
  * the directional derivative of the target score `h` along the CAV is
    `S_C(x) = grad_{f_l} h(f_l(x)) . v_C`, and the TCAV score is the fraction of the inputs with
    `S_C(x) > 0`;
  * significance: with random sets `R_0, R_1, ..., R_r`, the concept gets r scores (CAVs of the
    concept against `R_1..R_r`) and chance gets r scores (CAVs of `R_0` against `R_1..R_r`); a
    two-sided Welch t-test of the two lists gives the p-value, and a concept passes when
    `p < alpha / n_concepts` (Bonferroni over the concepts tested together).

`bank_tcav` uses each direction of a concept bank as the CAV: the bank's directions live in the
channel space of the spatially averaged activation, so the directional derivative is the layer
gradient summed over locations, dotted with the direction (the score's derivative when the
direction is added at every location).
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import numpy as np
import torch

from ..errors import SaliencyError, positive_int, resolve_seed
from .bank import layer_activations


@dataclass
class TCAVResult:
    """Per concept name: `run_scores` (r scores, one per random set), `score` (their mean),
    `p_value`, `significant`; `random_scores` the r scores of random against random. `cavs[name]`
    is [r, D] (unit rows), `random_cavs` [r, D]; `accuracy[name]` the CAV classifiers' training
    accuracies."""

    concepts: list
    run_scores: dict
    random_scores: list
    p_values: dict
    significant: dict
    cavs: dict
    random_cavs: torch.Tensor
    accuracy: dict
    layer: str
    target: list
    alpha: float
    seed: int
    passes: dict = field(default_factory=dict)

    @property
    def scores(self) -> dict:
        return {c: float(np.mean(self.run_scores[c])) for c in self.concepts}

    @property
    def decisions(self) -> dict:
        return dict(self.significant)

    def __repr__(self):
        rows = ", ".join(f"{c}: {self.scores[c]:.2f} (p={self.p_values[c]:.3g}{', significant' if self.significant[c] else ''})"
                         for c in self.concepts)
        return f"TCAVResult(layer={self.layer!r}, {rows})"


def train_cav(positive: np.ndarray, negative: np.ndarray, seed: int) -> tuple[np.ndarray, float]:
    """Unit CAV pointing from `negative` to `positive` activations ([n, D] each) and the linear
    classifier's training accuracy."""
    from sklearn.linear_model import SGDClassifier

    X = np.concatenate([positive, negative]).astype(np.float64)
    y = np.concatenate([np.ones(len(positive)), np.zeros(len(negative))])
    clf = SGDClassifier(alpha=0.01, max_iter=1000, tol=1e-3, random_state=int(seed))
    clf.fit(X, y)
    v = clf.coef_[0]
    norm = np.linalg.norm(v)
    if not np.isfinite(norm) or norm == 0:
        raise SaliencyError("a CAV classifier found no direction (the concept and random activations are identical "
                            "at this layer): pick another layer or more distinct examples")
    return v / norm, float(clf.score(X, y))


def layer_gradients(subject, x: torch.Tensor, layer: str, target, batch_size: int | None = None, counter=None):
    """(d score / d activation at `layer` (its output's shape, [N, C, h, w] for a conv layer), the
    resolved target) for the target of each
    input: one clean forward to fix the target (skipped when `target` is already resolved), then
    one forward and backward per input."""
    from ..engine import chunked_gradient
    from ..targets import ResolvedTarget, as_target

    if isinstance(target, ResolvedTarget):
        resolved = target
    else:
        _, logits = layer_activations(subject, x, layer, batch_size or 32, counter, with_logits=True, spatial=False)
        resolved = as_target(target).resolve(subject, logits)
    grads = []
    with subject.explaining():
        chunked_gradient(subject, x, resolved, torch.arange(x.shape[0], device=x.device), batch_size, counter,
                         layers=[layer], input_grad=False,
                         reduce=lambda _s, res: grads.append(res.gradients[layer].float().cpu()))
    return torch.cat(grads), resolved


def sign_scores(grads: torch.Tensor, cavs: torch.Tensor) -> torch.Tensor:
    """TCAV scores: for each CAV row of `cavs` [r, D], the fraction of the gradients [N, D] whose
    directional derivative along it is positive."""
    return ((grads.double() @ cavs.double().T) > 0).double().mean(0)


def significance(concept_scores, random_scores) -> float:
    """Two-sided Welch t-test p-value of the concept's scores against the random ones; two
    constant lists give 1 if they are equal and 0 if not (the t statistic is undefined)."""
    from scipy.stats import ttest_ind

    a, b = np.asarray(concept_scores, float), np.asarray(random_scores, float)
    if a.std() == 0 and b.std() == 0:
        return 1.0 if a.mean() == b.mean() else 0.0
    with warnings.catch_warnings():     # nearly constant lists: scipy warns, the p-value is still its answer
        warnings.simplefilter("ignore", RuntimeWarning)
        p = ttest_ind(a, b, equal_var=False).pvalue
    return float(p) if np.isfinite(p) else 1.0


def _random_sets(subject, random_sets, n_runs, size, seed):
    if isinstance(random_sets, torch.Tensor):
        pool = subject.check_input(random_sets)
        r = positive_int(n_runs if n_runs is not None else 10, "n_runs")
        size = min(size, pool.shape[0])
        g = torch.Generator().manual_seed(seed)
        return [pool[torch.randperm(pool.shape[0], generator=g)[:size]] for _ in range(r + 1)]
    if not isinstance(random_sets, (list, tuple)) or not all(isinstance(s, torch.Tensor) for s in random_sets):
        raise SaliencyError("random_sets must be a list of input tensors (R_0, R_1, ...) or one tensor of random "
                            "images to draw them from")
    sets = [subject.check_input(s) for s in random_sets]
    if n_runs is not None:
        sets = sets[:positive_int(n_runs, "n_runs") + 1]
    return sets


def tcav(subject, inputs: torch.Tensor, concepts: dict, random_sets, layer="auto", target=None,
         n_runs: int | None = None, seed: int | None = 0, alpha: float = 0.05,
         batch_size: int | None = None) -> TCAVResult:
    """TCAV scores and significance of each concept (`{name: [n,3,H,W] example images}`) for the
    target (default each input's top-1 class) on `inputs`, at `layer`. `random_sets` is a list
    of r + 1 random example tensors, or one tensor of random images from which r + 1 sets of the
    concepts' size are drawn (seeded; `n_runs` = r, default 10). See the module docstring."""
    from ..engine import PassCounter

    seed = resolve_seed(seed)
    if not isinstance(concepts, dict) or not concepts:
        raise SaliencyError("concepts must be a non-empty dict {name: tensor of the concept's example images}")
    if not 0 < float(alpha) < 1:
        raise SaliencyError(f"alpha must be in (0, 1), got {alpha}")
    x = subject.check_input(inputs)
    examples = {str(k): subject.check_input(v) for k, v in concepts.items()}
    for k, v in examples.items():
        if v.shape[0] < 2:
            raise SaliencyError(f"concept {k!r} has {v.shape[0]} example(s); a CAV needs at least 2 (10-50 is usual)")
    size = max(v.shape[0] for v in examples.values())
    randoms = _random_sets(subject, random_sets, n_runs, size, seed)
    if len(randoms) < 3:
        raise SaliencyError(f"TCAV's significance test needs at least 3 random sets (R_0 and two runs), got "
                            f"{len(randoms)}")
    name = subject.find_layer(layer, x[:1])[0]
    counter = PassCounter()

    def flat(t):
        return layer_activations(subject, t, name, batch_size or 32, counter, spatial=False).flatten(1).double().numpy()

    grads, resolved = layer_gradients(subject, x, name, target, batch_size, counter)
    grads = grads.flatten(1)
    rand_acts = [flat(r) for r in randoms]
    r = len(randoms) - 1
    random_cavs, rand_acc = zip(*[train_cav(rand_acts[0], rand_acts[i], seed + i) for i in range(1, r + 1)])
    random_cavs = torch.from_numpy(np.stack(random_cavs))
    random_scores = sign_scores(grads, random_cavs).tolist()
    run_scores, cavs, p_values, significant, accuracy = {}, {}, {}, {}, {"random": list(rand_acc)}
    corrected = float(alpha) / len(examples)
    for cname, ex in examples.items():
        acts = flat(ex)
        vs, acc = zip(*[train_cav(acts, rand_acts[i], seed + i) for i in range(1, r + 1)])
        cavs[cname] = torch.from_numpy(np.stack(vs))
        run_scores[cname] = sign_scores(grads, cavs[cname]).tolist()
        p_values[cname] = significance(run_scores[cname], random_scores)
        significant[cname] = bool(p_values[cname] < corrected)
        accuracy[cname] = list(acc)
    return TCAVResult(list(examples), run_scores, random_scores, p_values, significant, cavs, random_cavs, accuracy,
                      name, resolved.describe(), float(alpha), seed, counter.per_image(x.shape[0]))


def directional_derivatives(subject, bank, x: torch.Tensor, target=None, batch_size: int | None = None,
                            counter=None) -> torch.Tensor:
    """[N, k]: the derivative of image n's target score along bank direction k added at every
    location of the layer, `sum_{h,w} grad(c,h,w) W_k(c)`."""
    grads, _ = layer_gradients(subject, x, bank.layer, target, batch_size, counter)
    if grads.shape[1] != bank.basis.shape[1]:
        raise SaliencyError(f"the bank has {bank.basis.shape[1]} channels and layer {bank.layer!r} has "
                            f"{grads.shape[1]}: the bank was made on another model or layer")
    return (grads.sum((2, 3)).double() @ bank.basis.double().T).float()


def bank_tcav(subject, bank, inputs: torch.Tensor, target=None, batch_size: int | None = None, counter=None):
    """Each bank direction as the CAV: -> (TCAV scores [k], directional derivatives [N, k])."""
    deriv = directional_derivatives(subject, bank, subject.check_input(inputs), target, batch_size, counter)
    return (deriv > 0).float().mean(0), deriv


__all__ = ["tcav", "TCAVResult", "bank_tcav", "train_cav", "sign_scores", "significance", "layer_gradients", "directional_derivatives"]
