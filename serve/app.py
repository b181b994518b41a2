"""The HTTP API (FastAPI ingress) and `build_app`, the one typed builder of the Serve app.

    serve run serve.app:build_app config=serve/configs/demo.yaml out=runs/index
    serve deploy / KubeRay RayService: import_path serve.app:build_app, args {config, ...}

`build_app(args)` takes `config` (a YAML path, default serve/configs/demo.yaml), optionally
`overrides` (a list of key=value) and any other key as one more override (`out=...`,
`serve.text_encoder.max_replicas=4`), loads the typed `AppConfig`, and composes
Ingress(TextEncoder, VideoEncoder, Searcher[, Reranker]) with per-deployment autoscaling, request
caps and resources. `serve.host`/`serve.port`/`serve.app_name` are not read here: `clipray serve`
passes them to Serve, while `serve run` (127.0.0.1:8000) and a RayService (`http_options`) set
the address themselves.

Endpoints: POST /search, /search/video, /encode/text, /encode/video; GET /healthz,
/clips/{clip_id} (the indexed file of a clip, with HTTP Range), / (search page), /docs.
Every bad input is a 4xx whose JSON body has an `error` sentence: validation runs here, before
any model is called, and the limits (text length, k, upload size) come from `serve.limits`.
This module must not use `from __future__ import annotations`: Serve reads the builder's
pydantic annotation to validate its args.
"""

import asyncio
import json
import os
import re
import sys
from pathlib import Path
from typing import Any, Optional

import numpy as np
from fastapi import FastAPI, File, Form, HTTPException, Request, UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse
from pydantic import BaseModel, ConfigDict, Field
from ray import serve

from clipray.config import ConfigError
from clipray.sources.base import VIDEO_TYPES
from serve import store
from serve.config import AppConfig, deployment_options, load_app_config
from serve.deployments import NO_ROOM, Reranker, Searcher, TextEncoder, VideoEncoder

PAGE = Path(__file__).with_name("page.html")
UPLOAD_PATHS = ("/search/video", "/encode/video")
JSON_PATHS = ("/search", "/encode/text")
DEFAULT_K = 10  # results when a request gives no k (serve.limits.max_k where that is lower)
_METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")  # a 405's Allow names those served
PAGE_K = 8  # results the search page asks for until its box is changed (max_k where lower)


def _no_default(schema: dict) -> None:
    """No `"default": null` in the schema of a field that takes no null (k's default is said
    in its description)."""
    schema.pop("default", None)


class SearchRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")  # a stray `path` field is refused, not ignored
    text: str = Field(min_length=1, description="the query; limit: serve.limits.max_text_chars")
    # strict: pydantic's lax mode took `true` for k=1, "3" for 3 and 2.0 for 2. Left out, k is
    # None (the default is not validated); given, it is an integer: `"k": null` is refused, where
    # Optional[int] took it for the default (10 results)
    k: int = Field(None, ge=1, strict=True, json_schema_extra=_no_default,
                   description=f"results wanted (default {DEFAULT_K}, or serve.limits.max_k where lower); "
                               "limit: serve.limits.max_k")


class TextRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    text: str = Field(min_length=1)


class Hit(BaseModel):
    clip_id: int
    video_id: str
    score: float
    start: Optional[float]
    end: Optional[float]


class SearchResponse(BaseModel):
    results: list[Hit]


class Embedding(BaseModel):
    embedding: list[float]
    dim: int


class Health(BaseModel):
    status: str
    clips: int
    index: str
    rerank: bool


class ErrorBody(BaseModel):
    """Every 4xx: the field and the rule in one sentence (FastAPI's own 422 body, which the
    schema documented by default, is replaced by this one)."""
    error: str
    detail: Optional[list[str]] = Field(None, description="one sentence per invalid field (422 only)")


_WHY = {400: "a body that cannot be parsed", 404: "an unknown clip id, or its file is not on this server",
        413: "a body over the limit (serve.limits.max_upload_mb, or 64 KiB + 12 bytes a character of "
             "serve.limits.max_text_chars for a JSON query)",
        415: "an upload that is not a usable video", 416: "a Range past the end of the file",
        422: "a missing, unknown or invalid field, with the rule it breaks",
        503: "this server cannot store the upload now (its temporary folder not writable): try again later",
        507: "this server has no room to store the upload now (its disk full): try again later"}


def no_room_message(why: str) -> str:
    return f"the server cannot store the upload now ({why}); try again later"


