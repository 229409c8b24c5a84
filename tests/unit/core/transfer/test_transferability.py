from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from torch import nn

from core.config import (
    Attention,
    SelectionRule,
    TransferConfig,
    TransferMetric,
    load_default_config,
)
from core.training.networks import build_model
from core.training.trainer import predict_probabilities
from core.transfer.transferability import (
    SourceSelection,
    build_keep_mask,
    build_pseudo_labels,
    compute_dtm,
    dilate,
    entropy_score_per_case,
    foreground_dice_per_case,
    gaussian_smooth,
    gradcam_attention,
    mask_images,
    prediction_agreement,
    score_candidate,
    select_sources,
)

CPU = torch.device("cpu")
SIZE = 32
# pyproject defaults: sigma 1.0 px, threshold 0.5, dilation 10% of the side.
TRANSFER = load_default_config(**{"data.image-size": SIZE}).transfer
BLOB = (slice(12, 20), slice(12, 20))  # an 8x8 square in a 32x32 slice


def transfer_with(**changes: object) -> TransferConfig:
    return dataclasses.replace(TRANSFER, **changes)  # type: ignore[arg-type]


def blob_images(
    num_slices: int, *, inside: float, outside: float, size: int = SIZE
) -> torch.Tensor:
    images = torch.full((num_slices, 1, size, size), outside)
    images[:, 0, BLOB[0], BLOB[1]] = inside
    return images


class IntensityModel(nn.Module):
    """Foreground wherever the pixel is bright: logits (0.5, 20 x), pixel by pixel."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pixels = x[:, 0]
        return torch.stack([torch.full_like(pixels, 0.5), 20 * pixels], 1)


class SilentModel(nn.Module):
    """Never predicts foreground."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pixels = x[:, 0]
        return torch.stack([torch.ones_like(pixels), torch.zeros_like(pixels)], 1)


class ContextModel(nn.Module):
    """Segments bright pixels only while the whole image is bright (mean > 0.4).

    Its prediction on the blob depends on context outside the blob, which masking
    removes.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pixels = x[:, 0]
        context = pixels.mean(dim=(-2, -1), keepdim=True) > 0.4
        foreground = torch.where(
            context, 20 * (pixels - 0.75), torch.full_like(pixels, -20.0)
        )
        return torch.stack([torch.zeros_like(pixels), foreground], 1)


class LinearLogitModel(nn.Module):
    """Logits (0, x): softmax foreground probability sigmoid(x)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pixels = x[:, 0]
        return torch.stack([torch.zeros_like(pixels), pixels], 1)


# --- gaussian_smooth -----------------------------------------------------------------


@pytest.mark.parametrize("sigma", [0.5, 1.0, 2.5])
def test_gaussian_smooth_keeps_constant_map_constant(sigma: float) -> None:
    # Prepare
    maps = torch.full((2, 20, 24), 0.7)

    # Execute
    smoothed = gaussian_smooth(maps, sigma)

    # Assert
    assert smoothed.shape == maps.shape
    torch.testing.assert_close(smoothed, maps, atol=1e-6, rtol=0)


@pytest.mark.parametrize("sigma", [0.5, 1.0, 2.0])
def test_gaussian_smooth_preserves_mass_of_interior_impulse(sigma: float) -> None:
    # Prepare
    maps = torch.zeros(1, 32, 32)
    maps[0, 16, 16] = 1.0

    # Execute
    smoothed = gaussian_smooth(maps, sigma)

    # Assert
    assert float(smoothed.sum()) == pytest.approx(1.0, abs=1e-5)
    assert float(smoothed[0, 16, 16]) == pytest.approx(float(smoothed.max()))
    assert float(smoothed[0, 16, 16]) < 1.0
    torch.testing.assert_close(smoothed, smoothed.flip(-1).roll(1, -1))
    torch.testing.assert_close(smoothed, smoothed.transpose(-1, -2))


