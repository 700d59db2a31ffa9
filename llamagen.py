"""LlamaGen in one file: autoregressive image generation with a VQ tokenizer and a plain Llama.

"Autoregressive Model Beats Diffusion: Llama for Scalable Image Generation" (Sun et al. 2024,
https://arxiv.org/abs/2406.06525). An image becomes a grid of discrete codes (the VQ tokenizer); a
decoder-only Llama predicts those codes one by one in raster order, conditioned on a class label or
on a caption; a sampled code grid is decoded back into pixels.

Read it top to bottom:
  1. image tokenizer  Encoder -> VectorQuantizer -> Decoder        (VQGAN / taming-transformers,
                      l2-normalised low-dimensional codes as in ViT-VQGAN, LlamaGen's vq_model.py)
  2. tokenizer losses L2 + LPIPS + PatchGAN hinge + codebook/commitment (taming, LlamaGen vq_loss.py)
  3. Llama blocks     RMSNorm, 2D RoPE, attention with a static KV cache, SwiGLU, the condition
                      embedders                            (Llama, gpt-fast, LlamaGen gpt.py)
  4. codes in, out    a learned vector per code in; logits out: cross-entropy, classifier-free
                      guidance, temperature / top-k / top-p   (LlamaGen generate.py, Ho & Salimans 2022)
  5. Llama, GPT       the Llama assembled (Llama, shared by every generator, with what every
                      generation starts with); GPT, LlamaGen's raster order: teacher forcing, then
                      generation through the KV cache: prefill, and decode_one_token -> guide ->
                      sample_code per token (gpt-fast)
  6. speculative      speculative Jacobi decoding, the same images in fewer passes (Teng et al.
                      2024); and the raster loop without a KV cache, as a contrast
  7. text conditioner a compact T5 encoder and a SentencePiece tokenizer (Raffel et al. 2020,
                      Hugging Face transformers' modeling_t5.py)
Beyond LlamaGen, on the same Llama:
  8. MAR              continuous tokens from a KL tokenizer, a diffusion loss per token (Li et al.
                      2024, LTH14/mar; DDPM: Ho et al. 2020)
  9. masked           generation in random order with bidirectional attention: MaskGIT over codes
                      (Chang et al. 2022, google-research/maskgit), MAR proper over continuous tokens
 10. VAR              next-scale prediction: the multi-scale residual quantizer, its tokenizer and
                      the generator that writes a scale per pass (Tian et al. 2024, FoundationVision/VAR)
 11. early fusion     words and image codes in one vocabulary, one Llama that draws and captions, at
                      any grid size (Chameleon 2024, Lumina-mGPT 2024; ANOLE's image-head training)
Then the files:
  A. released weights the official LlamaGen checkpoints and Hugging Face's T5, with a plain
                      load_state_dict
  B. our checkpoints  what train.py writes and sample.py reads: plain dicts with a format version

One Llama, several generators: a kind of token is a tokenizer (TOKENIZERS: every one has
encode(images) -> tokens and decode(tokens) -> images) and the two layers that read such tokens into
the Llama and read its output out (TOKEN_LAYERS: every readout has initialize, readout, loss, draw,
its sampling_options, and probabilities, the distribution draw() draws from (MAR's: None)). An order is a
generator (GENERATORS: the Llama subclass with its loss(tokens, cond), its generate(cond, **options)
and its sampling_options). make_gpt builds the pair a config names, so one training loop and one
sampling script serve every combination; each sampling keyword is a SamplingOption declared once,
by the class that reads it, and the scripts make their flags of those declarations.

State-dict names and shapes follow the official code (FoundationVision/LlamaGen), so its released
checkpoints load unchanged and give its outputs (test_llamagen.py checks this against a fixture).
"""
import contextlib
import dataclasses
import functools
import glob
import hashlib
import io
import itertools
import json
import math
import os
import pickle
import re
import types
import warnings
from argparse import Namespace  # the official checkpoints store their training settings as one

import torch
import torch.nn as nn
import torch.nn.functional as F

# -----------------------------------------------------------------------------
# 1. Image tokenizer: Encoder -> VectorQuantizer -> Decoder
# The config defaults are the paper's (the official code's), so that its checkpoints and presets
# load as they are; train.py's command line picks smaller settings for a CPU and says why.


@dataclasses.dataclass
class AutoencoderConfig:  # the VQGAN encoder and decoder that every tokenizer puts around its bottleneck
    ch: int = 128
    ch_mult: tuple = (1, 1, 2, 2, 4)  # channels / ch at each resolution, the image's first
    num_res_blocks: int = 2
    z_channels: int = 256
    dropout: float = 0.0

    @property
    def downsample_factor(self):  # image pixels per token along each side: a halving between resolutions
        return 2 ** (len(self.ch_mult) - 1)


@dataclasses.dataclass
class VQConfig(AutoencoderConfig):
    codebook_size: int = 16384
    codebook_embed_dim: int = 8      # low-dimensional codes look up better (ViT-VQGAN)
    codebook_l2_norm: bool = True    # nearest code by cosine similarity (ViT-VQGAN)
    commit_loss_beta: float = 0.25   # weight of the commitment term (VQ-VAE)
    entropy_loss_ratio: float = 0.0  # > 0: push for confident, diverse code choices (MaskGIT)


VQ_PRESETS = {
    "VQ-16": dict(ch_mult=(1, 1, 2, 2, 4)),  # official vq_ds16: 16x downsampling
    "VQ-8": dict(ch_mult=(1, 2, 2, 4)),      # official vq_ds8: 8x downsampling
    "VQ-mini": dict(ch=32, ch_mult=(1, 1, 2), num_res_blocks=1, z_channels=32, codebook_size=256),  # CPU demo
    "VQ-tiny": dict(ch=32, ch_mult=(1, 2), z_channels=32, codebook_size=64),  # tests
}