def _errors(*codes: int) -> dict:
    """OpenAPI `responses` for the 4xx a route answers, each with the `{"error": ...}` body."""
    return {c: {"model": ErrorBody, "description": _WHY[c]} for c in codes}


api = FastAPI(title="clipray retrieval", version="1",
              description="Text-to-video and video-to-video search over a clipray index.")


def _error(status: int, message: str, detail: Any = None, headers: Optional[dict] = None) -> JSONResponse:
    body = {"error": message}
    if detail is not None:
        body["detail"] = detail
    return JSONResponse(status_code=status, content=body, headers=headers)


@api.exception_handler(RequestValidationError)
async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
    # FastAPI's default echoes the raw input, which fails on non-UTF-8 bytes (a 500); name the
    # field and the rule only.
    parts = []
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    for e in exc.errors():
        loc = e.get("loc", ())
        if e.get("type") == "json_invalid":  # loc is ("body", character offset)
            why = str((e.get("ctx") or {}).get("error", "")).removesuffix(" at")  # "Unterminated string starting at"
            parts.append(f"body: not valid JSON at character {loc[-1]}" + (f" ({why})" if why else ""))
            continue
        where = ".".join(str(x) for x in loc if x != "body") or "body"
        if where == "body" and e.get("type") == "model_attributes_type" and kind != "application/json":
            # a JSON object sent as a form (curl -d's default) or text: "Input should be a valid
            # dictionary or object to extract fields from" said nothing of the header
            sent = f"this request's is {kind!r}" if kind else "this request gives none"
            parts.append(f"body: a JSON object with Content-Type: application/json is expected, {sent}")
            continue
        if e.get("type") == "value_error" and "Expected UploadFile" in str(e.get("msg")):
            parts.append(f"{where}: a file part (with a filename) is expected, this one is a text field")
            continue
        parts.append(f"{where}: {e.get('msg', 'invalid')}")
    return _error(422, "; ".join(parts) or "invalid request", [p for p in parts])


def _allowed(request: Request) -> str:
    """The methods this request's path takes, for a 405's Allow header: Starlette's names those
    of the first route whose path matched, and GET and HEAD are two routes here (/healthz,
    /clips/{clip_id}), so `POST /healthz` was told `Allow: HEAD` alone. Each method is matched
    against every route, as the router would match it (routes sit in included routers here)."""
    routes = request.app.router.routes
    return ", ".join(m for m in _METHODS if any(r.matches({**request.scope, "method": m})[0] == Match.FULL
                                                for r in routes))


@api.exception_handler(StarletteHTTPException)  # also body-parse errors and unknown routes
async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    cause = exc.__cause__
    if exc.status_code == 400 and isinstance(cause, OSError) and cause.errno:
        # FastAPI answers any error while it reads a form with 400 'There was an error parsing the
        # body', also this server's disk full (or not writable) while Starlette spools an upload
        # over 1 MiB to a temporary file: the client was told its request was bad
        return _error(507 if cause.errno in NO_ROOM else 503, no_room_message(os.strerror(cause.errno)))
    if exc.status_code == 400 and isinstance(cause, (ValueError, RecursionError)):
        # FastAPI's 400 'There was an error parsing the body' named nothing; a 422 as for
        # malformed JSON: a body not in UTF-8 (with the byte the decoding stopped at), or one
        # json.loads refuses past its syntax (an integer of more than 4300 digits, arrays or
        # objects nested deeper than it recurses: 1,000 levels, a 2 KB body)
        what = "not UTF-8 JSON" if isinstance(cause, UnicodeDecodeError) else "not readable JSON"
        # (the first clause: Python's digit-limit message goes on to advise a setting of the server's)
        message = f"body: {what} ({str(cause).splitlines()[0].split('; ')[0][:200]})"
        return _error(422, message, [message])
    message, headers = str(exc.detail), getattr(exc, "headers", None)
    if exc.status_code == 405 and headers and headers.get("Allow"):  # its Allow header was dropped
        headers = {**headers, "Allow": _allowed(request) or headers["Allow"]}
        message = f"{message}: {request.url.path} takes {headers['Allow']}, not {request.method}"
    return _error(exc.status_code, message, headers=headers)


def json_body_cap(max_text_chars: int) -> int:
    """The most bytes a JSON query may have: 64 KiB besides the text, at 12 bytes a character
    (a character outside the BMP written as two \\u escapes)."""
    return 65536 + 12 * max_text_chars


