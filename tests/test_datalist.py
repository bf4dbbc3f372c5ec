# Copyright (c) monai-icmil contributors
# Licensed under the Apache License, Version 2.0 (the "License");
from __future__ import annotations

import json
from pathlib import Path

import pytest

from monai_icmil.data import DatalistError, load_datalist


def _touch(root: Path, *names: str) -> None:
    for n in names:
        (root / n).parent.mkdir(parents=True, exist_ok=True)
        (root / n).write_bytes(b"x")


def test_json_datalist_resolves_paths_against_the_data_root(synthetic_dataset):
    dl = load_datalist(synthetic_dataset)
    assert [len(dl[s]) for s in ("training", "validation", "test")] == [4, 2, 2]
    first = dl["training"][0]
    assert Path(first["image"]).is_absolute() and Path(first["image"]).is_file()
    assert first["label"] in (0, 1) and first["slide_id"] == "training_000"
    assert Path(first["tumour_mask"]).is_file()


def test_csv_datalist_with_splits_and_string_labels(tmp_path):
    _touch(tmp_path, "a.svs", "b.svs", "c.svs")
    csv = tmp_path / "slides.csv"
    csv.write_text("slide,label,split\na.svs,tumour,training\nb.svs,normal,training\nc.svs,tumour,test\n")
    dl = load_datalist(csv, labels=["normal", "tumour"])
    assert [e["label"] for e in dl["training"]] == [1, 0]
    assert dl["test"][0]["label"] == 1 and dl["validation"] == []


def test_csv_without_split_column_goes_to_training(tmp_path):
    _touch(tmp_path, "a.svs", "b.svs")
    csv = tmp_path / "slides.csv"
    csv.write_text("slide,label\na.svs,1\nb.svs,0\n")
    dl = load_datalist(csv)
    assert [e["label"] for e in dl["training"]] == [1, 0]


@pytest.mark.parametrize(
    "text",
    [
        "\ufeffslide,label\na.svs,1\nb.svs,0\n",  # a spreadsheet's UTF-8 export starts with a byte-order mark
        "Image;Target\na.svs;1\nb.svs;0\n",  # other names for the columns, semicolon-separated
        "filename\tclass\tnotes\na.svs\t1\tx, y\nb.svs\t0\t\n",  # tab-separated, a comma inside a field
    ],
)
def test_csv_exports_from_other_tools_read_the_same(tmp_path, text):
    _touch(tmp_path, "a.svs", "b.svs")
    csv = tmp_path / "slides.csv"
    csv.write_text(text, encoding="utf-8")
    dl = load_datalist(csv)
    assert [(Path(e["image"]).name, e["label"]) for e in dl["training"]] == [("a.svs", 1), ("b.svs", 0)]


def test_a_csv_without_slide_or_label_column_names_what_it_found_and_the_accepted_names(tmp_path):
    csv = tmp_path / "slides.csv"
    csv.write_text("wsi,diagnosis\na.svs,1\n")
    with pytest.raises(
        DatalistError,
        match=r"must name 'slide' \(or 'image', .*'label' \(or 'target', 'class'\); found \['wsi', 'diagnosis'\]",
    ):
        load_datalist(csv)


def test_split_names_in_other_words_are_read_and_unknown_ones_refused_by_row(tmp_path):
    _touch(tmp_path, "a.svs", "b.svs", "c.svs", "d.svs")
    csv = tmp_path / "slides.csv"
    csv.write_text("slide,label,split\na.svs,1,Train\nb.svs,0,train\nc.svs,1,VAL\nd.svs,0,Testing\n")
    dl = load_datalist(csv)
    assert [[Path(e["image"]).name for e in dl[s]] for s in ("training", "validation", "test")] == [
        ["a.svs", "b.svs"],
        ["c.svs"],
        ["d.svs"],
    ]
    csv.write_text("slide,label,split\na.svs,1,training\nb.svs,0,holdout\nc.svs,1,Tst\n")
    with pytest.raises(DatalistError) as info:
        load_datalist(csv)
    accepted = "use one of training, validation, test (or train, val, valid, testing, in any case)"
    assert info.value.errors == [
        f"row 3: unknown split 'holdout'; {accepted}",
        f"row 4: unknown split 'Tst'; {accepted}",
    ]
    # a JSON datalist's split keys are MONAI's names; a key that means a split is refused, not silently dropped
    path = tmp_path / "datalist.json"
    path.write_text(json.dumps({"training": [{"image": "a.svs", "label": 1}], "val": [], "Test": [], "name": "x"}))
    with pytest.raises(DatalistError) as info:
        load_datalist(path)
    assert info.value.errors == [
        "key 'val' is not read: the splits are named training, validation, test (rename it 'validation')",
        "key 'Test' is not read: the splits are named training, validation, test (rename it 'test')",
    ]