def test_gaussian_smooth_with_sigma_zero_copies() -> None:
    # Prepare
    maps = torch.arange(12.0).reshape(1, 3, 4)

    # Execute
    smoothed = gaussian_smooth(maps, 0.0)

    # Assert
    torch.testing.assert_close(smoothed, maps)
    assert smoothed.data_ptr() != maps.data_ptr()


# --- dilate --------------------------------------------------------------------------


@pytest.mark.parametrize("radius", [0, 1, 2, 3])
def test_dilate_grows_single_pixel_to_square(radius: int) -> None:
    # Prepare
    mask = torch.zeros(1, 15, 15, dtype=torch.bool)
    mask[0, 7, 5] = True
    expected = torch.zeros_like(mask)
    expected[0, 7 - radius : 8 + radius, 5 - radius : 6 + radius] = True

    # Execute
    grown = dilate(mask, radius)

    # Assert
    assert grown.dtype == torch.bool
    assert torch.equal(grown, expected)
    assert int(grown.sum()) == (2 * radius + 1) ** 2


# --- build_keep_mask -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("dilation_fraction", "radius"),
    [(0.0, 0), (0.1, 3), (0.2, 6)],  # round(fraction * 32)
)
def test_keep_mask_without_smoothing_is_blob_dilated_by_fraction_of_side(
    dilation_fraction: float, radius: int
) -> None:
    # Prepare
    attention = blob_images(1, inside=0.95, outside=0.05)[:, 0]
    transfer = transfer_with(
        smoothing_sigma_px=0.0, dilation_fraction=dilation_fraction
    )
    expected = torch.zeros(1, SIZE, SIZE, dtype=torch.bool)
    expected[0, 12 - radius : 20 + radius, 12 - radius : 20 + radius] = True

    # Execute
    keep = build_keep_mask(attention, transfer=transfer)

    # Assert
    assert torch.equal(keep, expected)


def test_keep_mask_with_default_smoothing_keeps_and_dilates_confident_blob() -> None:
    # Prepare
    attention = blob_images(1, inside=1.0, outside=0.0)[:, 0]
    radius = round(TRANSFER.dilation_fraction * SIZE)

    # Execute
    keep = build_keep_mask(attention, transfer=TRANSFER)

    # Assert
    assert radius == 3
    assert bool(keep[0, BLOB[0], BLOB[1]].all())
    rows = torch.nonzero(keep[0].any(1)).flatten()
    cols = torch.nonzero(keep[0].any(0)).flatten()
    assert (int(rows.min()), int(rows.max())) == (12 - radius, 19 + radius)
    assert (int(cols.min()), int(cols.max())) == (12 - radius, 19 + radius)
    # Whole edges of the dilated square are kept (only smoothed-away corners may not).
    assert bool(keep[0, 12 - radius, 12:20].all())
    assert bool(keep[0, 12:20, 19 + radius].all())


def test_keep_mask_drops_isolated_specks_after_smoothing() -> None:
    # Prepare: confident single pixels, far apart, 0.9 each.
    attention = torch.zeros(2, SIZE, SIZE)
    attention[:, 4::8, 4::8] = 0.9

    # Execute
    keep = build_keep_mask(attention, transfer=TRANSFER)
    unsmoothed = build_keep_mask(
        attention, transfer=transfer_with(smoothing_sigma_px=0)
    )

    # Assert
    assert not bool(keep.any())
    assert bool(unsmoothed.any())


@pytest.mark.parametrize(
    ("value", "threshold", "kept"),
    [(0.6, 0.5, True), (0.6, 0.7, False), (0.45, 0.5, False), (0.3, 0.25, True)],
)
def test_keep_mask_thresholds_the_smoothed_attention(
    value: float, threshold: float, kept: bool
) -> None:
    # Prepare
    attention = torch.full((1, 16, 16), value)

    # Execute
    keep = build_keep_mask(attention, transfer=transfer_with(threshold=threshold))

    # Assert
    assert bool(keep.all()) is kept
    assert bool(keep.any()) is kept


# --- mask_images ---------------------------------------------------------------------


