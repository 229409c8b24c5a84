"""The query channels of the security benchmark: ``query.lftm`` and ``query.profile``.

- ``query.lftm`` (issue 20, class 2b): every crafted cell model goes in as a
  candidate; the site scores each on its own training images and replies one value
  per candidate (DTM; per case too when its policy releases ITM). Fed to
  :func:`simulations.benchmark.security.attacks.measure_cells` as the attack's ``ask``,
  so it meets refusals with the same fallbacks as ``evaluate``.
- ``query.profile`` (class 3): one request whose run config sets
  ``affinity.label-grid`` as fine as the case, or as fine as the site's advertised
  ``limits.max-label-grid`` allows (``query.hello`` first); the reply's mean
  foreground map is resampled back to the case's grid and thresholded at one half. A
  refusal takes the grid to the cap it quotes, or halves it
  (:func:`coarser_label_grid`), until the site answers or a final refusal stops it.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Mapping, Sequence

import numpy as np
import numpy.typing as npt
from flwr.app import RecordDict
from scipy import ndimage

from core import protocol
from core.config import ConfigValue
from core.training.networks import Arrays
from simulations.benchmark.security.attacks import (
    SiteChannel,
    request_content,
    say_hello,
)
from simulations.benchmark.security.fallbacks import (
    AttackPlan,
    allowed_by,
    stop_when_action_refused,
    stop_when_too_few_cases,
)

SMALLEST_GRID = 2


def ask_lftm(
    channel: SiteChannel,
    plan: AttackPlan,
    models: Mapping[str, Arrays],
    cells: Sequence[int],
) -> tuple[dict[int, float], float, str | None]:
    """One ``query.lftm`` request: each cell's (single) model as a candidate."""
    code = plan.code()
    names = {cell: code.members(cell)[0][0] for cell in cells}
    content = request_content({names[cell]: models[names[cell]] for cell in cells}, {})
    reply = channel.send(
        protocol.LFTM, content, run_id=plan.run_id, run_config=plan.run_config
    )
    if reply.error is not None:
        return {}, math.nan, reply.error
    dtm = protocol.LftmReply.from_fields(reply.settings, reply.metrics).dtm
    return (
        {cell: dtm[name] for cell, name in names.items() if name in dtm},
        math.nan,
        None,
    )


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class ProfileMeasurement:
    """What one ``query.profile`` attack got.

    Attributes:
        grid: the label grid the site finally answered for (0 if none).
        mean_label_map: the released ``grid^3`` map (None if refused, or when the
            site left the label term out).
        num_labelled: labelled cases behind the map, as the site reported.
        epsilon: the ε the site reports for the release (0 for an exact map).
        noise_multiplier: the Gaussian noise the release carries, over its
            sensitivity (0 for an exact map).
        requests: messages sent, refused ones included.
        refusals: request number, reason and fallback of each error reply.
        seconds: wall time.
    """

    grid: int
    mean_label_map: npt.NDArray[np.float64] | None
    num_labelled: int
    epsilon: float
    noise_multiplier: float
    requests: int
    refusals: tuple[dict[str, object], ...]
    seconds: float


def coarser_label_grid(grid: int, reason: str) -> int:
    """The next grid after a refusal: the quoted cap, half, or 0 when final.

    Example:
        >>> coarser_label_grid(64, "limit-exceeded (affinity.label-grid is 64, "
        ...                    "limits.max-label-grid allows 32)")
        32
        >>> coarser_label_grid(64, "the site's budget is epsilon 10 ...")
        0
    """
    plan = AttackPlan(run_config={})
    if "budget" in reason.lower():
        return 0
    for stop in (stop_when_action_refused, stop_when_too_few_cases):
        if stop(plan, reason) is not None:
            return 0
    cap = allowed_by(reason, "max-label-grid")
    if cap is not None and SMALLEST_GRID <= cap < grid:
        return cap
    return grid // 2 if grid // 2 >= SMALLEST_GRID else 0


def measure_profile(
    channel: SiteChannel,
    run_config: Mapping[str, ConfigValue],
    *,
    grid: int,
    progress: Callable[[str], None],
    run_id: int = 1,
) -> ProfileMeasurement:
    """Ask for the task profile at ``grid``, coarser after each refusal.

    ``query.hello`` first: the grid asked for is held to the site's advertised
    ``limits.max-label-grid``.
    """
    started = time.perf_counter()
    refusals: list[dict[str, object]] = []
    hello = say_hello(channel, run_config, run_id)
    requests = 1
    if hello.error is not None:
        refusals.append({"request": requests, "reason": hello.error, "fallback": ""})
        grid = 0
    grid = min(grid, hello.limits.get("max-label-grid", grid))
    while grid:
        requests += 1
        # The attacker is after the label map: it asks for no polarity term, which
        # would only spend a DP site's budget on intensity quantiles.
        flat = {
            **run_config,
            "affinity.label-grid": grid,
            "affinity.polarity-weight": 0.0,
        }
        reply = channel.send(
            protocol.PROFILE, RecordDict(), run_id=run_id, run_config=flat
        )
        if reply.error is None:
            released = protocol.ProfileReply.from_fields(reply.metrics)
            label_map = (
                None
                if released.mean_label_map is None
                else np.asarray(released.mean_label_map, dtype=np.float64).reshape(
                    (released.label_grid,) * 3
                )
            )
            return ProfileMeasurement(
                grid=grid,
                mean_label_map=label_map,
                num_labelled=released.num_labelled,
                epsilon=released.epsilon_spent,
                noise_multiplier=released.noise_multiplier,
                requests=requests,
                refusals=tuple(refusals),
                seconds=time.perf_counter() - started,
            )
        weaker = coarser_label_grid(grid, reply.error)
        refusals.append(
            {
                "request": requests,
                "reason": reply.error,
                "fallback": f"label grid {weaker}" if weaker else "",
            }
        )
        progress(f"  refused ({reply.error[:160]}); next grid {weaker or 'none'}")
        grid = weaker
    return ProfileMeasurement(
        grid=0,
        mean_label_map=None,
        num_labelled=0,
        epsilon=0.0,
        noise_multiplier=0.0,
        requests=requests,
        refusals=tuple(refusals),
        seconds=time.perf_counter() - started,
    )


def reconstruct_volume(
    mean_label_map: npt.NDArray[np.float64] | None, shape: tuple[int, int, int]
) -> npt.NDArray[np.bool_]:
    """The case's label volume read off a released ``G^3`` foreground map.

    The site resized the case's foreground to ``G^3`` linearly (grid mode, after an
    anti-aliasing blur where it shrank); resizing back to the case's ``shape`` the
    same way and thresholding at one half inverts it where ``G`` is at least as fine
    as the case. Without a map, everything is background (the majority class).
    """
    if mean_label_map is None:
        return np.zeros(shape, dtype=bool)
    factors = np.array(shape, dtype=np.float64) / np.array(mean_label_map.shape)
    back = ndimage.zoom(
        mean_label_map, factors, order=1, mode="nearest", grid_mode=True
    )
    if back.shape != shape:  # zoom rounds the output shape
        raise ValueError(f"resizing the map to {shape} gave {back.shape}")
    result: npt.NDArray[np.bool_] = back >= 0.5
    return result
