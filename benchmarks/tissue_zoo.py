# Copyright (c) monai-icmil contributors
# Licensed under the Apache License, Version 2.0 (the "License");
"""Tissue detection on a zoo of hard slides: the detector as it was before a change ("old", ``--old``: ``s59``
before the pale-tissue split and the hole limit, ``s58`` also before the glass balance and the adaptive floor)
against its defaults ("new"), case by case.

79 cases at the tissue mask's resolution (about 8 um/px), each with the mask it should get (its oracle; none for a
blank slide, which should get no tissue):

- CMU-1-Small-Region read at level 0 in 16 x 16 blocks (185 x 138), its oracle the mask every detector before the
  pale-tissue split gave the slide itself (Otsu's threshold, every hole filled; ``--oracle new``: the defaults' mask,
  which keeps its pale strand and loose keratin); as light through the slide (relative to its glass) it is re-stained
  in HED space (faded to a fraction of its stain, haematoxylin or eosin only, twice the eosin, pale haematoxylin with
  DAB: IHC, half dark and half pale), seen through tinted, vignetted or graded glass, inked, folded, put beside fill
  outside the scanned area or shown in dark field;
- dense tissue tiled from CMU-1's densest block (85-99 % cover, with fat, a lumen or faded) and tiny biopsies (1-2 %);
- blank slides: tinted glass, debris, air bubbles, coverslip edges, pen, mountant mottle, heavy noise, grey fill.

Each case is rendered (glass colour times transmittance, Gaussian noise, JPEG) with its own noise drawn from
``--seed``; the scenes themselves are fixed. Both detectors run on the CPU with ``min_area_px`` 312 (20,000 um^2 at
8 um/px); "new" fills holes up to 781 px (``MAX_HOLE_UM2``, 50,000 um^2), "old" every hole. Per case: cover, recall
and precision against the oracle, the threshold, and the warning :func:`monai_icmil.data.tiling._doubtful_mask` gives
(``cover``, ``lowered``, ``faint``; ``empty`` for no tissue).

New regresses on a case, against old, when it keeps more than 0.2 % more of a blank slide, loses more than 0.05 of
recall or of precision (an empty mask has precision 1), or starts warning where old did not on a case not meant to
be faint (faded, IHC, pale). An improvement is the same rules with old and new swapped; a case can be both.

    python benchmarks/tissue_zoo.py [--old s59|s58] [--oracle s59|new] [--seed 59] [--smoke]
        [--cmu CMU-1-Small-Region.svs] [--json tissue_zoo.json]

Without the CMU-1 file only the cases that do not derive from it (the blank slides) are built.
"""

from __future__ import annotations

import argparse
import functools
import io
import time
import zlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from PIL import Image
from scipy import ndimage as ndi
from skimage.color import hed_from_rgb, rgb_from_hed

from monai_icmil.data import open_slide
from monai_icmil.data.tiling import MAX_HOLE_UM2, _doubtful_mask, tissue_mask_from_rgb
from monai_icmil.utils import atomic_write_json

CMU = Path(__file__).resolve().parents[2] / "shared" / "data" / "CMU-1-Small-Region.svs"
MIN_AREA_PX = 312
#: the defaults' hole limit at the zoo's 8 um/px
MAX_HOLE_PX = int(MAX_HOLE_UM2 / 64)
#: the detector before a session's change (keyword arguments of tissue_mask_from_rgb; every hole filled), and after
BEFORE: dict[str, dict[str, bool]] = {
    "s59": {"pale_tissue": False},
    "s58": {"balance_background": False, "adapt_floor": False, "pale_tissue": False},
}
NEW: dict[str, Any] = {"max_hole_px": MAX_HOLE_PX}
MIN_SATURATION = 0.05
#: more cover than this on a blank slide, and a drop in recall or precision of more than SCORE_DROP, regress
BLANK_GAIN = 0.002
SCORE_DROP = 0.05
#: cases meant to be faint (a name containing one of these): a new warning there is fair
FAINT = ("fade0.1", "fade0.05", "sparseDAB", "ihc", "Eonly_pale", "pale")
SMOKE = ("cmu1", "cmu1_yellow", "cmu1_fade0.1_white", "cmu1_uneven", "biopsy1_yellow", "blank_white", "blank_yellow")

#: CMU-1's own glass (the transmittance's reference) and the glass colours the cases are lit through
CMU_GLASS = (246.0, 245.0, 244.0)
WHITE, YELLOW, MYELLOW, BLUE, PINK = (246, 245, 244), (248, 238, 205), (245, 240, 222), (215, 228, 248), (248, 228, 238)
#: a colour cast of mountant (per-channel transmittance)
MOUNTANT = np.array([1.0, 0.985, 0.955])
#: an air bubble's inside passes more green and blue than the (yellowish) mountant around it
BUBBLE = np.array([1.0, 1.02, 1.08])
#: blank and biopsy canvases
BLANK_SHAPE = (300, 400)

