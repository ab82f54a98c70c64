"""Run tests against a real ComfyUI: locate it, import it in-process, or start it as a server.

ComfyUI comes from `COMFYUI_DIR` (an extracted tree with main.py) or `COMFYUI_ARCHIVE`
(a source tarball, extracted once into a cache folder outside the repo). On machines
without a working torchvision, import-only stand-ins go on the path: from
`COMFYUI_SHIMS`, else the `shims/` folder next to the archive.

Also here: `ui_to_api`, which turns a workflow saved by ComfyUI's page into the API
prompt the page would queue, so example workflows can be run headless.
"""

from __future__ import annotations

import asyncio
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import shutil
import socket
import subprocess
import sys
import tarfile
import tempfile
import time
import types
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from typing import Any, Callable

REPO_ROOT = Path(__file__).resolve().parents[1]
PACK_FOLDER = "comfyui-flux2-lora-trainer"  # the pack's folder name under custom_nodes/
TEST_NODES_DIR = Path(__file__).resolve().parent / "comfy_test_nodes"

# ComfyUI's FLUX.2 templates load diffusion models under these names.
TINY_MODEL_FILES = {
    "klein": "flux-2-klein-base-4b.safetensors",
    "dev": "flux2_dev_fp8mixed.safetensors",
}

SKIP_REASON = (
    "needs a real ComfyUI: set COMFYUI_DIR to a ComfyUI checkout (the folder with main.py) "
    "or COMFYUI_ARCHIVE to a ComfyUI source tarball; .ci/run sets COMFYUI_ARCHIVE"
)

# Installed from ComfyUI's requirements.txt by scripts/bootstrap, except these: the CPU
# machines have no matching torchvision/torchaudio build (the shims stand in for them).
_NOT_REQUIRED = {"torch", "torchvision", "torchaudio"}

# torchvision.transforms.v2 is missing from the shared shims, but diffusers' model
# modules import it once transformers reports torchvision as present.
_V2_STUBS = {
    "torchvision/transforms/v2/__init__.py": (
        "from torchvision._stub import make_getattr\n"
        '__getattr__ = make_getattr("torchvision.transforms.v2")\n'
        "from torchvision.transforms.v2 import functional  # noqa: E402,F401\n"
    ),
    "torchvision/transforms/v2/functional.py": (
        "from torchvision._stub import make_getattr\n"
        '__getattr__ = make_getattr("torchvision.transforms.v2.functional")\n'
    ),
}


class ComfyUISetupError(RuntimeError):
    """ComfyUI is configured but unusable (missing file, missing Python packages)."""


# --------------------------------------------------------------------------- locating


def cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "flux2-lora-trainer"


def locate_comfyui() -> Path | None:
    """The ComfyUI tree named by COMFYUI_DIR or COMFYUI_ARCHIVE; None when neither is set.

    Raises ComfyUISetupError when a variable is set but points at nothing usable.
    """
    if directory := os.environ.get("COMFYUI_DIR"):
        path = Path(directory).expanduser().resolve()
        if not (path / "main.py").is_file():
            raise ComfyUISetupError(f"COMFYUI_DIR={directory} has no main.py; point it at a ComfyUI checkout")
        return path
    if archive := os.environ.get("COMFYUI_ARCHIVE"):
        path = Path(archive).expanduser().resolve()
        if not path.is_file():
            raise ComfyUISetupError(f"COMFYUI_ARCHIVE={archive} does not exist")
        from flux2_train.cache import file_sha256

        try:
            tree = _extract_once(path, cache_root() / f"comfyui-{file_sha256(path)[:12]}") / "ComfyUI"
        except (tarfile.TarError, OSError) as e:
            raise ComfyUISetupError(f"COMFYUI_ARCHIVE={archive} could not be extracted: {e}") from e
        if not (tree / "main.py").is_file():
            raise ComfyUISetupError(f"COMFYUI_ARCHIVE={archive} has no ComfyUI/main.py")
        return tree
    return None


