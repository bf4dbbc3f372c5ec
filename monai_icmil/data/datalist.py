# Copyright (c) monai-icmil contributors
# Licensed under the Apache License, Version 2.0 (the "License");
"""Datalists: which slides, with which slide-level labels, in which split.

Two formats are read:

* MONAI-style JSON: ``{"training": [{"image": "slides/a.svs", "label": 1}, ...], "validation": [...], "test": [...]}``
* CSV with a header ``slide,label[,split]`` (rows without a split go to ``training``; ``train``, ``val``, ``valid``
  and ``testing`` name the splits too, in any case; the split column may also be called ``set``, ``subset`` or
  ``partition`` where its values name splits); the slide column may also be called ``image``, ``path``, ``filename``
  or ``file`` (an ``image`` or ``path`` column beside a ``slide`` column holds the files), the label column
  ``target`` or ``class``; comma-, semicolon- or tab-separated, with or without a byte-order mark (``.csv``, ``.tsv``
  or ``.txt``).

Any other column or key is kept with the entry; ``mpp`` (the slide's level-0 microns per pixel) replaces the file's
value when tiling, for slides without resolution metadata or with wrong metadata.

Paths are relative to a data root (default: the datalist's folder). Loading validates every row and, when
anything is wrong, raises one :class:`DatalistError` that lists every bad row: missing files, missing or unknown
labels (string labels name the classes training and validation carry; a value only test slides carry is unknown),
labels that differ only in case, one-hot labels, duplicate slides or slide ids, labels of mixed types, paths that
leave the data root, Windows paths, unknown split names, no entries at all, text that is not UTF-8. Labels written
``1.0`` are class 1; string labels are stripped; ``tumor_mask`` is read as ``tumour_mask``.
"""

from __future__ import annotations

import codecs
import csv
import io
import json
import os
import re
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from monai_icmil.data.slide import as_mpp
from monai_icmil.data.store import is_file_name
from monai_icmil.utils import as_positive, stable_hash

__all__ = ["DatalistError", "load_datalist", "string_label_order", "class_names", "SPLITS"]

SPLITS = ("training", "validation", "test")
#: a CSV datalist's slide and label columns, and the other names they are found under (first present wins, except
#: that an ``image`` or ``path`` column beside a ``slide`` column holds the files; the ``slide`` column is then kept)
CSV_COLUMNS = {"slide": ("slide", "image", "path", "filename", "file"), "label": ("label", "target", "class")}
#: a CSV datalist's split column, under any of these names (the first present; one of the others is read only when
#: every value it holds names a split, else it is kept as an ordinary column)
SPLIT_COLUMNS = ("split", "set", "subset", "partition")
#: file suffixes read as CSV (comma, semicolon or tab separated); any other as JSON
CSV_SUFFIXES = (".csv", ".tsv", ".txt")
#: other names of the splits, read in any case (a CSV's ``split`` column); a JSON key among them is refused by name
SPLIT_ALIASES = {"train": "training", "val": "validation", "valid": "validation", "testing": "test"}


class DatalistError(ValueError):
    """A datalist has bad rows; ``errors`` holds one message per problem."""

    def __init__(self, source: str, errors: list[str]):
        self.source, self.errors = source, errors
        listing = "\n  - ".join(errors)
        super().__init__(f"datalist '{source}' has {len(errors)} problem(s):\n  - {listing}")


def _cells(table: list[dict[Any, Any]]) -> list[dict[str, str]]:
    """A CSV's rows with their column names in lower case and their cells stripped (cells past the header dropped)."""
    return [{k.strip().lower(): (v or "").strip() for k, v in cells.items() if k is not None} for cells in table]


