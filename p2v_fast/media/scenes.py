"""Small procedural 3-D scenes with exact ground truth (numpy only, deterministic from a seed).

A scene is a floor (the plane y = 0, plain or patterned), a back wall (the plane z =
:data:`WALL_Z`) and one to three objects (sphere, cube, cylinder, cone) in a palette of six
named colours, lit by one directional light (Lambert shading plus ambient, no shadows, so a
material point keeps its colour as the camera and the objects move: brightness constancy
holds and the flow can be checked by warping). The camera orbits slowly around the scene's
centre and the objects slide on the floor (translation only), all linear in time.

Per frame the ray-caster gives uint8 RGB (2x2 supersampled), metric depth (camera z of the
surface seen through each pixel centre), an object-id mask (0 = floor/wall, k = object k),
and, for a clip, the forward optical flow to the next frame with an occlusion mask. Captions
come from a small grammar: ``"a red sphere and a blue cube on a checkered floor"`` (objects
named left to right as seen in the first frame).

Public API: :func:`random_scene`, :func:`render_frame`, :func:`render_clip`,
:func:`caption_of`, :func:`write_clip`, :data:`GRAMMAR_WORDS`.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

# --------------------------------------------------------------------------------------
# vocabulary

#: The palette: name -> linear-ish RGB in [0, 1] (hues 0, 55, 120, 185, 220, 280 degrees).
COLOURS: dict[str, tuple[float, float, float]] = {
    "red": (0.86, 0.12, 0.10),
    "yellow": (0.92, 0.84, 0.12),
    "green": (0.15, 0.70, 0.18),
    "cyan": (0.10, 0.72, 0.78),
    "blue": (0.12, 0.30, 0.88),
    "purple": (0.58, 0.18, 0.80),
}
SHAPES: tuple[str, ...] = ("sphere", "cube", "cylinder", "cone")
PATTERNS: tuple[str, ...] = ("plain", "striped", "checkered", "dotted")
#: Function words of the grammar.
FUNCTION_WORDS: tuple[str, ...] = ("a", "and", "on", "floor")
#: Every word a caption can contain.
GRAMMAR_WORDS: tuple[str, ...] = FUNCTION_WORDS + tuple(COLOURS) + SHAPES + PATTERNS

#: Neutral floor and wall tones (low saturation, so the objects' hues stand out).
FLOOR_TONES: tuple[tuple[float, float, float], ...] = (
    (0.78, 0.76, 0.72), (0.62, 0.62, 0.64), (0.70, 0.64, 0.55), (0.55, 0.52, 0.48),
)
WALL_TONES: tuple[tuple[float, float, float], ...] = (
    (0.88, 0.88, 0.86), (0.70, 0.78, 0.88), (0.80, 0.76, 0.70), (0.66, 0.68, 0.70),
)

WALL_Z = 3.5
LIGHT = np.array([-0.45, 0.80, -0.40]) / np.linalg.norm([-0.45, 0.80, -0.40])
AMBIENT = 0.35


@dataclass(frozen=True)
class SceneObject:
    shape: str  # one of SHAPES
    colour: str  # one of COLOURS
    size: float  # radius (sphere, cylinder, cone) or half edge (cube)
    height: float  # cylinder / cone height; 2 * size for a cube, 2 * size for a sphere
    x: float  # position on the floor at t = 0 (centre of the footprint)
    z: float
    vx: float  # velocity on the floor, world units per frame
    vz: float
    yaw: float = 0.0  # cube rotation about the vertical axis (radians), fixed in time
    pattern: str = "plain"

    @property
    def rgb(self) -> tuple[float, float, float]:
        return COLOURS[self.colour]

    def centre(self, t: float) -> np.ndarray:
        return np.array([self.x + self.vx * t, 0.0, self.z + self.vz * t])

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["rgb"] = [round(255 * c) for c in self.rgb]
        return d


@dataclass(frozen=True)
class Scene:
    objects: tuple[SceneObject, ...]
    floor: str  # floor pattern, one of PATTERNS
    floor_rgb: tuple[float, float, float]
    wall_rgb: tuple[float, float, float]
    # camera: orbit around target at `radius`, elevation `elev` (deg), azimuth az0 + daz * t (deg)
    radius: float = 6.0
    elev: float = 22.0
    az0: float = 0.0
    daz: float = 0.0
    target_y: float = 0.55
    fov: float = 40.0  # vertical field of view, degrees
    floor_scale: float = 0.5  # pattern period, world units
    floor_angle: float = 0.0  # pattern rotation on the floor (radians)
    seed: int = -1
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class Frame:
    image: np.ndarray  # uint8 [H, W, 3]
    depth: np.ndarray  # float32 [H, W], camera z
    ids: np.ndarray  # int16 [H, W], 0 = background, k = object k (1-based)


@dataclass
class SceneClip:
    frames: np.ndarray  # uint8 [T, H, W, 3]
    depth: np.ndarray  # float32 [T, H, W]
    ids: np.ndarray  # int16 [T, H, W]
    flow: np.ndarray  # float32 [T-1, H, W, 2], forward (dx, dy) in pixels
    occluded: np.ndarray  # bool [T-1, H, W]
    caption: str
    objects: list[dict[str, Any]]
    floor: str
    scene: Scene
    seed: int = -1


# --------------------------------------------------------------------------------------
# scenes


def caption_of(scene: Scene) -> str:
    """``"a red sphere and a blue cube on a checkered floor"``: objects left to right at t = 0."""
    cam = _camera(scene, 0.0)
    order = sorted(range(len(scene.objects)),
                   key=lambda i: float((scene.objects[i].centre(0.0) - cam.pos) @ cam.right))
    parts = [f"a {scene.objects[i].colour} {scene.objects[i].shape}" for i in order]
    return " and ".join(parts) + f" on a {scene.floor} floor"


def _footprint(shape: str, size: float) -> float:
    return size * (math.sqrt(2.0) if shape == "cube" else 1.0)


def random_scene(rng: np.random.Generator, n_frames: int = 16, max_objects: int = 3) -> Scene:
    """A random scene whose objects stay on the floor and apart for ``n_frames`` frames."""
    n = int(rng.integers(1, max_objects + 1))
    objects: list[SceneObject] = []
    used: set[tuple[str, str]] = set()
    span = max(n_frames - 1, 1)
    tries = 0
    while len(objects) < n and tries < 200:
        tries += 1
        shape = SHAPES[int(rng.integers(len(SHAPES)))]
        colour = list(COLOURS)[int(rng.integers(len(COLOURS)))]
        if (shape, colour) in used:
            continue
        size = float(rng.uniform(0.42, 0.62))
        if shape == "cube":
            size *= 0.85
            height = 2 * size
        elif shape == "sphere":
            height = 2 * size
        else:
            height = float(rng.uniform(1.3, 2.2)) * size
        x, z = float(rng.uniform(-1.6, 1.6)), float(rng.uniform(-1.2, 1.2))
        speed = float(rng.uniform(0.0, 0.8)) / span  # up to 0.8 units over the clip
        ang = float(rng.uniform(0, 2 * math.pi))
        vx, vz = speed * math.cos(ang), speed * math.sin(ang)
        yaw = float(rng.uniform(0, math.pi / 2)) if shape == "cube" else 0.0
        cand = SceneObject(shape, colour, size, height, x, z, vx, vz, yaw)
        ok = True
        for s in np.linspace(0, span, 5):
            c = cand.centre(float(s))
            if abs(c[0]) > 2.0 or c[2] < -1.6 or c[2] > 1.6:
                ok = False
            for o in objects:
                d = np.hypot(*(c - o.centre(float(s)))[[0, 2]])
                if d < _footprint(shape, size) + _footprint(o.shape, o.size) + 0.15:
                    ok = False
        if ok:
            objects.append(cand)
            used.add((shape, colour))
    floor = PATTERNS[int(rng.integers(len(PATTERNS)))]
    return Scene(
        objects=tuple(objects),
        floor=floor,
        floor_rgb=FLOOR_TONES[int(rng.integers(len(FLOOR_TONES)))],
        wall_rgb=WALL_TONES[int(rng.integers(len(WALL_TONES)))],
        radius=float(rng.uniform(5.6, 6.6)),
        elev=float(rng.uniform(16.0, 30.0)),
        az0=float(rng.uniform(-20.0, 20.0)),
        daz=float(rng.uniform(-12.0, 12.0)) / span,
        floor_scale=float(rng.uniform(0.4, 0.6)),
        floor_angle=float(rng.uniform(0, math.pi / 2)),
    )


# --------------------------------------------------------------------------------------
# camera


@dataclass
class _Camera:
    pos: np.ndarray
    right: np.ndarray
    up: np.ndarray
    fwd: np.ndarray
    tan_half: float


def _camera(scene: Scene, t: float) -> _Camera:
    az = math.radians(scene.az0 + scene.daz * t)
    el = math.radians(scene.elev)
    target = np.array([0.0, scene.target_y, 0.0])
    pos = target + scene.radius * np.array([math.sin(az) * math.cos(el), math.sin(el), -math.cos(az) * math.cos(el)])
    fwd = target - pos
    fwd /= np.linalg.norm(fwd)
    right = np.cross(np.array([0.0, 1.0, 0.0]), fwd)
    right /= np.linalg.norm(right)
    up = np.cross(fwd, right)
    return _Camera(pos, right, up, fwd, math.tan(math.radians(scene.fov) / 2))


def _rays(cam: _Camera, size: tuple[int, int], ss: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Unit-z ray directions (camera z = 1) for an ss x ss grid per pixel; also (u, v) in pixels."""
    w, h = size
    f = (h / 2) / cam.tan_half
    offs = (np.arange(ss) + 0.5) / ss
    u = (np.arange(w)[:, None] + offs[None, :]).reshape(-1)
    v = (np.arange(h)[:, None] + offs[None, :]).reshape(-1)
    uu, vv = np.meshgrid(u, v)
    x = (uu - w / 2) / f
    y = -(vv - h / 2) / f
    d = x[..., None] * cam.right + y[..., None] * cam.up + cam.fwd  # camera z component = 1
    return d.reshape(-1, 3), uu, vv


