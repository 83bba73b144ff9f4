"""LoRA adapters through ``load_model(..., lora=...)`` / ``--lora``: the sampler equals the LoRA'd
pipeline's own call, every save format loads to the same model, scales and errors.

The LoRAs are saved by peft with random non-zero A and B (``init_lora_weights=False``), on the
attention projections, the feed-forward, the AdaLN modulation (which our backbone adapters apply per
token) and the output projection, so they change the output, which each test also asserts.
"""

from __future__ import annotations

import pytest
import torch

import policies
import tpm
from tpm.app.cli import main
from tpm.loading import LoadError, LoraSpec, load_lora, load_model, parse_lora

from .helpers import build_pipeline

TOL = 1e-4  # as in test_sampler_equivalence: same computation, different call sites
TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "norm1.linear",
           "ff.net.2", "proj_mlp", "proj_out"]
KW = dict(num_inference_steps=3, guidance_scale=3.0, height=32, width=48, output_type="latent",
          max_sequence_length=16)
PROMPTS = ["a red circle left of a blue square", "two dogs riding a bike on the beach"]
SPEC = {"flux": "tiny:flux", "sd3": "tiny:sd3"}


def lora_config(r=4, alpha=8):
    from peft import LoraConfig

    return LoraConfig(r=r, lora_alpha=alpha, init_lora_weights=False, target_modules=TARGETS)


@pytest.fixture(scope="module", params=["flux", "sd3"])
def saved(request, tmp_path_factory):
    """(backbone, {format: path}) with the same LoRA weights saved three ways."""
    from peft import get_peft_model, get_peft_model_state_dict

    name = request.param
    d = tmp_path_factory.mktemp(f"lora_{name}")
    torch.manual_seed(0)
    peft_model = get_peft_model(build_pipeline(name).transformer, lora_config())
    peft_model.save_pretrained(d / "peft")  # PeftModel.save_pretrained: how Flow-GRPO saves its LoRAs
    transformer = peft_model.base_model.model  # the same weights, saved the diffusers ways
    state = get_peft_model_state_dict(transformer)
    # (with its LoraConfig as metadata, as diffusers' training scripts save it: alpha != rank here)
    type(build_pipeline(name)).save_lora_weights(d / "diffusers", transformer_lora_layers=state,
                                                 transformer_lora_adapter_metadata=lora_config().to_dict())
    transformer.save_lora_adapter(d / "adapter")
    return name, {"peft": str(d / "peft"), "diffusers": str(d / "diffusers"),
                  "diffusers_file": str(d / "diffusers" / "pytorch_lora_weights.safetensors"),
                  "adapter": str(d / "adapter" / "pytorch_lora_weights.safetensors")}


def _run(pipe, sampler: bool, seed=0, policy=None):
    gen = torch.Generator().manual_seed(seed)
    if sampler:
        return tpm.sample(pipe, PROMPTS, policy=policy, generator=gen, **KW).images
    return pipe(PROMPTS, generator=gen, **KW).images


def test_sampler_equals_lora_pipeline_and_lora_changes_output(saved):
    name, paths = saved
    base = _run(load_model(SPEC[name]), sampler=False)
    pipe = load_model(SPEC[name], lora=paths["peft"])
    ref = _run(pipe, sampler=False)
    out = _run(pipe, sampler=True)
    assert (ref - out).abs().max() <= TOL
    assert (ref - base).abs().max() > 0.1  # the LoRA acts
    # The backbone is frozen, LoRA layers included.
    assert not any(p.requires_grad for p in pipe.transformer.parameters())
    assert any("lora_A" in n for n, _ in pipe.transformer.named_parameters())


def test_peft_folder_equals_peft_model(saved):
    """Our loading of the peft folder gives what ``PeftModel.from_pretrained`` gives (rank and alpha honoured)."""
    from peft import PeftModel

    name, paths = saved
    ours = _run(load_model(SPEC[name], lora=paths["peft"]), sampler=False)
    ref_pipe = load_model(SPEC[name])
    PeftModel.from_pretrained(ref_pipe.transformer, paths["peft"])  # injects into the transformer in place
    assert (_run(ref_pipe, sampler=False) - ours).abs().max() <= TOL


