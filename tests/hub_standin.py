"""A small, in-memory stand-in for the Hugging Face Hub, so push and download run offline against the real client.

Tests point ``HF_ENDPOINT`` at :attr:`HubStandIn.url` and drive the real ``huggingface_hub`` / ``transformers`` code.
Standard library only. Two HTTP listeners on 127.0.0.1: the Hub itself, and a "CDN" (reached as ``localhost``, on
another port) that serves LFS-tracked files, so downloads go through the same cross-host redirect as on the real Hub.

Hub endpoints (``{repo}`` is ``namespace/name``; ``{rev}`` a URL-quoted branch, ``refs/pr/N`` or commit sha):

- ``GET  /api/whoami-v2``                          token check (401 for a missing or unknown token)
- ``POST /api/repos/create``                       new model repo with an initial commit holding ``.gitattributes``
                                                   (409 with the repo's ``url`` if it exists)
- ``POST /api/validate-yaml``                      always answers "no errors" (README metadata is not validated)
- ``POST /api/models/{repo}/preupload/{rev}``      every file is answered ``uploadMode: "regular"``, with the oid
                                                   (git blob sha1) of the file already there, so unchanged files are
                                                   skipped by the client
- ``POST /api/models/{repo}/commit/{rev}``         NDJSON commit: ``header`` (``parentCommit`` checked), ``file``
                                                   (base64 or plain), ``deletedFile``, ``deletedFolder``;
                                                   ``?create_pr=1`` opens ``refs/pr/N``
- ``POST /api/models/{repo}/branch/{branch}``      new branch from ``startingPoint`` (default ``main``; 409 if exists)
- ``GET  /api/models/{repo}[/revision/{rev}]``     repo info: ``sha``, ``siblings``, ``private``
- ``GET  /api/models/{repo}/refs``                 branches (and pull requests with ``?include_prs=1``)
- ``GET  /api/models/{repo}/tree/{rev}[/{path}]``  file listing (``?recursive=1``); one page, no pagination
- ``POST /api/models/{repo}/paths-info/{rev}``     info on the form-encoded ``paths``
- ``HEAD|GET /{repo}/resolve/{rev}/{path}``        file download. Small files: 200 with ``X-Repo-Commit``, ``ETag``
                                                   (git blob sha1), ``Content-Length``, single ``Range: bytes=N-``.
                                                   LFS-tracked files (suffixes in ``.gitattributes``): 302 to the CDN
                                                   with ``X-Repo-Commit``, ``X-Linked-Etag`` (sha256) and
                                                   ``X-Linked-Size``. Errors carry ``X-Error-Code`` (``RepoNotFound``,
                                                   ``RevisionNotFound``, ``EntryNotFound``, the latter with
                                                   ``X-Repo-Commit``).
- CDN ``HEAD|GET /blobs/{sha256}``                 the bytes; it records whether a request carried a token
                                                   (the client must not forward it off the Hub).

Private repos answer 404 ``RepoNotFound`` to anyone but a known token, as the real Hub does.

Not modelled: LFS and Xet upload protocols (uploads always go inline in the commit, whatever their size), README
metadata validation, tags, commit history listing, discussions beyond the PR number, gated repos, per-namespace write
permissions (any known token writes anywhere), datasets and spaces, pagination, renamed-repo redirects, short commit
shas, rate limits, ``parentCommit`` merges, persistence (everything lives in memory).
"""

from __future__ import annotations

import base64
import hashlib
import json
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, quote, unquote, urlsplit

DEFAULT_TOKEN = "hf_standin_write_token"
DEFAULT_USER = "standin-user"
LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".pkl", ".h5", ".onnx", ".msgpack", ".npy", ".npz")
GITATTRIBUTES = "".join(f"*{suffix} filter=lfs diff=lfs merge=lfs -text\n" for suffix in LFS_SUFFIXES).encode()


