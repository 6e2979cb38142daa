"""The stack's UIs in a real browser: screenshots for the README, and a check that the UIs load.

    python -m infra.ui_screenshots [--stack-dir DIR] [--out docs/img]

takes four 1280x800 screenshots of a running local stack (``tunepipe stack up``) that has a finished
flights run (``tunepipe run flights``) and the deployments (``prefect deploy --all``):

    prefect-flow-run.png          the latest completed flights run: task graph with its artifacts
    prefect-report-artifact.png   that run's report artifact
    prefect-deployment-form.png   the flights deployment's custom-run form, at the tuning section
    mlflow-model-version.png      the registry champion's model version page in MLflow

``Browser`` drives headless Chromium (Debian: ``apt-get install chromium``) over the DevTools protocol:
unlike ``chromium --screenshot``, it can wait until a page shows what it should (these UIs render after
their API calls return) and scroll to a part of a long page. Only 127.0.0.1 pages of the stack are opened.
"""

from __future__ import annotations

import argparse
import base64
import json
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

from tuning_core.errors import TunepipeError

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
FLIGHTS_FLOW = "flights-tuning"
DEFAULT_DEPLOYMENT = "flights-tuning/flights-nightly"


def find_chromium() -> str | None:
    """The first Chromium-family browser on PATH, or None."""
    return next((path for name in CHROMIUM_NAMES if (path := shutil.which(name))), None)


class Browser:
    """One headless Chromium tab driven over the DevTools protocol (a context manager).

    Args:
        width, height: the viewport in CSS pixels (screenshots have this size).
        binary: the browser; default: ``find_chromium()``.
    """

    def __init__(self, width: int = 1280, height: int = 800, binary: str | None = None) -> None:
        self.width, self.height = width, height
        self.binary = binary or find_chromium()
        if not self.binary:
            raise TunepipeError(f"no Chromium on PATH (looked for {', '.join(CHROMIUM_NAMES)}); "
                                "install it, e.g. `apt-get install chromium`")
        self._ids = 0

    def __enter__(self) -> Browser:
        from websockets.sync.client import connect

        self._profile = tempfile.mkdtemp(prefix="tunepipe-chromium-")
        self._proc = subprocess.Popen(
            [self.binary, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--no-first-run",
             "--remote-debugging-address=127.0.0.1", "--remote-debugging-port=0", f"--user-data-dir={self._profile}",
             f"--window-size={self.width},{self.height}", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        try:
            port = self._devtools_port(timeout_s=30)
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10) as r:
                page = next(t for t in json.load(r) if t.get("type") == "page")
            self._ws = connect(page["webSocketDebuggerUrl"], max_size=None, open_timeout=10)
            self.call("Emulation.setDeviceMetricsOverride", width=self.width, height=self.height,
                      deviceScaleFactor=1, mobile=False)
        except BaseException:
            self._stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop()

    def _devtools_port(self, timeout_s: float) -> int:
        marker = Path(self._profile, "DevToolsActivePort")
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise TunepipeError(f"{self.binary} exited with code {self._proc.returncode} on start")
            if marker.exists() and marker.read_text().strip():
                return int(marker.read_text().split()[0])
            time.sleep(0.1)
        raise TunepipeError(f"{self.binary} did not open its DevTools port within {timeout_s:.0f} s")

    def _stop(self) -> None:
        ws = getattr(self, "_ws", None)
        if ws is not None:
            ws.close()
        if self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        shutil.rmtree(self._profile, ignore_errors=True)

    def call(self, method: str, **params: Any) -> dict[str, Any]:
        """One DevTools command; events that arrive meanwhile are dropped (nothing here subscribes)."""
        self._ids += 1
        self._ws.send(json.dumps({"id": self._ids, "method": method, "params": params}))
        while True:
            msg = json.loads(self._ws.recv(timeout=60))
            if msg.get("id") == self._ids:
                if "error" in msg:
                    raise TunepipeError(f"browser: {method} failed: {msg['error'].get('message')}")
                return msg.get("result", {})

    def js(self, expression: str) -> Any:
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        return result.get("result", {}).get("value")

    def text(self) -> str:
        return self.js("document.body ? document.body.innerText : ''") or ""

    def open(self, url: str, until: str | None = None, timeout_s: float = 30) -> str:
        """Load ``url`` and wait until its text contains ``until`` (or ``timeout_s`` passes); returns the
        page's text either way, so that a caller can tell what the page showed instead."""
        self.call("Page.navigate", url=url)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.js("document.readyState") == "complete" and (until is None or until in self.text()):
                break
            time.sleep(0.25)
        time.sleep(1.0)  # charts and graphs draw after the text is there
        return self.text()

    def wait_for(self, text: str, timeout_s: float = 30) -> bool:
        deadline = time.monotonic() + timeout_s
        while text not in self.text():
            if time.monotonic() > deadline:
                return False
            time.sleep(0.25)
        return True

    def _on_element(self, finder: str, action: str) -> bool:
        return bool(self.js(f"(() => {{ const hit = {finder}; if (!hit) return false; {action}; return true; }})()"))

    @staticmethod
    def _with_text(text: str) -> str:
        # The innermost element showing exactly this text (a label, a tab, a heading).
        return ("[...document.querySelectorAll('body *')].find(e => e.children.length === 0"
                f" && e.textContent.trim() === {json.dumps(text)})")

    def scroll_to(self, text: str) -> bool:
        """Scroll the element showing ``text`` to the top of its scroller."""
        return self._on_element(self._with_text(text), "hit.scrollIntoView({block: 'start'})")

    def click(self, text: str | None = None, label: str | None = None) -> bool:
        """Click the element showing ``text``, or the button labelled ``label`` (aria-label)."""
        finder = (self._with_text(text) if text is not None
                  else f"document.querySelector('button[aria-label={json.dumps(label)}]')")
        return self._on_element(finder, "hit.click()")

    def screenshot(self, path: Path) -> Path:
        """The viewport as a PNG, reduced to 128 colours (a third of the size; UIs are flat colours)."""
        import io

        from PIL import Image  # pillow comes with matplotlib

        data = base64.b64decode(self.call("Page.captureScreenshot", format="png")["data"])
        image = Image.open(io.BytesIO(data)).convert("RGB")
        path.parent.mkdir(parents=True, exist_ok=True)
        image.quantize(colors=128, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE).save(path, optimize=True)
        return path


# ---- the stack's APIs (plain HTTP: the pages to open are found the way the UIs find them) ------------


def _json(url: str, body: dict[str, Any] | None = None) -> Any:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"},
                                 method="POST" if body is not None else "GET")
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.load(r)


