"""Structure endpoints: upload (JSON or multipart), list, get, builtins."""

from __future__ import annotations

import functools
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Path, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError

from matcalc.server.envelope import ok
from matcalc.server.auth import require_api_key
from matcalc.server.errors import ApiError, ErrorCode
from matcalc.server.routes import COMMON_ERRORS, error_responses, service, store
from matcalc.server.schemas import (
    BuiltinOut,
    Envelope,
    StructureOut,
    StructurePage,
    StructureUpload,
    StructureUploadOut,
)
from matcalc.server.service import parse_structure
from matcalc.store import NotFoundError

router = APIRouter(prefix="/structures", tags=["structures"], dependencies=[Depends(require_api_key)],
                   responses=COMMON_ERRORS)

_STRUCTURE_LINK = {"links": {"GetStructure": {"operationId": "get_structure",
                                               "parameters": {"structure_id": "$response.body#/data/id"}}}}
_UPLOAD_BODY = {
    "responses": {"201": _STRUCTURE_LINK, "200": _STRUCTURE_LINK},
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {"schema": StructureUpload.model_json_schema()},
            "multipart/form-data": {"schema": {
                "type": "object", "required": ["file"],
                "properties": {"file": {"type": "string", "format": "binary"},
                               "format": {"type": "string", "enum": ["cif", "vasp", "poscar", "xyz", "extxyz"]},
                               "name": {"type": "string", "maxLength": 256}}}},
        },
    }
}


async def _read_upload(request: Request) -> StructureUpload:
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype == "application/json":
        try:
            raw = await request.json()
        except ValueError as exc:
            raise ApiError(ErrorCode.MALFORMED_JSON, f"malformed JSON body: {exc}") from exc
        try:
            return StructureUpload.model_validate(raw)
        except ValidationError as exc:
            raise RequestValidationError([{**e, "loc": ("body", *e["loc"])} for e in exc.errors()]) from exc
    if ctype == "multipart/form-data":
        form = await request.form(max_files=1, max_fields=10)
        upload = form.get("file")
        if upload is None or isinstance(upload, str):
            raise ApiError(ErrorCode.VALIDATION_ERROR, "multipart upload needs a `file` field with the structure file")
        data = await upload.read()
        try:
            content = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ApiError(ErrorCode.INVALID_STRUCTURE,
                           f"file: not UTF-8 text ({exc.reason} at byte {exc.start})") from exc
        fields: dict[str, Any] = {"content": content}
        for key in ("format", "name"):
            v = form.get(key)
            if isinstance(v, str) and v:
                fields[key] = v
        if "name" not in fields and upload.filename:
            fields["name"] = upload.filename[:256]
        if "format" not in fields and upload.filename:
            suffix = upload.filename.rsplit(".", 1)[-1].lower() if "." in upload.filename else ""
            if suffix in ("cif", "vasp", "poscar", "xyz", "extxyz"):
                fields["format"] = suffix
        if not content:
            raise ApiError(ErrorCode.INVALID_STRUCTURE, "file: empty upload")
        try:
            return StructureUpload.model_validate(fields)
        except ValidationError as exc:
            raise RequestValidationError([{**e, "loc": ("body", *e["loc"])} for e in exc.errors()]) from exc
    raise ApiError(ErrorCode.UNSUPPORTED_MEDIA_TYPE,
                   f"unsupported content type {ctype or '(none)'!r}; send application/json or multipart/form-data")


@router.post("", response_model=Envelope[StructureUploadOut], status_code=201, openapi_extra=_UPLOAD_BODY,
             responses={200: {"model": Envelope[StructureUploadOut],
                              "description": "an identical structure was already stored (deduplicated)"},
                        **error_responses(415)},
             summary="Upload a structure (CIF, XYZ/extXYZ, POSCAR)")
async def upload_structure(request: Request) -> Any:
    """JSON `{content, format?, name?}` or multipart with a `file` field. The format is detected when
    not given. Deduplicated by the structure's canonical sha256 (the id): uploading the same
    structure again returns the stored one with `created: false` (HTTP 200)."""
    body = await _read_upload(request)
    settings = request.app.state.settings

    def work() -> tuple[Any, bool]:
        parsed = parse_structure(body.content, body.format, max_atoms=settings.max_atoms, name=body.name,
                                 what="structure")
        return store(request).add_structure(parsed.atoms, parsed.content, parsed.fmt, name=parsed.name,
                                            source="upload")

    row, created = await run_in_threadpool(work)
    out = StructureUploadOut(**StructureOut.of(row).model_dump(), created=created)
    payload = ok(out, "structure stored" if created else "structure already stored")
    return JSONResponse(jsonable_encoder(payload), status_code=201 if created else 200)


@router.get("", response_model=Envelope[StructurePage], summary="List stored structures (newest first)")
def list_structures(request: Request, page: Annotated[int, Query(ge=1, le=1_000_000)] = 1,
                    page_size: Annotated[int, Query(ge=1, le=500)] = 50,
                    source: Annotated[str | None, Query(pattern="^(upload|inline|builtin)$")] = None) -> dict[str, Any]:
    p = store(request).list_structures(page=page, page_size=page_size, source=source)
    return ok(StructurePage(items=[StructureOut.of(r) for r in p.items], total=p.total, page=p.page,
                            page_size=p.page_size))


@functools.cache
def _builtins() -> list[BuiltinOut]:
    from matcalc.structures import builtin_path, formula, list_builtins, load_structure

    out = []
    for name in list_builtins():
        atoms = load_structure(builtin_path(name))
        out.append(BuiltinOut(name=name, formula=formula(atoms), n_atoms=len(atoms)))
    return out


@router.get("/builtin", response_model=Envelope[list[BuiltinOut]], summary="Structures shipped with matcalc")
def list_builtin() -> dict[str, Any]:
    """Use a name as `builtin` in a task request."""
    return ok(_builtins())


@router.get("/{structure_id}", response_model=Envelope[StructureOut], responses=error_responses(404),
            summary="A stored structure, with its original text")
def get_structure(request: Request, structure_id: Annotated[str, Path(min_length=1, max_length=64)]) -> dict[str, Any]:
    try:
        row = store(request).get_structure(structure_id)
    except NotFoundError as exc:
        raise ApiError(ErrorCode.STRUCTURE_NOT_FOUND, f"structure {structure_id!r} not found") from exc
    return ok(StructureOut.of(row, with_content=True))


__all__ = ["router", "service"]