@pytest.mark.parametrize("fmt", ["diffusers", "diffusers_file", "adapter"])
def test_every_save_format_loads_the_same_lora(saved, fmt):
    name, paths = saved
    want = _run(load_model(SPEC[name], lora=paths["peft"]), sampler=False)
    pipe = load_model(SPEC[name], lora=paths[fmt])
    got = _run(pipe, sampler=False)
    assert (got - want).abs().max() <= TOL
    assert (_run(pipe, sampler=True) - got).abs().max() <= TOL


def test_asynchronous_policy_sees_the_lora(saved):
    """Per-token time and cross-attention masks run through our backbone adapters and attention
    processors; with LoRA layers injected they must compute what the merged weights compute."""
    name, paths = saved
    policy = policies.load("asyndm")
    lora_pipe = load_model(SPEC[name], lora=paths["peft"])
    got = _run(lora_pipe, sampler=True, policy=policy)
    merged = load_model(SPEC[name], lora=paths["peft"])
    merged.fuse_lora()
    merged.unload_lora_weights()  # plain Linear layers holding W + scale * B A
    assert not any("lora" in n for n, _ in merged.transformer.named_parameters())
    want = _run(merged, sampler=True, policy=policy)
    assert (got - want).abs().max() <= TOL  # merging reorders the sums (measured 6e-7 flux, 2e-6 sd3; fp32)
    assert (got - _run(load_model(SPEC[name]), sampler=True, policy=policy)).abs().max() > 0.1


def test_scales_and_several_adapters(saved):
    name, paths = saved
    base = _run(load_model(SPEC[name]), sampler=False)
    full = _run(load_model(SPEC[name], lora=paths["peft"]), sampler=False)
    zero = _run(load_model(SPEC[name], lora=f"{paths['peft']}:0"), sampler=False)
    assert (zero - base).abs().max() <= TOL
    half = load_model(SPEC[name], lora=[f"{paths['peft']}:0.5"])
    h = _run(half, sampler=False)
    assert (h - base).abs().max() > 1e-2 and (h - full).abs().max() > 1e-2
    assert (_run(half, sampler=True) - h).abs().max() <= TOL
    # Two adapters at 0.5 each are the full adapter (LoRA deltas add), comma list and list forms alike.
    for lora in (f"{paths['peft']}:0.5,{paths['diffusers']}:0.5", [f"{paths['peft']}:0.5", (paths["adapter"], 0.5)]):
        two = load_model(SPEC[name], lora=lora)
        assert len(two.get_active_adapters()) == 2
        assert (_run(two, sampler=True) - full).abs().max() <= TOL


def test_parse_lora():
    assert parse_lora(None) == [] and parse_lora([]) == []
    assert parse_lora("a/b, c:0.5") == [LoraSpec("a/b"), LoraSpec("c", 0.5)]
    assert parse_lora(["x:1e-1", ("y", 2)]) == [LoraSpec("x", 0.1), LoraSpec("y", 2.0)]
    assert parse_lora(r"C:\loras\style") == [LoraSpec(r"C:\loras\style")]  # a drive letter is not a scale
    with pytest.raises(LoadError, match="empty LoRA entry"):
        parse_lora("a,,b")


