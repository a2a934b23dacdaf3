"""A/B verdicts for CTR: z-test and CIs (statsmodels) guarded by an always-valid mixture SPRT."""

# Why a mixture SPRT (mSPRT, Johari et al. 2017 "Always valid inference") rather than alpha spending:
# the operator looks at the experiment every analysis interval for as long as it runs, so the number and
# timing of looks is not known in advance. Lan-DeMets spending needs the information fraction of each
# look relative to a planned maximum and the joint distribution of all earlier looks; the mSPRT's
# p-value is valid under any number of looks, at any times, with nothing but the running minimum to
# carry in status. The price is a larger worst-case sample size than a fixed-horizon test at the same
# power (`sequential_sample_size`), paid back by stopping early when the true effect is larger than the
# minimum detectable effect.
#
# The mixture is a normal prior N(0, tau^2) on the difference in CTR, with tau set to the absolute
# minimum detectable effect; with the normal approximation of the difference of two proportions the
# likelihood ratio has the closed form in `msprt_log_lr`.

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import StrEnum

import numpy as np
import numpy.typing as npt
from scipy import optimize
from scipy.stats import norm
from statsmodels.stats.power import NormalIndPower
from statsmodels.stats.proportion import (
    confint_proportions_2indep,
    proportion_confint,
    proportion_effectsize,
    proportions_ztest,
)

from recserve_operator.rollout.policy import AbTestPolicy
from recserve_operator.rollout.state import AbStatus

__all__ = [
    "AbDecision",
    "AbVerdict",
    "Counts",
    "ab_verdict",
    "fixed_horizon_sample_size",
    "msprt_log_lr",
    "msprt_tau2",
    "sequential_sample_size",
]

FloatArray = npt.NDArray[np.float64]


class AbDecision(StrEnum):
    CONTINUE = "continue"
    CANDIDATE_WINS = "canary"
    STABLE_WINS = "stable"


@dataclass(frozen=True)
class Counts:
    clicks: int
    impressions: int

    @property
    def ctr(self) -> float | None:
        return self.clicks / self.impressions if self.impressions > 0 else None


@dataclass(frozen=True)
class AbVerdict:
    decision: AbDecision
    reason: str
    stable: Counts
    candidate: Counts
    stable_ci95: tuple[float, float] | None
    candidate_ci95: tuple[float, float] | None
    p_value: float | None  # fixed-horizon two-proportion z-test; NOT valid under repeated looks
    sequential_p_value: float | None  # always-valid mSPRT p-value (running minimum); decisions use this
    abs_lift: float | None
    abs_lift_ci95: tuple[float, float] | None
    lift: float | None  # relative lift of the candidate CTR over stable
    lift_ci95: tuple[float, float] | None
    fixed_sample_size: int | None  # per variant, fixed-horizon test at (alpha, power, MDE)
    sequential_sample_size: int | None  # per variant, mSPRT reaching the same power by then
    mixing_variance: float | None = None  # tau^2 of the mSPRT, fixed at the first counted look


def msprt_tau2(baseline_ctr: float, mde_relative: float) -> float:
    """Mixing variance: the prior on the CTR difference has the scale of the minimum detectable effect."""
    return float((baseline_ctr * mde_relative) ** 2)