def test_mask_images_zeroes_outside_keep_and_keeps_inside() -> None:
    # Prepare
    images = torch.arange(1.0, 33.0).reshape(2, 1, 4, 4)
    keep = torch.zeros(2, 4, 4, dtype=torch.bool)
    keep[0, 1:3, 1:3] = True
    keep[1, :, 0] = True

    # Execute
    masked = mask_images(images, keep)

    # Assert
    assert masked.shape == images.shape
    torch.testing.assert_close(masked[:, 0][keep], images[:, 0][keep])
    assert bool((masked[:, 0][~keep] == 0).all())


# --- foreground_dice_per_case --------------------------------------------------------


def label_map(*pixels: tuple[int, int], value: int = 1) -> torch.Tensor:
    labels = torch.zeros(1, 4, 4, dtype=torch.long)
    for row, col in pixels:
        labels[0, row, col] = value
    return labels


@pytest.mark.parametrize(
    ("first", "second", "expected"),
    [
        (label_map((0, 0), (1, 1)), label_map((0, 0), (1, 1)), 1.0),  # identical
        (label_map((0, 0), (1, 1)), label_map((2, 2), (3, 3)), 0.0),  # disjoint
        (  # overlap 2 of sizes 4 and 2: 2 * 2 / 6
            label_map((0, 0), (0, 1), (0, 2), (0, 3)),
            label_map((0, 0), (0, 1)),
            2 / 3,
        ),
        (label_map((0, 0)), label_map((0, 0), (0, 1), (1, 1)), 0.5),
        (label_map((0, 0), value=2), label_map((0, 0), value=1), 1.0),  # fg = class>0
        (label_map(), label_map((0, 0)), 0.0),  # empty first: degenerate
        (label_map(), label_map(), 0.0),  # both empty: still 0, not 1
        (label_map((1, 2)), label_map(), 0.0),
    ],
)
def test_foreground_dice_per_case_single_slice(
    first: torch.Tensor, second: torch.Tensor, expected: float
) -> None:
    # Execute
    dice = foreground_dice_per_case(
        first, second, case_of_slice=torch.tensor([0]), num_cases=1
    )

    # Assert
    assert dice.shape == (1,)
    assert float(dice[0]) == pytest.approx(expected)


def test_foreground_dice_per_case_aggregates_slices_of_each_case() -> None:
    # Prepare: case 0 = slices 0 and 2; case 1 = slice 1; case 2 = slice 3 (empty).
    first = torch.cat(
        [
            label_map((0, 0), (0, 1)),
            label_map((3, 3)),
            label_map((1, 0), (1, 1)),
            label_map(),
        ]
    )
    second = torch.cat(
        [
            label_map((0, 0), (0, 1)),
            label_map((3, 3)),
            label_map(),
            label_map((2, 2)),
        ]
    )
    case_of_slice = torch.tensor([0, 1, 0, 2])

    # Execute
    dice = foreground_dice_per_case(
        first, second, case_of_slice=case_of_slice, num_cases=3
    )

    # Assert: case 0 pools its slices (overlap 2, sizes 4 and 2), not a slice mean.
    torch.testing.assert_close(dice, torch.tensor([2 * 2 / 6, 1.0, 0.0]))


# --- entropy_score_per_case ----------------------------------------------------------


@pytest.mark.parametrize("num_classes", [2, 3, 4])
def test_entropy_score_is_one_for_one_hot_and_zero_for_uniform(
    num_classes: int,
) -> None:
    # Prepare
    labels = torch.arange(2 * 5 * 5).reshape(2, 5, 5) % num_classes
    one_hot = torch.nn.functional.one_hot(labels, num_classes).permute(0, 3, 1, 2)
    uniform = torch.full((2, num_classes, 5, 5), 1.0 / num_classes)
    probabilities = torch.cat([one_hot.float(), uniform])

    # Execute
    scores = entropy_score_per_case(
        probabilities, case_of_slice=torch.tensor([0, 0, 1, 1]), num_cases=2
    )

    # Assert
    torch.testing.assert_close(scores, torch.tensor([1.0, 0.0]), atol=1e-6, rtol=0)


