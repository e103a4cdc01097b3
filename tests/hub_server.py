"""A Hugging Face Hub stand-in at the HTTP level, for tests: the real `huggingface_hub` client (and peft's download
path through it) talks to this server through `HF_ENDPOINT`, so what is tested is the client code users run.

It implements the endpoints `huggingface_hub` 2.4.0 calls for `create_repo`, `upload_folder` (preupload answered
with "regular" for every file, so contents travel base64 in the NDJSON commit and no LFS/Xet transfer is
negotiated), `create_tag`/`delete_tag`, `model_info`, `list_repo_refs`, `list_repo_commits`, `list_repo_tree` and
file downloads (`HEAD`/`GET /{repo}/resolve/{revision}/{path}`, what `hf_hub_download` and `file_exists` use), plus
the two side calls the client makes on its own: README metadata validation and its agent-telemetry registry.
Repositories are real little git histories in memory: every commit has a parent and a full file tree, branches and
tags point at commits, and any revision (branch, tag or full commit id) can be read back.

Everything a test may want to check is kept: each request (method, path, whether it was authorised, its body), the
parsed commit payloads, and requests for endpoints the stand-in does not know (`unhandled`), so that a test fails
when the client starts calling something new instead of passing by accident.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import json
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit

USER = "tuner-test"


def git_blob_sha1(data: bytes) -> str:
    """The id git (and the Hub's ETag for a regular file) gives a blob."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class Commit:
    oid: str
    parent: str | None
    files: dict[str, bytes]
    title: str
    message: str
    date: str


@dataclass
class Repo:
    repo_id: str
    private: bool
    commits: dict[str, Commit] = field(default_factory=dict)
    branches: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)

    def resolve(self, revision: str) -> str | None:
        if revision in self.branches:
            return self.branches[revision]
        if revision in self.tags:
            return self.tags[revision]
        for prefix in ("refs/heads/", "refs/tags/"):
            if revision.startswith(prefix):
                name = revision[len(prefix):]
                return (self.branches if prefix == "refs/heads/" else self.tags).get(name)
        return revision if revision in self.commits else None

    def history(self, oid: str) -> list[Commit]:
        out = []
        while oid is not None:
            commit = self.commits[oid]
            out.append(commit)
            oid = commit.parent
        return out


@dataclass
class Request:
    method: str
    path: str
    query: dict
    authorized: bool
    had_auth_header: bool
    body: bytes


class HubState:
    def __init__(self, token: str):
        self.token = token
        self.repos: dict[str, Repo] = {}
        self.requests: list[Request] = []
        self.unhandled: list[str] = []
        self.commit_payloads: list[list[dict]] = []
        self.lock = threading.RLock()

    def new_commit(self, repo: Repo, parent: str | None, files: dict[str, bytes], title: str, message: str) -> str:
        date = dt.datetime.now(dt.timezone.utc).isoformat().replace("+00:00", "Z")
        seed = json.dumps([repo.repo_id, parent, title, message, date, sorted((k, git_blob_sha1(v))
                                                                                 for k, v in files.items())])
        oid = hashlib.sha1(seed.encode()).hexdigest()
        repo.commits[oid] = Commit(oid, parent, files, title, message, date)
        return oid


class HubError(Exception):
    def __init__(self, status: int, code: str | None, message: str, headers: dict | None = None,
                 extra: dict | None = None):
        self.status, self.code, self.message, self.headers = status, code, message, headers or {}
        self.extra = extra or {}


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as the client's connection pool expects
    server: "_Server"

    def log_message(self, format, *args):  # the test output is for the test's own messages
        pass

    # -- plumbing ---------------------------------------------------------------------------------------------
    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            data = b""
            while True:
                size = int(self.rfile.readline().strip().split(b";")[0], 16)
                if size == 0:
                    self.rfile.readline()
                    return data
                data += self.rfile.read(size)
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _send(self, status: int, body: bytes = b"", headers: dict | None = None, content_type="application/json"):
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, obj, status: int = 200, headers: dict | None = None):
        self._send(status, json.dumps(obj).encode(), headers)

    def _handle(self):
        state = self.server.state
        url = urlsplit(self.path)
        # Split before unquoting: a revision such as refs/pr/1 arrives as one %2F-quoted segment.
        segments = [unquote(s) for s in url.path.split("/")[1:]]
        body = self._body()
        auth = self.headers.get("Authorization", "")
        authorized = auth == f"Bearer {state.token}"
        with state.lock:
            state.requests.append(Request(self.command, unquote(url.path), parse_qs(url.query), authorized,
                                          bool(auth), body))
        try:
            with state.lock:
                route(self, state, segments, parse_qs(url.query), body, authorized)
        except HubError as err:
            headers = dict(err.headers)
            if err.code:
                headers["X-Error-Code"] = err.code
            headers["X-Error-Message"] = err.message
            self._json({"error": err.message, **err.extra}, err.status, headers)

    do_GET = do_HEAD = do_POST = do_PUT = do_DELETE = _handle


