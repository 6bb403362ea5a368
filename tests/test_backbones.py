"""Every open_clip model family under PiNI and the baselines (docs/training.md, "open_clip
families"): a tiny random configuration of each, built by open_clip from a config dict as its
own configs are, on the CPU in seconds.

- ``CLIP``: ``pini-tiny`` (the rest of the suite).
- ``CustomTextCLIP``, SigLIP's text tower and ``logit_bias``: no causal mask, pooling at the last
  token, a Linear projection with bias, tanh-GELU (SigLIP2). The image tower is open_clip's ViT
  (SigLIP's is timm's ``vit_base_patch16_siglip_224``, 86M parameters); the name avoids "siglip",
  for which open_clip picks SigLIP's sentencepiece tokenizer (it needs ``transformers``).
- ``CustomTextCLIP``, EVA02: timm's ``eva02_tiny_patch14_224`` image tower (224 pixels), the
  causal text tower with argmax pooling.
- ``CustomTextCLIP``, MobileCLIP / MobileCLIP2: timm's ``fastvit_mci0`` image tower
  (MobileCLIP2-S0's), the text tower without causal mask.
- ``CoCa``: its contrastive towers; the text tower appends a class token, masks padding and pools
  the class token before ``ln_final``.
- An HF text encoder (``text_cfg.hf_model_name``): a prompt row or CoOp is one line before any
  weights load.
"""

from __future__ import annotations

import json

import open_clip
import pytest
import torch
import torch.nn.functional as F
from test_cli import assert_one_line_error, make_folder, run_cli

import pini
from pini import TABLE1, PiNI, PiNIConfig
from pini.backbone import encode_text, token_embedding
from pini.methods import METHODS

CLASSES = ["cat", "dog", "bird"]
TEXT = dict(context_length=77, vocab_size=49408, width=32, heads=2, layers=1)
VIT = dict(image_size=32, layers=1, width=32, head_width=16, patch_size=8)
TIMM = dict(timm_model_pretrained=False, timm_proj=None)
FAMILIES = {
    "pini-test-sigmoid-loss": dict(
        embed_dim=32,
        init_logit_bias=-10,
        custom_text=True,
        vision_cfg=VIT,
        text_cfg=dict(
            TEXT,
            no_causal_mask=True,
            proj_bias=True,
            pool_type="last",
            norm_kwargs={"eps": 1e-6},
            act_kwargs={"approximate": "tanh"},
        ),
    ),
    "pini-test-eva02": dict(
        embed_dim=32,
        custom_text=True,
        vision_cfg=dict(
            TIMM, image_size=224, timm_model_name="eva02_tiny_patch14_224", timm_pool="token"
        ),
        text_cfg=TEXT,
    ),
    "pini-test-mobileclip": dict(
        embed_dim=32,
        custom_text=True,
        vision_cfg=dict(TIMM, image_size=32, timm_model_name="fastvit_mci0", timm_pool="avg"),
        text_cfg=dict(TEXT, no_causal_mask=True),
    ),
    "pini-test-coca": dict(
        embed_dim=32,
        custom_text=True,
        vision_cfg=dict(VIT, attentional_pool=True, attn_pooler_heads=2, output_tokens=True),
        text_cfg=dict(TEXT, context_length=76, embed_cls=True, output_tokens=True),
        multimodal_cfg=dict(TEXT, context_length=76, attn_pooler_heads=2),
    ),
}
HF_TEXT = "pini-test-hf-text"  # built only by its config: the checks come before any weights
HF_CONFIG = dict(
    embed_dim=32,
    vision_cfg=VIT,
    text_cfg=dict(hf_model_name="roberta-base", hf_tokenizer_name="roberta-base"),
)


@pytest.fixture(scope="module")
def families(tmp_path_factory):
    """{name: (clip, tokenizer, weights file)}: each family's tiny model with random weights, its
    config registered with open_clip under ``name`` (for ``pini train --model``)."""
    folder = tmp_path_factory.mktemp("model_configs")
    for name, config in {**FAMILIES, HF_TEXT: HF_CONFIG}.items():
        (folder / f"{name}.json").write_text(json.dumps(config))
    open_clip.add_model_config(folder)
    built = {}
    for name in FAMILIES:
        torch.manual_seed(0)
        clip = open_clip.create_model(name).eval()
        weights = folder / f"{name}.pt"
        torch.save(clip.state_dict(), weights)
        built[name] = clip, open_clip.get_tokenizer(name), weights
    return built