def _read_rows(path: Path, splits: Sequence[str]) -> tuple[list[tuple[str, str, dict[str, Any]]], list[str]]:
    """``[(split, where, entry)]`` from a JSON or CSV datalist (``where``: ``row 3`` of a CSV, ``training[2]`` of
    a JSON, for the messages), plus format errors."""
    raw = path.read_bytes()
    raw = raw[len(codecs.BOM_UTF8) :] if raw.startswith(codecs.BOM_UTF8) else raw  # spreadsheet exports start with one
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise DatalistError(
            str(path), [f"line {line} is not UTF-8 text (byte {raw[e.start]:#04x}); save the file as UTF-8 (CSV UTF-8)"]
        ) from e
    if path.suffix.lower() in CSV_SUFFIXES and not text.lstrip().startswith(("{", "[")):  # (a JSON named .txt)
        return _read_csv_rows(path, text)
    return _read_json_rows(path, text, splits)


def _read_csv_rows(path: Path, text: str) -> tuple[list[tuple[str, str, dict[str, Any]]], list[str]]:
    """:func:`_read_rows` of a CSV datalist's text."""
    rows: list[tuple[str, str, dict[str, Any]]] = []
    errors: list[str] = []
    first, _, rest = text.partition("\n")
    header_row = 1
    if re.fullmatch(r"sep=.", first.strip(), re.IGNORECASE):  # Excel's line naming the separator
        delimiter, text, header_row = first.strip()[4], rest, 2
    else:
        delimiter = max(",;\t", key=first.count)  # comma, or the semicolon or tab of other locales
    reader = csv.DictReader(io.StringIO(text, newline=""), delimiter=delimiter)
    fields = [c.strip().lower() for c in (reader.fieldnames or [])]
    columns = {name: next((a for a in aliases if a in fields), None) for name, aliases in CSV_COLUMNS.items()}
    if columns["slide"] == "slide" and (paths := [a for a in ("image", "path") if a in fields]):
        columns["slide"] = paths[0]  # `slide,path,label`: the slide column names the slides, the other the files
    table = _cells(list(reader))
    split_column = "split" if "split" in fields else None
    for name in [c for c in SPLIT_COLUMNS[1:] if split_column is None and c in fields]:
        values = {row.get(name, "").lower() for row in table} - {""}
        if values and values <= {*SPLITS, *SPLIT_ALIASES}:
            split_column = name
            break
    if None in columns.values():
        wanted = " and ".join(f"'{n}' (or {', '.join(repr(a) for a in CSV_COLUMNS[n][1:])})" for n in CSV_COLUMNS)
        raise DatalistError(str(path), [f"the CSV header must name {wanted}; found {fields}"])
    for i, row in enumerate(table, start=header_row + 1):
        if not any(row.values()):  # a spreadsheet's empty row (';;')
            continue
        given = (row.pop(split_column, "") if split_column else "") or "training"
        split = SPLIT_ALIASES.get(given.lower(), given.lower())
        if split not in SPLITS:
            errors.append(
                f"row {i}: unknown split {given!r}; use one of {', '.join(SPLITS)} (or "
                f"{', '.join(SPLIT_ALIASES)}, in any case)"
            )
            continue
        entry: dict[str, Any] = {"image": row.pop(columns["slide"])}
        label = row.pop(columns["label"])
        if label != "":
            integer = label.lstrip("-").isdigit() or re.fullmatch(r"\d+\.0*", label)  # 1, 01, -1, 1.0
            entry["label"] = int(float(label)) if integer else label
        entry.update({k: v for k, v in row.items() if v != ""})
        rows.append((split, f"row {i}", entry))
    if not rows and not errors:
        errors.append("no rows below the header: one row per slide, e.g. 'slides/a.svs,tumour'")
    return rows, errors