# ---------------------------------------------------------------------------------------------------------------
# Routes


def route(h: Handler, state: HubState, seg: list[str], query: dict, body: bytes, authorized: bool) -> None:
    method = h.command
    if seg[:3] == ["api", "repos", "create"] and method == "POST":
        return create_repo(h, state, json.loads(body or b"{}"), authorized)
    if seg[:2] == ["api", "agent-harnesses"] and method == "GET":
        # The client's once-a-day telemetry registry (which AI agent runs it); empty: detect nothing.
        return h._json({"standardEnvVars": [], "harnesses": {}})
    if seg[:2] == ["api", "validate-yaml"] and method == "POST":
        return validate_yaml(h, json.loads(body))
    if seg[:2] == ["api", "whoami-v2"] and method == "GET":
        _require_auth(authorized)
        return h._json({"type": "user", "name": USER, "auth": {"type": "access_token"}})
    if len(seg) >= 5 and seg[:2] == ["api", "models"]:
        repo_id, rest = f"{seg[2]}/{seg[3]}", seg[4:]
        action = rest[0]
        if action == "revision" and method == "GET" and len(rest) == 2:
            return model_info(h, state, repo_id, rest[1], authorized)
        if action == "preupload" and method == "POST" and len(rest) == 2:
            return preupload(h, state, repo_id, rest[1], json.loads(body), authorized)
        if action == "commit" and method == "POST" and len(rest) == 2:
            return commit(h, state, repo_id, rest[1], body, authorized, query)
        if action == "tag" and method == "POST" and len(rest) == 2:
            return create_tag(h, state, repo_id, rest[1], json.loads(body), authorized)
        if action == "tag" and method == "DELETE" and len(rest) == 2:
            return delete_tag(h, state, repo_id, rest[1], authorized)
        if action == "refs" and method == "GET" and len(rest) == 1:
            return refs(h, state, repo_id, authorized)
        if action == "commits" and method == "GET" and len(rest) == 2:
            return commits(h, state, repo_id, rest[1], authorized)
        if action == "tree" and method == "GET" and len(rest) >= 2:
            return tree(h, state, repo_id, rest[1], "/".join(rest[2:]), query, authorized)
    if len(seg) == 4 and seg[:2] == ["api", "models"] and method == "GET":
        return model_info(h, state, f"{seg[2]}/{seg[3]}", "main", authorized)
    if len(seg) >= 5 and seg[2] == "resolve" and method in ("GET", "HEAD"):
        return resolve(h, state, f"{seg[0]}/{seg[1]}", seg[3], "/".join(seg[4:]), authorized)
    state.unhandled.append(f"{method} {h.path}")
    raise HubError(404, None, f"the Hub stand-in does not implement {method} {h.path}")


def _require_auth(authorized: bool) -> None:
    if not authorized:
        raise HubError(401, None, "Invalid credentials in Authorization header")


def _repo(state: HubState, repo_id: str, authorized: bool, write: bool = False) -> Repo:
    repo = state.repos.get(repo_id)
    if write:
        _require_auth(authorized)
    if repo is None or (repo.private and not authorized):
        # The Hub does not tell a private repository from a missing one.
        raise HubError(404 if authorized else 401, "RepoNotFound", "Repository not found")
    return repo


def _commit_of(repo: Repo, revision: str) -> Commit:
    oid = repo.resolve(revision)
    if oid is None:
        raise HubError(404, "RevisionNotFound", f"Invalid rev id: {revision}")
    return repo.commits[oid]


