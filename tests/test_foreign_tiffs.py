# Copyright (c) monai-icmil contributors
# Licensed under the Apache License, Version 2.0 (the "License");
"""TIFF layouts other writers use that the readers misread without an error: a label image stored before level 0
(Ventana), levels stored coarsest first, a Philips description's pixel spacing, resolution tags without a unit, pixels
that are not square, sparse tiles, premultiplied alpha, levels at a non-integer downsample, and a narrow slide's
tissue mask."""

from __future__ import annotations

import struct
import warnings

import numpy as np
import pytest
import tifffile

from monai_icmil.data.slide import _ome_mpp, _philips_mpp, available_backends, block_mean, open_slide
from monai_icmil.data.synthetic import SyntheticSlideConfig, render_slide
from monai_icmil.data.tiling import TilingConfig

WSI_BACKENDS = [b for b in available_backends() if b != "image"]


@pytest.fixture(scope="module")
def tissue() -> np.ndarray:
    return render_slide((3, 1), True, SyntheticSlideConfig(width=1536, height=1024))["image"]


def _level(tif, img, ds, k, compression="zlib", per_unit=2e4, unit="CENTIMETER"):
    """Level ``k`` (reduced unless 0) at downsample ``ds``: 0.5 um/px at level 0 (``per_unit``: pixels per unit)."""
    tif.write(
        img, tile=(256, 256), photometric="rgb", compression=compression, subfiletype=1 if k else 0, metadata=None,
        resolution=(per_unit / ds,) * 2, resolutionunit=unit,
    )  # fmt: skip


@pytest.mark.parametrize("tiled_label", [False, True])
def test_a_label_stored_before_level_0_is_not_taken_for_the_slide(tissue, tmp_path, tiled_label):
    """Ventana writes its label image first. `auto` opened a stripped one as the whole slide (a 400x300 image read
    whole); after a tiled one OpenSlide listed level 1 as level 0, with level 0's mpp."""
    path = str(tmp_path / "ventana.tif")
    label = np.full((300, 400, 3), (200, 210, 220), np.uint8)
    with tifffile.TiffWriter(path) as tif:
        layout = {"tile": (128, 128)} if tiled_label else {"rowsperstrip": 16}
        tif.write(label, photometric="rgb", compression="zlib", metadata=None, description="Label Image", **layout)
        for k, ds in enumerate((1, 2, 4)):
            _level(tif, block_mean(tissue, ds), ds, k)
    slide = open_slide(path)
    assert slide.dimensions == (1536, 1024) and slide.level_count == 3 and slide.mpp == pytest.approx(0.5)
    np.testing.assert_array_equal(slide.read_region((512, 256), 64), tissue[256:320, 512:576])
    if tiled_label and "openslide" in WSI_BACKENDS:  # named, it refuses rather than misreads
        with pytest.raises(Exception, match=r"openslide: sees a 768x512 level 0, but the file's largest image is"):
            open_slide(path, "openslide")


def test_an_ome_tiff_with_a_label_first_and_another_scene_gives_level_0s_pyramid_and_mpp(tissue, tmp_path):
    """OME-XML names each image's first IFD: the mpp is the level-0 page's image's (not the label's, stored first),
    and a second scene of the same aspect is not taken for a level between the SubIFD levels."""
    path = str(tmp_path / "scenes.ome.tif")
    other = np.ascontiguousarray(tissue[:668, :1002])  # another scene of the slide's aspect, 1.53 times smaller
    opts = {"tile": (256, 256), "photometric": "rgb", "compression": "zlib"}

    def physical(size):
        return {"PhysicalSizeX": size, "PhysicalSizeY": size, "PhysicalSizeXUnit": "µm", "PhysicalSizeYUnit": "µm"}

    with tifffile.TiffWriter(path, ome=True) as tif:
        tif.write(np.full((300, 400, 3), 200, np.uint8), metadata={"Name": "label", **physical(20.0)}, **opts)
        tif.write(tissue, subifds=2, metadata={"Name": "slide", **physical(0.5)}, **opts)
        for ds in (2, 4):
            tif.write(block_mean(tissue, ds), subfiletype=1, **opts)
        tif.write(other, metadata={"Name": "scene 2", **physical(0.5)}, **opts)
        tif.write(np.full((128, 192, 3), 30, np.uint8), metadata={"Name": "scene 3", **physical(0.5)}, **opts)
    opened = open_slide(path)  # (scene 3 has the slide's aspect and is smaller than its last level: not a level)
    assert opened.level_dimensions == ((1536, 1024), (768, 512), (384, 256)) and opened.mpp == pytest.approx(0.5)
    np.testing.assert_array_equal(opened.read_region((256, 256), 64, level=1), block_mean(tissue, 2)[128:192, 128:192])


