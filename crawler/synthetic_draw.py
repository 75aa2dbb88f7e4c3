"""How a synthetic face looks: identity, expression geometry, pose and camera, drawn with Pillow.

`crawler.synthetic` decides *what* to draw (class, intensity, which person); this module
only turns explicit parameters into pixels, so the geometry can be read and tuned alone.
All geometry is in the units of the 112x112 five-point alignment template, so the eyes,
nose and mouth land on the template at any output size, as a face aligner would put them.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

#: The 5-point template (left eye, right eye, nose tip, mouth corners) of 112x112 aligned crops.
TEMPLATE = np.array(
    [[38.29, 51.70], [73.53, 51.50], [56.03, 71.74], [41.55, 92.37], [70.73, 92.20]]
)
CX, CY = 56.0, 58.0  # centre of the head ellipse, and of the pose jitter
MOUTH = TEMPLATE[3:].mean(axis=0)
#: Drawing at twice the size and halving gives anti-aliased edges for the price of one resize.
SUPERSAMPLE = 2

Color = tuple[int, int, int]

SKIN_RAMP = np.array([[92, 58, 40], [150, 100, 70], [200, 150, 115], [240, 205, 180], [250, 222, 205]])
HAIR_COLORS: tuple[tuple[Color, float], ...] = (
    ((22, 18, 16), 0.3), ((55, 38, 26), 0.22), ((105, 72, 45), 0.16),
    ((196, 160, 100), 0.12), ((140, 62, 32), 0.07), ((140, 138, 135), 0.08), ((220, 218, 212), 0.05),
)
HAIR_STYLES = ("bald", "short", "fringe", "side", "long", "curly")
IRIS_COLORS: tuple[Color, ...] = ((70, 45, 25), (45, 30, 20), (80, 110, 150), (90, 110, 70), (120, 95, 55))


@dataclass(frozen=True)
class Identity:
    """What stays the same across every photo of one person."""

    face_w: float  # half widths and heights, template units
    face_top: float
    face_bottom: float
    jaw: float  # how much the lower face narrows towards the chin
    chin: float  # < 1 squarer, 1 elliptic
    skin: Color
    hair_style: str
    hair: Color
    hairline: float  # y of the hairline at the middle of the forehead
    flip: bool  # mirror asymmetric styles (side parting)
    brow_color: Color
    brow_thick: float
    brow_gap: float  # eye centre to brow, at rest
    brow_arch: float
    eye_w: float  # half width of the eye opening
    eye_dx: float  # spacing offset around the template
    iris: Color
    nose_w: float
    mouth_w: float  # half width at rest
    lip_thick: float
    lips: Color
    glasses: str  # "none", "round", "square"
    glasses_color: Color
    shirt: Color
    rest_brow: float  # the resting face: a slight frown or smile is a person, not an expression
    rest_lift: float
    rest_eye: float


@dataclass(frozen=True)
class Expression:
    """Facial action offsets from a neutral face; zero is neutral. Lengths in template units."""

    brow_raise: float = 0.0
    brow_inner: float = 0.0  # inner ends up (sadness, fear) or down (anger)
    brow_squeeze: float = 0.0  # inner ends towards the nose
    upper_open: float = 0.0  # relative change of the upper lid opening
    lower_open: float = 0.0  # negative: cheeks push the lower lid up
    lift_left: float = 0.0  # mouth corners up (smile) or down (frown)
    lift_right: float = 0.0
    mouth_open: float = 0.0
    mouth_width: float = 0.0
    mouth_shift: float = 0.0
    upper_lip_raise: float = 0.0
    lip_press: float = 0.0  # 0..1 thinner lips
    teeth: float = 0.0  # 0..1 how much of the opening shows teeth
    nose_wrinkle: float = 0.0
    cheek: float = 0.0  # nasolabial folds
    forehead: float = 0.0  # horizontal forehead lines
    glabella: float = 0.0  # vertical lines between the brows

    def scaled(self, k: float) -> Expression:
        return Expression(*(k * v for v in dataclasses.astuple(self)))

    def plus(self, other: Expression) -> Expression:
        return Expression(*(a + b for a, b in zip(dataclasses.astuple(self), dataclasses.astuple(other))))


@dataclass(frozen=True)
class Pose:
    rotation: float  # degrees
    scale: float
    dx: float
    dy: float


@dataclass(frozen=True)
class Camera:
    """One photo's background, light and degradations."""

    background: np.ndarray  # 4x4x3 colours, upsampled smoothly into a textured backdrop
    light_angle: float
    light: float  # strength of the lighting gradient
    vignette: float  # darkening away from the centre: gives the flat drawing some roundness
    tint: tuple[float, float, float]
    brightness: float
    contrast: float
    blur: float  # Gaussian radius in template units
    noise: float  # pixel noise sigma in grey levels
    jpeg_quality: int


