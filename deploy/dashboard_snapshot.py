"""Grafana dashboard panels drawn as PNGs without Grafana: each panel from its own PromQL targets.

    python -m deploy.dashboard_snapshot --prometheus http://127.0.0.1:9090 --out shots/ \\
        --panel "Shadow: candidate agreement" --panel "Input drift" [--row TITLE] [--all] \\
        [--start 2026-01-01T10:00:00Z --end now] [--step 5]

Reads the generated dashboard (deploy/grafana/dashboards/servable.json, or --dashboard), takes the
panels named (a title, or a part of one that names a single panel; --row: every panel under a row
panel), runs each target's `expr` through Prometheus' /api/v1/query_range over the range (default:
the dashboard's own, now-30m to now) and draws the panel with matplotlib: its title, one line per
series named by the target's legendFormat, the legend's mean and max, the y axis in the panel's unit,
its thresholds where it has some. A panel whose queries return no data is still drawn (empty, "No
data", as Grafana shows it), printed as NO DATA and makes the exit status 3: a broken query cannot
pass for a quiet one. A query Prometheus refuses is drawn with its error and counts the same.

The PNGs are named after the panels' titles (`slug`); `<out>/snapshot.json` records the command, the
date, the machine (servable/machine.py), the range and each panel's series. Grafana itself renders
the same JSON; this draws what its queries return, for docs and CI where no Grafana runs.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
import time
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import requests

from deploy import render

NO_DATA_STATUS = 3
MAX_POINTS = 600  # per series, as Grafana's default max data points for a panel about this wide
SPARSE_POINTS = 30  # a series with so few points is drawn with markers
LEGEND_ROWS = 14  # the legend lists the series with the highest means first; the rest are counted
LEGEND = re.compile(r"\{\{\s*([a-zA-Z_][a-zA-Z0-9_]*)\s*\}\}")


@dataclass
class Series:
    name: str  # the target's legendFormat with the series' labels filled in
    times: list[float]
    values: list[float]

    def finite(self) -> list[float]:
        return [v for v in self.values if math.isfinite(v)]


@dataclass
class Target:
    ref: str
    expr: str
    legend: str
    series: list[Series] = field(default_factory=list)
    error: str | None = None


@dataclass
class PanelShot:
    title: str
    unit: str
    targets: list[Target]
    thresholds: list[tuple[float, str]]  # (value, colour) steps drawn as lines
    path: Path | None = None

    @property
    def series(self) -> list[Series]:
        return [s for t in self.targets for s in t.series if s.finite()]

    @property
    def errors(self) -> list[str]:
        return [f"{t.ref}: {t.error}" for t in self.targets if t.error]

    @property
    def has_data(self) -> bool:
        return bool(self.series) and not self.errors


# ---------------------------------------------------------------- the dashboard


def load_dashboard(path: Path = render.DASHBOARD_JSON) -> dict:
    return json.loads(Path(path).read_text())


def _flat(panels: list[dict]) -> list[dict]:
    """Panels in dashboard order, a collapsed row's own `panels` after it."""
    out = []
    for p in panels:
        out.append(p)
        out.extend(p.get("panels", []) if p.get("type") == "row" else [])
    return out


def select_panels(dashboard: dict, titles: list[str], rows: list[str], every: bool = False) -> list[dict]:
    """The graph panels named: an exact title, or a part of one (case-insensitive) that only one panel has;
    a row's title gives every panel under it (up to the next row). Raises KeyError naming what is unknown."""
    flat = _flat(dashboard.get("panels", []))
    graphs = [p for p in flat if p.get("type") != "row"]
    chosen: list[dict] = list(graphs) if every else []

    def one(title: str, among: list[dict]) -> dict:
        exact = [p for p in among if p.get("title") == title]
        if len(exact) == 1:
            return exact[0]
        found = [p for p in among if title.lower() in p.get("title", "").lower()]
        if len(found) != 1:
            names = "\n  ".join(p.get("title", "") for p in (found or among))
            raise KeyError(f"{title!r} names {len(found)} panels; {'these' if found else 'the titles'}:\n  {names}")
        return found[0]

    for title in titles:
        chosen.append(one(title, graphs))
    for title in rows:
        row = one(title, [p for p in flat if p.get("type") == "row"])
        i = flat.index(row)
        under = row.get("panels") or []
        if not under:  # an open row: the panels after it, up to the next row
            for p in flat[i + 1 :]:
                if p.get("type") == "row":
                    break
                under.append(p)
        chosen.extend(under)
    return list({id(p): p for p in chosen}.values())