def test_a_datalist_that_is_not_utf8_is_refused_by_name(tmp_path):
    _touch(tmp_path, "m\u00fcller.svs")
    csv = tmp_path / "slides.csv"
    rows = "".join(f"slide_{i:04d}.svs,{i % 2}\n" for i in range(1000))  # the bad byte far beyond the first 8 KB
    csv.write_bytes(f"slide,label\n{rows}m\u00fcller.svs,1\n".encode("cp1252"))
    with pytest.raises(
        DatalistError, match=r"(?s)slides.csv.*line 1002 is not UTF-8 text \(byte 0xfc\); save the file as UTF-8"
    ):
        load_datalist(csv)


def test_slides_of_the_same_name_in_two_folders_get_ids_that_stay_when_the_data_folder_moves(tmp_path):
    """Two centres' ``s1.svs``: the first keeps its stem, the second gets a hash of its path inside the data root (it
    was the absolute path's, so moving the folder renamed the slide and re-extracted its features)."""
    lists = {}
    for name in ("here", "moved/elsewhere"):
        root = tmp_path / name
        _touch(root, "centre_a/s1.svs", "centre_b/s1.svs", "centre_b/s2.svs")
        (root / "list.csv").write_text("image,label\ncentre_a/s1.svs,1\ncentre_b/s1.svs,0\ncentre_b/s2.svs,0\n")
        lists[name] = [e["slide_id"] for e in load_datalist(root / "list.csv")["training"]]
    ids = lists["here"]
    assert ids[0] == "s1" and ids[2] == "s2" and ids[1].startswith("s1-") and len(ids[1]) == len("s1-") + 8
    assert lists["moved/elsewhere"] == ids
    (tmp_path / "link").symlink_to(tmp_path / "moved")  # the same folder reached through a symlink
    assert [e["slide_id"] for e in load_datalist(tmp_path / "link" / "elsewhere" / "list.csv")["training"]] == ids


def test_a_numeric_slide_id_names_the_slide_as_text(tmp_path):
    _touch(tmp_path, "a.svs", "b.svs")
    path = tmp_path / "datalist.json"
    path.write_text(
        json.dumps({"training": [{"image": "a.svs", "label": 1, "slide_id": 1001}, {"image": "b.svs", "label": 0}]})
    )
    assert [e["slide_id"] for e in load_datalist(path)["training"]] == ["1001", "b"]


def test_every_bad_row_is_listed_in_one_error(tmp_path):
    _touch(tmp_path, "a.svs", "b.svs", "c.svs")
    data = {
        "training": [
            {"image": "a.svs", "label": 1},
            {"image": "missing.svs", "label": 0},
            {"image": "b.svs"},
            {"image": "a.svs", "label": 0},
        ],
        "validation": [{"image": "c.svs", "label": 7}],
    }
    path = tmp_path / "datalist.json"
    path.write_text(json.dumps(data))
    with pytest.raises(DatalistError) as info:
        load_datalist(path, labels=[0, 1])
    err = info.value
    text = str(err)
    assert len(err.errors) == 4
    assert "training[1] (missing.svs): file not found" in text
    assert "training[2] (b.svs): missing label" in text
    assert "training[3] (a.svs): duplicate slide, already listed at training[0]" in text
    assert "validation[0] (c.svs): unknown label 7" in text


def test_mixed_label_types_are_rejected(tmp_path):
    _touch(tmp_path, "a.svs", "b.svs")
    path = tmp_path / "datalist.json"
    path.write_text(json.dumps({"training": [{"image": "a.svs", "label": 1}, {"image": "b.svs", "label": "tumour"}]}))
    with pytest.raises(DatalistError, match="mixed types"):
        load_datalist(path)


def test_paths_may_not_leave_the_data_root_unless_allowed(tmp_path):
    root = tmp_path / "data"
    _touch(tmp_path, "outside.svs")
    root.mkdir()
    path = root / "datalist.json"
    path.write_text(json.dumps({"training": [{"image": "../outside.svs", "label": 1}]}))
    with pytest.raises(DatalistError, match=r"outside\.svs.*leaves the data root"):
        load_datalist(path)
    assert load_datalist(path, allow_outside_root=True)["training"][0]["label"] == 1


