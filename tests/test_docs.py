"""The shell examples of README.md and docs/*.md stay true: each block is classified by a
``<!-- docs-test: ... -->`` comment (grammar in tests/docs_blocks.py) and the runnable ones are run.

Runnable blocks run in document order with ``bash -euo pipefail``, the venv's bin first on PATH, in a
copy of the repository (one per markdown file, so a block can use what an earlier block of the same
file wrote under ``runs/``) beside a ``shared`` link to ``../shared``. Blocks that talk to a Ray
cluster (``ray job ...``) get a private ``ray start --head`` cluster with token authentication, as
the docs tell users to run it; ``RAY_API_SERVER_ADDRESS`` points the job client at its dashboard
port and ``RAY_AUTH_TOKEN`` carries its token, so nothing is written to ``~/.ray`` and no other Ray
instance on the machine is touched.
"""
from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from onenip_ray.cli import build_parser
from tests.docs_blocks import REPO, all_blocks, cli_calls, shell_blocks, with_train_flags
from tools.cli_docs import option_strings

BLOCKS = all_blocks()
VENV_BIN = Path(sys.executable).parent
COPY_IGNORE = shutil.ignore_patterns(".git", ".venv", "runs", "demo_out", "__pycache__", "*.egg-info",
                                     ".pytest_cache", "build", "dist")
BLOCK_TIMEOUT_S = 600


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_every_shell_block_is_classified():
    assert BLOCKS, "no shell blocks found in README.md and docs/*.md"
    unclassified = [b.id for b in BLOCKS if b.directive is None]
    assert not unclassified, ("shell blocks without a `<!-- docs-test: run -->` or "
                              f"`<!-- docs-test: skip (reason) -->` comment before the fence: {unclassified}")
    invalid = [f"{b.id}: {b.directive!r}" for b in BLOCKS if not b.is_valid]
    assert not invalid, f"docs-test comments that are neither `run[, train with FLAGS]` nor `skip (reason)`: {invalid}"


def test_the_parser_sees_unclassified_blocks_and_steps_over_other_fences(tmp_path):
    doc = tmp_path / "doc.md"
    doc.write_text("<!-- docs-test: skip (needs a GPU cluster) -->\n\n```bash\nonenip info\n```\n"
                   "```\nnot shell\n```\n```python\nprint()\n```\n  ```sh\n  make demo\n  ```\n")
    first, second = shell_blocks(doc, tmp_path)
    assert (first.line, first.skip_reason, first.text) == (3, "needs a GPU cluster", "onenip info\n")
    assert (second.line, second.directive, second.text) == (12, None, "make demo\n")


def test_every_onenip_call_in_a_block_uses_real_subcommands_and_flags():
    """Skipped blocks too: a synopsis cannot run, but its subcommands and flags must exist."""
    known = option_strings(build_parser())
    wrong = [f"{b.id}: onenip {command} {flag}" for b in BLOCKS for command, flags in cli_calls(b.text)
             for flag in (flags if command in known else ["(no such subcommand)"])
             if flag not in known.get(command, ())]
    assert not wrong, f"doc examples with unknown subcommands or flags: {wrong}"


def test_train_flags_are_appended_to_training_commands_only():
    text = ("onenip train --data d \\\n  --out runs/a   # the recipe\nonenip evaluate --bundle runs/a\n"
            "ray job submit -- \\\n  python jobs/train.py --out b\n")
    assert with_train_flags(text, "--epochs 1") == (
        "onenip train --data d \\\n  --out runs/a --epochs 1   # the recipe\nonenip evaluate --bundle runs/a\n"
        "ray job submit -- \\\n  python jobs/train.py --out b --epochs 1\n")
    assert with_train_flags(text, "") == text


@pytest.fixture(scope="session")
def docs_workdirs(tmp_path_factory):
    """A lazily made copy of the repository per markdown file, with ``../shared`` beside it."""
    made: dict[str, Path] = {}

    def workdir(doc: str) -> Path:
        if doc not in made:
            base = tmp_path_factory.mktemp("docs-" + Path(doc).stem)
            (base / "shared").symlink_to(REPO.parent / "shared")
            made[doc] = base / "repo"
            shutil.copytree(REPO, made[doc], ignore=COPY_IGNORE)
        return made[doc]

    return workdir