def thresholds_of(panel: dict) -> list[tuple[float, str]]:
    """The threshold steps Grafana draws on a time series (thresholdsStyle other than off): (value, colour)."""
    defaults = panel.get("fieldConfig", {}).get("defaults", {})
    style = defaults.get("custom", {}).get("thresholdsStyle", {}).get("mode", "off")
    steps = defaults.get("thresholds", {}).get("steps", [])
    if style == "off":
        return []
    return [(float(s["value"]), str(s.get("color", "red"))) for s in steps if s.get("value") is not None]


# ---------------------------------------------------------------- Prometheus


def legend_name(fmt: str, labels: dict[str, str]) -> str:
    """Grafana's legendFormat: {{label}} is the series' label value (empty when it has none); no format: the
    series' labels as PromQL writes them."""
    if fmt:
        return LEGEND.sub(lambda m: labels.get(m[1], ""), fmt).strip()
    name = labels.get("__name__", "")
    inner = ", ".join(f'{k}="{v}"' for k, v in sorted(labels.items()) if k != "__name__")
    return f"{name}{{{inner}}}" if inner or not name else name


def query_range(prometheus: str, expr: str, start: float, end: float, step: float,
                timeout_s: float = 30.0) -> list[tuple[dict, list[float], list[float]]]:  # fmt: skip
    """(labels, times, values) per series; raises RuntimeError with Prometheus' own error."""
    try:
        r = requests.get(f"{prometheus.rstrip('/')}/api/v1/query_range", timeout=timeout_s,
                         params={"query": expr, "start": start, "end": end, "step": step})  # fmt: skip
    except requests.RequestException as exc:
        raise RuntimeError(f"Prometheus at {prometheus} did not answer: {exc}") from exc
    try:
        body = r.json()
    except ValueError:
        raise RuntimeError(f"HTTP {r.status_code} without a JSON body: {r.text[:200]}") from None
    if body.get("status") != "success":
        raise RuntimeError(f"{body.get('errorType', r.status_code)}: {body.get('error', body)}")
    return [(s["metric"], [float(t) for t, _ in s["values"]], [float(v) for _, v in s["values"]])
            for s in body["data"]["result"]]  # fmt: skip


def run_panel(panel: dict, prometheus: str, start: float, end: float, step: float) -> PanelShot:
    targets = []
    for i, t in enumerate(panel.get("targets", [])):
        if t.get("hide"):
            continue
        target = Target(t.get("refId", chr(ord("A") + i)), t["expr"], t.get("legendFormat", ""))
        try:
            target.series = [Series(legend_name(target.legend, labels), ts, vs)
                             for labels, ts, vs in query_range(prometheus, target.expr, start, end, step)]  # fmt: skip
        except RuntimeError as exc:
            target.error = str(exc)
        targets.append(target)
    unit = panel.get("fieldConfig", {}).get("defaults", {}).get("unit", "short")
    return PanelShot(panel.get("title", ""), unit, targets, thresholds_of(panel))


# ---------------------------------------------------------------- drawing


def format_value(value: float, unit: str) -> str:
    """A value as Grafana shows it in the panel's unit (the few units the dashboard uses)."""
    if not math.isfinite(value):
        return str(value)
    if unit == "percentunit":
        return f"{value * 100:.3g}%"
    if unit == "s":
        for scale, suffix in ((1.0, "s"), (1e-3, "ms"), (1e-6, "µs")):
            if abs(value) >= scale or scale == 1e-6:
                return f"{value / scale:.3g} {suffix}" if value else "0 s"
    text = f"{value:.3g}"
    for scale, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= scale:
            text = f"{value / scale:.3g}{suffix}"
            break
    return f"{text} req/s" if unit == "reqps" else text


