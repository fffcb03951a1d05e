"""Data model of the fake Hub (``tests/hub_server.py``): repos, commits, files, routes, errors."""

from __future__ import annotations

import hashlib
import json
import re
import time
from dataclasses import dataclass, field
from typing import Any, NamedTuple

LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".onnx", ".h5", ".msgpack", ".npy", ".npz")
TYPE_PREFIX = {"model": "", "dataset": "datasets/", "space": "spaces/"}
USER = "user"  # namespace of ``create_repo`` calls without an organization
GITATTRIBUTES = b"".join(b"*%s filter=lfs diff=lfs merge=lfs -text\n" % s.encode() for s in LFS_SUFFIXES)


def git_sha1(data: bytes) -> str:
    """Git blob id of ``data`` (what ``git hash-object`` prints)."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def lfs_pointer(sha256: str, size: int) -> bytes:
    """The git-lfs pointer file that git stores in place of an LFS file."""
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()


class HubError(Exception):
    """Answered as HTTP ``status`` with ``{"error": message}``, ``X-Error-Message`` and maybe ``X-Error-Code``."""

    def __init__(self, status: int, message: str, code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.headers = status, message, code, headers or {}


class LoggedRequest(NamedTuple):
    """One served request: method, unquoted URL path (no query) and the status answered."""

    method: str
    path: str
    status: int


class Reply(NamedTuple):
    """An endpoint's answer: ``bytes`` are sent as they are, anything else as JSON."""

    status: int
    body: Any
    headers: dict[str, str] | None = None


@dataclass(frozen=True)
class FileEntry:
    """A file of a commit; its bytes are in ``root/objects/<sha256>``."""

    size: int
    sha256: str
    git_oid: str  # git blob id of the content (regular file) or of the LFS pointer (LFS file)
    lfs: bool


@dataclass(frozen=True)
class Commit:
    """An immutable snapshot: the full file map, metadata and the parent commit id."""

    id: str
    title: str
    message: str
    date: str
    parent: str | None
    files: dict[str, FileEntry]


@dataclass
class Repo:
    """A repository: every commit by id, and branch -> head commit id (PRs are branches ``refs/pr/N``)."""

    repo_type: str
    repo_id: str
    private: bool
    commits: dict[str, Commit] = field(default_factory=dict)
    branches: dict[str, str] = field(default_factory=dict)

    def resolve(self, revision: str) -> Commit:
        """The commit of a branch name or full commit sha (404 ``RevisionNotFound`` otherwise)."""
        commit_id = self.branches.get(revision, revision)
        if commit_id not in self.commits:
            raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        return self.commits[commit_id]

    def history(self, commit: Commit) -> list[Commit]:
        """``commit`` and its ancestors, newest first."""
        chain = [commit]
        while chain[-1].parent is not None:
            chain.append(self.commits[chain[-1].parent])
        return chain


_API = r"/api/(?P<type>model|dataset|space)s/(?P<repo>[^/]+/[^/]+)"
_WEB = r"/(?:(?P<type>dataset|space)s/)?(?P<repo>[^/]+/[^/]+?)"
# (methods, full-match pattern on the raw URL path, HubServer method, needs an Authorization header)
ROUTES = [(methods, re.compile(pattern), name, auth) for methods, pattern, name, auth in [
    ("POST", r"/api/repos/create", "ep_create_repo", True),
    ("POST", r"/api/validate-yaml", "ep_validate_yaml", False),
    ("GET", _API + r"(?:/revision/(?P<rev>[^/]+))?", "ep_repo_info", False),
    ("GET", _API + r"/tree/(?P<rev>[^/]+)(?:/(?P<path>.*))?", "ep_tree", False),
    ("GET", _API + r"/commits/(?P<rev>[^/]+)", "ep_commits", False),
    ("POST", _API + r"/preupload/(?P<rev>[^/]+)", "ep_preupload", True),
    ("POST", _API + r"/commit/(?P<rev>[^/]+)", "ep_commit", True),
    ("POST", _API + r"/branch/(?P<rev>[^/]+)", "ep_create_branch", True),
    ("POST", _WEB + r"\.git/info/lfs/objects/batch", "ep_lfs_batch", True),
    ("GET HEAD", _WEB + r"/resolve/(?P<rev>[^/]+)/(?P<path>.+)", "ep_resolve", False),
    # the "presigned" upload URLs handed out by the batch endpoint: the client sends no token there
    ("PUT", r"/_lfs/upload/(?P<oid>[0-9a-f]{64})", "ep_lfs_upload", False),
    ("PUT", r"/_lfs/part/(?P<oid>[0-9a-f]{64})/(?P<part>\d+)", "ep_lfs_part", False),
    ("POST", r"/_lfs/complete/(?P<oid>[0-9a-f]{64})", "ep_lfs_complete", False),
    ("POST", r"/_lfs/verify/(?P<oid>[0-9a-f]{64})", "ep_lfs_verify", False),
]]


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime())


def _json(body: bytes) -> Any:
    try:
        return json.loads(body or b"{}")
    except ValueError:
        raise HubError(400, "invalid JSON body") from None
