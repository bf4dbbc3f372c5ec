# Copyright (c) monai-icmil contributors
# Licensed under the Apache License, Version 2.0 (the "License");
"""predict_slides on its own (the bundle's inference is tests/test_bundle.py's): refusals before any work, a writer
that fails on one slide, and a run that scores no slide (here and through the MLflow model)."""

from __future__ import annotations

import csv
import json
import warnings
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

from monai_icmil.data.synthetic import SyntheticSlideConfig, render_slide, write_slide
from monai_icmil.data.tiling import TilingConfig
from monai_icmil.engines import Embed
from monai_icmil.engines.bag_phase import save_bag_classifier
from monai_icmil.handlers.writers import GeoJSONWriter, HeatmapWriter, SlideWriter, TopPatchesWriter
from monai_icmil.inference import NoSlideScored, list_slides, predict_slides
from monai_icmil.networks import create_aggregator, create_embedder
from monai_icmil.serving import SlideClassifierModel


def test_prediction_refuses_a_datalist_as_slides_wrong_class_names_and_an_implausible_mpp_before_any_work(tmp_path):
    (tmp_path / "test.csv").write_text("image,label\na.svs,1\n")
    with pytest.raises(ValueError, match=r"test\.csv: a datalist, not a slide.*use evaluate\.json \(--split\)"):
        list_slides(tmp_path / "test.csv")
    embedder = create_embedder("resnet18_trunc", input_size=32)
    three = save_bag_classifier(tmp_path / "bag.pt", create_aggregator("abmil", embedder.out_dim, 3, hidden_dim=8))
    (tmp_path / "s.tif").write_bytes(b"not read before the check")
    with pytest.raises(
        ValueError, match=r"has 2 name\(s\) but bag classifier '.*bag\.pt' has 3 classes.*--class_names"
    ):
        predict_slides(
            [str(tmp_path / "s.tif")], embedder, three, TilingConfig(patch_size=32, mpp=1.0), tmp_path / "out",
            class_names=["normal", "tumour"], progress=False,
        )  # fmt: skip
    with pytest.raises(ValueError, match=r"'assume_mpp' 250 is outside 0.01-20 microns per pixel"):
        predict_slides(
            [str(tmp_path / "s.tif")], embedder, three, TilingConfig(patch_size=32, mpp=1.0), tmp_path / "out",
            assume_mpp=250, progress=False,
        )  # fmt: skip
    assert not (tmp_path / "out" / "coords").exists()  # refused before any slide was tiled


class FailsOn(SlideWriter):
    def __init__(self, slide_id: str):
        self.slide_id = slide_id

    def outputs(self, pred):
        return [pred.output_dir / f"{pred.slide_id}.ok"]

    def write(self, pred) -> None:
        if pred.slide_id == self.slide_id:
            raise OSError("disk full")
        self.outputs(pred)[0].write_text("ok")


def test_a_writer_failing_on_one_slide_keeps_every_probability_and_the_other_outputs(tmp_path):
    config = SyntheticSlideConfig(width=512, height=384)
    for i, tumour in enumerate((True, False)):
        write_slide(tmp_path / "slides" / f"s{i}.tif", render_slide((i, 0), tumour, config)["image"], mpp=0.5)
    embedder = create_embedder("resnet18_trunc", input_size=32)
    bag = save_bag_classifier(tmp_path / "bag.pt", create_aggregator("abmil", embedder.out_dim, 2, hidden_dim=8))
    out = tmp_path / "out"
    out.mkdir()
    for sid in ("s0", "s1"):  # an earlier run's outputs
        (out / f"{sid}.ok").write_text("earlier run")
    writers = [FailsOn("s0"), GeoJSONWriter(), HeatmapWriter(), TopPatchesWriter(k=2)]
    with pytest.warns(
        UserWarning, match=r"s0\.tif': FailsOn failed \(OSError: disk full\); its probabilities and other"
    ):
        rows = predict_slides(
            tmp_path / "slides", embedder, bag, TilingConfig(patch_size=32, mpp=1.0, min_area_um2=0.0), out,
            writers=writers, class_names=["normal", "tumour"], progress=False,
        )  # fmt: skip
    assert [r["slide_id"] for r in rows] == ["s0", "s1"]
    assert [r["slide"] for r in csv.DictReader(open(out / "probabilities.csv"))] == ["s0", "s1"]
    assert (out / "s0.geojson").is_file() and (out / "s1.geojson").is_file() and (out / "s1.ok").is_file()
    assert not (out / "s0.ok").exists()  # the earlier run's picture is not passed off as this run's
    assert (out / "s1.ok").read_text() == "ok"
    for sid in ("s0", "s1"):  # every built-in writer names the files it writes (removed if it fails)
        assert all(p.is_file() for w in writers[1:] for p in w.outputs(SimpleNamespace(output_dir=out, slide_id=sid)))
    report = json.loads((out / "report.json").read_text())
    assert report["failed"] == {} and report["outputs_failed"]["s0"]["FailsOn"] == "OSError: disk full"
    assert set(report["outputs_failed"]) == {"s0"}