def _wait_for_dashboard(url: str, process: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + 120
    while True:
        try:
            urllib.request.urlopen(f"{url}/api/version", timeout=2).close()
            return
        except urllib.error.HTTPError:
            return  # answering, if only to say "unauthorized"
        except OSError:
            if process.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"`ray start --head` did not bring up the dashboard at {url}:\n{log.read_text()[-3000:]}")
            time.sleep(0.5)


def _stop(process: subprocess.Popen) -> None:
    """SIGTERM to the process group of ``ray start --block`` (its own session: GCS, raylet, dashboard,
    workers), then SIGKILL to what is left; unlike ``ray stop`` this leaves other Ray instances alone."""
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
    time.sleep(2)
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


@pytest.fixture(scope="session")
def ray_head(tmp_path_factory):
    """A private ``ray start --head`` cluster (2 CPUs) that turns token authentication on because a
    token exists, as docs/training.md sets it up; yields the client environment (address, token)."""
    token = secrets.token_hex(32)
    temp_dir = tempfile.mkdtemp(prefix="rayd", dir="/tmp")  # short: Ray puts unix sockets here
    dashboard_port = _free_port()
    ports = {"--port": _free_port(), "--dashboard-port": dashboard_port, "--ray-client-server-port": _free_port(),
             "--dashboard-agent-listen-port": _free_port(), "--metrics-export-port": _free_port()}
    env = {**os.environ, "PATH": f"{VENV_BIN}{os.pathsep}{os.environ['PATH']}", "RAY_AUTH_TOKEN": token,
           "RAY_USAGE_STATS_ENABLED": "0"}
    for key in ("RAY_ADDRESS", "RAY_AUTH_MODE"):  # as in docs/training.md: a token exists, the mode is Ray's default
        env.pop(key, None)
    command = [str(VENV_BIN / "ray"), "start", "--head", "--block", "--num-cpus", "2", "--include-dashboard", "true",
               "--dashboard-host", "127.0.0.1", "--object-store-memory", str(256 * 2**20), "--temp-dir", temp_dir,
               *[str(x) for pair in ports.items() for x in pair]]
    log = tmp_path_factory.mktemp("ray-head") / "ray-start.log"
    with open(log, "wb") as out:
        process = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{dashboard_port}"
    try:
        _wait_for_dashboard(url, process, log)
        assert "Token authentication is enabled" in log.read_text(), "the cluster did not turn token auth on"
        yield {"RAY_API_SERVER_ADDRESS": url, "RAY_AUTH_TOKEN": token}
    finally:
        _stop(process)
        shutil.rmtree(temp_dir, ignore_errors=True)


def _block_env(cluster: dict[str, str]) -> dict[str, str]:
    env = {**os.environ, "PATH": f"{VENV_BIN}{os.pathsep}{os.environ['PATH']}", "RAY_USAGE_STATS_ENABLED": "0",
           "RAY_AUTH_TOKEN": secrets.token_hex(32), **cluster}  # a token in the env: Ray never writes ~/.ray
    for key in ("RAY_ADDRESS", "RAY_AUTH_MODE", "VIRTUAL_ENV"):
        env.pop(key, None)
    return env


def _param(block):
    marks = [pytest.mark.slow] if block.skip_reason is None else []
    return pytest.param(block, id=block.id, marks=marks)


@pytest.mark.parametrize("block", [_param(b) for b in BLOCKS])
def test_doc_block(block, docs_workdirs, request):
    if block.directive is None or not block.is_valid:
        pytest.fail(f"{block.id} is not classified (see test_every_shell_block_is_classified)")
    if block.skip_reason is not None:
        pytest.skip(f"{block.id}: {block.skip_reason}")
    cluster = request.getfixturevalue("ray_head") if "ray job" in block.text else {}
    script = with_train_flags(block.text, block.train_flags)
    started = time.monotonic()
    run = subprocess.run(["bash", "-euo", "pipefail", "-c", script], check=False, cwd=docs_workdirs(block.path),
                         env=_block_env(cluster), capture_output=True, text=True, timeout=BLOCK_TIMEOUT_S)
    seconds = time.monotonic() - started
    assert run.returncode == 0, (f"{block.id} exited {run.returncode} after {seconds:.0f} s\n--- script\n{script}"
                                 f"--- stdout\n{run.stdout[-4000:]}\n--- stderr\n{run.stderr[-4000:]}")
