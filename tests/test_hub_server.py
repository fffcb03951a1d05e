"""The fake Hub (``tests/hub_server.py``) against the real ``huggingface_hub`` / transformers clients.

Every client runs in a subprocess (``run_client``) because the client reads ``HF_ENDPOINT`` at import time.
"""

from __future__ import annotations

import hashlib
import json
import random
import subprocess
from pathlib import Path

from .hub_env import run_client
from .hub_server import HubServer

REPO = "user/r1"


def _ok(result: subprocess.CompletedProcess[str]) -> dict:
    """Assert the client process succeeded; return the JSON it printed on its last stdout line."""
    assert result.returncode == 0, f"client failed:\n{result.stdout}\n{result.stderr[-4000:]}"
    return json.loads(result.stdout.strip().splitlines()[-1])


def _make_folder(folder: Path, weights_size: int = 3_000_000, seed: int = 0, config: str = '{"hidden": 64}') -> Path:
    """A small model-like folder: a json, a README with YAML front matter and a random ``model.safetensors``."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(config)
    (folder / "README.md").write_text("---\nlicense: mit\ntags:\n- test\n---\n# A test model\n")
    (folder / "model.safetensors").write_bytes(random.Random(seed).randbytes(weights_size))
    return folder


def _upload(repo: str, folder: Path, create: bool = True) -> str:
    """Client code: (create the repo and) upload ``folder``; prints ``{"commit": sha}``."""
    create_line = f"api.create_repo({repo!r}, exist_ok=True)" if create else ""
    return f"""
        import json
        from huggingface_hub import HfApi
        api = HfApi()
        {create_line}
        info = api.upload_folder(repo_id={repo!r}, folder_path={str(folder)!r}, commit_message="upload")
        print(json.dumps({{"commit": info.oid}}))
    """


def test_upload_folder_and_snapshot_download(hub_server: HubServer, tmp_path: Path) -> None:
    src, dst = _make_folder(tmp_path / "src"), tmp_path / "dst"
    commit = _ok(run_client(hub_server, _upload(REPO, src)))["commit"]
    out = _ok(run_client(hub_server, f"""
        import json
        from huggingface_hub import HfApi, snapshot_download
        api = HfApi()
        path = snapshot_download({REPO!r}, local_dir={str(dst)!r})
        print(json.dumps({{"sha": api.model_info({REPO!r}).sha, "files": api.list_repo_files({REPO!r}), "path": path}}))
    """))
    assert out["sha"] == commit == hub_server.head(REPO).id
    assert out["files"] == [".gitattributes", "README.md", "config.json", "model.safetensors"]
    for name in ("README.md", "config.json", "model.safetensors"):
        assert (Path(out["path"]) / name).read_bytes() == (src / name).read_bytes(), name
    files = hub_server.head(REPO).files
    assert files["model.safetensors"].lfs and not files["config.json"].lfs
    assert sum(r.method == "PUT" and r.path.startswith("/_lfs/upload/") for r in hub_server.requests) == 1
    assert all(r.status < 400 for r in hub_server.requests), [r for r in hub_server.requests if r.status >= 400]


def test_multipart_lfs_upload_roundtrip(hub_server: HubServer, tmp_path: Path) -> None:
    hub_server.multipart_chunk_size = 1_000_000
    weights = tmp_path / "w.safetensors"
    weights.write_bytes(random.Random(1).randbytes(2_500_000))
    out = _ok(run_client(hub_server, f"""
        import json
        from huggingface_hub import HfApi, hf_hub_download
        api = HfApi()
        api.create_repo({REPO!r})
        info = api.upload_file(path_or_fileobj={str(weights)!r}, path_in_repo="sub/w.safetensors", repo_id={REPO!r})
        print(json.dumps({{"commit": info.oid, "path": hf_hub_download({REPO!r}, "sub/w.safetensors")}}))
    """))
    assert Path(out["path"]).read_bytes() == weights.read_bytes()
    puts = [r for r in hub_server.requests if r.method == "PUT"]
    assert [r.path.rsplit("/", 1)[1] for r in puts] == ["1", "2", "3"]  # ceil(2.5 MB / 1 MB) parts
    assert all(r.path.startswith("/_lfs/part/") and r.status == 200 for r in puts)
    assert [r.status for r in hub_server.requests if r.path.startswith("/_lfs/complete/")] == [200]
    assert hub_server.head(REPO).files["sub/w.safetensors"].size == 2_500_000


def test_second_commit_skips_unchanged_files(hub_server: HubServer, tmp_path: Path) -> None:
    src = _make_folder(tmp_path / "src", config='{"version": 1}')
    first = _ok(run_client(hub_server, _upload(REPO, src)))["commit"]
    n_before = len(hub_server.requests)
    (src / "config.json").write_text('{"version": 2}')
    second = _ok(run_client(hub_server, _upload(REPO, src, create=False)))["commit"]
    third = _ok(run_client(hub_server, _upload(REPO, src, create=False)))["commit"]  # nothing changed: no commit
    assert first != second == third == hub_server.head(REPO).id
    later = hub_server.requests[n_before:]
    assert not [r for r in later if r.method == "PUT"], "unchanged LFS file was uploaded again"
    assert sum(r.path.endswith("/commit/main") for r in later) == 1
    out = _ok(run_client(hub_server, f"""
        import json
        from huggingface_hub import hf_hub_download
        old = open(hf_hub_download({REPO!r}, "config.json", revision={first!r})).read()
        new = open(hf_hub_download({REPO!r}, "config.json")).read()
        print(json.dumps({{"old": old, "new": new}}))
    """))
    assert out == {"old": '{"version": 1}', "new": '{"version": 2}'}


def test_failed_commit_leaves_no_new_revision(hub_server: HubServer, tmp_path: Path) -> None:
    first = _ok(run_client(hub_server, _upload(REPO, _make_folder(tmp_path / "v1"))))["commit"]
    v2 = _make_folder(tmp_path / "v2", seed=2)
    (v2 / "extra.txt").write_text("new file")
    hub_server.fail_commit_after_lfs = True
    out = _ok(run_client(hub_server, f"""
        import json
        from huggingface_hub import HfApi
        from huggingface_hub.errors import HfHubHTTPError
        try:
            HfApi().upload_folder(repo_id={REPO!r}, folder_path={str(v2)!r})
            print(json.dumps({{"error": None}}))
        except HfHubHTTPError as e:
            print(json.dumps({{"error": type(e).__name__, "status": e.response.status_code}}))
    """))
    assert out == {"error": "HfHubHTTPError", "status": 500}
    new_oid = hashlib.sha256((v2 / "model.safetensors").read_bytes()).hexdigest()
    assert hub_server.object_path(new_oid).is_file(), "the LFS upload should have happened before the commit"
    hub_server.fail_commit_after_lfs = False
    out = _ok(run_client(hub_server, f"""
        import json
        from huggingface_hub import HfApi
        api = HfApi()
        print(json.dumps({{"sha": api.model_info({REPO!r}).sha, "files": api.list_repo_files({REPO!r}),
                          "commits": len(api.list_repo_commits({REPO!r}))}}))
    """))
    assert out == {"sha": first, "files": [".gitattributes", "README.md", "config.json", "model.safetensors"],
                   "commits": 2}
    assert hub_server.head(REPO).files["model.safetensors"].sha256 != new_oid


def test_missing_token_is_rejected(hub_server: HubServer, tmp_path: Path) -> None:
    hub_server.create_repo(REPO)
    head = hub_server.head(REPO).id
    out = _ok(run_client(hub_server, f"""
        import json
        from huggingface_hub import HfApi
        from huggingface_hub.errors import HfHubHTTPError
        api, out = HfApi(), {{}}
        for name, call in [("create", lambda: api.create_repo("user/anon")),
                           ("commit", lambda: api.upload_file(path_or_fileobj=b"x", path_in_repo="x.txt",
                                                              repo_id={REPO!r}))]:
            try:
                call()
                out[name] = None
            except HfHubHTTPError as e:
                out[name] = e.response.status_code
        print(json.dumps(out))
    """, token=None))
    assert out == {"create": 401, "commit": 401}
    assert ("model", "user/anon") not in hub_server.repos and hub_server.head(REPO).id == head


def test_missing_repo_and_revision_errors(hub_server: HubServer, tmp_path: Path) -> None:
    _ok(run_client(hub_server, _upload(REPO, _make_folder(tmp_path / "src", weights_size=1000))))
    out = _ok(run_client(hub_server, f"""
        import json
        from huggingface_hub import HfApi, hf_hub_download, snapshot_download
        calls = {{
            "download_missing_repo": lambda: hf_hub_download("user/missing", "config.json"),
            "info_missing_repo": lambda: HfApi().model_info("user/missing"),
            "snapshot_missing_repo": lambda: snapshot_download("user/missing"),
            "download_bad_revision": lambda: hf_hub_download({REPO!r}, "config.json", revision="nope"),
            "snapshot_bad_revision": lambda: snapshot_download({REPO!r}, revision="nope"),
            "download_missing_file": lambda: hf_hub_download({REPO!r}, "nope.json"),
        }}
        out = {{}}
        for name, call in calls.items():
            try:
                call()
                out[name] = None
            except Exception as e:
                out[name] = type(e).__name__
        print(json.dumps(out))
    """))
    assert out == {"download_missing_repo": "RepositoryNotFoundError", "info_missing_repo": "RepositoryNotFoundError",
                   "snapshot_missing_repo": "RepositoryNotFoundError",
                   "download_bad_revision": "RevisionNotFoundError", "snapshot_bad_revision": "RevisionNotFoundError",
                   "download_missing_file": "RemoteEntryNotFoundError"}


def test_transformers_push_to_hub_and_from_pretrained(hub_server: HubServer, tmp_path: Path) -> None:
    import torch

    pushed, pulled = tmp_path / "pushed.pt", tmp_path / "pulled.pt"
    threads = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    _ok(run_client(hub_server, f"""
        import json, torch, transformers as tf
        torch.manual_seed(0)
        config = tf.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                num_key_value_heads=2, vocab_size=128)
        model = tf.LlamaForCausalLM(config).eval()
        with torch.no_grad():
            torch.save(model(torch.arange(16).view(1, 16)).logits, {str(pushed)!r})
        info = model.push_to_hub("user/tiny")
        print(json.dumps({{"commit": info.oid}}))
    """, threads))
    _ok(run_client(hub_server, f"""
        import json, torch
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained("user/tiny").eval()
        with torch.no_grad():
            torch.save(model(torch.arange(16).view(1, 16)).logits, {str(pulled)!r})
        print(json.dumps({{}}))
    """, threads))
    assert torch.equal(torch.load(pushed), torch.load(pulled))
    files = hub_server.head("user/tiny").files
    assert {"config.json", "model.safetensors", "README.md"} <= set(files) and files["model.safetensors"].lfs