def test_a_slide_symlinked_into_the_data_root_is_inside_it_and_the_refusal_names_the_bundle_fix(tmp_path):
    root, store = tmp_path / "data", tmp_path / "store"
    _touch(store, "a.svs")
    root.mkdir()
    (root / "a.svs").symlink_to(store / "a.svs")  # data folders made of links to a slide store
    path = root / "datalist.json"
    path.write_text(json.dumps({"training": [{"image": "a.svs", "label": 1}], "test": [{"image": "../store/a.svs"}]}))
    with pytest.raises(
        DatalistError, match=r"test\[0\] \(\.\./store/a\.svs\): path leaves.*--dataset_dir.*--allow_outside_root true"
    ):
        load_datalist(path, require_labels=("training",))
    path.write_text(json.dumps({"training": [{"image": "a.svs", "label": 1}]}))
    assert load_datalist(path)["training"][0]["image"] == str((store / "a.svs").resolve())


def test_slide_ids_that_cannot_name_a_file_and_mpp_in_the_wrong_unit_are_refused_by_row(tmp_path):
    _touch(tmp_path, "a.svs", "b.svs", "c.svs", "d.svs")
    path = tmp_path / "datalist.csv"
    path.write_text(
        "image,label,slide_id,mpp\na.svs,1,patient1/slideA,0.5\nb.svs,0,..,0.5\nc.svs,1,c,250\nd.svs,0,d,0.25\n"
    )
    with pytest.raises(DatalistError) as err:
        load_datalist(path)
    text = str(err.value)
    assert "row 2 (a.svs): slide_id 'patient1/slideA' names the slide's feature" in text
    assert "row 3 (b.svs): slide_id '..'" in text
    assert "row 4 (c.svs): 'mpp' 250 is outside 0.01-20 microns per pixel" in text
    assert "row 5" not in text  # the file's lines: the header is line 1


def test_unlabelled_inference_lists_are_allowed_where_labels_are_not_required(tmp_path):
    _touch(tmp_path, "a.svs")
    path = tmp_path / "datalist.json"
    path.write_text(json.dumps({"test": ["a.svs"]}))
    dl = load_datalist(path, require_labels=())
    assert dl["test"][0]["label"] is None


@pytest.mark.parametrize(
    "names,order",
    [
        (["Tumor", "Normal"], ["Normal", "Tumor"]),
        (["metastasis", "normal"], ["normal", "metastasis"]),  # sorted alone would make the tumour class 0
        (["cancer", "Non-Tumour"], ["Non-Tumour", "cancer"]),
        (["LUSC", "LUAD"], ["LUAD", "LUSC"]),  # no negative name: sorted
        (["tumour", "normal", "benign"], ["benign", "normal", "tumour"]),  # two negative names: sorted
        (["micro", "macro", "negative"], ["negative", "macro", "micro"]),
    ],
)
def test_string_labels_put_the_one_negative_name_first(tmp_path, names, order):
    from monai_icmil.data.datalist import class_names

    _touch(tmp_path, *(f"{i}.svs" for i in range(len(names))))
    csv = tmp_path / "slides.csv"
    csv.write_text("slide,label\n" + "".join(f"{i}.svs,{n}\n" for i, n in enumerate(names)))
    items = load_datalist(csv)
    assert [order.index(n) for n in names] == [e["label"] for e in items["training"]]
    assert [e["label_name"] for e in items["training"]] == names and class_names(items) == order


