"""OC20 metrics against values computed by hand on tiny systems."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from graphpar.metrics import (
    AFBT_THRESHOLDS,
    DWT_THRESHOLDS,
    MetricSums,
    dwt_curve,
    fbt_curve,
    is2re_metrics,
    is2rs_metrics,
    max_force_norms,
    min_image_displacement,
    s2ef_metrics,
)

SQ3 = math.sqrt(3.0)
SKEWED = np.array([[4.0, 0.0, 0.0], [2.0, 2.0 * SQ3, 0.0], [0.0, 0.0, 10.0]])  # |a| = |b| = 4


def s2ef_case():
    """2 systems x 3 atoms; atom 0 is fixed with a huge error."""
    pred_e = np.array([1.0, 2.5])
    true_e = np.array([1.01, 2.0])  # |dE| = 0.01, 0.5
    true_f = np.array(
        [[1, 0, 0], [1, 0, 0], [0, 1, 0], [1, 0, 0], [0, 0, 1], [1, 1, 0]], dtype=float
    )
    pred_f = np.array(
        [[101, 50, 0], [1.01, 0, 0], [0, 1, 0.02], [0, 1, 0], [0, 0, -1], [1, 1, 0]], dtype=float
    )
    natoms = np.array([3, 3])
    fixed = np.array([True, False, False, False, False, False])
    return pred_e, true_e, pred_f, true_f, natoms, fixed


def test_s2ef_by_hand():
    m = s2ef_metrics(*s2ef_case())
    assert m["n_systems"] == 2 and isinstance(m["n_systems"], int)
    assert m["energy_mae"] == pytest.approx(0.255)
    # free |dF|: 0.01 + 0.02 + (1 + 1) + 2 over 5 atoms x 3 components
    assert m["forces_mae"] == pytest.approx(4.03 / 15)
    # cosines: 1, 1/sqrt(1.0004), 0, -1, 1
    assert m["forces_cos"] == pytest.approx((1 + 1 / math.sqrt(1.0004)) / 5)
    assert m["efwt"] == 0.5  # system 0: |dE| 0.01, max |dF| 0.02; system 1 fails
    assert all(isinstance(m[k], float) for k in ("energy_mae", "forces_mae", "forces_cos", "efwt"))


def test_s2ef_fixed_atoms_excluded():
    pred_e, true_e, pred_f, true_f, natoms, fixed = s2ef_case()
    ref = s2ef_metrics(pred_e, true_e, pred_f, true_f, natoms, fixed)
    pred_f = pred_f.copy()
    pred_f[0] = [1e6, -1e6, 3e5]
    assert s2ef_metrics(pred_e, true_e, pred_f, true_f, natoms, fixed) == ref
    # the same atom counted as free breaks system 0's EFwT
    assert s2ef_metrics(pred_e, true_e, pred_f, true_f, natoms, np.zeros(6, bool))["efwt"] == 0.0


def test_s2ef_cosine_matches_torch():
    pred_e, true_e, pred_f, true_f, natoms, fixed = s2ef_case()
    pred_f = pred_f.copy()
    pred_f[5] = 0.0  # zero vector: cosine 0
    pred_f[4] = [1e-9, 0, 0]  # below eps
    free = ~fixed
    ref = torch.cosine_similarity(torch.tensor(pred_f[free]), torch.tensor(true_f[free])).mean()
    m = s2ef_metrics(pred_e, true_e, pred_f, true_f, natoms, fixed)
    assert m["forces_cos"] == pytest.approx(ref.item(), abs=1e-15)


def test_s2ef_torch_inputs():
    case = s2ef_case()
    as_torch = [torch.as_tensor(x) for x in case]
    assert s2ef_metrics(*as_torch) == s2ef_metrics(*case)


@pytest.mark.parametrize(
    ("de", "df", "ok"),
    [
        (0.02, 0.0, 0.0),  # |dE| exactly 0.02: not within
        (0.0199, 0.0, 1.0),
        (0.0, 0.03, 0.0),  # a force component error exactly 0.03: not within
        (0.0, 0.0299, 1.0),
        (0.0, -0.03, 0.0),
    ],
)
def test_efwt_threshold_edges(de, df, ok):
    true_f = np.zeros((2, 3))
    pred_f = np.array([[0.0, df, 0.0], [0.01, 0.0, 0.0]])
    m = s2ef_metrics([de], [0.0], pred_f, true_f, [2], [False, False])
    assert m["efwt"] == ok


def test_efwt_system_without_free_atoms():
    pred_f = np.array([[0.0, 0.0, 0.0], [9.0, 9.0, 9.0]])
    m = s2ef_metrics([0.0, 0.01], [0.0, 0.0], pred_f, np.zeros((2, 3)), [1, 1], [False, True])
    assert m["efwt"] == 1.0  # system 1: all atoms fixed, only |dE| = 0.01 is tested
    assert m["forces_mae"] == 0.0


def test_is2re_by_hand():
    m = is2re_metrics(torch.tensor([0.01, 0.02, 0.5, 0.0], dtype=torch.float64), torch.zeros(4))
    assert m == {"energy_mae": pytest.approx(0.1325), "ewt": 0.5, "n_systems": 4}


def test_min_image_skewed_cell():
    a, b, c = SKEWED
    pbc = [True, True, True]
    true = np.array([0.02 * a + 0.5 * b + 0.5 * c, 0.5 * a + 0.01 * b + 0.5 * c])
    pred = np.array([0.98 * a + 0.5 * b + 0.5 * c, 0.5 * a + 0.99 * b + 0.5 * c])
    disp = min_image_displacement(pred, true, SKEWED, pbc)
    # just across the boundary: -0.04 a and -0.02 b
    np.testing.assert_allclose(disp, [[-0.16, 0.0, 0.0], [-0.04, -0.04 * SQ3, 0.0]], atol=1e-12)
    np.testing.assert_allclose(np.linalg.norm(disp, axis=1), [0.16, 0.08], atol=1e-12)
    # 0.9 (a + b) wraps to -0.1 (a + b): |a + b| = sqrt(48)
    disp = min_image_displacement([0.9 * (a + b)], [[0.0, 0.0, 0.0]], SKEWED, pbc)
    assert np.linalg.norm(disp) == pytest.approx(math.sqrt(0.48))
    # negative displacements wrap too: -0.7 b -> 0.3 b
    disp = min_image_displacement([-0.7 * b], [[0.0, 0.0, 0.0]], SKEWED, pbc)
    np.testing.assert_allclose(disp, [[0.6, 0.6 * SQ3, 0.0]], atol=1e-12)


def test_min_image_non_periodic_axis():
    c = SKEWED[2]
    pred, true = [0.9 * c + [1.0, 0.0, 0.0]], [[1.0, 0.0, 0.0]]
    disp = min_image_displacement(pred, true, SKEWED, [True, True, False])
    np.testing.assert_allclose(disp, [[0.0, 0.0, 9.0]], atol=1e-12)
    disp = min_image_displacement(pred, true, SKEWED, [True, True, True])
    np.testing.assert_allclose(disp, [[0.0, 0.0, -1.0]], atol=1e-12)


def test_dwt_thresholds_and_edges():
    assert len(DWT_THRESHOLDS) == 490
    assert DWT_THRESHOLDS[0] == 0.01 and DWT_THRESHOLDS[-1] < 0.5
    t, frac = dwt_curve([0.0])
    assert len(t) == 490 and frac.mean() == 1.0
    # thresholds above 0.25 are 0.251 .. 0.499: 249 of 490
    assert dwt_curve([0.25])[1].mean() == pytest.approx(249 / 490)
    # a distance exactly at threshold 240 (~0.25) is not within it
    _, frac = dwt_curve([DWT_THRESHOLDS[240]])
    assert frac[240] == 0.0 and frac[241] == 1.0 and frac.sum() == 249
    assert dwt_curve([0.0, 0.6])[1].mean() == 0.5


def test_is2rs_adwt_by_hand():
    cell = np.stack([SKEWED, 10.0 * np.eye(3)])
    a, b, _ = SKEWED
    # system 0: 2 free atoms at 0.16 and 0.08 (across the skewed boundary), 1 fixed far off
    true0 = np.array([0.02 * a + 0.5 * b, 0.5 * a + 0.01 * b, [1.0, 1.0, 1.0]])
    pred0 = np.array([0.98 * a + 0.5 * b, 0.5 * a + 0.99 * b, [3.0, 3.0, 3.0]])
    # system 1: one free atom moved 0.25 along x
    true1 = np.array([[1.0, 1.0, 1.0]])
    pred1 = np.array([[1.25, 1.0, 1.0]])
    pred, true = np.concatenate([pred0, pred1]), np.concatenate([true0, true1])
    fixed = np.array([False, False, True, False])
    m = is2rs_metrics(pred, true, cell, [True, True, True], [3, 1], fixed)
    # d = 0.12 -> thresholds 0.121 .. 0.499 (379); d = 0.25 -> 249
    assert m == {
        "adwt": pytest.approx((379 + 249) / 980),
        "fbt": None,
        "afbt": None,
        "n_systems": 2,
    }
    # over all atoms the fixed one (~2.5 A off) pushes system 0 beyond every threshold
    m_all = is2rs_metrics(pred, true, cell, [True] * 3, [3, 1], fixed, eval_on_free_atoms=False)
    assert m_all["adwt"] == pytest.approx(249 / 980)
    # identical structures: every threshold passes
    m0 = is2rs_metrics(true, true, cell, torch.ones(2, 3, dtype=torch.bool), [3, 1], fixed)
    assert m0["adwt"] == 1.0


def test_fbt_afbt_by_hand():
    assert len(AFBT_THRESHOLDS) == 391
    assert AFBT_THRESHOLDS[0] == 0.01 and AFBT_THRESHOLDS[-1] == pytest.approx(0.4)
    # thresholds above 0.0405: 0.041 .. 0.4 (360); above 0.0505: 350; above 0.2005: 200
    _, frac = fbt_curve([0.0405, 0.0505, 0.2005])
    assert frac.sum() * 3 == pytest.approx(910)
    pos = np.zeros((3, 3))
    m = is2rs_metrics(
        pos, pos, np.eye(3)[None].repeat(3, 0), [True] * 3, [1, 1, 1], [False] * 3,
        oracle_max_force=[0.0405, 0.0505, 0.2005],
    )  # fmt: skip
    assert m["fbt"] == pytest.approx(1 / 3)
    assert m["afbt"] == pytest.approx(910 / 1173)
    # exactly 0.05 is not below the FbT threshold
    m = is2rs_metrics(
        np.zeros((2, 3)), np.zeros((2, 3)), np.eye(3)[None].repeat(2, 0), [True] * 3, [1, 1],
        [False, False], oracle_max_force=np.array([0.05, 0.0499]),
    )  # fmt: skip
    assert m["fbt"] == 0.5


def test_max_force_norms():
    forces = np.array([[3.0, 4.0, 0.0], [0.0, 0.0, 1.0], [100.0, 0.0, 0.0], [0.0, 0.1, 0.0]])
    fixed = [False, False, True, True]
    np.testing.assert_allclose(max_force_norms(forces, [2, 2], fixed), [5.0, 0.0])
    np.testing.assert_allclose(max_force_norms(forces, [2, 2]), [5.0, 100.0])


def test_metric_sums_by_batch_equal_whole():
    """Sums updated batch by batch (as the evaluation does) give the metrics of the whole."""
    pred_e, true_e, pred_f, true_f, natoms, fixed = s2ef_case()
    batches = MetricSums().update_s2ef(
        pred_e[:1], true_e[:1], pred_f[:3], true_f[:3], [3], fixed[:3]
    )
    batches.update_s2ef(pred_e[1:], true_e[1:], pred_f[3:], true_f[3:], [3], fixed[3:])
    by_batch = batches.result("s2ef")
    whole = s2ef_metrics(pred_e, true_e, pred_f, true_f, natoms, fixed)
    assert by_batch.keys() == whole.keys()
    for key in whole:
        assert by_batch[key] == pytest.approx(whole[key])

    cell, pbc = 10.0 * np.eye(3)[None].repeat(2, 0), [True] * 3
    pred = np.array([[0.0, 0.0, 0.0], [0.25, 0.0, 0.0]])
    true = np.zeros((2, 3))
    halves = MetricSums().update_is2rs(pred[:1], true[:1], cell[:1], pbc, [1], [False], [0.01])
    halves.update_is2rs(pred[1:], true[1:], cell[1:], pbc, [1], [False], [0.2005])
    whole = is2rs_metrics(pred, true, cell, pbc, [1, 1], [False, False], [0.01, 0.2005])
    assert halves.result("is2rs") == pytest.approx(whole)
    assert whole["adwt"] == pytest.approx((490 + 249) / 980)
    assert whole["afbt"] == pytest.approx((390 + 200) / 782)  # 0.01 is not below 0.01
    assert whole["fbt"] == 0.5

    is2re = MetricSums().update_is2re([0.01, 0.02], [0, 0]).update_is2re([0.5, 0.0], [0, 0])
    assert is2re.result("is2re") == pytest.approx(is2re_metrics([0.01, 0.02, 0.5, 0], [0] * 4))


def test_shape_errors():
    pred_e, true_e, pred_f, true_f, natoms, fixed = s2ef_case()
    with pytest.raises(ValueError, match="natoms"):
        s2ef_metrics(pred_e, true_e, pred_f, true_f, [3, 2], fixed)
    with pytest.raises(ValueError, match="forces"):
        s2ef_metrics(pred_e, true_e, pred_f, true_f[:5], natoms, fixed)
    with pytest.raises(ValueError):
        s2ef_metrics(pred_e[:1], true_e[:1], pred_f, true_f, natoms, fixed)
    with pytest.raises(ValueError, match="fixed"):
        s2ef_metrics(pred_e, true_e, pred_f, true_f, natoms, fixed[:5])
    with pytest.raises(ValueError, match="energies"):
        is2re_metrics([0.0, 1.0], [0.0])
    with pytest.raises(ValueError, match="cell"):
        is2rs_metrics(np.zeros((2, 3)), np.zeros((2, 3)), np.eye(3), [True] * 3, [1, 1], None)
    with pytest.raises(ValueError, match="no evaluated atoms"):
        is2rs_metrics(np.zeros((1, 3)), np.zeros((1, 3)), np.eye(3), [True] * 3, [1], [True])
    with pytest.raises(ValueError, match="task"):
        MetricSums().result("oc22")
