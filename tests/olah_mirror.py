"""An ``olah`` Hub mirror (PyPI ``olah``, a real self-hosted mirror) serving local git repos, for pull tests.

``olah`` is installed in its own virtual environment (its pins differ from ours): ``.ci/run`` puts it in
``.ci-olah/``; elsewhere set ``HF_SVDQ_OLAH_CLI`` to its ``olah-cli`` or have it on ``PATH``.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


def olah_cli() -> str | None:
    """Path of ``olah-cli``, or None when it is not installed."""
    candidates = [os.environ.get("HF_SVDQ_OLAH_CLI"), str(REPO_ROOT / ".ci-olah" / "bin" / "olah-cli"), shutil.which("olah-cli")]
    return next((c for c in candidates if c and Path(c).is_file()), None)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def add_git_repo(mirrors: Path, repo_id: str, files: Path) -> Path:
    """Lay ``files`` (a folder) out as the git work tree olah serves for model ``repo_id``; one commit."""
    target = mirrors / "models" / repo_id
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copytree(files, target)
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}
    for cmd in (["git", "init", "-q", "-b", "main"], ["git", "add", "-A"], ["git", "commit", "-q", "-m", "snapshot"]):
        subprocess.run(cmd, cwd=target, check=True, env=env)
    return target


@contextmanager
def olah_mirror(root: Path, timeout: float = 60.0) -> Iterator[tuple[str, Path]]:
    """Run olah offline on 127.0.0.1; yields ``(endpoint url, mirrors folder)``. Add repos before pulling."""
    cli = olah_cli()
    if cli is None:
        raise FileNotFoundError("olah-cli not found (install olah in its own venv; see tests/olah_mirror.py)")
    port = _free_port()
    mirrors, repos = root / "mirrors", root / "repos"
    mirrors.mkdir(parents=True, exist_ok=True)
    repos.mkdir(parents=True, exist_ok=True)
    config = root / "olah.toml"
    config.write_text(
        "[basic]\n"
        f'host = "127.0.0.1"\nport = {port}\n'
        f'repos-path = "{repos}"\nmirrors-path = ["{mirrors}"]\n'
        f'mirror-netloc = "127.0.0.1:{port}"\nmirror-lfs-netloc = "127.0.0.1:{port}"\n'
        "[accessibility]\noffline = true\n"
    )
    log = (root / "olah.log").open("w")
    process = subprocess.Popen([cli, "-c", str(config)], cwd=root, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                    break
            except OSError:
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"olah did not start: {(root / 'olah.log').read_text()[-2000:]}") from None
                time.sleep(0.2)
        yield f"http://127.0.0.1:{port}", mirrors
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
        log.close()