def group_norm(channels):
    return nn.GroupNorm(num_groups=32, num_channels=channels, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    def __init__(self, in_channels, out_channels, dropout):
        super().__init__()
        self.norm1 = group_norm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = group_norm(out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        if in_channels != out_channels:
            self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x):
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        if hasattr(self, "nin_shortcut"):
            x = self.nin_shortcut(x)
        return x + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all pixels of a (small) feature map."""

    def __init__(self, channels):
        super().__init__()
        self.norm = group_norm(channels)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x):
        B, C, H, W = x.shape
        h = self.norm(x)
        q = self.q(h).view(B, C, H * W).transpose(1, 2)  # (B, HW, C)
        k = self.k(h).view(B, C, H * W).transpose(1, 2)  # (B, HW, C)
        v = self.v(h).view(B, C, H * W).transpose(1, 2)  # (B, HW, C)
        h = F.scaled_dot_product_attention(q, k, v)      # (B, HW, C), softmax(q k^T / sqrt(C)) v
        h = h.transpose(1, 2).reshape(B, C, H, W)        # (B, C, H, W)
        return x + self.proj_out(h)


class Downsample(nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x):
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # pad right and bottom only: H -> H / 2 exactly


class Upsample(nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Level(nn.Module):
    """One resolution of the encoder or decoder: residual blocks (with attention at the lowest
    resolution), then a down- or upsampling step."""

    def __init__(self, in_channels, out_channels, num_blocks, attention, dropout,
                 downsample=False, upsample=False):
        super().__init__()
        self.res = nn.ModuleList()
        self.attn = nn.ModuleList()
        for _ in range(num_blocks):
            self.res.append(ResnetBlock(in_channels, out_channels, dropout))
            in_channels = out_channels
            if attention:
                self.attn.append(AttnBlock(out_channels))
        self.downsample = Downsample(out_channels) if downsample else None
        self.upsample = Upsample(out_channels) if upsample else None

    def forward(self, h):
        for i, res in enumerate(self.res):
            h = res(h)
            if len(self.attn) > 0:
                h = self.attn[i](h)
        if self.downsample is not None:
            h = self.downsample(h)
        if self.upsample is not None:
            h = self.upsample(h)
        return h


def middle(channels, dropout):
    return nn.ModuleList([ResnetBlock(channels, channels, dropout), AttnBlock(channels),
                          ResnetBlock(channels, channels, dropout)])


class Encoder(nn.Module):
    def __init__(self, cfg: AutoencoderConfig):
        super().__init__()
        self.conv_in = nn.Conv2d(3, cfg.ch, 3, padding=1)
        self.conv_blocks = nn.ModuleList()
        channels = cfg.ch
        for i, mult in enumerate(cfg.ch_mult):
            lowest = i == len(cfg.ch_mult) - 1
            self.conv_blocks.append(Level(channels, cfg.ch * mult, cfg.num_res_blocks, attention=lowest,
                                          dropout=cfg.dropout, downsample=not lowest))
            channels = cfg.ch * mult
        self.mid = middle(channels, cfg.dropout)
        self.norm_out = group_norm(channels)
        self.conv_out = nn.Conv2d(channels, cfg.z_channels, 3, padding=1)

    def forward(self, x):  # (B, 3, H, W) -> (B, z_channels, H / f, W / f)
        h = self.conv_in(x)
        for level in self.conv_blocks:
            h = level(h)
        for block in self.mid:
            h = block(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    def __init__(self, cfg: AutoencoderConfig):
        super().__init__()
        channels = cfg.ch * cfg.ch_mult[-1]
        self.conv_in = nn.Conv2d(cfg.z_channels, channels, 3, padding=1)
        self.mid = middle(channels, cfg.dropout)
        self.conv_blocks = nn.ModuleList()
        for i in reversed(range(len(cfg.ch_mult))):  # lowest resolution first
            self.conv_blocks.append(Level(channels, cfg.ch * cfg.ch_mult[i], cfg.num_res_blocks + 1,
                                          attention=i == len(cfg.ch_mult) - 1, dropout=cfg.dropout,
                                          upsample=i != 0))
            channels = cfg.ch * cfg.ch_mult[i]
        self.norm_out = group_norm(channels)
        self.conv_out = nn.Conv2d(channels, 3, 3, padding=1)

    def forward(self, z):  # (B, z_channels, h, w) -> (B, 3, h * f, w * f)
        h = self.conv_in(z)
        for block in self.mid:
            h = block(h)
        for level in self.conv_blocks:
            h = level(h)
        return self.conv_out(F.silu(self.norm_out(h)))


def entropy_loss(affinity, temperature=0.01):
    """Low entropy per vector (a confident choice) and high entropy on average (all codes used)."""
    logits = affinity / temperature                          # (N, K)
    probs = logits.softmax(dim=-1)
    sample_entropy = -(probs * logits.log_softmax(dim=-1)).sum(dim=-1).mean()
    mean_probs = probs.mean(dim=0)                           # (K,)
    mean_entropy = -(mean_probs * torch.log(mean_probs + 1e-5)).sum()
    return sample_entropy - mean_entropy


class VectorQuantizer(nn.Module):
    def __init__(self, cfg: VQConfig):
        super().__init__()
        self.cfg = cfg
        self.embedding = nn.Embedding(cfg.codebook_size, cfg.codebook_embed_dim)
        self.embedding.weight.data.uniform_(-1.0 / cfg.codebook_size, 1.0 / cfg.codebook_size)
        if cfg.codebook_l2_norm:
            self.embedding.weight.data = F.normalize(self.embedding.weight.data, dim=-1)

    def codebook(self):  # (K, D); stored un-normalised, normalised at use
        weight = self.embedding.weight
        return F.normalize(weight, dim=-1) if self.cfg.codebook_l2_norm else weight

    def nearest_codes(self, z):  # (N, D) -> (N,) code indices, (N, K) squared distances
        codebook = self.codebook()
        distances = (z ** 2).sum(dim=1, keepdim=True) + (codebook ** 2).sum(dim=1) - 2 * z @ codebook.t()
        return distances.argmin(dim=1), distances

    def forward(self, z):  # (B, D, h, w) -> quantised (B, D, h, w), indices (B, h, w), losses
        B, D, h, w = z.shape
        z = z.permute(0, 2, 3, 1)                       # (B, h, w, D)
        if self.cfg.codebook_l2_norm:
            z = F.normalize(z, dim=-1)
        indices, distances = self.nearest_codes(z.reshape(-1, D))  # (B*h*w,), (B*h*w, K)
        z_q = self.codebook()[indices].view(B, h, w, D)                  # (B*h*w, D) -> (B, h, w, D)
        losses = {}
        if self.training:
            losses["codebook_loss"] = F.mse_loss(z_q, z.detach())  # moves the codes to the encoder
            losses["commit_loss"] = self.cfg.commit_loss_beta * F.mse_loss(z, z_q.detach())  # and back
            losses["entropy_loss"] = (self.cfg.entropy_loss_ratio * entropy_loss(-distances)
                                      if self.cfg.entropy_loss_ratio > 0 else z.new_zeros(()))
        # straight-through estimator: the forward pass uses z_q, the backward pass copies the
        # decoder's gradient onto z as if quantisation were the identity
        z_q = z + (z_q - z).detach()
        return z_q.permute(0, 3, 1, 2), indices.view(B, h, w), losses   # (B, D, h, w), (B, h, w)


class ImageTokenizer(nn.Module):
    """What every image tokenizer offers, whatever its tokens are (the scripts use only this):
      token_kind, config_class  the kind of token it makes (a key of TOKENIZERS and TOKEN_LAYERS),
                             and its config's class (an AutoencoderConfig: cfg.downsample_factor)
      forward(images)        training: the reconstruction, what the bottleneck made of the images
                             (codes, or a latent sample), its own loss terms
      encode(images)         images (B, 3, H, W) in [-1, 1] -> the tokens (B, T, ..): the grid's
                             cells in raster order (VAR: every scale's, coarse to fine)
      decode(tokens)         tokens -> images (B, 3, H, W) in [-1, 1]
      token_config()         what a GPT must know of the tokens: GPTConfig fields
      has_codebook           whether its tokens are codes of a codebook, and if so
      token_stats(codes)     the fractions of the codebook they use, for the training log
      tokens_per_image, known_cells, known_tokens, decode_known, encode_posterior, draw_from_posterior,
      calibrate: below"""

    has_codebook = False

    def __init__(self, cfg):  # the same VQGAN encoder and decoder around every kind of bottleneck
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)

    def add_bottleneck_convs(self, encoded_dim, latent_dim):
        """The 1x1 convolutions on either side of the bottleneck (official names): quant_conv from
        the encoder's z_channels to what the bottleneck reads (encoded_dim), post_quant_conv from
        the latent (latent_dim) back to z_channels for the decoder."""
        self.quant_conv = nn.Conv2d(self.cfg.z_channels, encoded_dim, 1)
        self.post_quant_conv = nn.Conv2d(latent_dim, self.cfg.z_channels, 1)

    @classmethod
    def tokens_per_image(cls, cfg, image_size):  # a token per cell of the grid
        return (image_size // cfg.downsample_factor) ** 2

    def known_cells(self, keep):
        """Editing: the pixels kept (B, H, W) bool -> the grid's cells known (B, H / f, W / f) bool:
        a cell is known when all of its pixels are (none hidden in its f x f patch)."""
        return F.max_pool2d((~keep)[:, None].float(), self.cfg.downsample_factor)[:, 0] == 0

    def known_tokens(self, keep):  # the pixels kept (B, H, W) -> the tokens known (B, T): the cells, row by row
        return self.known_cells(keep).flatten(1)

    @torch.no_grad()
    def decode_known(self, tokens, known):
        """A picture of a generation under way: tokens (B, T, ..) of which only the known (B, T) are
        decided -> images (B, 3, H, W) with the cells of the others blank (gray)."""
        decided = known.view(*known.shape, *[1] * (tokens.dim() - 2))
        images = self.decode(torch.where(decided, tokens, torch.zeros_like(tokens)))
        grid, f = math.isqrt(known.shape[1]), self.cfg.downsample_factor
        blank = ~known.view(-1, 1, grid, grid).repeat_interleave(f, 2).repeat_interleave(f, 3)
        return images.masked_fill(blank, 0.0)

    def encode_posterior(self, images):  # what the GPT's training tokens are drawn from: for codes, themselves
        return self.encode(images)

    def draw_from_posterior(self, posterior):  # a batch of encode_posterior's output -> the GPT's tokens
        return posterior

    def calibrate(self, image_batches):  # what is fitted from the training images at the end ({name: value} to log)
        return {}


class VQModel(ImageTokenizer):
    config_class = VQConfig
    token_kind = "discrete"  # one code of the codebook per grid cell
    has_codebook = True

    def __init__(self, cfg: VQConfig):
        super().__init__(cfg)
        self.quantize = VectorQuantizer(cfg)
        self.add_bottleneck_convs(cfg.codebook_embed_dim, cfg.codebook_embed_dim)

    def forward(self, images):  # (B, 3, H, W) in [-1, 1] -> reconstruction, indices (B, h, w), loss terms
        z_q, indices, losses = self.quantize(self.quant_conv(self.encoder(images)))
        return self.decoder(self.post_quant_conv(z_q)), indices, losses

    @torch.no_grad()
    def encode_indices(self, images):  # (B, 3, H, W) in [-1, 1] -> LongTensor (B, H / f, W / f)
        return self.quantize(self.quant_conv(self.encoder(images)))[1]

    @torch.no_grad()
    def decode_indices(self, indices):  # LongTensor (B, h, w) -> images (B, 3, h * f, w * f)
        z_q = self.quantize.codebook()[indices].permute(0, 3, 1, 2)  # (B, h, w, D) -> (B, D, h, w)
        return self.decoder(self.post_quant_conv(z_q))

    def encode(self, images):  # -> codes (B, h*w): the grid read row by row
        return self.encode_indices(images).flatten(1)               # (B, h, w) -> (B, h*w)

    def decode(self, codes):  # (B, h*w) of a square grid, or (B, h, w) -> images (B, 3, H, W) in [-1, 1], float32
        if codes.dim() == 2:
            grid = math.isqrt(codes.shape[1])
            codes = codes.view(-1, grid, grid)                                   # (B, h*w) -> (B, h, w)
        return self.decode_indices(codes).float().clamp(-1, 1)

    def token_config(self):
        return dict(token_kind=self.token_kind, vocab_size=self.cfg.codebook_size)

    def token_stats(self, codes):  # any number of codes -> the fraction of the codebook they use
        return {"usage": codes.unique().numel() / self.cfg.codebook_size}


# a token_kind -> its tokenizer; section 8 adds MAR's "continuous", section 10 VAR's "multiscale"
TOKENIZERS = {"discrete": VQModel}


# -----------------------------------------------------------------------------
# 2. Tokenizer losses: LPIPS perceptual loss, PatchGAN discriminator, hinge loss


def load_lpips():
    """LPIPS with a VGG16 trunk (the `lpips` package), loaded the standard way: torchvision downloads
    the ImageNet weights once into the torch hub cache; if that fails, an OSError says what to get where."""
    import lpips
    from torchvision.models import VGG16_Weights
    try:
        with warnings.catch_warnings():  # torchvision's notices about lpips' old `pretrained=True`
            warnings.filterwarnings("ignore", message="The parameter 'pretrained' is deprecated")
            warnings.filterwarnings("ignore", message="Arguments other than a weight enum")
            model = lpips.LPIPS(net="vgg", verbose=False)
    except (OSError, RuntimeError, pickle.UnpicklingError) as error:
        url = VGG16_Weights.IMAGENET1K_V1.url
        path = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(url))
        raise OSError(f"the VGG16 weights of LPIPS could not be loaded ({error}); download {url} to "
                      f"{path}") from None
    return model.eval().requires_grad_(False)


class PatchGANDiscriminator(nn.Module):
    """Says real or fake for each overlapping patch of the image (pix2pix, taming)."""

    def __init__(self, n_layers=3, ndf=64):
        super().__init__()
        layers = [nn.Conv2d(3, ndf, 4, stride=2, padding=1), nn.LeakyReLU(0.2, True)]
        mult = 1
        for n in range(1, n_layers + 1):
            prev, mult = mult, min(2 ** n, 8)
            stride = 2 if n < n_layers else 1
            layers += [nn.Conv2d(ndf * prev, ndf * mult, 4, stride=stride, padding=1, bias=False),
                       nn.BatchNorm2d(ndf * mult), nn.LeakyReLU(0.2, True)]
        layers.append(nn.Conv2d(ndf * mult, 1, 4, stride=1, padding=1))  # one logit per patch
        self.main = nn.Sequential(*layers)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.normal_(module.weight, 0.0, 0.02)
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.normal_(module.weight, 1.0, 0.02)
                nn.init.zeros_(module.bias)

    def forward(self, images):  # (B, 3, H, W) -> (B, 1, h, w) patch logits
        return self.main(images)


def hinge_d_loss(logits_real, logits_fake):
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def adaptive_weight(nll_loss, gen_loss, last_layer):
    """Scale the adversarial term so its gradient at the decoder's last layer is as large as the
    reconstruction's (VQGAN)."""
    nll_grad = torch.autograd.grad(nll_loss, last_layer, retain_graph=True)[0]
    gen_grad = torch.autograd.grad(gen_loss, last_layer, retain_graph=True)[0]
    return (nll_grad.norm() / (gen_grad.norm() + 1e-4)).clamp(0.0, 1e4).detach()


class VQLoss(nn.Module):
    """The tokenizer's training objective (LlamaGen vq_loss.py): L2 + perceptual_weight * LPIPS (lpips:
    load_lpips()'s model, or None) + the tokenizer's own terms (codebook + commitment (+ entropy) for
    the VQ) + disc_weight * (-mean D(reconstruction)) once step >= disc_start: earlier, D would win at
    once on poor reconstructions and add only noise. D trains in its own step on detached images."""

    def __init__(self, lpips, perceptual_weight, disc_start, disc_weight, adaptive_disc_weight):
        super().__init__()
        self.lpips = lpips if perceptual_weight > 0 else None
        self.discriminator = PatchGANDiscriminator()
        self.disc_start, self.disc_weight, self.adaptive_disc_weight = disc_start, disc_weight, adaptive_disc_weight
        self.perceptual_weight = perceptual_weight

    def generator_loss(self, images, recon, tokenizer_losses, step, last_layer):
        reconstruction = F.mse_loss(recon, images)
        logs = dict(rec_loss=reconstruction)
        nll = reconstruction
        if self.lpips is not None:
            logs["perceptual_loss"] = self.lpips(images, recon).mean()
            nll = nll + self.perceptual_weight * logs["perceptual_loss"]
        loss = nll + sum(tokenizer_losses.values())
        logs.update(tokenizer_losses)
        if self.judges(images, step):  # before disc_start the adversarial weight is zero
            self.discriminator.requires_grad_(False)  # this step trains the tokenizer, not D
            gen_adv = -self.discriminator(recon).mean()  # hinge generator loss
            self.discriminator.requires_grad_(True)
            weight = self.disc_weight
            if self.adaptive_disc_weight:
                weight = weight * adaptive_weight(nll, gen_adv, last_layer)
            loss = loss + weight * gen_adv
            logs["gen_adv_loss"] = gen_adv
        return loss, logs

    def judges(self, images, step):
        """Whether D takes part: from disc_start on, for images whose sides PatchGAN's three stride-2
        layers can read (at least 32 px: early fusion's --sizes 32x16, say, trains without it there)."""
        return step >= self.disc_start and min(images.shape[-2:]) >= 32

    def discriminator_loss(self, images, recon, step):
        if not self.judges(images, step):
            return None
        logits_real = self.discriminator(images.detach())
        logits_fake = self.discriminator(recon.detach())
        return self.disc_weight * hinge_d_loss(logits_real, logits_fake)


# -----------------------------------------------------------------------------
# 3. Llama blocks: RMSNorm, 2D RoPE, attention with a KV cache, SwiGLU, the condition embedders


@dataclasses.dataclass
class GPTConfig:
    dim: int = 768
    n_layer: int = 12
    n_head: int = 12
    multiple_of: int = 256           # SwiGLU hidden size is rounded up to this
    rope_base: float = 10000
    norm_eps: float = 1e-5
    token_dropout_p: float = 0.1
    attn_dropout_p: float = 0.0
    resid_dropout_p: float = 0.1
    ffn_dropout_p: float = 0.1
    num_classes: int = 1000
    caption_dim: int = 2048          # width of the text features (flan-t5-xl: 2048)
    class_dropout_prob: float = 0.1  # how often the condition is replaced by the null one (for CFG)
    model_type: str = "c2i"          # 'c2i' class-conditional, 't2i' text-conditional
    # the condition's positions before the image ("cls", the official name): 1 class token, or 120 text tokens
    cls_token_num: int = 1
    block_size: int = 256            # image tokens = (image_size / downsampling) ** 2 (VAR: all scales')
    rope_2d: bool = True             # False: 1D RoPE over the raster position (an exercise); FusedGPT.layout_rope
    token_kind: str = "discrete"     # what the image tokens are: a key of TOKEN_LAYERS
    order: str = "raster"            # how they are generated: a key of GENERATORS (sections 5, 9, 10)
    vocab_size: int = 16384          # codes (discrete, multiscale): the tokenizer's codebook size
    token_dim: int = 16              # vectors: MAR's tokens (the KL's embed_dim), VAR's inputs (codebook_embed_dim)
    # the diffusion head that draws continuous tokens (MAR, section 8)
    diffusion_width: int = 1024      # MAR's training recipe: 3 blocks of width 1024
    diffusion_depth: int = 3
    diffusion_repeats: int = 4       # timesteps drawn per token per training step (diffusion_batch_mul)
    # multi-scale codes (VAR, section 10): the tokenizer's scales and phi, whose quantizer the GPT keeps
    scales: tuple = ()
    phi_ratio: float = 0.5
    phi_count: int = 4
    # early fusion (section 11): one vocabulary of the caption tokenizer's ids, the specials, a token
    # per grid height and width, and the codes; Chameleon's two stabilisers
    text_vocab_size: int = 0         # the caption tokenizer's ids, first in the vocabulary
    grid_shapes: tuple = ()          # the (rows, columns) grids of codes the model knows
    qk_norm: bool = False            # Chameleon: queries and keys layer-normalised per head (off: LlamaGen's)
    z_loss: float = 0.0              # Chameleon: weight of log(Z)^2, Z the softmax's normaliser (1e-5 there)
    # what the loss counts: "all" tokens (Chameleon); "text": the words only, over logits without the
    # image codes' (a model that reads images and captions them but cannot draw, as Chameleon's
    # release); "image": the codes of caption-then-image sequences only, over the codes' logits, the
    # distribution generate draws them from (ANOLE's stage)
    fused_loss: str = "all"


GPT_PRESETS = {  # the official sizes (gpt.py), a CPU demo size and a tiny one for tests
    "GPT-tiny": dict(n_layer=2, n_head=4, dim=64),
    "GPT-mini": dict(n_layer=4, n_head=4, dim=128, multiple_of=32),
    "GPT-B": dict(n_layer=12, n_head=12, dim=768),     # 111M
    "GPT-L": dict(n_layer=24, n_head=16, dim=1024),    # 343M
    "GPT-XL": dict(n_layer=36, n_head=20, dim=1280),   # 775M
    "GPT-XXL": dict(n_layer=48, n_head=24, dim=1536),  # 1.4B
    "GPT-XXXL": dict(n_layer=48, n_head=40, dim=2560), # 3.9B
    "GPT-1B": dict(n_layer=22, n_head=32, dim=2048),   # 1.2B, text-conditional
    "GPT-3B": dict(n_layer=24, n_head=32, dim=3200),   # 3.1B
}


class RMSNorm(nn.Module):
    def __init__(self, dim, eps=1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):  # x / sqrt(mean(x^2) + eps), in float32 whatever the input dtype, then * weight
        return F.rms_norm(x.float(), x.shape[-1:], eps=self.eps).type_as(x) * self.weight


def rope_angles_2d(rows, cols, head_dim, base):
    """Rotation angles (N, head_dim // 2) of tokens at grid coordinates rows, cols (N,), possibly
    fractional: the first half of the channel pairs turns with the row, the second with the column."""
    freqs = 1.0 / base ** (torch.arange(0, head_dim // 2, 2).float() / (head_dim // 2))  # (head_dim/4,)
    return torch.cat([torch.outer(rows.float(), freqs), torch.outer(cols.float(), freqs)], dim=-1)


def rope_angles_1d(positions, head_dim, base):  # positions (N,) -> angles (N, head_dim // 2), as a language model
    freqs = 1.0 / base ** (torch.arange(0, head_dim, 2).float() / head_dim)              # (head_dim/2,)
    return torch.outer(positions.float(), freqs)


def rope_table(angles, cls_token_num):
    """(cos, sin) of every position of the sequence: the condition's, then the image tokens' of
    angles (N, head_dim // 2) -> (cls_token_num + N, head_dim // 2, 2)."""
    rope = torch.stack([angles.cos(), angles.sin()], dim=-1)
    # The condition positions get (cos, sin) = (0, 0), not the identity (1, 0): their queries and keys
    # are zero, as the official code and its checkpoints have it: the condition acts through the values.
    return torch.cat([torch.zeros(cls_token_num, angles.shape[1], 2), rope])


def precompute_rope_2d(grid_size, head_dim, base, cls_token_num, rope_2d=True):
    """The RoPE table of [condition, grid_size x grid_size tokens in raster order]:
    (cls_token_num + grid_size**2, head_dim // 2, 2). Channels are rotated in interleaved pairs,
    by (row, column) of the token, or (rope_2d=False) by its raster position."""
    cells = torch.arange(grid_size * grid_size)
    angles = rope_angles_2d(cells // grid_size, cells % grid_size, head_dim, base) if rope_2d \
        else rope_angles_1d(cells, head_dim, base)
    return rope_table(angles, cls_token_num)


def apply_rope(x, rope):  # x (B, S, nh, hs), rope (S, hs/2, 2) or per row (B, S, hs/2, 2) -> (B, S, nh, hs)
    """Rotate each pair (x0, x1) by its angle: the complex product (x0 + i x1) (cos + i sin), written
    in real arithmetic (torch.compile generates no code for complex tensors)."""
    x0, x1 = x.float().reshape(*x.shape[:-1], -1, 2).unbind(-1)             # (B, S, nh, hs/2) each
    cos, sin = rope.unsqueeze(-3).unbind(-1)                                # (S or B, S, 1, hs/2) each
    return torch.stack([x0 * cos - x1 * sin, x1 * cos + x0 * sin], dim=-1).flatten(3).type_as(x)


def attention_mask(blocks, cond_mask=None):
    """Which keys each query may see, a bool mask (1 or B, 1, S, S), from the block of each position
    blocks (S,): a position sees its own block and earlier ones. A block per position is causal
    (raster order), one for all bidirectional (masked), one per scale VAR's block-causal attention.
    A caption's left padding is seen by no one but itself (every row of a softmax needs one key)."""
    visible = blocks[None, :] <= blocks[:, None]                                    # (S, S)
    if cond_mask is None:
        return visible[None, None]                                                  # (1, 1, S, S)
    seq_len = len(blocks)
    visible = visible.repeat(cond_mask.shape[0], 1, 1)                              # (B, S, S)
    visible[:, :, :cond_mask.shape[1]] &= cond_mask.bool()[:, None, :]              # padding hidden as a key
    visible |= torch.eye(seq_len, dtype=torch.bool, device=blocks.device)
    return visible[:, None]                                                         # (B, 1, S, S)


class KVCache(nn.Module):
    """The keys and values of every position seen so far, for one attention layer (gpt-fast): each
    step runs only the new token through the model, O(T) token passes per image instead of O(T^2).
    The buffers are allocated once, for the longest sequence (Llama.setup_caches), and written in
    place; the attention mask hides the positions not written yet, so every step has the same shapes."""

    def __init__(self, batch_size, max_seq_len, n_head, head_dim, dtype, device):
        super().__init__()
        shape = (batch_size, n_head, max_seq_len, head_dim)
        self.register_buffer("k_cache", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v_cache", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, input_pos, k, v):  # k, v (B, nh, S, hs) written at positions input_pos (S,) or (B, S)
        if input_pos.dim() == 1:  # the same positions in every row: one copy each, no indexing machinery
            self.k_cache.index_copy_(2, input_pos, k)
            self.v_cache.index_copy_(2, input_pos, v)
        else:  # each row its own (speculative decoding): [row b, :, input_pos[b, s]] <- k[b, :, s]
            rows = torch.arange(len(input_pos), device=input_pos.device)[:, None]       # (B, 1)
            self.k_cache[rows, :, input_pos] = k.transpose(1, 2)                           # (B, S, nh, hs)
            self.v_cache[rows, :, input_pos] = v.transpose(1, 2)
        return self.k_cache, self.v_cache  # (B, nh, max_seq_len, hs)


class Attention(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.n_head = cfg.n_head
        self.head_dim = cfg.dim // cfg.n_head
        self.wqkv = nn.Linear(cfg.dim, 3 * cfg.dim, bias=False)  # q, k, v in one matrix (official layout)
        self.wo = nn.Linear(cfg.dim, cfg.dim, bias=False)
        if cfg.qk_norm:  # Chameleon's QK-norm: bounded attention logits, which kept its mixed-modal training stable
            self.q_norm, self.k_norm = nn.LayerNorm(self.head_dim), nn.LayerNorm(self.head_dim)
        self.qk_norm = cfg.qk_norm
        self.attn_dropout_p = cfg.attn_dropout_p
        self.resid_dropout = nn.Dropout(cfg.resid_dropout_p)
        self.kv_cache = None  # a KVCache while generating (Llama.setup_caches)

    def forward(self, x, rope, mask, input_pos=None):
        """x (B, S, dim) at positions input_pos (S,) or (B, S). Without input_pos: the whole sequence
        at once (training). With it: new positions whose keys and values join the cache, and
        attention runs over the cache, so mask is (B or 1, 1, S, max_seq_len)."""
        B, S, C = x.shape
        qkv = self.wqkv(x).view(B, S, 3 * self.n_head, self.head_dim)       # (B, S, 3 nh, hs): q, k, v heads
        qk, v = qkv[:, :, :2 * self.n_head], qkv[:, :, 2 * self.n_head:]    # (B, S, 2 nh, hs), (B, S, nh, hs)
        if self.qk_norm:  # (a LayerNorm over each head's channels: q's and k's heads have their own weights)
            qk = torch.cat([self.q_norm(qk[:, :, :self.n_head]), self.k_norm(qk[:, :, self.n_head:])], dim=2)
        q, k = apply_rope(qk, rope).split(self.n_head, dim=2)                # q and k turned in one call
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, nh, S, hs)
        if input_pos is not None:
            k, v = self.kv_cache.update(input_pos, k, v)                   # (B, nh, max_seq_len, hs)
            keys = mask.shape[-1]  # a decode step's mask may cover only the positions written so far
            k, v = k[:, :, :keys], v[:, :, :keys]                           # (B, nh, keys, hs)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask,          # (B, nh, S, hs)
                                           dropout_p=self.attn_dropout_p if self.training else 0.0)
        y = y.transpose(1, 2).reshape(B, S, C)                              # (B, S, nh * hs)
        return self.resid_dropout(self.wo(y))


def ffn_hidden_dim(cfg: GPTConfig):  # Llama's rule: 2/3 of 4 * dim, rounded up to multiple_of
    hidden = int(2 * (4 * cfg.dim) / 3)
    return cfg.multiple_of * math.ceil(hidden / cfg.multiple_of)


class FeedForward(nn.Module):  # SwiGLU: w2(silu(w1 x) * w3 x)
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        hidden = ffn_hidden_dim(cfg)
        self.w1 = nn.Linear(cfg.dim, hidden, bias=False)
        self.w3 = nn.Linear(cfg.dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, cfg.dim, bias=False)
        self.ffn_dropout = nn.Dropout(cfg.ffn_dropout_p)

    def forward(self, x):
        return self.ffn_dropout(self.w2(F.silu(self.w1(x)) * self.w3(x)))


class TransformerBlock(nn.Module):  # pre-norm residual block
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.attention = Attention(cfg)
        self.feed_forward = FeedForward(cfg)
        self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)

    def forward(self, x, rope, mask, input_pos=None):
        h = x + self.attention(self.attention_norm(x), rope, mask, input_pos)
        return h + self.feed_forward(self.ffn_norm(h))


class LabelEmbedder(nn.Module):
    """Class id -> one condition token. Row `num_classes` is the null class used for CFG."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.embedding_table = nn.Embedding(cfg.num_classes + 1, cfg.dim)
        self.num_classes = cfg.num_classes
        self.dropout_prob = cfg.class_dropout_prob

    def forward(self, labels):  # (B,) -> (B, 1, dim)
        if self.training and self.dropout_prob > 0:  # so the model also learns p(image) for CFG
            drop = torch.rand(labels.shape[0], device=labels.device) < self.dropout_prob
            labels = torch.where(drop, self.num_classes, labels)
        return self.embedding_table(labels).unsqueeze(1)

    def null(self, labels):
        return torch.full_like(labels, self.num_classes)


class MLP(nn.Module):
    def __init__(self, in_features, hidden_features, out_features):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features, bias=False)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden_features, out_features, bias=False)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class CaptionEmbedder(nn.Module):
    """Text features (B, L, caption_dim) -> L condition tokens. A learned `uncond_embedding` is
    the null caption used for CFG."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.cap_proj = MLP(cfg.caption_dim, cfg.dim, cfg.dim)
        self.register_buffer("uncond_embedding",
                             torch.randn(cfg.cls_token_num, cfg.caption_dim) / cfg.caption_dim ** 0.5)
        self.dropout_prob = cfg.class_dropout_prob

    def forward(self, captions):  # (B, L, caption_dim) -> (B, L, dim)
        if self.training and self.dropout_prob > 0:
            drop = torch.rand(captions.shape[0], device=captions.device) < self.dropout_prob
            captions = torch.where(drop[:, None, None], self.uncond_embedding, captions)
        return self.cap_proj(captions)

    def null(self, captions):
        return self.uncond_embedding.expand_as(captions)


# -----------------------------------------------------------------------------
# 4. Codes in and out: a learned vector per code, logits over the codes, and how a code is drawn
# For LlamaGen's codes: an embedding table in, a linear map to logits out; next-code cross-entropy
# trains it, and a code is drawn from the logits after classifier-free guidance, temperature, top-k
# and top-p. Each sampling keyword is a SamplingOption of the class whose code reads it (a readout
# here, a generator from section 5 on): generate() takes its default there, the scripts their flags.


def out_of_range(value, minimum=None, maximum=None, above=False):  # None if in range, else what it must be
    too_low = minimum is not None and (value <= minimum if above else value < minimum)
    if math.isfinite(value) and not too_low and (maximum is None or value <= maximum):
        return None
    allowed = f"{'above' if above else 'at least'} {minimum}" + ("" if maximum is None else f" and at most {maximum}")
    return f"it must be {allowed}"


@dataclasses.dataclass(frozen=True)
class SamplingOption:
    """A keyword of generate(), declared by the code that reads it: default (and type), range, help."""
    name: str
    default: object
    help: str
    minimum: float = None
    maximum: float = None
    per_token: bool = False            # at most one per token of an image (the model's block_size)
    above: bool = False                # the minimum itself is out of range
    choices: tuple = None
    needs_probabilities: bool = False  # only over tokens whose readout gives each one's probability (codes)

    def problem(self, value, cfg=None):
        """Why value is refused, or None; the bound per_token is checked only with the model's cfg."""
        if self.choices is not None:
            return None if value in self.choices else f"it must be one of {', '.join(self.choices)}"
        per_token = self.per_token and cfg is not None
        problem = out_of_range(value, self.minimum, cfg.block_size if per_token else self.maximum, self.above)
        return problem and problem + (", the tokens of this model's image" if per_token else "")


def guide(out, cfg_scale):
    """Classifier-free guidance on the [cond; null] batch (2B, ...) -> (B, ...): push the
    prediction away from the unconditional one, uncond + (cond - uncond) * cfg_scale. The same
    formula guides logits over codes and MAR's predicted noise."""
    cond_out, uncond_out = out.chunk(2, dim=0)
    return uncond_out + (cond_out - uncond_out) * cfg_scale


def draw_inverse_cdf(probs, generator=None):  # (B, vocab) -> (B, 1)
    """The first token whose running total of probability passes a uniform draw: one random number
    per row, much faster on a CPU than torch.multinomial over 16384 codes. A CPU sums in order, so
    a removed token adds exactly 0 and no draw can land on it."""
    cdf = probs.cumsum(dim=-1)                                                   # (B, vocab)
    draw = torch.rand(cdf.shape[0], 1, device=cdf.device, generator=generator) * cdf[:, -1:]
    return torch.searchsorted(cdf, draw, right=True)


def draw_exponential_race(probs, generator=None):  # (B, vocab) -> (B, 1)
    """For a GPU, whose parallel cumsum may round the running total up across removed tokens:
    with E_i ~ Exp(1), E_i / p_i is an exponential waiting time with rate p_i, and the first to
    finish, argmax p_i / E_i, is token i with probability p_i (gpt-fast; no sync with the host)."""
    noise = torch.empty_like(probs).exponential_(generator=generator)          # (B, vocab)
    return (probs / noise).argmax(dim=-1, keepdim=True)


def code_probabilities(logits, temperature, top_k, top_p):
    """What a code is drawn from: logits (.., vocab) -> probabilities (.., vocab), after
    temperature, top-k (0: all) and top-p (1: all) filtering as in the official sampler.
    Temperature 0 puts all the mass on the argmax (greedy)."""
    if temperature == 0:
        return F.one_hot(logits.argmax(dim=-1), logits.shape[-1]).float()
    logits = logits / temperature
    if top_k > 0:  # keep the k largest logits (ties with the k-th included)
        vocab = logits.shape[-1]  # the k-th largest is the (vocab - k + 1)-th smallest
        kth_largest = torch.kthvalue(logits, vocab - min(top_k, vocab) + 1, dim=-1, keepdim=True).values
        logits = logits.masked_fill(logits < kth_largest, float("-inf"))
    if top_p < 1.0:  # keep the most likely tokens until their total probability passes top_p
        sorted_logits, order = torch.sort(logits, descending=True)
        sorted_probs = sorted_logits.softmax(dim=-1)
        mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
        remove = (mass_before > top_p).scatter(-1, order, mass_before > top_p)
        logits = logits.masked_fill(remove, float("-inf"))
    return logits.softmax(dim=-1)


def draw_code(probs, generator=None):  # (B, vocab) -> (B, 1)
    if probs.device.type == "cpu":
        return draw_inverse_cdf(probs, generator)
    return draw_exponential_race(probs, generator)


def sample_code(logits, temperature, top_k, top_p, generator=None):
    """One code per row of logits (B, vocab) -> (B, 1), drawn from code_probabilities."""
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)  # greedy: no random number spent
    return draw_code(code_probabilities(logits, temperature, top_k, top_p), generator)


class CodeEmbedding(nn.Embedding):  # LlamaGen's input layer: a learned vector per code, (B, T) -> (B, T, dim)
    def __init__(self, cfg: GPTConfig):
        super().__init__(cfg.vocab_size, cfg.dim)


class CodeHead(nn.Linear):
    """LlamaGen's readout: the Llama's output (.., dim) -> logits over the codes (.., vocab). What
    every readout offers the GPT (MAR's DiffusionHead too): initialize(), readout(h), loss(out,
    tokens), draw(out, cfg_scale, settings, generator) reading its sampling_options, and
    probabilities(out, cfg_scale, settings), what draw() draws from (a readout without: probabilities = None)."""

    sampling_options = (
        SamplingOption("top_k", 0, "codes: draw from the k most likely codes only, 0: all", minimum=0),
        SamplingOption("top_p", 1.0, "codes: draw from the most likely codes that make up this much probability, "
                                     "in (0, 1]", minimum=0, maximum=1, above=True),
    )

    def __init__(self, cfg: GPTConfig):
        super().__init__(cfg.dim, cfg.vocab_size, bias=False)

    def initialize(self):  # zero logits at first: a uniform prediction (the official init)
        nn.init.zeros_(self.weight)

    def readout(self, h):  # final hidden states (.., dim) -> logits (.., vocab), in float32
        return self(h).float()

    def loss(self, logits, codes):  # logits (B, T, vocab), codes (B, T) -> next-code cross-entropy
        return F.cross_entropy(logits.flatten(0, 1), codes.flatten())     # (B*T, vocab), (B*T,)

    def draw(self, logits, cfg_scale, settings, generator=None):
        """One code per row, (B, 1): from logits (B, vocab), or from the CFG batch (2B, vocab)
        guided when cfg_scale is not 1; settings: the temperature, top_k and top_p."""
        if cfg_scale != 1.0:
            logits = guide(logits, cfg_scale)
        return sample_code(logits, settings.temperature, settings.top_k, settings.top_p, generator)

    def probabilities(self, logits, cfg_scale, settings):
        """The distribution draw() draws from, (B, .., vocab), for speculative decoding; cfg_scale
        may be a tensor of scales per position (B, .., 1)."""
        if torch.is_tensor(cfg_scale) or cfg_scale != 1.0:
            logits = guide(logits, cfg_scale)
        return code_probabilities(logits, settings.temperature, settings.top_k, settings.top_p)


# GPTConfig.token_kind -> (the layer that reads such tokens into the Llama, the readout of its
# output), each built from the GPTConfig; section 8 adds MAR's "continuous", section 10 VAR's "multiscale"
TOKEN_LAYERS = {"discrete": (CodeEmbedding, CodeHead)}


# -----------------------------------------------------------------------------
# 5. The Llama assembled (what every generator shares), and LlamaGen's generator, GPT: raster order,
# trained by teacher forcing, sampled with a KV cache


@contextlib.contextmanager
def evaluating(module):
    """Eval mode (no dropout, no condition dropout) while the block runs, then the mode it had."""
    was_training = module.training
    module.eval()
    try:
        yield
    finally:
        module.train(was_training)


def cfg_batch(x, guided):  # both halves of the CFG batch read the same tokens: (B, ..) -> (2B, ..) when guided
    return torch.cat([x, x]) if guided else x


def keep_known(drawn, edit, index):
    """Editing: tokens drawn at token indices `index` (B, n, ..) with an edit's known tokens in
    their place; edit = (the image's tokens (B, T, ..), known (B, T) bool), or None: all as drawn."""
    if edit is None:
        return drawn
    tokens, known = edit
    known = known[:, index].view(*drawn.shape[:2], *[1] * (drawn.dim() - 2))       # (B, n, 1 ..)
    return torch.where(known, tokens[:, index].to(drawn.dtype), drawn)


def guidance_at(t, cfg_scale, cfg_interval):
    """The CFG scale for image token t: cfg_scale, and 1 (none) after the first cfg_interval + 2
    tokens when cfg_interval >= 0 (the official convention)."""
    return cfg_scale if cfg_interval < 0 or t <= cfg_interval + 1 else 1.0


class Llama(nn.Module):
    """What every generator shares (makemore's shape: one Llama, several ways to feed it and read
    it out): the condition embedder, the layers in and out of TOKEN_LAYERS[config.token_kind], the
    transformer blocks, the RoPE table, and what every generate() starts with. A generator subclass
    adds its order: its inputs, which positions each sees, its loss, its generate() and its options."""

    sampling_options = (  # generate()'s keywords that every generator reads; a subclass adds its own
        SamplingOption("cfg_scale", 1.0, "classifier-free guidance: 1 none, 0 unconditional, above 1 closer to the "
                                         "condition, less varied", minimum=0),
        SamplingOption("temperature", 1.0, "below 1: sharper, above 1: more varied, 0: the likeliest token", minimum=0))
    token_kinds = ("discrete", "continuous")  # the tokens it generates (TOKEN_LAYERS keys)

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        if cfg.token_kind not in self.token_kinds:
            raise ValueError(f"{cfg.order} order generates {' or '.join(self.token_kinds)} tokens, not "
                             f"{cfg.token_kind} ones.")
        self.config = cfg
        # the condition embedder; "cls_embedding" is the official name for classes and text alike
        self.cls_embedding = self.make_condition_embedder(cfg)
        token_input, readout = self.make_token_layers(cfg)
        self.tok_embeddings = token_input                           # image tokens -> (B, T, dim)
        self.tok_dropout = nn.Dropout(cfg.token_dropout_p)
        self.layers = nn.ModuleList(TransformerBlock(cfg) for _ in range(cfg.n_layer))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.output = readout                                       # (B, T, dim) -> a prediction per token
        self.register_buffer("rope", self.make_rope(cfg), persistent=False)
        for module in self.modules():  # the official initialisation, then the readout's own
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, mean=0.0, std=0.02)
        self.output.initialize()

    def make_condition_embedder(self, cfg):  # class ids or text features -> condition tokens
        return LabelEmbedder(cfg) if cfg.model_type == "c2i" else CaptionEmbedder(cfg)

    def make_token_layers(self, cfg):  # (the layer that reads the tokens in, the readout of the output)
        return tuple(layer(cfg) for layer in TOKEN_LAYERS[cfg.token_kind])

    def make_rope(self, cfg):  # the RoPE table: the condition, then the image tokens on their grid
        grid_size = math.isqrt(cfg.block_size)
        if grid_size ** 2 != cfg.block_size:
            raise ValueError(f"block_size {cfg.block_size} is not a square number: it is a grid of tokens.")
        return precompute_rope_2d(grid_size, cfg.dim // cfg.n_head, cfg.rope_base, cfg.cls_token_num, cfg.rope_2d)

    def attention_blocks(self, seq_len, device):
        """The block of each position (seq_len,) for attention_mask: here one per position, causal
        (raster order); a generator with another attention pattern says so here."""
        return torch.arange(seq_len, device=device)

    def bind_tokenizer(self, tokenizer):
        """What it takes of the tokenizer's weights when a run starts: nothing, but for VAR's."""

    def cast(self, device, dtype):
        """Move and cast the weights; the RoPE table stays float32 (official), so its angles stay exact."""
        rope = self.rope.to(device)
        self.to(device, dtype)
        self.rope = rope
        return self

    def embed_condition(self, cond):  # class ids (B,) or text features (B, L, caption_dim)
        if cond.dim() == 3 and cond.shape[1] != self.config.cls_token_num:
            raise ValueError(f"text features have {cond.shape[1]} positions but this model takes "
                             f"{self.config.cls_token_num}; pad or cut them to that length.")
        return self.cls_embedding(cond)   # (B, cls_token_num, dim)

    def transformer(self, cond, inputs, cond_mask=None):
        """[condition, embedded image tokens inputs (B, t, dim)] through the Llama, every position at
        once, each seeing what attention_blocks allows -> the final hidden states
        (B, cls_token_num + t, dim)."""
        h = self.tok_dropout(torch.cat([self.embed_condition(cond), inputs], dim=1))  # (B, S, dim)
        S = h.shape[1]                                                     # cls_token_num + t
        rope, mask = self.rope[:S], attention_mask(self.attention_blocks(S, h.device), cond_mask)
        for layer in self.layers:
            h = layer(h, rope, mask)
        return self.norm(h)

    def loss(self, tokens, cond, cond_mask=None):  # the readout's loss of every image token, all at once
        return self.output.loss(self(tokens, cond, cond_mask), tokens)

    # What every generate() starts with: its sampling settings, eval mode, the CFG batch, the caches

    @classmethod
    def options_for(cls, token_kind):  # {name: SamplingOption} that generate() reads over these tokens, no model built
        readout = TOKEN_LAYERS[token_kind][1]
        return {option.name: option for option in cls.sampling_options + readout.sampling_options
                if readout.probabilities is not None or not option.needs_probabilities}

    @classmethod
    def sampling_defaults(cls, cfg):  # {name: default} of generate()'s keywords for a model of config cfg
        return {name: option.default for name, option in cls.options_for(cfg.token_kind).items()}

    def sampling_settings(self, options):
        """generate()'s keywords -> what it samples with (a namespace): the defaults, with the
        options given over them; one it does not read, or a value out of range, is refused."""
        declared = self.options_for(self.config.token_kind)
        for name, value in options.items():
            if name not in declared:
                raise ValueError(f"{name} does not apply to {self.config.order} order over {self.config.token_kind} "
                                 f"tokens; it takes {', '.join(declared)}.")
            problem = declared[name].problem(value, self.config)
            if problem:
                raise ValueError(f"{name} {value!r} is out of range: {problem}.")
        return types.SimpleNamespace(**{**self.sampling_defaults(self.config), **options})

    def with_null_condition(self, cond, cond_mask):
        """The CFG batch: the conditional rows, then the same rows with the null condition (2B, ...).
        A caption's padding mask is kept for its null half, as in the official sampler."""
        cond = torch.cat([cond, self.cls_embedding.null(cond)])
        return cond, None if cond_mask is None else cfg_batch(cond_mask, True)

    @contextlib.contextmanager
    def generation(self, cond, cond_mask, guided, cache_len=None):
        """Eval mode while a generation runs; the CFG batch [cond; null] when guided; for a sampler
        that feeds the KV cache, caches for cache_len positions and their mask -> cond, cond_mask, mask."""
        with evaluating(self):
            if guided:
                cond, cond_mask = self.with_null_condition(cond, cond_mask)    # (2B, ...)
            mask = None
            if cache_len is not None:
                self.setup_caches(len(cond), cache_len, self.tok_embeddings.weight.dtype, cond.device)
                mask = attention_mask(self.attention_blocks(cache_len, cond.device), cond_mask)
            yield cond, cond_mask, mask

    # The KV cache (gpt-fast) of the generators that feed the sequence forward in order

    def setup_caches(self, batch_size, max_seq_len, dtype, device):
        """Give every attention layer its KV cache, or keep one of the same shape (a compiled decode
        step holds on to its buffers): the mask hides whatever this generation has not written."""
        head_dim = self.config.dim // self.config.n_head
        shape = (batch_size, self.config.n_head, max_seq_len, head_dim)
        cache = self.layers[0].attention.kv_cache
        if cache is not None and cache.k_cache.shape == shape and cache.k_cache.dtype == dtype \
                and cache.k_cache.device == torch.device(device):
            return
        for layer in self.layers:
            layer.attention.kv_cache = KVCache(batch_size, max_seq_len, self.config.n_head, head_dim, dtype, device)

    def forward_with_cache(self, h, input_pos, mask, outputs=1, rope=None):
        """Embedded inputs h (B, S, dim) at new positions input_pos, (S,) for every row or (B, S)
        per row -> the readout of the last `outputs` of them (B, outputs, ..). Their keys and values
        join the cache; mask (B or 1, 1, max_seq_len, keys) says which cached positions each may
        see, and attention reads the first `keys` positions of the cache only; rope, the RoPE
        table of the sequence (default self.rope; early fusion's depends on its layout)."""
        h = self.tok_dropout(h)
        rope = self.rope if rope is None else rope
        rope = rope[input_pos.clamp(max=len(rope) - 1)]  # (S or B, S, hs/2, 2); see generate_speculative
        if input_pos.dim() == 1:
            mask = mask[..., input_pos, :]                          # (B or 1, 1, S, keys)
        else:  # row b takes the mask rows of its own positions
            rows = torch.arange(len(input_pos), device=input_pos.device)[:, None]
            mask = mask.expand(len(input_pos), -1, -1, -1)[rows, 0, input_pos][:, None]  # (B, 1, S, keys)
        for layer in self.layers:
            h = layer(h, rope, mask, input_pos)
        return self.output.readout(self.norm(h[:, -outputs:]))

    def free_caches(self):  # give the KV caches' memory back (train.py samples between training steps)
        for layer in self.layers:
            layer.attention.kv_cache = None


class GPT(Llama):
    """LlamaGen's generator: the Llama reads [condition tokens, image tokens] and predicts each image
    token from the condition and the tokens before it, in raster order (causal attention); sampled
    one token per forward pass through a KV cache."""

    sampling_options = Llama.sampling_options + (SamplingOption("cfg_interval", -1, "raster order: guide only the "
                                                                "first N + 2 tokens, -1: all", minimum=-1),)

    def forward(self, tokens, cond, cond_mask=None):
        """Teacher forcing: image tokens (B, T) codes or (B, T, D) vectors -> the readout (B, T, ..)
        whose position t predicts tokens[:, t] from the condition and tokens[:, :t]: logits over the
        codes, or MAR's z. cond_mask (B, L): 1 = real text token (padding on the left)."""
        return self.predict(cond, self.tok_embeddings(tokens[:, :-1]), cond_mask)

    def predict(self, cond, inputs, cond_mask=None):
        """[condition, embedded image tokens inputs (B, t, dim)] -> the readout at the t + 1
        positions that predict image tokens 0 .. t: the last condition position predicts token 0."""
        h = self.transformer(cond, inputs, cond_mask)                      # (B, cls_token_num + t, dim)
        return self.output.readout(h[:, self.config.cls_token_num - 1:])   # (B, t + 1, ..)

    # Generation (gpt-fast): the KV cache set up once, prefill the condition, then one token per step

    def prefill(self, cond, mask):  # all condition positions at once -> the readout for image token 0
        input_pos = torch.arange(self.config.cls_token_num, device=mask.device)
        return self.forward_with_cache(self.embed_condition(cond), input_pos, mask)[:, -1]

    def decode_one_token(self, token, input_pos, mask):  # token (B, 1, ..) at position input_pos (1,) -> readout
        return self.forward_with_cache(self.tok_embeddings(token), input_pos, mask)[:, -1]

    def compile_decode_one_token(self):
        """gpt-fast's speed-up: compile the decode step once. Every token has the same shapes (one
        token, the whole static cache), so one graph (a CUDA graph on a GPU) serves the whole
        generation without Python in the loop; generate() calls self.decode_one_token."""
        self.decode_one_token = torch.compile(self.decode_one_token, mode="reduce-overhead", fullgraph=True)

    @torch.no_grad()
    def generate(self, cond, cond_mask=None, generator=None, steps=None, edit=None, **options):
        """Sample block_size image tokens in raster order for cond: class ids (B,) or text features
        (B, L, caption_dim) with cond_mask (B, L) -> codes (B, block_size), or MAR's vectors
        (B, block_size, D); options: the generator's and the readout's sampling_options. steps, a
        list when given, receives the step that decided each token (B, block_size), as every
        generator's generate() does (for pictures of the generation): here token t at step t.
        edit, as every generator's: (an image's tokens (B, T, ..), known (B, T) bool): the known
        tokens are kept and the others generated given them. Here a known token is fed back in its
        turn as if drawn (teacher forcing through the KV cache), so a token sees the known ones
        before it but not those after it: a hole above or left of what is kept is drawn blind to it."""
        o = self.sampling_settings(options)
        B, T, guided = cond.shape[0], self.config.block_size, o.cfg_scale != 1.0
        cache_len = self.config.cls_token_num + T - 1  # the last token is never fed back
        # the positions of the tokens fed back, kept on the device: no host copy per token
        positions = torch.arange(self.config.cls_token_num, cache_len, device=cond.device)
        # Eager steps attend to the positions written so far only (the mask cut to them); a
        # compiled step (compile_decode_one_token's instance attribute) needs the same shapes at
        # every step, so it attends to the whole static cache, the positions not written masked.
        static = "decode_one_token" in vars(self)
        with self.generation(cond, cond_mask, guided, cache_len) as (cond, _, mask):
            tokens = []
            # Only the loop runs in inference mode: the tokens returned and the KV cache, made
            # outside it, stay ordinary tensors that a training step or a later call can use.
            with torch.inference_mode():
                out = self.prefill(cond, mask)                                      # (B or 2B, ..)
                for t in range(T):
                    scale = guidance_at(t, o.cfg_scale, o.cfg_interval)
                    token = self.output.draw(out if scale != 1.0 else out[:B], scale, o, generator)  # (B, 1, ..)
                    token = keep_known(token, edit, slice(t, t + 1))
                    tokens.append(token)
                    if t + 1 < T:  # both halves of the CFG batch go on with the same token
                        seen = mask if static else mask[..., :self.config.cls_token_num + t + 1]
                        out = self.decode_one_token(cfg_batch(token, guided), positions[t:t + 1], seen)
        if steps is not None:
            steps.append(torch.arange(T, device=cond.device).expand(B, -1))
        return torch.cat(tokens, dim=1)                                             # (B, block_size, ..)


# GPTConfig.order -> the generator; section 9 adds masked generation, section 10 next-scale prediction
GENERATORS = {"raster": GPT}


def make_gpt(cfg: GPTConfig):  # the generator a config names
    if cfg.order not in GENERATORS:
        raise ValueError(f"order {cfg.order!r} is not one this code knows ({', '.join(GENERATORS)}).")
    return GENERATORS[cfg.order](cfg)


# -----------------------------------------------------------------------------
# 6. Speculative Jacobi decoding: LlamaGen's images in fewer forward passes; and without a KV cache
# "Accelerating Auto-regressive Text-to-Image Generation with Training-free Speculative Jacobi
# Decoding" (Teng et al. 2024; code tyshiwo1/Accelerating-T2I-AR-with-SJD): about 2x fewer steps on
# LlamaGen and Lumina-mGPT, no retraining. Each pass checks a window of drafts, the model's own
# earlier guesses (Jacobi iteration), by speculative sampling (Leviathan et al. 2023), so the images
# follow GPT.generate's distribution exactly. MC-SJD ("Maximal Coupling Speculative Jacobi Decoding",
# So et al. 2025) couples each guess with the one before at its position, so a right guess stays.
# Beside it, the raster loop without the KV cache.


def check_raster_loop(gpt, loop, speculative=False):
    """The loops of this section (and GPT's compiled decode step) are raster order's, and speculative
    decoding needs each token's probability; `loop` is the name the caller knows the loop by."""
    if not isinstance(gpt, GPT):
        raise ValueError(f"{loop} is for raster order, and this GPT generates in {gpt.config.order} order")
    if speculative and gpt.output.probabilities is None:
        raise ValueError(f"{loop} needs each token's probability, which a GPT over codes gives; this GPT draws "
                         f"{gpt.config.token_kind} tokens (MAR)")


@torch.no_grad()
def generate_without_cache(gpt, cond, cond_mask=None, generator=None, edit=None, **options):
    """GPT.generate without the KV cache, as a contrast: every new token reruns the whole sequence
    so far, O(T^2) token passes per image instead of O(T); the same draws, the same tokens."""
    check_raster_loop(gpt, "generation without the KV cache")
    o = gpt.sampling_settings(options)
    B, guided = cond.shape[0], o.cfg_scale != 1.0
    with gpt.generation(cond, cond_mask, guided) as (cond, cond_mask, _):
        inputs = gpt.tok_embeddings.weight.new_zeros(len(cond), 0, gpt.config.dim)  # the tokens fed so far
        tokens = []
        for t in range(gpt.config.block_size):
            out = gpt.predict(cond, inputs, cond_mask)[:, t]                    # the whole sequence again
            scale = guidance_at(t, o.cfg_scale, o.cfg_interval)
            token = keep_known(gpt.output.draw(out if scale != 1.0 else out[:B], scale, o, generator), edit,
                               slice(t, t + 1))
            tokens.append(token)
            inputs = torch.cat([inputs, gpt.tok_embeddings(cfg_batch(token, guided))], dim=1)
    return torch.cat(tokens, dim=1)


def verify_drafts(p, q, drafts, generator=None):
    """Speculative sampling's verdict on one pass, per row: p (B, W + 1, V) the targets at the
    window's positions, q (B, W, V) what the drafts (B, W) were drawn from. Left to right, draft d is
    kept with probability min(1, p(d) / q(d)); at the first rejection a code is drawn from max(0, p - q),
    normalised, and if all W are kept one more from p[:, W]: every committed code is distributed as p.
    -> j (B,) drafts kept, and the window's codes (B, W + 1), of which the first j + 1 commit."""
    B, W = drafts.shape
    rows = torch.arange(B, device=drafts.device)[:, None]                         # (B, 1)
    p_d, q_d = (dist.gather(-1, drafts[..., None])[..., 0] for dist in (p[:, :W], q))  # (B, W)
    kept = torch.rand(B, W, device=drafts.device, generator=generator) * q_d < p_d  # u q(d) < p(d)
    j = kept.long().cumprod(dim=-1).sum(dim=-1)                                  # drafts kept before a rejection
    # the code after the kept drafts: from the residual where a draft was rejected, else p_{n+W}
    at_j = j.clamp(max=W - 1)[:, None]
    last = torch.where((j < W)[:, None], residual(p[rows, at_j][:, 0], q[rows, at_j][:, 0]), p[:, W])
    codes = torch.cat([drafts, drafts[:, :1]], dim=1).scatter(1, j[:, None], draw_code(last, generator))
    return j, codes


def residual(p, q):  # normalised max(0, p - q) (.., V): what a code is drawn from when q's draw is refused
    # (all zero only if p = q but for rounding, where a refusal is a rounding error: then p itself)
    left = (p - q).clamp(min=0)
    return torch.where(left.sum(-1, keepdim=True) > 0, left, p)


def coupled_draw(previous, q_old, q_new, generator=None):
    """MC-SJD's maximal coupling (So et al. 2025): a code drawn from q_new (.., V) that is the
    previous draw (..) from q_old as often as two such draws can agree. Keep the previous code d with
    probability min(1, q_new(d) / q_old(d)), else draw from max(0, q_new - q_old), normalised. Its
    distribution is q_new, whatever q_old: P(d) = min(q_old, q_new)(d) + max(0, q_new - q_old)(d)."""
    old_d, new_d = (dist.gather(-1, previous[..., None])[..., 0] for dist in (q_old, q_new))
    kept = torch.rand(previous.shape, device=previous.device, generator=generator) * old_d < new_d
    fresh = draw_code(residual(q_new, q_old).flatten(0, -2), generator).view(previous.shape)
    return torch.where(kept, previous, fresh)


def next_drafts(p, drafts, q, j, generator=None, coupled=True):
    """The next pass's W drafts, after the j + 1 codes (B,) just committed, and what each is drawn
    from (B, W, V): at the positions this pass read, a code from its target p (B, W + 1, V) (Jacobi
    iteration: right if the context it saw turns out right), beyond them a random code. Coupled, the
    draw at a position is maximally coupled with the draft that position had in this pass (drafts
    (B, W), drawn from q (B, W, V); a random code where it had none), so that a draft that was right
    stays; else it is drawn afresh."""
    B, W, V = q.shape
    rows = torch.arange(B, device=p.device)[:, None]                              # (B, 1)
    after = j[:, None] + 1 + torch.arange(W, device=p.device)                     # (B, W), up to 2W
    uniform = q.new_full((B, W, V), 1.0 / V)
    targets = torch.cat([p, uniform], dim=1)[rows, after]                         # (B, W, V)
    if not coupled:
        return draw_code(targets.flatten(0, 1), generator).view(B, W), targets
    previous = torch.cat([drafts, torch.randint(V, (B, W + 1), device=p.device, generator=generator)], dim=1)
    q_previous = torch.cat([q, uniform, uniform[:, :1]], dim=1)                   # (B, 2W + 1, V)
    return coupled_draw(previous.gather(1, after), q_previous[rows, after], targets, generator), targets


def known_at(edit, positions):
    """Editing: at token positions (B, n), past the image too -> whether the edit knows the code
    there (B, n) bool (never past the image), and that code (B, n)."""
    tokens, known = edit
    inside = positions.clamp(max=tokens.shape[1] - 1)
    return known.gather(1, inside) & (positions < tokens.shape[1]), tokens.gather(1, inside)


def certain(dists, known, codes):  # distributions (B, n, V), one-hot at the known codes (B, n)
    return torch.where(known[..., None], F.one_hot(codes, dists.shape[-1]).to(dists.dtype), dists)


def drafts_with_known(drafts, q, edit, positions):
    """Drafts (B, W) at token positions (B, W) and what they are drawn from (B, W, V), with an
    edit's known codes as drafts drawn from one-hot distributions: the target there is one-hot too
    (certain() in the loop), so they are always accepted: an edit commits its known codes unchanged
    and the rest by speculative sampling of the edit's own distribution, exactly."""
    if edit is None:
        return drafts, q
    known, codes = known_at(edit, positions)
    return torch.where(known, codes, drafts), certain(q, known, codes)


@torch.no_grad()
def generate_speculative(gpt, cond, cond_mask=None, generator=None, window=16, coupled=True, edit=None, **options):
    """GPT.generate's distribution in fewer forward passes -> codes (B, block_size) and the passes
    each row needed (B,) (the batch makes as many as its slowest row). Each pass feeds, after a
    row's n committed codes, its last code and `window` drafts d_n .. d_{n+W-1}, reads the targets
    p_n .. p_{n+W} (guided and filtered as in generate) in one go, and commits 1 to W + 1 codes
    (verify_drafts); rows advance independently. Rejected drafts left in a row's cache are hidden
    by the causal mask from every position before them, and rewritten before any is read.
    coupled: each draft is maximally coupled with its position's draft of the pass before
    (next_drafts), as MC-SJD; else drawn independently, as SJD. Both stay exact, because the test of
    a draft at position i needs only that, given everything at positions before i, the draft is
    distributed as the q it is tested with: its draws at i in earlier passes were never tested (every
    draft left is past the last rejection) and shape nothing before i, and a coupled draw from
    q_new is distributed as q_new whatever it is coupled with. edit: as GPT.generate's."""
    check_raster_loop(gpt, "speculative decoding", speculative=True)
    if window < 1:
        raise ValueError(f"window {window}: speculative decoding checks at least one draft per pass.")
    o = gpt.sampling_settings(options)
    cfg, B, guided = gpt.config, cond.shape[0], o.cfg_scale != 1.0
    T, V, cls, device = cfg.block_size, cfg.vocab_size, cfg.cls_token_num, cond.device
    W = min(window, max(T - 1, 1))  # T - 1 drafts and the code after them already make the image
    rows = torch.arange(B, device=device)[:, None]                                # (B, 1)
    # room for a window past the last code; positions past the image get the last RoPE angle
    # (forward_with_cache clamps them) and only ever predict codes that are thrown away
    with gpt.generation(cond, cond_mask, guided, cache_len=cls + T + W) as (cond, _, mask):
        codes = torch.zeros(B, T + W + 1, dtype=torch.long, device=device)      # committed, then scratch
        n = torch.zeros(B, dtype=torch.long, device=device)                     # codes committed per row
        needed = torch.zeros(B, dtype=torch.long, device=device)                # passes until a row was done
        drafts = torch.randint(V, (B, W), device=device, generator=generator)     # (B, W), drawn from q
        q = torch.full((B, W, V), 1.0 / V, device=device)                       # (B, W, V)
        ahead = torch.arange(W + 1, device=device)                               # a window's offsets
        drafts, q = drafts_with_known(drafts, q, edit, ahead[:W].expand(B, -1))
        with torch.inference_mode():
            # The first pass: the condition, then the drafts for codes 0 .. W-1
            h = torch.cat([gpt.embed_condition(cond), gpt.tok_embeddings(cfg_batch(drafts, guided))], dim=1)
            out = gpt.forward_with_cache(h, torch.arange(cls + W, device=device), mask, outputs=W + 1)
            while True:
                predicted = n[:, None] + ahead                                            # (B, W + 1)
                scale = o.cfg_scale
                if guided and o.cfg_interval >= 0:  # guidance_at for the code each output predicts
                    scale = torch.where(predicted <= o.cfg_interval + 1, o.cfg_scale, 1.0)[..., None]
                p = gpt.output.probabilities(out, scale, o)                               # (B, W + 1, V)
                if edit is not None:
                    p = certain(p, *known_at(edit, predicted))
                j, window_codes = verify_drafts(p, q, drafts, generator)
                codes[rows, predicted] = window_codes                                     # j + 1 of them count
                n = (n + j + 1).clamp(max=T)
                needed += n < T
                if bool((n == T).all()):
                    break
                drafts, q = next_drafts(p, drafts, q, j, generator, coupled)
                drafts, q = drafts_with_known(drafts, q, edit, n[:, None] + ahead[:W])
                last_code = codes[rows, n[:, None] - 1]                                   # (B, 1)
                positions = cls + n[:, None] - 1 + ahead                                  # (B, W + 1)
                positions = positions[0] if B == 1 else cfg_batch(positions, guided)  # one row: the cheaper (S,)
                h = gpt.tok_embeddings(cfg_batch(torch.cat([last_code, drafts], dim=1), guided))
                out = gpt.forward_with_cache(h, positions, mask, outputs=W + 1)
    return codes[:, :T], needed + 1


# -----------------------------------------------------------------------------
# 7. Text conditioner: a compact T5 encoder and a SentencePiece tokenizer
# A caption is T5's features of its SentencePiece tokens, left-padded: 120 positions of flan-t5-xl
# for the official models, a small T5 trained from scratch in the demo.


@dataclasses.dataclass
class T5Config:  # field names as in a Hugging Face config.json; defaults are flan-t5-xl's
    vocab_size: int = 32128
    d_model: int = 2048
    d_kv: int = 64                   # width of one attention head
    d_ff: int = 5120
    num_layers: int = 24
    num_heads: int = 32
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    layer_norm_epsilon: float = 1e-6
    feed_forward_proj: str = "gated-gelu"  # flan-T5 / T5 v1.1; the original T5 used "relu"
    dropout_rate: float = 0.1


T5_PRESETS = {"T5-mini": dict(d_model=128, d_kv=32, d_ff=256, num_layers=2, num_heads=4, dropout_rate=0.0)}


def relative_position_bucket(relative_position, num_buckets, max_distance):
    """T5's bucket of (key position - query position): half the buckets for each direction;
    exact buckets for small distances, logarithmically wider ones up to max_distance."""
    num_buckets //= 2
    buckets = (relative_position > 0).long() * num_buckets
    distance = relative_position.abs()
    max_exact = num_buckets // 2
    log_bucket = max_exact + (torch.log(distance.float() / max_exact) / math.log(max_distance / max_exact)
                              * (num_buckets - max_exact)).long()
    log_bucket = log_bucket.clamp(max=num_buckets - 1)
    return buckets + torch.where(distance < max_exact, distance, log_bucket)


class T5Attention(nn.Module):
    def __init__(self, cfg: T5Config):
        super().__init__()
        self.n_head, self.d_kv = cfg.num_heads, cfg.d_kv
        inner = cfg.num_heads * cfg.d_kv
        self.q = nn.Linear(cfg.d_model, inner, bias=False)
        self.k = nn.Linear(cfg.d_model, inner, bias=False)
        self.v = nn.Linear(cfg.d_model, inner, bias=False)
        self.o = nn.Linear(inner, cfg.d_model, bias=False)
        self.dropout_rate = cfg.dropout_rate

    def forward(self, x, bias):  # x (B, L, d_model), bias (B, nh, L, L): positions + padding
        B, L, _ = x.shape
        q = self.q(x).view(B, L, self.n_head, self.d_kv).transpose(1, 2)  # (B, nh, L, d_kv)
        k = self.k(x).view(B, L, self.n_head, self.d_kv).transpose(1, 2)  # (B, nh, L, d_kv)
        v = self.v(x).view(B, L, self.n_head, self.d_kv).transpose(1, 2)  # (B, nh, L, d_kv)
        # T5 does not divide by sqrt(d_kv): that scale is folded into its initialisation
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=1.0,
                                           dropout_p=self.dropout_rate if self.training else 0.0)
        return self.o(y.transpose(1, 2).reshape(B, L, -1))                 # (B, L, d_model)


class T5FeedForward(nn.Module):
    def __init__(self, cfg: T5Config):
        super().__init__()
        self.gated = cfg.feed_forward_proj == "gated-gelu"
        if self.gated:  # wo(gelu(wi_0 x) * wi_1 x)
            self.wi_0 = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
            self.wi_1 = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        else:           # wo(relu(wi x))
            self.wi = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        self.wo = nn.Linear(cfg.d_ff, cfg.d_model, bias=False)
        self.dropout = nn.Dropout(cfg.dropout_rate)

    def forward(self, x):
        h = F.gelu(self.wi_0(x), approximate="tanh") * self.wi_1(x) if self.gated else F.relu(self.wi(x))
        return self.wo(self.dropout(h))


class T5Block(nn.Module):
    def __init__(self, cfg: T5Config):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.d_model, cfg.layer_norm_epsilon)  # T5's layer norm is an RMSNorm
        self.attn = T5Attention(cfg)
        self.ffn_norm = RMSNorm(cfg.d_model, cfg.layer_norm_epsilon)
        self.ffn = T5FeedForward(cfg)
        self.dropout = nn.Dropout(cfg.dropout_rate)

    def forward(self, x, bias):
        x = x + self.dropout(self.attn(self.attn_norm(x), bias))
        return x + self.dropout(self.ffn(self.ffn_norm(x)))


class T5Encoder(nn.Module):
    def __init__(self, cfg: T5Config):
        super().__init__()
        if cfg.feed_forward_proj not in ("relu", "gated-gelu"):
            raise ValueError(f"feed_forward_proj {cfg.feed_forward_proj!r} is not supported; "
                             "use 'relu' (T5) or 'gated-gelu' (flan-T5, T5 v1.1).")
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.d_model)
        # one bias per (bucket, head), computed once and shared by all layers
        self.relative_attention_bias = nn.Embedding(cfg.relative_attention_num_buckets, cfg.num_heads)
        self.blocks = nn.ModuleList(T5Block(cfg) for _ in range(cfg.num_layers))
        self.final_norm = RMSNorm(cfg.d_model, cfg.layer_norm_epsilon)
        self.dropout = nn.Dropout(cfg.dropout_rate)

    def position_bias(self, length, device):  # -> (1, nh, L, L)
        positions = torch.arange(length, device=device)
        relative = positions[None, :] - positions[:, None]                 # (L, L) key - query
        buckets = relative_position_bucket(relative, self.config.relative_attention_num_buckets,
                                           self.config.relative_attention_max_distance)
        return self.relative_attention_bias(buckets).permute(2, 0, 1)[None]  # (L, L, nh) -> (1, nh, L, L)

    def forward(self, input_ids, attention_mask):  # (B, L), (B, L) 1 = token -> (B, L, d_model)
        h = self.dropout(self.embed_tokens(input_ids))
        padding = (1.0 - attention_mask[:, None, None, :].to(h.dtype)) * torch.finfo(h.dtype).min
        bias = self.position_bias(input_ids.shape[1], input_ids.device).to(h.dtype) + padding  # (B, nh, L, L)
        for block in self.blocks:
            h = block(h, bias)
        return self.dropout(self.final_norm(h))