Recipe = Callable[[np.random.Generator], tuple[np.ndarray, np.ndarray | None]]


# --- stains, light and shapes ---------------------------------------------------------------------------------------


def to_stains(t: np.ndarray) -> np.ndarray:
    """Transmittance ``[h, w, 3]`` (light through the slide over light through its glass) to HED stain amounts."""
    return -np.log(t) @ hed_from_rgb


def from_stains(s: np.ndarray) -> np.ndarray:
    """HED stain amounts ``[h, w, 3]`` back to transmittance (the inverse of :func:`to_stains`, capped at 1)."""
    return np.clip(np.exp(-(s @ rgb_from_hed)), 0.0, 1.0)


def restain(t: np.ndarray, h: float = 1.0, e: float = 1.0, d: float = 1.0, dab: np.ndarray | None = None) -> np.ndarray:
    """``t`` with its haematoxylin, eosin and DAB scaled by ``h``, ``e``, ``d``, and ``dab`` ``[h, w]`` of DAB added."""
    s = to_stains(t) * np.array([h, e, d])
    if dab is not None:
        s[..., 2] += dab
    return from_stains(s)


def fade(t: np.ndarray, k: float) -> np.ndarray:
    """``t`` with every stain at ``k`` of its amount."""
    return restain(t, k, k, k)


def render(t: np.ndarray, glass: Any, rng: np.random.Generator, noise: float = 1.5, quality: int = 80) -> np.ndarray:
    """A ``uint8`` RGB picture of transmittance ``t`` lit through ``glass`` (an RGB colour, or ``[h, w, 3]`` for uneven
    light), with Gaussian noise of s.d. ``noise`` and JPEG compression at ``quality`` (0: none)."""
    light = np.broadcast_to(np.asarray(glass, float), t.shape)
    img = np.clip(np.round(light * t + rng.normal(0.0, noise, t.shape)), 0, 255).astype(np.uint8)
    if quality:
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, "JPEG", quality=quality)
        img = np.array(Image.open(buf).convert("RGB"))
    return img


def radial(h: int, w: int) -> np.ndarray:
    """Squared distance from the centre ``[h, w, 1]``, 1 in the corners."""
    y, x = np.mgrid[0:h, 0:w]
    r2 = ((y - h / 2) / (h / 2)) ** 2 + ((x - w / 2) / (w / 2)) ** 2
    return (r2 / r2.max())[..., None]


def centre_to_edge(h: int, w: int, centre: Sequence[float], edge: Sequence[float]) -> np.ndarray:
    """Light of colour ``centre`` in the middle turning to ``edge`` in the corners (a coloured vignette)."""
    r = radial(h, w)
    return np.asarray(centre, float) * (1 - r) + np.asarray(edge, float) * r


def left_to_right(h: int, w: int, left: Sequence[float], right: Sequence[float]) -> np.ndarray:
    """Light turning from colour ``left`` to ``right`` across the picture."""
    f = np.linspace(0.0, 1.0, w)[None, :, None]
    return np.broadcast_to(np.asarray(left, float) * (1 - f) + np.asarray(right, float) * f, (h, w, 3))


def blobs(h: int, w: int, sigma: float, level: float, seed: int) -> np.ndarray:
    """Random blobs: smoothed white noise above ``level`` of its s.d."""
    f = ndi.gaussian_filter(np.random.default_rng(seed).normal(size=(h, w)), sigma)
    return f > level * f.std()


def line(h: int, w: int, p0: tuple[float, float], p1: tuple[float, float], width: float) -> np.ndarray:
    """Anti-aliased coverage ``[h, w]`` of a straight line through ``p0`` and ``p1`` (``(y, x)``)."""
    y, x = np.mgrid[0:h, 0:w]
    (y0, x0), (y1, x1) = p0, p1
    dist = np.abs((x1 - x0) * (y0 - y) - (x0 - x) * (y1 - y0)) / np.hypot(x1 - x0, y1 - y0)
    return np.clip(width / 2 + 0.5 - dist, 0.0, 1.0)


def disc(h: int, w: int, cy: float, cx: float, r: float, ring: float | None = None) -> np.ndarray:
    """Anti-aliased coverage of a disc of radius ``r``, or of a ring ``ring`` pixels wide on that circle."""
    y, x = np.mgrid[0:h, 0:w]
    dist = np.hypot(y - cy, x - cx)
    if ring is None:
        return np.clip(r + 0.5 - dist, 0.0, 1.0)
    return np.clip(ring / 2 + 0.5 - np.abs(dist - r), 0.0, 1.0)