def _mix(a, b, t: float) -> Color:
    return tuple(int(round(x + (y - x) * t)) for x, y in zip(a, b))


def _shade(c, k: float) -> Color:
    return tuple(int(min(255, max(0, round(v * k)))) for v in c)


def sample_identity(rng: np.random.Generator) -> Identity:
    t = rng.uniform(0, len(SKIN_RAMP) - 1)
    i = min(int(t), len(SKIN_RAMP) - 2)
    skin = SKIN_RAMP[i] + (SKIN_RAMP[i + 1] - SKIN_RAMP[i]) * (t - i) + rng.normal(0, 6, 3)
    skin = tuple(int(v) for v in np.clip(skin, 0, 255))
    colors, weights = zip(*HAIR_COLORS)
    hair = colors[rng.choice(len(colors), p=np.array(weights) / sum(weights))]
    hair = tuple(int(v) for v in np.clip(np.array(hair) + rng.normal(0, 8, 3), 0, 255))
    style = str(rng.choice(HAIR_STYLES, p=[0.08, 0.24, 0.16, 0.2, 0.2, 0.12]))
    hairline = {"fringe": rng.uniform(30, 35)}.get(style, rng.uniform(17, 26))
    brow = _shade(hair, 0.75) if sum(hair) < 450 else _mix(hair, (70, 60, 55), 0.4)
    if style == "bald":
        brow = _shade(skin, 0.45)
    eye_w = rng.uniform(5.8, 7.0)
    return Identity(
        face_w=rng.uniform(36.5, 41.5), face_top=rng.uniform(52, 58), face_bottom=rng.uniform(44, 50),
        jaw=rng.uniform(0.05, 0.4), chin=rng.uniform(0.7, 1.0), skin=skin, hair_style=style, hair=hair,
        hairline=hairline, flip=bool(rng.integers(2)), brow_color=brow, brow_thick=rng.uniform(1.6, 3.6),
        brow_gap=rng.uniform(9.0, 11.5), brow_arch=rng.uniform(0.6, 2.6), eye_w=eye_w,
        eye_dx=rng.uniform(-0.8, 0.8), iris=IRIS_COLORS[rng.integers(len(IRIS_COLORS))],
        nose_w=rng.uniform(7.0, 11.0), mouth_w=rng.uniform(13.0, 15.5), lip_thick=rng.uniform(2.0, 4.0),
        lips=_mix(_shade(skin, 0.85), (170, 70, 75), rng.uniform(0.15, 0.4)),
        glasses=str(rng.choice(["none", "round", "square"], p=[0.75, 0.12, 0.13])),
        glasses_color=_mix((20, 20, 20), (150, 110, 60), rng.uniform()),
        shirt=tuple(int(v) for v in rng.integers(20, 230, 3)),
        rest_brow=rng.normal(0, 1.0), rest_lift=rng.normal(0, 0.7), rest_eye=rng.normal(0, 0.08),
    )


def sample_pose(rng: np.random.Generator) -> Pose:
    """A few degrees and units: what is left after a 5-point aligner."""
    return Pose(rng.normal(0, 2.0), rng.uniform(0.95, 1.05), rng.normal(0, 1.0), rng.normal(0, 1.0))


def sample_camera(rng: np.random.Generator) -> Camera:
    base = rng.uniform(30, 225, 3) * rng.uniform(0.6, 1.0) + rng.uniform(0, 60)
    background = np.clip(base + rng.normal(0, rng.uniform(3, 35), (4, 4, 3)), 0, 255)
    return Camera(
        background=background, light_angle=rng.uniform(0, 2 * np.pi), light=rng.uniform(0, 0.35),
        vignette=rng.uniform(0.1, 0.35), tint=tuple(float(v) for v in rng.normal(1.0, 0.03, 3)),
        brightness=rng.normal(0, 12), contrast=rng.uniform(0.75, 1.15),
        blur=float(rng.uniform(0.2, 1.2)) if rng.uniform() < 0.7 else 0.0, noise=rng.uniform(0, 7),
        jpeg_quality=int(rng.integers(55, 96)),
    )


