"""`GET /dashboard`: a live page of the queues and recent jobs, with a form to submit one."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse
from fastapi.templating import Jinja2Templates
from pydantic import BaseModel

from jobqueue.jobs import JobKind

PACKAGE_DIR = Path(__file__).resolve().parents[1]
STATIC_DIR = PACKAGE_DIR / "static"
templates = Jinja2Templates(directory=PACKAGE_DIR / "templates")
router = APIRouter(tags=["server"])


@dataclass
class FormField:
    """One option of a job kind as an <input>."""

    name: str
    input_type: str  # "number" or "text"
    step: str | None
    minimum: Any
    maximum: Any
    default: Any
    description: str


def form_fields(options: type[BaseModel]) -> list[FormField]:
    """The <input>s for a kind's options, read off its pydantic model's JSON schema."""
    fields = []
    for name, schema in options.model_json_schema()["properties"].items():
        # An optional option is anyOf [its type, null]; the first choice carries the limits.
        choice = next((c for c in schema.get("anyOf", [schema]) if c.get("type") != "null"),
                      schema)
        number = choice.get("type") in ("integer", "number")
        fields.append(FormField(
            name=name,
            input_type="number" if number else "text",
            step=("1" if choice.get("type") == "integer" else "any") if number else None,
            minimum=choice.get("minimum", choice.get("exclusiveMinimum")),
            maximum=choice.get("maximum", choice.get("exclusiveMaximum")),
            default=schema.get("default"),
            description=schema.get("description", ""),
        ))
    return fields


@dataclass
class KindForm:
    kind: JobKind
    fields: list[FormField]

    @property
    def takes_file(self) -> bool:
        return self.kind.sample is not None


@router.get("/dashboard", response_class=HTMLResponse,
            summary="A live dashboard: queues, recent jobs with progress, and a submit form")
async def dashboard(request: Request) -> HTMLResponse:
    kinds = request.app.state.kinds.values()
    forms = [KindForm(kind, form_fields(kind.options)) for kind in kinds]
    keys_required = bool(request.app.state.settings.api_key_list)
    return templates.TemplateResponse(request, "dashboard.html",
                                      {"forms": forms, "keys_required": keys_required})
