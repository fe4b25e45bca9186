"""The dashboard: one static page (plain HTML/JS/CSS, no build step) served at /."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, HTTPException
from fastapi.responses import FileResponse

DASHBOARD_DIR = Path(__file__).resolve().parent.parent / "dashboard"
# served by name from a fixed list: nothing else under the package can be reached
ASSETS = {
    "dashboard.js": "text/javascript",
    "dashboard.css": "text/css",
}

router = APIRouter(include_in_schema=False)


@router.get("/")
def index() -> FileResponse:
    return FileResponse(DASHBOARD_DIR / "index.html", media_type="text/html")


@router.get("/dashboard/{asset}")
def asset(asset: str) -> FileResponse:
    if asset not in ASSETS:
        raise HTTPException(status_code=404, detail="no such dashboard file")
    return FileResponse(DASHBOARD_DIR / asset, media_type=ASSETS[asset])