def test_a_failing_writer_whose_outputs_cannot_be_named_or_removed_costs_no_slide(tmp_path, monkeypatch):
    """A user writer with a list (not a method) called ``outputs``, or files that cannot be removed: warned, not raised;
    and a slide without a ground-truth mask (any more) keeps no earlier run's comparison picture."""
    from monai_icmil.handlers.writers import GroundTruthWriter
    from monai_icmil.inference import _remove_outputs

    class Listing(SlideWriter):
        outputs = ["a.jpg"]

        def write(self, pred):
            raise OSError("disk full")

    pred = SimpleNamespace(output_dir=tmp_path, slide_id="s", tumour_mask=None)
    _remove_outputs(Listing(), pred)  # not callable: nothing removed, nothing raised
    (tmp_path / "s_heatmap.jpg").write_text("earlier")
    monkeypatch.setattr(HeatmapWriter, "outputs", lambda self, pred: [pred.output_dir / "s_heatmap.jpg", 1.5])
    with pytest.warns(UserWarning, match="HeatmapWriter: an earlier output could not be removed"):
        _remove_outputs(HeatmapWriter(), pred)
    assert not (tmp_path / "s_heatmap.jpg").exists()
    (tmp_path / "s_vs_truth.jpg").write_text("earlier")
    GroundTruthWriter().write(pred)
    assert not (tmp_path / "s_vs_truth.jpg").exists()


class LosesOne(Embed):
    """Embeds every slide, then a slide's feature file goes missing (a cleaned disk, a failed copy)."""

    def __call__(self, tiles, embedder, store, *args, **kwargs):
        result = super().__call__(tiles, embedder, store, *args, **kwargs)
        store.path("s0").unlink()
        return result


def test_a_slide_without_current_features_is_not_called_a_slide_without_tissue(tmp_path):
    config = SyntheticSlideConfig(width=512, height=384)
    for i in range(2):
        write_slide(tmp_path / "slides" / f"s{i}.tif", render_slide((i, 0), True, config)["image"], mpp=0.5)
    embedder = create_embedder("resnet18_trunc", input_size=32)
    bag = save_bag_classifier(tmp_path / "bag.pt", create_aggregator("abmil", embedder.out_dim, 2, hidden_dim=8))
    out = tmp_path / "out"
    out.mkdir()
    (out / "s0_heatmap.jpg").write_text("an earlier run's")
    with pytest.warns(UserWarning, match=r"s0\.tif' has no current features in '.*s0\.safetensors' \(missing") as seen:
        rows = predict_slides(
            tmp_path / "slides", embedder, bag, TilingConfig(patch_size=32, mpp=1.0, min_area_um2=0.0), out,
            embed=LosesOne(batch_size=64, num_workers=0, progress=False), writers=[HeatmapWriter()], progress=False,
        )  # fmt: skip
    assert [r["slide_id"] for r in rows] == ["s1"]
    assert not (out / "s0_heatmap.jpg").exists() and (out / "s1_heatmap.jpg").is_file()  # not scored: no picture
    assert not [w for w in seen if "no tissue patches" in str(w.message)]


