"""The admin page's live picture: decisions per minute as SVG bars, the rules that deny most,
and the tripwires with their counts.

The chart is drawn here, on the server, as plain shapes (rects and lines with classes the
page's stylesheet colours): no script draws it and nothing is fetched from elsewhere, so it
stays within the page's Content-Security-Policy. It is the page's frame
(``GET /admin/traffic``), which reloads itself with a meta refresh while the page is open, so
the page needs no script at all. The counts come from Redis (``control/traffic.py``), so
every process's traffic is in it, whichever process draws it.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from ratekeeper.admin.common import AdminState
from ratekeeper.api.admin_wire import TripwireView
from ratekeeper.control.traffic import DENIED, MINUTES, Picture
from ratekeeper.errors import StoreUnavailable

__all__ = ["LEGEND", "Chart", "Live", "live_picture"]

# the order bars stack in, bottom up, and what the legend calls them
LEGEND = (("allowed", "allowed"), ("limited", "rate limited"), ("boxed", "penalty box"),
          ("banned", "banned"), ("disabled", "kill switch"), ("degraded", "degraded"))
STACK = tuple(kind for kind, _ in LEGEND)
WIDTH = 600  # the chart's viewBox, in user units
HEIGHT = 110
LEFT = 34  # room for the scale
BOTTOM = 14  # room for the minute labels
CHARTS = 8  # actions drawn at most: the busiest


@dataclass(frozen=True, slots=True)
class Segment:
    """One category's part of one minute's bar."""

    kind: str
    x: float
    y: float
    width: float
    height: float
    count: int
    minute: int  # minutes before now (0: this one)


@dataclass(frozen=True, slots=True)
class Chart:
    """One action's decisions per minute over the last hour, as shapes."""

    action: str
    segments: list[Segment]
    peak: int  # the largest minute: the top of the scale
    total: int
    denied: int
    width: int = WIDTH
    height: int = HEIGHT
    left: int = LEFT
    base: int = HEIGHT - BOTTOM  # y of the axis


@dataclass(frozen=True, slots=True)
class Live:
    """The live section's data; None where Redis could not be asked."""

    charts: list[Chart] | None
    rules: list[tuple[str, dict[str, int]]] | None
    tripwires: list[TripwireView] | None
    quiet: bool  # no decision at all in the last hour


def _scale(peak: int) -> int:
    """The top of the scale: the first of 1, 2, 5, 10, 20, 50... at or above ``peak``."""
    power = 1
    while True:
        for step in (1, 2, 5):
            if power * step >= peak:
                return power * step
        power *= 10


def chart(action: str, series: dict[str, list[int]]) -> Chart:
    """The bars of one action's minutes."""
    columns = [sum(series.get(kind, [0] * MINUTES)[i] for kind in STACK)
               for i in range(MINUTES)]
    peak = max(columns, default=0)
    top = _scale(peak)
    base = HEIGHT - BOTTOM
    plot = base - 4  # px of the tallest possible bar
    step = (WIDTH - LEFT) / MINUTES
    segments = []
    for i in range(MINUTES):
        y = float(base)
        for kind in STACK:
            count = series.get(kind, [0] * MINUTES)[i]
            if not count:
                continue
            height = max(count / top * plot, 1.0)
            y -= height
            segments.append(Segment(kind=kind, x=round(LEFT + i * step + 0.5, 2),
                                    y=round(y, 2), width=round(step - 1, 2),
                                    height=round(height, 2), count=count,
                                    minute=MINUTES - 1 - i))
    total = sum(columns)
    denied = sum(sum(series.get(kind, ())) for kind in DENIED)
    return Chart(action=action, segments=segments, peak=top, total=total, denied=denied)


def charts(picture: Picture) -> list[Chart]:
    """The busiest actions' charts, busiest first."""
    busy = sorted(((picture.total(action), action) for action in picture.actions),
                  key=lambda item: (-item[0], item[1]))
    return [chart(action, picture.actions[action]) for total, action in busy[:CHARTS]
            if total]


async def _picture(admin: AdminState) -> Picture | None:
    try:
        return await admin.tripwires.traffic.picture()
    except StoreUnavailable:
        return None


async def _tripwires(admin: AdminState) -> list[TripwireView] | None:
    try:
        return await admin.tripwires.views()
    except StoreUnavailable:
        return None


async def live_picture(admin: AdminState) -> Live:
    """Read the live section's data from Redis."""
    picture, wires = await asyncio.gather(_picture(admin), _tripwires(admin))
    if picture is None:
        return Live(charts=None, rules=None, tripwires=wires, quiet=False)
    drawn = charts(picture)
    return Live(charts=drawn, rules=picture.denying_rules(), tripwires=wires,
                quiet=not drawn)