def test_entropy_score_averages_slices_of_a_case() -> None:
    # Prepare: a confident slice and a uniform slice in the same case.
    probabilities = torch.zeros(2, 2, 3, 3)
    probabilities[0, 1] = 1.0
    probabilities[1] = 0.5

    # Execute
    scores = entropy_score_per_case(
        probabilities, case_of_slice=torch.tensor([0, 0]), num_cases=1
    )

    # Assert
    assert float(scores[0]) == pytest.approx(0.5)


# --- score_candidate -----------------------------------------------------------------


def test_lftm_is_one_when_masking_leaves_prediction_unchanged() -> None:
    # Prepare: a bright blob on a dark (z-scored) background.
    images = blob_images(2, inside=1.0, outside=-1.0)

    # Execute
    scores = score_candidate(
        IntensityModel(),
        images,
        case_of_slice=torch.tensor([0, 1]),
        num_cases=2,
        transfer=TRANSFER,
        device=CPU,
    )

    # Assert
    torch.testing.assert_close(scores.per_case, torch.tensor([1.0, 1.0]))
    assert scores.probabilities.shape == (2, 2, SIZE, SIZE)
    torch.testing.assert_close(
        scores.probabilities,
        predict_probabilities(IntensityModel(), images, device=CPU),
    )


def test_lftm_is_zero_for_a_model_predicting_nothing() -> None:
    # Prepare
    images = blob_images(2, inside=1.0, outside=-1.0)

    # Execute
    scores = score_candidate(
        SilentModel(),
        images,
        case_of_slice=torch.tensor([0, 0]),
        num_cases=1,
        transfer=TRANSFER,
        device=CPU,
    )

    # Assert
    torch.testing.assert_close(scores.per_case, torch.tensor([0.0]))


def test_lftm_drops_for_a_model_relying_on_context_outside_the_blob() -> None:
    # Prepare: blob 1.0 on 0.5 tissue, image mean 0.53; masking drops it to ~0.12.
    images = blob_images(1, inside=1.0, outside=0.5)
    original = predict_probabilities(ContextModel(), images, device=CPU).argmax(1)

    # Execute
    scores = score_candidate(
        ContextModel(),
        images,
        case_of_slice=torch.tensor([0]),
        num_cases=1,
        transfer=TRANSFER,
        device=CPU,
    )

    # Assert
    assert int(original[0, BLOB[0], BLOB[1]].min()) == 1  # it does segment the blob
    assert float(scores.per_case[0]) < 1.0
    assert float(scores.per_case[0]) == pytest.approx(0.0)


def test_lftm_counts_a_slice_with_no_kept_region_as_empty() -> None:
    # Prepare: one bright pixel is predicted, but smoothing removes it from the mask.
    images = torch.full((1, 1, SIZE, SIZE), -1.0)
    images[0, 0, 16, 16] = 1.0

    # Execute
    scores = score_candidate(
        IntensityModel(),
        images,
        case_of_slice=torch.tensor([0]),
        num_cases=1,
        transfer=TRANSFER,
        device=CPU,
    )

    # Assert
    assert int(scores.probabilities.argmax(1).sum()) == 1
    torch.testing.assert_close(scores.per_case, torch.tensor([0.0]))


def test_lftm_pools_slices_per_case() -> None:
    # Prepare: case 0 = a stable blob slice and a blank slice; case 1 = blank only.
    images = blob_images(3, inside=1.0, outside=-1.0)
    images[1:] = -1.0

    # Execute
    scores = score_candidate(
        IntensityModel(),
        images,
        case_of_slice=torch.tensor([0, 0, 1]),
        num_cases=2,
        transfer=TRANSFER,
        device=CPU,
    )

    # Assert
    torch.testing.assert_close(scores.per_case, torch.tensor([1.0, 0.0]))