def git_blob_sha1(data: bytes) -> str:
    """The git object id of a blob: what the Hub reports as a regular file's ``oid`` and ``ETag``."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def is_lfs_tracked(path: str) -> bool:
    return path.endswith(LFS_SUFFIXES)


class HubError(Exception):
    """An HTTP error answer, with the ``X-Error-Code`` the client maps to its exception types."""

    def __init__(self, status: int, message: str, code: str | None = None, headers: dict | None = None,
                 body: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.code = status, message, code
        self.headers, self.body = headers or {}, body or {}


@dataclass(frozen=True)
class Commit:
    sha: str
    files: dict  # path -> git blob sha1: a full snapshot, so any old commit still resolves to its own content


@dataclass
class Repo:
    repo_id: str
    private: bool
    refs: dict = field(default_factory=dict)  # "main", other branches and "refs/pr/N" -> commit sha
    commits: dict = field(default_factory=dict)  # sha -> Commit
    num_prs: int = 0


class HubState:
    """Repos, commits and blobs, shared by both listeners; every mutation holds the lock."""

    def __init__(self, tokens: dict[str, str]):
        self.tokens = tokens
        self.repos: dict[str, Repo] = {}
        self.blobs: dict[str, bytes] = {}  # git blob sha1 -> bytes
        self.lfs_blobs: dict[str, str] = {}  # sha256 -> git blob sha1
        self.lock = threading.Lock()
        self.requests: list[tuple[str, str, str, bool]] = []  # (listener, method, path, carried a token)
        self._counter = 0

    def store_blob(self, data: bytes) -> str:
        oid = git_blob_sha1(data)
        self.blobs[oid] = data
        self.lfs_blobs[hashlib.sha256(data).hexdigest()] = oid
        return oid

    def new_commit(self, repo: Repo, parent: str | None, message: str, files: dict) -> Commit:
        self._counter += 1
        seed = json.dumps([repo.repo_id, parent, message, sorted(files.items()), self._counter, time.time()])
        commit = Commit(hashlib.sha1(seed.encode()).hexdigest(), dict(files))
        repo.commits[commit.sha] = commit
        return commit

    def repo(self, repo_id: str, user: str | None) -> Repo:
        repo = self.repos.get(repo_id)
        if repo is None or (repo.private and user is None):
            raise HubError(404, f"Repository {repo_id} not found", "RepoNotFound")
        return repo

    def resolve(self, repo: Repo, revision: str) -> Commit:
        sha = repo.refs.get(revision, revision)
        if sha not in repo.commits:
            raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        return repo.commits[sha]


class _Handler(BaseHTTPRequestHandler):
    """Shared plumbing of both listeners: request bodies, JSON answers, error answers, the request log."""

    state: HubState
    listener = "hub"

    def log_message(self, format, *args):  # quiet: tests read `state.requests` instead
        pass

    @property
    def user(self) -> str | None:
        auth = self.headers.get("Authorization", "")
        return self.state.tokens.get(auth[len("Bearer "):]) if auth.startswith("Bearer ") else None

    def body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while size := int(self.rfile.readline().split(b";")[0], 16):
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            self.rfile.readline()
            return b"".join(chunks)
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def send(self, status: int, body: bytes = b"", headers: dict | None = None, content_type="application/json"):
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def send_json(self, payload, status: int = 200, headers: dict | None = None):
        self.send(status, json.dumps(payload).encode(), headers)

    def dispatch(self):
        url = urlsplit(self.path)
        self.query = {key: values[-1] for key, values in parse_qs(url.query).items()}
        self.state.requests.append((self.listener, self.command, url.path, "Authorization" in self.headers))
        try:
            self.route([unquote(part) for part in url.path.strip("/").split("/")])
        except HubError as error:
            self.send_error_answer(error)
        except (KeyError, ValueError, TypeError) as error:  # a malformed request: say so instead of hanging up
            self.send_error_answer(HubError(400, f"Malformed request to the Hub stand-in: {error!r}"))

    def send_error_answer(self, error: HubError):
        headers = {"X-Error-Message": error.message, **error.headers}
        if error.code:
            headers["X-Error-Code"] = error.code
        self.send_json({"error": error.message, **error.body}, error.status, headers)

    do_GET = do_HEAD = do_POST = dispatch

    def route(self, parts: list[str]):
        raise NotImplementedError


class _CdnHandler(_Handler):
    listener = "cdn"

    def route(self, parts):
        oid = self.state.lfs_blobs.get(parts[1]) if len(parts) == 2 and parts[0] == "blobs" else None
        if self.command == "POST" or oid is None:
            raise HubError(404, "No such blob")
        data = self.state.blobs[oid]
        self.send(200, data, {"ETag": f'"{parts[1]}"'}, "application/octet-stream")


class _HubHandler(_Handler):
    cdn_url = ""

    @property
    def endpoint(self) -> str:
        return f"http://{self.headers['Host']}"

    def require_user(self) -> str:
        if self.user is None:
            raise HubError(401, "Invalid credentials in Authorization header")
        return self.user

    def route(self, parts):
        method = self.command
        if parts[0] == "api":
            if parts[1:] == ["whoami-v2"] and method == "GET":
                return self.whoami()
            if parts[1:] == ["repos", "create"] and method == "POST":
                return self.create_repo(json.loads(self.body()))
            if parts[1:] == ["validate-yaml"] and method == "POST":
                self.body()
                return self.send_json({"errors": [], "warnings": []})
            if parts[1] == "models" and len(parts) >= 4:
                return self.model_api(method, "/".join(parts[2:4]), parts[4:])
        elif len(parts) >= 5 and parts[2] == "resolve" and method in ("GET", "HEAD"):
            return self.resolve_file("/".join(parts[:2]), parts[3], "/".join(parts[4:]))
        raise HubError(404, f"The Hub stand-in does not implement {method} {self.path}")

    def whoami(self):
        user = self.require_user()
        self.send_json({"type": "user", "id": user, "name": user, "fullname": user, "orgs": [],
                        "auth": {"type": "access_token", "accessToken": {"displayName": "standin", "role": "write"}}})

    def create_repo(self, payload: dict):
        user = self.require_user()
        if payload.get("type", "model") != "model":
            raise HubError(400, "The Hub stand-in only hosts model repos")
        repo_id = f"{payload.get('organization') or user}/{payload['name']}"
        private = payload.get("private", payload.get("visibility") == "private")
        with self.state.lock:
            if repo_id in self.state.repos:
                raise HubError(409, "You already created this model repo", body={"url": f"{self.endpoint}/{repo_id}"})
            repo = Repo(repo_id, bool(private))
            initial = self.state.new_commit(repo, None, "initial commit",
                                            {".gitattributes": self.state.store_blob(GITATTRIBUTES)})
            repo.refs["main"] = initial.sha
            self.state.repos[repo_id] = repo
        self.send_json({"url": f"{self.endpoint}/{repo_id}", "name": repo_id, "id": repo_id})

    def model_api(self, method: str, repo_id: str, rest: list[str]):
        repo = self.state.repo(repo_id, self.user)
        action = rest[0] if rest else ""
        if method == "GET" and action in ("", "revision"):
            return self.repo_info(repo, rest[1] if action else "main")
        if method == "GET" and action == "refs":
            return self.list_refs(repo)
        if method == "GET" and action == "tree" and len(rest) >= 2:
            return self.send_json(self.tree(repo, rest[1], "/".join(rest[2:])))
        if method == "POST" and action == "paths-info" and len(rest) == 2:
            paths = parse_qs(self.body().decode()).get("paths", [])
            return self.send_json(self.paths_info(repo, rest[1], paths))
        if method == "POST" and action == "preupload" and len(rest) == 2:
            self.require_user()
            return self.preupload(repo, rest[1], json.loads(self.body()))
        if method == "POST" and action == "commit" and len(rest) == 2:
            self.require_user()
            return self.commit(repo, rest[1], self.body())
        if method == "POST" and action == "branch" and len(rest) == 2:
            self.require_user()
            return self.create_branch(repo, rest[1], json.loads(self.body() or b"{}"))
        raise HubError(404, f"The Hub stand-in does not implement {method} {self.path}")

    def repo_info(self, repo: Repo, revision: str):
        commit = self.state.resolve(repo, revision)
        self.send_json({"id": repo.repo_id, "modelId": repo.repo_id, "author": repo.repo_id.split("/")[0],
                        "sha": commit.sha, "private": repo.private, "disabled": False, "gated": False, "tags": [],
                        "siblings": [{"rfilename": path} for path in sorted(commit.files)]})

    def list_refs(self, repo: Repo):
        def ref(name):
            return {"name": name, "ref": name if name.startswith("refs/") else f"refs/heads/{name}",
                    "targetCommit": repo.refs[name]}
        payload = {"branches": [ref(name) for name in repo.refs if not name.startswith("refs/pr/")],
                   "converts": [], "tags": []}
        if self.query.get("include_prs"):
            payload["pullRequests"] = [ref(name) for name in repo.refs if name.startswith("refs/pr/")]
        self.send_json(payload)

    def entry(self, path: str, oid: str) -> dict:
        data = self.state.blobs[oid]
        info = {"type": "file", "path": path, "oid": oid, "size": len(data)}
        if is_lfs_tracked(path):
            info["lfs"] = {"oid": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 134}
        return info

    def folder(self, path: str) -> dict:
        return {"type": "directory", "path": path, "oid": hashlib.sha1(path.encode()).hexdigest()}

    def tree(self, repo: Repo, revision: str, prefix: str) -> list[dict]:
        files = self.state.resolve(repo, revision).files
        base = f"{prefix}/" if prefix else ""
        recursive = self.query.get("recursive", "").lower() in ("true", "1")
        entries, folders = [], set()
        for path, oid in sorted(files.items()):
            if not path.startswith(base):
                continue
            parts = path[len(base):].split("/")
            if recursive or len(parts) == 1:
                entries.append(self.entry(path, oid))
            depths = range(1, len(parts)) if recursive else range(1, min(len(parts), 2))
            folders.update(base + "/".join(parts[:depth]) for depth in depths)
        if prefix and not entries and not folders:
            raise HubError(404, f"{prefix} does not exist at {revision}", "EntryNotFound")
        return [self.folder(path) for path in sorted(folders)] + entries

    def paths_info(self, repo: Repo, revision: str, paths: list[str]) -> list[dict]:
        files = self.state.resolve(repo, revision).files
        answer = []
        for path in paths:
            path = path.strip("/")
            if path in files:
                answer.append(self.entry(path, files[path]))
            elif any(name.startswith(f"{path}/") for name in files):
                answer.append(self.folder(path))
        return answer

    def preupload(self, repo: Repo, revision: str, payload: dict):
        files = self.state.resolve(repo, revision).files
        self.send_json({"files": [{"path": item["path"], "uploadMode": "regular", "shouldIgnore": False,
                                   "oid": files.get(item["path"])} for item in payload["files"]]})

    def commit(self, repo: Repo, revision: str, body: bytes):
        lines = [json.loads(line) for line in body.splitlines() if line.strip()]
        if not lines or lines[0].get("key") != "header":
            raise HubError(400, "A commit starts with a header line")
        header = lines[0]["value"]
        with self.state.lock:
            head = self.state.resolve(repo, revision)
            if revision not in repo.refs:
                raise HubError(400, f"Cannot commit to {revision}: not a branch")
            if header.get("parentCommit") not in (None, head.sha):
                raise HubError(412, f"parentCommit {header['parentCommit']} is not the head of {revision}")
            files = dict(head.files)
            for line in lines[1:]:
                key, value = line["key"], line["value"]
                path = value["path"]
                if key == "file":
                    raw = value["content"]
                    data = base64.b64decode(raw) if value.get("encoding") == "base64" else raw.encode()
                    files[path] = self.state.store_blob(data)
                elif key == "deletedFile":
                    if files.pop(path, None) is None:
                        raise HubError(404, f"A file with this name doesn't exist: {path}", "EntryNotFound")
                elif key == "deletedFolder":
                    files = {name: oid for name, oid in files.items() if not name.startswith(path.rstrip("/") + "/")}
                else:
                    raise HubError(400, f"The Hub stand-in does not model commit operation '{key}' (LFS/Xet)")
            message = "\n\n".join(part for part in (header.get("summary"), header.get("description")) if part)
            commit = self.state.new_commit(repo, head.sha, message, files)
            pr_url = None
            if self.query.get("create_pr"):
                repo.num_prs += 1
                repo.refs[f"refs/pr/{repo.num_prs}"] = commit.sha
                pr_url = f"{self.endpoint}/{repo.repo_id}/discussions/{repo.num_prs}"
            else:
                repo.refs[revision] = commit.sha
        self.send_json({"success": True, "commitOid": commit.sha, "pullRequestUrl": pr_url,
                        "commitUrl": f"{self.endpoint}/{repo.repo_id}/commit/{commit.sha}"})

    def create_branch(self, repo: Repo, branch: str, payload: dict):
        with self.state.lock:
            if branch in repo.refs:
                raise HubError(409, f"Reference already exists: refs/heads/{branch}")
            repo.refs[branch] = self.state.resolve(repo, payload.get("startingPoint") or "main").sha
        self.send_json({})

    def resolve_file(self, repo_id: str, revision: str, path: str):
        repo = self.state.repo(repo_id, self.user)
        commit = self.state.resolve(repo, revision)
        headers = {"X-Repo-Commit": commit.sha}
        oid = commit.files.get(path)
        if oid is None:
            raise HubError(404, f"Entry not found: {path}", "EntryNotFound", headers)
        data = self.state.blobs[oid]
        if is_lfs_tracked(path):
            sha256 = hashlib.sha256(data).hexdigest()
            name = quote(path.rsplit("/", 1)[-1])
            headers.update({"X-Linked-Etag": f'"{sha256}"', "X-Linked-Size": str(len(data)), "ETag": f'"{oid}"',
                            "Location": f"{self.cdn_url}/blobs/{sha256}?filename={name}"})
            return self.send(302, b"", headers)
        headers.update({"ETag": f'"{oid}"', "Accept-Ranges": "bytes"})
        start = self.headers.get("Range", "")
        if start.startswith("bytes=") and start.endswith("-") and start[6:-1].isdigit():
            begin = int(start[6:-1])
            headers["Content-Range"] = f"bytes {begin}-{len(data) - 1}/{len(data)}"
            return self.send(206, data[begin:], headers, "application/octet-stream")
        self.send(200, data, headers, "application/octet-stream")


class HubStandIn:
    """Start with ``with HubStandIn() as hub:``; ``hub.url`` is the value for ``HF_ENDPOINT``."""

    def __init__(self, tokens: dict[str, str] | None = None):
        self.state = HubState(tokens if tokens is not None else {DEFAULT_TOKEN: DEFAULT_USER})
        cdn_handler = type("CdnHandler", (_CdnHandler,), {"state": self.state})
        self._cdn = ThreadingHTTPServer(("127.0.0.1", 0), cdn_handler)
        # The CDN is addressed as "localhost" so that the client sees another host: huggingface_hub 1.x compares host
        # names, 2.x compares origins (host and port), and neither forwards the token to, or follows, a foreign host.
        cdn_url = f"http://localhost:{self._cdn.server_address[1]}"
        hub_handler = type("HubHandler", (_HubHandler,), {"state": self.state, "cdn_url": cdn_url})
        self._hub = ThreadingHTTPServer(("127.0.0.1", 0), hub_handler)
        self.url = self._address(self._hub)
        for server in (self._hub, self._cdn):
            server.daemon_threads = True
            threading.Thread(target=server.serve_forever, daemon=True).start()

    @staticmethod
    def _address(server: ThreadingHTTPServer) -> str:
        host, port = server.server_address[:2]
        return f"http://{host}:{port}"

    def close(self):
        for server in (self._hub, self._cdn):
            server.shutdown()
            server.server_close()

    def __enter__(self) -> HubStandIn:
        return self

    def __exit__(self, *exc):
        self.close()


if __name__ == "__main__":
    with HubStandIn() as hub:
        print(f"HF_ENDPOINT={hub.url} HF_TOKEN={DEFAULT_TOKEN}  (Ctrl-C stops)", flush=True)
        try:
            threading.Event().wait()
        except KeyboardInterrupt:
            pass