class TextTokenizer:
    """SentencePiece with T5's conventions (pad 0, end-of-text 1, unknown 2). Captions become
    ids with the end token appended and LEFT padding, as the official t2i models read them."""

    def __init__(self, model_bytes):
        import sentencepiece as spm
        self.model_bytes = bytes(model_bytes)  # a checkpoint carries these bytes
        self.processor = spm.SentencePieceProcessor(model_proto=self.model_bytes)

    @classmethod
    def train(cls, texts, vocab_size):
        import sentencepiece as spm
        model = io.BytesIO()
        spm.SentencePieceTrainer.train(sentence_iterator=iter(texts), model_writer=model, vocab_size=vocab_size,
                                       model_type="bpe", pad_id=0, eos_id=1, unk_id=2, bos_id=-1,
                                       character_coverage=1.0, hard_vocab_limit=False, minloglevel=2)
        return cls(model.getvalue())

    @property
    def vocab_size(self):
        return self.processor.get_piece_size()

    def __call__(self, texts, max_length):  # -> ids (B, max_length), mask (B, max_length)
        ids = torch.zeros(len(texts), max_length, dtype=torch.long)  # 0 = pad
        mask = torch.zeros(len(texts), max_length, dtype=torch.long)
        cut = 0
        for i, text in enumerate(texts):
            pieces = self.processor.encode(text)
            if len(pieces) > max_length - 1:
                cut += 1
                pieces = pieces[:max_length - 1]
            pieces = pieces + [self.processor.eos_id()]
            ids[i, max_length - len(pieces):] = torch.tensor(pieces)
            mask[i, max_length - len(pieces):] = 1
        if cut:
            warnings.warn(f"{cut} of {len(texts)} texts were cut to {max_length} tokens, the length the "
                          "model reads.", stacklevel=2)
        return ids, mask

    def decode(self, ids):
        return self.processor.decode([i for i in ids.tolist() if i > self.processor.eos_id()])


