"""FakeHub: a minimal in-memory Hugging Face Hub on 127.0.0.1 for offline upload/download tests.

It answers the endpoints the real `huggingface_hub` client calls to create a repo, commit files, read
repo info and download files, so `HfApi.create_commit` / `upload_folder`, `PreTrainedModel.push_to_hub`
and `from_pretrained` run unmodified against it:

- POST /api/repos/create                          (409 + url when it exists: create_repo(exist_ok=True))
- POST /api/validate-yaml                         (README.md metadata: a YAML mapping, basic key types)
- POST /api/models/{repo}/preupload/{rev}         (every file answered uploadMode "regular")
- POST /api/models/{repo}/commit/{rev}            (ndjson; files inline as base64)
- POST /api/models/{repo}/branch/{branch}         (create_branch, from main)
- GET  /api/models/{repo}[/revision/{rev}]        (model_info / repo_info)
- GET  /api/models/{repo}/tree/{rev}[/{path}]     (list_repo_tree / list_repo_files; one page)
- GET|HEAD /{repo}/resolve/{rev}/{path}           (file download; X-Repo-Commit, ETag, Content-Length)
- GET  /api/agent-harnesses                       (the client's telemetry registry: answered empty)

Errors carry the Hub's X-Error-Code header (RepoNotFound, RevisionNotFound, EntryNotFound), so the
client raises its usual exception types. Write endpoints require an Authorization header (any token).

Not covered: LFS and Xet uploads/downloads (an `lfsFile` commit line is refused: every file is stored
inline, which is why preupload says "regular"), tokens and permissions (never checked, only required),
private/gated repos, repo types other than models, pull requests (create_pr), tags, commit history,
parent-commit conflicts, pagination, redirects, Range requests, rate limits, and the Hub's full
metadata validation (only the YAML shape and a few key types are checked here).
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import yaml

_REPO = r"(?P<repo>[^/]+/[^/]+)"
_YAML_BLOCK = re.compile(r"^\s*---\r?\n([\s\S]*?)\r?\n---[ \t]*(\r?\n|$)")


def git_blob_sha1(content: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


@dataclass
class FakeRepo:
    commits: dict[str, dict[str, bytes]] = field(default_factory=dict)  # commit oid -> files
    refs: dict[str, str] = field(default_factory=dict)                  # branch -> commit oid
    private: bool = False

    def resolve(self, revision: str) -> str | None:
        if revision in self.refs:
            return self.refs[revision]
        return revision if revision in self.commits else None


class FakeHub:
    """The server's state plus start/stop. `requests` logs (method, path); `unhandled` the misses."""

    def __init__(self) -> None:
        self.repos: dict[str, FakeRepo] = {}
        self.requests: list[tuple[str, str]] = []
        self.unhandled: list[tuple[str, str]] = []
        self.validated_cards: list[str] = []
        self.lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._counter = 0

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> str:
        hub = self

        class Handler(_Handler):
            fake_hub = hub

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)  # port 0: a free port
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True).start()
        return self.url

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    @property
    def url(self) -> str:
        assert self._server is not None, "FakeHub is not started"
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    # ------------------------------------------------------------------ state changes
    def new_commit(self, repo: FakeRepo, branch: str, files: dict[str, bytes]) -> str:
        self._counter += 1
        oid = hashlib.sha1(f"{self._counter}:{sorted(files)}".encode()).hexdigest()
        repo.commits[oid] = files
        repo.refs[branch] = oid
        return oid

    def create_repo(self, repo_id: str, private: bool = False) -> bool:
        if repo_id in self.repos:
            return False
        repo = self.repos[repo_id] = FakeRepo(private=private)
        self.new_commit(repo, "main", {".gitattributes": b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n"})
        return True

    def files(self, repo_id: str, revision: str = "main") -> dict[str, bytes]:
        repo = self.repos[repo_id]
        return repo.commits[repo.resolve(revision)]


def validate_card_metadata(content: str) -> list[str]:
    """Errors in a README's YAML header: the shape the Hub requires plus the types of a few keys."""
    match = _YAML_BLOCK.search(content)
    if match is None:
        return []
    try:
        data = yaml.safe_load(match[1])
    except yaml.YAMLError as exc:
        return [f"invalid YAML: {exc}"]
    if data is None:
        return []
    if not isinstance(data, dict):
        return ["metadata must be a YAML mapping"]
    errors = [f"'{key}' must be a string" for key in ("license", "library_name", "pipeline_tag")
              if key in data and not isinstance(data[key], str)]
    for key in ("tags", "datasets", "base_model"):
        value = data.get(key)
        if value is not None and not (isinstance(value, str) or
                                      (isinstance(value, list) and all(isinstance(v, str) for v in value))):
            errors.append(f"'{key}' must be a string or a list of strings")
    return errors


class _Handler(BaseHTTPRequestHandler):
    fake_hub: FakeHub

    def log_message(self, format: str, *args: Any) -> None:  # keep test output quiet
        pass

    # ------------------------------------------------------------------ plumbing
    def _send(self, status: int, body: Any = b"", headers: dict[str, str] | None = None) -> None:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        self.send_response(status)
        if not isinstance(body, bytes):
            self.send_header("Content-Type", "application/json")
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def _error(self, status: int, code: str | None, message: str) -> None:
        headers = {"X-Error-Message": message}
        if code:
            headers["X-Error-Code"] = code
        self._send(status, {"error": message}, headers)

    def _body(self) -> bytes:
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _route(self, routes: list[tuple[str, Any]]) -> None:
        path = urlsplit(self.path).path
        with self.fake_hub.lock:
            self.fake_hub.requests.append((self.command, path))
            for pattern, handler in routes:
                match = re.fullmatch(pattern, path)
                if match:
                    return handler(**{k: unquote(v) if v else v for k, v in match.groupdict().items()})
            self.fake_hub.unhandled.append((self.command, path))
            return self._error(404, None, f"FakeHub does not implement {self.command} {path}")

    def _repo(self, repo_id: str) -> FakeRepo | None:
        repo = self.fake_hub.repos.get(repo_id)
        if repo is None:
            self._error(404, "RepoNotFound", f"Repository {repo_id} not found")
        return repo

    def _revision(self, repo: FakeRepo, revision: str) -> str | None:
        oid = repo.resolve(revision)
        if oid is None:
            self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}")
        return oid

    def _authorized(self) -> bool:
        if not self.headers.get("Authorization"):
            self._error(401, None, "Invalid credentials in Authorization header")
            return False
        return True

    # ------------------------------------------------------------------ verbs
    def do_GET(self) -> None:
        self._route([
            (r"/api/agent-harnesses", self.agent_harnesses),
            (rf"/api/models/{_REPO}/tree/(?P<rev>[^/]+)(?:/(?P<path>.*))?", self.tree),
            (rf"/api/models/{_REPO}(?:/revision/(?P<rev>[^/]+))?", self.model_info),
            (rf"/{_REPO}/resolve/(?P<rev>[^/]+)/(?P<path>.+)", self.resolve),
        ])

    def do_HEAD(self) -> None:
        self._route([(rf"/{_REPO}/resolve/(?P<rev>[^/]+)/(?P<path>.+)", self.resolve)])

    def do_POST(self) -> None:
        self._route([
            (r"/api/repos/create", self.create_repo),
            (r"/api/validate-yaml", self.validate_yaml),
            (rf"/api/models/{_REPO}/preupload/(?P<rev>[^/]+)", self.preupload),
            (rf"/api/models/{_REPO}/commit/(?P<rev>[^/]+)", self.commit),
            (rf"/api/models/{_REPO}/branch/(?P<branch>[^/]+)", self.create_branch),
        ])

    # ------------------------------------------------------------------ endpoints
    def create_repo(self) -> None:
        if not self._authorized():
            return
        payload = json.loads(self._body() or b"{}")
        if payload.get("type") not in (None, "model"):
            return self._error(400, None, "FakeHub only hosts model repos")
        org, name = payload.get("organization"), payload["name"]
        repo_id = f"{org}/{name}" if org else f"user/{name}"
        url = f"{self.fake_hub.url}/{repo_id}"
        if not self.fake_hub.create_repo(repo_id, private=payload.get("visibility") == "private"):
            return self._send(409, {"error": "You already created this model repo", "url": url})
        self._send(200, {"url": url, "name": repo_id, "id": repo_id})

    def agent_harnesses(self) -> None:
        # huggingface_hub's best-effort telemetry registry: an empty one disables agent detection
        self._send(200, {"standardEnvVars": [], "harnesses": {}})

    def validate_yaml(self) -> None:
        content = json.loads(self._body())["content"]
        self.fake_hub.validated_cards.append(content)
        errors = validate_card_metadata(content)
        if errors:
            return self._send(400, {"errors": [{"message": e} for e in errors]})
        self._send(200, {"errors": [], "warnings": []})

    def preupload(self, repo: str, rev: str) -> None:
        if not self._authorized() or self._repo(repo) is None:
            return
        files = json.loads(self._body())["files"]
        # "regular" for every file: the commit then carries the content inline (no LFS round trip)
        self._send(200, {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False,
                                    "oid": None} for f in files]})

    def commit(self, repo: str, rev: str) -> None:
        if not self._authorized() or (fake := self._repo(repo)) is None:
            return
        if rev not in fake.refs:
            return self._error(404, "RevisionNotFound", f"Invalid rev id: {rev} (not a branch)")
        files = dict(fake.commits[fake.refs[rev]])
        for line in self._body().splitlines():
            item = json.loads(line)
            key, value = item["key"], item["value"]
            if key == "file":
                files[value["path"]] = base64.b64decode(value["content"])
            elif key == "deletedFile":
                files.pop(value["path"], None)
            elif key == "deletedFolder":
                prefix = value["path"].rstrip("/") + "/"
                files = {p: c for p, c in files.items() if not p.startswith(prefix)}
            elif key != "header":
                return self._error(400, None, f"FakeHub does not accept '{key}' commit lines (no LFS)")
        oid = self.fake_hub.new_commit(fake, rev, files)
        self._send(200, {"commitUrl": f"{self.fake_hub.url}/{repo}/commit/{oid}", "commitOid": oid,
                         "pullRequestUrl": None})

    def create_branch(self, repo: str, branch: str) -> None:
        if not self._authorized() or (fake := self._repo(repo)) is None:
            return
        if branch in fake.refs:
            return self._error(409, None, f"Branch {branch} already exists")
        fake.refs[branch] = fake.refs["main"]
        self._send(200, {})

    def model_info(self, repo: str, rev: str | None) -> None:
        if (fake := self._repo(repo)) is None or (oid := self._revision(fake, rev or "main")) is None:
            return
        siblings = [{"rfilename": path} for path in sorted(fake.commits[oid])]
        self._send(200, {"id": repo, "modelId": repo, "sha": oid, "private": fake.private,
                         "siblings": siblings, "tags": []})

    def tree(self, repo: str, rev: str, path: str | None) -> None:
        if (fake := self._repo(repo)) is None or (oid := self._revision(fake, rev)) is None:
            return
        prefix = path.strip("/") + "/" if path else ""
        entries = [{"type": "file", "path": p, "size": len(c), "oid": git_blob_sha1(c)}
                   for p, c in sorted(fake.commits[oid].items()) if p.startswith(prefix)]
        self._send(200, entries)

    def resolve(self, repo: str, rev: str, path: str) -> None:
        if (fake := self._repo(repo)) is None or (oid := self._revision(fake, rev)) is None:
            return
        content = fake.commits[oid].get(path)
        if content is None:
            return self._error(404, "EntryNotFound", f"{path} does not exist on {rev}")
        self._send(200, content, {"X-Repo-Commit": oid, "ETag": f'"{git_blob_sha1(content)}"',
                                  "Content-Type": "application/octet-stream"})