class _Pen:
    """Draws template-unit geometry onto the supersampled canvas through the pose transform."""

    def __init__(self, image: Image.Image, pose: Pose) -> None:
        self.draw = ImageDraw.Draw(image)
        self.k = image.width / 112
        self.unit = self.k * pose.scale
        a = np.deg2rad(pose.rotation)
        self.m = pose.scale * np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]])
        self.t = np.array([CX + pose.dx, CY + pose.dy])

    def _px(self, pts) -> list[tuple[float, float]]:
        p = ((np.asarray(pts, dtype=float) - (CX, CY)) @ self.m.T + self.t) * self.k
        return [tuple(q) for q in p.tolist()]

    def poly(self, pts, fill: Color) -> None:
        self.draw.polygon(self._px(pts), fill=fill)

    def line(self, pts, fill: Color, width: float) -> None:
        self.draw.line(self._px(pts), fill=fill, width=max(1, round(width * self.unit)), joint="curve")

    def ellipse(self, cx: float, cy: float, rx: float, ry: float, fill: Color, n: int = 28) -> None:
        self.poly(_ellipse(cx, cy, rx, ry, n), fill)


def _ellipse(cx: float, cy: float, rx: float, ry: float, n: int = 28, a0: float = 0.0, a1: float = 2 * np.pi):
    t = np.linspace(a0, a1, n, endpoint=a1 - a0 < 2 * np.pi)
    return np.stack([cx + rx * np.cos(t), cy + ry * np.sin(t)], axis=1)


def _curve(p0, p1, p2, n: int = 9) -> np.ndarray:
    """Quadratic Bezier through p0, p2 pulled towards p1."""
    t = np.linspace(0, 1, n)[:, None]
    p0, p1, p2 = (np.asarray(p, dtype=float) for p in (p0, p1, p2))
    return (1 - t) ** 2 * p0 + 2 * t * (1 - t) * p1 + t**2 * p2


def _face_outline(idn: Identity) -> np.ndarray:
    t = np.linspace(0, 2 * np.pi, 56, endpoint=False)
    c, s = np.cos(t), np.sin(t)
    low = s > 0
    # Lower half: a superellipse (square jaw when chin < 1) narrowing towards the chin.
    cl = np.sign(c) * np.abs(c) ** idn.chin
    x = np.where(low, cl * (1 - idn.jaw * np.clip(s, 0, 1) ** 2), c) * idn.face_w
    y = np.where(low, np.abs(s) ** idn.chin * idn.face_bottom, s * idn.face_top)
    return np.stack([CX + x, CY + y], axis=1)


def _hair_cap(idn: Identity) -> np.ndarray:
    """The hair over the skull: an arc above the head closed by the hairline."""
    rx, ry = idn.face_w + 2.5, idn.face_top + 3.0
    arc = _ellipse(CX, CY, rx, ry, 24, np.pi - 0.05, 2 * np.pi + 0.05)
    phi = np.linspace(0, np.pi, 21)
    temple = CY - 3.0
    flat = 4.0 if idn.hair_style == "fringe" else 1.6
    x = CX + idn.face_w * 0.93 * np.cos(phi)
    y = idn.hairline + (temple - idn.hairline) * np.abs(np.cos(phi)) ** flat
    if idn.hair_style == "side":
        y = y + 4.0 * np.cos(phi) * (1 if idn.flip else -1)
    if idn.hair_style == "fringe":
        y = y + np.where(np.arange(len(y)) % 2 == 0, 1.2, -1.0) * (np.abs(np.cos(phi)) < 0.8)
    return np.concatenate([arc, np.stack([x, y], axis=1)])


