"""Label consensus baselines: majority vote, STAPLE and multi-label STAPLE.

Owns the fixed (not learned) fusion of A noisy labels of one image into one label
(docs/methods.md#baselines-and-what-leaves, the baselines of DeepSTAPLE) and the
validation of label stacks shared with :mod:`core.consensus.deepstaple`, which owns the
learned fusion. Label stacks are numpy arrays of shape ``(A, *spatial)`` with 2-D or 3-D
spatial dimensions. Every function is pure.

Depends on numpy and SimpleITK (its STAPLE filters only, no file I/O, which stays in
:mod:`core.data.io`); never imports torch or flwr.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import numpy.typing as npt
import SimpleITK as sitk  # noqa: N813 - the library's own spelling

STAPLE_FOREGROUND: int = 1

BoolArray = npt.NDArray[np.bool_]
FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class StapleResult:
    """What STAPLE estimated for one image.

    Attributes:
        consensus: ``(*spatial)`` foreground mask, ``probability > threshold``.
        probability: ``(*spatial)`` estimated probability of foreground.
        sensitivity: per rater, in input order (nan where undefined).
        specificity: per rater, in input order (nan where undefined).
    """

    consensus: BoolArray
    probability: FloatArray
    sensitivity: tuple[float, ...]
    specificity: tuple[float, ...]


# --------------------------------------------------------------------- validation


def check_label_stack(
    labels: npt.NDArray[np.generic], name: str, *, binary: bool
) -> None:
    """Raise ValueError unless ``labels`` is a non-empty ``(A, *spatial)`` stack.

    Shared by every fusion rule here and by
    :func:`core.consensus.deepstaple.weighted_vote`.

    Args:
        labels: ``(A, H, W)`` or ``(A, D, H, W)`` stack of A labels.
        name: the argument's name, used in the error message.
        binary: also require every value to be 0 or 1.

    Raises:
        ValueError: the shape is wrong, the stack is empty, or (with ``binary``) a
            value is neither 0 nor 1.
    """
    if labels.ndim not in (3, 4):
        raise ValueError(
            f"{name} must have shape (A, H, W) or (A, D, H, W), got {labels.shape}"
        )
    if labels.size == 0:
        raise ValueError(f"{name} must not be empty, got shape {labels.shape}")
    if binary and not np.isin(labels, (0, 1)).all():
        values = np.unique(labels)[:5].tolist()
        raise ValueError(
            f"{name} must be binary (0/1), got values {values} in shape {labels.shape}"
        )


# --------------------------------------------------------------------- baselines


def majority_vote(labels: npt.NDArray[np.generic]) -> BoolArray:
    """Fuse binary labels by strict majority.

    A voxel is foreground when strictly more than half of the A labels say so; a tie
    (exactly half, possible for even A) is background.

    Args:
        labels: ``(A, *spatial)`` binary masks (bool or 0/1).

    Returns:
        ``(*spatial)`` boolean consensus.

    Raises:
        ValueError: ``labels`` is not a non-empty binary stack.

    Example:
        >>> majority_vote(np.array([[[1, 1]], [[1, 0]]])).tolist()
        [[True, False]]
    """
    check_label_stack(labels, "labels", binary=True)
    result: BoolArray = labels.astype(np.float64).mean(axis=0) > 0.5
    return result


def staple(
    labels: npt.NDArray[np.generic],
    *,
    threshold: float = 0.5,
    max_iterations: int = 200,
) -> StapleResult:
    """Fuse binary labels with SimpleITK's STAPLE (foreground value 1).

    Degenerate stacks that SimpleITK answers with nan are resolved here: when every
    label is empty (or every label is full) the consensus is that constant mask with
    probability 0 (or 1); sensitivity is nan for an all-empty stack (no foreground to
    detect) and 1 otherwise, specificity is nan for an all-full stack and 1
    otherwise. A single label is its own consensus, with sensitivity and specificity 1
    (or nan as above when it is empty or full).

    Args:
        labels: ``(A, *spatial)`` binary masks.
        threshold: consensus is ``probability > threshold``.
        max_iterations: STAPLE's EM iteration cap.

    Returns:
        The :class:`StapleResult`.

    Raises:
        ValueError: ``labels`` is not a non-empty binary stack.

    Example:
        >>> result = staple(np.array([[[0, 1]], [[0, 1]], [[0, 0]]]))
        >>> result.consensus.tolist()
        [[False, True]]
    """
    check_label_stack(labels, "labels", binary=True)
    masks = labels.astype(np.uint8)
    raters = masks.shape[0]
    empty, full = not masks.any(), bool(masks.all())
    if raters == 1 or empty or full:
        probability = masks.mean(axis=0, dtype=np.float64)
        return StapleResult(
            consensus=probability > threshold,
            probability=probability,
            sensitivity=(math.nan if empty else 1.0,) * raters,
            specificity=(math.nan if full else 1.0,) * raters,
        )
    staple_filter = sitk.STAPLEImageFilter()
    staple_filter.SetForegroundValue(STAPLE_FOREGROUND)
    staple_filter.SetMaximumIterations(max_iterations)
    output = staple_filter.Execute([sitk.GetImageFromArray(mask) for mask in masks])
    probability = sitk.GetArrayFromImage(output).astype(np.float64)
    return StapleResult(
        consensus=probability > threshold,
        probability=probability,
        sensitivity=tuple(float(v) for v in staple_filter.GetSensitivity()),
        specificity=tuple(float(v) for v in staple_filter.GetSpecificity()),
    )


def multi_label_staple(labels: npt.NDArray[np.generic]) -> IntArray:
    """Fuse multi-class labels with SimpleITK's multi-label STAPLE.

    Voxels where the estimate is undecided (a tie between classes) get label 0
    (background), so the result is always a valid class map.

    Args:
        labels: ``(A, *spatial)`` integer class maps with values in [0, 255].

    Returns:
        ``(*spatial)`` int64 class map.

    Raises:
        ValueError: ``labels`` is not a non-empty stack of classes in [0, 255].

    Example:
        >>> stack = np.array([[[0, 1, 2]], [[0, 1, 2]], [[0, 2, 2]]])
        >>> multi_label_staple(stack).tolist()
        [[0, 1, 2]]
    """
    check_label_stack(labels, "labels", binary=False)
    if not np.issubdtype(labels.dtype, np.integer) and labels.dtype != np.bool_:
        raise ValueError(f"labels must be integers, got dtype {labels.dtype}")
    if labels.min() < 0 or labels.max() > 255:
        raise ValueError(
            f"labels must lie in [0, 255], got [{labels.min()}, {labels.max()}] "
            f"in shape {labels.shape}"
        )
    staple_filter = sitk.MultiLabelSTAPLEImageFilter()
    staple_filter.SetLabelForUndecidedPixels(0)
    images = [sitk.GetImageFromArray(label) for label in labels.astype(np.uint8)]
    result: IntArray = sitk.GetArrayFromImage(staple_filter.Execute(images)).astype(
        np.int64
    )
    return result