def project(scene: Scene, t: float, points: np.ndarray, size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """World points ``[..., 3]`` -> pixel coordinates ``[..., 2]`` (u, v; pixel centres at i + 0.5)
    and camera z ``[...]`` in the camera at time ``t``."""
    cam = _camera(scene, t)
    w, h = size
    f = (h / 2) / cam.tan_half
    rel = points - cam.pos
    z = rel @ cam.fwd
    u = (rel @ cam.right) / z * f + w / 2
    v = -(rel @ cam.up) / z * f + h / 2
    return np.stack([u, v], axis=-1), z


def unproject(scene: Scene, t: float, depth: np.ndarray) -> np.ndarray:
    """Pixel centres with camera-z ``depth [H, W]`` -> world points ``[H, W, 3]``."""
    h, w = depth.shape
    cam = _camera(scene, t)
    d, _, _ = _rays(cam, (w, h), 1)
    return cam.pos + d.reshape(h, w, 3) * depth[..., None]


# --------------------------------------------------------------------------------------
# ray casting (directions have camera z = 1, so the ray parameter is the camera depth)


def _hit_sphere(o: np.ndarray, d: np.ndarray, c: np.ndarray, r: float) -> tuple[np.ndarray, np.ndarray]:
    oc = o - c
    a = np.einsum("ij,ij->i", d, d)
    b = d @ oc
    disc = b * b - a * (oc @ oc - r * r)
    tt = np.where(disc >= 0, (-b - np.sqrt(np.maximum(disc, 0))) / a, np.inf)
    tt = np.where(tt > 1e-4, tt, np.inf)
    p = o + d * tt[:, None]
    n = (p - c) / r
    return tt, n


def _to_local(o: np.ndarray, d: np.ndarray, c: np.ndarray, yaw: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    cs, sn = math.cos(yaw), math.sin(yaw)
    rot = np.array([[cs, 0, -sn], [0, 1, 0], [sn, 0, cs]])  # world -> local (rotation about y)
    return rot @ (o - c), d @ rot.T, rot


def _hit_box(o, d, c, half, yaw):
    ol, dl, rot = _to_local(o, d, c, yaw)
    lo = np.array([-half, 0.0, -half])
    hi = np.array([half, 2 * half, half])
    with np.errstate(divide="ignore", invalid="ignore"):
        inv = 1.0 / dl
        t1 = (lo - ol) * inv
        t2 = (hi - ol) * inv
    tmin = np.minimum(t1, t2)
    tmax = np.maximum(t1, t2)
    tmin = np.where(np.isnan(tmin), -np.inf, tmin)
    tmax = np.where(np.isnan(tmax), np.inf, tmax)
    tn = tmin.max(axis=1)
    tf = tmax.min(axis=1)
    axis = tmin.argmax(axis=1)
    hit = (tn <= tf) & (tn > 1e-4)
    tt = np.where(hit, tn, np.inf)
    nl = np.zeros_like(dl)
    idx = np.arange(len(dl))
    nl[idx, axis] = -np.sign(dl[idx, axis])
    return tt, nl @ rot  # local -> world normal


def _hit_cylinder(o, d, c, r, h):
    ol = o - c
    a = d[:, 0] ** 2 + d[:, 2] ** 2
    b = d[:, 0] * ol[0] + d[:, 2] * ol[2]
    cc = ol[0] ** 2 + ol[2] ** 2 - r * r
    disc = b * b - a * cc
    with np.errstate(divide="ignore", invalid="ignore"):
        ts = (-b - np.sqrt(np.maximum(disc, 0))) / a
    y = ol[1] + ts * d[:, 1]
    side = (disc >= 0) & (ts > 1e-4) & (y >= 0) & (y <= h)
    ts = np.where(side, ts, np.inf)
    with np.errstate(divide="ignore", invalid="ignore"):
        tc = (h - ol[1]) / d[:, 1]
    px = ol[0] + tc * d[:, 0]
    pz = ol[2] + tc * d[:, 2]
    cap = (tc > 1e-4) & (px * px + pz * pz <= r * r) & np.isfinite(tc)
    tc = np.where(cap, tc, np.inf)
    tt = np.minimum(ts, tc)
    p = ol + d * np.where(np.isfinite(tt), tt, 0)[:, None]
    n = np.stack([p[:, 0], np.zeros_like(tt), p[:, 2]], axis=1) / r
    n[tc < ts] = (0.0, 1.0, 0.0)
    return tt, n


def _hit_cone(o, d, c, r, h):
    ol = o - c
    k2 = (r / h) ** 2
    # x^2 + z^2 = k2 (h - y)^2
    hy = h - ol[1]
    a = d[:, 0] ** 2 + d[:, 2] ** 2 - k2 * d[:, 1] ** 2
    b = d[:, 0] * ol[0] + d[:, 2] * ol[2] + k2 * hy * d[:, 1]
    cc = ol[0] ** 2 + ol[2] ** 2 - k2 * hy * hy
    disc = b * b - a * cc
    sq = np.sqrt(np.maximum(disc, 0))
    with np.errstate(divide="ignore", invalid="ignore"):
        r1 = (-b - sq) / a
        r2 = (-b + sq) / a
    best = np.full(len(d), np.inf)
    for tr in (r1, r2):
        y = ol[1] + tr * d[:, 1]
        ok = (disc >= 0) & (tr > 1e-4) & (y >= 0) & (y <= h) & np.isfinite(tr)
        best = np.where(ok & (tr < best), tr, best)
    p = ol + d * np.where(np.isfinite(best), best, 0)[:, None]
    n = np.stack([p[:, 0], k2 * (h - p[:, 1]), p[:, 2]], axis=1)
    n /= np.maximum(np.linalg.norm(n, axis=1, keepdims=True), 1e-9)
    return best, n


def _floor_pattern(scene: Scene, x: np.ndarray, z: np.ndarray) -> np.ndarray:
    """1.0 for the base tone, 0.0 for the second tone, at world floor points."""
    if scene.floor == "plain":
        return np.ones_like(x)
    s = scene.floor_scale
    ca, sa = math.cos(scene.floor_angle), math.sin(scene.floor_angle)
    a = (ca * x + sa * z) / s
    b = (-sa * x + ca * z) / s
    if scene.floor == "striped":
        return (np.floor(a * 2) % 2).astype(np.float64)
    if scene.floor == "checkered":
        return ((np.floor(a) + np.floor(b)) % 2).astype(np.float64)
    # dotted
    fa, fb = a - np.floor(a) - 0.5, b - np.floor(b) - 0.5
    return (fa * fa + fb * fb > 0.09).astype(np.float64)


def _cast(scene: Scene, t: float, size: tuple[int, int], ss: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Colour [H*ss, W*ss, 3] (float), depth and ids at the ss-grid sample points."""
    cam = _camera(scene, t)
    d, _, _ = _rays(cam, size, ss)
    o = cam.pos
    n_rays = len(d)
    depth = np.full(n_rays, np.inf)
    ids = np.zeros(n_rays, dtype=np.int16)
    normal = np.zeros((n_rays, 3))
    # wall z = WALL_Z (beyond everything), floor y = 0
    with np.errstate(divide="ignore", invalid="ignore"):
        tw = (WALL_Z - o[2]) / d[:, 2]
        tf = -o[1] / d[:, 1]
    tw = np.where(tw > 0, tw, np.inf)
    tf = np.where(tf > 0, tf, np.inf)
    kind = np.where(tf < tw, 1, 2)  # 1 floor, 2 wall
    depth = np.minimum(tf, tw)
    for k, ob in enumerate(scene.objects, start=1):
        c = ob.centre(t)
        if ob.shape == "sphere":
            tt, n = _hit_sphere(o, d, c + np.array([0.0, ob.size, 0.0]), ob.size)
        elif ob.shape == "cube":
            tt, n = _hit_box(o, d, c, ob.size, ob.yaw)
        elif ob.shape == "cylinder":
            tt, n = _hit_cylinder(o, d, c, ob.size, ob.height)
        else:
            tt, n = _hit_cone(o, d, c, ob.size, ob.height)
        closer = tt < depth
        depth = np.where(closer, tt, depth)
        ids[closer] = k
        normal[closer] = n[closer]
    p = o + d * depth[:, None]
    rgb = np.empty((n_rays, 3))
    bg = ids == 0
    floor = bg & (kind == 1)
    wall = bg & (kind == 2)
    fr = np.asarray(scene.floor_rgb)
    pat = _floor_pattern(scene, p[floor, 0], p[floor, 2])
    second = fr * 0.55 if scene.floor != "dotted" else np.clip(fr * 0.45 + 0.05, 0, 1)
    rgb[floor] = pat[:, None] * fr + (1 - pat[:, None]) * second
    rgb[floor] *= AMBIENT + (1 - AMBIENT) * LIGHT[1]
    wy = np.clip(p[wall, 1] / 4.0, 0, 1)
    rgb[wall] = np.asarray(scene.wall_rgb) * (0.92 + 0.08 * wy)[:, None]
    for k, ob in enumerate(scene.objects, start=1):
        m = ids == k
        if m.any():
            lam = np.clip(normal[m] @ LIGHT, 0, 1)
            rgb[m] = np.asarray(ob.rgb) * (AMBIENT + (1 - AMBIENT) * lam)[:, None]
    w, h = size
    return rgb.reshape(h * ss, w * ss, 3), depth.reshape(h * ss, w * ss), ids.reshape(h * ss, w * ss)


def render_frame(scene: Scene, t: float, size: tuple[int, int] = (64, 64), ss: int = 2) -> Frame:
    """Render the scene at time ``t`` (in frames). ``size`` is (W, H).

    The image is ``ss x ss`` supersampled; depth (camera z) and ids are at pixel centres.
    """
    w, h = size
    rgb, _, _ = _cast(scene, t, size, ss)
    img = rgb.reshape(h, ss, w, ss, 3).mean(axis=(1, 3))
    image = np.clip(np.round(img * 255.0), 0, 255).astype(np.uint8)
    _, depth, ids = _cast(scene, t, size, 1)
    return Frame(image=image, depth=depth.astype(np.float32), ids=ids.astype(np.int16))


def _flow(scene: Scene, t: float, cur: Frame, nxt: Frame) -> tuple[np.ndarray, np.ndarray]:
    """Forward flow t -> t+1 and the occlusion mask (True where the point is not visible at t+1)."""
    h, w = cur.depth.shape
    p = unproject(scene, t, cur.depth.astype(np.float64))
    moved = p.copy()
    for k, ob in enumerate(scene.objects, start=1):
        m = cur.ids == k
        moved[m] += ob.centre(t + 1) - ob.centre(t)
    uv, z = project(scene, t + 1, moved, (w, h))
    u0 = np.arange(w)[None, :] + 0.5
    v0 = np.arange(h)[:, None] + 0.5
    flow = np.stack([uv[..., 0] - u0, uv[..., 1] - v0], axis=-1)
    xi = np.floor(uv[..., 0]).astype(np.int64)
    yi = np.floor(uv[..., 1]).astype(np.int64)
    inside = (xi >= 0) & (xi < w) & (yi >= 0) & (yi < h)
    xc, yc = np.clip(xi, 0, w - 1), np.clip(yi, 0, h - 1)
    seen = nxt.depth[yc, xc]
    same = nxt.ids[yc, xc] == cur.ids
    occluded = ~inside | ~same | (z > seen * 1.03 + 0.02)
    return flow.astype(np.float32), occluded


def render_clip(seed: int, n_frames: int, size: tuple[int, int] = (64, 64)) -> SceneClip:
    """Render the random scene of ``seed`` for ``n_frames`` frames at ``size`` (W, H)."""
    rng = np.random.default_rng(seed)
    scene = replace(random_scene(rng, n_frames), seed=int(seed))
    return render_scene_clip(scene, n_frames, size)


def render_scene_clip(scene: Scene, n_frames: int, size: tuple[int, int] = (64, 64)) -> SceneClip:
    """Render a given scene as a clip (frames at t = 0 .. n_frames - 1)."""
    frames = [render_frame(scene, float(t), size) for t in range(n_frames)]
    flows, occ = [], []
    for t in range(n_frames - 1):
        f, o = _flow(scene, float(t), frames[t], frames[t + 1])
        flows.append(f)
        occ.append(o)
    w, h = size
    return SceneClip(
        frames=np.stack([f.image for f in frames]),
        depth=np.stack([f.depth for f in frames]),
        ids=np.stack([f.ids for f in frames]),
        flow=np.stack(flows) if flows else np.zeros((0, h, w, 2), np.float32),
        occluded=np.stack(occ) if occ else np.zeros((0, h, w), bool),
        caption=caption_of(scene),
        objects=[o.as_dict() for o in scene.objects],
        floor=scene.floor,
        scene=scene,
        seed=scene.seed,
    )


def with_colour(scene: Scene, index: int, colour: str) -> Scene:
    """The scene with object ``index`` (0-based) recoloured (ground truth for an edit)."""
    objs = list(scene.objects)
    objs[index] = replace(objs[index], colour=colour)
    return replace(scene, objects=tuple(objs))


# --------------------------------------------------------------------------------------
# writing


def ground_truth(clip: SceneClip) -> dict[str, Any]:
    """The clip's metadata as JSON-ready values."""
    return {
        "seed": clip.seed,
        "caption": clip.caption,
        "objects": clip.objects,
        "floor": clip.floor,
        "n_frames": int(clip.frames.shape[0]),
        "size": [int(clip.frames.shape[2]), int(clip.frames.shape[1])],
        "depth": "camera z, world units",
        "flow": "forward, (dx, dy) pixels, frame t -> t+1",
    }


def write_clip(clip: SceneClip, path: str | Path, fps: float = 12.0, with_audio: bool = False) -> Path:
    """Write the clip and its ground truth (``with_audio``: a video gets a sine tone track).

    ``path`` ending in a video suffix (``.mp4``...): the video, plus ``NAME.npz`` (depth, ids,
    flow, occluded) and ``NAME.json`` (caption, objects, floor) beside it. Any other ``path``:
    a folder of ``frame_0000.png``... plus ``ground_truth.npz`` and ``scene.json`` inside it.
    Returns ``path``.
    """
    out = Path(path)
    arrays: dict[str, Any] = dict(depth=clip.depth, ids=clip.ids, flow=clip.flow, occluded=clip.occluded)
    meta = json.dumps(ground_truth(clip), indent=2)
    if out.suffix.lower() in (".mp4", ".mkv", ".mov", ".webm"):
        out.parent.mkdir(parents=True, exist_ok=True)
        h, w = clip.frames.shape[1:3]
        if with_audio:
            from p2v_fast.media.samples import make_sample_clip

            make_sample_clip(out, size=(w, h), fps=fps, with_audio=True, frames=list(clip.frames))
        else:
            from p2v_fast.media.writer import VideoWriter

            with VideoWriter(out, fps, (w, h)) as writer:
                for f in clip.frames:
                    writer.write(f)
        np.savez_compressed(out.with_suffix(".npz"), **arrays)
        out.with_suffix(".json").write_text(meta, encoding="utf-8")
        return out
    from PIL import Image

    out.mkdir(parents=True, exist_ok=True)
    for i, f in enumerate(clip.frames):
        Image.fromarray(f).save(out / f"frame_{i:04d}.png")
    np.savez_compressed(out / "ground_truth.npz", **arrays)
    (out / "scene.json").write_text(meta, encoding="utf-8")
    return out