def test_bad_lora_is_one_clear_error(tmp_path, saved):
    from safetensors.torch import save_file

    name, paths = saved
    other = "sd3" if name == "flux" else "flux"
    (tmp_path / "empty").mkdir()
    save_file({"weight": torch.zeros(2, 2)}, tmp_path / "not_lora.safetensors")
    (tmp_path / "junk.safetensors").write_text("not a safetensors file")
    cases = [
        (str(tmp_path / "missing"), "does not exist"),
        (str(tmp_path / "empty"), "no .safetensors"),
        (str(tmp_path / "not_lora.safetensors"), "holds no LoRA weights"),
        (str(tmp_path / "junk.safetensors"), "cannot be read as safetensors"),
    ]
    for source, needle in cases:
        with pytest.raises(LoadError, match=needle) as err:
            load_model(SPEC[name], lora=source)
        assert "Pass a diffusers LoRA" in str(err.value) and "PeftModel.save_pretrained" in str(err.value)
    # A LoRA of the other backbone: its module names do not fit this model.
    with pytest.raises(LoadError, match="do not fit this model.*another model"):
        load_model(SPEC[name], lora=saved_other(tmp_path, other))
    # A LoRA with layers this model lacks (a deeper model's blocks): a partial match is refused too.
    from safetensors.torch import load_file

    state = load_file(f"{paths['adapter']}")
    extra = {k.replace("transformer_blocks.0.", "transformer_blocks.7."): v.clone() for k, v in state.items()
             if k.startswith("transformer_blocks.0.")}
    save_file({**state, **extra}, tmp_path / "deeper.safetensors")
    with pytest.raises(LoadError, match=r"only \d+ of its \d+ LoRA layers match"):
        load_model(SPEC[name], lora=str(tmp_path / "deeper.safetensors"))


def saved_other(tmp_path, name: str) -> str:
    from peft import get_peft_model

    torch.manual_seed(1)
    path = tmp_path / f"other_{name}"
    get_peft_model(build_pipeline(name).transformer, lora_config()).save_pretrained(path)
    return str(path)


def test_cli_sample_and_compare_take_lora(tmp_path, saved):
    name, paths = saved
    rc = main(["sample", "--model", SPEC[name], "--lora", paths["peft"], "--lora", f"{paths['adapter']}:0.5",
               "--prompt", "a red circle", "--steps", "2", "--height", "32", "--width", "32",
               "--out", str(tmp_path / "s")])
    assert rc == 0 and (tmp_path / "s" / "000_seed0.png").is_file()
    with pytest.raises(SystemExit, match=r"^error: LoRA .*does not exist"):
        main(["sample", "--model", SPEC[name], "--lora", str(tmp_path / "nope"), "--prompt", "a dog",
              "--out", str(tmp_path / "s2")])
    with pytest.raises(SystemExit, match=r"^error: LoRA .*does not exist"):
        main(["compare", "--model", SPEC[name], "--lora", str(tmp_path / "nope"), "--prompts", "animal-activity",
              "--rewards", "clipscore", "--out", str(tmp_path / "c")])


def test_load_lora_on_a_pipeline_object(saved):
    name, paths = saved
    pipe = build_pipeline(name)
    assert load_lora(pipe, None) is pipe
    want = _run(load_model(SPEC[name], lora=paths["peft"]), sampler=False)
    assert (_run(load_lora(pipe, paths["peft"]), sampler=True) - want).abs().max() <= TOL


def test_hub_id_of_a_peft_repo(saved, monkeypatch):
    """A hub id whose repo holds a PeftModel.save_pretrained folder (how Flow-GRPO LoRAs are published)
    is read through the HF cache and loaded as that folder."""
    import os

    import huggingface_hub

    name, paths = saved
    asked = []

    def fake_download(repo_id, filename, **kw):  # the HF cache, holding the repo's snapshot
        asked.append((repo_id, filename))
        path = os.path.join(paths["peft"], filename)
        if not os.path.isfile(path):
            raise huggingface_hub.errors.EntryNotFoundError(filename)
        return path

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    got = _run(load_model(SPEC[name], lora="someone/flow-grpo-lora:0.5"), sampler=False)
    want = _run(load_model(SPEC[name], lora=f"{paths['peft']}:0.5"), sampler=False)
    assert (got - want).abs().max() <= TOL
    assert ("someone/flow-grpo-lora", "adapter_config.json") in asked


def test_uncached_hub_id_offline_is_one_clear_error(monkeypatch, tmp_path):
    import huggingface_hub.constants as c

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(c, "HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(LoadError, match=r"LoRA 'nobody/no-such-lora': could not be loaded .*HF cache"):
        load_model("tiny:flux", lora="nobody/no-such-lora")
