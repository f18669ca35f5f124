"""A real Hub-compatible server for the tests: olah (PyPI ``olah``) in mirror mode over local git repositories.

olah serves the git repositories under its ``mirrors-path``, laid out as ``models/ORG/NAME``, through the Hub's
download API: ``/api/models/ORG/NAME/revision/REV`` (repo info), ``/api/models/ORG/NAME/tree/REV/`` (file listing)
and ``HEAD``/``GET /ORG/NAME/resolve/REV/PATH`` (files, with the ``X-Repo-Commit`` and ``ETag`` headers the
huggingface_hub cache needs). With ``[accessibility] offline = true`` it never contacts huggingface.co.

What olah 0.5.4 does not do, read from its source, and how the tests deal with it:

* It has no upload API. :class:`CapturedHub` stands in for huggingface_hub's write calls (``create_repo``,
  ``create_branch``, ``create_commit``) and commits exactly the captured files into the mirror repo with git, so
  the downloads that follow go through olah from a real git history. The upload helpers that do not end in
  ``create_commit`` (``upload_folder`` validates the card through ``/api/validate-yaml`` and, with ``hf_xet``
  installed, uploads through its own pipeline) raise, so a push that used them would fail instead of escaping.
* Offline, a repo-info request *without* a revision (``/api/models/ORG/NAME``) is answered 404: olah takes the
  latest commit from its proxy cache, never from the mirror (``get_newest_commit_hf_offline``). Clients must pass
  ``revision`` ("main" or a sha); ``/revision/main`` is resolved by git in the mirror.
* The tree listing without a trailing slash is redirected (307) to ``.../tree/REV/``; huggingface_hub follows it.
* Its index page ``/`` fails (500) with the installed starlette, so readiness is "answers HTTP at all".
* It takes every file of 121-149 bytes for a possible git-LFS pointer and decodes it as UTF-8, so a binary file of
  that size (a tiny PNG) makes the tree listing and that file's download fail with 500. The sample grid the
  tests push is therefore a real 64x64 grid, well above that size (as any real grid is).
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from huggingface_hub import CommitInfo, CommitOperationAdd, CommitOperationDelete, HfApi, RepoUrl

GIT_IDENTITY = ["-c", "user.name=hf_ddpm tests", "-c", "user.email=tests@hf-ddpm.invalid"]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@dataclass
class OlahServer:
    """An olah process serving ``mirrors``; ``endpoint`` is what ``HF_ENDPOINT`` must be set to."""

    root: Path
    port: int
    process: subprocess.Popen

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def mirrors(self) -> Path:
        return self.root / "mirrors"

    @property
    def log(self) -> str:
        return (self.root / "olah.out").read_text(errors="replace")

    @classmethod
    @contextlib.contextmanager
    def running(cls, root: Path, timeout: float = 60.0) -> Iterator[OlahServer]:
        """Start olah on a free port of 127.0.0.1 with an empty mirror folder under ``root``, wait until it
        answers, and stop it on exit."""
        port = free_port()
        (root / "mirrors").mkdir(parents=True)
        config = root / "olah.toml"
        config.write_text(
            "[basic]\n"
            f'host = "127.0.0.1"\nport = {port}\n'
            f'repos-path = "{root / "cache"}"\nmirrors-path = ["{root / "mirrors"}"]\n'
            "[accessibility]\noffline = true\n"
        )
        with open(root / "olah.out", "wb") as out:
            process = subprocess.Popen(
                [sys.executable, "-m", "olah.server", "--config", str(config), "--log-path", str(root / "logs")],
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=root,
            )
        server = cls(root, port, process)
        try:
            server._wait_until_ready(timeout)
            yield server
        finally:
            process.terminate()
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()

    def _wait_until_ready(self, timeout: float) -> None:
        """Poll until olah answers HTTP at all: any status counts (a repo that does not exist is a 404, and its
        index page ``/`` is a 500 with the installed starlette), a refused connection does not."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"olah exited with code {self.process.returncode}:\n{self.log}")
            try:
                urllib.request.urlopen(f"{self.endpoint}/api/models/readiness/probe/revision/main", timeout=2).close()
                return
            except urllib.error.HTTPError:
                return
            except OSError:
                time.sleep(0.2)
        raise RuntimeError(f"olah did not answer on {self.endpoint} within {timeout} s:\n{self.log}")


def _git(repo: Path, *args: str) -> str:
    return subprocess.run(
        ["git", *GIT_IDENTITY, *args], cwd=repo, check=True, capture_output=True, text=True
    ).stdout.strip()