def _read_json_rows(
    path: Path, text: str, splits: Sequence[str]
) -> tuple[list[tuple[str, str, dict[str, Any]]], list[str]]:
    """:func:`_read_rows` of a JSON datalist's text."""
    rows: list[tuple[str, str, dict[str, Any]]] = []
    errors: list[str] = []
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise DatalistError(str(path), [f"not valid JSON: {e}"]) from e
    if not isinstance(data, dict):
        raise DatalistError(str(path), ["the JSON must be an object with split keys such as 'training'"])
    for key in data:
        name = SPLIT_ALIASES.get(key.lower(), key.lower()) if isinstance(key, str) else None
        if name in SPLITS and key != name:
            errors.append(f"key {key!r} is not read: the splits are named {', '.join(SPLITS)} (rename it {name!r})")
    for split in splits:
        items = data.get(split, [])
        if not isinstance(items, list):
            errors.append(f"'{split}' must be a list of entries")
            continue
        for i, item in enumerate(items):
            if isinstance(item, str):
                item = {"image": item}
            if not isinstance(item, dict):
                errors.append(f"{split}[{i}]: entry must be an object with 'image' and 'label'")
                continue
            item = dict(item)
            if isinstance(item.get("label"), str):  # as a CSV cell's: no surrounding spaces; empty is no label
                item["label"] = item["label"].strip() or None
            elif isinstance(item.get("label"), float) and item["label"].is_integer():
                item["label"] = int(item["label"])  # 1.0: class 1
            rows.append((split, f"{split}[{i}]", item))
    if not any(key in data for key in SPLITS) and not errors:
        errors.append(
            f"no entries: the splits are the keys {', '.join(repr(s) for s in SPLITS)}, each a list of "
            f"{{'image': ..., 'label': ...}}; found the keys {sorted(map(str, data))}"
        )
    return rows, errors