def ellipse(h: int, w: int, cy: float, cx: float, ry: float, rx: float) -> np.ndarray:
    """Boolean ellipse centred on ``(cy, cx)`` with semi-axes ``ry``, ``rx``."""
    y, x = np.mgrid[0:h, 0:w]
    return ((y - cy) / ry) ** 2 + ((x - cx) / rx) ** 2 <= 1


def paint(t: np.ndarray, cover: np.ndarray, colour: Sequence[float]) -> np.ndarray:
    """``t`` under an absorber (ink, debris, a bubble's rim) of RGB ``colour`` covering ``cover`` ``[h, w]`` of each
    pixel."""
    a = cover[..., None]
    return t * (1 - a) + t * (np.asarray(colour, float) / 255.0) * a


def bubble(t: np.ndarray, cy: float, cx: float, r: float) -> np.ndarray:
    """An air bubble on ``t``: a dark rim and an inside without the mountant's cast."""
    h, w = t.shape[:2]
    t = paint(t, disc(h, w, cy, cx, r, ring=2), (140, 140, 140))
    return np.where(disc(h, w, cy, cx, r - 2)[..., None] > 0.5, t * BUBBLE, t)


def glass_strip(t: np.ndarray, oracle: np.ndarray, width: int) -> tuple[np.ndarray, np.ndarray]:
    """``t`` and its oracle with the first ``width`` columns bare glass."""
    t, oracle = t.copy(), oracle.copy()
    t[:, :width], oracle[:, :width] = 1.0, False
    return t, oracle


# --- the cases ------------------------------------------------------------------------------------------------------


class Case(NamedTuple):
    """One picture of the zoo: ``rgb`` ``uint8`` ``[h, w, 3]`` and its ``oracle`` mask (``None``: blank slide)."""

    name: str
    note: str
    rgb: np.ndarray
    oracle: np.ndarray | None


