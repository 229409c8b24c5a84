from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest
import torch
from torch import nn

from core.config import RunConfig, load_default_config
from core.training.networks import (
    build_model,
    get_manifest,
    get_weights,
    load_weights,
    save_weights,
    set_weights,
)

Weights = dict[str, npt.NDArray[np.float32]]


def tiny_config(**overrides: int | float | str | bool) -> RunConfig:
    return load_default_config(
        **{
            "data.image-size": 16,
            "model.channels": "4,8",
            "model.strides": "2",
            **overrides,
        }
    )


def seeded_model(config: RunConfig, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return build_model(config.model, data=config.data)


@pytest.mark.parametrize(
    ("overrides", "batch"),
    [
        ({"data.image-size": 32}, 2),  # the default architecture
        ({"data.image-size": 32, "data.num-classes": 3}, 1),
        ({"data.image-size": 16, "model.channels": "4,8", "model.strides": "2"}, 3),
        ({"data.image-size": 32, "model.norm": "batch"}, 2),
        ({"data.image-size": 32, "model.norm": "group"}, 2),
    ],
)
def test_build_model_output_shape(overrides: dict[str, int | str], batch: int) -> None:
    # Prepare
    config = load_default_config(**overrides)
    size = config.data.image_size
    model = build_model(config.model, data=config.data).eval()

    # Execute
    with torch.no_grad():
        logits = model(torch.zeros(batch, 1, size, size))

    # Assert
    assert logits.shape == (batch, config.data.num_classes, size, size)


def test_instance_norm_model_keeps_no_running_statistics() -> None:
    # Prepare
    config = load_default_config(**{"data.image-size": 32})

    # Execute
    model = build_model(config.model, data=config.data)

    # Assert
    buffers = [name for name, _ in model.named_buffers()]
    assert not any("running_mean" in name for name in buffers)
    assert not any("running_var" in name for name in buffers)
    assert not any(
        isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()
    )
    assert any(isinstance(m, nn.InstanceNorm2d) for m in model.modules())


def test_batch_norm_model_has_running_statistics() -> None:
    # Prepare
    config = tiny_config(**{"model.norm": "batch"})

    # Execute
    model = build_model(config.model, data=config.data)

    # Assert
    assert any(name.endswith("running_mean") for name, _ in model.named_buffers())


def test_get_weights_matches_the_manifest_as_float32_copies() -> None:
    # Prepare
    model = seeded_model(tiny_config(), seed=0)

    # Execute
    weights = get_weights(model)
    manifest = get_manifest(model)

    # Assert
    assert {name: array.shape for name, array in weights.items()} == manifest
    assert all(array.dtype == np.float32 for array in weights.values())
    first = next(iter(weights))
    weights[first][...] = 123.0  # a copy: the model is untouched
    assert not torch.all(model.state_dict()[first] == 123.0)


@pytest.mark.parametrize("norm", ["instance", "batch", "group"])
def test_set_weights_round_trip(norm: str) -> None:
    # Prepare
    config = tiny_config(**{"model.norm": norm})
    source, target = seeded_model(config, seed=1), seeded_model(config, seed=2)
    images = torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(0))

    # Execute
    set_weights(target, get_weights(source))

    # Assert
    for name, array in get_weights(source).items():
        np.testing.assert_array_equal(get_weights(target)[name], array, err_msg=name)
    with torch.no_grad():
        torch.testing.assert_close(target.eval()(images), source.eval()(images))


def test_set_weights_accepts_other_dtypes_and_keeps_the_models() -> None:
    # Prepare
    config = tiny_config()
    source, target = seeded_model(config, seed=1), seeded_model(config, seed=2)
    weights = {
        name: array.astype(np.float64) for name, array in get_weights(source).items()
    }

    # Execute
    set_weights(target, weights)

    # Assert
    assert all(tensor.dtype == torch.float32 for tensor in target.state_dict().values())
    for name, array in get_weights(source).items():
        np.testing.assert_allclose(get_weights(target)[name], array)


def _drop_first(weights: Weights) -> tuple[Weights, str]:
    name = sorted(weights)[0]
    del weights[name]
    return weights, rf"missing \['{re.escape(name)}'\]"


def _add_extra(weights: Weights) -> tuple[Weights, str]:
    weights["head.extra.weight"] = np.zeros(3, dtype=np.float32)
    return weights, r"unexpected \['head\.extra\.weight'\]"


def _reshape_first(weights: Weights) -> tuple[Weights, str]:
    name = sorted(weights)[0]
    shape = weights[name].shape
    weights[name] = np.zeros((*shape, 1), dtype=np.float32)
    return weights, (
        rf"{re.escape(name)} has shape {re.escape(str((*shape, 1)))}, "
        rf"expected {re.escape(str(shape))}"
    )


@pytest.mark.parametrize("breaker", [_drop_first, _add_extra, _reshape_first])
def test_set_weights_rejects_mismatched_parameters_naming_them(
    breaker: Callable[[Weights], tuple[Weights, str]],
) -> None:
    # Prepare
    model = seeded_model(tiny_config(), seed=0)
    before = get_weights(model)
    weights, message = breaker(get_weights(model))

    # Execute / Assert
    with pytest.raises(ValueError, match=message):
        set_weights(model, weights)
    after = get_weights(model)
    assert all(np.array_equal(after[name], before[name]) for name in before)


def test_set_weights_rejects_weights_of_another_architecture() -> None:
    # Prepare
    model = seeded_model(tiny_config(), seed=0)
    other = seeded_model(tiny_config(**{"model.channels": "4,16"}), seed=0)

    # Execute / Assert
    with pytest.raises(ValueError, match="weights do not match the model manifest"):
        set_weights(model, get_weights(other))


def test_save_and_load_weights_round_trip(tmp_path: Path) -> None:
    # Prepare
    weights = get_weights(seeded_model(tiny_config(**{"model.norm": "batch"}), seed=3))
    path = tmp_path / "nested" / "model.npz"

    # Execute
    save_weights(weights, path)
    loaded = load_weights(path)

    # Assert
    assert loaded.keys() == weights.keys()
    for name, array in weights.items():
        assert loaded[name].dtype == np.float32
        np.testing.assert_array_equal(loaded[name], array, err_msg=name)
    with np.load(path, allow_pickle=False) as archive:
        assert sorted(archive.files) == sorted(weights)
    assert sorted(p.name for p in path.parent.iterdir()) == ["model.npz"]


def test_save_weights_replaces_an_existing_file(tmp_path: Path) -> None:
    # Prepare
    path = tmp_path / "model.npz"
    save_weights({"a": np.zeros(2, dtype=np.float32)}, path)

    # Execute
    save_weights({"b": np.ones(3, dtype=np.float32)}, path)

    # Assert
    loaded = load_weights(path)
    assert list(loaded) == ["b"]
    np.testing.assert_array_equal(loaded["b"], np.ones(3, dtype=np.float32))


def test_load_weights_into_a_model_round_trip(tmp_path: Path) -> None:
    # Prepare
    config = tiny_config()
    source, target = seeded_model(config, seed=4), seeded_model(config, seed=5)
    save_weights(get_weights(source), tmp_path / "source.npz")

    # Execute
    set_weights(target, load_weights(tmp_path / "source.npz"))

    # Assert
    for name, array in get_weights(source).items():
        np.testing.assert_array_equal(get_weights(target)[name], array, err_msg=name)
