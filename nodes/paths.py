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
    extra = [(p, f"${ENV_ALLOWED}") for p in os.environ.get(ENV_ALLOWED, "").split(os.pathsep) if p.strip()]
    path = settings_path()
    if path.is_file():
        form = '{"allowed_dataset_roots": ["/data/sets"]}'
        try:
            listed = json.loads(path.read_text(encoding="utf-8")).get("allowed_dataset_roots", [])
        except (ValueError, AttributeError) as e:
            raise ConfigError(f"{path} is not valid JSON of the form {form}: {e}") from None
        if not isinstance(listed, list):
            raise ConfigError(f"allowed_dataset_roots in {path} must be a list of folders, as in {form}")
        extra += [(p, str(path)) for p in listed]
    for entry, source in extra:
        if not isinstance(entry, str) or not Path(entry).expanduser().is_absolute():
            raise ConfigError(f"the allowed dataset folder {entry!r} (from {source}) must be an absolute path")
    return roots + [Path(p).expanduser() for p, _ in extra]


def allowed_clip_model_roots() -> list[Path]:
    """A CLIP model for scoring previews: where datasets may be, and ComfyUI's models folder."""
    return [*allowed_dataset_roots(), Path(folder_paths.models_dir)]


def check_dataset_files(folder: Path) -> None:
    """Files of the dataset folder linked from outside the allowed folders are refused like the folder would be.

    Every file is checked, not only the ones the scan will match: it takes a caption in any letter case
    (a.TXT for a.png), and none of them may be read before its check."""
    roots = allowed_dataset_roots()
    try:
        files = [f for f in folder.iterdir() if f.is_file()]
    except OSError:
        return  # the scan says why the folder cannot be listed
    for f in files:
        resolve_within(str(f), roots, "dataset file")


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
    # Sub-folders may be links: the file must still land inside the loras folder.
    resolve_within(str(base / clean), [base], "LoRA file name")
    path = base / f"{clean}.safetensors"
    counter = 1
    while os.path.lexists(path) and not overwrite:  # a broken link is taken too: the save would not replace it
        path = base / f"{clean}_{counter:03d}.safetensors"
        counter += 1
    return path


def output_view(path: str | Path) -> dict:
    """ComfyUI's /view query for a file under the output folder: filename, subfolder, type."""
    relative = Path(path).resolve().relative_to(Path(folder_paths.get_output_directory()).resolve())
    return {"filename": relative.name, "subfolder": relative.parent.as_posix(), "type": "output"}