def test_no_slide_scored_is_an_error_naming_the_reasons_and_leaves_no_table(tmp_path):
    config = SyntheticSlideConfig(width=512, height=384)
    write_slide(tmp_path / "blank" / "white.tif", np.full((384, 512, 3), 250, np.uint8), mpp=0.5)
    (tmp_path / "blank" / "broken.tif").write_bytes(b"II*\x00 not a slide")
    embedder = create_embedder("resnet18_trunc", input_size=32)
    bag = save_bag_classifier(tmp_path / "bag.pt", create_aggregator("abmil", embedder.out_dim, 2, hidden_dim=8))
    tiling, out = TilingConfig(patch_size=32, mpp=1.0, min_area_um2=0.0), tmp_path / "out"
    with (
        pytest.warns(UserWarning),
        pytest.raises(
            NoSlideScored,
            match=r"none of the 2 slide\(s\) was scored \(1 failed, 1 without tissue patches\).*report\.json",
        ) as raised,
    ):
        predict_slides(tmp_path / "blank", embedder, bag, tiling, out, progress=False)
    assert "broken.tif" in str(raised.value)
    assert not (out / "probabilities.csv").exists()
    report = json.loads((out / "report.json").read_text())
    assert set(report["failed"]) == {"broken"} and set(report["empty"]) == {"white"}
    # the same output folder, a slide with tissue: scored, and the earlier slides do not count against it
    write_slide(tmp_path / "good" / "s0.tif", render_slide((0, 0), True, config)["image"], mpp=0.5)
    rows = predict_slides(tmp_path / "good", embedder, bag, tiling, out, progress=False)
    assert [r["slide_id"] for r in rows] == ["s0"] and (out / "probabilities.csv").is_file()
    # and again nothing scored there: no stale table is left beside the new report
    with pytest.warns(UserWarning), pytest.raises(NoSlideScored, match=r"\(1 failed, 1 without tissue patches\)"):
        predict_slides(tmp_path / "blank", embedder, bag, tiling, out, progress=False)
    assert not (out / "probabilities.csv").exists()


def test_the_mlflow_model_answers_an_empty_table_with_a_warning_when_no_slide_is_scored(tmp_path):
    write_slide(tmp_path / "white.tif", np.full((384, 512, 3), 250, np.uint8), mpp=0.5)
    model = SlideClassifierModel(TilingConfig(patch_size=32, mpp=1.0), {"class_names": ["normal", "tumour"]})
    model.embedder = create_embedder("resnet18_trunc", input_size=32)
    model.bag_classifier = save_bag_classifier(
        tmp_path / "bag.pt", create_aggregator("abmil", model.embedder.out_dim, 2, hidden_dim=8)
    )
    with pytest.warns(UserWarning, match=r"none of the 1 slide\(s\) was scored \(0 failed, 1 without tissue"):
        table = model.predict(None, pd.DataFrame({"image": [str(tmp_path / "white.tif")]}))
    assert list(table.columns) == ["slide", "image", "prob_normal", "prob_tumour"] and len(table) == 0


def test_the_mlflow_model_keeps_slides_of_one_name_apart_and_leaves_out_a_missing_path(tmp_path):
    """Rows carry the path as given; two files named a.tif get two ids, each with its own slide's probability; a
    path that does not exist is left out with a warning, as a slide that fails is."""
    config = SyntheticSlideConfig(width=512, height=384)
    paths = [tmp_path / "a-2.tif", tmp_path / "a.tif", tmp_path / "x" / "a.tif"]  # stems a-2, a, a
    for i, p in enumerate(paths):
        write_slide(p, render_slide((i, 0), i == 2, config)["image"], mpp=0.5)
    model = SlideClassifierModel(TilingConfig(patch_size=32, mpp=1.0), {"class_names": ["normal", "tumour"]})
    model.embedder = create_embedder("resnet18_trunc", input_size=32)
    model.bag_classifier = save_bag_classifier(
        tmp_path / "bag.pt", create_aggregator("abmil", model.embedder.out_dim, 2, hidden_dim=8)
    )
    given = [str(p) for p in paths] + [str(tmp_path / "gone.tif")]
    with pytest.warns(UserWarning, match=r"not found, left out: .*gone\.tif"):
        table = model.predict(None, pd.DataFrame({"image": given}))
    assert list(table["image"]) == given[:3] and len(set(table["slide"])) == 3
    for path in given[:3]:
        alone = model.predict(None, {"image": path})  # one path under the key, not one per character
        row = table[table["image"] == path]
        np.testing.assert_allclose(row["prob_tumour"], alone["prob_tumour"], atol=1e-6)


def test_the_served_settings_follow_the_run(tmp_path):
    """A 3-class run without class names serves 3 classes; the damaged-tile policy and the embed precision travel."""

    from monai_icmil.data.integrity import TileErrorPolicy
    from monai_icmil.serving import model_settings

    run = SimpleNamespace(
        phases={"embed": Embed(amp=False, channels_last=False)}, tile_policy=TileErrorPolicy("fail", 0.2),
        class_names=None, num_classes=3, stain_normalize=False, backend="auto", assume_mpp=None,
    )  # fmt: skip
    settings = model_settings(run)
    assert settings["class_names"] == ["0", "1", "2"]
    assert settings["tile_policy"] == {"on_tile_error": "fail", "max_damaged_fraction": 0.2}
    assert settings["embed"]["amp"] is False and settings["embed"]["compile"] is False


