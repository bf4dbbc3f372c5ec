# Copyright (c) monai-icmil contributors
# Licensed under the Apache License, Version 2.0 (the "License");
from __future__ import annotations

import json
from pathlib import Path

import pytest

from monai_icmil.data import load_datalist
from monai_icmil.data.camelyon16 import build_camelyon16_datalist

CONFIGS = Path(__file__).resolve().parents[1] / "bundles" / "icmil" / "configs"


def _fake_tree(root: Path) -> None:
    for sub, names in (
        ("training/tumor", [f"tumor_{i:03d}" for i in range(1, 6)]),
        ("training/normal", [f"normal_{i:03d}" for i in range(1, 11)]),
        ("testing/images", [f"test_{i:03d}" for i in range(1, 5)]),
    ):
        (root / sub).mkdir(parents=True, exist_ok=True)
        for n in names:
            (root / sub / f"{n}.tif").write_bytes(b"x")
    (root / "testing" / "reference.csv").write_text(
        "test_001,Tumor,Macro,Primary\ntest_002,Normal\ntest_003,Normal\ntest_004,Tumor,Micro,Primary\n"
    )
    (root / "training" / "lesion_annotations").mkdir()
    (root / "training" / "lesion_annotations" / "tumor_001.xml").write_text(ASAP_XML)


# a tumour square (group _0) with a non-tumour hole (_2), as in Camelyon16's lesion annotations
ASAP_XML = """<?xml version="1.0"?>
<ASAP_Annotations><Annotations>
<Annotation Name="Annotation 0" Type="Polygon" PartOfGroup="_0" Color="#F4FA58"><Coordinates>
<Coordinate Order="0" X="160" Y="160"/><Coordinate Order="1" X="800" Y="160"/>
<Coordinate Order="2" X="800" Y="800"/><Coordinate Order="3" X="160" Y="800"/>
</Coordinates></Annotation>
<Annotation Name="Annotation 1" Type="Polygon" PartOfGroup="_2" Color="#64FE2E"><Coordinates>
<Coordinate Order="0" X="320" Y="320"/><Coordinate Order="1" X="480" Y="320"/>
<Coordinate Order="2" X="480" Y="480"/><Coordinate Order="3" X="320" Y="480"/>
</Coordinates></Annotation>
</Annotations><AnnotationGroups/></ASAP_Annotations>
"""


def test_lesion_annotations_become_ground_truth_masks(tmp_path):
    """The builder attaches each slide's XML outline as its ``tumour_mask``; rasterised, the tumour polygons are
    tumour and the ``_2`` polygons inside them are not."""
    import numpy as np

    from monai_icmil.data.annotations import GroundTruth

    _fake_tree(tmp_path)
    outline = {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [[[0, 0], [9, 0], [9, 9]]]}}
    for name in ("tumor_001", "tumor_002"):  # a GeoJSON beside the XML: the XML
        (tmp_path / "training" / "tumor" / f"{name}.geojson").write_text(json.dumps(outline))
    dl = load_datalist(build_camelyon16_datalist(tmp_path, val_fraction=0.2, seed=1))
    entries = {e["slide_id"]: e for split in dl.values() for e in split}
    assert entries["tumor_001"]["tumour_mask"] == str(tmp_path / "training" / "lesion_annotations" / "tumor_001.xml")
    assert "tumour_mask" not in entries["tumor_003"]
    assert entries["tumor_002"]["tumour_mask"] == str(tmp_path / "training" / "tumor" / "tumor_002.geojson")
    truth = GroundTruth(entries["tumor_001"]["tumour_mask"], (1024, 1024))
    assert truth.mask.shape == (64, 64) and truth.downsample == 16
    coords = np.array([[160, 160], [320, 320], [640, 640], [832, 832], [160, 480]])
    np.testing.assert_allclose(truth.patch_fraction(coords, 160), [1.0, 0.0, 1.0, 0.0, 1.0], atol=0.07)


