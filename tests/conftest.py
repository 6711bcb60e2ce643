import atexit
import os
import shutil
import tempfile

# No hub downloads, ever, in tests; Prefect's telemetry off.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Every temporary file of the session (ours, MLflow's downloads, torchrun's torchelastic_*
# folders, servers' scratch) goes under one folder removed at exit, so repeated runs do not fill
# the disk; pytest's own tmp_path folders stay where pytest keeps (and prunes) them.
os.environ.setdefault("PYTEST_DEBUG_TEMPROOT", tempfile.gettempdir())
SESSION_TMP = tempfile.mkdtemp(prefix="srdiff-tests-")
os.environ["TMPDIR"] = SESSION_TMP  # subprocesses (torchrun, servers) inherit it
tempfile.tempdir = SESSION_TMP
atexit.register(shutil.rmtree, SESSION_TMP, ignore_errors=True)
# A torch hub cache of the tests' own: LPIPS is "unavailable" unless a test writes weights there,
# whatever the developer's ~/.cache/torch holds.
os.environ["TORCH_HOME"] = tempfile.mkdtemp(prefix="torch-home-")

if os.environ.get("PYTEST_XDIST_WORKER"):
    # `make test` runs two workers on the two cores: one intra-op thread each, since OpenMP
    # threads spin-wait and, oversubscribed, made tiny training steps many times slower.
    import torch

    torch.set_num_threads(1)

import pytest  # noqa: E402


@pytest.fixture
def one_thread():
    """One intra-op thread for tests of tiny tensors: OpenMP threads spin-wait, and on a loaded
    2-core machine two of them made a tiny training step up to 80x slower than one. The previous
    count is restored after the test."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def load_bench():
    """``load_bench("demo_patches")``: the script bench/demo_patches.py as a module, loaded once
    (bench/ is scripts, not a package)."""
    import importlib.util
    import sys
    from pathlib import Path

    loaded = {}

    def load(name: str):
        if name not in loaded:
            path = Path(__file__).resolve().parents[1] / "bench" / f"{name}.py"
            spec = importlib.util.spec_from_file_location(f"bench_{name}", path)
            module = importlib.util.module_from_spec(spec)
            sys.modules[spec.name] = module  # dataclasses resolve their module through sys.modules
            spec.loader.exec_module(module)
            loaded[name] = module
        return loaded[name]

    return load


@pytest.fixture(scope="session")
def prefect_harness():
    """One Prefect test server for the whole session (it takes seconds to start)."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


# The longest test files (minutes each on 2 cores), scheduled first: `make test` gives whole files
# to two workers in collection order, and one of these last would leave a worker idle for minutes.
LONGEST_FIRST = ("test_demo_restores.py", "test_deployments.py", "test_training.py", "test_resume_kill.py",
                 "test_pipeline_e2e.py", "test_cli_errors.py")


def pytest_collection_modifyitems(session, config, items):
    def rank(item) -> int:
        name = item.path.name
        return LONGEST_FIRST.index(name) if name in LONGEST_FIRST else len(LONGEST_FIRST)

    items.sort(key=rank)  # stable: within a file, and among the rest, the order stays