def test_a_model_name_with_a_quote_is_registered_with_its_tags_and_loads(tmp_path):
    """...and serves a slide whose file has no mpp, given in an optional ``mpp`` column (the input example, a test
    slide, carries the datalist's: MLflow scores it when the model is logged)."""
    import mlflow
    import tifffile

    from monai_icmil.handlers.tracking import using_store
    from monai_icmil.serving import log_slide_classifier

    image = render_slide((0, 0), True, SyntheticSlideConfig(width=512, height=384))["image"]
    tifffile.imwrite(tmp_path / "s.tif", image, tile=(256, 256), photometric="rgb", compression="zlib", metadata=None)
    embedder = create_embedder("resnet18_trunc", input_size=32)
    path = embedder.save(tmp_path / "embedder.safetensors")
    bag = save_bag_classifier(tmp_path / "bag.pt", create_aggregator("abmil", embedder.out_dim, 2, hidden_dim=8))
    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    client = mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)
    run = client.create_run(client.create_experiment("e", artifact_location=str(tmp_path / "artifacts")))
    settings = {"class_names": ["normal", "tumour"], "embed": {"batch_size": 64, "num_workers": 0}}
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # the example slide is scored (no "skipped", no "none of")
        logged = log_slide_classifier(
            run.info.run_id, uri, path, bag, TilingConfig(patch_size=32, mpp=1.0), settings,
            [{"image": str(tmp_path / "s.tif"), "mpp": 0.5}], "o'brien lab", {"round": 1},
        )  # fmt: skip
    assert str(logged["version"]) == "1"
    assert client.get_model_version("o'brien lab", "1").tags["round"] == "1"
    with using_store(uri):
        signature = mlflow.models.get_model_info(logged["model_uri"]).signature
        assert [(c.name, c.required) for c in signature.inputs.inputs] == [("image", True), ("mpp", False)]
        served = mlflow.pyfunc.load_model(logged["model_uri"])
        table = served.predict(pd.DataFrame({"image": [str(tmp_path / "s.tif")], "mpp": [0.5]}))
        assert list(table["image"]) == [str(tmp_path / "s.tif")]
        with pytest.warns(UserWarning, match=r"microns per pixel, but its metadata has none"):  # without: the file's
            assert len(served.predict(pd.DataFrame({"image": [str(tmp_path / "s.tif")]}))) == 0
    from monai_icmil.serving import _inputs

    two = [str(tmp_path / "a.tif"), str(tmp_path / "b.tif")]
    assert _inputs({"image": two, "mpp": 0.5}) == (two, [0.5, 0.5])  # one value for every slide
    assert _inputs({"image": two, "mpp": [None, float("nan")]}) == (two, [None, None])
    with pytest.raises(ValueError, match=r"gives 1 'mpp' value\(s\) for 2 slide\(s\)"):
        _inputs({"image": two, "mpp": [0.5]})
    with pytest.raises(ValueError, match=r"mpp of slide '.*b\.tif' in the input.* is outside"):
        _inputs(pd.DataFrame({"image": two, "mpp": [0.5, 250.0]}))


def test_a_model_without_class_names_serves_its_classifiers_classes(tmp_path):
    """A model logged without class names (before they were filled in from the run) answers one column per class of
    its bag classifier, not two."""
    write_slide(
        tmp_path / "s.tif", render_slide((0, 0), True, SyntheticSlideConfig(width=512, height=384))["image"], 0.5
    )
    model = SlideClassifierModel(TilingConfig(patch_size=32, mpp=1.0, min_area_um2=0.0), {})
    model.embedder = create_embedder("resnet18_trunc", input_size=32)
    model.bag_classifier = save_bag_classifier(
        tmp_path / "bag.pt", create_aggregator("abmil", model.embedder.out_dim, 3, hidden_dim=8)
    )
    table = model.predict(None, pd.DataFrame({"image": [str(tmp_path / "s.tif")]}))
    assert list(table.columns) == ["slide", "image", "prob_0", "prob_1", "prob_2"] and len(table) == 1
