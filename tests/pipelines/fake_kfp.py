"""A fake Kubeflow Pipelines v2beta1 REST API on 127.0.0.1, for tests only.

No KFP backend can run here, so this is the one fake: it implements just the endpoints that
``kfp.Client`` 2.17.0 calls for upload and run, keeps state in memory and records every request,
so tests assert on what the real client sent. Errors mimic the backend's two shapes: gRPC-gateway
``{"code", "message"}`` and the upload server's ``{"error_message", "error_details"}``.
"""

from __future__ import annotations

import email.parser
import email.policy
import itertools
import json
import re
import threading
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

import yaml

API = "/apis/v2beta1"
GRPC_CODES = {400: 3, 404: 5, 409: 6, 500: 13, 503: 14}


@dataclass
class Request:
    method: str
    path: str
    query: dict[str, str]
    body: bytes
    files: dict[str, bytes] = field(default_factory=dict)

    @property
    def json(self):
        return json.loads(self.body)


class HTTPFailure(Exception):
    def __init__(self, status: int, message: str, upload: bool = False):
        super().__init__(message)
        self.status, self.message, self.upload = status, message, upload


class FakeKFP:
    """``with FakeKFP() as kfp:`` — ``kfp.url``, ``kfp.requests``, ``kfp.pipelines`` / ``versions`` / ...

    ``run_states``: the states successive GETs of a run report (the last one repeats).
    ``failures``: ``{(method, path): (status, message)}`` answers instead of the normal handler.
    """

    def __init__(self):
        self.requests: list[Request] = []
        self.pipelines: dict[str, dict] = {}
        self.versions: dict[str, dict] = {}
        self.experiments: dict[str, dict] = {}
        self.runs: dict[str, dict] = {}
        self.run_states: list[str] = ["SUCCEEDED"]
        self.failures: dict[tuple[str, str], tuple[int, str]] = {}
        self._polls: dict[str, int] = {}
        self._clock = itertools.count()
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def __enter__(self) -> FakeKFP:
        threading.Thread(target=self._server.serve_forever, args=(0.05,), daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()

    def calls(self, method: str, path: str) -> list[Request]:
        return [r for r in self.requests if r.method == method and r.path == path]

    # --- the API -------------------------------------------------------------------------------

    def handle(self, req: Request) -> dict:
        if (req.method, req.path) in self.failures:
            raise HTTPFailure(*self.failures[req.method, req.path], upload="/upload" in req.path)
        routes = [
            ("GET", "/healthz", lambda: {"multi_user": False, "pipeline_store": "database"}),
            ("GET", "/pipelines", lambda: self._list("pipelines", self.pipelines.values(), req)),
            ("POST", "/pipelines/upload", lambda: self._upload_pipeline(req)),
            ("POST", "/pipelines/upload_version", lambda: self._upload_version(req)),
            ("GET", r"/pipelines/([^/]+)/versions", lambda pid: self._list_versions(pid, req)),
            ("GET", "/experiments", lambda: self._list("experiments", self.experiments.values(), req)),
            ("POST", "/experiments", lambda: self._create_experiment(req.json)),
            ("GET", r"/experiments/([^/]+)", lambda eid: self._get(self.experiments, eid, "experiment")),
            ("POST", "/runs", lambda: self._create_run(req.json)),
            ("GET", r"/runs/([^/]+)", lambda rid: self._get_run(rid)),
        ]
        for method, pattern, action in routes:
            match = re.fullmatch(API + pattern, req.path)
            if match and method == req.method:
                with self._lock:
                    return action(*match.groups())
        raise HTTPFailure(404, f"Not Found: {req.method} {req.path}")

    def _now(self) -> str:
        moment = datetime(2025, 1, 1, tzinfo=UTC) + timedelta(seconds=next(self._clock))
        return moment.strftime("%Y-%m-%dT%H:%M:%SZ")

    def _list(self, key: str, items, req: Request) -> dict:
        items = [i for i in items if _matches(i, req.query.get("filter"))]
        sort_by = req.query.get("sort_by", "")
        if sort_by:
            name, _, order = sort_by.partition(" ")
            items.sort(key=lambda i: i[name], reverse=order == "desc")
        items = items[:int(req.query.get("page_size") or 10)]
        # gRPC-gateway leaves out empty lists
        return {key: items, "total_size": len(items)} if items else {}

    def _list_versions(self, pipeline_id: str, req: Request) -> dict:
        if pipeline_id not in self.pipelines:
            raise HTTPFailure(404, f"Pipeline {pipeline_id} not found")
        versions = [v for v in self.versions.values() if v["pipeline_id"] == pipeline_id]
        return self._list("pipeline_versions", versions, req)

    def _spec(self, req: Request) -> dict:
        if "uploadfile" not in req.files:
            raise HTTPFailure(400, "Failed to read pipeline from file", upload=True)
        return next(yaml.safe_load_all(req.files["uploadfile"]))

    def _upload_pipeline(self, req: Request) -> dict:
        spec = self._spec(req)
        name = req.query.get("display_name") or req.query.get("name")
        if any(p["display_name"] == name for p in self.pipelines.values()):
            raise HTTPFailure(409, "Failed to create a pipeline and a pipeline version", upload=True)
        pipeline = {"pipeline_id": str(uuid.uuid4()), "name": name, "display_name": name,
                    "description": req.query.get("description", ""), "created_at": self._now()}
        self.pipelines[pipeline["pipeline_id"]] = pipeline
        self._add_version(pipeline["pipeline_id"], name, spec)
        return pipeline

    def _upload_version(self, req: Request) -> dict:
        spec = self._spec(req)
        pipeline_id, name = req.query.get("pipelineid", ""), req.query.get("name", "")
        if pipeline_id not in self.pipelines:
            raise HTTPFailure(400, "Failed to create a pipeline version", upload=True)
        if any(v["pipeline_id"] == pipeline_id and v["name"] == name for v in self.versions.values()):
            raise HTTPFailure(409, "Failed to create a pipeline version", upload=True)
        return self._add_version(pipeline_id, name, spec)

    def _add_version(self, pipeline_id: str, name: str, spec: dict) -> dict:
        version = {"pipeline_id": pipeline_id, "pipeline_version_id": str(uuid.uuid4()), "name": name,
                   "display_name": name, "created_at": self._now(), "pipeline_spec": spec}
        self.versions[version["pipeline_version_id"]] = version
        return version

    def _create_experiment(self, body: dict) -> dict:
        if any(e["display_name"] == body["display_name"] for e in self.experiments.values()):
            raise HTTPFailure(409, f"Experiment {body['display_name']} already exists")
        experiment = {"experiment_id": str(uuid.uuid4()), "display_name": body["display_name"],
                      "description": body.get("description") or "", "namespace": body.get("namespace") or "",
                      "created_at": self._now(), "storage_state": "AVAILABLE"}
        self.experiments[experiment["experiment_id"]] = experiment
        return experiment

    def _create_run(self, body: dict) -> dict:
        ref = body.get("pipeline_version_reference") or {}
        version = self.versions.get(ref.get("pipeline_version_id", ""))
        if version is None or version["pipeline_id"] != ref.get("pipeline_id"):
            raise HTTPFailure(404, f"Pipeline version {ref} not found")
        if body.get("experiment_id") not in self.experiments:
            raise HTTPFailure(404, f"Experiment {body.get('experiment_id')} not found")
        spec_inputs = version["pipeline_spec"]["root"]["inputDefinitions"]["parameters"]
        unknown = set(body.get("runtime_config", {}).get("parameters", {})) - set(spec_inputs)
        if unknown:
            raise HTTPFailure(400, f"Invalid input error: unknown parameters {sorted(unknown)}")
        run = {**body, "run_id": str(uuid.uuid4()), "state": "PENDING", "created_at": self._now(),
               "storage_state": "AVAILABLE"}
        self.runs[run["run_id"]] = run
        return run

    def _get_run(self, run_id: str) -> dict:
        run = self._get(self.runs, run_id, "run")
        poll = self._polls[run_id] = self._polls.get(run_id, -1) + 1
        run["state"] = self.run_states[min(poll, len(self.run_states) - 1)]
        return run

    @staticmethod
    def _get(store: dict, key: str, kind: str) -> dict:
        if key not in store:
            raise HTTPFailure(404, f"{kind} {key} not found")
        return store[key]


def _matches(item: dict, filter_json: str | None) -> bool:
    if not filter_json:
        return True
    for predicate in json.loads(filter_json).get("predicates", []):
        if predicate.get("operation") not in (1, "EQUALS"):
            raise HTTPFailure(400, f"fake KFP supports only EQUALS filters, got {predicate}")
        value = predicate.get("stringValue", predicate.get("string_value"))
        if item.get(predicate["key"]) != value:
            return False
    return True


def _multipart(content_type: str, body: bytes) -> dict[str, bytes]:
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
        f"Content-Type: {content_type}\r\n\r\n".encode() + body)
    return {part.get_param("name", header="content-disposition"): part.get_payload(decode=True)
            for part in message.iter_parts()}


def _handler(fake: FakeKFP) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def _serve(self) -> None:
            url = urlsplit(self.path)
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            content_type = self.headers.get("Content-Type", "")
            req = Request(self.command, url.path, {k: v[-1] for k, v in parse_qs(url.query).items()}, body,
                          _multipart(content_type, body) if content_type.startswith("multipart/") else {})
            fake.requests.append(req)
            try:
                status, payload = 200, fake.handle(req)
            except HTTPFailure as err:
                status = err.status
                payload = ({"error_message": err.message, "error_details": err.message} if err.upload
                           else {"code": GRPC_CODES.get(err.status, 2), "message": err.message, "details": []})
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        do_GET = do_POST = _serve

        def log_message(self, *args) -> None:
            pass

    return Handler
