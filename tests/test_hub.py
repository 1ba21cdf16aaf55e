"""Hub ids in every command: resolved from a Hugging Face cache laid out in a temporary HF_HOME, offline.

The cache is built the way huggingface_hub lays it out (``hub/models--org--name/blobs/<sha256>``,
``snapshots/<revision>/<file>`` symlinks into blobs, ``refs/main`` = revision), so
``snapshot_download(local_files_only=True)`` reads it like one filled on a login node.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mast.cli import main
from mast.files import InputError, write_jsonl
from mast.hub import looks_like_path, resolve_model
from mast.models import check_checkpoint_dir

REV = "0123456789abcdef0123456789abcdef01234567"


def fill_hub_cache(hf_home: Path, repo_id: str, folder: Path, revision: str = REV) -> Path:
    """Put `folder`'s files into HF_HOME's Hub cache as `repo_id`@`revision`; returns the snapshot folder."""
    repo = hf_home / "hub" / ("models--" + repo_id.replace("/", "--"))
    snap = repo / "snapshots" / revision
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    snap.mkdir(parents=True, exist_ok=True)
    for f in sorted(folder.iterdir()):
        if not f.is_file():
            continue
        data = f.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        (snap / f.name).symlink_to(os.path.relpath(blob, snap))
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(revision)
    return snap


@pytest.fixture()
def hub(tmp_path, triple, monkeypatch) -> Path:
    """HF_HOME in tmp_path holding toy-org/{base,sft,rlvr}; offline, as on a compute node."""
    hf_home = tmp_path / "hf"
    for name, folder in zip(("base", "sft", "rlvr"), triple):
        fill_hub_cache(hf_home, f"toy-org/{name}", folder)
    monkeypatch.setenv("HF_HOME", str(hf_home))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return hf_home


def test_resolve_folder_hub_id_and_errors(hub, tiny_model, tmp_path):
    assert resolve_model(str(tiny_model), "--model") == str(tiny_model.resolve())
    snap = resolve_model("toy-org/rlvr", "--model")
    assert Path(snap) == hub / "hub" / "models--toy-org--rlvr" / "snapshots" / REV
    assert (Path(snap) / "config.json").is_file() and (Path(snap) / "model.safetensors").is_file()
    with pytest.raises(InputError, match=r"^--model: toy-org/missing: not in the Hugging Face cache .* "
                                         r"HF_HUB_OFFLINE=1: run `hf download toy-org/missing`"):
        resolve_model("toy-org/missing", "--model")
    with pytest.raises(InputError, match=r"^models.target: ./gone: folder not found$"):
        resolve_model("./gone", "models.target")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="not a checkpoint folder \\(no config.json\\)"):
        resolve_model(str(tmp_path / "empty"), "--target")
    with pytest.raises(InputError, match="neither a folder nor a Hub id"):
        resolve_model("not a/valid id", "--model")
    weights_only = tmp_path / "weights"
    weights_only.mkdir()
    (weights_only / "model.safetensors").write_bytes(b"x")
    fill_hub_cache(hub, "toy-org/noconfig", weights_only)
    with pytest.raises(InputError, match="has no config.json"):
        resolve_model("toy-org/noconfig", "--model")


def test_path_or_hub_id():
    assert looks_like_path("./m") and looks_like_path("/abs/m") and looks_like_path("~/m")
    assert looks_like_path("runs/x/checkpoint")
    assert not looks_like_path("Qwen/Qwen2.5-Math-1.5B") and not looks_like_path("gpt2")
    with pytest.raises(InputError, match="--base: /nope: folder not found"):
        check_checkpoint_dir("/nope", "--base")


def test_every_command_takes_hub_ids_offline(hub, problems, tmp_path, capsys):
    """eval, select, unlearn and diagnose, each naming its models by Hub id only."""
    forget = tmp_path / "forget.jsonl"
    write_jsonl(forget, problems[:4])
    suite = tmp_path / "suite.yaml"
    suite.write_text(f"name: s\nbenchmark: jsonl\npath: {forget}\ndecoding: {{max_tokens: 4}}\n")

    assert main(["eval", "--model", "toy-org/rlvr", "--suite", str(suite), "--out", str(tmp_path / "ev.jsonl"),
                 "--cache-dir", str(tmp_path / "cache")]) == 0
    assert len((tmp_path / "ev.jsonl").read_text().splitlines()) == 4

    sel = tmp_path / "sel.json"
    assert main(["select", "--reference", "toy-org/sft", "--target", "toy-org/rlvr", "--forget", str(forget),
                 "--rule", "mast", "--k", "2", "--cache-dir", str(tmp_path / "cache"), "--out", str(sel)]) == 0
    # sft -> rlvr moved only o_proj of layer 0 (the triple fixture): the ids resolved to the right checkpoints
    assert json.loads(sel.read_text())["selected"] == ["model.layers.0.self_attn.o_proj.weight"]

    out = tmp_path / "unlearned"
    assert main(["unlearn", "--target", "toy-org/rlvr", "--selection", str(sel), "--forget", str(forget),
                 "--objective", "ga", "--steps", "1", "--out", str(out)]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["target"] == str(hub / "hub" / "models--toy-org--rlvr" / "snapshots" / REV)

    diag = tmp_path / "diag"
    assert main(["diagnose", "--base", "toy-org/base", "--reference", "toy-org/sft", "--target", "toy-org/rlvr",
                 "--forget", str(forget), "--out", str(diag), "--cache-dir", str(tmp_path / "cache")]) == 0
    assert (diag / "diagnostics.json").is_file()
    capsys.readouterr()


@pytest.mark.parametrize("argv", [
    ["eval", "--model", "toy-org/missing", "--suite", "{suite}", "--out", "{tmp}/o.jsonl"],
    ["select", "--reference", "toy-org/missing", "--target", "toy-org/rlvr", "--forget", "{forget}",
     "--out", "{tmp}/o.json"],
    ["unlearn", "--target", "toy-org/missing", "--selection", "{tmp}/s.json", "--forget", "{forget}",
     "--out", "{tmp}/o"],
    ["diagnose", "--base", "toy-org/missing", "--reference", "toy-org/sft", "--target", "toy-org/rlvr",
     "--forget", "{forget}", "--out", "{tmp}/o"],
], ids=["eval", "select", "unlearn", "diagnose"])
def test_uncached_hub_id_offline_exits_2_with_one_line(hub, problems, tmp_path, argv):
    forget = tmp_path / "forget.jsonl"
    write_jsonl(forget, problems[:2])
    suite = tmp_path / "suite.yaml"
    suite.write_text(f"name: s\nbenchmark: jsonl\npath: {forget}\n")
    argv = [a.format(tmp=tmp_path, suite=suite, forget=forget) for a in argv]
    p = subprocess.run([sys.executable, "-m", "mast.cli", *argv], capture_output=True, text=True, timeout=300,
                       env={**os.environ}, cwd=tmp_path)
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert p.returncode == 2 and len(lines) == 1 and "Traceback" not in p.stderr, p.stderr
    assert "toy-org/missing: not in the Hugging Face cache" in lines[0] and "hf download" in lines[0]
    assert not any((tmp_path / n).exists() for n in ("o.jsonl", "o.json", "o"))
