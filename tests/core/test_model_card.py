"""Model cards in exported policy folders: Hub metadata, training provenance, held-out results, comparisons."""

from __future__ import annotations

import json

import pytest
from huggingface_hub import ModelCard

import policies
from tpm.app.cli import main as cli_main
from tpm.model_card import BEGIN_COMPARISON, add_comparison, policy_card, write_run_cards

RECIPE = {
    "model": "org/base-flux", "dtype": "float32", "policy": "tpm", "rewards": {"testbed": 0.7, "clipscore": 0.3},
    "reward_options": {"clipscore": {"device": "cpu"}}, "train_prompts": "testbed:train",
    "eval_prompts": "testbed:val", "warm_start": None, "warm_start_iterations": 300,
    "grpo": {"output_dir": "x", "seed": 3, "num_inference_steps": 3, "group_size": 16, "learning_rate": 3e-4,
             "clip_eps": 0.2, "max_iterations": 800},
}
REPORT = {
    "prompts": "testbed:val", "n": 352, "steps": 3, "noise_sets": 2, "selected": {"iteration": 800, "score": 0.51},
    "rows": {
        "synchronous, 3 steps": {"mean": {"testbed": 0.4982}, "minus_synchronous": {}},
        "synchronous, 20 steps": {"mean": {"testbed": 0.5765}, "minus_synchronous": {"testbed": [0.0783, 0.0553, 0.1015]}},
        "policy before training": {"mean": {"testbed": 0.4991}, "minus_synchronous": {"testbed": [0.0009, -0.0025, 0.0043]}},
        "policy after training": {"mean": {"testbed": 0.5117}, "minus_synchronous": {"testbed": [0.0135, -0.0014, 0.0288]}},
    },
    "_images": {"not": "json"},
}


def test_every_exported_folder_gets_a_card_that_loading_keeps(tmp_path):
    policies.load("asyndm").save_pretrained(tmp_path / "a")
    card = ModelCard.load(tmp_path / "a" / "README.md")
    assert card.data.library_name == "tpm" and "tpm-policy-concave" in card.data.tags
    assert "AsynDM: Asynchronous Denoising Diffusion Models" in card.text
    assert 'policies.load("ORG/NAME")' in card.text and "tpm.sample(pipe" in card.text
    assert '"mask": "cross_attention"' in card.text  # the config
    # a card written by a training run travels with the policy through load and save
    (tmp_path / "a" / "README.md").write_text("---\nlibrary_name: tpm\n---\ncustom card\n")
    policies.load(str(tmp_path / "a")).save_pretrained(tmp_path / "b")
    assert (tmp_path / "b" / "README.md").read_text().endswith("custom card\n")


def test_run_cards_carry_backbone_reward_grpo_config_and_the_held_out_report(tmp_path):
    policy = policies.load("constant_deviation:r=0.3")
    for folder in ("policy", "policy_last"):
        policy.save_pretrained(tmp_path / folder)
    (tmp_path / "run.json").write_text(json.dumps({"iterations": 800, "best": {"iteration": 800, "score": 0.5117}}))
    written = write_run_cards(policy.card_info(), tmp_path, RECIPE, dict(REPORT))
    assert written == [str(tmp_path / "policy" / "README.md"), str(tmp_path / "policy_last" / "README.md")]
    card = ModelCard.load(tmp_path / "policy" / "README.md")
    assert card.data.base_model == "org/base-flux" and "grpo" in card.data.tags
    results = {r.metric_name: r.metric_value for r in card.data.eval_results}
    assert results["testbed (policy after training, 3 steps)"] == 0.5117
    assert results["testbed (synchronous, 3 steps)"] == 0.4982 and len(results) == 4
    text = card.text
    for want in ("`org/base-flux` (float32)", '`testbed` (0.7)', '`clipscore` (0.3, {"device": "cpu"})',
                 '"group_size": 16', '"learning_rate": 0.0003', "| seed | 3 |", "| iterations run | 800 |",
                 "`testbed:val`, 352 prompts x 2 noise sets (noise sets 0, 1 ", "| policy after training | 0.5117 | "
                 "+0.0135 [-0.0014, +0.0288] |", "| synchronous, 3 steps | 0.4982 | - |", "iteration 800"):
        assert want in text, want
    assert '"output_dir"' not in text  # a path on the training machine says nothing to a reader
    last = ModelCard.load(tmp_path / "policy_last" / "README.md").text
    assert "last iteration" in last and "## Held-out results" not in last


