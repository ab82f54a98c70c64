"""Shared fixtures: the tiny FLUX.2 pipeline folder (built once per session) and small datasets."""

from __future__ import annotations

import functools
import shutil
from pathlib import Path

import pytest
import torch

from flux2_train.demo import DEMO_DATA
from flux2_train.tiny import build_tiny_pipeline_folder


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU; run the GPU checks on a GPU machine (see bench/README.md)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


# --------------------------------------------------------------------------- torch.compile
# Without a GPU, Inductor's cost is its C++ code generation: with an empty cache, tens of seconds per
# compiled test on a 2-core machine (README, Tests). There the tests capture their graphs through
# Dynamo and AOTAutograd, with Inductor's decompositions and partitioner, and run them eagerly
# (`aot_eager_decomp_partition`): what they check of the compile is its graphs (how many, no breaks)
# and that training through them gives the eager losses. Inductor's own code (its fusions, its checks
# of the strides of saved tensors, an offload's included) is what the GPU tests compile (Triton); on
# the CPU, the tests marked `inductor` compile with it. The test ComfyUI server compiles as the other
# tests do (tests/comfy_test_nodes reads the variable).
TEST_COMPILE_BACKEND = "aot_eager_decomp_partition"
_TORCH_COMPILE = torch.compile


@pytest.fixture(autouse=True)
def _compile_without_cpu_code_generation(request, monkeypatch):
    if request.node.get_closest_marker("inductor") or torch.cuda.is_available():
        return
    monkeypatch.setattr(torch, "compile", functools.partial(_TORCH_COMPILE, backend=TEST_COMPILE_BACKEND))


# --------------------------------------------------------------------------- failure cases
# Tests marked `failure_case("...")` check the cases of the README's Failure behaviour table
# (tests/test_failure_table.py keeps the two in step); the summary says how many held.

def pytest_collection_finish(session):
    session.config.failure_cases = {item.nodeid: [name for m in item.iter_markers("failure_case") for name in m.args]
                                    for item in session.items}


def pytest_runtest_logreport(report):
    outcomes = _OUTCOMES.setdefault(report.nodeid, set())
    if report.failed:
        outcomes.add("failed")
    elif report.skipped:
        outcomes.add("skipped")
    elif report.when == "call":
        outcomes.add("passed")


_OUTCOMES: dict[str, set[str]] = {}


def pytest_terminal_summary(terminalreporter, config):
    cases = getattr(config, "failure_cases", None)
    if not cases:
        return
    by_case: dict[str, set[str]] = {}
    for nodeid, names in cases.items():
        for name in names:
            by_case.setdefault(name, set()).update(_OUTCOMES.get(nodeid, {"not run"}))
    if not by_case:
        return
    failed = sorted(n for n, o in by_case.items() if "failed" in o)
    # Held: some test of the case passed and none failed (a GPU-only test may skip beside a CPU one).
    held = sorted(n for n, o in by_case.items() if "passed" in o and "failed" not in o)
    unchecked = sorted(set(by_case) - set(failed) - set(held))
    line = f"failure cases: {len(held)} of {len(by_case)} held"
    if failed:
        line += f", {len(failed)} failed ({'; '.join(failed)})"
    if unchecked:
        line += f", {len(unchecked)} not checked here ({'; '.join(unchecked)})"
    terminalreporter.write_sep("-", line)


@pytest.fixture(scope="session")
def tiny_pipeline_dir(tmp_path_factory) -> Path:
    """A diffusers FLUX.2 [klein]-style pipeline folder with tiny random weights."""
    return build_tiny_pipeline_folder(tmp_path_factory.mktemp("tiny") / "tiny-flux2-klein")


@pytest.fixture(scope="session")
def tiny_dev_pipeline_dir(tmp_path_factory) -> Path:
    """The same, with the guidance input of FLUX.2 [dev]."""
    return build_tiny_pipeline_folder(tmp_path_factory.mktemp("tiny-dev") / "tiny-flux2-dev", guidance_embeds=True)


@pytest.fixture
def demo_dataset(tmp_path) -> Path:
    """A copy of the bundled sample images, free to modify."""
    dst = tmp_path / "dataset"
    shutil.copytree(DEMO_DATA, dst, ignore=shutil.ignore_patterns("*.md"))
    return dst


@pytest.fixture
def tiny_activations_move(monkeypatch):
    """Offloaded activations of a tiny model move: its saved tensors are all below the size that
    stays on the GPU, and a pass keeps the last offloaded blocks' activations there; with one block
    in flight, the first offloaded block's memory goes to the CPU and comes back."""
    from flux2_train import offload

    monkeypatch.setattr(offload, "_MIN_OFFLOAD_BYTES", 0)
    monkeypatch.setattr(offload, "ACTIVATIONS_IN_FLIGHT", 1)


# --------------------------------------------------------------------------- real ComfyUI
# Fixtures for tests marked `comfyui`: they skip when no ComfyUI is configured and fail
# when one is configured but broken (see tests/comfyui_harness.py).


@pytest.fixture(scope="session")
def comfyui_dir() -> Path:
    """The ComfyUI tree from COMFYUI_DIR or COMFYUI_ARCHIVE, checked against this Python."""
    from comfyui_harness import SKIP_REASON, ComfyUISetupError, check_comfyui, locate_comfyui

    try:
        path = locate_comfyui()
        if path is not None:
            check_comfyui(path)
        problem = None
    except ComfyUISetupError as e:
        problem = str(e)
    if problem:  # configured but broken: a failure, not a skip
        pytest.fail(problem, pytrace=False)
    if path is None:
        pytest.skip(SKIP_REASON)
    return path


@pytest.fixture(scope="session")
def comfy(comfyui_dir):
    """ComfyUI imported into this process on the CPU: a namespace of `comfy.*` modules,
    plus `tiny_clip(kind)` and `tiny_vae()` from the test nodes."""
    import comfy_test_nodes
    from comfyui_harness import import_comfy

    ns = import_comfy(comfyui_dir)
    ns.tiny_clip = comfy_test_nodes.tiny_clip
    ns.tiny_vae = comfy_test_nodes.tiny_vae
    return ns


@pytest.fixture(scope="session")
def comfy_server(comfyui_dir, tmp_path_factory):
    """A running ComfyUI with the pack and the test nodes, and the tiny FLUX.2 DiTs in
    models/diffusion_models/ under the names of ComfyUI's templates (TINY_MODEL_FILES)."""
    from comfyui_harness import ComfyServer, write_tiny_models

    server = ComfyServer(comfyui_dir, tmp_path_factory.mktemp("comfyui-base"), extra_args=["--disable-api-nodes"],
                         env={"FLUX2_TEST_COMPILE_BACKEND": TEST_COMPILE_BACKEND})
    write_tiny_models(server.models_dir)
    with server:
        yield server


@pytest.fixture(scope="session")
def comfy_dataset(comfy_server) -> str:
    """The bundled sample images in the test server's input folder; the name the dataset node takes."""
    dst = comfy_server.input_dir / "robots"
    if not dst.exists():
        shutil.copytree(DEMO_DATA, dst, ignore=shutil.ignore_patterns("*.md"))
    return "robots"
