"""A local stand-in for the Hugging Face Hub: the HTTP routes huggingface_hub 2.x calls to list, download and
upload a model repository (see /work/notes/ecosystem-lora.md §1), served on loopback.

Downloads: ``GET /api/models/{repo}[/revision/{rev}]`` (sha, siblings, gated), ``HEAD|GET
/{repo}/resolve/{rev}/{path}`` (``X-Repo-Commit``, ``ETag``/``X-Linked-Etag`` = sha256, ``X-Linked-Size``,
HTTP Range → 206). Uploads (legacy path, ``HF_HUB_DISABLE_XET=1``): ``whoami-v2``, ``repos/create``,
``validate-yaml``, ``preupload``, the LFS batch API, ``PUT`` of LFS objects, ``commit`` (NDJSON), ``branch``.
Errors carry ``X-Error-Code`` (RepoNotFound, GatedRepo, EntryNotFound, RevisionNotFound) as the Hub sends them.

Test hooks: ``drop_once[path] = n`` closes the connection after ``n`` bytes of that file's first GET (a dropped
download), ``requests`` records every request (method, path, headers), ``tokens`` maps a token to its user.
Clients must be configured before huggingface_hub is imported (``client_env``).
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
from urllib.parse import unquote, urlparse

import yaml


def _sha1_blob(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class Repo:
    files: dict[str, bytes] = field(default_factory=dict)
    gated: bool = False
    allowed: set[str] = field(default_factory=set)  # tokens that accepted a gated repo's terms
    owner_token: str | None = None
    commits: list[str] = field(default_factory=list)
    private: bool = False
    branches: dict[str, dict[str, bytes]] = field(default_factory=dict)  # other branches than main: their files

    @property
    def sha(self) -> str:
        if not self.commits:
            self.commit()
        return self.commits[-1]

    def commit(self) -> str:
        digest = hashlib.sha1(json.dumps(sorted((p, hashlib.sha256(d).hexdigest()) for p, d in self.files.items()))
                              .encode() + str(len(self.commits)).encode()).hexdigest()
        self.commits.append(digest)
        return digest


class HubStandIn:
    """The server and its state (module docstring)."""

    def __init__(self):
        self.repos: dict[str, Repo] = {}
        self.tokens: dict[str, str] = {}  # token -> user name
        self.drop_once: dict[str, int] = {}
        self.requests: list[tuple[str, str, dict[str, str]]] = []
        self.lfs: dict[str, bytes] = {}
        self.yaml_errors: list[str] = []  # what validate-yaml found in uploaded cards
        self._lock = threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def __enter__(self) -> HubStandIn:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()

    def add_repo(self, repo_id: str, folder: Path | None = None, files: dict[str, bytes] | None = None,
                 **options) -> Repo:
        repo = Repo(**options)
        if folder is not None:
            for path in sorted(Path(folder).rglob("*")):
                if path.is_file():
                    repo.files[path.relative_to(folder).as_posix()] = path.read_bytes()
        repo.files.update(files or {})
        repo.commit()
        self.repos[repo_id] = repo
        return repo

    def gets(self, suffix: str) -> list[dict[str, str]]:
        """Headers of every GET whose path ends with ``suffix``."""
        return [headers for method, path, headers in self.requests if method == "GET" and path.endswith(suffix)]

    def client_env(self, home: Path, token: str | None = "hf_reader") -> dict[str, str]:
        """Environment for a huggingface_hub client process that talks to this stand-in."""
        env = {"HF_ENDPOINT": self.url, "HF_HUB_DISABLE_XET": "1", "HF_HOME": str(home),
               "HF_HUB_DISABLE_TELEMETRY": "1", "HF_HUB_ETAG_TIMEOUT": "10", "NO_PROXY": "127.0.0.1",
               "HF_HUB_DISABLE_PROGRESS_BARS": "1"}
        if token:
            env["HF_TOKEN"] = token
        return env

    # ------------------------------------------------------------------------------------------------
    def _handler(self):
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # quiet
                pass

            # helpers -----------------------------------------------------------------------------
            def _token(self) -> str | None:
                auth = self.headers.get("authorization") or ""
                return auth[7:] if auth.lower().startswith("bearer ") else None

            def _send(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None,
                      content_type: str = "application/json") -> None:
                self.send_response(status)
                for key, value in (headers or {}).items():
                    self.send_header(key, value)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            def _json(self, status: int, data, headers: dict[str, str] | None = None) -> None:
                self._send(status, json.dumps(data).encode(), headers)

            def _error(self, status: int, code: str | None, message: str, commit: str | None = None) -> None:
                headers = {"X-Error-Message": message}
                if code:
                    headers["X-Error-Code"] = code
                if commit:
                    headers["X-Repo-Commit"] = commit
                self._json(status, {"error": message}, headers)

            def _body(self) -> bytes:
                """The request body, read once (every POST/PUT reads it first, so an early error reply leaves no
                unread bytes on a kept-alive connection)."""
                if getattr(self, "_read", None) is None:
                    length = int(self.headers.get("Content-Length") or 0)
                    self._read = self.rfile.read(length) if length else b""
                return self._read

            def _record(self):
                with hub._lock:
                    hub.requests.append((self.command, self.path, {k.lower(): v for k, v in self.headers.items()}))

            def _repo(self, repo_id: str) -> Repo | None:
                repo = hub.repos.get(repo_id)
                if repo is None or (repo.private and self._token() != repo.owner_token):
                    self._error(404 if self._token() else 401, "RepoNotFound", "Repository not found")
                    return None
                return repo

            # verbs -------------------------------------------------------------------------------
            def do_HEAD(self):
                self._record()
                self._route()

            def do_GET(self):
                self._record()
                self._route()

            def do_POST(self):
                self._read = None
                self._body()
                self._record()
                self._route()

            def do_PUT(self):
                self._read = None
                self._body()
                self._record()
                path = urlparse(self.path).path
                if path.startswith("/lfs-upload/"):
                    oid = path.rsplit("/", 1)[-1]
                    data = self._body()
                    if hashlib.sha256(data).hexdigest() != oid:
                        self._error(400, None, "content does not match its oid")
                        return
                    hub.lfs[oid] = data
                    self._send(200, b"", content_type="text/plain")
                    return
                self._error(404, None, "no route")

            def _route(self):
                url = urlparse(self.path)
                path = unquote(url.path)
                if path == "/api/agent-harnesses":
                    self._json(404, {"error": "not here"})
                elif path == "/api/whoami-v2":
                    self._whoami()
                elif path == "/api/repos/create":
                    self._create()
                elif path == "/api/validate-yaml":
                    self._validate_yaml()
                elif match := re.match(r"^/api/models/([^/]+/[^/]+)(?:/revision/([^/]+))?$", path):
                    self._model_info(match.group(1), match.group(2))
                elif match := re.match(r"^/api/models/([^/]+/[^/]+)/tree/([^/]+)(?:/(.*))?$", path):
                    self._tree(match.group(1))
                elif match := re.match(r"^/api/models/([^/]+/[^/]+)/preupload/([^/]+)$", path):
                    self._preupload(match.group(1))
                elif match := re.match(r"^/api/models/([^/]+/[^/]+)/commit/([^/]+)$", path):
                    self._commit(match.group(1), match.group(2))
                elif match := re.match(r"^/api/models/([^/]+/[^/]+)/branch/([^/]+)$", path):
                    self._branch(match.group(1), match.group(2))
                elif match := re.match(r"^/([^/]+/[^/]+)\.git/info/lfs/objects/batch$", path):
                    self._lfs_batch(match.group(1))
                elif match := re.match(r"^/([^/]+/[^/]+)/resolve/([^/]+)/(.+)$", path):
                    self._resolve(match.group(1), match.group(2), match.group(3))
                else:
                    self._error(404, None, f"no route {path}")

            # routes ------------------------------------------------------------------------------
            def _whoami(self):
                user = hub.tokens.get(self._token() or "")
                if user is None:
                    self._error(401, None, "Invalid credentials in Authorization header")
                    return
                token = {"displayName": "t", "role": "write"}
                self._json(200, {"type": "user", "name": user, "orgs": [],
                                 "auth": {"type": "access_token", "accessToken": token}})

            def _create(self):
                token = self._token()
                user = hub.tokens.get(token or "")
                if user is None:
                    self._error(401, None, "Invalid credentials in Authorization header")
                    return
                body = json.loads(self._body() or b"{}")
                repo_id = f"{body.get('organization') or user}/{body['name']}"
                if repo_id in hub.repos:
                    self._json(409, {"error": "You already created this model repo", "url": f"{hub.url}/{repo_id}"})
                    return
                hub.repos[repo_id] = Repo(owner_token=token, private=body.get("visibility") == "private")
                hub.repos[repo_id].commit()
                self._json(200, {"url": f"{hub.url}/{repo_id}"})

            def _validate_yaml(self):
                body = json.loads(self._body() or b"{}")
                content = body.get("content") or ""
                errors = []
                match = re.match(r"^\s*---\n([\s\S]*?)\n---[ \t]*(\n|$)", content)
                if match is None:
                    errors.append("no YAML front matter")
                else:
                    data = yaml.safe_load(match.group(1))
                    if not isinstance(data, dict):
                        errors.append("metadata is not a mapping")
                    else:
                        if data.get("license") == "other" and not (data.get("license_name")
                                                                   and data.get("license_link")):
                            errors.append("license other needs license_name and license_link")
                        if "base_model_relation" in data and data["base_model_relation"] not in (
                                "adapter", "merge", "quantized", "finetune"):
                            errors.append("base_model_relation is not one of the Hub's")
                hub.yaml_errors.extend(errors)
                status = 400 if errors else 200
                self._json(status, {"errors": [{"message": e} for e in errors], "warnings": []})

            def _model_info(self, repo_id: str, revision: str | None):
                repo = self._repo(repo_id)
                if repo is None:
                    return
                if revision is not None and revision not in ("main", *repo.commits):
                    self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}")
                    return
                self._json(200, {"id": repo_id, "sha": repo.sha, "gated": "manual" if repo.gated else False,
                                 "private": repo.private,
                                 "siblings": [{"rfilename": p, "size": len(d)} for p, d in sorted(repo.files.items())]})

            def _tree(self, repo_id: str):
                repo = self._repo(repo_id)
                if repo is None:
                    return
                self._json(200, [{"type": "file", "path": p, "size": len(d), "oid": _sha1_blob(d)}
                                 for p, d in sorted(repo.files.items())])

            def _resolve(self, repo_id: str, revision: str, file_path: str):
                repo = self._repo(repo_id)
                if repo is None:
                    return
                if revision not in ("main", *repo.commits):
                    self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}")
                    return
                if repo.gated and self._token() not in repo.allowed:
                    self._error(401 if self._token() is None else 403, "GatedRepo",
                                f"Access to model {repo_id} is restricted. You must have access to it.")
                    return
                data = repo.files.get(file_path)
                if data is None:
                    self._error(404, "EntryNotFound", "Entry not found", commit=repo.sha)
                    return
                sha = hashlib.sha256(data).hexdigest()
                headers = {"X-Repo-Commit": repo.sha, "ETag": f'"{sha}"', "X-Linked-Etag": f'"{sha}"',
                           "X-Linked-Size": str(len(data)), "Accept-Ranges": "bytes"}
                if self.command == "HEAD":
                    self.send_response(200)
                    for key, value in headers.items():
                        self.send_header(key, value)
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    return
                start = 0
                ranged = re.match(r"bytes=(\d+)-$", self.headers.get("Range") or "")
                if ranged:
                    start = int(ranged.group(1))
                    headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
                drop = hub.drop_once.pop(file_path, None) if not ranged else None
                self.send_response(206 if ranged else 200)
                for key, value in headers.items():
                    self.send_header(key, value)
                self.send_header("Content-Type", "application/octet-stream")
                self.send_header("Content-Length", str(len(data) - start))
                self.end_headers()
                if drop is not None:
                    self.wfile.write(data[start:start + drop])
                    self.wfile.flush()
                    self.close_connection = True
                    self.connection.shutdown(2)
                    return
                self.wfile.write(data[start:])

            def _preupload(self, repo_id: str):
                repo = self._writable(repo_id)
                if repo is None:
                    return
                body = json.loads(self._body() or b"{}")
                self._json(200, {"files": [{"path": f["path"], "uploadMode": "lfs" if f["size"] > 1024 else "regular",
                                            "shouldIgnore": False} for f in body.get("files", [])]})

            def _writable(self, repo_id: str) -> Repo | None:
                repo = hub.repos.get(repo_id)
                if repo is None:
                    self._error(404, "RepoNotFound", "Repository not found")
                    return None
                if self._token() is None or self._token() != repo.owner_token:
                    self._error(403, None, "You don't have the rights to write to this repository")
                    return None
                return repo

            def _lfs_batch(self, repo_id: str):
                repo = self._writable(repo_id)
                if repo is None:
                    return
                body = json.loads(self._body() or b"{}")
                objects = [{"oid": o["oid"], "size": o["size"],
                            "actions": {"upload": {"href": f"{hub.url}/lfs-upload/{o['oid']}"}}}
                           if o["oid"] not in hub.lfs else {"oid": o["oid"], "size": o["size"]}
                           for o in body.get("objects", [])]
                self._send(200, json.dumps({"transfer": "basic", "objects": objects}).encode(),
                           content_type="application/vnd.git-lfs+json")

            def _branch(self, repo_id: str, branch: str):
                repo = self._writable(repo_id)
                if repo is None:
                    return
                if branch in repo.branches:
                    self._error(409, None, "Reference already exists")
                    return
                repo.branches[branch] = dict(repo.files)
                self._json(200, {})

            def _commit(self, repo_id: str, revision: str):
                repo = self._writable(repo_id)
                if repo is None:
                    return
                if revision != "main" and revision not in repo.branches:
                    self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}")
                    return
                files = repo.files if revision == "main" else repo.branches[revision]
                for line in self._body().decode().splitlines():
                    item = json.loads(line)
                    value = item["value"]
                    if item["key"] == "file":
                        files[value["path"]] = base64.b64decode(value["content"])
                    elif item["key"] == "lfsFile":
                        if value["oid"] not in hub.lfs:
                            self._error(422, None, f"LFS object {value['oid']} was not uploaded")
                            return
                        files[value["path"]] = hub.lfs[value["oid"]]
                    elif item["key"] == "deletedFile":
                        files.pop(value["path"], None)
                sha = repo.commit()
                self._json(200, {"commitOid": sha, "commitUrl": f"{hub.url}/{repo_id}/commit/{sha}"})

        return Handler
