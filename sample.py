"""Sample images from a trained LlamaGen: ours (python train.py) or the official checkpoints.

    python sample.py                                     # a grid from out/tokenizer.pt and out/gpt.pt
    python sample.py --prompt "a small red circle at the top" --num-samples 8
    python sample.py --class-name "red circle" --gif generation.gif
    python sample.py --out-dir out-scales --gif generation-scales.gif   # any trained order: VAR sharpens by scale
    python sample.py --out-dir out-masked --edit shape.png --fill center --prompt "a large red circle in the center"
    python sample.py --official c2i_B_256 --class-id 207      # a released model, downloaded once by name
    python sample.py --list-official                         # the release: names, sizes, what is downloaded
    python sample.py --official t2i_XL_stage1_256 --t5 flan-t5-xl --prompt "a red fox in the snow"
    python sample.py --official-vq vq_ds16_c2i.pt --official-gpt c2i_L_256.pt --image-size 256 --class-id 207
    python sample.py --benchmark --preset GPT-B --batch-size 2

The models are in llamagen.py; this file loads them, samples, writes pictures, and holds the
command-line plumbing that train.py shares (it imports this file, never the other way round).
"""
import argparse
import contextlib
import dataclasses
import glob
import http.client
import inspect
import math
import os
import re
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
import urllib.request
import warnings
import zipfile

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

import llamagen as L

OFFICIAL_C2I_CLASSES = [207, 360, 387, 974, 88, 979, 417, 279]  # the official sample_c2i.py's
OFFICIAL_T2I_PROMPTS = [  # the official sample_t2i.py's
    "A portrait photo of a kangaroo wearing an orange hoodie and blue sunglasses standing on the grassy "
    "ground in front of the Sydney Opera House holding a sign on the chest that says Welcome Friends!",
    "A blue Porsche 356 parked in front of a yellow brick wall.",
    "A photo of an astronaut riding a horse in the forest. There is a river in front of them with water lilies.",
    "A map of the United States made out of sushi. It is on a table next to a glass of red wine.",
]
# Where the models come from may set some sampling options (a Pipeline's sampling): the official
# samplers' defaults, and what our checkpoints store. The rest take the library's defaults.
OFFICIAL_C2I_SAMPLING = dict(cfg_scale=4.0, top_k=2000)
OFFICIAL_T2I_SAMPLING = dict(cfg_scale=7.5, top_k=1000)
CHECKPOINT_SAMPLING = ("cfg_scale",)  # train.py's --cfg-scale, kept in gpt.pt
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


# -----------------------------------------------------------------------------
# Pictures


def to_rgb(image):
    """Any Pillow image -> 8-bit RGB: 16-bit grayscale rescaled, transparency put over white."""
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
        pixels = np.asarray(image, dtype=np.float32)
        if image.mode.startswith("I;16") or pixels.max() > 255:
            pixels = pixels / 257.0  # 0..65535 -> 0..255
        image = Image.fromarray(pixels.clip(0, 255).astype(np.uint8))
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        image = image.convert("RGBA")
        image = Image.alpha_composite(Image.new("RGBA", image.size, (255, 255, 255, 255)), image)
    return image.convert("RGB")


