"""Tests on tiny configs. Sections 1-11, A and B follow llamagen.py's, with its titles; then the
scripts:

  1-3, 7  the tokenizer, its losses, the Llama blocks, the text conditioner
  4-6     codes in and out, LlamaGen's generator, speculative decoding: KV cache = full forward,
          CFG = its formula, the sampling options, seeds, the exact distribution
  8-11    MAR, masked generation, VAR, early fusion: each generator's input, attention, loss and
          sampler
  A, B    parity with the official LlamaGen code (a fixture), our checkpoints
  then    train.py, sample.py, robustness (every mistake one sentence and a non-zero exit,
          interruptions lose nothing), and the README's commands and snippets

    python -m pytest -q -m "not slow"    # the fast subset, for an edit-test loop
    python -m pytest -q -n 2 --dist worksteal   # everything, on two cores (CI)
"""
import argparse
import contextlib
import dataclasses
import functools
import json
import math
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
import types
import urllib.error

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import llamagen as L
import sample as S
import train as T

HERE = os.path.dirname(os.path.abspath(__file__))
FIXTURE = os.path.join(HERE, "fixtures", "official_tiny.pt")
slow = pytest.mark.slow
if os.environ.get("PYTEST_XDIST_WORKER"):  # pytest -n 2: a core per worker, not two workers fighting for both
    torch.set_num_threads(1)
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
# every (order, kind of token) that make_gpt builds
# (early fusion's condition is a caption's ids, its tokens a vocabulary's: its own tests, section 11)
GENERATOR_KINDS = [(order, kind) for order, generator in L.GENERATORS.items() for kind in generator.token_kinds
                   if order != "fused"]


@pytest.fixture(scope="module")
def fx():
    return torch.load(FIXTURE, weights_only=True)


def tiny_gpt(order="raster", token_kind=None, model_type="c2i", seed=0, std=0.3, **overrides):
    """A GPT-tiny generator of any order, over its first kind of token unless token_kind says
    another: 32 codes or 4-wide vectors, 16 tokens (VAR: scales 1, 2, 4), 5 classes or 6 positions
    of 12-wide text features, no dropout. std: every weight drawn from N(0, std), because the
    zero-initialised readouts would hide mistakes; None: the library's initialisation."""
    token_kind = token_kind or L.GENERATORS[order].token_kinds[0]
    scales = overrides.pop("scales", (1, 2, 4)) if "scales" in (order, token_kind) or token_kind == "multiscale" else ()
    torch.manual_seed(seed)
    settings = dict(L.GPT_PRESETS["GPT-tiny"], order=order, token_kind=token_kind, vocab_size=32, token_dim=4,
                    scales=scales, block_size=sum(s * s for s in scales) or 16, num_classes=5, model_type=model_type,
                    caption_dim=12, cls_token_num=1 if model_type == "c2i" else 6, token_dropout_p=0.0,
                    resid_dropout_p=0.0, ffn_dropout_p=0.0, class_dropout_prob=0.0, diffusion_width=32,
                    diffusion_depth=2)
    gpt = L.make_gpt(L.GPTConfig(**{**settings, **overrides}))
    for p in gpt.parameters() if std else []:
        torch.nn.init.normal_(p, std=std)
    return gpt.eval()


