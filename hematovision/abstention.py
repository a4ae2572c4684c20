"""Know when the model does not know: calibrated probabilities and the "uncertain / not a white blood cell" answer.

Free of Flask and of Keras (numpy only), so the app, the API, evaluate.py and the fitting script share it.

- **Temperature scaling.** The model outputs softmax probabilities (averaged over the test-time views); the
  calibrated answer is softmax(log(p) / T), the same as dividing the logits by T. T may grow with the image's
  distance to the training cells (`Temperature`). It is fitted on validation data only
  (training/pipeline.py, in the calibrate step of training/train.py and in training/adapt.py) and stored in the
  model's metadata under `calibration`.
- **Abstention.** An image is answered "uncertain" when its calibrated top probability is below `min_probability`
  (reason `low_confidence`), or when its pooled penultimate features are far from every class of the training
  cells (reason `unlike_training_cells`): the smallest Mahalanobis distance to a class mean, with one shared
  covariance, over the principal directions in which the training cells vary least (an unfamiliar image departs
  from the training cells mostly there; the high-variance directions carry the class differences and measured
  worse). The parameters live in `<model>_ood.npz` next to the model, the thresholds in the metadata under
  `abstention`; both are fitted by training/pipeline.py.
- **Other cell types.** A white cell of a type the model does not classify (a basophil) is still a white cell, and
  often near a known class. Where a training lab has labelled cells of such types, a linear score on the pooled
  features (logistic regression: other types against the four) flags them (reason `other_cell_type`), with a
  threshold that flags at most a small share of each lab's known validation cells (`OtherTypes`).
"""

from __future__ import annotations

import io
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

LOW_CONFIDENCE = "low_confidence"
UNLIKE_TRAINING = "unlike_training_cells"
OTHER_TYPE = "other_cell_type"
REASONS = {
    UNLIKE_TRAINING: "The image does not look like the white-cell images the model learned from. It may not be a "
    "white-cell image at all, or it comes from another microscope or stain.",
    OTHER_TYPE: "The cell looks like a white cell of a type the model does not classify, such as a basophil: it "
    "only tells eosinophils, lymphocytes, monocytes and neutrophils apart.",
    LOW_CONFIDENCE: "The model cannot decide between the cell types for this image: its top probability is low.",
}
REASON_SHORT = {UNLIKE_TRAINING: "not like any training cell", OTHER_TYPE: "another type of white cell",
                LOW_CONFIDENCE: "low confidence"}
ECE_BINS = 15


# --- calibration -------------------------------------------------------------------------------------


def apply_temperature(probabilities: np.ndarray, temperature: float | np.ndarray) -> np.ndarray:
    """softmax(log(p) / T) row by row, with one T for all rows or one per row; T = 1 returns the probabilities
    unchanged."""
    probabilities = np.asarray(probabilities, dtype=np.float64)
    temperature = np.asarray(temperature, dtype=np.float64)
    if temperature.ndim == 0 and float(temperature) == 1.0:
        return probabilities
    if not np.all(temperature > 0):
        raise ValueError(f"temperature must be positive, not {temperature}")
    logits = np.log(np.clip(probabilities, 1e-12, 1.0)) / (temperature[:, None] if temperature.ndim else temperature)
    logits -= logits.max(axis=-1, keepdims=True)
    scaled = np.exp(logits)
    return scaled / scaled.sum(axis=-1, keepdims=True)


def negative_log_likelihood(probabilities: np.ndarray, targets: np.ndarray) -> float:
    probabilities = np.asarray(probabilities, dtype=np.float64)
    targets = np.asarray(targets, dtype=int)
    picked = probabilities[np.arange(len(targets)), targets]
    return float(-np.log(np.clip(picked, 1e-12, 1.0)).mean())


def fit_temperature(probabilities: np.ndarray, targets: np.ndarray, bounds=(0.05, 20.0)) -> float:
    """The T > 0 that minimises the validation log-loss of softmax(log(p) / T). The loss is smooth and has one
    minimum in log T, so a bounded scalar search finds it."""
    from scipy.optimize import minimize_scalar

    def loss(log_t: float) -> float:
        return negative_log_likelihood(apply_temperature(probabilities, float(np.exp(log_t))), targets)

    found = minimize_scalar(loss, bounds=(np.log(bounds[0]), np.log(bounds[1])), method="bounded",
                            options={"xatol": 1e-5})
    return float(np.exp(found.x))