def slug(title: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", title.lower()).strip("-")[:60].rstrip("-") or "panel"


def _with_gaps(times: list[float], values: list[float], step: float) -> tuple[list[datetime], list[float]]:
    """Points more than two steps apart are not joined (Grafana leaves the gap too)."""
    xs: list[datetime] = []
    ys: list[float] = []
    for i, (t, v) in enumerate(zip(times, values, strict=True)):
        if i and t - times[i - 1] > 2 * step:
            xs.append(datetime.fromtimestamp((t + times[i - 1]) / 2, UTC))
            ys.append(math.nan)
        xs.append(datetime.fromtimestamp(t, UTC))
        ys.append(v if math.isfinite(v) else math.nan)
    return xs, ys


def draw(shot: PanelShot, path: Path, start: float, end: float, step: float) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.dates as mdates
    import matplotlib.pyplot as plt
    from matplotlib.colors import is_color_like
    from matplotlib.ticker import FuncFormatter

    series = sorted(shot.series, key=lambda s: -sum(s.finite()) / len(s.finite()))
    fig, ax = plt.subplots(figsize=(9, 4.6), dpi=100)
    try:
        colours = plt.get_cmap("tab20").colors
        for i, s in enumerate(series):
            xs, ys = _with_gaps(s.times, s.values, step)
            vals = s.finite()
            label = (f"{s.name or '(no name)'}   mean {format_value(sum(vals) / len(vals), shot.unit)}"
                     f"   max {format_value(max(vals), shot.unit)}")  # fmt: skip
            sparse = len(vals) <= SPARSE_POINTS  # as Grafana's showPoints "auto": a lone point still shows
            ax.plot(xs, ys, color=colours[i % len(colours)], linewidth=1.6, marker="o" if sparse else None,
                    markersize=3, label=label if i < LEGEND_ROWS else None)  # fmt: skip
        for value, named in shot.thresholds:
            colour = named if is_color_like(named) else "red"  # Grafana's own names ("semi-dark-red") read as red
            ax.axhline(value, color=colour, linestyle="--", linewidth=1.2)
            ax.annotate(f"threshold {format_value(value, shot.unit)}", (1, value), xycoords=("axes fraction", "data"),
                        ha="right", va="bottom", fontsize=8, color=colour)  # fmt: skip
        ax.set_xlim(datetime.fromtimestamp(start, UTC), datetime.fromtimestamp(end, UTC))
        ax.xaxis.set_major_formatter(mdates.DateFormatter("%H:%M" if end - start > 600 else "%H:%M:%S", tz=UTC))
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: format_value(v, shot.unit)))
        ax.grid(True, alpha=0.3)
        ax.set_title(shot.title, loc="left", fontsize=11, fontweight="bold")
        ax.set_xlabel(f"time (UTC); drawn by deploy/dashboard_snapshot.py from the panel's queries "
                      f"(Prometheus query_range, step {step:g} s)", fontsize=7, color="#555")  # fmt: skip
        if not shot.has_data:
            text = "No data" if not shot.errors else "Query error\n" + "\n".join(e[:110] for e in shot.errors)
            ax.text(0.5, 0.5, text, transform=ax.transAxes, ha="center", va="center", fontsize=14, color="#b00")
        if series:
            more = len(series) - LEGEND_ROWS
            legend = ax.legend(loc="upper left", bbox_to_anchor=(0, -0.14), fontsize=7.5, frameon=False,
                               ncol=1, title=f"+ {more} more series (lowest means)" if more > 0 else None)  # fmt: skip
            if more > 0:
                legend.get_title().set_fontsize(7.5)
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, bbox_inches="tight")
    finally:
        plt.close(fig)
    return path


# ---------------------------------------------------------------- the command


def default_step(start: float, end: float) -> float:
    return max(1.0, math.ceil((end - start) / MAX_POINTS))


