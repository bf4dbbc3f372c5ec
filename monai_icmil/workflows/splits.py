# Copyright (c) monai-icmil contributors
# Licensed under the Apache License, Version 2.0 (the "License");
"""The data of a run: the datalist by split (validated), a synthetic dataset generated on demand, and a recorded,
stratified validation split when the datalist has none."""

from __future__ import annotations

import json
import logging
import os
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from monai_icmil.data.datalist import CSV_SUFFIXES, SPLITS, load_datalist
from monai_icmil.utils import atomic_write_json, barrier, dist_info
from monai_icmil.workflows.folds import GROUP_KEYS, _group_value, assign_folds, slide_groups

__all__ = ["DatasetSplits"]

logger = logging.getLogger("monai_icmil.workflow")


class DatasetSplits:
    """The datalist's ``training``, ``validation`` and ``test`` entries, loaded once.

    Args:
        dataset_dir: data root of the datalist's relative paths.
        datalist: the datalist file (relative to ``dataset_dir`` unless absolute).
        output_dir: where a generated validation split is recorded (``validation_split.json``).
        seed: seeds the validation split.
        val_fraction: fraction of each class of the training slides held out when there is no validation split
            (whole patients when the datalist names them: ``patient``, ``patient_id``, ... as in cross-validation).
        synthetic: when given and the datalist is missing, generate a synthetic dataset into ``dataset_dir`` with
            these :func:`~monai_icmil.data.synthetic.make_dataset` arguments (rank 0 writes, every rank waits).
        allow_outside_root: allow datalist paths outside ``dataset_dir``.
        progress: progress bar while generating.
    """

    def __init__(
        self,
        dataset_dir: str | os.PathLike,
        datalist: str | os.PathLike,
        output_dir: str | os.PathLike,
        seed: int = 0,
        val_fraction: float = 0.25,
        synthetic: Mapping[str, Any] | None = None,
        allow_outside_root: bool = False,
        progress: bool = True,
    ):
        self.dataset_dir, self.output_dir = Path(dataset_dir), Path(output_dir)
        self.path = Path(datalist) if Path(datalist).is_absolute() else self.dataset_dir / datalist
        self.seed, self.val_fraction = int(seed), float(val_fraction)
        self.synthetic = dict(synthetic) if synthetic else None
        self.allow_outside_root, self.progress = allow_outside_root, progress
        #: hold out a validation split when the datalist has none (cross-validation makes its own instead)
        self.hold_out_validation = True
        self._items: dict[str, list[dict[str, Any]]] | None = None

    def items(self) -> dict[str, list[dict[str, Any]]]:
        """The datalist by split (validated); generates the synthetic dataset first when configured."""
        if self._items is not None:
            return self._items
        if self.synthetic is not None:
            self._generate()
        if not self.path.is_file():
            raise FileNotFoundError(f"datalist '{self.path}' does not exist (set `datalist` or `dataset_dir`).")
        items = load_datalist(
            self.path,
            self.dataset_dir,
            labels=None,
            check_files=False,
            require_labels=("training", "validation"),
            allow_outside_root=self.allow_outside_root,
        )
        _warn_shared_patients(items)
        _warn_missing_slides(self.path, items)
        if not items.get("validation") and self.hold_out_validation:
            items = self._with_validation_split(items)
        elif items.get("validation") and (self.output_dir / "validation_split.json").is_file():
            warnings.warn(
                f"the datalist now has a validation split, so the one held out of its training slides and recorded "
                f"in {self.output_dir / 'validation_split.json'} is not used: rounds finished before were validated "
                "on other slides (use a new output_dir to compare like with like).",
                stacklevel=2,
            )
        self._items = items
        return items

    def all_items(self) -> list[dict[str, Any]]:
        """Every entry of every split, in split order."""
        return [e for split in SPLITS for e in self.items().get(split, [])]

    def _generate(self) -> None:
        from monai_icmil.data.synthetic import SYNTHETIC_MARKER, make_dataset

        if dist_info()[0] == 0 and not self.path.is_file():  # one rank writes it; every rank waits here
            d = self.dataset_dir
            others = [p.name for p in d.iterdir() if not p.name.startswith(".")] if d.is_dir() else []
            if others and not (d / SYNTHETIC_MARKER).exists():
                lists = sorted(n for n in others if n.lower().endswith((".json", *CSV_SUFFIXES)))
                found = f" (datalists here? {', '.join(lists[:5])})" if lists else ""
                raise FileExistsError(
                    f"dataset_dir '{d}' holds files ({', '.join(sorted(others)[:3])}) but no datalist "
                    f"'{self.path.name}': the synthetic demo (demo.json's `synthetic`) generates its slides only into "
                    f"a new or empty folder, never beside your own. For your slides, name their datalist (--datalist "
                    f"<file>){found}: with demo.json they run at its CPU-sized settings, without it at train.json's. "
                    "For the demo, choose another --dataset_dir (or delete this one if it is a demo generation an "
                    "earlier version left unfinished)."
                )
            logger.info("generating the synthetic dataset into %s", self.dataset_dir)
            made = make_dataset(self.dataset_dir, progress=self.progress, **self.synthetic)
            if made.resolve() != self.path.resolve():
                raise FileNotFoundError(f"the synthetic datalist is {made}, but `datalist` is {self.path}")
        barrier()

    def _with_validation_split(self, items: dict[str, list[dict[str, Any]]]) -> dict[str, list[dict[str, Any]]]:
        split_file = self.output_dir / "validation_split.json"
        train = items["training"]
        if split_file.is_file():
            record = json.loads(split_file.read_text())
            for key, value in (("seed", self.seed), ("val_fraction", self.val_fraction)):
                if key in record and record[key] != value:
                    raise ValueError(
                        f"{split_file} holds the validation split made with {key} {record[key]}, this run has "
                        f"{value}: its finished rounds were validated on that split. Use a new output_dir, or the "
                        f"{key} it was made with."
                    )
            val_ids, by_patient = set(record["validation"]), record.get("grouped_by") == "patient"
            if lost := sorted(val_ids - {e["slide_id"] for e in train}):
                warnings.warn(
                    f"{len(lost)} of the {len(val_ids)} validation slides recorded in {split_file} are not among the "
                    f"datalist's training slides ({', '.join(lost[:5])}{' ...' if len(lost) > 5 else ''}): this run "
                    "validates on the rest. If the datalist's slide names changed, its finished rounds were validated "
                    "on other slides: use a new output_dir.",
                    stacklevel=3,
                )
        else:
            groups = slide_groups(train)
            by_patient = not all(g.startswith("slide:") for g in groups)
            val_ids = self._patient_hold_out(train, len(set(groups))) if by_patient else self._slide_hold_out(train)
            record = {"validation": sorted(val_ids), "seed": self.seed, "val_fraction": self.val_fraction}
            atomic_write_json(split_file, {**record, **({"grouped_by": "patient"} if by_patient else {})})
        whole = ", whole patients" if by_patient else ""
        warnings.warn(
            f"the datalist has no validation split: {len(val_ids)} training slides were held out (stratified{whole}, "
            f"seed {self.seed}); the split is recorded in {split_file}.",
            stacklevel=3,
        )
        return {
            **items,
            "training": [e for e in train if e["slide_id"] not in val_ids],
            "validation": [e for e in train if e["slide_id"] in val_ids],
        }

    def _slide_hold_out(self, train: list[dict[str, Any]]) -> set[str]:
        """``val_fraction`` of each label's slides, at random (seeded): the split without patient fields."""
        rng = np.random.default_rng(self.seed)
        val_ids: set[str] = set()
        for label in sorted({e["label"] for e in train}):
            ids = [e["slide_id"] for e in train if e["label"] == label]
            k = max(1, int(round(len(ids) * self.val_fraction))) if len(ids) > 1 else 0
            val_ids.update(rng.choice(ids, k, replace=False).tolist() if k else [])
        return val_ids

    def _patient_hold_out(self, train: list[dict[str, Any]], patients: int) -> set[str]:
        """About ``val_fraction`` of the training patients, whole and stratified by label (one part of a grouped
        k-fold assignment with k = 1 / val_fraction), so that no patient has slides on both sides."""
        parts = max(2, int(round(1.0 / self.val_fraction)))
        if patients < parts:
            raise ValueError(
                f"the datalist has no validation split, and holding out val_fraction {self.val_fraction:g} of its "
                f"{patients} training patients whole needs at least {parts} of them: give the datalist a validation "
                "split (whole patients), or a larger val_fraction."
            )
        folds = assign_folds(train, parts, self.seed)
        return {e["slide_id"] for e, f in zip(train, folds) if f == 0}