@dataclass(frozen=True)
class Temperature:
    """The calibration temperature of each image: base * exp(slope * (distance - centre)), where distance is the
    image's Mahalanobis distance to the training cells (FeatureDensity). With slope 0, or without a distance, it is
    plain temperature scaling: one T for every image.

    Why a distance: the model is over-confident on images unlike its training cells (another lab, another photo)
    and about right on familiar ones, and one temperature cannot serve both: fitted on the two labs' validation
    images together it warmed PBC's already calibrated answers (ECE 0.015 -> 0.055 on PBC test with the previous
    model). A temperature that grows with the distance cools the unfamiliar images more than the familiar ones."""

    base: float = 1.0
    slope: float = 0.0
    centre: float = 0.0

    # exp(+-10): a factor of 22,000 either way, far beyond any fitted value; only keeps absurd inputs finite.
    MAX_EXPONENT = 10.0

    def values(self, distances: np.ndarray | None) -> float | np.ndarray:
        """The temperature of each row (or the one temperature when there is no slope or no distance)."""
        if self.slope == 0.0 or distances is None:
            return self.base
        exponent = np.clip(self.slope * (np.asarray(distances, dtype=np.float64) - self.centre),
                           -self.MAX_EXPONENT, self.MAX_EXPONENT)
        return self.base * np.exp(exponent)

    def apply(self, probabilities: np.ndarray, distances: np.ndarray | None = None) -> np.ndarray:
        return apply_temperature(probabilities, self.values(distances))

    def __str__(self) -> str:
        if self.slope == 0.0:
            return f"{self.base:.4f}"
        return f"{self.base:.4f} * exp({self.slope:.5f} * (distance - {self.centre:.2f}))"


def fit_distance_temperature(probabilities: np.ndarray, targets: np.ndarray, distances: np.ndarray) -> Temperature:
    """The Temperature (base and slope; centre = the median distance) with the lowest validation log-loss, found
    from plain temperature scaling's T and slope 0, so it can only match or beat it on the data it is fitted on."""
    from scipy.optimize import minimize

    distances = np.asarray(distances, dtype=np.float64)
    centre, spread = float(np.median(distances)), float(np.std(distances)) or 1.0

    def loss(w: np.ndarray) -> float:  # w = (log base, slope per standard deviation of distance)
        t = Temperature(base=float(np.exp(w[0])), slope=float(w[1]) / spread, centre=centre)
        return negative_log_likelihood(t.apply(probabilities, distances), targets)

    start = np.array([np.log(fit_temperature(probabilities, targets)), 0.0])
    found = minimize(loss, start, method="Nelder-Mead", options={"xatol": 1e-5, "fatol": 1e-9, "maxiter": 2000})
    best = found.x if found.fun <= loss(start) else start
    return Temperature(base=float(np.exp(best[0])), slope=float(best[1]) / spread, centre=centre)


def expected_calibration_error(probabilities: np.ndarray, targets: np.ndarray, bins: int = ECE_BINS) -> float:
    """ECE with `bins` equal-width confidence bins (Guo et al. 2017): sum over bins of
    |bin| / n * |accuracy(bin) - mean confidence(bin)|, confidence = top probability, bins (i/B, (i+1)/B]."""
    probabilities = np.asarray(probabilities, dtype=np.float64)
    targets = np.asarray(targets, dtype=int)
    if len(targets) == 0:
        return 0.0
    confidence = probabilities.max(axis=1)
    correct = probabilities.argmax(axis=1) == targets
    # Bin b holds confidences in (b/B, (b+1)/B]; a confidence of exactly 0 joins the first bin.
    which = np.clip(np.ceil(confidence * bins).astype(int) - 1, 0, bins - 1)
    ece = 0.0
    for b in range(bins):
        members = which == b
        if members.any():
            ece += members.mean() * abs(correct[members].mean() - confidence[members].mean())
    return float(ece)


# --- distance to the training cells ------------------------------------------------------------------