def test_mask_images_stored_as_0_255_or_0_1_read_alike_and_a_wrong_aspect_is_warned(tmp_path):
    """A label map saved as 0/1 (any mode) is the same tumour region as a 0/255 mask; a mask of another aspect than
    its slide is warned about by name; a missing one names its path."""
    import warnings

    import numpy as np
    from PIL import Image

    from monai_icmil.data.annotations import GroundTruth

    region = np.zeros((32, 64), bool)
    region[8:20, 10:40] = True
    for name, image in {
        "mask_255.png": Image.fromarray(region.astype(np.uint8) * 255),
        "mask_01.png": Image.fromarray(region.astype(np.uint8)),
        "mask_01_16bit.png": Image.fromarray(region.astype(np.uint16)),
        "mask_bilevel.png": Image.fromarray(region).convert("1"),
        "mask_rgb.png": Image.fromarray(np.stack([region.astype(np.uint8) * 255] * 3, -1)),
        # a palette built in its own order (white may be index 0): read by its colours, not its indices
        "mask_quantized.png": Image.fromarray(region.astype(np.uint8) * 255).convert("RGB").quantize(2),
        "mask_01_palette.png": Image.fromarray(region.astype(np.uint8)).convert("P"),
    }.items():
        image.save(tmp_path / name)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            truth = GroundTruth(tmp_path / name, (1024, 512))
        np.testing.assert_array_equal(truth.mask, region, err_msg=name)
        assert truth.downsample == 16
    with pytest.warns(UserWarning, match=r"mask_255.png' \(64 x 32\) does not have its slide's aspect \(1024 x 1024\)"):
        GroundTruth(tmp_path / "mask_255.png", (1024, 1024))
    with pytest.raises(FileNotFoundError, match=r"tumour mask '.*nowhere.png' does not exist"):
        GroundTruth(tmp_path / "nowhere.png", (1024, 512))


def test_official_layout_maps_to_labels_and_splits(tmp_path):
    _fake_tree(tmp_path)
    path = build_camelyon16_datalist(tmp_path, val_fraction=0.2, seed=1)
    dl = load_datalist(path)
    train, val, test = dl["training"], dl["validation"], dl["test"]
    assert len(train) + len(val) == 15 and len(test) == 4
    assert {(e["slide_id"], e["label"]) for e in test} == {
        ("test_001", 1),
        ("test_002", 0),
        ("test_003", 0),
        ("test_004", 1),
    }
    labels = {e["slide_id"]: e["label"] for e in train + val}
    assert all(v == 1 for k, v in labels.items() if k.startswith("tumor")) and all(
        v == 0 for k, v in labels.items() if k.startswith("normal")
    )
    assert sorted(e["label"] for e in val) == [0, 0, 1]  # 20 % of each class
    again = json.loads(build_camelyon16_datalist(tmp_path, tmp_path / "again.json", 0.2, 1).read_text())
    assert [e["slide_id"] for e in again["validation"]] == [e["slide_id"] for e in val]


def test_missing_reference_rows_are_listed(tmp_path):
    _fake_tree(tmp_path)
    (tmp_path / "testing" / "reference.csv").write_text("test_001,Tumor\n")
    with pytest.raises(ValueError, match="test_002, test_003, test_004"):
        build_camelyon16_datalist(tmp_path)


