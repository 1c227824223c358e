"""Model endpoints: list, detail, load, unload (custom-model upload lives in its own layer)."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Path, Query, Request
from fastapi.concurrency import run_in_threadpool
from pydantic import BaseModel

from matcalc.server.envelope import ok
from matcalc.server.auth import require_api_key
from matcalc.server.errors import ApiError, ErrorCode
from matcalc.server.routes import COMMON_ERRORS, error_responses, service
from matcalc.server.schemas import Envelope, ModelOut

router = APIRouter(prefix="/models", tags=["models"], dependencies=[Depends(require_api_key)],
                   responses=COMMON_ERRORS)

ModelName = Annotated[str, Path(min_length=1, max_length=128, description="model name, e.g. chgnet or chgnet+d3")]


class UnloadOut(BaseModel):
    name: str
    unloaded: bool


def _card(request: Request, name: str) -> ModelOut:
    from matcalc.models.registry import UnknownModelError, model_card

    settings = request.app.state.settings
    try:
        card = model_card(name, settings.device)
    except UnknownModelError as exc:
        raise ApiError(ErrorCode.MODEL_NOT_FOUND, str(exc)) from exc
    where = service(request).executor.loaded_models().get(card.name, [])
    d = card.to_dict()  # ModelOut leaves out (ignores) the family-specific extras
    d["loaded"] = bool(where)
    return ModelOut(**d, loaded_on=where)


@router.get("", response_model=Envelope[list[ModelOut]], summary="Registered models and where they are loaded")
def list_models(request: Request,
                include_d3: Annotated[bool, Query(description="list the +d3 variants")] = True) -> dict[str, Any]:
    from matcalc.models.registry import model_names

    return ok([_card(request, n) for n in model_names(include_d3=include_d3)])


@router.get("/{name}", response_model=Envelope[ModelOut], responses=error_responses(404), summary="One model")
def get_model(request: Request, name: ModelName) -> dict[str, Any]:
    return ok(_card(request, name))


@router.post("/{name}/load", response_model=Envelope[ModelOut], responses=error_responses(404, 409),
             summary="Load a model on the workers (waits until loaded)")
async def load_model(request: Request, name: ModelName) -> dict[str, Any]:
    card = await run_in_threadpool(_card, request, name)
    if not card.available:
        raise ApiError(ErrorCode.MODEL_UNAVAILABLE, f"model {card.name!r} cannot load here: {card.reason}")
    try:
        await run_in_threadpool(service(request).executor.load_model, card.name)
    except (ImportError, RuntimeError, FileNotFoundError) as exc:
        raise ApiError(ErrorCode.MODEL_UNAVAILABLE, f"model {card.name!r} failed to load: {exc}") from exc
    return ok(await run_in_threadpool(_card, request, name), f"model {card.name} loaded")


@router.post("/{name}/unload", response_model=Envelope[UnloadOut], responses=error_responses(404),
             summary="Drop a model from the workers' memory")
def unload_model(request: Request, name: ModelName) -> dict[str, Any]:
    card = _card(request, name)
    done = service(request).executor.unload_model(card.name)
    return ok(UnloadOut(name=card.name, unloaded=bool(done)),
              f"model {card.name} unloaded" if done else f"model {card.name} was not loaded")
