"""Train LlamaGen's two stages on a small dataset: the tokenizer, then the GPT on its tokens.

    python train.py                          # the whole demo on built-in shapes: about 6 minutes on a 2-core CPU
    python train.py tokenizer --data DIR     # the tokenizer on your images
    python train.py gpt --data DIR --cond class
    python train.py --tokens continuous      # MAR: continuous tokens and a diffusion loss (llamagen.py section 8)
    python train.py --order masked           # MaskGIT: masked generation in a few passes (section 9)
    python train.py --order scales           # VAR: a multi-scale tokenizer, one pass per scale (section 10)
    python train.py --resume                 # continue an interrupted run (Ctrl-C saves one)
    torchrun --nproc_per_node=2 train.py     # data-parallel on 2 GPUs (or CPU processes)

Everything goes to --out-dir: tokenizer.pt, gpt.pt, log.txt and sample grids. The file follows the
data: a folder (or the built-in shapes) -> images -> stage 1, the tokenizer -> tokens -> stage 2,
the GPT -> samples, judged on the shapes. The models and losses are in llamagen.py.
"""
import argparse
import dataclasses
import json
import math
import os
import random
import re
import signal
import sys
import time
import warnings

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
from PIL import Image, ImageDraw
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from tqdm import tqdm

import llamagen as L
import sample as S

# -----------------------------------------------------------------------------
# Data: a folder of your images, with class subfolders and/or captions

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")


def read_metadata_captions(root):
    """{image path relative to root: caption} from root/metadata.jsonl, one {"file_name", "text"} per line."""
    path = os.path.join(root, "metadata.jsonl")
    captions = {}
    if os.path.isfile(path):
        with open(path, encoding="utf-8", errors="replace") as f:
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                    captions[os.path.normpath(record["file_name"])] = str(record["text"])
                except (json.JSONDecodeError, KeyError, TypeError):
                    raise ValueError(f"{path} line {number} is not a JSON object with \"file_name\" and "
                                     "\"text\"; fix or remove that line.") from None
    return captions


class ImageFolderDataset:
    """All images under root, read once into memory at image_size (RGB, center-cropped). Class
    labels come from subfolders (root/<class>/x.png) when every image is in one; captions from
    root/metadata.jsonl or a .txt file next to each image. Unreadable files are skipped; each kind
    of surprise gets one warning with a count."""

    def __init__(self, root, image_size):
        if not os.path.isdir(root):
            raise FileNotFoundError(f"--data {root} is not a folder; pass a folder of images.")
        paths = sorted(os.path.relpath(os.path.join(folder, name), root) for folder, _, names in os.walk(root)
                       for name in names if name.lower().endswith(IMAGE_EXTENSIONS))
        if not paths:
            raise ValueError(f"--data {root} holds no images (looked for {' '.join(IMAGE_EXTENSIONS)}).")
        metadata = read_metadata_captions(root)
        images, self.paths, self.captions = [], [], []
        unreadable, upscaled, not_utf8 = [], [], []
        for path in tqdm(paths, desc=f"reading {root}", leave=False):
            try:
                with Image.open(os.path.join(root, path)) as image:
                    image.load()
                    if min(image.size) < image_size:
                        upscaled.append(path)
                    pixels = np.asarray(S.center_crop_resize(S.to_rgb(image), image_size))
            except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
                unreadable.append(path)  # not an image, truncated, or corrupt
                continue
            images.append(torch.from_numpy(pixels.copy()).permute(2, 0, 1))  # (H, W, 3) -> (3, H, W)
            self.paths.append(path)
            caption = metadata.get(os.path.normpath(path))
            if caption is None:
                caption = self.read_txt_caption(root, path, not_utf8)
            self.captions.append(caption)
        if not images:
            raise ValueError(f"none of the {len(paths)} image files in {root} could be read.")
        missing = sorted(set(metadata) - {os.path.normpath(p) for p in paths})
        for found, what in [(unreadable, "unreadable, truncated or corrupt image files were skipped"),
                            (upscaled, f"images are smaller than {image_size} px and were upscaled (blurry)"),
                            (not_utf8, "caption files are not UTF-8 text; their odd characters were replaced"),
                            (missing, "metadata.jsonl lines name a file that is not there; they were ignored")]:
            if found:
                warnings.warn(f"{len(found)} {what}, for example {found[0]}.", stacklevel=2)
        self.images = torch.stack(images)                       # (N, 3, H, W) uint8
        folders = [path.split(os.sep)[0] if os.sep in path else None for path in self.paths]
        self.class_names = sorted(set(folders)) if all(folders) else None
        self.labels = [self.class_names.index(f) for f in folders] if self.class_names else None
        if self.class_names:
            empty = sorted(name for name in os.listdir(root) if os.path.isdir(os.path.join(root, name))
                           and name not in self.class_names)
            if empty:
                warnings.warn(f"{len(empty)} subfolders hold no readable images and are not classes: "
                              f"{', '.join(empty)}.", stacklevel=2)

    def __len__(self):
        return len(self.images)

    @staticmethod
    def read_txt_caption(root, path, not_utf8):
        txt = os.path.join(root, os.path.splitext(path)[0] + ".txt")
        if not os.path.isfile(txt):
            return None
        with open(txt, "rb") as f:
            raw = f.read()
        try:
            return raw.decode("utf-8").strip()
        except UnicodeDecodeError:
            not_utf8.append(os.path.relpath(txt, root))
            return raw.decode("utf-8", errors="replace").strip()


# -----------------------------------------------------------------------------
# The built-in shapes: one colored shape on a plain background, drawn with Pillow, and its captions
# (judge_shape, after stage 2, reads them back off generated images)

SHAPES = ("circle", "square", "triangle")
COLORS = {"red": (230, 50, 50), "green": (50, 190, 70), "blue": (60, 90, 235),
          "yellow": (240, 215, 50), "magenta": (215, 60, 215), "cyan": (50, 205, 215)}
SIZES = {"small": 0.4, "large": 0.6}  # shape width as a fraction of the image's width (its shorter side)
POSITIONS = ("center", "top", "bottom", "left", "right")
BACKGROUND = (30, 32, 40)
SHAPE_CLASSES = [f"{color} {shape}" for shape in SHAPES for color in COLORS]  # label = index

SIZE_WORDS = {"small": ("small", "little", "tiny"), "large": ("large", "big")}
POSITION_WORDS = {"center": ("in the center", "in the middle", "centered"),
                  "top": ("at the top", "near the top"), "bottom": ("at the bottom", "near the bottom"),
                  "left": ("on the left", "at the left side"), "right": ("on the right", "at the right side")}
CAPTION_TEMPLATES = ("a {size} {color} {shape} {where}", "{color} {shape}, {size}, {where}",
                     "{size} {color} {shape} {where}", "a {color} {shape} {where}, {size}")