class TextEncoder:
    """Captions -> what a text-conditional GPT reads: T5's features (B, L, d_model), padding mask (B, L)."""

    def __init__(self, text_tokenizer, t5):
        self.text_tokenizer, self.t5 = text_tokenizer, t5

    @torch.no_grad()
    def __call__(self, captions, length, device):
        ids, mask = self.text_tokenizer(captions, length)
        ids, mask = ids.to(device), mask.to(device)
        if self.t5 is None:  # early fusion (section 11) reads the ids themselves
            return ids, mask
        with evaluating(self.t5):
            return self.t5(ids, mask), mask


# -----------------------------------------------------------------------------
# 8. Beyond LlamaGen, on the same Llama: MAR's continuous tokens and a diffusion loss per token
# "Autoregressive Image Generation without Vector Quantization" (Li, Tian, Li, Deng, He 2024,
# https://arxiv.org/abs/2406.11838; official code LTH14/mar): FID 1.55 on ImageNet 256 without a
# codebook. Each grid cell is a continuous vector; a linear projection reads it into the Llama, whose
# output z conditions a small diffusion model that draws the next token: LlamaGen's softmax becomes
# the Diffusion Loss, and raster order, the KV cache, CFG and the generation loop stay. This is MAR's
# causal variant; its main model predicts tokens in random order (section 9).