def _set_upload_cap(cap: int, json_cap: int) -> None:
    """Give `_UploadCap` its limits. Serve runs `Ingress` from a pickled copy that carries its
    own copy of `api`, while this middleware, pickled by reference, reads the `api` of this
    module as the replica imported it: a limit set on the copy never reached the middleware,
    and an over-size upload was read whole before `_upload` refused it."""
    api.state.max_upload_bytes = cap
    api.state.max_json_bytes = json_cap


_RANGE_SPEC = re.compile(r"\s*(?:(\d+)-(\d*)|-(\d+))\s*")


def _offset(digits: str) -> int:
    """A Range header's byte offset, one of over 18 digits as 10**18 (past the end of any
    file): int() refuses a string of over 4300 digits, a ValueError that was a 500."""
    digits = digits.lstrip("0") or "0"
    return int(digits) if len(digits) <= 18 else 10**18


def _ranges_inside(header: str, size: int) -> Optional[list[str]]:
    """The ranges of a `bytes=` range set (RFC 9110 14.1.2) that lie inside a file of `size`
    bytes, their ends cut to the file's; None when the header is not a well-formed range set.
    Defined above `Ingress`: Serve pickles that class when it is decorated, with the globals its
    methods use as they are then."""
    unit, _, ranges = header.partition("=")
    if unit.strip().lower() != "bytes" or not ranges.strip():
        return None
    keep = []
    for spec in ranges.split(","):
        m = _RANGE_SPEC.fullmatch(spec)
        if m is None:
            return None
        if m.group(3) is not None:  # the last N bytes
            if _offset(m.group(3)) > 0 < size:
                keep.append(f"-{min(_offset(m.group(3)), size)}")
            continue
        first, last = _offset(m.group(1)), _offset(m.group(2)) if m.group(2) else None
        if last is not None and last < first:
            return None
        if first < size:
            keep.append(f"{first}-{min(last, size - 1) if last is not None else ''}")
    return keep


def _no_query(request: Request) -> None:
    """Refuse a query string on a POST endpoint: every input is in the body, and
    `/search?k=1` came back as 10 results. Defined above `Ingress`, which Serve pickles."""
    if request.query_params:
        names = ", ".join(sorted(set(request.query_params.keys())))
        raise HTTPException(422, f"query: this endpoint reads no query parameters ({names}): send them in the body")


async def _no_unknown_fields(request: Request, *known: str) -> None:
    """Refuse form fields an upload endpoint does not take, as the JSON endpoints refuse
    unknown keys: FastAPI ignores them, so a misspelt `K=5` came back as 10 results and a `path`
    field was taken without a word; and a field given twice, of which FastAPI kept the last
    (`k=2` then `k=3` gave 3 results). Defined above `Ingress`, which Serve pickles."""
    _no_query(request)
    names = [name for name, _ in (await request.form()).multi_items()]
    extra = sorted(set(names) - set(known))
    if extra:
        raise HTTPException(422, "; ".join(f"{name}: Extra inputs are not permitted (this endpoint "
                                           f"takes {', '.join(known)})" for name in extra))
    twice = sorted({name for name in names if names.count(name) > 1})
    if twice:
        raise HTTPException(422, "; ".join(f"{name}: given {names.count(name)} times, send it once" for name in twice))


def _k_out_of_range(max_k: int, got: Any) -> HTTPException:
    """The one message for a `k` outside [1, max_k], of JSON and of the upload form alike.
    Defined above `Ingress`, which Serve pickles."""
    return HTTPException(422, f"k: must be between 1 and {max_k}, got {got}")


def _check_digits(name: str, value: str, signed: bool = False) -> None:
    """A 422 unless `value`, a number as sent, is decimal digits (after a '-' where `signed`):
    pydantic's lax int read "1_0" as 10 and "+1", " 3 " as numbers. Defined above `Ingress`,
    which Serve pickles."""
    if not re.fullmatch(r"-?[0-9]+" if signed else r"[0-9]+", value):
        raise HTTPException(422, f"{name}: must be a whole number written in digits (such as 5), got {value!r}")


