"""Tests of UG-MCL: SDF, schedules, mean teacher, losses, network and training."""

from __future__ import annotations

import copy
import math
from collections.abc import Iterator, Mapping

import numpy as np
import pytest
import torch
from opacus import GradSampleModule
from opacus.validators import ModuleValidator
from torch import nn

from core.config import ClipScope, RunConfig, SemisupVariant, load_default_config
from core.privacy.dp import DpSgdPlan, PrivateGradient
from core.semisup.dual_task import (
    DualTaskUNet,
    _bottleneck,
    build_dual_task_model,
    keep_local_norm,
    load_segmentation_weights,
    norm_state_names,
    segmentation_weights,
)
from core.semisup.job import SemisupRound, round_start, semisup_settings
from core.semisup.terms import (
    clipped_noise,
    compute_sdf,
    compute_sdf_batch,
    consistency_weight,
    cross_consistency,
    dice_loss,
    ema_update,
    intra_consistency,
    per_sample_supervised_loss,
    predictive_entropy,
    sigmoid_rampup,
    supervised_loss,
    teacher_predictions,
    teacher_targets,
    uncertainty_threshold,
)
from core.semisup.training import (
    SemisupResult,
    SemisupSettings,
    _clip_gradients,
    train_semisupervised,
)
from core.training.networks import build_model, get_weights, set_weights

CPU = torch.device("cpu")
LN2 = math.log(2.0)


@pytest.fixture(autouse=True, scope="module")
def one_thread() -> Iterator[None]:
    # These tensors are tiny: a second thread only adds contention on a busy machine.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_config(**overrides: int | float | str | bool) -> RunConfig:
    return load_default_config(
        **{
            "data.image-size": 16,
            "model.channels": "4,8",
            "model.strides": "2",
            **overrides,
        }
    )


def tiny_dual(
    seed: int = 0, *, spatial_dims: int = 2, dropout: float = 0.3, **overrides: str
) -> DualTaskUNet:
    config = tiny_config(**overrides)
    torch.manual_seed(seed)
    return build_dual_task_model(
        config.model, config.data, spatial_dims=spatial_dims, dropout=dropout
    )


