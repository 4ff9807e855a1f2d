"""Active learning as pure functions: case predictions in, scores and picks out.

Scores of one case (:func:`score_network_outputs`):

* **cross-modal disagreement**: the generalised Jensen-Shannon divergence among the per-modality heads and the
  fused prediction (the mutual information between "which branch" and the class), averaged over the voxels some
  branch calls foreground: high where a structure is seen in one modality only, modalities are misregistered or a
  contrast is unusual;
* **MC-dropout uncertainty**: the same mutual information across Monte-Carlo dropout samples of the fused output
  (BALD); the samples share one encoder pass (:class:`~crossmodal.nets.CrossModalNet` ``mc_samples``);
* **predictive entropy**: the entropy of the mean of the fused prediction and its MC samples, averaged over the
  whole volume - what MONAI Label's Epistemic scoring measures (there from full-resolution dropout passes);
* a **descriptor** (pooled modality-independent channels + class volume fractions, L2-normalised) for diversity.

:func:`select` turns scores into picks: a weighted sum of rank-normalised scores, traded against the distance to
what is already labelled or handed out (greedy, so k picks are not k near-copies); with no scores (cold start) it
is pure farthest-point sampling on image descriptors (:func:`image_descriptor`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F


def mutual_information(probs: torch.Tensor) -> torch.Tensor:
    """Generalised Jensen-Shannon divergence of K distributions per voxel, normalised to [0, 1].

    Args:
        probs: (K, C, *S) class probabilities of K predictions (modality heads, or MC samples).

    Returns:
        (*S): ``H(mean_k p_k) - mean_k H(p_k)`` over ``log C``; 0 where all K agree.

    Example:
        >>> p = torch.tensor([[[1.0], [0.0]], [[0.0], [1.0]]])  # K=2 opposite certainties, C=2, one voxel
        >>> round(float(mutual_information(p)[0]), 4), float(mutual_information(p[:1].expand(2, 2, 1))[0])
        (1.0, 0.0)
    """
    p = probs.float().clamp_min(1e-8)
    mean = p.mean(0)
    h_mean = -(mean * mean.log()).sum(0)
    mean_h = -(p * p.log()).sum(1).mean(0)
    return ((h_mean - mean_h) / np.log(probs.shape[1])).clamp_min(0)


def predictive_entropy(probs: torch.Tensor) -> torch.Tensor:
    """(K, C, *S) class probabilities of K predictions -> (*S) entropy of their mean over ``log C`` (0..1).

    Example:
        >>> p = torch.tensor([[[1.0, 0.5]], [[0.0, 0.5]]]).movedim(1, 0)  # K=1, C=2, two voxels: sure, 50/50
        >>> [round(v, 4) for v in predictive_entropy(p).tolist()]
        [0.0, 1.0]
    """
    mean = probs.float().mean(0).clamp_min(1e-8)
    return -(mean * mean.log()).sum(0) / np.log(probs.shape[1])


def foreground_region(probs: torch.Tensor) -> torch.Tensor:
    """(K, C, *S) -> (*S) bool: voxels that at least one of the K predictions labels foreground (class > 0).

    (Some foreground class more probable than background, i.e. argmax > 0; comparisons instead of an argmax over
    the class axis, which is many times slower on CPU.)
    """
    return (probs[:, 1:] > probs[:, :1]).any(1).any(0)


def region_mean(values: torch.Tensor, mask: torch.Tensor) -> float:
    """Mean of ``values`` over ``mask`` (0.0 for an empty mask: nothing predicted, nothing to disagree on)."""
    return float(values[mask].mean()) if bool(mask.any()) else 0.0


@dataclass
class CaseScores:
    """One case's scores and descriptor (see the module docstring)."""

    disagreement: float
    mc_uncertainty: float
    descriptor: np.ndarray
    entropy: float = 0.0