def _form_k(value: Optional[str], max_k: int) -> Optional[int]:
    """The upload form's `k`, held to decimal digits as JSON's `k` is held to an integer: read
    by pydantic's lax rules, "2.0" was 2, "1_0" was 10 and " 3 " was 3. Digits of any length
    are a number, one past max_k answered as JSON's is: over 9 digits was "must be a whole
    number written in digits", which it was (and int() refuses over 4300 digits: one longer than
    max_k is refused from its length). Defined above `Ingress`, which Serve pickles."""
    if value is None:
        return None
    _check_digits("k", value)
    digits = value.lstrip("0") or "0"
    if len(digits) > len(str(max_k)):  # past max_k, told without int() of it
        raise _k_out_of_range(max_k, digits)
    return int(digits)


class _UploadCap:
    """Refuse an over-size upload from its Content-Length, before the body is read; one sent
    without a length (chunked) as soon as more than the limit has arrived, where it used to be
    read whole (Starlette spools a form's files to disk) and refused only then. A JSON query
    likewise, over `json_body_cap`: any size was read whole and parsed (a 200 MB text took as
    much memory in the ingress twice over) before its length was refused."""

    def __init__(self, app: Any):
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        path, root = scope.get("path", ""), scope.get("root_path", "")
        path = path[len(root):] if root and path.startswith(root) else path  # under a route prefix
        if path in UPLOAD_PATHS:
            cap, what, key = getattr(api.state, "max_upload_bytes", None), "upload", "serve.limits.max_upload_mb"
            framing = 65536  # multipart framing around the file
        elif path in JSON_PATHS:
            cap, what, key = getattr(api.state, "max_json_bytes", None), "request body", "serve.limits.max_text_chars"
            framing = 0
        else:
            cap = None
        if not (cap and scope["type"] == "http" and scope["method"] == "POST"):
            return await self.app(scope, receive, send)
        limit = cap + framing
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None:
            try:
                n = int(length)
            except ValueError:
                return await _error(400, "Content-Length is not a number")(scope, receive, send)
            if n > limit:
                return await _error(413, f"{what} of {n} bytes exceeds the limit of {cap} bytes "
                                         f"({key})")(scope, receive, send)
        seen, over = 0, False

        async def counted() -> dict:
            nonlocal seen, over
            if over:
                return {"type": "http.disconnect"}
            msg = await receive()
            seen += len(msg.get("body", b"")) if msg["type"] == "http.request" else 0
            if seen > limit:  # stop reading: the app sees a client that went away
                over = True
                return {"type": "http.disconnect"}
            return msg

        async def guarded(msg: dict) -> None:
            if not over:
                return await send(msg)
            if msg["type"] == "http.response.start":  # whatever the app answered: the 413
                await _error(413, f"{what} exceeds the limit of {cap} bytes ({key})")(scope, counted, send)

        await self.app(scope, counted, guarded)


api.add_middleware(_UploadCap)


class _NoSniff:
    """Every answer says `X-Content-Type-Options: nosniff`: a browser then takes /clips' bytes
    and the JSON answers as the type they are sent with, never as a page or a script it guessed
    from their content (a clip is whatever file a manifest names; an error quotes its input)."""

    def __init__(self, app: Any):
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        async def send_nosniff(msg: dict) -> None:
            if msg["type"] == "http.response.start":
                msg = {**msg, "headers": [*msg.get("headers", []), (b"x-content-type-options", b"nosniff")]}
            await send(msg)

        await self.app(scope, receive, send_nosniff if scope["type"] == "http" else send)


api.add_middleware(_NoSniff)  # added last: outermost, so the 413s of _UploadCap carry it too


def _retryable(e: BaseException) -> bool:
    import ray.exceptions as rex

    return isinstance(e, (rex.ActorDiedError, rex.ActorUnavailableError, rex.RayActorError))


async def _call(method: Any, *args: Any) -> Any:
    """One retry when the replica died under the request: every call here is idempotent, and
    the router picks a live replica (or waits for the replacement) the second time."""
    try:
        return await method.remote(*args)
    except Exception as e:  # noqa: BLE001 - filtered by _retryable
        if not _retryable(e):
            raise
        await asyncio.sleep(0.5)
        return await method.remote(*args)


def finite_query(vector: Any) -> Any:
    """A query's vector, refused where the model gave it NaN or inf (as `clipray index` skips
    such clips): faiss finds no clip for it, so a search answered 200 with no results, as if
    nothing matched, and JSON has no NaN, so /encode answered a bare 500. Defined above
    `Ingress`, which Serve pickles."""
    if not np.isfinite(vector).all():
        raise HTTPException(500, "the model's vector of this query is not finite (NaN/inf): the served "
                                 "export gives no usable vector for it")
    return vector


