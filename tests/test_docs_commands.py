"""The work-pool and deploy commands of docs/running.md, run as written there against a real
Prefect server on 127.0.0.1: read from the markdown itself, so the test fails when the docs drift
from what the installed Prefect accepts (issue 16, item 9)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).parent))
from servers import post_json, prefect_server  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DOC = REPO / "docs" / "running.md"
BIN = Path(sys.executable).parent
# The shell lines the "Work pools" section documents; `prefect worker start` serves until stopped.
POOL_COMMAND = re.compile(r"\bprefect (work-pool|deploy|worker)\b")


def bash_lines(markdown: str) -> list[str]:
    """Every command line of the markdown's ```bash blocks, trailing `# comments` removed."""
    lines = []
    for block in re.findall(r"```bash\n(.*?)```", markdown, flags=re.S):
        for line in block.splitlines():
            command = re.sub(r"\s+#.*$", "", line).strip()
            if command and not command.startswith("#"):
                lines.append(command)
    return lines


def pool_commands(lines: list[str]) -> list[str]:
    return [line for line in lines if POOL_COMMAND.search(line)]


def documented() -> list[str]:
    commands = pool_commands(bash_lines(DOC.read_text()))
    assert any("prefect deploy" in c for c in commands), f"no `prefect deploy` line in {DOC}"
    return commands


def yaml_comment_commands() -> list[str]:
    """The same commands in prefect.yaml's header comment."""
    lines = []
    for line in (REPO / "prefect.yaml").read_text().splitlines():
        if line.startswith("#"):
            lines.append(re.sub(r"\s+#.*$", "", line.lstrip("# ")).strip())
    return pool_commands(lines)


def worker_pool(command: str) -> str:
    return re.search(r"--pool\s+(\S+)", command).group(1)


def test_every_copy_of_the_commands_is_the_tested_one():
    """README, the other docs and prefect.yaml's header say nothing the test below does not run
    (a worker may name either pool the docs create)."""
    tested = documented()
    created = {c.split()[3] for c in tested if c.startswith("prefect work-pool create")}
    elsewhere = [*yaml_comment_commands()]
    for md in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]:
        elsewhere += pool_commands(bash_lines(md.read_text()))
    for command in elsewhere:
        if command.startswith("prefect worker start"):
            assert worker_pool(command) in created, command
        else:
            assert command in tested, f"{command!r} differs from {DOC.name}'s commands {tested}"


def run_line(command: str, env: dict) -> str:
    """One documented line through bash in the repository, as a user pastes it."""
    proc = subprocess.run(["bash", "-c", command], cwd=REPO, env=env, stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, timeout=120)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"`{command}` (from {DOC}) failed with {proc.returncode}:\n{out[-3000:]}"
    return out


@pytest.mark.slow
def test_the_documented_work_pool_and_deploy_commands_run_as_written(tmp_path):
    commands = documented()
    with prefect_server(tmp_path / "prefect-home", tmp_path / "server.log") as server_env:
        api = server_env["PREFECT_API_URL"]
        env = {**server_env, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "PWD": str(REPO)}
        env.pop("SRDIFF_HOME", None)
        for command in commands:
            if command.startswith("prefect worker start"):
                # It polls for work until stopped: once is enough to show the pool serves.
                run_line(f"{command} --run-once", env)
            else:
                run_line(command, env)
        pools = {p["name"]: p for p in post_json(f"{api}/work_pools/filter", {})}
        deployments = {d["name"]: d for d in post_json(f"{api}/deployments/filter", {})}

    spec = yaml.safe_load((REPO / "prefect.yaml").read_text())
    assert {"srdiff-cpu", "srdiff-gpu"} <= set(pools)
    assert pools["srdiff-gpu"]["concurrency_limit"] == 1  # one GPU flow run at a time, as the docs say
    assert set(deployments) == {d["name"] for d in spec["deployments"]}
    for declared in spec["deployments"]:
        made = deployments[declared["name"]]
        assert made["work_pool_name"] == declared["work_pool"]["name"]
        assert made["parameters"] == declared["parameters"]
        limit = (made.get("global_concurrency_limit") or {}).get("limit")
        assert limit == declared.get("concurrency_limit"), declared["name"]
        # SRDIFF_HOME=$PWD: workers run the flow in the repository the commands ran in.
        assert made["pull_steps"] == [{"prefect.deployments.steps.set_working_directory": {"directory": str(REPO)}}]