def _draw_head(pen: _Pen, idn: Identity, e: Expression) -> None:
    skin = idn.skin
    if idn.hair_style == "long":
        pen.poly(_ellipse(CX, CY + 12, idn.face_w + 7, idn.face_top + 18, 28, np.pi, 2 * np.pi)
                 .tolist() + [(CX + idn.face_w + 9, 125), (CX - idn.face_w - 9, 125)], idn.hair)
    pen.poly([(CX - 15, 85), (CX + 15, 85), (CX + 17, 130), (CX - 17, 130)], _shade(skin, 0.82))
    pen.poly([(CX - 16, 108), (CX - 55, 116), (CX - 75, 140), (CX + 75, 140), (CX + 55, 116), (CX + 16, 108)],
             idn.shirt)
    for side in (-1, 1):
        pen.ellipse(CX + side * (idn.face_w - 0.5), CY + 5, 4.5, 10, _shade(skin, 0.93), 16)
    pen.poly(_face_outline(idn), skin)
    if e.forehead > 0.05:
        fold = _shade(skin, 1 - 0.2 * min(1.0, e.forehead))
        y = TEMPLATE[0, 1] - idn.brow_gap - e.brow_raise
        for dy in (5.0, 9.0, 13.0):
            pen.line(_curve((CX - 13, y - dy + 1), (CX, y - dy - 1.5), (CX + 13, y - dy + 1)), fold, 0.7)
    if idn.hair_style == "curly":
        for a in np.linspace(np.pi - 0.1, 2 * np.pi + 0.1, 15):
            x, y = CX + (idn.face_w + 1) * np.cos(a), CY - 4 + (idn.face_top - 1) * np.sin(a)
            pen.ellipse(x, y, 7.5, 7.0, idn.hair, 14)
    elif idn.hair_style != "bald":
        cap = _hair_cap(idn)
        pen.poly(cap, idn.hair)
        strand = _shade(idn.hair, 1.25 if sum(idn.hair) < 300 else 0.85)
        for x in np.linspace(-0.6, 0.6, 5):
            top = (CX + x * idn.face_w * 0.6, CY - idn.face_top - 1)
            end = (CX + x * idn.face_w * 1.1, idn.hairline + 2 + 6 * abs(x))
            pen.line(_curve(top, (top[0] + 3, (top[1] + end[1]) / 2), end, 6), strand, 0.6)
    if idn.hair_style == "long":
        for side in (-1, 1):
            x0 = CX + side * (idn.face_w + 1.5)
            pen.poly([(x0, CY - 12), (x0 - side * 4.5, CY + 5), (x0 - side * 2.5, CY + 35), (x0 + side * 5, CY + 40),
                      (x0 + side * 4, CY - 15)], idn.hair)


def _draw_brows(pen: _Pen, idn: Identity, e: Expression) -> None:
    for side, (ex, ey) in ((-1, TEMPLATE[0]), (1, TEMPLATE[1])):
        ex += side * idn.eye_dx
        base = ey - idn.brow_gap - e.brow_raise - idn.rest_brow
        inner = (ex - side * (idn.eye_w * 0.9 + e.brow_squeeze), base - e.brow_inner + 0.5)
        outer = (ex + side * idn.eye_w * 1.25, base + 1.0)
        mid = (ex + side * idn.eye_w * 0.2, base - idn.brow_arch - 0.4 * e.brow_inner)
        center = _curve(inner, mid, outer, 8)
        d = np.gradient(center, axis=0)
        normal = np.stack([-d[:, 1], d[:, 0]], axis=1) / np.linalg.norm(d, axis=1, keepdims=True)
        half = (idn.brow_thick * np.linspace(0.6, 0.28, 8))[:, None]
        pen.poly(np.concatenate([center + normal * half, (center - normal * half)[::-1]]), idn.brow_color)
        if e.glabella > 0.05:
            gx = CX + side * 2.2
            fold = _shade(idn.skin, 1 - 0.22 * min(1.0, e.glabella))
            pen.line([(gx, inner[1] + 1.5), (gx - side * 0.4, inner[1] + 6)], fold, 0.6)


