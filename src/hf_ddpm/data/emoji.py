"""Colour artwork to train on without a download: the emoji of Debian's ``fonts-noto-color-emoji`` package, rendered
with Pillow into a folder of RGB PNGs that ``--train_data_dir`` (an image folder) reads.

    python -m hf_ddpm.data.emoji emoji32 --resolution 32
    accelerate launch training/train.py --train_data_dir emoji32 --channels 3 --resolution 32

Noto Color Emoji is Google's; Debian ships the font under the SIL Open Font License 1.1 and the emoji artwork under
Apache-2.0 (``/usr/share/doc/fonts-noto-color-emoji/copyright``). Its glyphs are colour bitmaps (CBDT) of one size,
:data:`FONT_SIZE`; each single-code-point emoji of :data:`EMOJI_CODE_POINTS` that has a glyph (about 1,200 in
Debian 12's font) is drawn on white, centred on a square canvas, and resized (Lanczos) to the resolution asked for.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import PIL.Image
import PIL.ImageDraw
import PIL.ImageFont

#: Where Debian's fonts-noto-color-emoji puts the font.
NOTO_COLOR_EMOJI = Path("/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf")
#: The one pixel size of the font's colour bitmaps (FreeType refuses any other).
FONT_SIZE = 109
#: Misc Symbols and Pictographs, Emoticons, Transport and Map, ..., Symbols and Pictographs Extended-A.
EMOJI_CODE_POINTS = range(0x1F300, 0x1FB00)
#: A noncharacter, never assigned: what the font draws for a code point it has no glyph for.
NO_GLYPH = chr(0x1FFFE)
INSTALL_HINT = "apt-get install fonts-noto-color-emoji"


def emoji_font(font_path: str | Path = NOTO_COLOR_EMOJI) -> PIL.ImageFont.FreeTypeFont:
    """The colour emoji font at :data:`FONT_SIZE`; a one-line ``FileNotFoundError`` saying what to install when the
    file is missing, a ``ValueError`` when it is not a font Pillow can open at that size."""
    path = Path(font_path)
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} is missing: {INSTALL_HINT} (Debian/Ubuntu), or pass the path of NotoColorEmoji.ttf."
        )
    try:
        return PIL.ImageFont.truetype(str(path), FONT_SIZE)
    except OSError as error:
        raise ValueError(f"{path} is not a colour bitmap font of size {FONT_SIZE} ({error}).") from None


def render_emoji(character: str, font: PIL.ImageFont.FreeTypeFont, resolution: int) -> PIL.Image.Image | None:
    """``character`` drawn in colour on white, centred on a square canvas and resized to ``resolution`` pixels a
    side (Lanczos), as an RGB image; None when the font has no glyph for it (an empty box, or the drawing of
    :data:`NO_GLYPH`)."""
    return _render(character, font, resolution, _draw(NO_GLYPH, font))


def _render(
    character: str, font: PIL.ImageFont.FreeTypeFont, resolution: int, no_glyph: PIL.Image.Image | None
) -> PIL.Image.Image | None:
    image = _draw(character, font)
    if image is None or (no_glyph is not None and np.array_equal(np.asarray(image), np.asarray(no_glyph))):
        return None
    return image.resize((resolution, resolution), PIL.Image.LANCZOS)


def _draw(character: str, font: PIL.ImageFont.FreeTypeFont) -> PIL.Image.Image | None:
    left, top, right, bottom = font.getbbox(character)
    width, height = right - left, bottom - top
    if width <= 0 or height <= 0:
        return None
    side = max(width, height)
    image = PIL.Image.new("RGB", (side, side), "white")
    origin = ((side - width) // 2 - left, (side - height) // 2 - top)
    PIL.ImageDraw.Draw(image).text(origin, character, font=font, embedded_color=True)
    return image


def render_emoji_folder(
    out_dir: str | Path,
    resolution: int = 32,
    font_path: str | Path = NOTO_COLOR_EMOJI,
    limit: int | None = None,
) -> int:
    """Write one ``resolution`` x ``resolution`` RGB PNG per emoji of :data:`EMOJI_CODE_POINTS` that the font draws
    (``emoji_u1f600.png``, Noto's naming, so the folder sorts by code point) into ``out_dir``, made if needed: the
    first ``limit`` of them, or all. Returns how many were written.

    Raises ``FileNotFoundError`` (saying to ``apt-get install fonts-noto-color-emoji``) when the font is missing,
    ``ValueError`` for a resolution below 1, a limit below 1, or a font of which nothing renders.
    """
    if resolution < 1:
        raise ValueError(f"resolution must be a positive number of pixels, got {resolution}.")
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be >= 1 or None, got {limit}.")
    font = emoji_font(font_path)
    folder = Path(out_dir)
    folder.mkdir(parents=True, exist_ok=True)
    written, no_glyph = 0, _draw(NO_GLYPH, font)
    for code_point in EMOJI_CODE_POINTS:
        image = _render(chr(code_point), font, resolution, no_glyph)
        if image is None:
            continue
        image.save(folder / f"emoji_u{code_point:x}.png")
        written += 1
        if written == limit:
            break
    if not written:
        raise ValueError(
            f"{font_path} drew none of the emoji U+{EMOJI_CODE_POINTS.start:X}..U+{EMOJI_CODE_POINTS.stop - 1:X}: "
            "is it Noto Color Emoji, and was Pillow built with FreeType's PNG support?"
        )
    return written


def main(argv: list[str] | None = None) -> int:
    """``python -m hf_ddpm.data.emoji OUT_DIR [--resolution 32] [--limit N] [--font PATH]``; errors as one line."""
    parser = argparse.ArgumentParser(
        prog="python -m hf_ddpm.data.emoji",
        description="Render the Noto Color Emoji as a folder of RGB PNGs for train.py's --train_data_dir.",
    )
    parser.add_argument("out_dir", help="the folder to write the PNGs into (made if needed)")
    parser.add_argument("--resolution", type=int, default=32, help="pixels a side (default 32)")
    parser.add_argument("--limit", type=int, default=None, help="only the first N emoji (default: all)")
    parser.add_argument("--font", default=str(NOTO_COLOR_EMOJI), help=f"the font (default {NOTO_COLOR_EMOJI})")
    args = parser.parse_args(argv)
    try:
        count = render_emoji_folder(args.out_dir, args.resolution, args.font, args.limit)
    except (FileNotFoundError, ValueError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(
        f"wrote {count} emoji as {args.resolution}x{args.resolution} RGB PNGs to {args.out_dir}; train on them with "
        f"--train_data_dir {args.out_dir} --channels 3 --resolution {args.resolution}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
