"""Figures of releasing.md: the compose release run (tests/test_compose_up.py's release test)."""

from __future__ import annotations

from tests.doc_figures.common import Figure

RELEASE = "docs/results/compose-release.json"


def requests_line(d: dict) -> str:
    r = d["release"]
    ok = r["answers"] == {"200": r["requests"]} and not any(c["nginx_recreated"] for c in r["commands"])
    return f"**{r['requests']:,} requests, all 200**, and nginx never recreated" if ok else "(requests failed)"


def share_line(d: dict) -> str:
    s, w = d["release"]["canary_share"], d["release"]["weight_percent"]
    return (f"{s['from_new']:,} of {s['answers']:,} answers ({100 * s['share']:.1f} %) from the new version, "
            f"within 4 standard deviations of {w} % (±{100 * s['bound']:.1f} points)")  # fmt: skip


FIGURES = [
    Figure("docs/releasing.md", RELEASE, share_line, "compose canary share"),
    Figure("docs/releasing.md", RELEASE, requests_line, "compose release requests"),
    Figure("docs/releasing.md", RELEASE, lambda d: (
        f"Shadow: agreement {d['release']['shadow_agreement']:g} (the candidate"), "compose shadow agreement"),
    Figure("docs/releasing.md", RELEASE, lambda d: (
        f"scraped as job `{d['release']['canary_target']['job']}` with the new version's label"
        if d["release"]["canary_target"]["version"] == d["release"]["new"].split(":")[1] else "(another version)"),
        "compose canary target"),
    Figure("docs/releasing.md", RELEASE, lambda d: (
        f"lost {d['release']['reference_nginx_recreated']['failed']} of "
        f"{d['release']['reference_nginx_recreated']['requests']} requests over "
        f"{d['release']['reference_nginx_recreated']['failed_for_s']:.1f} s"), "compose nginx recreated, reference"),
]  # fmt: skip