def center_crop_resize(image, size, resample=Image.LANCZOS):
    width, height = image.size
    side = min(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    return image.crop((left, top, left + side, top + side)).resize((size, size), resample)


def to_uint8(images):  # (N, 3, H, W) in [-1, 1] -> uint8
    return ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def grid_image(images, columns):
    """images (N, 3, H, W) in [-1, 1] -> one Pillow image, `columns` images per row, 2-pixel gaps."""
    images = to_uint8(images.cpu())
    N, _, H, W = images.shape
    rows, gap = math.ceil(N / columns), 2
    grid = torch.full((3, rows * (H + gap) + gap, columns * (W + gap) + gap), 255, dtype=torch.uint8)
    for i, image in enumerate(images):
        top, left = gap + (i // columns) * (H + gap), gap + (i % columns) * (W + gap)
        grid[:, top:top + H, left:left + W] = image
    return Image.fromarray(grid.permute(1, 2, 0).numpy())


def diversity(images):
    """How different images (N, 3, H, W) in [-1, 1] of one condition are: the RMS pixel distance
    between two of them, averaged over all pairs, in units of the pixel range (0: all identical)."""
    x = (images.float().flatten(1) + 1) / 2                                   # (N, 3*H*W) in [0, 1]
    n = len(x)
    return (torch.cdist(x, x).sum() / (n * (n - 1)) / x.shape[1] ** 0.5).item() if n > 1 else 0.0


# -----------------------------------------------------------------------------
# The released models, by name: downloaded once into the torch hub cache


@dataclasses.dataclass
class Release:
    repo: str                # the Hugging Face model repository that serves it
    params: float            # as the official README gives them
    image_size: int = None   # a GPT: the size it generates
    tokenizer: str = None    # a GPT: the release name of the tokenizer whose codes it predicts
    text: bool = False       # a GPT conditioned on captions through flan-t5-xl


RELEASES = {  # the official README's tables (FoundationVision/LlamaGen)
    "vq_ds16_c2i": Release("FoundationVision/LlamaGen", 72e6),
    "vq_ds8_c2i": Release("FoundationVision/LlamaGen", 70e6),
    "c2i_B_256": Release("FoundationVision/LlamaGen", 111e6, 256, "vq_ds16_c2i"),
    "c2i_B_384": Release("FoundationVision/LlamaGen", 111e6, 384, "vq_ds16_c2i"),
    "c2i_L_256": Release("FoundationVision/LlamaGen", 343e6, 256, "vq_ds16_c2i"),
    "c2i_L_384": Release("FoundationVision/LlamaGen", 343e6, 384, "vq_ds16_c2i"),
    "c2i_XL_384": Release("FoundationVision/LlamaGen", 775e6, 384, "vq_ds16_c2i"),
    "c2i_XXL_384": Release("FoundationVision/LlamaGen", 1.4e9, 384, "vq_ds16_c2i"),
    "c2i_3B_384": Release("FoundationVision/LlamaGen", 3.1e9, 384, "vq_ds16_c2i"),
    "vq_ds16_t2i": Release("peizesun/llamagen_t2i", 72e6),
    "t2i_XL_stage1_256": Release("peizesun/llamagen_t2i", 775e6, 256, "vq_ds16_t2i", text=True),
    "t2i_XL_stage2_512": Release("peizesun/llamagen_t2i", 775e6, 512, "vq_ds16_t2i", text=True),
}
RELEASED_GPTS = [name for name, release in RELEASES.items() if release.tokenizer]
BASE_URL_VARIABLE = "LLAMAGEN_BASE_URL"  # a mirror, or a test server, that serves <repo>/resolve/main/<file>


def release_path(name):  # where a release file is kept: torch hub's checkpoint cache
    return os.path.join(torch.hub.get_dir(), "checkpoints", f"{name}.pt")


def release_url(name):
    base = os.environ.get(BASE_URL_VARIABLE, "https://huggingface.co").rstrip("/")
    if not base.startswith(("http://", "https://")):
        raise ValueError(f"{BASE_URL_VARIABLE}={base} is not an http:// or https:// address.")
    return f"{base}/{RELEASES[name].repo}/resolve/main/{name}.pt"


class Terminated(Exception):
    """SIGTERM (a job scheduler, `timeout`, a closed terminal), raised where the program is, so that
    what it has half-written is removed on the way out, as after Ctrl-C."""


@contextlib.contextmanager
def sigterm_raises():
    if threading.current_thread() is not threading.main_thread():  # only the main thread takes signals
        yield
        return

    def stop(signum, frame):
        raise Terminated
    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def partial_prefix(name):  # an unfinished download's name: the machine and the process that write it
    return f"{name}.{socket.gethostname().replace('.', '-')}.{os.getpid()}."


def remove_stale_partials(folder, name):
    """The unfinished downloads of `name` that no running process of this machine owns any more (a
    process killed by SIGKILL, say, or this one's namesake in an earlier container); those of other
    machines sharing the cache are left alone."""
    host = partial_prefix(name).split(".")[-3]
    for partial in glob.glob(os.path.join(folder, f"{name}.*.partial")):
        owner = os.path.basename(partial)[len(name) + 1:].split(".")
        if len(owner) > 3 and owner[0] != host:
            continue
        try:
            pid = int(owner[1] if len(owner) > 3 else owner[0])
            if pid != os.getpid():
                os.kill(pid, 0)
                continue  # alive
        except PermissionError:  # another user's process: alive
            continue
        except (ValueError, OverflowError, ProcessLookupError):  # no owner, or a dead one
            pass
        with contextlib.suppress(FileNotFoundError):  # another download removed it first
            os.remove(partial)


def fetch_release(name):
    """The path of release file `name`, downloaded into the cache first if it is not there. The
    download goes to a temporary file of its own and takes the model's name only once it is a whole
    checkpoint, so an interrupted one never passes for the model."""
    path = release_path(name)
    if os.path.exists(path):
        return path
    url, folder = release_url(name), os.path.dirname(path)
    try:
        os.makedirs(folder, exist_ok=True)
        remove_stale_partials(folder, name)
        descriptor, partial = tempfile.mkstemp(dir=folder, prefix=partial_prefix(name), suffix=".partial")
    except OSError as error:
        raise OSError(f"cannot write in {folder} ({error.strerror}): set TORCH_HOME to a folder you can write "
                      "to.") from None
    try:
        with sigterm_raises(), os.fdopen(descriptor, "wb") as f:
            size = download(url, f, path)
        # a zip archive (what torch.save writes) ends with its directory: a cut one has none, which
        # is how a download without a Content-Length is told from a whole one
        if not zipfile.is_zipfile(partial):
            raise download_error(url, path, "the connection closed early: what came is not a whole checkpoint"
                                 if size is None else "what came is not a PyTorch checkpoint")
        os.replace(partial, path)
    finally:
        if os.path.exists(partial):
            os.remove(partial)
    return path


def download_error(url, path, reason):
    hint = f"is {BASE_URL_VARIABLE} right?" if os.environ.get(BASE_URL_VARIABLE) else "check the network"
    return OSError(f"could not download {url} ({reason}): {hint} Or put the file there by hand: {path}")


def download(url, f, path):
    """url into the open file f, with a progress bar -> the size announced (None: none); each way it
    can fail is one sentence."""
    def failed(reason):
        return download_error(url, path, reason)
    try:
        response = urllib.request.urlopen(url, timeout=60)
    except (OSError, http.client.HTTPException) as error:  # no network, or an HTTP error such as 404
        raise failed(error) from None
    with response:
        length = response.headers.get("Content-Length", "")
        size = int(length) if length.isdigit() else None
        free = shutil.disk_usage(os.path.dirname(path)).free
        if size and size > free:
            raise OSError(f"{os.path.basename(path)} takes {size / 1e9:.2f} GB but {os.path.dirname(path)} has "
                          f"{free / 1e9:.2f} GB free: free some space, or set TORCH_HOME to another disk.")
        print(f"downloading {os.path.basename(path)} ({f'{size / 1e9:.2f} GB' if size else 'size unknown'}) "
              f"from {url} to {path}")
        with tqdm(total=size, unit="B", unit_scale=True, desc=os.path.basename(path), leave=False) as bar:
            while True:
                try:
                    chunk = response.read(1 << 20)
                except (OSError, http.client.HTTPException) as error:  # the connection broke
                    raise failed(error) from None
                if not chunk:
                    break
                try:
                    f.write(chunk)
                except OSError as error:  # a full disk, say
                    raise OSError(f"could not write {path} ({error.strerror}): free some space, or set TORCH_HOME "
                                  "to another disk.") from None
                bar.update(len(chunk))
        if size and f.tell() != size:
            raise failed("the connection closed early")
    return size


def list_releases():
    cache = os.path.dirname(release_path(""))
    print(f"{'name':18s} {'params':>7s} {'image':>7s} {'download':>9s}  {'cached':6s}  what it is")
    for name, release in RELEASES.items():
        params = f"{release.params / 1e9:.1f}B" if release.params >= 1e9 else f"{release.params / 1e6:.0f}M"
        image = f"{release.image_size} px" if release.image_size else "-"
        size = f"~{release.params * 4 / 1e9:.2f} GB"  # float32 weights
        cached = "yes" if os.path.exists(release_path(name)) else "no"
        users = [gpt for gpt in RELEASED_GPTS if RELEASES[gpt].tokenizer == name]
        what = f"{'text' if release.text else 'class'}-conditional GPT, with {release.tokenizer}" if release.tokenizer \
            else f"tokenizer of {len(users)} of these GPTs" if users else "tokenizer (no released GPT reads its codes)"
        print(f"{name:18s} {params:>7s} {image:>7s} {size:>9s}  {cached:6s}  {what}")
    print(f"--official takes a GPT's name and fetches its tokenizer with it, once, into {cache}. Download sizes "
          "are about the float32 weights; the exact size is announced when a download starts.")


# -----------------------------------------------------------------------------
# Models: ours or the official ones, and what to condition them on


class Pipeline:
    """What sampling needs, whatever the kind of tokens: the image tokenizer, the GPT, the image size
    they make, its text encoder (None for classes), the class names or prompts shown by default,
    and the sampling settings that go with where the models come from (generate()'s keywords)."""

    def __init__(self, tokenizer, gpt, image_size, text_encoder=None, class_names=None, prompts=None, sampling=None):
        self.tokenizer, self.gpt, self.image_size, self.text_encoder = tokenizer, gpt, image_size, text_encoder
        self.class_names, self.prompts, self.sampling = class_names, prompts, sampling or {}


def load_ours(out_dir):
    tokenizer_path, gpt_path = os.path.join(out_dir, "tokenizer.pt"), os.path.join(out_dir, "gpt.pt")
    for path in (tokenizer_path, gpt_path):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path} does not exist: run python train.py first "
                                    "(or pass --out-dir, or --official-vq and --official-gpt).")
    try:
        tokenizer, tokenizer_checkpoint = L.load_tokenizer(tokenizer_path)
        gpt, text_encoder, checkpoint = L.load_gpt(gpt_path, tokenizer, tokenizer_path)
    except L.NotOurCheckpoint as error:
        raise ValueError(f"{error}: pass official files with --official-vq and --official-gpt.") from None
    return Pipeline(tokenizer, gpt, tokenizer_checkpoint["image_size"], text_encoder, checkpoint["class_names"],
                    checkpoint["prompts"],
                    {name: checkpoint[name] for name in CHECKPOINT_SAMPLING})


def t5_missing(model):  # the sentence for a text-conditional GPT without --t5
    return ValueError(f"{model} is text-conditional and reads captions through flan-t5-xl (about 11 GB, not "
                      "downloaded unasked): download google/flan-t5-xl from Hugging Face and pass its folder with --t5.")


def official_files(args):
    """(tokenizer file, GPT file, image size): of the release --official names, downloaded once;
    or --official-vq, --official-gpt and --image-size."""
    if args.official:
        release = RELEASES[args.official]
        if release.text and not args.t5:  # before gigabytes of downloads, not after
            raise t5_missing(args.official)
        return fetch_release(release.tokenizer), fetch_release(args.official), release.image_size
    return args.official_vq, args.official_gpt, args.image_size


