"""Regenerate the example photos, scene, clip and examples.json from scikit-image's bundled photos.

    pip install -r requirements-examples.txt
    python examples/make_examples.py

The sources are public-domain or CC0 photos that ship inside scikit-image (see examples/README.md),
so the examples need no download and carry no licence obligations. Everything is deterministic: the
crops are fixed, the colour jitter comes from a seeded generator, and the video encoder runs on one
thread with fixed options, so a rerun rewrites (nearly) the same bytes.
"""

from __future__ import annotations

import json
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageOps
from skimage import data

HERE = Path(__file__).resolve().parent
SEED = 20240607
"""Seed of the colour jitter; change it and every reference photo changes a little."""
JPEG_QUALITY = 85
LONG_SIDE_PX = 400
"""Longest side of every example photo: small files, and still above the model's 448x448 budget
for the visual detail that matters."""
CLIP_SIZE = (320, 240)
CLIP_FPS = 10
CLIP_SECONDS = 3
CLIP_CRF = 23
"""x264 quality (lower is better and larger); 23 keeps a 3 s 320x240 clip well under 100 KB."""
FEATHER_PX = 6
"""Blur radius of the edge of a pasted subject, so it does not look cut out with scissors."""


# --- building blocks ----------------------------------------------------------------------------


def photo(name: str) -> Image.Image:
    """One of scikit-image's bundled photos as an RGB PIL image."""
    return Image.fromarray(getattr(data, name)()).convert("RGB")


def fit(im: Image.Image, long_side: int = LONG_SIDE_PX) -> Image.Image:
    """Downscale so the longer side is at most ``long_side`` pixels."""
    scale = long_side / max(im.size)
    if scale >= 1:
        return im
    return im.resize((round(im.width * scale), round(im.height * scale)), Image.Resampling.LANCZOS)


def jitter(im: Image.Image, rng: np.random.Generator, strength: float = 0.08) -> Image.Image:
    """A small per-channel gain and brightness change, like a different camera or light."""
    gains = 1.0 + rng.uniform(-strength, strength, size=3)
    arr = np.asarray(im, dtype=np.float32) * gains
    return Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8))


