"""Segmentation networks and their wire form.

Owns ``build_model`` (a MONAI 2-D or 3-D U-Net from
:class:`core.config.ModelConfig`), the parameter manifest (names and shapes a reply may
carry), and the conversion between a model and ``dict[str, numpy array]`` (the wire
format) or a file on disk. The apps never touch ``state_dict`` themselves; they call
these functions.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeAlias

import numpy as np
import numpy.typing as npt
import torch
from monai.networks.nets import UNet
from torch import nn

from core.config import DataConfig, ModelConfig, Norm
from core.storage import write_atomically

Arrays: TypeAlias = dict[str, npt.NDArray[np.float32]]
Manifest: TypeAlias = dict[str, tuple[int, ...]]


def build_model(
    model: ModelConfig, *, data: DataConfig, spatial_dims: int = 2
) -> nn.Module:
    """Build the MONAI U-Net described by ``model`` (1 input channel, C outputs).

    Normalisation keeps no running statistics (instance/group norm) unless ``batch``
    is asked for, so the same network trains under Opacus later.

    Args:
        model: the architecture.
        data: gives the number of output classes C.
        spatial_dims: 2 (slices, the default everywhere in the pipeline) or 3
            (volumes, used by :mod:`core.semisup.training`).

    Raises:
        ValueError: ``spatial_dims`` is neither 2 nor 3.
    """
    if spatial_dims not in (2, 3):
        raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
    norm: tuple[str, dict[str, object]] | str
    if model.norm is Norm.INSTANCE:
        norm = ("instance", {"affine": True})
    elif model.norm is Norm.GROUP:
        # Every normalised block (the output block too) must split evenly into groups.
        norm = ("group", {"num_groups": math.gcd(*model.channels, data.num_classes)})
    else:
        norm = "batch"
    network: nn.Module = UNet(
        spatial_dims=spatial_dims,
        in_channels=1,
        out_channels=data.num_classes,
        channels=model.channels,
        strides=model.strides,
        num_res_units=model.num_res_units,
        norm=norm,
        dropout=model.dropout,
    )
    return network


def get_manifest(model: nn.Module) -> Manifest:
    """Return the parameter and buffer names and shapes of ``model``'s weights."""
    return {name: tuple(tensor.shape) for name, tensor in model.state_dict().items()}


def get_weights(model: nn.Module) -> Arrays:
    """Copy ``model``'s weights to host numpy arrays (the wire format)."""
    return {
        name: tensor.detach().to("cpu", torch.float32).numpy().copy()
        for name, tensor in model.state_dict().items()
    }


def set_weights(
    model: nn.Module, weights: Mapping[str, npt.NDArray[np.generic]]
) -> None:
    """Load ``weights`` into ``model`` in place, checking names and shapes first.

    Raises:
        ValueError: a parameter is missing, unexpected or of the wrong shape; the
            message names it.
    """
    expected = get_manifest(model)
    missing = sorted(set(expected) - set(weights))
    unexpected = sorted(set(weights) - set(expected))
    if missing or unexpected:
        raise ValueError(
            "weights do not match the model manifest: "
            f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
            f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}"
        )
    for name, shape in expected.items():
        if tuple(weights[name].shape) != shape:
            raise ValueError(
                f"weights do not match the model manifest: {name} has shape "
                f"{tuple(weights[name].shape)}, expected {shape}"
            )
    state = model.state_dict()
    model.load_state_dict(
        {
            name: torch.as_tensor(np.asarray(weights[name])).to(state[name].dtype)
            for name in expected
        }
    )


def save_weights(weights: Mapping[str, npt.NDArray[np.generic]], path: Path) -> None:
    """Write ``weights`` to an ``.npz`` file atomically (no pickle involved)."""
    arrays: dict[str, Any] = {name: np.asarray(v) for name, v in weights.items()}
    with write_atomically(Path(path)) as temporary, temporary.open("wb") as handle:
        np.savez(handle, **arrays)


def load_weights(path: Path) -> Arrays:
    """Read weights written by :func:`save_weights` (``allow_pickle`` stays off)."""
    with np.load(Path(path), allow_pickle=False) as archive:
        return {name: archive[name].astype(np.float32) for name in archive.files}