def test_entropy_metric_scores_one_minus_normalised_entropy() -> None:
    # Prepare: logits (0, x); x = 0 is maximally uncertain, x = 40 is certain.
    images = torch.zeros(3, 1, 4, 4)
    images[1] = 40.0
    images[2, 0, :2] = 40.0  # half certain, half uncertain
    transfer = dataclasses.replace(TRANSFER, metric=TransferMetric.ENTROPY)

    # Execute
    scores = score_candidate(
        LinearLogitModel(),
        images,
        case_of_slice=torch.tensor([0, 1, 2]),
        num_cases=3,
        transfer=transfer,
        device=CPU,
    )

    # Assert
    torch.testing.assert_close(
        scores.per_case, torch.tensor([0.0, 1.0, 0.5]), atol=1e-5, rtol=0
    )


def test_entropy_metric_matches_formula_on_intermediate_confidence() -> None:
    # Prepare
    images = torch.full((1, 1, 2, 2), 1.0)
    transfer = dataclasses.replace(TRANSFER, metric=TransferMetric.ENTROPY)
    p = 1 / (1 + math.exp(-1.0))
    entropy = -(p * math.log(p) + (1 - p) * math.log(1 - p)) / math.log(2)

    # Execute
    scores = score_candidate(
        LinearLogitModel(),
        images,
        case_of_slice=torch.tensor([0]),
        num_cases=1,
        transfer=transfer,
        device=CPU,
    )

    # Assert
    assert float(scores.per_case[0]) == pytest.approx(1 - entropy, abs=1e-6)


# --- DTM and source selection --------------------------------------------------------


def test_compute_dtm_is_column_means() -> None:
    # Prepare
    itm = torch.tensor([[1.0, 0.5, 0.0], [0.0, 0.5, 0.3], [0.5, 0.2, 0.0]])

    # Execute
    dtm = compute_dtm(itm)

    # Assert
    torch.testing.assert_close(dtm, torch.tensor([0.5, 0.4, 0.1]))


@pytest.mark.parametrize(
    ("dtm", "expected"),
    [
        ({"A": 0.25, "B": 0.75, "C": 0.25}, ("B", "A", 0.75, 0.25)),
        ({"A": 0.2, "B": 0.6, "C": 0.4}, ("B", "C", 0.6, 0.4)),
        ({"C": 0.9, "B": 0.1, "A": 0.3}, ("C", "A", 0.75, 0.25)),
        ({"B": 0.5, "A": 0.5, "C": 0.1}, ("A", "B", 0.5, 0.5)),  # tie: name order
        ({"B": 0.4, "C": 0.2, "A": 0.2}, ("B", "A", 2 / 3, 1 / 3)),  # tie for aux
        ({"A": 0.4, "B": 0.0}, ("A", "B", 1.0, 0.0)),
        ({"B": 0.0, "A": 0.0}, ("A", "B", 0.5, 0.5)),  # all zero: equal weights
        ({"C": 0.3}, ("C", None, 1.0, 0.0)),  # single source
        ({"C": 0.0}, ("C", None, 1.0, 0.0)),
    ],
)
def test_select_sources(
    dtm: dict[str, float], expected: tuple[str, str | None, float, float]
) -> None:
    # Execute
    selection = select_sources(dtm)

    # Assert
    main, aux, weight_main, weight_aux = expected
    assert (selection.main, selection.aux) == (main, aux)
    assert selection.weight_main == pytest.approx(weight_main)
    assert selection.weight_aux == pytest.approx(weight_aux)
    assert selection.weight_main + selection.weight_aux == pytest.approx(1.0)


def test_select_sources_rejects_no_candidates() -> None:
    # Execute / Assert
    with pytest.raises(ValueError, match="no candidate sources"):
        select_sources({})


@pytest.mark.parametrize(
    ("selection", "pairs"),
    [
        (
            SourceSelection(main="B", aux="A", weight_main=0.75, weight_aux=0.25),
            (("B", 0.75), ("A", 0.25)),
        ),
        (
            SourceSelection(main="C", aux=None, weight_main=1.0, weight_aux=0.0),
            (("C", 1.0),),
        ),
    ],
)
def test_source_selection_as_pairs(
    selection: SourceSelection, pairs: tuple[tuple[str, float], ...]
) -> None:
    # Execute / Assert
    assert selection.as_pairs() == pairs