def _warn_missing_slides(datalist: Path, items: dict[str, list[dict[str, Any]]]) -> None:
    """Name every missing slide at once, before any work: each is then left out and recorded in ``report.json`` as
    it is reached (a cohort copied in part still runs)."""
    missing = [(split, e["image"]) for split in SPLITS for e in items.get(split, []) if not Path(e["image"]).is_file()]
    if missing:
        by_split = {split: sum(s == split for s, _ in missing) for split in SPLITS}
        counts = ", ".join(f"{n} {split}" for split, n in by_split.items() if n)
        shown = "; ".join(f"{split}: '{image}'" for split, image in missing[:5])
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        warnings.warn(
            f"datalist '{datalist}': {len(missing)} slide file(s) do not exist ({counts}): {shown}{more}. They are "
            "left out of the run (report.json lists them); check the paths and the data root (--dataset_dir) if that "
            "is not what you want.",
            stacklevel=3,
        )


def _warn_shared_patients(items: Mapping[str, list[dict[str, Any]]]) -> None:
    """Warn when the datalist's own splits share a patient (its slides on both sides inflate the evaluation)."""
    seen: dict[str, set[str]] = {}
    for split, entries in items.items():
        for e in entries:
            patient = _group_value(e, GROUP_KEYS)
            if patient is not None:
                seen.setdefault(patient, set()).add(split)
    shared = sorted(p for p, splits in seen.items() if len(splits) > 1)
    if shared:
        warnings.warn(
            f"{len(shared)} patient(s) have slides in more than one split of the datalist ({', '.join(shared[:5])}"
            f"{' ...' if len(shared) > 5 else ''}): their slides on both sides make validation and test look better "
            "than on new patients. Put each patient's slides in one split.",
            stacklevel=3,
        )