def page_html(max_k: int) -> str:
    """The search page with its results box at PAGE_K, or serve.limits.max_k where that is lower:
    a page that asked for 8 had every search refused ("k: must be between 1 and 5, got 8") by an
    app of max_k=5 until the user found the box. Defined above `Ingress`, which Serve pickles."""
    return PAGE.read_text().replace("{{k}}", str(min(PAGE_K, max_k)))


def clip_media_type(path: str) -> str:
    """The Content-Type of a clip's file, by its extension (the sources' VIDEO_TYPES): every file
    was sent as video/mp4, and a browser that takes the type as sent (nosniff) read a WebM or
    Matroska file as MP4; a name of none of these, as video/mp4. Defined above `Ingress`, which
    Serve pickles."""
    name = os.path.basename(path)
    return VIDEO_TYPES.get(name.rsplit(".", 1)[-1].lower() if "." in name else "", "video/mp4")


_CLIP_CONTENT = {t: {} for t in dict.fromkeys(VIDEO_TYPES.values())}
CLIP_RESPONSES = {200: {"content": _CLIP_CONTENT, "description": "the whole file, as the type its extension says"},
                  206: {"content": {**_CLIP_CONTENT, "multipart/byteranges": {}},
                        "description": "the byte range a Range header asked for (several: multipart/byteranges)"},
                  **_errors(404, 416, 422)}