# --- build_pseudo_labels -------------------------------------------------------------


def two_sources() -> list[torch.Tensor]:
    """Two sources' softmax maps on 2 slices of 1x2 pixels (C = 2)."""
    foreground_0 = torch.tensor([[[0.9, 0.3]], [[0.6, 0.1]]])
    foreground_1 = torch.tensor([[[0.2, 0.8]], [[0.4, 0.7]]])
    return [
        torch.stack([1 - foreground_0, foreground_0], 1),
        torch.stack([1 - foreground_1, foreground_1], 1),
    ]


@pytest.mark.parametrize(
    ("rows", "mix"),
    [
        ([[1.0, 0.0]], (1.0, 0.0)),
        ([[0.0, 1.0]], (0.0, 1.0)),
        ([[0.5, 0.5]], (0.5, 0.5)),
        ([[0.0, 0.0]], (0.5, 0.5)),  # all-zero row: uniform weights
        ([[2.0, 2.0]], (0.5, 0.5)),  # rows are normalised
        ([[0.3, 0.1]], (0.75, 0.25)),
    ],
)
def test_pseudo_labels_mix_sources_by_normalised_itm_row(
    rows: list[list[float]], mix: tuple[float, float]
) -> None:
    # Prepare
    probabilities = two_sources()
    expected = mix[0] * probabilities[0] + mix[1] * probabilities[1]

    # Execute
    soft = build_pseudo_labels(
        probabilities, torch.tensor(rows), case_of_slice=torch.tensor([0, 0])
    )

    # Assert
    assert soft.shape == (2, 2, 1, 2)
    torch.testing.assert_close(soft, expected)
    torch.testing.assert_close(soft.sum(1), torch.ones(2, 1, 2))


def test_pseudo_labels_use_each_slice_case_row() -> None:
    # Prepare: case 0 trusts source 0, case 1 trusts source 1.
    probabilities = two_sources()
    itm = torch.tensor([[1.0, 0.0], [0.0, 3.0]])

    # Execute
    soft = build_pseudo_labels(probabilities, itm, case_of_slice=torch.tensor([0, 1]))

    # Assert
    torch.testing.assert_close(soft[0], probabilities[0][0])
    torch.testing.assert_close(soft[1], probabilities[1][1])


def test_pseudo_label_weighting_flips_the_hard_decision() -> None:
    # Prepare: pixel 0 has fg 0.9 (source 0) vs 0.2 (source 1): the plain mean 0.55
    # says foreground; trusting source 1 four times more gives 0.34, background.
    probabilities = [p[:1] for p in two_sources()]
    uniform = torch.tensor([[1.0, 1.0]])
    weighted = torch.tensor([[0.2, 0.8]])

    # Execute
    hard_uniform = build_pseudo_labels(
        probabilities, uniform, case_of_slice=torch.tensor([0])
    ).argmax(1)
    hard_weighted = build_pseudo_labels(
        probabilities, weighted, case_of_slice=torch.tensor([0])
    ).argmax(1)

    # Assert: pixel 1 (0.3 vs 0.8) is foreground either way (0.55 and 0.70).
    assert hard_uniform.tolist() == [[[1, 1]]]
    assert hard_weighted.tolist() == [[[0, 1]]]


@pytest.mark.parametrize("columns", [1, 3])
def test_pseudo_labels_reject_column_count_mismatch(columns: int) -> None:
    # Prepare
    itm = torch.ones(1, columns)

    # Execute / Assert
    with pytest.raises(ValueError, match=f"ITM has {columns} columns for 2 sources"):
        build_pseudo_labels(two_sources(), itm, case_of_slice=torch.tensor([0, 0]))


# --- Grad-CAM ------------------------------------------------------------------------