@dataclass(frozen=True)
class FeatureDensity:
    """Gaussian classes with one shared covariance, whitened: z = x @ projection, and the squared Mahalanobis
    distance of x to class c is |z - class_means[c]|^2 over the kept principal components of the covariance.
    The projection is stored as float16 (half the file); the fit rounds it too, so that the thresholds chosen on
    validation see exactly the distances the app computes."""

    projection: np.ndarray  # (D, k): principal directions divided by their standard deviation
    class_means: np.ndarray  # (K, k) float32: each class mean, projected

    def __post_init__(self):
        # Made once: converting the (D, k) matrix on every call cost as much as the model's own run. The
        # projection is applied in float32 (a float64 matrix-vector product measured ~8x slower, 1.9 against
        # 0.25 ms for one image), the rest in float64.
        object.__setattr__(self, "_projection32", np.ascontiguousarray(self.projection, dtype=np.float32))
        object.__setattr__(self, "_means64", np.asarray(self.class_means, dtype=np.float64))

    def distances(self, features: np.ndarray) -> np.ndarray:
        """(N, D) features -> (N,) smallest Mahalanobis distance to a class mean (square root of the squared)."""
        # einsum, not `@`: a BLAS call wakes OpenBLAS's threads, which then spin on the 2 cores the TFLite
        # interpreter needs next, and made every request ~3 ms slower. These products are small either way.
        z = np.einsum("nd,dk->nk", np.asarray(features, dtype=np.float32), self._projection32).astype(np.float64)
        means = self._means64
        squared = (z * z).sum(1)[:, None] - 2 * np.einsum("nk,ck->nc", z, means) + (means * means).sum(1)[None, :]
        return np.sqrt(np.clip(squared.min(axis=1), 0.0, None))

    @property
    def feature_size(self) -> int:
        return int(self.projection.shape[0])

    def to_bytes(self) -> bytes:
        return rule_arrays(self, None)

    @classmethod
    def load(cls, path: str | Path) -> FeatureDensity:
        with np.load(path, allow_pickle=False) as data:
            return cls(projection=np.asarray(data["projection"], np.float32),
                       class_means=np.asarray(data["class_means"], np.float32))


def fit_feature_density(features: np.ndarray, targets: np.ndarray, components: int = 512,
                        lowest: bool = True, shrinkage: float = 0.0) -> FeatureDensity:
    """Class means and one covariance shared by the classes (of the class-centred features), then `components`
    of its principal directions, each scaled to unit variance: those of least variance (`lowest`, the default),
    else those of most. `shrinkage` blends the covariance towards a multiple of the identity (0: none)."""
    x = np.asarray(features, dtype=np.float64)
    y = np.asarray(targets, dtype=int)
    labels = np.unique(y)
    means = np.stack([x[y == k].mean(axis=0) for k in range(int(labels.max()) + 1)])
    centred = x - means[y]
    covariance = centred.T @ centred / max(1, len(x) - len(labels))
    if shrinkage:
        covariance = (1 - shrinkage) * covariance + shrinkage * np.trace(covariance) / len(covariance) * np.eye(
            len(covariance))
    values, vectors = np.linalg.eigh(covariance)  # ascending
    count = min(components, len(values))
    order = np.arange(count) if lowest else np.arange(len(values) - count, len(values))
    # A direction without variance would divide by zero; the floor also keeps every scale within float16's range.
    floor = max(max(values.max(), 1e-12) * 1e-9, 1.0 / 60000.0**2)
    projection = (vectors[:, order] / np.sqrt(np.maximum(values[order], floor))).astype(np.float16)
    return FeatureDensity(projection=projection.astype(np.float32),
                          class_means=(means @ projection.astype(np.float64)).astype(np.float32))


# --- white cells of other types ---------------------------------------------------------------------


OTHER_TYPES_REGULARISATION = 0.4  # logistic regression's C on standardised features; chosen on LISC validation


@dataclass(frozen=True)
class OtherTypes:
    """A linear score on the pooled features: high for white cells of types the model does not classify (those
    of its training labs, e.g. LISC's basophils), low for the four it does. score = features @ weights + bias."""

    weights: np.ndarray  # (D,) float32
    bias: float
    types: tuple[str, ...] = ()

    def scores(self, features: np.ndarray) -> np.ndarray:
        # einsum, not `@`: see FeatureDensity.distances (OpenBLAS threads against the TFLite interpreter)
        return np.einsum("nd,d->n", np.asarray(features, dtype=np.float32),
                         np.asarray(self.weights, np.float32)).astype(np.float64) + self.bias


