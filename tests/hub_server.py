"""A small fake of the Hugging Face Hub HTTP API, to test push/pull with the real client (stdlib only).

``HubServer`` speaks enough of the protocol of ``huggingface_hub`` (LFS path, i.e. ``HF_HUB_DISABLE_XET=1``)
and of transformers' ``push_to_hub`` / ``from_pretrained``: repo creation, preupload, LFS batch (basic and
multipart), NDJSON commits (atomic), branches and PR refs, repo info, tree and commit listings, ``resolve``
downloads. Bytes are stored content-addressed under ``root/objects``; the rest lives in memory. The client
reads ``HF_ENDPOINT`` at import time, so drive it in a subprocess with :func:`run_client`.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import tempfile
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, unquote, urlsplit

from .hub_protocol import (
    GITATTRIBUTES,
    LFS_SUFFIXES,
    ROUTES,
    TYPE_PREFIX,
    USER,
    Commit,
    FileEntry,
    HubError,
    LoggedRequest,
    Reply,
    Repo,
    _json,
    _now,
    git_sha1,
    lfs_pointer,
)

if TYPE_CHECKING:
    from typing_extensions import Self

class HubServer:
    """Fake Hub on ``127.0.0.1:<free port>``: a context manager, or call ``start()`` / ``stop()``.

    Knobs, which tests may change at any time: ``lfs_threshold`` (bytes; bigger files and ``LFS_SUFFIXES`` files
    are uploaded with LFS), ``multipart_chunk_size`` (LFS uploads are multipart with this part size),
    ``fail_commit_after_lfs`` (the commit endpoint answers 500 and changes nothing). ``requests`` logs every
    request; requests are served one at a time (one lock), so each commit is atomic.
    """

    def __init__(self, root: str | Path | None = None, *, lfs_threshold: int = 10 * 2**20,
                 multipart_chunk_size: int | None = None, fail_commit_after_lfs: bool = False) -> None:
        self.root = Path(root) if root is not None else Path(tempfile.mkdtemp(prefix="hub-server-"))
        self.lfs_threshold = lfs_threshold
        self.multipart_chunk_size = multipart_chunk_size
        self.fail_commit_after_lfs = fail_commit_after_lfs
        self.repos: dict[tuple[str, str], Repo] = {}  # (repo_type, repo_id) -> Repo
        self.requests: list[LoggedRequest] = []
        self.lock = threading.RLock()
        self._pending: dict[str, tuple[int, int | None]] = {}  # LFS oid -> (size, part size if multipart)
        self._httpd: ThreadingHTTPServer | None = None
        for sub in ("objects", "uploads", "clients"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)

    def start(self) -> HubServer:
        """Bind a free port and serve from a daemon thread."""
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self._httpd.daemon_threads = True
        self._httpd.hub = self  # type: ignore[attr-defined]
        threading.Thread(target=self._httpd.serve_forever, args=(0.05,), name="hub-server", daemon=True).start()
        return self

    def stop(self) -> None:
        """Stop serving and close the socket."""
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def url(self) -> str:
        """``http://127.0.0.1:<port>``, the value for ``HF_ENDPOINT``."""
        assert self._httpd is not None, "HubServer not started"
        return f"http://127.0.0.1:{self._httpd.server_address[1]}"

    # -- helpers (also for tests) -----------------------------------------------------------------------------
    def head(self, repo_id: str, revision: str = "main", repo_type: str = "model") -> Commit:
        """The commit ``revision`` of a repo resolves to (``HubError`` if none)."""
        with self.lock:
            return self._repo({"repo": repo_id, "type": repo_type}).resolve(revision)

    def create_repo(self, repo_id: str, repo_type: str = "model", private: bool = False) -> Repo:
        """Create a repo directly, as ``POST /api/repos/create`` does (``HubError`` 409 if it exists)."""
        org, name = repo_id.split("/")
        js = {"name": name, "organization": org, "type": repo_type, "private": private}
        with self.lock:
            self.ep_create_repo({}, {}, json.dumps(js).encode())
            return self.repos[(repo_type, repo_id)]

    def object_path(self, sha256: str) -> Path:
        """Where the bytes with this sha256 are (or would be) stored."""
        return self.root / "objects" / sha256

    def is_lfs(self, path: str, size: int) -> bool:
        """The upload mode the server asks for: LFS for big files and weight-like suffixes."""
        return size > self.lfs_threshold or path.endswith(LFS_SUFFIXES)

    def _repo(self, a: dict[str, str]) -> Repo:
        key = (a.get("type") or "model", a["repo"])
        if key not in self.repos:
            raise HubError(404, f"Repository not found: {a['repo']}", "RepoNotFound")
        return self.repos[key]

    def _web_url(self, repo: Repo) -> str:
        return f"{self.url}/{TYPE_PREFIX[repo.repo_type]}{repo.repo_id}"

    def _has_object(self, sha256: str, size: int | None = None) -> bool:
        p = self.object_path(sha256)
        return p.is_file() and (size is None or p.stat().st_size == size)

    def _store_object(self, data: bytes, expected_sha256: str | None = None) -> None:
        sha = hashlib.sha256(data).hexdigest()
        if expected_sha256 is not None and sha != expected_sha256:
            raise HubError(400, f"sha256 mismatch: expected {expected_sha256}, got {sha}")
        if not self._has_object(sha, len(data)):
            tmp = self.object_path(f".{sha}.tmp")
            tmp.write_bytes(data)
            os.replace(tmp, self.object_path(sha))

    def _add_commit(self, repo: Repo, branch: str, parent: Commit | None, title: str, message: str,
                    files: dict[str, FileEntry]) -> Commit:
        parent_id = parent.id if parent is not None else None
        seed = json.dumps([repo.repo_id, parent_id, title, sorted(files.items()), time.time_ns()], default=str)
        commit = Commit(hashlib.sha1(seed.encode()).hexdigest(), title, message, _now(), parent_id, files)
        repo.commits[commit.id] = commit
        repo.branches[branch] = commit.id
        return commit

    # -- endpoints: ep_<name>(path params, query params, body) -> JSON-able or Reply ---------------------------
    def ep_create_repo(self, a: dict[str, str], q: dict[str, str], body: bytes) -> Any:
        """Create the repo with an initial ``.gitattributes`` commit on ``main``; 409 if it exists."""
        js = _json(body)
        name, org, repo_type = js.get("name"), js.get("organization") or USER, js.get("type") or "model"
        if (not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9][\w.-]{0,95}", name) or name.endswith(".git")
                or not re.fullmatch(r"[\w.-]+", org) or repo_type not in TYPE_PREFIX):
            raise HubError(400, f"Invalid repo name or type: {org}/{name} ({repo_type})")
        repo_id = f"{org}/{name}"
        url = f"{self.url}/{TYPE_PREFIX[repo_type]}{repo_id}"
        if (repo_type, repo_id) in self.repos:  # the Hub's 409 body carries the url, which the client reads
            message = f"You already created this {repo_type} repo"
            return Reply(409, {"error": message, "url": url}, {"X-Error-Message": message, "X-Repo-Url": url})
        repo = Repo(repo_type, repo_id, bool(js.get("private")) or js.get("visibility") == "private")
        self.repos[(repo_type, repo_id)] = repo
        self._store_object(GITATTRIBUTES)
        entry = FileEntry(len(GITATTRIBUTES), hashlib.sha256(GITATTRIBUTES).hexdigest(), git_sha1(GITATTRIBUTES), False)
        self._add_commit(repo, "main", None, "initial commit", "", {".gitattributes": entry})
        return {"url": url, "name": repo_id, "id": repo_id}

    def ep_validate_yaml(self, a: dict[str, str], q: dict[str, str], body: bytes) -> Any:
        """Model card metadata check: everything is valid."""
        return {"errors": [], "warnings": []}

    def ep_repo_info(self, a: dict[str, str], q: dict[str, str], body: bytes) -> Any:
        """``model_info`` / ``repo_info``: sha of the revision, privacy and siblings (with sizes and LFS info)."""
        repo = self._repo(a)
        commit = repo.resolve(a.get("rev") or "main")
        siblings = [{"rfilename": p, "size": e.size, "blobId": e.git_oid,
                     **({"lfs": {"size": e.size, "sha256": e.sha256, "pointerSize": len(lfs_pointer(e.sha256, e.size))}}
                        if e.lfs else {})} for p, e in sorted(commit.files.items())]
        first = repo.history(commit)[-1]
        info = {"_id": repo.repo_id, "id": repo.repo_id, "author": repo.repo_id.split("/")[0], "sha": commit.id,
                "lastModified": commit.date, "createdAt": first.date, "private": repo.private, "gated": False,
                "disabled": False, "downloads": 0, "likes": 0, "tags": [], "siblings": siblings}
        return {**info, "modelId": repo.repo_id} if repo.repo_type == "model" else info

    def ep_tree(self, a: dict[str, str], q: dict[str, str], body: bytes) -> Any:
        """``list_repo_tree`` (one page, no ``Link`` header): files and folders under ``path``."""
        commit = self._repo(a).resolve(a["rev"])
        base = a["path"].strip("/") + "/" if (a.get("path") or "").strip("/") else ""
        files = {p: e for p, e in commit.files.items() if p.startswith(base)}
        if base and not files:
            raise HubError(404, f"{base} does not exist on {a['rev']}", "EntryNotFound")
        dirs = {"/".join(p.split("/")[:i]) for p in files for i in range(1, p.count("/") + 1)}
        recursive = q.get("recursive", "").lower() in ("1", "true")
        out = []
        for p in sorted(dirs | set(files)):
            if not p.startswith(base) or (not recursive and "/" in p[len(base):]):
                continue
            e = files.get(p)
            if e is None:
                out.append({"type": "directory", "oid": hashlib.sha1(p.encode()).hexdigest(), "size": 0, "path": p})
                continue
            out.append({"type": "file", "oid": e.git_oid, "size": e.size, "path": p})
            if e.lfs:
                out[-1]["lfs"] = {"oid": e.sha256, "size": e.size, "pointerSize": len(lfs_pointer(e.sha256, e.size))}
        return out

    def ep_commits(self, a: dict[str, str], q: dict[str, str], body: bytes) -> Any:
        """``list_repo_commits``: the history of ``rev``, newest first."""
        repo = self._repo(a)
        return [{"id": c.id, "title": c.title, "message": c.message, "date": c.date, "authors": [{"user": USER}]}
                for c in repo.history(repo.resolve(a["rev"]))]

    def ep_create_branch(self, a: dict[str, str], q: dict[str, str], body: bytes) -> Any:
        """``create_branch``: a new branch at ``startingPoint`` (default ``main``); 409 if it exists."""
        repo = self._repo(a)
        if a["rev"] in repo.branches:
            raise HubError(409, f"Reference already exists: refs/heads/{a['rev']}")
        repo.branches[a["rev"]] = repo.resolve(_json(body).get("startingPoint") or "main").id
        return {}

    def ep_preupload(self, a: dict[str, str], q: dict[str, str], body: bytes) -> Any:
        """Upload mode per file, and the oid of the current version (so the client skips unchanged files)."""
        files = self._repo(a).resolve(a["rev"]).files
        out = []
        for f in _json(body).get("files", []):
            lfs, entry = self.is_lfs(f["path"], int(f["size"])), files.get(f["path"])
            oid = None if entry is None or entry.lfs != lfs else (entry.sha256 if lfs else entry.git_oid)
            mode = "lfs" if lfs else "regular"
            out.append({"path": f["path"], "uploadMode": mode, "shouldIgnore": False, "oid": oid})
        return {"files": out}

    def ep_lfs_batch(self, a: dict[str, str], q: dict[str, str], body: bytes) -> Any:
        """LFS batch API: upload (and verify) actions for the objects not stored yet, none for the others."""
        self._repo(a)
        js, chunk = _json(body), self.multipart_chunk_size
        if js.get("operation") != "upload":
            raise HubError(400, "only the 'upload' operation is supported")
        objects = []
        for obj in js.get("objects", []):
            oid, size = str(obj["oid"]), int(obj["size"])
            objects.append({"oid": oid, "size": size, "authenticated": True})
            if self._has_object(oid, size):
                continue
            self._pending[oid] = (size, chunk)
            upload: dict[str, Any] = {"href": f"{self.url}/_lfs/upload/{oid}"}
            if chunk:  # multipart: numbered part URLs in "header"; "href" is the completion URL
                parts = {f"{i:05d}": f"{self.url}/_lfs/part/{oid}/{i}" for i in range(1, -(-size // chunk) + 1)}
                upload = {"href": f"{self.url}/_lfs/complete/{oid}", "header": {"chunk_size": str(chunk), **parts}}
            objects[-1]["actions"] = {"upload": upload, "verify": {"href": f"{self.url}/_lfs/verify/{oid}"}}
        return Reply(200, {"transfer": "multipart" if chunk else "basic", "objects": objects},
                     {"Content-Type": "application/vnd.git-lfs+json"})

    def _expect_upload(self, oid: str, multipart: bool) -> tuple[int, int]:
        size, chunk = self._pending.get(oid, (-1, None))
        if size < 0 or (chunk is not None) != multipart:
            raise HubError(400, f"no {'multipart ' if multipart else ''}upload of {oid} was announced")
        return size, chunk or 0

    def ep_lfs_upload(self, a: dict[str, str], q: dict[str, str], body: bytes) -> Any:
        """Single PUT of a whole LFS object (checked against the announced size and its sha256)."""
        size, _ = self._expect_upload(a["oid"], multipart=False)
        if len(body) != size:
            raise HubError(400, f"got {len(body)} bytes, {size} announced")
        self._store_object(body, expected_sha256=a["oid"])
        del self._pending[a["oid"]]
        return Reply(200, b"", {"ETag": f'"{a["oid"]}"'})

    def ep_lfs_part(self, a: dict[str, str], q: dict[str, str], body: bytes) -> Any:
        """PUT of one multipart part, answered with its ETag (as S3 does)."""
        self._expect_upload(a["oid"], multipart=True)
        part = self.root / "uploads" / a["oid"] / f"{int(a['part']):05d}"
        part.parent.mkdir(exist_ok=True)
        part.write_bytes(body)
        return Reply(200, b"", {"ETag": f'"{hashlib.md5(body).hexdigest()}"'})

    def ep_lfs_complete(self, a: dict[str, str], q: dict[str, str], body: bytes) -> Any:
        """Multipart completion ``{"oid", "parts": [{"partNumber", "etag"}]}``: check, assemble, store."""
        oid, js = a["oid"], _json(body)
        size, chunk = self._expect_upload(oid, multipart=True)
        parts = js.get("parts", [])
        if js.get("oid") != oid or [p.get("partNumber") for p in parts] != list(range(1, -(-size // chunk) + 1)):
            raise HubError(400, "completion must name the oid and the parts 1..N in order")
        blobs = []
        for p in parts:
            path = self.root / "uploads" / oid / f"{p['partNumber']:05d}"
            blobs.append(path.read_bytes() if path.is_file() else b"")
            if p.get("etag") != f'"{hashlib.md5(blobs[-1]).hexdigest()}"':
                raise HubError(400, f"etag mismatch for part {p['partNumber']}")
        if sum(map(len, blobs)) != size:
            raise HubError(400, f"the parts hold {sum(map(len, blobs))} bytes, {size} announced")
        self._store_object(b"".join(blobs), expected_sha256=oid)
        del self._pending[oid]
        for path in (self.root / "uploads" / oid).iterdir():
            path.unlink()
        return {"success": True}

    def ep_lfs_verify(self, a: dict[str, str], q: dict[str, str], body: bytes) -> Any:
        """LFS verify action: 200 if the object is stored with the given size."""
        ok = self._has_object(a["oid"], _json(body).get("size"))
        return Reply(200 if ok else 404, {"success": ok})

    def ep_commit(self, a: dict[str, str], q: dict[str, str], body: bytes) -> Any:
        """NDJSON commit (header, file, lfsFile, deletedFile, deletedFolder): all operations apply, or none."""
        if self.fail_commit_after_lfs:
            raise HubError(500, "Internal Error - commit failed (HubServer.fail_commit_after_lfs)")
        repo, branch = self._repo(a), a["rev"]
        try:
            items = [json.loads(line) for line in body.splitlines() if line.strip()]
        except ValueError as e:
            raise HubError(400, f"invalid NDJSON: {e}") from None
        header = next((i.get("value") for i in items if i.get("key") == "header"), None)
        if not isinstance(header, dict) or not header.get("summary"):
            raise HubError(400, "the commit needs a header line with a summary")
        if branch not in repo.branches:
            raise HubError(404, f"Invalid rev id: {branch} (commits go to branches)", "RevisionNotFound")
        base = repo.commits[repo.branches[branch]]
        if header.get("parentCommit") not in (None, base.id):
            raise HubError(412, f"parentCommit {header['parentCommit']} is not the head of {branch}")
        files, new_blobs = dict(base.files), []
        for item in items:
            key, value = item.get("key"), item.get("value") or {}
            path = value.get("path", "")
            if key == "header":
                continue
            if not path or path.startswith("/") or ".." in path.split("/"):
                raise HubError(400, f"invalid path {path!r}")
            if key == "file":
                data = base64.b64decode(value["content"]) if value.get("encoding") == "base64" \
                    else str(value["content"]).encode()
                if data and self.is_lfs(path, len(data)):
                    raise HubError(400, f"{path}: binary or large files must be uploaded with LFS")
                new_blobs.append(data)
                files[path] = FileEntry(len(data), hashlib.sha256(data).hexdigest(), git_sha1(data), False)
            elif key == "lfsFile":
                oid = str(value.get("oid"))
                size = value.get("size", self.object_path(oid).stat().st_size if self._has_object(oid) else -1)
                if value.get("algo", "sha256") != "sha256" or not self._has_object(oid, size):
                    raise HubError(422, f"{path}: LFS object {oid} ({size} bytes) was never uploaded")
                files[path] = FileEntry(size, oid, git_sha1(lfs_pointer(oid, size)), True)
            elif key == "deletedFile":
                if files.pop(path, None) is None:
                    raise HubError(404, f"A file with this name doesn't exist: {path}", "EntryNotFound")
            elif key == "deletedFolder":
                gone = [p for p in files if p.startswith(path.rstrip("/") + "/")]
                if not gone:
                    raise HubError(404, f"A folder with this name doesn't exist: {path}", "EntryNotFound")
                for p in gone:
                    del files[p]
            else:
                raise HubError(400, f"unknown commit operation {key!r}")
        for data in new_blobs:
            self._store_object(data)
        create_pr = q.get("create_pr", "").lower() in ("1", "true")
        pr_num = 1 + sum(b.startswith("refs/pr/") for b in repo.branches) if create_pr else None
        new = self._add_commit(repo, f"refs/pr/{pr_num}" if pr_num else branch, base, header["summary"],
                               header.get("description") or "", files)
        web = self._web_url(repo)
        return {"success": True, "commitOid": new.id, "commitUrl": f"{web}/commit/{new.id}",
                "pullRequestUrl": f"{web}/discussions/{pr_num}" if pr_num else None}

    def ep_resolve(self, a: dict[str, str], q: dict[str, str], body: bytes) -> Any:
        """File download (HEAD: metadata only). LFS files are served directly, with ``X-Linked-*`` headers."""
        commit = self._repo(a).resolve(a["rev"])
        entry = commit.files.get(a["path"])
        if entry is None:
            raise HubError(404, f"Entry not found: {a['path']}", "EntryNotFound", {"X-Repo-Commit": commit.id})
        headers = {"X-Repo-Commit": commit.id, "ETag": f'"{entry.sha256 if entry.lfs else entry.git_oid}"'}
        if entry.lfs:
            headers.update({"X-Linked-Etag": f'"{entry.sha256}"', "X-Linked-Size": str(entry.size)})
        return Reply(200, self.object_path(entry.sha256).read_bytes(), headers)


class _Handler(BaseHTTPRequestHandler):
    """Reads the request, finds its route in ``ROUTES``, calls the ``HubServer`` endpoint, writes the reply."""

    protocol_version = "HTTP/1.1"  # keep-alive, as the client expects

    def log_message(self, format: str, *args: Any) -> None:
        """Silence the default stderr access log."""

    def do_GET(self) -> None:
        self._dispatch()

    do_HEAD = do_POST = do_PUT = do_GET

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() != "chunked":
            return self.rfile.read(int(self.headers.get("Content-Length") or 0))
        chunks = []
        while (size := int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)) > 0:
            chunks.append(self.rfile.read(size))
            self.rfile.readline()
        while self.rfile.readline().strip():  # trailers
            pass
        return b"".join(chunks)

    def _send(self, reply: Reply) -> None:
        data = reply.body if isinstance(reply.body, bytes) else json.dumps(reply.body).encode()
        ctype = "application/octet-stream" if isinstance(reply.body, bytes) else "application/json"
        self.send_response(reply.status)
        for key, value in {"Content-Type": ctype, **(reply.headers or {}), "Content-Length": str(len(data))}.items():
            self.send_header(key, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def _dispatch(self) -> None:
        hub: HubServer = self.server.hub  # type: ignore[attr-defined]
        url, reply = urlsplit(self.path), Reply(500, {"error": "unhandled"})
        try:
            body = self._read_body()
            for methods, pattern, name, auth in ROUTES:
                match = pattern.fullmatch(url.path)
                if match and self.command in methods.split():
                    break
            else:
                raise HubError(404, f"no route for {self.command} {url.path}")
            if auth and not self.headers.get("Authorization", "").startswith("Bearer "):
                raise HubError(401, "Invalid username or password (no Authorization header).")
            params = {k: unquote(v) for k, v in match.groupdict().items() if v is not None}
            query = {k: v[0] for k, v in parse_qs(url.query).items()}
            endpoint: Callable[[dict[str, str], dict[str, str], bytes], Any] = getattr(hub, name)
            with hub.lock:
                result = endpoint(params, query, body)
            reply = result if isinstance(result, Reply) else Reply(200, result)
        except HubError as e:
            headers = {"X-Error-Message": e.message, **({"X-Error-Code": e.code} if e.code else {}), **e.headers}
            reply = Reply(e.status, {"error": e.message}, headers)
        except Exception as e:  # noqa: BLE001 - a server bug must answer 500, not hang the client
            reply = Reply(500, {"error": f"{type(e).__name__}: {e}"})
        with hub.lock:  # logged before answering, so the log is complete once the client has its answers
            hub.requests.append(LoggedRequest(self.command, unquote(url.path), reply.status))
        try:
            self._send(reply)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