def score_network_outputs(fused: torch.Tensor, heads: Mapping[str, torch.Tensor], mc: torch.Tensor | None,
                          independent: Sequence[torch.Tensor] = ()) -> CaseScores:
    """Scores from one case's network outputs.

    Args:
        fused: fused logits (C, *S).
        heads: per-modality logits {name: (C, *S)} of the modalities present.
        mc: MC-dropout fused logits (T, C, *S), or None (uncertainty 0).
        independent: pooled modality-independent descriptors (K_i,) per level, averaged over modalities.

    Example:
        >>> f = torch.zeros(2, 4, 4, 4); f[1, :2] = 4.0          # fused: foreground in half the volume
        >>> same = score_network_outputs(f, {"a": f, "b": f}, None)
        >>> other = score_network_outputs(f, {"a": f, "b": -f}, None)  # head b says the opposite
        >>> same.disagreement, other.disagreement > 0.3
        (0.0, True)
    """
    p_fused = torch.softmax(fused.float(), 0)
    fractions = p_fused.flatten(1).mean(1)
    stack = _coarse(torch.stack([p_fused, *[torch.softmax(h.float(), 0) for h in heads.values()]]))
    mask = foreground_region(stack)
    disagreement = region_mean(mutual_information(stack), mask) if len(heads) else 0.0
    samples = p_fused[None]
    if mc is not None and mc.shape[0] > 1:
        p_mc_full = torch.softmax(mc.float(), 1)
        samples = torch.cat([samples, p_mc_full])
        p_mc = _coarse(p_mc_full)
        mc_mask = mask | foreground_region(p_mc)
        uncertainty = region_mean(mutual_information(p_mc), mc_mask)
    else:
        uncertainty = 0.0
    entropy = float(predictive_entropy(samples).mean())
    parts = [fractions, *[t.float().flatten() for t in independent]]
    return CaseScores(disagreement, uncertainty, _unit(torch.cat(parts).cpu().numpy()), entropy)


def _coarse(probs: torch.Tensor, max_voxels: int = 32**3) -> torch.Tensor:
    """(K, C, *S) probabilities averaged over 2^3 blocks while a volume has more than ``max_voxels`` voxels: a
    case-level score needs no full-resolution map, and the divergence maths costs 8x less per halving."""
    while probs[0, 0].numel() > max_voxels and min(probs.shape[2:]) >= 4:
        probs = F.avg_pool3d(probs, 2, ceil_mode=True)
    return probs


def image_descriptor(image: torch.Tensor, bins: int = 16, grid: int = 4) -> np.ndarray:
    """A model-free descriptor of a normalised case (M, *S): per-modality intensity histograms on [-3, 3] and a
    ``grid``^3 thumbnail, L2-normalised; for the cold start, when no model exists yet."""
    x = image.float()
    hists = [torch.histc(x[m].clamp(-3, 3), bins=bins, min=-3, max=3) / x[m].numel() for m in range(x.shape[0])]
    thumb = F.adaptive_avg_pool3d(x[None], grid)[0].flatten()
    return _unit(torch.cat([*hists, 0.25 * thumb]).cpu().numpy())


def _unit(v: np.ndarray) -> np.ndarray:
    n = float(np.linalg.norm(v))
    return (v / n if n > 0 else v).astype(np.float32)


def rank_normalise(scores: Mapping[str, float]) -> dict[str, float]:
    """Scores -> their rank in [0, 1] (ties share a rank), so differently scaled scores can be summed.

    Example:
        >>> rank_normalise({"a": 0.2, "b": 5.0, "c": 0.2})
        {'a': 0.0, 'b': 1.0, 'c': 0.0}
    """
    if not scores:
        return {}
    values = sorted(set(scores.values()))
    if len(values) == 1:
        return {k: 0.0 for k in scores}
    return {k: values.index(v) / (len(values) - 1) for k, v in scores.items()}


def combine(scores: Mapping[str, Mapping[str, float]], weights: Mapping[str, float]) -> dict[str, float]:
    """Weighted sum of rank-normalised scores: {score name: {case: value}} -> {case: combined in [0, 1]}.

    Cases missing a score get 0 for it. Example:
        >>> combine({"dis": {"a": 1.0, "b": 0.0}, "mc": {"a": 0.0, "b": 1.0}}, {"dis": 3.0, "mc": 1.0})
        {'a': 0.75, 'b': 0.25}
    """
    total = sum(w for n, w in weights.items() if n in scores and w > 0)
    cases = sorted({c for s in scores.values() for c in s})
    out = {c: 0.0 for c in cases}
    if total <= 0:
        return out
    for name, w in weights.items():
        if name not in scores or w <= 0:
            continue
        ranks = rank_normalise(scores[name])
        for c in cases:
            out[c] += w / total * ranks.get(c, 0.0)
    return out