@serve.deployment
@serve.ingress(api)
class Ingress:
    def __init__(self, text: Any, video: Any, searcher: Any, reranker: Any, limits: dict):
        self.text, self.video, self.searcher, self.reranker = text, video, searcher, reranker
        self.limits = limits
        self.max_upload_bytes = int(limits["max_upload_mb"] * 1024 * 1024)
        _set_upload_cap(self.max_upload_bytes, json_body_cap(limits["max_text_chars"]))
        self.page = page_html(limits["max_k"])

    # ---- validation ------------------------------------------------------------------------
    def _text(self, text: str) -> str:
        text = text.strip()
        if not text:
            raise HTTPException(422, "text: the query is empty")
        if len(text) > self.limits["max_text_chars"]:
            raise HTTPException(422, f"text: {len(text)} characters; the limit is "
                                     f"{self.limits['max_text_chars']} (serve.limits.max_text_chars)")
        return text

    async def _encode(self, text: str) -> Any:
        emb = await _call(self.text.encode, text)
        if emb is None:  # `&nbsp;`, a control character: answered as the empty text was
            raise HTTPException(422, "text: the query has no words once cleaned for the tokenizer "
                                     "(HTML entities and control characters are dropped)")
        return finite_query(emb)

    def _k(self, k: Optional[int]) -> int:
        if k is None:  # not given: the default, within the limit (a max_k below it refused every such request)
            return min(DEFAULT_K, self.limits["max_k"])
        if not 1 <= k <= self.limits["max_k"]:
            raise _k_out_of_range(self.limits["max_k"], k)
        return k

    async def _upload(self, file: UploadFile) -> Any:
        cap = self.max_upload_bytes
        data = await file.read(cap + 1)
        if len(data) > cap:
            raise HTTPException(413, f"upload exceeds the limit of {cap} bytes (serve.limits.max_upload_mb)")
        if not data:
            raise HTTPException(422, "file: the upload is empty")
        out = await _call(self.video.encode, data)
        if out.get("status") in (503, 507):  # the encoder's disk could not hold the upload's copy
            raise HTTPException(out["status"], no_room_message(out["error"]))
        if "error" in out:
            raise HTTPException(415, f"file: not a usable video ({out['error']})")
        return finite_query(out["embedding"])

    async def _search(self, vector: Any, k: int, text: Optional[str] = None) -> dict:
        if self.reranker is None or text is None:
            return {"results": await _call(self.searcher.search, vector, k)}
        pool = await _call(self.searcher.search, vector, max(k, self.limits["rerank_candidates"]))
        scores = await _call(self.reranker.rerank, text, [h["clip_id"] for h in pool])
        if not np.isfinite(np.asarray(scores, dtype=np.float64)).all():  # sorted at random, then no JSON for it
            raise HTTPException(500, "the re-ranker's scores of this query are not finite (NaN/inf): the "
                                     "served re-ranker export gives no usable score for it")
        for h, s in zip(pool, scores):
            h["score"] = s
        # equal scores by clip id, as the Searcher lists them
        return {"results": sorted(pool, key=lambda h: (-h["score"], h["clip_id"]))[:k]}

    # ---- routes ----------------------------------------------------------------------------
    # HEAD too (the headers of a GET): uptime and load-balancer checks probe with it
    @api.api_route("/", methods=["GET", "HEAD"], response_class=HTMLResponse, include_in_schema=False)
    async def page(self) -> HTMLResponse:
        return HTMLResponse(self.page)

    # GET and HEAD as two routes: one route of both methods gave both operations one
    # operationId in /openapi.json (named after whichever method a set listed first)
    @api.get("/healthz", response_model=Health)
    @api.head("/healthz", response_model=Health)
    async def healthz(self) -> dict:
        info = await _call(self.searcher.info)
        return {"status": "ok", "clips": info["clips"], "index": info["kind"],
                "rerank": self.reranker is not None}

    @api.post("/search", response_model=SearchResponse, responses=_errors(400, 413, 422))
    async def search(self, req: SearchRequest, request: Request) -> dict:
        """Text-to-video: the top-k indexed clips for a text query."""
        _no_query(request)
        text, k = self._text(req.text), self._k(req.k)
        return await self._search(await self._encode(text), k, text)

    @api.post("/search/video", response_model=SearchResponse, responses=_errors(400, 413, 415, 422, 503, 507))
    async def search_video(self, request: Request, file: UploadFile = File(..., description="a video clip"),
                           k: Optional[str] = Form(None, description="results wanted, in digits")) -> dict:
        """Video-to-video: the top-k indexed clips for an uploaded clip."""
        await _no_unknown_fields(request, "file", "k")
        # the field as sent (the form is read once): FastAPI gives an empty one (`-F k=`) as
        # left out, and it was answered with the default k
        k = self._k(_form_k((await request.form()).get("k"), self.limits["max_k"]))
        return await self._search(await self._upload(file), k)

    @api.post("/encode/text", response_model=Embedding, responses=_errors(400, 413, 422))
    async def encode_text(self, req: TextRequest, request: Request) -> dict:
        _no_query(request)
        emb = await self._encode(self._text(req.text))
        return {"embedding": emb.tolist(), "dim": len(emb)}

    @api.post("/encode/video", response_model=Embedding, responses=_errors(400, 413, 415, 422, 503, 507))
    async def encode_video(self, request: Request, file: UploadFile = File(..., description="a video clip")) -> dict:
        await _no_unknown_fields(request, "file")
        emb = await self._upload(file)
        return {"embedding": emb.tolist(), "dim": len(emb)}

    @api.get("/clips/{clip_id}", response_class=FileResponse, responses=CLIP_RESPONSES)
    @api.head("/clips/{clip_id}", response_class=FileResponse, responses=CLIP_RESPONSES)
    async def clip(self, clip_id: int, request: Request) -> FileResponse:
        """The indexed video file of a clip (HTTP Range supported), chosen by id only."""
        # the id as sent: pydantic's lax int took `1_0` for clip 10 and `+1`, ` 1` for clip 1
        _check_digits("clip_id", request.path_params["clip_id"], signed=True)
        path = await _call(self.searcher.clip_path, clip_id)
        if path is None:
            raise HTTPException(404, f"clip_id: no clip {clip_id} in the index")
        # a file:// URI (a manifest or root given as one) is the local path after its scheme, as
        # the decoder that indexed it read it (clipray.video.open_source)
        path = path.removeprefix("file://")
        if "://" in path or not os.path.isfile(path):
            raise HTTPException(404, f"clip_id: the file of clip {clip_id} is not available to this server")
        stat = os.stat(path)
        response = FileResponse(path, media_type=clip_media_type(path), filename=os.path.basename(path),
                                content_disposition_type="inline", stat_result=stat)
        rng, if_range = request.headers.get("range"), request.headers.get("if-range")
        # RFC 9110 13.1.5: a Range whose If-Range names another version of the file (a download
        # resumed after the file changed) is ignored, the whole file sent, as Starlette does; one
        # past the end of the file as it is now was a 416 instead
        if rng is not None and if_range in (None, response.headers["etag"], response.headers["last-modified"]):
            size = stat.st_size
            keep = _ranges_inside(rng, size)
            if keep == []:  # where Starlette answered an empty text/plain 416
                return JSONResponse(status_code=416, headers={"Content-Range": f"bytes */{size}"},
                                    content={"error": f"Range: {rng.strip()} lies past the end of the "
                                                      f"{size}-byte file of clip {clip_id}"})
            # RFC 9110 14.2: a Range of another unit, or one that does not parse, is ignored (the
            # whole file, 200), where Starlette answered a text/plain 400. RFC 9110 14.1.1: the
            # ranges inside the file are served, the others left out (a range set with one past
            # the end was a 416 for all of them)
            headers = [(k, v) for k, v in request.scope["headers"] if k != b"range"]
            if keep:
                headers.append((b"range", ("bytes=" + ",".join(keep)).encode("latin-1")))
            request.scope["headers"] = headers
        return response