def latest_flow_run(api: str, flow_name: str = FLIGHTS_FLOW) -> dict[str, Any]:
    runs = _json(f"{api}/flow_runs/filter", {
        "flows": {"name": {"any_": [flow_name]}}, "flow_runs": {"state": {"type": {"any_": ["COMPLETED"]}}},
        "sort": "START_TIME_DESC", "limit": 1})
    if not runs:
        raise TunepipeError(f"no completed {flow_name} flow run on {api}; run `tunepipe run flights` "
                            "with the stack's environment first")
    return runs[0]


def report_artifact(api: str, flow_run_id: str, key: str = "flights-report") -> dict[str, Any]:
    found = _json(f"{api}/artifacts/filter", {"artifacts": {"flow_run_id": {"any_": [flow_run_id]},
                                                             "key": {"any_": [key]}}, "limit": 1})
    if not found:
        raise TunepipeError(f"flow run {flow_run_id} on {api} has no {key!r} artifact")
    return found[0]


def deployment_id(api: str, name: str = DEFAULT_DEPLOYMENT) -> str:
    try:
        return _json(f"{api}/deployments/name/{name}")["id"]
    except urllib.error.HTTPError as err:
        if err.code == 404:
            raise TunepipeError(f"deployment {name!r} not found on {api}; run `prefect deploy --all` "
                                "with the stack's environment first") from None
        raise


def champion_version(mlflow_uri: str, model: str, alias: str = "champion") -> str:
    query = urllib.parse.urlencode({"name": model, "alias": alias})
    try:
        return _json(f"{mlflow_uri}/api/2.0/mlflow/registered-models/alias?{query}")["model_version"]["version"]
    except urllib.error.HTTPError as err:
        if err.code == 404:
            raise TunepipeError(f"model {model!r} has no {alias!r} alias on {mlflow_uri}") from None
        raise


def take_screenshots(prefect_api: str, mlflow_uri: str, out: Path, *, model: str = "tunepipe-flights",
                     deployment: str = DEFAULT_DEPLOYMENT, width: int = 1280, height: int = 800,
                     timeout_s: float = 60) -> list[Path]:
    """The four README screenshots of a stack; returns their paths."""
    ui = prefect_api.removesuffix("/").removesuffix("/api")
    run = latest_flow_run(prefect_api)
    artifact = report_artifact(prefect_api, run["id"])
    form = deployment_id(prefect_api, deployment)
    version = champion_version(mlflow_uri, model)
    shots = []
    with Browser(width, height) as browser:
        # The graph is a canvas (its artifact badges are not text): wait for the run's logs instead.
        browser.open(f"{ui}/runs/flow-run/{run['id']}", until="Finished in state", timeout_s=timeout_s)
        time.sleep(1.0)
        shots.append(browser.screenshot(out / "prefect-flow-run.png"))
        browser.open(f"{ui}/artifacts/artifact/{artifact['id']}", until="Registry decision", timeout_s=timeout_s)
        shots.append(browser.screenshot(out / "prefect-report-artifact.png"))
        browser.open(f"{ui}/deployments/deployment/{form}/run", until="Tune (Optional)", timeout_s=timeout_s)
        browser.scroll_to("Tune (Optional)")  # the search algorithm and scheduler dropdowns
        time.sleep(0.5)
        shots.append(browser.screenshot(out / "prefect-deployment-form.png"))
        browser.open(f"{mlflow_uri}/#/models/{urllib.parse.quote(model)}/versions/{version}",
                     until=f"Version {version}", timeout_s=timeout_s)
        browser.click(label="Close")  # MLflow's assistant panel, open by default, hides half the page
        time.sleep(0.5)
        shots.append(browser.screenshot(out / "mlflow-model-version.png"))
    return shots


def main(argv: list[str] | None = None) -> int:
    from infra import stack

    parser = argparse.ArgumentParser(prog="python -m infra.ui_screenshots", description=__doc__.split("\n\n")[0])
    parser.add_argument("--stack-dir", type=Path, default=None, help="the stack's state folder "
                        "(default: TUNEPIPE_STACK_DIR or .tunepipe/stack)")
    parser.add_argument("--out", type=Path, default=Path("docs/img"), help="folder for the PNG files")
    parser.add_argument("--model", default="tunepipe-flights", help="registered model (its champion is shown)")
    parser.add_argument("--deployment", default=DEFAULT_DEPLOYMENT, help="flow/deployment whose form is shown")
    args = parser.parse_args(argv)
    try:
        env = stack.env(args.stack_dir)
        for path in take_screenshots(env["PREFECT_API_URL"], env["MLFLOW_TRACKING_URI"], args.out,
                                     model=args.model, deployment=args.deployment):
            print(path)
    except TunepipeError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