def _content(operation: CommitOperationAdd) -> bytes:
    source = operation.path_or_fileobj
    if isinstance(source, bytes):
        return source
    if isinstance(source, (str, Path)):
        return Path(source).read_bytes()
    return source.read()


@dataclass
class CapturedHub:
    """huggingface_hub's write calls, captured and committed to olah's mirror repos with git.

    ``commits`` records every captured commit: repo id, branch, and the operations as (kind, path, bytes).
    """

    mirrors: Path
    endpoint: str
    commits: list[dict[str, Any]] = field(default_factory=list)

    def repo_path(self, repo_id: str) -> Path:
        return self.mirrors / "models" / repo_id

    def create_repo(self, repo_id: str, *, private: bool = False, exist_ok: bool = False, **_: Any) -> RepoUrl:
        path = self.repo_path(repo_id)
        if path.exists() and not exist_ok:
            raise FileExistsError(f"{repo_id} exists")
        if not path.exists():
            path.mkdir(parents=True)
            _git(path, "init", "-q", "-b", "main")
            _git(path, "commit", "-q", "--allow-empty", "-m", "initial commit")
        return RepoUrl(f"{self.endpoint}/{repo_id}", endpoint=self.endpoint)

    def create_branch(self, repo_id: str, *, branch: str, exist_ok: bool = False, **_: Any) -> None:
        path = self.repo_path(repo_id)
        if branch in _git(path, "branch", "--list", branch):
            if not exist_ok:
                raise FileExistsError(f"branch {branch} exists")
            return
        _git(path, "branch", branch, "main")

    def create_commit(
        self, repo_id: str, operations: list, *, commit_message: str, revision: str | None = None, **_: Any
    ) -> CommitInfo:
        path = self.repo_path(repo_id)
        branch = revision or "main"
        _git(path, "checkout", "-q", branch)
        recorded = []
        for operation in operations:
            target = path / operation.path_in_repo
            if isinstance(operation, CommitOperationDelete):
                _git(path, "rm", "-r", "-q", "--ignore-unmatch", operation.path_in_repo)
                recorded.append(("delete", operation.path_in_repo, b""))
                continue
            data = _content(operation)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)
            recorded.append(("add", operation.path_in_repo, data))
        _git(path, "add", "-A")
        _git(path, "commit", "-q", "-m", commit_message)
        sha = _git(path, "rev-parse", "HEAD")
        _git(path, "checkout", "-q", "main")
        self.commits.append({"repo_id": repo_id, "branch": branch, "sha": sha, "operations": recorded})
        return CommitInfo(
            commit_url=f"{self.endpoint}/{repo_id}/commit/{sha}",
            commit_message=commit_message,
            commit_description="",
            oid=sha,
            _endpoint=self.endpoint,
        )

    @contextlib.contextmanager
    def installed(self, monkeypatch: Any) -> Iterator[CapturedHub]:
        """Route ``HfApi``'s write calls here for the duration; upload helpers that bypass ``create_commit`` raise."""
        monkeypatch.setattr(HfApi, "create_repo", lambda api, repo_id, **kw: self.create_repo(repo_id, **kw))
        monkeypatch.setattr(HfApi, "create_branch", lambda api, repo_id, **kw: self.create_branch(repo_id, **kw))
        monkeypatch.setattr(
            HfApi,
            "create_commit",
            lambda api, repo_id, operations, **kw: self.create_commit(repo_id, operations, **kw),
        )
        for bypass in ("upload_folder", "upload_file", "preupload_lfs_files"):
            monkeypatch.setattr(HfApi, bypass, _refuse(bypass))
        yield self


def _refuse(name: str):
    def refuse(*args: Any, **kwargs: Any) -> None:
        raise AssertionError(f"HfApi.{name} bypasses create_commit, where the tests capture pushes")

    return refuse


def run_python(code: str, env: dict[str, str], cwd: Path, timeout: float = 300.0) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter with ``env`` added to a cleaned environment (no Hub token, one thread:
    the machine is shared); raise with its output if it fails."""
    base = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_"))}
    full_env = {
        **base,
        "OMP_NUM_THREADS": "1",
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "HF_HUB_DISABLE_PROGRESS_BARS": "1",
        **env,
    }
    result = subprocess.run(
        [sys.executable, "-c", code], env=full_env, cwd=cwd, capture_output=True, text=True, timeout=timeout
    )
    if result.returncode != 0:
        raise AssertionError(f"subprocess failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result