@dataclasses.dataclass
class KLConfig(AutoencoderConfig):  # the same encoder and decoder with a continuous latent (MAR's KL-16)
    embed_dim: int = 16              # channels per token
    kl_weight: float = 1e-6          # KL(q(z|x) || N(0, I)) per latent element, against the L2 loss


KL_PRESETS = {
    "KL-16": dict(),  # the sizes of MAR's KL-16 (whose decoder has no attention blocks)
    "KL-mini": dict(ch=32, ch_mult=(1, 1, 2), num_res_blocks=1, z_channels=32, embed_dim=4),  # CPU demo
    "KL-tiny": dict(ch=32, ch_mult=(1, 2), z_channels=32, embed_dim=4),                      # tests
}


class KLModel(ImageTokenizer):
    """The tokenizer with a continuous latent (LDM's AutoencoderKL, MAR's KL-16): a mean and a
    log-variance per latent value; training decodes a sample z = mean + std * noise and pays
    kl_weight * KL(q(z|x) || N(0, I)), so the latent stays bounded and the decoder tolerates small
    errors. latent_scale, fixed after training, gives the GPT tokens of about unit variance."""

    config_class = KLConfig
    token_kind = "continuous"  # a vector of embed_dim values per grid cell

    def __init__(self, cfg: KLConfig):
        super().__init__(cfg)
        self.add_bottleneck_convs(2 * cfg.embed_dim, cfg.embed_dim)  # reads a mean and a log-variance
        self.register_buffer("latent_scale", torch.ones(()))

    def posterior(self, images):  # (B, 3, H, W) -> mean, log-variance (B, D, h, w)
        mean, logvar = self.quant_conv(self.encoder(images)).chunk(2, dim=1)
        return mean, logvar.clamp(-30.0, 20.0)

    def forward(self, images):  # -> reconstruction, latent sample (B, D, h, w), loss terms
        mean, logvar = self.posterior(images)
        z = mean + (0.5 * logvar).exp() * torch.randn_like(mean)
        kl = 0.5 * (mean ** 2 + logvar.exp() - 1.0 - logvar).mean()
        return self.decoder(self.post_quant_conv(z)), z, dict(kl_loss=self.cfg.kl_weight * kl)

    @torch.no_grad()
    def encode(self, images):  # (B, 3, H, W) -> the posterior mean as tokens (B, h*w, D), scaled
        mean, _ = self.posterior(images)
        return mean.flatten(2).transpose(1, 2) * self.latent_scale   # (B, D, h, w) -> (B, h*w, D)

    @torch.no_grad()
    def decode(self, tokens):  # tokens (B, h*w, D), scaled -> images (B, 3, H, W) in [-1, 1], float32
        B, T, D = tokens.shape
        grid = math.isqrt(T)
        z = (tokens / self.latent_scale).transpose(1, 2).reshape(B, D, grid, grid)  # (B, D, h, w)
        return self.decoder(self.post_quant_conv(z)).float().clamp(-1, 1)

    def token_config(self):
        return dict(token_kind=self.token_kind, token_dim=self.cfg.embed_dim)

    @torch.no_grad()
    def encode_posterior(self, images):
        """The scaled mean and standard deviation of each token (B, h*w, 2, D): every training step
        of the GPT draws a fresh sample from them (as MAR)."""
        mean, logvar = self.posterior(images)                                      # (B, D, h, w) each
        moments = torch.stack([mean, (0.5 * logvar).exp()], dim=1) * self.latent_scale  # (B, 2, D, h, w)
        return moments.flatten(3).permute(0, 3, 1, 2)                             # (B, h*w, 2, D)

    def draw_from_posterior(self, moments):  # (B, h*w, 2, D) -> tokens (B, h*w, D)
        mean, std = moments.unbind(dim=2)                                         # (B, h*w, D) each
        return mean + std * torch.randn_like(mean)

    @torch.no_grad()
    def calibrate(self, image_batches):
        """latent_scale = 1 / the standard deviation of the latents over the training images: the
        fixed scale that gives the GPT tokens of about unit variance (as MAR's 0.2325)."""
        samples = []
        for images in image_batches:
            mean, logvar = self.posterior(images)
            samples.append((mean + (0.5 * logvar).exp() * torch.randn_like(mean)).flatten().cpu())
        self.latent_scale.fill_(1.0 / torch.cat(samples).std())
        return {"latent scale 1 / std of the latents": self.latent_scale.item()}


def cosine_schedule(num_steps=1000, offset=0.008):
    """alpha_bar_t for t = 0 .. num_steps - 1 (Nichol & Dhariwal 2021, as MAR): how much of the
    token is left in x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) noise; from about 1 at
    t = 0 down to about 0 at the last step. float64, as the official code keeps it."""
    def f(u):
        return math.cos((u + offset) / (1 + offset) * math.pi / 2) ** 2
    betas = torch.tensor([min(1 - f((t + 1) / num_steps) / f(t / num_steps), 0.999) for t in range(num_steps)],
                         dtype=torch.float64)
    return torch.cumprod(1 - betas, dim=0)


def timestep_embedding(t, dim, max_period=10000):  # t (N,) -> (N, dim): [cos(t f), sin(t f)]
    freqs = torch.exp(-math.log(max_period) * torch.arange(dim // 2, device=t.device) / (dim // 2))
    angles = t.float()[:, None] * freqs[None]
    return torch.cat([angles.cos(), angles.sin()], dim=-1)


def diffusion_loss(head, tokens, z, alphas_cumprod, repeats):
    """MAR's Diffusion Loss for tokens (N, D) given their conditions z (N, z_dim): noise each token
    at a random timestep and ask the head for the noise, E ||noise - head(x_t, t, z)||^2. Each token
    is noised `repeats` times with other timesteps; z is computed once and shared (the transformer
    is the expensive part)."""
    tokens, z = tokens.repeat(repeats, 1), z.repeat(repeats, 1)                   # (repeats * N, ...)
    t = torch.randint(0, len(alphas_cumprod), (len(tokens),), device=tokens.device)
    alpha_bar = alphas_cumprod.to(tokens.device)[t].float()[:, None]             # (repeats * N, 1)
    noise = torch.randn_like(tokens)
    noisy = alpha_bar.sqrt() * tokens + (1 - alpha_bar).sqrt() * noise
    return F.mse_loss(head(noisy, t, z), noise)


def respaced_schedule(alphas_cumprod, num_steps):
    """The num_steps of the 1000 training steps that sampling visits, evenly spaced with both ends
    kept (MAR's '100'), with alpha_bar there and the betas between them."""
    T = len(alphas_cumprod)
    timesteps = [round(i * (T - 1) / (num_steps - 1)) for i in range(num_steps)] if num_steps > 1 else [T - 1]
    alpha_bar = alphas_cumprod[timesteps]                                        # (num_steps,)
    alpha_bar_prev = torch.cat([alpha_bar.new_ones(1), alpha_bar[:-1]])
    return timesteps, alpha_bar, alpha_bar_prev, 1 - alpha_bar / alpha_bar_prev


@torch.no_grad()
def reverse_diffusion(head, z, token_dim, alphas_cumprod, cfg_scale, temperature, num_steps, generator=None,
                      x0_bound=5.0):
    """Draw one token per row of z by reverse diffusion (DDPM ancestral sampling over num_steps
    respaced steps): start from noise, and at each step predict the noise, estimate x_0 from it,
    and step to the posterior mean plus fresh noise of variance beta~_t (times temperature: below 1
    sharper, as MAR). With CFG, z is the [cond; null] batch (2B, z_dim): both halves see the same
    x_t and the predicted noise is guided, uncond + (cond - uncond) * cfg_scale. -> (B, D)
    The estimate of x_0 is clipped to +-x0_bound (the tokens have unit variance), as ADM clips
    images: at the first steps alpha_bar is about 1e-9, so x_0 = (x_t - sqrt(1 - a) noise) / sqrt(a)
    multiplies any error in the predicted noise by thousands; a small head trained for minutes has them."""
    guided = cfg_scale != 1.0
    B = z.shape[0] // 2 if guided else z.shape[0]
    timesteps, alpha_bar, alpha_bar_prev, betas = respaced_schedule(alphas_cumprod.cpu(), num_steps)
    alpha_bar, alpha_bar_prev, betas = (v.float().tolist() for v in (alpha_bar, alpha_bar_prev, betas))
    x = torch.randn(B, token_dim, device=z.device, generator=generator)
    for i in reversed(range(num_steps)):
        t = torch.full((z.shape[0],), timesteps[i], device=z.device)
        noise_pred = head(cfg_batch(x, guided).to(z.dtype), t, z).float()
        if guided:
            noise_pred = guide(noise_pred, cfg_scale)
        x0 = ((x - math.sqrt(1 - alpha_bar[i]) * noise_pred) / math.sqrt(alpha_bar[i])).clamp(-x0_bound, x0_bound)
        # the mean of the posterior q(x_{t-1} | x_t, x_0) at the estimated x_0
        mean = (betas[i] * math.sqrt(alpha_bar_prev[i]) * x0 + (1 - alpha_bar_prev[i]) * math.sqrt(1 - betas[i]) * x) \
            / (1 - alpha_bar[i])
        if i == 0:
            return mean
        variance = betas[i] * (1 - alpha_bar_prev[i]) / (1 - alpha_bar[i])
        x = mean + temperature * math.sqrt(variance) * torch.randn(B, token_dim, device=z.device, generator=generator)


class AdaLNBlock(nn.Module):
    """A residual MLP block whose LayerNorm is shifted and scaled, and whose output is gated, by a
    function of the condition (the timestep and the transformer's z): adaptive LayerNorm (DiT)."""

    def __init__(self, width):
        super().__init__()
        self.norm = nn.LayerNorm(width, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(width, width), nn.SiLU(), nn.Linear(width, width))
        self.modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 3 * width))

    def forward(self, x, c):  # x, c (N, width)
        shift, scale, gate = self.modulation(c).chunk(3, dim=-1)    # (N, width) each
        return x + gate * self.mlp(self.norm(x) * (1 + scale) + shift)


class DiffusionHead(nn.Module):
    """MAR's denoiser (SimpleMLPAdaLN): predicts the noise in a noisy token x_t from the timestep t
    and the transformer's output z there. Small (diffusion_depth blocks of diffusion_width): it runs
    once per token per diffusion step, the transformer once per token. As the GPT's readout (see
    CodeHead) it keeps z as it is, trains by diffusion_loss and draws by reverse_diffusion."""

    sampling_options = (SamplingOption("diffusion_steps", 100, "continuous tokens (MAR): reverse diffusion steps "
                                       "per token", minimum=1),)
    probabilities = None  # a density over vectors: no distribution over a finite set to check or rank by

    def __init__(self, cfg: GPTConfig, frequency_dim=256):
        super().__init__()
        width = cfg.diffusion_width
        self.token_dim, self.repeats, self.frequency_dim = cfg.token_dim, cfg.diffusion_repeats, frequency_dim
        self.input_proj = nn.Linear(cfg.token_dim, width)
        self.time_embed = nn.Sequential(nn.Linear(frequency_dim, width), nn.SiLU(), nn.Linear(width, width))
        self.cond_embed = nn.Linear(cfg.dim, width)
        self.blocks = nn.ModuleList(AdaLNBlock(width) for _ in range(cfg.diffusion_depth))
        self.final_norm = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.final_modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 2 * width))
        self.final_linear = nn.Linear(width, cfg.token_dim)
        # the noise schedule: a constant, kept in float64 on the CPU whatever the head's device and dtype
        self.alphas_cumprod = cosine_schedule()
        self.initialize()

    def initialize(self):
        """MAR's initialisation: Xavier-uniform weights and zero biases, N(0, 0.02) for the timestep
        embedding, and the modulations and the output zero: each block starts as the identity and
        the head predicts no noise."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        for layer in (self.time_embed[0], self.time_embed[2]):
            nn.init.normal_(layer.weight, std=0.02)
        for layer in [block.modulation[1] for block in self.blocks] + [self.final_modulation[1], self.final_linear]:
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, x, t, z):  # x_t (N, D), t (N,) integer timesteps in [0, 1000), z (N, z_dim) -> noise (N, D)
        frequencies = timestep_embedding(t, self.frequency_dim).to(x.dtype)                  # (N, frequency_dim)
        c = self.time_embed(frequencies) + self.cond_embed(z)                                  # (N, width)
        h = self.input_proj(x)
        for block in self.blocks:
            h = block(h, c)
        shift, scale = self.final_modulation(c).chunk(2, dim=-1)                               # (N, width) each
        return self.final_linear(self.final_norm(h) * (1 + scale) + shift)

    def readout(self, h):  # the Llama's final hidden states are z, the head's condition
        return h

    def loss(self, z, tokens):  # z (B, T, dim), tokens (B, T, D) -> the Diffusion Loss of every token
        return diffusion_loss(self, tokens.flatten(0, 1), z.flatten(0, 1),     # (B*T, D), (B*T, dim)
                              self.alphas_cumprod, self.repeats)

    def draw(self, z, cfg_scale, settings, generator=None):
        """One token per row (B, 1, D) by reverse diffusion from z (B, dim), or the CFG batch (2B, dim)."""
        return reverse_diffusion(self, z, self.token_dim, self.alphas_cumprod, cfg_scale, settings.temperature,
                                 settings.diffusion_steps, generator)[:, None]


class TokenProjection(nn.Linear):
    """MAR's input layer (VAR's too): a linear projection of each vector (B, T, token_dim) ->
    (B, T, dim). The tokens drawn stay float32, so it reads them in its own dtype (bf16 too)."""

    def __init__(self, cfg: GPTConfig):
        super().__init__(cfg.token_dim, cfg.dim)

    def forward(self, tokens):
        return super().forward(tokens.to(self.weight.dtype))


TOKENIZERS["continuous"] = KLModel
# MAR's tokens: a linear projection reads a vector in; the diffusion head reads the Llama's output out
TOKEN_LAYERS["continuous"] = (TokenProjection, DiffusionHead)


# -----------------------------------------------------------------------------
# 9. Masked generation in random order: MaskGIT over codes, MAR proper over continuous tokens
# MaskGIT ("Masked Generative Image Transformer", Chang, Zhang, Jiang, Liu, Freeman 2022; code
# google-research/maskgit): FID 6.18 on ImageNet 256 in 8 steps, against 18.65 for the same
# transformer in raster order over 256. MAR (Li et al. 2024, LTH14/mar, section 8's paper): its
# main model is this, over continuous tokens: FID 1.55 with the Diffusion Loss. On the same Llama,
# "masked" is an order and an attention pattern, not a new architecture (MaskedGPT says what
# changes). MAR's own network is an MAE-style encoder over the known tokens and a decoder over all,
# with "buffer" positions for the class; one Llama over all positions, the mask vector in place,
# keeps the comparison with the raster rows to the order alone.


def maskgit_fraction(batch_size, device):  # MaskGIT: cos(pi/2 r), r ~ U(0, 1): often most of the image
    return torch.cos(math.pi / 2 * torch.rand(batch_size, device=device))


def mar_fraction(batch_size, device):  # MAR: N(1, 0.25) truncated to [0.7, 1], as hard as sampling's first steps
    return nn.init.trunc_normal_(torch.empty(batch_size, device=device), mean=1.0, std=0.25, a=0.7, b=1.0)


# token_kind -> how much of each training image is masked, per image
MASK_FRACTIONS = {"discrete": maskgit_fraction, "continuous": mar_fraction}


def masked_after_step(step, num_iter, num_tokens, masked_now):
    """How many tokens stay masked after step `step` of num_iter: floor(N cos(pi/2 (step + 1) /
    num_iter)) (MaskGIT's cosine schedule, MAR's too), yet at least one fewer than before and at
    least 1 until the last step, which decides all that is left."""
    if step == num_iter - 1:
        return 0
    scheduled = math.floor(num_tokens * math.cos(math.pi / 2 * (step + 1) / num_iter))
    return max(1, min(masked_now - 1, scheduled))


def random_ranks(scores):  # (B, T) scores -> each position's rank in its row: a permutation per row
    return scores.argsort(dim=1).argsort(dim=1)


class MaskedGPT(Llama):
    """Masked generation on the Llama, MaskGIT over codes, MAR over continuous tokens. What changes
    from raster order:
      input       a token that is not known yet is replaced by a learned mask vector;
      attention   bidirectional: every position sees every other;
      positions   each token keeps its own 2D RoPE position, so the order never touches positions;
      read out    the output at a position (not shifted) predicts that position's token;
      loss        only over the masked positions, a random fraction of them per image;
      sampler     a few steps, each one full pass (no KV cache: a known token's keys change as more
                  tokens become known) that decides a share of the masked tokens on a cosine
                  schedule: the most confident codes (MaskGIT), or the next of a random order (MAR)."""

    sampling_options = Llama.sampling_options + (
        SamplingOption("num_iter", 8, "masked order: steps, each a forward pass that decides a share of the tokens",
                       minimum=1, per_token=True),
        SamplingOption("choice_temperature", 4.5, "masked order over codes: Gumbel noise on the confidence that picks "
                       "the codes kept (MaskGIT; 0: the most likely first)", minimum=0, needs_probabilities=True))

    def __init__(self, cfg: GPTConfig):
        super().__init__(cfg)
        self.mask_token = nn.Parameter(torch.randn(cfg.dim) * 0.02)  # MAR's init, N(0, 0.02)
        # A learned position embedding added to every image input, as MaskGIT's and MAR's: with
        # mask vectors everywhere and only relative positions (RoPE), every position would see the
        # same thing at the same offsets and could not tell where in the image it is.
        self.pos_embedding = nn.Parameter(torch.randn(cfg.block_size, cfg.dim) * 0.02)

    def attention_blocks(self, seq_len, device):  # one block: every position sees every other
        return torch.zeros(seq_len, dtype=torch.long, device=device)

    def forward(self, tokens, masked, cond, cond_mask=None):
        """Image tokens (B, T) codes or (B, T, D) vectors, of which masked (B, T) True are hidden ->
        the readout at every image position (B, T, ..): logits over the codes, or MAR's z."""
        embedded = self.tok_embeddings(tokens)                                       # (B, T, dim)
        inputs = torch.where(masked[..., None], self.mask_token.to(embedded.dtype), embedded) + self.pos_embedding
        h = self.transformer(cond, inputs, cond_mask)                               # (B, cls + T, dim)
        return self.output.readout(h[:, self.config.cls_token_num:])                # (B, T, ..)

    def loss(self, tokens, cond, cond_mask=None):
        """Mask a random subset of each image's tokens, of a random size (MASK_FRACTIONS, at least
        one token), and take the readout's loss on the masked positions only."""
        B, T = tokens.shape[:2]
        fraction = MASK_FRACTIONS[self.config.token_kind](B, tokens.device)
        num_masked = (fraction * T).ceil().clamp(1, T)                               # (B,), MAR's rounding
        masked = random_ranks(torch.rand(B, T, device=tokens.device)) < num_masked[:, None]  # (B, T)
        out = self(tokens, masked, cond, cond_mask)
        return self.output.loss(out[masked][None], tokens[masked][None])              # (1, masked, ..)

    @torch.no_grad()
    def generate(self, cond, cond_mask=None, generator=None, steps=None, edit=None, **options):
        """Sample the block_size image tokens in num_iter steps (see GPT.generate). An edit's known
        tokens are in place, unmasked, from the start, and the schedule runs over the others (every
        row of an edit hides as many); each step sees them all, wherever they are. Each step is one
        pass over [condition, all tokens, the unknown ones masked] and decides masked tokens until
        masked_after_step of them are left:
          codes (MaskGIT)    draw a code at every masked position; keep the most confident, by
                             log p(code) + Gumbel noise of temperature choice_temperature * (1 -
                             (step + 1) / num_iter) (a freer choice early on);
          continuous (MAR)   the next tokens of a random order, drawn by the diffusion head.
        CFG as MAR: 1 + (cfg_scale - 1) * known / block_size, known after the step."""
        o = self.sampling_settings(options)
        cfg, B, guided = self.config, cond.shape[0], o.cfg_scale != 1.0
        T, device = cfg.block_size, cond.device
        by_confidence = self.output.probabilities is not None                      # codes; vectors: a random order
        shape, dtype = ((B, T), torch.long) if by_confidence else ((B, T, cfg.token_dim), torch.float)
        tokens = torch.zeros(shape, dtype=dtype, device=device)   # what is masked is never read
        masked = torch.ones(B, T, dtype=torch.bool, device=device)
        if edit is not None:
            tokens, masked = edit[0].to(dtype).clone(), ~edit[1]
        hidden = masked.sum(dim=1)                                                   # (B,) tokens to generate
        if bool((hidden != hidden[0]).any()):
            raise ValueError("the rows of an edit hide different numbers of tokens; give every row the same mask.")
        decided = torch.zeros(B, T, dtype=torch.long, device=device)                 # the step of each token
        # MAR's random order, over the hidden tokens: the known ones rank first, as if decided already
        order = random_ranks(torch.rand(B, T, device=device, generator=generator).masked_fill(~masked, -1.0))
        with self.generation(cond, cond_mask, guided) as (cond, cond_mask, _):
            for step in range(o.num_iter if int(hidden[0]) else 0):  # nothing hidden: nothing to do
                remaining = masked_after_step(step, o.num_iter, int(hidden[0]), int(masked[0].sum()))
                scale = 1 + (o.cfg_scale - 1) * (T - remaining) / T
                out = self(cfg_batch(tokens, guided), cfg_batch(masked, guided), cond, cond_mask)  # (B or 2B, T, ..)
                if by_confidence:
                    logits = guide(out, scale) if guided else out                    # (B, T, vocab)
                    drawn = self.output.draw(logits.flatten(0, 1), 1.0, o, generator).view(B, T)
                    confidence = logits.log_softmax(dim=-1).gather(-1, drawn[..., None])[..., 0]  # (B, T)
                    gumbel = -torch.empty_like(confidence).exponential_(generator=generator).log()
                    confidence = confidence + o.choice_temperature * (1 - (step + 1) / o.num_iter) * gumbel
                    confidence = confidence.masked_fill(~masked, float("inf"))      # known: never masked again
                    still_masked = random_ranks(confidence) < remaining              # the least confident
                    tokens = torch.where(masked & ~still_masked, drawn, tokens)
                else:
                    still_masked = order >= T - remaining                            # the order's later ones
                    now = masked & ~still_masked                                     # (B, T), as many per row
                    z = out[cfg_batch(now, guided)]                                  # (B or 2B * count, dim)
                    tokens[now] = self.output.draw(z, scale, o, generator)[:, 0]
                decided[masked & ~still_masked] = step
                masked = still_masked
        if steps is not None:
            steps.append(decided)
        return tokens