class Zoo:
    """The cases' recipes, built one at a time (:meth:`build`) with noise drawn from ``seed`` and the case's name.

    Args:
        cmu: CMU-1-Small-Region at the mask resolution (``uint8`` ``[185, 138, 3]``), or ``None``: only the cases that
            do not derive from it.
        seed: the noise's seed.
        oracle: whose mask of CMU-1 is the oracle of the cases made from it: ``"s59"`` (every detector's before the
            pale-tissue split) or ``"new"`` (the defaults', which keep its pale strand and loose keratin).
    """

    def __init__(self, cmu: np.ndarray | None, seed: int = 59, oracle: str = "s59") -> None:
        self.cmu, self.seed = cmu, seed
        self.recipes: dict[str, tuple[str, Recipe]] = {}
        if cmu is not None:
            self.t0 = np.clip(cmu / np.array(CMU_GLASS), 1e-4, 1.0)
            reference = NEW if oracle == "new" else BEFORE[oracle]
            self.r0 = tissue_mask_from_rgb(cmu, min_area_px=MIN_AREA_PX, device="cpu", **reference)[0]
            self._cmu_cases()
            self._dense_cases()
            self._biopsy_cases()
        self._blank_cases()

    def names(self) -> list[str]:
        """Every case's name, in the zoo's order."""
        return list(self.recipes)

    def build(self, name: str) -> Case:
        """Case ``name``, its noise from ``(seed, name)`` (the same in a full run and in a subset)."""
        note, recipe = self.recipes[name]
        rgb, oracle = recipe(np.random.default_rng([self.seed, zlib.crc32(name.encode())]))
        return Case(name, note, rgb, oracle)

    def _add(self, name: str, recipe: Recipe, note: str = "") -> None:
        self.recipes[name] = (note, recipe)

    def _on_cmu(self, name: str, t: Callable[[], np.ndarray], glass: Any = WHITE, note: str = "") -> None:
        """A case of CMU-1 as transmittance ``t()`` lit through ``glass``, its oracle CMU-1's."""
        self._add(name, lambda rng: (render(t(), glass, rng), self.r0), note)

    # shared pieces, made once and only when a case needs them

    @functools.cached_property
    def dense(self) -> np.ndarray:
        """200 x 200 of tissue only."""
        return self.dense_texture(200, 200, 0)

    @functools.cached_property
    def biopsy_tissue(self) -> np.ndarray:
        """Tissue only, the size of a blank canvas (biopsies are cut from it)."""
        return self.dense_texture(*BLANK_SHAPE, 3)

    @functools.cached_property
    def mottle(self) -> np.ndarray:
        """Faint yellowish mountant in smooth patches ``[300, 400, 1]`` in ``[0, 1]``, about half of it over 0.3."""
        f = ndi.gaussian_filter(np.random.default_rng(11).normal(size=BLANK_SHAPE), 12)
        return np.clip(f / f.std() * 0.6 + 0.2, 0.0, 1.0)[..., None]

    @functools.cached_property
    def mottled_glass(self) -> np.ndarray:
        """Blank glass under :attr:`mottle`."""
        return (1 - self.mottle) + MOUNTANT * self.mottle

    def dense_texture(self, h: int, w: int, seed: int) -> np.ndarray:
        """Transmittance ``[h, w, 3]`` of tissue only: CMU-1's densest 60 x 60 block (rows 122-182, columns 46-106)
        tiled, each tile flipped and transposed at random."""
        block, rng = self.t0[122:182, 46:106], np.random.default_rng(seed)
        rows = []
        for _ in range(h // 60 + 1):
            tiles = []
            for _ in range(w // 60 + 1):
                tile = block
                if rng.random() < 0.5:
                    tile = tile[::-1]
                if rng.random() < 0.5:
                    tile = tile[:, ::-1]
                if rng.random() < 0.5:
                    tile = tile.transpose(1, 0, 2)
                tiles.append(tile)
            rows.append(np.concatenate(tiles, 1))
        return np.concatenate(rows, 0)[:h, :w]

    def _cmu_cases(self) -> None:
        t0, r0, (h, w) = self.t0, self.r0, self.r0.shape
        self._add("cmu1", lambda rng: (self.cmu, r0), "the real slide")
        for name, glass in (("yellow", YELLOW), ("blue", BLUE), ("pink", PINK)):
            self._on_cmu(f"cmu1_{name}", lambda: t0, glass)
        self._on_cmu("cmu1_vignette", lambda: t0, np.array(WHITE) * (1 - 0.35 * radial(h, w)), "neutral falloff to 65%")
        colvignette = centre_to_edge(h, w, (252, 246, 226), (212, 218, 230))
        self._on_cmu("cmu1_colvignette", lambda: t0, colvignette, "warm centre, cool grey edges")
        gradient = left_to_right(h, w, (250, 244, 222), (222, 228, 240))
        self._on_cmu("cmu1_colgradient", lambda: t0, gradient, "yellow->blue left-right")
        fades = [(k, "white", WHITE) for k in (0.5, 0.2, 0.1, 0.05)]
        fades += [(0.2, "yellow", YELLOW), (0.1, "yellow", YELLOW), (0.05, "yellow", YELLOW)]
        fades += [(0.1, "blue", BLUE), (0.1, "pink", PINK), (0.3, "blue", BLUE)]
        for k, name, glass in fades:
            self._on_cmu(f"cmu1_fade{k}_{name}", functools.partial(fade, t0, k), glass)
        self._on_cmu("cmu1_Honly", functools.partial(restain, t0, 1, 0, 0), note="eosin removed")
        self._on_cmu("cmu1_Eonly_pale", functools.partial(restain, t0, 0, 0.6, 0), note="pale eosin only")
        self._on_cmu("cmu1_E2x", functools.partial(restain, t0, 1, 2, 1))

        @functools.cache
        def ihc(h_amount: float, level: float, seed: int, dab: float) -> np.ndarray:
            """Pale haematoxylin with DAB in blobs of the tissue."""
            spots = ndi.gaussian_filter((blobs(h, w, 4, level, seed) & r0) * dab, 1)
            return restain(t0, h_amount, 0, 0, dab=spots)

        dense_dab, sparse_dab = functools.partial(ihc, 0.35, 0.6, 1, 0.12), functools.partial(ihc, 0.15, 1.2, 2, 0.15)
        self._on_cmu("ihc_white", dense_dab, note="DAB + H 0.35")
        self._on_cmu("ihc_yellow", dense_dab, YELLOW)
        self._on_cmu("ihc_blue", dense_dab, BLUE)
        self._on_cmu("ihc_sparseDAB_white", sparse_dab, note="sparse DAB + H 0.15")
        self._on_cmu("ihc_sparseDAB_mylw", sparse_dab, MYELLOW)

        self._on_cmu("cmu1_blackink_yellow", lambda: paint(t0, line(h, w, (5, 5), (180, 130), 3), (30, 30, 35)), YELLOW)
        green = disc(h, w, 92, 69, 60, ring=3)
        self._on_cmu("cmu1_greenink_blue", lambda: paint(t0, green, (60, 150, 70)), BLUE)
        blue = line(h, w, (20, 0), (20, 137), 3)
        self._on_cmu(
            "cmu1_blueink_pink", lambda: paint(t0, blue, (50, 70, 170)), PINK, "blue ink kept by both (by design)"
        )

        def fold() -> np.ndarray:  # a band where the tissue lies double and more: 4 times the stain
            rows = np.arange(h)[:, None]
            band = ndi.gaussian_filter(((rows > 120) & (rows < 140)) * np.ones((1, w)), 1)
            return from_stains(to_stains(t0) * (1 + 3 * band[..., None] * r0[..., None]))

        self._on_cmu("cmu1_fold", fold, note="OD x4 band")
        self._on_cmu("cmu1_fold_yellow", fold, YELLOW)

        def uneven() -> np.ndarray:  # one slide stained unevenly: the top half twice as dark, the bottom half pale
            return from_stains(to_stains(t0) * np.where(np.arange(h)[:, None, None] < h // 2, 2.0, 0.35))

        self._on_cmu("cmu1_uneven", uneven, note="top 2x stain, bottom 0.35x")
        self._on_cmu("cmu1_uneven_yellow", uneven, YELLOW)

        # fill outside the scanned area: 120 columns beside the slide
        wide_t = np.concatenate([t0, np.ones((h, 120, 3))], 1)
        wide_oracle = np.concatenate([r0, np.zeros((h, 120), bool)], 1)

        def outside(glass: Any, low: int, high: int) -> Recipe:
            def recipe(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
                img = render(wide_t, glass, rng)
                img[:, w:] = rng.integers(low, high, (h, 120, 3))
                return img, wide_oracle

            return recipe

        self._add("cmu1_black_outofscan", outside(WHITE, 0, 6), "46% black")
        self._add("cmu1_grey128_outofscan_yellow", outside(YELLOW, 126, 131))
        self._add("cmu1_grey225_outofscan_mylw", outside(MYELLOW, 223, 228), "neutral grey fill + warm glass")
        dark = np.clip(np.array([28, 28, 34]) + (1 - t0) * np.array([190, 200, 170]), 0, 255) / 255
        self._on_cmu("cmu1_darkfield", lambda: dark, (255, 255, 255), "tissue bright on dark")

        self._on_cmu("cmu1_mottle", self._cmu_mottle, note="CMU-1 on mottled mountant")
        crop = (slice(95, 185), slice(20, 125))
        self._add(
            "cmu1_crop_tissue",
            lambda rng: (self.cmu[crop], r0[crop]),
            f"CMU-1 cropped to its tissue ({r0[crop].mean():.0%})",
        )

    def _cmu_mottle(self) -> np.ndarray:
        h, w = self.r0.shape
        patches = ndi.zoom(self.mottle[..., 0], (h / BLANK_SHAPE[0], w / BLANK_SHAPE[1]), order=1)[..., None]
        return self.t0 * ((1 - patches) + MOUNTANT * patches)

    def _dense_cases(self) -> None:
        full = np.ones((200, 200), bool)
        self._add("dense99", lambda rng: (render(self.dense, WHITE, rng), full), "no glass")
        for cover, strip in ((95, 10), (85, 30)):
            for suffix, glass in (("", WHITE), ("_yellow", YELLOW)):
                self._add(
                    f"dense{cover}{suffix}",
                    lambda rng, s=strip, g=glass: self._strip_case(self.dense, s, g, rng),
                    "" if suffix else f"{strip}-px glass strip",
                )

        def fat() -> np.ndarray:  # adipose lobules: white with thin pale septa, inside the tissue
            lobules = np.zeros((200, 200), bool)
            for cy, cx, ry, rx in ((60, 60, 30, 40), (140, 130, 40, 35), (50, 150, 22, 25)):
                lobules |= ellipse(200, 200, cy, cx, ry, rx)
            y, x = np.mgrid[0:200, 0:200]
            septa = paint(np.ones((200, 200, 3)), ((y % 9 == 0) | (x % 9 == 0)) * 0.6, (235, 200, 220))
            return np.where(lobules[..., None], septa, self.dense)

        self._add("dense90_fat", lambda rng: self._strip_case(fat(), 20, WHITE, rng), "26% adipose inside tissue")
        self._add("dense90_fat_yellow", lambda rng: self._strip_case(fat(), 20, YELLOW, rng))
        lumen = ellipse(200, 200, 100, 110, 55, 60)[..., None]
        self._add(
            "dense_biglumen",
            lambda rng: self._strip_case(np.where(lumen, 1.0, self.dense), 10, WHITE, rng),
            "lumen 26%, 5% glass",
        )
        self._add(
            "dense99_pale", lambda rng: (render(restain(self.dense, 0.25, 0.7, 1), WHITE, rng), full), "pale stroma"
        )
        self._add("dense97_fade0.3", lambda rng: self._strip_case(self.faded_dense(0.3), 6, WHITE, rng))
        for name, strip, k in (("dense97_b", 6, 1.0), ("dense99_fade0.3_b", 2, 0.3), ("dense98_fade0.5_b", 4, 0.5)):
            recipe = lambda rng, s=strip, k=k: self._strip_case(self.faded_dense(k), s, WHITE, rng)  # noqa: E731
            self._add(name, recipe, f"{strip}-px glass strip")

    def faded_dense(self, k: float) -> np.ndarray:
        """:attr:`dense` faded to ``k`` of its stain (as it is for 1)."""
        return self.dense if k == 1 else fade(self.dense, k)

    @staticmethod
    def _strip_case(t: np.ndarray, strip: int, glass: Any, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        t, oracle = glass_strip(t, np.ones(t.shape[:2], bool), strip)
        return render(t, glass, rng), oracle

    def _biopsy(self, ry: float, rx: float, k: float, glass: Any, around: Any = 1.0, **kw: Any) -> Recipe:
        """A piece of tissue (faded to ``k``) of semi-axes ``ry``, ``rx`` in the middle of a blank canvas whose
        transmittance elsewhere is ``around``."""

        def recipe(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
            piece = ellipse(*BLANK_SHAPE, 150, 200, ry, rx)
            tissue = fade(self.biopsy_tissue, k) if k != 1 else self.biopsy_tissue
            return render(np.where(piece[..., None], tissue, around), glass, rng, **kw), piece

        return recipe

    def _biopsy_cases(self) -> None:
        for name, ry, rx, k, glass in (
            ("biopsy1.5_white", 25, 23, 1, WHITE),
            ("biopsy1_yellow", 22, 17, 1, YELLOW),
            ("biopsy2_fade0.3_white", 30, 25, 0.3, WHITE),
            ("biopsy1_blue", 22, 17, 1, BLUE),
            ("biopsy1_fade0.5_mylw", 22, 17, 0.5, MYELLOW),
        ):
            share = ellipse(*BLANK_SHAPE, 150, 200, ry, rx).mean()
            self._add(name, self._biopsy(ry, rx, k, glass, noise=2.0, quality=75), f"{share:.1%} tissue")
        mottled = functools.partial(self._biopsy, 25, 23, glass=WHITE, noise=2.0, quality=75)
        self._add("biopsy1.5_white_mottle", lambda rng: mottled(1, around=self.mottled_glass)(rng), "biopsy + mottle")
        self._add("biopsy1.5_white_mottle_fade0.5", lambda rng: mottled(0.5, around=self.mottled_glass)(rng))
        self._add("biopsy1.5_white_heavynoise", self._biopsy(25, 23, 1, WHITE, noise=4.0, quality=60))

    def _blank_cases(self) -> None:
        h, w = BLANK_SHAPE
        one = np.ones((h, w, 3))

        def blank(t: Callable[[], np.ndarray], glass: Any, noise: float = 2.5, quality: int = 70) -> Recipe:
            return lambda rng: (render(t(), glass, rng, noise, quality), None)

        for name, glass in (("white", WHITE), ("yellow", YELLOW), ("mylw", MYELLOW), ("blue", BLUE), ("pink", PINK)):
            self._add(f"blank_{name}", blank(lambda: one, glass), "JPEG-like noise")

        def debris() -> np.ndarray:  # 25 specks of stain and 300 grains of dust
            rng, specks = np.random.default_rng(7), np.zeros((h, w))
            for _ in range(25):
                cy, cx = rng.integers(0, h), rng.integers(0, w)
                specks += disc(h, w, cy, cx, rng.uniform(0.5, 2.5))
            dust = np.zeros((h, w))
            ys = rng.integers(0, h, 300)
            dust[ys, rng.integers(0, w, 300)] = 0.5
            return paint(paint(one, np.clip(specks, 0, 1), (150, 90, 110)), dust, (200, 200, 200))

        self._add("blank_yellow_debris", blank(debris, YELLOW), "25 specks + dust")
        self._add("blank_white_debris", blank(debris, WHITE))

        def bubbles() -> np.ndarray:
            t = one
            for cy, cx, r in ((80, 100, 25), (200, 280, 35), (230, 90, 15)):
                t = bubble(t, cy, cx, r)
            return t

        self._add("blank_yellow_bubbles", blank(bubbles, YELLOW), "air bubbles: dark rings, untinted inside")

        def coverslip() -> np.ndarray:  # its dark edge, and a band of yellow mountant beyond it
            y, x = np.mgrid[0:h, 0:w]
            t = paint(one, line(h, w, (0, 320), (299, 340), 2), (90, 90, 95))
            return paint(t, ndi.gaussian_filter((x > 330 + y / 15).astype(float), 3) * 0.9, (250, 238, 200))

        self._add("blank_mylw_coverslip", blank(coverslip, MYELLOW), "dark edge + yellow mountant band")
        self._add("blank_white_coverslip", blank(coverslip, WHITE))
        tint = left_to_right(h, w, (246, 245, 244), (246, 238, 214))
        self._add("blank_tintgradient", blank(lambda: one, tint), "neutral->yellow")
        self._add("blank_colvignette", blank(lambda: one, centre_to_edge(h, w, (252, 246, 226), (212, 218, 230))))
        self._add("blank_vignette", blank(lambda: one, np.array(WHITE) * (1 - 0.35 * radial(h, w))))

        def inks() -> np.ndarray:
            t = paint(one, line(h, w, (20, 20), (280, 60), 3), (30, 30, 35))
            t = paint(t, disc(h, w, 150, 250, 80, ring=3), (60, 150, 70))
            return paint(t, line(h, w, (10, 390), (290, 300), 3), (50, 70, 170))

        self._add("blank_yellow_inks", blank(inks, YELLOW), "black/green/blue pen (blue kept by design)")

        def grey_fill(rng: np.random.Generator) -> tuple[np.ndarray, None]:
            img = render(one, MYELLOW, rng, 2.5, 70)
            img[:, :240] = rng.integers(198, 203, (h, 240, 3))
            return img, None

        self._add("blank_mylw_grey200_outofscan", grey_fill, "60% neutral grey fill")
        self._add(
            "blank_white_mottle", blank(lambda: self.mottled_glass, WHITE, 2.0, 75), "faint yellow mountant mottle"
        )
        self._add("blank_white_heavynoise", blank(lambda: one, WHITE, 4.0, 60), "noise sd 4 + JPEG q60")
        edge = functools.partial(line, h, w, (0, 320), (299, 340))
        self._add(
            "blank_yellow_edgeline",
            blank(lambda: paint(one, edge(2), (90, 90, 95)), YELLOW),
            "coverslip edge: dark line only",
        )
        self._add(
            "blank_white_blueedge",
            blank(lambda: paint(one, edge(4), (170, 190, 215)), WHITE),
            "coverslip edge: bluish 4-px line",
        )
        self._add("blank_yellow_bigbubble", blank(lambda: bubble(one, 150, 200, 70), YELLOW), "one bubble 12% of it")


# --- the comparison -------------------------------------------------------------------------------------------------


def warning_kind(rgb: np.ndarray, mask: np.ndarray, threshold: float, balance_background: bool) -> str:
    """What the tiling would say of a mask: ``empty``, ``cover``, ``lowered`` or ``faint``
    (:func:`~monai_icmil.data.tiling._doubtful_mask`), ``-`` for nothing."""
    if not mask.any():
        return "empty"
    why = _doubtful_mask(rgb, mask, threshold, MIN_SATURATION, balance_background)
    if why is None:
        return "-"
    for kind, words in (("cover", "mask covers"), ("lowered", "was lowered"), ("faint", "just under")):
        if words in why:
            return kind
    return "other"


def detect(rgb: np.ndarray, oracle: np.ndarray | None, options: dict[str, bool]) -> tuple[np.ndarray, dict[str, Any]]:
    """The mask of one detector (``options`` of tissue_mask_from_rgb) and its scores: cover, recall and precision
    against ``oracle`` (``None`` for a blank slide, and precision ``None`` for an empty mask), threshold, warning."""
    mask, thr = tissue_mask_from_rgb(rgb, min_area_px=MIN_AREA_PX, device="cpu", **options)
    row: dict[str, Any] = {"cover": float(mask.mean()), "recall": None, "precision": None, "threshold": float(thr)}
    if oracle is not None:
        hits = int((mask & oracle).sum())
        row["recall"] = hits / max(int(oracle.sum()), 1)
        row["precision"] = hits / int(mask.sum()) if mask.any() else None
    row["warning"] = warning_kind(rgb, mask, thr, options.get("balance_background", True))
    return mask, row


def worse(name: str, blank: bool, ref: dict[str, Any], cand: dict[str, Any]) -> list[str]:
    """The measures on which ``cand`` is worse than ``ref`` (the rules in the module docstring): ``cover`` (a blank
    slide), ``recall``, ``precision``, ``warning``."""
    if blank:
        return ["cover"] if cand["cover"] > ref["cover"] + BLANK_GAIN else []
    out = []
    if cand["recall"] < ref["recall"] - SCORE_DROP:
        out.append("recall")
    if _precision(cand) < _precision(ref) - SCORE_DROP:
        out.append("precision")
    if ref["warning"] == "-" and cand["warning"] != "-" and not any(s in name for s in FAINT):
        out.append("warning")
    return out


def _precision(row: dict[str, Any]) -> float:
    return 1.0 if row["precision"] is None else row["precision"]


def describe(measures: list[str], old: dict[str, Any], new: dict[str, Any]) -> str:
    """``measures`` as old -> new, e.g. ``recall 0.09 -> 0.88; starts warning (cover)``."""
    said = []
    for m in measures:
        if m == "cover":
            said.append(f"blank cover {old['cover']:.1%} -> {new['cover']:.1%}")
        elif m == "warning":
            said.append(
                f"starts warning ({new['warning']})" if old["warning"] == "-" else f"stops warning ({old['warning']})"
            )
        else:
            before, after = (_precision(old), _precision(new)) if m == "precision" else (old[m], new[m])
            said.append(f"{m} {before:.2f} -> {after:.2f}")
    return "; ".join(said)


def compare(case: Case, detectors: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """One case's row: old and new detectors' scores, whether their masks are identical, and how new regresses or
    improves on old."""
    masks, row = {}, {"case": case.name, "note": case.note, "shape": list(case.rgb.shape[:2])}
    row["oracle_cover"] = None if case.oracle is None else float(case.oracle.mean())
    for name, options in detectors.items():
        masks[name], row[name] = detect(case.rgb, case.oracle, options)
    row["identical"] = bool(np.array_equal(masks["old"], masks["new"]))
    blank = case.oracle is None
    row["regression"] = describe(worse(case.name, blank, row["old"], row["new"]), row["old"], row["new"])
    row["improvement"] = describe(worse(case.name, blank, row["new"], row["old"]), row["old"], row["new"])
    return row


def markdown(rows: list[dict[str, Any]]) -> str:
    """The rows as a markdown table: per detector cover, recall / precision, threshold and warning."""

    def cell(r: dict[str, Any]) -> str:
        scores = "" if r["recall"] is None else f" {r['recall']:.2f}/{_precision(r):.2f}"
        return f"{r['cover']:.1%}{scores} t{r['threshold']:.3f} {r['warning']}"

    lines = ["| case | size | old: cover R/P thr warning | new: cover R/P thr warning | regression | improvement |"]
    lines.append("| --- " * 6 + "|")
    for r in rows:
        size = "x".join(map(str, r["shape"]))
        lines.append(
            f"| {r['case']} | {size} | {cell(r['old'])} | {cell(r['new'])} | {r['regression']} | {r['improvement']} |"
        )
    return "\n".join(lines) + "\n"


def read_cmu(path: Path) -> np.ndarray | None:
    """CMU-1 at the mask resolution (level 0 in 16 x 16 blocks), ``None`` when the file is missing."""
    if not path.is_file():
        return None
    with open_slide(path) as reader:
        return reader.read_level(0, block=16)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cmu", type=Path, default=CMU, help="CMU-1-Small-Region.svs (missing: blank slides only)")
    p.add_argument("--seed", type=int, default=59, help="the cases' noise")
    p.add_argument("--old", choices=sorted(BEFORE), default="s59", help="the detector before which change")
    p.add_argument(
        "--oracle", choices=["s59", "new"], default="s59", help="whose mask of CMU-1 is the CMU-1 cases' oracle"
    )
    p.add_argument("--cases", nargs="+", default=None, help="only these cases (names as in the table)")
    p.add_argument("--smoke", action="store_true", help=f"CI: {len(SMOKE)} cases ({', '.join(SMOKE)})")
    p.add_argument("--json", default=None, help="write the result here")
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    cmu = read_cmu(args.cmu)
    zoo = Zoo(cmu, args.seed, args.oracle)
    wanted = args.cases or (list(SMOKE) if args.smoke else zoo.names())
    if cmu is None:
        skipped = [n for n in wanted if n not in zoo.recipes and n.startswith(("cmu1", "ihc", "dense", "biopsy"))]
        print(f"CMU-1 not found at {args.cmu}: the {len(skipped)} cases made from it left out", flush=True)
        wanted = [n for n in wanted if n not in skipped]
    unknown = [n for n in wanted if n not in zoo.recipes]
    if unknown:
        p.error(f"--cases: unknown {unknown}; known: {zoo.names()}")
    detectors = {"old": BEFORE[args.old], "new": NEW}
    rows = [compare(zoo.build(name), detectors) for name in wanted]
    table = markdown(rows)
    regressions = {r["case"]: r["regression"] for r in rows if r["regression"]}
    improvements = {r["case"]: r["improvement"] for r in rows if r["improvement"]}
    identical = sum(r["identical"] for r in rows)
    summary = (
        f"tissue zoo (seed {args.seed}, old {args.old}, oracle {args.oracle}{', no CMU-1' if cmu is None else ''}): "
        f"{len(rows)} cases, "
        f"{len(regressions)} regressions, {len(improvements)} improvements of new vs old; "
        f"{identical} masks identical"
    )
    print(table)
    for name, why in regressions.items():
        print(f"regression {name}: {why}")
    print(summary, flush=True)
    result = {
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "cmu": str(args.cmu) if cmu is not None else None,
        "detectors": detectors,
        "min_area_px": MIN_AREA_PX,
        "rows": rows,
        "regressions": regressions,
        "improvements": improvements,
        "summary": summary,
        "table": table,
        "seconds": time.perf_counter() - t0,
    }
    if args.json:
        atomic_write_json(args.json, result)
    return result


if __name__ == "__main__":
    main()