def _draw_eyes(pen: _Pen, idn: Identity, e: Expression, gaze: float) -> None:
    u = np.linspace(-1, 1, 11)
    white = _mix((238, 234, 226), idn.skin, 0.12)
    for side, (ex, ey) in ((-1, TEMPLATE[0]), (1, TEMPLATE[1])):
        ex += side * idn.eye_dx
        w = idn.eye_w
        up = w * 0.52 * max(0.08, 1 + e.upper_open + idn.rest_eye)
        lo = w * 0.34 * max(0.08, 1 + e.lower_open + idn.rest_eye)
        # The outer corner sits slightly higher than the inner one.
        tilt = -0.6 * side * u
        upper = np.stack([ex + w * u, ey + tilt - up * (1 - u**2) ** 0.8], axis=1)
        lower = np.stack([ex + w * u, ey + tilt + lo * (1 - u**2) ** 0.9], axis=1)
        pen.poly(np.concatenate([upper, lower[::-1]]), white)

        def clipped(cx: float, cy: float, r: float) -> np.ndarray:
            c = _ellipse(cx, cy, r, r, 18)
            x = np.clip(c[:, 0], ex - w, ex + w)
            ux = (x - ex) / w
            top = ey - 0.6 * side * ux - up * np.clip(1 - ux**2, 0, 1) ** 0.8
            bottom = ey - 0.6 * side * ux + lo * np.clip(1 - ux**2, 0, 1) ** 0.9
            return np.stack([x, np.clip(c[:, 1], top, bottom)], axis=1)

        ix, iy = ex + gaze, ey + 0.3
        pen.poly(clipped(ix, iy, w * 0.5), idn.iris)
        pen.poly(clipped(ix, iy, w * 0.22), (14, 10, 10))
        if up > w * 0.3:
            pen.ellipse(ix + w * 0.17, iy - w * 0.17, 0.7, 0.7, (250, 250, 250), 8)
        pen.line(upper, (38, 28, 26), 1.0)
        pen.line(lower, _shade(idn.skin, 0.78), 0.5)
        pen.line(upper + (0, -2.0 - 0.25 * up), _shade(idn.skin, 0.85), 0.5)


def _draw_nose(pen: _Pen, idn: Identity, e: Expression) -> None:
    nx, ny = TEMPLATE[2]
    w = idn.nose_w / 2
    lift = 1.4 * e.nose_wrinkle
    shadow = _shade(idn.skin, 0.8)
    pen.line(_curve((nx - w * 0.25, 56), (nx - w * 0.55, 64), (nx - w * 0.6, ny - 1)), _shade(idn.skin, 0.9), 0.7)
    for side in (-1, 1):
        pen.ellipse(nx + side * w * 0.45, ny + 1.6 - lift, 1.5, 0.9, _shade(idn.skin, 0.55), 10)
        pen.line(_curve((nx + side * w, ny - 1 - lift), (nx + side * (w + 1.5), ny + 1.5 - lift),
                        (nx + side * w * 0.5, ny + 2.5 - lift), 6), shadow, 0.7)
    pen.ellipse(nx, ny - 0.5 - lift * 0.5, 2.0, 1.3, _shade(idn.skin, 1.06), 10)
    if e.nose_wrinkle > 0.05:
        fold = _shade(idn.skin, 1 - 0.3 * min(1.0, e.nose_wrinkle))
        for y in (57.0, 60.0, 63.0):
            pen.line(_curve((nx - 3.5, y + 0.8), (nx, y - 0.8), (nx + 3.5, y + 0.8), 5), fold, 0.6)