def load_official(args):
    vq_path, gpt_path, image_size = official_files(args)
    try:
        vq = L.load_official_vq(vq_path)
        if image_size % vq.cfg.downsample_factor:
            raise ValueError(f"--image-size {image_size} is not a multiple of the tokenizer's "
                             f"{vq.cfg.downsample_factor}x downsampling.")
        gpt = L.load_official_gpt(gpt_path, block_size=L.VQModel.tokens_per_image(vq.cfg, image_size))
    except ValueError as error:
        if args.official and isinstance(error, L.UnreadableFile):  # a download in the cache
            raise ValueError(f"{error.path}, a download in the cache, is {error.reason}: delete it, and the next "
                             "run downloads it again.") from None
        if args.official:
            raise ValueError(f"{str(error).rstrip('.')}; it is a download in the cache: delete it, and the next "
                             "run downloads it again.") from None
        if isinstance(error, L.NotAnOfficialCheckpoint):
            raise ValueError(f"{error}: pass its folder with --out-dir instead.") from None
        raise
    if gpt.config.vocab_size != vq.cfg.codebook_size:
        raise ValueError(f"{gpt_path} predicts {gpt.config.vocab_size} codes but {vq_path} "
                         f"has {vq.cfg.codebook_size}: pass the tokenizer the GPT was trained with.")
    if gpt.config.model_type == "c2i":
        return Pipeline(vq, gpt, image_size, sampling=OFFICIAL_C2I_SAMPLING)
    if not args.t5:
        raise t5_missing(gpt_path)
    t5, text_tokenizer = L.load_t5_encoder(args.t5)
    if text_tokenizer is None:
        raise FileNotFoundError(f"{args.t5} has no spiece.model, the T5 tokenizer.")
    if t5.config.d_model != gpt.config.caption_dim:
        raise ValueError(f"{args.t5} gives {t5.config.d_model}-wide features but {gpt_path} reads "
                         f"{gpt.config.caption_dim}: pass the T5 it was trained with (flan-t5-xl).")
    return Pipeline(vq, gpt, image_size, L.TextEncoder(text_tokenizer, t5), prompts=OFFICIAL_T2I_PROMPTS,
                    sampling=OFFICIAL_T2I_SAMPLING)


def conditions(args, pipeline):
    """One entry per grid row: class ids, or prompts."""
    cfg = pipeline.gpt.config
    if cfg.model_type != "c2i":  # a caption read by a T5, or as words of one vocabulary (early fusion)
        if args.class_id or args.class_name:
            raise ValueError("this GPT is text-conditional: use --prompt, not --class-id / --class-name.")
        return args.prompt or pipeline.prompts
    if args.prompt:
        raise ValueError("this GPT is class-conditional: use --class-id or --class-name, not --prompt.")
    ids = list(args.class_id or [])
    for name in args.class_name or []:
        if not pipeline.class_names or name not in pipeline.class_names:
            valid = ", ".join(pipeline.class_names or []) or "none stored: use --class-id"
            raise ValueError(f"unknown class name {name!r}; the classes are: {valid}.")
        ids.append(pipeline.class_names.index(name))
    for class_id in ids:
        if not 0 <= class_id < cfg.num_classes:
            raise ValueError(f"class id {class_id} is out of range: this model knows ids 0 to {cfg.num_classes - 1}.")
    if ids:
        return ids
    if pipeline.class_names:  # our checkpoints: every class, up to 16
        return list(range(min(16, cfg.num_classes)))
    return OFFICIAL_C2I_CLASSES if cfg.num_classes == 1000 else list(range(min(8, cfg.num_classes)))


# -----------------------------------------------------------------------------
# Sampling


def flag(name):  # a keyword's command-line flag: top_k -> --top-k
    return "--" + name.replace("_", "-")


def all_sampling_options():
    """Every sampling option that some generator reads over some kind of token, each once, in the
    library's reading order."""
    options = {}
    for generator in L.GENERATORS.values():
        for token_kind in generator.token_kinds:
            for name, option in generator.options_for(token_kind).items():
                options.setdefault(name, option)
    return list(options.values())


def order_defaults(option):
    """[(where, default)] of the generators whose default for `option` is their own (VAR's top-k:
    a share of the codebook, said as one)."""
    found = []
    for order, generator in L.GENERATORS.items():
        cfgs = [L.GPTConfig(order=order, token_kind=generator.token_kinds[0], vocab_size=n) for n in (4096, 8192)]
        value, other = (generator.sampling_defaults(cfg).get(option.name) for cfg in cfgs)
        if value not in (None, option.default):
            found.append((f"{order} order", value if value == other else f"{round(value * 100 / 4096)}%% of the codes"))
    return found


def library_note(option):  # a sampling flag's default in --help: the library's, and a generator's own
    return "(default: " + ", ".join([str(option.default)] + [f"{value} in {where}" for where, value in
                                                              order_defaults(option)]) + ")"


def add_sampling_flags(group, defaults=None, note=library_note, speculative=""):
    """A flag for every sampling option the library declares (all_sampling_options), with
    its range and help, and --speculative. A flag is None when not given, unless `defaults` gives
    this script's default for it: generate() then takes the default of where the models come
    from, or the library's (`note` says which in --help). `speculative` begins --speculative's help."""
    defaults = defaults or {}
    for option in all_sampling_options():
        kind = type(option.default)
        parse = kind if option.choices else bounded(kind, option.minimum, option.maximum, option.above)
        group.add_argument(flag(option.name), type=parse, choices=option.choices, default=defaults.get(option.name),
                           help=option.help + ("" if option.name in defaults else f" {note(option)}"))
    window = library_default(L.generate_speculative, "window")
    group.add_argument("--speculative", nargs="?", type=bounded(int, 1), metavar="W", const=window,
                       help=f"{speculative}speculative Jacobi decoding: W draft tokens checked per pass (W: {window} if not "
                            "given); the same distribution of images in fewer passes (raster order over codes)")


def given_options(args, options, what):
    """The sampling flags the command line gives, {name: value}; one that is not among `options`
    (the model's: --top-k is not one for continuous tokens, a masked order's steps not one for raster
    order) is a mistake to report, not to ignore."""
    given = {option.name: getattr(args, option.name) for option in all_sampling_options()
             if getattr(args, option.name, None) is not None}
    foreign = [name for name in given if name not in options]
    if foreign:
        raise ValueError(f"{flag(foreign[0])} does not apply to {what}, which samples with "
                         f"{', '.join(map(flag, options))}: leave it out.")
    return given


def sampling_options(args, cfg, defaults=None):
    """generate()'s keywords for a GPT of config cfg (asked of its class: no model is built): the
    defaults of where the models come from, then what the command line gives, each checked before
    any sampling (a bound such as "at most the image's tokens" is the model's)."""
    options = L.GENERATORS[cfg.order].options_for(cfg.token_kind)
    given = given_options(args, options, f"this GPT ({cfg.order} order)")
    for name, value in given.items():
        problem = options[name].problem(value, cfg)
        if problem:
            raise ValueError(f"{flag(name)} {value} is out of range: {problem}.")
    return {**{name: value for name, value in (defaults or {}).items() if name in options}, **given}


def condition_tensors(gpt, text_encoder, conditions, device):
    """Class ids, or captions through the text encoder -> what gpt.generate reads: cond, cond_mask."""
    if text_encoder is None:
        return torch.tensor(conditions, device=device), None
    cond, cond_mask = text_encoder(conditions, gpt.config.cls_token_num, device)
    return (cond.to(gpt.tok_embeddings.weight.dtype) if cond.is_floating_point() else cond), cond_mask  # fusion: ids