GENERATORS["masked"] = MaskedGPT


# -----------------------------------------------------------------------------
# 10. Next-scale prediction (VAR): the multi-scale residual quantizer, its tokenizer, and the
# generator that writes an image one scale per forward pass
# VAR ("Visual Autoregressive Modeling: Scalable Image Generation via Next-Scale Prediction", Tian,
# Jiang, Yuan, Peng, Wang 2024, NeurIPS best paper; code FoundationVision/VAR): FID down to 1.73 on
# ImageNet 256 in 10 passes, where raster order takes 256: coarse to fine, a 1x1 map of codes, 2x2,
# ..., the h x w grid, each scale quantizing what the earlier ones left. The quantizer is exact to
# the official VectorQuantizer2 (a fixture test), codes by Euclidean distance (using_znorm=False).


class Phi(nn.Conv2d):
    """VAR's phi, which refines a scale's upsampled codes: (1 - r) h + r conv3x3(h)."""

    def __init__(self, dim, ratio=0.5):
        super().__init__(dim, dim, kernel_size=3, padding=1)
        self.ratio = ratio

    def forward(self, h):  # (B, C, H, W) -> (B, C, H, W)
        return h * (1 - self.ratio) + super().forward(h) * self.ratio


class SharedPhis(nn.Module):
    """`count` convolutions shared by the scales: scale k of S uses the one whose tick (`count` points
    spread over [0, 1]) is nearest to k / (S - 1), the first on a tie (VAR's rule)."""

    def __init__(self, dim, count=4, ratio=0.5):
        super().__init__()
        self.qresi_ls = nn.ModuleList(Phi(dim, ratio) for _ in range(count))  # the official name
        # the ticks in np.linspace's arithmetic, to the last bit: some scales sit exactly halfway
        # between two ticks (with VAR's 10 scales, k = 2 and 7), and rounding picks the phi
        first = 1 / 3 / count if count == 4 else 1 / 2 / count
        last = 1 - first
        step = (last - first) / max(count - 1, 1)
        self.ticks = [i * step + first for i in range(count - 1)] + [last]

    def at(self, scale, num_scales):  # the phi of scale index `scale` (0 = the coarsest)
        where = scale / max(num_scales - 1, 1)
        return self.qresi_ls[min(range(len(self.ticks)), key=lambda i: abs(self.ticks[i] - where))]


def without_autocast(method):
    """A quantizer method run in float32 even under bf16 autocast (a GPU's training step), as VAR's
    quantizer is: training must find the codes, and build the inputs, that encode and generate do."""
    @functools.wraps(method)
    def run(self, *args):
        with torch.autocast(self.embedding.weight.device.type, enabled=False):
            return method(self, *args)
    return run


class MultiScaleQuantizer(nn.Module):
    """Residual quantization over scales s_1 < ... < s_K = h (VAR's VectorQuantizer2). For each
    scale: area-downsample the residual to s_k x s_k, take each cell's nearest code, upsample the
    codes' vectors back to h x h (bicubic), refine them with phi, add them to the reconstruction
    f_hat and subtract them from the residual. The codes of all scales are the image's tokens."""

    def __init__(self, vocab_size, dim, scales, beta=0.25, phi_ratio=0.5, phi_count=4):
        super().__init__()
        self.scales, self.beta, self.dim = list(scales), beta, dim
        self.embedding = nn.Embedding(vocab_size, dim)
        # codes start near zero, uniform(-1/V, 1/V) (VAR's eini(-1), and the VQ's): from nn.Embedding's
        # N(0, 1) most codes begin far from every feature, are never chosen, and stay dead
        self.embedding.weight.data.uniform_(-1.0 / vocab_size, 1.0 / vocab_size)
        self.quant_resi = SharedPhis(dim, phi_count, phi_ratio)

    def nearest_codes(self, z):  # (N, C) -> (N,): the code at the smallest Euclidean distance
        codebook = self.embedding.weight
        distances = torch.addmm(z.square().sum(1, keepdim=True) + codebook.square().sum(1),  # (N, vocab)
                                z, codebook.T, alpha=-2)
        return distances.argmin(dim=1)

    def scale_contribution(self, k, codes):
        """What scale k's codes (B, s_k * s_k) add to f_hat: their vectors upsampled to h x h and
        refined by phi -> (B, C, h, h)."""
        s, h = self.scales[k], self.scales[-1]
        vectors = self.embedding(codes).transpose(1, 2).reshape(len(codes), self.dim, s, s)  # (B, C, s, s)
        if s != h:
            vectors = F.interpolate(vectors, size=(h, h), mode="bicubic")
        return self.quant_resi.at(k, len(self.scales))(vectors)

    @torch.no_grad()
    @without_autocast
    def quantize(self, f):
        """Encoder features f (B, C, h, h) -> the codes of every scale [(B, s_k * s_k)] (raster
        order within a scale) and f_hat after every scale [(B, C, h, h)], in float32."""
        residual, f_hat, codes, f_hats = f.float(), torch.zeros_like(f, dtype=torch.float32), [], []
        for k, s in enumerate(self.scales):
            z = F.interpolate(residual, size=(s, s), mode="area") if s != self.scales[-1] else residual
            codes.append(self.nearest_codes(z.permute(0, 2, 3, 1).reshape(-1, self.dim)).view(len(f), s * s))
            contribution = self.scale_contribution(k, codes[-1])
            f_hat, residual = f_hat + contribution, residual - contribution
            f_hats.append(f_hat)
        return codes, f_hats

    def codes_to_f_hat(self, codes):  # the codes of all scales -> the final f_hat (B, C, h, h), to decode
        return sum(self.scale_contribution(k, c) for k, c in enumerate(codes))

    def next_input(self, k, f_hat, codes):
        """One step of generation: scale k's codes (B, s_k * s_k) join f_hat -> (the new f_hat, the
        input for scale k + 1: f_hat area-downsampled to s_{k+1} x s_{k+1}, or f_hat after the last)."""
        f_hat = f_hat + self.scale_contribution(k, codes)
        if k + 1 == len(self.scales):
            return f_hat, f_hat
        s = self.scales[k + 1]
        return f_hat, F.interpolate(f_hat, size=(s, s), mode="area")

    @without_autocast
    def teacher_forcing_input(self, codes):
        """What the transformer reads in training: for scales 2..K, f_hat after the earlier scales
        downsampled to that scale, flattened in raster order -> (B, s_2^2 + ... + s_K^2, C)."""
        f_hat = self.embedding.weight.new_zeros(len(codes[0]), self.dim, self.scales[-1], self.scales[-1])
        inputs = []
        for k in range(len(self.scales) - 1):
            f_hat, downsampled = self.next_input(k, f_hat, codes[k])               # (B, C, s, s)
            inputs.append(downsampled.flatten(2).transpose(1, 2))                   # (B, s*s, C)
        return torch.cat(inputs, dim=1)

    @without_autocast
    def forward(self, f):
        """Training: f (B, C, h, h) -> (the straight-through f_hat, the codes of every scale, the VQ
        loss), in float32. The codes are found without gradients, then f_hat is rebuilt from them so
        that the loss reaches the codebook and phi: after every scale, averaged, beta * ||sg[f_hat] -
        f||^2 (commitment, moves the encoder) + ||f_hat - sg[f]||^2 (moves the codes and phi)."""
        f = f.float()
        codes, _ = self.quantize(f)
        f_hat, loss = 0.0, 0.0
        for k, scale_codes in enumerate(codes):
            f_hat = f_hat + self.scale_contribution(k, scale_codes)                 # (B, C, h, h)
            loss = loss + self.beta * F.mse_loss(f_hat.detach(), f) + F.mse_loss(f_hat, f.detach())
        return f + (f_hat - f).detach(), codes, loss / len(codes)


@dataclasses.dataclass
class MultiScaleVQConfig(AutoencoderConfig):  # the same encoder and decoder around VAR's quantizer
    codebook_size: int = 4096        # VAR's vocabulary
    codebook_embed_dim: int = 32     # VAR's Cvae
    scales: tuple = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)  # VAR's patch_nums for 256 px; the last is the grid
    commit_loss_beta: float = 0.25
    phi_ratio: float = 0.5           # phi(h) = (1 - r) h + r conv3x3(h); 0: no refinement
    phi_count: int = 4               # convolutions shared by the scales


MULTISCALE_PRESETS = {
    "MSVQ-mini": dict(ch=32, ch_mult=(1, 1, 2), num_res_blocks=1, z_channels=32, codebook_size=256,
                      codebook_embed_dim=8, scales=(1, 2, 3, 4, 6, 8)),                 # CPU demo
    "MSVQ-tiny": dict(ch=32, ch_mult=(1, 2), z_channels=32, codebook_size=64, codebook_embed_dim=8,
                      scales=(1, 2, 4, 8)),                                            # tests
}


def split_scales(tokens, scales):  # (B, s_1^2 + ... + s_K^2) -> [(B, s_k^2)], coarse to fine
    return list(tokens.split([s * s for s in scales], dim=1))


class MultiScaleVQModel(ImageTokenizer):
    """VAR's tokenizer: the encoder's features quantized over scales by MultiScaleQuantizer. An
    image's tokens are the codes of every scale, coarse to fine, each scale in raster order:
    s_1^2 + ... + s_K^2 of them (1 + 4 + 9 + 16 + 36 + 64 = 130 for the demo's 8 x 8 grid)."""

    config_class = MultiScaleVQConfig
    token_kind = "multiscale"
    has_codebook = True

    def __init__(self, cfg: MultiScaleVQConfig):
        super().__init__(cfg)
        self.quantize = MultiScaleQuantizer(cfg.codebook_size, cfg.codebook_embed_dim, cfg.scales,
                                            cfg.commit_loss_beta, cfg.phi_ratio, cfg.phi_count)
        self.add_bottleneck_convs(cfg.codebook_embed_dim, cfg.codebook_embed_dim)

    def forward(self, images):  # (B, 3, H, W) -> reconstruction, codes (B, s_1^2 + ...), loss terms
        f_hat, codes, vq_loss = self.quantize(self.quant_conv(self.encoder(images)))
        return self.decoder(self.post_quant_conv(f_hat)), torch.cat(codes, dim=1), dict(vq_loss=vq_loss)

    @torch.no_grad()
    def encode(self, images):  # (B, 3, H, W) -> codes (B, s_1^2 + ... + s_K^2), coarse to fine
        codes, _ = self.quantize.quantize(self.quant_conv(self.encoder(images)))
        return torch.cat(codes, dim=1)

    @torch.no_grad()
    def decode_f_hat(self, f_hat):  # (B, C, h, h), the sum of some scales' contributions -> images
        return self.decoder(self.post_quant_conv(f_hat)).float().clamp(-1, 1)

    @torch.no_grad()
    def decode(self, codes):  # (B, s_1^2 + ...) -> images (B, 3, H, W) in [-1, 1], float32
        return self.decode_f_hat(self.quantize.codes_to_f_hat(split_scales(codes, self.cfg.scales)))

    def token_config(self):
        return dict(token_kind=self.token_kind, vocab_size=self.cfg.codebook_size,
                    token_dim=self.cfg.codebook_embed_dim, scales=tuple(self.cfg.scales), phi_ratio=self.cfg.phi_ratio,
                    phi_count=self.cfg.phi_count)

    @classmethod
    def tokens_per_image(cls, cfg, image_size):  # every scale's codes; the last scale must be the grid
        grid = image_size // cfg.downsample_factor
        if cfg.scales[-1] != grid:
            raise ValueError(f"the last scale is {cfg.scales[-1]} x {cfg.scales[-1]} but {image_size} px images make "
                             f"a {grid} x {grid} grid: end the scales at {grid}.")
        return sum(s * s for s in cfg.scales)

    def known_tokens(self, keep):
        """Editing over scales: the grid's known cells (as every tokenizer's) at the last scale; a
        cell of a coarser scale is known when more than half of its area is (VAR's zero-shot editing
        resizes the mask to each scale and keeps what is above 0.5)."""
        cells = self.known_cells(keep)[:, None].float()                                # (B, 1, h, h)
        return torch.cat([F.interpolate(cells, size=(s, s), mode="area").flatten(1) > 0.5 for s in self.cfg.scales],
                         dim=1)                                                        # (B, s_1^2 + ... + s_K^2)

    @torch.no_grad()
    def decode_known(self, tokens, known):  # the scales decided so far summed into f_hat: sharpening by scale
        scale_known = [k.all(dim=1).float()[:, None, None, None] for k in split_scales(known, self.cfg.scales)]
        f_hat = sum(self.quantize.scale_contribution(k, codes) * scale_known[k]
                    for k, codes in enumerate(split_scales(tokens, self.cfg.scales)))
        return self.decode_f_hat(f_hat)

    def token_stats(self, codes):  # codes (N, s_1^2 + ...) -> the fraction of the codebook in use, and per scale
        shares = [c.unique().numel() / self.cfg.codebook_size for c in [codes] + split_scales(codes, self.cfg.scales)]
        return dict(zip(["usage"] + [f"{s}x{s}" for s in self.cfg.scales], shares))


TOKENIZERS["multiscale"] = MultiScaleVQModel


# VAR's tokens: codes out, but what goes in is f_hat, the sum of the earlier scales' vectors,
# area-downsampled to the next scale: a token_dim-wide vector per cell, read through a linear map
# (VAR's word_embed)
TOKEN_LAYERS["multiscale"] = (TokenProjection, CodeHead)
CFG_SCHEDULES = ("ramp", "constant")


def guidance_at_scale(k, num_scales, cfg_scale, cfg_schedule):
    """The CFG scale at scale index k (0 = the 1x1 scale) of num_scales. VAR's ramp: the guided
    logits are (1 + t) cond - t uncond, t = (cfg_scale - 1) k / (K - 1) (VAR's cfg is cfg_scale - 1):
    none at the first scale (the layout stays diverse), all at the last; "constant": cfg_scale."""
    if cfg_schedule == "constant" or num_scales == 1:
        return cfg_scale
    return 1 + (cfg_scale - 1) * k / (num_scales - 1)


