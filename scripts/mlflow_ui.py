"""The MLflow UI, served and looked at in a real browser: `make ui`, `make readme-figures`, tests/test_mlflow_ui.py.

Why a URL with `workflowType`: MLflow 3's UI (checked with 3.17 in Chromium 156) opens every experiment on its
GenAI overview (traces, token usage) in a browser that has not chosen otherwise: the sidebar's switch "GenAI /
Model training" defaults to GenAI and is kept in the browser's local storage, and the experiment's
`mlflow.experimentKind` tag (which headct sets) does not override it. The runs table of the model-training view is
`#/experiments/<id>/runs?workflowType=machine_learning`; `serve` prints that address, and the test opens it.

Subcommands:
  serve       run `mlflow server` on a store and print the address of the experiment's runs (`make ui`)
  screenshot  a PNG of the experiment's runs table
  figures     the README's figures from a workspace after `dvc repro` (`make readme-figures`): the report's radar
              and few-shot plots, downsized, and the runs table; PNGs under 300 KB in all

The browser is Chromium (Debian's `chromium`, or $CHROMIUM), headless, driven over its DevTools protocol with
aiohttp's WebSocket client (installed with DVC, pinned in constraints.txt): the page is polled until the runs are
listed, so a slow machine waits instead of failing on a fixed render budget.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
FIGURE_BUDGET = 300 * 1024  # bytes, all PNGs under docs/figures together
REPORT_FIGURES = ("radar.png", "fewshot.png")


class UIError(RuntimeError):
    """The server or the browser could not show what was asked; the message says why."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def chromium() -> str | None:
    """The Chromium binary: $CHROMIUM, else the first of BROWSERS on PATH; None when there is none."""
    if os.environ.get("CHROMIUM"):
        return shutil.which(os.environ["CHROMIUM"])
    return next((found for name in BROWSERS if (found := shutil.which(name))), None)


def store_uri(store: str) -> str:
    """A tracking URI from a URI or a SQLite file path (`mlflow.db` -> `sqlite:////abs/mlflow.db`)."""
    if "://" in store:
        return store
    return f"sqlite:///{Path(store).resolve()}"


def runs_url(base: str, experiment_id: str) -> str:
    """The experiment's runs table in the model-training view (see the module docstring for why the query)."""
    return f"{base}/#/experiments/{experiment_id}/runs?workflowType=machine_learning"