def load_datalist(
    path: str | os.PathLike,
    data_root: str | os.PathLike | None = None,
    splits: Sequence[str] = SPLITS,
    labels: Sequence[Any] | None = None,
    check_files: bool = True,
    require_labels: Sequence[str] = ("training", "validation", "test"),
    allow_outside_root: bool = False,
) -> dict[str, list[dict[str, Any]]]:
    """Load and validate a datalist.

    Args:
        path: the JSON or CSV file.
        data_root: root that relative paths resolve against (default: the datalist's folder).
        splits: splits to read.
        labels: the known labels (ints or strings). String labels are mapped to their index in this list.
            ``None``: integer labels are taken as they are; string labels map to their sorted order, the one negative
            name among them (``normal``, ``negative``, ``benign``...) first (:func:`string_label_order`); entries
            with a string label keep it as ``label_name``.
        check_files: report slides that do not exist.
        require_labels: splits in which every entry must have a label.
        allow_outside_root: allow absolute paths and ``..`` that leave ``data_root`` (off by default: a datalist
            is data, it should not reach the rest of the disk).

    Returns:
        ``{split: [{"image": absolute path, "label": int, "slide_id": str, ...}, ...]}`` for each split present
        (every split in ``splits`` is a key; missing ones are empty). Labels are class indices.

    Raises:
        DatalistError: listing every bad row.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"datalist '{path}' does not exist.")
    root = Path(os.path.abspath(data_root if data_root is not None else path.parent))  # symlinks kept (see below)
    rows, errors = _read_rows(path, splits)
    label_index = _label_index(rows, labels, errors)
    seen: dict[str, str] = {}
    out: dict[str, list[dict[str, Any]]] = {s: [] for s in splits}
    named: dict[str, str] = {}  # slide ids the datalist gives itself
    for split, where, entry in rows:
        item = _check_entry(
            entry,
            where,
            root,
            split,
            label_index,
            seen,
            errors,
            check_files,
            allow_outside_root,
            require_labels,
            from_rows=labels is None,
        )
        if item is not None:
            out.setdefault(split, []).append(item)
            if entry.get("slide_id") not in (None, ""):
                where = f"{where} ({entry['image']})"
                if item["slide_id"] in named:
                    errors.append(f"{where}: slide_id {item['slide_id']!r} is also given at {named[item['slide_id']]}")
                named.setdefault(item["slide_id"], where)
    if errors:
        raise DatalistError(str(path), errors)
    _warn_coarse_mpp(path, out)
    _unique_slide_ids(out, root)
    return out


#: a level-0 mpp at least this coarse (um/px) is warned about: scans are about 0.1-2 um/px at level 0
COARSE_MPP = 4.0


def _warn_coarse_mpp(path: Path, out: Mapping[str, Sequence[Mapping[str, Any]]]) -> None:
    """Warn about ``mpp`` values a magnification may have been typed into (20 for 20x is 40 times too coarse)."""
    coarse = [f"{e['slide_id']} ({e['mpp']:g})" for v in out.values() for e in v if (e.get("mpp") or 0) >= COARSE_MPP]
    if coarse:
        warnings.warn(
            f"datalist '{path}' gives {len(coarse)} slide(s) a level-0 mpp of {COARSE_MPP:g} um/px or coarser: "
            f"{', '.join(coarse[:5])}{' ...' if len(coarse) > 5 else ''}. Scans are about 0.1-2 um/px at level 0; "
            "if the value is a magnification, give the mpp instead (20x is about 0.5 um/px, 40x about 0.25).",
            stacklevel=3,
        )


def _label_index(
    rows: Sequence[tuple[str, str, dict[str, Any]]], labels: Sequence[Any] | None, errors: list[str]
) -> dict[Any, int] | None:
    """Labels of one type and the map from their values to class indices (``None``: integer labels as they are)."""
    present = [
        e["label"] for _, _, e in rows if e.get("label") is not None and not isinstance(e["label"], (list, dict))
    ]
    types = {type(v).__name__ for v in present}
    if len(types) > 1:
        examples = {t: next(v for v in present if type(v).__name__ == t) for t in types}
        errors.append(
            f"labels have mixed types ({', '.join(f'{t} e.g. {examples[t]!r}' for t in sorted(types))}); use one"
        )
    if labels is not None:
        return {lab: i for i, lab in enumerate(labels)}
    if present and all(isinstance(v, str) for v in present):
        spellings: dict[str, dict[str, str]] = {}  # lower case -> {spelling: where it is first found}
        for _, where, e in rows:
            if isinstance(e.get("label"), str):
                spellings.setdefault(e["label"].lower(), {}).setdefault(e["label"], where)
        for same in (v for v in spellings.values() if len(v) > 1):
            found = " and ".join(f"{name!r} ({where})" for name, where in sorted(same.items()))
            errors.append(f"labels {found} differ only in case: spell each class one way")
        # the classes are those training and validation name: a value only test slides carry is refused by row
        known = [e["label"] for split, _, e in rows if split != "test" and e.get("label") is not None] or present
        return {lab: i for i, lab in enumerate(string_label_order(known))}
    return None


#: label names read as the negative class (compared in lower case without spaces, '-' and '_')
NEGATIVE_LABELS = frozenset(
    ("normal", "negative", "neg", "benign", "healthy", "control", "nontumor", "nontumour", "notumor", "notumour")
)


_TUMOUR_WORDS = r"(tumou?rs?|cancers?|malignan\w*|metasta\w*|carcinomas?|neoplas\w*|lesions?|disease)"
#: a negated tumour word: ``non-malignant``, ``no metastasis``, ``without tumour``, ``tumour-free``, ``cancer free``
_NEGATIVE_FORM = re.compile(rf"^(non|no|not|without)[\s_-]*{_TUMOUR_WORDS}$|^{_TUMOUR_WORDS}[\s_-]*free$")


def _listed_negative(name: str) -> bool:
    """Whether a label is one of :data:`NEGATIVE_LABELS` (in lower case, without spaces, '-' and '_')."""
    return "".join(c for c in name.strip().lower() if c not in " -_") in NEGATIVE_LABELS


#: words that make a name holding a tumour word name something else: negations, benign forms, tissue beside tumour
NOT_TUMOUR_WORDS = frozenset(
    (
        "non", "not", "without", "free", "benign", "normal", "healthy", "stroma", "stromal", "lymphocyte",
        "lymphocytes", "infiltrating", "associated", "adjacent", "surrounding", "immune", "necrosis", "necrotic",
    )
)  # fmt: skip
#: a word naming tumour in a class name: the tumour words, compounds (``Micrometastasis``, ``Adenocarcinoma``,
#: ``Tumorous``), malignant ``-oma`` names and in-situ / invasive carcinoma abbreviations
_TUMOUR_TOKEN = re.compile(
    rf"(micro|macro)?{_TUMOUR_WORDS}|tumou?rous|cancerous|[a-z]*(carcin|blast|sarc)omas?|"
    r"(melan|lymph|gli|mesotheli|myel|semin)omas?|dcis|idc|ilc|lcis"
)


def is_not_tumour_class(name: str) -> bool:
    """Whether a class name names something that is not tumour: a negative label (:func:`is_negative_label`:
    ``Normal``, ``No tumour``, ``Non-tumour``) or a name holding one of :data:`NOT_TUMOUR_WORDS` (``Stroma``,
    ``Benign lesion``, ``Tumor stroma``, ``Tumour-infiltrating lymphocytes``, ``Necrotic tumour``)."""
    return is_negative_label(name) or bool(NOT_TUMOUR_WORDS.intersection(re.findall(r"[a-z]+", name.lower())))


def is_tumour_class(name: str) -> bool:
    """Whether a class name (an annotation's, say) names tumour: it holds a tumour word (``Tumor``, ``Cancer``,
    ``Malignant``, ``Metastases`` and ``Micrometastasis``, ``Adenocarcinoma``, ``Neoplasm``, ``Lesion``, ``Disease``,
    ``Melanoma``, ``DCIS``; ``Tumor: Positive``) and is not a class that is not tumour (:func:`is_not_tumour_class`:
    not ``Non-tumour``, ``Benign lesion``, ``Tumor stroma``)."""
    tumour = any(_TUMOUR_TOKEN.fullmatch(w) for w in re.findall(r"[a-z]+", name.lower()))
    return tumour and not is_not_tumour_class(name)


def is_negative_label(name: str) -> bool:
    """Whether a label names the tumour-free class: ``normal``, ``negative``, ``benign``, ``healthy``, ``control``,
    ``non-tumour`` and the like, or a negated tumour word (``non-malignant``, ``no metastasis``, ``tumour-free``;
    not a subtype such as ``non-invasive`` or a marker status such as ``triple-negative``)."""
    return _listed_negative(name) or bool(_NEGATIVE_FORM.search(name.strip().lower()))


def string_label_order(values: Sequence[str]) -> list[str]:
    """String labels in class-index order: sorted, except that the one negative name among them
    (:func:`is_negative_label`: ``normal``, ``benign``, ``non-malignant``, ``tumour-free``...) comes first, since
    class 0 is the normal class wherever it matters (the instance teacher's patch AUC against tumour masks,
    ``normal_slide_targets``). With none or several such names the order is sorted."""
    names = sorted(set(values))
    exact = [n for n in names if _listed_negative(n)]
    negative = exact if exact else [n for n in names if is_negative_label(n)]  # 'normal' before 'no metastasis'
    return negative + [n for n in names if n not in negative] if len(negative) == 1 else names


def class_names(items: dict[str, list[dict[str, Any]]]) -> list[str] | None:
    """The class names a datalist's string labels give, by class index (``None`` for integer labels)."""
    named = {e["label"]: e["label_name"] for split in items.values() for e in split if "label_name" in e}
    if not named or sorted(named) != list(range(len(named))):
        return None
    return [named[i] for i in range(len(named))]


