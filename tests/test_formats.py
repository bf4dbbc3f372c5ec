# Copyright (c) monai-icmil contributors
# Licensed under the Apache License, Version 2.0 (the "License");
"""Slides written by other tools: OME-TIFF pyramids in SubIFDs with their mpp in OME-XML, tile encodings that cuCIM
opens but cannot decode (JPEG 2000, WebP, 4-sample deflate), and plain images (PNG, JPEG) read whole."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import tifffile

from monai_icmil.data.prepare import prepare_coords
from monai_icmil.data.report import RunReport
from monai_icmil.data.slide import (
    ImageSlide,
    SlideError,
    _ome_mpp,
    available_backends,
    block_mean,
    get_slide,
    open_slide,
)
from monai_icmil.data.store import CoordsStore
from monai_icmil.data.synthetic import SyntheticSlideConfig, render_slide
from monai_icmil.data.tiling import TilingConfig


@pytest.fixture(scope="module")
def tissue() -> np.ndarray:
    return render_slide((3, 1), True, SyntheticSlideConfig(width=1536, height=1024))["image"]


def write_ome(path, img, size="500", unit="nm", placeholder_tags=False) -> str:
    """An OME-TIFF as QuPath and bfconvert write them: full resolution in the main IFD, the reduced levels in its
    SubIFDs, the pixel size in the OME-XML (and, with ``placeholder_tags``, 72 dpi resolution tags)."""
    levels = [img, block_mean(img, 2), block_mean(img, 4)]
    physical = {"PhysicalSizeX": size, "PhysicalSizeY": size, "PhysicalSizeXUnit": unit, "PhysicalSizeYUnit": unit}
    with tifffile.TiffWriter(path, ome=True) as tif:
        opts = {"tile": (256, 256), "photometric": "rgb", "compression": "zlib"}
        tags = {"resolution": (72, 72), "resolutionunit": "INCH"} if placeholder_tags else {}
        tif.write(levels[0], subifds=len(levels) - 1, metadata=physical, **opts, **tags)
        for level in levels[1:]:
            tif.write(level, subfiletype=1, **opts)
    return str(path)


def write_pyramid(path, img, compression: str, alpha: bool = False) -> str:
    """A generic tiled pyramid (levels in the main IFD chain, 0.5 um/px in the resolution tags)."""
    with tifffile.TiffWriter(path) as tif:
        for k, ds in enumerate((1, 2, 4)):
            level = block_mean(img, ds)
            if alpha:
                level = np.concatenate([level, np.full(level.shape[:2] + (1,), 255, np.uint8)], -1)
            tif.write(
                level, tile=(256, 256), photometric="rgb", compression=compression, subfiletype=1 if k else 0,
                extrasamples=["unassalpha"] if alpha else None, resolution=(1e4 / (0.5 * ds),) * 2,
                resolutionunit="CENTIMETER",
            )  # fmt: skip
    return str(path)


def test_ome_pixel_size_is_read_with_its_unit():
    pixels = '<OME><Image><Pixels ID="Pixels:0" SizeX="10" PhysicalSizeX="{}" {}/></Image></OME>'
    assert _ome_mpp(pixels.format("0.25", "")) == 0.25  # the OME default unit is the micrometre
    assert _ome_mpp(pixels.format("250", 'PhysicalSizeXUnit="nm"')) == pytest.approx(0.25)
    assert _ome_mpp(pixels.format("0.00025", 'PhysicalSizeXUnit="mm"')) == pytest.approx(0.25)
    assert _ome_mpp(pixels.format("1", 'PhysicalSizeXUnit="parsec"')) is None
    assert _ome_mpp(pixels.format("1000", "")) is None  # a placeholder, not a microscope's sampling
    assert _ome_mpp('<OME><Image><Pixels ID="Pixels:0"/></Image></OME>') is None and _ome_mpp(None) is None
    # a namespace, an entity in the unit, and the image stored from IFD 0 chosen over a macro image listed first
    two = (
        '<OME xmlns="http://www.openmicroscopy.org/Schemas/OME/2016-06"><Image ID="Image:1"><Pixels '
        "PhysicalSizeX='10'><TiffData IFD='5'/></Pixels></Image><Image ID=\"Image:0\"><Pixels PhysicalSizeX='0.25' "
        'PhysicalSizeXUnit="&#181;m"><TiffData/></Pixels></Image></OME>'
    )
    assert _ome_mpp(two) == 0.25 and _ome_mpp("<OME><Pixels") is None


def test_an_ome_tiff_pyramid_in_subifds_is_read_at_its_levels_and_tiles_like_a_plain_pyramid(tissue, tmp_path):
    ome = write_ome(tmp_path / "s.ome.tif", tissue)
    plain = write_pyramid(tmp_path / "s.tif", tissue, "zlib")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "slide has no microns per pixel" warning
        slide = open_slide(ome)
    # cuCIM and OpenSlide see only the full-resolution page of an OME-TIFF; auto takes the reader that sees all
    assert slide.backend == "tifffile" and slide.level_count == 3 and slide.mpp == pytest.approx(0.5)
    for backend in available_backends():  # every backend takes the OME mpp over 72-dpi placeholder tags
        tagged = write_ome(tmp_path / "tagged.ome.tif", tissue, placeholder_tags=True)
        assert open_slide(tagged, backend=backend).mpp == pytest.approx(0.5), backend
    level, scale = slide.level_for_mpp(2.0)
    assert (level, scale) == (2, 1.0)
    cut = tmp_path / "cut.ome.tif"  # a copy cut inside the last SubIFD level's tiles is refused on opening
    cut.write_bytes(open(ome, "rb").read()[:-1000])
    with pytest.raises(SlideError, match=r"cut\.ome\.tif.*truncated"):
        open_slide(cut)
    xy = np.array([[0, 0], [1024, 512], [640, 384]])
    with open_slide(plain) as reference:
        np.testing.assert_array_equal(slide.read_patches(xy, 64, level), reference.read_patches(xy, 64, level))

    tiling = TilingConfig(patch_size=64, mpp=1.0, backend="auto")
    tiles = {}
    for name, path in (("ome", ome), ("plain", plain)):
        report = RunReport(tmp_path / f"{name}.json")
        store = CoordsStore(tmp_path / name)
        tiles[name] = prepare_coords([{"slide_id": "s", "image": path}], tiling, store, report, progress=False)["s"]
        assert not report.failed
    assert tiles["ome"]["level"] == tiles["plain"]["level"] == 1 and len(tiles["ome"]["coords"]) > 20
    np.testing.assert_array_equal(tiles["ome"]["coords"], tiles["plain"]["coords"])


@pytest.mark.parametrize("compression,alpha", [("jpeg2000", False), ("webp", False), ("zlib", True)])
def test_tiles_cucim_cannot_decode_are_read_by_the_next_backend(tissue, tmp_path, compression, alpha):
    path = write_pyramid(tmp_path / f"{compression}.tif", tissue, compression, alpha)
    if "cucim" in available_backends():  # (cuCIM's wheels are Linux x86-64 only)
        with pytest.raises(SlideError, match=rf"{compression}\.tif.*cucim: .*cuCIM cannot decode level 0"):
            open_slide(path, backend="cucim")
    slide = open_slide(path)
    assert slide.backend != "cucim" and slide.level_count == 3 and slide.mpp == pytest.approx(0.5)
    decoded = tifffile.TiffFile(path).pages[1].asarray()[..., :3]
    xy = np.array([[0, 0], [1000, 600], [256, 512]])
    expected = np.stack([decoded[y // 2 : y // 2 + 64, x // 2 : x // 2 + 64] for x, y in xy])
    np.testing.assert_array_equal(slide.read_patches(xy, 64, 1), expected)


def test_plain_images_are_read_whole_with_their_dpi_as_mpp_and_transparency_as_background(tissue, tmp_path):
    from PIL import Image

    png, jpg, editor = tmp_path / "s.png", tmp_path / "s.jpg", tmp_path / "editor.png"
    rgba = np.concatenate([tissue, np.full(tissue.shape[:2] + (1,), 255, np.uint8)], -1)
    rgba[:64, :64, 3] = 0  # a transparent corner
    Image.fromarray(rgba).save(png, dpi=(25400 / 0.5, 25400 / 0.5))
    Image.fromarray(tissue).save(jpg, quality=95)
    Image.fromarray(tissue).save(editor, dpi=(300, 300))  # an image editor's dpi: 85 um/px, no microscope's
    slide = open_slide(png)
    assert slide.backend == "image" and slide.mpp == pytest.approx(0.5, rel=1e-3) and slide.dimensions == (1536, 1024)
    patches = slide.read_patches(np.array([[0, 0], [700, 500], [1500, 1000]]), 64)
    assert (patches[0] == 255).all()  # transparent = white background, as the other backends composite it
    np.testing.assert_array_equal(patches[1], tissue[500:564, 700:764])
    np.testing.assert_array_equal(patches[2][:24, :36], tissue[1000:, 1500:])  # past the edge: white
    assert (patches[2][24:] == 255).all()
    with pytest.warns(UserWarning, match=r"s\.jpg' has no microns per pixel"):
        assert open_slide(jpg).mpp is None
    assert open_slide(editor, mpp=0.5).mpp == 0.5 and get_slide(editor).mpp is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the pipeline's readers (one per slide and worker process) do not repeat it
        assert get_slide(jpg).mpp is None and get_slide(jpg, mpp=0.5).mpp == 0.5

    tiling = TilingConfig(patch_size=64, mpp=1.0, backend="auto")
    tiles = {}
    for name, entry in (
        ("png", {"image": str(png)}),
        ("tiff", {"image": write_pyramid(tmp_path / "s.tif", tissue, "zlib")}),
    ):
        report = RunReport(tmp_path / f"{name}.json")
        got = prepare_coords([{"slide_id": "s", **entry}], tiling, CoordsStore(tmp_path / name), report, progress=False)
        assert not report.failed
        tiles[name] = {tuple(xy) for xy in got["s"]["coords"].tolist()}
    # the same grid; the tissue mask from an in-memory pyramid may differ from the file's by a few border patches
    assert len(tiles["tiff"]) > 20 and len(tiles["png"] ^ tiles["tiff"]) <= 0.05 * len(tiles["tiff"])


def test_a_plain_image_too_large_to_read_whole_gets_our_error_with_the_fix_not_pillows(tissue, tmp_path, monkeypatch):
    from PIL import Image

    path = tmp_path / "big.png"
    Image.fromarray(tissue).save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100_000)  # Pillow alone would refuse it (over twice its limit)
    monkeypatch.setattr(ImageSlide, "max_pixels", 1_000_000)
    with pytest.raises(SlideError, match=r"big\.png.*1536x1024 image without tiles is too large.*--tile --pyramid"):
        open_slide(path)
    assert Image.MAX_IMAGE_PIXELS == 100_000  # Pillow's own limit is left as it was
    monkeypatch.setattr(ImageSlide, "max_pixels", 2_000_000)
    assert open_slide(path, mpp=0.5).dimensions == (1536, 1024)


def test_a_folder_of_plain_images_is_a_folder_of_slides_unless_it_holds_whole_slide_files(tissue, tmp_path):
    from PIL import Image

    from monai_icmil.inference import list_slides

    Image.fromarray(tissue).save(tmp_path / "b.png")
    Image.fromarray(tissue).save(tmp_path / "a.jpg")
    (tmp_path / "notes.txt").write_text("x")
    assert [p.rsplit("/", 1)[-1] for p in list_slides(tmp_path)] == ["a.jpg", "b.png"]
    write_pyramid(tmp_path / "c.tif", tissue, "zlib")  # beside a slide file, the PNGs are masks or thumbnails
    with pytest.warns(
        UserWarning, match=r"2 plain image\(s\) beside its 1 slide file\(s\) are left out, .*: a\.jpg, b"
    ):
        assert [p.rsplit("/", 1)[-1] for p in list_slides(tmp_path)] == ["c.tif"]
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"no slide files \(.*\.png.*\) in folder"):
        list_slides(tmp_path / "empty")


def test_an_implausible_mpp_in_an_aperio_description_counts_as_none(tissue, tmp_path):
    path = tmp_path / "aperio.svs"
    description = "Aperio Image Library v12.0.0\n1536x1024 [0,0 1536x1024] (256x256) JPEG/RGB Q=90|AppMag = 20|MPP = 50"
    with tifffile.TiffWriter(path) as tif:
        for k, ds in enumerate((1, 4)):
            tif.write(
                block_mean(tissue, ds), tile=(256, 256), photometric="rgb", compression="jpeg", metadata=None,
                description=description if k == 0 else None, subfiletype=1 if k else 0,
            )  # fmt: skip
    for backend in available_backends():
        with pytest.warns(UserWarning, match=r"aperio\.svs' has no microns per pixel"):
            assert open_slide(path, backend=backend).mpp is None, backend


def _write_levels(path, levels, extra=(), marked=True, **opts) -> str:
    """A tiled pyramid of ``levels`` in the main IFD chain (0.5 um/px; the reduced ones marked so unless not
    ``marked``), then ``extra`` images (label, macro)."""
    with tifffile.TiffWriter(path) as tif:
        for k, level in enumerate(levels):
            ds = 2**k
            tif.write(
                level, tile=(256, 256), subfiletype=1 if k and marked else 0, resolution=(1e4 / (0.5 * ds),) * 2,
                resolutionunit="CENTIMETER", metadata=None, **opts,
            )  # fmt: skip
        for image, subfiletype in extra:
            tif.write(image, tile=(128, 128), photometric="rgb", subfiletype=subfiletype, metadata=None)
    return str(path)


@pytest.mark.parametrize("compression", ["zlib", "zstd"])
def test_deflate_or_zstd_tiles_with_a_predictor_are_not_given_to_cucim_which_crashes_on_them(
    tissue, tmp_path, compression
):
    """libvips and GDAL write them; cuCIM 26 segfaults opening one (no error to catch), so it is never tried."""
    levels = [block_mean(tissue, 2**k) for k in range(3)]
    path = _write_levels(tmp_path / "s.tif", levels, photometric="rgb", compression=compression, predictor=True)
    slide = open_slide(path)
    assert slide.backend != "cucim" and slide.level_count == 3
    np.testing.assert_array_equal(slide.read_region((256, 128), 64), tissue[128:192, 256:320])
    if "cucim" in available_backends():
        with pytest.raises(SlideError, match="with a predictor"):
            open_slide(path, "cucim")


def test_a_label_and_a_macro_after_the_pyramid_are_not_levels_on_any_backend(tissue, tmp_path):
    label = np.full((256, 256, 3), 240, np.uint8)
    macro = np.full((512, 768, 3), (180, 190, 200), np.uint8)  # the slide's aspect, a little smaller than level 1
    levels = [block_mean(tissue, 2**k) for k in range(3)]
    path = _write_levels(
        tmp_path / "s.tif", levels, extra=[(label, 1), (macro, 9)], photometric="rgb", compression="zlib"
    )
    for backend in available_backends():
        if backend != "image":
            slide = open_slide(path, backend)
            assert slide.level_dimensions == ((1536, 1024), (768, 512), (384, 256)), backend


def test_sixteen_bit_planar_and_transparent_slides_read_as_8_bit_rgb_on_white(tissue, tmp_path):
    """Our TIFF reader (the one ``auto`` takes for an OME-TIFF pyramid): 16-bit samples scaled to 8 bits (not cut to
    their low byte), one plane per sample stacked (not the red plane alone), alpha composited on white."""
    wide = [block_mean(tissue, 2**k).astype(np.uint16) * 257 + 128 for k in range(3)]  # low byte 128 everywhere
    planar = _write_levels(tmp_path / "planar.tif", [np.moveaxis(block_mean(tissue, 2**k), -1, 0) for k in range(3)],
                           photometric="rgb", compression="zlib", planarconfig="separate")  # fmt: skip
    deep = _write_levels(tmp_path / "deep.tif", wide, photometric="rgb", compression="zlib")
    alpha = np.zeros(tissue.shape[:2] + (1,), np.uint8)
    alpha[:, 768:] = 255  # the left half outside the scanned area
    rgba = _write_levels(tmp_path / "rgba.tif", [np.concatenate([tissue, alpha], -1)], photometric="rgb",
                         compression="zlib", extrasamples=["unassalpha"])  # fmt: skip
    want = tissue[128:192, 800:864]
    for path in (planar, deep, rgba):
        slide = open_slide(path, "tifffile")
        np.testing.assert_allclose(slide.read_region((800, 128), 64).astype(int), want, atol=1, err_msg=path)
    assert (open_slide(rgba, "tifffile").read_region((100, 100), 64) == 255).all()
    assert open_slide(rgba).read_patches(np.array([[0, 0], [800, 128]]), 64, 0).shape == (2, 64, 64, 3)


def test_jpeg_tiles_holding_ycbcr_while_tagged_rgb_are_read_by_the_reader_that_converts_them(tissue, tmp_path):
    """JFIF (YCbCr) JPEG tiles in a page tagged RGB: cuCIM and OpenSlide skip the colour conversion (wrong colours,
    no error); ``auto`` takes our reader, which follows the stream."""
    import imagecodecs

    def tiles(img):
        for ty in range(0, img.shape[0], 256):
            for tx in range(0, img.shape[1], 256):
                yield imagecodecs.jpeg8_encode(np.ascontiguousarray(img[ty : ty + 256, tx : tx + 256]), level=95)

    with tifffile.TiffWriter(tmp_path / "s.tif") as tif:
        tif.write(
            tiles(tissue), shape=tissue.shape, dtype="uint8", tile=(256, 256), photometric="rgb", compression="jpeg",
            compressionargs={"outcolorspace": "RGB"}, subsampling=(1, 1), resolution=(2e4, 2e4),
            resolutionunit="CENTIMETER", metadata=None,
        )  # fmt: skip
    slide = open_slide(tmp_path / "s.tif")
    assert slide.backend == "tifffile"
    got = slide.read_region((256, 256), 256).astype(int)
    assert np.abs(got - tissue[256:512, 256:512]).mean() < 4


def test_a_grayscale_slide_is_refused_naming_the_fix(tissue, tmp_path):
    gray = tissue.mean(-1).astype(np.uint8)
    path = _write_levels(tmp_path / "g.tif", [gray, block_mean(gray[..., None].repeat(3, -1), 2)[..., 0]],
                         photometric="minisblack", compression="zlib")  # fmt: skip
    for backend in ("auto", *[b for b in available_backends() if b != "image"]):
        with pytest.raises(SlideError, match=r"g\.tif': the slide is grayscale .*Export it as RGB"):
            open_slide(path, backend)


def test_a_pyramid_whose_levels_are_not_marked_reduced_is_read_at_its_levels(tissue, tmp_path):
    """cuCIM refuses such a file and OpenSlide sees its full resolution only (every patch read at 2-4x the pixels, the
    tissue mask from level 0): ``auto`` takes our reader, which sees the pyramid."""
    levels = [block_mean(tissue, 2**k) for k in range(3)]
    slide = open_slide(_write_levels(tmp_path / "s.tif", levels, marked=False, photometric="rgb", compression="lzw"))
    assert slide.level_count == 3 and slide.backend == "tifffile"


def _colour_cases(tissue):
    """(name, levels, tifffile options, the refusal's words, whether OpenSlide converts it) of TIFFs whose samples are
    not RGB colours."""
    from PIL import Image

    small = [tissue[:512, :768], block_mean(tissue[:512, :768], 2)]
    cmyk = [np.asarray(Image.fromarray(x).convert("CMYK")) for x in small]
    ycc = [np.asarray(Image.fromarray(x).convert("YCbCr")) for x in small]
    floats = [(x / 255).astype(np.float32) for x in small]
    only_openslide = r"of the readers only OpenSlide converts them to RGB \(backend 'auto' or 'openslide'"
    return small, [
        ("cmyk", cmyk, {"photometric": "separated", "compression": "zlib"}, rf"SEPARATED \(CMYK\): {only_openslide}"),
        (
            "ycc",
            ycc,
            {"photometric": "ycbcr", "subsampling": (1, 1), "compression": "lzw"},
            rf"YCbCr without JPEG compression \(TIFF compression 5\): {only_openslide}",
        ),
        ("gray3", small, {"photometric": "minisblack", "planarconfig": "contig"}, r"grayscale \(tagged MINISBLACK\)"),
        ("float", floats, {"photometric": "rgb"}, r"samples are floating-point.*8-bit RGB"),
    ]


@pytest.mark.parametrize("case", range(4), ids=["cmyk", "ycc", "gray3", "float"])
def test_tiffs_whose_samples_are_not_rgb_colours_go_to_openslide_or_are_refused_naming_the_fix(tissue, tmp_path, case):
    """CMYK and YCbCr in LZW tiles: cuCIM and our reader returned their samples as red, green and blue (wrong colours,
    no error; ``auto`` took cuCIM for the YCbCr file); only OpenSlide (libtiff) converts them, so ``auto`` takes it
    alone and the others refuse. 3-sample grayscale (OpenSlide read its first sample as gray) and float samples
    (OpenSlide failed each read as a "corrupt" file) are refused by every backend."""
    small, cases = _colour_cases(tissue)
    name, levels, opts, words = cases[case]
    path = _write_levels(tmp_path / f"{name}.tif", levels, **opts)
    converted = name in ("cmyk", "ycc") and "openslide" in available_backends()
    for backend in ("auto", *[b for b in available_backends() if b != "image"]):
        if converted and backend in ("auto", "openslide"):
            slide = open_slide(path, backend)
            assert slide.backend == "openslide"
            assert np.abs(slide.read_region((0, 0), (768, 512)).astype(int) - small[0]).mean() < 1.5, backend
        else:
            with pytest.raises(SlideError, match=rf"{name}\.tif': .*{words}"):
                open_slide(path, backend)


def test_sixteen_bit_samples_of_a_declared_narrower_range_are_read_over_that_range(tissue, tmp_path):
    """12-bit data in 16-bit samples with MaxSampleValue 4095 (read almost black over 0-65535 before, and "no tissue
    found"): ``auto`` takes our reader, which scales by the declared maximum (the largest of the samples', so that no
    sample is clipped)."""
    levels = [x.astype(np.uint16) * 16 for x in (tissue, block_mean(tissue, 2))]
    tag = [(281, 3, 3, (4095,) * 3, True)]
    slide = open_slide(_write_levels(tmp_path / "s.tif", levels, photometric="rgb", compression="zlib", extratags=tag))
    assert slide.backend == "tifffile"
    got = slide.read_region((256, 256), 256).astype(int)
    assert np.abs(got - tissue[256:512, 256:512]).mean() < 1.5
    tag = [(281, 3, 3, (3000, 3500, 4095), True)]
    slide = open_slide(_write_levels(tmp_path / "m.tif", levels, photometric="rgb", compression="zlib", extratags=tag))
    assert np.abs(slide.read_region((256, 256), 256).astype(int) - tissue[256:512, 256:512]).mean() < 1.5


def test_sixteen_bit_samples_without_a_declared_range_are_read_over_the_range_their_thumbnail_uses(
    tissue, tmp_path, monkeypatch
):
    """12-bit (or 10-bit) camera data in 16-bit samples without MaxSampleValue read almost black ("no tissue found"):
    the smallest level's brightest sample gives the range (warned about, naming the file and the fix); full 16-bit
    data, and a file with no level small enough to measure, stay 16-bit."""
    import monai_icmil.data.slide as slide_module

    for bits, scale in ((12, 16), (10, 4)):
        levels = [(x.astype(np.uint16) * scale) for x in (tissue, block_mean(tissue, 2), block_mean(tissue, 4))]
        path = _write_levels(tmp_path / f"b{bits}.tif", levels, photometric="rgb", compression="zlib")
        with pytest.warns(
            UserWarning,
            match=rf"b{bits}\.tif' has 16-bit samples without a MaxSampleValue tag and "
            rf"none of its samples is above \d+ on its 384 x 256 level: it is read as {bits}-bit data",
        ):
            slide = open_slide(path)
        assert slide.backend == "tifffile"
        got = slide.read_region((256, 256), 256).astype(int)
        assert np.abs(got - tissue[256:512, 256:512]).mean() < 2, bits
    wide = [block_mean(tissue, 2**k).astype(np.uint16) * 257 for k in range(3)]
    full = _write_levels(tmp_path / "full.tif", wide, photometric="rgb", compression="zlib")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert np.abs(open_slide(full).read_region((256, 256), 256).astype(int) - tissue[256:512, 256:512]).max() <= 1
    monkeypatch.setattr(slide_module, "RANGE_PAGE_PIXELS", 100)  # no level small enough: kept as 16-bit, unwarned
    levels = [x.astype(np.uint16) * 16 for x in (tissue, block_mean(tissue, 2))]
    path = _write_levels(tmp_path / "big.tif", levels, photometric="rgb", compression="zlib")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert open_slide(path, "tifffile").read_region((256, 256), 256).max() <= 16


def test_an_orientation_tag_is_warned_about_and_not_given_to_openslide_which_turns_each_tile(tissue, tmp_path):
    """OpenSlide applies Orientation 3 to every tile on its own (a mosaic); the slide is read as stored instead."""
    levels = [tissue, block_mean(tissue, 2)]
    path = _write_levels(
        tmp_path / "o.tif", levels, photometric="rgb", compression="zstd", extratags=[(274, 3, 1, 3, True)]
    )
    with pytest.warns(UserWarning, match=r"o\.tif' has TIFF Orientation 3 \(not 1\): it is read as stored"):
        slide = open_slide(path)
    assert slide.backend != "openslide"
    assert np.array_equal(slide.read_region((0, 0), 512), tissue[:512, :512])
    # a tag tifffile cannot read as a number is ignored, and the file's other properties are still read
    with tifffile.TiffWriter(tmp_path / "bad.tif", ome=True) as tif:
        physical = {"PhysicalSizeX": 0.5, "PhysicalSizeY": 0.5, "PhysicalSizeXUnit": "µm", "PhysicalSizeYUnit": "µm"}
        opts = {"tile": (256, 256), "photometric": "rgb", "compression": "zlib"}
        tif.write(tissue, subifds=1, metadata=physical, extratags=[(274, 2, 0, "top", True)], **opts)
        tif.write(block_mean(tissue, 2), subfiletype=1, **opts)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        slide = open_slide(tmp_path / "bad.tif")
    assert (slide.backend, slide.level_count, slide.mpp) == ("tifffile", 2, pytest.approx(0.5))


def test_every_backend_reads_glass_white_where_a_patch_leaves_the_slide(tissue, tmp_path):
    """cuCIM filled the part of a region outside the level black; the others (and OpenSlide's background) white."""
    levels = [tissue, block_mean(tissue, 2)]
    path = _write_levels(tmp_path / "s.tif", levels, photometric="rgb", compression="lzw")
    h, w = tissue.shape[:2]
    for backend in [b for b in available_backends() if b != "image"]:
        slide = open_slide(path, backend)
        for xy, level in (((w - 32, h - 48), 0), ((8, h - 8), 0), ((w - 64, 0), 1)):
            got = slide.read_patches([xy], 64, level=level)[0]
            lx, ly = xy[0] // 2**level, xy[1] // 2**level
            lh, lw = levels[level].shape[:2]
            ys, xs = slice(max(0, -ly), min(64, lh - ly)), slice(max(0, -lx), min(64, lw - lx))
            inside = np.zeros((64, 64), bool)
            inside[ys, xs] = True
            assert (got[~inside] == 255).all(), (backend, xy, level)
            want = levels[level][max(0, ly) : ly + 64, max(0, lx) : lx + 64]
            assert np.array_equal(got[ys, xs], want), (backend, xy, level)  # the slide's own pixels


def test_a_grayscale_plain_image_is_refused_as_a_grayscale_tiff_is(tissue, tmp_path):
    from PIL import Image

    Image.fromarray(tissue.mean(-1).astype(np.uint8)).save(tmp_path / "g.png")
    with pytest.raises(SlideError, match=r"g\.png': the image is grayscale \(mode L\).*Export it as RGB"):
        open_slide(tmp_path / "g.png", mpp=0.5)


def test_a_photo_is_read_turned_by_its_exif_orientation_as_viewers_show_it(tissue, tmp_path):
    from PIL import Image

    src = tissue[:300, :500]
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    Image.fromarray(src).save(tmp_path / "p.png", exif=exif.tobytes())
    slide = open_slide(tmp_path / "p.png", mpp=0.5)
    assert slide.dimensions == (300, 500)
    assert np.array_equal(slide.read_region((0, 0), (300, 500)), np.rot90(src, -1))