def tiny_unet() -> nn.Module:
    config = load_default_config(
        **{"data.image-size": 16, "model.channels": "4,8", "model.strides": "2"}
    )
    torch.manual_seed(0)
    return build_model(config.model, data=config.data)


def test_gradcam_attention_maps_lie_in_unit_interval() -> None:
    # Prepare
    model = tiny_unet()
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(3, 1, 16, 16, generator=generator)
    images[:, :, 4:12, 4:12] += 3.0

    # Execute
    maps = gradcam_attention(model, images, device=CPU, batch_size=2)

    # Assert
    assert maps.shape == (3, 16, 16)
    assert bool(torch.isfinite(maps).all())
    assert float(maps.min()) >= 0.0
    assert float(maps.max()) <= 1.0
    assert not images.requires_grad
    assert all(parameter.grad is None for parameter in model.parameters())


def test_gradcam_attention_peaks_at_one_where_foreground_is_predicted() -> None:
    # Prepare: bias the final layer towards foreground so every slice has some.
    model = tiny_unet()
    last_conv = [m for m in model.modules() if isinstance(m, nn.Conv2d)][-1]
    assert last_conv.bias is not None
    with torch.no_grad():
        last_conv.bias[1] += 5.0
    images = blob_images(2, inside=2.0, outside=-0.5, size=16)

    # Execute
    maps = gradcam_attention(model, images, device=CPU)

    # Assert
    assert bool((model(images).argmax(1) == 1).any(dim=(1, 2)).all())
    torch.testing.assert_close(maps.flatten(1).amax(1), torch.ones(2))


def test_score_candidate_with_gradcam_attention_gives_scores_in_unit_interval() -> None:
    # Prepare
    model = tiny_unet()
    images = blob_images(2, inside=2.0, outside=-0.5, size=16)
    transfer = transfer_with(attention=Attention.GRADCAM)

    # Execute
    scores = score_candidate(
        model,
        images,
        case_of_slice=torch.tensor([0, 1]),
        num_cases=2,
        transfer=transfer,
        device=CPU,
    )

    # Assert
    assert scores.per_case.shape == (2,)
    assert bool(((scores.per_case >= 0) & (scores.per_case <= 1)).all())


def test_gradcam_attention_rejects_a_module_that_is_not_a_unet() -> None:
    # Execute / Assert
    with pytest.raises(TypeError, match="needs a MONAI UNet"):
        gradcam_attention(IntensityModel(), torch.zeros(1, 1, 8, 8), device=CPU)


# --------------------------------------------------------- agreement selection

# Five candidates as on a target where two right sources (D, E) agree with each other
# and three wrong ones agree with nothing, while LFTM scores one wrong source (A) best.
AGREEMENT_DTM = {"A": 0.73, "B": 0.46, "C": 0.33, "D": 0.51, "E": 0.59}
AGREEMENT = {
    "A": {"A": 1.0, "B": 0.36, "C": 0.22, "D": 0.0, "E": 0.0},
    "B": {"A": 0.36, "B": 1.0, "C": 0.36, "D": 0.0, "E": 0.0},
    "C": {"A": 0.22, "B": 0.36, "C": 1.0, "D": 0.0, "E": 0.0},
    "D": {"A": 0.0, "B": 0.0, "C": 0.0, "D": 1.0, "E": 0.67},
    "E": {"A": 0.0, "B": 0.0, "C": 0.0, "D": 0.67, "E": 1.0},
}


def test_prediction_agreement_is_the_mean_per_case_dice() -> None:
    # Prepare: case 0 (two slices) and case 1 (one slice)
    first = torch.tensor([[[1, 1, 0, 0]], [[0, 0, 0, 0]], [[1, 0, 0, 0]]])
    second = torch.tensor([[[1, 0, 0, 0]], [[0, 0, 0, 0]], [[0, 0, 0, 0]]])
    case_of_slice = torch.tensor([0, 0, 1])

    # Execute
    agreement = prediction_agreement(
        [first, second], case_of_slice=case_of_slice, num_cases=2
    )

    # Assert: case 0 Dice 2/3, case 1 one side silent -> 0; the diagonal counts a
    # case where the candidate predicts nothing as 0 too
    torch.testing.assert_close(agreement, torch.tensor([[1.0, 1 / 3], [1 / 3, 0.5]]))


