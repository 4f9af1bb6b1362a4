"""The playground page each service serves at GET /playground: plain HTML, JS and CSS shipped in the
package (no CDN, no build step). The page calls the service's own routes with the API key the user
types in; the key lives in the page's memory only (never stored, never in a URL).

URLs in the page are relative, so it works at /playground on a replica and at /image/playground
or /text/playground behind the proxy. Its Content-Security-Policy allows only this origin's
scripts, styles and calls (plus data:/blob: images for the upload preview and the heatmap);
deploy/nginx/servable.conf.template sends the same policy for these paths.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from starlette.responses import HTMLResponse, Response

STATIC = Path(__file__).resolve().parent  # the page and its assets sit beside this module
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; connect-src 'self'; "
       "base-uri 'none'; form-action 'none'; frame-ancestors 'none'")  # fmt: skip
ASSETS = {"playground.js": "text/javascript; charset=utf-8", "playground.css": "text/css; charset=utf-8"}
PATHS = ("/playground", *(f"/playground/{name}" for name in ASSETS))  # open: no key needed to load the page


def playground_routes(app: FastAPI, kind: str) -> None:
    headers = {"Content-Security-Policy": CSP, "X-Content-Type-Options": "nosniff", "Cache-Control": "no-cache"}
    page = (STATIC / "index.html").read_text().replace("__KIND__", kind)
    assets = {name: (STATIC / name).read_bytes() for name in ASSETS}

    @app.get("/playground", include_in_schema=False)
    async def playground() -> HTMLResponse:
        return HTMLResponse(page, headers=headers)

    @app.get("/playground/{name}", include_in_schema=False)
    async def playground_asset(name: str) -> Response:
        if name not in assets:
            return Response(status_code=404)
        return Response(assets[name], media_type=ASSETS[name], headers=headers)
