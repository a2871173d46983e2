"""Report: JSON round trip, self-contained escaped HTML, a terminal summary telling the same story."""

from __future__ import annotations

import copy
import html
import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from lrsearch._errors import LrSearchError
from lrsearch.pipeline._report import (
    REPORT_HTML,
    REPORT_JSON,
    Report,
    ReportError,
    load_report,
    rebuild_report,
    render_html,
    render_text,
    undecided_warning,
    write_report,
)

FIGURE = 'class="plotly-graph-div"'


def prose(page: str) -> str:
    """The page without its scripts (plotly.js holds any word), i.e. what a reader sees as text."""
    return re.sub(r"<script>.*?</script>", "", page, flags=re.S)

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
        "warnings": ["Trial 12: the split is <small>; a larger verification split would tell."],
        "device": "cpu", "threads": 4, "batch_size": 32,
        "dense": {"params": 1_234_567, "macs": 45_600_000.0, "latency_ms": 2.0, "predicted_latency_ms": 2.002,
                  "search_metric": 0.9512, "verify_metric": 0.9431},
        "final": {"trial": 12, "params": 456_789, "macs": 12_300_000.0, "latency_ms": 1.25,
                  "predicted_latency_ms": 1.3, "search_metric": 0.9489, "verify_metric": 0.9400,
                  "search_drop": 0.0023, "verify_drop": 0.0031, "verify_drop_interval": [-0.002, 0.009],
                  "ranks": ranks, "full_ranks": full_ranks, "speedup": 1.6, "predicted_speedup": 1.54},
        "layer_order": ["features.0", "features.3", "<script>", "classifier.2"],
        "attempts": [{"trial": 15, "ranks": {"features.0": 4}, "search_drop": 0.004, "verify_drop": 0.009,
                      "meets_budget": False},
                     {"trial": 12, "ranks": ranks, "search_drop": 0.0023, "verify_drop": 0.0031,
                      "verify_drop_interval": [-0.002, 0.009], "meets_budget": True}],
        "trial_counts": {"complete": 40, "pruned": 15, "failed": 1, "duplicates": 3},
        "trials": trials, "pareto": [24, 12],
        "paths": {"model": "/runs/a/model.pt", "checkpoint": "/runs/a/finetune.ckpt",
                  "study": "sqlite:////runs/a/study.db"},
        "splits": {"search": "validation (first 70%)", "verify": "test"},
    }


@pytest.fixture(scope="module")
def written(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], Path, str]:
    """The full report written once; its dict, folder and page."""
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
    assert page.count(FIGURE) == 2
    assert "Budget met" in page and "NOT met" not in page
    for figure in ("0.5%", "0.50 points", "95.12%", "94.31%", "94.00%", "0.31 points", "1.23 M", "457 k",
                   "45.6 M", "12.3 M", "2.000 ms", "1.250 ms", "1.300 ms", "2.002 ms", "1.60x", "1.54x",
                   "62.5% of dense", "validation (first 70%)", "test", "/runs/a/model.pt", "Final (trial 12)"):
        assert figure in page, figure
    assert 'class="over">0.90 points' in page  # the rejected attempt's verify drop is flagged
    assert "<td>no</td>" in page and "<td>yes</td>" in page
    assert " pts" not in page


def test_layer_names_warnings_and_messages_are_escaped(written: tuple[dict[str, Any], Path, str]) -> None:
    page = written[2]
    assert "<td><script></td>" not in page and "<td>&lt;script&gt;</td>" in page
    assert "&lt;small&gt;" in page and "<small>" not in page
    assert "<b>" not in page  # the message is for machines: the page states the outcome itself
    assert "\\u003cscript\\u003e" in page  # the figure's data holds the name as escaped JSON


def test_html_is_self_contained(written: tuple[dict[str, Any], Path, str]) -> None:
    page = written[2]
    assert "<link" not in page and "@import" not in page and "<img" not in page and "<iframe" not in page
    scripts = re.findall(r"<script[^>]*>", page)
    assert scripts == ["<script>"] * 3  # inline only (no src=): plotly.js once, then one call per figure
    assert len(page) > 3_000_000  # plotly.js itself is in the page


def _text(report: dict[str, Any]) -> str:
    return render_text(report, run_dir="/runs/a")


def test_summary_and_page_tell_the_same_story(written: tuple[dict[str, Any], Path, str]) -> None:
    report, _, page = written
    summary = _text(report)
    typed = Report.from_dict(report)
    for sentence in (typed.headline(), typed.search_sentence(), *report["warnings"]):
        assert sentence in summary
        assert json.dumps(sentence)[1:-1].replace("<", "&lt;").replace(">", "&gt;") in page.replace("&#x27;", "'")
    assert typed.search_sentence() == ("The study ran 56 trials: 40 complete, 15 stopped early (certain to exceed "
                                       "the budget), 1 failed; 3 of them repeated an earlier configuration and "
                                       "reused its result instead of being evaluated again.")
    assert "WARNING: Trial 12: the split is <small>; a larger verification split would tell." in summary


