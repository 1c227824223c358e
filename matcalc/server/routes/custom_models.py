"""Custom model endpoints: upload (multipart), list, get, delete, validate."""

from __future__ import annotations

import json
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Path, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.encoders import jsonable_encoder
from fastapi.responses import JSONResponse
from pydantic import ValidationError

from matcalc.server.envelope import ok
from matcalc.server.auth import require_api_key
from matcalc.server.errors import ApiError, ErrorCode
from matcalc.server.routes import COMMON_ERRORS, error_responses
from matcalc.server.schemas import CustomModelMeta, CustomModelOut, Envelope

router = APIRouter(prefix="/models/custom", tags=["models"], dependencies=[Depends(require_api_key)],
                   responses=COMMON_ERRORS)

ModelId = Annotated[str, Path(min_length=1, max_length=64, description="custom model id (from the upload)")]

_UPLOAD_BODY = {
    "requestBody": {
        "required": True,
        "content": {"multipart/form-data": {"schema": {
            "type": "object", "required": ["file", "metadata"],
            "properties": {
                "file": {"type": "string", "format": "binary", "description": "TorchScript or weights-only file"},
                "metadata": {"type": "string", "description": "JSON: " + json.dumps(
                    {"name": "my-model", "family": "torchscript", "format": "torchscript", "description": "",
                     "options": {"dtype": "float64"}})},
            }}}},
    }
}


def _svc(request: Request) -> Any:
    return request.app.state.custom_models


def _out(row: Any) -> CustomModelOut:
    return CustomModelOut(id=row.id, name=row.name, family=row.family, format=row.format, sha256=row.sha256,
                          size_bytes=row.size_bytes, description=row.description, options=row.options or {},
                          status=row.status, validation=row.validation, created_at=row.created_at)


@router.post("", response_model=Envelope[CustomModelOut], status_code=201, openapi_extra=_UPLOAD_BODY,
             responses=error_responses(409, 415), summary="Upload a model file (multipart: file + metadata JSON)")
async def upload_custom_model(request: Request) -> Any:
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype != "multipart/form-data":
        raise ApiError(ErrorCode.UNSUPPORTED_MEDIA_TYPE, "upload a model as multipart/form-data with the fields "
                                                         "`file` and `metadata` (JSON)")
    form = await request.form(max_files=1, max_fields=10)
    upload = form.get("file")
    if upload is None or isinstance(upload, str):
        raise ApiError(ErrorCode.VALIDATION_ERROR, "multipart upload needs a `file` field with the model file")
    raw = form.get("metadata")
    try:
        fields = json.loads(raw) if isinstance(raw, str) and raw else {}
    except ValueError as exc:
        raise ApiError(ErrorCode.MALFORMED_JSON, f"metadata: not valid JSON: {exc}") from exc
    if not isinstance(fields, dict):
        raise ApiError(ErrorCode.VALIDATION_ERROR, "metadata: must be a JSON object")
    for key in ("name", "family", "format", "description"):  # plain form fields fill what the JSON left out
        v = form.get(key)
        if isinstance(v, str) and v and key not in fields:
            fields[key] = v
    try:
        meta = CustomModelMeta.model_validate(fields)
    except ValidationError as exc:
        errors = [{"loc": ["metadata", *map(str, e["loc"])], "msg": e["msg"], "type": e["type"]}
                  for e in exc.errors()]
        raise ApiError(ErrorCode.VALIDATION_ERROR, f"metadata: {errors[0]['msg']} at "
                                                   f"{'.'.join(errors[0]['loc'])}", {"errors": errors}) from exc
    try:
        row = await run_in_threadpool(_svc(request).upload, meta, upload.file, upload.filename)
    finally:
        await upload.close()
    body = ok(_out(row), f"model {row.name} uploaded; validate it with POST /api/v1/models/custom/{row.id}/validate")
    return JSONResponse(jsonable_encoder(body), status_code=201)


@router.get("", response_model=Envelope[list[CustomModelOut]], summary="Uploaded models and their validation")
def list_custom_models(request: Request) -> dict[str, Any]:
    return ok([_out(r) for r in _svc(request).store.list_custom_models()])


@router.get("/{model_id}", response_model=Envelope[CustomModelOut], responses=error_responses(404),
            summary="One uploaded model with its last validation report")
def get_custom_model(request: Request, model_id: ModelId) -> dict[str, Any]:
    return ok(_out(_svc(request).get(model_id)))


@router.delete("/{model_id}", response_model=Envelope[CustomModelOut], responses=error_responses(404, 409),
               summary="Delete an uploaded model (refused while tasks use it)")
def delete_custom_model(request: Request, model_id: ModelId) -> dict[str, Any]:
    row = _svc(request).delete(model_id)
    return ok(_out(row), f"model {row.name} deleted")


@router.post("/{model_id}/validate", response_model=Envelope[CustomModelOut], status_code=202,
             responses={**error_responses(404, 409), 200: {"model": Envelope[CustomModelOut],
                                                            "description": "validation finished (wait=true)"}},
             summary="Validate in an isolated process (finite, forces = -grad E, rotation, batch); 202, or 200 "
                     "with wait=true once done")
async def validate_custom_model(
    request: Request, model_id: ModelId,
    wait: Annotated[bool, Query(description="answer when validation has finished (200) instead of at once")] = False,
) -> Any:
    svc = _svc(request)
    row = await run_in_threadpool(svc.start_validation, model_id)
    if wait:
        row = await run_in_threadpool(svc.wait, model_id, svc.validation_timeout_s + 60)
        return JSONResponse(jsonable_encoder(ok(_out(row), f"model {row.name}: {row.status}")), status_code=200)
    body = ok(_out(row), f"validating model {row.name}; poll GET /api/v1/models/custom/{row.id}")
    return JSONResponse(jsonable_encoder(body), status_code=202)