class ScaleGPT(Llama):
    """Next-scale prediction on the Llama (VAR). The sequence is [condition, the inputs of scales
    2..K], and what changes from raster order is:
      input       scale k's input is f_hat after scales 1..k-1 area-downsampled to s_k x s_k, a
                  vector per cell through a linear map, plus a learned embedding of the scale
                  (VAR's lvl_embed); the last condition position predicts the 1x1 scale;
      attention   block-causal: a position sees the condition and every position of its own and
                  earlier scales, so all of scale k is predicted at once from scales < k;
      positions   as VAR: a learned vector for every cell of every scale (pos_1LC), and no RoPE;
      read out    logits over the codes at every input position: those of its own scale;
      loss        cross-entropy over all tokens of all scales, equally weighted (as VAR);
      sampler     one pass per scale through the KV cache (which holds the earlier scales); the
                  codes drawn update f_hat, which gives the next scale's input; CFG ramps up;
                  VAR's top-k and top-p by default.
    VAR conditions through AdaLN and a start token; this keeps LlamaGen's prefix condition, so that
    the rows of the comparison differ by the order and its positions. A frozen copy of the
    tokenizer's quantizer (codebook and phis) builds the inputs."""

    sampling_options = Llama.sampling_options + (
        SamplingOption("cfg_schedule", "ramp", "scales order (VAR): CFG from none at the 1x1 scale up to cfg_scale "
                       "at the last (ramp), or cfg_scale at every scale (constant)", choices=CFG_SCHEDULES),)
    token_kinds = ("multiscale",)

    @classmethod
    def sampling_defaults(cls, cfg):  # VAR's (its README): top-k 900 of its 4096 codes (that share here), top-p 0.96
        top_k = max(1, round(cfg.vocab_size * 900 / 4096))
        return {**super().sampling_defaults(cfg), "top_k": top_k, "top_p": 0.96}

    def __init__(self, cfg: GPTConfig):
        scales = tuple(cfg.scales)
        if not scales or scales[0] != 1 or sum(s * s for s in scales) != cfg.block_size:
            raise ValueError(f"scales {scales}: next-scale prediction starts at 1x1 and its block_size "
                             f"{cfg.block_size} is the codes of all scales.")
        super().__init__(cfg)
        self.quantizer = MultiScaleQuantizer(cfg.vocab_size, cfg.token_dim, scales, phi_ratio=cfg.phi_ratio,
                                             phi_count=cfg.phi_count).requires_grad_(False)
        # VAR's lvl_embed (row k is added to scale k's inputs; row 0, VAR's for its start token, stays
        # unused, as the condition has its own embedding) and pos_1LC: a learned vector per cell of
        # scales 2..K (the 1x1 scale is drawn at the condition's last position), both VAR's init
        self.scale_embedding = nn.Embedding(len(scales), cfg.dim)
        self.pos_embedding = nn.Parameter(torch.empty(cfg.block_size - 1, cfg.dim))
        for weight in (self.scale_embedding.weight, self.pos_embedding):
            nn.init.trunc_normal_(weight, std=math.sqrt(1 / cfg.dim / 3))
        sizes = torch.tensor([s * s for s in scales])
        # the scale index of every input (scales 2..K) and of every token (scales 1..K)
        self.register_buffer("input_scale", torch.arange(1, len(scales)).repeat_interleave(sizes[1:]), persistent=False)
        self.register_buffer("token_scale", torch.arange(len(scales)).repeat_interleave(sizes), persistent=False)

    def make_rope(self, cfg):
        """No rotation (angle 0) at any position: as in VAR, where a cell is comes from pos_embedding
        alone (measured in the README: with 2D RoPE at the cells' centres as well, the shapes land
        where the caption puts them far less often)."""
        return rope_table(torch.zeros(cfg.block_size - 1, cfg.dim // cfg.n_head // 2), cfg.cls_token_num)

    def attention_blocks(self, seq_len, device):  # the condition causal, then one block per scale
        cls = self.config.cls_token_num
        return torch.cat([torch.arange(cls, device=device), cls - 1 + self.input_scale.to(device)])[:seq_len]

    def bind_tokenizer(self, tokenizer):  # a frozen copy of the tokenizer's quantizer
        self.quantizer.load_state_dict(tokenizer.quantize.state_dict())

    def cast(self, device, dtype):  # the quantizer stays float32, as in the tokenizer: f_hat sums scales
        super().cast(device, dtype)
        self.quantizer.float()
        return self

    def embed_inputs(self, inputs, index):  # f_hat cells (B, n, token_dim) at input indices (n,) -> (B, n, dim)
        return self.tok_embeddings(inputs) + self.scale_embedding(self.input_scale[index]) + self.pos_embedding[index]

    def forward(self, tokens, cond, cond_mask=None):
        """Teacher forcing: the codes of every scale (B, T), coarse to fine -> logits (B, T, vocab),
        scale k's from the condition and the true codes of scales < k."""
        inputs = self.quantizer.teacher_forcing_input(split_scales(tokens, self.config.scales))  # (B, T - 1, C)
        index = torch.arange(inputs.shape[1], device=inputs.device)
        h = self.transformer(cond, self.embed_inputs(inputs, index), cond_mask)             # (B, cls + T - 1, dim)
        return self.output.readout(h[:, self.config.cls_token_num - 1:])                     # (B, T, vocab)

    @torch.no_grad()
    def generate(self, cond, cond_mask=None, generator=None, steps=None, edit=None, **options):
        """Sample the codes of every scale, coarse to fine, in one forward pass per scale -> codes
        (B, block_size) (see GPT.generate for cond, options and edit; steps receives each token's scale
        index). Pass k feeds scale k's inputs (the condition for the first) through the KV cache and
        draws all s_k^2 codes at once, each by temperature, top-k and top-p; CFG by guidance_at_scale.
        An edit's known cells take the image's own codes at every scale (VAR's zero-shot editing), so
        the running f_hat, and every later scale's input, carries the known content."""
        o = self.sampling_settings(options)
        cfg, B, guided = self.config, cond.shape[0], o.cfg_scale != 1.0
        scales, cls, device = cfg.scales, cfg.cls_token_num, cond.device
        seq_len = cls + cfg.block_size - 1  # the last scale is never fed back
        positions = torch.arange(seq_len, device=device).split([cls] + [s * s for s in scales[1:]])
        token_index = torch.arange(cfg.block_size, device=device).split([s * s for s in scales])
        f_hat = torch.zeros(B, cfg.token_dim, scales[-1], scales[-1], device=device)
        codes = []
        with self.generation(cond, cond_mask, guided, seq_len) as (cond, _, mask):
            with torch.inference_mode():
                h = self.embed_condition(cond)                                             # (B or 2B, cls, dim)
                for k, s in enumerate(scales):
                    out = self.forward_with_cache(h, positions[k], mask, outputs=s * s)    # (B or 2B, s*s, vocab)
                    scale = guidance_at_scale(k, len(scales), o.cfg_scale, o.cfg_schedule)
                    logits = guide(out, scale) if scale != 1.0 else out[:B]                # (B, s*s, vocab)
                    drawn = self.output.draw(logits.flatten(0, 1), 1.0, o, generator).view(B, s * s)
                    codes.append(keep_known(drawn, edit, token_index[k]))
                    if k + 1 < len(scales):  # the null half goes on with the same codes
                        f_hat, next_input = self.quantizer.next_input(k, f_hat, codes[-1])   # (B, C, s', s')
                        index = positions[k + 1] - cls                                       # (s'^2,)
                        h = self.embed_inputs(next_input.flatten(2).transpose(1, 2), index)  # (B, s'^2, dim)
                        h = cfg_batch(h, guided)
        if steps is not None:
            steps.append(self.token_scale.to(device).expand(B, -1))
        return torch.cat(codes, dim=1)                                                     # (B, block_size)


GENERATORS["scales"] = ScaleGPT


# -----------------------------------------------------------------------------
# 11. Early fusion: words and image codes in one vocabulary, one Llama that draws and captions
# Chameleon ("Chameleon: Mixed-Modal Early-Fusion Foundation Models", Meta 2024): caption tokens and
# image codes are ids of one vocabulary, read by one embedding table and predicted by one output
# layer, an image written <boi> codes <eoi>, the loss on every token; QK-norm and z-loss
# (GPTConfig.qk_norm, z_loss) kept its training stable. Lumina-mGPT (Liu et al. 2024,
# Alpha-VLLM/Lumina-mGPT, item_processor.py and inference_solver.py): after <boi> the grid's height
# and width as tokens, an end-of-line token after every row, and a sampler that forces those and
# draws only codes inside an image; CFG drops the caption. What it changes on the Llama: input: one
# embedding table over the joint vocabulary, no condition embedder and no T5 (the caption is tokens
# of the sequence); attention: causal; positions: 1D RoPE over the whole sequence, end-of-line marking
# the rows (or, rope_2d, a code's row and column as Qwen2-VL's M-RoPE: layout_rope); readout: logits
# over the joint vocabulary, restricted by what the sampler writes (codes in an image, words in a
# caption); loss: the next token everywhere, over sequences of both directions, caption then image
# (drawing, at every size) and image then caption (captioning, at the square).


class FusedVocabulary:
    """The one vocabulary's ids, in four blocks: the caption tokenizer's (SentencePiece as
    TextTokenizer trains it: pad 0, end of text 1, ...), four specials, a token per grid height and
    per grid width of cfg.grid_shapes, then the image codes (code c is id code_start + c)."""

    def __init__(self, cfg: GPTConfig):
        self.pad, self.eot = 0, 1                                     # TextTokenizer's pad and end of text
        self.text_size = cfg.text_vocab_size
        self.bot, self.boi, self.eoi, self.eol = range(self.text_size, self.text_size + 4)
        heights, widths = sorted({rows for rows, _ in cfg.grid_shapes}), sorted({cols for _, cols in cfg.grid_shapes})
        first = self.text_size + 4
        self.height = {rows: first + i for i, rows in enumerate(heights)}
        self.width = {cols: first + len(heights) + i for i, cols in enumerate(widths)}
        self.code_start = first + len(heights) + len(widths)
        self.size = self.code_start + cfg.vocab_size


def left_aligned(ids, mask):  # right-aligned ids (B, L) after left padding -> the same ids first, padding after
    shift = (mask == 0).sum(dim=1, keepdim=True)                                   # (B, 1) padding per row
    index = (torch.arange(ids.shape[1], device=ids.device) + shift) % ids.shape[1]  # (B, L)
    return ids.gather(1, index), mask.gather(1, index)


class FusedGPT(Llama):
    """Early fusion: one Llama over FusedVocabulary's ids. A drawing reads [bot, caption, eot, boi,
    height, width] and writes the rows of codes, each followed by eol, then eoi; a caption reads
    [boi, height, width, rows, eoi, bot] and writes words until eot. cond is a caption's ids as
    TextTokenizer makes them (B, L) with its mask (L = cls_token_num); the image tokens are codes."""

    token_kinds = ("discrete",)

    def __init__(self, cfg: GPTConfig):
        self.vocab = FusedVocabulary(cfg)
        super().__init__(cfg)

    def make_condition_embedder(self, cfg):  # none: the caption is ids of the sequence
        return None

    def make_token_layers(self, cfg):  # one embedding table and one output layer over the joint vocabulary
        joint = dataclasses.replace(cfg, vocab_size=self.vocab.size)
        return CodeEmbedding(joint), CodeHead(joint)

    def make_rope(self, cfg):  # none shared: each layout has its table (layout_rope)
        return torch.zeros(0, cfg.dim // cfg.n_head // 2, 2)

    def layout_rope(self, grid, image_first, text=None):
        """The RoPE table (S, hs/2, 2) of a whole sequence, S = text + 4 + rows (cols + 1): the
        caption (text ids, L + 1 by default) then an image of grid (rows, cols), or (image_first)
        the image then the caption.
        rope_2d False: 1D positions, the index in the sequence, as Chameleon and Lumina-mGPT, which
        leaves the model to count end-of-lines to know a code's row, and puts the code below at a
        distance that changes with the width (train.py's default). rope_2d: 2D coordinates (y, x), as
        Qwen2-VL's M-RoPE: a word or special token at index t sits at (t, t), which turns every
        channel pair by t, 1D RoPE; the code at (row r, column c) of an image whose grid starts at
        t0 at (t0 + r, t0 + c), the eol of row r at (t0 + r, t0 + cols); eoi one past the image's
        farthest coordinate, and the tokens after it go on from there. The code below is then at
        (1, 0) whatever the width, so what is learned on one size holds on the others."""
        rows, cols = grid
        text, image = text or self.config.cls_token_num + 1, 4 + rows * (cols + 1)
        head_dim, base = self.config.dim // self.config.n_head, self.config.rope_base
        if not self.config.rope_2d:
            return rope_table(rope_angles_1d(torch.arange(text + image), head_dim, base), 0).to(self.rope.device)
        start = 0 if image_first else text                  # the index of boi
        t0 = start + 3                                       # after boi, height, width
        end = t0 + max(rows, cols + 1)                       # eoi's coordinate
        head, tail = torch.arange(start, t0), torch.tensor([end])
        y = torch.cat([head, t0 + torch.arange(rows).repeat_interleave(cols + 1), tail])      # (image,)
        x = torch.cat([head, t0 + torch.arange(cols + 1).repeat(rows), tail])
        words = torch.arange(text) + (end + 1 if image_first else 0)                          # (text,)
        y, x = (torch.cat([y, words]), torch.cat([x, words])) if image_first else \
            (torch.cat([words, y]), torch.cat([words, x]))                                   # (S,)
        return rope_table(rope_angles_2d(y, x, head_dim, base), 0).to(self.rope.device)

    # The sequences: how a caption and an image are written in the one vocabulary

    def caption_tokens(self, ids, mask):
        """A caption's ids (B, L) as TextTokenizer makes them (left padding, eot last) -> as the
        sequence writes it, [pad .., bot, words .., eot] (B, L + 1), and its mask (B, L + 1) bool."""
        ids = torch.cat([ids.new_full((len(ids), 1), self.vocab.pad), ids], dim=1)
        mask = torch.cat([mask.new_zeros(len(mask), 1), mask], dim=1).bool()
        before = (mask.long().argmax(dim=1) - 1)[:, None]                          # (B, 1): just before the first word
        return ids.scatter(1, before, self.vocab.bot), mask.scatter(1, before, True)

    def null_caption(self, ids, mask):  # the caption dropped, [pad .., bot, eot], for CFG's unconditional rows
        length = ids.shape[1]
        empty = torch.tensor([self.vocab.bot, self.vocab.eot], device=ids.device)
        null_ids = torch.cat([ids.new_full((length - 2,), self.vocab.pad), empty]).expand_as(ids)
        return null_ids, (torch.arange(length, device=ids.device) >= length - 2).expand_as(mask)

    def image_tokens(self, codes, grid):
        """Codes (B, rows * cols) of a grid (rows, cols) -> [boi, height, width, row 1, eol, ..,
        row R, eol, eoi] (B, 4 + rows * (cols + 1)), as Lumina-mGPT writes an image."""
        rows, cols = grid
        v, B = self.vocab, len(codes)
        lines = torch.cat([codes.view(B, rows, cols) + v.code_start, codes.new_full((B, rows, 1), v.eol)], dim=2)
        head = codes.new_tensor([v.boi, v.height[rows], v.width[cols]]).expand(B, -1)
        return torch.cat([head, lines.flatten(1), codes.new_full((B, 1), v.eoi)], dim=1)

    @property
    def caption_grid(self):
        """The one grid captions are read at and trained on: the first of grid_shapes, the training
        images' square (sample.py --caption crops an image to it). The other sizes are only drawn:
        reading them too would spend training on what is never asked."""
        return tuple(self.config.grid_shapes[0])

    def check_grid(self, grid):  # a grid (rows, cols) the model has size tokens for
        if tuple(grid) not in map(tuple, self.config.grid_shapes):
            known = ", ".join(f"{rows} x {cols}" for rows, cols in self.config.grid_shapes)
            raise ValueError(f"a grid of {grid[0]} x {grid[1]} codes is not one this model was trained on ({known}).")
        return tuple(grid)

    def as_grid(self, codes):  # codes (B, rows, cols), or (B, T) of a square grid -> (B, rows * cols), (rows, cols)
        if codes.dim() == 3:
            return codes.flatten(1), self.check_grid(codes.shape[1:])
        side = math.isqrt(codes.shape[1])
        return codes, self.check_grid((side, side))

    # Training: both directions at once

    def forward(self, sequence, mask, rope):
        """Ids (B, S) with their mask (B, S) (padding hidden as a key) and their layout's RoPE table
        (layout_rope: (S.., hs/2, 2), or per row (B, S.., hs/2, 2), its first S used) -> logits
        (B, S, vocab) of the id after each position: causal attention."""
        S = sequence.shape[1]
        h = self.tok_dropout(self.tok_embeddings(sequence))                      # (B, S, dim)
        visible = attention_mask(self.attention_blocks(S, sequence.device), mask)  # (B, 1, S, S)
        for layer in self.layers:
            h = layer(h, rope[..., :S, :, :], visible)
        return self.output.readout(self.norm(h))

    def loss(self, codes, cond, cond_mask):
        """Chameleon's objective on captioned images, codes (B, rows, cols) (or (B, T) of a square
        grid) and their captions' ids (B, L): each example written caption then image (its caption
        dropped at class_dropout_prob while training, so that CFG works) or, at random three times
        in five at caption_grid, image then caption; the cross-entropy of every next token but
        padding (fused_loss "text": of the words only; "image": caption-then-image sequences only,
        their codes only),
        plus z_loss * log(Z)^2 (Chameleon's z-loss: it keeps the softmax's normaliser Z near 1 and
        the logits from drifting)."""
        caption, caption_mask = self.caption_tokens(cond, cond_mask)             # (B, L + 1)
        shared = int(caption_mask.any(dim=0).long().argmax())  # the padding every row has: left out
        caption, caption_mask = caption[:, shared:], caption_mask[:, shared:]   # (B, n), n <= L + 1
        flat, grid = self.as_grid(codes)
        image = self.image_tokens(flat, grid)                                   # (B, 4 + R (C + 1))
        B, device = len(codes), codes.device
        # three in five of the square's sequences are captions: captions are trained at the square
        # alone, drawings at every size, and the drawings learn from the other sizes too
        captioned = 0.6 if grid == self.caption_grid and self.config.fused_loss != "image" else 0.0
        image_first = torch.rand(B, device=device) < captioned
        if self.training and self.config.class_dropout_prob > 0:
            drop = (torch.rand(B, device=device) < self.config.class_dropout_prob) & ~image_first
            null_ids, null_mask = self.null_caption(caption, caption_mask)
            caption, caption_mask = (torch.where(drop[:, None], null, kept)
                                     for null, kept in ((null_ids, caption), (null_mask, caption_mask)))
        ones = torch.ones_like(image, dtype=torch.bool)
        after_image, after_image_mask = left_aligned(caption, caption_mask)      # [bot, words, eot, pad ..]
        sequence = torch.where(image_first[:, None], torch.cat([image, after_image], 1), torch.cat([caption, image], 1))
        mask = torch.where(image_first[:, None], torch.cat([ones, after_image_mask], 1),
                           torch.cat([caption_mask, ones], 1))                  # (B, S)
        rope = self.layout_rope(grid, False, caption.shape[1])                  # (S, hs/2, 2)
        if self.config.rope_2d and image_first.any():  # the other layout's coordinates in its rows
            rope = torch.where(image_first[:, None, None, None], self.layout_rope(grid, True, caption.shape[1]),
                               rope)                                            # (B, S, hs/2, 2)
        logits = self(sequence[:, :-1], mask[:, :-1], rope)                     # (B, S - 1, vocab)
        counted = mask[:, 1:] & mask[:, :-1]  # neither the target nor what predicts it is padding
        targets = sequence[:, 1:]
        if self.config.fused_loss == "text":  # words, bot and eot: the image only read
            counted &= (targets < self.vocab.text_size) | (targets == self.vocab.bot)
        elif self.config.fused_loss == "image":  # the codes, over the code ids' logits, as generate draws them
            counted &= targets >= self.vocab.code_start
        logits, targets = logits[counted], targets[counted]                     # (N, vocab), (N,)
        if self.config.fused_loss == "text":  # the image logits masked out: the code rows learn nothing
            logits = logits[:, :self.vocab.code_start]
        elif self.config.fused_loss == "image":
            logits, targets = logits[:, self.vocab.code_start:], targets - self.vocab.code_start
        loss = F.cross_entropy(logits, targets)
        if self.config.z_loss:
            loss = loss + self.config.z_loss * logits.logsumexp(dim=-1).pow(2).mean()
        return loss

    # Generation: a drawing or a caption, through the KV cache, the sampler writing what is forced

    def with_null_condition(self, cond, cond_mask):  # the CFG batch of a drawing's prompt: its caption dropped
        head, tail = cond[:, :-3], cond[:, -3:]                                   # the caption, then boi, height, width
        null_ids, null_mask = self.null_caption(head, cond_mask[:, :-3])
        return (torch.cat([cond, torch.cat([null_ids, tail], 1)]),
                torch.cat([cond_mask, torch.cat([null_mask, cond_mask[:, -3:]], 1)]))

    def feed(self, ids, positions, mask, rope):  # ids (B, S) at positions (S,) through the KV cache -> last logits (B, vocab)
        return self.forward_with_cache(self.tok_embeddings(ids), positions, mask, rope=rope)[:, -1]

    @torch.no_grad()
    def generate(self, cond, cond_mask=None, generator=None, steps=None, edit=None, grid=None, **options):
        """Draw an image for each caption cond (B, L) with its mask (B, L) -> codes (B, rows * cols)
        row by row, of grid (rows, cols), one of grid_shapes (None: the first, the training images'
        square), in raster order (see GPT.generate for steps and edit).
        Lumina-mGPT's sampler: only codes are drawn inside the image (the readout's draw over the
        code ids' logits alone), eol is written, not drawn, after every row; CFG's unconditional
        rows are the prompt with its caption dropped."""
        o = self.sampling_settings(options)
        rows, cols = self.check_grid(grid or self.config.grid_shapes[0])
        v, B, guided, device = self.vocab, cond.shape[0], o.cfg_scale != 1.0, cond.device
        caption, caption_mask = self.caption_tokens(cond, cond_mask)
        head = torch.tensor([v.boi, v.height[rows], v.width[cols]], device=device).expand(B, -1)
        prompt = torch.cat([caption, head], 1)                                     # (B, P)
        prompt_mask = torch.cat([caption_mask, torch.ones_like(head, dtype=torch.bool)], 1)
        P, fed = prompt.shape[1], rows * (cols + 1) - 1  # the last row's eol and eoi are never fed
        positions = torch.arange(P + fed, device=device)
        eol = torch.full((2 * B if guided else B, 1), v.eol, device=device)
        rope = self.layout_rope((rows, cols), image_first=False)
        with self.generation(prompt, prompt_mask, guided, P + fed) as (prompt, _, mask):
            codes, position = [], P
            with torch.inference_mode():
                logits = self.feed(prompt, positions[:P], mask, rope)                   # (B or 2B, vocab)
                for t in range(rows * cols):
                    code = self.output.draw(logits[:, v.code_start:], o.cfg_scale, o, generator)  # (B, 1)
                    codes.append(keep_known(code, edit, slice(t, t + 1)))
                    if t + 1 == rows * cols:
                        break
                    logits = self.feed(cfg_batch(codes[-1] + v.code_start, guided),
                                      positions[position:position + 1], mask, rope)
                    position += 1
                    if (t + 1) % cols == 0:  # a row is complete: its end-of-line is written
                        logits = self.feed(eol, positions[position:position + 1], mask, rope)
                        position += 1
        if steps is not None:
            steps.append(torch.arange(rows * cols, device=device).expand(B, -1))
        return torch.cat(codes, dim=1)                                             # (B, rows * cols)

    @torch.no_grad()
    def caption(self, codes, generator=None, temperature=0.0, top_k=0, top_p=1.0):
        """Image to text: codes (B, rows, cols) (or (B, T) of a square grid) -> caption ids (B, n),
        n at most cls_token_num, padded after eot (TextTokenizer.decode reads them). The prompt is
        the image and bot; then words only (the logits of the text ids but padding), greedy at
        temperature 0, until every row has written eot."""
        v, B, device = self.vocab, codes.shape[0], codes.device
        flat, grid = self.as_grid(codes)
        if grid != self.caption_grid:
            raise ValueError(f"this model captions images of {self.caption_grid[0]} x {self.caption_grid[1]} codes, "
                             f"the size it was trained to read, not {grid[0]} x {grid[1]}.")
        prompt = torch.cat([self.image_tokens(flat, grid), codes.new_full((B, 1), v.bot)], 1)  # (B, P)
        rope = self.layout_rope(grid, image_first=True)
        P, length = prompt.shape[1], self.config.cls_token_num
        positions = torch.arange(P + length - 1, device=device)
        words, done = [], torch.zeros(B, dtype=torch.bool, device=device)
        with self.generation(prompt, None, False, P + length - 1) as (prompt, _, mask):
            with torch.inference_mode():
                logits = self.feed(prompt, positions[:P], mask, rope)
                for i in range(length):
                    text_logits = logits[:, :v.text_size].clone()
                    text_logits[:, v.pad] = float("-inf")
                    word = sample_code(text_logits, temperature, top_k, top_p, generator)      # (B, 1)
                    word = word.masked_fill(done[:, None], v.pad)
                    words.append(word)
                    done |= word[:, 0] == v.eot
                    if bool(done.all()) or i + 1 == length:
                        break
                    logits = self.feed(word, positions[P + i:P + i + 1], mask, rope)
        return torch.cat(words, dim=1)


GENERATORS["fused"] = FusedGPT

# -----------------------------------------------------------------------------
# Appendix A. Released weights: the official LlamaGen checkpoints and Hugging Face's T5, loaded with a plain
# load_state_dict (each model's config is read off the shapes of its weights)


class UnreadableFile(ValueError):
    """A file torch.load cannot read: empty, cut short or damaged, or not a checkpoint at all."""

    def __init__(self, path, reason, advice):
        super().__init__(f"{path} is {reason}: {advice}.")
        self.path, self.reason = path, reason


def read_torch_file(path):
    """torch.load(path) of tensors and plain values only (weights_only: nothing else is unpickled),
    with one clear sentence for each way a file can be wrong."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} does not exist; check the path.")
    if os.path.isdir(path):
        raise IsADirectoryError(f"{path} is a folder; pass the checkpoint file inside it.")
    try:  # the official files carry their training script's settings as a Namespace: allow that one class
        with torch.serialization.safe_globals([Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # a damaged file can fail in torch.load in many ways
        if "Unsupported global" in str(error):
            raise ValueError(f"{path} holds Python objects besides weights, which are not loaded for safety; "
                             "save its state dict alone (torch.save(model.state_dict(), path)).") from None
        with open(path, "rb") as f:
            is_zip = f.read(4) == b"PK\x03\x04"  # torch.save writes a zip archive
        if os.path.getsize(path) == 0:
            raise UnreadableFile(path, "empty", "copy it again, or retrain it") from None
        if is_zip:
            raise UnreadableFile(path, "truncated or damaged, so it cannot be read",
                                 "copy it again, or retrain it") from None
        raise UnreadableFile(path, "not a PyTorch checkpoint (torch.save writes a zip archive; this is not one)",
                             "check the path") from None


def read_state_dict(path_or_state_dict):
    """A state dict from a checkpoint file or dict in any of the official containers."""
    checkpoint = path_or_state_dict
    if not isinstance(checkpoint, dict):
        checkpoint = read_torch_file(checkpoint)
        if not isinstance(checkpoint, dict):
            raise ValueError(f"{path_or_state_dict} holds a {type(checkpoint).__name__}, not a state dict.")
    for key in ("model", "ema", "module", "state_dict"):  # "model" first, as the official samplers
        if isinstance(checkpoint.get(key), dict):
            return checkpoint[key]
    return checkpoint


def count_prefixed(state, pattern):  # how many i make pattern.format(i) a key of state
    return next(i for i in itertools.count() if pattern.format(i) not in state)


def load_weights(model, state, source, advice="copy it again, or retrain it"):
    """model.load_state_dict(state) in eval mode, with one sentence when the weights do not fit the
    model their file describes (a damaged, cut or hand-edited file)."""
    try:
        model.load_state_dict(state)
    except (RuntimeError, TypeError, AttributeError) as error:
        first = str(error).strip().splitlines()[0].rstrip(":.")
        raise ValueError(f"{source} holds weights that do not fit the model it describes ({first}): it is damaged; "
                         f"{advice}.") from None
    return model.eval()


class NotAnOfficialCheckpoint(ValueError):
    """One of this project's own checkpoints (appendix B) where an official one was expected."""


def official_state(path_or_state_dict):
    """(the name to report, the state dict) of an official checkpoint file or dict. Our own
    checkpoints carry a "kind": said so, rather than failing on their shapes."""
    source = path_or_state_dict if isinstance(path_or_state_dict, str) else "this state dict"
    checkpoint = read_torch_file(source) if isinstance(path_or_state_dict, str) else path_or_state_dict
    if "kind" in checkpoint and "config" in checkpoint:
        raise NotAnOfficialCheckpoint(f"{source} is one of this project's checkpoints, not an official LlamaGen file")
    return source, dict(read_state_dict(checkpoint))


def load_official_vq(path_or_state_dict):
    """An official LlamaGen VQ tokenizer (vq_ds16_c2i.pt, vq_ds8_c2i.pt) -> VQModel in eval mode."""
    source, state = official_state(path_or_state_dict)
    if "encoder.conv_in.weight" not in state or "quantize.embedding.weight" not in state:
        raise ValueError(f"{source} is not a LlamaGen VQ tokenizer checkpoint (no encoder / codebook "
                         "weights); pass vq_ds16_c2i.pt or vq_ds8_c2i.pt.")
    state.pop("quantize.codebook_used", None)  # the official usage record, not needed to run
    ch = state["encoder.conv_in.weight"].shape[0]
    levels = count_prefixed(state, "encoder.conv_blocks.{}.res.0.conv1.weight")
    if "encoder.conv_out.weight" not in state or levels == 0:
        raise ValueError(f"{source} is an incomplete LlamaGen VQ tokenizer checkpoint: download it again.")
    codebook_size, codebook_embed_dim = state["quantize.embedding.weight"].shape
    ch_mult = tuple(state[f"encoder.conv_blocks.{i}.res.0.conv1.weight"].shape[0] // ch for i in range(levels))
    cfg = VQConfig(codebook_size=codebook_size, codebook_embed_dim=codebook_embed_dim, ch=ch, ch_mult=ch_mult,
                   num_res_blocks=count_prefixed(state, "encoder.conv_blocks.0.res.{}.conv1.weight"),
                   z_channels=state["encoder.conv_out.weight"].shape[0])
    return load_weights(VQModel(cfg), state, source, "download it again")


def load_official_gpt(path_or_state_dict, block_size):
    """An official LlamaGen GPT (c2i_B_256.pt ... c2i_3B_384.pt, t2i_XL_stage1_256.pt, ...) ->
    GPT in eval mode. block_size = (image_size / downsampling) ** 2, e.g. 256 for 256 px and VQ-16.
    The number of heads is not in the weights: it is the preset's of that width."""
    source, state = official_state(path_or_state_dict)
    if "tok_embeddings.weight" not in state or "layers.0.attention.wqkv.weight" not in state:
        raise ValueError(f"{source} is not a LlamaGen GPT checkpoint (no tok_embeddings.weight or first layer); "
                         "pass one of the c2i_*.pt or t2i_*.pt files.")
    vocab_size, dim = state["tok_embeddings.weight"].shape
    heads_by_dim = {p["dim"]: p["n_head"] for p in GPT_PRESETS.values()}
    if dim not in heads_by_dim or state["layers.0.attention.wqkv.weight"].shape[0] != 3 * dim:
        raise ValueError(f"{source} is a GPT of width {dim} that matches none of the LlamaGen presets "
                         f"({', '.join(GPT_PRESETS)}); pass one of the released c2i_*.pt or t2i_*.pt files.")
    cfg = dict(dim=dim, n_layer=count_prefixed(state, "layers.{}.attention_norm.weight"), n_head=heads_by_dim[dim],
               vocab_size=vocab_size, block_size=block_size, token_dropout_p=0.0, resid_dropout_p=0.0,
               ffn_dropout_p=0.0)
    if "cls_embedding.uncond_embedding" in state:  # text: the null caption's (120, caption_dim) features
        uncond = state["cls_embedding.uncond_embedding"]
        cfg.update(model_type="t2i", cls_token_num=uncond.shape[0], caption_dim=uncond.shape[1])
    elif "cls_embedding.embedding_table.weight" in state:
        cfg.update(model_type="c2i", cls_token_num=1,
                   num_classes=state["cls_embedding.embedding_table.weight"].shape[0] - 1)
    else:
        raise ValueError(f"{source} is an incomplete LlamaGen GPT checkpoint (no condition embedding): download "
                         "it again.")
    return load_weights(GPT(GPTConfig(**cfg)), state, source, "download it again")


HF_T5_NAMES = [  # Hugging Face T5 state-dict names -> ours; anything else (the decoder) is dropped
    (r"^(shared|encoder\.embed_tokens)\.", "embed_tokens."),
    (r"^encoder\.block\.0\.layer\.0\.SelfAttention\.relative_attention_bias\.", "relative_attention_bias."),
    (r"^encoder\.block\.(\d+)\.layer\.0\.SelfAttention\.", r"blocks.\1.attn."),
    (r"^encoder\.block\.(\d+)\.layer\.0\.layer_norm\.", r"blocks.\1.attn_norm."),
    (r"^encoder\.block\.(\d+)\.layer\.1\.DenseReluDense\.", r"blocks.\1.ffn."),
    (r"^encoder\.block\.(\d+)\.layer\.1\.layer_norm\.", r"blocks.\1.ffn_norm."),
    (r"^encoder\.final_layer_norm\.", "final_norm."),
]


def load_t5_encoder(hf_dir):
    """A Hugging Face T5 / flan-T5 directory -> (T5Encoder in eval mode, TextTokenizer or None).
    Reads config.json, model*.safetensors or pytorch_model*.bin (sharded or not), spiece.model."""
    config_path = os.path.join(hf_dir, "config.json")
    if not os.path.isfile(config_path):
        raise FileNotFoundError(f"{hf_dir} has no config.json: pass a Hugging Face T5 directory "
                                "(for example a download of google/flan-t5-xl).")
    with open(config_path) as f:
        hf_config = json.load(f)
    if hf_config.get("model_type") != "t5":
        raise ValueError(f"{hf_dir} holds a {hf_config.get('model_type')!r} model, not a T5 encoder.")
    # a config.json has many more keys (the decoder's, the tokenizer's): take the encoder's
    cfg = T5Config(**{f.name: hf_config[f.name] for f in dataclasses.fields(T5Config) if f.name in hf_config})
    weight_files = sorted(glob.glob(os.path.join(hf_dir, "*.safetensors")))
    if weight_files:
        from safetensors.torch import load_file
        hf_state = {k: v for path in weight_files for k, v in load_file(path).items()}
    else:
        weight_files = sorted(glob.glob(os.path.join(hf_dir, "pytorch_model*.bin")))
        if not weight_files:
            raise FileNotFoundError(f"{hf_dir} has no *.safetensors or pytorch_model*.bin weights.")
        hf_state = {k: v for path in weight_files for k, v in read_torch_file(path).items()}
    state = {}
    for name, tensor in hf_state.items():
        for pattern, replacement in HF_T5_NAMES:
            if re.match(pattern, name):
                state[re.sub(pattern, replacement, name)] = tensor.float()
                break
    encoder = load_weights(T5Encoder(cfg), state, hf_dir, "download it again")
    spiece = os.path.join(hf_dir, "spiece.model")
    text_tokenizer = None
    if os.path.isfile(spiece):
        with open(spiece, "rb") as f:
            text_tokenizer = TextTokenizer(f.read())
    return encoder, text_tokenizer


# -----------------------------------------------------------------------------
# Appendix B. Our checkpoints: plain dicts (train.py writes them, sample.py reads them), with a format version

CHECKPOINT_FORMAT = 2  # the layout of the dicts below; a file of another format is refused by name
CHECKPOINT_KINDS = {"tokenizer": "tokenizer (tokenizer.pt)", "gpt": "GPT (gpt.pt)"}
CHECKPOINT_FIELDS = {  # what loading and resuming read of each kind
    "tokenizer": ("token_kind", "config", "model", "ema", "step", "args", "image_size"),
    "gpt": ("config", "model", "tokenizer_fingerprint", "t5", "t5_config", "text_tokenizer", "class_names",
            "prompts", "cfg_scale", "step", "args"),
}


RETRAIN_GPT = "retrain the GPT on its tokenizer.pt (python train.py gpt, with the run's flags and --overwrite)"


class NotOurCheckpoint(ValueError):
    """A file that is not one of these checkpoints (an official LlamaGen file, for example)."""


def save_checkpoint(checkpoint, path):
    """Write a plain dict atomically: a temporary file, flushed to disk, then renamed over the old
    one, so an interruption at any moment leaves the old checkpoint or the new one."""
    temporary = path + ".tmp"
    with open(temporary, "wb") as f:
        torch.save({"format": CHECKPOINT_FORMAT, **checkpoint}, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(temporary, path)


def load_checkpoint(path, kind):
    """One of our checkpoints ("tokenizer" or "gpt"), checked: of this kind, in this code's format."""
    checkpoint = read_torch_file(path)
    if not isinstance(checkpoint, dict) or checkpoint.get("kind") not in CHECKPOINT_KINDS:
        raise NotOurCheckpoint(f"{path} is not one of this project's checkpoints (an official LlamaGen file?)")
    if checkpoint["kind"] != kind:
        raise ValueError(f"{path} holds the {CHECKPOINT_KINDS[checkpoint['kind']]}, not the "
                         f"{CHECKPOINT_KINDS[kind]}: were the two files swapped?")
    version = checkpoint.get("format", 0)
    if version != CHECKPOINT_FORMAT:
        newer = version > CHECKPOINT_FORMAT
        raise ValueError(f"{path} was written by {'a newer' if newer else 'an older'} version of this code (checkpoint "
                         f"format {version}, this one reads {CHECKPOINT_FORMAT}): "
                         + ("update this code." if newer else "retrain it, or use the version that wrote it."))
    missing = [field for field in CHECKPOINT_FIELDS[kind] if field not in checkpoint]
    if missing:
        raise ValueError(f"{path} has no {', '.join(missing)}: it is damaged or was edited; copy it again, or "
                         "retrain it.")
    return checkpoint


def config_from_dict(config_class, values, path):
    """A config stored in one of our checkpoints; a setting this version does not know is refused."""
    if not isinstance(values, dict):
        raise ValueError(f"{path} has no readable settings: it is damaged; copy it again, or retrain it.")
    unknown = sorted(set(values) - {f.name for f in dataclasses.fields(config_class)})
    if unknown:
        raise ValueError(f"{path} has settings this version does not know ({', '.join(unknown)}): it was "
                         "written by a newer version of this code; update it.")
    return config_class(**values)


def tokenizer_fingerprint(tokenizer):
    """A short hash of the tokenizer's weights: gpt.pt stores the one it was trained on, so that it
    is never paired with another tokenizer whose tokens mean something else."""
    digest = hashlib.sha256()
    for name, tensor in sorted(tokenizer.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def check_weights_present(model, state, path, advice="retrain it, or use the version that wrote it"):
    """A checkpoint saved before this version's model gained a weight (ScaleGPT's positions) is
    refused by the name of what it lacks rather than called damaged."""
    missing = [name for name in model.state_dict() if isinstance(state, dict) and name not in state]
    if missing:
        raise ValueError(f"{path} has no {', '.join(missing[:3])}: it was saved by an older version of this code, "
                         f"whose {type(model).__name__} had none; {advice}.")


def load_tokenizer(path):
    """Our trained tokenizer of the kind its checkpoint names, in eval mode (EMA weights if any), and the checkpoint."""
    checkpoint = load_checkpoint(path, "tokenizer")
    if checkpoint["token_kind"] not in TOKENIZERS:
        raise ValueError(f"{path} makes tokens of a kind this code does not know ({checkpoint['token_kind']!r}): "
                         "it was written by another version of this code.")
    tokenizer_class = TOKENIZERS[checkpoint["token_kind"]]
    tokenizer = tokenizer_class(config_from_dict(tokenizer_class.config_class, checkpoint["config"], path))
    check_weights_present(tokenizer, checkpoint["ema"] or checkpoint["model"], path)
    return load_weights(tokenizer, checkpoint["ema"] or checkpoint["model"], path), checkpoint


def load_gpt(path, tokenizer, tokenizer_path):
    """Our trained GPT in eval mode, its TextEncoder (None for classes; without a T5 for early
    fusion) and its checkpoint; refused when it was trained on another tokenizer."""
    checkpoint = load_checkpoint(path, "gpt")
    cfg = config_from_dict(GPTConfig, checkpoint["config"], path)
    if cfg.token_kind != tokenizer.token_kind:
        raise ValueError(f"{path} models {cfg.token_kind} tokens but {tokenizer_path} makes {tokenizer.token_kind} "
                         "ones: pair it with the tokenizer it was trained on.")
    if checkpoint["tokenizer_fingerprint"] != tokenizer_fingerprint(tokenizer):
        raise ValueError(f"{path} was trained on another tokenizer than {tokenizer_path}, so it would sample "
                         "tokens that mean something else: pair it with the tokenizer it was trained on, or "
                         "retrain the GPT on this tokenizer.")
    gpt = make_gpt(cfg)
    check_weights_present(gpt, checkpoint["model"], path, RETRAIN_GPT)
    gpt = load_weights(gpt, checkpoint["model"], path)
    text_encoder = None
    if checkpoint["text_tokenizer"] is not None:  # a T5 too, but for early fusion
        t5 = None if checkpoint["t5"] is None else \
            load_weights(T5Encoder(config_from_dict(T5Config, checkpoint["t5_config"], path)), checkpoint["t5"], path)
        text_encoder = TextEncoder(TextTokenizer(checkpoint["text_tokenizer"]), t5)
    return gpt, text_encoder, checkpoint