def pick_sampler(gpt, args, passes):
    """The generation loop the command line asks for, called as generate(cond, cond_mask,
    generator=, steps=, **options) -> tokens: the GPT's own generate(), or for raster order without
    the KV cache (--no-kv-cache) or speculative (--speculative W), which appends the forward passes
    each image needed to `passes`. Those two report no steps: raster order decides token t at step t."""
    if getattr(args, "speculative", None):
        return SpeculativeOrPlain(gpt, args.speculative, passes)
    if getattr(args, "no_kv_cache", False):
        return lambda cond, cond_mask=None, steps=None, **options: L.generate_without_cache(gpt, cond, cond_mask, **options)
    return gpt.generate


class SpeculativeOrPlain:
    """--speculative W: for each batch, speculative decoding or plain decoding, whichever should be
    faster; the images follow the same distribution either way. What a pass over W + 1 positions
    costs in decode steps is measured once, on the first batch's rows, and said in one line; a batch
    is expected to need as many passes as the speculative batches before it did on average (the
    first: a third of its tokens, about what the demo model needs). The passes each image needed
    are appended to `passes` (plain decoding: one per token)."""

    def __init__(self, gpt, window, passes):
        self.gpt, self.window, self.passes, self.cost, self.needed = gpt, window, passes, None, []

    def __call__(self, cond, cond_mask=None, generator=None, steps=None, edit=None, **options):
        T = self.gpt.config.block_size
        if self.cost is None:
            rows = len(cond) * (1 if self.gpt.sampling_settings(options).cfg_scale == 1.0 else 2)
            self.cost = pass_cost(self.gpt, rows, self.window, cond.device)
            print(f"speculative decoding (window {self.window}): a pass costs {self.cost:.1f} decode steps here "
                  f"({rows} rows), so a batch decodes speculatively while it is expected to need fewer than "
                  f"{T / self.cost:.0f} passes for its {T} tokens, else plainly (the same distribution)")
        expected = sum(self.needed) / len(self.needed) if self.needed else T / 3
        if expected * self.cost >= T:
            self.passes.extend([T] * len(cond))
            return self.gpt.generate(cond, cond_mask, generator=generator, edit=edit, **options)
        tokens, needed = L.generate_speculative(self.gpt, cond, cond_mask, generator, self.window, edit=edit, **options)
        self.passes.extend(needed.tolist())
        self.needed.append(int(needed.max()))  # the batch makes as many passes as its slowest row
        return tokens


@torch.no_grad()
def pass_cost(gpt, rows, window, device):
    """What a forward pass over window + 1 new positions costs, in passes over one (a decode step):
    `rows` rows, the KV cache half full; the best of three steps, then one wide pass (at batch 128 a
    wide pass costs several steps, and the measurement must not eat what it saves)."""
    cfg = gpt.config
    length = cfg.cls_token_num + cfg.block_size + window
    gpt.setup_caches(rows, length, gpt.tok_embeddings.weight.dtype, device)
    mask = L.attention_mask(gpt.attention_blocks(length, device))
    start = cfg.cls_token_num + cfg.block_size // 2

    def seconds(width, per_row, runs):  # positions per row, as speculative decoding feeds more than one image
        positions = torch.arange(start, start + width, device=device)
        positions = positions.expand(rows, -1) if per_row else positions
        h = gpt.tok_embeddings(torch.zeros(rows, width, dtype=torch.long, device=device))
        return min(time_it(lambda: gpt.forward_with_cache(h, positions, mask, outputs=width), device)[0]
                   for _ in range(runs))
    with L.evaluating(gpt):
        step = seconds(1, False, 3)  # the first of them warms up
        window_pass = seconds(window + 1, rows > 2, 1)
    gpt.free_caches()
    return window_pass / step


def check_sampler(gpt, args):
    """--speculative, --no-kv-cache and --compile, before any sampling: each is a raster-order loop,
    and --speculative needs each token's probability (codes)."""
    for option in ("speculative", "no_kv_cache", "compile"):
        if getattr(args, option, None):
            try:
                L.check_raster_loop(gpt, flag(option), speculative=option == "speculative")
            except ValueError as error:
                raise ValueError(f"{error}: leave out {flag(option)}.") from None


def passes_report(passes, block_size, window):
    mean = sum(passes) / len(passes)
    return (f"speculative decoding (window {window}): {mean:.1f} forward passes per image on average, for "
            f"{block_size} tokens ({block_size / mean:.1f} tokens per pass; one token per pass without it)")


@torch.no_grad()
def generate_tokens(pipeline, rows, args, options, device, passes=None, edit=None):
    """Tokens (N, block_size, ..) for every row repeated num_samples times, in batches, and the step
    that decided each token (N, block_size); edit: one image's (tokens (1, T, ..), known (1, T)),
    the same for every row (edit_request)."""
    requests = [row for row in rows for _ in range(args.num_samples)]
    generator = torch.Generator(device).manual_seed(args.seed)
    generate = pick_sampler(pipeline.gpt, args, passes)
    tokens, steps = [], []
    for start in tqdm(range(0, len(requests), args.batch_size), desc="sampling", leave=False,
                      disable=len(requests) <= args.batch_size):
        cond, cond_mask = condition_tensors(pipeline.gpt, pipeline.text_encoder,
                                            requests[start:start + args.batch_size], device)
        batch_edit = None if edit is None else tuple(x.expand(len(cond), *x.shape[1:]) for x in edit)
        tokens.append(generate(cond, cond_mask, generator=generator, steps=steps, edit=batch_edit, **options))
    tokens = torch.cat(tokens)
    if not steps:  # a raster loop that reports none
        steps = [torch.arange(tokens.shape[1], device=tokens.device).expand(len(tokens), -1)]
    return tokens, torch.cat(steps)


@torch.no_grad()
def decode(tokenizer, tokens, batch_size=32):  # (N, h*w, ..) tokens -> images (N, 3, H, W) in [-1, 1]
    return torch.cat([tokenizer.decode(tokens[i:i + batch_size]) for i in range(0, len(tokens), batch_size)])


@torch.no_grad()
def generation_frames(tokenizer, tokens, steps, steps_per_frame, batch_size=32):
    """What generation looks like: frame k shows the tokens of every sample decided by step
    (k + 1) * steps_per_frame - 1 (steps (N, T) from generate), as the tokenizer's decode_known
    draws a generation under way (the cells not decided yet blank; VAR: the scales so far). The
    last frame is the finished image."""
    num_steps = int(steps.max()) + 1
    frames = []
    for last in list(range(steps_per_frame - 1, num_steps - 1, steps_per_frame)) + [num_steps - 1]:
        known = steps <= last                                              # (N, T)
        frames.append(torch.cat([tokenizer.decode_known(tokens[i:i + batch_size], known[i:i + batch_size])
                                 for i in range(0, len(tokens), batch_size)]))  # (N, 3, H, W)
    return frames


def save_gif(frames, path, columns):
    # each frame gets its own 256-color palette, undithered, so the last one stays close to the grid
    pictures = [grid_image(frame, columns).quantize(256, dither=Image.Dither.NONE) for frame in frames]
    durations = [120] * (len(pictures) - 1) + [1500]  # hold the finished images
    pictures[0].save(path, save_all=True, append_images=pictures[1:], duration=durations, loop=0)


def save_outputs(images, args, columns, beside=None):
    """The grid, and with --save-dir a PNG per image and samples.npz. beside (k, 3, H, W): pictures
    at the start of every row of num_samples images (an edit's image and what of it is kept)."""
    if beside is not None:
        grid_image(torch.cat([torch.cat([beside, row]) for row in images.split(args.num_samples)]),
                   args.num_samples + len(beside)).save(args.output)
    else:
        grid_image(images, columns).save(args.output)
    print(f"wrote {args.output} ({len(images)} images)")
    if args.num_samples > 1:  # images come in runs of num_samples per condition
        rows = images.split(args.num_samples)
        print(f"diversity: samples of one condition differ by {sum(map(diversity, rows)) / len(rows):.3f} "
              "(RMS pixel distance, 0 = identical)")
    if args.save_dir:
        pixels = to_uint8(images.cpu()).permute(0, 2, 3, 1).numpy()  # (N, H, W, 3) uint8
        for i, picture in enumerate(pixels):
            Image.fromarray(picture).save(os.path.join(args.save_dir, f"{i:05d}.png"))
        np.savez(os.path.join(args.save_dir, "samples.npz"), arr_0=pixels)  # what FID tools read
        print(f"wrote {len(pixels)} PNGs and samples.npz {pixels.shape} to {args.save_dir}")


