"""Policies on the Hub: ``policies.load("org/name")`` through huggingface_hub's cache (offline), and
``policy.push_to_hub`` (with the upload intercepted: no network here).

The cache is populated the way huggingface_hub lays it out (``models--org--name/blobs/<sha256>``,
``snapshots/<commit>/<file>`` links to the blobs, ``refs/<branch>`` holding the commit), and
``huggingface_hub.scan_cache_dir`` must recognise it, so the layout is huggingface_hub's own.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import policies
from policies import PolicyError
from tpm.sampler import sample
from tpm.tiny import tiny_flux_pipeline

ROOT = Path(__file__).resolve().parents[2]
COMMIT_A, COMMIT_B = "a" * 40, "b" * 40


def populate_cache(cache: Path, repo_id: str, folder: Path, commit: str, refs: tuple[str, ...] = ("main",)) -> Path:
    """Put ``folder``'s files into the HF cache ``cache`` as snapshot ``commit`` of model repo ``repo_id``."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snap = repo / "snapshots" / commit
    snap.mkdir(parents=True)
    (repo / "blobs").mkdir(exist_ok=True)
    for f in sorted(folder.iterdir()):
        data = f.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        os.symlink(os.path.relpath(blob, snap), snap / f.name)
    (repo / "refs").mkdir(exist_ok=True)
    for ref in refs:
        (repo / "refs" / ref).write_text(commit)
    return snap


@pytest.fixture
def offline_cache(tmp_path, monkeypatch):
    """An empty HF cache, with the Hub switched off (huggingface_hub reads the flag at import)."""
    from huggingface_hub import constants

    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    return cache


def _trained_like_tpm(pipe, seed=0):
    torch.manual_seed(seed)
    policy = policies.TPM.for_pipeline(pipe, width=32, heads=2, layers=1)
    with torch.no_grad():  # move r away from 0.5, so the policy visibly changes the sampling
        for p in policy.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return policy


def _images(pipe, policy):
    return sample(pipe, ["a red circle", "two blue squares"], policy=policy, num_inference_steps=3, height=32,
                  width=32, generator=torch.Generator().manual_seed(0), output_type="np").images


def test_the_cache_layout_is_huggingface_hubs_own(tmp_path):
    from huggingface_hub import scan_cache_dir, try_to_load_from_cache

    folder = tmp_path / "p"
    policies.load("constant_deviation:r=0.3").save_pretrained(folder)
    populate_cache(tmp_path / "hub", "org/name", folder, COMMIT_A)
    info = scan_cache_dir(tmp_path / "hub")
    assert not info.warnings
    (repo,) = info.repos
    (rev,) = repo.revisions
    assert repo.repo_id == "org/name" and rev.commit_hash == COMMIT_A and rev.refs == frozenset({"main"})
    assert {f.file_name for f in rev.files} == {"config.json", "README.md"}
    got = try_to_load_from_cache("org/name", "config.json", cache_dir=tmp_path / "hub")
    assert Path(got).read_text() == (folder / "config.json").read_text()