def _extract_once(archive: Path, dest: Path) -> Path:
    """Extract into `dest` unless done already; a rename makes concurrent runs safe."""
    if dest.is_dir():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}-", dir=dest.parent))
    try:
        with tarfile.open(archive) as tar:
            # The "data" filter refuses members that would land outside `tmp` (Pythons without it: plain).
            tar.extractall(tmp, **({"filter": "data"} if hasattr(tarfile, "data_filter") else {}))
        _publish(tmp, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def _publish(tmp: Path, dest: Path) -> None:
    try:
        os.rename(tmp, dest)
    except OSError:
        if not dest.is_dir():  # not a lost race: a real failure
            raise


# --------------------------------------------------------------------------- shims


def torchvision_missing() -> bool:
    """True when `import torchvision` fails in this interpreter (checked in a child process)."""
    if importlib.util.find_spec("torchvision") is None:
        return True
    probe = subprocess.run([sys.executable, "-c", "import torchvision"], capture_output=True)
    return probe.returncode != 0


def shim_overlay() -> Path | None:
    """A folder to put first on the path so ComfyUI imports; None when torchvision works.

    The shared shims are copied into the cache and completed with the torchvision v2 stubs.
    """
    if not torchvision_missing():
        return None
    source = _shim_source()
    files = sorted(p for p in source.rglob("*.py") if "__pycache__" not in p.parts)
    digest = hashlib.sha256(json.dumps(_V2_STUBS).encode())
    for p in files:
        digest.update(str(p.relative_to(source)).encode() + b"\0" + p.read_bytes())
    dest = cache_root() / f"shims-{digest.hexdigest()[:12]}"
    if dest.is_dir():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}-", dir=dest.parent))
    try:
        for p in files:
            target = tmp / p.relative_to(source)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(p.read_bytes())
        for rel, text in _V2_STUBS.items():
            (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
            (tmp / rel).write_text(text)
        _publish(tmp, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def _shim_source() -> Path:
    if shims := os.environ.get("COMFYUI_SHIMS"):
        candidates = [Path(shims).expanduser()]
    elif archive := os.environ.get("COMFYUI_ARCHIVE"):
        candidates = [Path(archive).expanduser().resolve().parent / "shims"]
    else:
        candidates = []
    for path in candidates:
        if (path / "torchvision" / "_stub.py").is_file():
            return path
    raise ComfyUISetupError(
        "torchvision does not import in this Python and no stand-ins were found: install torchvision, "
        "or set COMFYUI_SHIMS to a folder with the import-only torchvision/torchaudio stand-ins"
        + (f" (looked in {candidates[0]})" if candidates else "")
    )


# --------------------------------------------------------------------------- requirements


def missing_requirements(comfy_dir: Path) -> list[str]:
    """ComfyUI's requirements (torch family aside) that this Python lacks or has at a wrong version."""
    from packaging.requirements import InvalidRequirement, Requirement

    missing = []
    for line in (comfy_dir / "requirements.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        try:
            req = Requirement(line)
        except InvalidRequirement:
            continue
        if req.name.lower() in _NOT_REQUIRED or (req.marker and not req.marker.evaluate()):
            continue
        try:
            version = importlib.metadata.version(req.name)
        except importlib.metadata.PackageNotFoundError:
            missing.append(line)
            continue
        if req.specifier and not req.specifier.contains(version, prereleases=True):
            missing.append(f"{line} (found {version})")
    return missing


def check_comfyui(comfy_dir: Path) -> None:
    """Raise ComfyUISetupError when this Python cannot run the ComfyUI in `comfy_dir`."""
    missing = missing_requirements(comfy_dir)
    if missing:
        raise ComfyUISetupError(
            "ComfyUI's Python packages are missing from this environment: "
            + ", ".join(missing)
            + ". Run scripts/bootstrap with COMFYUI_DIR or COMFYUI_ARCHIVE set to install them."
        )
    shim_overlay()  # raises when torchvision is missing and no stand-ins exist


# --------------------------------------------------------------------------- in-process


def import_comfy(comfy_dir: Path) -> types.SimpleNamespace:
    """Import ComfyUI's `comfy` package into this process, on the CPU.

    Returns a namespace with the commonly used modules (sd, model_management, samplers,
    sample, utils, latent_formats) plus `dir` and `shims`.
    """
    comfy_dir = Path(comfy_dir).resolve()
    shims = shim_overlay()
    for entry in (comfy_dir, shims):
        if entry is not None and str(entry) not in sys.path:
            sys.path.insert(0, str(entry))
    # comfy.cli_args parses no command line unless asked; `cpu` must be set before
    # comfy.model_management is imported, which otherwise looks for CUDA.
    import comfy.options  # noqa: F401
    from comfy.cli_args import args

    if not args.cpu and "comfy.model_management" in sys.modules:
        raise RuntimeError("comfy.model_management was imported before import_comfy could select the CPU")
    args.cpu = True
    import comfy.latent_formats
    import comfy.model_management
    import comfy.sample
    import comfy.samplers
    import comfy.sd
    import comfy.utils

    if Path(comfy.sd.__file__).resolve().parents[1] != comfy_dir:
        raise RuntimeError(f"imported comfy from {comfy.sd.__file__}, not from {comfy_dir}")
    return types.SimpleNamespace(
        dir=comfy_dir,
        shims=shims,
        sd=comfy.sd,
        model_management=comfy.model_management,
        samplers=comfy.samplers,
        sample=comfy.sample,
        utils=comfy.utils,
        latent_formats=comfy.latent_formats,
    )


def tiny_dit_state_dict(kind: str = "klein", seed: int = 0) -> dict:
    """The tiny FLUX.2 DiT with ComfyUI's (BFL) key names; [dev] has the guidance input."""
    from flux2_train.keys import diffusers_to_bfl_state_dict
    from flux2_train.tiny import tiny_transformer

    if kind not in TINY_MODEL_FILES:
        raise ValueError(f"kind must be one of {sorted(TINY_MODEL_FILES)}, not {kind!r}")
    model = tiny_transformer(guidance_embeds=kind == "dev", seed=seed)
    return {k: v.contiguous() for k, v in diffusers_to_bfl_state_dict(model.state_dict()).items()}


def write_tiny_models(models_dir: Path) -> dict[str, Path]:
    """Write the tiny [klein] and [dev] DiTs into `models_dir/diffusion_models/`."""
    from safetensors.torch import save_file

    folder = Path(models_dir) / "diffusion_models"
    folder.mkdir(parents=True, exist_ok=True)
    paths = {}
    for kind, name in TINY_MODEL_FILES.items():
        paths[kind] = folder / name
        save_file(tiny_dit_state_dict(kind), str(paths[kind]))
    return paths


# --------------------------------------------------------------------------- server


class PromptRejected(RuntimeError):
    """POST /prompt answered 400; `error` holds the server's JSON (error, node_errors)."""

    def __init__(self, error: dict):
        self.error = error
        super().__init__("ComfyUI rejected the prompt: " + json.dumps(error, indent=1)[:4000])


class ExecutionFailed(RuntimeError):
    """A queued prompt ended with an error or was interrupted."""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ComfyServer:
    """A headless ComfyUI process on 127.0.0.1 with its own base directory.

    The pack is linked into custom_nodes/ under PACK_FOLDER, the test nodes as
    `comfy_test_nodes`. Use as a context manager, or call start() and stop().
    """

    def __init__(
        self,
        comfy_dir: Path,
        base_dir: Path,
        *,
        extra_args: list[str] | None = None,
        custom_nodes: dict[str, Path] | None = None,
        env: dict[str, str] | None = None,
    ):
        self.comfy_dir = Path(comfy_dir).resolve()
        self.base_dir = Path(base_dir).resolve()
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = self.base_dir / "comfyui.log"
        self.extra_args = list(extra_args or [])
        self.custom_nodes = {PACK_FOLDER: REPO_ROOT, "comfy_test_nodes": TEST_NODES_DIR, **(custom_nodes or {})}
        self.env = dict(env or {})
        self.process: subprocess.Popen | None = None
        self._log = None
        self._object_info: dict | None = None

    # folders ComfyUI uses under --base-directory
    @property
    def input_dir(self) -> Path:
        return self.base_dir / "input"

    @property
    def output_dir(self) -> Path:
        return self.base_dir / "output"

    @property
    def models_dir(self) -> Path:
        return self.base_dir / "models"

    @property
    def custom_nodes_dir(self) -> Path:
        return self.base_dir / "custom_nodes"

    def __enter__(self) -> "ComfyServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self, timeout: float = 120) -> "ComfyServer":
        for sub in ("custom_nodes", "input", "output", "models", "user", "temp"):
            (self.base_dir / sub).mkdir(parents=True, exist_ok=True)
        for name, source in self.custom_nodes.items():
            link = self.custom_nodes_dir / name
            if not os.path.lexists(link):
                link.symlink_to(Path(source).resolve(), target_is_directory=True)
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **self.env}
        if shims := shim_overlay():
            env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(shims), env.get("PYTHONPATH")]))
        cmd = [
            sys.executable, "main.py", "--cpu",
            "--listen", "127.0.0.1", "--port", str(self.port),
            "--base-directory", str(self.base_dir),
            # The default database path is inside the ComfyUI tree; keep that tree clean.
            "--database-url", f"sqlite:///{self.base_dir / 'user' / 'comfyui.db'}",
            *self.extra_args,
        ]
        self._log = open(self.log_path, "ab")
        self.process = subprocess.Popen(cmd, cwd=self.comfy_dir, env=env, stdout=self._log, stderr=subprocess.STDOUT)
        try:
            self._wait_ready(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"ComfyUI exited with code {self.process.returncode} while starting:\n{self.log_tail()}")
            try:
                self._object_info = self._request("GET", "/object_info", timeout=30)
                return
            except (urllib.error.URLError, ConnectionError, OSError):
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"ComfyUI did not answer /object_info within {timeout:.0f} s:\n{self.log_tail()}")
            time.sleep(0.1)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        if self._log is not None:
            self._log.close()
            self._log = None

    # -- logs

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def log_tail(self, chars: int = 6000) -> str:
        return self.log_text()[-chars:]

    # -- HTTP

    def _request(self, method: str, path: str, body: Any = None, timeout: float = 30) -> Any:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, method=method, headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            raw = resp.read()
        return json.loads(raw) if raw else None

    def object_info(self, refresh: bool = False) -> dict:
        """All node definitions (cached after the first call)."""
        if refresh or self._object_info is None:
            self._object_info = self._request("GET", "/object_info", timeout=60)
        return self._object_info

    def queue(self, prompt: dict, client_id: str | None = None, prompt_id: str | None = None) -> str:
        """POST /prompt; returns the prompt id. Raises PromptRejected on a validation error."""
        body = {"prompt": prompt, "client_id": client_id or uuid.uuid4().hex}
        if prompt_id:
            body["prompt_id"] = prompt_id
        try:
            return self._request("POST", "/prompt", body)["prompt_id"]
        except urllib.error.HTTPError as e:
            text = e.read().decode(errors="replace")
            try:
                error = json.loads(text) if e.code == 400 else None
            except json.JSONDecodeError:
                error = None
            if error is not None:
                raise PromptRejected(error) from None
            raise RuntimeError(f"POST /prompt failed with HTTP {e.code}: {text}") from None

    def history(self, prompt_id: str) -> dict | None:
        return self._request("GET", f"/history/{prompt_id}").get(prompt_id)

    def wait(self, prompt_id: str, timeout: float = 60) -> dict:
        """Poll GET /history/<id> until the prompt has finished; returns its history entry."""
        deadline = time.monotonic() + timeout
        while True:
            entry = self.history(prompt_id)
            if entry is not None:  # entries appear once the prompt has finished
                return entry
            if self.process is not None and self.process.poll() is not None:
                raise RuntimeError(f"ComfyUI exited with code {self.process.returncode}:\n{self.log_tail()}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"prompt {prompt_id} did not finish within {timeout:.0f} s:\n{self.log_tail()}")
            time.sleep(0.05)

    def interrupt(self, prompt_id: str | None = None) -> None:
        """POST /interrupt: what the page's Cancel button does."""
        self._request("POST", "/interrupt", {"prompt_id": prompt_id} if prompt_id else {})

    def run(
        self,
        prompt: dict,
        timeout: float = 120,
        *,
        check: bool = True,
        on_event: Callable[[str, dict], None] | None = None,
    ) -> tuple[dict, list[tuple[str, dict]]]:
        """Queue `prompt`, collect its websocket messages, and wait for the history entry.

        Returns (history entry, [(type, data), ...]). `on_event` sees each message as it
        arrives (it may call interrupt()). With `check`, a failed or interrupted run raises
        ExecutionFailed with the server's error and the log tail.
        """
        prompt_id = str(uuid.uuid4())
        events = asyncio.run(self._collect_events(prompt, prompt_id, timeout, on_event))
        entry = self.wait(prompt_id, timeout=30)
        if check and entry["status"].get("status_str") != "success":
            failure = [e for e in events if e[0] in ("execution_error", "execution_interrupted")]
            raise ExecutionFailed(f"prompt failed: {json.dumps(failure or entry['status'], indent=1)[:6000]}\n{self.log_tail()}")
        return entry, events

    async def _collect_events(self, prompt, prompt_id, timeout, on_event) -> list[tuple[str, dict]]:
        import aiohttp  # a ComfyUI requirement

        client_id = uuid.uuid4().hex
        events: list[tuple[str, dict]] = []
        deadline = time.monotonic() + timeout
        async with aiohttp.ClientSession() as session:
            async with session.ws_connect(f"{self.url}/ws?clientId={client_id}", max_msg_size=0) as ws:
                await asyncio.to_thread(self.queue, prompt, client_id, prompt_id)
                while True:
                    try:
                        msg = await asyncio.wait_for(ws.receive(), max(0.0, deadline - time.monotonic()))
                    except asyncio.TimeoutError:
                        raise TimeoutError(f"prompt {prompt_id} did not finish within {timeout:.0f} s:\n{self.log_tail()}") from None
                    if msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.ERROR):
                        raise RuntimeError(f"the websocket closed during the run:\n{self.log_tail()}")
                    if msg.type != aiohttp.WSMsgType.TEXT:
                        continue  # binary preview images
                    message = json.loads(msg.data)
                    kind, data = message.get("type"), message.get("data") or {}
                    events.append((kind, data))
                    if on_event is not None:
                        await asyncio.to_thread(on_event, kind, data)
                    # The worker sends this last, after success, error or interrupt alike.
                    if kind == "executing" and data.get("node") is None and data.get("prompt_id") == prompt_id:
                        return events

    def upload_image(self, path: Path, subfolder: str = "") -> str:
        """Upload an image through POST /upload/image; returns the name LoadImage takes."""
        import aiohttp

        async def post() -> dict:
            form = aiohttp.FormData()
            form.add_field("image", Path(path).read_bytes(), filename=Path(path).name)
            form.add_field("subfolder", subfolder)
            form.add_field("overwrite", "true")
            async with aiohttp.ClientSession() as session:
                async with session.post(f"{self.url}/upload/image", data=form) as resp:
                    resp.raise_for_status()
                    return await resp.json()

        answer = asyncio.run(post())
        return f"{answer['subfolder']}/{answer['name']}" if answer.get("subfolder") else answer["name"]


