"""Report writer: JSON round trip, self-contained escaped HTML, honest headline, atomic failure."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from lrsearch._errors import LrSearchError
from lrsearch.pipeline._report import (
    REPORT_HTML,
    REPORT_JSON,
    ReportError,
    load_report,
    rebuild_report,
    write_report,
)

IMG = '<img src="data:image/png;base64,'

MINIMAL: dict[str, Any] = {"budget": "0.5%", "allowed_drop": 0.005, "metric": "accuracy",
                           "objective": "latency", "meets_budget": False}


def full_report() -> dict[str, Any]:
    ranks = {"features.0": 6, "features.3": [12, 20], "<script>": 24, "classifier.2": "dense"}
    full_ranks = {"features.0": 16, "features.3": [32, 64], "<script>": 128, "classifier.2": 10}
    trials = [{"number": i, "cost": 2.0 - 0.03 * i, "drop": 0.0002 * i * (1 + i % 3),
               "feasible": 0.0002 * i * (1 + i % 3) <= 0.005} for i in range(40)]
    return {
        "lrsearch_version": "0.1.0", "created": "2025-01-02T03:04:05+00:00",
        "budget": "0.5%", "allowed_drop": 0.005, "metric": "accuracy", "objective": "latency",
        "meets_budget": True, "message": "Kept trial 12 <b>after</b> 1 attempt & no retry.",
        "device": "cpu", "threads": 4, "batch_size": 32,
        "dense": {"params": 1_234_567, "macs": 45_600_000.0, "latency_ms": 2.0,
                  "search_metric": 0.9512, "verify_metric": 0.9431},
        "final": {"trial": 12, "params": 456_789, "macs": 12_300_000.0, "latency_ms": 1.25,
                  "predicted_latency_ms": 1.3, "search_metric": 0.9489, "verify_metric": 0.9400,
                  "search_drop": 0.0023, "verify_drop": 0.0031, "ranks": ranks, "full_ranks": full_ranks,
                  "speedup": 1.6, "predicted_speedup": 1.54},
        "layer_order": ["features.0", "features.3", "<script>", "classifier.2"],
        "attempts": [{"trial": 15, "ranks": {"features.0": 4}, "search_drop": 0.004, "verify_drop": 0.009,
                      "meets_budget": False},
                     {"trial": 12, "ranks": ranks, "search_drop": 0.0023, "verify_drop": 0.0031,
                      "meets_budget": True}],
        "trials": trials,
        "paths": {"model": "/runs/a/model.pt", "checkpoint": "/runs/a/finetune.ckpt",
                  "study": "sqlite:////runs/a/study.db"},
        "splits": {"search": "validation (first 70%)", "verify": "test"},
    }


@pytest.fixture(scope="module")
def written(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], Path, str]:
    """The full report written once (rendering plots is the slow part); its dict, folder and page."""
    report, run_dir = full_report(), tmp_path_factory.mktemp("full")
    snapshot = copy.deepcopy(report)
    paths = write_report(run_dir, report)
    assert report == snapshot  # the caller's dict is not modified
    assert paths == (run_dir / REPORT_JSON, run_dir / REPORT_HTML)
    return report, run_dir, paths[1].read_text()


def test_full_report_round_trips_and_renders(written: tuple[dict[str, Any], Path, str]) -> None:
    report, run_dir, page = written
    text = (run_dir / REPORT_JSON).read_text()
    assert json.loads(text) == report and load_report(run_dir) == report
    assert text == json.dumps(report, indent=2, sort_keys=True) + "\n"
    assert page.count(IMG) == 2
    assert "Budget met" in page and "NOT met" not in page
    for figure in ("0.5%", "0.50 pts", "95.12%", "94.31%", "94.00%", "0.31 pts", "1.23 M", "457 k",
                   "45.6 M", "12.3 M", "2.00 ms", "1.25 ms", "1.30 ms", "1.60×", "1.54×", "62.5% of dense",
                   "validation (first 70%)", "test", "/runs/a/model.pt", "Final (trial 12)"):
        assert figure in page, figure
    assert 'class="over">0.90 pts' in page  # the rejected attempt's verify drop is flagged
    assert "<td>no</td>" in page and "<td>yes</td>" in page


def test_layer_names_and_messages_are_escaped(written: tuple[dict[str, Any], Path, str]) -> None:
    page = written[2]
    assert "<script>" not in page and "&lt;script&gt;" in page
    assert "<b>" not in page and "Kept trial 12 &lt;b&gt;after&lt;/b&gt; 1 attempt &amp; no retry." in page


def test_html_is_self_contained(written: tuple[dict[str, Any], Path, str]) -> None:
    page = written[2]
    assert "http://" not in page and "https://" not in page
    assert "<script" not in page and "<link" not in page and "@import" not in page and " src=\"data:" in page


def test_minimal_report_says_not_met(tmp_path: Path) -> None:
    json_path, html_path = write_report(tmp_path, MINIMAL)
    assert json.loads(json_path.read_text()) == MINIMAL
    page = html_path.read_text()
    assert "NOT met" in page and "0.5%" in page
    assert IMG not in page
    lowered = page.lower().replace("not met", "")
    assert "budget met" not in lowered and "met the budget" not in lowered and "meets" not in lowered
    for note in ("no finished search trials", "no per-layer ranks", "no fine-tune attempts",
                 "no measurements", "no file paths"):
        assert note in lowered, note


def test_failed_final_is_never_called_a_success(tmp_path: Path) -> None:
    report = full_report()
    report["meets_budget"] = False
    report["final"]["verify_drop"] = 0.009
    page = write_report(tmp_path, report)[1].read_text()
    assert "Budget NOT met" in page and "0.90 pts" in page and "Final (trial 12), not within budget" in page
    assert "Budget met" not in page and "met the budget" not in page.lower()


def test_rebuild_report_regenerates_the_same_page(written: tuple[dict[str, Any], Path, str],
                                                 tmp_path: Path) -> None:
    (tmp_path / REPORT_JSON).write_bytes((written[1] / REPORT_JSON).read_bytes())
    assert rebuild_report(str(tmp_path)) == tmp_path / REPORT_HTML
    assert (tmp_path / REPORT_HTML).read_text() == written[2]


def test_page_does_not_depend_on_dict_order(tmp_path: Path) -> None:
    report = full_report()
    del report["layer_order"]  # report.json sorts keys, so without it the layers are listed by name
    _, html_path = write_report(tmp_path, report)
    original = html_path.read_text()
    html_path.unlink()
    assert rebuild_report(tmp_path).read_text() == original


def test_rebuild_reflects_edited_json(tmp_path: Path) -> None:
    write_report(tmp_path, MINIMAL)
    edited = dict(MINIMAL, budget="1%", allowed_drop=0.01, message="edited by hand")
    (tmp_path / REPORT_JSON).write_text(json.dumps(edited))
    page = rebuild_report(tmp_path).read_text()
    assert "1%" in page and "edited by hand" in page


def test_load_report_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ReportError, match=REPORT_JSON) as info:
        load_report(tmp_path)
    assert isinstance(info.value, LrSearchError) and isinstance(info.value, ValueError)
    with pytest.raises(ReportError, match=REPORT_JSON):
        rebuild_report(tmp_path)
    assert not (tmp_path / REPORT_HTML).exists()


@pytest.mark.parametrize("content", [b"", b'{"budget": "0.5%", "allowed_', b"\xff\xfe garbage", b"[1, 2]",
                                     b'{"budget": "0.5%"}', b'{"budget": "0.5%", "allowed_drop": 0.005, '
                                     b'"metric": "accuracy", "objective": "macs", "meets_budget": "false"}'])
def test_load_report_rejects_corrupted_file(tmp_path: Path, content: bytes) -> None:
    (tmp_path / REPORT_JSON).write_bytes(content)
    with pytest.raises(ReportError, match=REPORT_JSON):
        load_report(tmp_path)


def test_truncated_written_report_is_detected(tmp_path: Path) -> None:
    json_path, _ = write_report(tmp_path, dict(MINIMAL, message="x" * 200))
    data = json_path.read_bytes()
    json_path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ReportError, match="corrupted or truncated"):
        load_report(tmp_path)


def test_unserializable_report_leaves_no_files(tmp_path: Path) -> None:
    report = full_report()
    report["final"]["speedup"] = object()
    with pytest.raises(ReportError, match="cannot be saved as JSON"):
        write_report(tmp_path, report)
    assert list(tmp_path.iterdir()) == []


def test_failed_rewrite_keeps_previous_files(tmp_path: Path) -> None:
    write_report(tmp_path, MINIMAL)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    with pytest.raises(ReportError):
        write_report(tmp_path, dict(MINIMAL, extra={1, 2}))
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


@pytest.mark.parametrize("bad", [{k: v for k, v in MINIMAL.items() if k != "meets_budget"},
                                 dict(MINIMAL, meets_budget="false"), dict(MINIMAL, meets_budget=0)])
def test_invalid_report_dict_is_rejected_before_writing(tmp_path: Path, bad: dict[str, Any]) -> None:
    with pytest.raises(ReportError, match="meets_budget"):
        write_report(tmp_path, bad)
    assert list(tmp_path.iterdir()) == []


def test_missing_and_odd_optional_values_render(tmp_path: Path) -> None:
    report = full_report()
    report["objective"] = "macs"
    report["final"]["predicted_latency_ms"] = None
    report["final"]["predicted_speedup"] = None
    report["final"]["macs"] = float("nan")
    report["final"]["trial"] = 999  # not among the trials: no highlight, still a plot
    report["trials"].append({"number": 99, "cost": None, "drop": 0.1, "feasible": False})
    del report["dense"]["latency_ms"]
    del report["layer_order"]
    page = write_report(tmp_path, report)[1].read_text()
    assert page.count(IMG) == 2
    assert "Not shown (no finite cost or drop): 1." in page and "n/a" not in page


# A fresh interpreter that imports this module but not lrsearch.pipeline's __init__: that pulls in
# Lightning and torchmetrics, which import pyplot (and need matplotlib) themselves and would hide
# what the report writer does.
_ISOLATED = (
    "import sys, json, types, pathlib\n"
    "import lrsearch\n"
    "package = types.ModuleType('lrsearch.pipeline')\n"
    "package.__path__ = [str(pathlib.Path(lrsearch.__file__).parent / 'pipeline')]\n"
    "sys.modules['lrsearch.pipeline'] = package\n"
    "from lrsearch.pipeline._report import write_report\n"
)


def test_plots_never_import_pyplot_and_degrade_without_matplotlib(tmp_path: Path) -> None:
    script = _ISOLATED + (
        "report = json.loads(sys.argv[2])\n"
        "sys.modules['matplotlib'] = None  # every matplotlib import now fails\n"
        "write_report(pathlib.Path(sys.argv[1]) / 'without', report)\n"
        "del sys.modules['matplotlib']\n"
        "write_report(pathlib.Path(sys.argv[1]) / 'with', report)\n"
        "print('matplotlib.figure' in sys.modules, 'matplotlib.pyplot' in sys.modules)\n"
    )
    result = subprocess.run([sys.executable, "-c", script, str(tmp_path), json.dumps(full_report())],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["True", "False"]  # matplotlib drew the plots, pyplot never loaded
    assert (tmp_path / "with" / REPORT_HTML).read_text().count(IMG) == 2
    page = (tmp_path / "without" / REPORT_HTML).read_text()
    assert IMG not in page and page.count("Plots need matplotlib") == 2
    assert "Budget met" in page and "&lt;script&gt;" in page