def create_repo(h: Handler, state: HubState, payload: dict, authorized: bool) -> None:
    _require_auth(authorized)
    if payload.get("type", "model") != "model":
        raise HubError(400, None, "the stand-in holds model repositories only")
    owner = payload.get("organization") or USER
    repo_id = f"{owner}/{payload['name']}"
    url = f"{h.server.base_url}/{repo_id}"
    if repo_id in state.repos:
        raise HubError(409, None, "You already created this model repo", extra={"url": url})
    repo = Repo(repo_id, private=payload.get("visibility") == "private")
    # The Hub starts every repository with a commit holding .gitattributes.
    first = state.new_commit(repo, None, {".gitattributes": b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n"},
                             "initial commit", "")
    repo.branches["main"] = first
    state.repos[repo_id] = repo
    h._json({"url": url, "name": repo_id, "id": hashlib.sha1(repo_id.encode()).hexdigest()[:24]})


def validate_yaml(h: Handler, payload: dict) -> None:
    """The Hub checks a model card's metadata block before the upload starts; so does the stand-in: the block
    must be YAML and a mapping."""
    import yaml

    text = payload.get("content", "")
    if not text.startswith("---\n"):
        return h._json({"errors": [], "warnings": [{"message": "empty or missing yaml metadata in repo card"}]})
    block = text[4:].split("\n---", 1)[0]
    try:
        meta = yaml.safe_load(block)
    except yaml.YAMLError as exc:
        return h._json({"errors": [{"message": f"invalid YAML: {exc}"}]}, 400)
    if not isinstance(meta, dict):
        return h._json({"errors": [{"message": "the metadata block must be a mapping"}]}, 400)
    h._json({"errors": [], "warnings": []})


def model_info(h: Handler, state: HubState, repo_id: str, revision: str, authorized: bool) -> None:
    repo = _repo(state, repo_id, authorized)
    c = _commit_of(repo, revision)
    h._json({"id": repo_id, "author": repo_id.split("/")[0], "sha": c.oid, "private": repo.private,
             "lastModified": c.date, "tags": [], "library_name": None, "disabled": False, "gated": False,
             "siblings": [{"rfilename": p} for p in sorted(c.files)]})


def preupload(h: Handler, state: HubState, repo_id: str, revision: str, payload: dict, authorized: bool) -> None:
    repo = _repo(state, repo_id, authorized, write=True)
    c = _commit_of(repo, revision)
    files = [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False,
              "oid": git_blob_sha1(c.files[f["path"]]) if f["path"] in c.files else None}
             for f in payload["files"]]
    h._json({"files": files, "commitOid": c.oid})


def commit(h: Handler, state: HubState, repo_id: str, revision: str, body: bytes, authorized: bool,
           query: dict) -> None:
    repo = _repo(state, repo_id, authorized, write=True)
    if query.get("create_pr"):
        raise HubError(400, None, "the stand-in does not open pull requests")
    if h.headers.get("Content-Type") != "application/x-ndjson":
        raise HubError(400, None, "expected an NDJSON commit payload")
    if revision not in repo.branches:
        raise HubError(404, "RevisionNotFound", f"Invalid rev id: {revision} (commits go to a branch)")
    lines = [json.loads(line) for line in body.splitlines() if line.strip()]
    state.commit_payloads.append(lines)
    if not lines or lines[0].get("key") != "header":
        raise HubError(400, None, "the first NDJSON line must be the header")
    header = lines[0]["value"]
    head = repo.branches[revision]
    if header.get("parentCommit") and header["parentCommit"] != head:
        raise HubError(412, None, "A commit has happened since. Please refresh and try again.")
    files = dict(repo.commits[head].files)
    for item in lines[1:]:
        key, value = item["key"], item["value"]
        if key == "file":
            if value.get("encoding") != "base64":
                raise HubError(400, None, f"unexpected encoding {value.get('encoding')!r}")
            files[value["path"]] = base64.b64decode(value["content"])
        elif key == "deletedFile":
            files.pop(value["path"], None)
        elif key == "deletedFolder":
            prefix = value["path"].rstrip("/") + "/"
            files = {p: d for p, d in files.items() if not p.startswith(prefix)}
        else:  # lfsFile: preupload said "regular" for every file, so a client sending one is a bug worth seeing
            raise HubError(422, None, f"unexpected commit operation {key!r}")
    oid = state.new_commit(repo, head, files, header.get("summary", ""), header.get("description", ""))
    repo.branches[revision] = oid
    h._json({"success": True, "commitOid": oid, "commitUrl": f"{h.server.base_url}/{repo_id}/commit/{oid}",
             "pullRequestUrl": None})


def create_tag(h: Handler, state: HubState, repo_id: str, revision: str, payload: dict, authorized: bool) -> None:
    repo = _repo(state, repo_id, authorized, write=True)
    c = _commit_of(repo, revision)
    tag = payload["tag"]
    if tag in repo.tags:
        raise HubError(409, None, f"Tag {tag} already exists")
    repo.tags[tag] = c.oid
    h._json({"name": tag, "ref": f"refs/tags/{tag}", "targetCommit": c.oid})


def delete_tag(h: Handler, state: HubState, repo_id: str, tag: str, authorized: bool) -> None:
    repo = _repo(state, repo_id, authorized, write=True)
    if repo.tags.pop(tag, None) is None:
        raise HubError(404, "RevisionNotFound", f"Invalid rev id: {tag}")
    h._json({})