def point_clients_at(monkeypatch: Any, endpoint: str, cache_dir: Path, token: str = "hf_fake_test_token") -> None:
    """Send huggingface_hub's and transformers' Hub calls to `endpoint`, caching under `cache_dir`.

    huggingface_hub reads HF_ENDPOINT / HF_HUB_OFFLINE / HF_HUB_CACHE into `constants` at import and
    builds its module-level `HfApi` then; transformers keeps a lazily built shared `HfApi`. Patch all."""
    import huggingface_hub.hf_api
    import transformers.utils.hub
    from huggingface_hub import constants

    monkeypatch.setenv("HF_ENDPOINT", endpoint)  # for anything that reads the environment later
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setenv("HF_TOKEN", token)
    monkeypatch.setattr(constants, "ENDPOINT", endpoint)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", endpoint + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache_dir))
    # files the client may write under HF_HOME: keep them in the test's folder
    for name in ("AGENT_HARNESSES_PATH", "CHECK_FOR_SKILL_UPDATE_DONE_PATH"):
        if hasattr(constants, name):
            monkeypatch.setattr(constants, name, str(cache_dir / Path(getattr(constants, name)).name))
    monkeypatch.setattr(huggingface_hub.hf_api.api, "endpoint", endpoint)
    monkeypatch.setattr(transformers.utils.hub, "_hf_api", None)