# -----------------------------------------------------------------------------
# Editing: an image's tokens where a mask keeps it, the rest generated under the condition

REGIONS = {  # the boxes a region can be named by: (left, top, right, bottom), fractions of the image's sides
    "left": (0, 0, 0.5, 1), "right": (0.5, 0, 1, 1), "top": (0, 0, 1, 0.5), "bottom": (0, 0.5, 1, 1),
    "center": (0.25, 0.25, 0.75, 0.75), "top-left": (0, 0, 0.5, 0.5), "top-right": (0.5, 0, 1, 0.5),
    "bottom-left": (0, 0.5, 0.5, 1), "bottom-right": (0.5, 0.5, 1, 1)}
REGION_HELP = ("a region: left, right, top or bottom (halves), center (the middle half of each side), top-left, "
               "top-right, bottom-left or bottom-right (quarters), a box x0,y0,x1,y1 in pixels, or a black-and-white "
               "PNG of the image's size (white: the region)")


def read_image(path, option):  # -> an RGB Pillow image, or one sentence
    try:
        with Image.open(path) as image:
            image.load()
            return to_rgb(image)
    except FileNotFoundError:
        raise FileNotFoundError(f"{option} {path} does not exist.") from None
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
        raise ValueError(f"{option} {path} is not an image Pillow can read (corrupt, truncated, or another kind "
                         "of file): pass a PNG or JPEG.") from None


def region_mask(text, size, option):
    """A region as --keep, --fill or train.py evaluate --edit name it (REGION_HELP), on an image of
    size (width, height) -> (height, width) bool, True inside it."""
    width, height = size
    if text in REGIONS:
        x0, y0, x1, y1 = (round(f * side) for f, side in zip(REGIONS[text], (width, height, width, height)))
    elif re.fullmatch(r"\d+,\d+,\d+,\d+", text):
        x0, y0, x1, y1 = map(int, text.split(","))
        if not (x0 < x1 <= width and y0 < y1 <= height):
            raise ValueError(f"{option} {text} is not a box inside the {width}x{height} image: give x0,y0,x1,y1 in "
                             f"pixels with x0 < x1 <= {width} and y0 < y1 <= {height}.")
    elif os.path.exists(text) or os.path.splitext(text)[1]:
        mask = read_image(text, option)
        if mask.size != size:
            raise ValueError(f"{option} {text} is {mask.size[0]}x{mask.size[1]} but the image is {width}x{height}: "
                             "draw the mask at the image's size.")
        return np.asarray(mask.convert("L")) >= 128
    else:
        raise ValueError(f"{option} {text} is neither a region ({', '.join(REGIONS)}), a box x0,y0,x1,y1 nor an image "
                         "file.")
    inside = np.zeros((height, width), dtype=bool)
    inside[y0:y1, x0:x1] = True
    return inside


def photo_tensor(photo, size):  # a Pillow image -> center-cropped and resized to size, (3, S, S) in [-1, 1]
    return torch.from_numpy(np.asarray(center_crop_resize(photo, size)).copy()).permute(2, 0, 1).float() / 127.5 - 1


@torch.no_grad()
def edit_request(args, pipeline, device):
    """--edit IMAGE with --keep or --fill: the image at the model's size (center-cropped and
    resized, as its mask), its tokens and the tokens kept -> (image (1, 3, S, S) in [-1, 1], the
    pixels kept (1, S, S), edit = (tokens (1, T, ..), known (1, T))); edit is None when no cell is
    kept (plain sampling, said). A cell is kept when all of its pixels are."""
    option = "--keep" if args.keep else "--fill"
    photo = read_image(args.edit, "--edit")
    region = region_mask(args.keep or args.fill, photo.size, option)
    kept = region if args.keep else ~region
    size, tokenizer = pipeline.image_size, pipeline.tokenizer
    kept = np.asarray(center_crop_resize(Image.fromarray(kept.astype(np.uint8) * 255), size, Image.NEAREST)) >= 128
    image = photo_tensor(photo, size)[None].to(device)                                            # (1, 3, S, S)
    kept = torch.from_numpy(kept.copy())[None].to(device)                                        # (1, S, S)
    cells = tokenizer.known_cells(kept)
    grid = f"{cells.shape[1]}x{cells.shape[2]} grid of {tokenizer.cfg.downsample_factor} px cells"
    if bool(cells.all()):
        raise ValueError(f"{option} {args.keep or args.fill} keeps every cell of the {grid}: nothing is left to "
                         "generate; keep less (a cell is generated when any of its pixels is not kept).")
    resized = "" if photo.size == (size, size) else f", center-cropped and resized to {size} px"
    if not bool(cells.any()):
        print(f"editing {args.edit}{resized}: {option} {args.keep or args.fill} keeps no whole cell of the {grid}, "
              "so nothing of the image is kept: this is plain sampling")
        return image, kept, None
    print(f"editing {args.edit}{resized}: {int(cells.sum())} of {cells[0].numel()} cells of the {grid} kept, "
          f"the others generated")
    return image, kept, (tokenizer.encode(image), tokenizer.known_tokens(kept))


@torch.no_grad()
def caption_images(args, pipeline, photos, device):
    """--caption: the images (read before any work, so that one unreadable file stops the run
    first) center-cropped and resized to the model's size, encoded, and captioned in batches;
    prints path: caption per image."""
    size, text_tokenizer = pipeline.image_size, pipeline.text_encoder.text_tokenizer
    images = torch.stack([photo_tensor(photo, size) for photo in photos])      # (N, 3, S, S)
    generator = torch.Generator(device).manual_seed(args.seed)
    drawing = {name: getattr(args, name) for name in ("temperature", "top_k", "top_p") if getattr(args, name) is not None}
    for start in range(0, len(images), args.batch_size):
        codes = pipeline.tokenizer.encode(images[start:start + args.batch_size].to(device))
        for path, ids in zip(args.caption[start:], pipeline.gpt.caption(codes, generator, **drawing).cpu()):
            print(f"{path}: {text_tokenizer.decode(ids)}")


def kept_view(image, tokenizer, kept):  # what an edit keeps: the image (1, 3, S, S), its cells not kept gray
    f = tokenizer.cfg.downsample_factor
    cells = tokenizer.known_cells(kept)[:, None].repeat_interleave(f, 2).repeat_interleave(f, 3)  # (1, 1, S, S)
    return image.masked_fill(~cells, 0.0)


# -----------------------------------------------------------------------------
# Benchmark: generation speed against the bare matrix products it cannot avoid