def _check_entry(
    entry: dict[str, Any],
    where: str,
    root: Path,
    split: str,
    label_index: dict[Any, int] | None,
    seen: dict[str, str],
    errors: list[str],
    check_files: bool,
    allow_outside_root: bool,
    require_labels: Sequence[str],
    from_rows: bool = False,
) -> dict[str, Any] | None:
    """One entry with an absolute path, a class index and a slide id; its problems go to ``errors``."""
    image = entry.get("image")
    if not image or not isinstance(image, str):
        errors.append(f"{where}: missing 'image' (the slide path); its keys: {sorted(map(str, entry))}")
        return None
    where = f"{where} ({image})"
    if "\\" in image and os.sep != "\\":
        errors.append(
            f"{where}: a Windows path ('\\'): write it with '/' (e.g. 'slides/a.svs'), relative to the data root"
        )
        return None
    p = Path(image)
    full = (p if p.is_absolute() else root / p).resolve()
    # inside the root as written (a slide symlinked into the data folder is in it) or once symlinks are followed
    inside = Path(os.path.normpath(root / p)).is_relative_to(root) or full.is_relative_to(root.resolve())
    if not allow_outside_root and not inside:
        errors.append(
            f"{where}: path leaves the data root '{root}' (set the data root, the bundle's --dataset_dir, to a folder "
            "that holds every slide, or allow it: allow_outside_root=True, the bundle's --allow_outside_root true)"
        )
        return None
    if check_files and not full.is_file():
        errors.append(f"{where}: file not found at '{full}'")
    if str(full) in seen:
        errors.append(f"{where}: duplicate slide, already listed at {seen[str(full)]}")
    else:
        seen[str(full)] = where
    label = entry.get("label")
    if label is None and split in require_labels:
        errors.append(f"{where}: missing label; its keys: {sorted(map(str, entry))}")
    item = dict(entry)
    item["image"] = str(full)
    item["label"] = _class_index(label, where, label_index, errors, from_rows) if label is not None else None
    if isinstance(label, str) and label_index is not None:
        item["label_name"] = label
    sid = item.get("slide_id")
    item["slide_id"] = Path(image).stem if sid in (None, "") else str(sid)  # a JSON number names the slide too
    if not is_file_name(item["slide_id"]):
        errors.append(
            f"{where}: slide_id {item['slide_id']!r} names the slide's feature and coordinate files: it cannot "
            "contain '/' or '\\' or be '.' or '..' (e.g. 'patient1_slideA')"
        )
    if item.get("mpp") not in (None, ""):
        try:
            item["mpp"] = as_positive(item["mpp"], "mpp")
        except ValueError:
            comma = " with a decimal point" if "," in str(item["mpp"]) else ""
            errors.append(
                f"{where}: mpp {item['mpp']!r} must be a positive number{comma} (the slide's microns per pixel)"
            )
        else:
            try:
                as_mpp(item["mpp"], "mpp")
            except ValueError as error:
                errors.append(f"{where}: {error}")
    if "tumor_mask" in item and "tumour_mask" not in item:  # the US spelling
        item["tumour_mask"] = item.pop("tumor_mask")
    for extra_key in ("tumour_mask",):
        if isinstance(item.get(extra_key), str) and not Path(item[extra_key]).is_absolute():
            item[extra_key] = str((root / item[extra_key]).resolve())
    return item


