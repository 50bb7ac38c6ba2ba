"""Sharing a cascade: an exported cascade folder loads from a hand-built offline Hugging Face cache and
samples the same bytes as the bundled cascade; its files are verified before anything is loaded; `cdm push`
uploads the export with its model card (a fake HfApi: no network here); the shipped bundles' model cards are what
the card writer produces."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

import huggingface_hub
from huggingface_hub import ModelCard, constants

from cascaded_diffusion.cascade import Cascade
from cascaded_diffusion.cli import main
from cascaded_diffusion.errors import UserError
from cascaded_diffusion.modelcard import render_card
from cascaded_diffusion.pretrained import PRETRAINED_ROOT, CascadeIntegrityError, find_cascade, verify_cascade_dir
from cascaded_diffusion.sharing import export_cascade
from cascaded_diffusion.stage import Stage

ROOT = Path(__file__).resolve().parents[1]
REPO = "someone/fmnist-cascade"
COMMIT = "a" * 40


@pytest.fixture(scope="module")
def fm_export(tmp_path_factory):
    """The Fashion-MNIST bundle exported as `cdm push --pretrained fashion-mnist` uploads it (no grid: fast)."""
    out = tmp_path_factory.mktemp("export") / "fm"
    export_cascade(out, pretrained="fashion-mnist", repo_id=REPO, grid_per_class=0)
    return out


def build_hf_cache(hf_home: Path, repo_id: str, folder: Path, commit: str = COMMIT, ref: str | None = "main") -> Path:
    """The layout huggingface_hub's snapshot_download leaves: hub/models--OWNER--REPO/{blobs/<hash>,
    snapshots/<commit>/<file> -> ../../blobs/<hash>, refs/<ref>}."""
    repo_dir = hf_home / "hub" / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo_dir / "snapshots" / commit
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        data = path.read_bytes()
        blob = repo_dir / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = snapshot / path.relative_to(folder)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    if ref:
        (repo_dir / "refs").mkdir(exist_ok=True)
        (repo_dir / "refs" / ref).write_text(commit)
    return snapshot


@pytest.fixture
def offline_cache(tmp_path, fm_export, monkeypatch):
    """HF_HOME=tmp_path/hf with the export cached, offline; huggingface_hub reads both at import, so its
    constants are set too (the subprocess test sets the environment only)."""
    hf_home = tmp_path / "hf"
    snapshot = build_hf_cache(hf_home, REPO, fm_export)
    monkeypatch.setenv("HF_HOME", str(hf_home))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hf_home / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return snapshot


def _cdm(args: list[str], cwd: Path, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cascaded_diffusion.cli", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)


def test_offline_hub_cache_samples_the_same_bytes_as_the_bundle(tmp_path, fm_export):
    """The acceptance command, from an empty directory, with only the environment pointing at the cache."""
    hf_home = tmp_path / "hf"
    build_hf_cache(hf_home, REPO, fm_export)
    work = tmp_path / "empty"
    work.mkdir()
    env = {**os.environ, "HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    env.pop("HF_HUB_CACHE", None)
    hub = _cdm(["sample", "--pretrained", f"hf://{REPO}", "--num", "8", "--seed", "5", "--out", "hub.npz", "--quiet"],
               work, env)
    assert hub.returncode == 0, hub.stderr
    bundle = _cdm(["sample", "--pretrained", "fashion-mnist", "--num", "8", "--seed", "5", "--out", "bundle.npz",
                   "--quiet"], work, env)
    assert bundle.returncode == 0, bundle.stderr
    assert (work / "hub.npz").read_bytes() == (work / "bundle.npz").read_bytes()
    with np.load(work / "hub.npz") as f:
        assert f["arr_0"].shape == (8, 32, 32, 1)


def test_export_copies_the_bundle_and_hashes_every_loaded_file(fm_export):
    manifest = json.loads((fm_export / "cascade.json").read_text())
    assert set(manifest["files"]) == {"base8/stage.json", "base8/model.safetensors", "sr8to32_noaug/stage.json",
                                      "sr8to32_noaug/model.safetensors", "classifier.json", "classifier.safetensors"}
    for rel, entry in manifest["files"].items():
        assert (fm_export / rel).read_bytes() == (PRETRAINED_ROOT / "fashion-mnist" / rel).read_bytes()
        assert entry["sha256"] == hashlib.sha256((fm_export / rel).read_bytes()).hexdigest()
    assert verify_cascade_dir(fm_export)["stages"] == ["base8", "sr8to32_noaug"]
    assert (fm_export / "README.md").is_file() and not (fm_export / "grid.png").exists()


@pytest.mark.parametrize("target", ["sr8to32_noaug/model.safetensors", "base8/stage.json"])
def test_tampered_cache_file_is_refused_before_loading(offline_cache, monkeypatch, capsys, tmp_path, target):
    blob = (offline_cache / target).resolve()
    data = bytearray(blob.read_bytes())
    data[len(data) // 2] ^= 0x01  # one bit: same size, other hash
    blob.write_bytes(bytes(data))

    def no_loading(*args, **kwargs):
        raise AssertionError("a stage was loaded from a folder that failed verification")

    monkeypatch.setattr(Stage, "load", no_loading)
    with pytest.raises(CascadeIntegrityError, match=f"{target} does not match its hash"):
        Cascade.load(pretrained=f"hf://{REPO}")
    rc = main(["sample", "--pretrained", f"hf://{REPO}", "--num", "2", "--out", str(tmp_path / "x.npz"), "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2 and "does not match its hash" in err and "Nothing was loaded" in err
    assert not (tmp_path / "x.npz").exists()


def test_truncated_or_unlisted_files_are_refused(fm_export, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(fm_export, copy)
    weights = copy / "base8/model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-10])
    with pytest.raises(CascadeIntegrityError, match="truncated"):
        verify_cascade_dir(copy)
    shutil.rmtree(copy)
    shutil.copytree(fm_export, copy)
    manifest = json.loads((copy / "cascade.json").read_text())
    del manifest["files"]["sr8to32_noaug/stage.json"]
    (copy / "cascade.json").write_text(json.dumps(manifest))
    with pytest.raises(CascadeIntegrityError, match="no hash for sr8to32_noaug/stage.json"):
        verify_cascade_dir(copy)
    manifest["files"]["../outside"] = {"sha256": "0" * 64}
    manifest["files"]["sr8to32_noaug/stage.json"] = {"sha256": "0" * 64}
    (copy / "cascade.json").write_text(json.dumps(manifest))
    with pytest.raises(CascadeIntegrityError, match="outside the cascade folder"):
        verify_cascade_dir(copy)


def test_not_cached_says_what_is_missing(offline_cache, capsys, tmp_path):
    with pytest.raises(UserError) as info:
        find_cascade("hf://someone/not-downloaded")
    message = str(info.value)
    assert "not in the Hugging Face cache" in message and "HF_HUB_OFFLINE is set" in message
    assert str(offline_cache.parents[3]) in message  # the cache directory it looked in
    # a branch that was never downloaded: also "not cached", not a crash
    with pytest.raises(UserError, match="for revision dev"):
        find_cascade(f"hf://{REPO}@dev")
    rc = main(["sample", "--pretrained", "hf://someone/not-downloaded", "--num", "2", "--out", str(tmp_path / "x.npz")])
    assert rc == 2 and "not in the Hugging Face cache" in capsys.readouterr().err


def test_a_revision_pins_the_files(offline_cache, fm_export, tmp_path):
    """refs/main moves on to a newer commit; @<old commit> keeps loading the old files."""
    newer = tmp_path / "newer"
    shutil.copytree(fm_export, newer)
    manifest = json.loads((newer / "cascade.json").read_text())
    manifest["name"] = "newer"
    (newer / "cascade.json").write_text(json.dumps(manifest))
    build_hf_cache(offline_cache.parents[3], REPO, newer, commit="b" * 40)
    assert find_cascade(f"hf://{REPO}").manifest["name"] == "newer"
    pinned = find_cascade(f"hf://{REPO}@{COMMIT}")
    assert pinned.root.name == COMMIT and pinned.manifest["name"] == "fashion-mnist"


def test_missing_extra_names_the_install_command(monkeypatch, capsys, tmp_path):
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # `import huggingface_hub` now raises ImportError
    with pytest.raises(UserError, match=r"pip install -e '\.\[hub\]'"):
        Cascade.load(pretrained=f"hf://{REPO}")
    rc = main(["sample", "--pretrained", f"hf://{REPO}", "--num", "2", "--out", str(tmp_path / "x.npz")])
    assert rc == 2 and "pip install -e '.[hub]'" in capsys.readouterr().err
    # bundled cascades do not need it
    assert Cascade.load(pretrained="fashion-mnist").resolutions == [8, 32]


@pytest.mark.parametrize("name", ["hf://noslash", "hf://a/b@", "hf://a/b/c", "hf://../x"])
def test_bad_hub_names(name):
    with pytest.raises(UserError):
        find_cascade(name)


# ----------------------------------------------------------------------------------------------------------
# cdm push against a fake HfApi
# ----------------------------------------------------------------------------------------------------------


class FakeHfApi:
    """Records what `cdm push` asks of the Hub and keeps a copy of the uploaded folder."""

    calls: list = []
    uploaded: Path | None = None

    def __init__(self, **kwargs):
        FakeHfApi.calls.append(("init", kwargs))

    def create_repo(self, repo_id, **kwargs):
        FakeHfApi.calls.append(("create_repo", repo_id, kwargs))

    def create_branch(self, repo_id, **kwargs):
        FakeHfApi.calls.append(("create_branch", repo_id, kwargs))

    def upload_folder(self, *, folder_path, repo_id, **kwargs):
        FakeHfApi.calls.append(("upload_folder", repo_id, kwargs))
        shutil.copytree(folder_path, FakeHfApi.uploaded)

        class Info:
            commit_url = f"https://huggingface.co/{repo_id}/commit/{'c' * 40}"

        return Info()


@pytest.fixture
def fake_hub(monkeypatch, tmp_path):
    FakeHfApi.calls = []
    FakeHfApi.uploaded = tmp_path / "uploaded"
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeHfApi)
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: "hf_fake_token")
    return FakeHfApi


def test_push_uploads_the_export_with_a_model_card(fake_hub, capsys, tmp_path):
    rc = main(["push", "--pretrained", "fashion-mnist", "--repo", "me/fm", "--private", "--revision", "dev",
               "--grid-per-class", "1", "--quiet"])
    assert rc == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert "https://huggingface.co/me/fm/commit/" in out and "hf://me/fm@dev" in out
    kinds = [c[0] for c in fake_hub.calls]
    assert kinds == ["init", "create_repo", "create_branch", "upload_folder"]
    assert fake_hub.calls[1][2]["private"] is True and fake_hub.calls[2][2]["branch"] == "dev"
    assert fake_hub.calls[3][2]["revision"] == "dev"
    assert "token" not in fake_hub.calls[0][1]  # the standard login's token, never one passed around
    up = fake_hub.uploaded
    assert sorted(p.name for p in up.iterdir()) == ["README.md", "base8", "cascade.json", "classifier.json",
                                                   "classifier.safetensors", "grid.png", "sr8to32_noaug"]
    verify_cascade_dir(up)
    card = ModelCard((up / "README.md").read_text())
    assert card.data.library_name == "cascaded-diffusion" and card.data.license == "apache-2.0"
    assert "cdm sample --pretrained hf://me/fm --num 64" in card.text
    names = [r.metric_name for r in card.data.eval_results]  # the Hub's own parser of model-index
    assert "FID (classifier features, not Inception)" in names
    from PIL import Image

    assert Image.open(up / "grid.png").size == (2 + 2 * 34, 2 + 10 * 34)  # a row per class: 8 and 32 px, 2 px apart
    # the card's command draws the same grid, byte for byte
    command = next(line for line in card.text.splitlines() if "The same grid" in line)
    assert "--num 10 --seed 0 --grid-per-class 1" in command
    assert main(["sample", "--pretrained", str(up), "--num", "10", "--seed", "0", "--grid-per-class", "1", "--out",
                 str(tmp_path / "g.npz"), "--grid", str(tmp_path / "g.png"), "--quiet"]) == 0
    assert (tmp_path / "g.png").read_bytes() == (up / "grid.png").read_bytes()


def test_push_needs_a_login_before_any_work(monkeypatch, fake_hub, capsys):
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
    rc = main(["push", "--pretrained", "fashion-mnist", "--repo", "me/fm"])
    assert rc == 2 and "hf auth login" in capsys.readouterr().err
    assert fake_hub.calls == []


def test_push_help_documents_it(capsys):
    with pytest.raises(SystemExit) as info:
        main(["push", "--help"])
    assert info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    for words in ("--repo OWNER/REPO", "--private", "--revision BRANCH", "upload_folder", "hf auth login",
                  "--pretrained NAME", "model card"):
        assert words in text, words


# ----------------------------------------------------------------------------------------------------------
# Exports of run directories, model cards
# ----------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_runs(tmp_path_factory):
    from conftest import train_tiny

    rng = np.random.default_rng(0)
    root = tmp_path_factory.mktemp("tinyruns")
    data = root / "data.npz"
    np.savez(data, arr_0=rng.integers(0, 256, (32, 32, 32, 1), dtype=np.uint8), arr_1=np.arange(32) % 10)
    train_tiny("base8.toml", root / "base", data, ["conditioning.s_max=50"])
    train_tiny("sr8to32.toml", root / "sr", data, ["conditioning.s_max=50", "conditioning.sample_s=10"])
    return root


def test_export_of_run_directories_with_eval_metrics(tiny_runs, tmp_path, capsys):
    evaluation = {"num_samples": 1000, "feature_network": "inception", "fid": 12.5, "kid": {"mean": 0.01, "std": 0.002},
                  "reference": {"spec": "fashion-mnist:test", "source": "fashion-mnist:test", "num": 10000}}
    (tmp_path / "eval.json").write_text(json.dumps(evaluation))
    (tmp_path / "card.json").write_text(json.dumps({"license": "mit", "data": {"name": "my data", "license": "cc0-1.0"}}))
    out = tmp_path / "exp"
    rc = main(["export", str(tiny_runs / "base"), str(tiny_runs / "sr"), "--out", str(out), "--metrics",
               str(tmp_path / "eval.json"), "--card", str(tmp_path / "card.json"), "--grid-per-class", "0", "--quiet"])
    assert rc == 0, capsys.readouterr().err
    manifest = verify_cascade_dir(out)
    assert manifest["stages"] == ["base", "sr"]
    from safetensors.torch import load_file

    assert {t.dtype for t in load_file(out / "sr/model.safetensors").values() if t.is_floating_point()} == {
        __import__("torch").float16}
    stage = json.loads((out / "sr/stage.json").read_text())
    assert not stage["source"].startswith("/")  # no local path published
    card = ModelCard((out / "README.md").read_text())
    assert card.data.license == "mit" and "training-data-license:cc0-1.0" in card.data.tags
    assert [r.metric_name for r in card.data.eval_results] == ["FID (Inception features)", "KID (Inception features)"]
    assert f"cdm sample --pretrained {out}" in card.text
    cascade = Cascade.load(pretrained=str(out))
    assert cascade.resolutions == [8, 32]
    # an export goes into a new directory only: an old export's files would be mixed in
    rc = main(["export", str(tiny_runs / "base"), str(tiny_runs / "sr"), "--out", str(out), "--grid-per-class", "0"])
    assert rc == 2 and "not an empty directory" in capsys.readouterr().err


def test_failed_export_leaves_nothing(tiny_runs, tmp_path, capsys):
    out = tmp_path / "exp"
    rc = main(["export", str(tiny_runs / "sr"), str(tiny_runs / "base"), "--out", str(out), "--quiet"])
    assert rc == 2 and "Put the base model first" in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.parametrize("bundle", ["fashion-mnist", "fashion-mnist-distilled", "emoji", "emoji-256"])
def test_shipped_bundles_have_their_model_card(bundle):
    root = PRETRAINED_ROOT / bundle
    manifest = json.loads((root / "cascade.json").read_text())
    written = (root / "README.md").read_text()
    command = f"cdm sample --pretrained {bundle} --num {len(manifest['card']['classes']) * 4} --seed 0 " \
              "--grid-per-class 4 --out grid.npz --grid grid.png"
    assert written == render_card(root, manifest, load_names=[bundle], grid="grid.png", grid_command=command)
    assert (root / "grid.png").is_file()
    meta = yaml.safe_load(written.split("---")[1])
    # the weights' licence: Apache 2.0, or the most restrictive of the training artwork's (OpenMoji's CC BY-SA)
    assert meta["library_name"] == "cascaded-diffusion" and meta["license"] == manifest["card"]["license"]
    assert meta["license"] == ("cc-by-sa-4.0" if bundle == "emoji-256" else "apache-2.0")
    assert any(t.startswith("training-data-license:") for t in meta["tags"])
    card = ModelCard(written)
    assert all("classifier features, not Inception" in r.metric_name
               for r in card.data.eval_results if r.metric_type in ("fid", "kid"))
    assert f"cdm sample --pretrained {bundle} --num 64" in written
    for stage in manifest["stages"]:
        assert f"`{stage}`" in written
    if bundle == "fashion-mnist-distilled":  # a student's own optimizer steps are one round's, and the card says so
        assert "in distillation round 5 (4 → 2 sampling steps) of a 40000-step stage" in written


def test_attribution_file_travels_with_the_weights_under_the_hash_check(fm_export, tmp_path):
    """A cascade trained on attribution-licensed data (CC-BY, CC BY-SA) ships the credit line: an export of it
    copies ATTRIBUTION.md, hashes it like the weights, names it on the card, and an altered copy is refused."""
    source = tmp_path / "with_attribution"
    shutil.copytree(fm_export, source)
    text = "Twemoji graphics (c) Twitter, Inc and other contributors, CC-BY 4.0\n"
    (source / "ATTRIBUTION.md").write_text(text)
    manifest = json.loads((source / "cascade.json").read_text())
    manifest["files"]["ATTRIBUTION.md"] = {"sha256": hashlib.sha256(text.encode()).hexdigest(),
                                           "size": len(text.encode())}
    (source / "cascade.json").write_text(json.dumps(manifest))
    out = tmp_path / "exported"
    export_cascade(out, pretrained=str(source), grid_per_class=0)
    assert (out / "ATTRIBUTION.md").read_text() == text
    assert "ATTRIBUTION.md" in json.loads((out / "cascade.json").read_text())["files"]
    card = (out / "README.md").read_text()
    assert "[ATTRIBUTION.md](ATTRIBUTION.md)" in card and "- `ATTRIBUTION.md`" in card
    (out / "ATTRIBUTION.md").write_text(text.replace("CC-BY", "public domain"))
    with pytest.raises(CascadeIntegrityError, match="ATTRIBUTION.md"):
        verify_cascade_dir(out)