def refs(h: Handler, state: HubState, repo_id: str, authorized: bool) -> None:
    repo = _repo(state, repo_id, authorized)
    h._json({"branches": [{"name": n, "ref": f"refs/heads/{n}", "targetCommit": o} for n, o in repo.branches.items()],
             "tags": [{"name": n, "ref": f"refs/tags/{n}", "targetCommit": o} for n, o in repo.tags.items()],
             "converts": [], "pullRequests": []})


def commits(h: Handler, state: HubState, repo_id: str, revision: str, authorized: bool) -> None:
    repo = _repo(state, repo_id, authorized)
    c = _commit_of(repo, revision)
    h._json([{"id": x.oid, "title": x.title, "message": x.message, "date": x.date, "authors": [{"user": USER}]}
             for x in repo.history(c.oid)])


def tree(h: Handler, state: HubState, repo_id: str, revision: str, path: str, query: dict, authorized: bool) -> None:
    repo = _repo(state, repo_id, authorized)
    c = _commit_of(repo, revision)
    recursive = query.get("recursive", ["False"])[0].lower() in ("true", "1")
    prefix = path.strip("/") + "/" if path.strip("/") else ""
    entries, folders = [], set()
    for p in sorted(c.files):
        if not p.startswith(prefix):
            continue
        rest = p[len(prefix):]
        parts = rest.split("/")
        for i in range(1, len(parts)):
            if recursive or i == 1:
                folders.add(prefix + "/".join(parts[:i]))
        if recursive or len(parts) == 1:
            entries.append({"type": "file", "path": p, "size": len(c.files[p]), "oid": git_blob_sha1(c.files[p])})
    if prefix and not entries and not folders:
        raise HubError(404, "EntryNotFound", f"{path} does not exist on {revision}")
    entries += [{"type": "directory", "path": f, "oid": hashlib.sha1(f.encode()).hexdigest()} for f in sorted(folders)]
    h._json(entries)


def resolve(h: Handler, state: HubState, repo_id: str, revision: str, path: str, authorized: bool) -> None:
    repo = _repo(state, repo_id, authorized)
    c = _commit_of(repo, revision)
    if path not in c.files:
        raise HubError(404, "EntryNotFound", f"{path} does not exist on {revision}", {"X-Repo-Commit": c.oid})
    data = c.files[path]
    headers = {"X-Repo-Commit": c.oid, "ETag": f'"{git_blob_sha1(data)}"', "Accept-Ranges": "bytes"}
    rng = h.headers.get("Range")
    if rng and rng.startswith("bytes=") and h.command == "GET":
        start_s, _, end_s = rng[len("bytes="):].partition("-")
        start, end = int(start_s or 0), int(end_s) if end_s else len(data) - 1
        headers["Content-Range"] = f"bytes {start}-{end}/{len(data)}"
        return h._send(206, data[start:end + 1], headers, "application/octet-stream")
    h._send(200, data, headers, "application/octet-stream")


# ---------------------------------------------------------------------------------------------------------------


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    state: HubState
    base_url: str


class HubStandIn:
    """`with HubStandIn(token) as hub:` serves on 127.0.0.1 at `hub.url` until the block ends."""

    def __init__(self, token: str):
        self.state = HubState(token)
        self._server = _Server(("127.0.0.1", 0), Handler)
        self._server.state = self.state
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._server.base_url = self.url
        self._thread = threading.Thread(target=self._server.serve_forever, name="hub-stand-in", daemon=True)

    def __enter__(self) -> "HubStandIn":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()

    def add_repo(self, repo_id: str, private: bool) -> Repo:
        """A repository made elsewhere (by hand on the Hub, say)."""
        with self.state.lock:
            repo = Repo(repo_id, private)
            repo.branches["main"] = self.state.new_commit(repo, None, {".gitattributes": b""}, "initial commit", "")
            self.state.repos[repo_id] = repo
            return repo

    # what a test checks
    def repo(self, repo_id: str) -> Repo:
        return self.state.repos[repo_id]

    def files(self, repo_id: str, revision: str = "main") -> dict[str, bytes]:
        repo = self.repo(repo_id)
        return dict(repo.commits[repo.resolve(revision)].files)

    def requests_to(self, fragment: str, method: str | None = None) -> list[Request]:
        return [r for r in self.state.requests if fragment in r.path and (method is None or r.method == method)]

    def bodies(self) -> bytes:
        return b"\n".join(r.body for r in self.state.requests)