def tiny_condition(gpt, batch=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    cfg = gpt.config
    if cfg.model_type == "c2i":
        return torch.randint(0, cfg.num_classes, (batch,), generator=g), None
    cond = torch.randn(batch, cfg.cls_token_num, cfg.caption_dim, generator=g)
    mask = torch.ones(batch, cfg.cls_token_num, dtype=torch.long)
    mask[0, :2] = 0  # left padding on the first caption
    return cond, mask


def tiny_tokens(gpt, batch=2, seed=0):  # random tokens of the GPT's kind: codes (B, T) or vectors (B, T, D)
    g = torch.Generator().manual_seed(seed)
    if gpt.config.token_kind == "continuous":
        return torch.randn(batch, gpt.config.block_size, gpt.config.token_dim, generator=g)
    return torch.randint(0, gpt.config.vocab_size, (batch, gpt.config.block_size), generator=g)


TINY_TOKENIZERS = {"discrete": L.VQ_PRESETS["VQ-tiny"], "continuous": L.KL_PRESETS["KL-tiny"],
                   "multiscale": L.MULTISCALE_PRESETS["MSVQ-tiny"]}


def tiny_tokenizer(token_kind="discrete", seed=0, **overrides):  # a tiny tokenizer of every kind, 16 px -> 8 x 8
    torch.manual_seed(seed)
    tokenizer_class = L.TOKENIZERS[token_kind]
    return tokenizer_class(tokenizer_class.config_class(**{**TINY_TOKENIZERS[token_kind], **overrides}))


def blob_images(n=4, size=16):
    """Smooth images: a colored square on a colored background."""
    g = torch.Generator().manual_seed(0)
    images = torch.empty(n, 3, size, size)
    for i in range(n):
        images[i] = torch.rand(3, 1, 1, generator=g) * 2 - 1
        images[i, :, 4:12, 2 + i:10 + i] = (torch.rand(3, 1, 1, generator=g) * 2 - 1)
    return images


def settings(temperature=1.0, top_k=0, top_p=1.0, **others):  # what a readout's draw reads
    return types.SimpleNamespace(temperature=temperature, top_k=top_k, top_p=top_p, **others)


def states_equal(a, b):
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(states_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(states_equal(x, y) for x, y in zip(a, b))
    return torch.equal(a, b) if torch.is_tensor(a) else a == b


def train_steps(model, loss, steps, lr, params=None):
    """`steps` Adam steps on loss() (the same batch every time) -> the losses."""
    opt = torch.optim.AdamW(params or [p for p in model.parameters() if p.requires_grad], lr=lr, betas=(0.9, 0.95),
                            weight_decay=0.0)
    losses = []
    for _ in range(steps):
        value = loss()
        opt.zero_grad()
        value.backward()
        opt.step()
        losses.append(value.item())
    return losses


class DrawRecorder:
    """Wraps a readout's draw: the logits each call drew from (after guidance)."""

    def __init__(self, head):
        self.logits, self.draw = [], head.draw

    def __call__(self, logits, *args, **kwargs):
        self.logits.append(logits.clone())
        return self.draw(logits, *args, **kwargs)


# -----------------------------------------------------------------------------
# 1. Image tokenizer: Encoder -> VectorQuantizer -> Decoder


def test_straight_through_gradient_reaches_encoder():
    vq = tiny_tokenizer().train()
    recon, indices, losses = vq(blob_images())
    assert torch.equal(indices, vq.eval().encode_indices(blob_images()))
    vq.train()
    F.mse_loss(recon, blob_images()).backward()
    assert vq.encoder.conv_in.weight.grad.abs().sum() > 0     # through the quantiser
    assert vq.quantize.embedding.weight.grad is None           # codes move only by their own loss
    vq.zero_grad()
    losses["codebook_loss"].backward()                         # ... which reaches the codes only
    assert vq.quantize.embedding.weight.grad.abs().sum() > 0
    assert vq.encoder.conv_in.weight.grad is None or vq.encoder.conv_in.weight.grad.abs().sum() == 0
    assert abs(losses["commit_loss"].item() - 0.25 * losses["codebook_loss"].item()) < 1e-6


def test_entropy_loss_prefers_confident_diverse_codes():
    diverse = torch.eye(4) * 10           # each vector sure of a different code
    collapsed = torch.zeros(4, 4)
    collapsed[:, 0] = 10                  # all vectors sure of code 0
    assert L.entropy_loss(diverse, temperature=1.0) < L.entropy_loss(collapsed, temperature=1.0)


def test_every_tokenizer_shares_the_autoencoder():
    """One encoder and decoder, one pair of 1x1 convolutions around the bottleneck and one
    downsampling factor (2 ** (resolutions - 1)) for every kind of tokenizer."""
    for kind in L.TOKENIZERS:
        tokenizer = tiny_tokenizer(kind)
        assert isinstance(tokenizer.cfg, L.AutoencoderConfig) and tokenizer.cfg.downsample_factor == 2
        assert tokenizer.quant_conv.in_channels == tokenizer.post_quant_conv.out_channels == tokenizer.cfg.z_channels
        assert tokenizer.tokens_per_image(tokenizer.cfg, 16) == (85 if kind == "multiscale" else 64)
    assert L.VQConfig(**L.VQ_PRESETS["VQ-16"]).downsample_factor == 16


@pytest.mark.parametrize("factor, size", [(4, 32), (16, 64)])
def test_pixels_kept_map_to_the_cells_they_cover_whole(factor, size):
    """Editing: a cell is known when all of its pixels are kept, at downsampling 4 and 16; the
    regions sample.py names (REGIONS, boxes in pixels) land on the cells they cover."""
    tokenizer = L.VQModel(L.VQConfig(**{**L.VQ_PRESETS["VQ-tiny"], "ch_mult": (1,) * (1 + int(math.log2(factor)))}))
    assert tokenizer.cfg.downsample_factor == factor
    grid = size // factor
    hidden = np.zeros((size, size), dtype=bool)
    hidden[factor + 1, 2 * factor] = True                  # one pixel hides its cell, (row 1, column 2)
    hidden[-1, -1] = True                                  # and the last cell
    cells = tokenizer.known_cells(torch.from_numpy(~hidden)[None])[0]        # (grid, grid)
    expected = torch.ones(grid, grid, dtype=torch.bool)
    expected[1, 2] = expected[-1, -1] = False
    assert torch.equal(cells, expected)
    assert torch.equal(tokenizer.known_tokens(torch.from_numpy(~hidden)[None])[0], expected.flatten())
    for region, (rows, columns) in {"right": (slice(None), slice(grid // 2, None)),
                                    "center": (slice(grid // 4, 3 * grid // 4),) * 2,
                                    "top-left": (slice(None, grid // 2),) * 2,
                                    # a box in pixels that ends inside a cell hides all of that cell
                                    f"{factor},0,{2 * factor + 1},{factor}": (slice(0, 1), slice(1, 3))}.items():
        kept = torch.from_numpy(~S.region_mask(region, (size, size), "--fill"))[None]
        expected = torch.ones(grid, grid, dtype=torch.bool)
        expected[rows, columns] = False
        assert torch.equal(tokenizer.known_cells(kept)[0], expected), region


@slow
@pytest.mark.parametrize("token_kind", list(L.TOKENIZERS))
def test_every_tokenizer_overfits_one_batch(token_kind):
    """Trained with its own loss terms and L2, every tokenizer's reconstruction error falls tenfold
    on one batch; the loss reaches the encoder (straight through, for codes) and the bottleneck
    (the codebook and every phi of VAR's)."""
    tokenizer, images = tiny_tokenizer(token_kind).train(), blob_images()
    reconstruction = []

    def loss():
        recon, _, terms = tokenizer(images)
        reconstruction.append(F.mse_loss(recon, images).item())
        return F.mse_loss(recon, images) + sum(terms.values())
    loss().backward()
    assert tokenizer.encoder.conv_in.weight.grad.abs().sum() > 0 and tokenizer.quant_conv.weight.grad.abs().sum() > 0
    if token_kind == "multiscale":
        assert tokenizer.quantize.embedding.weight.grad.abs().sum() > 0
        assert all(phi.weight.grad.abs().sum() > 0 for phi in tokenizer.quantize.quant_resi.qresi_ls)
    train_steps(tokenizer, loss, 90, 2e-3)
    assert reconstruction[-1] < reconstruction[0] / 10


# -----------------------------------------------------------------------------
# 2. Tokenizer losses: LPIPS perceptual loss, PatchGAN discriminator, hinge loss


def test_vq_loss_adversarial_term_and_detached_discriminator():
    criterion = L.VQLoss(lpips=None, perceptual_weight=0.0, disc_start=5, disc_weight=0.5, adaptive_disc_weight=False)
    vq = tiny_tokenizer().train()
    images = blob_images(size=32)  # the 3-layer PatchGAN needs at least 32 x 32 pixels
    recon, _, vq_losses = vq(images)
    before, logs = criterion.generator_loss(images, recon, vq_losses, step=4, last_layer=vq.decoder.conv_out.weight)
    assert "gen_adv_loss" not in logs and criterion.discriminator_loss(images, recon, step=4) is None
    after, logs = criterion.generator_loss(images, recon, vq_losses, step=5, last_layer=vq.decoder.conv_out.weight)
    assert after.item() == pytest.approx(before.item() + 0.5 * logs["gen_adv_loss"].item(), abs=1e-5)
    vq.zero_grad()
    d_loss = criterion.discriminator_loss(images, recon, step=5)
    d_loss.backward()
    assert all(p.grad is None for p in vq.parameters())  # the discriminator step never reaches the VQ
    assert criterion.discriminator.main[0].weight.grad.abs().sum() > 0
    wide = images[:, :, 8:24]                                               # 32 x 16: too small for PatchGAN
    recon, _, vq_losses = vq(wide)
    _, logs = criterion.generator_loss(wide, recon, vq_losses, step=5, last_layer=vq.decoder.conv_out.weight)
    assert "gen_adv_loss" not in logs and criterion.discriminator_loss(wide, recon, step=5) is None


def test_adaptive_weight_is_the_gradient_norm_ratio():
    w = torch.randn(5, requires_grad=True)
    assert L.adaptive_weight(3 * (w ** 2).sum(), (w ** 2).sum(), w).item() == pytest.approx(3.0, rel=1e-3)


def test_hinge_loss():
    assert L.hinge_d_loss(torch.tensor([2.0]), torch.tensor([-2.0])).item() == 0.0
    assert L.hinge_d_loss(torch.tensor([0.0]), torch.tensor([0.0])).item() == 1.0


VGG16_FILE = "vgg16-397923af.pth"  # torchvision's name for the ImageNet VGG16 weights LPIPS uses


def random_vgg16_state_dict():
    """A VGG16 state dict with random weights in the real shapes (the classifier, which LPIPS never
    runs, as zero-storage views, so that the file is small)."""
    import torchvision
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in torchvision.models.vgg16().state_dict().items()}
    g = torch.Generator().manual_seed(0)
    return {k: torch.randn(s, generator=g) * 0.05 if k.startswith("features") else torch.zeros(()).expand(s)
            for k, s in shapes.items()}


def fail_download(*args, **kwargs):
    raise urllib.error.URLError("simulated: no network")


@slow
def test_lpips_is_downloaded_the_standard_way_and_used(monkeypatch, tmp_path):
    """The first use downloads VGG16 into the torch hub cache (simulated here), the second finds
    it there; the loss then has its perceptual term."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    downloads = []

    def download(url, destination, hash_prefix=None, progress=True):
        downloads.append(url)
        torch.save(random_vgg16_state_dict(), destination)
    monkeypatch.setattr(torch.hub, "download_url_to_file", download)
    criterion = L.VQLoss(lpips=L.load_lpips(), perceptual_weight=1.0, disc_start=100, disc_weight=0.5,
                         adaptive_disc_weight=False)
    assert len(downloads) == 1 and downloads[0].endswith(VGG16_FILE)
    assert os.path.isfile(tmp_path / "hub" / "checkpoints" / VGG16_FILE)
    assert L.load_lpips() is not None and len(downloads) == 1        # the cached file, no download
    vq = tiny_tokenizer().train()
    images = blob_images(size=32)
    recon, _, vq_losses = vq(images)
    loss, logs = criterion.generator_loss(images, recon, vq_losses, step=0, last_layer=None)
    assert logs["perceptual_loss"].item() > 0
    expected = logs["rec_loss"] + logs["perceptual_loss"] + sum(vq_losses.values())
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)


@slow
def test_lpips_offline_warns_and_trains_without_it(monkeypatch, tmp_path):
    """Offline, the library says what to download where; train.py turns that into one warning and
    trains without the perceptual term."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setattr(torch.hub, "download_url_to_file", fail_download)
    with pytest.raises(OSError, match=f"could not be loaded.*download .*{VGG16_FILE} to {tmp_path}"):
        L.load_lpips()
    with pytest.warns(UserWarning, match=f"LPIPS perceptual loss is off.*{VGG16_FILE}.*--perceptual-weight 0") as record:
        lpips = T.load_perceptual_loss(1.0)
    assert lpips is None and len(record) == 1
    criterion = L.VQLoss(lpips=lpips, perceptual_weight=1.0, disc_start=100, disc_weight=0.5, adaptive_disc_weight=False)
    vq = tiny_tokenizer().train()
    recon, _, vq_losses = vq(blob_images())
    _, logs = criterion.generator_loss(blob_images(), recon, vq_losses, step=0, last_layer=None)
    assert "perceptual_loss" not in logs


# -----------------------------------------------------------------------------
# 3. Llama blocks: RMSNorm, 2D RoPE, attention with a KV cache, SwiGLU, the condition embedders


def test_official_presets_build_the_official_shapes():
    """The shapes of one GPT-B block (c2i_B_256.pt), and the feed-forward widths of larger presets."""
    cfg = L.GPTConfig(**L.GPT_PRESETS["GPT-B"])
    shapes = {name: tuple(p.shape) for name, p in L.TransformerBlock(cfg).state_dict().items()}
    assert shapes == {"attention.wqkv.weight": (2304, 768), "attention.wo.weight": (768, 768),
                      "feed_forward.w1.weight": (2048, 768), "feed_forward.w3.weight": (2048, 768),
                      "feed_forward.w2.weight": (768, 2048), "attention_norm.weight": (768,),
                      "ffn_norm.weight": (768,)}
    assert L.ffn_hidden_dim(L.GPTConfig(**L.GPT_PRESETS["GPT-XL"])) == 3584
    assert L.ffn_hidden_dim(L.GPTConfig(**L.GPT_PRESETS["GPT-3B"])) == 8704


def test_rope_rotates_by_row_and_column_and_not_the_condition():
    rope = L.precompute_rope_2d(grid_size=4, head_dim=16, base=10000, cls_token_num=3)
    assert rope.shape == (3 + 16, 8, 2)
    assert rope[:3].abs().max() == 0
    # image token (row 1, col 2) = position 3 + 1 * 4 + 2: first half of the pairs turns with the
    # row (angle 1 * freq), second half with the column (angle 2 * freq)
    freqs = 1.0 / 10000 ** (torch.arange(0, 8, 2).float() / 8)
    angles = torch.cat([1 * freqs, 2 * freqs])
    assert torch.allclose(rope[3 + 6], torch.stack([angles.cos(), angles.sin()], -1))
    # 1D: every pair turns with the raster position 6
    rope_1d = L.precompute_rope_2d(grid_size=4, head_dim=16, base=10000, cls_token_num=3, rope_2d=False)
    angles = 6 * 1.0 / 10000 ** (torch.arange(0, 16, 2).float() / 16)
    assert torch.allclose(rope_1d[3 + 6], torch.stack([angles.cos(), angles.sin()], -1))


def test_padding_is_invisible():
    """Changing the text features at padded positions must not change any image logit."""
    gpt = tiny_gpt(model_type="t2i")
    cond, mask = tiny_condition(gpt)
    tokens = torch.randint(0, 32, (2, 16))
    changed = cond.clone()
    changed[0, :2] = torch.randn(2, cond.shape[-1])
    assert torch.allclose(gpt(tokens, cond, mask), gpt(tokens, changed, mask), atol=1e-5)
    assert not torch.allclose(gpt(tokens, cond), gpt(tokens, changed), atol=1e-5)  # without the mask


# -----------------------------------------------------------------------------
# 4. Codes in and out: a learned vector per code, logits over the codes, and how a code is drawn


def test_top_k_top_p_and_temperature_keep_exactly_the_allowed_tokens():
    probs = torch.tensor([0.35, 0.25, 0.2, 0.1, 0.06, 0.04])
    logits = probs.log().expand(4000, -1).contiguous()
    g = torch.Generator().manual_seed(0)

    def seen(temperature=1.0, top_k=0, top_p=1.0):
        return set(L.sample_code(logits, temperature, top_k, top_p, g).flatten().tolist())
    assert seen(top_k=3) == {0, 1, 2}
    assert seen(top_k=1) == {0}
    # top_p keeps tokens until the mass before them passes p: 0.35 + 0.25 = 0.6 < 0.65 keeps token 2
    assert seen(top_p=0.65) == {0, 1, 2}
    assert seen(top_p=0.5) == {0, 1}
    assert seen(top_p=0.3) == {0}
    assert seen(top_k=2, top_p=0.9) == {0, 1}
    assert seen() == set(range(6))
    assert seen(temperature=0) == {0}  # greedy
    # temperature sharpens: at 0.05 the top token wins (almost) always
    counts = torch.bincount(L.sample_code(logits, 0.05, 0, 1.0, g).flatten(), minlength=6)
    assert counts[0] > 3950


@pytest.mark.parametrize("draw", [L.draw_inverse_cdf, L.draw_exponential_race])
def test_draws_follow_the_distribution(draw):
    """Both ways of drawing a token (CPU and GPU) pick token i with probability p_i and never a
    removed one. 40,000 draws: each frequency within 5 standard deviations of its probability."""
    probs = torch.tensor([0.0, 0.4, 0.0, 0.3, 0.2, 0.1, 0.0])
    n = 40_000
    picks = draw(probs.expand(n, -1).contiguous(), torch.Generator().manual_seed(0)).flatten()
    frequency = torch.bincount(picks, minlength=len(probs)).float() / n
    assert (frequency[probs == 0] == 0).all()
    assert ((frequency - probs).abs() <= 5 * (probs * (1 - probs) / n).sqrt()).all()


def test_every_sampling_option_is_declared_once_with_its_range():
    """The options every generator reads come from one declaration each (its class's or its
    readout's), asked of the classes; generate() fills in the defaults and refuses an option it
    does not read, or a value out of range, in one sentence."""
    names = [option.name for option in S.all_sampling_options()]
    assert len(names) == len(set(names)) and {"cfg_scale", "temperature", "top_k", "top_p", "cfg_interval",
                                               "diffusion_steps", "num_iter", "choice_temperature",
                                               "cfg_schedule"} == set(names)
    assert list(L.GPT.options_for("discrete")) == ["cfg_scale", "temperature", "cfg_interval", "top_k", "top_p"]
    assert list(L.GPT.options_for("continuous")) == ["cfg_scale", "temperature", "cfg_interval", "diffusion_steps"]
    assert "choice_temperature" in L.MaskedGPT.options_for("discrete")            # MaskGIT ranks codes by it
    assert "choice_temperature" not in L.MaskedGPT.options_for("continuous")      # MAR: a random order
    gpt = tiny_gpt("masked")
    assert vars(gpt.sampling_settings({"num_iter": 3})) == dict(cfg_scale=1.0, temperature=1.0, num_iter=3,
                                                                choice_temperature=4.5, top_k=0, top_p=1.0)
    for options, message in [({"num_iter": 17}, "num_iter 17 is out of range: it must be at least 1 and at most 16, "
                                                "the tokens of this model's image."),
                             ({"top_p": 0.0}, "top_p 0.0 is out of range: it must be above 0 and at most 1."),
                             ({"cfg_interval": 2}, "cfg_interval does not apply to masked order over discrete tokens; "
                                                   "it takes cfg_scale, temperature, num_iter, choice_temperature, "
                                                   "top_k, top_p.")]:
        with pytest.raises(ValueError, match=re.escape(message)):
            gpt.generate(torch.tensor([0]), **options)
    with pytest.raises(ValueError, match="choice_temperature does not apply to masked order over continuous tokens"):
        tiny_gpt("masked", "continuous").generate(torch.tensor([0]), choice_temperature=1.0)
    with pytest.raises(ValueError, match="cfg_schedule 'linear' is out of range: it must be one of ramp, constant"):
        tiny_gpt("scales").generate(torch.tensor([0]), cfg_schedule="linear")


# -----------------------------------------------------------------------------
# 5. The Llama assembled (what every generator shares), and LlamaGen's generator, GPT


def assert_cache_matches_full_forward(gpt, cond, cond_mask, tokens):
    """Step-by-step decoding through the KV cache gives the output of one full forward pass."""
    full = gpt(tokens, cond, cond_mask)                                   # (B, T, vocab) or (B, T, dim)
    cls = gpt.config.cls_token_num
    max_seq_len = cls + gpt.config.block_size - 1
    gpt.setup_caches(2, max_seq_len, torch.float32, tokens.device)
    mask = L.attention_mask(torch.arange(max_seq_len), cond_mask)
    stepwise = [gpt.prefill(cond, mask)]
    for t in range(gpt.config.block_size - 1):
        stepwise.append(gpt.decode_one_token(tokens[:, t:t + 1], torch.tensor([cls + t], device=tokens.device), mask))
    assert (torch.stack(stepwise, dim=1) - full).abs().max() < 1e-4


@pytest.mark.parametrize("token_kind", ["discrete", "continuous"])
@pytest.mark.parametrize("model_type", ["c2i", "t2i"])
def test_kv_cache_matches_full_forward(model_type, token_kind):
    gpt = tiny_gpt("raster", token_kind, model_type)
    cond, cond_mask = tiny_condition(gpt)
    gpt.generate(cond, cond_mask, diffusion_steps=2) if token_kind == "continuous" else gpt.generate(cond, cond_mask)
    # (which leaves a cache of the same shape, reused outside inference mode)
    assert_cache_matches_full_forward(gpt, cond, cond_mask, tiny_tokens(gpt))


def test_forward_accepts_any_length():
    gpt = tiny_gpt()
    cond, _ = tiny_condition(gpt)
    tokens = torch.randint(0, 32, (2, 16))
    assert torch.allclose(gpt(tokens[:, :5], cond), gpt(tokens, cond)[:, :5], atol=1e-5)


@pytest.mark.parametrize("model_type", ["c2i", "t2i"])
def test_cfg_follows_its_formula(model_type):
    """Greedy CFG tokens are the argmax of uncond + (cond - uncond) * scale, computed here with
    plain full forward passes of the conditional and the null condition; scale 0 is the
    unconditional model."""
    gpt = tiny_gpt(model_type=model_type, seed=1)
    cond, mask = tiny_condition(gpt, seed=1)
    null = gpt.cls_embedding.null(cond)
    for scale in (3.0, 0.0):
        tokens = gpt.generate(cond, mask, cfg_scale=scale, temperature=0)
        with torch.no_grad():
            cond_logits, uncond_logits = gpt(tokens, cond, mask), gpt(tokens, null, mask)
        expected = uncond_logits + (cond_logits - uncond_logits) * scale
        top2 = expected.topk(2, dim=-1).values
        clear = (top2[..., 0] - top2[..., 1]) > 1e-4  # skip float near-ties
        assert clear.float().mean() > 0.9
        assert torch.equal(tokens[clear], expected.argmax(-1)[clear])
    assert not torch.equal(gpt.generate(cond, mask, cfg_scale=3.0, temperature=0),
                           gpt.generate(cond, mask, cfg_scale=1.0, temperature=0))


def test_cfg_interval_turns_guidance_off():
    gpt = tiny_gpt(seed=2)
    cond, _ = tiny_condition(gpt, seed=2)
    plain = gpt.generate(cond, top_k=1)
    guided = gpt.generate(cond, cfg_scale=4.0, top_k=1)
    early = gpt.generate(cond, cfg_scale=4.0, cfg_interval=2, top_k=1)
    assert torch.equal(early[:, :4], guided[:, :4])  # guidance on for tokens 0..cfg_interval+1
    with torch.no_grad():  # afterwards each token is the plain conditional argmax
        logits = gpt(early, cond)
    assert torch.equal(early[:, 4:], logits.argmax(-1)[:, 4:])
    assert not torch.equal(early, plain)


def test_seed_reproduces():
    gpt = tiny_gpt(model_type="t2i")
    cond, mask = tiny_condition(gpt)

    def run(seed, generate=gpt.generate):
        return generate(cond, mask, cfg_scale=2.0, top_k=10, top_p=0.9, temperature=1.5,
                        generator=torch.Generator().manual_seed(seed))
    assert torch.equal(run(0), run(0))
    assert not torch.equal(run(0), run(1))
    assert torch.equal(run(0, functools.partial(L.generate_without_cache, gpt)), run(0))  # same draws, same distributions


def test_generated_tokens_can_be_trained_on():
    """generate's loop runs in inference mode, yet what it returns is an ordinary tensor: autograd
    refuses to save an inference tensor for backward, and embedding lookups save their indices."""
    gpt = tiny_gpt()
    cond, _ = tiny_condition(gpt)
    tokens = gpt.generate(cond, cfg_scale=2.0)
    gpt.loss(tokens, cond).backward()
    assert gpt.tok_embeddings.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("order, token_kind", GENERATOR_KINDS)
def test_every_generation_leaves_the_mode_it_found(order, token_kind):
    """The generation prologue samples in eval mode (no dropout, no condition dropout) and gives
    the mode back, training included; guided or not, the tokens are the GPT's kind."""
    gpt = tiny_gpt(order, token_kind, token_dropout_p=0.5, class_dropout_prob=0.5).train()
    options = {"diffusion_steps": 2} if token_kind == "continuous" else {}

    def run():
        return gpt.generate(torch.tensor([0, 1]), cfg_scale=2.0, generator=torch.Generator().manual_seed(0), **options)
    tokens = run()
    assert gpt.training and tokens.shape[:2] == (2, gpt.config.block_size) and torch.equal(run(), tokens)


@slow
@pytest.mark.parametrize("model_type", ["c2i", "t2i"])
def test_compiled_decode_step_is_one_graph(model_type):
    """What sample.py --compile relies on for its speed (a CUDA graph replays one captured graph):
    the decode step traces as one graph, is never recompiled over a whole generation, and gives
    the uncompiled tokens. The recording backend keeps the traced graphs and runs them as they are."""
    import torch._dynamo
    gpt = tiny_gpt(model_type=model_type)
    cond, mask = tiny_condition(gpt)
    graphs = []

    def recording_backend(graph_module, example_inputs):
        graphs.append(graph_module)
        return graph_module.forward

    def run():
        return gpt.generate(cond, mask, cfg_scale=2.0, top_k=10, generator=torch.Generator().manual_seed(0))
    eager = run()
    torch._dynamo.reset()
    gpt.decode_one_token = torch.compile(gpt.decode_one_token, backend=recording_backend, fullgraph=True)
    assert torch.equal(run(), eager)
    assert len(graphs) == 1
    torch._dynamo.reset()


def test_rope_table_stays_float32_in_bf16():
    gpt = tiny_gpt().cast("cpu", torch.bfloat16)
    assert gpt.tok_embeddings.weight.dtype == torch.bfloat16 and gpt.rope.dtype == torch.float32
    tokens = gpt.generate(torch.tensor([0, 1]), cfg_scale=2.0, temperature=0)
    assert tokens.shape == (2, 16)


@pytest.mark.parametrize("order, token_kind", GENERATOR_KINDS)
def test_every_kind_of_token_goes_through_the_same_calls(order, token_kind):
    """What train.py and sample.py rely on, whatever a token is: the tokenizer's encode gives what a
    GPT built from its token_config reads; that GPT's loss trains both its input and its readout;
    generate gives tokens that decode back to images; and the training tokens drawn from
    encode_posterior are centred on encode's."""
    tokenizer = tiny_tokenizer(token_kind).eval()
    images = blob_images()                                                  # (4, 3, 16, 16)
    encoded = tokenizer.encode(images)                                      # (4, 64), (4, 64, 4) or (4, 85)
    T_ = tokenizer.tokens_per_image(tokenizer.cfg, 16)
    gpt = L.make_gpt(L.GPTConfig(**L.GPT_PRESETS["GPT-tiny"], **tokenizer.token_config(), block_size=T_,
                                 num_classes=3, diffusion_width=32, diffusion_depth=1, order=order))
    gpt.bind_tokenizer(tokenizer)
    for p in gpt.parameters():  # the zero-initialised readouts would hide the input layer's gradient
        torch.nn.init.normal_(p, std=0.3)
    labels = torch.tensor([0, 1, 2, 0])
    gpt.loss(encoded, labels).backward()
    assert gpt.tok_embeddings.weight.grad.abs().sum() > 0
    assert sum(p.grad.abs().sum() for p in gpt.output.parameters()) > 0
    steps = []
    options = {"diffusion_steps": 3} if token_kind == "continuous" else {}
    generated = gpt.generate(labels[:2], cfg_scale=2.0, generator=torch.Generator().manual_seed(0), steps=steps,
                             **options)
    assert generated.shape[1:] == encoded.shape[1:] and generated.dtype == encoded.dtype
    assert steps[0].shape == (2, T_)  # the step that decided each token
    decoded = tokenizer.decode(generated)
    assert decoded.shape == (2, 3, 16, 16) and decoded.abs().max() <= 1
    posterior = tokenizer.encode_posterior(images)
    draws = torch.stack([tokenizer.draw_from_posterior(posterior) for _ in range(100)]).float()
    assert draws.shape[1:] == encoded.shape and (draws.mean(0) - encoded.float()).abs().max() < 0.5


@pytest.mark.parametrize("order, token_kind", GENERATOR_KINDS)
def test_every_generator_edits_keeping_the_known_tokens(order, token_kind):
    """Editing with every generator and every mask of the README's table: the tokens of the kept
    cells come out as the image's own (VAR: at every scale, as many as known_tokens knows), the
    hidden ones are generated; keeping everything returns the image's tokens, keeping nothing is
    plain generation, draw for draw."""
    tokenizer = tiny_tokenizer(token_kind).eval()
    images = blob_images(2)                                                 # (2, 3, 16, 16)
    encoded = tokenizer.encode(images)
    gpt = L.make_gpt(L.GPTConfig(**L.GPT_PRESETS["GPT-tiny"], **tokenizer.token_config(), num_classes=3,
                                 block_size=tokenizer.tokens_per_image(tokenizer.cfg, 16), diffusion_width=32,
                                 diffusion_depth=1, order=order))
    gpt.bind_tokenizer(tokenizer)
    for p in gpt.parameters():
        torch.nn.init.normal_(p, std=0.3)
    labels, options = torch.tensor([0, 2]), {"diffusion_steps": 2} if token_kind == "continuous" else {}

    def edit(known, seed=0):
        return gpt.eval().generate(labels, cfg_scale=2.0, generator=torch.Generator().manual_seed(seed),
                                   edit=None if known is None else (encoded, known), **options)
    for region in ("center", "right", "bottom", "top-left"):
        known = tokenizer.known_tokens(torch.from_numpy(~S.region_mask(region, (16, 16), "--fill"))[None].expand(2, -1, -1))
        if token_kind == "multiscale":  # some cells known at a coarser scale than the grid's
            assert known[:, :-64].any() and not known[:, :-64].all()
        generated = edit(known)
        assert generated.shape == encoded.shape
        assert torch.equal(generated[known], encoded[known]), region
        assert not torch.equal(generated[~known], encoded[~known])
    assert torch.equal(edit(torch.ones_like(known)), encoded)
    assert torch.equal(edit(torch.zeros_like(known), seed=3), edit(None, seed=3))


OVERFITS = {  # (order, kind of token): learning rate, steps, the fall of the loss asked for
    ("raster", "discrete"): (3e-3, 150, 10), ("raster", "continuous"): (3e-3, 300, 3),
    ("masked", "discrete"): (1e-2, 500, 3), ("masked", "continuous"): (3e-3, 400, 3),
    ("scales", "multiscale"): (1e-2, 150, 60)}


@slow
@pytest.mark.parametrize("order, token_kind", GENERATOR_KINDS)
def test_every_generator_overfits_one_batch(order, token_kind):
    """Trained on one image per class with its own loss (gpt.loss), from the library's
    initialisation (MaskGIT's from small weights), every generator's loss falls; over codes, greedy sampling then writes each
    class's image back (masked order most of it: mostly masked, only the class tells the images
    apart, where in raster order the codes before a position do too)."""
    lr, steps, fall = OVERFITS[order, token_kind]
    gpt = tiny_gpt(order, token_kind, std=0.02 if order == "masked" and token_kind == "discrete" else None).train()
    tokens, labels = tiny_tokens(gpt, batch=4), torch.arange(4)
    torch.manual_seed(0)
    losses = train_steps(gpt, lambda: gpt.loss(tokens, labels), steps, lr)
    first, last = np.mean(losses[:10]), np.mean(losses[-10:])
    assert last < first / fall, (first, last)
    if token_kind != "continuous":
        assert losses[0] > 3.0                                   # from about ln(32)
        greedy = gpt.eval().generate(labels, temperature=0.0, **({"num_iter": 4} if order == "masked" else {}))
        assert (greedy == tokens).float().mean() > (0.7 if order == "masked" else 0.99)  # 1 / 32 by chance


def on_cuda(gpt, cond, cond_mask):
    return gpt.cast("cuda", torch.float32), cond.cuda(), None if cond_mask is None else cond_mask.cuda()


@cuda
@pytest.mark.parametrize("token_kind", ["discrete", "continuous"])
def test_cuda_generation_equals_its_references(token_kind):
    """On a GPU: the same outputs as on the CPU, the KV cache gives the full forward pass, and the
    cached and uncached samplers draw the same tokens from the same CUDA generator."""
    gpt = tiny_gpt("raster", token_kind, "t2i")
    cond, cond_mask = tiny_condition(gpt)
    tokens = tiny_tokens(gpt)
    with torch.no_grad():
        on_cpu = gpt(tokens, cond, cond_mask)
    gpt, cond, cond_mask = on_cuda(gpt, cond, cond_mask)
    with torch.no_grad():
        assert (gpt(tokens.cuda(), cond, cond_mask).cpu() - on_cpu).abs().max() < 1e-4
        assert_cache_matches_full_forward(gpt, cond, cond_mask, tokens.cuda())
    options = dict(top_k=10) if token_kind == "discrete" else dict(diffusion_steps=4)

    def run(generate):
        return generate(cond, cond_mask, cfg_scale=2.0, generator=torch.Generator("cuda").manual_seed(0), **options)
    cached = run(gpt.generate)
    uncached = run(functools.partial(L.generate_without_cache, gpt))
    assert cached.is_cuda and torch.allclose(uncached.float(), cached.float(), atol=1e-4)


@cuda
def test_cuda_graph_decode_step_gives_the_eager_tokens():
    """sample.py --compile on a GPU: the decode step compiled with mode="reduce-overhead" (a CUDA
    graph replayed for every token) draws the eager tokens, on its first run and on a replay."""
    import torch._dynamo
    gpt, cond, cond_mask = on_cuda(tiny_gpt(model_type="t2i"), *tiny_condition(tiny_gpt(model_type="t2i")))

    def run():
        return gpt.generate(cond, cond_mask, cfg_scale=2.0, top_k=10, generator=torch.Generator("cuda").manual_seed(0))
    eager = run()
    torch._dynamo.reset()
    gpt.compile_decode_one_token()
    try:
        assert torch.equal(run(), eager) and torch.equal(run(), eager)
    finally:
        torch._dynamo.reset()


@cuda
def test_cuda_bf16_generation():
    """--dtype bf16 on a GPU: the logits stay close to float32's, and both kinds of token sample."""
    gpt = tiny_gpt(model_type="t2i")
    cond, cond_mask = tiny_condition(gpt)
    tokens = torch.randint(0, 32, (2, 16), device="cuda")
    gpt, cond, cond_mask = on_cuda(gpt, cond, cond_mask)
    with torch.no_grad():
        full = gpt(tokens, cond, cond_mask)
        gpt.cast("cuda", torch.bfloat16)
        half = gpt(tokens, cond.bfloat16(), cond_mask).float()
    assert (half - full).abs().max() < 0.05 * full.abs().max()
    codes = gpt.generate(cond.bfloat16(), cond_mask, cfg_scale=2.0, top_k=10)
    assert codes.shape == (2, 16) and codes.min() >= 0 and codes.max() < 32
    mar = tiny_gpt("raster", "continuous").cast("cuda", torch.bfloat16)
    vectors = mar.generate(torch.tensor([0, 1], device="cuda"), cfg_scale=2.0, diffusion_steps=3)
    assert vectors.dtype == torch.float32 and vectors.isfinite().all()


@cuda
def test_cuda_next_scale_generation_equals_its_references(monkeypatch):
    """VAR on a GPU (convolutions in full float32): the teacher-forced logits are the CPU's, the
    passes through the KV cache give the full forward's logits on the codes they drew, and bf16
    samples with the quantizer kept float32."""
    gpt = tiny_gpt("scales", model_type="t2i")
    cond, cond_mask = tiny_condition(gpt)
    codes = tiny_tokens(gpt)
    with torch.no_grad(), torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
        on_cpu = gpt(codes, cond, cond_mask)
        gpt, cond, cond_mask = on_cuda(gpt, cond, cond_mask)
        assert (gpt(codes.cuda(), cond, cond_mask).cpu() - on_cpu).abs().max() < 1e-4
        recorder = DrawRecorder(gpt.output)
        monkeypatch.setattr(gpt.output, "draw", recorder)
        drawn = gpt.generate(cond, cond_mask, generator=torch.Generator("cuda").manual_seed(0))
        full = gpt(drawn, cond, cond_mask)
    stepwise = torch.cat([logits.view(2, -1, 32) for logits in recorder.logits], dim=1)
    assert drawn.is_cuda and (stepwise - full).abs().max() < 1e-4
    monkeypatch.undo()
    gpt.cast("cuda", torch.bfloat16)
    assert gpt.quantizer.embedding.weight.dtype == torch.float32
    assert gpt.generate(cond.bfloat16(), cond_mask, cfg_scale=2.0, top_k=10).shape == (2, 21)


# -----------------------------------------------------------------------------
# 6. Speculative Jacobi decoding: LlamaGen's images in fewer forward passes; and without a KV cache


def tiny_enumerable_gpt(model_type="c2i"):
    """A GPT over 4 codes and 4 image tokens: its 256 possible images can all be listed."""
    return tiny_gpt(model_type=model_type, seed=5, std=0.4, n_layer=2, n_head=2, dim=16, multiple_of=8, vocab_size=4,
                    block_size=4, num_classes=3)


def exact_distribution(gpt, cond, cond_mask, cfg_scale, temperature, top_k, top_p, cfg_interval=-1, edit=None):
    """The probability of each of the V**T code sequences (V**T, T) under generate's rules, from
    teacher-forced logits: the product over positions of the guided, filtered conditionals. With
    edit = (codes (T,), known (T,)): over the sequences that hold the known codes, the product over
    the other positions only (raster editing: each is drawn given the codes before it)."""
    cfg = gpt.config
    sequences = torch.cartesian_prod(*[torch.arange(cfg.vocab_size)] * cfg.block_size)     # (V**T, T)
    n = len(sequences)
    cond, cond_mask = cond.expand(n, *cond.shape[1:]), None if cond_mask is None else cond_mask.expand(n, -1)
    with torch.no_grad():
        logits = gpt(sequences, cond, cond_mask)                                            # (V**T, T, V)
        if cfg_scale != 1.0:
            logits = torch.cat([logits, gpt(sequences, gpt.cls_embedding.null(cond), cond_mask)])
    probs = gpt.output.probabilities(logits, cfg_scale, settings(temperature, top_k, top_p))  # (V**T, T, V)
    if cfg_interval >= 0:  # unguided after the first cfg_interval + 2 codes
        plain = gpt.output.probabilities(logits[:n], 1.0, settings(temperature, top_k, top_p))
        probs[:, cfg_interval + 2:] = plain[:, cfg_interval + 2:]
    probs = probs.gather(-1, sequences[..., None])[..., 0].double()                          # (V**T, T)
    if edit is None:
        return sequences, probs.prod(dim=-1)
    codes, known = edit
    holds = (sequences[:, known] == codes[known]).all(dim=1)
    return sequences, torch.where(holds, probs[:, ~known].prod(dim=-1), 0.0)


def assert_follows(samples, sequences, exact):
    """A chi-square test of sampled sequences (N, T) against their exact distribution: cells
    expected at least 5 times on their own, the rest pooled; never a sequence of probability 0."""
    index = {tuple(s): i for i, s in enumerate(sequences.tolist())}
    counts = torch.bincount(torch.tensor([index[tuple(s)] for s in samples.tolist()]), minlength=len(exact))
    assert counts[exact == 0].sum() == 0
    expected = exact * len(samples)
    big = expected >= 5
    if expected[~big].sum() < 5:  # too little to pool on its own: pool it with the least likely big cell
        big[expected.masked_fill(~big, math.inf).argmin()] = False
    observed = torch.cat([counts[big].double(), counts[~big].sum()[None].double()])
    expected = torch.cat([expected[big], expected[~big].sum()[None]])
    observed, expected = observed[expected > 0], expected[expected > 0]
    k = len(expected) - 1
    if k == 0:  # a single possible sequence: every sample is it
        return
    chi2 = ((observed - expected) ** 2 / expected).sum().item()
    z = ((chi2 / k) ** (1 / 3) - (1 - 2 / (9 * k))) / math.sqrt(2 / (9 * k))  # Wilson-Hilferty: ~ N(0, 1)
    assert z < 4, f"chi-square {chi2:.0f} on {k} degrees of freedom (z = {z:.1f})"


SPECULATIVE_CASES = [  # window, temperature, top-k, top-p, CFG scale, CFG interval, coupled drafts, samples per class
    (6, 2.0, 2, 0.9, 3.0, -1, True, 4000)] + [pytest.param(*case, 10_000, marks=slow) for case in [  # the full suite
        (1, 1.0, 0, 1.0, 1.0, -1, True), (2, 1.0, 0, 1.0, 3.0, -1, True), (6, 1.0, 0, 1.0, 1.0, -1, True),
        (2, 0.5, 0, 1.0, 3.0, -1, True), (6, 2.0, 0, 1.0, 3.0, -1, True), (2, 1.0, 2, 1.0, 1.0, -1, True),
        (6, 1.0, 1, 1.0, 3.0, -1, True), (3, 1.0, 0, 0.7, 3.0, -1, True), (6, 2.0, 2, 0.9, 3.0, -1, True),
        (2, 1.0, 0, 1.0, 3.0, 0, True), (6, 0.5, 0, 0.8, 3.0, 1, True), (6, 1.0, 0, 1.0, 3.0, -1, False),
        (2, 2.0, 2, 0.9, 3.0, 0, False)]]


@pytest.mark.parametrize("window, temperature, top_k, top_p, cfg_scale, cfg_interval, coupled, per_class",
                         SPECULATIVE_CASES)
def test_speculative_decoding_draws_exactly_generates_distribution(window, temperature, top_k, top_p, cfg_scale,
                                                                   cfg_interval, coupled, per_class):
    """Speculative decoding's whole point: the same distribution over images as generate(), in
    fewer passes, with coupled drafts (MC-SJD) and independent ones (SJD). Up to 20,000 sequences,
    rows of two classes in one batch (rows advance by different amounts), each class against its
    own exact distribution; generate() against the same as a check of the test itself."""
    gpt = tiny_enumerable_gpt()
    options = dict(cfg_scale=cfg_scale, cfg_interval=cfg_interval, temperature=temperature, top_k=top_k, top_p=top_p)
    labels = torch.tensor([0, 2]).repeat_interleave(per_class)
    samples, passes = L.generate_speculative(gpt, labels, window=window, coupled=coupled,
                                               generator=torch.Generator().manual_seed(0), **options)
    assert passes.max() <= gpt.config.block_size and passes.min() >= 1
    reference = gpt.generate(labels, generator=torch.Generator().manual_seed(1), **options)
    for label in (0, 2):
        sequences, exact = exact_distribution(gpt, torch.tensor([label]), None, **options)
        assert torch.allclose(exact.sum(), torch.tensor(1.0, dtype=torch.float64))
        assert_follows(samples[labels == label], sequences, exact)
        assert_follows(reference[labels == label], sequences, exact)


@pytest.mark.parametrize("loop", ["generate", "speculative", "no cache"])
def test_a_raster_edit_draws_each_hidden_code_given_the_known_codes_before_it(loop):
    """Raster editing, in each of its loops (speculative decoding: the known codes are drafts that are
    always accepted): of 4 codes, the second and third are known, so the first is drawn blind to
    them and the last given all three. 8,000 sequences, two classes, against the exact
    distribution of the teacher-forced conditionals (chi-square)."""
    gpt = tiny_enumerable_gpt()
    options = dict(cfg_scale=3.0, temperature=1.0, top_k=0, top_p=1.0)
    codes, known = torch.tensor([0, 2, 1, 0]), torch.tensor([False, True, True, False])
    labels = torch.tensor([0, 2]).repeat_interleave(4000 if loop != "no cache" else 10)
    edit, generator = (codes.expand(len(labels), -1), known.expand(len(labels), -1)), torch.Generator().manual_seed(0)
    if loop == "speculative":
        samples, _ = L.generate_speculative(gpt, labels, window=2, generator=generator, edit=edit, **options)
    elif loop == "no cache":  # the same draws as generate's, so the same codes
        samples = L.generate_without_cache(gpt, labels, generator=generator, edit=edit, **options)
        assert torch.equal(samples, gpt.generate(labels, generator=torch.Generator().manual_seed(0), edit=edit, **options))
        assert (samples[:, known] == codes[known]).all()
        return
    else:
        samples = gpt.generate(labels, generator=generator, edit=edit, **options)
    for label in (0, 2):
        sequences, exact = exact_distribution(gpt, torch.tensor([label]), None, **options, edit=(codes, known))
        assert torch.allclose(exact.sum(), torch.tensor(1.0, dtype=torch.float64))
        assert_follows(samples[labels == label], sequences, exact)


def test_coupled_draw_is_distributed_as_q_new_and_agrees_with_the_previous_draw_as_often_as_possible():
    """MC-SJD's coupling step alone: 40,000 draws, each coupled with a previous code drawn from
    q_old. Their distribution is q_new (a chi-square), whatever q_old, even where q_old has no mass;
    they repeat the previous code with probability sum min(q_old, q_new), the most any coupling can
    (1 - the total variation distance); and when q_new = q_old they always do."""
    g = torch.Generator().manual_seed(0)
    q_old, q_new = torch.tensor([0.5, 0.3, 0.2, 0.0, 0.0]), torch.tensor([0.1, 0.3, 0.25, 0.35, 0.0])
    n = 40_000
    previous = L.draw_code(q_old.expand(n, -1), g)[:, 0]
    drawn = L.coupled_draw(previous, q_old.expand(n, -1), q_new.expand(n, -1), g)
    assert_follows(drawn[:, None], torch.arange(5)[:, None], q_new.double())
    agree, expected = (drawn == previous).double().mean().item(), torch.minimum(q_old, q_new).sum().item()
    assert abs(agree - expected) < 4 * math.sqrt(expected * (1 - expected) / n)
    assert torch.equal(L.coupled_draw(previous, q_old.expand(n, -1), q_old.expand(n, -1), g), previous)


@slow
def test_speculative_decoding_is_exact_one_image_at_a_time():
    """Batch 1, text condition with padding, CFG, top-p, a window longer than the image: 2,000
    calls of one image each against the exact distribution."""
    gpt = tiny_enumerable_gpt("t2i")
    cond, cond_mask = tiny_condition(gpt, batch=1)
    cond_mask[0, :2] = 0
    options = dict(cfg_scale=2.0, temperature=1.0, top_k=0, top_p=0.95)
    g = torch.Generator().manual_seed(0)
    samples = torch.cat([L.generate_speculative(gpt, cond, cond_mask, window=6, generator=g, **options)[0]
                         for _ in range(2000)])
    assert_follows(samples, *exact_distribution(gpt, cond, cond_mask, **options))


@pytest.mark.parametrize("model_type", ["c2i", "t2i"])
def test_greedy_speculative_decoding_is_jacobi_decoding(model_type):
    """Temperature 0: every window size gives generate()'s greedy codes, in at most one pass per code."""
    gpt = tiny_gpt(model_type=model_type)
    cond, cond_mask = tiny_condition(gpt)
    for cfg_scale in (1.0, 3.0):
        greedy = gpt.generate(cond, cond_mask, cfg_scale=cfg_scale, temperature=0)
        for window in (1, 4, 16, 40):
            codes, passes = L.generate_speculative(gpt, cond, cond_mask, cfg_scale=cfg_scale, temperature=0, window=window)
            assert torch.equal(codes, greedy) and passes.max() <= gpt.config.block_size
            if window > 1:  # some drafts were right
                assert passes.float().mean() < gpt.config.block_size


def test_speculative_cache_holds_the_committed_prefix_after_rejections():
    """Rejected drafts leave keys and values behind; at the end every committed position's entry
    equals a fresh prefill of the committed codes, in every row of the CFG batch."""
    gpt = tiny_gpt(model_type="t2i")
    cond, cond_mask = tiny_condition(gpt)
    codes, passes = L.generate_speculative(gpt, cond, cond_mask, cfg_scale=2.0, window=3,
                                             generator=torch.Generator().manual_seed(0))
    assert passes.min() > gpt.config.block_size / 4  # drafts were rejected (4 codes per pass at most)
    used = gpt.config.cls_token_num + gpt.config.block_size - 1  # the last code is never fed back
    cached = [(layer.attention.kv_cache.k_cache[:, :, :used].clone(), layer.attention.kv_cache.v_cache[:, :, :used].clone())
              for layer in gpt.layers]
    gpt.free_caches()
    both, both_mask = gpt.with_null_condition(cond, cond_mask)
    gpt.setup_caches(4, used, torch.float32, "cpu")
    h = torch.cat([gpt.embed_condition(both), gpt.tok_embeddings(torch.cat([codes, codes])[:, :-1])], dim=1)
    with torch.no_grad():
        gpt.forward_with_cache(h, torch.arange(used), L.attention_mask(torch.arange(used), both_mask))
    for layer, (k, v) in zip(gpt.layers, cached):
        assert torch.allclose(layer.attention.kv_cache.k_cache, k, atol=1e-5)
        assert torch.allclose(layer.attention.kv_cache.v_cache, v, atol=1e-5)


def test_speculative_decoding_and_the_no_cache_loop_are_raster_orders():
    for gpt in (tiny_gpt("masked"), tiny_gpt("scales")):
        for loop in (L.generate_speculative, L.generate_without_cache):
            with pytest.raises(ValueError, match=f"is for raster order, and this GPT generates in {gpt.config.order}"):
                loop(gpt, torch.tensor([0]))
    with pytest.raises(ValueError, match="needs each token's probability, which a GPT over codes gives; this GPT draws "
                                         "continuous tokens"):
        L.generate_speculative(tiny_gpt("raster", "continuous"), torch.tensor([0]))
    with pytest.raises(ValueError, match="window 0: speculative decoding checks at least one draft per pass"):
        L.generate_speculative(tiny_gpt(), torch.tensor([0]), window=0)


# -----------------------------------------------------------------------------
# 7. Text conditioner: a compact T5 encoder and a SentencePiece tokenizer


@slow
@pytest.mark.parametrize("feed_forward_proj", ["gated-gelu", "relu"])
def test_t5_matches_transformers(feed_forward_proj, tmp_path):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    hf_cfg = transformers.T5Config(vocab_size=99, d_model=32, d_kv=8, d_ff=48, num_layers=3, num_heads=4,
                                   relative_attention_num_buckets=8, relative_attention_max_distance=20,
                                   feed_forward_proj=feed_forward_proj)
    hf = transformers.T5EncoderModel(hf_cfg).eval()
    hf.save_pretrained(tmp_path)
    ours, tokenizer = L.load_t5_encoder(str(tmp_path))
    assert tokenizer is None  # no spiece.model in this directory
    ids = torch.randint(3, 99, (2, 30))
    mask = torch.ones(2, 30, dtype=torch.long)
    mask[0, :12] = 0  # left padding
    ids[0, :12] = 0
    with torch.no_grad():
        expected = hf(input_ids=ids, attention_mask=mask).last_hidden_state
        got = ours(ids, mask)
    assert (got - expected).abs().max() < 1e-4
    # distances beyond max_distance share buckets: positions 0..29 span both regimes
    assert L.relative_position_bucket(torch.tensor([25, 100]), 8, 20).unique().numel() == 1


CAPTIONS = ["a small red circle at the top", "red circle, large, centered", "a blue square on the left",
            "large green triangle at the bottom", "a yellow square, small, on the right"] * 20


def test_sentencepiece_round_trip():
    tokenizer = L.TextTokenizer.train(CAPTIONS, vocab_size=40)
    ids, mask = tokenizer(["a red circle", "a large green triangle at the bottom"], max_length=40)
    assert ids.shape == mask.shape == (2, 40)
    assert tokenizer.decode(ids[0]) == "a red circle"
    n0 = int(mask[0].sum())
    assert mask[0, :40 - n0].sum() == 0 and mask[0, 40 - n0:].all()  # padding on the left
    assert ids[0, -1] == 1 and ids[0, 0] == 0                           # end token last, pad = 0
    reloaded = L.TextTokenizer(tokenizer.model_bytes)                   # a checkpoint keeps the bytes
    assert torch.equal(reloaded(["a red circle"], 40)[0], ids[:1])
    with pytest.warns(UserWarning, match="1 of 2 texts were cut to 4 tokens"):
        short, short_mask = tokenizer(["a large green triangle at the bottom", "red"], max_length=4)
    assert short_mask[0].all() and short[0, -1] == 1


# -----------------------------------------------------------------------------
# 8. Beyond LlamaGen, on the same Llama: MAR's continuous tokens and a diffusion loss per token


def test_cosine_schedule_falls_from_one_to_zero():
    alpha_bar = L.cosine_schedule()
    assert len(alpha_bar) == 1000 and alpha_bar[0] > 0.9999 and alpha_bar[-1] < 1e-8
    assert (alpha_bar[1:] < alpha_bar[:-1]).all()                       # strictly decreasing
    timesteps, respaced, respaced_prev, betas = L.respaced_schedule(alpha_bar, 100)
    assert len(timesteps) == 100 and timesteps[0] == 0 and timesteps[-1] == 999 and timesteps[6] == 61  # as MAR
    assert torch.equal(respaced, alpha_bar[timesteps]) and respaced_prev[0] == 1
    assert ((betas > 0) & (betas <= 1)).all()
    assert torch.allclose(torch.cumprod(1 - betas, 0), respaced)       # the respaced chain has the same alpha_bar


def exact_denoiser(mean, std, alpha_bar):
    """The best noise prediction for tokens ~ N(mean, std^2): E[noise | x_t]."""
    def head(x, t, z):
        a = alpha_bar[t].float()[:, None]
        return (1 - a).sqrt() * (x - a.sqrt() * mean) / (a * std ** 2 + 1 - a)
    return head


def test_sampler_recovers_a_known_gaussian():
    alpha_bar = L.cosine_schedule()
    mean, std = torch.tensor([0.7, -1.2]), torch.tensor([0.5, 1.5])
    z = torch.zeros(20_000, 1)
    draws = L.reverse_diffusion(exact_denoiser(mean, std, alpha_bar), z, 2, alpha_bar, 1.0, 1.0, num_steps=1000,
                                generator=torch.Generator().manual_seed(0))
    assert ((draws.mean(0) - mean).abs() < 4 * std / 20_000 ** 0.5).all()       # within 4 standard errors
    assert ((draws.std(0) / std - 1).abs() < 0.02).all()
    fewer = L.reverse_diffusion(exact_denoiser(mean, std, alpha_bar), z, 2, alpha_bar, 1.0, 1.0, num_steps=100,
                                generator=torch.Generator().manual_seed(0))   # respaced, as MAR samples
    assert ((fewer.mean(0) - mean).abs() < 0.02).all() and ((fewer.std(0) / std - 1).abs() < 0.06).all()
    cooler = L.reverse_diffusion(exact_denoiser(mean, std, alpha_bar), z, 2, alpha_bar, 1.0, temperature=0.5,
                                 num_steps=100, generator=torch.Generator().manual_seed(0))
    assert (cooler.std(0) < 0.8 * fewer.std(0)).all()                           # temperature narrows


@slow
def test_diffusion_head_learns_one_batch_and_samples_it():
    """The Diffusion Loss falls on a fixed batch, and the trained head then draws each token back
    from its own condition z."""
    torch.manual_seed(0)
    head = L.DiffusionHead(L.GPTConfig(token_dim=4, dim=8, diffusion_width=64, diffusion_depth=2, diffusion_repeats=64))
    tokens, z = torch.randn(4, 4) * 0.8, torch.randn(4, 8)
    alpha_bar = L.cosine_schedule()
    opt = torch.optim.Adam(head.parameters(), lr=3e-3)
    losses = []
    for _ in range(300):
        loss = L.diffusion_loss(head, tokens, z, alpha_bar, repeats=64)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert np.mean(losses[-20:]) < 0.1 * np.mean(losses[:20])
    draws = L.reverse_diffusion(head, z.repeat(25, 1), 4, alpha_bar, 1.0, 1.0, num_steps=50,
                                generator=torch.Generator().manual_seed(0))
    errors = (draws - tokens.repeat(25, 1)).norm(dim=1)
    assert errors.median() < 0.1 * torch.cdist(tokens, tokens).mean()


def test_continuous_cfg_follows_its_formula_on_the_noise():
    """With CFG, each reverse step uses uncond + (cond - uncond) * scale of the predicted noise,
    both halves seeing the same x_t: the same draws as an unguided sampler whose head returns
    exactly that."""
    gpt = tiny_gpt("raster", "continuous", seed=3)
    head, alpha_bar = gpt.output, gpt.output.alphas_cumprod
    z_cond, z_null = torch.randn(3, 64), torch.randn(3, 64)
    scale = 3.0
    guided = L.reverse_diffusion(head, torch.cat([z_cond, z_null]), 4, alpha_bar, scale, 1.0, num_steps=10,
                                 generator=torch.Generator().manual_seed(0))

    def combined_head(x, t, z):
        cond, null = head(x, t, z_cond), head(x, t, z_null)
        return null + (cond - null) * scale
    expected = L.reverse_diffusion(combined_head, z_cond, 4, alpha_bar, 1.0, 1.0, num_steps=10,
                                   generator=torch.Generator().manual_seed(0))
    assert torch.allclose(guided, expected, atol=1e-4)  # float error, amplified where alpha_bar is tiny
    unguided = L.reverse_diffusion(head, z_cond, 4, alpha_bar, 1.0, 1.0, num_steps=10,
                                   generator=torch.Generator().manual_seed(0))
    assert not torch.allclose(guided, unguided, atol=1e-3)


def test_continuous_tokens_sample_in_bf16():
    """sample.py --dtype bf16 on a MAR model: the drawn vectors stay float32 for the tokenizer, the
    input layer and the head read them in their own dtype, the schedule stays float64."""
    gpt = tiny_gpt("raster", "continuous").cast("cpu", torch.bfloat16)
    tokens = gpt.generate(torch.tensor([0, 1]), cfg_scale=2.0, diffusion_steps=3)
    assert tokens.shape == (2, 16, 4) and tokens.dtype == torch.float32 and tokens.isfinite().all()
    assert gpt.output.alphas_cumprod.dtype == torch.float64


def test_kl_tokenizer_samples_its_posterior_and_pays_the_kl():
    kl = tiny_tokenizer("continuous", kl_weight=0.5).train()
    images = blob_images()
    recon, z, losses = kl(images)
    mean, logvar = kl.posterior(images)
    assert recon.shape == images.shape and z.shape == mean.shape == (4, 4, 8, 8)
    assert not torch.allclose(z, mean)                                     # a sample, not the mean
    expected = 0.5 * 0.5 * (mean ** 2 + logvar.exp() - 1 - logvar).mean()
    assert torch.allclose(losses["kl_loss"], expected)
    torch.nn.init.zeros_(kl.quant_conv.weight)
    torch.nn.init.zeros_(kl.quant_conv.bias)                               # q(z|x) = N(0, I): no KL to pay
    assert kl(images)[2]["kl_loss"].abs() < 1e-7
    kl.latent_scale.fill_(0.25)
    tokens = kl.encode(images)                                             # (B, h*w, D), scaled
    assert tokens.shape == (4, 64, 4) and tokens.abs().max() == 0
    expected = kl.decoder(kl.post_quant_conv(torch.zeros(4, 4, 8, 8))).clamp(-1, 1)
    assert torch.allclose(kl.decode(tokens), expected)


def test_one_generation_loop_serves_continuous_tokens_too():
    """The raster loop is written once for every kind of token: for MAR's vectors too, the no-cache
    contrast draws what the KV cache draws, and cfg_interval stops guidance after its tokens."""
    gpt = tiny_gpt("raster", "continuous", seed=4)
    cond, _ = tiny_condition(gpt, seed=4)

    def run(generate, **options):
        return generate(cond, cfg_scale=3.0, diffusion_steps=4, generator=torch.Generator().manual_seed(0), **options)
    cached = run(gpt.generate)
    uncached = run(functools.partial(L.generate_without_cache, gpt))
    assert cached.shape == (2, 16, 4) and torch.allclose(uncached, cached, atol=1e-4)
    early = run(gpt.generate, cfg_interval=1)  # guided: tokens 0, 1, 2
    assert torch.equal(early[:, :3], cached[:, :3]) and not torch.allclose(early[:, 3:], cached[:, 3:], atol=1e-3)


# -----------------------------------------------------------------------------
# 9. Masked generation in random order: MaskGIT over codes, MAR proper over continuous tokens


@pytest.mark.parametrize("num_tokens", [16, 64, 256])
def test_mask_schedule_is_a_cosine_that_ends_with_every_token_decided(num_tokens):
    for num_iter in [1, 2, 4, 8, 16, num_tokens]:
        masked, counts = num_tokens, []
        for step in range(num_iter):
            after = L.masked_after_step(step, num_iter, num_tokens, masked)
            counts.append(masked - after)
            assert after < masked or masked == 0                     # every step decides at least one token
            if step < num_iter - 1:
                assert after >= 1 and after <= math.floor(num_tokens * math.cos(math.pi / 2 * (step + 1) / num_iter))
            masked = after
        assert masked == 0 and sum(counts) == num_tokens and min(counts) >= 1
        if num_iter == num_tokens:
            assert counts == [1] * num_tokens                          # one token per step
    if num_tokens == 256:  # 8 steps over a 16 x 16 grid, by hand: 256 cos(pi/16) = 251.1 stay masked, ...
        masked, counts = 256, []
        for step in range(8):
            after = L.masked_after_step(step, 8, 256, masked)
            counts.append(masked - after)
            masked = after
        assert counts == [5, 15, 24, 31, 39, 45, 48, 49]  # few tokens first, most at the end


def test_random_ranks_are_permutations_reproducible_from_the_seed():
    ranks = L.random_ranks(torch.rand(5, 64, generator=torch.Generator().manual_seed(0)))
    assert all(sorted(row.tolist()) == list(range(64)) for row in ranks)
    again = L.random_ranks(torch.rand(5, 64, generator=torch.Generator().manual_seed(0)))
    other = L.random_ranks(torch.rand(5, 64, generator=torch.Generator().manual_seed(1)))
    assert torch.equal(ranks, again) and not torch.equal(ranks, other) and not torch.equal(ranks[0], ranks[1])


@pytest.mark.parametrize("token_kind", ["discrete", "continuous"])
def test_masked_loss_is_taken_on_the_masked_positions_only(token_kind):
    """The positions whose input is the mask vector are exactly those whose readout gets a gradient;
    their number follows the token kind's masking fraction."""
    gpt = tiny_gpt("masked", token_kind).train()
    tokens, labels = tiny_tokens(gpt, batch=64), torch.arange(64) % 5
    captured = {}
    gpt.layers[0].register_forward_pre_hook(lambda module, args: captured.update(h=args[0]))

    def keep_readout(module, args, out):
        out.retain_grad()
        captured["out"] = out
    gpt.output.register_forward_hook(keep_readout) if token_kind == "discrete" else None
    if token_kind == "continuous":  # the diffusion head's readout is z itself: catch the final norm's output
        gpt.norm.register_forward_hook(keep_readout)
    torch.manual_seed(1)
    gpt.loss(tokens, labels).backward()
    masked_input = (captured["h"][:, 1:] == gpt.mask_token + gpt.pos_embedding).all(-1)  # (B, T)
    grad = captured["out"].grad
    grad = grad if token_kind == "discrete" else grad[:, 1:]
    assert torch.equal(grad.abs().sum(-1) > 0, masked_input)
    fraction = masked_input.float().mean(1)                                          # per image
    assert (fraction > 0).all()
    if token_kind == "continuous":  # MAR: a truncated normal on [0.7, 1]
        assert fraction.min() >= 0.7 and fraction.mean() > 0.8
    else:                           # MaskGIT: cos(pi/2 r), r uniform: E = 2 / pi, and some images lightly masked
        assert abs(fraction.mean() - 2 / math.pi) < 0.1 and fraction.min() < 0.3


def test_masked_attention_is_bidirectional_and_raster_attention_is_causal():
    masked_gpt = tiny_gpt("masked")
    tokens, labels = tiny_tokens(masked_gpt), torch.tensor([0, 1])
    changed = tokens.clone()
    changed[:, -1] = (changed[:, -1] + 1) % 32
    nothing = torch.zeros_like(tokens, dtype=torch.bool)
    with torch.no_grad():
        before, after = masked_gpt(tokens, nothing, labels), masked_gpt(changed, nothing, labels)
    assert not torch.allclose(before[:, 0], after[:, 0])          # the first position sees the last
    raster = tiny_gpt()
    with torch.no_grad():
        before, after = raster(tokens, labels), raster(changed, labels)
    assert torch.equal(before[:, :-1], after[:, :-1])              # no earlier position sees it


class Recorder:
    """Wraps a MaskedGPT's forward: what each step fed it (tokens, masked), for the first row of the
    CFG batch."""

    def __init__(self, gpt):
        self.inputs, self.forward = [], gpt.forward

    def __call__(self, tokens, masked, cond, cond_mask=None):
        self.inputs.append((tokens.clone(), masked.clone()))
        return self.forward(tokens, masked, cond, cond_mask)


@pytest.mark.parametrize("token_kind", ["discrete", "continuous"])
@pytest.mark.parametrize("num_iter", [1, 4, 16])
def test_masked_sampling_never_masks_a_known_token_again(token_kind, num_iter):
    """Each step sees every token decided so far unchanged and still known; the steps decide the
    schedule's counts; the last leaves no mask; with as many steps as tokens, one per step."""
    gpt = tiny_gpt("masked", token_kind)
    recorder = gpt.forward = Recorder(gpt)
    steps = []
    tokens = gpt.generate(torch.tensor([0, 3]), cfg_scale=2.0, num_iter=num_iter, steps=steps,
                          generator=torch.Generator().manual_seed(0), **({"diffusion_steps": 3} if token_kind ==
                                                                         "continuous" else {}))
    decided = steps[0]                                                                # (2, 16)
    assert decided.shape == (2, 16) and decided.min() == 0 and decided.max() == num_iter - 1
    masked, expected = 16, []
    for step in range(num_iter):
        after = L.masked_after_step(step, num_iter, 16, masked)
        expected.append(masked - after)
        masked = after
    for row in decided:
        assert torch.bincount(row, minlength=num_iter).tolist() == expected
    assert len(recorder.inputs) == num_iter
    for step, (fed, masked_in) in enumerate(recorder.inputs):
        assert torch.equal(masked_in[:2], decided >= step)                # known: decided at an earlier step
        known = ~masked_in[:2]
        assert torch.equal(fed[:2][known], tokens[known])                  # and with its final value
        assert torch.equal(fed[2:], fed[:2]) and torch.equal(masked_in[2:], masked_in[:2])  # the CFG halves agree


def test_masked_codes_keep_the_most_confident_draws():
    """With no Gumbel noise and greedy draws, each step keeps the codes the model is surest of: the
    argmax at every kept position, and no masked position more confident than a kept one."""
    gpt = tiny_gpt("masked")
    recorder = gpt.forward = Recorder(gpt)
    steps = []
    tokens = gpt.generate(torch.tensor([0, 3]), temperature=0.0, choice_temperature=0.0, num_iter=4, steps=steps)
    for step, (fed, masked_in) in enumerate(recorder.inputs[:-1]):
        with torch.no_grad():
            log_probs = recorder.forward(fed, masked_in, torch.tensor([0, 3])).log_softmax(-1)
        best, best_codes = log_probs.max(-1)                                           # (2, 16)
        now = steps[0] == step
        assert torch.equal(tokens[now], best_codes[now])
        for row in range(2):
            kept, left = best[row][now[row]], best[row][steps[0][row] > step]
            assert kept.min() >= left.max()


def test_masked_codes_choose_by_log_prob_plus_annealed_gumbel(monkeypatch):
    """The confidence that ranks the codes is log p(code) + choice_temperature * (1 - (s + 1) / S) *
    Gumbel noise, here with the noise's exponential draws made known."""
    gpt, cond = tiny_gpt("masked"), torch.tensor([0, 3])
    noise = torch.rand(2, 16, generator=torch.Generator().manual_seed(0))  # the Exp(1) draws, made known
    monkeypatch.setattr(torch.Tensor, "exponential_", lambda self, generator=None: self.copy_(noise))
    scores, ranks = [], L.random_ranks
    monkeypatch.setattr(L, "random_ranks", lambda s: scores.append(s.clone()) or ranks(s))
    gpt.generate(cond, temperature=0.0, choice_temperature=2.0, num_iter=4)
    with torch.no_grad():  # step 0: everything masked, greedy draws
        best = gpt(torch.zeros(2, 16, dtype=torch.long), torch.ones(2, 16, dtype=torch.bool), cond)
        best = best.log_softmax(-1).amax(-1)
    assert torch.allclose(scores[1], best + 2.0 * (1 - 1 / 4) * -noise.log(), atol=1e-5)  # scores[0]: the order


def test_masked_continuous_order_differs_per_row_and_temperature_is_used():
    gpt = tiny_gpt("masked", "continuous")

    def run(temperature):
        steps = []
        tokens = gpt.generate(torch.tensor([1, 2]), num_iter=16, temperature=temperature, diffusion_steps=3,
                              steps=steps, generator=torch.Generator().manual_seed(0))
        return tokens, steps[0]
    tokens, decided = run(1.0)
    assert not torch.equal(decided[0], decided[1])               # each image its own random order
    assert not torch.allclose(run(0.5)[0], tokens)               # temperature reaches the diffusion head


def test_mask_fractions_follow_their_distributions():
    torch.manual_seed(0)
    fraction = L.maskgit_fraction(100_000, "cpu")                # cos(pi/2 r): mean 2/pi, median cos(pi/4)
    assert abs(fraction.mean() - 2 / math.pi) < 0.01 and abs((fraction > math.cos(math.pi / 4)).float().mean() - 0.5) < 0.01
    fraction = L.mar_fraction(100_000, "cpu")
    assert fraction.min() >= 0.7 and fraction.max() <= 1.0


def test_masked_loss_masks_ceil_of_fraction_at_random_per_image(monkeypatch):
    gpt = tiny_gpt("masked")
    seen, forward = [], gpt.forward
    gpt.forward = lambda tokens, masked, cond, cond_mask=None: seen.append(masked) or forward(tokens, masked, cond,
                                                                                             cond_mask)
    for fraction, count in [(0.3, 5), (0.01, 1), (1.0, 16)]:  # ceil(0.3 * 16) = 5, at least 1, at most all
        monkeypatch.setitem(L.MASK_FRACTIONS, "discrete", lambda B, device: torch.full((B,), fraction))
        gpt.loss(tiny_tokens(gpt, batch=8), torch.arange(8) % 5)
        assert (seen[-1].sum(1) == count).all()
    assert len({tuple(row.tolist()) for row in seen[0]}) > 1  # not the same positions in every image


def test_masked_text_padding_is_hidden_from_the_image():
    gpt = tiny_gpt("masked", model_type="t2i")
    caption = torch.randn(2, 6, 12, generator=torch.Generator().manual_seed(0))
    cond_mask = torch.tensor([[0, 0, 0, 1, 1, 1], [0, 1, 1, 1, 1, 1]], dtype=torch.bool)  # left padding
    other = torch.where(cond_mask[..., None], caption, torch.randn(2, 6, 12))          # other padding values
    tokens, masked = tiny_tokens(gpt), torch.rand(2, 16, generator=torch.Generator().manual_seed(1)) < 0.5
    with torch.no_grad():
        assert torch.allclose(gpt(tokens, masked, caption, cond_mask), gpt(tokens, masked, other, cond_mask), atol=1e-5)


@pytest.mark.parametrize("token_kind", ["discrete", "continuous"])
def test_masked_cfg_follows_mars_ramp(token_kind, monkeypatch):
    """The guidance scale at step s is 1 + (cfg_scale - 1) * known_s / N, known_s the tokens known
    after it; for codes guide() is applied to the logits, for continuous tokens to the head's noise."""
    gpt = tiny_gpt("masked", token_kind)
    scales, guide = [], L.guide
    monkeypatch.setattr(L, "guide", lambda out, scale: scales.append(scale) or guide(out, scale))
    gpt.generate(torch.tensor([0, 3]), cfg_scale=3.0, num_iter=4, generator=torch.Generator().manual_seed(0),
                 **({"diffusion_steps": 2} if token_kind == "continuous" else {}))
    masked, expected = 16, []
    for step in range(4):
        masked = L.masked_after_step(step, 4, 16, masked)
        expected.append(1 + 2.0 * (16 - masked) / 16)
    calls_per_step = 1 if token_kind == "discrete" else 2                             # 2 reverse diffusion steps
    assert scales == [scale for scale in expected for _ in range(calls_per_step)]
    assert scales[-1] == 3.0


@pytest.mark.parametrize("token_kind", ["discrete", "continuous"])
def test_masked_sampling_reproduces_from_the_seed(token_kind):
    gpt = tiny_gpt("masked", token_kind)
    options = {"diffusion_steps": 3} if token_kind == "continuous" else {}

    def run(seed):
        steps = []
        tokens = gpt.generate(torch.tensor([1, 2]), cfg_scale=2.0, steps=steps,
                              generator=torch.Generator().manual_seed(seed), **options)
        return tokens, steps[0]
    (tokens, order), (again, order_again), (other, order_other) = run(0), run(0), run(1)
    assert torch.equal(tokens, again) and torch.equal(order, order_again)
    assert not torch.equal(tokens, other) and not torch.equal(order, order_other)


# -----------------------------------------------------------------------------
# 10. Next-scale prediction (VAR): the multi-scale residual quantizer, its tokenizer, and the
# generator that writes an image one scale per forward pass


def test_shared_phis_are_chosen_by_vars_rule_to_the_last_bit():
    """Scale k of S takes the phi whose tick (np.linspace, as VAR) is nearest k / (S - 1), the
    first on a tie: with VAR's 10 scales, k = 2 and k = 7 sit exactly halfway between two ticks."""
    for count in range(1, 9):
        phis = L.SharedPhis(2, count)
        first = 1 / 3 / count if count == 4 else 1 / 2 / count
        ticks = np.linspace(first, 1 - first, count)
        assert phis.ticks == ticks.tolist()
        for num_scales in range(2, 17):
            chosen = [list(phis.qresi_ls).index(phis.at(k, num_scales)) for k in range(num_scales)]
            assert chosen == [int(np.argmin(np.abs(ticks - k / (num_scales - 1)))) for k in range(num_scales)]
    phis = L.SharedPhis(2, 4)
    assert [list(phis.qresi_ls).index(phis.at(k, 10)) for k in range(10)] == [0, 0, 1, 1, 1, 2, 2, 3, 3, 3]


def test_multi_scale_quantizer_matches_official_var():
    """VAR's multi-scale residual quantizer (fixtures/VAR.md): from the official weights, the codes
    of every scale exactly, f_hat after every scale, the teacher-forcing input, the inputs of
    generation step by step, the decoding of the codes, and the training forward with its loss and
    gradient. Every size comes from the file."""
    fx = torch.load(os.path.join(HERE, "fixtures", "var_quant_tiny.pt"), weights_only=True)
    cfg = fx["config"]
    quantizer = L.MultiScaleQuantizer(cfg["vocab_size"], cfg["Cvae"], cfg["patch_nums"], beta=cfg["beta"],
                                      phi_ratio=cfg["quant_resi"], phi_count=cfg["share_quant_resi"])
    quantizer.load_state_dict(fx["state_dict"])
    f = fx["f"]
    codes, f_hats = quantizer.quantize(f)
    assert len(codes) == len(fx["idx_Bl"]) == len(cfg["patch_nums"])
    for ours, official in zip(codes, fx["idx_Bl"]):
        assert torch.equal(ours, official)
    for ours, official in zip(f_hats, fx["fhat_per_scale"]):
        assert (ours - official).abs().max() < 1e-4
    with torch.no_grad():
        assert (quantizer.teacher_forcing_input(fx["idx_Bl"]) - fx["var_input"]).abs().max() < 1e-4
        assert (quantizer.codes_to_f_hat(fx["idx_Bl"]) - fx["fhat_from_embed"]).abs().max() < 1e-4
        f_hat = torch.zeros_like(f)
        for k, official in enumerate(fx["next_inputs"]):
            f_hat, next_input = quantizer.next_input(k, f_hat, fx["idx_Bl"][k])
            assert (next_input - official).abs().max() < 1e-4
    f = f.clone().requires_grad_(True)
    out, codes, loss = quantizer(f)
    assert all(torch.equal(ours, official) for ours, official in zip(codes, fx["idx_Bl"]))
    loss.backward()
    assert (out - fx["train_f_hat"]).abs().max() < 1e-4 and (loss - fx["train_vq_loss"]).abs() < 1e-4
    assert (f.grad - fx["train_grad_f"]).abs().max() < 1e-4
    assert quantizer.embedding.weight.grad.abs().sum() > 0 and quantizer.quant_resi.qresi_ls[0].weight.grad is not None


def test_multiscale_tokens_are_every_scale_coarse_to_fine():
    """VAR's tokenizer: an image is the codes of scales 1, 2, 4 and 8 in a row (85 of them); they
    decode to the encoder's quantized features; the transformer's inputs built from the true codes
    are the encoder's f_hat after each scale, area-downsampled to the next scale; the log gets the
    codebook usage of every scale."""
    vq = tiny_tokenizer("multiscale").eval()
    images = blob_images()                                                  # (4, 3, 16, 16)
    codes = vq.encode(images)
    assert codes.shape == (4, 1 + 4 + 16 + 64) and codes.dtype == torch.long
    with torch.no_grad():
        per_scale, f_hats = vq.quantize.quantize(vq.quant_conv(vq.encoder(images)))
        assert torch.equal(torch.cat(per_scale, dim=1), codes)
        assert torch.allclose(vq.decode(codes), vq.decode_f_hat(f_hats[-1]), atol=1e-5)
        inputs = vq.quantize.teacher_forcing_input(L.split_scales(codes, vq.cfg.scales))  # (4, 4 + 16 + 64, 8)
        start = 0
        for k, s in enumerate(vq.cfg.scales[1:]):
            expected = F.interpolate(f_hats[k], size=(s, s), mode="area").flatten(2).transpose(1, 2)
            assert torch.allclose(inputs[:, start:start + s * s], expected, atol=1e-6)
            start += s * s
    assert vq.decode(codes).shape == (4, 3, 16, 16)
    stats = vq.token_stats(codes)
    assert list(stats) == ["usage", "1x1", "2x2", "4x4", "8x8"]
    assert stats["1x1"] == codes[:, 0].unique().numel() / 64 and stats["8x8"] == codes[:, 21:].unique().numel() / 64
    assert vq.token_config() == dict(token_kind="multiscale", vocab_size=64, token_dim=8, scales=(1, 2, 4, 8),
                                     phi_ratio=0.5, phi_count=4)


def test_multiscale_quantizer_computes_in_float32_under_autocast():
    """Under bf16 autocast (a GPU's training step; here the CPU's) the quantizer finds the codes,
    f_hat, loss and teacher-forcing inputs that it finds without, in float32, as VAR's does."""
    quantizer = tiny_tokenizer("multiscale").quantize
    f = torch.randn(2, 8, 8, 8).bfloat16()                                  # values bf16 holds exactly
    codes, f_hats = quantizer.quantize(f.float())
    f_hat, _, loss = quantizer(f.float())
    inputs = quantizer.teacher_forcing_input(codes)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        codes_autocast, f_hats_autocast = quantizer.quantize(f)
        f_hat_autocast, _, loss_autocast = quantizer(f)
        inputs_autocast = quantizer.teacher_forcing_input(codes)
    assert all(torch.equal(a, b) for a, b in zip(codes, codes_autocast))
    for exact, under_autocast in [(f_hats[-1], f_hats_autocast[-1]), (f_hat, f_hat_autocast), (loss, loss_autocast),
                                  (inputs, inputs_autocast)]:
        assert under_autocast.dtype == torch.float32 and torch.allclose(exact, under_autocast, atol=1e-6)


@pytest.mark.parametrize("model_type", ["c2i", "t2i"])
def test_next_scale_attention_is_block_causal(model_type):
    """A position sees the condition and every position of its own and earlier scales, never one
    of a later scale: in the mask, and through the model (a change at the last input of a scale
    reaches every output of that scale, the first one too, and none of an earlier scale)."""
    gpt = tiny_gpt("scales", model_type=model_type, scales=(1, 2, 3, 4))
    cls = gpt.config.cls_token_num
    scale_of = [-1] * cls + [k for k, s in enumerate((2, 3, 4), start=1) for _ in range(s * s)]  # -1: condition
    S_ = len(scale_of)
    mask = L.attention_mask(gpt.attention_blocks(S_, "cpu"))[0, 0]
    for q in range(S_):
        for k in range(S_):
            if scale_of[q] < 0:
                expected = k <= q                                         # the condition: causal, as in raster order
            else:
                expected = scale_of[k] <= scale_of[q]                     # the condition, own and earlier scales
            assert bool(mask[q, k]) == expected, (q, k)
    cond, cond_mask = tiny_condition(gpt)
    inputs = torch.randn(2, S_ - cls, gpt.config.dim)
    changed = inputs.clone()
    changed[:, 4 + 9 - 1] += 1.0                                            # the last input of the 3x3 scale
    with torch.no_grad():
        before, after = gpt.transformer(cond, inputs, cond_mask), gpt.transformer(cond, changed, cond_mask)
    differs = (before - after).abs().amax(dim=(0, 2)) > 1e-6               # (S,)
    assert not differs[:cls + 4].any()                                      # condition and the 2x2 scale
    assert differs[cls + 4:].all()                                          # all of 3x3 and 4x4


@pytest.mark.parametrize("model_type", ["c2i", "t2i"])
def test_scale_by_scale_sampling_equals_the_full_forward(model_type, monkeypatch):
    """generate's passes, one per scale through the KV cache, feeding f_hat built by
    quantizer.next_input, give the logits of one teacher-forced forward pass (built by
    teacher_forcing_input) on the codes they drew."""
    gpt = tiny_gpt("scales", model_type=model_type)
    cond, cond_mask = tiny_condition(gpt)
    recorder = DrawRecorder(gpt.output)
    monkeypatch.setattr(gpt.output, "draw", recorder)
    steps = []
    codes = gpt.generate(cond, cond_mask, generator=torch.Generator().manual_seed(0), steps=steps)
    assert codes.shape == (2, 1 + 4 + 16) and len(recorder.logits) == 3                  # one pass per scale
    assert torch.equal(steps[0], torch.tensor([0] + [1] * 4 + [2] * 16).expand(2, -1))  # each token's scale
    stepwise = torch.cat([logits.view(2, -1, 32) for logits in recorder.logits], dim=1)
    with torch.no_grad():
        full = gpt(codes, cond, cond_mask)                                            # (2, 21, 32)
    assert (stepwise - full).abs().max() < 1e-4


def test_next_scale_learned_positions_reach_every_cell_of_every_scale_on_both_paths(monkeypatch):
    """VAR's pos_1LC: one learned vector per input cell (scales 2..K), VAR's initialisation; every
    row trains, and the KV-cached passes, with strong positions, give the full forward's logits."""
    gpt = tiny_gpt("scales", std=None)
    assert gpt.pos_embedding.shape == (4 + 16, gpt.config.dim)
    assert abs(gpt.pos_embedding.std().item() - (1 / gpt.config.dim / 3) ** 0.5) < 0.01
    with torch.no_grad():
        for p in gpt.parameters():
            torch.nn.init.normal_(p, std=0.3)
        gpt.pos_embedding.normal_(std=2.0)
    cond, _ = tiny_condition(gpt)
    recorder = DrawRecorder(gpt.output)
    monkeypatch.setattr(gpt.output, "draw", recorder)
    codes = gpt.generate(cond, generator=torch.Generator().manual_seed(0))
    stepwise = torch.cat([logits.view(2, -1, 32) for logits in recorder.logits], dim=1)
    assert (stepwise - gpt(codes, cond).detach()).abs().max() < 1e-4
    gpt.loss(codes, cond).backward()
    assert (gpt.pos_embedding.grad.abs().sum(dim=1) > 0).all()             # every cell of scales 2 and 4


def test_next_scale_samples_with_vars_top_k_and_top_p_unless_told():
    """VAR's defaults, declared by ScaleGPT: top-k 900 of 4096 codes as a share of the codebook
    (7 of these 32) and top-p 0.96; every drawn code is then among the 7 likeliest, and a given
    option overrides them."""
    gpt = tiny_gpt("scales")
    settings = gpt.sampling_settings({})
    assert (settings.top_k, settings.top_p) == (7, 0.96) and gpt.sampling_settings({"top_k": 0}).top_k == 0
    assert L.GPT.sampling_defaults(gpt.config)["top_k"] == 0
    cond, _ = tiny_condition(gpt, batch=8)

    def ranks(**options):  # each drawn code's rank in its teacher-forced logits
        codes = gpt.generate(cond, generator=torch.Generator().manual_seed(0), **options)
        logits = gpt(codes, cond).detach()
        return (logits > logits.gather(-1, codes[..., None])).sum(dim=-1)
    assert ranks().max() < 7 and ranks(top_k=0, top_p=1.0).max() >= 7


@pytest.mark.parametrize("cfg_schedule", ["ramp", "constant"])
def test_next_scale_cfg_follows_its_formula(cfg_schedule, monkeypatch):
    """At scale k of K the guided logits are (1 + t) cond - t uncond, t = (cfg_scale - 1) k / (K - 1)
    (VAR's ramp, k from 0), or t = cfg_scale - 1 at every scale (constant); the conditional and
    null halves of the batch go on with the same codes."""
    assert [L.guidance_at_scale(k, 3, 3.0, "ramp") for k in range(3)] == [1.0, 2.0, 3.0]
    assert [L.guidance_at_scale(k, 3, 3.0, "constant") for k in range(3)] == [3.0] * 3
    gpt = tiny_gpt("scales")
    cond = torch.tensor([1, 3])
    recorder = DrawRecorder(gpt.output)
    monkeypatch.setattr(gpt.output, "draw", recorder)
    codes = gpt.generate(cond, cfg_scale=3.0, cfg_schedule=cfg_schedule, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        both, _ = gpt.with_null_condition(cond, None)
        conditional, unconditional = gpt(torch.cat([codes, codes]), both).chunk(2)          # (2, 21, 32) each
    start = 0
    for k, s in enumerate((1, 2, 4)):
        t = 2.0 * k / 2 if cfg_schedule == "ramp" else 2.0
        expected = (1 + t) * conditional[:, start:start + s * s] - t * unconditional[:, start:start + s * s]
        assert (recorder.logits[k].view(2, s * s, 32) - expected).abs().max() < 1e-4
        start += s * s


def test_next_scale_has_no_rope_as_var():
    """No rotation at any image position (cos 1, sin 0): where a cell is comes from pos_embedding
    alone; the condition's positions keep the (0, 0) of every generator."""
    gpt = tiny_gpt("scales")
    head_dim = gpt.config.dim // gpt.config.n_head
    assert gpt.rope.shape == (1 + 4 + 16, head_dim // 2, 2) and (gpt.rope[0] == 0).all()
    assert (gpt.rope[1:, :, 0] == 1).all() and (gpt.rope[1:, :, 1] == 0).all()


def test_next_scale_gpt_builds_its_inputs_with_the_tokenizers_quantizer():
    """bind_tokenizer copies the tokenizer's codebook and phis; they stay frozen (no gradient, out
    of the optimizer) and float32 when the GPT is cast to bf16, which still generates."""
    vq = tiny_tokenizer("multiscale")
    codes = vq.encode(blob_images())
    cfg = L.GPTConfig(**L.GPT_PRESETS["GPT-tiny"], order="scales", **vq.token_config(), block_size=85, num_classes=4)
    gpt = L.make_gpt(cfg)
    gpt.bind_tokenizer(vq)
    per_scale = L.split_scales(codes, vq.cfg.scales)
    assert torch.equal(gpt.quantizer.teacher_forcing_input(per_scale), vq.quantize.teacher_forcing_input(per_scale))
    gpt.loss(codes, torch.arange(4)).backward()
    assert all(p.grad is None and not p.requires_grad for p in gpt.quantizer.parameters())
    assert all(p.grad is not None for p in (gpt.tok_embeddings.weight, gpt.scale_embedding.weight, gpt.pos_embedding))
    gpt.cast("cpu", torch.bfloat16)
    assert gpt.quantizer.embedding.weight.dtype == torch.float32 and gpt.tok_embeddings.weight.dtype == torch.bfloat16
    assert gpt.generate(torch.tensor([0, 1]), cfg_scale=2.0).shape == (2, 85)


def test_next_scale_sampling_reproduces_from_the_seed_and_follows_the_temperature():
    gpt = tiny_gpt("scales", model_type="t2i")
    cond, cond_mask = tiny_condition(gpt)

    def run(seed):
        return gpt.generate(cond, cond_mask, cfg_scale=2.0, generator=torch.Generator().manual_seed(seed))
    assert torch.equal(run(0), run(0)) and not torch.equal(run(0), run(1))
    greedy = gpt.generate(cond, cond_mask, temperature=0.0)            # temperature 0: every code the argmax
    with torch.no_grad():
        assert torch.equal(gpt(greedy, cond, cond_mask).argmax(dim=-1), greedy)


def test_next_scale_gpt_refuses_what_it_cannot_generate():
    with pytest.raises(ValueError, match=r"scales \(2, 4\): next-scale prediction starts at 1x1"):
        tiny_gpt("scales", scales=(2, 4))
    for order, kind in [("scales", "discrete"), ("raster", "multiscale"), ("masked", "multiscale")]:
        with pytest.raises(ValueError, match=f"{order} order generates .* tokens, not {kind} ones"):
            tiny_gpt(order, kind)


def test_multiscale_decode_known_sums_the_scales_so_far():
    """A picture of a multi-scale generation under way decodes the f_hat of the scales decided so
    far (the image sharpening), not blank cells; all known is decode()."""
    vq = tiny_tokenizer("multiscale").eval()
    codes = vq.encode(blob_images())
    per_scale = L.split_scales(codes, vq.cfg.scales)
    known = torch.zeros_like(codes, dtype=torch.bool)
    known[:, :1 + 4] = True                                                 # scales 1x1 and 2x2
    with torch.no_grad():
        expected = vq.decode_f_hat(vq.quantize.scale_contribution(0, per_scale[0])
                                   + vq.quantize.scale_contribution(1, per_scale[1]))
        assert torch.allclose(vq.decode_known(codes, known), expected, atol=1e-6)
        assert torch.allclose(vq.decode_known(codes, torch.ones_like(known)), vq.decode(codes), atol=1e-6)


def test_next_scale_edits_know_a_coarse_cell_when_more_than_half_of_it_is_known():
    """VAR's zero-shot editing rule on every scale of 1, 2, 4, 8: keeping the left half of the 8 x 8
    grid knows no 1x1 cell (half is not more than half), the left column at 2x2 and 4x4, the left
    half at 8x8; keeping all but the top-right 2 x 2 cells knows 3 of the 2x2 scale's 4 cells."""
    vq = tiny_tokenizer("multiscale")
    kept = torch.zeros(1, 16, 16, dtype=torch.bool)
    kept[..., :8] = True                                                    # the left half of the pixels
    scales = [k[0].view(s, s) for k, s in zip(L.split_scales(vq.known_tokens(kept), vq.cfg.scales), vq.cfg.scales)]
    assert not scales[0].any()
    for known, s in zip(scales[1:], vq.cfg.scales[1:]):
        assert known[:, :s // 2].all() and not known[:, s // 2:].any()
    kept = torch.ones(1, 16, 16, dtype=torch.bool)
    kept[:, :4, 12:] = False                                                # the top-right 2 x 2 cells
    scales = [k[0].view(s, s) for k, s in zip(L.split_scales(vq.known_tokens(kept), vq.cfg.scales), vq.cfg.scales)]
    assert scales[0].all() and scales[1].sum() == 4 and scales[2].sum() == 15 and scales[3].sum() == 60


# -----------------------------------------------------------------------------
# 11. Early fusion: words and image codes in one vocabulary, one Llama that draws and captions


def tiny_fused(seed=0, std=0.3, grid=(4, 4), **overrides):
    """A GPT-tiny over one vocabulary: 20 text ids, the specials, a height and a width, 32 codes of a
    4 x 4 grid; captions of 6 ids. std as tiny_gpt's."""
    torch.manual_seed(seed)
    cfg = L.GPTConfig(**{**L.GPT_PRESETS["GPT-tiny"], **dict(
        order="fused", model_type="vocab", vocab_size=32, text_vocab_size=20, grid_shapes=(grid,),
        block_size=grid[0] * grid[1], cls_token_num=6, token_dropout_p=0.0, resid_dropout_p=0.0, ffn_dropout_p=0.0,
        class_dropout_prob=0.0), **overrides})
    gpt = L.make_gpt(cfg)
    for p in gpt.parameters() if std else []:
        torch.nn.init.normal_(p, std=std)
    return gpt.eval()


def tiny_captions(batch=3, length=6, seed=0):  # TextTokenizer's layout: words 3..19, eot 1 last, left padding 0
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 20, (batch, length), generator=g)
    ids[:, -1] = 1
    mask = torch.ones(batch, length, dtype=torch.long)
    for row in range(batch):  # 4, 3, 2, .. words
        pad = min(row + 1, length - 2)
        ids[row, :pad], mask[row, :pad] = 0, 0
    return ids, mask


def test_fused_vocabulary_keeps_words_specials_sizes_and_codes_apart():
    """The one vocabulary: every block its own ids, together exactly the embedding table; an image
    written as Lumina-mGPT does reads back to its grid, eol ending each row and eoi the image; a
    caption written before an image (right-aligned) or after one (left-aligned) keeps its words."""
    gpt = tiny_fused(grid=(2, 3), vocab_size=5, block_size=6)
    v = gpt.vocab
    blocks = [set(range(v.text_size)), {v.bot, v.boi, v.eoi, v.eol}, set(v.height.values()), set(v.width.values()),
              set(range(v.code_start, v.code_start + 5))]
    assert sum(map(len, blocks)) == len(set().union(*blocks)) == v.size == gpt.tok_embeddings.num_embeddings
    assert v.size == gpt.output.out_features and v.height[2] != v.width[3]
    codes = torch.tensor([[0, 1, 2, 3, 4, 0], [4, 4, 3, 2, 1, 0]])
    image = gpt.image_tokens(codes, (2, 3))                                 # (2, 4 + 2 * 4)
    assert image[:, :3].tolist() == [[v.boi, v.height[2], v.width[3]]] * 2 and (image[:, -1] == v.eoi).all()
    lines = image[:, 3:-1].view(2, 2, 4)                                    # two rows of 3 codes and an eol
    assert (lines[..., 3] == v.eol).all() and torch.equal(lines[..., :3].flatten(1) - v.code_start, codes)
    ids, mask = tiny_captions(length=6)
    caption, caption_mask = gpt.caption_tokens(ids, mask)                   # (3, 7): [pad .., bot, words, eot]
    first = caption_mask.long().argmax(1)
    assert (caption[torch.arange(3), first] == v.bot).all() and torch.equal(caption[:, 1:][mask.bool()], ids[mask.bool()])
    after, after_mask = L.left_aligned(caption, caption_mask)               # [bot, words, eot, pad ..]
    assert (after[:, 0] == v.bot).all() and torch.equal(after[after_mask], caption[caption_mask])
    assert (after[~after_mask] == v.pad).all() and torch.equal(after_mask.sum(1), caption_mask.sum(1))


def fused_full_logits(gpt, prompt, prompt_mask, generated, image_first, grid=(4, 4)):
    """The logits a full forward pass gives over [prompt, generated] (B, P + n) at every position,
    a sequence of the layout of a drawing (caption first) or of a caption (image first)."""
    mask = torch.cat([prompt_mask, torch.ones_like(generated, dtype=torch.bool)], 1)
    return gpt(torch.cat([prompt, generated], 1), mask, gpt.layout_rope(grid, image_first))


@pytest.mark.parametrize("rope_2d", [True, False])
def test_fused_kv_cache_gives_the_full_forward_over_mixed_sequences(rope_2d):
    """Both directions, fed a prompt at once then one id per step through the KV cache, give the
    logits of one full forward pass: a caption (left-padded, of three lengths) then an image, and
    an image then a caption (right-padded); with 2D positions and with 1D."""
    gpt = tiny_fused(seed=7, rope_2d=rope_2d)
    ids, mask = tiny_captions()
    codes = torch.randint(0, 32, (3, 16), generator=torch.Generator().manual_seed(7))
    caption, caption_mask = gpt.caption_tokens(ids, mask)
    image = gpt.image_tokens(codes, (4, 4))
    after, after_mask = L.left_aligned(caption, caption_mask)
    ones = torch.ones_like(image, dtype=torch.bool)
    for sequence, seq_mask, prompt, image_first in [
            (torch.cat([caption, image], 1), torch.cat([caption_mask, ones], 1), 10, False),
            (torch.cat([image, after], 1), torch.cat([ones, after_mask], 1), 21, True)]:
        S_, rope = sequence.shape[1], gpt.layout_rope((4, 4), image_first)
        with torch.no_grad():
            full = gpt(sequence, seq_mask, rope)                            # (3, S, vocab)
            gpt.setup_caches(3, S_, torch.float32, "cpu")
            visible = L.attention_mask(torch.arange(S_), seq_mask)
            stepwise = [gpt.feed(sequence[:, :prompt], torch.arange(prompt), visible, rope)]
            stepwise += [gpt.feed(sequence[:, t:t + 1], torch.tensor([t]), visible, rope) for t in range(prompt, S_)]
        assert (torch.stack(stepwise, 1) - full[:, prompt - 1:]).abs().max() < 1e-4


def rotated_dot(rope, i, j, seed=0):
    """q . k after RoPE, q at position i and k at j of a table rope (S, hs/2, 2): a function of
    their positions' difference alone, which is what attention sees of positions."""
    q, k = torch.randn(2, 1, 1, 1, 2 * rope.shape[1], generator=torch.Generator().manual_seed(seed))
    return (L.apply_rope(q, rope[i:i + 1]) * L.apply_rope(k, rope[j:j + 1])).sum().item()


def test_fused_2d_positions_put_the_code_below_at_the_same_offset_whatever_the_width():
    """layout_rope: with 2D coordinates a code and the one below it are as far apart in a grid of
    3 columns as in one of 5 (so what is learned on one size holds on another), words are 1D RoPE
    (a word and the next as any two neighbours of the sequence), and the words after an image go
    on from it; with 1D positions the code below is farther in the wider grid."""
    gpt = tiny_fused(grid=(2, 3), grid_shapes=((2, 3), (2, 5)))
    text = gpt.config.cls_token_num + 1

    def code(grid, row, col, image_first=False):  # a code's index in the sequence of its layout
        return (0 if image_first else text) + 3 + row * (grid[1] + 1) + col
    for image_first in (False, True):
        for row, col in ((1, 1), (0, 2)):  # below (1, 0) and to the right (0, 1) of the code at (0, 1)
            near = [rotated_dot(gpt.layout_rope(grid, image_first), code(grid, row, col, image_first),
                                code(grid, 0, 1, image_first)) for grid in ((2, 3), (2, 5))]
            assert near[0] == pytest.approx(near[1], abs=1e-5)
    words = gpt.layout_rope((2, 3), image_first=False)
    after = gpt.layout_rope((2, 3), image_first=True)                       # [image, bot, words ..]
    start = 4 + 2 * 4                                                       # bot's index
    neighbours = [rotated_dot(words, 1, 0), rotated_dot(words, 4, 3), rotated_dot(after, start + 1, start)]
    assert neighbours == pytest.approx([neighbours[0]] * 3, abs=1e-5)
    gpt_1d = tiny_fused(grid=(2, 3), grid_shapes=((2, 3), (2, 5)), rope_2d=False)
    below = [rotated_dot(gpt_1d.layout_rope(grid, False), code(grid, 1, 1), code(grid, 0, 1)) for grid in ((2, 3), (2, 5))]
    assert below[0] != pytest.approx(below[1], abs=1e-3)


def test_fused_drawing_is_the_full_forward_guided_by_cfg_formula():
    """A drawing through the KV cache, greedy and guided, gives at every code the argmax over codes
    of uncond + (cond - uncond) * scale, where cond and uncond are one full forward pass over the
    sequence the sampler wrote ([bot, caption, eot, boi, height, width, rows with eol]) and over
    the same with the caption dropped, for captions of different lengths in one batch: the sequence
    layout, the forced eol, the cache and CFG in one check."""
    gpt = tiny_fused()
    v, scale = gpt.vocab, 3.0
    ids, mask = tiny_captions()
    codes = gpt.generate(ids, mask, cfg_scale=scale, temperature=0)        # (3, 16)
    image = gpt.image_tokens(codes, (4, 4))[:, :-2]                         # what was fed after the prompt
    caption, caption_mask = gpt.caption_tokens(ids, mask)
    null, null_mask = gpt.null_caption(caption, caption_mask)
    logits = []
    for words, words_mask in ((caption, caption_mask), (null, null_mask)):
        prompt, prompt_mask = torch.cat([words, image[:, :3]], 1), torch.cat([words_mask, torch.ones(3, 3).bool()], 1)
        with torch.no_grad():
            logits.append(fused_full_logits(gpt, prompt, prompt_mask, image[:, 3:], image_first=False))
    guided = logits[1] + (logits[0] - logits[1]) * scale                    # (3, S, vocab)
    P = caption.shape[1] + 3
    code_positions = P - 1 + torch.tensor([r * 5 + c for r in range(4) for c in range(4)])  # each predicts a code
    expected = guided[:, code_positions, v.code_start:].argmax(-1)
    assert torch.equal(codes, expected)


def test_fused_caption_is_the_full_forward_over_words():
    """A greedy caption through the KV cache is, word by word, the argmax over the text ids (pad
    excluded) of one full forward pass over [boi, height, width, rows, eoi, bot, words so far];
    after eot only padding follows."""
    gpt = tiny_fused(seed=1)
    v = gpt.vocab
    codes = torch.randint(0, 32, (3, 16), generator=torch.Generator().manual_seed(1))
    words = gpt.caption(codes)                                              # (3, n)
    prompt = torch.cat([gpt.image_tokens(codes, (4, 4)), torch.full((3, 1), v.bot)], 1)
    with torch.no_grad():
        logits = fused_full_logits(gpt, prompt, torch.ones_like(prompt, dtype=torch.bool), words[:, :-1], image_first=True)
    text = logits[:, prompt.shape[1] - 1:, :v.text_size].clone()
    text[..., v.pad] = float("-inf")
    expected = text.argmax(-1)                                              # (3, n)
    for row in range(3):
        ended = (words[row] == v.eot).nonzero()
        n = int(ended[0]) + 1 if len(ended) else words.shape[1]
        assert torch.equal(words[row, :n], expected[row, :n]) and (words[row, n:] == v.pad).all()


@contextlib.contextmanager
def logits_pushed_up(gpt, ids):
    """While the block runs, the readout gives the logits of `ids` (a list of vocabulary ids) 1e4,
    far ahead of every other."""
    readout = gpt.output.readout

    def pushed(h):
        logits = readout(h).clone()
        logits[..., ids] = 1e4
        return logits
    gpt.output.readout = pushed
    try:
        yield
    finally:
        gpt.output.readout = readout


def test_fused_sampler_draws_codes_in_images_and_words_in_captions_whatever_the_logits():
    """Lumina-mGPT's logits processor: inside an image only codes can be drawn, in a caption only
    words. Pushing every other id's logit to 1e4 (text, specials, sizes, padding) changes no draw."""
    gpt = tiny_fused(seed=2)
    v = gpt.vocab
    ids, mask = tiny_captions()
    codes = torch.randint(0, 32, (3, 16), generator=torch.Generator().manual_seed(2))

    def run():
        g = torch.Generator().manual_seed(0)
        return (gpt.generate(ids, mask, cfg_scale=2.0, top_k=8, generator=g),
                gpt.caption(codes, generator=g, temperature=1.0))
    drawn, caption = run()
    with logits_pushed_up(gpt, list(range(v.text_size, v.code_start))):  # words stay, specials and sizes shout
        assert torch.equal(run()[0], drawn)
    with logits_pushed_up(gpt, [v.pad] + list(range(v.text_size, v.size))):  # padding, specials, sizes, codes
        assert torch.equal(run()[1], caption)
    assert drawn.min() >= 0 and drawn.max() < 32 and caption.max() < v.text_size


def test_fused_editing_keeps_the_known_codes():
    gpt = tiny_fused(seed=3)
    ids, mask = tiny_captions()
    image = torch.randint(0, 32, (3, 16), generator=torch.Generator().manual_seed(3))
    known = torch.zeros(3, 16, dtype=torch.bool)
    known[:, :8] = True                                                     # the top half kept
    edited = gpt.generate(ids, mask, cfg_scale=2.0, generator=torch.Generator().manual_seed(0), edit=(image, known))
    assert torch.equal(edited[known], image[known]) and not torch.equal(edited[~known], image[~known])


def test_qk_norm_is_a_switch_of_the_shared_attention():
    """Chameleon's QK-norm adds a LayerNorm on queries and one on keys per layer, and only when
    asked: off, every generator's weights are the official layout (the parity tests above check
    their outputs), so no checkpoint changes."""
    plain, normed = tiny_gpt(), tiny_gpt(qk_norm=True)
    added = set(normed.state_dict()) - set(plain.state_dict())
    assert added == {f"layers.{i}.attention.{n}_norm.{w}" for i in range(2) for n in "qk" for w in ("weight", "bias")}
    tokens, labels = tiny_tokens(plain), torch.tensor([0, 1])
    normed.load_state_dict({**plain.state_dict(), **{k: normed.state_dict()[k] for k in added}})
    with torch.no_grad():
        assert not torch.allclose(plain(tokens, labels), normed(tokens, labels))
    scale = 10.0  # a LayerNorm forgets the size of q and k: attention logits bounded whatever the weights
    for layer in normed.layers:
        layer.attention.wqkv.weight.data[:2 * 64] *= scale
    with torch.no_grad():
        once = normed(tokens, labels)
        for layer in normed.layers:
            layer.attention.wqkv.weight.data[:2 * 64] *= scale
        assert torch.allclose(normed(tokens, labels), once, atol=1e-4)


def test_fused_loss_adds_z_loss_as_its_formula():
    """loss = cross-entropy + z_loss * mean(log Z)^2 over the counted positions: the z term is linear
    in its weight, and positive."""
    gpt = tiny_fused(seed=4)
    ids, mask = tiny_captions()
    codes = torch.randint(0, 32, (3, 16), generator=torch.Generator().manual_seed(4))

    def loss(weight):
        gpt.config.z_loss = weight
        torch.manual_seed(0)  # the same directions
        return gpt.loss(codes, ids, mask).item()
    base, one, three = loss(0.0), loss(1e-2), loss(3e-2)
    assert one > base and abs((three - base) - 3 * (one - base)) < 1e-4


@pytest.mark.parametrize("rope_2d", [True, False])
def test_fused_loss_leaves_out_the_padding_every_caption_has(rope_2d):
    """The loss trims the caption columns that are padding in every row: the same captions padded
    to 9 ids rather than 6 give the same loss (the padding is hidden, and RoPE sees only distances),
    in both directions, with 2D positions and with 1D."""
    gpt = tiny_fused(seed=4, rope_2d=rope_2d)
    ids, mask = tiny_captions()
    codes = torch.randint(0, 32, (3, 16), generator=torch.Generator().manual_seed(4))
    longer = torch.cat([torch.zeros(3, 3, dtype=ids.dtype), ids], 1), torch.cat([torch.zeros(3, 3, dtype=mask.dtype), mask], 1)
    losses = []
    for caption, caption_mask in ((ids, mask), longer):
        torch.manual_seed(0)  # the same directions
        losses.append(gpt.loss(codes, caption, caption_mask).item())
    assert losses[0] == pytest.approx(losses[1], abs=1e-5)


def test_fused_captions_only_the_grid_it_reads():
    """Captions are read at the first grid, the training square (sample.py crops an image to it),
    and trained there only: a caption of another size the model draws gets one sentence."""
    gpt = tiny_fused(grid=(2, 3), vocab_size=5, block_size=6, grid_shapes=((2, 3), (3, 2)))
    assert gpt.caption(torch.randint(0, 5, (2, 2, 3))).shape[0] == 2
    with pytest.raises(ValueError, match="captions images of 2 x 3 codes, the size it was trained to read, not 3 x 2"):
        gpt.caption(torch.randint(0, 5, (2, 3, 2)))


def test_fused_loss_on_words_leaves_the_image_rows_untrained():
    """fused_loss "text" (a model that captions but cannot draw): the image codes' logits are masked
    out of the loss, so their rows of the output layer get no gradient; every other part learns."""
    gpt = tiny_fused(seed=5, fused_loss="text").train()
    ids, mask = tiny_captions()
    gpt.loss(torch.randint(0, 32, (3, 16), generator=torch.Generator().manual_seed(5)), ids, mask).backward()
    grad = gpt.output.weight.grad
    assert (grad[gpt.vocab.code_start:] == 0).all() and grad[:gpt.vocab.text_size].abs().sum() > 0
    assert gpt.tok_embeddings.weight.grad[gpt.vocab.code_start:].abs().sum() > 0  # it reads the codes


def test_anole_trains_only_the_image_rows_of_the_output_layer():
    """ANOLE's stage (train.py --anole): after a step of the image loss, the output layer's rows of
    the image codes have moved and every other parameter is bit-identical."""
    gpt = tiny_fused(seed=6, fused_loss="image").train()
    before = {name: p.detach().clone() for name, p in gpt.named_parameters()}
    trained = T.train_image_rows_only(gpt)
    assert trained == 32 * 64 and [name for name, p in gpt.named_parameters() if p.requires_grad] == ["output.weight"]
    ids, mask = tiny_captions()
    codes = torch.randint(0, 32, (3, 16), generator=torch.Generator().manual_seed(6))
    train_steps(gpt, lambda: gpt.loss(codes, ids, mask), 2, 1e-2)
    for name, p in gpt.named_parameters():
        if name != "output.weight":
            assert torch.equal(p, before[name]), name
    rows = gpt.vocab.code_start
    assert torch.equal(gpt.output.weight[:rows], before["output.weight"][:rows])
    assert (gpt.output.weight[rows:] != before["output.weight"][rows:]).all(dim=1).any()
    torch.manual_seed(1)
    loss = gpt.loss(codes, ids, mask).item()
    with logits_pushed_up(gpt, list(range(rows))):  # the words and specials, which generate never draws in an image
        torch.manual_seed(1)
        assert gpt.loss(codes, ids, mask).item() == pytest.approx(loss)  # the codes' cross-entropy over codes alone


@slow
def test_fused_model_overfits_both_directions():
    """Four captioned images trained with the fused loss (both directions): the loss falls from
    about ln(vocabulary), then greedy sampling draws each caption's image back and writes each
    image's caption back."""
    gpt = tiny_fused(std=None).train()
    ids, mask = tiny_captions(batch=4)
    codes = torch.randint(0, 32, (4, 16), generator=torch.Generator().manual_seed(5))
    torch.manual_seed(0)
    losses = train_steps(gpt, lambda: gpt.loss(codes, ids, mask), 300, 3e-3)
    assert losses[0] > 3.5 and np.mean(losses[-10:]) < np.mean(losses[:10]) / 10
    gpt.eval()
    assert (gpt.generate(ids, mask, temperature=0) == codes).float().mean() > 0.95
    captions = gpt.caption(codes)
    words = L.left_aligned(ids, mask)[0][:, :captions.shape[1]]
    assert torch.equal(captions, words)


# -----------------------------------------------------------------------------
# Appendix A. Released weights: the official LlamaGen checkpoints (fixtures/README.md says what
# each tensor is) and Hugging Face's T5 (section 7)


def test_vq_matches_official(fx):
    v = fx["vq"]
    vq = L.load_official_vq(v["state_dict"])
    assert vq.cfg.ch == 32 and vq.cfg.ch_mult == (1, 2) and vq.cfg.codebook_size == 64
    assert torch.equal(vq.encode_indices(v["images"]), v["indices"])
    assert (vq.decode_indices(v["indices"]) - v["recon"]).abs().max() < 1e-3
    assert (vq.decode_indices(v["codes"]) - v["decoded"]).abs().max() < 1e-3


@pytest.mark.parametrize("name", ["gpt_c2i", "gpt_t2i"])
def test_gpt_matches_official(fx, name):
    g = fx[name]
    gpt = L.load_official_gpt(g["state_dict"], block_size=64)
    assert gpt.config.model_type == g["config"]["model_type"]
    assert gpt.config.cls_token_num == g["config"]["cls_token_num"]
    mask = g["text_mask"]
    logits = gpt(g["tokens"], g["cond"], mask)
    assert (logits - g["logits_head"]).abs().max() < 1e-3
    assert (logits.logsumexp(-1) - g["logits_lse"]).abs().max() < 1e-3
    assert torch.equal(logits.argmax(-1), g["logits_argmax"])
    greedy = gpt.generate(g["cond"], mask, cfg_scale=1.0, top_k=1)
    assert torch.equal(greedy, g["greedy"].long())
    greedy_cfg = gpt.generate(g["cond"], mask, cfg_scale=4.0, top_k=1)
    assert torch.equal(greedy_cfg, g["greedy_cfg4"].long())
    # the teaching contrast without a KV cache gives the same tokens
    assert torch.equal(L.generate_without_cache(gpt, g["cond"], mask, cfg_scale=4.0, top_k=1), greedy_cfg)


def test_official_checkpoint_files(fx, tmp_path):
    """Official files wrap the weights ("model") next to the training script's Namespace."""
    path = tmp_path / "c2i.pt"
    torch.save({"model": fx["gpt_c2i"]["state_dict"], "args": argparse.Namespace(gpt_model="GPT-B")}, path)
    gpt = L.load_official_gpt(str(path), block_size=64)
    assert gpt.config.num_classes == 10 and not gpt.training
    with pytest.raises(ValueError, match="not a LlamaGen VQ"):
        L.load_official_vq(str(path))
    with pytest.raises(ValueError, match="not a LlamaGen GPT"):
        L.load_official_gpt(fx["vq"]["state_dict"], block_size=64)
    odd_width = L.GPT(L.GPTConfig(dim=48, n_layer=1, n_head=4, vocab_size=16, block_size=16)).state_dict()
    with pytest.raises(ValueError, match="width 48 that matches none of the LlamaGen presets"):
        L.load_official_gpt(odd_width, block_size=16)


# -----------------------------------------------------------------------------
# Appendix B. Our checkpoints: plain dicts, with a format version


@slow
def test_fuzzed_checkpoints_get_clear_errors(trained, tmp_path):
    """Random bytes and truncations of a real checkpoint are refused with a sentence that names the
    file. Flipped bytes too, or, when they land inside tensor data (torch keeps no checksum of
    it), the file loads; never another exception."""
    good = (trained[1] / "tokenizer.pt").read_bytes()
    rng = random.Random(0)
    path = str(tmp_path / "tokenizer.pt")
    for trial in range(30):
        kind = trial % 3
        if kind == 0:
            data = bytes(rng.getrandbits(8) for _ in range(rng.randint(0, 2000)))
        elif kind == 1:
            data = good[:rng.randint(0, len(good) - 1)]
        else:
            data = bytearray(good)
            for _ in range(8):
                data[rng.randrange(len(data))] ^= 0xFF
            data = bytes(data)
        with open(path, "wb") as f:
            f.write(data)
        try:
            L.load_tokenizer(path)
        except ValueError as error:
            assert str(error).startswith(path) and str(error).endswith("."), error
        else:
            assert kind == 2, f"trial {trial}: {len(data)} bytes of garbage loaded as a tokenizer"


# -----------------------------------------------------------------------------
# train.py


def test_shapes_dataset_is_deterministic_and_labelled():
    a, b = T.ShapesDataset(50, 32, seed=3), T.ShapesDataset(50, 32, seed=3)
    assert all(torch.equal(a[i]["image"], b[i]["image"]) and a[i]["caption"] == b[i]["caption"] for i in range(50))
    assert not torch.equal(a[0]["image"], T.ShapesDataset(50, 32, seed=4)[0]["image"])
    for i in range(50):
        item = a[i]
        assert item["image"].shape == (3, 32, 32) and -1 <= item["image"].min() and item["image"].max() <= 1
        assert item["shape"] in T.SHAPES and item["color"] in T.COLORS
        assert item["size"] in T.SIZES and item["position"] in T.POSITIONS
        assert T.SHAPE_CLASSES[item["label"]] == f"{item['color']} {item['shape']}"
        words = item["caption"]
        assert item["color"] in words and item["shape"] in words
        assert any(w in words for w in T.SIZE_WORDS[item["size"]])
        assert any(w in words for w in T.POSITION_WORDS[item["position"]])
    held = T.ShapesDataset(300, 32, seed=0, holdout=["blue triangle", "red circle"])
    names = {T.SHAPE_CLASSES[held[i]["label"]] for i in range(300)}
    assert "blue triangle" not in names and "red circle" not in names and len(names) == 16
    with pytest.raises(ValueError, match="unknown --holdout purple hexagon"):
        T.ShapesDataset(1, 32, holdout=["purple hexagon"])


def test_judge_reads_rendered_shapes():
    """The automatic judge behind the reported accuracy reads every attribute of real renders."""
    shapes = T.ShapesDataset(300, 32, seed=11)
    for i in range(300):
        item = shapes[i]
        assert T.judge_shape(item["image"]) == {k: item[k] for k in ("color", "shape", "size", "position")}
    assert T.judge_shape(torch.full((3, 32, 32), -0.8)) is None  # background only
    faint = shapes[0]["image"].clone()
    faint[:] = torch.tensor(T.BACKGROUND)[:, None, None] / 127.5 - 1
    faint[2, 10:16, 10:16] += 0.75  # a little blue: far from the background, but under half a shape
    assert T.judge_shape(faint) is None


def test_mirror_caption():
    assert T.mirror_caption("a red circle on the left") == "a red circle on the right"
    assert T.mirror_caption("right side, leftover") == "left side, leftover"
    assert T.mirror_caption("a red square on the left, large") == "a red square on the right, large"


def write_image(path, image):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    image.save(path)


def test_image_folder_loading(tmp_path):
    root = str(tmp_path)
    write_image(f"{root}/cats/a.png", Image.new("RGB", (40, 30), (200, 10, 10)))
    write_image(f"{root}/cats/gray.png", Image.new("L", (30, 30), 128))
    sixteen = Image.fromarray(np.full((20, 20), 65535 // 2, dtype=np.uint16))  # 16-bit grayscale
    write_image(f"{root}/dogs/deep.png", sixteen)
    write_image(f"{root}/dogs/clear.png", Image.new("RGBA", (20, 20), (0, 0, 255, 0)))
    with open(f"{root}/metadata.jsonl", "w") as f:
        f.write(json.dumps({"file_name": "cats/a.png", "text": "a red cat"}) + "\n")
    with open(f"{root}/cats/gray.txt", "w") as f:
        f.write("a gray cat\n")
    folder = T.ImageFolderDataset(root, 16)
    assert folder.images.shape == (4, 3, 16, 16) and folder.images.dtype == torch.uint8
    assert folder.class_names == ["cats", "dogs"]
    assert folder.labels == [0, 0, 1, 1]  # a, gray | clear, deep (sorted paths)
    assert folder.captions == ["a red cat", "a gray cat", None, None]
    assert (folder.images[1] == 128).all()                  # one gray level in all three channels
    assert (folder.images[3] - 127).abs().max() <= 1        # 16-bit mid-gray -> 8-bit mid-gray
    assert (folder.images[2] == 255).all()                  # transparent -> white


def test_a_folder_with_surprises_gets_one_warning_each(tmp_path):
    """Unreadable files, images smaller than --image-size, captions that are not UTF-8, metadata
    naming missing files and empty class folders: one warning each, with a count and an example."""
    root = str(tmp_path)
    for i in range(3):
        write_image(f"{root}/cats/{i}.png", Image.new("RGB", (8, 8), (200, 10, 10)))  # smaller than 16
    write_image(f"{root}/dogs/big.png", Image.new("RGB", (40, 40), (10, 10, 200)))
    os.makedirs(f"{root}/birds")                                                    # an empty class
    with open(f"{root}/dogs/corrupt.png", "wb") as f:
        f.write(b"not an image at all")
    with open(f"{root}/dogs/big.txt", "wb") as f:
        f.write("a big dog, caf\u00e9".encode("latin-1"))                            # not UTF-8
    with open(f"{root}/metadata.jsonl", "w") as f:
        for name in ("cats/0.png", "cats/gone.png", "cats/also_gone.png"):
            f.write(json.dumps({"file_name": name, "text": "a cat"}) + "\n")
    with pytest.warns(UserWarning) as record:
        folder = T.ImageFolderDataset(root, 16)
    messages = sorted(str(w.message) for w in record)
    assert len(messages) == 5, messages
    assert any(m.startswith("1 unreadable") and "dogs/corrupt.png" in m for m in messages)
    assert any(m.startswith("3 images are smaller than 16 px") for m in messages)
    assert any(m.startswith("1 caption files are not UTF-8") and "dogs/big.txt" in m for m in messages)
    assert any(m.startswith("2 metadata.jsonl lines name a file that is not there") for m in messages)
    assert any("subfolders hold no readable images" in m and "birds" in m for m in messages)
    assert folder.class_names == ["cats", "dogs"] and folder.captions[3] == "a big dog, caf\ufffd"


def test_a_small_clean_folder_trains_without_warnings(tmp_path):
    import warnings
    for i in range(5):
        write_image(f"{tmp_path}/c{i % 2}/{i}.png", Image.new("RGB", (32, 32), (40 * i, 10, 10)))
    args = T.parse_args(["--data", str(tmp_path), "--cond", "class"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        data = T.load_data(args)
    assert torch.equal(data.held_out, data.images) and "none held out" in data.held_out_name


def test_flips_are_off_for_a_folder_and_on_for_the_shapes(tmp_path):
    """A flipped digit or letter is a different, wrong image: folders train unflipped unless
    asked; the shapes flip with their captions mirrored."""
    assert T.parse_args([]).flip is True
    assert T.parse_args(["--data", str(tmp_path)]).flip is False
    assert T.parse_args(["--data", str(tmp_path), "--flip"]).flip is True
    run = argparse.Namespace(rank=0, world=1)
    assert not T.batch_indices(100, 64, 0, 3, run, flip=False)[1].any()
    assert T.batch_indices(100, 64, 0, 3, run, flip=True)[1].any()


def test_the_mirrored_training_set_pairs_mirror_images_with_mirrored_captions():
    """With --flip, example 4 + i of the tokenized set is image i mirrored, with its caption's left
    and right swapped; without, only the originals. An image without a caption is left out."""
    vq = tiny_tokenizer().eval()
    images = S.to_uint8(blob_images())
    captions = ["a red circle on the left", "a blue square at the top", None, "green, right", "a dot"]
    data = T.TrainingSet(torch.cat([images, images[:1]]), None, captions, None, images, "held-out")
    text_tokenizer = L.TextTokenizer.train(CAPTIONS + captions[:2] + captions[3:], vocab_size=60)
    text_encoder = L.TextEncoder(text_tokenizer, None)  # its T5 is not needed to tokenize
    args = T.parse_args(["--text-length", "12"])
    [flipped] = T.tokenize_training_set(args, data, vq, text_encoder, "cpu")  # one image size: one set
    kept = [0, 1, 3, 4]
    assert flipped.originals == 4 and flipped.posteriors.shape == (8, 64)
    assert torch.equal(flipped.posteriors[:4], vq.encode(T.to_float(data.images[kept])))
    assert torch.equal(flipped.posteriors[4:], vq.encode(T.to_float(data.images[kept]).flip(-1)))
    assert [text_tokenizer.decode(ids) for ids in flipped.cond] == [captions[i] for i in kept] + [
        "a red circle on the right", "a blue square at the top", "green, left", "a dot"]
    [plain] = T.tokenize_training_set(T.parse_args(["--text-length", "12", "--no-flip"]), data, vq, text_encoder, "cpu")
    assert plain.originals == 4 and len(plain.posteriors) == len(plain.cond) == len(plain.cond_mask) == 4


def test_data_and_setting_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="is not a folder"):
        T.ImageFolderDataset(str(tmp_path / "nope"), 16)
    with pytest.raises(ValueError, match="holds no images"):
        T.ImageFolderDataset(str(tmp_path), 16)
    Image.new("RGB", (32, 32)).save(tmp_path / "loose.png")
    args = T.parse_args(["--data", str(tmp_path), "--cond", "class"])
    data = T.load_data(args)
    with pytest.raises(ValueError, match="not all in class subfolders"):
        T.check_args(args, data)
    with pytest.raises(ValueError, match="has no captions"):
        T.check_args(T.parse_args(["--data", str(tmp_path)]), data)
    shapes = T.load_data(T.parse_args(["--num-images", "4"]))
    with pytest.raises(ValueError, match="not a multiple of VQ-mini's 4x downsampling"):
        T.check_args(T.parse_args(["--image-size", "30"]), shapes)
    with pytest.raises(ValueError, match="discriminator needs images of at least 32 px"):
        T.check_args(T.parse_args(["--image-size", "16"]), shapes)
    T.check_args(T.parse_args(["--image-size", "16", "--tokenizer-steps", "10", "--disc-start", "10"]), shapes)  # no GAN: fine
    with pytest.raises(FileNotFoundError, match="--t5 .* has no config.json"):
        T.check_args(T.parse_args(["--t5", str(tmp_path)]), shapes)


def tiny_run(out_dir, *extra):
    return ["--out-dir", str(out_dir), "--image-size", "32", "--num-images", "48", "--tokenizer-preset", "VQ-mini",
            "--gpt-preset", "GPT-tiny", "--tokenizer-batch-size", "4", "--gpt-batch-size", "8", "--warmup", "2",
            "--text-length", "16", "--text-vocab", "128", "--log-every", "1", "--sample-every", "1000",
            "--save-every", "1000", "--eval-per-class", "0", "--perceptual-weight", "0", *extra]


def logged(out_dir, stage, key):
    """Values of `key` on the log lines of one stage, in step order."""
    values = []
    for line in open(os.path.join(out_dir, "log.txt")):
        if line.startswith(f"{stage} step"):
            fields = dict(f.strip().split(" ", 1) for f in line.split("|")[1:])
            values.append(float(fields[key].split()[0]))
    return values


@slow
def test_training_lowers_the_loss(tmp_path):
    T.main(tiny_run(tmp_path, "--tokenizer-steps", "40", "--gpt-steps", "80", "--disc-start", "30",
                    "--tokenizer-lr", "3e-3", "--gpt-lr", "1e-2", "--eval-per-class", "1"))
    rec, gpt_loss = logged(tmp_path, "tokenizer", "rec"), logged(tmp_path, "gpt", "loss")
    assert len(rec) == 40 and len(gpt_loss) == 80
    assert np.mean(rec[-5:]) < 0.5 * np.mean(rec[:5])
    assert np.mean(gpt_loss[-5:]) < 0.8 * np.mean(gpt_loss[:5])  # from ln(256) = 5.5
    assert "gen_adv" in open(tmp_path / "log.txt").read()  # the GAN phase ran
    vq_ckpt = L.load_checkpoint(str(tmp_path / "tokenizer.pt"), "tokenizer")
    gpt_ckpt = L.load_checkpoint(str(tmp_path / "gpt.pt"), "gpt")
    assert vq_ckpt["step"] == 40 and vq_ckpt["metrics"]["psnr"] > 10
    assert gpt_ckpt["config"]["model_type"] == "t2i" and gpt_ckpt["text_tokenizer"] and gpt_ckpt["t5"]
    assert gpt_ckpt["metrics"]["blue triangle"]["samples"] == 3  # the held-out combination was judged
    assert os.path.isfile(tmp_path / "samples.png") and os.path.isfile(tmp_path / "tokenizer_step000040.png")


@slow
def test_same_seed_same_first_losses(tmp_path):
    for name in ("a", "b"):
        T.main(tiny_run(tmp_path / name, "--tokenizer-steps", "3", "--gpt-steps", "3", "--disc-start", "100"))
    for stage, key in (("tokenizer", "loss"), ("gpt", "loss")):
        assert logged(tmp_path / "a", stage, key) == logged(tmp_path / "b", stage, key)
    assert states_equal(torch.load(tmp_path / "a" / "gpt.pt", weights_only=True)["model"],
                        torch.load(tmp_path / "b" / "gpt.pt", weights_only=True)["model"])


@slow
def test_class_conditional_stage_on_an_existing_tokenizer(tmp_path):
    T.main(tiny_run(tmp_path, "tokenizer", "--tokenizer-steps", "2", "--disc-start", "100"))
    T.main(tiny_run(tmp_path, "gpt", "--cond", "class", "--gpt-steps", "3"))
    checkpoint = L.load_checkpoint(str(tmp_path / "gpt.pt"), "gpt")
    assert checkpoint["config"]["model_type"] == "c2i" and checkpoint["config"]["num_classes"] == 18
    assert checkpoint["t5"] is None and checkpoint["class_names"] == T.SHAPE_CLASSES
    with pytest.raises(SystemExit, match="trained at 32 px"):
        T.main(tiny_run(tmp_path, "gpt", "--image-size", "16", "--overwrite"))
    with pytest.raises(SystemExit, match="train the tokenizer first"):
        T.main(tiny_run(tmp_path / "empty", "gpt"))


@slow
def test_resume_equals_an_uninterrupted_run(tmp_path, monkeypatch):
    steps = ["--tokenizer-steps", "6", "--gpt-steps", "6", "--disc-start", "2", "--save-every", "3", "--ema", "0.9",
             "--dropout", "0.1", "--tokenizer-lr", "1e-3", "--gpt-lr", "2e-3"]
    T.main(tiny_run(tmp_path / "straight", *steps))
    learning_rate = T.learning_rate

    class Crash(Exception):
        pass

    def crash_at_step_4(stage_lr):  # a crash after the checkpoint of step 3
        def patched(step, total_steps, peak, warmup):
            if step == 4 and peak == stage_lr:
                raise Crash
            return learning_rate(step, total_steps, peak, warmup)
        return patched
    monkeypatch.setattr(T, "learning_rate", crash_at_step_4(stage_lr=1e-3))  # the tokenizer's
    with pytest.raises(Crash):
        T.main(tiny_run(tmp_path / "resumed", *steps))
    assert torch.load(tmp_path / "resumed" / "tokenizer.pt", weights_only=True)["step"] == 3
    monkeypatch.setattr(T, "learning_rate", crash_at_step_4(stage_lr=2e-3))  # the GPT's
    with pytest.raises(Crash):  # the tokenizer resumes and finishes, the GPT stops at 4
        T.main(tiny_run(tmp_path / "resumed", *steps, "--resume"))
    assert torch.load(tmp_path / "resumed" / "tokenizer.pt", weights_only=True)["step"] == 6
    assert torch.load(tmp_path / "resumed" / "gpt.pt", weights_only=True)["step"] == 3
    monkeypatch.setattr(T, "learning_rate", learning_rate)
    T.main(tiny_run(tmp_path / "resumed", *steps, "--resume"))
    for name in ("tokenizer.pt", "gpt.pt"):
        straight = torch.load(tmp_path / "straight" / name, weights_only=True)
        resumed = torch.load(tmp_path / "resumed" / name, weights_only=True)
        for key in ("model", "optimizer", "step", "rng", "ema", "discriminator", "t5", "text_tokenizer"):
            if key in straight:
                assert states_equal(straight[key], resumed[key]), (name, key)


def ddp_worker(rank, out_dir, port):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="2", RANK=str(rank),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    args = T.parse_args(tiny_run(out_dir, "--tokenizer-steps", "4", "--gpt-steps", "4", "--disc-start", "2",
                                 "--device", "cpu"))  # two CPU processes (gloo), also where there is one GPU
    run = T.Run(args)
    data = T.load_data(args)
    vq, criterion = T.train_tokenizer(args, run, data)
    gpt = T.train_gpt(args, run, data, vq)
    torch.save({"vq": vq.state_dict(), "gpt": gpt.state_dict(), "discriminator": criterion.discriminator.state_dict()},
               os.path.join(out_dir, f"rank{rank}.pt"))
    run.close()


@slow
def test_ddp_replicas_stay_identical(tmp_path):
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torch.multiprocessing.spawn(ddp_worker, args=(str(tmp_path), port), nprocs=2)
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    for state in (rank0, rank1):  # BatchNorm statistics are each process's own; the weights are shared
        state["discriminator"] = {k: v for k, v in state["discriminator"].items() if "running" not in k}
    assert states_equal(rank0, rank1)
    # the two processes trained on different halves of each batch: the averaged update is not the
    # update either half alone would give, so equality above is the work of the all-reduce
    fresh = L.VQModel(L.VQConfig(**L.VQ_PRESETS["VQ-mini"], entropy_loss_ratio=0.1)).state_dict()
    assert not states_equal(rank0["vq"], fresh)


@slow
def test_pretrained_t5_stays_frozen(tmp_path):
    transformers = pytest.importorskip("transformers")
    captions = [T.ShapesDataset(200, 32, seed=0)[i]["caption"] for i in range(200)]
    tokenizer = L.TextTokenizer.train(captions, vocab_size=128)
    hf_dir = tmp_path / "t5"
    hf = transformers.T5EncoderModel(transformers.T5Config(vocab_size=tokenizer.vocab_size, d_model=32, d_kv=8,
                                                           d_ff=64, num_layers=2, num_heads=4))
    hf.save_pretrained(hf_dir)
    (hf_dir / "spiece.model").write_bytes(tokenizer.model_bytes)
    T.main(tiny_run(tmp_path, "--tokenizer-steps", "2", "--gpt-steps", "3", "--disc-start", "100", "--t5", str(hf_dir)))
    checkpoint = torch.load(tmp_path / "gpt.pt", map_location="cpu", weights_only=True)
    loaded, _ = L.load_t5_encoder(str(hf_dir))
    assert checkpoint["train_t5"] is False and checkpoint["config"]["caption_dim"] == 32
    assert states_equal(checkpoint["t5"], loaded.state_dict())           # unchanged by training
    assert checkpoint["text_tokenizer"] == tokenizer.model_bytes
    assert checkpoint["step"] == 3


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Tiny text- and class-conditional checkpoints, as python train.py writes them."""
    text, classes = tmp_path_factory.mktemp("text"), tmp_path_factory.mktemp("class")
    T.main(tiny_run(text, "--tokenizer-steps", "2", "--gpt-steps", "2", "--disc-start", "100"))
    T.main(tiny_run(classes, "--tokenizer-steps", "2", "--gpt-steps", "2", "--disc-start", "100", "--cond", "class"))
    return text, classes


RUNS = {  # every other order and kind of token train.py trains: its switches (class-conditional, tiny)
    "continuous": ["--tokens", "continuous", "--tokenizer-preset", "KL-mini", "--diffusion-steps", "5"],
    "masked": ["--order", "masked", "--num-iter", "4"],
    "masked-continuous": ["--order", "masked", "--tokens", "continuous", "--tokenizer-preset", "KL-mini",
                          "--diffusion-steps", "5", "--num-iter", "4"],
    "scales": ["--order", "scales", "--tokenizer-preset", "MSVQ-mini"],
}


@pytest.fixture(scope="module")
def runs(trained, tmp_path_factory):
    """The out-dir of a finished class-conditional run of every order and kind of token, by name
    ("raster": trained's)."""
    folders = {"raster": trained[1]}
    for name, switches in RUNS.items():
        folders[name] = tmp_path_factory.mktemp(name)
        T.main(tiny_run(folders[name], "--cond", "class", "--tokenizer-steps", "3", "--gpt-steps", "3", "--disc-start",
                        "100", *switches))
    return folders


@slow
def test_each_run_writes_the_tokenizer_and_the_generator_it_names(runs):
    """The checkpoints name their kind of token and order, which is all sample.py needs: the KL's
    latent scale is fixed after training, VAR's GPT keeps a copy of the tokenizer's quantizer,
    and the log shows the codebook usage of every scale."""
    for name, (kind, order) in {"raster": ("discrete", "raster"), "continuous": ("continuous", "raster"),
                                "masked": ("discrete", "masked"), "masked-continuous": ("continuous", "masked"),
                                "scales": ("multiscale", "scales")}.items():
        tokenizer = L.load_checkpoint(str(runs[name] / "tokenizer.pt"), "tokenizer")
        gpt = L.load_checkpoint(str(runs[name] / "gpt.pt"), "gpt")
        assert tokenizer["token_kind"] == gpt["config"]["token_kind"] == tokenizer["args"]["tokens"] == kind
        assert gpt["config"]["order"] == order
    continuous = L.load_checkpoint(str(runs["continuous"] / "tokenizer.pt"), "tokenizer")
    assert continuous["ema"] is None and continuous["model"]["latent_scale"] != 1.0
    tokenizer = L.load_checkpoint(str(runs["scales"] / "tokenizer.pt"), "tokenizer")
    gpt = L.load_checkpoint(str(runs["scales"] / "gpt.pt"), "gpt")
    assert tuple(gpt["config"]["scales"]) == (1, 2, 3, 4, 6, 8) and gpt["config"]["block_size"] == 1 + 4 + 9 + 16 + 36 + 64
    assert all(torch.equal(gpt["model"][f"quantizer.{name}"], value)          # the tokenizer's quantizer, copied
               for name, value in tokenizer["model"].items() if name.startswith("quantize.")
               for name in [name.removeprefix("quantize.")])
    log = open(runs["scales"] / "log.txt").read()
    assert re.search(r"tokenizer step 3/3 .* usage \d+% \(1x1 \d+%, 2x2 \d+%, 3x3 \d+%, 4x4 \d+%, 6x6 \d+%, 8x8 \d+%\)", log)


# -----------------------------------------------------------------------------
# sample.py


def read_rgb(path):
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


@slow
def test_sample_outputs(trained, tmp_path):
    text, _ = trained
    out = tmp_path / "new" / "folder" / "grid.png"  # a folder that does not exist yet is made
    S.main(["--out-dir", str(text), "--prompt", "a small red circle at the top", "--prompt", "a big blue square",
            "--num-samples", "3", "--output", str(out), "--save-dir", str(tmp_path / "each"), "--batch-size", "4"])
    assert read_rgb(out).shape == (2 + 2 * 34, 2 + 3 * 34, 3)  # 2 rows x 3 columns of 32 px, 2 px gaps
    pngs = sorted(p for p in os.listdir(tmp_path / "each") if p.endswith(".png"))
    assert len(pngs) == 6 and read_rgb(tmp_path / "each" / pngs[0]).shape == (32, 32, 3)
    npz = np.load(tmp_path / "each" / "samples.npz")["arr_0"]
    assert npz.dtype == np.uint8 and npz.shape == (6, 32, 32, 3)
    assert np.array_equal(npz[4], read_rgb(tmp_path / "each" / pngs[4]))
    # no arguments but the folder: one row per stored prompt (one per shape class)
    S.main(["--out-dir", str(text), "--output", str(tmp_path / "default.png"), "--num-samples", "1"])
    assert read_rgb(tmp_path / "default.png").shape[0] == 2 + 18 * 34


@pytest.fixture(scope="module")
def fused_run(tmp_path_factory):
    """A tiny early-fusion run as python train.py --cond vocab writes it, with Chameleon's QK-norm
    and z-loss switched on."""
    out = tmp_path_factory.mktemp("fused")
    T.main(tiny_run(out, "--cond", "vocab", "--tokenizer-steps", "6", "--gpt-steps", "3", "--disc-start", "3",
                    "--eval-per-class", "1", "--qk-norm", "--z-loss", "1e-5", "--log-every", "6"))
    return out


@slow
def test_fused_run_draws_and_captions(fused_run, tmp_path, capsys):
    """train.py --cond vocab writes a GPT that says what it is (early fusion over one vocabulary of
    the captions' SentencePiece ids and the codes, no T5), and its log judges drawings and captions;
    sample.py draws with --prompt and prints path: caption per image with --caption, greedy by
    default and reproducible from the seed when sampled; train.py evaluate judges both again."""
    checkpoint = L.load_checkpoint(str(fused_run / "gpt.pt"), "gpt")
    config = checkpoint["config"]
    assert (config["order"], config["model_type"], config["qk_norm"], config["z_loss"]) == ("fused", "vocab", True, 1e-5)
    assert [tuple(shape) for shape in config["grid_shapes"]] == [(8, 8), (8, 12), (12, 8)]  # 32x32, 48x32, 32x48
    assert config["text_vocab_size"] > 16
    assert checkpoint["t5"] is None and checkpoint["text_tokenizer"] and "captions" in checkpoint["metrics"]
    sizes = [T.pick_group([48, 12, 12], 0, step) for step in range(6)]  # the tokenizer trained on every size,
    assert set(sizes) == {0, 1, 2}                                         # the PatchGAN on the square only
    log = open(fused_run / "log.txt").read()
    assert "trained color/shape combinations: " in log and re.search(r"captions right: \d+\.\d% \(17 images\)", log)
    for size in ("48x32", "32x48"):
        assert f"drawn at {size}, trained color/shape combinations: " in log
    grid = tmp_path / "grid.png"
    S.main(["--out-dir", str(fused_run), "--prompt", "a small red circle at the top", "--num-samples", "2",
            "--output", str(grid)])
    assert read_rgb(grid).shape == (2 + 34, 2 + 2 * 34, 3)
    S.main(["--out-dir", str(fused_run), "--prompt", "a small red circle at the top", "--num-samples", "2",
            "--size", "32x48", "--output", str(grid), "--save-dir", str(tmp_path / "each")])
    assert read_rgb(grid).shape == (2 + 50, 2 + 2 * 34, 3)  # 48 px tall, 32 wide
    assert np.load(tmp_path / "each" / "samples.npz")["arr_0"].shape == (2, 48, 32, 3)
    paths = [str(tmp_path / name) for name in ("a.png", "b.png")]
    for path, (shape, color) in zip(paths, [("circle", "red"), ("square", "blue")]):
        Image.fromarray(T.render_shape(shape, color, "large", "center", 48, random.Random(0))).save(path)
    capsys.readouterr()

    def captions(*extra):
        S.main(["--out-dir", str(fused_run), "--caption", *paths, *extra])
        lines = capsys.readouterr().out.splitlines()
        assert [line.split(": ", 1)[0] for line in lines] == paths
        return lines
    greedy = captions()
    assert captions() == greedy and captions("--temperature", "1") == captions("--temperature", "1")
    T.main(tiny_run(fused_run, "evaluate", "--eval-per-class", "1"))
    assert open(fused_run / "log.txt").read().count("captions right: ") == 2


@slow
def test_anole_exercise_runs(tmp_path, capsys):
    """ANOLE's recipe as train.py runs it: a fused model trained on words only captions but is
    refused for drawing; --anole starts from it (its tokenizer copied, its settings taken), trains
    the output layer's rows of the image codes alone, and draws; what it started from is untouched."""
    reader, anole = tmp_path / "reader", tmp_path / "anole"
    T.main(tiny_run(reader, "--cond", "vocab", "--fused-loss", "text", "--tokenizer-steps", "2", "--gpt-steps", "3",
                    "--disc-start", "100"))
    _, message = fails(S.main, ["--out-dir", str(reader), "--prompt", "a red circle"], capsys)
    assert "learnt words only (train.py --fused-loss text): it reads images and captions them but cannot draw" in message
    before = (reader / "gpt.pt").read_bytes()
    T.main(tiny_run(anole, "--cond", "vocab", "--anole", str(reader), "--gpt-steps", "3", "--eval-per-class", "1"))
    assert (reader / "gpt.pt").read_bytes() == before
    assert (anole / "tokenizer.pt").read_bytes() == (reader / "tokenizer.pt").read_bytes()
    log = open(anole / "log.txt").read()
    assert re.search(r"ANOLE: only the output layer's rows of the 256 image codes train, from zero, 16,384 of [\d,]+ "
                     r"parameters", log)
    start, end = (torch.load(path / "gpt.pt", weights_only=True) for path in (reader, anole))
    assert end["config"]["fused_loss"] == "image"
    rows = L.FusedVocabulary(L.GPTConfig(**end["config"])).code_start
    for name, value in start["model"].items():
        changed = not torch.equal(value, end["model"][name])
        assert changed == (name == "output.weight"), name
    assert torch.equal(start["model"]["output.weight"][:rows], end["model"]["output.weight"][:rows])
    S.main(["--out-dir", str(anole), "--prompt", "a red circle", "--num-samples", "1", "--output", str(tmp_path / "a.png")])
    for argv, expected in [(["--anole", str(tmp_path / "none")], "holds no gpt.pt: train the model to start from first"),
                           (["--anole", str(anole), "--out-dir", str(anole)], "is the model ANOLE starts from"),
                           (["tokenizer", "--anole", str(reader)], "--anole trains a GPT")]:
        _, message = fails(T.main, tiny_run(tmp_path / "other", "--cond", "vocab", *argv), capsys)
        assert expected in message


@slow
@pytest.mark.parametrize("argv, expected", [
    (["--caption", "missing.png"], "--caption missing.png does not exist."),
    (["--caption", "notes.txt"], "--caption notes.txt is not an image Pillow can read"),
    (["--caption", "a.png", "--prompt", "a red circle"], "--caption writes captions of images; --prompt is for drawing: "
                                                         "leave it out."),
    (["--caption", "a.png", "--cfg-scale", "3"], "--cfg-scale is for drawing: leave it out."),
    (["--speculative"], "--speculative is for raster order, and this GPT generates in fused order"),
    (["--num-iter", "4"], "--num-iter does not apply to this GPT (fused order)"),
    (["--class-id", "3"], "use --prompt, not --class-id"),
    (["--size", "24x32"], "--size 24x32 is not a size this model was trained on: pass one of 32x32, 48x32, 32x48."),
    (["--size", "48x32", "--gif", "a.gif"], "--gif works on square images: leave out --size 48x32"),
    (["--size", "32"], "--size: '32' is not a size WxH in pixels"),
    (["--caption", "a.png", "--size", "32x48"], "--size is for drawing: leave it out."),
])
def test_fused_sample_errors(argv, expected, fused_run, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "notes.txt").write_text("not an image")
    Image.new("RGB", (32, 32)).save(tmp_path / "a.png")
    _, message = fails(S.main, ["--out-dir", str(fused_run), *argv], capsys)
    assert expected in message
    assert sorted(os.listdir(tmp_path)) == ["a.png", "notes.txt"]  # nothing written


@slow
def test_caption_and_size_need_early_fusion(trained, tmp_path, capsys):
    Image.new("RGB", (32, 32)).save(tmp_path / "a.png")
    _, message = fails(S.main, ["--out-dir", str(trained[0]), "--caption", str(tmp_path / "a.png")], capsys)
    assert "draws but cannot caption: --caption is for a run of python train.py --cond vocab" in message
    _, message = fails(S.main, ["--out-dir", str(trained[0]), "--size", "32x16"], capsys)
    assert "--size is for early fusion (a run of python train.py --cond vocab)" in message


@pytest.mark.parametrize("argv, expected", [
    (["--cond", "vocab", "--order", "masked"], "--cond vocab writes codes of a VQ into one vocabulary with the words, "
                                               "in raster order: leave out --order"),
    (["--cond", "vocab", "--tokens", "continuous"], "leave out --tokens"),
    (["--qk-norm"], "--qk-norm is Chameleon's, for --cond vocab"),
    (["--z-loss", "1e-5", "--cond", "class"], "--z-loss is Chameleon's, for --cond vocab"),
    (["--sizes", "32x32,48x32"], "--sizes draws the built-in shapes at other sizes, for --cond vocab"),
    (["--cond", "vocab", "--sizes", "48x32"], "--sizes begins with the square of --image-size, 32x32"),
    (["--cond", "vocab", "--sizes", "32x32,big"], "--sizes: 'big' is not a size WxH in pixels"),
])
def test_fused_train_flag_errors(argv, expected, capsys):
    with pytest.raises(SystemExit):
        T.parse_args(argv)
    assert expected in capsys.readouterr().err


def test_fused_train_setting_errors():
    data = T.load_data(T.parse_args(["--num-images", "4"]))
    with pytest.raises(ValueError, match="--t5 does not apply to --cond vocab"):
        T.check_args(T.parse_args(["--cond", "vocab", "--t5", "flan-t5-base"]), data)
    with pytest.raises(ValueError, match="--sizes 32x18 is not a grid of VQ-mini's 4-pixel cells"):
        T.check_args(T.parse_args(["--cond", "vocab", "--sizes", "32x32,32x18"]), data)


def test_shapes_render_and_judge_at_any_size():
    """The shapes demo at other sizes (early fusion's): the square is drawn as before, and the judge
    reads every shape, size and position back off wide and tall images too."""
    rng = random.Random(0)
    for size in [(48, 32), (32, 48), (32, 32)]:
        for shape, color, scale, position in [("circle", "red", "large", "center"), ("square", "blue", "small", "top"),
                                              ("triangle", "green", "large", "bottom"), ("square", "cyan", "small", "left"),
                                              ("circle", "magenta", "small", "right")]:
            pixels = T.render_shape(shape, color, scale, position, size, rng)
            assert pixels.shape == (size[1], size[0], 3)
            image = torch.from_numpy(pixels.copy()).permute(2, 0, 1).float() / 127.5 - 1
            assert T.judge_shape(image) == dict(color=color, shape=shape, size=scale, position=position), (size, shape)
    square = T.render_shape("circle", "red", "large", "left", 32, random.Random(3))
    assert np.array_equal(square, T.render_shape("circle", "red", "large", "left", (32, 32), random.Random(3)))


E2E = {  # run: GIF frames (a row of the 8 x 8 grid, a step, a scale each), its sampling flags, flags that change the images
    "raster": (8, [], ["--top-k", "2"]),
    "continuous": (8, ["--diffusion-steps", "5"], ["--diffusion-steps", "3"]),
    "masked": (4, ["--num-iter", "4"], ["--num-iter", "2"]),
    "masked-continuous": (4, ["--num-iter", "4", "--diffusion-steps", "5"], ["--num-iter", "2"]),
    "scales": (6, [], ["--cfg-schedule", "constant", "--cfg-scale", "4"]),
}


@slow
@pytest.mark.parametrize("name", list(E2E))
def test_every_run_samples_end_to_end(name, runs, tmp_path):
    """Whatever train.py trained, sample.py and train.py evaluate read by themselves: the grid, a
    PNG per image and samples.npz, a GIF of the generation (a frame per row of the grid in raster
    order, per step in masked order, per scale in VAR's, each changing the picture) ending on the
    grid, the same images from the same seed and others from another seed or other sampling
    flags, and the judged evaluation."""
    frames, fast, change = E2E[name]
    out = tmp_path / "out"

    def sample(file, *extra):
        S.main(["--out-dir", str(runs[name]), "--class-name", "red circle", "--num-samples", "3", *fast,
                "--output", str(out / file), *extra])
        return read_rgb(out / file)
    grid = sample("a.png", "--save-dir", str(out / "each"), "--gif", str(out / "a.gif"))
    assert grid.shape == (2 + 34, 2 + 3 * 34, 3) and np.load(out / "each" / "samples.npz")["arr_0"].shape == (3, 32, 32, 3)
    with Image.open(out / "a.gif") as gif:
        assert gif.n_frames == frames
        pictures = []
        for i in range(frames):
            gif.seek(i)
            pictures.append(np.asarray(gif.convert("RGB")).astype(int))
    assert all(np.abs(a - b).sum() > 0 for a, b in zip(pictures, pictures[1:]))
    assert np.abs(pictures[-1] - grid).mean() < 8                              # the last is the grid (256 colors)
    assert np.array_equal(sample("b.png"), grid) and not np.array_equal(sample("c.png", "--seed", "1"), grid)
    assert not np.array_equal(sample("d.png", *change), grid)
    T.main(tiny_run(runs[name], "evaluate", "--eval-per-class", "1", *fast))
    assert "samples generated and judged" in open(runs[name] / "log.txt").read()


@slow
@pytest.mark.parametrize("name", list(E2E))
def test_every_run_edits_an_image_keeping_what_the_mask_keeps(name, runs, tmp_path):
    """sample.py --edit with whatever train.py trained, for every mask of the README's table: the
    tokens of the kept cells are the image's own (VAR: at every scale), the images have the model's
    size; the grid shows the photo (center-cropped, resized) and what is kept before the edits, and
    the GIF starts with the kept cells in place."""
    _, fast, _ = E2E[name]
    photo = tmp_path / "photo.png"
    write_image(str(photo), Image.fromarray(np.random.default_rng(1).integers(0, 255, (40, 48, 3), dtype=np.uint8)))
    pipeline = S.load_ours(str(runs[name]))
    for mask in ("center", "right", "bottom", "top-left"):
        args = S.parse_args(["--out-dir", str(runs[name]), "--edit", str(photo), "--fill", mask, "--num-samples", "2",
                             "--class-name", "red circle", *fast])
        image, kept, (encoded, known) = S.edit_request(args, pipeline, "cpu")
        assert image.shape == (1, 3, 32, 32) and known.any() and not known.all()
        options = S.sampling_options(args, pipeline.gpt.config, pipeline.sampling)
        tokens, _ = S.generate_tokens(pipeline, S.conditions(args, pipeline), args, options, "cpu", edit=(encoded, known))
        assert torch.equal(tokens[known.expand(2, -1)], encoded[known].repeat(2, *[1] * (encoded.dim() - 2))), mask
        assert S.decode(pipeline.tokenizer, tokens).shape == (2, 3, 32, 32)
    out = tmp_path / "out"
    S.main(["--out-dir", str(runs[name]), "--edit", str(photo), "--keep", "left", "--class-name", "red circle",
            "--num-samples", "2", *fast, "--output", str(out / "edit.png"), "--gif", str(out / "edit.gif")])
    grid = read_rgb(out / "edit.png")
    assert grid.shape == (2 + 34, 2 + 4 * 34, 3)
    assert np.abs(grid[2:34, 2:34].astype(int) - np.asarray(S.center_crop_resize(Image.open(photo), 32))).max() <= 1
    assert (grid[2:34, 36 + 16:68] == 128).all() and not (grid[2:34, 36:36 + 16] == 128).all()  # the right half gray
    with Image.open(out / "edit.gif") as gif:
        first = np.asarray(gif.convert("RGB")).astype(int)
    if name != "scales":  # VAR's frames sum whole scales: the kept cells show as the scales come
        cells = first[2:34, 2:18].reshape(8, 4, 4, 4, 3)                     # the kept half's cells of 4 x 4 px
        assert not (cells == 128).all(axis=(1, 3, 4)).any()                  # none blank, as undecided ones are


@slow
def test_edit_errors(trained, tmp_path, capsys, monkeypatch):
    """Each mistake with --edit gets one sentence and nothing is written; a mask that keeps no whole
    cell is plain sampling, said; evaluate --edit prints its line per region."""
    text, _ = trained
    monkeypatch.chdir(tmp_path)
    Image.new("RGB", (40, 40), (200, 30, 30)).save("photo.png")
    Image.new("L", (20, 20), 255).save("small-mask.png")
    Image.new("L", (32, 32), 0).save("black.png")
    (tmp_path / "broken.png").write_bytes(b"not a picture")
    for argv, expected in [
        (["--edit", "missing.png", "--keep", "left"], "--edit missing.png does not exist."),
        (["--edit", "broken.png", "--keep", "left"], "--edit broken.png is not an image Pillow can read"),
        (["--edit", "photo.png", "--keep", "broken.png"], "--keep broken.png is not an image Pillow can read"),
        (["--edit", "photo.png", "--keep", "small-mask.png"], "--keep small-mask.png is 20x20 but the image is 40x40: "
                                                              "draw the mask at the image's size."),
        (["--edit", "photo.png", "--keep", "middle"], "--keep middle is neither a region (left, right, top, bottom, "
                                                      "center, top-left"),
        (["--edit", "photo.png", "--fill", "0,0,50,10"], "--fill 0,0,50,10 is not a box inside the 40x40 image"),
        (["--edit", "photo.png", "--keep", "0,0,40,40"], "keeps every cell of the 8x8 grid of 4 px cells: nothing is "
                                                         "left to generate"),
        (["--edit", "photo.png"], "--edit needs --keep MASK (what of the image stays) or --fill MASK"),
        (["--fill", "center"], "--fill says what of an image stays: pass the image with --edit IMAGE."),
        (["--edit", "photo.png", "--keep", "left", "--benchmark"], "--benchmark times the sampling of a random-weight "
                                                                   "model: leave out --edit."),
    ]:
        before = set(os.listdir(tmp_path))
        _, message = fails(S.main, ["--out-dir", str(text), *argv], capsys)
        assert expected in message, message
        assert set(os.listdir(tmp_path)) == before
    S.main(["--out-dir", str(text), "--edit", "photo.png", "--keep", "1,1,4,4", "--num-samples", "1"])
    assert "keeps no whole cell of the 8x8 grid of 4 px cells, so nothing of the image is kept: this is plain " \
           "sampling" in capsys.readouterr().out
    for argv, expected in [(["evaluate", "--eval-per-class", "1", "--edit", "black.png"], "--edit black.png hides no pixel of the 32x32 "
                                                                                      "image, so there is nothing to generate"),
                           (["evaluate", "--eval-per-class", "1", "--edit", "0,0,32,32"], "--edit 0,0,32,32 hides every cell of the 8x8 grid: "
                                                                 "that is plain sampling"),
                           (["--edit", "center"], "--edit is for python train.py evaluate")]:
        _, message = fails(T.main, tiny_run(text, *argv), capsys)
        assert expected in message, message
    T.main(tiny_run(text, "evaluate", "--eval-per-class", "1", "--edit", "center", "--edit", "top-left"))
    log = open(text / "log.txt").read()
    for region in ("center", "top-left"):
        assert re.search(rf"edited \({region}\): \d+\.\d% of 20 samples show the asked color and shape, kept region "
                         r"\d+\.\d dB against the input \(the tokenizer's reconstruction: \d+\.\d dB\)", log), log[-600:]


@slow
def test_same_seed_same_images(trained, tmp_path):
    _, classes = trained

    def images(seed, name, *extra):
        S.main(["--out-dir", str(classes), "--class-name", "red circle", "--num-samples", "4", "--seed", str(seed),
                "--output", str(tmp_path / name), "--top-k", "50", *extra])
        return read_rgb(tmp_path / name)
    assert np.array_equal(images(1, "a.png"), images(1, "b.png"))
    assert not np.array_equal(images(1, "a.png"), images(2, "c.png"))
    assert np.array_equal(images(1, "a.png"), images(1, "d.png", "--no-kv-cache"))


def test_speculative_or_plain_decodes_each_batch_with_the_faster_loop(capsys):
    """--speculative's per-batch choice: where a pass costs more than it saves, a batch is decoded
    plainly and its codes are generate()'s exactly, from the same generator; where it saves, they
    are generate_speculative's. The cost is measured once, said in one line, and is a real ratio."""
    gpt = tiny_gpt(model_type="t2i")
    cond, cond_mask = tiny_condition(gpt)
    options = dict(cfg_scale=2.0, top_k=8)
    passes = []
    choose = S.SpeculativeOrPlain(gpt, 4, passes)
    first = choose(cond, cond_mask, generator=torch.Generator().manual_seed(0), **options)
    assert capsys.readouterr().out.count("a pass costs") == 1 and 0 < choose.cost < 50
    expected = L.generate_speculative(gpt, cond, cond_mask, torch.Generator().manual_seed(0), 4, **options)
    if choose.needed:  # the first batch went speculative (a pass over 5 positions costs under 3 steps)
        assert torch.equal(first, expected[0]) and passes == expected[1].tolist()
    choose.cost = gpt.config.block_size  # a pass as dear as a whole plain generation: plain decoding
    assert torch.equal(choose(cond, cond_mask, generator=torch.Generator().manual_seed(1), **options),
                       gpt.generate(cond, cond_mask, generator=torch.Generator().manual_seed(1), **options))
    assert passes[-2:] == [gpt.config.block_size] * 2 and capsys.readouterr().out == ""
    choose.cost, choose.needed = 1e-3, []  # passes nearly free: speculative decoding
    assert torch.equal(choose(cond, cond_mask, generator=torch.Generator().manual_seed(2), **options),
                       L.generate_speculative(gpt, cond, cond_mask, torch.Generator().manual_seed(2), 4, **options)[0])


@slow
def test_speculative_sampling_from_the_scripts(trained, tmp_path, capsys):
    """sample.py --speculative and train.py evaluate --speculative: images, reproducible from the
    seed, greedy ones equal to generate's, and the passes per image reported."""
    text, classes = trained

    def images(name, *extra):
        S.main(["--out-dir", str(classes), "--class-name", "red circle", "--num-samples", "4",
                "--output", str(tmp_path / name), *extra])
        return read_rgb(tmp_path / name)
    grid = images("a.png", "--speculative", "4")
    passes = re.search(r"window 4\): ([0-9.]+) forward passes per image", capsys.readouterr().out)
    assert passes and 1 <= float(passes.group(1)) <= 64
    assert np.array_equal(images("b.png", "--speculative", "4"), grid)
    assert np.array_equal(images("c.png", "--speculative", "--temperature", "0"), images("d.png", "--temperature", "0"))
    capsys.readouterr()
    T.main(tiny_run(text, "evaluate", "--eval-per-class", "1", "--speculative"))
    assert "speculative decoding (window 16):" in capsys.readouterr().out


@slow
def test_gif_shows_raster_order_generation(trained, tmp_path):
    _, classes = trained
    S.main(["--out-dir", str(classes), "--class-id", "0", "--num-samples", "2", "--output", str(tmp_path / "g.png"),
            "--gif", str(tmp_path / "g.gif"), "--gif-steps-per-frame", "20"])
    with Image.open(tmp_path / "g.gif") as gif:
        assert gif.n_frames == math.ceil(64 / 20)  # 8 x 8 tokens, 20 per frame
        gif.seek(gif.n_frames - 1)
        last = np.asarray(gif.convert("RGB")).astype(int)
    # a GIF frame holds 256 colors: close to the grid (these untrained images are noise), and exact
    # before encoding (below)
    assert np.abs(last - read_rgb(tmp_path / "g.png")).mean() < 8
    vq, _ = L.load_tokenizer(str(classes / "tokenizer.pt"))
    tokens = torch.randint(0, 256, (2, 64))
    frames = S.generation_frames(vq, tokens, torch.arange(64).expand(2, -1), steps_per_frame=8)
    assert len(frames) == 8 and torch.equal(frames[-1], S.decode(vq, tokens))
    assert (frames[0][:, :, 4:] == 0).all()           # after the first row of tokens, the rest is blank
    assert not (frames[1][:, :, 4:8] == 0).all()      # ... and the second row appears in frame 2


@slow
def test_official_checkpoints_end_to_end(fx, tmp_path):
    """The official path on the fixture's official-layout files: greedy CFG images are the
    official tokens decoded by the official tokenizer."""
    torch.save({"model": fx["vq"]["state_dict"]}, tmp_path / "vq_ds8.pt")
    torch.save({"model": fx["gpt_c2i"]["state_dict"], "args": argparse.Namespace(gpt_model="GPT-tiny")},
               tmp_path / "c2i.pt")
    S.main(["--official-vq", str(tmp_path / "vq_ds8.pt"), "--official-gpt", str(tmp_path / "c2i.pt"), "--image-size", "16",
            "--device", "cpu",  # the fixture's tokens and pixels were computed on a CPU
            "--class-id", "3", "--class-id", "7", "--num-samples", "1", "--top-k", "1", "--cfg-scale", "4",
            "--output", str(tmp_path / "c2i.png"), "--save-dir", str(tmp_path / "c2i")])
    vq = L.load_official_vq(fx["vq"]["state_dict"])
    expected = S.to_uint8(vq.decode_indices(fx["gpt_c2i"]["greedy_cfg4"].long().view(2, 8, 8)))
    assert np.array_equal(np.load(tmp_path / "c2i" / "samples.npz")["arr_0"], expected.permute(0, 2, 3, 1).numpy())
    torch.save({"model": fx["gpt_t2i"]["state_dict"]}, tmp_path / "t2i.pt")
    with pytest.raises(SystemExit, match="text-conditional and reads captions through flan-t5-xl .about 11 GB, not downloaded unasked.: download google/flan-t5-xl"):
        S.main(["--official-vq", str(tmp_path / "vq_ds8.pt"), "--official-gpt", str(tmp_path / "t2i.pt"),
                "--image-size", "16"])
    # an edit with the official models, at their size: a 40 x 30 photo, center-cropped and resized to 16 px
    write_image(str(tmp_path / "photo.png"), Image.fromarray(np.random.default_rng(0).integers(0, 255, (30, 40, 3),
                                                                                               dtype=np.uint8)))
    S.main(["--official-vq", str(tmp_path / "vq_ds8.pt"), "--official-gpt", str(tmp_path / "c2i.pt"), "--image-size", "16",
            "--class-id", "3", "--num-samples", "2", "--edit", str(tmp_path / "photo.png"), "--fill", "right",
            "--output", str(tmp_path / "edit.png")])
    grid = read_rgb(tmp_path / "edit.png")
    assert grid.shape == (2 + 18, 2 + 4 * 18, 3)  # the photo, what is kept, two edits
    photo = S.center_crop_resize(Image.open(tmp_path / "photo.png"), 16)
    assert np.abs(grid[2:18, 2:18].astype(int) - np.asarray(photo)).max() <= 1
    transformers = pytest.importorskip("transformers")
    tokenizer = L.TextTokenizer.train(CAPTIONS, vocab_size=40)
    hf = transformers.T5EncoderModel(transformers.T5Config(vocab_size=tokenizer.vocab_size, d_model=32, d_kv=8,
                                                           d_ff=64, num_layers=2, num_heads=4))
    hf.save_pretrained(tmp_path / "t5")
    (tmp_path / "t5" / "spiece.model").write_bytes(tokenizer.model_bytes)
    S.main(["--official-vq", str(tmp_path / "vq_ds8.pt"), "--official-gpt", str(tmp_path / "t2i.pt"), "--image-size", "16",
            "--t5", str(tmp_path / "t5"), "--prompt", "a red circle", "--num-samples", "2",
            "--output", str(tmp_path / "t2i.png")])
    assert read_rgb(tmp_path / "t2i.png").shape == (2 + 18, 2 + 2 * 18, 3)


class ReleaseServer:
    """A loopback HTTP server standing in for Hugging Face: it serves files under the release's
    paths (<repo>/resolve/main/<name>.pt), counts the requests, and can cut a file short, leave out
    its length, or stall halfway until go_on is set."""

    def __init__(self, files):
        import http.server
        import threading
        self.files, self.requests, self.cut_short, self.no_length, self.stall = files, [], set(), set(), set()
        self.go_on = threading.Event()
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                server.requests.append(self.path)
                body = server.files.get(self.path)
                if body is None:
                    self.send_error(404)
                    return
                self.send_response(200)
                if self.path not in server.no_length:
                    self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if self.path in server.stall:
                    self.wfile.write(body[:len(body) // 2])
                    self.wfile.flush()
                    server.go_on.wait(60)
                    return
                self.wfile.write(body[:len(body) // 2] if self.path in server.cut_short else body)

            def log_message(self, *args):
                pass
        self.http = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.http.server_address[1]}"
        threading.Thread(target=self.http.serve_forever, daemon=True).start()


@pytest.fixture
def release_server(monkeypatch, tmp_path):
    """Serves the given files as the release: sample.py fetches from it (no proxy, nothing beyond
    127.0.0.1) into a torch hub cache under tmp_path; shut down after the test."""
    servers = []

    def start(files):
        for variable in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
            monkeypatch.delenv(variable, raising=False)
        server = ReleaseServer(files)
        servers.append(server)
        monkeypatch.setenv(S.BASE_URL_VARIABLE, server.url)
        monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
        return server
    yield start
    for server in servers:
        server.go_on.set()
        server.http.shutdown()
        server.http.server_close()


@slow
def test_released_models_by_name(fx, tmp_path, monkeypatch, capsys, release_server):
    """--official NAME downloads the GPT and its tokenizer into the torch hub cache and samples the
    official tokens; a second run reads the cache without a request; a connection cut halfway or a
    404 leaves no file and gives the sentence; a damaged cached file is reported, not used. Here the
    release is the fixture's official-layout files, served on 127.0.0.1, at the fixture's 16 px."""
    def saved(state):
        path = tmp_path / "state.pt"
        torch.save({"model": state}, path)
        return path.read_bytes()
    gpt_path, vq_path = "/FoundationVision/LlamaGen/resolve/main/c2i_B_256.pt", \
        "/FoundationVision/LlamaGen/resolve/main/vq_ds16_c2i.pt"
    server = release_server({gpt_path: saved(fx["gpt_c2i"]["state_dict"]), vq_path: saved(fx["vq"]["state_dict"])})
    server.no_length.add(vq_path)  # a server that does not say how long a file is
    monkeypatch.setitem(S.RELEASES, "c2i_B_256", S.Release("FoundationVision/LlamaGen", 111e6, 16, "vq_ds16_c2i"))
    cache = tmp_path / "torch" / "hub" / "checkpoints"
    vq = L.load_official_vq(fx["vq"]["state_dict"])
    expected = S.to_uint8(vq.decode_indices(fx["gpt_c2i"]["greedy_cfg4"].long().view(2, 8, 8))).permute(0, 2, 3, 1)

    def sample(name):  # greedy with CFG 4: the fixture's official tokens
        S.main(["--official", "c2i_B_256", "--class-id", "3", "--class-id", "7", "--num-samples", "1", "--top-k", "1",
                "--device", "cpu", "--output", str(tmp_path / f"{name}.png"), "--save-dir", str(tmp_path / name)])
        return np.load(tmp_path / name / "samples.npz")["arr_0"]
    assert np.array_equal(sample("first"), expected.numpy())
    printed = capsys.readouterr().out
    assert f"downloading c2i_B_256.pt (0.00 GB) from {server.url}{gpt_path}" in printed
    assert "downloading vq_ds16_c2i.pt (size unknown)" in printed
    assert sorted(server.requests) == sorted([gpt_path, vq_path])
    assert sorted(os.listdir(cache)) == ["c2i_B_256.pt", "vq_ds16_c2i.pt"]
    assert np.array_equal(sample("second"), expected.numpy()) and len(server.requests) == 2  # from the cache
    capsys.readouterr()
    S.main(["--list-official"])
    header, *table, _ = capsys.readouterr().out.splitlines()
    column = header.index("cached")
    cached = {line.split()[0]: line[column:].split()[0] for line in table}
    assert len(table) == len(S.RELEASES) and cached["c2i_B_256"] == cached["vq_ds16_c2i"] == "yes"
    assert cached["c2i_L_256"] == "no"

    (cache / "c2i_B_256.pt").unlink()
    server.cut_short.add(gpt_path)
    _, message = fails(S.main, ["--official", "c2i_B_256", "--output", str(tmp_path / "x.png")], capsys)
    assert f"could not download {server.url}{gpt_path} (the connection closed early)" in message
    assert f"is {S.BASE_URL_VARIABLE} right? Or put the file there by hand: {cache / 'c2i_B_256.pt'}" in message
    assert sorted(os.listdir(cache)) == ["vq_ds16_c2i.pt"]                      # nothing half-written
    del server.files[gpt_path]
    _, message = fails(S.main, ["--official", "c2i_B_256", "--output", str(tmp_path / "x.png")], capsys)
    assert "HTTP Error 404" in message and sorted(os.listdir(cache)) == ["vq_ds16_c2i.pt"]
    (cache / "c2i_B_256.pt").write_bytes(b"PK\x03\x04 the first bytes of a zip, and then nothing")
    _, message = fails(S.main, ["--official", "c2i_B_256", "--output", str(tmp_path / "x.png")], capsys)
    assert "c2i_B_256.pt, a download in the cache, is truncated or damaged" in message
    assert "delete it, and the next run downloads it again" in message
    _, message = fails(S.main, ["--official", "c2i_L_9", "--output", str(tmp_path / "x.png")], capsys)
    assert "invalid choice: 'c2i_L_9' (choose from 'c2i_B_256', 'c2i_B_384'" in message
    requests = len(server.requests)
    _, message = fails(S.main, ["--official", "t2i_XL_stage1_256", "--output", str(tmp_path / "x.png")], capsys)
    assert "reads captions through flan-t5-xl (about 11 GB, not downloaded unasked)" in message
    assert len(server.requests) == requests                                      # said before any download


@slow
def test_a_download_cut_short_or_stopped_leaves_nothing_behind(fx, tmp_path, capsys, release_server):
    """A server that gives no length and closes halfway: the file does not take the model's name
    (what came is not a whole checkpoint). SIGTERM during a download: a non-zero exit, one
    sentence, no partial file. A partial file that a killed process left is removed by the next
    download of that file; one a running process (or another machine sharing the cache) writes is
    left alone."""
    path = tmp_path / "state.pt"
    torch.save({"model": fx["vq"]["state_dict"]}, path)
    served = "/FoundationVision/LlamaGen/resolve/main/vq_ds8_c2i.pt"
    server = release_server({served: path.read_bytes()})
    server.no_length.add(served)
    server.cut_short.add(served)
    cache = tmp_path / "torch" / "hub" / "checkpoints"
    with pytest.raises(OSError, match=r"\(the connection closed early: what came is not a whole checkpoint\)"):
        S.fetch_release("vq_ds8_c2i")
    assert os.listdir(cache) == []
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    mine = S.partial_prefix("vq_ds8_c2i")  # "vq_ds8_c2i.<this machine>.<this process>."
    host = mine.rsplit(".", 2)[0]
    stale = [cache / f"{host}.{dead.pid}.x1.partial", cache / f"{mine}x2.partial", cache / "vq_ds8_c2i.x3.partial",
             cache / "vq_ds8_c2i.99999999999999999999.x4.partial"]
    kept = [cache / f"{host}.{alive.pid}.x5.partial", cache / f"vq_ds8_c2i.elsewhere.{dead.pid}.x6.partial"]
    for partial in stale + kept:
        partial.write_bytes(b"half a file")
    server.cut_short.clear()
    server.no_length.clear()
    assert S.fetch_release("vq_ds8_c2i") == str(cache / "vq_ds8_c2i.pt")
    alive.kill()
    assert sorted(os.listdir(cache)) == sorted(["vq_ds8_c2i.pt"] + [partial.name for partial in kept])
    for partial in kept:
        partial.unlink()
    gpt = "/FoundationVision/LlamaGen/resolve/main/c2i_B_256.pt"
    server.files[gpt] = path.read_bytes()
    server.files["/FoundationVision/LlamaGen/resolve/main/vq_ds16_c2i.pt"] = path.read_bytes()
    server.stall.add(gpt)
    process = subprocess.Popen([sys.executable, os.path.join(HERE, "sample.py"), "--official", "c2i_B_256", "--output",
                                str(tmp_path / "x.png")], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env=dict(os.environ))
    deadline = time.time() + 60
    while not any(name.startswith("c2i_B_256.") and (cache / name).stat().st_size for name in os.listdir(cache)):
        assert time.time() < deadline and process.poll() is None, "the download never started"
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=60)
    assert process.returncode == 143 and "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith("stopped (SIGTERM): no image was written; the unfinished download "
                                                   "was removed")
    assert sorted(os.listdir(cache)) == ["vq_ds16_c2i.pt", "vq_ds8_c2i.pt"]


@slow
def test_a_download_that_does_not_fit_is_refused_before_it_starts(tmp_path, monkeypatch, capsys, release_server):
    path = "/FoundationVision/LlamaGen/resolve/main/vq_ds8_c2i.pt"
    release_server({path: b"x" * 5000})
    monkeypatch.setattr(S.shutil, "disk_usage", lambda folder: argparse.Namespace(free=4000))
    with pytest.raises(OSError, match=r"vq_ds8_c2i.pt takes 0.00 GB but .* has 0.00 GB free: free some space, or set "
                                      "TORCH_HOME to another disk"):
        S.fetch_release("vq_ds8_c2i")
    assert os.listdir(tmp_path / "torch" / "hub" / "checkpoints") == []


# -----------------------------------------------------------------------------
# Robustness: one sentence and a non-zero exit for every mistake, nothing lost on interruption


def fails(main, argv, capsys):
    """Run a script's main() that must fail: (exit status, its last line). That line says what is
    wrong, and there is no traceback (progress bars may come before it)."""
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    code = exit_info.value.code
    printed = code if isinstance(code, str) else capsys.readouterr().err
    status = 1 if isinstance(code, str) else code
    assert status != 0 and "Traceback" not in printed
    return status, printed.strip().replace("\r", "\n").splitlines()[-1]


@slow
@pytest.mark.parametrize("argv, expected", [
    (["--image-size", "0"], "--image-size: 0 is out of range: it must be at least 1"),
    (["--image-size", "-32"], "--image-size: -32 is out of range"),
    (["--tokenizer-batch-size", "0"], "--tokenizer-batch-size: 0 is out of range"),
    (["--gpt-steps", "-1"], "--gpt-steps: -1 is out of range"),
    (["--tokenizer-lr", "0"], "--tokenizer-lr: 0 is out of range: it must be above 0"),
    (["--ema", "1.5"], "--ema: 1.5 is out of range"),
    (["--cfg-scale", "-1"], "--cfg-scale: -1 is out of range"),
    (["--num-images", "many"], "--num-images: 'many' is not a whole number"),
    (["--device", "nonsense"], "--device 'nonsense' is not a device"),
    (["--device", "cuda"] if not torch.cuda.is_available() else ["--device", "cuda:99"], "--device cuda"),
    (["--out-dir", "/proc/llamagen-test"], "--out-dir /proc/llamagen-test cannot be written"),
    (["--holdout", "purple hexagon"], "unknown --holdout purple hexagon"),
    (["--speculative"], "--speculative is for sampling: use it with python train.py evaluate"),
    (["--speculative", "0"], "--speculative: 0 is out of range"),
    (["--num-iter", "4"], "--num-iter does not apply to --order raster with --tokens discrete, which samples with "
                          "--cfg-scale, --temperature, --cfg-interval, --top-k, --top-p: leave it out."),
    (["--diffusion-steps", "4"], "--diffusion-steps does not apply to --order raster with --tokens discrete"),
    (["--order", "masked", "--tokens", "continuous", "--choice-temperature", "1"],
     "--choice-temperature does not apply to --order masked with --tokens continuous"),
    (["--order", "scales", "--num-iter", "2"], "--num-iter does not apply to --order scales with --tokens multiscale"),
    (["--order", "scales", "--rope", "1d"], "--rope 1d does not apply to --order scales, which places its cells by "
                                            "learned positions and no RoPE, as VAR: leave it out."),
    (["--order", "masked", "--num-iter", "65", "--num-images", "8"], "--num-iter 65 is out of range"),  # before training
    (["--order", "sideways"], "--order: invalid choice: 'sideways'"),
    (["--tokens", "continuous", "--codebook-size", "64"], "--codebook-size is for discrete tokens, not continuous ones"),
    (["--tokens", "multiscale", "--order", "raster"], "--order raster generates discrete or continuous tokens, not "
                                                      "multiscale ones: leave out --tokens, or use --order scales for "
                                                      "multiscale tokens"),
    (["--order", "scales", "--scales", "1,4,2"], "--scales: 1,4,2: the scales start at 1 and grow"),
    (["--order", "scales", "--scales", "1,2,4", "--num-images", "8"], "the last scale is 4 x 4 but 32 px images make a "
                                                                      "8 x 8 grid: end the scales at 8."),
])
def test_train_argument_errors(argv, expected, capsys, tmp_path):
    status, message = fails(T.main, ["--out-dir", str(tmp_path / "out"), *argv], capsys)
    assert expected in message


RUN_STEPS = ["--cond", "class", "--tokenizer-steps", "3", "--gpt-steps", "3", "--disc-start", "100"]  # the runs'


@slow
@pytest.mark.parametrize("name, argv, expected", [
    ("continuous", ["evaluate", "--speculative", "--eval-per-class", "1"],
     "--speculative needs each token's probability, which a GPT over codes gives; this GPT draws continuous tokens "
     "(MAR): leave out --speculative."),
    ("masked", ["evaluate", "--eval-per-class", "1", "--num-iter", "65"], "--num-iter 65 is out of range"),
    ("masked", [*RUN_STEPS, *RUNS["masked"], "--resume", "--order", "raster", "--num-iter", "4"],
     "--order masked -> raster"),
    ("scales", [*RUN_STEPS, *RUNS["scales"], "--phi-ratio", "0", "--resume"], "--phi-ratio None -> 0.0"),
    ("continuous", ["gpt", "--cond", "class", "--overwrite"],
     "tokenizer.pt makes continuous tokens, not discrete ones: pass --tokens continuous"),
    ("scales", ["gpt", "--cond", "class", "--overwrite"],
     "tokenizer.pt makes multiscale tokens, not discrete ones: pass --tokens multiscale"),
    ("raster", ["gpt", "--order", "scales", "--tokenizer-preset", "MSVQ-mini", "--cond", "class", "--overwrite"],
     "tokenizer.pt makes discrete tokens, not multiscale ones: pass --tokens discrete"),
    # the tokenizer's settings, which the gpt stage cannot change, are the trained tokenizer's
    ("scales", ["gpt", "--order", "scales", "--tokenizer-preset", "MSVQ-mini", "--scales", "1,2,4,8", "--phi-ratio", "0",
                "--cond", "class", "--overwrite"], "--scales 1,2,4,8: "),
    ("scales", ["gpt", "--order", "scales", "--tokenizer-preset", "MSVQ-mini", "--phi-ratio", "0", "--cond", "class",
                "--overwrite"], "tokenizer.pt was trained with --phi-ratio 0.5, which the gpt stage cannot change: "
                                "leave the flag out (or pass that), or train a new tokenizer with it"),
    ("raster", ["gpt", "--cond", "class", "--codebook-size", "64", "--overwrite"],
     "--codebook-size 64: "),
    ("raster", ["gpt", "--cond", "class", "--no-codebook-l2-norm", "--overwrite"],
     "--no-codebook-l2-norm: "),
    ("raster", ["gpt", "--cond", "class", "--tokenizer-preset", "VQ-tiny", "--overwrite"],
     "--tokenizer-preset VQ-tiny: "),
    ("continuous", ["gpt", "--tokens", "continuous", "--tokenizer-preset", "KL-mini", "--kl-weight", "0.5", "--cond",
                    "class", "--overwrite"], "--kl-weight 0.5: "),
])
def test_train_errors_on_a_finished_run(name, argv, expected, runs, capsys, tmp_path):
    """A copy of a finished run, and a command line that does not fit it: one sentence, nothing
    written."""
    shutil.copytree(runs[name], tmp_path / "run")
    before = {file: (tmp_path / "run" / file).read_bytes() for file in ("tokenizer.pt", "gpt.pt")}
    _, message = fails(T.main, tiny_run(tmp_path / "run", *argv), capsys)
    assert expected in message
    assert all((tmp_path / "run" / file).read_bytes() == content for file, content in before.items())


@slow
def test_train_out_dir_that_is_a_file(tmp_path, capsys):
    (tmp_path / "file").write_text("")
    _, message = fails(T.main, ["--out-dir", str(tmp_path / "file")], capsys)
    assert "is a file, not a folder" in message
    _, message = fails(T.main, ["--out-dir", str(tmp_path / "file" / "below")], capsys)
    assert "cannot be written" in message


@slow
@pytest.mark.parametrize("name, argv, expected", [(name, [flag], f"{flag} is for raster order, and this GPT generates "
                                                                 f"in {order} order: leave out {flag}.")
                                                  for name, order in [("masked", "masked"), ("scales", "scales")]
                                                  for flag in ["--speculative", "--no-kv-cache", "--compile"]] + [
    ("continuous", ["--speculative"], "--speculative needs each token's probability, which a GPT over codes gives; "
                                      "this GPT draws continuous tokens (MAR): leave out --speculative."),
    ("continuous", ["--top-k", "10"], "--top-k does not apply to this GPT (raster order), which samples with "
                                      "--cfg-scale, --temperature, --cfg-interval, --diffusion-steps: leave it out."),
    ("masked", ["--cfg-interval", "3"], "--cfg-interval does not apply to this GPT (masked order), which samples with "
                                        "--cfg-scale"),
    ("masked", ["--num-iter", "65"], "--num-iter 65 is out of range: it must be at least 1 and at most 64, the "
                                     "tokens of this model's image."),
    ("masked-continuous", ["--choice-temperature", "1"], "--choice-temperature does not apply to this GPT (masked "
                                                         "order)"),
    ("scales", ["--num-iter", "4"], "--num-iter does not apply to this GPT (scales order), which samples with "
                                    "--cfg-scale, --temperature, --cfg-schedule, --top-k, --top-p: leave it out."),
    ("raster", ["--num-iter", "4"], "--num-iter does not apply to this GPT (raster order)"),
    ("raster", ["--cfg-schedule", "ramp"], "--cfg-schedule does not apply to this GPT (raster order)"),
] + [("text", argv, expected) for argv, expected in [
    (["--num-samples", "0"], "--num-samples: 0 is out of range"),
    (["--num-samples", "-3"], "--num-samples: -3 is out of range"),
    (["--cfg-scale", "-0.5"], "--cfg-scale: -0.5 is out of range: it must be at least 0"),
    (["--top-p", "0"], "--top-p: 0 is out of range: it must be above 0 and at most 1"),
    (["--top-p", "1.5"], "--top-p: 1.5 is out of range"),
    (["--temperature", "-1"], "--temperature: -1 is out of range"),
    (["--top-k", "-5"], "--top-k: -5 is out of range"),
    (["--prompt", " "], "an empty prompt says nothing"),
    (["--device", "nonsense"], "--device 'nonsense' is not a device"),
    (["--device", "cuda"] if not torch.cuda.is_available() else ["--device", "cuda:99"], "--device cuda"),
    (["--output", "grid.xyz"], "needs a file extension Pillow can write"),
    (["--gif", "animation.png"], "--gif animation.png needs a file extension Pillow can write (.gif)"),
    (["--official-vq", "vq_ds16_c2i.pt"], "pass both --official-vq and --official-gpt"),
    (["--benchmark", "--diffusion-steps", "5"], "--diffusion-steps does not apply to this GPT (raster order), which "
                                                "samples with --cfg-scale, --temperature, --cfg-interval, --top-k"),
    (["--benchmark", "--image-size", "40"], "--image-size 40 is not a multiple of 16 (VQ-16's downsampling)."),
    (["--speculative", "0"], "--speculative: 0 is out of range"),
    (["--speculative", "--no-kv-cache"], "--speculative has its own loop: leave out --no-kv-cache"),
    (["--speculative", "--compile"], "--speculative has its own loop: leave out --compile"),
]])
def test_sample_argument_errors(name, argv, expected, capsys, trained, runs, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _, message = fails(S.main, ["--out-dir", str(trained[0] if name == "text" else runs[name]), *argv], capsys)
    assert expected in message
    assert not os.listdir(tmp_path)  # nothing written


@slow
def test_sample_output_paths_are_checked_before_sampling(trained, tmp_path, capsys, monkeypatch):
    text, _ = trained
    (tmp_path / "file").write_text("")
    monkeypatch.setattr(S, "generate_tokens", lambda *a: pytest.fail("sampled before checking the outputs"))
    for argv, expected in [(["--output", str(tmp_path)], "is a folder: pass a file name"),
                           (["--save-dir", str(tmp_path / "file")], "--save-dir .* is a file, not a folder"),
                           (["--gif", str(tmp_path / "file" / "g.gif")], "the folder of --gif .*file is a file, not a folder"),
                           (["--output", "/proc/llamagen-test/x.png"], "cannot be written")]:
        _, message = fails(S.main, ["--out-dir", str(text), "--output", str(tmp_path / "ok.png"), *argv], capsys)
        assert __import__("re").search(expected, message), message


@slow
def test_sample_checkpoint_errors(trained, runs, tmp_path, capsys):
    text, classes = trained
    checks = []

    def folder(name, vq, gpt):  # an out-dir holding the given checkpoint dicts or bytes
        path = tmp_path / name
        path.mkdir()
        for file, content in (("tokenizer.pt", vq), ("gpt.pt", gpt)):
            if isinstance(content, bytes):
                (path / file).write_bytes(content)
            else:
                torch.save(content, path / file)
        return str(path)
    vq = torch.load(classes / "tokenizer.pt", weights_only=True)
    gpt = torch.load(classes / "gpt.pt", weights_only=True)
    checks.append(([folder("swapped", gpt, vq)], "holds the GPT (gpt.pt), not the tokenizer (tokenizer.pt): were the "
                                                 "two files swapped?"))
    newer = dict(vq, format=L.CHECKPOINT_FORMAT + 1)
    checks.append(([folder("newer", newer, gpt)], "written by a newer version of this code"))
    older = {k: v for k, v in vq.items() if k != "format"}
    checks.append(([folder("older", older, gpt)], "written by an older version of this code"))
    unknown = dict(vq, config=dict(vq["config"], codebook_magic=3))
    checks.append(([folder("unknown", unknown, gpt)], "has settings this version does not know (codebook_magic)"))
    edited = {k: v for k, v in gpt.items() if k != "tokenizer_fingerprint"}
    checks.append(([folder("edited", vq, edited)], "has no tokenizer_fingerprint: it is damaged or was edited"))
    retrained = dict(vq["model"], **{"decoder.conv_out.bias": vq["model"]["decoder.conv_out.bias"] + 0.1})
    other_vq = dict(vq, model=retrained)  # the same codebook size, other weights
    checks.append(([folder("other_tokenizer", other_vq, gpt)], "was trained on another tokenizer than"))
    scales_vq, scales_gpt = (torch.load(runs["scales"] / name, weights_only=True) for name in ("tokenizer.pt", "gpt.pt"))
    no_positions = dict(scales_gpt, model={k: v for k, v in scales_gpt["model"].items() if k != "pos_embedding"})
    checks.append(([folder("before_positions", scales_vq, no_positions)], "gpt.pt has no pos_embedding: it was saved "
                   "by an older version of this code, whose ScaleGPT had none; retrain the GPT on its tokenizer.pt"))
    for name in ("continuous", "scales"):  # a VQ with a GPT over other tokens
        other_gpt = torch.load(runs[name] / "gpt.pt", weights_only=True)
        checks.append(([folder(f"mixed_{name}", vq, other_gpt)], f"gpt.pt models {other_gpt['config']['token_kind']} "
                                                                  "tokens but"))
    checks.append(([folder("truncated", vq, (classes / "gpt.pt").read_bytes()[:5000])], "is truncated or damaged"))
    checks.append(([folder("not_torch", vq, b"hello, I am a text file\n")], "is not a PyTorch checkpoint"))
    checks.append(([folder("empty", vq, b"")], "is empty"))
    checks.append((["--official-vq", str(classes / "tokenizer.pt"), "--official-gpt", str(classes / "gpt.pt"),
                    "--image-size", "32"], "is one of this project's checkpoints, not an official LlamaGen file: "
                                           "pass its folder with --out-dir"))
    for argv, expected in checks:
        if not argv[0].startswith("--"):
            argv = ["--out-dir", argv[0]]
        _, message = fails(S.main, argv + ["--output", str(tmp_path / "x.png")], capsys)
        assert expected in message, (argv, message)


@slow
def test_sample_condition_errors(trained, tmp_path, capsys):
    text, classes = trained
    for out_dir, argv, expected in [
            (tmp_path, [], "run python train.py first"),
            (classes, ["--class-name", "purple circle"], "unknown class name 'purple circle'; the classes are: red circle, "),
            (classes, ["--class-id", "18"], "class id 18 is out of range: this model knows ids 0 to 17"),
            (classes, ["--prompt", "a red circle"], "class-conditional: use --class-id or --class-name"),
            (text, ["--class-id", "1"], "text-conditional: use --prompt")]:
        _, message = fails(S.main, ["--out-dir", str(out_dir), "--output", str(tmp_path / "x.png"), *argv], capsys)
        assert expected in message


def test_fuzzed_images_are_skipped(tmp_path):
    rng = random.Random(1)
    for i in range(20):
        (tmp_path / f"noise{i}.png").write_bytes(bytes(rng.getrandbits(8) for _ in range(rng.randint(0, 3000))))
    write_image(str(tmp_path / "real.png"), Image.new("RGB", (32, 32), (1, 2, 3)))
    with pytest.warns(UserWarning, match="20 unreadable, truncated or corrupt image files were skipped"):
        folder = T.ImageFolderDataset(str(tmp_path), 16)
    assert len(folder.images) == 1
    (tmp_path / "real.png").unlink()
    with pytest.raises(ValueError, match="none of the 20 image files"):
        T.ImageFolderDataset(str(tmp_path), 16)


@slow
def test_a_finished_run_is_never_overwritten_by_accident(tmp_path, capsys):
    T.main(tiny_run(tmp_path, "--tokenizer-steps", "2", "--gpt-steps", "2", "--disc-start", "100"))
    before = {name: (tmp_path / name).read_bytes() for name in ("tokenizer.pt", "gpt.pt")}
    _, message = fails(T.main, tiny_run(tmp_path, "--tokenizer-steps", "2", "--gpt-steps", "2", "--disc-start", "100"), capsys)
    assert "tokenizer.pt holds a finished run: continue it with --resume, start over with --overwrite" in message
    _, message = fails(T.main, tiny_run(tmp_path, "gpt", "--gpt-steps", "2"), capsys)
    assert "gpt.pt holds a finished run" in message
    assert all((tmp_path / name).read_bytes() == content for name, content in before.items())
    _, message = fails(T.main, tiny_run(tmp_path, "--tokenizer-steps", "2", "--gpt-steps", "2", "--disc-start", "100",
                                        "--resume", "--image-size", "64"), capsys)
    assert "--resume with other settings than" in message and "--image-size 32 -> 64" in message
    _, message = fails(T.main, tiny_run(tmp_path / "new", "--resume"), capsys)
    assert "holds no tokenizer.pt or gpt.pt to continue: leave --resume out" in message
    T.main(tiny_run(tmp_path, "--tokenizer-steps", "2", "--gpt-steps", "2", "--disc-start", "100", "--overwrite", "--seed", "1"))
    assert (tmp_path / "tokenizer.pt").read_bytes() != before["tokenizer.pt"]


@slow
def test_a_loss_that_is_not_a_number_stops_training(tmp_path, capsys, monkeypatch):
    generator_loss = L.VQLoss.generator_loss

    def nan_at_step_5(self, images, recon, vq_losses, step, last_layer):
        loss, logs = generator_loss(self, images, recon, vq_losses, step, last_layer)
        return (loss * float("nan") if step == 4 else loss), logs
    monkeypatch.setattr(L.VQLoss, "generator_loss", nan_at_step_5)
    status, message = fails(T.main, tiny_run(tmp_path, "--tokenizer-steps", "8", "--save-every", "2", "--disc-start", "100"),
                            capsys)
    assert status == 1 and "the loss became nan at step 5" in message and "tokenizer.pt keeps the last checkpoint" in message
    assert L.load_checkpoint(str(tmp_path / "tokenizer.pt"), "tokenizer")["step"] == 4


def start_training(out_dir, *extra):
    command = [sys.executable, os.path.join(HERE, "train.py"), *tiny_run(out_dir, *extra)]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, OMP_NUM_THREADS="1"))


def wait_for_log(out_dir, text, process, after=0, timeout=120):
    """Wait until log.txt, past its first `after` characters, shows `text`."""
    log = os.path.join(out_dir, "log.txt")
    deadline = time.time() + timeout
    while time.time() < deadline and process.poll() is None:
        if os.path.exists(log) and text in open(log).read()[after:]:
            return
        time.sleep(0.05)
    pytest.fail(f"training never logged {text!r}")


@slow
def test_ctrl_c_saves_the_current_step_and_resume_continues(tmp_path):
    steps = ("--tokenizer-steps", "25", "--gpt-steps", "2", "--disc-start", "1000")
    process = start_training(tmp_path, *steps)
    wait_for_log(tmp_path, "tokenizer step 5/", process)
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=60)
    assert process.returncode == 130 and "Traceback" not in err
    step = L.load_checkpoint(str(tmp_path / "tokenizer.pt"), "tokenizer")["step"]
    assert 5 <= step < 25 and len(logged(tmp_path, "tokenizer", "loss")) == step  # the step in progress, completed
    assert err.strip().splitlines()[-1] == (f"stopped at step {step} of 25 and saved {tmp_path}/tokenizer.pt; continue "
                                            "with the same command and --resume.")
    process = start_training(tmp_path, *steps, "--resume")
    _, err = process.communicate(timeout=600)
    assert process.returncode == 0, err
    assert f"resuming the tokenizer from {tmp_path}/tokenizer.pt at step {step}" in open(tmp_path / "log.txt").read()
    assert L.load_checkpoint(str(tmp_path / "tokenizer.pt"), "tokenizer")["step"] == 25
    assert L.load_checkpoint(str(tmp_path / "gpt.pt"), "gpt")["step"] == 2


@slow
def test_a_hard_kill_leaves_a_loadable_checkpoint(tmp_path):
    """SIGKILL at moments spread over a run that saves at every step: the checkpoint on disk is
    always whole (atomic writes), and --resume continues from it."""
    steps = ("--tokenizer-steps", "400", "--gpt-steps", "2", "--disc-start", "1000", "--save-every", "1")
    for delay in (0.0, 0.09, 0.31):
        log = tmp_path / "log.txt"
        after = len(log.read_text()) if log.exists() else 0
        process = start_training(tmp_path, *steps, *(["--resume"] if (tmp_path / "tokenizer.pt").exists() else []))
        wait_for_log(tmp_path, "tokenizer step" if after else "tokenizer step 2/", process, after)  # step 1 saved
        time.sleep(delay)
        process.kill()
        process.communicate()
        checkpoint = L.load_checkpoint(str(tmp_path / "tokenizer.pt"), "tokenizer")
        assert 1 <= checkpoint["step"] < 400
        if after:
            assert f"at step {previous}" in log.read_text()[after:]  # resumed from the last checkpoint
        previous = checkpoint["step"]


# -----------------------------------------------------------------------------
# The README: every command and snippet in it runs on this code

README = os.path.join(HERE, "README.md")
TINY_TRAIN = ["--num-images", "48", "--tokenizer-steps", "2", "--gpt-steps", "2", "--disc-start", "100",
              "--tokenizer-batch-size", "4", "--gpt-batch-size", "8", "--gpt-preset", "GPT-tiny", "--warmup", "1",
              "--eval-per-class", "0", "--log-every", "1", "--perceptual-weight", "0"]
TINY_BENCHMARK = ["--preset", "GPT-tiny", "--image-size", "64", "--repeat", "1"]


def readme_commands():
    """The README's shell commands: every line of its bash blocks, continuation lines joined and
    comments dropped, split at '&&'."""
    import re
    import shlex
    text = open(README).read()
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            while words:
                end = words.index("&&") if "&&" in words else len(words)
                commands.append(words[:end])
                words = words[end + 1:]
    return commands


def run_readme_command(words, sandbox):
    """One README command in the sandbox: our scripts in this process with tiny settings, the
    shell helpers they need (mkdir, cp) with Python; what needs a GPU, a network or another tool
    is not run. Returns whether it ran."""
    import shutil
    if words[0] == "time":
        words = words[1:]
    if words[:2] == ["mkdir", "-p"]:
        for folder in words[2:]:
            os.makedirs(sandbox / folder, exist_ok=True)
        return True
    if words[0] == "cp":
        shutil.copy(sandbox / words[1], sandbox / words[2])
        return True
    if words[0] != "python" or words[1] not in ("train.py", "sample.py"):
        return False  # pip, pytest, torchrun (tested by test_ddp_replicas_stay_identical), FID tools
    if "--compile" in words or any(word.startswith("cuda") for word in words):
        return False  # a GPU, or minutes of compiling: test_compiled_decode_step_is_one_graph covers it
    args = words[2:]
    out_dir = args[args.index("--out-dir") + 1] if "--out-dir" in args else "out"

    def continuous():  # a trained GPT over continuous tokens samples with few diffusion steps here
        return torch.load(sandbox / out_dir / "gpt.pt", weights_only=True)["config"]["token_kind"] == "continuous"
    if words[1] == "train.py":
        stage_and_settings = args + TINY_TRAIN + (["--diffusion-steps", "2"] if "continuous" in args else [])
        if args and args[0] == "evaluate":
            T.main(args + ["--eval-per-class", "1"] + (["--diffusion-steps", "2"] if continuous() else []))
        else:
            T.main(stage_and_settings + ([] if "--resume" in args else ["--overwrite"]))
        return True
    if "--benchmark" in args:
        S.main(args + TINY_BENCHMARK)
        return True
    if "--official-gpt" in args:
        S.main(args + ["--image-size", "16"])  # the fixture's official-layout models are 16 px
        return True
    if "--official" in args or "--list-official" in args:  # the sandbox serves the release on 127.0.0.1
        S.main(args)
        return True
    S.main(args + (["--diffusion-steps", "2"] if continuous() else []))
    return True


@pytest.fixture
def sandbox(fx, tmp_path, monkeypatch, release_server):
    """A folder as a reader has it: the official checkpoints (the fixture's official-layout files
    under the released names, on disk and served by a loopback stand-in for Hugging Face), a
    flan-t5-xl directory (a tiny T5), and a folder of their own images (my_images/) with class
    subfolders and captions."""
    transformers = pytest.importorskip("transformers")
    torch.save({"model": fx["vq"]["state_dict"]}, tmp_path / "vq_ds16_c2i.pt")
    c2i = dict(fx["gpt_c2i"]["state_dict"])  # 1000 classes, so that the README's ImageNet ids exist
    c2i["cls_embedding.embedding_table.weight"] = torch.randn(1001, c2i["tok_embeddings.weight"].shape[1]) * 0.02
    torch.save({"model": c2i}, tmp_path / "c2i_L_256.pt")
    torch.save({"model": fx["gpt_t2i"]["state_dict"]}, tmp_path / "t2i_XL_stage1_256.pt")
    tokenizer = L.TextTokenizer.train(CAPTIONS, vocab_size=40)
    t5 = transformers.T5EncoderModel(transformers.T5Config(vocab_size=tokenizer.vocab_size, d_model=32, d_kv=8,
                                                           d_ff=64, num_layers=2, num_heads=4))
    t5.save_pretrained(tmp_path / "flan-t5-xl")
    (tmp_path / "flan-t5-xl" / "spiece.model").write_bytes(tokenizer.model_bytes)
    release_server({f"/{S.RELEASES[name].repo}/resolve/main/{name}.pt": (tmp_path / file).read_bytes()
                    for name, file in [("vq_ds16_c2i", "vq_ds16_c2i.pt"), ("c2i_B_256", "c2i_L_256.pt"),
                                       ("vq_ds16_t2i", "vq_ds16_c2i.pt"), ("t2i_XL_stage1_256", "t2i_XL_stage1_256.pt")]})
    for name in ("c2i_B_256", "t2i_XL_stage1_256"):  # at the fixture's 16 px
        monkeypatch.setitem(S.RELEASES, name, dataclasses.replace(S.RELEASES[name], image_size=16))
    for i in range(24):
        name = ("cats", "dogs")[i % 2]
        write_image(str(tmp_path / "my_images" / name / f"{i}.png"), Image.new("RGB", (64, 64), (10 * i, 80, 200)))
        (tmp_path / "my_images" / name / f"{i}.txt").write_text(f"a {name[:-1]} number {i}")
    shutil.copytree(os.path.join(os.path.dirname(README), "assets"), tmp_path / "assets")  # the README's edit input
    monkeypatch.chdir(tmp_path)
    return tmp_path


@slow
def readme_folder(words):
    """The folder a README command trains into or reads from, the runs of one such folder being a
    chain: --out-dir (out by default) for our scripts, the destination for mkdir and cp, None for
    the rest; ex/... and runs/... count as one folder each."""
    words = words[1:] if words[0] == "time" else words
    if words[0] in ("mkdir", "cp"):
        folder = words[-1]
    elif words[0] == "python" and words[1] in ("train.py", "sample.py") and not any(
            word.startswith(("--official", "--benchmark", "--list-official")) for word in words):
        folder = words[words.index("--out-dir") + 1] if "--out-dir" in words else "out"
    else:
        return None
    return folder.split("/")[0] if folder.startswith(("ex/", "runs/")) else folder.rstrip("/")


def readme_chains():
    """{folder: its README commands in order}; a chain that copies from another folder (cp out/...)
    or starts from its model (--anole DIR) starts with that folder's first training."""
    chains = {}
    for words in readme_commands():
        chains.setdefault(readme_folder(words), []).append(words)
    for commands in chains.values():
        sources = {words[1].split("/")[0] for words in commands if words[0] == "cp"} | {
            words[words.index("--anole") + 1] for words in commands if "--anole" in words}
        commands[:0] = [chains[source][0] for source in sources]
    return chains


def test_readme_chains_hold_every_command():
    chains = readme_chains()
    assert sum(len(commands) for commands in chains.values()) >= len(readme_commands()) >= 60
    assert {"out", "out-mar", "out-masked", "out-mar-masked", "out-scales", "ex", "runs", None} <= set(chains)


@slow
@pytest.mark.parametrize("folder", list(readme_chains()))
def test_readme_commands_run(folder, sandbox):
    """The README's commands, a chain of one folder at a time in a fresh sandbox (so that the
    chains can run in parallel): every one runs, but for those that need a GPU, the network or
    another tool."""
    skipped = [" ".join(words) for words in readme_chains()[folder] if not run_readme_command(words, sandbox)]
    assert all(c.split()[0] in ("pip", "torchrun") or "pytest" in c or "--compile" in c or "cuda" in c
               or "fid" in c.lower() for c in skipped), skipped


@slow
def test_readme_snippets_run(sandbox):
    import re
    snippets = re.findall(r"```python\n(.*?)```", open(README).read(), re.S)
    assert len(snippets) >= 2
    promises = 0
    for snippet in snippets:
        if "load_official" not in snippet:  # the released weights' shapes: the sandbox has tiny stand-ins
            snippet, checks = with_shape_checks(snippet)
            promises += checks
        exec(compile(snippet, "README.md", "exec"), {})
    assert promises >= 5


def with_shape_checks(snippet):
    """The snippet with an assertion after each assignment whose comment promises a shape, such as
    `codes = vq.encode(images)  # (2, 64)` (of the first name in `a, b = ...`), and how many there are."""
    import ast
    import re
    lines = snippet.splitlines()
    checks = []
    for node in ast.parse(snippet).body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1:
            target = node.targets[0].elts[0] if isinstance(node.targets[0], ast.Tuple) else node.targets[0]
            promised = re.search(r"#\s*(\([\d, ]+\))", lines[node.end_lineno - 1])
            if promised and isinstance(target, ast.Name):
                checks.append((node.end_lineno, target.id, promised.group(1)))
    for line, name, shape in reversed(checks):
        lines.insert(line, f"assert tuple({name}.shape) == {shape}, ('README: {name}', tuple({name}.shape))")
    return "\n".join(lines), len(checks)