def msprt_log_lr(
    clicks_a: npt.ArrayLike, imps_a: npt.ArrayLike, clicks_b: npt.ArrayLike, imps_b: npt.ArrayLike, tau2: float
) -> FloatArray:
    """log of the mixture likelihood ratio for H0: ctr_a == ctr_b (vectorised; pooled variance under H0).

    Lambda = sqrt(V / (V + tau2)) * exp(tau2 * d^2 / (2 V (V + tau2))), d = ctr_b - ctr_a, V = Var(d) under H0.
    """
    ca, na = np.asarray(clicks_a, dtype=np.float64), np.asarray(imps_a, dtype=np.float64)
    cb, nb = np.asarray(clicks_b, dtype=np.float64), np.asarray(imps_b, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        pooled = (ca + cb) / (na + nb)
        var = pooled * (1.0 - pooled) * (1.0 / na + 1.0 / nb)
        diff = cb / nb - ca / na
        llr = 0.5 * np.log(var / (var + tau2)) + tau2 * diff**2 / (2.0 * var * (var + tau2))
    # No variance (no data or no clicks at all) carries no evidence.
    return np.where(np.isfinite(llr), llr, 0.0)


def _sequential_threshold_z(var: float, tau2: float, alpha: float) -> float:
    """|z| above which the mSPRT rejects at a single look with variance `var` (inverting Lambda >= 1/alpha)."""
    return math.sqrt((var + tau2) / tau2 * (2.0 * math.log(1.0 / alpha) + math.log((var + tau2) / var)))


def fixed_horizon_sample_size(baseline_ctr: float, mde_relative: float, alpha: float, power: float) -> int:
    """Per-variant sample size of a two-sided fixed-horizon test (statsmodels NormalIndPower, Cohen's h)."""
    effect = proportion_effectsize(baseline_ctr * (1.0 + mde_relative), baseline_ctr)
    n = NormalIndPower().solve_power(effect_size=abs(effect), alpha=alpha, power=power, ratio=1.0)
    return math.ceil(float(n))


def sequential_sample_size(baseline_ctr: float, mde_relative: float, alpha: float, power: float) -> int:
    """Per-variant sample size at which the mSPRT has reached `power` against the MDE.

    Computed for the last look alone, which lower-bounds the power with earlier looks (any earlier
    crossing also rejects), so the real power at this size is at least `power`.
    """
    pa = baseline_ctr
    pb = baseline_ctr * (1.0 + mde_relative)
    tau2 = msprt_tau2(baseline_ctr, mde_relative)
    pooled = (pa + pb) / 2.0

    def shortfall(n: float) -> float:
        var0 = pooled * (1.0 - pooled) * 2.0 / n
        var1 = (pa * (1.0 - pa) + pb * (1.0 - pb)) / n
        bound = _sequential_threshold_z(var0, tau2, alpha) * math.sqrt(var0 / var1)
        shift = (pb - pa) / math.sqrt(var1)
        reached = float(norm.sf(bound - shift) + norm.cdf(-bound - shift))
        return reached - power

    lo = float(fixed_horizon_sample_size(baseline_ctr, mde_relative, alpha, power))
    hi = lo * 2.0
    while shortfall(hi) < 0:
        hi *= 2.0
    return math.ceil(float(optimize.brentq(shortfall, lo, hi, xtol=1.0)))


def _ci(pair: tuple[float, float]) -> tuple[float, float]:
    return (float(pair[0]), float(pair[1]))


def ab_verdict(stable: Counts, candidate: Counts, policy: AbTestPolicy, previous: AbStatus | None = None) -> AbVerdict:
    """Evaluate one look at the experiment; `previous` is the last `status.abTest` (running p-value, tau^2).

    Decide only when both variants reached minImpressions and the always-valid p-value is at most
    alpha = 1 - confidence; the winner is the variant with the higher CTR. Looks before minImpressions do not
    enter the running p-value; the mixing variance is fixed at the first look that does, so the mixture
    does not move with the data afterwards.
    """
    alpha = policy.alpha
    s_ci = _ci(proportion_confint(stable.clicks, stable.impressions, 0.05, "wilson")) if stable.impressions else None
    c_ci = (
        _ci(proportion_confint(candidate.clicks, candidate.impressions, 0.05, "wilson"))
        if candidate.impressions
        else None
    )
    p_value = abs_lift = lift = None
    abs_ci = lift_ci = None
    seq_p = previous.sequential_p_value if previous is not None else None
    tau2 = previous.mixing_variance if previous is not None else None
    fixed_n = seq_n = None
    base = stable.ctr
    least = min(stable.impressions, candidate.impressions)
    if base is not None and 0.0 < base < 1.0:
        fixed_n = fixed_horizon_sample_size(base, policy.min_detectable_effect, alpha, policy.power)
        seq_n = sequential_sample_size(base, policy.min_detectable_effect, alpha, policy.power)
    have_data = stable.impressions > 0 and candidate.impressions > 0 and (stable.clicks + candidate.clicks) > 0
    if have_data and base is not None and candidate.ctr is not None:
        _, p = proportions_ztest([candidate.clicks, stable.clicks], [candidate.impressions, stable.impressions])
        p_value = float(p)
        abs_lift = candidate.ctr - base
        abs_ci = _ci(
            confint_proportions_2indep(
                candidate.clicks, candidate.impressions, stable.clicks, stable.impressions, compare="diff", alpha=0.05
            )
        )
        if stable.clicks > 0 and candidate.clicks > 0:
            lift = candidate.ctr / base - 1.0
            lo, hi = confint_proportions_2indep(
                candidate.clicks, candidate.impressions, stable.clicks, stable.impressions, compare="ratio", alpha=0.05
            )
            lift_ci = (float(lo) - 1.0, float(hi) - 1.0)
        if least >= policy.min_impressions and 0.0 < base < 1.0:
            tau2 = tau2 if tau2 is not None else msprt_tau2(base, policy.min_detectable_effect)
            llr = float(msprt_log_lr(stable.clicks, stable.impressions, candidate.clicks, candidate.impressions, tau2))
            p_now = min(1.0, math.exp(-llr))
            seq_p = p_now if seq_p is None else min(seq_p, p_now)

    def verdict(decision: AbDecision, reason: str) -> AbVerdict:
        return AbVerdict(
            decision, reason, stable, candidate, s_ci, c_ci, p_value, seq_p, abs_lift, abs_ci, lift, lift_ci,
            fixed_n, seq_n, tau2,
        )  # fmt: skip

    if least < policy.min_impressions:
        return verdict(AbDecision.CONTINUE, f"waiting: {least} of {policy.min_impressions} impressions per variant")
    if seq_p is None or seq_p > alpha or abs_lift is None or abs_lift == 0.0:
        shown = "n/a" if seq_p is None else f"{seq_p:.3g}"
        return verdict(AbDecision.CONTINUE, f"no significant difference yet (sequential p={shown} > {alpha:.3g})")
    winner = AbDecision.CANDIDATE_WINS if abs_lift > 0 else AbDecision.STABLE_WINS
    rel = "n/a" if lift is None else f"{lift:+.2%}"
    return verdict(winner, f"{winner.value} wins: lift {rel}, sequential p={seq_p:.3g} <= {alpha:.3g}")