def render_shape(shape, color, size, position, image_size, rng):
    """A uint8 (H, W, 3) image of image_size pixels (a side, or (width, height)); drawn 4x larger
    and box-filtered down for smooth edges."""
    scale = 4
    W, H = (side * scale for side in ((image_size, image_size) if isinstance(image_size, int) else image_size))
    width = SIZES[size] * min(W, H) * rng.uniform(0.9, 1.1)
    margin, half = 0.05 * min(W, H), width / 2
    cx, cy = {"center": (W / 2, H / 2), "top": (W / 2, margin + half), "bottom": (W / 2, H - margin - half),
              "left": (margin + half, H / 2), "right": (W - margin - half, H / 2)}[position]
    cx += rng.uniform(-0.03, 0.03) * W
    cy += rng.uniform(-0.03, 0.03) * H
    image = Image.new("RGB", (W, H), BACKGROUND)
    draw = ImageDraw.Draw(image)
    box = (cx - half, cy - half, cx + half, cy + half)
    if shape == "circle":
        draw.ellipse(box, fill=COLORS[color])
    elif shape == "square":
        draw.rectangle(box, fill=COLORS[color])
    else:
        draw.polygon([(cx, cy - half), (cx - half, cy + half), (cx + half, cy + half)], fill=COLORS[color])
    return np.asarray(image.resize((W // scale, H // scale), Image.BOX))


def random_caption(rng, color, shape, size, position):
    return rng.choice(CAPTION_TEMPLATES).format(size=rng.choice(SIZE_WORDS[size]), color=color, shape=shape,
                                                where=rng.choice(POSITION_WORDS[position]))


class ShapesDataset(torch.utils.data.Dataset):
    """Procedural shapes, deterministic from the seed, of image_size pixels (a side, or (width,
    height)). `holdout` names (color, shape) combinations such as "blue triangle" that never appear."""

    def __init__(self, num_images, image_size=32, seed=0, holdout=()):
        self.num_images, self.image_size, self.seed = num_images, image_size, seed
        unknown = set(holdout) - set(SHAPE_CLASSES)
        if unknown:
            raise ValueError(f"unknown --holdout {', '.join(sorted(unknown))}; choose from {', '.join(SHAPE_CLASSES)}.")
        self.holdout = set(holdout)

    def __len__(self):
        return self.num_images

    def __getitem__(self, index):
        rng = random.Random(self.seed * 1_000_003 + index)
        while True:
            shape, color = rng.choice(SHAPES), rng.choice(list(COLORS))
            if f"{color} {shape}" not in self.holdout:
                break
        size, position = rng.choice(list(SIZES)), rng.choice(POSITIONS)
        pixels = render_shape(shape, color, size, position, self.image_size, rng)
        image = torch.from_numpy(pixels.copy()).permute(2, 0, 1).float() / 127.5 - 1.0  # (3, H, W)
        return dict(image=image, label=SHAPE_CLASSES.index(f"{color} {shape}"),
                    caption=random_caption(rng, color, shape, size, position),
                    shape=shape, color=color, size=size, position=position)


def parse_holdout(text):
    return [name.strip() for name in text.split(",") if name.strip()]


def mirror_caption(text):
    """The caption of a horizontally flipped image: left and right swap."""
    return re.sub(r"\b(left|right)\b", lambda word: {"left": "right", "right": "left"}[word[0]], text)


@dataclasses.dataclass
class TrainingSet:
    images: torch.Tensor    # (N, 3, H, W) uint8
    labels: list            # class ids, or None
    captions: list          # strings (None where an image has none), or None
    class_names: list       # or None
    held_out: torch.Tensor  # (M, 3, H, W) uint8: the images the tokenizer's PSNR is measured on
    held_out_name: str      # what they are, for the log
    other_sizes: dict = dataclasses.field(default_factory=dict)  # early fusion: (width, height) -> (images, captions)


def load_data(args):
    """The training set, with the images the tokenizer is measured on: never trained on, or for
    a folder of under 20 images, some of the training images."""
    if args.data is None:
        shapes = ShapesDataset(args.num_images, args.image_size, args.seed, parse_holdout(args.holdout))
        items = [shapes[i] for i in tqdm(range(len(shapes)), desc="rendering shapes", leave=False)]
        held_out = ShapesDataset(256, args.image_size, args.seed + 1)
        other_sizes = {}
        for k, size in enumerate(args.sizes[1:]):  # early fusion's other sizes: half as many images each
            more = ShapesDataset(args.num_images // 2, size, args.seed + 100 + k, parse_holdout(args.holdout))
            more = [more[i] for i in tqdm(range(len(more)), desc=f"rendering {size[0]}x{size[1]} shapes", leave=False)]
            other_sizes[size] = (S.to_uint8(torch.stack([item["image"] for item in more])),
                                 [item["caption"] for item in more])
        return TrainingSet(S.to_uint8(torch.stack([item["image"] for item in items])),
                           [item["label"] for item in items], [item["caption"] for item in items], SHAPE_CLASSES,
                           S.to_uint8(torch.stack([held_out[i]["image"] for i in range(len(held_out))])), "held-out",
                           other_sizes)
    folder = ImageFolderDataset(args.data, args.image_size)
    order = torch.randperm(len(folder), generator=torch.Generator().manual_seed(args.seed))
    n_held_out = min(256, len(folder) // 20)  # 5% (at most 256) never trained on, for the PSNR
    train, held_out = order[n_held_out:].tolist(), order[:n_held_out]
    images = folder.images[train]
    return TrainingSet(images, [folder.labels[i] for i in train] if folder.labels else None,
                       [folder.captions[i] for i in train], folder.class_names,
                       folder.images[held_out] if n_held_out else images[:256],
                       "held-out" if n_held_out else "training (under 20 images: none held out)")


def to_float(images):  # uint8 -> (N, 3, H, W) float in [-1, 1]
    return images.float() / 127.5 - 1.0


# -----------------------------------------------------------------------------
# Training machinery: device and processes, batches, learning rate, checkpoints, Ctrl-C


class Run:
    """Where this process trains: device, rank among the data-parallel processes (torchrun sets
    WORLD_SIZE, RANK, LOCAL_RANK), the output folder and its log."""

    def __init__(self, args):
        self.world, self.rank = int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("RANK", 0))
        self.device = S.pick_device(args.device)
        if self.world > 1:
            if self.device.type == "cuda":
                self.device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
                torch.cuda.set_device(self.device)
            dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo")
        self.is_main = self.rank == 0
        self.out_dir = args.out_dir
        self.save_every = args.save_every

    def log(self, line):
        if self.is_main:
            tqdm.write(line)
            with open(os.path.join(self.out_dir, "log.txt"), "a") as f:
                f.write(line + "\n")

    def autocast(self):  # bf16 on CUDA, plain fp32 elsewhere
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.device.type == "cuda")

    def data_parallel(self, model):  # the module the training step calls; the plain one is saved
        if self.world == 1:
            return model
        device_ids = [self.device] if self.device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(model, device_ids=device_ids)

    def average_gradients(self, module):  # for a module trained outside DistributedDataParallel
        if self.world > 1:
            for p in module.parameters():
                if p.grad is not None:
                    dist.all_reduce(p.grad)
                    p.grad /= self.world

    def any_process(self, flag):  # True if it is True in any process (so that all stop together)
        if self.world == 1:
            return flag
        flag = torch.tensor(float(flag), device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def progress(self, steps, start, desc):
        return tqdm(range(start, steps), initial=start, total=steps, desc=desc, disable=not self.is_main,
                    dynamic_ncols=True, mininterval=2.0)

    def close(self):
        if self.world > 1 and dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()


class Stopped(Exception):
    """Training stopped early (Ctrl-C, or a loss that is not a number): the message says why and
    what was kept; main() prints it and exits."""

    def __init__(self, message, exit_code):
        super().__init__(message)
        self.exit_code = exit_code


class StopOnCtrlC:
    """Ctrl-C asks the training loop to finish its step, save a checkpoint and stop, so that what
    is saved is a whole step; a second Ctrl-C stops at once."""

    def __enter__(self):
        self.requested = False
        self.previous = signal.signal(signal.SIGINT, self.request)
        return self

    def request(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        tqdm.write("Ctrl-C: saving a checkpoint after this step (press it again to stop at once, unsaved)")

    def __exit__(self, *exc):
        signal.signal(signal.SIGINT, self.previous)


def stop_if_not_finite(run, loss, step, path):
    """Called before the update: a loss that is not a number stops training before it reaches the
    weights, and the last checkpoint is kept."""
    if run.any_process(not math.isfinite(loss)):
        raise Stopped(f"the loss became {loss} at step {step}, so training stopped; {path} keeps the last "
                      "checkpoint. Lower the learning rate and resume with --resume, or start over.", 1)


def end_of_step(run, stop, done, total, save, path):
    """After a training step: a checkpoint every save_every steps, or now if Ctrl-C asked for one."""
    if run.is_main and done % run.save_every == 0 and done < total:
        save(done)
    if run.any_process(stop.requested):
        if run.is_main:
            save(done)
        raise Stopped(f"stopped at step {done} of {total} and saved {path}; continue with the same "
                      "command and --resume.", 130)


def batch_indices(num_examples, batch_size, seed, step, run, flip):
    """This process's examples for one step and whether to flip each: a function of (seed, step)
    alone, so a resumed run draws the same batches as an uninterrupted one."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + step)
    indices = torch.randint(num_examples, (batch_size,), generator=generator)
    flips = (torch.rand(batch_size, generator=generator) < 0.5) & flip
    share = slice(run.rank * batch_size // run.world, (run.rank + 1) * batch_size // run.world)
    return indices[share], flips[share]


def pick_group(sizes, seed, step):
    """Which group of examples (one per image size) a step trains on, in proportion to their sizes:
    a function of (seed, step) alone, as batch_indices."""
    if len(sizes) == 1:
        return 0
    generator = torch.Generator().manual_seed(seed * 1_000_003 + step + 500_009)
    return torch.multinomial(torch.tensor(sizes, dtype=torch.float), 1, generator=generator).item()


def learning_rate(step, total_steps, peak, warmup):
    """Linear warmup, then cosine decay to a tenth of the peak."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total_steps - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress)))


def rng_state(device):
    """The random state of this process. Every process starts from the same seed and draws the same
    numbers, so the main process's state is every process's."""
    return dict(torch=torch.get_rng_state(), cuda=torch.cuda.get_rng_state(device) if device.type == "cuda" else None)


def set_rng_state(state, device):
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)


def save_grid(images, path, columns):
    S.grid_image(images, columns).save(path)


# -----------------------------------------------------------------------------
# Stage 1: images -> the tokenizer (a VQ for codes, MAR's KL autoencoder for continuous tokens)


QUANTIZER_OPTIONS = ("codebook_size", "codebook_embed_dim", "codebook_l2_norm", "commit_loss_beta",
                     "entropy_loss_ratio")
# --tokens, the kind of token, chosen here once: its tokenizer's presets and own options, and the
# defaults that differ by kind. The VQ's entropy loss is 0.1 rather than the official 0: on the
# simple shapes most codes die without it. A continuous GPT step also trains the diffusion head on
# 4 noisings of every token and takes about twice as long: 600 steps give it the training time of
# the discrete demo's 1400. A multi-scale GPT step reads 130 tokens per image rather than 64 and takes
# twice as long, but VAR needs the discrete demo's 1400 steps all the same: at 700 its layouts are
# still wrong a quarter of the time.
# Early fusion on the shapes trains half of its steps on the other sizes and writes three in five
# of the square's sequences image then caption: 2,100 steps rather than the discrete demo's 1,400.
FUSED_GPT_STEPS = 2100
TOKEN_KINDS = {
    "discrete": dict(presets=L.VQ_PRESETS, options=QUANTIZER_OPTIONS,
                     defaults=dict(tokenizer_preset="VQ-mini", gpt_steps=1400, entropy_loss_ratio=0.1, order="raster")),
    "continuous": dict(presets=L.KL_PRESETS, options=("kl_weight",),
                       defaults=dict(tokenizer_preset="KL-mini", gpt_steps=600, order="raster")),
    "multiscale": dict(presets=L.MULTISCALE_PRESETS,
                       options=("codebook_size", "codebook_embed_dim", "commit_loss_beta", "scales", "phi_ratio"),
                       defaults=dict(tokenizer_preset="MSVQ-mini", gpt_steps=1400, order="scales")),
}


def image_sizes(text):  # --sizes 32x32,48x32,32x48 -> [(width, height), ...]
    return [S.width_by_height(size) for size in text.split(",")]


def scale_sizes(text):  # --scales 1,2,3,4,6,8
    try:
        sizes = tuple(int(size) for size in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of sizes, such as 1,2,3,4,6,8") \
            from None
    if sizes[0] != 1 or any(later <= earlier for earlier, later in zip(sizes, sizes[1:])):
        raise argparse.ArgumentTypeError(f"{text}: the scales start at 1 and grow, such as 1,2,3,4,6,8")
    return sizes


def tokenizer_config(args):
    """The --tokens kind's tokenizer: its preset with the options the command line gives."""
    kind = TOKEN_KINDS[args.tokens]
    options = {name: getattr(args, name) for name in kind["options"] if getattr(args, name) is not None}
    return L.TOKENIZERS[args.tokens].config_class(**{**kind["presets"][args.tokenizer_preset], **options})


def load_perceptual_loss(weight):
    """LPIPS for the perceptual term (None with weight 0). Without its VGG16 weights (offline),
    one warning, and the tokenizer trains without it."""
    if weight == 0:
        return None
    try:
        return L.load_lpips()
    except OSError as error:
        warnings.warn(f"LPIPS perceptual loss is off: {error} and run again, or pass --perceptual-weight 0 to "
                      "train without it.", stacklevel=2)
        return None


def codebook_stats(stats, separator):
    """A tokenizer's token_stats for a log line: "<separator>usage 95%", and VAR's usage per scale
    after it in brackets."""
    if not stats:
        return ""
    (name, value), *per_scale = stats.items()
    scales = ", ".join(f"{scale} {share:.0%}" for scale, share in per_scale)
    return f"{separator}{name} {value:.0%}" + (f" ({scales})" if scales else "")


@torch.no_grad()
def evaluate_tokenizer(tokenizer, images, device, batch_size=64):
    """PSNR (dB) of the reconstructions as 8-bit images, and the tokenizer's token_stats."""
    psnrs, tokens = [], []
    with L.evaluating(tokenizer):
        for start in range(0, len(images), batch_size):
            originals = images[start:start + batch_size]
            encoded = tokenizer.encode(to_float(originals).to(device))
            recon = S.to_uint8(tokenizer.decode(encoded).cpu())
            mse = (recon.float() - originals.float()).pow(2).flatten(1).mean(1).clamp(min=1e-10)
            psnrs.append(10 * torch.log10(255.0 ** 2 / mse))
            if tokenizer.has_codebook:
                tokens.append(encoded.cpu())
    return torch.cat(psnrs).mean().item(), tokenizer.token_stats(torch.cat(tokens)) if tokens else {}


def train_tokenizer(args, run, data, checkpoint=None):
    path = os.path.join(args.out_dir, "tokenizer.pt")
    tokenizer_class = L.TOKENIZERS[args.tokens]
    cfg = L.config_from_dict(tokenizer_class.config_class, checkpoint["config"], path) if checkpoint \
        else tokenizer_config(args)
    torch.manual_seed(args.seed)
    tokenizer = tokenizer_class(cfg).to(run.device)
    criterion = L.VQLoss(load_perceptual_loss(args.perceptual_weight), args.perceptual_weight, args.disc_start,
                         args.disc_weight, args.adaptive_disc_weight).to(run.device)
    optimizer = torch.optim.Adam(tokenizer.parameters(), lr=args.tokenizer_lr, betas=(0.9, 0.95))
    disc_optimizer = torch.optim.Adam(criterion.discriminator.parameters(), lr=args.tokenizer_lr, betas=(0.9, 0.95))
    ema = AveragedModel(tokenizer, multi_avg_fn=get_ema_multi_avg_fn(args.ema)) if args.ema else None
    start = 0
    if checkpoint:
        tokenizer.load_state_dict(checkpoint["model"])
        criterion.discriminator.load_state_dict(checkpoint["discriminator"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        disc_optimizer.load_state_dict(checkpoint["disc_optimizer"])
        if ema and checkpoint["ema"]:
            ema.module.load_state_dict(checkpoint["ema"])
            ema.n_averaged.fill_(checkpoint["step"])
        start = checkpoint["step"]
        set_rng_state(checkpoint["rng"], run.device)
        run.log(f"resuming the tokenizer from {path} at step {start}")

    def save(step, metrics=None):
        L.save_checkpoint(dict(kind="tokenizer", token_kind=tokenizer.token_kind, config=dataclasses.asdict(cfg),
                               model=tokenizer.state_dict(), ema=ema.module.state_dict() if ema else None,
                               discriminator=criterion.discriminator.state_dict(), optimizer=optimizer.state_dict(),
                               disc_optimizer=disc_optimizer.state_dict(), step=step, rng=rng_state(run.device),
                               image_size=args.image_size, args=vars(args), metrics=metrics), path)

    model = run.data_parallel(tokenizer)
    # The square images only, whatever --sizes says: the tokenizer is convolutional, and what it
    # learns of 4-pixel cells holds at any size, while the larger images would cost time
    shown = to_float(data.held_out[:32]).to(run.device)  # the same images in every reconstruction grid
    timer, seen, recent_tokens = time.time(), 0, []
    bar = run.progress(args.tokenizer_steps, start, "tokenizer")
    with StopOnCtrlC() as stop:
        for step in bar:
            lr = learning_rate(step, args.tokenizer_steps, args.tokenizer_lr, args.warmup)
            for group in optimizer.param_groups + disc_optimizer.param_groups:
                group["lr"] = lr
            indices, flips = batch_indices(len(data.images), args.tokenizer_batch_size, args.seed, step, run, args.flip)
            images = to_float(data.images[indices]).to(run.device)
            images = torch.where(flips[:, None, None, None].to(run.device), images.flip(-1), images)
            with run.autocast():
                recon, tokens, tokenizer_losses = model(images)
                loss, logs = criterion.generator_loss(images, recon, tokenizer_losses, step,
                                                      tokenizer.decoder.conv_out.weight)
            done = step + 1
            stop_if_not_finite(run, loss.item(), done, path)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(tokenizer.parameters(), args.grad_clip)
            optimizer.step()
            with run.autocast():
                disc_loss = criterion.discriminator_loss(images, recon, step)
            if disc_loss is not None:  # the discriminator's own step, on detached images
                disc_optimizer.zero_grad(set_to_none=True)
                disc_loss.backward()
                run.average_gradients(criterion.discriminator)
                disc_optimizer.step()
                logs["disc_loss"] = disc_loss
            if ema:
                ema.update_parameters(tokenizer)
            seen += len(images) * run.world
            if tokenizer.has_codebook:  # the codes used since the last log line
                recent_tokens.append(tokens.detach())
            if done % args.log_every == 0 or done == args.tokenizer_steps:
                stats = tokenizer.token_stats(torch.cat(recent_tokens)) if recent_tokens else {}
                recent_tokens = []
                terms = " | ".join(f"{name.removesuffix('_loss')} {value.item():.4f}" for name, value in logs.items())
                run.log(f"tokenizer step {done}/{args.tokenizer_steps} | loss {loss.item():.4f} | {terms}"
                        f"{codebook_stats(stats, ' | ')} | lr {lr:.1e} | {seen / (time.time() - timer):.0f} img/s")
                bar.set_postfix_str(f"rec {logs['rec_loss'].item():.4f}{codebook_stats(stats, ', codebook ')}")
            if run.is_main and (done % args.sample_every == 0 or done == args.tokenizer_steps):
                shown_model = (ema.module if ema else tokenizer).eval()  # the weights that will be saved
                recon = shown_model.decode(shown_model.encode(shown))
                tokenizer.train()
                rows = [torch.cat([shown[i:i + 8], recon[i:i + 8]]) for i in range(0, len(shown), 8)]
                save_grid(torch.cat(rows), os.path.join(args.out_dir, f"tokenizer_step{done:06d}.png"), columns=8)
            end_of_step(run, stop, done, args.tokenizer_steps, save, path)
    final = (ema.module if ema else tokenizer).eval()
    batches = (to_float(data.images[i:i + 256]).to(run.device) for i in range(0, len(data.images), 256))
    for name, value in final.calibrate(batches).items():
        run.log(f"{name}: {value:.4f}")
    psnr, stats = evaluate_tokenizer(final, data.held_out, run.device)
    run.log(f"tokenizer on {len(data.held_out)} {data.held_out_name} images: PSNR {psnr:.2f} dB"
            f"{codebook_stats(stats, ', codebook ')}")
    if run.is_main:
        save(max(start, args.tokenizer_steps), dict(psnr=psnr, **stats))
    return final, criterion


# -----------------------------------------------------------------------------
# Stage 2: tokens -> the GPT, and samples from it


class Conditioned(nn.Module):
    """The GPT behind its text encoder, returning the training loss, so that one optimizer (and one
    data-parallel wrapper) trains both when the encoder is learned jointly. A pretrained encoder
    stays frozen."""

    def __init__(self, gpt, t5=None, train_t5=False):
        super().__init__()
        self.gpt, self.t5, self.train_t5 = gpt, t5, train_t5
        if t5 is not None and not train_t5:
            t5.requires_grad_(False)

    def forward(self, tokens, cond, cond_mask=None):  # cond: class ids, or text ids with their mask
        if self.t5 is not None:
            cond = self.t5(cond, cond_mask)
        return self.gpt.loss(tokens, cond, cond_mask)

    def train(self, mode=True):
        super().train(mode)
        if self.t5 is not None and not self.train_t5:
            self.t5.eval()
        return self


def build_text_encoder(args, captions, checkpoint):
    """(L.TextEncoder, whether its T5 trains), or (None, False) for classes: from the checkpoint being
    resumed; from a pretrained Hugging Face directory (frozen); or a SentencePiece model trained on
    the captions and a small T5 trained from scratch together with the GPT. Early fusion (--cond
    vocab): the SentencePiece model alone, whose ids the GPT reads."""
    if args.cond == "class":
        return None, False
    if args.cond == "vocab":  # early fusion: the caption's own ids go into the sequence, no T5
        text_tokenizer = L.TextTokenizer(checkpoint["text_tokenizer"]) if checkpoint \
            else L.TextTokenizer.train(captions, args.text_vocab)
        return L.TextEncoder(text_tokenizer, None), False
    if checkpoint:
        t5 = L.T5Encoder(L.config_from_dict(L.T5Config, checkpoint["t5_config"], "gpt.pt"))
        t5.load_state_dict(checkpoint["t5"])
        return L.TextEncoder(L.TextTokenizer(checkpoint["text_tokenizer"]), t5), checkpoint["train_t5"]
    if args.t5:
        t5, text_tokenizer = L.load_t5_encoder(args.t5)
        return L.TextEncoder(text_tokenizer, t5), False
    text_tokenizer = L.TextTokenizer.train(captions, args.text_vocab)
    t5 = L.T5Encoder(L.T5Config(**L.T5_PRESETS["T5-mini"], vocab_size=text_tokenizer.vocab_size))
    return L.TextEncoder(text_tokenizer, t5), True


@dataclasses.dataclass
class TokenizedSet:
    """What the GPT trains on, computed once: with --flip, example originals + i is example i
    mirrored, its caption mirrored too, so that the training loop has one path."""
    posteriors: torch.Tensor  # what each example's tokens are drawn from (ImageTokenizer.encode_posterior)
    cond: torch.Tensor        # class ids (N,), or caption ids (N, L) for the T5 that trains with the GPT
    cond_mask: torch.Tensor   # the captions' padding masks (N, L), or None for classes
    originals: int            # examples before the mirrored ones
    grid: tuple               # (rows, columns) of each image's tokens (VAR: of its last scale)


@torch.no_grad()
def encode_posteriors(tokenizer, images, device, batch_size=256):  # uint8 images -> encode_posterior of each
    return torch.cat([tokenizer.encode_posterior(to_float(images[start:start + batch_size]).to(device)).cpu()
                      for start in tqdm(range(0, len(images), batch_size), desc="encoding images", leave=False)])


def tokenize_training_set(args, data, tokenizer, text_encoder, device):
    """Every training image (with a caption, for text) through the tokenizer, with its condition: a
    TokenizedSet per image size (one, but for early fusion's non-square shapes)."""
    groups = [(data.images, data.captions, data.labels)] + [(images, captions, None)
                                                           for images, captions in data.other_sizes.values()]
    return [tokenize_images(args, *group, tokenizer, text_encoder, device) for group in groups]


def tokenize_images(args, images, captions, labels, tokenizer, text_encoder, device):
    keep = [i for i, caption in enumerate(captions) if caption] if text_encoder is not None \
        else list(range(len(images)))
    images = images[keep]
    posteriors = [encode_posteriors(tokenizer, images, device)]
    if text_encoder is not None:
        captions = [captions[i] for i in keep]
        encoded = [text_encoder.text_tokenizer(captions, args.text_length)]   # (ids, mask)
        if args.flip:  # a mirrored image goes with its mirrored caption
            encoded.append(text_encoder.text_tokenizer([mirror_caption(c) for c in captions], args.text_length))
        cond, cond_mask = torch.cat([ids for ids, _ in encoded]), torch.cat([mask for _, mask in encoded])
    else:
        labels = torch.tensor([labels[i] for i in keep])
        cond, cond_mask = torch.cat([labels, labels]) if args.flip else labels, None
    if args.flip:
        posteriors.append(encode_posteriors(tokenizer, images.flip(-1), device))
    f = tokenizer.cfg.downsample_factor
    grid = (images.shape[2] // f, images.shape[3] // f)
    return TokenizedSet(torch.cat(posteriors), cond, cond_mask, len(images), grid)


def gpt_config(args, tokenizer, text_encoder, num_classes):
    """The preset's size, for the tokenizer's tokens and the condition (early fusion: one vocabulary
    of the caption tokenizer's ids and the codes, for the grids the images of --sizes make)."""
    t5 = text_encoder is not None and text_encoder.t5 is not None
    f = tokenizer.cfg.downsample_factor
    fused = dict(text_vocab_size=text_encoder.text_tokenizer.vocab_size,
                 grid_shapes=tuple((height // f, width // f) for width, height in args.sizes),
                 qk_norm=args.qk_norm, z_loss=args.z_loss, fused_loss=args.fused_loss) if args.cond == "vocab" else {}
    return L.GPTConfig(**L.GPT_PRESETS[args.gpt_preset], **tokenizer.token_config(), **fused,
                       block_size=tokenizer.tokens_per_image(tokenizer.cfg, args.image_size),
                       model_type={"text": "t2i", "class": "c2i", "vocab": "vocab"}[args.cond], num_classes=num_classes,
                       caption_dim=text_encoder.t5.config.d_model if t5 else 0,
                       cls_token_num=args.text_length if text_encoder else 1, class_dropout_prob=args.class_dropout,
                       token_dropout_p=args.dropout, resid_dropout_p=args.dropout, ffn_dropout_p=args.dropout,
                       rope_2d=args.rope == "2d", order=args.order, diffusion_width=args.diffusion_width,
                       diffusion_depth=args.diffusion_depth, diffusion_repeats=args.diffusion_repeats)


@torch.no_grad()
def generate_images(gpt, tokenizer, text_encoder, conditions, args, seed, device, generate=None, edit=None, grid=None):
    """Sample and decode one image per condition (class id or prompt): (B, 3, H, W) in [-1, 1], with
    `generate` (a sampler of sample.py's pick_sampler, kept over batches) or the one args ask for;
    edit: (tokens, known) of one image per condition, kept where known; grid: early fusion's
    (rows, cols) of codes to draw (None: the square of the training images)."""
    cond, cond_mask = S.condition_tensors(gpt, text_encoder, conditions, device)
    generator = torch.Generator(device).manual_seed(seed)
    options = S.sampling_options(args, gpt.config)
    generate = generate or S.pick_sampler(gpt, args, [])
    tokens = generate(cond, cond_mask, generator=generator, edit=edit, **options, **({"grid": grid} if grid else {}))
    gpt.free_caches()  # give the KV cache's memory back to training
    return tokenizer.decode(tokens if grid is None else tokens.view(len(tokens), *grid))


def demo_conditions(data, args):
    """What the sample grids show, one row each: every shape class at four sizes and positions,
    every class of a folder (up to 16), or the first 8 captions of a folder."""
    if args.cond == "class":
        return [label for label in range(min(16, len(data.class_names))) for _ in range(4)]
    if args.data is None:
        layouts = [("large", "in the center"), ("small", "at the top"), ("small", "on the left"),
                   ("large", "at the bottom")]
        return [f"a {size} {name} {where}" for name in SHAPE_CLASSES for size, where in layouts]
    captions = list(dict.fromkeys(c for c in data.captions if c))[:8]
    return [caption for caption in captions for _ in range(4)]


def train_gpt(args, run, data, tokenizer, checkpoint=None):
    """Stage 2: set up (the text encoder, the tokenized training set, the GPT, its optimizer, a
    checkpoint to resume), the training loop, then the final samples and evaluation."""
    path = os.path.join(args.out_dir, "gpt.pt")
    torch.manual_seed(args.seed)
    source = None if checkpoint or not args.anole else L.load_checkpoint(os.path.join(args.anole, "gpt.pt"), "gpt")
    text_encoder, train_t5 = build_text_encoder(args, [c for c in data.captions or [] if c], checkpoint or source)
    examples = tokenize_training_set(args, data, tokenizer, text_encoder, run.device)
    if checkpoint:
        cfg = L.config_from_dict(L.GPTConfig, checkpoint["config"], path)
    elif source:  # ANOLE: the model it starts from, now trained on drawing alone
        cfg = dataclasses.replace(L.config_from_dict(L.GPTConfig, source["config"], args.anole), fused_loss="image")
    else:
        cfg = gpt_config(args, tokenizer, text_encoder, len(data.class_names or []))
    gpt = L.make_gpt(cfg)
    gpt.bind_tokenizer(tokenizer)
    if source:
        gpt.load_state_dict(source["model"])
    if args.anole:
        trained = train_image_rows_only(gpt, reset=source is not None)
        run.log(f"ANOLE: only the output layer's rows of the {cfg.vocab_size} image codes train, from zero, {trained:,} "
                f"of {sum(p.numel() for p in gpt.parameters()):,} parameters; everything else stays as in {args.anole}")
    S.sampling_options(args, cfg)  # checked before training
    model = Conditioned(gpt, text_encoder.t5 if text_encoder else None, train_t5).to(run.device)
    params = [p for p in model.parameters() if p.requires_grad]
    # ANOLE: no weight decay, which would shrink the frozen rows of the output layer too
    optimizer = torch.optim.AdamW([  # weight decay on matrices and embeddings only
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": 0.0 if args.anole else args.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}], lr=args.gpt_lr, betas=(0.9, 0.95))
    fingerprint = L.tokenizer_fingerprint(tokenizer)
    start = 0
    if checkpoint:
        if checkpoint["tokenizer_fingerprint"] != fingerprint:
            raise ValueError(f"{path} was trained on another tokenizer than the one in {args.out_dir}: start "
                             "the GPT anew with --overwrite.")
        L.check_weights_present(gpt, checkpoint["model"], path, L.RETRAIN_GPT)
        gpt.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        start = checkpoint["step"]
        set_rng_state(checkpoint["rng"], run.device)
        run.log(f"resuming the GPT from {path} at step {start}")
    conditions = demo_conditions(data, args)

    def save(step, metrics=None):
        text, t5 = text_encoder is not None, text_encoder is not None and text_encoder.t5 is not None
        L.save_checkpoint(dict(kind="gpt", config=dataclasses.asdict(cfg), model=gpt.state_dict(),
                               optimizer=optimizer.state_dict(), step=step, rng=rng_state(run.device),
                               class_names=data.class_names, tokenizer_fingerprint=fingerprint,
                               prompts=conditions[::4] if text else None,  # one per grid row
                               image_size=args.image_size, cfg_scale=args.cfg_scale,
                               text_tokenizer=text_encoder.text_tokenizer.model_bytes if text else None,
                               t5_config=dataclasses.asdict(text_encoder.t5.config) if t5 else None,
                               t5=text_encoder.t5.state_dict() if t5 else None, train_t5=train_t5,
                               args=vars(args), metrics=metrics), path)

    gpt_training_loop(args, run, model, optimizer, examples, tokenizer, text_encoder, conditions, start, save, path)
    return finish_gpt(args, run, gpt, tokenizer, text_encoder, conditions, save, start)


def train_image_rows_only(gpt, reset=False):
    """ANOLE (GAIR-NLP/anole, train_image_head.py): of a fused model, only the output layer's rows of
    the image codes train; every other parameter is frozen, and the gradient of the other rows of
    that layer is zeroed. reset: those rows start from zero (uniform codes), as in a model whose
    drawing was withheld, as Chameleon's release. -> how many values train."""
    gpt.requires_grad_(False)
    weight = gpt.output.weight                                                # (vocab, dim)
    weight.requires_grad_(True)
    rows = (torch.arange(weight.shape[0]) >= gpt.vocab.code_start).to(weight.dtype)[:, None]  # (vocab, 1)
    if reset:
        with torch.no_grad():
            weight[gpt.vocab.code_start:] = 0
    weight.register_hook(lambda grad: grad * rows.to(grad.device))
    return int(rows.sum()) * weight.shape[1]


def gpt_training_loop(args, run, model, optimizer, examples, tokenizer, text_encoder, conditions, start, save, path):
    gpt = model.gpt
    # --compile compiles this stage only: the tokenizer's adaptive GAN weight differentiates its
    # graph twice per step, which compiled backward passes refuse
    wrapped = run.data_parallel(model)
    if args.compile:
        wrapped = torch.compile(wrapped)
    params = [p for p in model.parameters() if p.requires_grad]
    timer, seen = time.time(), 0
    bar = run.progress(args.gpt_steps, start, "gpt")
    with StopOnCtrlC() as stop:
        for step in bar:
            lr = learning_rate(step, args.gpt_steps, args.gpt_lr, args.warmup)
            for group in optimizer.param_groups:
                group["lr"] = lr
            group = examples[pick_group([group.originals for group in examples], args.seed, step)]
            indices, flips = batch_indices(group.originals, args.gpt_batch_size, args.seed, step, run, args.flip)
            rows = indices + flips.long() * group.originals             # a flip picks the mirrored example
            tokens = tokenizer.draw_from_posterior(group.posteriors[rows]).to(run.device)
            seen += tokens.shape[0] * tokens.shape[1] * run.world
            if args.cond == "vocab":  # early fusion reads the grid's shape off the codes
                tokens = tokens.view(len(tokens), *group.grid)
            cond = group.cond[rows].to(run.device)
            cond_mask = None if group.cond_mask is None else group.cond_mask[rows].to(run.device)
            with run.autocast():
                loss = wrapped(tokens, cond, cond_mask)
            done = step + 1
            stop_if_not_finite(run, loss.item(), done, path)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(params, args.grad_clip)
            optimizer.step()
            if done % args.log_every == 0 or done == args.gpt_steps:
                run.log(f"gpt step {done}/{args.gpt_steps} | loss {loss.item():.4f} | lr {lr:.1e} | "
                        f"{seen / (time.time() - timer):.0f} tokens/s")
                bar.set_postfix_str(f"loss {loss.item():.4f}")
            if run.is_main and done % args.sample_every == 0:
                images = generate_images(gpt, tokenizer, text_encoder, conditions, args, args.seed, run.device)
                save_grid(images, os.path.join(args.out_dir, f"gpt_step{done:06d}.png"), columns=4)
            end_of_step(run, stop, done, args.gpt_steps, save, path)


def finish_gpt(args, run, gpt, tokenizer, text_encoder, conditions, save, start):
    """The final sample grid, timed; for the shapes, the judged evaluation; the last checkpoint."""
    gpt.eval()
    if run.is_main:
        timer = time.time()
        images = generate_images(gpt, tokenizer, text_encoder, conditions, args, args.seed, run.device)
        run.log(f"sampled {len(images)} images in {time.time() - timer:.1f} s "
                f"({(time.time() - timer) / len(images) * 1000:.0f} ms per image, batch {len(images)})")
        save_grid(images, os.path.join(args.out_dir, "samples.png"), columns=4)
        metrics = None
        if args.data is None and args.eval_per_class > 0:
            metrics = evaluate_shapes(gpt, tokenizer, text_encoder, args, run.device, args.eval_per_class)
            report_shapes(metrics, run, args.cfg_scale)
            for size in args.sizes[1:]:  # early fusion's other sizes
                metrics[f"{size[0]}x{size[1]}"] = evaluate_shapes(gpt, tokenizer, text_encoder, args, run.device,
                                                                  args.eval_per_class, size=size)
                report_shapes(metrics[f"{size[0]}x{size[1]}"], run, args.cfg_scale, size)
            if hasattr(gpt, "caption"):
                metrics["captions"] = evaluate_captions(gpt, tokenizer, text_encoder, args, run.device,
                                                        args.eval_per_class)
                report_captions(metrics["captions"], run)
        save(max(start, args.gpt_steps), metrics)
    return gpt


# -----------------------------------------------------------------------------
# Samples of the shapes, judged: the fixed-rule judge reads what a generated image shows


def judge_shape(image):
    """Read (color, shape, size, position) off an image (3, H, W) in [-1, 1] with fixed rules.
    color: the palette color most non-background pixels are nearest to. Coverage of each pixel:
    how far it is from the background towards that color (0..1, smooth edges count partly).
    shape: triangle if the top third of its bounding box is much narrower than the bottom third;
    else square if it covers the box's corners (the part outside the inscribed circle), else
    circle. size and position from the bounding box. None when no shape is found."""
    rgb = (image.float() + 1) * 127.5                                   # (3, H, W)
    H, W = rgb.shape[-2:]
    background = torch.tensor(BACKGROUND, dtype=torch.float32)
    palette = torch.tensor(list(COLORS.values()), dtype=torch.float32)  # (6, 3)
    distance = (rgb - background[:, None, None]).norm(dim=0)            # (H, W)
    if (distance > 90).sum() < 4:
        return None
    nearest = torch.cdist(rgb[:, distance > 90].t(), palette).argmin(dim=1)
    color_index = torch.bincount(nearest, minlength=len(COLORS)).argmax().item()
    coverage = (distance / (palette[color_index] - background).norm()).clamp(0, 1)  # (H, W)
    foreground = coverage > 0.5                                         # (H, W)
    if not foreground.any():
        return None
    rows, cols = foreground.any(dim=1).nonzero()[:, 0], foreground.any(dim=0).nonzero()[:, 0]
    top, bottom, left, right = rows.min().item(), rows.max().item() + 1, cols.min().item(), cols.max().item() + 1
    box = coverage[top:bottom, left:right]                              # (h, w)
    h, w = box.shape
    third = max(1, h // 3)
    ys, xs = torch.meshgrid(torch.arange(h) + 0.5 - h / 2, torch.arange(w) + 0.5 - w / 2, indexing="ij")
    corners = (ys / h) ** 2 + (xs / w) ** 2 > 0.25 * 1.1                # outside the inscribed ellipse
    if box[:third].sum() < 0.5 * box[-third:].sum():
        shape = "triangle"                                              # narrow top, wide base
    elif corners.any() and box[corners].mean() > 0.4:
        shape = "square"
    else:
        shape = "circle"
    size = "large" if max(h, w) > 0.49 * min(H, W) else "small"  # small: at most 0.44 of the side, large: 0.54
    dx, dy = (left + right) / 2 / W - 0.5, (top + bottom) / 2 / H - 0.5
    if max(abs(dx), abs(dy)) < 0.07:
        position = "center"
    elif abs(dy) > abs(dx):
        position = "top" if dy < 0 else "bottom"
    else:
        position = "left" if dx < 0 else "right"
    return dict(color=list(COLORS)[color_index], shape=shape, size=size, position=position)


def shape_requests(args, per_class):
    """What is judged: for every (color, shape) `per_class` requests (3x that for held-out ones),
    each (class name, size, position, a prompt in the training captions' varied wording)."""
    rng = random.Random(args.seed + 2)
    holdout = parse_holdout(args.holdout)
    requests = []
    for name in SHAPE_CLASSES:
        color, shape = name.split()
        for _ in range(per_class * (3 if name in holdout else 1)):
            size, position = rng.choice(list(SIZES)), rng.choice(POSITIONS)
            requests.append((name, size, position, random_caption(rng, color, shape, size, position)))
    return requests


def render_request(request, image_size, seed):  # an image (3, S, S) uint8 that shows a request of shape_requests
    name, size, position, _ = request
    color, shape = name.split()
    pixels = render_shape(shape, color, size, position, image_size, random.Random(seed))
    return torch.from_numpy(pixels.copy()).permute(2, 0, 1)


def request_conditions(requests, args):  # the GPT's conditions of shape_requests: prompts or class ids
    return [SHAPE_CLASSES.index(r[0]) for r in requests] if args.cond == "class" else [r[3] for r in requests]


def asked_color_and_shape(request, judged):
    return judged is not None and f"{judged['color']} {judged['shape']}" == request[0]


@torch.no_grad()
def evaluate_shapes(gpt, tokenizer, text_encoder, args, device, per_class, batch_size=128, passes=None, size=None):
    """Generate for every (color, shape) `per_class` samples (3x that for held-out ones), with
    prompts in the training captions' varied wording, and judge every image. Returns, per group,
    the fraction that shows the asked color and shape (and size and position, asked for in text),
    and the diversity of the samples of one color and shape (llamagen.diversity). size: early
    fusion's (width, height) to draw (None: the square --image-size)."""
    f = tokenizer.cfg.downsample_factor
    grid = None if size is None else (size[1] // f, size[0] // f)
    holdout = parse_holdout(args.holdout)
    requests = shape_requests(args, per_class)
    judged, images = [], []
    generate = S.pick_sampler(gpt, args, [] if passes is None else passes)  # --speculative measures once
    for start in range(0, len(requests), batch_size):
        batch = requests[start:start + batch_size]
        images.append(generate_images(gpt, tokenizer, text_encoder, request_conditions(batch, args), args,
                                      args.seed + start, device, generate, grid=grid).cpu())
        judged += [judge_shape(image) for image in images[-1]]
    images = torch.cat(images)
    results = {}
    for group, names in [("seen", [n for n in SHAPE_CLASSES if n not in holdout])] + [(n, [n]) for n in holdout]:
        pairs = [(r, j) for r, j in zip(requests, judged) if r[0] in names]
        right = [asked_color_and_shape(r, j) for r, j in pairs]
        spread = [S.diversity(images[[i for i, r in enumerate(requests) if r[0] == name]]) for name in names]
        results[group] = dict(samples=len(pairs), color_and_shape=sum(right) / len(pairs),
                              diversity=sum(spread) / len(spread))
        if args.cond != "class":
            results[group]["size"] = sum(j is not None and j["size"] == r[1] for r, j in pairs) / len(pairs)
            results[group]["position"] = sum(j is not None and j["position"] == r[2] for r, j in pairs) / len(pairs)
    return results


def kept_psnr(images, originals, kept):
    """PSNR (dB) of 8-bit images (N, 3, H, W) against originals (N, 3, H, W) uint8 over the kept
    pixels (H, W) only, per image, averaged."""
    error = (S.to_uint8(images).float() - originals.float()).pow(2)[:, :, kept]       # (N, 3, kept pixels)
    return (10 * torch.log10(255.0 ** 2 / error.flatten(1).mean(1).clamp(min=1e-10))).mean().item()


@torch.no_grad()
def evaluate_edit(gpt, tokenizer, text_encoder, args, device, region, per_class, batch_size=128):
    """Editing judged: for every request of shape_requests, the data generator draws an image that
    shows it, `region` (sample.py's REGION_HELP) is hidden, and the GPT fills it under the same
    condition. -> (the fraction of edits judged to show the asked color and shape, the PSNR of the
    kept cells against the input, that of the tokenizer's reconstruction there, the count)."""
    size = args.image_size
    kept = torch.from_numpy(~S.region_mask(region, (size, size), "--edit")).to(device)[None]   # (1, S, S)
    cells = tokenizer.known_cells(kept)
    grid = f"{cells.shape[1]}x{cells.shape[2]} grid"
    if bool(cells.all()):
        raise ValueError(f"--edit {region} hides no pixel of the {size}x{size} image, so there is nothing to generate: "
                         "hide more (white in a mask is hidden).")
    if not bool(cells.any()):
        raise ValueError(f"--edit {region} hides every cell of the {grid}: that is plain sampling, which evaluate "
                         "without --edit judges; hide less.")
    known = tokenizer.known_tokens(kept)                                                    # (1, T)
    f = tokenizer.cfg.downsample_factor
    kept_pixels = cells[0].repeat_interleave(f, 0).repeat_interleave(f, 1).cpu()            # (S, S)
    requests = shape_requests(args, per_class)
    generate = S.pick_sampler(gpt, args, [])
    right, edit_psnr, reconstruction_psnr = 0, 0.0, 0.0
    for start in range(0, len(requests), batch_size):
        batch = requests[start:start + batch_size]
        originals = torch.stack([render_request(r, size, args.seed * 7919 + start + i)
                                 for i, r in enumerate(batch)])                             # (B, 3, S, S) uint8
        tokens = tokenizer.encode(to_float(originals).to(device))
        edit = (tokens, known.expand(len(batch), -1))
        edited = generate_images(gpt, tokenizer, text_encoder, request_conditions(batch, args), args,
                                 args.seed + start, device, generate, edit).cpu()
        right += sum(asked_color_and_shape(r, judge_shape(image)) for r, image in zip(batch, edited))
        edit_psnr += kept_psnr(edited, originals, kept_pixels) * len(batch)
        reconstruction_psnr += kept_psnr(tokenizer.decode(tokens).cpu(), originals, kept_pixels) * len(batch)
    n = len(requests)
    return right / n, edit_psnr / n, reconstruction_psnr / n, n


def read_caption(text):
    """What a caption says, {attribute: value}, in the training captions' words; an attribute it
    names no value of, or more than one, is None."""
    words = {"color": {color: (color,) for color in COLORS}, "shape": {shape: (shape,) for shape in SHAPES},
             "size": SIZE_WORDS, "position": POSITION_WORDS}
    said = {}
    for attribute, values in words.items():
        found = [value for value, phrases in values.items()
                 if any(re.search(rf"\b{phrase}\b", text) for phrase in phrases)]
        said[attribute] = found[0] if len(found) == 1 else None
    return said


@torch.no_grad()
def evaluate_captions(gpt, tokenizer, text_encoder, args, device, per_class, batch_size=128):
    """Captioning judged (early fusion): the data generator draws an image for every request of
    shape_requests (new images: the training set never had them), the GPT captions it greedily, and
    a caption is right when it names the image's color, shape, size and position. -> per group
    ("seen", and each held-out combination) the fraction right and the count."""
    requests = shape_requests(args, per_class)
    holdout = parse_holdout(args.holdout)
    right = []
    for start in range(0, len(requests), batch_size):
        batch = requests[start:start + batch_size]
        images = torch.stack([render_request(r, args.image_size, args.seed * 7919 + 104729 + start + i)
                              for i, r in enumerate(batch)])                         # (B, 3, S, S) uint8
        captions = gpt.caption(tokenizer.encode(to_float(images).to(device)))
        for request, ids in zip(batch, captions.cpu()):
            said = read_caption(text_encoder.text_tokenizer.decode(ids))
            name, size, position, _ = request
            right.append((f"{said['color']} {said['shape']}", said["size"], said["position"]) == (name, size, position))
    results = {}
    for group, names in [("seen", [n for n in SHAPE_CLASSES if n not in holdout])] + [(n, [n]) for n in holdout]:
        counted = [ok for r, ok in zip(requests, right) if r[0] in names]
        results[group] = dict(right=sum(counted) / len(counted), images=len(counted))
    return results


def report_captions(results, run):
    for group, result in results.items():
        where = "" if group == "seen" else f" on the held-out combination '{group}'"
        run.log(f"captions right{where}: {result['right']:.1%} ({result['images']} images)")


def report_shapes(metrics, run, cfg_scale, size=None):
    for group, result in metrics.items():
        name = "trained color/shape combinations" if group == "seen" else f"held-out combination '{group}'"
        name = name if size is None else f"drawn at {size[0]}x{size[1]}, {name}"
        extras = "".join(f", {key} {result[key]:.0%}" for key in ("size", "position") if key in result)
        run.log(f"{name}: {result['color_and_shape']:.1%} of {result['samples']} samples show the asked "
                f"color and shape{extras}, diversity {result['diversity']:.3f} (CFG {cfg_scale})")


# -----------------------------------------------------------------------------
# Command line. Each default lives here once; where it differs from the paper's (the config
# classes in llamagen.py), the reason is next to it.

# What a resumed run must share with the run that wrote the checkpoint (the rest, such as
# --log-every or --device, may change between the two)
DATA_SETTINGS = ("data", "image_size", "num_images", "holdout", "seed", "flip", "warmup", "grad_clip", "tokens")
TOKENIZER_SETTINGS = DATA_SETTINGS + tuple(name for kind in TOKEN_KINDS.values() for name in kind["options"]) + (
    "tokenizer_preset", "tokenizer_steps", "tokenizer_batch_size", "tokenizer_lr", "perceptual_weight",
    "disc_start", "disc_weight", "adaptive_disc_weight", "ema")
GPT_SETTINGS = DATA_SETTINGS + ("cond", "gpt_preset", "gpt_steps", "gpt_batch_size", "gpt_lr", "weight_decay",
                                "dropout", "class_dropout", "text_length", "text_vocab", "t5", "rope", "order", "qk_norm",
                                "z_loss", "sizes", "fused_loss", "anole", "diffusion_width", "diffusion_depth",
                                "diffusion_repeats")


def kind_defaults(name):  # for --help: a default that depends on --tokens
    return ", ".join(f"{kind['defaults'][name]} for {tokens} tokens" for tokens, kind in TOKEN_KINDS.items()
                     if name in kind["defaults"])


def parse_args(argv=None):
    parser = S.ArgumentParser(
        description="Train the tokenizer, then the GPT. With no arguments: the whole demo on the "
                    "built-in shapes, text-conditional, about 6 minutes on a 2-core CPU.")
    parser.add_argument("stage", nargs="?", default="all", choices=["all", "tokenizer", "gpt", "evaluate"],
                        help="both stages, or one (gpt reads --out-dir/tokenizer.pt); evaluate: judge the "
                             "finished shapes run in --out-dir again, e.g. at another --cfg-scale")
    positive, fraction = S.bounded(int, 1), S.bounded(float, 0, 1)
    group = parser.add_argument_group("data")
    group.add_argument("--data", help="a folder of images (class subfolders and/or captions in "
                                      "metadata.jsonl or .txt files); default: the built-in shapes")
    group.add_argument("--image-size", type=positive, default=32, help="images are center-cropped and resized to this")
    group.add_argument("--num-images", type=positive, default=4000, help="how many shapes to render")
    group.add_argument("--sizes", type=image_sizes,
                       help="--cond vocab on the shapes: the sizes WxH the GPT draws and trains on, the "
                            "square --image-size first, half as many images of each other size; the tokenizer trains on the "
                            "square (default: "
                            "32x32,48x32,32x48 for --image-size 32; the square alone otherwise)")
    group.add_argument("--holdout", default="blue triangle",
                       help="comma-separated color/shape combinations left out of the shapes training set")
    group.add_argument("--flip", action=argparse.BooleanOptionalAction, default=None,
                       help="random horizontal flips: only for data whose mirror image means the same "
                            "(default: on for the shapes, whose captions are mirrored too; off for a folder, "
                            "where a flip turns writing, digits and faces into something else)")
    group.add_argument("--cond", choices=["text", "class", "vocab"], default="text",
                       help="what the GPT is conditioned on: a caption through a T5 (LlamaGen), a class, or a "
                            "caption's own tokens in one vocabulary with the image codes (early fusion, Chameleon: "
                            "one model that draws and captions)")
    group = parser.add_argument_group("tokenizer (stage 1)")
    group.add_argument("--tokens", choices=list(TOKEN_KINDS),
                       help="discrete codes from a VQ tokenizer (LlamaGen), continuous tokens from a KL "
                            "tokenizer with a diffusion loss per token (MAR), or the codes of every scale from a "
                            "multi-scale residual VQ (VAR) (default: discrete; multiscale for --order scales)")
    group.add_argument("--tokenizer-preset", choices=[name for kind in TOKEN_KINDS.values() for name in kind["presets"]],
                       help=f"the tokenizer's size (default: {kind_defaults('tokenizer_preset')})")
    group.add_argument("--tokenizer-steps", type=positive, default=800, help="training steps of the tokenizer")
    group.add_argument("--tokenizer-batch-size", type=positive, default=16,
                       help="images per step (all processes together)")
    group.add_argument("--tokenizer-lr", type=S.bounded(float, 0, above=True), default=1e-3,
                       help="peak learning rate (Adam)")
    group.add_argument("--codebook-size", type=S.bounded(int, 2),
                       help="VQ and multiscale: codes in the codebook (default: the preset's)")
    group.add_argument("--codebook-embed-dim", type=positive,
                       help="VQ and multiscale: dimensions per code; low dimensions use the codebook better "
                            "(ViT-VQGAN; default: 8)")
    group.add_argument("--codebook-l2-norm", action=argparse.BooleanOptionalAction, default=None,
                       help="VQ: compare l2-normalised codes, by cosine similarity (ViT-VQGAN; default: on)")
    group.add_argument("--commit-loss-beta", type=S.bounded(float, 0),
                       help="VQ and multiscale: weight of the commitment loss that keeps the encoder near its codes "
                            "(VQ-VAE; default: 0.25)")
    group.add_argument("--entropy-loss-ratio", type=S.bounded(float, 0),
                       help="VQ: weight of the entropy loss that keeps the whole codebook in use (MaskGIT; 0: off, "
                            f"the official default; default: {kind_defaults('entropy_loss_ratio')})")
    group.add_argument("--scales", type=scale_sizes,
                       help="multiscale: the side of each scale's map of codes, coarse to fine, from 1 up to the "
                            "grid (image size / downsampling) (default: the preset's, 1,2,3,4,6,8 for MSVQ-mini)")
    group.add_argument("--phi-ratio", type=S.bounded(float, 0, 1),
                       help="multiscale: r in phi(h) = (1 - r) h + r conv3x3(h), the refinement of each scale's "
                            "upsampled codes (0: none; default: 0.5, VAR's)")
    group.add_argument("--kl-weight", type=S.bounded(float, 0),
                       help="KL tokenizer: weight of KL(q(z|x) || N(0, I)) per latent value (default: the preset's)")
    group.add_argument("--perceptual-weight", type=S.bounded(float, 0), default=1.0, help="LPIPS weight (0: off)")
    group.add_argument("--disc-start", type=S.bounded(int, 0), default=600,
                       help="step at which the PatchGAN loss starts")
    group.add_argument("--disc-weight", type=S.bounded(float, 0), default=0.5, help="weight of the adversarial loss")
    # on rather than the official off: with a fixed weight the discriminator wrecks the small
    # demo tokenizer's reconstructions
    group.add_argument("--adaptive-disc-weight", action=argparse.BooleanOptionalAction, default=True,
                       help="scale the adversarial loss by the gradient-norm ratio at the decoder's last layer (VQGAN)")
    group.add_argument("--ema", type=S.bounded(float, 0, 1), default=0.0,
                       help="EMA decay of the tokenizer weights (0: no EMA)")
    group = parser.add_argument_group("GPT (stage 2)")
    group.add_argument("--gpt-preset", choices=list(L.GPT_PRESETS), default="GPT-mini")
    group.add_argument("--gpt-steps", type=positive,
                       help=f"training steps of the GPT (default: {kind_defaults('gpt_steps')}; {FUSED_GPT_STEPS} for "
                            "--cond vocab on the shapes at several sizes)")
    group.add_argument("--gpt-batch-size", type=positive, default=32,
                       help="token grids per step (all processes together)")
    group.add_argument("--gpt-lr", type=S.bounded(float, 0, above=True), default=2e-3,
                       help="peak learning rate (AdamW)")
    group.add_argument("--weight-decay", type=S.bounded(float, 0), default=0.05,
                       help="AdamW weight decay, on matrices only")
    # 0 rather than the official 0.1: the official models train for hundreds of epochs, the demo
    # for a few minutes
    group.add_argument("--dropout", type=fraction, default=0.0, help="token, residual and feed-forward dropout")
    group.add_argument("--class-dropout", type=fraction, default=L.GPTConfig.class_dropout_prob,
                       help="how often the condition is replaced by the null one while training, so that CFG works")
    group.add_argument("--rope", choices=["2d", "1d"],
                       help="rotary positions by (row, column) of the token grid (the default), or by raster "
                            "position (raster and masked orders; next-scale has none, as VAR); --cond vocab: 1D "
                            "over the whole sequence as Chameleon and Lumina-mGPT (its default), or 2D: a code "
                            "at its (row, column), a word at its index (Qwen2-VL's M-RoPE)")
    group.add_argument("--order", choices=[order for order in L.GENERATORS if order != "fused"],
                       help="raster: one token per pass, causal (LlamaGen; MAR's causal variant); masked: a few "
                            "passes, each deciding a share of the tokens, bidirectional (MaskGIT for codes, MAR "
                            "for continuous tokens); scales: one pass per scale, coarse to fine, block-causal "
                            f"(VAR; multiscale tokens) (default: {kind_defaults('order')})")
    group.add_argument("--text-length", type=S.bounded(int, 2), default=16,
                       help="text tokens the GPT reads (official: 120)")
    group.add_argument("--text-vocab", type=S.bounded(int, 16), default=128,
                       help="SentencePiece vocabulary trained on the captions")
    group.add_argument("--t5", help="a pretrained Hugging Face T5 directory to use, frozen, instead of a small T5 "
                                    "trained with the GPT")
    group.add_argument("--qk-norm", action="store_true",
                       help="--cond vocab: layer-normalise queries and keys per head (Chameleon's QK-norm)")
    group.add_argument("--fused-loss", choices=["all", "text"], default="all",
                       help="--cond vocab: the loss on every token (Chameleon), or on the words only, the images only "
                            "read: a model that captions but cannot draw, the start of ANOLE's exercise")
    group.add_argument("--anole", metavar="DIR",
                       help="--cond vocab: ANOLE: start from the fused model in DIR (its tokenizer.pt and gpt.pt), its "
                            "output layer's rows of the image codes set to zero (its drawing withheld), and train "
                            "only those, on caption-then-image sequences")
    group.add_argument("--z-loss", type=S.bounded(float, 0), default=0.0,
                       help="--cond vocab: weight of Chameleon's z-loss, log(Z)^2 of every softmax (Chameleon: 1e-5)")
    # smaller than MAR's 3 x 1024: the demo's transformer is 128 wide
    group.add_argument("--diffusion-width", type=positive, default=128,
                       help="continuous tokens: width of the diffusion head's MLP blocks")
    group.add_argument("--diffusion-depth", type=positive, default=L.GPTConfig.diffusion_depth,
                       help="continuous tokens: residual blocks of the diffusion head")
    group.add_argument("--diffusion-repeats", type=positive, default=L.GPTConfig.diffusion_repeats,
                       help="continuous tokens: timesteps drawn per token per training step")
    group.add_argument("--eval-per-class", type=S.bounded(int, 0), default=20,
                       help="samples per color/shape combination judged at the end of the shapes demo (0: none)")
    group.add_argument("--edit", metavar="REGION", action="append",
                       help="evaluate: judge edits instead: images of the judged captions with REGION hidden, filled by "
                            "the GPT (center, right, bottom, top-left, ..., or x0,y0,x1,y1 in pixels; repeat for several)")
    # 2 rather than the library's 1 (no guidance): the demo's grids and evaluation are guided
    S.add_sampling_flags(parser.add_argument_group("sampling, for the grids and the evaluation"),
                         defaults=dict(cfg_scale=2.0), speculative="evaluate: ")
    group = parser.add_argument_group("run")
    group.add_argument("--out-dir", default="out", help="checkpoints, log.txt and sample grids go here")
    group.add_argument("--resume", action="store_true", help="continue the run whose checkpoints are in --out-dir")
    group.add_argument("--overwrite", action="store_true",
                       help="start a new run even where --out-dir holds the checkpoints of another")
    group.add_argument("--device", help="cuda, mps or cpu (default: the best available)")
    group.add_argument("--seed", type=int, default=0, help="data, initialisation and batches follow from it")
    group.add_argument("--compile", action="store_true", help="torch.compile the GPT's training step")
    group.add_argument("--warmup", type=S.bounded(int, 0), default=100, help="learning-rate warmup steps")
    group.add_argument("--grad-clip", type=S.bounded(float, 0, above=True), default=1.0, help="gradient norm clipping")
    group.add_argument("--log-every", type=positive, default=100, help="steps between log lines")
    group.add_argument("--sample-every", type=positive, default=500, help="steps between sample grids")
    group.add_argument("--save-every", type=positive, default=500,
                       help="steps between checkpoints (Ctrl-C saves one too)")
    args = parser.parse_args(argv)
    if args.flip is None:
        args.flip = args.data is None
    if args.rope is None:
        args.rope = "1d" if args.cond == "vocab" else "2d"
    if args.cond == "vocab":  # early fusion writes image codes into its one vocabulary, in its own raster order
        if args.order is not None or args.tokens not in (None, "discrete"):
            parser.error(f"--cond vocab writes codes of a VQ into one vocabulary with the words, in raster order: "
                         f"leave out {'--order' if args.order is not None else '--tokens'}")
        args.order = "fused"
    elif args.qk_norm or args.z_loss:
        parser.error(f"{'--qk-norm' if args.qk_norm else '--z-loss'} is Chameleon's, for --cond vocab")
    elif args.fused_loss != "all" or args.anole:
        parser.error(f"{'--fused-loss' if args.fused_loss != 'all' else '--anole'} is for early fusion, --cond vocab")
    if args.anole and (args.fused_loss != "all" or args.qk_norm or args.z_loss or args.sizes is not None):
        parser.error("--anole trains the image rows of the model in DIR as it is: leave out --fused-loss, --qk-norm, "
                     "--z-loss and --sizes")
    square = (args.image_size, args.image_size)
    if args.sizes is None:
        # the short side stays the square's, so that the shapes keep their size in pixels (at 16 px a small
        # shape is 6 px, two cells, which the tokenizer does not reconstruct as its shape)
        longer = args.image_size * 3 // 2
        args.sizes = [square, (longer, args.image_size), (args.image_size, longer)] \
            if args.cond == "vocab" and args.data is None else [square]
    if args.sizes[0] != square:
        parser.error(f"--sizes begins with the square of --image-size, {args.image_size}x{args.image_size}: the "
                     "size the run's grids and the tokenizer's PSNR show")
    if len(args.sizes) > 1 and (args.cond != "vocab" or args.data is not None):
        parser.error("--sizes draws the built-in shapes at other sizes, for --cond vocab (early fusion writes a "
                     "grid's height and width as tokens; the other generators draw one square grid)")
    if args.tokens is None:  # the tokens the order generates (--order scales: multiscale)
        args.tokens = L.GENERATORS[args.order or "raster"].token_kinds[0]
    kind = TOKEN_KINDS[args.tokens]
    if args.cond == "vocab" and args.gpt_steps is None and args.data is None and len(args.sizes) > 1:
        args.gpt_steps = FUSED_GPT_STEPS
    # the tokenizer's flags this command line gives: the gpt stage checks them against tokenizer.pt
    args.tokenizer_flags = [name for name in ("tokenizer_preset", *kind["options"]) if getattr(args, name) is not None]
    for name, default in kind["defaults"].items():
        if getattr(args, name) is None:
            setattr(args, name, default)
    if args.tokenizer_preset not in kind["presets"]:
        parser.error(f"--tokenizer-preset {args.tokenizer_preset} is not for {args.tokens} tokens; choose from "
                     f"{', '.join(kind['presets'])}")
    for tokens, other in TOKEN_KINDS.items():  # an option of another kind's tokenizer
        misplaced = [name for name in other["options"]
                     if name not in kind["options"] and getattr(args, name) is not None]
        if misplaced:
            parser.error(f"--{misplaced[0].replace('_', '-')} is for {tokens} tokens, not {args.tokens} ones")
    generates = L.GENERATORS[args.order].token_kinds
    if args.tokens not in generates:
        parser.error(f"--order {args.order} generates {' or '.join(generates)} tokens, not {args.tokens} ones: "
                     f"leave out --tokens, or use --order {kind['defaults']['order']} for {args.tokens} tokens")
    return args


def check_args(args, data):
    """Errors a user can make with the data and the settings, found before any training starts."""
    S.given_options(args, L.GENERATORS[args.order].options_for(args.tokens),  # (evaluate: on the GPT it loads)
                    f"--order {args.order} with --tokens {args.tokens}")
    if args.order == "scales" and args.rope != "2d":
        raise ValueError(f"--rope {args.rope} does not apply to --order scales, which places its cells by learned "
                         "positions and no RoPE, as VAR: leave it out.")
    world = int(os.environ.get("WORLD_SIZE", 1))
    for name in ("tokenizer_batch_size", "gpt_batch_size"):
        if getattr(args, name) % world:
            raise ValueError(f"--{name.replace('_', '-')} {getattr(args, name)} is not divisible by the "
                             f"{world} processes.")
    if args.cond == "vocab" and args.t5:
        raise ValueError("--t5 does not apply to --cond vocab, which reads the caption's own tokens: leave it out.")
    if args.stage != "tokenizer" and args.cond != "class" and not any(data.captions or []):
        raise ValueError(f"{args.data} has no captions: add metadata.jsonl lines {{\"file_name\": ..., "
                         "\"text\": ...}} or a .txt file next to each image, or use --cond class.")
    if args.stage != "tokenizer" and args.cond == "class" and data.labels is None:
        raise ValueError(f"the images in {args.data} are not all in class subfolders ({args.data}/<class>/"
                         "image.png): sort them so, or use --cond text with captions.")
    downsampling = tokenizer_config(args).downsample_factor
    for width, height in args.sizes[1:]:
        if width % downsampling or height % downsampling:
            raise ValueError(f"--sizes {width}x{height} is not a grid of {args.tokenizer_preset}'s {downsampling}-pixel "
                             f"cells: make both sides multiples of {downsampling}.")
    if args.stage != "gpt":
        if args.image_size % downsampling:
            raise ValueError(f"--image-size {args.image_size} is not a multiple of {args.tokenizer_preset}'s "
                             f"{downsampling}x downsampling.")

        tokens = L.TOKENIZERS[args.tokens].tokens_per_image(tokenizer_config(args), args.image_size)  # VAR: the scales
        S.sampling_options(args, L.GPTConfig(order=args.order, token_kind=args.tokens, block_size=tokens))
        if args.image_size < 32 and args.disc_start < args.tokenizer_steps:
            raise ValueError(f"the PatchGAN discriminator needs images of at least 32 px: use --image-size 32 "
                             f"or more, or --disc-start {args.tokenizer_steps} to train without it.")
    if args.stage != "tokenizer" and args.cond == "text" and args.t5:
        for name in ("config.json", "spiece.model"):
            if not os.path.isfile(os.path.join(args.t5, name)):
                raise FileNotFoundError(f"--t5 {args.t5} has no {name}: pass a Hugging Face T5 directory with "
                                        "its tokenizer (for example a download of google/flan-t5-base).")


def tokenizer_flag(name, value):  # how the command line writes a tokenizer setting: --scales 1,2,4,8
    if isinstance(value, bool):
        return f"--{'' if value else 'no-'}{name.replace('_', '-')}"
    shown = ",".join(map(str, value)) if isinstance(value, (list, tuple)) else value
    return f"--{name.replace('_', '-')} {shown}"


def check_tokenizer_flags(args, checkpoint, path):
    """The gpt stage reads the tokenizer as it was trained: a tokenizer flag of this command line
    that says otherwise is refused rather than ignored."""
    trained = {"tokenizer_preset": checkpoint["args"].get("tokenizer_preset"), **checkpoint["config"]}
    for name in args.tokenizer_flags:
        value, was = getattr(args, name), trained.get(name)
        if (tuple(was) if isinstance(was, list) else was) != value:
            raise ValueError(f"{tokenizer_flag(name, value)}: {path} was trained with {tokenizer_flag(name, was)}, which "
                             "the gpt stage cannot change: leave the flag out (or pass that), or train a new tokenizer "
                             "with it (python train.py tokenizer, or both stages).")


def checkpoints_to_resume(args):
    """The checkpoints this run continues from ({"tokenizer": ..., "gpt": ...}, missing where a stage
    starts afresh). Without --resume, a checkpoint this run would overwrite stops it unless
    --overwrite; with --resume, the settings must be the ones the checkpoints were trained with."""
    writes = {"all": ("tokenizer", "gpt"), "tokenizer": ("tokenizer",), "gpt": ("gpt",)}[args.stage]
    paths = {kind: os.path.join(args.out_dir, f"{kind}.pt") for kind in ("tokenizer", "gpt")}
    existing = {kind: L.load_checkpoint(paths[kind], kind) for kind in writes if os.path.exists(paths[kind])}
    if not args.resume:
        if existing and not args.overwrite:
            kind, checkpoint = next(iter(existing.items()))
            total, step = checkpoint["args"][f"{kind}_steps"], checkpoint["step"]
            state = "a finished run" if step >= total else f"a run stopped at step {step} of {total}"
            raise ValueError(f"{paths[kind]} holds {state}: continue it with --resume, start over with "
                             "--overwrite, or pass another --out-dir.")
        return {}
    if not existing:
        raise ValueError(f"--resume, but {args.out_dir} holds no {' or '.join(f'{k}.pt' for k in writes)} to "
                         "continue: leave --resume out to start a new run.")
    for kind, checkpoint in existing.items():
        settings = TOKENIZER_SETTINGS if kind == "tokenizer" else GPT_SETTINGS
        changed = [name for name in settings if checkpoint["args"].get(name) != getattr(args, name)]
        if changed:
            differences = ", ".join(f"--{name.replace('_', '-')} {checkpoint['args'].get(name)} -> "
                                    f"{getattr(args, name)}" for name in changed)
            raise ValueError(f"--resume with other settings than {paths[kind]} was trained with ({differences}): "
                             "run with the same settings, or start a new run (--overwrite or another --out-dir).")
    return existing


def anole_source(args):
    """--anole DIR, checked before anything is written: the run trains the GPT stage (on DIR's
    tokenizer, which start_anole copies) with the image sizes and caption length of DIR's model."""
    if args.stage not in ("all", "gpt"):
        raise ValueError(f"--anole trains a GPT: use it with python train.py or train.py gpt, not {args.stage}.")
    path = os.path.join(args.anole, "gpt.pt")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--anole {args.anole} holds no gpt.pt: train the model to start from first (python "
                                f"train.py --cond vocab --fused-loss text --out-dir {args.anole}).")
    if os.path.abspath(args.anole) == os.path.abspath(args.out_dir):
        raise ValueError(f"--anole {args.anole} is the model ANOLE starts from: write its run to another --out-dir.")
    source = L.load_checkpoint(path, "gpt")
    if source["config"].get("order") != "fused":
        raise ValueError(f"--anole {args.anole}: {path} draws from a {source['config'].get('order')} order GPT, not "
                         "an early-fusion model: train one with --cond vocab.")
    args.stage = "gpt"
    args.image_size, args.text_length = source["args"]["image_size"], source["args"]["text_length"]
    args.sizes = [tuple(size) for size in source["args"]["sizes"]]


def start_anole(args):  # DIR's tokenizer.pt into --out-dir, where the gpt stage and sample.py read it
    source, target = os.path.join(args.anole, "tokenizer.pt"), os.path.join(args.out_dir, "tokenizer.pt")
    with open(source, "rb") as f:
        tokenizer = f.read()
    if os.path.exists(target):
        with open(target, "rb") as f:
            if f.read() != tokenizer:
                raise ValueError(f"{target} is another tokenizer than {source}, the one --anole's model reads: pass "
                                 "another --out-dir.")
        return
    os.makedirs(args.out_dir, exist_ok=True)
    with open(target + ".tmp", "wb") as f:
        f.write(tokenizer)
    os.replace(target + ".tmp", target)


def evaluate_run(args, run):
    """The evaluation of the shapes demo, again, on the checkpoints in --out-dir: the settings of
    its run, with this command line's sampling flags (--cfg-scale, --temperature, ...),
    --eval-per-class and --seed."""
    if args.data is not None:
        raise ValueError("evaluate judges the built-in shapes; for your own images, look at the grids "
                         "sample.py writes.")
    tokenizer_path, gpt_path = (os.path.join(args.out_dir, name) for name in ("tokenizer.pt", "gpt.pt"))
    if not os.path.isfile(gpt_path):
        raise FileNotFoundError(f"{gpt_path} does not exist: train first (python train.py --out-dir {args.out_dir}).")
    tokenizer, _ = L.load_tokenizer(tokenizer_path)
    gpt, text_encoder, checkpoint = L.load_gpt(gpt_path, tokenizer, tokenizer_path)
    if checkpoint["args"]["data"] is not None:
        raise ValueError(f"{gpt_path} was trained on {checkpoint['args']['data']}, not on the built-in shapes.")
    if args.eval_per_class == 0:
        raise ValueError("--eval-per-class 0 leaves nothing to evaluate.")
    S.check_sampler(gpt, args)
    S.sampling_options(args, gpt.config)
    args.cond, args.holdout = checkpoint["args"]["cond"], checkpoint["args"]["holdout"]
    args.image_size = checkpoint["args"]["image_size"]
    args.sizes = [tuple(size) for size in checkpoint["args"].get("sizes") or [(args.image_size, args.image_size)]]
    if text_encoder is not None and text_encoder.t5 is not None:
        text_encoder.t5.to(run.device)
    timer, passes = time.time(), []
    for region in args.edit or []:
        accuracy, psnr, reconstruction, samples = evaluate_edit(gpt.to(run.device), tokenizer.to(run.device),
                                                                text_encoder, args, run.device, region,
                                                                args.eval_per_class)
        run.log(f"edited ({region}): {accuracy:.1%} of {samples} samples show the asked color and shape, kept region "
                f"{psnr:.1f} dB against the input (the tokenizer's reconstruction: {reconstruction:.1f} dB)")
    if args.edit:
        run.log(f"edits generated and judged in {time.time() - timer:.1f} s")
        return
    timer, passes = time.time(), []
    metrics = evaluate_shapes(gpt.to(run.device), tokenizer.to(run.device), text_encoder, args, run.device,
                              args.eval_per_class, passes=passes)
    samples = sum(result["samples"] for result in metrics.values())
    report_shapes(metrics, run, args.cfg_scale)
    run.log(f"{samples} samples generated and judged in {time.time() - timer:.1f} s")
    for size in args.sizes[1:]:
        report_shapes(evaluate_shapes(gpt, tokenizer, text_encoder, args, run.device, args.eval_per_class, size=size),
                      run, args.cfg_scale, size)
    if hasattr(gpt, "caption"):
        report_captions(evaluate_captions(gpt, tokenizer, text_encoder, args, run.device, args.eval_per_class), run)
    if passes:
        run.log(S.passes_report(passes, gpt.config.block_size, args.speculative))


def main(argv=None):
    args = parse_args(argv)
    warnings.formatwarning = S.plain_warning
    run = None
    try:
        S.check_output_dir(args.out_dir, "--out-dir")
        if args.edit and args.stage != "evaluate":
            raise ValueError("--edit is for python train.py evaluate, which judges edits of the shapes; sample.py "
                             "edits an image of yours (--edit IMAGE --keep MASK).")
        if args.speculative and args.stage != "evaluate":
            raise ValueError("--speculative is for sampling: use it with python train.py evaluate (or sample.py).")
        run = Run(args)
        if args.stage == "evaluate":
            return evaluate_run(args, run)
        if args.anole:
            anole_source(args)
        resumed = checkpoints_to_resume(args)
        if args.anole:
            start_anole(args)
        data = load_data(args)
        check_args(args, data)
        tokenizer_path = os.path.join(args.out_dir, "tokenizer.pt")
        if args.stage == "gpt":
            if not os.path.isfile(tokenizer_path):
                raise FileNotFoundError(f"{tokenizer_path} does not exist: train the tokenizer first "
                                        "(python train.py tokenizer), or run both stages (python train.py).")
            tokenizer, checkpoint = L.load_tokenizer(tokenizer_path)
            if checkpoint["token_kind"] != args.tokens:
                kind = checkpoint["token_kind"]
                raise ValueError(f"{tokenizer_path} makes {kind} tokens, not {args.tokens} ones: pass --tokens {kind} "
                                 f"(with an --order that generates them), or train a {args.tokens} tokenizer first.")
            if checkpoint["image_size"] != args.image_size:
                raise ValueError(f"{tokenizer_path} was trained at {checkpoint['image_size']} px but --image-size "
                                 f"is {args.image_size}: pass --image-size {checkpoint['image_size']}.")
            check_tokenizer_flags(args, checkpoint, tokenizer_path)
            tokenizer = tokenizer.to(run.device)
        run.log(f"{' '.join(sys.argv)}\n{len(data.images)} training images of {args.image_size} px on {run.device}"
                + (f" x {run.world} processes" if run.world > 1 else ""))
        if args.stage in ("all", "tokenizer"):
            tokenizer, _ = train_tokenizer(args, run, data, resumed.get("tokenizer"))
        if args.stage in ("all", "gpt"):
            train_gpt(args, run, data, tokenizer, resumed.get("gpt"))
    except (OSError, ValueError) as error:
        sys.exit(f"error: {error}")
    except Stopped as stop:
        print(stop, file=sys.stderr)
        sys.exit(stop.exit_code)
    except KeyboardInterrupt:
        print("interrupted; nothing was saved since the last checkpoint.", file=sys.stderr)
        sys.exit(130)
    finally:
        if run is not None:
            run.close()


if __name__ == "__main__":
    main()
