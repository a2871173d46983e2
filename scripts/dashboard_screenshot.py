"""Screenshot what a user sees in ``lrsearch dashboard`` after a small search (for the README).

Trains a tiny MLP on synthetic data, runs a 20-trial latency search into a temporary folder,
serves the dashboard on 127.0.0.1 and screenshots the study page with headless Chromium
(Debian: ``apt-get install chromium``). Also prints what the dashboard's API says is the best
trial, so the picture can be checked against the data.

    python scripts/dashboard_screenshot.py --out docs/dashboard.png
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import tempfile
import threading
import urllib.request
from pathlib import Path

import optuna
import torch
from PIL import Image
from torch import nn

import lrsearch
from lrsearch.study._dashboard import dashboard_server

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run", "--hide-scrollbars"]


def tiny_search(run_dir: Path, *, trials: int) -> lrsearch.SearchResult:
    """A small MLP trained for a few seconds, then searched under a 1 % budget."""
    torch.manual_seed(0)
    x = torch.randn(3072, 64)
    y = (x[:, :8] @ torch.randn(8, 6)).argmax(1)
    model = nn.Sequential(nn.Linear(64, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 6))
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    for _ in range(200):
        loss = nn.functional.cross_entropy(model(x[:2048]), y[:2048])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    data = [(x[i:i + 256], y[i:i + 256]) for i in range(2048, 3072, 256)]
    return lrsearch.search(model.eval(), data, budget="1%", n_trials=trials, run_dir=str(run_dir), study_name="tiny",
                           threads=1, latency_min_run_time=0.02, latency_repeats=1, seed=0)


def screenshot(url: str, out: Path, *, size: str, wait_ms: int) -> None:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        raise SystemExit("chromium is not installed (Debian: apt-get install chromium)")
    with tempfile.TemporaryDirectory() as profile:
        subprocess.run([chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", f"--window-size={size}",
                        f"--virtual-time-budget={wait_ms}", f"--screenshot={out}", url],
                       check=True, capture_output=True, timeout=180)
    # A UI screenshot has few colours: 256 keep it legible at a third of the size.
    Image.open(out).convert("RGB").quantize(colors=256).save(out, optimize=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("docs/dashboard.png"))
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--size", default="1400,2000", help="browser window, WIDTH,HEIGHT")
    parser.add_argument("--wait-ms", type=int, default=15000, help="virtual time for the page to render")
    args = parser.parse_args()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    with tempfile.TemporaryDirectory() as folder:
        result = tiny_search(Path(folder) / "run", trials=args.trials)
        storage = optuna.storages.RDBStorage(result.storage)
        study_id = storage.get_study_id_from_name(result.study_name)
        with dashboard_server(storage, host="127.0.0.1", port=0) as server:
            threading.Thread(target=server.serve_forever, daemon=True).start()
            base = f"http://127.0.0.1:{server.server_address[1]}"
            try:
                with urllib.request.urlopen(f"{base}/api/studies/{study_id}", timeout=60) as response:
                    answer = json.loads(response.read())
                args.out.parent.mkdir(parents=True, exist_ok=True)
                screenshot(f"{base}/dashboard/studies/{study_id}", args.out, size=args.size, wait_ms=args.wait_ms)
            finally:
                server.shutdown()
    best = [t["number"] for t in answer["best_trials"]]
    over = [t["number"] for t in answer["trials"] if any(c > 0 for c in t["constraints"])]
    print(f"{len(answer['trials'])} trials; best (API): {best}; result.best: "
          f"{result.best.trial if result.best else None}; over budget: {over}")
    print(f"wrote {args.out} ({args.out.stat().st_size:,} bytes)")


if __name__ == "__main__":
    main()