def output_images(server: ComfyServer, entry: dict) -> list[Path]:
    """Files that SaveImage-like nodes reported in a history entry, as paths on disk."""
    roots = {"output": server.output_dir, "temp": server.base_dir / "temp", "input": server.input_dir}
    paths = []
    for output in entry.get("outputs", {}).values():
        for image in output.get("images", []):
            paths.append(roots[image.get("type", "output")] / image.get("subfolder", "") / image["filename"])
    return paths


# --------------------------------------------------------------------------- UI workflow -> API prompt

MUTED, BYPASSED = 2, 4
# Front-end-only nodes: never sent to the server.
VIRTUAL_NODES = {"Note", "MarkdownNote", "PrimitiveNode", "Reroute"}
# Input types the page draws as widgets (its ComfyWidgets table); other types are sockets only.
WIDGET_TYPES = {
    "INT", "FLOAT", "STRING", "BOOLEAN", "COMBO", "MARKDOWN", "IMAGEUPLOAD", "COLOR", "IMAGECOMPARE",
    "BOUNDING_BOX", "CHART", "GALLERIA", "PAINTER", "COMPOSITOR", "TEXTAREA", "CURVE", "RANGE",
    "VIDEO_EDIT", "BOUNDING_BOXES", "COLORS",
}
# V3 inputs the page expands into a variable set of widgets.
DYNAMIC_TYPES = {"COMFY_AUTOGROW_V3", "COMFY_DYNAMICCOMBO_V3"}
_MEDIA_UPLOAD = ("image_upload", "video_upload", "animated_image_upload")