def test_levels_stored_coarsest_first_give_level_0_and_its_mpp(tissue, tmp_path):
    """The mpp came from the first page (the coarsest level: 4x too large), and our reader saw one level."""
    path = str(tmp_path / "ascending.tif")
    with tifffile.TiffWriter(path) as tif:
        for k, ds in enumerate((4, 2, 1)):
            _level(tif, block_mean(tissue, ds), ds, 0 if ds == 1 else 1)
    for backend in ["auto", *[b for b in WSI_BACKENDS if b != "openslide"]]:
        slide = open_slide(path, backend)
        assert slide.level_dimensions == ((1536, 1024), (768, 512), (384, 256)), backend
        assert slide.mpp == pytest.approx(0.5), backend
        np.testing.assert_array_equal(slide.read_region((64, 128), 32), tissue[128:160, 64:96])


def test_resolution_tags_without_a_unit_are_in_inches(tissue, tmp_path):
    """TIFF's default ResolutionUnit is the inch (as OpenSlide reads it); the tags were ignored without one."""
    path = str(tmp_path / "nounit.tif")
    with tifffile.TiffWriter(path) as tif:
        for k, ds in enumerate((1, 2)):
            _level(tif, block_mean(tissue, ds), ds, k, per_unit=101600, unit="INCH")  # 0.25 um/px in pixels per inch
    with tifffile.TiffFile(path) as tif:
        spots = [p.tags["ResolutionUnit"].offset for p in tif.pages]
    with open(path, "r+b") as f:  # the tag's code overwritten with an unknown one: the file has no ResolutionUnit
        for offset in spots:
            f.seek(offset)
            f.write(struct.pack("<H", 65000))
    with tifffile.TiffFile(path) as tif:
        assert "ResolutionUnit" not in tif.pages.first.tags
    for backend in ["auto", *WSI_BACKENDS]:
        assert open_slide(path, backend).mpp == pytest.approx(0.25), backend


def _philips_xml(spacing_mm: float, levels: int) -> str:
    """A Philips DPUfsImport description: the scan's pixel spacing, each level's, and a macro image's coarser one."""

    def attr(value):
        return (
            '<Attribute Name="DICOM_PIXEL_SPACING" Group="0x0028" Element="0x0030" PMSVR="IDoubleArray">'
            f"&quot;{value:.9g}&quot; &quot;{value:.9g}&quot;</Attribute>"
        )

    reps = "".join(
        f'<DataObject ObjectType="PixelDataRepresentation">{attr(spacing_mm * 2**k)}</DataObject>'
        for k in range(levels)
    )
    return (
        '<?xml version="1.0" encoding="UTF-8" ?>\n<DataObject ObjectType="DPUfsImport">'
        '<Attribute Name="PIM_DP_SCANNED_IMAGES" Group="0x301D" Element="0x1003" PMSVR="IDataObjectArray"><Array>'
        f'<DataObject ObjectType="DPScannedImage">{attr(0.0315)}'
        '<Attribute Name="PIM_DP_IMAGE_TYPE" PMSVR="IString">MACROIMAGE</Attribute></DataObject>'
        '<DataObject ObjectType="DPScannedImage"><Attribute Name="PIM_DP_IMAGE_TYPE" PMSVR="IString">WSI</Attribute>'
        '<Attribute Name="PIIM_PIXEL_DATA_REPRESENTATION_SEQUENCE" PMSVR="IDataObjectArray"><Array>'
        f"{reps}</Array></Attribute></DataObject></Array></Attribute></DataObject>\n"
    )  # fmt: skip