def test_csv_split_column_under_other_names_slide_column_beside_paths_and_label_forms(tmp_path):
    """What spreadsheets hold (found by an audit of users' datalists): the split column as `set`; a `slide` column of
    ids beside the `path` column of files (the ids were taken as paths: "file not found at '<root>/TCGA-A'"); labels
    written 1.0; a `.tsv` file; a US-spelled `tumor_mask`. Slide ids stay the files' stems (an existing run's
    validation split and stores are named by them); a `set` column whose values are not splits stays an ordinary
    column."""
    _touch(tmp_path, "files/a.svs", "files/b.svs", "files/c.svs", "m.png")
    csv = tmp_path / "slides.csv"
    csv.write_text(
        "slide,path,label,set,tumor_mask\nTCGA-A,files/a.svs,1.0,train,m.png\nTCGA-B,files/b.svs,0.0,train,\n"
        "TCGA-C,files/c.svs,1,Test,\n"
    )
    dl = load_datalist(csv)
    assert [(e["slide_id"], e["slide"], Path(e["image"]).name, e["label"]) for e in dl["training"]] == [
        ("a", "TCGA-A", "a.svs", 1),
        ("b", "TCGA-B", "b.svs", 0),
    ]
    assert [e["slide_id"] for e in dl["test"]] == ["c"]  # the `set` column was read
    assert dl["training"][0]["tumour_mask"] == str(tmp_path / "m.png") and "tumor_mask" not in dl["training"][0]
    csv.write_text("slide,image,slide_id,label,set\nX,files/a.svs,A,1,batch1\nY,files/b.svs,B,0,batch2\n")
    dl = load_datalist(csv)
    assert [(e["slide_id"], e["set"]) for e in dl["training"]] == [("A", "batch1"), ("B", "batch2")]
    tsv = tmp_path / "slides.tsv"
    tsv.write_text("image\tlabel\nfiles/a.svs\t1\nfiles/b.svs\t0\n")
    assert [e["label"] for e in load_datalist(tsv)["training"]] == [1, 0]
    (tmp_path / "list.txt").write_text(json.dumps({"training": [{"image": "files/a.svs", "label": 1}]}))
    assert [e["slide_id"] for e in load_datalist(tmp_path / "list.txt")["training"]] == ["a"]  # JSON, whatever its name
    with pytest.raises(DatalistError, match=r"no rows below the header"):
        (tmp_path / "empty.csv").write_text("slide,label\n")
        load_datalist(tmp_path / "empty.csv")


def test_string_labels_negative_forms_case_variants_and_classes_only_test_slides_name(tmp_path):
    from monai_icmil.data.datalist import string_label_order

    assert string_label_order(["malignant", "non-malignant"]) == ["non-malignant", "malignant"]
    assert string_label_order(["metastasis", "no metastasis"]) == ["no metastasis", "metastasis"]
    assert string_label_order(["tumor-free", "tumor"]) == ["tumor-free", "tumor"]
    assert string_label_order(["normal", "no metastasis", "metastasis"])[0] == "normal"  # the exact name first
    # subtypes and marker status are not tumour-free: sorted as before
    for names in (["nodular", "diffuse"], ["normal", "triple-negative", "HER2-positive"], ["non-invasive", "invasive"]):
        assert string_label_order(names) == (["normal"] if "normal" in names else []) + sorted(set(names) - {"normal"})
    assert string_label_order(["not specified", "high grade"]) == ["high grade", "not specified"]
    _touch(tmp_path, "a.svs", "b.svs", "c.svs", "d.svs")
    data = {
        "training": [{"image": "a.svs", "label": "normal"}, {"image": "b.svs", "label": "tumor "}],
        "test": [{"image": "c.svs", "label": "tumor"}, {"image": "d.svs", "label": "ITC"}],
    }
    (tmp_path / "dl.json").write_text(json.dumps(data))
    with pytest.raises(DatalistError) as e:
        load_datalist(tmp_path / "dl.json")
    # 'tumor ' is 'tumor' (JSON values are stripped, as CSV cells); ITC, only on a test slide, is not a class
    assert e.value.errors == [
        "test[1] (d.svs): unknown label 'ITC' (known: ['normal', 'tumor']): the classes are the labels of the training "
        "and validation slides; leave this test slide's label out (it is then predicted, not scored) or give training "
        "slides of that class"
    ]
    data["test"][1]["label"] = "Tumor"
    (tmp_path / "dl.json").write_text(json.dumps(data))
    with pytest.raises(DatalistError, match=r"labels 'Tumor' \(test\[1\]\) and 'tumor' \(training\[1\]\) differ only"):
        load_datalist(tmp_path / "dl.json")
    data["test"][1]["label"] = "  "  # blank: unlabelled, as an empty CSV cell
    (tmp_path / "dl.json").write_text(json.dumps(data))
    assert load_datalist(tmp_path / "dl.json", require_labels=("training",))["test"][1]["label"] is None


