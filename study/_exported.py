"""The runs of a grid back from its export (``tauopt export``), so that a published grid can be
reported again without the database that trained it (``tauopt report --trials``).

Exports written before the ``train_config`` and ``grid_point`` columns existed are read from
their ``config_*`` and ``param_*`` columns; every value is typed as the training config and the
grid's coordinates hold it.
"""

from __future__ import annotations

import csv
import dataclasses
import gzip
import json
import math
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from tauopt.engine import TrainConfig
from tauopt.errors import DataError
from tauopt.study._point import GridPoint
from tauopt.study._record import GRID_POINT_ATTR, HISTORY_ATTRS, TrialRecord
from tauopt.study._views import TrialView, view_of

#: The record's JSON columns (lists and dicts), as ``export_csv`` writes them.
_JSON = ("taus", "active_block_ids", *HISTORY_ATTRS)
_NUMBERS = ("test_accuracy", "val_accuracy", "active_blocks", "active_params", "initial_params")
_FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}


@dataclass(frozen=True)
class ExportedRuns:
    """The finished runs of one export, when each ran, and which grid runs it held (a run
    retried after its worker stopped is one run, however many rows it left)."""

    source: str
    views: list[TrialView]
    spans: list[tuple[datetime, datetime]]
    #: Every grid run the export holds, finished or not, by its coordinates (``point_key``).
    points: frozenset[str]
    #: The coordinates of its finished runs, in the order of ``views``.
    finished: list[str]
    failed: list[tuple[dict[str, Any], str]]


def point_key(point: dict[str, Any]) -> str:
    """A grid run's coordinates as one comparable string."""
    return GridPoint.of(point).key


def _scalar(text: str) -> Any:
    """A CSV cell as the value it was: None, a bool, an int, a float or the string."""
    if text == "":
        return None
    if text in ("True", "False"):
        return text == "True"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            continue
    return text


def _config(row: dict[str, str]) -> dict[str, Any]:
    stored = row.get("train_config")
    if stored:
        return dict(json.loads(stored))
    config: dict[str, Any] = {}
    for name, f in _FIELDS.items():
        text = row.get(f"config_{name}")
        if text is None:
            continue  # an older export: the field keeps its default
        value = _scalar(text)
        if isinstance(f.default, float) and isinstance(value, int):
            value = float(value)
        config[name] = value
    return config


def _grid_point(row: dict[str, str]) -> dict[str, Any]:
    stored = row.get("grid_point")
    if stored:
        return dict(json.loads(stored))
    return {k[len("param_") :]: _scalar(v) for k, v in row.items() if k.startswith("param_")}


def _attrs(row: dict[str, str]) -> dict[str, Any]:
    attrs: dict[str, Any] = {"train_config": _config(row), GRID_POINT_ATTR: _grid_point(row)}
    for name in _JSON:
        if row.get(name):
            attrs[name] = json.loads(row[name])
    for name in _NUMBERS:
        value = _scalar(row.get(name, ""))
        if value is not None:
            attrs[name] = value
    for name in ("in_features", "num_classes"):
        if row.get(name):
            attrs[name] = int(row[name])
    for name in ("device", "machine"):
        if row.get(name):
            attrs[name] = row[name]
    return attrs


def _rows(path: Path) -> Iterator[dict[str, str]]:
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rt", newline="") as fh:
            yield from csv.DictReader(fh)
    except (OSError, EOFError, UnicodeDecodeError, csv.Error) as e:
        raise DataError(f"cannot read the export {path}: {e}") from e


def read_export(path: Path) -> ExportedRuns:
    """The COMPLETE runs of the grid export at ``path`` (CSV, gzipped where it ends in .gz)."""
    views: list[TrialView] = []
    spans: list[tuple[datetime, datetime]] = []
    points: set[str] = set()
    finished: list[str] = []
    failed: list[tuple[dict[str, Any], str]] = []
    for row in _rows(path):
        if "param_protocol" not in row and not row.get("grid_point"):
            raise DataError(
                f"{path} is not the export of a `tauopt reproduce` grid (no grid coordinates): "
                "a search study is reported from its database, `tauopt report --study NAME`"
            )
        point = _grid_point(row)
        points.add(key := point_key(point))
        if row.get("state") == "FAIL" and row.get("fail_reason"):
            failed.append((point, row["fail_reason"]))
        if row.get("state") != "COMPLETE":
            continue
        try:
            record = TrialRecord.from_attrs(_attrs(row))  # validates the stored settings
        except (ValueError, TypeError, KeyError) as e:
            raise DataError(f"{path}, trial {row.get('number')}: {e}") from e
        views.append(view_of(int(row["number"]), record, feasible=row.get("feasible") == "True"))
        finished.append(key)
        started, seconds = row.get("datetime_start"), _scalar(row.get("duration_seconds", ""))
        if started and isinstance(seconds, (int, float)) and math.isfinite(seconds):
            begin = datetime.fromisoformat(started)
            spans.append((begin, begin + timedelta(seconds=seconds)))
    if not points:
        raise DataError(f"{path} holds no trials")
    return ExportedRuns(str(path), views, spans, frozenset(points), finished, failed)