def test_a_philips_description_gives_the_mpp(tissue, tmp_path):
    """Philips TIFFs carry their pixel spacing (mm, row first) only in their XML description: cuCIM and our reader
    found no mpp, OpenSlide 0.227."""
    assert _philips_mpp(_philips_xml(0.000227, 3)) == (pytest.approx(0.227), pytest.approx(0.227))
    anisotropic = _philips_xml(0.00025, 1).replace("&quot;0.00025&quot; &quot;", "&quot;0.0005&quot; &quot;")
    assert _philips_mpp(anisotropic) == (pytest.approx(0.25), pytest.approx(0.5))  # (x, y): DICOM gives y first
    assert _philips_mpp("<DataObject/>") == (None, None)
    # OME's other length units (the angstrom as a letter and as its own sign)
    ome = '<OME><Image><Pixels PhysicalSizeX="{}" PhysicalSizeXUnit="{}" PhysicalSizeY="0.5"/></Image></OME>'
    for size, unit in (("2500", "\u00c5"), ("2500", "\u212b"), ("250000", "pm"), ("0.0000098425", "in")):
        assert _ome_mpp(ome.format(size, unit)) == pytest.approx(0.25, rel=1e-4), unit
    assert _ome_mpp(ome.format("1", "um"), "Y") == 0.5
    path = str(tmp_path / "philips.tiff")
    with tifffile.TiffWriter(path) as tif:
        for k in range(3):
            tif.write(
                block_mean(tissue, 2**k), tile=(256, 256), photometric="rgb", compression="jpeg", metadata=None,
                subfiletype=1 if k else 0, software="Philips DP v1.0",
                description=None if k else _philips_xml(2.27e-4, 3),
            )  # fmt: skip
    for backend in ["auto", *WSI_BACKENDS]:
        assert open_slide(path, backend).mpp == pytest.approx(0.227), backend