def test_a_comparison_summary_goes_into_the_card_once(tmp_path):
    policies.load("shifted_grid").save_pretrained(tmp_path / "p")
    (tmp_path / "cmp").mkdir()
    (tmp_path / "cmp" / "summary.md").write_text("# Policy comparison\n\n## 3 steps\n\n| policy | verifier |\n"
                                                  "|---|---|\n| `synchronous` | 0.510 |\n")
    path = add_comparison(tmp_path / "p", tmp_path / "cmp")
    text = ModelCard.load(path).text
    assert "# Policy comparison" not in text and "### 3 steps" in text and "| `synchronous` | 0.510 |" in text
    assert text.index(BEGIN_COMPARISON) < text.index("## How to use it")
    (tmp_path / "cmp" / "summary.md").write_text("# Policy comparison\n\n| `synchronous` | 0.600 |\n")
    text = ModelCard.load(add_comparison(tmp_path / "p", tmp_path / "cmp")).text
    assert text.count(BEGIN_COMPARISON) == 1 and "0.600" in text and "0.510" not in text
    assert ModelCard.load(path).data.library_name == "tpm"  # the metadata survives
    with pytest.raises(FileNotFoundError, match="not an exported policy folder"):
        add_comparison(tmp_path / "nowhere", tmp_path / "cmp")


def test_tpm_compare_adds_its_summary_to_a_card(tmp_path):
    policies.load("constant_deviation:r=0.3").save_pretrained(tmp_path / "p")
    rc = cli_main(["compare", "--model", "tiny:flux", "--policies", f"synchronous,{tmp_path / 'p'}",
                   "--num-prompts", "2", "--seeds", "1", "--steps", "2", "--out", str(tmp_path / "cmp"),
                   "--add-to-card", str(tmp_path / "p")])
    assert rc == 0
    text = (tmp_path / "p" / "README.md").read_text()
    assert BEGIN_COMPARISON in text and "tiny:flux" in text and "2 steps" in text


def test_card_of_an_untrained_policy_says_so():
    card = policy_card(policies.load("synchronous").card_info())
    assert card.data.base_model is None and not card.data.eval_results
    assert "## Training" not in card.text and "none (a tpm baseline)" in card.text


@pytest.mark.slow
def test_a_training_run_writes_the_card_with_what_it_printed(tmp_path):
    """tpm.app.train on a tiny testbed Flux: policy/README.md holds the recipe and report.json's numbers."""
    import torch

    from tpm.app.train import main as train_main
    from tpm.testbed.models import TestbedModelConfig, build_pipeline, save_pipeline

    cfg = TestbedModelConfig(backbone="flux", vae_channels=(8, 8), latent_channels=4, text_dim=16, t5_dim=32,
                             num_heads=2, head_dim=16, num_layers=1, num_single_layers=1, text_layers=1)
    save_pipeline(build_pipeline(cfg), tmp_path / "flux", cfg, dtype=torch.float32)
    (tmp_path / "run.yaml").write_text(
        "policy: tpm\nwarm_start: null\npolicy_options: {width: 16, heads: 2, layers: 1, text_tokens: 2}\n"
        "reference_steps: 3\n"
        "grpo: {group_size: 2, batch_size: 4, rollout_batch_size: 4, minibatch_size: 2, num_inference_steps: 2, "
        "eval_prompts: 2, save_every: 0, progress: false}\n")
    train_main(["--config", str(tmp_path / "run.yaml"), "--model", str(tmp_path / "flux"), "--output-dir",
                str(tmp_path / "run"), "--max-iterations", "1", "--seed", "5"])
    card = ModelCard.load(tmp_path / "run" / "policy" / "README.md")
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    after = report["rows"]["policy after training"]["mean"]["testbed"]
    results = {r.metric_name: r.metric_value for r in card.data.eval_results}
    assert results["testbed (policy after training, 2 steps)"] == after
    assert f"| policy after training | {after:.4f} |" in card.text
    assert f"`{tmp_path / 'flux'}` (float32)" in card.text and "| seed | 5 |" in card.text
    assert "`testbed` (1)" in card.text and '"group_size": 2' in card.text
    assert isinstance(policies.load(str(tmp_path / "run" / "policy")), policies.TPM)
