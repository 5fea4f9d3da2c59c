"""SVG drawn in Python: the step graph (layered layout, clusters) and status bars, coloured by outcome counts.

Colours come from CSS classes (`st-<status>`), defined once in the report's stylesheet, so the SVG
carries no style attributes (the page's Content-Security-Policy forbids inline style attributes).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
import html

import networkx as nx

from runbook.report.model import StepInfo

NODE_W, NODE_H = 210, 68
GAP_X, GAP_Y = 26, 34
BAND_PAD = 16            # space between a cluster's border and its nodes
TOP = 12
Counts = Mapping[str, int]
Redact = Callable[[str], str]


def _text(red: Redact, value: str, limit: int | None = None) -> str:
    """Redact first (so a cut cannot leave part of a secret), then shorten, then escape for XML."""
    text = red(value)
    return html.escape(_short(text, limit) if limit else text, quote=True)


@dataclass
class Band:
    """A column of the layout: the main steps, one block, or the on_failure steps."""

    key: tuple[str, str | None]
    label: str | None
    layers: dict[int, list[str]] = field(default_factory=dict)
    x0: float = 0.0
    width: float = 0.0

    @property
    def columns(self) -> int:
        """The widest layer of this band, in nodes."""
        return max((len(v) for v in self.layers.values()), default=0)


@dataclass
class Layout:
    """Node positions (top-left corners) and the bands drawn as clusters."""

    pos: dict[str, tuple[float, float]]
    bands: list[Band]
    width: float
    height: float
    edges: list[tuple[str, str]]


def _layers(steps: Sequence[StepInfo]) -> dict[str, int]:
    """Layer of each step: one more than the deepest step it needs (per section, each its own DAG)."""
    layer: dict[str, int] = {}
    for section in ("steps", "on_failure"):
        g = nx.DiGraph()
        members = [s for s in steps if s.section == section]
        g.add_nodes_from(s.id for s in members)
        g.add_edges_from((n, s.id) for s in members for n in s.needs if n in g)
        for depth, generation in enumerate(nx.topological_generations(g)):
            for sid in generation:
                layer[sid] = depth
    return layer


def layout(steps: Sequence[StepInfo]) -> Layout:
    """A layered (Sugiyama-style) layout: layers by dependency depth, order by barycentre sweeps, one band per cluster."""
    index = {s.id: i for i, s in enumerate(steps)}
    layer = _layers(steps)
    bands: dict[tuple[str, str | None], Band] = {}
    for s in steps:
        key = (s.section, s.cluster)
        label = "on_failure" + (f" · {s.cluster}" if s.cluster else "") if s.section == "on_failure" else s.cluster
        band = bands.setdefault(key, Band(key, label))
        band.layers.setdefault(layer[s.id], []).append(s.id)
    edges = [(n, s.id) for s in steps for n in s.needs if n in index]
    preds: dict[str, list[str]] = {s.id: [] for s in steps}
    succs: dict[str, list[str]] = {s.id: [] for s in steps}
    for a, b in edges:
        preds[b].append(a)
        succs[a].append(b)
    x0 = 0.0
    for band in bands.values():
        band.x0 = x0 + (BAND_PAD if band.label else 0)
        band.width = band.columns * (NODE_W + GAP_X) - GAP_X
        x0 = band.x0 + band.width + (BAND_PAD if band.label else 0) + GAP_X * 1.5
    pos = _place(bands.values())
    for sweep in range(4):   # barycentre ordering: down the layers by predecessors, then up by successors
        neighbours = preds if sweep % 2 == 0 else succs
        for band in bands.values():
            for depth in sorted(band.layers, reverse=sweep % 2 == 1):
                band.layers[depth].sort(key=lambda n: (_barycentre(n, neighbours, pos), index[n]))
        pos = _place(bands.values())
    depth_max = max(layer.values(), default=0)
    height = TOP * 2 + 24 + (depth_max + 1) * (NODE_H + GAP_Y)
    return Layout(pos, list(bands.values()), max(x0 - GAP_X * 1.5, NODE_W), height, edges)


def _barycentre(node: str, neighbours: Mapping[str, list[str]], pos: Mapping[str, tuple[float, float]]) -> float:
    xs = [pos[n][0] for n in neighbours[node] if n in pos]
    return sum(xs) / len(xs) if xs else pos[node][0]


def _place(bands: Iterable[Band]) -> dict[str, tuple[float, float]]:
    pos: dict[str, tuple[float, float]] = {}
    label_space = 24
    for band in bands:
        for depth, members in band.layers.items():
            offset = (band.columns - len(members)) * (NODE_W + GAP_X) / 2   # centre short layers in the band
            for i, sid in enumerate(members):
                pos[sid] = (band.x0 + offset + i * (NODE_W + GAP_X), TOP + label_space + depth * (NODE_H + GAP_Y))
    return pos


def _short(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _worst(counts: Counts, order: Sequence[str]) -> str:
    return next((k for k in order if counts.get(k)), "none")


def bar(counts: Counts, order: Sequence[str], x: float, y: float, width: float, height: float) -> list[str]:
    """Rects of a stacked bar: one segment per status, widths proportional to the counts."""
    total = sum(counts.get(k, 0) for k in order)
    if not total:
        return [f'<rect class="seg st-none" x="{x:.1f}" y="{y:.1f}" width="{width:.1f}" height="{height:.1f}"/>']
    # A single failure among thousands must stay visible: every present status gets at least 0.4 %.
    widths = {k: max(width * 0.004, width * counts[k] / total) for k in order if counts.get(k)}
    scale = width / sum(widths.values())
    out, cursor = [], x
    for k, w in widths.items():
        out.append(f'<rect class="seg st-{k}" x="{cursor:.2f}" y="{y:.1f}" width="{w * scale:.2f}" height="{height:.1f}"/>')
        cursor += w * scale
    return out


def summary(counts: Counts, order: Sequence[str], labels: Mapping[str, str] | None = None) -> str:
    """`3 ok · 1 failed` in status order."""
    return " · ".join(f"{counts[k]} {(labels or {}).get(k, k)}" for k in order if counts.get(k)) or "no tasks"


def graph_svg(steps: Sequence[StepInfo], counts: Mapping[str, Counts], order: Sequence[str], red: Redact,
              labels: Mapping[str, str] | None = None) -> str:
    """The step graph as an SVG document fragment: one `g.node` per step, coloured by its outcome counts."""
    lay = layout(steps)
    out = [f'<svg class="graph" role="img" aria-label="step graph" '
           f'width="{lay.width + 4:.0f}" height="{lay.height:.0f}" viewBox="-2 0 {lay.width + 4:.0f} {lay.height:.0f}">',
           '<defs><marker id="arrow" viewBox="0 0 10 10" refX="9" refY="5" markerWidth="7" markerHeight="7" '
           'orient="auto-start-reverse"><path d="M0,0 L10,5 L0,10 z" class="arrowhead"/></marker></defs>']
    for band in lay.bands:
        if band.label and band.layers:
            depths = sorted(band.layers)
            y0 = TOP + depths[0] * (NODE_H + GAP_Y)
            y1 = TOP + 24 + depths[-1] * (NODE_H + GAP_Y) + NODE_H + BAND_PAD
            out.append(f'<g class="cluster"><rect x="{band.x0 - BAND_PAD:.0f}" y="{y0:.0f}" width="{band.width + 2 * BAND_PAD:.0f}" '
                       f'height="{y1 - y0:.0f}" rx="10"/><text x="{band.x0 - BAND_PAD + 10:.0f}" y="{y0 + 17:.0f}">'
                       f'{_text(red, band.label)}</text></g>')
    for a, b in lay.edges:
        (ax, ay), (bx, by) = lay.pos[a], lay.pos[b]
        sx, sy, tx, ty = ax + NODE_W / 2, ay + NODE_H, bx + NODE_W / 2, by
        mid = (sy + ty) / 2 if ty > sy else sy + GAP_Y / 2
        out.append(f'<path class="edge" d="M{sx:.0f},{sy:.0f} C{sx:.0f},{mid:.0f} {tx:.0f},{mid:.0f} {tx:.0f},{ty - 1:.0f}" '
                   'marker-end="url(#arrow)"/>')
    for i, s in enumerate(steps):
        x, y = lay.pos[s.id]
        c = counts.get(s.id, {})
        counted = summary(c, order, labels)
        out.append(f'<g class="node worst-{_worst(c, order)}" data-step="{_text(red, s.id)}" id="node-{i}" tabindex="0">'
                   f'<title>{_text(red, f"{s.name} ({s.id}, {s.action}): {counted}")}</title>'
                   f'<rect class="box" x="{x:.0f}" y="{y:.0f}" width="{NODE_W}" height="{NODE_H}" rx="7"/>'
                   f'<text class="name" x="{x + 10:.0f}" y="{y + 18:.0f}">{_text(red, s.name, 27)}</text>'
                   f'<text class="sub" x="{x + 10:.0f}" y="{y + 33:.0f}">{_text(red, f"{s.id} · {s.action}", 32)}</text>'
                   + "".join(bar(c, order, x + 10, y + 41, NODE_W - 20, 7))
                   + f'<text class="cnt" x="{x + 10:.0f}" y="{y + NODE_H - 8:.0f}">{_text(red, counted, 36)}</text></g>')
    out.append("</svg>")
    return "".join(out)


HOST_ROW = 18
HOST_LABEL_W = 190
HOST_BAR_W = 420


def host_bars_svg(hosts: Sequence[str], counts: Mapping[str, Counts], order: Sequence[str], red: Redact,
                  labels: Mapping[str, str] | None = None) -> str:
    """One row per host: name, a stacked status bar and its counts (one SVG, so thousands of hosts stay light)."""
    height = max(1, len(hosts)) * HOST_ROW + 4
    width = HOST_LABEL_W + HOST_BAR_W + 520
    out = [f'<svg class="hostbars" width="{width}" height="{height}" '
           f'viewBox="0 0 {width} {height}" role="img" aria-label="status per host">']
    for i, h in enumerate(hosts):
        y = 2 + i * HOST_ROW
        c = counts.get(h, {})
        counted = summary(c, order, labels)
        out.append(f'<g class="hostrow" data-host="{_text(red, h)}"><title>{_text(red, f"{h}: {counted}")}</title>'
                   f'<text class="hn" x="0" y="{y + 13}">{_text(red, h, 26)}</text>'
                   + "".join(bar(c, order, HOST_LABEL_W, y + 3, HOST_BAR_W, HOST_ROW - 6))
                   + f'<text class="hc" x="{HOST_LABEL_W + HOST_BAR_W + 10}" y="{y + 13}">{html.escape(counted)}</text></g>')
    out.append("</svg>")
    return "".join(out)


def total_bar_svg(counts: Counts, order: Sequence[str]) -> str:
    """The whole run's outcome as one wide stacked bar."""
    return ('<svg class="totalbar" viewBox="0 0 1000 14" preserveAspectRatio="none" '
            'role="img" aria-label="all tasks by status">' + "".join(bar(counts, order, 0, 0, 1000, 14)) + "</svg>")
