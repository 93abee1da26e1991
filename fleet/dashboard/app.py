"""The dashboard's pages and JSON API (Starlette), read-only; live updates by server-sent events.

Routes: ``/`` (fleet, rounds, learning, traffic, privacy), ``/device/{id}`` (one device), ``/api/summary``,
``/api/devices?page=&size=&q=&online=``, ``/api/device/{id}``, ``/api/rounds``, ``/api/curves``,
``/chart/{accuracy|traffic|privacy}.png`` (drawn server-side with matplotlib, cached per ``seq``) and
``/events`` (``text/event-stream``: one ``data: {"seq": N}`` per change). With a token every route requires it
(``?token=``, a ``Bearer`` header, or the cookie the first authorised page sets); there is no write route.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import io
import json
from html import escape
from pathlib import Path

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Route

PAGE = (Path(__file__).parent / "page.html").read_text()
COOKIE = "tinyfleet_dashboard"
KEEPALIVE_S = 15.0


def make_app(dash) -> Starlette:
    """The app for one :class:`~fleet.dashboard.server.Dashboard`."""
    charts: dict[str, tuple[int, bytes]] = {}

    def authorised(request: Request) -> bool:
        if dash.token is None:
            return True
        given = (request.query_params.get("token") or request.cookies.get(COOKIE)
                 or request.headers.get("authorization", "").removeprefix("Bearer ").strip())
        return bool(given) and hmac.compare_digest(given.encode(), dash.token.encode())

    def guard(handler):
        async def wrapped(request: Request) -> Response:
            if not authorised(request):
                return JSONResponse({"error": "access token required (?token=...)"}, status_code=401)
            resp = await handler(request)
            if dash.token is not None and request.query_params.get("token"):
                resp.set_cookie(COOKIE, dash.token, httponly=True, samesite="strict")
            return resp
        return wrapped

    async def index(request: Request) -> Response:
        return HTMLResponse(PAGE.replace("{{FLEET}}", escape(dash.view.fleet)).replace("{{DEVICE}}", ""))

    async def device_html(request: Request) -> Response:
        did = request.path_params["device_id"]
        return HTMLResponse(PAGE.replace("{{FLEET}}", escape(dash.view.fleet)).replace("{{DEVICE}}", escape(did)))

    async def summary(request: Request) -> Response:
        return JSONResponse(dash.read(lambda v: v.summary()))

    async def devices(request: Request) -> Response:
        q = request.query_params
        try:
            page, size = int(q.get("page", 0)), int(q.get("size", 50))
        except ValueError:
            return JSONResponse({"error": "page and size must be integers"}, status_code=400)
        return JSONResponse(dash.read(lambda v: v.device_page(page, size, q.get("q", ""), q.get("online") == "1")))

    async def device(request: Request) -> Response:
        row = dash.read(lambda v: v.device(request.path_params["device_id"]))
        return JSONResponse(row) if row is not None else JSONResponse({"error": "no such device"}, status_code=404)

    async def rounds(request: Request) -> Response:
        return JSONResponse(dash.read(lambda v: v.rounds_table()))

    async def curves(request: Request) -> Response:
        return JSONResponse(dash.read(lambda v: v.curves()))

    async def chart(request: Request) -> Response:
        name = request.path_params["name"]
        if name not in DRAW:
            return JSONResponse({"error": f"no chart {name!r}"}, status_code=404)
        seq, data = dash.read(lambda v: (v.seq, v.curves()))
        if charts.get(name, (-1, b""))[0] != seq:
            png = await asyncio.get_running_loop().run_in_executor(None, DRAW[name], data)
            charts[name] = (seq, png)
        return Response(charts[name][1], media_type="image/png", headers={"Cache-Control": "no-store"})

    async def events(request: Request) -> Response:
        q: asyncio.Queue = asyncio.Queue()
        dash.subscribers.add(q)

        async def stream():
            try:
                yield f"data: {json.dumps({'seq': dash.view.seq})}\n\n"
                while True:
                    try:
                        seq = await asyncio.wait_for(q.get(), KEEPALIVE_S)
                        yield f"data: {json.dumps({'seq': seq})}\n\n"
                    except TimeoutError:
                        yield ": keep-alive\n\n"
            finally:
                dash.subscribers.discard(q)

        return StreamingResponse(stream(), media_type="text/event-stream", headers={"Cache-Control": "no-store"})

    routes = [Route("/", guard(index)), Route("/device/{device_id}", guard(device_html)),
              Route("/api/summary", guard(summary)), Route("/api/devices", guard(devices)),
              Route("/api/device/{device_id}", guard(device)), Route("/api/rounds", guard(rounds)),
              Route("/api/curves", guard(curves)), Route("/chart/{name}.png", guard(chart)),
              Route("/events", guard(events))]

    @contextlib.asynccontextmanager
    async def lifespan(app):
        dash.loop = asyncio.get_running_loop()  # NOTE: where update() hands new seqs to the live streams
        yield

    return Starlette(routes=routes, lifespan=lifespan)


# ---------------------------------------------------------------------------------------------------- charts


def _figure(title: str, ylabel: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.2, 2.6), dpi=90)
    ax.set_title(title, fontsize=10)
    ax.set_xlabel("round", fontsize=9)
    ax.set_ylabel(ylabel, fontsize=9)
    ax.grid(alpha=0.3)
    return plt, fig, ax


def _png(plt, fig, ax, empty: bool) -> bytes:
    if empty:
        ax.text(0.5, 0.5, "no data yet", ha="center", va="center", transform=ax.transAxes, color="grey")
    elif ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def draw_accuracy(c: dict) -> bytes:
    plt, fig, ax = _figure("evaluation accuracy", "accuracy")
    for name, pts in sorted(c["accuracy"].items()):
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", ms=3, label=name)
    return _png(plt, fig, ax, not c["accuracy"])


def draw_traffic(c: dict) -> bytes:
    plt, fig, ax = _figure("traffic per round", "bytes")
    for key, label in (("bytes_up", "deltas up"), ("bytes_down", "published down")):
        if c[key]:
            ax.plot([p[0] for p in c[key]], [p[1] for p in c[key]], marker="o", ms=3, label=label)
    return _png(plt, fig, ax, not c["bytes_up"])


def draw_privacy(c: dict) -> bytes:
    plt, fig, ax = _figure("privacy budget", "epsilon")
    if c["epsilon"]:
        ax.plot([p[0] for p in c["epsilon"]], [p[1] for p in c["epsilon"]], marker="o", ms=3, label="spent")
    if c["epsilon_budget"]:
        ax.axhline(c["epsilon_budget"], color="red", ls="--", lw=1, label="budget")
    return _png(plt, fig, ax, not c["epsilon"])


DRAW = {"accuracy": draw_accuracy, "traffic": draw_traffic, "privacy": draw_privacy}