def test_pixels_that_are_not_square_are_warned_about(tissue, tmp_path):
    path = str(tmp_path / "aniso.tif")
    with tifffile.TiffWriter(path) as tif:
        tif.write(
            tissue, tile=(256, 256), photometric="rgb", compression="zlib", metadata=None, resolution=(2e4, 1e4),
            resolutionunit="CENTIMETER",
        )  # fmt: skip
    with pytest.warns(UserWarning, match=r"aniso\.tif': its pixels are not square \(0\.5 um wide, 1 um high\)"):
        slide = open_slide(path)
    assert slide.mpp == pytest.approx(0.5)
    square = str(tmp_path / "square.tif")
    with tifffile.TiffWriter(square) as tif:
        _level(tif, tissue, 1, 0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        open_slide(square)


def test_a_sparse_tile_reads_as_glass_on_every_backend_and_is_not_called_damaged(tissue, tmp_path):
    """Philips leaves tiles outside its scanned regions unstored (offset and byte count 0), as GDAL's SPARSE_OK
    does: our reader called the file truncated, cuCIM read the tile black."""
    path = str(tmp_path / "sparse.tif")
    with tifffile.TiffWriter(path) as tif:
        for k, ds in enumerate((1, 2)):
            _level(tif, block_mean(tissue, ds), ds, k, compression="jpeg")
    with tifffile.TiffFile(path) as tif:
        tags = tif.pages.first.tags
        spots = [tags["TileOffsets"].valueoffset, tags["TileByteCounts"].valueoffset]
    with open(path, "r+b") as f:  # tile 0 of level 0 not stored
        for offset in spots:
            f.seek(offset)
            f.write(struct.pack("<I", 0))
    for backend in WSI_BACKENDS:  # cuCIM read it black: it is whitened, as OpenSlide and our reader read it
        slide = open_slide(path, backend)
        patches = slide.read_patches([(10, 10), (600, 300), (224, 100)], 64, 0)
        assert (patches[0] == 255).all(), backend
        assert np.abs(patches[1].astype(int) - tissue[300:364, 600:664]).mean() < 4, backend  # (JPEG)
        assert (patches[2][:, :32] == 255).all(), backend  # across the unstored tile's edge (x 256)
        assert np.abs(patches[2][:, 32:].astype(int) - tissue[100:164, 256:288]).mean() < 4, backend
        grid = np.array([(x, y) for y in range(0, 256, 64) for x in range(0, 512, 64)])  # cuCIM: regions cut up
        read = slide.read_patches(grid, 64, 0)
        assert (read[grid[:, 0] < 256] == 255).all() and not (read[grid[:, 0] >= 256] == 255).all(), backend
    assert open_slide(path, "tifffile").damaged_tiles(0, [(0, 0), (1, 0), (2, 1)], num_workers=1) == set()
    # another page of level 0's size with an unstored tile (a second scene) does not whiten level 0 on cuCIM
    other = str(tmp_path / "two_pages.tif")
    with tifffile.TiffWriter(other) as tif:
        for k, ds in enumerate((1, 2)):
            _level(tif, block_mean(tissue, ds), ds, k)
        _level(tif, np.full_like(tissue, 240), 1, 1)
    with tifffile.TiffFile(other) as tif:
        tags = tif.pages[2].tags
        spots = [tags["TileOffsets"].valueoffset, tags["TileByteCounts"].valueoffset]
    with open(other, "r+b") as f:
        for offset in spots:
            f.seek(offset)
            f.write(struct.pack("<I", 0))
    for backend in [b for b in WSI_BACKENDS if b != "openslide"]:
        np.testing.assert_array_equal(open_slide(other, backend).read_region((10, 10), 64), tissue[10:74, 10:74])


def test_premultiplied_alpha_is_composited_once(tmp_path):
    colour, alpha = np.array([200, 100, 150], np.uint16), 128
    premultiplied = np.broadcast_to((colour * alpha // 255).astype(np.uint8), (512, 512, 3))
    pixels = np.concatenate([premultiplied, np.full((512, 512, 1), alpha, np.uint8)], -1)
    path = str(tmp_path / "assoc.tif")
    with tifffile.TiffWriter(path) as tif:
        tif.write(
            pixels, tile=(256, 256), photometric="rgb", compression="zlib", extrasamples=["assocalpha"], metadata=None,
            resolution=(2e4, 2e4), resolutionunit="CENTIMETER",
        )  # fmt: skip
    want = (colour * alpha + 255 * (255 - alpha)) // 255  # [227 177 202]: the colour on white
    got = open_slide(path, "tifffile").read_region((10, 10), 4)[0, 0].astype(int)
    assert np.abs(got - want).max() <= 1, got


def test_an_unspecified_fourth_sample_is_not_taken_for_alpha(tissue, tmp_path):
    """ExtraSamples 0 (unspecified: a scanner's focus or IR channel, say) is not transparency (0 there read white)."""
    pixels = np.concatenate([tissue[:512, :512], np.zeros((512, 512, 1), np.uint8)], -1)
    path = str(tmp_path / "extra.tif")
    with tifffile.TiffWriter(path) as tif:
        tif.write(
            pixels, tile=(256, 256), photometric="rgb", compression="zlib", extrasamples=["unspecified"],
            metadata=None, resolution=(2e4, 2e4), resolutionunit="CENTIMETER",
        )  # fmt: skip
    np.testing.assert_array_equal(open_slide(path, "tifffile").read_region((64, 32), 96), tissue[32:128, 64:160])


def test_a_level_at_a_non_integer_downsample_is_read_whole_without_a_seam(tmp_path):
    """10001 px over 5000: each 2048-px chunk after the first was read from one pixel too far left."""
    rng = np.random.default_rng(1)
    full, half = rng.integers(0, 256, (600, 10001, 3), np.uint8), rng.integers(0, 256, (300, 5000, 3), np.uint8)
    path = str(tmp_path / "seam.tif")
    with tifffile.TiffWriter(path) as tif:
        for k, level in enumerate((full, half)):
            tif.write(
                level, tile=(256, 256), photometric="rgb", compression="lzw", subfiletype=1 if k else 0, metadata=None,
            )  # fmt: skip
    for backend in [b for b in WSI_BACKENDS if b != "openslide"]:  # (OpenSlide resamples at such a downsample)
        np.testing.assert_array_equal(open_slide(path, backend).read_level(1), half, err_msg=backend)


def test_a_narrow_slide_is_tiled_where_its_tissue_is(tmp_path):
    """The mask's scale was level 0's width over the mask's: 300 px over 9 mask columns (33.3, not 32) put the
    tissue of a needle-core slide 200 px further down than it is."""
    from monai_icmil.data.synthetic import write_slide

    img = np.full((9600, 300, 3), 240, np.uint8)
    img[6400:8000] = (170, 80, 150)
    path = str(tmp_path / "needle.tif")
    write_slide(path, img, mpp=0.25)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (a mask over nearly the whole width)
        tiles = TilingConfig(patch_size=64, mpp=0.5, min_tissue=0.5, min_area_um2=100).tile(
            open_slide(path), device="cpu"
        )
    ys = tiles.coords[:, 1]
    assert ys.min() >= 6400 - 64 and ys.max() + 128 <= 8000 + 64  # (patches of 128 level-0 px, half on tissue)
    assert ys.min() <= 6400 + 64 and ys.max() + 128 >= 8000 - 64  # and the whole band