def test_summary_reproduces_the_cli_table(written: tuple[dict[str, Any], Path, str]) -> None:
    report = written[0]
    summary = _text(report)
    assert summary.startswith("MEETS THE BUDGET 0.5%: Trial 12 loses 0.31 points of accuracy (test split)")
    for text in ("original", "compressed", "parameters", "MACs per sample", "1,234,567", "456,789", "2.70x fewer",
                 "latency (batch 32, 4 threads, measured)", "2.000 ms", "1.250 ms", "1.60x faster",
                 "latency (predicted by the latency table)", "2.002 ms", "1.300 ms", "1.54x faster",
                 "drop 0.31 points [95 % interval of the drop: -0.20 to 0.90] (allowed 0.50 points)",
                 "accuracy (validation split, first 70%)",
                 "ranks (trial 12): features.0 6/16, features.3 (12, 20)/(32, 64), <script> 24/128, "
                 "classifier.2 dense/10",
                 "compressed model (lrsearch.load)", "/runs/a/model.pt", "/runs/a/report.html", "/runs/a/report.json",
                 "sqlite:////runs/a/study.db", "lrsearch dashboard /runs/a"):
        assert text in summary, text
    assert "accuracy on test" not in summary and " pts" not in summary and "0.0050" not in summary
    assert "tried after fine-tuning" not in summary  # only when nothing held


def test_a_gain_reads_as_a_gain_and_a_logged_metric_keeps_its_name(tmp_path: Path) -> None:
    report = full_report()
    report["metric"] = "val_acc"
    report["final"]["verify_drop"] = report["attempts"][1]["verify_drop"] = -0.0025
    summary = _text(report)
    page = prose(write_report(tmp_path, report)[1].read_text())
    for rendering in (summary, page):
        assert "gains 0.25 points of val_acc (test split)" in rendering
        assert "-0.25" not in rendering and "loses" not in rendering and "val_acc on test" not in rendering
    assert "gain 0.25 points [95 % interval of the drop" in summary and "gain of 0.25 points" in page
    held_out = dict(report, splits={"search": "validation (first 70%)", "verify": "validation (last 30%, held out)"})
    assert "val_acc (validation split, last 30%, held out)" in _text(held_out)


def test_not_met_summary_lists_attempts_and_hints() -> None:
    report = full_report()
    report["meets_budget"] = False
    summary = _text(report)
    assert summary.startswith("DOES NOT MEET THE BUDGET 0.5%: No configuration kept its drop of accuracy (test split) "
                              "within the budget 0.5% (0.50 points) after fine-tuning (2 tried)")
    assert "tried after fine-tuning: trial 15 drop 0.90 points; trial 12 drop 0.31 points" in summary
    assert "HINT: widen --budget" in summary
    assert "MEETS THE BUDGET" not in summary.replace("DOES NOT MEET THE BUDGET", "")


def test_the_pareto_figure_draws_the_recorded_feasible_front(written: tuple[dict[str, Any], Path, str]) -> None:
    report = written[0]
    figure = Report.from_dict(report).pareto_figure()
    named = {trace.name: trace for trace in figure.data}
    assert list(named["feasible front"].customdata) == [24, 12]  # as recorded, cheapest first
    feasible = {t["number"] for t in report["trials"] if t["feasible"]}
    assert set(named["feasible front"].customdata) <= feasible
    assert set(named["over the search's constraint 0.5%"].customdata).isdisjoint(feasible)
    assert list(named["dense model"].x) == [2.002, 2.002]  # the predicted dense latency: the trials' scale
    assert figure.layout.xaxis.title.text == "predicted latency (ms)"
    assert figure.layout.yaxis.title.text == "accuracy drop before fine-tuning (points)"
    assert list(named["kept (trial 12)"].customdata) == [12]


def test_a_wide_search_constraint_is_named_as_such_and_a_drop_before_fine_tuning_is_held_to_it() -> None:
    """With search_budget auto the search allows 25 points before fine-tuning: the page must not call a
    trial 20 points down "within budget" beside the 0.5 % budget, nor flag it red against that budget."""
    report = full_report()
    report.update(search_budget="25%", search_allowed_drop=0.25)
    report["final"]["search_drop"] = report["attempts"][1]["search_drop"] = 0.2
    named = {trace.name: trace for trace in Report.from_dict(report).pareto_figure().data}
    assert "search constraint 25% (25.00 points)" in named and "budget 0.5% after fine-tuning (0.50 points)" in named
    assert "within the search's constraint 25%" in named
    page = html.unescape(prose(render_html(report)))
    assert "Drop on the search split, before fine-tuning" in page and "the search's constraint 25%" in page
    assert '<span class="over">20.00 points</span>' not in page and "20.00 points" in page
    assert "within the search's constraint 25% on the search split, before fine-tuning" in page
    report["final"]["search_drop"] = 0.3  # over the constraint (by hand): flagged
    assert '<span class="over">30.00 points</span>' in render_html(report)