def test_paper_recipe_override_resolves_on_top_of_train_json(tmp_path):
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config([str(CONFIGS / "train.json"), str(CONFIGS / "camelyon16.json")])
    parser["bundle_root"] = "/bundle"
    parser["dataset_dir"] = str(tmp_path)
    tiling = parser.get_parsed_content("tiling")
    assert tiling["level"] == 1 and tiling["patch_size"] == 256 and tiling["mpp"] is None
    embedder = parser.get_parsed_content("embedder")  # the starting embedder's factory
    assert embedder.keywords == {"name": "resnet50_trunc", "weights": "/bundle/models/resnet50_imagenet.pth"}
    assert parser.get_parsed_content("aggregator").func.__name__ == "ABMIL"
    assert parser.get_parsed_content("embedder_phase#optimizer").keywords["lr"] == 1e-5
    assert parser.get_parsed_content("bag_phase#optimizer").keywords["lr"] == 2e-4
    assert parser.get_parsed_content("bag_phase#witness_search") is False  # the paper has no witness search
    schedule = parser.get_parsed_content("bag_phase#lr_scheduler")  # the paper's step schedule: x0.2 at half
    assert schedule.func.__name__ == "StepLR" and schedule.keywords == {"step_size": 100, "gamma": 0.2}
    _fake_tree(tmp_path)
    path = parser.get_parsed_content("build_datalist")  # the run id that builds the datalist
    assert Path(path) == tmp_path / "datalist.json" and len(json.loads(Path(path).read_text())["test"]) == 4


def test_annotations_with_a_decimal_comma_read_as_points_and_unreadable_masks_name_the_file_and_fix(tmp_path):
    """ASAP in a comma locale writes ``X="160,5"``: the same outline as ``160.5``; a coordinate that is no number,
    and a mask file no image reader takes (or too large for one), are errors naming the file and what to give."""
    import numpy as np
    from PIL import Image

    from monai_icmil.data.annotations import GroundTruth, read_xml_polygons

    (tmp_path / "point.xml").write_text(ASAP_XML.replace('X="800"', 'X="800.5"'))
    (tmp_path / "comma.xml").write_text(ASAP_XML.replace('X="800"', 'X="800,5"'))
    point, comma = read_xml_polygons(tmp_path / "point.xml"), read_xml_polygons(tmp_path / "comma.xml")
    assert [g for g, _ in comma] == ["_0", "_2"] and comma[0][1][1, 0] == 800.5
    np.testing.assert_array_equal(np.concatenate([p for _, p in point]), np.concatenate([p for _, p in comma]))
    (tmp_path / "bad.xml").write_text(ASAP_XML.replace('X="800"', 'X="eight"', 1))
    with pytest.raises(ValueError, match=r"bad\.xml': a coordinate of annotation 'Annotation 0' is not a number"):
        GroundTruth(tmp_path / "bad.xml", (1024, 1024))
    (tmp_path / "mask.png").write_bytes(b"not an image")
    with pytest.raises(ValueError, match=r"mask\.png' cannot be read as a mask image .*low-resolution mask"):
        GroundTruth(tmp_path / "mask.png", (1024, 1024))
    Image.fromarray(np.zeros((64, 64), np.uint8)).save(tmp_path / "huge.png")
    limit = Image.MAX_IMAGE_PIXELS
    try:
        Image.MAX_IMAGE_PIXELS = 64 * 64 // 4  # a full-resolution mask, as PIL sees one over twice its limit
        with pytest.raises(ValueError, match=r"huge\.png' cannot be read.*DecompressionBombError"):
            GroundTruth(tmp_path / "huge.png", (1024, 1024))
    finally:
        Image.MAX_IMAGE_PIXELS = limit


def _square(x0: float, y0: float, x1: float, y1: float) -> list[list[float]]:
    return [[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]]


def _feature(rings: list, name: str | None = None, object_type: str = "annotation", kind: str = "Polygon") -> dict:
    props: dict = {"objectType": object_type}
    if name is not None:
        props["classification"] = {"name": name, "color": [200, 0, 0]}
    return {"type": "Feature", "geometry": {"type": kind, "coordinates": rings}, "properties": props}


def _truth(path: Path, features: object, size: tuple[int, int] = (1024, 1024)):
    from monai_icmil.data.annotations import GroundTruth

    path.write_text(json.dumps(features))
    return GroundTruth(path, size)


def _probe(truth, *corners: tuple[int, int]) -> list[float]:
    import numpy as np

    return [round(float(f), 2) for f in truth.patch_fraction(np.array(corners, float), 64)]