def test_the_paper_rule_lets_every_candidate_vote() -> None:
    # Execute
    selection = select_sources(AGREEMENT_DTM, agreement=AGREEMENT)

    # Assert: the agreement is ignored, A wins on DTM
    assert (selection.main, selection.aux) == ("A", "E")
    assert selection.voters == ("A", "B", "C", "D", "E")


def test_agreement_selection_needs_a_best_score_confirmed_by_a_peer() -> None:
    # Execute
    selection = select_sources(
        AGREEMENT_DTM, rule=SelectionRule.AGREEMENT, agreement=AGREEMENT
    )

    # Assert: A's 0.73 is confirmed only at 0.36 (0.26) while E's 0.59 at 0.67
    # (0.40): E is main, D agrees with it and is aux, and only they vote
    assert (selection.main, selection.aux) == ("E", "D")
    assert selection.voters == ("D", "E")
    assert selection.weight_main == pytest.approx(0.59 / (0.59 + 0.51))
    assert selection.weight_main + selection.weight_aux == pytest.approx(1.0)


def test_agreement_selection_drops_an_aux_that_disagrees_with_the_main() -> None:
    # Prepare: nobody agrees with anybody above the threshold
    agreement = {
        first: {second: 1.0 if first == second else 0.2 for second in AGREEMENT}
        for first in AGREEMENT
    }

    # Execute
    selection = select_sources(
        AGREEMENT_DTM, rule=SelectionRule.AGREEMENT, agreement=agreement
    )

    # Assert: the main alone, voting alone, with all the weight
    assert (selection.main, selection.aux) == ("A", None)
    assert selection.voters == ("A",)
    assert (selection.weight_main, selection.weight_aux) == (1.0, 0.0)
    assert selection.as_pairs() == (("A", 1.0),)


def test_agreement_threshold_decides_who_votes() -> None:
    # Execute
    selection = select_sources(
        AGREEMENT_DTM,
        rule=SelectionRule.AGREEMENT,
        agreement=AGREEMENT,
        threshold=0.7,
    )

    # Assert: D agrees with E at 0.67 < 0.7
    assert (selection.main, selection.aux, selection.voters) == ("E", None, ("E",))


def test_agreement_selection_of_one_candidate_is_that_candidate() -> None:
    # Execute
    selection = select_sources({"B": 0.4}, rule=SelectionRule.AGREEMENT)

    # Assert
    assert (selection.main, selection.aux, selection.voters) == ("B", None, ("B",))


@pytest.mark.parametrize(
    ("agreement", "message"),
    [
        (None, "the agreement selection needs the candidates' agreement"),
        (
            {"A": {"B": 0.5}, "B": {"A": 0.5}},
            "no agreement for candidate pair\\(s\\) A/C, B/C, C/A, C/B",
        ),
    ],
)
def test_agreement_selection_refuses_missing_agreement(
    agreement: dict[str, dict[str, float]] | None, message: str
) -> None:
    # Execute / Assert
    with pytest.raises(ValueError, match=message):
        select_sources(
            {"A": 0.5, "B": 0.4, "C": 0.3},
            rule=SelectionRule.AGREEMENT,
            agreement=agreement,
        )


@pytest.mark.parametrize("threshold", [-0.1, 1.5])
def test_agreement_threshold_must_be_a_dice(threshold: float) -> None:
    # Execute / Assert
    with pytest.raises(ValueError, match=r"transfer\.agreement-threshold"):
        load_default_config(**{"transfer.agreement-threshold": threshold})


def test_an_unknown_selection_rule_is_named() -> None:
    # Execute / Assert
    with pytest.raises(ValueError, match=r"transfer\.selection"):
        load_default_config(**{"transfer.selection": "vote"})
