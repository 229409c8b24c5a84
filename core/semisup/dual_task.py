"""UG-MCL's dual-task network: a MONAI U-Net with a signed-distance head.

Owns :class:`DualTaskUNet` (docs/methods.md#network-and-signed-distances: two separate
heads on one U-Net, the shared-head variant as an option, dropout for Monte-Carlo
passes) and the conversion between its weights and an ordinary segmentation model's. The
segmentation part is exactly :func:`core.training.networks.build_model`'s network, so a
student's segmentation weights are evaluated, stored and sent like any other model's.
Pure PyTorch/MONAI; never imports flwr.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Final, TypeVar

import numpy as np
import numpy.typing as npt
import torch
import torch.nn.functional as functional
from monai.networks.nets import UNet
from torch import nn

from core.config import DataConfig, ModelConfig
from core.training.networks import build_model, set_weights

SEGMENTATION_PREFIX: Final = "segmentation."
DISTANCE_HEAD_PREFIX: Final = "distance_head."
ArrayT = TypeVar("ArrayT")  # whatever the weights are (numpy arrays, tensors)


def _top_up_channels(unet: UNet) -> int:
    # MONAI's rule in UNet._create_block: the top up block receives the skip
    # concatenation, 2 * c0 when there are deeper levels, c0 + c1 when the next
    # level is the bottom layer.
    channels = tuple(int(count) for count in unet.channels)
    return 2 * channels[0] if len(channels) > 2 else channels[0] + channels[1]


def _bottleneck(unet: UNet) -> nn.Module:
    # UNet.model nests Sequential(down, SkipConnection(deeper), up) once per level.
    block: nn.Module = unet.model
    for _ in range(len(unet.channels) - 1):
        block = block[1].submodule  # type: ignore[index]
    return block


class DualTaskUNet(nn.Module):
    """A MONAI U-Net with a segmentation head and a signed-distance head.

    ``segmentation`` is the plain U-Net, unchanged, so its weights are an ordinary
    :func:`core.training.networks.build_model` network's weights under
    ``segmentation.``. ``distance_head`` is a second copy of the U-Net's top up-sampling
    block (built by the same ``UNet._get_up_layer(..., is_top=True)``), fed with the
    decoder features the segmentation's top block sees, followed by tanh: an SDF with
    ``C`` channels. With ``shared_head`` there is no distance head and ``sdf =
    tanh(logits)`` (the released BraTS code).

    Dropout with probability ``dropout`` acts on the features entering the heads (one
    mask shared by both) and on the bottleneck output. The bottleneck's is a forward
    hook, so ``state_dict`` names stay the U-Net's and Opacus still sees plain layers.
    Both are active only in train mode: eval mode is deterministic, and in eval mode
    ``segmentation(x)`` equals ``forward(x)[0]``.

    A teacher runs its uncertainty passes in train mode. Instance and group norm keep
    no running statistics, so that is harmless; a BatchNorm teacher would update its
    running statistics on every pass (and :func:`ema_update` then overwrites them with
    the average of the student's).

    Args:
        segmentation: a MONAI ``UNet`` (2-D or 3-D).
        shared_head: use tanh of the segmentation logits as the SDF.
        dropout: probability of the MC dropout, in [0, 1).

    Raises:
        ValueError: ``dropout`` lies outside [0, 1) or ``segmentation`` is no UNet.
    """

    def __init__(
        self, segmentation: UNet, *, shared_head: bool = False, dropout: float = 0.3
    ) -> None:
        super().__init__()
        if not isinstance(segmentation, UNet):
            raise ValueError(
                f"segmentation must be a MONAI UNet, got {type(segmentation).__name__}"
            )
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        self.segmentation = segmentation
        self.dropout = dropout
        self.num_classes = int(segmentation.out_channels)
        self.spatial_dims = int(segmentation.dimensions)
        self.distance_head: nn.Module | None = None
        if not shared_head:
            self.distance_head = segmentation._get_up_layer(
                _top_up_channels(segmentation),
                self.num_classes,
                segmentation.strides[0],
                True,
            )
        _bottleneck(segmentation).register_forward_hook(self._drop_bottleneck)

    def _drop_bottleneck(
        self, module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor
    ) -> torch.Tensor:
        return functional.dropout(output, self.dropout, training=module.training)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``(logits, sdf)``, both ``(B, C, *spatial)``, for ``(B, 1, ...)``."""
        down, skip, up = self.segmentation.model
        features = functional.dropout(
            skip(down(images)), self.dropout, training=self.training
        )
        logits: torch.Tensor = up(features)
        if self.distance_head is None:
            return logits, torch.tanh(logits)
        return logits, torch.tanh(self.distance_head(features))


def build_dual_task_model(
    model: ModelConfig,
    data: DataConfig,
    *,
    spatial_dims: int = 2,
    shared_head: bool = False,
    dropout: float = 0.3,
) -> DualTaskUNet:
    """Build a :class:`DualTaskUNet` around the U-Net of ``build_model``.

    Args:
        model: the U-Net architecture (its own ``dropout`` still applies inside).
        data: gives the number of classes C.
        spatial_dims: 2 or 3.
        shared_head: see :class:`DualTaskUNet`.
        dropout: the MC dropout probability (0.3 by default, as the paper).
    """
    network = build_model(model, data=data, spatial_dims=spatial_dims)
    return DualTaskUNet(network, shared_head=shared_head, dropout=dropout)


def segmentation_weights(dual_weights: Mapping[str, ArrayT]) -> dict[str, ArrayT]:
    """Return the plain U-Net's weights from a dual-task model's weights.

    Strips ``segmentation.`` and drops ``distance_head.*``; the result loads into
    ``build_model(...)`` with :func:`core.training.networks.set_weights`.

    Raises:
        ValueError: a name belongs to neither part (these are not dual-task weights).

    Example:
        >>> segmentation_weights({"segmentation.w": 1, "distance_head.w": 2})
        {'w': 1}
    """
    stray = [
        name
        for name in dual_weights
        if not name.startswith((SEGMENTATION_PREFIX, DISTANCE_HEAD_PREFIX))
    ]
    if stray:
        raise ValueError(
            f"not dual-task weights: {stray[:5]} start with neither "
            f"{SEGMENTATION_PREFIX!r} nor {DISTANCE_HEAD_PREFIX!r}"
        )
    return {
        name.removeprefix(SEGMENTATION_PREFIX): array
        for name, array in dual_weights.items()
        if name.startswith(SEGMENTATION_PREFIX)
    }


def load_segmentation_weights(
    dual: DualTaskUNet, weights: Mapping[str, npt.NDArray[np.generic]]
) -> None:
    """Load a plain U-Net's ``weights`` into ``dual.segmentation`` in place.

    The distance head keeps its weights.

    Raises:
        ValueError: a name is missing or unexpected, or a shape differs; the message
            names it.
    """
    set_weights(dual.segmentation, weights)


_NORM_LAYERS: Final = (
    nn.modules.batchnorm._NormBase,  # BatchNorm and InstanceNorm
    nn.GroupNorm,
    nn.LayerNorm,
)


def norm_state_names(model: nn.Module) -> frozenset[str]:
    """The state-dict names of ``model``'s normalisation layers (FedBN's local part).

    Every parameter and buffer of a BatchNorm, InstanceNorm, GroupNorm or LayerNorm
    layer: the affine weight and bias (instance and group norm here keep nothing
    else; a BatchNorm's running statistics are included too).

    Example:
        >>> sorted(norm_state_names(nn.Sequential(nn.Conv1d(1, 2, 1),
        ...                                       nn.InstanceNorm1d(2, affine=True))))
        ['1.bias', '1.weight']
    """
    names = set()
    for prefix, module in model.named_modules():
        if isinstance(module, _NORM_LAYERS):
            for name, _ in (
                *module.named_parameters(recurse=False),
                *module.named_buffers(recurse=False),
            ):
                names.add(f"{prefix}.{name}" if prefix else name)
    return frozenset(names)


def keep_local_norm(
    incoming: Mapping[str, ArrayT],
    own: Mapping[str, ArrayT] | None,
    names: frozenset[str],
) -> dict[str, ArrayT]:
    """``incoming`` with the entries ``names`` taken from the site's ``own`` weights.

    FedBN-style local normalisation (``semisup.local-norm``): a site overwrites the
    normalisation layers' entries of the global model it receives with its own, so
    they are never averaged into its model. ``own`` None (the site's first round)
    keeps ``incoming`` as it is.

    Raises:
        ValueError: ``own`` lacks one of ``names``.

    Example:
        >>> keep_local_norm({"w": 1, "n": 2}, {"w": 5, "n": 9}, frozenset({"n"}))
        {'w': 1, 'n': 9}
    """
    if own is None:
        return dict(incoming)
    missing = sorted(names - set(own))
    if missing:
        raise ValueError(f"the site's own norm weights lack {missing[:5]}")
    return {
        name: own[name] if name in names else value for name, value in incoming.items()
    }