def test_qupath_geojson_outlines_read_as_the_same_ground_truth_as_asap_xml(tmp_path):
    """QuPath's GeoJSON export: the tumour outline with a hole gives the ASAP file's mask; a Stroma outline, a
    tumour-classified cell detection (``objectType`` or ``object_type``), a TMA core and a point are left out; an
    Ignore* outline is cut out; derived classes (``names``, ``parentClass``) are read whole; unclassified outlines
    are tumour only where no outline is classified as tumour (warned about either way where other outlines exist)."""
    import warnings

    import numpy as np

    from monai_icmil.data.annotations import GroundTruth, read_geojson_polygons

    (tmp_path / "a.xml").write_text(ASAP_XML)
    asap = GroundTruth(tmp_path / "a.xml", (1024, 1024)).mask
    point = {"type": "Feature", "geometry": {"type": "Point", "coordinates": [900, 900]}, "properties": {}}
    features = [
        _feature([_square(160, 160, 800, 800), _square(320, 320, 480, 480)], "Tumor"),  # the hole as a ring
        _feature([_square(850, 850, 1000, 1000)], "Stroma"),
        _feature([_square(850, 0, 1000, 100)], "Tumor", object_type="cell"),
        {
            **_feature([_square(0, 0, 100, 100)]),
            "properties": {"object_type": "detection", "classification": {"name": "Neoplastic"}},
        },  # a nucleus segmenter's QuPath-style output
        _feature([_square(0, 850, 100, 1000)], object_type="tmaCore"),
        point,
    ]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        np.testing.assert_array_equal(
            _truth(tmp_path / "a.geojson", {"type": "FeatureCollection", "features": features}).mask, asap
        )
    assert [g for g, _ in read_geojson_polygons(tmp_path / "a.geojson")] == ["Tumor"]
    unclassified = _feature([_square(0, 850, 100, 1000)])  # a tumour outline left unclassified, likely
    with pytest.warns(UserWarning, match=r"b\.geojson': 1 unclassified outline\(s\), no larger than its tumour"):
        np.testing.assert_array_equal(_truth(tmp_path / "b.geojson", features + [unclassified]).mask, asap)

    # QuPath 0.2's export: a JSON list, "id" naming the object kind; unclassified outlines are the tumour here
    plain = [
        {"type": "Feature", "id": "PathAnnotationObject", "geometry": {"type": "Polygon", "coordinates": [r]}}
        for r in (_square(160, 160, 800, 800),)
    ]
    plain.append({"type": "Feature", "id": "PathCellObject", "geometry": {"type": "Polygon", "coordinates": [
        _square(0, 0, 100, 100)]}})  # fmt: skip
    plain.append(_feature([_square(320, 320, 480, 480)], "Ignore*"))
    np.testing.assert_array_equal(_truth(tmp_path / "c.json", plain).mask, asap)
    # an unclassified outline around a Necrosis one is tissue, likely: taken as tumour, warned about; QuPath's usual
    # exports (a tissue outline around tumour ones, a thresholder's Region* around unclassified tumour) are not
    with pytest.warns(UserWarning, match=r"d\.json': 1 unclassified outline\(s\) taken as tumour enclose outlines "
                      r"of other classes \(Necrosis\)"):  # fmt: skip
        _truth(tmp_path / "d.json", [plain[0], _feature([_square(200, 200, 300, 300)], "Necrosis")])
    tissue = _feature([_square(0, 0, 1024, 1024)])
    region = _feature([_square(0, 0, 1024, 1024)], "Region*")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        truth = _truth(tmp_path / "tissue.json", [tissue, _feature([_square(160, 160, 800, 800)], "Tumor")])
        assert _probe(truth, (0, 0), (320, 320)) == [0, 1]
        assert _probe(_truth(tmp_path / "region.json", [region, plain[0]]), (0, 0), (320, 320)) == [0, 1]

    def classified(square: list, classification: dict) -> dict:
        return {**_feature([square]), "properties": {"classification": classification}}

    derived = [
        classified(_square(0, 0, 512, 512), {"names": ["Tumor", "Positive"]}),  # QuPath 0.4+
        classified(_square(512, 512, 1024, 1024), {"names": ["Stroma", "Positive"]}),
        classified(_square(0, 512, 512, 1024), {"name": "Positive", "parentClass": {"name": "Tumor"}}),  # 0.2-0.3
        classified(_square(512, 0, 1024, 512), {"name": "Positive", "parentClass": "Tumor"}),
    ]
    truth = _truth(tmp_path / "derived.geojson", derived)
    assert _probe(truth, (0, 0), (600, 600), (0, 600), (600, 0)) == [1.0, 0.0, 1.0, 1.0]
    assert [g for g, _ in read_geojson_polygons(tmp_path / "derived.geojson")] == ["Tumor: Positive"] * 3

    # an island inside a hole, listed first, and a tumour outline overlapped by another's hole both stay tumour
    multi = _feature([[_square(384, 384, 512, 512)], [_square(160, 160, 960, 960), _square(320, 320, 640, 640)]],
                     "Metastasis", kind="MultiPolygon")  # fmt: skip
    over = _feature([_square(0, 0, 500, 500)], "Tumor")
    truth = _truth(tmp_path / "multi.geojson", [multi, over])
    assert _probe(truth, (448, 448), (320, 320), (576, 576), (800, 800), (0, 0), (976, 976)) == [1, 1, 0, 1, 1, 0]
    # a name, or DSA's label, where it names a class
    named = [
        {**_feature([_square(0, 0, 512, 512)]), "properties": {"name": "Tumor"}},
        {**_feature([_square(512, 512, 1024, 1024)]), "properties": {"label": {"value": "Stroma"}, "group": "Stroma"}},
        {**_feature([_square(0, 512, 512, 1024)]), "properties": {"name": "Annotation 3"}},  # no class: left out
    ]
    with pytest.warns(UserWarning, match="1 unclassified outline"):
        assert _probe(_truth(tmp_path / "named.geojson", named), (0, 0), (600, 600), (0, 600)) == [1, 0, 0]
    # DSA (large_image) writes each element's shape as properties.type: outlines all the same; a class written as
    # str(None) is no class (not the ASAP exclusion group "None"); Camelyon's one-word terms are tumour
    dsa = [
        {**_feature([_square(0, 0, 512, 512)]), "properties": {"type": "polyline", "label": {"value": "Tumor"}}},
        {**_feature([_square(512, 512, 1024, 1024)]), "properties": {"type": "rectangle", "group": "Micrometastasis"}},
        {**_feature([_square(0, 512, 512, 1024)]), "properties": {"classification": {"names": [None]}}},
    ]
    with pytest.warns(UserWarning, match=r"dsa\.geojson': 1 unclassified outline"):
        assert _probe(_truth(tmp_path / "dsa.geojson", dsa), (0, 0), (600, 600), (0, 600)) == [1, 1, 0]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        none = [classified(_square(0, 0, 512, 512), {"name": "None"})]
        assert _probe(_truth(tmp_path / "none.geojson", none), (0, 0)) == [1]


