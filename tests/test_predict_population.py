"""Success metric 4 over seeds (``analysis.predict``): the population and overall rows, the clip
and the layer minimum, and the verdict's null simulation at a true correlation of 0.7."""

import math

import numpy as np
import pytest
from scipy import stats

from analysis import predict as P


def test_population_and_overall_rows_on_the_z_scale():
    seeds = [P.SeedPrediction("a", s, r, 6) for s, r in enumerate([0.9, 0.8, 1.0])]
    seeds += [P.SeedPrediction("b", s, r, 8) for s, r in enumerate([0.1, -0.2, 0.3, 0.0])]
    seeds += [P.SeedPrediction("c", s, 1.0, 4) for s in range(3)]  # too few layers: no value
    rows = {r["population"]: r for r in P.population_rows(seeds)}
    za = np.arctanh([0.9, 0.8, 1 - 12 / 210])  # 1.0 over 6 layers clipped to one adjacent swap: 0.943
    zb = np.arctanh([0.1, -0.2, 0.3, 0.0])
    assert rows["a"]["z"] == pytest.approx(za.mean()) and rows["a"]["value"] == pytest.approx(math.tanh(za.mean()))
    se_a = za.std(ddof=1) / math.sqrt(3)
    assert rows["a"]["p_above"] == pytest.approx(stats.t.sf((za.mean() - np.arctanh(0.7)) / se_a, 2))
    assert rows["c"]["k"] == 0 and "needs 5 layers" in rows["c"]["note"]
    assert np.isnan(rows[P.OVERALL]["z"])  # a population without an interval: no overall estimate
    v = {r["population"]: r["verdict"] for r in P.verdicts(seeds)}
    assert v["b"] == "FAIL" and v["c"] == "INCONCLUSIVE"
    two = {r["population"]: r for r in P.population_rows([s for s in seeds if s.population != "c"])}
    assert two[P.OVERALL]["z"] == pytest.approx((za.mean() + zb.mean()) / 2)


def _spearman(rng, rho, n, layers):
    x = rng.multivariate_normal([0, 0], [[1, rho], [rho, 1]], (n, layers))
    a, b = stats.rankdata(x[..., 0], axis=1), stats.rankdata(x[..., 1], axis=1)
    a, b = a - a.mean(1, keepdims=True), b - b.mean(1, keepdims=True)
    return (a * b).sum(1) / np.sqrt((a * a).sum(1) * (b * b).sum(1))


@pytest.mark.parametrize("layers", [6, 12])
def test_the_verdict_passes_at_most_at_its_nominal_rate_at_0_7(layers):
    """Each seed's correlation is that of ``layers`` points from a bivariate normal (rho 0.75), the
    clipped z values recentred so that the population's mean z is atanh(0.7) exactly (the boundary;
    the seeds differ as much as the layer sample makes them); 5 seeds per population, 3 populations
    and the overall row, Holm: PASS and FAIL within two binomial SEs of the nominal one-sided 0.025
    (observed with this seed about 1-2 %; at the nominal level without the calibration the FAIL claim
    reached 3.1 %); a correlation well above passes in most runs."""
    rng = np.random.default_rng(2)
    r = _spearman(rng, 0.75, 20000, layers)
    z = np.arctanh(np.clip(r, -P.attainable(layers), P.attainable(layers)))
    z0 = z - z.mean() + np.arctanh(0.7)
    sims = 1500

    def rates(values):
        out = []
        for _ in range(sims):
            seeds = [P.SeedPrediction(p, s, float(np.tanh(v)), layers) for p in ("a", "b", "c")
                     for s, v in enumerate(rng.choice(values, 5))]
            out += [row["verdict"] for row in P.verdicts(seeds)]
        return out.count("PASS") / len(out), out.count("FAIL") / len(out)

    p_pass, p_fail = rates(z0)
    se = math.sqrt(0.025 * 0.975 / (sims * 4))
    assert p_pass <= 0.025 + 2 * se and p_fail <= 0.025 + 2 * se, (p_pass, p_fail)
    high = np.arctanh(np.clip(_spearman(rng, 0.97, 2000, layers), -P.attainable(layers), P.attainable(layers)))
    assert rates(high)[0] >= 0.5
