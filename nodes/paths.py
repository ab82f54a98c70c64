"""Where the nodes may read and write: ComfyUI's folders, plus an explicit allow-list.

Datasets come from ComfyUI's input folder; other folders only when listed in
`<ComfyUI user folder>/flux2_lora_trainer.json` (`{"allowed_dataset_roots": [...]}`)
or in the FLUX2_TRAINER_ALLOWED_DIRS environment variable (os.pathsep-separated).
Runs (checkpoints, caches) live in `<output>/flux2_lora/`; LoRA files in the first
folder ComfyUI's LoRA loaders list.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import folder_paths
from flux2_train.errors import ConfigError, DatasetError
from flux2_train.fsutil import check_file_name, resolve_within

SETTINGS_FILE = "flux2_lora_trainer.json"
ENV_ALLOWED = "FLUX2_TRAINER_ALLOWED_DIRS"


def settings_path() -> Path:
    return Path(folder_paths.get_user_directory()) / SETTINGS_FILE


def allowed_dataset_roots() -> list[Path]:
    roots = [Path(folder_paths.get_input_directory())]
    extra = [p for p in os.environ.get(ENV_ALLOWED, "").split(os.pathsep) if p.strip()]
    path = settings_path()
    if path.is_file():
        try:
            extra += list(json.loads(path.read_text(encoding="utf-8")).get("allowed_dataset_roots", []))
        except (ValueError, AttributeError) as e:
            raise ConfigError(f"{path} is not valid JSON of the form "
                              f'{{"allowed_dataset_roots": ["/data/sets"]}}: {e}') from None
    return roots + [Path(p).expanduser() for p in extra]


def dataset_folder(text: str) -> Path:
    folder = resolve_within(text, allowed_dataset_roots(), "dataset folder")
    if not folder.is_dir():
        raise DatasetError(f"the dataset folder {folder} does not exist: put your images (and optional .txt "
                           f"captions) in {folder}, or set the folder to one under {allowed_dataset_roots()[0]}")
    return folder


def runs_root() -> Path:
    return Path(folder_paths.get_output_directory()) / "flux2_lora"


def run_folder(name: str) -> Path:
    """An earlier run to resume, by name (or path) inside the runs folder."""
    return resolve_within(name, [runs_root()], "run to resume")


def loras_folder() -> Path:
    """The folder `LoraLoaderModelOnly` lists first (not output/, which the loaders do not list)."""
    return Path(folder_paths.get_folder_paths("loras")[0])


def lora_file(name: str, overwrite: bool) -> Path:
    """`<loras>/<name>.safetensors`; with a counter suffix when the file exists and overwrite is off."""
    clean = check_file_name(name, "LoRA file name").removesuffix(".safetensors")
    base = loras_folder()
    path = base / f"{clean}.safetensors"
    counter = 1
    while path.exists() and not overwrite:
        path = base / f"{clean}_{counter:03d}.safetensors"
        counter += 1
    return path