def time_it(function, device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    result = function()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start, result


@torch.no_grad()
def matmul_floor(gpt, rows, steps, device, dtype):
    """Seconds for the matrix products of `steps` decode steps alone: every linear layer of the
    model applied to `rows` vectors, in the same dtype. Decoding streams all the weights once per
    token, so no implementation of this model can be faster."""
    weights = [m.weight for m in gpt.modules() if isinstance(m, torch.nn.Linear)]
    inputs = {w.shape[1]: torch.randn(rows, 1, w.shape[1], device=device, dtype=dtype) for w in weights}

    def one_step():
        for weight in weights:
            F.linear(inputs[weight.shape[1]], weight)
    one_step()  # warm-up
    if device.type == "cuda":  # time the GPU's work, not Python launching it: replay one captured step
        side = torch.cuda.Stream(device)  # a warm-up on a side stream, as CUDA graph capture asks
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            one_step()
        torch.cuda.current_stream(device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            one_step()
        one_step = graph.replay
    return time_it(lambda: [one_step() for _ in range(steps)], device)[0]


@torch.no_grad()
def time_parts(gpt, rows, batch, settings, device, dtype):
    """Seconds that attention, the RMSNorms and the sampler take on their own over one generation,
    each with the shapes and the amount of data it sees while decoding."""
    cfg = gpt.config
    head_dim = cfg.dim // cfg.n_head
    max_seq_len = cfg.cls_token_num + cfg.block_size - 1
    q = torch.randn(rows, cfg.n_head, 1, head_dim, device=device, dtype=dtype)
    caches = [torch.randn(2, rows, cfg.n_head, max_seq_len, head_dim, device=device, dtype=dtype)
              for _ in range(cfg.n_layer)]  # one (k, v) cache per layer
    mask = L.attention_mask(torch.arange(max_seq_len, device=device))
    x = torch.randn(rows, 1, cfg.dim, device=device, dtype=dtype)
    norms = [m for m in gpt.modules() if isinstance(m, L.RMSNorm)]
    logits = torch.randn(batch, cfg.vocab_size, device=device)
    generator = torch.Generator(device).manual_seed(0)

    def attention():  # step t attends to the positions written so far, as generate's eager steps
        for t in range(cfg.block_size):
            seen = cfg.cls_token_num + t + 1
            for k, v in caches:
                F.scaled_dot_product_attention(q, k[:, :, :seen], v[:, :, :seen], attn_mask=mask[..., t:t + 1, :seen])

    def normalisation():
        for _ in range(cfg.block_size):
            for norm in norms:
                norm(x)

    def sampling():
        for _ in range(cfg.block_size):
            L.sample_code(logits, settings.temperature, settings.top_k, settings.top_p, generator)
    return {name: time_it(part, device)[0] for name, part in
            [("attention", attention), ("RMSNorm", normalisation), ("sampling", sampling)]}


def benchmark_config(args):
    """The model --benchmark times: a GPT of --preset, class-conditional, over VQ-16's codes of
    --image-size (256) px images, as the released models."""
    image_size = args.image_size or 256
    if image_size % 16:
        raise ValueError(f"--image-size {image_size} is not a multiple of 16 (VQ-16's downsampling).")
    return L.GPTConfig(**L.GPT_PRESETS[args.preset], vocab_size=16384, block_size=(image_size // 16) ** 2,
                       num_classes=1000)


def benchmark_gpt(args, cfg):  # random weights, reproducible from --seed
    torch.manual_seed(args.seed)
    gpt = L.GPT(cfg)
    torch.nn.init.normal_(gpt.output.weight, std=0.02)  # like the other layers: zeros would give uniform logits
    return gpt


def benchmark(args, gpt, options, device, dtype):
    cfg, settings = gpt.config, gpt.sampling_settings(options)
    gpt = gpt.cast(device, dtype).eval()
    if args.compile:
        gpt.compile_decode_one_token()
    labels = torch.arange(args.batch_size, device=device) % cfg.num_classes
    rows = args.batch_size * (2 if settings.cfg_scale != 1 else 1)
    print(f"{args.preset} ({sum(p.numel() for p in gpt.parameters()) / 1e6:.0f}M parameters), class-conditional, "
          f"{cfg.block_size} tokens ({args.image_size or 256} px with VQ-16), batch {args.batch_size}, CFG "
          f"{settings.cfg_scale} ({rows} rows), top-k {settings.top_k}, {args.dtype} on {device}"
          + (f" ({torch.get_num_threads()} threads)" if device.type == "cpu" else ""))

    def run(generate):
        generator = torch.Generator(device).manual_seed(args.seed)
        return time_it(lambda: generate(labels, generator=generator, **options), device)
    run(gpt.generate)  # warm-up (and compilation with --compile)
    cached, floor = math.inf, math.inf
    for _ in range(args.repeat):  # alternate the two so that both see the same machine; keep the best
        cached = min(cached, run(gpt.generate)[0])
        floor = min(floor, matmul_floor(gpt, rows, cfg.block_size, device, dtype))
    report = [("KV cache", cached)]
    if args.no_kv_cache:
        report.append(("no KV cache (full recompute)", run(pick_sampler(gpt, args, None))[0]))
    passes = {}
    for coupled, name in [(False, "independent drafts (SJD)"), (True, "coupled drafts (MC-SJD)")] * bool(args.speculative):
        def speculative(cond, generator, **options):  # always speculative, whichever --speculative would choose
            tokens, passes[name] = L.generate_speculative(gpt, cond, None, generator, args.speculative, coupled, **options)
            return tokens
        seconds = min(run(speculative)[0] for _ in range(args.repeat))
        report.append((f"speculative, {name}", seconds))
    report.append(("matrix products alone (floor)", floor))
    for name, seconds in report:
        print(f"  {name:38s} {seconds:7.2f} s  {args.batch_size * cfg.block_size / seconds:8.0f} tokens/s  "
              f"{args.batch_size / seconds:7.3f} images/s")
    print(f"  generation / floor: {cached / floor:.2f}x")
    for name, needed in passes.items():
        print(f"  {name}: {passes_report(needed.tolist(), cfg.block_size, args.speculative)}")
    if args.speculative:
        cost = pass_cost(gpt, rows, args.speculative, device)
        print(f"  a pass over {args.speculative + 1} positions costs {cost:.1f} decode steps: --speculative decodes "
              f"batches of {args.batch_size} " + ("speculatively" if passes["coupled drafts (MC-SJD)"].max() * cost
                                                  < cfg.block_size else "plainly") + " here")
    if not args.compile:  # the parts are timed eagerly: a compiled step fuses them
        parts = time_parts(gpt, rows, args.batch_size, settings, device, dtype)
        rest = cached - floor - sum(parts.values())
        print("  where generation's time goes: " + ", ".join(
            f"{name} {seconds:.2f} s" for name, seconds in [("matrix products", floor), *parts.items(),
                                                            ("the rest (Python, RoPE, cache writes, ...)", rest)]))
    if args.no_kv_cache:
        print(f"  KV cache speed-up: {report[1][1] / cached:.1f}x")
    vq = L.VQModel(L.VQConfig(**L.VQ_PRESETS["VQ-16"])).to(device).eval()  # the released tokenizers' size
    codes = run(gpt.generate)[1]
    decoding = min(time_it(lambda: vq.decode(codes), device)[0] for _ in range(args.repeat))
    print(f"  and decoding the {args.batch_size} images with VQ-16 (float32): {decoding:.2f} s, "
          f"{decoding / args.batch_size:.2f} s per image")


# -----------------------------------------------------------------------------
# Command line, and the plumbing train.py shares


def pick_device(name=None):
    """--device when given (checked), else the best there is: cuda, then mps, then cpu."""
    if name is None:
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("mps" if torch.backends.mps.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device {name!r} is not a device: use cuda, cuda:1, mps or cpu.") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name} asks for a CUDA GPU, but torch sees none on this machine: "
                         "use --device cpu (or leave --device out).")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise ValueError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA GPU(s), "
                         f"numbered from 0.")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"--device {name} asks for Apple's GPU (MPS), which is not available here: use --device cpu.")
    if device.type not in ("cuda", "mps", "cpu"):
        raise ValueError(f"--device {name}: only cuda, mps and cpu are supported.")
    return device


def plain_warning(message, category, filename, lineno, line=None):
    """warnings.formatwarning for the scripts: one line for the user, without the source line."""
    return f"warning: {message}\n"


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """--help shows each option's default, unless there is none."""

    def _get_help_string(self, action):
        if action.default in (None, False, argparse.SUPPRESS) or action.help is None:
            return action.help
        return super()._get_help_string(action)


class ArgumentParser(argparse.ArgumentParser):
    """argparse with --help showing the defaults, and a mistake told in one line, not after the
    whole usage text."""

    def __init__(self, **kwargs):
        super().__init__(formatter_class=HelpFormatter, **kwargs)

    def error(self, message):
        self.exit(2, f"error: {message} (python {self.prog} --help lists the options)\n")


def bounded(kind, minimum, maximum=None, above=False):
    """An argparse type: a number of `kind` (int or float) at least `minimum` (above it with
    above=True) and at most `maximum`. A value out of range gets one sentence from argparse."""
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a {'whole ' if kind is int else ''}number") from None
        problem = L.out_of_range(value, minimum, maximum, above)
        if problem:
            raise argparse.ArgumentTypeError(f"{text} is out of range: {problem}")
        return value
    return parse


def library_default(function, name):  # a keyword's default, read off the library: its one home
    return inspect.signature(function).parameters[name].default


def check_output_dir(path, option):
    """Make the folder an option names (and its parents) and check that files can be written in
    it, so that a bad path stops a run before its work, not after."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(f"{option} {path} is a file, not a folder: pass a folder.")
    try:
        os.makedirs(path, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as error:
        raise ValueError(f"{option} {path} cannot be written ({error.strerror}): pass a folder you can "
                         "write to.") from None


def width_by_height(text):  # an argparse type: 16x32 -> (16, 32), width and height in pixels
    try:
        width, height = (int(side) for side in text.split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size WxH in pixels, such as 16x32") from None
    if min(width, height) < 1:
        raise argparse.ArgumentTypeError(f"{text}: a size has at least one pixel on each side")
    return width, height


def prompt_text(text):  # an argparse type: an empty prompt is a mistake, not a request
    if not text.strip():
        raise argparse.ArgumentTypeError("an empty prompt says nothing: write a caption, or sample the "
                                         "unconditional model with --cfg-scale 0")
    return text


def image_extensions():  # the file extensions Pillow can write
    return sorted(ext for ext, format in Image.registered_extensions().items() if format in Image.SAVE)


def check_output_file(path, option, extensions, example):
    """An output file's name and folder, checked (the folder made) before any sampling starts."""
    if os.path.isdir(path):
        raise ValueError(f"{option} {path} is a folder: pass a file name, such as {os.path.join(path, example)}.")
    if os.path.splitext(path)[1].lower() not in extensions:
        shown = " ".join(extensions) if len(extensions) < 6 else ".png, .jpg, .webp, ..."
        raise ValueError(f"{option} {path} needs a file extension Pillow can write ({shown}).")
    check_output_dir(os.path.dirname(path) or ".", f"the folder of {option}")
    if os.path.exists(path) and not os.access(path, os.W_OK):
        raise ValueError(f"{option} {path} exists and cannot be overwritten: pass another file name.")


def default_note(option):
    """A sampling flag's default in --help: the library's, or where the models come from sets it."""
    sources = [("ours", "the checkpoint's" if option.name in CHECKPOINT_SAMPLING else option.default)]
    sources += [(f"ours in {where}", value) for where, value in order_defaults(option)]
    sources += [(f"official {kind}", sampling[option.name]) for kind, sampling in
                [("c2i", OFFICIAL_C2I_SAMPLING), ("t2i", OFFICIAL_T2I_SAMPLING)] if option.name in sampling]
    if len(sources) == 1:
        return f"(default: {option.default})"
    return "(default: " + ", ".join(f"{value} for {where}" for where, value in sources) + ")"


def parse_args(argv=None):
    parser = ArgumentParser(description="Sample images from a trained LlamaGen (ours or official).")
    group = parser.add_argument_group("models")
    group.add_argument("--out-dir", default="out", help="where python train.py wrote tokenizer.pt and gpt.pt")
    group.add_argument("--official", choices=RELEASED_GPTS, metavar="NAME",
                       help="a released GPT by name (--list-official), downloaded once with its tokenizer into the "
                            f"torch hub cache (${BASE_URL_VARIABLE} overrides https://huggingface.co)")
    group.add_argument("--list-official", action="store_true", help="list the released models and what is cached")
    group.add_argument("--official-vq", help="an official tokenizer file, e.g. vq_ds16_c2i.pt")
    group.add_argument("--official-gpt", help="an official GPT file, e.g. c2i_L_256.pt or t2i_XL_stage1_256.pt")
    group.add_argument("--image-size", type=bounded(int, 1), help="with official files: 256, 384 or 512")
    group.add_argument("--t5", help="a Hugging Face flan-t5-xl directory, for official text-conditional GPTs")
    group = parser.add_argument_group("conditions")
    group.add_argument("--prompt", action="append", type=prompt_text, help="a caption (repeat for several)")
    group.add_argument("--class-id", type=int, action="append", help="a class id (repeat for several)")
    group.add_argument("--class-name", action="append", help="a class name stored in our checkpoint")
    group.add_argument("--size", type=width_by_height, metavar="WxH",
                       help="early fusion (a run of train.py --cond vocab): the size to draw, one it was trained on "
                            "(default: its square)")
    group.add_argument("--caption", nargs="+", metavar="IMAGE",
                       help="early fusion (a run of train.py --cond vocab): write a caption for each image instead of "
                            "drawing, one line per image, path: caption (greedy unless --temperature)")
    group = parser.add_argument_group("sampling (defaults: the checkpoint's, the official sampler's, the library's)")
    group.add_argument("--num-samples", type=bounded(int, 1), default=4, help="images per prompt or class")
    add_sampling_flags(group, note=default_note)
    group.add_argument("--seed", type=int, default=0, help="same seed, same images")
    group.add_argument("--device", help="cuda, mps or cpu (default: the best available)")
    group.add_argument("--dtype", choices=list(DTYPES), default="fp32", help="of the GPT and T5")
    group.add_argument("--compile", action="store_true", help="torch.compile the decode step (gpt-fast)")
    group.add_argument("--batch-size", type=bounded(int, 1), default=32, help="images generated at once")
    group.add_argument("--no-kv-cache", action="store_true", help="recompute every step (slow; for teaching)")
    group = parser.add_argument_group(
        "editing (inpainting, outpainting)",
        "The image's tokens are kept in every cell whose pixels the mask all keeps; the rest are generated under the "
        "condition. Masked and next-scale orders see all that is kept; raster order sees only what comes before a "
        "token in reading order, so a hole above or left of kept content is drawn blind to it (it suits outpainting "
        "to the right or down).")
    group.add_argument("--edit", metavar="IMAGE", help="the image to edit (center-cropped and resized to the model's size)")
    keep = group.add_mutually_exclusive_group()
    keep.add_argument("--keep", metavar="MASK", help=f"what stays: {REGION_HELP}")
    keep.add_argument("--fill", metavar="MASK", help="what is generated, the rest stays (--fill center: inpainting)")
    group = parser.add_argument_group("outputs")
    group.add_argument("--output", default="samples.png", help="the grid, an image file (.png, .jpg, ...)")
    group.add_argument("--save-dir", help="also write one PNG per image and samples.npz (N, H, W, 3) uint8")
    group.add_argument("--gif", help="an animation of the generation (.gif): the token grid filling in, or in "
                                     "scales order the image sharpening scale by scale")
    group.add_argument("--gif-steps-per-frame", type=bounded(int, 1),
                       help="sampler steps per GIF frame (default: a row of the grid when each step makes one "
                            "token, as in raster order; else 1)")
    group = parser.add_argument_group("benchmark")
    group.add_argument("--benchmark", action="store_true", help="time generation of a random-weight model")
    group.add_argument("--preset", choices=list(L.GPT_PRESETS), default="GPT-B", help="the model to time")
    group.add_argument("--repeat", type=bounded(int, 1), default=3, help="timed runs; the fastest is reported")
    return parser.parse_args(argv)


def drawing_grid(args, pipeline):
    """--size WxH -> the grid (rows, cols) of codes that early fusion draws at that size, or None."""
    if args.size is None:
        return None
    gpt, f = pipeline.gpt, pipeline.tokenizer.cfg.downsample_factor
    if not isinstance(gpt, L.FusedGPT):
        raise ValueError(f"--size is for early fusion (a run of python train.py --cond vocab), which writes an image's "
                         f"height and width as tokens; this GPT draws {pipeline.image_size} px squares: leave it out.")
    width, height = args.size
    known = ", ".join(f"{cols * f}x{rows * f}" for rows, cols in gpt.config.grid_shapes)
    if width % f or height % f or (height // f, width // f) not in map(tuple, gpt.config.grid_shapes):
        raise ValueError(f"--size {width}x{height} is not a size this model was trained on: pass one of {known}.")
    return height // f, width // f


def check_outputs(args):
    """Every output path, checked before any sampling starts."""
    check_output_file(args.output, "--output", image_extensions(), "samples.png")
    if args.save_dir:
        check_output_dir(args.save_dir, "--save-dir")
    if args.gif:
        check_output_file(args.gif, "--gif", [".gif"], "generation.gif")


def main(argv=None):
    args = parse_args(argv)
    warnings.formatwarning = plain_warning
    try:
        device = pick_device(args.device)
        if args.speculative and (args.no_kv_cache or args.compile):
            raise ValueError(f"--speculative has its own loop: leave out "
                             f"{'--no-kv-cache' if args.no_kv_cache else '--compile'}.")
        if args.edit and not (args.keep or args.fill):
            raise ValueError("--edit needs --keep MASK (what of the image stays) or --fill MASK (what is generated).")
        if (args.keep or args.fill) and not args.edit:
            raise ValueError(f"{'--keep' if args.keep else '--fill'} says what of an image stays: pass the image with "
                             "--edit IMAGE.")
        if args.benchmark and args.edit:
            raise ValueError("--benchmark times the sampling of a random-weight model: leave out --edit.")
        if args.caption:
            drawing = [name for name, given in (("--prompt", args.prompt), ("--class-id", args.class_id),
                                                ("--class-name", args.class_name), ("--edit", args.edit),
                                                ("--gif", args.gif), ("--save-dir", args.save_dir),
                                                ("--benchmark", args.benchmark), ("--speculative", args.speculative),
                                                ("--cfg-scale", args.cfg_scale), ("--size", args.size)) if given]
            if drawing:
                raise ValueError(f"--caption writes captions of images; {drawing[0]} is for drawing: leave it out.")
        if args.benchmark:
            cfg = benchmark_config(args)
            options = sampling_options(args, cfg, OFFICIAL_C2I_SAMPLING)  # before the model is built
            gpt = benchmark_gpt(args, cfg)
        elif args.list_official:
            return list_releases()
        else:
            check_outputs(args)
            if args.official and (args.official_vq or args.official_gpt or args.image_size):
                raise ValueError(f"--official {args.official} names the files and the image size: leave out "
                                 "--official-vq, --official-gpt and --image-size.")
            if bool(args.official_vq) != bool(args.official_gpt):
                raise ValueError("pass both --official-vq and --official-gpt.")
            if args.official_gpt and not args.image_size:
                raise ValueError("pass --image-size (256, 384 or 512) with official checkpoints.")
            official = args.official or args.official_gpt
            if args.caption and official:
                raise ValueError("the released LlamaGen models draw but cannot caption: --caption is for a run of "
                                 "python train.py --cond vocab (--out-dir).")
            pipeline = load_official(args) if official else load_ours(args.out_dir)
            if args.caption and not hasattr(pipeline.gpt, "caption"):
                raise ValueError(f"{args.out_dir}/gpt.pt draws but cannot caption: --caption is for a run of python "
                                 "train.py --cond vocab, one model of words and image codes.")
            if not args.caption and pipeline.gpt.config.fused_loss == "text":
                raise ValueError(f"{args.out_dir}/gpt.pt learnt words only (train.py --fused-loss text): it reads images "
                                 "and captions them but cannot draw; caption with --caption, or teach it to draw with "
                                 f"python train.py --cond vocab --anole {args.out_dir} --out-dir DIR.")
            photos = [read_image(path, "--caption") for path in args.caption or []]
            grid = drawing_grid(args, pipeline)
            if grid is not None and (args.edit or args.gif) and grid[0] != grid[1]:
                raise ValueError(f"--{'edit' if args.edit else 'gif'} works on square images: leave out --size "
                                 f"{args.size[0]}x{args.size[1]} (or draw the square).")
            rows = None if args.caption else conditions(args, pipeline)
            options = sampling_options(args, pipeline.gpt.config, pipeline.sampling)
            options.update({"grid": grid} if grid else {})
            check_sampler(pipeline.gpt, args)
            image, kept, edit = edit_request(args, pipeline, "cpu") if args.edit else (None, None, None)
    except (OSError, ValueError) as error:
        sys.exit(f"error: {error}")
    except KeyboardInterrupt:  # during a download, say: fetch_release removes its unfinished file
        print("interrupted: no image was written (finished downloads stay in the cache).", file=sys.stderr)
        sys.exit(130)
    except Terminated:
        print("stopped (SIGTERM): no image was written; the unfinished download was removed, finished ones stay "
              "in the cache.", file=sys.stderr)
        sys.exit(143)
    dtype = DTYPES[args.dtype]
    try:
        if args.benchmark:
            return benchmark(args, gpt, options, device, dtype)
        pipeline.tokenizer.to(device)
        pipeline.gpt.cast(device, dtype)
        if pipeline.text_encoder is not None and pipeline.text_encoder.t5 is not None:
            pipeline.text_encoder.t5.to(device, dtype)
        if args.caption:
            return caption_images(args, pipeline, photos, device)
        if args.compile:
            pipeline.gpt.compile_decode_one_token()
        passes = []
        edit = None if edit is None else tuple(x.to(device) for x in edit)
        seconds, (tokens, steps) = time_it(lambda: generate_tokens(pipeline, rows, args, options, device, passes, edit),
                                           device)
        print(f"generated {len(tokens)} images in {seconds:.1f} s ({1000 * seconds / len(tokens):.0f} ms per image, "
              f"batch {min(args.batch_size, len(tokens))})")
        if passes:
            print(passes_report(passes, pipeline.gpt.config.block_size, args.speculative))
        columns = args.num_samples if len(rows) > 1 else min(len(tokens), 8)
        images = decode(pipeline.tokenizer, tokens if grid is None else tokens.view(len(tokens), *grid))
        # an edit's rows begin with the image and what of it is kept
        beside = None if image is None else torch.cat([image, kept_view(image, pipeline.tokenizer, kept)]).to(device)
        save_outputs(images, args, columns, beside)
        if args.gif:
            one_per_step = int(steps.max()) + 1 == steps.shape[1]  # raster order: a row of the grid per frame
            if edit is not None:  # the kept tokens are there from the first frame
                steps = steps.masked_fill(edit[1].expand_as(steps), -1)
            row = images.shape[-1] // pipeline.tokenizer.cfg.downsample_factor
            frames = generation_frames(pipeline.tokenizer, tokens, steps,
                                       args.gif_steps_per_frame or (row if one_per_step else 1))
            save_gif(frames, args.gif, columns)
            print(f"wrote {args.gif} ({len(frames)} frames)")
    except KeyboardInterrupt:
        print("interrupted: only the files listed above were written.", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