def test_without_a_recorded_front_the_same_definition_is_applied() -> None:
    report = full_report()
    del report["pareto"]
    front = list(Report.from_dict(report).front)
    feasible = [t for t in report["trials"] if t["feasible"]]
    dominated = {t["number"] for t in feasible for o in feasible
                 if o["cost"] <= t["cost"] and o["drop"] <= t["drop"]
                 and (o["cost"], o["drop"]) != (t["cost"], t["drop"])}
    assert sorted(front) == sorted({t["number"] for t in feasible} - dominated)
    assert [t["cost"] for t in sorted(feasible, key=lambda t: t["cost"]) if t["number"] in front] == \
           sorted(t["cost"] for t in feasible if t["number"] in front)


def test_undecided_warning_is_one_complete_sentence() -> None:
    warning = undecided_warning(12, [0.002, 0.009], 0.005, "test")
    assert warning == ("Trial 12: the 95 % interval of its drop on the test split, 0.20 to 0.90 points, contains the "
                       "allowed drop of 0.50 points, so the split is too small to tell whether the budget holds; a "
                       "larger verification split would tell.")
    assert undecided_warning(12, [0.006, 0.009], 0.005, "test") is None
    assert undecided_warning(12, None, 0.005, "test") is None


def test_minimal_report_says_not_met(tmp_path: Path) -> None:
    json_path, html_path = write_report(tmp_path, MINIMAL)
    assert json.loads(json_path.read_text()) == MINIMAL
    page = html_path.read_text()
    assert "NOT met" in page and "0.5%" in page
    assert FIGURE not in page and "<script" not in page  # no figure, so no plotly.js either
    lowered = page.lower().replace("not met", "")
    assert "budget met" not in lowered and "met the budget" not in lowered and "meets" not in lowered
    for note in ("no complete search trials", "no per-layer ranks", "no fine-tune attempts",
                 "no measurements", "no file paths"):
        assert note in lowered, note
    assert render_text(MINIMAL).startswith("DOES NOT MEET THE BUDGET 0.5%")


def test_failed_final_is_never_called_a_success(tmp_path: Path) -> None:
    report = full_report()
    report["meets_budget"] = False
    report["final"]["verify_drop"] = 0.009
    page = write_report(tmp_path, report)[1].read_text()
    assert "Budget NOT met" in page and "0.90 points" in page and "Final (trial 12), not within budget" in page
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
    edited = dict(MINIMAL, budget="1%", allowed_drop=0.01)
    (tmp_path / REPORT_JSON).write_text(json.dumps(edited))
    page = rebuild_report(tmp_path).read_text()
    assert "1%" in page and "1.00 points" in page


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
    report["trial_counts"] = {"complete": "many"}
    report["warnings"] = "not a list"
    del report["dense"]["latency_ms"], report["dense"]["predicted_latency_ms"]
    del report["layer_order"]
    page = prose(write_report(tmp_path, report)[1].read_text())
    assert page.count(FIGURE) == 2
    assert "Not shown (no finite cost or drop): 1." in page and "n/a" not in page
    assert "The search recorded 41 complete trials" in page
    assert "MACs per sample" in Report.from_dict(report).pareto_figure().layout.xaxis.title.text
    summary = render_text(report)
    assert "latency (predicted" not in summary  # neither model has a predicted latency
    assert summary.count("features.0 6/16") == 1


@pytest.mark.slow  # a fresh interpreter that imports torch
def test_without_plotly_the_page_says_so_and_still_renders(tmp_path: Path) -> None:
    script = (
        "import sys, json, pathlib\n"
        "sys.modules['plotly'] = None  # every plotly import now fails\n"
        "from lrsearch.pipeline._report import write_report\n"
        "write_report(pathlib.Path(sys.argv[1]), json.loads(sys.argv[2]))\n"
    )
    result = subprocess.run([sys.executable, "-c", script, str(tmp_path), json.dumps(full_report())],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    page = (tmp_path / REPORT_HTML).read_text()
    assert FIGURE not in page and "<script" not in page and page.count("Plots need plotly") == 2
    assert "Budget met" in page and "&lt;script&gt;" in page


def test_render_html_is_the_written_page(written: tuple[dict[str, Any], Path, str]) -> None:
    assert render_html(json.loads(json.dumps(written[0], sort_keys=True))) == written[2]