def parse_time(text: str, now: float) -> float:
    """now, now-30m (s, m, h, d), unix seconds, or ISO 8601 (UTC when it names no zone)."""
    m = re.fullmatch(r"now(?:-(\d+)([smhd]))?", text.strip())
    if m:
        return now - (int(m[1]) * {"s": 1, "m": 60, "h": 3600, "d": 86400}[m[2]] if m[1] else 0)
    try:
        return float(text)
    except ValueError:
        when = datetime.fromisoformat(text.replace("Z", "+00:00"))
        return (when if when.tzinfo else when.replace(tzinfo=UTC)).timestamp()


def snapshot(panels: list[dict], prometheus: str, out: Path, start: float, end: float,
             step: float | None = None) -> list[PanelShot]:  # fmt: skip
    """Each panel queried and drawn to <out>/<slug(title)>.png."""
    step = step or default_step(start, end)
    shots = []
    for panel in panels:
        shot = run_panel(panel, prometheus, start, end, step)
        shot.path = draw(shot, out / f"{slug(shot.title)}.png", start, end, step)
        shots.append(shot)
    return shots


def record(shots: list[PanelShot], start: float, end: float, step: float, command: str) -> dict:
    """What snapshot.json keeps: how the pictures were made, and what each panel's queries returned."""
    from servable.machine import describe_machine

    def iso(t: float) -> str:
        return datetime.fromtimestamp(t, UTC).isoformat(timespec="seconds")

    return {
        "command": command, "date": iso(time.time()), "machine": describe_machine(),
        "range": {"start": iso(start), "end": iso(end), "step_s": step},
        "panels": [{"title": s.title, "file": s.path.name if s.path else None, "has_data": s.has_data,
                    "targets": [{**{k: v for k, v in asdict(t).items() if k != "series"},
                                 "series": [x.name for x in t.series if x.finite()]} for t in s.targets]}
                   for s in shots],
    }  # fmt: skip


def report(shots: list[PanelShot]) -> list[str]:
    lines = []
    for s in shots:
        if s.has_data:
            lines.append(f"ok       {s.title}: {len(s.series)} series -> {s.path}")
        else:
            why = "; ".join(s.errors) or "every query returned nothing: " + " | ".join(t.expr for t in s.targets)
            lines.append(f"NO DATA  {s.title}: {why} -> {s.path}")
    return lines


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prometheus", default="http://127.0.0.1:9090", help="Prometheus' URL")
    ap.add_argument("--dashboard", type=Path, default=render.DASHBOARD_JSON)
    ap.add_argument("--panel", action="append", default=[], help="a panel's title, or a part of it naming one")
    ap.add_argument("--row", action="append", default=[], help="every panel under this row")
    ap.add_argument("--all", action="store_true", help="every panel of the dashboard")
    ap.add_argument("--start", help="now-30m, unix seconds or ISO 8601 (default: the dashboard's time.from)")
    ap.add_argument("--end", help="as --start (default: the dashboard's time.to)")
    ap.add_argument("--step", type=float, help=f"seconds between points (default: the range / {MAX_POINTS})")
    ap.add_argument("--out", type=Path, required=True, help="folder for the PNGs and snapshot.json")
    args = ap.parse_args(argv)
    dashboard = load_dashboard(args.dashboard)
    if not (args.panel or args.row or args.all):
        ap.error("name panels (--panel), rows (--row) or --all")
    try:
        panels = select_panels(dashboard, args.panel, args.row, args.all)
    except KeyError as exc:
        print(exc.args[0], file=sys.stderr)
        return 2
    now = time.time()
    start = parse_time(args.start or dashboard.get("time", {}).get("from", "now-30m"), now)
    end = parse_time(args.end or dashboard.get("time", {}).get("to", "now"), now)
    step = args.step or default_step(start, end)
    shots = snapshot(panels, args.prometheus, args.out, start, end, step)
    command = "python -m deploy.dashboard_snapshot " + " ".join(argv if argv is not None else sys.argv[1:])
    (args.out / "snapshot.json").write_text(json.dumps(record(shots, start, end, step, command), indent=2) + "\n")
    print("\n".join(report(shots)))
    return 0 if all(s.has_data for s in shots) else NO_DATA_STATUS


if __name__ == "__main__":
    raise SystemExit(main())
