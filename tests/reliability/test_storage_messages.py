"""The messages of issue 15, part 5: a study file that is not one, another model or other data, and
storage URLs shown as the user wrote them, password hidden."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lrsearch import LrSearchError
from lrsearch.study import StorageError, open_storage, search
from lrsearch.study._storage import check_file_storage
from tests.reliability._worker import mlp

BASE = {"budget": "1%", "objective": "macs", "n_trials": 1, "warm_start": False}


@pytest.mark.parametrize(("url", "kind"), [("sqlite:///{}", "is not a SQLite database"),
                                           ("journal:{}", "is not an Optuna journal file")])
def test_a_storage_file_that_is_not_a_study_fails_before_any_folder_is_made(url: str, kind: str, trained,
                                                                            tmp_path: Path) -> None:
    model, val = trained
    notes = tmp_path / "notes.txt"
    notes.write_text("my notes\n")
    storage = url.format(notes)
    with pytest.raises(StorageError, match=f"{notes} {kind}"):
        check_file_storage(storage)
    with pytest.raises(StorageError, match=kind):
        search(model, val, **BASE, storage=storage, run_dir=str(tmp_path / "run" / "search"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"], "no run/ or run/search/ left behind"
    assert notes.read_text() == "my notes\n"


def test_empty_and_real_study_files_pass_the_check(trained, tmp_path: Path) -> None:
    model, val = trained
    (tmp_path / "empty.db").touch()
    check_file_storage(f"sqlite:///{tmp_path / 'empty.db'}")
    for storage in (f"sqlite:///{tmp_path / 'study.db'}", f"journal:{tmp_path / 'study.log'}"):
        search(model, val, **BASE, storage=storage, run_dir=str(tmp_path / "run"))
        check_file_storage(storage)


def _other_weights() -> torch.nn.Module:
    torch.manual_seed(1)
    return mlp()


def test_a_study_resumed_on_another_model_says_model_and_on_other_data_says_data(trained, tmp_path: Path) -> None:
    model, val = trained
    options = {**BASE, "run_dir": str(tmp_path / "run"), "study_name": "resumed"}
    search(model, val, **options)
    with pytest.raises(LrSearchError, match=r"searched on a model with other weights.*3 of 3 target layers.*"
                                            r"HINT: resume with the model \(and checkpoint\)"):
        search(_other_weights(), val, **options)
    with pytest.raises(LrSearchError, match=r"searched on another model.*0: Linear \[64, 16\] in the study, "
                                            r"Linear \[32, 16\] here.*target_modules"):
        search(mlp(32), val, **options)
    flipped = [(x, (y + 1) % 4) for x, y in val]
    with pytest.raises(LrSearchError, match=r"was run on data with baseline") as caught:
        search(model, flipped, **options)
    assert "model" not in str(caught.value)
    search(model, val, **{**options, "n_trials": 2})  # the same model and data resume


def test_storage_errors_show_the_url_as_given_with_the_password_hidden() -> None:
    url = "postgresql://bob:s3cret@127.0.0.1:1/studies"
    with pytest.raises(StorageError) as caught:
        open_storage(url)
    message = str(caught.value)
    assert "'postgresql://bob:***@127.0.0.1:1/studies'" in message
    assert "s3cret" not in message and "psycopg" not in message
    assert "check the URL, the server and the credentials" in message


def test_a_damaged_sqlite_file_does_not_blame_the_server(tmp_path: Path) -> None:
    damaged = tmp_path / "study.db"
    damaged.write_bytes(b"SQLite format 3\x00" + b"\x00" * 100)
    with pytest.raises(StorageError, match="check that the file is an Optuna study") as caught:
        open_storage(f"sqlite:///{damaged}")
    assert "server" not in str(caught.value)


def test_the_weight_fingerprint_is_the_same_in_chunks_and_sees_one_changed_weight() -> None:
    from lrsearch.study._fingerprint import _TOLERANCE, _weight_figures

    weight = torch.randn(300, 100, generator=torch.Generator().manual_seed(0))
    norm, projection = _weight_figures(weight)
    chunked = _weight_figures(weight, chunk=1234)
    assert abs(chunked[0] - norm) <= _TOLERANCE * norm and abs(chunked[1] - projection) <= _TOLERANCE * norm
    nudged = weight.clone()
    nudged[7, 3] += 1e-4
    assert abs(_weight_figures(nudged)[1] - projection) > _TOLERANCE * norm