def bright_boxes(
    count: int, spatial: tuple[int, ...], seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``count`` noisy images with one bright box (half the side) and its label."""
    generator = torch.Generator().manual_seed(seed)
    images = 0.1 * torch.randn(count, 1, *spatial, generator=generator)
    labels = torch.zeros(count, *spatial, dtype=torch.long)
    for index in range(count):
        box = tuple(
            slice(start, start + size // 2)
            for size, start in (
                (size, int(torch.randint(0, size // 2 + 1, (1,), generator=generator)))
                for size in spatial
            )
        )
        labels[(index, *box)] = 1
        images[(index, 0, *box)] += 1.0
    return images, labels


def settings(
    variant: SemisupVariant, **overrides: float | int | bool | str
) -> SemisupSettings:
    values: dict[str, float | int | bool | str] = {
        "iterations": 3,
        "labelled_batch": 2,
        "unlabelled_batch": 4,
        "learning_rate": 0.01,
        **overrides,
    }
    return SemisupSettings(variant=variant, **values)  # type: ignore[arg-type]


def all_close(
    left: Mapping[str, torch.Tensor], right: Mapping[str, torch.Tensor]
) -> bool:
    return left.keys() == right.keys() and all(
        torch.equal(left[name], right[name]) for name in left
    )


# ------------------------------------------------------------- signed distance


def test_compute_sdf_of_a_square_matches_hand_computed_distances() -> None:
    # Prepare: a 3x3 square in a 7x7 image; its centre is 2 px from the background,
    # the image corners sqrt(8) px from the square (both maxima).
    mask = np.zeros((7, 7), dtype=bool)
    mask[2:5, 2:5] = True

    # Execute
    sdf = compute_sdf(mask)

    # Assert
    assert sdf.dtype == np.float32
    assert sdf[3, 3] == pytest.approx(-1.0)
    assert sdf[0, 0] == pytest.approx(1.0)
    assert sdf[1, 1] == pytest.approx(math.sqrt(2) / math.sqrt(8))
    assert sdf[1, 3] == pytest.approx(1 / math.sqrt(8))
    assert sdf[0, 3] == pytest.approx(2 / math.sqrt(8))
    ring = mask.copy()
    ring[3, 3] = False
    assert (sdf[ring] == 0.0).all()
    assert (sdf[~mask] > 0).all()


def test_compute_sdf_does_not_treat_the_image_border_as_background() -> None:
    # Prepare: rows 0-2 are foreground; only row 2 touches the background.
    mask = np.zeros((5, 5), dtype=np.int64)
    mask[:3] = 1

    # Execute
    sdf = compute_sdf(mask)

    # Assert: d_in = 3, 2 on rows 0, 1; d_out = 1, 2 on rows 3, 4.
    expected_rows = [-1.0, -2.0 / 3.0, 0.0, 0.5, 1.0]
    np.testing.assert_allclose(sdf, np.repeat([expected_rows], 5, axis=0).T, atol=1e-6)


def test_compute_sdf_of_a_one_pixel_line_is_zero_on_the_line() -> None:
    # Prepare
    mask = np.zeros((5, 5), dtype=bool)
    mask[2] = True

    # Execute
    sdf = compute_sdf(mask)

    # Assert: every line pixel is an inner boundary pixel.
    np.testing.assert_array_equal(sdf[2], np.zeros(5))
    np.testing.assert_allclose(sdf[[1, 3]], 0.5)
    np.testing.assert_allclose(sdf[[0, 4]], 1.0)


def test_compute_sdf_works_in_3d() -> None:
    # Prepare: a 3x3x3 cube in a 5x5x5 volume.
    mask = np.zeros((5, 5, 5), dtype=bool)
    mask[1:4, 1:4, 1:4] = True

    # Execute
    sdf = compute_sdf(mask)

    # Assert: the largest outside distance is the corners', sqrt(3).
    assert sdf[2, 2, 2] == pytest.approx(-1.0)
    assert sdf[0, 0, 0] == pytest.approx(1.0)
    assert sdf[0, 2, 2] == pytest.approx(1 / math.sqrt(3))
    assert sdf[1, 2, 2] == 0.0
    assert (sdf[mask] <= 0).all()
    assert (sdf[~mask] > 0).all()


@pytest.mark.parametrize("value", [0, 1])
def test_compute_sdf_of_an_empty_or_full_mask_is_zero(value: int) -> None:
    # Execute
    sdf = compute_sdf(np.full((4, 6), value))

    # Assert
    np.testing.assert_array_equal(sdf, np.zeros((4, 6), dtype=np.float32))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_compute_sdf_is_bounded_and_signed(seed: int) -> None:
    # Prepare
    mask = np.random.default_rng(seed).random((12, 12)) < 0.3

    # Execute
    sdf = compute_sdf(mask)

    # Assert
    assert sdf.min() >= -1.0
    assert sdf.max() == pytest.approx(1.0)
    assert (sdf[mask] <= 0).all()
    assert (sdf[~mask] > 0).all()


def test_compute_sdf_batch_computes_each_class_of_each_sample() -> None:
    # Prepare
    _, labels = bright_boxes(2, (8, 8), seed=0)

    # Execute
    result = compute_sdf_batch(labels, num_classes=2)

    # Assert
    assert result.shape == (2, 2, 8, 8)
    assert result.dtype == torch.float32
    for index in range(2):
        for c in range(2):
            expected = compute_sdf(labels[index].numpy() == c)
            np.testing.assert_array_equal(result[index, c].numpy(), expected)


# ----------------------------------------------------------------- schedules


@pytest.mark.parametrize(
    ("step", "length", "expected"),
    [
        (0, 10, math.exp(-5.0)),
        (-3, 10, math.exp(-5.0)),
        (5, 10, math.exp(-1.25)),
        (10, 10, 1.0),
        (25, 10, 1.0),
        (7, 0, 1.0),
    ],
)
def test_sigmoid_rampup(step: float, length: float, expected: float) -> None:
    assert sigmoid_rampup(step, length) == pytest.approx(expected)


def test_sigmoid_rampup_rejects_a_negative_length() -> None:
    with pytest.raises(ValueError, match="ramp-up length must be >= 0, got -1"):
        sigmoid_rampup(0, -1)


@pytest.mark.parametrize(
    ("step", "max_steps", "num_classes", "expected"),
    [
        (0, 100, 2, (0.75 + 0.25 * math.exp(-5.0)) * LN2),  # ~0.75 ln 2
        (100, 100, 2, LN2),
        (500, 100, 2, LN2),
        (100, 100, 3, math.log(3.0)),
    ],
)
def test_uncertainty_threshold(
    step: int, max_steps: int, num_classes: int, expected: float
) -> None:
    assert uncertainty_threshold(step, max_steps, num_classes) == pytest.approx(
        expected
    )


@pytest.mark.parametrize(
    ("step", "rampup", "expected"),
    [(0, 40, 0.1 * math.exp(-5.0)), (20, 40, 0.1 * math.exp(-1.25)), (40, 40, 0.1)],
)
def test_consistency_weight(step: int, rampup: int, expected: float) -> None:
    assert consistency_weight(step, weight=0.1, rampup=rampup) == pytest.approx(
        expected
    )


# -------------------------------------------------------------- mean teacher


def two_batchnorms() -> tuple[nn.Module, nn.Module]:
    teacher, student = nn.BatchNorm1d(2), nn.BatchNorm1d(2)
    with torch.no_grad():
        teacher.weight.fill_(1.0)
        teacher.running_mean.fill_(1.0)
        student.weight.fill_(3.0)
        student.running_mean.fill_(7.0)
        student.num_batches_tracked.fill_(5)
    return teacher, student


@pytest.mark.parametrize(
    ("step", "alpha"), [(0, 0.0), (5, 5.0 / 6.0), (99, 0.99), (1000, 0.99)]
)
def test_ema_update_moves_parameters_and_buffers(step: int, alpha: float) -> None:
    # Prepare
    teacher, student = two_batchnorms()

    # Execute
    ema_update(teacher, student, step, decay=0.99)

    # Assert
    torch.testing.assert_close(
        teacher.weight, torch.full((2,), alpha + 3 * (1 - alpha))
    )
    torch.testing.assert_close(
        teacher.running_mean, torch.full((2,), alpha + 7 * (1 - alpha))
    )
    assert int(teacher.num_batches_tracked) == 0  # not a floating buffer
    assert student.weight.detach().tolist() == [3.0, 3.0]


def test_ema_update_at_step_zero_copies_even_a_non_finite_teacher() -> None:
    # Prepare
    teacher, student = nn.Linear(2, 2), nn.Linear(2, 2)
    with torch.no_grad():
        teacher.weight.fill_(float("nan"))

    # Execute
    ema_update(teacher, student, 0)

    # Assert
    assert torch.equal(teacher.weight, student.weight)


def test_ema_update_rejects_different_architectures() -> None:
    with pytest.raises(ValueError, match=r"differ in parameters \['bias'\]"):
        ema_update(nn.Linear(2, 2), nn.Linear(2, 2, bias=False), 3)


def test_clipped_noise_is_bounded_and_reproducible() -> None:
    # Prepare
    images = torch.zeros(2, 1, 8, 8, dtype=torch.float64)

    # Execute
    first = clipped_noise(images, std=1.0, generator=torch.Generator().manual_seed(3))
    second = clipped_noise(images, std=1.0, generator=torch.Generator().manual_seed(3))

    # Assert
    assert first.shape == images.shape
    assert first.dtype == torch.float64
    assert torch.equal(first, second)
    assert float(first.abs().max()) == pytest.approx(0.2)
    assert float(clipped_noise(images, std=0.01).abs().max()) < 0.1


def test_predictive_entropy_bounds() -> None:
    # Prepare: a uniform voxel and a one-hot voxel.
    probabilities = torch.tensor([[[0.5, 1.0], [0.5, 0.0]]])

    # Execute
    result = predictive_entropy(probabilities)

    # Assert
    assert result.shape == (1, 1, 2)
    torch.testing.assert_close(result, torch.tensor([[[LN2, 0.0]]]), atol=1e-5, rtol=0)


def test_teacher_predictions_shapes_and_mc_dropout() -> None:
    # Prepare
    images, _ = bright_boxes(3, (16, 16), seed=0)
    teacher = tiny_dual(dropout=0.5).eval()
    deterministic = tiny_dual(dropout=0.0)

    # Execute
    target, entropy = teacher_predictions(
        teacher, images, passes=4, generator=torch.Generator().manual_seed(0)
    )
    again, _ = teacher_predictions(
        teacher, images, passes=4, generator=torch.Generator().manual_seed(0)
    )
    plain = [
        teacher_predictions(
            deterministic, images, passes=2, generator=torch.Generator().manual_seed(0)
        )[0]
        for _ in range(2)
    ]

    # Assert: the same noise, so only dropout makes the two calls differ.
    assert target.shape == (3, 2, 16, 16)
    assert entropy.shape == (3, 1, 16, 16)
    torch.testing.assert_close(target.sum(dim=1), torch.ones(3, 16, 16))
    assert float(entropy.min()) >= 0.0
    assert float(entropy.max()) <= LN2
    assert not torch.equal(target, again)
    assert torch.equal(plain[0], plain[1])
    assert not teacher.training  # its mode is restored


def test_teacher_predictions_rejects_zero_passes() -> None:
    with pytest.raises(ValueError, match="passes must be >= 1, got 0"):
        teacher_predictions(tiny_dual(), torch.zeros(1, 1, 16, 16), passes=0)


# --------------------------------------------------------------------- losses


def test_dice_loss_hand_value() -> None:
    # Prepare: sum p g = 1.5, sum p^2 = 1.5, sum g^2 = 2.
    probabilities = torch.tensor([[1.0, 0.0], [0.5, 0.5]])
    target = torch.tensor([[1, 0], [1, 0]])

    # Execute
    result = dice_loss(probabilities, target, eps=0.0)

    # Assert
    assert float(result) == pytest.approx(1.0 - 3.0 / 3.5)


def test_intra_consistency_ignores_masked_voxels() -> None:
    # Prepare: two voxels, C = 2; the second is masked out and differs wildly.
    student = torch.tensor([[[0.8, 1.0], [0.2, 0.0]]])
    teacher = torch.tensor([[[0.6, 0.0], [0.4, 1.0]]])
    mask = torch.tensor([[[1.0, 0.0]]])

    # Execute
    result = intra_consistency(student, teacher, mask)

    # Assert: 0.5 * (0.2^2 + 0.2^2) / (2 * 1)
    assert float(result) == pytest.approx(0.5 * 0.08 / 2.0)


def test_intra_consistency_divides_by_classes_times_certain_voxels() -> None:
    # Prepare: C = 3, three certain voxels, every squared difference 0.01.
    student = torch.full((1, 3, 4), 0.3)
    teacher = torch.full((1, 3, 4), 0.2)
    mask = torch.tensor([[[1.0, 1.0, 1.0, 0.0]]])

    # Execute
    result = intra_consistency(student, teacher, mask)

    # Assert
    assert float(result) == pytest.approx(0.5 * 9 * 0.01 / (3 * 3))
    assert float(intra_consistency(student, teacher, torch.zeros_like(mask))) == 0.0


def test_intra_consistency_rejects_a_per_class_mask() -> None:
    probabilities = torch.zeros(1, 2, 4)
    with pytest.raises(ValueError, match=r"mask \(B, 1, \*spatial\).*\(1, 2, 4\)"):
        intra_consistency(probabilities, probabilities, torch.ones(1, 2, 4))


def test_cross_consistency_with_and_without_mask() -> None:
    # Prepare: voxel 0 is deep inside (mask 1) with p_fg 0.8; voxel 1 agrees exactly.
    sdf = torch.tensor([[[-1.0, 0.0], [1.0, 0.0]]])
    logits = torch.tensor([[[math.log(0.8), 0.0], [math.log(0.2), 0.0]]])
    mask = torch.tensor([[[1.0, 0.0]]])

    # Execute
    unmasked = cross_consistency(logits, sdf)
    masked = cross_consistency(logits, sdf, mask=mask)

    # Assert: channel 0: sigmoid(1500) = 1 vs 0.8; channel 1: sigmoid(-1500) = 0 vs 0.2.
    assert float(unmasked) == pytest.approx(2 * 0.04 / 4)
    assert float(masked) == pytest.approx(2 * 0.04 / 2)


def test_supervised_loss_dual_task_terms() -> None:
    # Prepare
    torch.manual_seed(0)
    logits, sdf = torch.randn(2, 2, 8, 8), torch.tanh(torch.randn(2, 2, 8, 8))
    _, labels = bright_boxes(2, (8, 8), seed=1)
    foreground = (labels == 1).float()

    # Execute
    loss, terms = supervised_loss(logits, sdf, labels, k=3.0)
    weighted, weighted_terms = supervised_loss(logits, sdf, labels, sdf_weight=0.3)

    # Assert
    expected = {
        "cross_entropy": float(nn.functional.cross_entropy(logits, labels)),
        "dice": float(dice_loss(torch.softmax(logits, 1)[:, 1], foreground)),
        "sdf_dice": float(dice_loss(torch.sigmoid(-3.0 * sdf[:, 1]), foreground)),
    }
    assert terms == pytest.approx(expected)
    assert float(loss) == pytest.approx(0.5 * sum(expected.values()))
    mse = float(nn.functional.mse_loss(sdf, compute_sdf_batch(labels, 2)))
    assert weighted_terms["sdf_mse"] == pytest.approx(mse)
    assert float(weighted) == pytest.approx(
        0.5 * (terms["cross_entropy"] + terms["dice"] + weighted_terms["sdf_dice"])
        + 0.3 * mse
    )


def test_supervised_loss_uses_a_given_sdf_target() -> None:
    # Prepare
    sdf = torch.full((1, 2, 4, 4), 0.5)
    labels = torch.zeros(1, 4, 4, dtype=torch.long)

    # Execute
    _, terms = supervised_loss(
        torch.zeros(1, 2, 4, 4),
        sdf,
        labels,
        sdf_weight=1.0,
        sdf_target=torch.zeros(1, 2, 4, 4),
    )

    # Assert
    assert terms["sdf_mse"] == pytest.approx(0.25)


def test_supervised_loss_single_task() -> None:
    # Prepare
    logits = torch.randn(1, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([[0, 1, 2, 2]] * 4).unsqueeze(0)
    probabilities = torch.softmax(logits, 1)

    # Execute
    loss, terms = supervised_loss(
        logits, torch.zeros_like(logits), labels, sdf_weight=1.0, dual_task=False
    )

    # Assert: mean over the foreground classes 1 and 2.
    dice = np.mean([float(dice_loss(probabilities[:, c], labels == c)) for c in (1, 2)])
    assert set(terms) == {"cross_entropy", "dice"}
    assert terms["dice"] == pytest.approx(dice)
    assert float(loss) == pytest.approx(0.5 * (terms["cross_entropy"] + dice))


@pytest.mark.parametrize(
    ("dual_task", "sdf_weight"), [(True, 0.0), (True, 0.3), (False, 0.0)]
)
def test_per_sample_supervised_loss_is_each_samples_own_batch_loss(
    dual_task: bool, sdf_weight: float
) -> None:
    # Prepare
    torch.manual_seed(0)
    logits, sdf = torch.randn(3, 2, 8, 8), torch.tanh(torch.randn(3, 2, 8, 8))
    _, labels = bright_boxes(3, (8, 8), seed=1)

    # Execute
    losses = per_sample_supervised_loss(
        logits, sdf, labels, k=3.0, sdf_weight=sdf_weight, dual_task=dual_task
    )

    # Assert
    expected = [
        float(
            supervised_loss(
                logits[i : i + 1],
                sdf[i : i + 1],
                labels[i : i + 1],
                k=3.0,
                sdf_weight=sdf_weight,
                dual_task=dual_task,
            )[0]
        )
        for i in range(3)
    ]
    assert losses.shape == (3,)
    assert losses.tolist() == pytest.approx(expected, rel=1e-5)


# -------------------------------------------------------------------- network


@pytest.mark.parametrize(
    ("spatial_dims", "shape", "overrides"),
    [
        (2, (2, 1, 16, 16), {}),
        (2, (1, 1, 16, 16), {"model.channels": "4,8,16", "model.strides": "2,2"}),
        (3, (2, 1, 8, 16, 16), {}),
        (3, (1, 1, 8, 16, 16), {"model.norm": "group"}),
    ],
)
def test_dual_task_forward_shapes(
    spatial_dims: int, shape: tuple[int, ...], overrides: dict[str, str]
) -> None:
    # Prepare
    model = tiny_dual(spatial_dims=spatial_dims, **overrides).eval()

    # Execute
    with torch.no_grad():
        logits, sdf = model(torch.randn(*shape))

    # Assert
    expected = (shape[0], 2, *shape[2:])
    assert logits.shape == expected
    assert sdf.shape == expected
    assert float(sdf.abs().max()) <= 1.0
    assert model.spatial_dims == spatial_dims


def test_shared_head_sdf_is_tanh_of_the_logits() -> None:
    # Prepare
    config = tiny_config()
    model = build_dual_task_model(config.model, config.data, shared_head=True).eval()

    # Execute
    with torch.no_grad():
        logits, sdf = model(torch.randn(2, 1, 16, 16))

    # Assert
    assert model.distance_head is None
    assert not any(name.startswith("distance_head") for name in model.state_dict())
    torch.testing.assert_close(sdf, torch.tanh(logits))


@pytest.mark.parametrize("channels", ["4,8", "4,8,16"])
def test_segmentation_is_build_models_network(channels: str) -> None:
    # Prepare
    strides = ",".join(["2"] * (len(channels.split(",")) - 1))
    config = tiny_config(**{"model.channels": channels, "model.strides": strides})
    dual = tiny_dual(seed=1, **{"model.channels": channels, "model.strides": strides})
    plain = build_model(config.model, data=config.data)
    images = torch.randn(2, 1, 16, 16)

    # Execute
    set_weights(plain, segmentation_weights(get_weights(dual)))

    # Assert: in eval mode, no dropout anywhere; the same logits.
    dual.eval()
    plain.eval()
    with torch.no_grad():
        torch.testing.assert_close(dual(images)[0], plain(images))
        torch.testing.assert_close(dual.segmentation(images), plain(images))
    assert any(name.startswith("distance_head.") for name in dual.state_dict())


def test_dropout_is_active_only_in_train_mode() -> None:
    # Prepare
    model = tiny_dual(dropout=0.5)
    images = torch.randn(1, 1, 16, 16)

    # Execute
    with torch.no_grad():
        trained = [model.train()(images)[0] for _ in range(2)]
        evaluated = [model.eval()(images)[0] for _ in range(2)]

    # Assert
    assert not torch.equal(trained[0], trained[1])
    assert torch.equal(evaluated[0], evaluated[1])


def test_a_deep_copied_teacher_drops_out_by_its_own_mode() -> None:
    # Prepare: the bottleneck hook must follow the copy, not the original.
    student = tiny_dual(dropout=0.5).train()
    teacher = copy.deepcopy(student).eval()
    images = torch.randn(1, 1, 16, 16)

    # Execute
    with torch.no_grad():
        outputs = [teacher(images)[0] for _ in range(2)]

    # Assert
    assert torch.equal(outputs[0], outputs[1])


def test_dual_task_model_rejects_bad_dropout() -> None:
    config = tiny_config()
    with pytest.raises(ValueError, match=r"dropout must be in \[0, 1\), got 1.0"):
        build_dual_task_model(config.model, config.data, dropout=1.0)


def test_load_segmentation_weights_keeps_the_distance_head() -> None:
    # Prepare
    config = tiny_config()
    torch.manual_seed(5)
    plain = build_model(config.model, data=config.data)
    dual = tiny_dual()
    head = dual.distance_head
    assert head is not None
    before = {name: value.clone() for name, value in head.state_dict().items()}

    # Execute
    load_segmentation_weights(dual, get_weights(plain))

    # Assert
    assert all_close(dual.segmentation.state_dict(), plain.state_dict())
    assert all_close(head.state_dict(), before)


def test_segmentation_weights_errors_name_the_key() -> None:
    dual = tiny_dual()
    weights = get_weights(dual.segmentation)
    weights["model.extra"] = np.zeros(1, dtype=np.float32)
    with pytest.raises(ValueError, match=r"unexpected \['model.extra'\]"):
        load_segmentation_weights(dual, weights)
    with pytest.raises(ValueError, match=r"not dual-task weights: \['model.extra'\]"):
        segmentation_weights(
            {
                "segmentation.model.0": weights["model.extra"],
                "model.extra": weights["model.extra"],
            }
        )


@pytest.mark.parametrize("norm", ["instance", "group"])
def test_dual_task_model_trains_under_opacus(norm: str) -> None:
    # Prepare
    dual = tiny_dual(**{"model.norm": norm}).train()
    images, labels = bright_boxes(3, (16, 16), seed=0)

    # Execute
    errors = ModuleValidator.validate(dual, strict=False)
    wrapped = GradSampleModule(dual)
    logits, sdf = wrapped(images)
    loss, _ = supervised_loss(logits, sdf, labels)
    loss.backward()

    # Assert
    assert errors == []
    for name, parameter in dual.named_parameters():
        assert parameter.grad_sample is not None, name
        assert parameter.grad_sample.shape == (3, *parameter.shape), name


def test_the_bottleneck_dropout_hook_fires_under_opacus() -> None:
    # Prepare: observe the bottleneck's output after the dropout hook
    dual = tiny_dual(dropout=0.5).train()
    images, labels = bright_boxes(4, (16, 16), seed=0)
    plan = DpSgdPlan(
        noise_multiplier=1.0,
        sample_rate=1.0,
        steps=1,
        max_grad_norm=1.0,
        delta=1e-5,
        seed=0,
    )
    mechanism = PrivateGradient(dual, plan, num_samples=4, device=CPU)
    zeros: list[float] = []
    _bottleneck(dual.segmentation).register_forward_hook(
        lambda _m, _i, output: zeros.append(float((output == 0).float().mean()))
    )

    def loss(indices: torch.Tensor, _generator: torch.Generator) -> torch.Tensor:
        logits, sdf = dual(images[indices])
        return per_sample_supervised_loss(logits, sdf, labels[indices])

    # Execute
    mechanism.step(loss)
    mechanism.close()
    with torch.no_grad():
        dual.eval()(images)

    # Assert: about half the bottleneck is dropped in the private pass, none in eval
    assert 0.35 < zeros[0] < 0.65
    assert zeros[1] < 0.05


# ------------------------------------------------------------------- training


@pytest.fixture(scope="module")
def square_data() -> dict[str, torch.Tensor]:
    labelled, labels = bright_boxes(4, (16, 16), seed=0)
    unlabelled, _ = bright_boxes(8, (16, 16), seed=1)
    return {"labelled": labelled, "labels": labels, "unlabelled": unlabelled}


def run(
    data: Mapping[str, torch.Tensor],
    variant: SemisupVariant,
    *,
    teacher: bool = True,
    spatial_dims: int = 2,
    lines: list[str] | None = None,
    private: DpSgdPlan | None = None,
    student: DualTaskUNet | None = None,
    **overrides: float | int | bool | str,
) -> tuple[DualTaskUNet, DualTaskUNet | None, SemisupResult]:
    student = student or tiny_dual(spatial_dims=spatial_dims)
    ema = copy.deepcopy(student) if teacher else None
    result = train_semisupervised(
        student,
        ema,
        data["labelled"],
        data["labels"],
        data["unlabelled"],
        settings(variant, **overrides),
        device=CPU,
        progress=(lines.append if lines is not None else lambda _: None),
        private=private,
    )
    return student, ema, result


@pytest.mark.parametrize(
    ("variant", "teacher", "num_examples", "certain"),
    [
        (SemisupVariant.SUPERVISED, False, 3 * 2, 0.0),
        (SemisupVariant.MEAN_TEACHER, True, 3 * 6, 1.0),
        (SemisupVariant.UGMCL, True, 3 * 6, None),
    ],
)
def test_train_semisupervised_variants(
    square_data: dict[str, torch.Tensor],
    variant: SemisupVariant,
    teacher: bool,
    num_examples: int,
    certain: float | None,
) -> None:
    # Prepare
    lines: list[str] = []

    # Execute
    student, _, result = run(square_data, variant, teacher=teacher, lines=lines)

    # Assert
    assert result.iterations == 3
    assert result.num_examples == num_examples
    assert result.device == "cpu"
    assert math.isfinite(result.supervised_loss)
    assert result.supervised_loss > 0
    assert math.isfinite(result.consistency_loss)
    assert (result.consistency_loss > 0) == (variant is not SemisupVariant.SUPERVISED)
    assert (result.cross_task_loss > 0) == (variant is SemisupVariant.UGMCL)
    if certain is None:
        assert 0.0 < result.certain_fraction <= 1.0
    else:
        assert result.certain_fraction == certain
    assert not student.training
    assert lines[0].startswith(f"[semisup] {variant.value}: 4 labelled")
    assert len(lines) == 4  # a header, then a line per step (10% of 3 steps < 1)


def test_train_semisupervised_ugmcl_in_3d() -> None:
    # Prepare
    labelled, labels = bright_boxes(2, (8, 16, 16), seed=0)
    unlabelled, _ = bright_boxes(2, (8, 16, 16), seed=1)
    data = {"labelled": labelled, "labels": labels, "unlabelled": unlabelled}

    # Execute
    _, _, result = run(
        data,
        SemisupVariant.UGMCL,
        spatial_dims=3,
        iterations=2,
        labelled_batch=1,
        unlabelled_batch=1,
        passes=2,
        sdf_weight=0.3,
        masked_cross=True,
    )

    # Assert
    assert result.num_examples == 2 * 2
    assert math.isfinite(result.supervised_loss)
    assert math.isfinite(result.cross_task_loss)


def test_train_semisupervised_without_unlabelled_images_uses_the_labelled(
    square_data: dict[str, torch.Tensor],
) -> None:
    # Prepare
    data = {**square_data, "unlabelled": torch.empty(0)}

    # Execute
    _, _, result = run(data, SemisupVariant.UGMCL)

    # Assert
    assert result.num_examples == 3 * 2
    assert result.consistency_loss > 0


def test_first_step_teacher_is_a_copy_of_the_student(
    square_data: dict[str, torch.Tensor],
) -> None:
    # Prepare
    student = tiny_dual(seed=0)
    teacher = tiny_dual(seed=1)

    # Execute: one step at global step 0.
    train_semisupervised(
        student,
        teacher,
        square_data["labelled"],
        square_data["labels"],
        square_data["unlabelled"],
        settings(SemisupVariant.UGMCL, iterations=1, passes=1),
        device=CPU,
        progress=lambda _: None,
    )

    # Assert
    assert all_close(teacher.state_dict(), student.state_dict())


def test_train_semisupervised_is_deterministic(
    square_data: dict[str, torch.Tensor],
) -> None:
    # Execute
    first, _, _ = run(square_data, SemisupVariant.UGMCL, iterations=2, passes=2)
    second, _, _ = run(square_data, SemisupVariant.UGMCL, iterations=2, passes=2)

    # Assert
    assert all_close(first.state_dict(), second.state_dict())


def test_longer_training_lowers_the_supervised_loss(
    square_data: dict[str, torch.Tensor],
) -> None:
    # Prepare
    def evaluate(model: DualTaskUNet) -> float:
        with torch.no_grad():
            logits, sdf = model.eval()(square_data["labelled"])
        return float(supervised_loss(logits, sdf, square_data["labels"])[0])

    before = evaluate(tiny_dual())

    # Execute
    student, _, result = run(
        square_data, SemisupVariant.UGMCL, iterations=30, passes=2, learning_rate=0.1
    )

    # Assert
    assert math.isfinite(result.supervised_loss)
    assert evaluate(student) < 0.5 * before


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            {
                "labelled": torch.zeros(0, 1, 16, 16),
                "labels": torch.zeros(0, 16, 16, dtype=torch.long),
            },
            "no labelled samples",
        ),
        (
            {"labels": torch.zeros(4, 16, 8, dtype=torch.long)},
            r"labels must have shape \(4, 16, 16\).*got \(4, 16, 8\)",
        ),
        ({"labels": torch.full((4, 16, 16), 2)}, r"label values must lie in \[0, 2\)"),
        ({"labels": torch.zeros(4, 16, 16)}, "labels must be integers"),
        (
            {"labelled": torch.zeros(4, 1, 4, 16, 16)},
            r"with 2 spatial dimensions for this 2-D model, got \(4, 1, 4, 16, 16\)",
        ),
        (
            {"unlabelled": torch.zeros(2, 1, 8, 8)},
            r"unlabelled_images must have shape \(M, 1, 16, 16\)",
        ),
        (
            {
                "labelled": torch.zeros(4, 1, 15, 16),
                "labels": torch.zeros(4, 15, 16, dtype=torch.long),
                "unlabelled": torch.empty(0),
            },
            r"divisible by the product of the U-Net strides \(2\)",
        ),
    ],
)
def test_train_semisupervised_rejects_bad_inputs(
    square_data: dict[str, torch.Tensor],
    change: dict[str, torch.Tensor],
    message: str,
) -> None:
    # Prepare
    data = {**square_data, **change}

    # Execute / Assert
    with pytest.raises(ValueError, match=message):
        run(data, SemisupVariant.UGMCL)


@pytest.mark.parametrize("variant", [SemisupVariant.MEAN_TEACHER, SemisupVariant.UGMCL])
def test_train_semisupervised_needs_a_teacher(
    square_data: dict[str, torch.Tensor], variant: SemisupVariant
) -> None:
    with pytest.raises(ValueError, match=f"variant '{variant.value}' needs a teacher"):
        run(square_data, variant, teacher=False)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"iterations": 0}, r"SemisupSettings.iterations must be >= 1, got 0"),
        ({"labelled_batch": 0}, r"SemisupSettings.labelled_batch must be >= 1"),
        ({"unlabelled_batch": -1}, r"SemisupSettings.unlabelled_batch must be >= 0"),
        ({"learning_rate": 0.0}, r"SemisupSettings.learning_rate must be > 0"),
        ({"ema_decay": 1.5}, r"SemisupSettings.ema_decay must be in \[0, 1\]"),
        ({"passes": 0}, r"SemisupSettings.passes must be >= 1"),
    ],
)
def test_semisup_settings_validation(
    overrides: dict[str, float | int], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        settings(SemisupVariant.UGMCL, **overrides)


def test_semisup_settings_accept_the_variant_as_a_string() -> None:
    assert settings("ugmcl").variant is SemisupVariant.UGMCL  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="'fixmatch' is not a valid SemisupVariant"):
        settings("fixmatch")  # type: ignore[arg-type]


# ------------------------------------------------------- DP-SGD (supervised part)


def dp_plan(**overrides: float | int | None) -> DpSgdPlan:
    values: dict[str, float | int | None] = {
        "noise_multiplier": 1.0,
        "sample_rate": 0.5,
        "steps": 3,
        "max_grad_norm": 1.0,
        "delta": 1e-5,
        "seed": 0,
    }
    values.update(overrides)
    return DpSgdPlan(**values)  # type: ignore[arg-type]


def has_opacus_leftovers(model: nn.Module) -> bool:
    return hasattr(model, "autograd_grad_sample_hooks") or any(
        hasattr(p, "grad_sample") for p in model.parameters()
    )


@pytest.mark.parametrize(
    ("variant", "teacher", "num_examples"),
    [
        # q N = 0.5 * 4 = 2 expected labelled draws a step, plus 4 unlabelled
        (SemisupVariant.SUPERVISED, False, 3 * 2),
        (SemisupVariant.MEAN_TEACHER, True, 3 * (2 + 4)),
        (SemisupVariant.UGMCL, True, 3 * (2 + 4)),
    ],
)
def test_private_training_runs_the_planned_steps(
    square_data: dict[str, torch.Tensor],
    variant: SemisupVariant,
    teacher: bool,
    num_examples: int,
) -> None:
    # Prepare
    lines: list[str] = []
    initial = tiny_dual().state_dict()

    # Execute
    student, _, result = run(
        square_data,
        variant,
        teacher=teacher,
        lines=lines,
        private=dp_plan(),
        sdf_weight=0.3,
    )

    # Assert
    assert result.iterations == 3
    assert result.num_examples == num_examples
    assert math.isfinite(result.supervised_loss)
    assert (result.consistency_loss > 0) == (variant is not SemisupVariant.SUPERVISED)
    assert (result.cross_task_loss > 0) == (variant is SemisupVariant.UGMCL)
    assert not all_close(student.state_dict(), initial)
    assert not student.training
    assert not has_opacus_leftovers(student)
    assert (
        "DP-SGD on the labelled part (noise 1.000, clip 1, sample rate 0.500)"
        in (lines[0])
    )


def test_labelled_slices_reach_the_student_only_through_the_clipped_gradient(
    square_data: dict[str, torch.Tensor],
) -> None:
    # Prepare: other labelled slices and labels, the same unlabelled images
    other_images, other_labels = bright_boxes(4, (16, 16), seed=7)
    other = {**square_data, "labelled": other_images, "labels": other_labels}
    initial = tiny_dual().state_dict()

    def train(
        data: Mapping[str, torch.Tensor], clip: float
    ) -> tuple[DualTaskUNet, DualTaskUNet | None]:
        student, teacher, _ = run(
            data,
            SemisupVariant.UGMCL,
            passes=2,
            learning_rate=0.1,
            private=dp_plan(max_grad_norm=clip),
        )
        return student, teacher

    # Execute: a clipping norm of 1e-9 leaves the labelled slices (almost) no way in
    closed = [train(data, 1e-9) for data in (square_data, other)]
    open_ = [train(data, 1.0) for data in (square_data, other)]

    # Assert: with the private gradient shut, the labels make no difference to the
    # student or the teacher, though the (unlabelled) consistency moved them
    for first, second in zip(*closed, strict=True):
        assert first is not None
        assert second is not None
        for name, value in first.state_dict().items():
            torch.testing.assert_close(
                value, second.state_dict()[name], atol=1e-6, rtol=0
            )
    assert not all_close(closed[0][0].state_dict(), initial)
    difference = max(
        float((value - open_[1][0].state_dict()[name]).abs().max())
        for name, value in open_[0][0].state_dict().items()
    )
    assert difference > 1e-4


def test_private_training_without_unlabelled_images_has_no_consistency(
    square_data: dict[str, torch.Tensor],
) -> None:
    # Prepare
    data = {**square_data, "unlabelled": torch.empty(0)}

    # Execute
    _, _, result = run(data, SemisupVariant.UGMCL, private=dp_plan())

    # Assert: the non-DP loop would take the consistency over the labelled slices
    assert result.num_examples == 3 * 2
    assert (result.consistency_loss, result.cross_task_loss) == (0.0, 0.0)
    assert result.certain_fraction == 0.0


def test_private_training_is_reproducible_with_a_fixed_seed(
    square_data: dict[str, torch.Tensor],
) -> None:
    # Execute
    first, _, _ = run(square_data, SemisupVariant.UGMCL, passes=2, private=dp_plan())
    again, _, _ = run(square_data, SemisupVariant.UGMCL, passes=2, private=dp_plan())
    other, _, _ = run(
        square_data, SemisupVariant.UGMCL, passes=2, private=dp_plan(seed=1)
    )

    # Assert
    assert all_close(first.state_dict(), again.state_dict())
    assert not all_close(first.state_dict(), other.state_dict())


def test_a_dp_plan_for_other_steps_is_refused(
    square_data: dict[str, torch.Tensor],
) -> None:
    with pytest.raises(
        ValueError,
        match=r"the DP-SGD plan is for 5 steps but the call takes "
        r"settings\.iterations = 3",
    ):
        run(square_data, SemisupVariant.UGMCL, private=dp_plan(steps=5))


def test_a_batch_norm_student_is_refused_under_dp(
    square_data: dict[str, torch.Tensor],
) -> None:
    # Prepare
    student = tiny_dual(**{"model.norm": "batch"})

    # Execute / Assert
    with pytest.raises(ValueError, match=r"model is not DP-compatible: .*BatchNorm"):
        run(square_data, SemisupVariant.UGMCL, private=dp_plan(), student=student)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_private_ugmcl_on_cuda_runs_without_amp() -> None:
    # Prepare
    labelled, labels = bright_boxes(4, (32, 32), seed=0)
    unlabelled, _ = bright_boxes(4, (32, 32), seed=1)
    student = tiny_dual()
    teacher = copy.deepcopy(student)
    lines: list[str] = []

    # Execute
    result = train_semisupervised(
        student,
        teacher,
        labelled,
        labels,
        unlabelled,
        settings(SemisupVariant.UGMCL, iterations=4, sdf_weight=0.3, amp=True),
        device=torch.device("cuda"),
        progress=lines.append,
        private=dp_plan(steps=4),
    )

    # Assert
    assert result.device.startswith("cuda")
    assert "AMP" not in lines[0]
    assert math.isfinite(result.supervised_loss)
    assert math.isfinite(result.consistency_loss)
    assert all(p.device.type == "cuda" for p in student.parameters())
    assert not has_opacus_leftovers(student)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_train_ugmcl_3d_on_cuda_with_amp() -> None:
    # Prepare
    labelled, labels = bright_boxes(2, (16, 32, 32), seed=0)
    unlabelled, _ = bright_boxes(4, (16, 32, 32), seed=1)
    student = tiny_dual(spatial_dims=3)
    teacher = copy.deepcopy(student)

    # Execute
    result = train_semisupervised(
        student,
        teacher,
        labelled,
        labels,
        unlabelled,
        settings(SemisupVariant.UGMCL, iterations=4, sdf_weight=0.3, amp=True),
        device=torch.device("cuda"),
        progress=lambda _: None,
    )

    # Assert
    assert result.device.startswith("cuda")
    assert result.num_examples == 4 * 6
    assert math.isfinite(result.supervised_loss)
    assert math.isfinite(result.consistency_loss)
    assert all(p.device.type == "cuda" for p in teacher.parameters())


# ------------------------------------------- equal clipping and the paper's options


@pytest.mark.parametrize(
    ("variant", "teacher"),
    [
        (SemisupVariant.SUPERVISED, False),
        (SemisupVariant.MEAN_TEACHER, True),
        (SemisupVariant.UGMCL, True),
    ],
)
def test_every_variant_is_clipped_by_the_same_rule_and_reports_it(
    square_data: dict[str, torch.Tensor], variant: SemisupVariant, teacher: bool
) -> None:
    # Execute: a bound no gradient stays under, then no clipping at all.
    _, _, tight = run(square_data, variant, teacher=teacher, max_grad_norm=1e-9)
    _, _, loose = run(square_data, variant, teacher=teacher, max_grad_norm=1e9)
    _, _, off = run(square_data, variant, teacher=teacher, max_grad_norm=0.0)

    # Assert
    assert tight.clipped_fraction == 1.0
    assert loose.clipped_fraction == 0.0
    assert off.clipped_fraction == 0.0


def test_the_clip_fraction_is_in_the_progress_lines(
    square_data: dict[str, torch.Tensor],
) -> None:
    # Prepare
    lines: list[str] = []

    # Execute
    run(square_data, SemisupVariant.UGMCL, lines=lines, max_grad_norm=1e-9)

    # Assert
    assert "clipped 1.00 (" in lines[-1]


def test_teacher_targets_add_the_target_pass_distances() -> None:
    # Prepare
    teacher, images = tiny_dual(), torch.rand(2, 1, 16, 16)

    # Execute: the same noise and dropout draws for both
    torch.manual_seed(0)
    target, sdf, entropy = teacher_targets(
        teacher, images, passes=2, generator=torch.Generator().manual_seed(0)
    )
    torch.manual_seed(0)
    same, same_entropy = teacher_predictions(
        teacher, images, passes=2, generator=torch.Generator().manual_seed(0)
    )

    # Assert: teacher_predictions' values, plus a (B, C, ...) SDF in [-1, 1]
    assert torch.equal(target, same)
    assert torch.equal(entropy, same_entropy)
    assert sdf.shape == target.shape == (2, 2, 16, 16)
    assert float(sdf.abs().max()) <= 1.0


def test_distance_consistency_adds_the_distance_branchs_intra_term(
    square_data: dict[str, torch.Tensor],
) -> None:
    # Prepare: a teacher that differs from the student, so both terms are > 0.
    def first_intra(distance: bool) -> float:
        _, _, result = run(
            square_data,
            SemisupVariant.UGMCL,
            student=tiny_dual(seed=0),
            distance_consistency=distance,
            iterations=1,
            passes=2,
            consistency=1.0,
        )
        return result.consistency_loss

    # Execute
    without, with_distance = first_intra(False), first_intra(True)

    # Assert: the same draws, plus a non-negative distance term
    assert with_distance > without > 0


def test_distance_consistency_is_the_masked_intra_form_on_the_distances() -> None:
    # Prepare
    student = torch.zeros(1, 2, 2, 2)
    teacher = torch.ones(1, 2, 2, 2)
    mask = torch.tensor([[[[1.0, 0.0], [0.0, 0.0]]]])

    # Execute
    value = intra_consistency(student, teacher, mask)

    # Assert: 0.5 * (1 + 1) / (2 * 1), only the certain voxel counts
    assert float(value) == pytest.approx(0.5)


def test_semisup_settings_carry_the_distance_consistency_option() -> None:
    # Execute
    config = tiny_config(**{"semisup.distance-consistency": True})

    # Assert
    assert semisup_settings(config, iterations=1).distance_consistency
    assert not semisup_settings(tiny_config(), iterations=1).distance_consistency


# ------------------------------------------------------ global teacher and FedBN


def test_a_global_teacher_restarts_from_the_student_every_round() -> None:
    # Prepare
    student = get_weights(tiny_dual(seed=0))
    kept = get_weights(tiny_dual(seed=1))

    # Execute
    _, local = round_start(tiny_config(), student, teacher_weights=kept, own_norm=None)
    _, global_ = round_start(
        tiny_config(**{"semisup.teacher": "global"}),
        student,
        teacher_weights=kept,
        own_norm=None,
    )

    # Assert
    assert local is kept
    assert global_ is None  # the job then starts the teacher from the student


def test_norm_state_names_are_the_norm_layers_affine_parameters() -> None:
    # Execute
    names = norm_state_names(tiny_dual())

    # Assert: instance norm with affine weights and biases, nothing else
    assert names
    assert all(name.endswith((".weight", ".bias")) for name in names)
    assert all(".adn.N." in name for name in names)


def test_local_norm_keeps_the_sites_own_norm_parameters() -> None:
    # Prepare
    config = tiny_config(**{"semisup.local-norm": True})
    sent = get_weights(tiny_dual(seed=0))
    names = norm_state_names(tiny_dual())
    own = {name: sent[name] + 1.0 for name in names}

    # Execute
    first, _ = round_start(config, sent, teacher_weights=None, own_norm=None)
    later, _ = round_start(config, sent, teacher_weights=None, own_norm=own)
    off, _ = round_start(tiny_config(), sent, teacher_weights=None, own_norm=own)

    # Assert: the site's norm entries replace the global model's; nothing else moves
    assert all(np.array_equal(first[name], sent[name]) for name in sent)
    assert all(
        np.array_equal(later[name], own[name] if name in names else sent[name])
        for name in sent
    )
    assert all(np.array_equal(off[name], sent[name]) for name in sent)


def test_keep_local_norm_refuses_own_weights_without_the_norm_entries() -> None:
    with pytest.raises(ValueError, match="norm weights lack"):
        keep_local_norm({"a": 1, "n": 2}, {"a": 3}, frozenset({"n"}))


def test_a_round_reports_its_own_norm_only_with_local_norm() -> None:
    # Prepare
    config = tiny_config(**{"semisup.local-norm": True})
    weights = get_weights(tiny_dual())
    result = SemisupResult(
        num_examples=1,
        iterations=1,
        supervised_loss=0.0,
        consistency_loss=0.0,
        cross_task_loss=0.0,
        certain_fraction=0.0,
        seconds=0.0,
        device="cpu",
    )
    outcome = SemisupRound(
        student=weights,
        teacher=weights,
        num_labelled=1,
        num_unlabelled=0,
        result=result,
    )

    # Execute
    own = outcome.own_norm(config)

    # Assert
    assert own is not None
    assert set(own) == norm_state_names(tiny_dual())
    assert outcome.own_norm(tiny_config()) is None


def test_clipping_by_parts_bounds_each_part_on_its_own(
    square_data: dict[str, torch.Tensor],
) -> None:
    # Prepare: a UG-MCL supervised gradient in two students
    def with_gradient() -> DualTaskUNet:
        model = tiny_dual()
        logits, sdf = model(square_data["labelled"])
        loss, _ = supervised_loss(logits, sdf, square_data["labels"], sdf_weight=0.3)
        loss.backward()  # type: ignore[no-untyped-call]
        return model

    student, parts = with_gradient(), with_gradient()

    def norm(module: nn.Module) -> float:
        grads = [p.grad.norm() for p in module.parameters() if p.grad is not None]
        return float(torch.stack(grads).norm())

    # Execute
    model_bound = _clip_gradients(student, 0.01, ClipScope.MODEL)
    parts_bound = _clip_gradients(parts, 0.01, ClipScope.PARTS)

    # Assert: one norm over both parts, or each part at the bound
    assert model_bound
    assert parts_bound
    assert norm(student) == pytest.approx(0.01, rel=1e-4)
    assert norm(parts.segmentation) == pytest.approx(0.01, rel=1e-4)
    assert parts.distance_head is not None
    assert norm(parts.distance_head) == pytest.approx(0.01, rel=1e-4)


def test_clipping_by_parts_is_the_model_rule_for_a_baseline(
    square_data: dict[str, torch.Tensor],
) -> None:
    # Execute
    model, _, first = run(square_data, SemisupVariant.MEAN_TEACHER, max_grad_norm=0.01)
    parts, _, second = run(
        square_data,
        SemisupVariant.MEAN_TEACHER,
        max_grad_norm=0.01,
        clip_scope="parts",
    )

    # Assert: the distance head has no gradient, so the same steps
    assert all_close(model.state_dict(), parts.state_dict())
    assert first.clipped_fraction == second.clipped_fraction == 1.0


def test_the_clip_scope_reaches_the_settings() -> None:
    config = tiny_config(**{"semisup.clip-scope": "parts"})
    assert semisup_settings(config, iterations=1).clip_scope is ClipScope.PARTS
