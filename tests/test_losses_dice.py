import jax.numpy as jnp
import numpy as np
import pytest

from carvana_jax import dice, losses


def _np_sigmoid(x):
    return 1 / (1 + np.exp(-x))


def _np_bce(logits, masks):
    p = _np_sigmoid(logits.astype(np.float64))
    return float(np.mean(-(masks * np.log(p) + (1 - masks) * np.log(1 - p))))


def _np_soft_dice_loss(logits, masks):
    p = _np_sigmoid(logits.astype(np.float64))
    per_image = [1 - (2 * (pi * mi).sum() + 1) / (pi.sum() + mi.sum() + 1) for pi, mi in zip(p, masks)]
    return float(np.mean(per_image))


def _np_soft_jaccard_loss(logits, masks):
    p = _np_sigmoid(logits.astype(np.float64))
    per_image = [1 - ((pi * mi).sum() + 1) / (pi.sum() + mi.sum() - (pi * mi).sum() + 1) for pi, mi in zip(p, masks)]
    return float(np.mean(per_image))


@pytest.fixture
def batch():
    rng = np.random.default_rng(0)
    return rng.normal(0, 3, (3, 8, 12)).astype(np.float32), (rng.random((3, 8, 12)) < 0.4).astype(np.float32)


def test_losses_match_numpy_references(batch):
    logits, masks = batch
    bce, dice, jac = _np_bce(logits, masks), _np_soft_dice_loss(logits, masks), _np_soft_jaccard_loss(logits, masks)
    np.testing.assert_allclose(losses.get("bce")(logits, masks), bce, rtol=1e-5)
    np.testing.assert_allclose(losses.get("dice")(logits, masks), dice, rtol=1e-5)
    np.testing.assert_allclose(losses.get("bce_dice")(logits, masks), bce + dice, rtol=1e-5)
    np.testing.assert_allclose(losses.get("bce_jaccard")(logits, masks), bce + jac, rtol=1e-5)


def test_confident_correct_predictions_have_near_zero_loss(batch):
    _, masks = batch
    logits = np.where(masks > 0, 20.0, -20.0).astype(np.float32)
    for name in losses.LOSSES:
        assert float(losses.get(name)(logits, masks)) < 1e-3, name


def test_unknown_loss_is_named():
    with pytest.raises(ValueError, match="hinge"):
        losses.get("hinge")


def test_hard_dice_by_hand():
    pred = np.array([[1, 1, 0, 0]], bool)
    truth = np.array([[0, 1, 1, 0]], bool)
    # |A∩B| = 1, |A| + |B| = 4 → 2·1/4
    assert float(dice.per_image(pred[0][None], truth[0][None], xp=np)[0]) == pytest.approx(0.5)
    np.testing.assert_allclose(dice.per_image(jnp.asarray(pred), jnp.asarray(truth)), [0.5])


def test_dice_of_two_empty_masks_is_one_and_of_disjoint_masks_zero():
    empty = np.zeros((2, 5, 5), bool)
    full = np.ones((2, 5, 5), bool)
    np.testing.assert_array_equal(dice.per_image(empty, empty, xp=np), [1.0, 1.0])
    np.testing.assert_array_equal(dice.per_image(empty, full, xp=np), [0.0, 0.0])


def test_dice_agrees_with_set_formula_on_random_masks():
    rng = np.random.default_rng(1)
    pred, truth = rng.random((4, 30, 40)) < 0.5, rng.random((4, 30, 40)) < 0.3
    expected = [2 * np.logical_and(p, t).sum() / (p.sum() + t.sum()) for p, t in zip(pred, truth)]
    np.testing.assert_allclose(dice.per_image(jnp.asarray(pred), jnp.asarray(truth)), expected, rtol=1e-6)


def _np_band(masks, width):
    """Pixels with a pixel of the other class within Chebyshev distance ``width``, by brute force."""
    binary = masks > 0.5
    out = np.zeros(masks.shape, np.float32)
    b, h, w = masks.shape
    for i in range(b):
        for y in range(h):
            for x in range(w):
                window = binary[i, max(y - width, 0):y + width + 1, max(x - width, 0):x + width + 1]
                out[i, y, x] = window.any() and not window.all()
    return out


@pytest.mark.parametrize("width", [1, 2])
def test_boundary_band_matches_brute_force(batch, width):
    _, masks = batch
    np.testing.assert_array_equal(np.asarray(losses.boundary_band(jnp.asarray(masks), width)), _np_band(masks, width))


def test_bce_logdice_matches_numpy(batch):
    logits, masks = batch
    p = _np_sigmoid(logits.astype(np.float64))
    log_dice = np.mean([-np.log((2 * (pi * mi).sum() + 1) / (pi.sum() + mi.sum() + 1)) for pi, mi in zip(p, masks)])
    np.testing.assert_allclose(losses.get("bce_logdice")(logits, masks), _np_bce(logits, masks) + log_dice, rtol=1e-5)


def test_boundary_weighted_losses_match_numpy(batch):
    logits, masks = batch
    weights = 1 + 4.0 * _np_band(masks, 1)
    p = _np_sigmoid(logits.astype(np.float64))
    per_pixel = -(masks * np.log(p) + (1 - masks) * np.log(1 - p))
    bce = np.mean([(wi * ci).sum() / wi.sum() for wi, ci in zip(weights, per_pixel)])
    dice = np.mean([1 - (2 * (wi * pi * mi).sum() + 1) / ((wi * (pi + mi)).sum() + 1)
                    for wi, pi, mi in zip(weights, p, masks)])
    np.testing.assert_allclose(losses.get("bce", 4.0, 1)(logits, masks), bce, rtol=1e-5)
    np.testing.assert_allclose(losses.get("bce_dice", 4.0, 1)(logits, masks), bce + dice, rtol=1e-5)
    # The weighting changes the loss (the band is not empty) and weight 0 is the plain loss.
    assert abs(float(losses.get("bce", 4.0, 1)(logits, masks)) - _np_bce(logits, masks)) > 1e-3
    assert losses.get("bce", 0.0, 1) is losses.LOSSES["bce"]


def test_losses_take_soft_masks():
    logits = np.zeros((1, 4, 4), np.float32)  # p = 0.5 everywhere: BCE against a target of 0.5 is log 2
    np.testing.assert_allclose(losses.get("bce")(logits, np.full((1, 4, 4), 0.5, np.float32)), np.log(2), rtol=1e-6)
