"""The HTTP face of the morphology service (the one FastAPI importer): routes, upload limits, error answers.

POST /v1/predict   multipart form: one or more `file` fields (JPEG/PNG as the shards hold them, or FITS in flux),
                   `survey`, optional `mc_samples`; answers {"model": {...}, "predictions": [...]}
GET  /v1/model     the live version: name, version, schema names, input size and normalisation, provenance, tags
POST /v1/reload    check the registry alias now (as SIGHUP does)
GET  /healthz      liveness and the live version
GET  /metrics      Prometheus text format

A refused request gets a 4xx with {"detail": what is wrong and the fix, "reason": a short tag, "filename"}; the
service goes on serving.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException

from launch.serve_decode import InputError, Upload
from launch.serve_service import Service

ROUTES = ("/v1/predict", "/v1/model", "/v1/reload", "/healthz", "/metrics")


@dataclass(frozen=True)
class AppSettings:
    max_upload_bytes: int = 8 * 2**20  # the whole request body
    max_files: int = 64


class BodyTooLarge(InputError):
    def __init__(self, limit: int) -> None:
        super().__init__(413, "too-large", f"request body over {limit / 2**20:g} MiB (--max-upload-mb); send "
                                           "fewer or smaller files per request")


class Guard:
    """ASGI middleware: counts and times every request by route and status, and bounds the request body before
    anything parses it (by Content-Length, and by counting what arrives when there is none)."""

    def __init__(self, app, service: Service, max_body: int) -> None:
        self.app, self.service, self.max_body = app, service, max_body

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        route = scope["path"] if scope["path"] in ROUTES else "other"
        started, status = time.perf_counter(), [500]
        metrics = self.service.metrics

        async def send_status(message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            declared = dict(scope.get("headers", ())).get(b"content-length")
            if declared is not None and declared.isdigit() and int(declared) > self.max_body:
                metrics.rejected.labels("too-large").inc()
                error = BodyTooLarge(self.max_body)
                await _error_response(error)(scope, receive, send_status)
                return
            await self.app(scope, self._bounded(receive), send_status)
        finally:
            metrics.requests.labels(route, str(status[0])).inc()
            metrics.latency.labels(route).observe(time.perf_counter() - started)

    def _bounded(self, receive):
        seen = [0]

        async def bounded():
            message = await receive()
            if message["type"] == "http.request":
                seen[0] += len(message.get("body", b""))
                if seen[0] > self.max_body:
                    raise BodyTooLarge(self.max_body)
            return message

        return bounded


def _error_response(err: InputError) -> JSONResponse:
    return JSONResponse({"detail": str(err), "reason": err.reason, "filename": err.filename}, status_code=err.status)


async def _uploads(request: Request, settings: AppSettings) -> tuple[list[Upload], str | None, int | None]:
    try:
        async with request.form(max_files=settings.max_files, max_fields=16) as form:  # closes spooled uploads
            items = form.getlist("file")
            if not all(isinstance(item, UploadFile) for item in items):
                raise InputError(400, "not-a-file", "form field 'file' must be a file upload (multipart/form-data "
                                                    "with a filename), not a text value")
            uploads = [Upload(item.filename or f"file{i}", await item.read()) for i, item in enumerate(items)]
            survey, mc = form.get("survey"), form.get("mc_samples")
    except HTTPException as err:
        if "files" in str(err.detail):
            raise InputError(400, "too-many-files", f"{err.detail} (at most {settings.max_files} files per request, "
                                                    "--max-files; send the rest in another request)") from None
        raise InputError(400, "bad-form", f"unreadable multipart form: {err.detail}") from None
    if not uploads:
        raise InputError(400, "no-file", "no 'file' field: send multipart/form-data with one or more 'file' uploads "
                                         "and a 'survey' field")
    if mc is not None:
        try:
            mc = int(str(mc))
        except ValueError:
            raise InputError(400, "bad-mc-samples", f"mc_samples must be an integer, got {str(mc)[:20]!r}") from None
    return uploads, None if survey is None else str(survey), mc


def create_app(service: Service, settings: AppSettings | None = None) -> FastAPI:
    settings = settings or AppSettings()
    app = FastAPI(title="Galaxy Sommelier morphology service", version="1",
                  description="Galaxy Zoo morphology of survey cutouts by a DINOv2 model from the registry")
    app.state.service = service
    app.add_middleware(Guard, service=service, max_body=settings.max_upload_bytes)

    @app.exception_handler(InputError)
    async def refused(request: Request, err: InputError) -> JSONResponse:
        service.metrics.rejected.labels(err.reason).inc()
        return _error_response(err)

    @app.post("/v1/predict")
    async def predict(request: Request) -> JSONResponse:
        uploads, survey, mc = await _uploads(request, settings)
        job = await run_in_threadpool(service.enqueue, uploads, survey, mc)  # decoding is CPU work: off the loop
        result = await asyncio.wrap_future(job.future)
        # Plain JSON types already: a JSONResponse skips FastAPI's per-value encoder walk (latency per request).
        return JSONResponse(service.answer(job, result, [u.filename for u in uploads]))

    @app.get("/v1/model")
    async def model() -> dict:
        return service.describe()

    @app.post("/v1/reload")
    async def reload() -> dict:
        changed = await run_in_threadpool(service.reload)
        return {"changed": changed, "model": service.current.header()}

    @app.get("/healthz")
    async def healthz() -> dict:
        return {"status": "ok", "model": service.current.header()}

    @app.get("/metrics")
    async def metrics() -> Response:
        body, content_type = service.metrics.render()
        return Response(body, media_type=content_type)

    return app