def test_tumour_class_names_are_told_from_their_negations_and_the_tissue_beside_tumour():
    from monai_icmil.data.datalist import is_tumour_class

    for name in (
        "Tumor",
        "Tumour",
        "metastases",
        "Adenocarcinoma",
        "Carcinoma in situ",
        "Malignant",
        "Tumor: Positive",
    ):
        assert is_tumour_class(name), name
    for name in ("Non-tumour", "Tumour-free", "Tumor free area", "Non-tumor tissue", "Benign lesion", "Benign tumour",
                 "Tumor stroma", "Tumor-associated stroma", "Peritumoral stroma", "Tumour-infiltrating lymphocytes",
                 "Stroma", "Necrosis", "Positive", "Region*", "Other", "No tumour", "Adenoma",
                 "Necrotic tumour"):  # fmt: skip
        assert not is_tumour_class(name), name


def test_geojson_that_is_not_usable_names_the_file_and_feature_and_a_file_without_tumour_is_warned(tmp_path):
    """Not JSON, JSON that is not GeoJSON (DSA's annotation documents), a coordinate that is not a number of level-0
    pixels: errors naming the file (and the feature) and the fix; no tumour outline (none classified so, or only
    points and detections, or none at all, unless the slide is of class 0) and outlines outside the slide: warnings
    naming the file."""
    import warnings

    from monai_icmil.data.annotations import GroundTruth

    (tmp_path / "broken.geojson").write_text("{not json")
    with pytest.raises(ValueError, match=r"broken\.geojson' is not readable JSON .*GeoJSON"):
        GroundTruth(tmp_path / "broken.geojson", (1024, 1024))
    with pytest.raises(ValueError, match=r"dsa\.json' is JSON but not GeoJSON .*DSA/Girder"):
        _truth(tmp_path / "dsa.json", [{"annotation": {"name": "t", "elements": [{"type": "polyline"}]}}])
    bad = [_feature([_square(0, 0, 10, 10)], "Tumor"), {**_feature([[[0, 0], ["x", 1], [5, 5]]], "Tumor"), "id": "u2"}]
    with pytest.raises(ValueError, match=r"bad\.geojson', feature 1 id u2: a Polygon's coordinates are not rings"):
        _truth(tmp_path / "bad.geojson", bad)
    with pytest.raises(ValueError, match=r"huge\.geojson', feature 0: .*beyond 1e\+08"):
        _truth(tmp_path / "huge.geojson", [_feature([_square(0, 0, 1e12, 1e12)], "Tumor")])
    flat = [
        _feature([900, 900], "Tumor", kind="Point"),
        _feature([[0, 0], [9, 9]], "Tumor", kind="LineString"),
        _feature([_square(0, 0, 99, 99)], "Tumor", object_type="detection"),
    ]
    for name, features, why in (
        (
            "stroma",
            [_feature([_square(0, 0, 500, 500)], "Stroma")],
            r"none of its 1 outlines is tumour \(classes: Stroma",
        ),
        ("points", flat, r"none of its 0 outlines is tumour \(classes: -; skipped: 1 not outlines, 2 without area\)"),
        ("empty", {"type": "FeatureCollection", "features": []}, r"none of its 0 outlines is tumour"),
    ):
        with pytest.warns(UserWarning, match=rf"{name}\.geojson': {why}"):
            assert not _truth(tmp_path / f"{name}.geojson", features).mask.any()
        with warnings.catch_warnings():  # a normal slide's: as expected
            warnings.simplefilter("error")
            assert not GroundTruth(tmp_path / f"{name}.geojson", (1024, 1024), label=0).mask.any()
    for coordinates in ([[[0], [5], [9]]], 7):
        with pytest.raises(ValueError, match=r"ring\.geojson', feature 0: a MultiPolygon's coordinates are not rings"):
            _truth(tmp_path / "ring.geojson", _feature(coordinates, "Tumor", kind="MultiPolygon"))
    nuclei = [_feature([_square(x, y, x + 20, y + 20)], "Neoplastic") for x in range(0, 1000, 40) for y in (0, 100)]
    with pytest.warns(UserWarning, match=r"nuclei\.geojson': 50 of its 50 tumour outlines are under 32 level-0 pixels"):
        _truth(tmp_path / "nuclei.geojson", nuclei)
    with pytest.warns(UserWarning, match=r"out\.geojson': 1 of its 2 outlines lie mostly outside the slide"):
        _truth(tmp_path / "out.geojson", [_feature([_square(0, 0, 99, 99)]), _feature([_square(5000, 0, 6000, 99)])])