def save_jpeg(im: Image.Image, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    im.save(path, "JPEG", quality=JPEG_QUALITY, optimize=True)


def oval_mask(size: tuple[int, int], feather: int = FEATHER_PX) -> Image.Image:
    """A soft-edged ellipse filling ``size``: pastes the subject without its rectangular frame."""
    mask = Image.new("L", size, 0)
    ImageDraw.Draw(mask).ellipse((feather, feather, size[0] - 1 - feather, size[1] - 1 - feather), fill=255)
    return mask.filter(ImageFilter.GaussianBlur(feather / 2))


def wall(size: tuple[int, int]) -> Image.Image:
    """A warm, light brick wall (from the CC0 brick texture) as a neutral background."""
    # scikit-image stores the texture turned by 90 degrees; turn it back so the courses lie flat.
    brick = Image.fromarray(data.brick()).rotate(90).resize(size, Image.Resampling.LANCZOS)
    return ImageOps.colorize(brick, black=(120, 96, 80), white=(236, 226, 210))


def cat_face() -> Image.Image:
    """Chelsea's face, the part of the photo that identifies her."""
    return photo("chelsea").crop((70, 0, 370, 290))


def cup() -> Image.Image:
    """The espresso cup on its saucer."""
    return photo("coffee").crop((70, 10, 490, 390))


# --- the material -------------------------------------------------------------------------------


def make_concepts(rng: np.random.Generator) -> list[dict]:
    chelsea, coffee, rocket = photo("chelsea"), photo("coffee"), photo("rocket")
    concepts = {
        "Chelsea": (
            "A tabby cat with green eyes, photographed close up.",
            [
                chelsea.crop((40, 0, 420, 300)),
                ImageOps.mirror(chelsea.crop((90, 10, 380, 290))),
                chelsea.crop((0, 20, 340, 300)),
            ],
        ),
        "my mug": (
            "A red espresso cup on a matching saucer, on a wooden table.",
            [
                coffee.crop((40, 0, 520, 400)),
                ImageOps.mirror(coffee.crop((140, 0, 460, 330))),
                coffee.crop((90, 30, 530, 390)),
            ],
        ),
        "the rocket": (
            "A white launch rocket on its pad at dusk, between lightning towers.",
            [
                rocket.crop((200, 60, 450, 427)),
                ImageOps.mirror(rocket.crop((240, 100, 410, 410))),
            ],
        ),
    }
    out = []
    for name, (note, crops) in concepts.items():
        slug = name.replace("my ", "").replace("the ", "").lower()
        paths = []
        for i, im in enumerate(crops, start=1):
            rel = f"concepts/{slug}_{i}.jpg"
            save_jpeg(jitter(fit(im), rng), HERE / rel)
            paths.append(rel)
        out.append({"name": name, "images": paths, "note": note})
    return out


def make_scenes(rng: np.random.Generator) -> list[dict]:
    # Two concepts together: Chelsea and the cup in front of a wall.
    canvas = wall((LONG_SIDE_PX, 300))
    face = cat_face().resize((200, 193), Image.Resampling.LANCZOS)
    canvas.paste(face, (20, 30), oval_mask(face.size))
    small_cup = cup().resize((170, 154), Image.Resampling.LANCZOS)
    canvas.paste(small_cup, (215, 120), oval_mask(small_cup.size))
    save_jpeg(canvas, HERE / "scenes/chelsea_and_mug.jpg")

    # One concept, seen differently from every reference: mirrored, zoomed on the right side.
    query = ImageOps.mirror(photo("chelsea").crop((170, 40, 451, 300)))
    save_jpeg(jitter(fit(query, 320), rng), HERE / "scenes/chelsea_query.jpg")

    # None of the concepts: a negative example.
    save_jpeg(fit(photo("astronaut").crop((0, 0, 512, 512)), 320), HERE / "scenes/astronaut.jpg")

    return [
        {
            "image": "scenes/chelsea_query.jpg",
            "question": "Is Chelsea in this photo? What is she doing?",
            "concepts": ["Chelsea"],
        },
        {
            "image": "scenes/chelsea_and_mug.jpg",
            "question": "Who is next to my mug?",
            "concepts": ["Chelsea", "my mug"],
        },
        {
            "image": "scenes/astronaut.jpg",
            "question": "Is Chelsea or my mug in this photo?",
            "concepts": ["Chelsea", "my mug"],
        },
    ]


def clip_frames() -> list[Image.Image]:
    """Chelsea slides in from the left across a wall, growing a little, then settles."""
    width, height = CLIP_SIZE
    background = wall(CLIP_SIZE)
    face = cat_face()
    n = CLIP_FPS * CLIP_SECONDS
    frames = []
    for i in range(n):
        t = i / (n - 1)
        progress = min(1.0, t / 0.7)  # moves for 70 % of the clip, then stays still
        eased = progress * progress * (3 - 2 * progress)
        scale = 0.40 + 0.12 * eased
        size = (round(face.width * scale), round(face.height * scale))
        sprite = face.resize(size, Image.Resampling.BILINEAR)
        x = round(-size[0] + eased * ((width + size[0]) / 2 + size[0] / 2 - 10))
        y = round((height - size[1]) / 2)
        frame = background.copy()
        frame.paste(sprite, (x, y), oval_mask(size))
        frames.append(frame)
    return frames


def make_clip() -> list[dict]:
    path = HERE / "clip.mp4"
    with av.open(str(path), "w", container_options={"fflags": "+bitexact"}) as container:
        stream = container.add_stream(
            "libx264", rate=Fraction(CLIP_FPS), options={"crf": str(CLIP_CRF), "preset": "medium"}
        )
        stream.width, stream.height = CLIP_SIZE
        stream.pix_fmt = "yuv420p"
        stream.codec_context.thread_count = 1  # x264's output depends on its thread count
        stream.codec_context.flags |= av.codec.context.Flags.bitexact
        for frame in clip_frames():
            for packet in stream.encode(av.VideoFrame.from_image(frame)):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return [
        {"video": "clip.mp4", "question": "Is Chelsea in this video? What does she do?"},
        {
            "video": "clip.mp4",
            "question": "When does Chelsea first appear, and where is she at the end?",
        },
    ]


def make_calibration() -> list[dict]:
    """Image/mask pairs in the COCO single-instance style, for trying `python -m ego.calibrate`.

    Each image has one subject pasted at a known place on the wall, so its mask is exact: white where
    the subject's oval is (the paste mask above half opacity), black elsewhere.
    """
    subjects = {"cat": cat_face(), "cup": cup()}
    placements = [
        ("cat", (150, 144), (30, 40)),
        ("cat", (230, 222), (150, 50)),
        ("cup", (180, 163), (190, 110)),
        ("cup", (120, 109), (40, 150)),
    ]
    pairs = []
    for i, (subject, size, corner) in enumerate(placements, start=1):
        canvas = wall((LONG_SIDE_PX, 300))
        sprite = subjects[subject].resize(size, Image.Resampling.LANCZOS)
        alpha = oval_mask(size)
        canvas.paste(sprite, corner, alpha)
        mask = Image.new("L", canvas.size, 0)
        mask.paste(alpha.point(lambda v: 255 if v >= 128 else 0), corner)
        stem = f"{subject}_{i}"
        save_jpeg(canvas, HERE / f"calibration/images/{stem}.jpg")
        (HERE / "calibration/masks").mkdir(parents=True, exist_ok=True)
        mask.convert("1").save(HERE / f"calibration/masks/{stem}.png", optimize=True)
        pairs.append({"image": f"calibration/images/{stem}.jpg", "mask": f"calibration/masks/{stem}.png"})
    return pairs


TEXT_QUESTIONS = [
    # Asked without a photo: the concepts' memories are the only visual input.
    {"question": "What colour are Chelsea's eyes?", "concepts": ["Chelsea"]},
    {"question": "What does my mug stand on, and what colour is it?", "concepts": ["my mug"]},
    {"question": "Which is bigger, my mug or the rocket?", "concepts": ["my mug", "the rocket"]},
]


def main() -> None:
    rng = np.random.default_rng(SEED)
    listing = {
        "concepts": make_concepts(rng),
        "image_questions": make_scenes(rng),
        "video_questions": make_clip(),
        "text_questions": TEXT_QUESTIONS,
        "calibration": make_calibration(),
    }
    (HERE / "examples.json").write_text(json.dumps(listing, indent=2) + "\n", encoding="utf-8")
    for path in sorted(HERE.rglob("*")):
        if path.suffix in {".jpg", ".png", ".mp4", ".json"}:
            print(f"{path.relative_to(HERE)}: {path.stat().st_size / 1024:.1f} KB")


if __name__ == "__main__":
    main()