def _api(base: str, path: str, payload: dict | None = None) -> dict:
    data = None if payload is None else json.dumps(payload).encode()
    request = urllib.request.Request(f"{base}/api/2.0/mlflow/{path}", data=data,
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return json.load(response)
    except urllib.error.HTTPError:
        raise  # an answer (e.g. 404 for an unknown experiment): the caller decides
    except OSError as exc:  # refused, reset or timed out (a loaded machine): say which call, not a traceback
        raise UIError(f"mlflow server {base}: {path} did not answer ({exc})") from None


def experiment_id(base: str, name: str) -> str | None:
    """The id of experiment `name` on the server at `base`; None when the store has no such experiment."""
    query = urllib.parse.urlencode({"experiment_name": name})
    try:
        return _api(base, f"experiments/get-by-name?{query}")["experiment"]["experiment_id"]
    except urllib.error.HTTPError as err:
        if err.code == 404:
            return None
        raise


def top_run_names(base: str, exp_id: str) -> list[str]:
    """Names of the experiment's top-level runs (children are folded under their parent in the table)."""
    runs = _api(base, "runs/search", {"experiment_ids": [exp_id], "max_results": 1000}).get("runs", [])
    return [r["info"]["run_name"] for r in runs
            if not any(t["key"] == "mlflow.parentRunId" for t in r.get("data", {}).get("tags", []))]


@contextmanager
def serve(store: str, artifacts: Path, port: int | None = None, host: str = "127.0.0.1",
          timeout: float = 600.0) -> Iterator[str]:
    """`mlflow server` on `store` (a URI or SQLite file), yielding its base URL once /health answers; stopped
    (its whole process group: the web workers too) on exit."""
    exe = shutil.which("mlflow", path=str(Path(sys.executable).parent)) or shutil.which("mlflow")
    if exe is None:
        raise UIError("the `mlflow` command is not installed beside this Python (run `make setup`)")
    port = port or free_port()
    base = f"http://{host}:{port}"
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"}
    cmd = [exe, "server", "--backend-store-uri", store_uri(store), "--default-artifact-root", str(artifacts),
           "--host", host, "--port", str(port), "--workers", "1"]
    with tempfile.TemporaryFile() as log:
        server = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            _wait_healthy(base, server, log, store, timeout)
            yield base
        finally:
            _stop(server)


def _wait_healthy(base: str, server: subprocess.Popen, log, store: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(f"{base}/health", timeout=2):
                return
        except OSError:
            if server.poll() is not None or time.monotonic() > deadline:
                log.seek(0)
                tail = log.read().decode(errors="replace")[-2000:]
                why = f"exited with {server.returncode}" if server.poll() is not None else f"no answer in {timeout:.0f} s"
                raise UIError(f"mlflow server on {store}: {why}\n{tail}") from None
            time.sleep(0.5)


def _stop(proc: subprocess.Popen) -> None:
    """Stop the process group `proc` started (start_new_session): the server's web workers too, nothing else."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


@dataclass
class Page:
    url: str  # where the app ended up after its own redirects
    title: str
    text: str  # the rendered text (document.body.innerText)
    found: bool  # every wanted text was seen before the deadline


@contextmanager
def _browser(width: int, height: int) -> Iterator[int]:
    """A headless Chromium with a fresh profile (no stored UI choices); yields its DevTools port."""
    exe = chromium()
    if exe is None:
        raise UIError(f"no Chromium ({', '.join(BROWSERS)} or $CHROMIUM); Debian: apt-get install chromium")
    with tempfile.TemporaryDirectory(prefix="headct-chromium-") as profile:
        cmd = [exe, "--headless", "--disable-gpu", "--no-first-run", "--no-default-browser-check", "--hide-scrollbars",
               "--mute-audio", f"--window-size={width},{height}", "--remote-debugging-port=0",
               f"--user-data-dir={profile}", "about:blank"]
        if hasattr(os, "geteuid") and os.geteuid() == 0:
            cmd.insert(1, "--no-sandbox")  # Chromium refuses to start as root with its sandbox (containers, CI)
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        try:
            active = Path(profile) / "DevToolsActivePort"  # written by Chromium once it listens: "<port>\n<path>"
            deadline = time.monotonic() + 60
            while not (active.exists() and active.read_text().strip()):
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise UIError(f"{exe} did not start (exit {proc.poll()})")
                time.sleep(0.1)
            yield int(active.read_text().split()[0])
        finally:
            _stop(proc)


CLOSE_ASSISTANT = """(() => {
  for (const button of document.querySelectorAll('button[aria-label="Close"]')) {
    for (let p = button, i = 0; p && i < 8; p = p.parentElement, i++) {
      if ((p.innerText || '').includes('MLflow Assistant')) { button.click(); return true; }
    }
  }
  return false;
})()"""


async def _visit(port: int, url: str, wanted: list[str], timeout: float, width: int, height: int,
                 screenshot: Path | None) -> Page:
    import aiohttp

    async with aiohttp.ClientSession() as http:
        async with http.get(f"http://127.0.0.1:{port}/json/list") as response:
            targets = await response.json()
        page = next(t for t in targets if t.get("type") == "page")
        async with http.ws_connect(page["webSocketDebuggerUrl"], max_msg_size=0) as ws:
            ids = iter(range(1, 1 << 30))

            async def call(method: str, **params) -> dict:
                n = next(ids)
                await ws.send_json({"id": n, "method": method, "params": params})
                while True:  # no domain is enabled, so only answers arrive; skip any other message
                    message = await asyncio.wait_for(ws.receive_json(), timeout=60)
                    if message.get("id") == n:
                        if "error" in message:
                            raise UIError(f"DevTools {method}: {message['error']}")
                        return message.get("result", {})

            await call("Emulation.setDeviceMetricsOverride", width=width, height=height, deviceScaleFactor=1,
                       mobile=False)
            await call("Page.navigate", url=url)
            script = "JSON.stringify({url: location.href, title: document.title, text: document.body ? " \
                     "document.body.innerText : ''})"
            deadline = time.monotonic() + timeout
            while True:
                result = await call("Runtime.evaluate", expression=script, returnByValue=True)
                state = json.loads(result.get("result", {}).get("value") or "{}")
                found = bool(state) and all(w in state["text"] for w in wanted)
                if found or time.monotonic() > deadline:
                    break
                await asyncio.sleep(0.5)
            if screenshot is not None and found:
                # MLflow 3.17 opens its "MLflow Assistant" side panel on a first visit; it would take a third of
                # the picture, so its Close button (the one inside the panel titled so) is pressed first
                await call("Runtime.evaluate", expression=CLOSE_ASSISTANT, returnByValue=True)
                await asyncio.sleep(1.0)  # let the grid finish its layout after the rows arrive
                import base64

                shot = await call("Page.captureScreenshot", format="png")
                _write_atomic(screenshot, base64.b64decode(shot["data"]))
    return Page(state.get("url", ""), state.get("title", ""), state.get("text", ""), found)


def open_page(url: str, wanted: list[str], timeout: float = 60.0, width: int = 1280, height: int = 720,
              screenshot: Path | None = None) -> Page:
    """Load `url` in a fresh headless Chromium, poll its rendered text until every string of `wanted` shows (or
    `timeout` s pass), and return where it ended up; with `screenshot`, a PNG of the viewport once found."""
    with _browser(width, height) as port:
        return asyncio.run(_visit(port, url, wanted, timeout, width, height, screenshot))


def _write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def shrink_png(src: Path, dest: Path, max_width: int) -> int:
    """`src` scaled to at most `max_width` pixels wide and reduced to a 256-colour palette (plots and UI
    screenshots are flat colours, so this is near lossless to the eye); written atomically. Returns bytes."""
    import io

    from PIL import Image

    with Image.open(src) as image:
        image = image.convert("RGB")
        if image.width > max_width:
            image = image.resize((max_width, round(image.height * max_width / image.width)), Image.LANCZOS)
        buffer = io.BytesIO()
        image.quantize(colors=256, method=Image.Quantize.MEDIANCUT).save(buffer, format="PNG", optimize=True)
    _write_atomic(dest, buffer.getvalue())
    return len(buffer.getvalue())


def workspace_experiment(workspace: Path) -> str:
    """The MLflow experiment a workspace's params.yaml logs to (`tracking.experiment`, else headct's default)."""
    import yaml

    from headct.config import TrackingConfig

    params = workspace / "params.yaml"
    tree = yaml.safe_load(params.read_text()) if params.exists() else None
    return ((tree or {}).get("tracking") or {}).get("experiment") or TrackingConfig().experiment


def screenshot_runs(store: str, experiment: str, out: Path, width: int = 1280, height: int = 800,
                    timeout: float = 600.0) -> Path:
    """A PNG of `experiment`'s runs table, served from `store` by a throw-away `mlflow server`, taken once the
    newest runs are listed (the grid draws only the rows in view; the API returns the newest first)."""
    with tempfile.TemporaryDirectory() as scratch, serve(store, Path(scratch)) as base:
        exp_id = experiment_id(base, experiment)
        if exp_id is None:
            raise UIError(f"{store}: no MLflow experiment named {experiment!r} (run the pipeline first)")
        names = top_run_names(base, exp_id)[:5]
        page = open_page(runs_url(base, exp_id), names, timeout, width, height, screenshot=out)
        if not page.found:
            missing = [n for n in names if n not in page.text]
            raise UIError(f"the runs table of {experiment!r} did not list {missing} within {timeout:.0f} s "
                          f"(the page ended on {page.url!r}, titled {page.title!r})")
    return out


def figures(workspace: Path, out: Path) -> dict[str, int]:
    """The README's figures from `workspace` (after `dvc repro`) into `out`; returns {file: bytes}."""
    report = workspace / "reports" / "report"
    missing = [name for name in REPORT_FIGURES if not (report / name).is_file()]
    if missing:
        raise UIError(f"{report}: no {', '.join(missing)} (run `make demo` there first, or pass WORKSPACE=)")
    sizes = {name: shrink_png(report / name, out / name, max_width=640) for name in REPORT_FIGURES}
    with tempfile.TemporaryDirectory() as scratch:
        raw = screenshot_runs(str(workspace / "mlflow.db"), workspace_experiment(workspace),
                              Path(scratch) / "runs.png")
        sizes["mlflow-runs.png"] = shrink_png(raw, out / "mlflow-runs.png", max_width=1000)
    total = sum(sizes.values())
    if total > FIGURE_BUDGET:
        raise UIError(f"{out}: the figures take {total / 1024:.0f} KB, over the README's {FIGURE_BUDGET // 1024} KB")
    return sizes


def _serve_forever(store: str, experiment: str, port: int, artifacts: Path) -> None:
    with serve(store, artifacts, port=port) as base:
        exp_id = experiment_id(base, experiment)
        if exp_id is None:
            print(f"MLflow UI: {base}  (no experiment {experiment!r} in {store} yet: run `make demo` first)")
        else:
            print(f"MLflow UI, the runs of {experiment!r}: {runs_url(base, exp_id)}")
            print("(MLflow's own links open experiments on the GenAI view; its sidebar switch 'Model training' "
                  "shows the runs)")
        print("Ctrl-C stops the server.", flush=True)
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    s = sub.add_parser("serve", help="mlflow server on a store; prints the address of the experiment's runs")
    s.add_argument("--store", default="mlflow.db", help="SQLite file or tracking URI (default mlflow.db)")
    s.add_argument("--experiment", help="default: tracking.experiment of ./params.yaml")
    s.add_argument("--port", type=int, default=5000)
    s.add_argument("--artifacts", type=Path, default=Path("mlartifacts"))
    s = sub.add_parser("screenshot", help="a PNG of an experiment's runs table")
    s.add_argument("--store", default="mlflow.db")
    s.add_argument("--experiment", help="default: tracking.experiment of ./params.yaml")
    s.add_argument("--out", type=Path, required=True)
    s = sub.add_parser("figures", help="the README's figures from a workspace after `dvc repro`")
    s.add_argument("--workspace", type=Path, default=Path("."))
    s.add_argument("--out", type=Path, default=Path("docs/figures"))
    args = parser.parse_args()
    # A SIGTERM (`timeout`, a CI limit, Ctrl-C's cousin) exits through the `finally` blocks that stop the mlflow
    # server and the browser; Python's default would end this process and leave them running.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        if args.command == "serve":
            _serve_forever(args.store, args.experiment or workspace_experiment(Path(".")), args.port,
                           args.artifacts.resolve())
        elif args.command == "screenshot":
            print(screenshot_runs(args.store, args.experiment or workspace_experiment(Path(".")), args.out))
        else:
            for name, size in figures(args.workspace.resolve(), args.out).items():
                print(f"{args.out / name}: {size / 1024:.0f} KB")
    except UIError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