def test_json_rows_that_used_to_crash_or_pass_silently_are_refused_by_row_with_the_fix(tmp_path):
    _touch(tmp_path, "a.svs", "b.svs", "c.svs")
    (tmp_path / "dl.json").write_text(
        json.dumps(
            {
                "training": [
                    {"image": "a.svs", "label": [0, 1], "slide_id": "S1"},
                    {"slide": "b.svs", "target": 1},
                    {"image": "sub\\c.svs", "label": 1},
                    {"image": "c.svs", "label": 1.0, "slide_id": "S1", "mpp": "0,25"},
                ]
            }
        )
    )
    with pytest.raises(DatalistError) as e:
        load_datalist(tmp_path / "dl.json")
    assert e.value.errors == [
        "training[0] (a.svs): label [0, 1] is not one value (one-hot?): give the class, e.g. 1 or 'tumour'",
        "training[1]: missing 'image' (the slide path); its keys: ['slide', 'target']",
        "training[2] (sub\\c.svs): a Windows path ('\\'): write it with '/' (e.g. 'slides/a.svs'), relative to the "
        "data root",
        "training[3] (c.svs): mpp '0,25' must be a positive number with a decimal point (the slide's microns per "
        "pixel)",
        "training[3] (c.svs): slide_id 'S1' is also given at training[0] (a.svs)",
    ]
    for empty in ({}, {"train_data": [{"image": "a.svs", "label": 1}]}):
        (tmp_path / "dl.json").write_text(json.dumps(empty))
        with pytest.raises(DatalistError, match=r"no entries: the splits are the keys 'training', .*found the keys \["):
            load_datalist(tmp_path / "dl.json")


def test_the_bundle_names_every_missing_slide_before_any_work(tmp_path):
    from monai_icmil.workflows.splits import DatasetSplits

    _touch(tmp_path, "a.svs", "b.svs")
    rows = [("a.svs", 0, "training"), ("b.svs", 1, "training"), ("c.svs", 1, "validation"), ("d.svs", 0, "test")]
    (tmp_path / "dl.csv").write_text("slide,label,split\n" + "".join(f"{s},{k},{p}\n" for s, k, p in rows))
    splits = DatasetSplits(dataset_dir=str(tmp_path), output_dir=str(tmp_path / "out"), datalist="dl.csv")
    with pytest.warns(
        UserWarning,
        match=r"2 slide file\(s\) do not exist \(1 validation, 1 test\): validation: '.*c\.svs'; test: '.*d\.svs'\. "
        "They are left out",
    ):
        items = splits.items()
    assert [len(items[s]) for s in ("training", "validation", "test")] == [2, 1, 1]  # still listed: recorded as failed


def test_a_recorded_validation_split_that_no_longer_matches_the_datalist_is_warned_about(tmp_path):
    from monai_icmil.workflows.splits import DatasetSplits

    _touch(tmp_path, *[f"s{k}.svs" for k in range(8)])
    (tmp_path / "dl.csv").write_text("slide,label\n" + "".join(f"s{k}.svs,{k % 2}\n" for k in range(8)))
    out = tmp_path / "out"
    out.mkdir()
    (out / "validation_split.json").write_text(
        json.dumps({"validation": ["s0", "gone"], "seed": 0, "val_fraction": 0.25})
    )
    splits = DatasetSplits(dataset_dir=str(tmp_path), output_dir=str(out), datalist="dl.csv")
    with pytest.warns(UserWarning, match=r"1 of the 2 validation slides recorded in .* are not among the datalist's"):
        assert [e["slide_id"] for e in splits.items()["validation"]] == ["s0"]
    (tmp_path / "dl.csv").write_text(
        "slide,label,split\n" + "".join(f"s{k}.svs,{k % 2},{'val' if k < 2 else 'train'}\n" for k in range(8))
    )
    splits = DatasetSplits(dataset_dir=str(tmp_path), output_dir=str(out), datalist="dl.csv")
    with pytest.warns(
        UserWarning, match=r"the datalist now has a validation split, so the one held out .* is not used"
    ):
        assert len(splits.items()["validation"]) == 2


def test_excel_csv_with_its_separator_line_and_empty_rows(tmp_path):
    _touch(tmp_path, "a.svs", "b.svs")
    (tmp_path / "dl.csv").write_text("sep=;\nslide;label\na.svs;1\n;\nb.svs;0\n;;\n")
    assert [e["label"] for e in load_datalist(tmp_path / "dl.csv")["training"]] == [1, 0]
    (tmp_path / "dl.csv").write_text("sep=;\nslide;label\na.svs;1\nc.svs;0\n")
    with pytest.raises(DatalistError, match=r"row 4 \(c\.svs\): file not found"):  # rows counted as Excel shows them
        load_datalist(tmp_path / "dl.csv")