def fit_other_types(known: np.ndarray, other: np.ndarray, types=(),
                    regularisation: float = OTHER_TYPES_REGULARISATION) -> OtherTypes:
    """Logistic regression of `other` (features of cells of other types) against `known` (the four types), on
    standardised features with balanced class weights; the standardisation is folded into the weights."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    x = np.concatenate([known, other]).astype(np.float64)
    y = np.concatenate([np.zeros(len(known), int), np.ones(len(other), int)])
    scaler = StandardScaler().fit(x)
    fitted = LogisticRegression(C=regularisation, class_weight="balanced", max_iter=5000).fit(scaler.transform(x), y)
    weights = fitted.coef_[0] / scaler.scale_
    bias = float(fitted.intercept_[0] - (scaler.mean_ * weights).sum())
    return OtherTypes(weights=weights.astype(np.float32), bias=bias, types=tuple(types))


def rule_arrays(density: FeatureDensity | None, other: OtherTypes | None) -> bytes:
    """The `<model>_ood.npz` bytes: the feature density, and the other-type score when there is one."""
    buffer = io.BytesIO()
    arrays = {}
    if density is not None:
        arrays.update(projection=density.projection.astype(np.float16),
                      class_means=density.class_means.astype(np.float32))
    if other is not None:
        arrays.update(other_weights=np.asarray(other.weights, np.float32),
                      other_bias=np.array(other.bias, np.float64))
    np.savez_compressed(buffer, **arrays)
    return buffer.getvalue()


def load_other_types(path: str | Path, types=()) -> OtherTypes | None:
    """The other-type score stored in a `<model>_ood.npz`; None when the file holds none."""
    with np.load(path, allow_pickle=False) as data:
        if "other_weights" not in data:
            return None
        return OtherTypes(weights=np.asarray(data["other_weights"], np.float32), bias=float(data["other_bias"]),
                          types=tuple(types))


# --- the decision ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AbstentionRule:
    """When to answer "uncertain" instead of a class. None disables a test."""

    min_probability: float | None = None
    max_distance: float | None = None
    density: FeatureDensity | None = None
    other: OtherTypes | None = None
    max_other_score: float | None = None

    @property
    def tests_distance(self) -> bool:
        """Whether the "not like any training cell" test applies (a fitted density and its threshold)."""
        return self.density is not None and self.max_distance is not None

    @property
    def tests_other(self) -> bool:
        """Whether the "another type of white cell" test applies (a fitted score and its threshold)."""
        return self.other is not None and self.max_other_score is not None

    def distances(self, features: np.ndarray | None) -> np.ndarray | None:
        if self.density is None or features is None:
            return None
        return self.density.distances(features)

    def other_scores(self, features: np.ndarray | None) -> np.ndarray | None:
        if self.other is None or features is None:
            return None
        return self.other.scores(features)

    def decide(self, probabilities: np.ndarray, distances: np.ndarray | None,
               min_probability: float | None = None, other_scores: np.ndarray | None = None) -> list[str | None]:
        """One reason per row (None: answer the top class). Being unlike every training cell outranks the rest: it
        says most about the image; a cell of another type outranks low confidence. `min_probability` overrides
        the rule's own."""
        threshold = self.min_probability if min_probability is None else min_probability
        top = np.asarray(probabilities).max(axis=1)
        reasons: list[str | None] = [None] * len(top)
        for i, p in enumerate(top):
            if distances is not None and self.tests_distance and distances[i] > self.max_distance:
                reasons[i] = UNLIKE_TRAINING
            elif other_scores is not None and self.tests_other and other_scores[i] > self.max_other_score:
                reasons[i] = OTHER_TYPE
            elif threshold is not None and p < threshold:
                reasons[i] = LOW_CONFIDENCE
        return reasons


def threshold_for_rate(scores: np.ndarray, rate: float, upper: bool = True) -> float:
    """The threshold that flags at most `rate` of these scores: those strictly above it (`upper`) or strictly
    below it."""
    scores = np.sort(np.asarray(scores, dtype=np.float64))
    allowed = int(np.floor(rate * len(scores)))
    if upper:
        return float(scores[len(scores) - 1 - allowed]) if allowed < len(scores) else float(scores[0])
    return float(scores[allowed]) if allowed < len(scores) else float(scores[-1])