def _images(clip, batch: int = 2) -> torch.Tensor:
    size = clip.visual.image_size
    size = size if isinstance(size, (tuple, list)) else (size, size)
    return torch.randn(batch, 3, *size, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("name", list(FAMILIES))
def test_text_features_from_embeddings_equal_the_towers_own_encode_text(families, name):
    clip, tokenizer, _ = families[name]
    token_ids = tokenizer(pini.build_prompts(CLASSES))
    with torch.no_grad():
        own = encode_text(clip, token_ids)
        via_embeddings = pini.encode_text_embeddings(
            clip, token_embedding(clip)(token_ids), token_ids
        )
        model = PiNI(clip, tokenizer, CLASSES, config=PiNIConfig.table1("prompt"))
        prompts = model._encode_prompts(None)[0]
    torch.testing.assert_close(via_embeddings, own, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(prompts, model.placeholder_prompt_text, atol=1e-6, rtol=1e-5)
    assert own.shape == (len(CLASSES), 32)


@pytest.mark.parametrize("row", list(TABLE1))
@pytest.mark.parametrize("name", list(FAMILIES))
def test_each_table1_row_trains_one_step_with_gradients_only_in_the_generators(families, name, row):
    clip, tokenizer, _ = families[name]
    model = PiNI(clip, tokenizer, CLASSES, config=PiNIConfig.table1(row))
    loss = model.loss(_images(clip), torch.tensor([0, 2]), seed=5)
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is None for p in model.clip.parameters())
    trained = {n: p.grad for n, p in model.named_parameters() if not n.startswith("clip.")}
    assert trained and all(grad is not None for grad in trained.values()), row
    assert any(bool(grad.abs().sum() > 0) for grad in trained.values()), row


def test_sigmoid_loss_logits_carry_the_logit_bias_and_the_loss_is_unchanged(families):
    clip, tokenizer, _ = families["pini-test-sigmoid-loss"]
    bias = float(clip.logit_bias)
    model = PiNI(clip, tokenizer, CLASSES, config=PiNIConfig.table1("feature+prompt"))
    images, labels = _images(clip), torch.tensor([1, 0])
    with torch.no_grad():
        image = F.normalize(clip.encode_image(images), dim=-1)
        cosine = image @ F.normalize(model.zero_shot_text, dim=-1).t()
        expected = clip.logit_scale.exp() * cosine + bias
        torch.testing.assert_close(model.zero_shot_logits(images), expected)
        logits = model.sample_logits(images, 1, seed=3)[0]
        loss = model.loss(images, labels, seed=3)
    assert bias == -10.0
    # The bias is in the logits (a row of plain cosine logits lies within +-logit_scale)...
    assert bool((logits.mean(dim=-1) < -10 + clip.logit_scale.exp()).all())
    # ...and a constant shift of a row leaves its cross-entropy as it was.
    torch.testing.assert_close(loss, F.cross_entropy(logits, labels), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("name", list(FAMILIES))
def test_each_method_runs_through_pini_train(families, tmp_path, capsys, name, method):
    _, _, weights = families[name]
    root = make_folder(tmp_path / "data" / "toy", per_class=2).parent
    argv = ["train", "--model", name, "--pretrained", weights, "--no-progress"]
    argv += ["--method", method, "--root", root, "--dataset", "toy", "--shots", "1"]
    argv += ["--output", tmp_path / "run"]
    if METHODS[method].trains:
        argv += ["--epochs", "1", "--batch-size", "3"]
    status, out, err = run_cli(argv, capsys)
    assert status == 0, err
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["method"] == method and 0 <= summary["accuracy"] <= 100
    assert f"-> {METHODS[method].display_name} {summary['accuracy']:.2f}%" in out


@pytest.mark.parametrize(
    "flags", [["--noise", "prompt"], ["--noise", "feature+prompt"], ["--method", "coop"]]
)
def test_an_hf_text_tower_refuses_prompt_edits_in_one_line_before_any_weights(
    families, tmp_path, capsys, flags
):
    weights = tmp_path / "not-loaded.pt"
    weights.write_bytes(b"")  # never read: the check comes first
    root = make_folder(tmp_path / "data" / "toy").parent
    argv = ["train", "--model", HF_TEXT, "--pretrained", weights, "--no-progress", *flags]
    argv += ["--root", root, "--dataset", "toy", "--shots", "1", "--output", tmp_path / "run"]
    line = assert_one_line_error(run_cli(argv, capsys), HF_TEXT, "roberta-base")
    assert "--noise image, feature, text-feature, image+text-feature, feature+text-feature" in line
    assert "--method pini, zero-shot, linear-probe, clip-adapter, tip-adapter" in line