def _class_index(
    label: Any, where: str, label_index: dict[Any, int] | None, errors: list[str], from_rows: bool = False
) -> Any:
    if isinstance(label, (list, dict)):
        errors.append(f"{where}: label {label!r} is not one value (one-hot?): give the class, e.g. 1 or 'tumour'")
        return label
    if label_index is not None:
        if label not in label_index:
            why = (
                ": the classes are the labels of the training and validation slides; leave this test slide's label "
                "out (it is then predicted, not scored) or give training slides of that class"
                if from_rows and isinstance(label, str)
                else ""
            )
            errors.append(f"{where}: unknown label {label!r} (known: {list(label_index)}){why}")
            return label
        return label_index[label]
    if not isinstance(label, int) or isinstance(label, bool) or label < 0:
        errors.append(f"{where}: label {label!r} must be a non-negative integer class index")
    return label


def _unique_slide_ids(out: dict[str, list[dict[str, Any]]], root: Path) -> None:
    """Slide ids must be unique too: they name the per-slide files of the feature store. A slide whose file stem an
    earlier row's slide already has (``centre_b/s1.svs`` after ``centre_a/s1.svs``) is told apart by a hash of its path
    relative to the data root (the absolute path where it lies outside), so its id and stored features stay the same
    when the whole data folder moves."""
    ids: dict[str, str] = {}
    real_root = root.resolve()
    for items in out.values():
        for item in items:
            sid = item["slide_id"]
            if sid in ids and ids[sid] != item["image"]:
                image = Path(item["image"])  # resolved, so compared with the resolved root
                where = image.relative_to(real_root).as_posix() if image.is_relative_to(real_root) else str(image)
                item["slide_id"] = f"{sid}-{stable_hash(where, 8)}"
            ids[item["slide_id"]] = item["image"]