def test_offline_round_trip_export_cache_load_gives_identical_samples(tmp_path):
    """Export, place in the cache, then in a fresh process with HF_HUB_OFFLINE=1:
    policies.load("org/tpm-test") samples exactly what the exported policy samples."""
    pipe = tiny_flux_pipeline()
    policy = _trained_like_tpm(pipe)
    policy.save_pretrained(tmp_path / "export")
    populate_cache(tmp_path / "hub", "org/tpm-test", tmp_path / "export", COMMIT_A)
    script = (
        "import sys, numpy as np, torch, policies\n"
        "from tpm.sampler import sample\nfrom tpm.tiny import tiny_flux_pipeline\n"
        "policy = policies.load('org/tpm-test')\n"
        "out = sample(tiny_flux_pipeline(), ['a red circle', 'two blue squares'], policy=policy, num_inference_steps=3,"
        " height=32, width=32, generator=torch.Generator().manual_seed(0), output_type='np').images\n"
        "np.save(sys.argv[1], out)\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "hub"), "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", script, str(tmp_path / "hub_images.npy")], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    from_hub = np.load(tmp_path / "hub_images.npy")
    local = _images(pipe, policy)
    # Same weights, same computation and batch, another process: equal up to float32 round-off.
    np.testing.assert_allclose(from_hub, local, atol=1e-6, rtol=0)
    assert np.abs(local - _images(pipe, None)).max() > 1e-3  # the policy does change the images


def test_revision_picks_the_snapshot(tmp_path, offline_cache):
    for commit, r, refs in ((COMMIT_A, 0.3, ("main",)), (COMMIT_B, 0.7, ("v1",))):
        policies.load(f"constant_deviation:r={r}").save_pretrained(tmp_path / commit[:1])
        populate_cache(offline_cache, "org/deviation", tmp_path / commit[:1], commit, refs)
    assert policies.load("org/deviation").config.r == 0.3
    assert policies.load("org/deviation", revision="v1").config.r == 0.7
    assert policies.load(f"org/deviation@{COMMIT_B}").config.r == 0.7
    loaded = policies.load("org/deviation")
    assert "AsyncDiff" in loaded.card_text  # the card travels with the policy


def test_missing_repo_or_repo_without_a_policy_is_one_clear_error(tmp_path, offline_cache):
    with pytest.raises(PolicyError, match="not in the local HF cache.*hf download org/missing"):
        policies.load("org/missing")
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "weights.bin").write_bytes(b"x")
    populate_cache(offline_cache, "org/not-a-policy", tmp_path / "model", COMMIT_A)
    with pytest.raises(PolicyError, match="holds no policy: it has no config.json"):
        policies.load("org/not-a-policy")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "config.json").write_text('{"model_type": "bert"}')
    populate_cache(offline_cache, "org/bert", tmp_path / "other", COMMIT_A)
    with pytest.raises(PolicyError, match="holds no usable tpm policy.*no 'policy' key"):
        policies.load("org/bert")
    with pytest.raises(PolicyError, match="not in the local HF cache"):
        policies.load("org/bert", revision="v9")
    with pytest.raises(PolicyError, match="applies to Hub repo ids"):
        policies.load("asyndm", revision="main")


def test_push_to_hub_uploads_the_exported_folder_with_its_card(tmp_path, offline_cache, monkeypatch):
    """The upload is intercepted at HfApi: what it would send must be a loadable policy folder."""
    from huggingface_hub import HfApi, ModelCard

    calls = {}

    def create_repo(self, repo_id, **kw):
        calls["create_repo"] = (repo_id, kw)

    def upload_folder(self, *, folder_path, repo_id, allow_patterns=None, **kw):
        from huggingface_hub.utils import filter_repo_objects

        remote = tmp_path / "remote"
        names = list(filter_repo_objects(sorted(os.listdir(folder_path)), allow_patterns=allow_patterns))
        remote.mkdir()
        for n in names:
            shutil.copy(os.path.join(folder_path, n), remote / n)
        calls["upload_folder"] = (repo_id, kw)
        return "commit-info"

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    pipe = tiny_flux_pipeline()
    policy = _trained_like_tpm(pipe, seed=1)
    assert policy.push_to_hub("me/my-tpm", private=True, revision="dev") == "commit-info"
    assert calls["create_repo"] == ("me/my-tpm", {"private": True, "exist_ok": True})
    assert calls["upload_folder"][0] == "me/my-tpm" and calls["upload_folder"][1]["revision"] == "dev"
    remote = tmp_path / "remote"
    assert sorted(os.listdir(remote)) == ["README.md", "config.json", "model.safetensors"]
    card = ModelCard.load(remote / "README.md")
    assert card.data.library_name == "tpm" and "tpm-policy-tpm" in card.data.tags
    # what was uploaded, once in the cache, loads by repo id and samples as the pushed policy
    populate_cache(offline_cache, "me/my-tpm", remote, COMMIT_A)
    np.testing.assert_allclose(_images(pipe, policies.load("me/my-tpm")), _images(pipe, policy), atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="not a Hub repo id"):
        policy.push_to_hub("me/my-tpm@dev")


@pytest.mark.parametrize("error,message", [("RepositoryNotFoundError", "was not found, or it is private or gated"),
                                           ("RevisionNotFoundError", "has no revision 'nope'")])
def test_hub_answers_become_one_clear_error(monkeypatch, error, message):
    """What huggingface_hub raises online for a missing repo or revision (no network: raised by a stand-in)."""
    import huggingface_hub
    from huggingface_hub import errors

    class Response:  # what huggingface_hub's HTTP errors read of a response
        headers: dict = {}
        status_code = 404
        request = None

        def json(self):
            return {}

    def download(*args, **kwargs):
        raise getattr(errors, error)("404 Client Error", response=Response())

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", download)
    with pytest.raises(PolicyError, match=message):
        policies.load("org/name", revision="nope")
