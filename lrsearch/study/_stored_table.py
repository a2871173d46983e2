"""The latency table inside the study, compact: every worker reads the identical table from the storage.

Workers on other machines share the study's storage (PostgreSQL) but maybe no filesystem, so
the table itself travels in the study: zlib-compressed JSON, base64, in a study *system*
attribute (which optuna-dashboard does not show), with the SHA-256 of its JSON. The study's
user attribute of the same name holds only a short summary that the dashboard can show, and
is written last, so a worker that sees it can read the table. Studies from lrsearch versions
that stored the whole table as that user attribute are still read.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import zlib
from typing import Any

import optuna

from lrsearch._errors import format_problem
from lrsearch.measure import DeploymentLatency
from lrsearch.measure._latency import LatencyTableError

__all__ = ["TABLE_ATTR", "store_latency_table", "stored_latency_table"]

TABLE_ATTR = "lrsearch:latency_table"
ENCODING = "zlib+base64 JSON"


def _canonical(table: DeploymentLatency) -> bytes:
    return json.dumps(table.to_dict(), sort_keys=True, separators=(",", ":")).encode("utf-8")


def store_latency_table(study: optuna.Study, table: DeploymentLatency) -> None:
    """Store ``table`` in ``study``: compressed as a system attr, then a summary as a user attr."""
    data = _canonical(table)
    digest = hashlib.sha256(data).hexdigest()
    packed = base64.b64encode(zlib.compress(data, 9)).decode("ascii")
    study._storage.set_study_system_attr(study._study_id, TABLE_ATTR,
                                         {"encoding": ENCODING, "sha256": digest, "data": packed})
    study.set_user_attr(TABLE_ATTR, {
        "stored_in": "study system attrs", "sha256": digest,
        "device": table.primary.device, "threads": table.threads, "batch_sizes": list(table.batch_sizes),
        "layers": len(table.primary.layers), "dense_model_ms": round(table.dense_model * 1e3, 4)})


def stored_latency_table(study: optuna.Study) -> DeploymentLatency | None:
    """The table stored in ``study``, or None; a damaged one raises :class:`LatencyTableError`."""
    stored: Any = study._storage.get_study_system_attrs(study._study_id).get(TABLE_ATTR)
    if stored is None:
        legacy = study.user_attrs.get(TABLE_ATTR)
        whole = isinstance(legacy, dict) and ("layers" in legacy or "tables" in legacy)
        return DeploymentLatency.from_dict(legacy) if whole else None
    try:
        data = zlib.decompress(base64.b64decode(stored["data"], validate=True))
        table = DeploymentLatency.from_dict(json.loads(data))
    except (KeyError, TypeError, ValueError, binascii.Error, zlib.error) as error:
        raise _damaged(f"cannot be decoded ({error})") from error
    if hashlib.sha256(data).hexdigest() != stored.get("sha256"):
        raise _damaged("does not match its SHA-256")
    return table


def _damaged(what: str) -> LatencyTableError:
    return LatencyTableError(format_problem(
        f"The latency table stored in the study {what}",
        hint=f"start a new study_name, or delete the study system attr {TABLE_ATTR!r} to measure it again."))