def _draw_mouth(pen: _Pen, idn: Identity, e: Expression) -> None:
    u = np.linspace(-1, 1, 17)
    hw = max(6.0, idn.mouth_w + e.mouth_width / 2)
    mx, my = MOUTH[0] + e.mouth_shift, MOUTH[1]
    lift_l, lift_r = e.lift_left + idn.rest_lift, e.lift_right + idn.rest_lift
    x = mx + hw * u
    bulge = 1 - u**2
    mid = my - (lift_l * (1 - u) + lift_r * (1 + u)) / 2 + (lift_l + lift_r) / 2 * bulge
    gap = max(0.0, e.mouth_open)
    raise_ = max(0.0, e.upper_lip_raise) * bulge**0.7
    inner_up = mid - gap * 0.35 * np.sqrt(bulge) - raise_
    inner_lo = mid + gap * 0.65 * np.sqrt(bulge)
    press = 1 - 0.7 * min(1.0, max(0.0, e.lip_press))
    bow = 0.7 * np.exp(-((u / 0.13) ** 2))
    outer_up = inner_up - idn.lip_thick * 0.8 * press * (0.3 + 0.7 * bulge**0.5) + bow
    outer_lo = inner_lo + idn.lip_thick * press * bulge**0.6
    if e.cheek > 0.05:
        fold = _shade(idn.skin, 1 - 0.25 * min(1.0, e.cheek))
        for side, end in ((-1, 0), (1, -1)):
            wing = (TEMPLATE[2, 0] + side * (idn.nose_w / 2 + 1.5), TEMPLATE[2, 1] + 1)
            corner = (x[end] + side * 3, mid[end] + 3)
            pen.line(_curve(wing, (wing[0] + side * 5, (wing[1] + corner[1]) / 2), corner, 7), fold, 0.8)
    pen.line(np.stack([x[3:-3], outer_lo[3:-3] + 2.2], axis=1), _shade(idn.skin, 0.88), 1.2)
    pen.poly(np.concatenate([np.stack([x, outer_up], 1), np.stack([x, outer_lo], 1)[::-1]]), idn.lips)
    upper = np.stack([x, inner_up], 1)
    if gap + raise_.max() > 0.4:
        pen.poly(np.concatenate([upper, np.stack([x, inner_lo], 1)[::-1]]), (62, 22, 26))
        teeth = min(3.2, gap + raise_.max()) * min(1.0, max(0.0, e.teeth))
        if teeth > 0.3:
            pen.poly(np.concatenate([upper, (upper + (0, teeth))[::-1]]), (232, 226, 212))
    pen.line(upper, _shade(idn.lips, 0.6), 0.7)


def _draw_glasses(pen: _Pen, idn: Identity) -> None:
    q = 1.0 if idn.glasses == "round" else 0.35
    t = np.linspace(0, 2 * np.pi, 29)
    c, s = np.cos(t), np.sin(t)
    rx, ry = idn.eye_w + 4.0, idn.eye_w * 0.7 + 3.5
    for side, (ex, ey) in ((-1, TEMPLATE[0]), (1, TEMPLATE[1])):
        ex += side * idn.eye_dx
        frame = np.stack([ex + rx * np.sign(c) * np.abs(c) ** q, ey + 0.5 + ry * np.sign(s) * np.abs(s) ** q], 1)
        pen.line(frame, idn.glasses_color, 1.1)
        pen.line([(ex + side * rx, ey - 1), (CX + side * idn.face_w, ey)], idn.glasses_color, 1.0)
    pen.line(_curve((TEMPLATE[0, 0] + rx, TEMPLATE[0, 1] - 1), (CX, TEMPLATE[0, 1] - 3.5),
                    (TEMPLATE[1, 0] - rx, TEMPLATE[1, 1] - 1), 5), idn.glasses_color, 1.0)


def render(identity: Identity, expression: Expression, pose: Pose, camera: Camera, size: int,
           rng: np.random.Generator, gaze: float = 0.0) -> Image.Image:
    """Draw the face, then photograph it: light, colour, contrast, blur and sensor noise."""
    canvas_size = size * SUPERSAMPLE
    bg = Image.fromarray(camera.background.astype(np.uint8)).resize((canvas_size, canvas_size), Image.BICUBIC)
    pen = _Pen(bg, pose)
    _draw_head(pen, identity, expression)
    _draw_brows(pen, identity, expression)
    _draw_eyes(pen, identity, expression, gaze)
    _draw_nose(pen, identity, expression)
    _draw_mouth(pen, identity, expression)
    if identity.glasses != "none":
        _draw_glasses(pen, identity)
    image = bg.reduce(SUPERSAMPLE)
    if camera.blur > 0:
        image = image.filter(ImageFilter.GaussianBlur(camera.blur * size / 112))
    pixels = np.asarray(image, dtype=np.float32)
    ramp = (np.arange(size, dtype=np.float32) / size - 0.5) * 2
    light = 1 + camera.light * (np.cos(camera.light_angle) * ramp[None, :] + np.sin(camera.light_angle) * ramp[:, None])
    light -= camera.vignette * (ramp[None, :] ** 2 + ramp[:, None] ** 2) / 2
    pixels = pixels * light[:, :, None] * np.asarray(camera.tint, dtype=np.float32)
    pixels = (pixels - 128) * camera.contrast + 128 + camera.brightness
    pixels += rng.normal(0, camera.noise, pixels.shape).astype(np.float32)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