# ---- the builder ----------------------------------------------------------------------------
class AppArgs(BaseModel):
    """Builder args (`serve run ... config=... out=...`); unknown keys are config overrides."""
    model_config = ConfigDict(extra="allow")
    config: str = ""
    overrides: list[str] = []


def _index_export(cfg: AppConfig, recorded: dict, what: str, fix: str) -> str:
    """An export the index recorded, checked to still hold the weights it was built with: one
    exported again at the same path (a run folder deleted and trained anew) gives vectors of
    another model, which the index's would be searched with without a word. An index moved or
    copied (with its run folder, or alone with the copy of an export fetched from a URI) finds
    the export where it lies from the index: at the recorded path relative to the index folder,
    or the index's own `model-<fingerprint>` copy, before the absolute path recorded."""
    from clipray.export import WEIGHTS

    export, fingerprint, index_dir = recorded["export"], recorded["fingerprint"], os.path.abspath(cfg.out)
    places = [os.path.normpath(os.path.join(index_dir, recorded["export_rel"]))] if recorded.get("export_rel") else []
    places += [os.path.join(index_dir, f"model-{fingerprint}"), export]
    present = [p for p in dict.fromkeys(places) if (Path(p) / WEIGHTS).is_file()]
    if not present:
        raise ConfigError(f"the index {cfg.out} was built with the {what} {export}, which is "
                          f"gone (no {WEIGHTS} in it): {fix}")
    for p in present:
        if store.fingerprint(p) == fingerprint:
            return p
    raise ConfigError(f"the index {cfg.out} was built with the {what} {export}, which now holds other "
                      f"weights (exported again since): its vectors would not match; {fix}")


def _export_for(cfg: AppConfig, meta: dict) -> str:
    """The export to serve: the index's own unless `checkpoint` names one; that one (local or at a
    URI) must hold the same weights the index was built with. One fetched from a URI is kept in
    the index folder as `model-<fingerprint>` (as `clipray index` keeps it) where the folder can
    be written: the replicas load it from there."""
    from clipray.export import fetch_export, local_dir, read_export_config
    from serve.index import fetch_folder

    fix = "give checkpoint= an export of the same weights"
    if not cfg.checkpoint:
        return _index_export(cfg, meta, "export", fix)
    index_dir = os.path.abspath(cfg.out)
    keep = index_dir if local_dir(cfg.checkpoint) is None and os.access(index_dir, os.W_OK) else None
    with fetch_folder(keep) as tmp:
        try:
            local = fetch_export(cfg.checkpoint, tmp)
        except FileNotFoundError as e:  # (a local one is read below: a run folder is said to be one)
            raise ConfigError(f"checkpoint={cfg.checkpoint}: no clipray export there ({e})") from None
        except Exception as e:  # an object store it cannot reach (credentials, network, permission)
            raise ConfigError(f"checkpoint={cfg.checkpoint}: cannot fetch the export ({type(e).__name__}: {e})") from None
        read_export_config(local)  # a run folder, not its export: say so, not "no such file"
        if store.fingerprint(local) != meta["fingerprint"]:
            raise ConfigError(f"checkpoint={cfg.checkpoint} is not the model the index {cfg.out} was "
                              "built with: its vectors would not match")
        if local != tmp:
            return os.path.abspath(local)
        if keep:
            try:
                os.rename(tmp, os.path.join(keep, f"model-{meta['fingerprint']}"))
            except OSError:  # already there (kept before, or by `clipray index`): checked below
                pass
    # the index's own copy, or the export it recorded, if it still holds the same weights
    return _index_export(cfg, meta, "export", f"index again with checkpoint={cfg.checkpoint}, which copies it into the index")