def select(candidates: Sequence[str], scores: Mapping[str, float], descriptors: Mapping[str, np.ndarray], k: int,
           diversity: float = 0.3, avoid: Sequence[np.ndarray] = ()) -> list[str]:
    """Greedy batch selection: each pick maximises ``(1 - diversity) * score + diversity * novelty``.

    ``novelty`` is the distance of a candidate's descriptor to the nearest of ``avoid`` (labelled, handed-out)
    and of the cases already picked, divided by the largest such distance. Candidates without a descriptor have
    novelty 0. With no scores at all (cold start) the picks are pure farthest-point sampling. Descriptors of
    another length than most (another scoring's, or a hand-written image info) count as none.

    Example:
        >>> d = {"a": np.array([1.0, 0]), "b": np.array([0.99, 0.14]), "c": np.array([0.0, 1])}
        >>> select(["a", "b", "c"], {"a": 1.0, "b": 0.8, "c": 0.0}, d, 2, diversity=0.5)  # b is a's near-copy
        ['a', 'c']
        >>> select(["a", "b", "c"], {}, d, 1, avoid=[np.array([1.0, 0])])  # cold start: farthest from a labelled a
        ['c']
        >>> select(["a", "b", "c"], {}, {**d, "c": np.ones(3)}, 1, avoid=[np.array([1.0, 0])])  # c's is not comparable
        ['b']
    """
    pool = list(dict.fromkeys(candidates))
    if not scores:
        diversity = 1.0
    chosen: list[str] = []
    refs = [np.asarray(a, dtype=np.float32) for a in avoid]
    sizes = [np.size(v) for v in descriptors.values()] + [r.size for r in refs]
    if len(set(sizes)) > 1:
        size = max(set(sizes), key=sizes.count)
        descriptors = {c: v for c, v in descriptors.items() if np.size(v) == size}
        refs = [r for r in refs if r.size == size]
    while pool and len(chosen) < k:
        dist = {}
        for c in pool:
            if c not in descriptors:
                dist[c] = 0.0
            elif refs:
                dist[c] = float(min(np.linalg.norm(descriptors[c] - r) for r in refs))
            else:
                dist[c] = 1.0
        top = max(dist.values()) or 1.0
        value = {c: (1 - diversity) * scores.get(c, 0.0) + diversity * dist[c] / top for c in pool}
        best = max(pool, key=lambda c: (value[c], scores.get(c, 0.0), c))
        chosen.append(best)
        pool.remove(best)
        if best in descriptors:
            refs.append(descriptors[best])
    return chosen


def scoring_input(image: torch.Tensor, scale: float, multiple: int) -> torch.Tensor:
    """A normalised case (M, *S) resampled by ``scale`` per axis (trilinear), each size a multiple of ``multiple``
    (the network's total stride); returns (1, M, *S')."""
    size = [max(multiple, int(round(s * scale / multiple)) * multiple) for s in image.shape[1:]]
    x = image.float()[None]
    return x if list(x.shape[2:]) == size else F.interpolate(x, size=size, mode="trilinear", align_corners=False)


def score_image(network: torch.nn.Module, x: torch.Tensor, present: Sequence[bool] | None = None,
                mc_samples: int = 4) -> CaseScores:
    """Scores of one case from one forward of a :class:`~crossmodal.nets.CrossModalNet` on ``x`` (1, M, *S)
    (:func:`scoring_input`): heads, ``mc_samples`` decoder samples and pooled descriptors in the same pass.
    Other networks give only the class-fraction descriptor (scores 0)."""
    from crossmodal.nets import CrossModalNet, unwrap

    net = unwrap(network)
    with torch.no_grad():
        if not isinstance(net, CrossModalNet):
            return score_network_outputs(net(x)[0], {}, None)
        out = net(x, present=present, heads=True, mc_samples=mc_samples)
    levels = len(next(iter(out.independent.values())))
    pooled = [torch.stack([v[lvl][0] for v in out.independent.values()]).mean(0) for lvl in range(levels)]
    mc = out.mc_samples[:, 0] if out.mc_samples is not None else None
    return score_network_outputs(out.fused[0], {m: v[0] for m, v in out.per_modality.items()}, mc, pooled)
