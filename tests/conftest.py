"""Shared fixtures: the tiny FLUX.2 pipeline folder (built once per session) and small datasets."""

from __future__ import annotations

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