def _spec_type(spec: list) -> str:
    return "COMBO" if isinstance(spec[0], list) else spec[0]


def _spec_options(spec: list) -> dict:
    return spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}


def widget_layout(node_def: dict) -> list[tuple[str, int, bool, Any]]:
    """The node's widgets in the page's order: (input name, widgets_values slots, sent, default).

    Slots > 1 count the control widgets the page adds after a value ("control after
    generate", and for combos also its filter list); `sent` is False for widgets the
    page keeps out of the prompt (the upload button).
    """
    inputs, order = node_def.get("input", {}), node_def.get("input_order", {})
    specs: list[tuple[str, list]] = []
    for section in ("required", "optional"):
        declared = inputs.get(section) or {}
        names = [n for n in order.get(section, []) if n in declared]
        specs += [(n, declared[n]) for n in names + [n for n in declared if n not in names]]
    layout = []
    for name, spec in specs:
        options = _spec_options(spec)
        kind = options.get("widgetType") or _spec_type(spec)
        if kind in DYNAMIC_TYPES:
            raise ValueError(f"{node_def.get('name')}: input {name!r} is {kind}, which ui_to_api does not expand")
        if options.get("forceInput") or kind not in WIDGET_TYPES:
            continue
        slots = 1
        if kind == "INT":
            control = options.get("control_after_generate")
            slots += bool(control if control is not None else name in ("seed", "noise_seed"))
        elif kind == "COMBO" and options.get("control_after_generate"):
            slots += 2
        default = options.get("default")
        if default is None and isinstance(spec[0], list) and spec[0]:
            default = spec[0][0]
        elif default is None and kind == "COMBO" and options.get("options"):
            default = options["options"][0]
        layout.append((name, slots, True, default))
    # The page adds an upload button after the inputs for the first media combo it finds.
    required = inputs.get("required") or {}
    if any(_spec_type(s) == "COMBO" and any(_spec_options(s).get(k) is True for k in _MEDIA_UPLOAD) for s in required.values()):
        layout.append(("upload", 1, False, None))
    return layout