def caption_length_notice(max_words: int, exports: dict[str, str]) -> str:
    """serve.max_words against the caption length each export's training run recorded (`extra`
    of its config.json), named by what it is ("export", "re-ranker export"); "" when alike or
    not recorded. The app follows the clip sampling the index recorded, but cuts queries at this
    config's serve.max_words: a run trained on 64-token captions was served cutting every query
    at the default 32 without a word (`clipray index` names it, where it changes nothing served)."""
    from clipray.export import read_export_config
    from serve.index import recorded_sampling, words_kept

    said = []
    for what, export in exports.items():
        try:
            conf = read_export_config(export)
        except (OSError, ConfigError):  # its replicas say why the export cannot be loaded
            continue
        trained = recorded_sampling(conf).get("serve.max_words")
        if trained is not None and trained != words_kept(conf, max_words):
            said.append(f"the {what} was trained with serve.max_words={trained}")
    if not said:
        return ""
    return (f"{', '.join(said)}, and this app cuts queries at serve.max_words={max_words}; give "
            "the former as an override to cut queries as training did")


def app_from_config(cfg: AppConfig) -> Any:
    """Compose the deployments from a resolved `AppConfig`."""
    if not cfg.out:
        raise ConfigError("serving needs the index directory: out=DIR (written by `clipray index`)")
    if "://" in cfg.out:  # Path() folds s3://b/i into a local s3:/b/i, where no index is
        raise ConfigError(f"out={cfg.out}: the index folder is read from a local path (on a cluster, a shared "
                          "volume every Serve replica mounts), not a URI: copy the index folder there")
    meta = store.read_meta(cfg.out)
    if meta is None:
        raise ConfigError(f"out={cfg.out}: no index there; build one with `clipray index`")
    index_dir, sv = os.path.abspath(cfg.out), cfg.serve
    export = _export_for(cfg, meta)
    video = dict(meta["video"], timeout_s=cfg.video.timeout_s)
    tight = meta.get("rerank") and _index_export(
        cfg, meta["rerank"], "re-ranker export", "index again into a new out= with the index.rerank_checkpoint to serve")
    from clipray.export import check_export

    for model in filter(None, (export, tight)):  # cut weights, or two exports' files: a line now, not in every replica
        check_export(model)
    notice = caption_length_notice(sv.max_words, {"export": export, **({"re-ranker export": tight} if tight else {})})
    if notice:
        print(f"[serve] note: {notice}", file=sys.stderr, flush=True)

    def opts(d: Any) -> dict:
        return deployment_options(d)

    def batch(d: Any) -> dict:
        return {"max_batch_size": d.max_batch_size, "batch_wait_timeout_s": d.batch_wait_timeout_s}

    text = TextEncoder.options(**opts(sv.text_encoder)).bind(
        export, sv.max_words, batch(sv.text_encoder), sv.text_encoder.num_gpus, meta["fingerprint"])
    vid = VideoEncoder.options(**opts(sv.video_encoder)).bind(
        export, video, batch(sv.video_encoder), sv.video_encoder.num_gpus, meta["fingerprint"])
    searcher = Searcher.options(**opts(sv.searcher)).bind(index_dir, batch(sv.searcher))
    rerank = None
    if tight:
        rerank = Reranker.options(**opts(sv.reranker)).bind(
            tight, index_dir, sv.max_words, batch(sv.reranker), sv.reranker.num_gpus, meta["rerank"]["fingerprint"])
    limits = {"max_text_chars": sv.limits.max_text_chars, "max_k": sv.limits.max_k,
              "max_upload_mb": sv.limits.max_upload_mb, "rerank_candidates": sv.limits.rerank_candidates}
    return Ingress.options(**opts(sv.ingress)).bind(text, vid, searcher, rerank, limits)


def build_app(args: AppArgs) -> Any:
    """`serve.app:build_app`: args -> typed AppConfig -> the composed Serve application."""
    if isinstance(args, dict):
        args = AppArgs.model_validate(args)
    cfg = load_app_config(args.config or None, list(args.overrides) + arg_overrides(args))
    return app_from_config(cfg)


def arg_overrides(args: AppArgs) -> list[str]:
    """The builder's extra args (typed values from a RayService's YAML `args:`) as `key=value`
    overrides: text as it is, anything else as JSON, which YAML reads back. As Python's str()
    a null was the text 'None' (look_back_period_s: null failed to load as a float) and a
    backslash in a mapping's text was doubled."""
    return [f"{k}={v if isinstance(v, str) else json.dumps(v)}" for k, v in (args.model_extra or {}).items()]