def _links(workflow: dict) -> dict[int, tuple[str, int, str, int, str]]:
    """link id -> (origin node, origin slot, target node, target slot, type), either link format."""
    out = {}
    for link in workflow.get("links", []):
        if isinstance(link, dict):
            lid, o, os_, t, ts, ty = (link[k] for k in ("id", "origin_id", "origin_slot", "target_id", "target_slot", "type"))
        else:
            lid, o, os_, t, ts, ty = link[:6]
        out[int(lid)] = (str(o), int(os_), str(t), int(ts), ty)
    return out


def _types_match(a: Any, b: Any) -> bool:
    a, b = str(a or "*"), str(b or "*")
    if a == "*" or b == "*":
        return True
    return bool(set(a.upper().split(",")) & set(b.upper().split(",")))


def _wrap(value: Any) -> Any:
    # The server reads a two-item list as a link, so the page wraps list values.
    return {"__value__": value} if isinstance(value, list) else value


def ui_to_api(workflow: dict, object_info: dict) -> dict:
    """Convert a workflow as the page saves it into the API prompt the page would queue.

    Follows the page's graphToPrompt: widget values by the node definition's widget
    order, links as [source id, slot], muted nodes dropped, bypassed nodes passed
    through to their input of the matching type, Reroute followed, PrimitiveNode
    values copied into the widgets they feed, notes dropped. Subgraphs are not supported.
    """
    subgraphs = {sg.get("id") for sg in (workflow.get("definitions") or {}).get("subgraphs", [])}
    nodes = {str(n["id"]): n for n in workflow["nodes"]}
    links = _links(workflow)

    def resolve_input(node: dict, index: int, want: Any, seen: set) -> list | None:
        inputs = node.get("inputs") or []
        if index >= len(inputs) or inputs[index].get("link") is None:
            return None
        link = links.get(int(inputs[index]["link"]))
        if link is None:
            return None
        return resolve_output(link[0], link[1], want or inputs[index].get("type"), seen)

    def resolve_output(node_id: str, slot: int, want: Any, seen: set) -> list | None:
        if (node_id, slot) in seen:
            raise ValueError(f"link cycle through node {node_id}")
        seen.add((node_id, slot))
        node = nodes.get(node_id)
        if node is None or node.get("mode") == MUTED:
            return None
        if node.get("mode") == BYPASSED:
            index = _bypass_input(node, slot, want)
            return None if index < 0 else resolve_input(node, index, None, seen)
        if node["type"] == "Reroute":
            return resolve_input(node, 0, want, seen)
        if node["type"] in VIRTUAL_NODES:
            return None
        return [node_id, slot]

    # PrimitiveNode writes its value into the widgets it is linked to (through Reroutes).
    primitive_values: dict[str, dict[str, Any]] = {}
    for node in nodes.values():
        if node["type"] != "PrimitiveNode" or not node.get("widgets_values"):
            continue
        value = node["widgets_values"][0]
        pending = [lid for out in node.get("outputs") or [] for lid in out.get("links") or []]
        while pending:
            link = links.get(int(pending.pop()))
            target = nodes.get(link[2]) if link else None
            if target is None:
                continue
            if target["type"] == "Reroute":
                pending += [lid for out in target.get("outputs") or [] for lid in out.get("links") or []]
                continue
            socket = (target.get("inputs") or [])[link[3]]
            name = (socket.get("widget") or {}).get("name") or socket.get("name")
            primitive_values.setdefault(link[2], {})[name] = value

    prompt: dict[str, dict] = {}
    for node_id, node in nodes.items():
        kind = node["type"]
        if kind in VIRTUAL_NODES or node.get("mode") in (MUTED, BYPASSED):
            continue
        if kind in subgraphs:
            raise ValueError(f"node {node_id} is a subgraph; ui_to_api does not expand subgraphs")
        node_def = object_info.get(kind)
        if node_def is None:
            raise ValueError(f"node {node_id} has type {kind!r}, which this ComfyUI does not know")
        inputs: dict[str, Any] = {}
        values = node.get("widgets_values")
        position = 0
        for name, slots, sent, default in widget_layout(node_def):
            if isinstance(values, dict):
                value, present = values.get(name), name in values
            else:
                present = values is not None and position < len(values)
                value = values[position] if present else None
            position += slots
            if not sent:
                continue
            if present:
                inputs[name] = _wrap(value)
            elif default is not None:
                inputs[name] = _wrap(default)
        inputs.update({k: _wrap(v) for k, v in primitive_values.get(node_id, {}).items()})
        for index, socket in enumerate(node.get("inputs") or []):
            source = resolve_input(node, index, None, set())
            if source is not None:
                inputs[socket["name"]] = source
        prompt[node_id] = {
            "inputs": inputs,
            "class_type": kind,
            "_meta": {"title": node.get("title") or node_def.get("display_name") or kind},
        }
    # As the page does: drop links to nodes that were left out.
    for entry in prompt.values():
        for name, value in list(entry["inputs"].items()):
            if isinstance(value, list) and len(value) == 2 and value[0] not in prompt:
                del entry["inputs"][name]
    return prompt


def _bypass_input(node: dict, slot: int, want: Any) -> int:
    """The input a bypassed node passes to output `slot` (the page's rule), or -1."""
    inputs = node.get("inputs") or []
    outputs = node.get("outputs") or []
    out_type = outputs[slot].get("type") if slot < len(outputs) else "*"
    if str(want or "*") == "*":
        return slot if len(inputs) > slot else 0
    if slot < len(inputs) and _types_match(inputs[slot].get("type"), out_type) and _types_match(inputs[slot].get("type"), want):
        return slot
    for i, socket in enumerate(inputs):
        if socket.get("type") == want:
            return i
    for i, socket in enumerate(inputs):
        if _types_match(socket.get("type"), out_type) and _types_match(socket.get("type"), want):
            return i
    return -1
