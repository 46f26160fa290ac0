"""charlm visualize: the exact trace, the text features, the cell ranking, the CLI, and the page in
a real headless Chromium (driven over the DevTools protocol; skipped, with the reason, without it)."""

from __future__ import annotations

import base64
import contextlib
import io
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch

from charlm import visualize as V
from charlm import visualize_html
from charlm.cli import main
from charlm.config import ModelConfig
from charlm.model import CharLM

TINY = ["--hidden-size", "32", "--embed-size", "8", "--batch-size", "4", "--seq-len", "16", "--lr", "1e-2"]
CODE = '''def f(x, y):
    """Doc "string"."""
    if x:  # a comment with 'quotes'
        return [y, (x + 1)]
    s = 'it\\'s' + "#not a comment"
    return {"k": s}
'''


def _arr(values) -> np.ndarray:
    return np.asarray(values, dtype=np.float32)


# ---------------------------------------------------------------------------------------------
# features on hand-made strings


def test_quotation_and_brackets():
    text = 'a "bc" (d[e]) “f”'
    np.testing.assert_array_equal(V.in_quote(text), _arr([0, 0, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 0]))
    np.testing.assert_array_equal(
        V.bracket_depth(text), _arr([0, 0, 0, 0, 0, 0, 0, 1, 1, 2, 2, 1, 0, 0, 0, 0, 0])
    )
    np.testing.assert_array_equal(V.in_brackets(text), (V.bracket_depth(text) > 0).astype(np.float32))
    assert V.bracket_depth("))(")[-1] == 1  # never below zero


def test_line_features():
    text = "ab\n  cd\n\tx\n"
    np.testing.assert_array_equal(V.line_length(text), _arr([1, 2, 0, 1, 2, 3, 4, 0, 1, 2, 0]))
    np.testing.assert_array_equal(V.after_newline(text), _arr([0, 0, 1, 0, 0, 0, 0, 1, 0, 0, 1]))
    np.testing.assert_array_equal(V.indentation(text), _arr([0, 0, 0, 1, 2, 2, 2, 0, 8, 8, 0]))
    np.testing.assert_allclose(
        V.position_in_line(text), _arr([0.5, 1, 0, 0.25, 0.5, 0.75, 1, 0, 0.5, 1, 0]), rtol=1e-6
    )
    assert V.indentation("  a  b")[-1] == 2  # only leading whitespace counts


def test_python_strings_and_comments():
    s, c = V.python_lexical(CODE)
    inside = "".join(ch for ch, v in zip(CODE, s, strict=True) if v)
    comment = "".join(ch for ch, v in zip(CODE, c, strict=True) if v)
    # opening delimiters inside, the last closing character outside
    assert inside == '"""Doc "string"."""'[:-1] + "'it\\'s" + '"#not a comment' + '"k'
    assert comment == "# a comment with 'quotes'"
    s, _ = V.python_lexical("x = 'open\ny = 1")  # unterminated: ends at the newline
    assert s.tolist() == [0, 0, 0, 0, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0]
    s, _ = V.python_lexical("''+'a'")  # an empty string is not a triple quote
    assert s.tolist() == [1, 0, 0, 1, 1, 0]
    feats = V.features(CODE)
    assert list(feats) == list(V.FEATURES)
    assert all(f.shape == (len(CODE),) and f.dtype == np.float32 for f in feats.values())


# ---------------------------------------------------------------------------------------------
# ranking


def test_a_cell_equal_to_a_feature_ranks_first_with_r_1():
    text = CODE * 3
    feats = V.features(text)
    rng = np.random.default_rng(1)
    acts = rng.uniform(-1, 1, (len(text), 40)).astype(np.float32)
    acts[:, 17] = 0.5 * feats["in_string"] - 0.2  # an affine copy: r = 1 exactly
    acts[:, 5] = -feats["indentation"] / 8  # a flipped one: r = -1
    acts[:, 30] = 0.3  # a constant cell
    labels = [(k // 20, "hc"[(k // 10) % 2], k % 10) for k in range(40)]
    feats["constant"] = np.ones(len(text), dtype=np.float32)
    corr = V.correlations(feats, acts)
    best = V.rank_cells(corr, labels, best=3)
    top = best["in_string"][0]
    assert (top.layer, top.kind, top.index) == labels[17] and top.r == pytest.approx(1.0, abs=1e-5)
    assert abs(best["in_string"][1].r) < 0.5  # the rest are noise
    top = best["indentation"][0]
    assert (top.layer, top.kind, top.index) == labels[5] and top.r == pytest.approx(-1.0, abs=1e-5)
    assert corr["constant"] is None and best["constant"] == []
    assert all(r is None or r[30] == 0 for r in corr.values())
    # against numpy's own Pearson r for every cell
    ref = [np.corrcoef(feats["line_length"], acts[:, k])[0, 1] for k in range(40) if k != 30]
    got = np.delete(corr["line_length"], 30)
    np.testing.assert_allclose(got, ref, atol=1e-5)
    sample = V.random_cells(corr, labels, count=5, seed=0)
    assert len(sample) == 5 and sample == V.random_cells(corr, labels, count=5, seed=0)
    assert set(sample[0]["r"]) == set(feats)


# ---------------------------------------------------------------------------------------------
# the trace is the model's own forward


@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn"])
def test_trace_equals_stepping_the_model(cell):
    torch.manual_seed(0)
    model = CharLM(ModelConfig(vocab_size=23, hidden_size=24, embed_size=8, num_layers=3, cell=cell)).eval()
    ids = np.random.default_rng(0).integers(0, 23, 120)
    threads = torch.get_num_threads()
    tr = V.trace(model, ids)
    assert torch.get_num_threads() == threads  # the one-thread recurrence restores the setting
    x = torch.as_tensor(ids)[None]
    with torch.no_grad():
        logits, _ = model(x)  # the fused forward, all layers at once
        probs = torch.softmax(logits[0], -1).numpy()
        state = None
        hs, cs = [], []
        for t in range(len(ids)):  # one character at a time
            _, state = model(x[:, t : t + 1], state)
            hs.append(state[0][:, 0].numpy())
            if cell == "lstm":
                cs.append(np.tanh(state[1][:, 0].numpy()))
    np.testing.assert_allclose(tr.prob[1:], probs[np.arange(len(ids) - 1), ids[1:]], rtol=1e-4, atol=1e-6)
    assert np.isnan(tr.prob[0]) and (tr.top_ids[0] == -1).all()
    order = np.argsort(-probs[:-1], axis=1, kind="stable")[:, :5]
    np.testing.assert_allclose(tr.top_p[1:], np.take_along_axis(probs[:-1], order, 1), rtol=1e-4, atol=1e-6)
    assert tr.top_p[1:].sum(1).max() <= 1 + 1e-6 and (np.diff(tr.top_p[1:], axis=1) <= 0).all()
    for layer in range(3):
        np.testing.assert_allclose(tr.state(layer, "h"), np.stack(hs)[:, layer], atol=2e-5)
        if cell == "lstm":
            np.testing.assert_allclose(tr.state(layer, "c"), np.stack(cs)[:, layer], atol=2e-5)
    kinds = ("h", "c") if cell == "lstm" else ("h",)
    assert tr.acts.shape == (120, 3 * len(kinds) * 24) and len(tr.labels) == tr.acts.shape[1]


def test_trace_has_no_dropout_and_leaves_the_models_mode():
    torch.manual_seed(0)
    model = CharLM(ModelConfig(vocab_size=20, hidden_size=16, embed_size=8, num_layers=2, dropout=0.5))
    ids = np.arange(60) % 20
    training = V.trace(model.train(), ids)
    assert model.training  # left as it was
    np.testing.assert_array_equal(training.acts, V.trace(model.eval(), ids).acts)


# ---------------------------------------------------------------------------------------------
# the CLI end to end


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A 2x32 LSTM trained 20 steps on Python-ish text, and a text to visualize."""
    root = tmp_path_factory.mktemp("viz")
    corpus = root / "corpus.py"
    corpus.write_text(CODE * 40, encoding="utf-8")
    args = ["train", str(corpus), "--out", str(root / "run"), "--max-steps", "20", "--eval-every", "10"]
    assert main([*args, *TINY, "--no-track", "--json"]) == 0
    return root / "run", corpus


def _page_data(page: str) -> dict:
    m = re.search(r'<script type="application/json" id="data">(.*?)</script>', page, re.S)
    return json.loads(m.group(1))


def test_cli_text_to_page_and_json(tiny_run, tmp_path, capsys):
    run, corpus = tiny_run
    capsys.readouterr()
    out = tmp_path / "report.html"
    assert (
        main(
            ["visualize", str(run), "--text", str(corpus), "--out", str(out), "--max-chars", "900", "--json"]
        )
        == 0
    )
    captured = capsys.readouterr()
    res = json.loads(captured.out)
    assert "first 900 characters" in captured.err and res["truncated"] is True
    assert res["chars"] == 900 and res["cells"] == 2 * 2 * 32 and res["out"] == str(out)
    assert res["architecture"] == "2x32 lstm" and res["model"] == str(run / "best.pt")
    assert set(res["features"]) == set(V.FEATURES)
    for f in res["features"].values():
        assert f["constant"] or (len(f["best"]) == 5 and 0 < abs(f["best"][0]["r"]) <= 1)
        rs = [abs(c["r"]) for c in f["best"]]
        assert rs == sorted(rs, reverse=True)
    assert len(res["random_cells"]) == 8
    page = out.read_text(encoding="utf-8")
    assert not re.search(r"(src|href)\s*=\s*[\"']?(https?:)?//", page)  # nothing from the network
    data = _page_data(page)
    assert data["text"] == corpus.read_text(encoding="utf-8")[:900]
    assert len(base64.b64decode(data["acts"])) == 900 * len(data["cells"]) and len(data["cells"]) == 128
    assert data["meta"]["model"] == res["model"] and data["meta"]["step"] == 20
    # the page's probabilities are the trace's, floored to 1/65535
    p = np.frombuffer(base64.b64decode(data["prob"]), "<u2") / 65535
    assert p.shape == (900,) and 0 < p[1:].mean() < 1
    # --sample: text generated first, then visualized
    out2 = tmp_path / "sampled.html"
    assert main(["visualize", str(run / "best.pt"), "--sample", "300", "--out", str(out2), "--json"]) == 0
    res2 = json.loads(capsys.readouterr().out)
    assert res2["chars"] == 300 and res2["text"].startswith("300 sampled") and out2.is_file()


def test_cli_errors_are_one_line_and_write_nothing(tiny_run, tmp_path, capsys):
    run, corpus = tiny_run
    out = tmp_path / "r.html"

    def fails(*args: str, naming: str) -> None:
        capsys.readouterr()
        assert main(["visualize", *args, "--json"]) == 1
        cap = capsys.readouterr()
        err = cap.err.strip().splitlines()
        assert cap.out == "" and len(err) == 1 and err[0].startswith("charlm: error:") and naming in err[0], (
            err
        )

    fails(str(run), "--text", str(tmp_path / "nope.txt"), "--out", str(out), naming="nope.txt")
    odd = tmp_path / "odd.txt"
    odd.write_text("def f(): return 'Ω'\n", encoding="utf-8")
    fails(str(run), "--text", str(odd), "--out", str(out), naming="odd.txt")  # Ω is not in the vocab
    fails(str(run), "--text", str(corpus), "--out", str(tmp_path / "no" / "r.html"), naming="--out")
    fails(str(tmp_path / "nomodel.pt"), "--text", str(corpus), "--out", str(out), naming="nomodel.pt")
    fails(str(run), "--text", str(corpus), "--out", str(out), "--max-chars", "1", naming="--max-chars")
    assert not out.exists() and not list(tmp_path.glob(".r.html.*"))


def test_a_page_over_budget_holds_the_ranked_cells_first():
    torch.manual_seed(0)
    model = CharLM(ModelConfig(vocab_size=40, hidden_size=16, embed_size=8, num_layers=2))
    text = (CODE * 3)[:400]
    chars = tuple(sorted(set(text)))
    ids = np.array([chars.index(c) for c in text])
    an = V.analyze(model, ids, text, best=2, sample=3)
    cols = visualize_html.pick_cells(an, budget=400 * 12)
    assert len(cols) == 12 and cols == sorted(cols)
    index = {lab: k for k, lab in enumerate(an.labels)}
    firsts = {index[(c.layer, c.kind, c.index)] for cells in an.best.values() for c in cells[:1]}
    assert firsts <= set(cols)
    assert visualize_html.pick_cells(an, budget=10**9) == list(range(64))


# ---------------------------------------------------------------------------------------------
# the page in a real browser


def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


def _act_colour(q: int) -> str:
    """The page's colour for a quantised activation q (its actPal), as computed styles print it."""
    v = q / 127.5 - 1
    w = math.floor(255 - 200 * abs(v) + 0.5)  # JS Math.round
    return f"rgb(255, {w}, {w})" if v >= 0 else f"rgb({w}, {w}, 255)"


class CDP:
    """The few DevTools protocol calls the test needs, over one page's websocket."""

    def __init__(self, url: str) -> None:
        from websockets.sync.client import connect

        self.ws = connect(url, max_size=None, open_timeout=30)
        self.next_id = 0
        self.events: list[dict] = []

    def call(self, method: str, timeout: float = 60, **params) -> dict:
        self.next_id += 1
        self.ws.send(json.dumps({"id": self.next_id, "method": method, "params": params}))
        deadline = time.monotonic() + timeout
        while True:
            msg = json.loads(self.ws.recv(timeout=max(0.1, deadline - time.monotonic())))
            if msg.get("id") == self.next_id:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg["result"]
            self.events.append(msg)

    def wait_event(self, method: str, timeout: float = 60) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            for e in self.events:
                if e.get("method") == method:
                    return e
            self.events.append(json.loads(self.ws.recv(timeout=max(0.1, deadline - time.monotonic()))))

    def js(self, expr: str):
        res = self.call("Runtime.evaluate", expression=expr, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in res:
            raise RuntimeError(f"{expr[:60]}: {res['exceptionDetails']}")
        return res["result"].get("value")


@pytest.fixture
def browser(tmp_path):
    exe = _chromium()
    if exe is None:
        pytest.skip("no chromium on this machine (scripts/test installs Debian's chromium when it can)")
    profile = tempfile.mkdtemp(prefix="charlm-chromium-", dir=tmp_path)
    args = [exe, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-extensions"]
    args += [
        "--remote-debugging-address=127.0.0.1",
        "--remote-debugging-port=0",
        f"--user-data-dir={profile}",
    ]
    proc = subprocess.Popen(
        [*args, "--window-size=1200,900", "about:blank"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        port_file = Path(profile) / "DevToolsActivePort"
        deadline = time.monotonic() + 60
        while not (port_file.is_file() and port_file.read_text().count("\n") >= 1):
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"{exe} did not start its DevTools endpoint (exit {proc.poll()})")
            time.sleep(0.1)
        port = int(port_file.read_text().split()[0])
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=30) as r:
            page = next(t for t in json.load(r) if t["type"] == "page")
        cdp = CDP(page["webSocketDebuggerUrl"])
        yield cdp
        cdp.ws.close()
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()


@pytest.mark.slow
def test_page_in_headless_chromium(tiny_run, tmp_path, browser, capsys):
    run, _ = tiny_run
    text = tmp_path / "long.py"
    text.write_text((CODE * 80)[:10_000], encoding="utf-8")  # the size the page must stay readable at
    out = tmp_path / "report.html"
    assert main(["visualize", str(run), "--text", str(text), "--out", str(out), "--json"]) == 0
    capsys.readouterr()
    cdp = browser
    for domain in ("Page", "Runtime", "Network"):
        cdp.call(f"{domain}.enable")
    t0 = time.monotonic()
    cdp.call("Page.navigate", url=out.as_uri())
    cdp.wait_event("Page.loadEventFired", timeout=120)
    load_s = time.monotonic() - t0
    assert (
        cdp.js("window.charlmViz.n") == 10_000
        and cdp.js("document.querySelectorAll('#text span').length") == 10_000
    )

    # hover a character (a real mouse move), the tooltip lists 5 predictions summing to <= 1
    i = 200
    x, y = cdp.js(
        f"(() => {{const s = charlmViz.spans[{i}]; s.scrollIntoView({{block: 'center'}}); const r = s.getBoundingClientRect();"
        " return [r.left + r.width / 2, r.top + r.height / 2];})()"
    )
    cdp.call("Input.dispatchMouseEvent", type="mouseMoved", x=x, y=y)
    tip = cdp.js(
        "(() => {const t = document.getElementById('tip'); return {hidden: t.hidden, text: t.textContent,"
        " ps: [...t.querySelectorAll('tr.pred')].map(r => Number(r.dataset.p))};})()"
    )
    assert not tip["hidden"] and f" at {i}: p = " in tip["text"], tip
    assert len(tip["ps"]) == 5 and 0 < sum(tip["ps"]) <= 1 and tip["ps"] == sorted(tip["ps"], reverse=True)

    # pick a cell ("best for feature X" in the picker), and the colours change
    colours = "charlmViz.spans.slice(0, 2000).map(s => getComputedStyle(s).backgroundColor)"
    before = cdp.js(colours)
    option = cdp.js(
        "[...document.querySelectorAll('#mode option')].map(o => o.value).find(v => v.startsWith('feat:'))"
    )
    assert option, "the picker offers no feature's best cell"
    t1 = time.monotonic()
    cdp.js(
        f"(() => {{const m = document.getElementById('mode'); m.value = {json.dumps(option)};"
        " m.dispatchEvent(new Event('change')); return new Promise(r => requestAnimationFrame(() => setTimeout(r, 0)));})()"
    )
    recolour_s = time.monotonic() - t1
    after = cdp.js(colours)
    changed = sum(a != b for a, b in zip(before, after, strict=True))
    assert changed > 500, f"only {changed} of 2000 characters changed colour"
    assert len(set(after)) > 5  # activations, not one flat colour
    # and they are the picked cell's activations, through the page's palette
    data = _page_data(out.read_text(encoding="utf-8"))
    best = next(f for f in data["features"] if "feat:" + f["name"] == option)["best"][0]
    j = data["cells"].index([best["layer"], best["kind"], best["cell"]])
    q = np.frombuffer(base64.b64decode(data["acts"]), np.uint8)[j * 10_000 : j * 10_000 + 2000]
    assert after == [_act_colour(int(v)) for v in q]
    status = cdp.js("document.getElementById('status').textContent")
    assert "activation of L" in status, status

    # a screenshot that is not blank
    shot = base64.b64decode(cdp.call("Page.captureScreenshot", format="png")["data"])
    import matplotlib.image

    img = matplotlib.image.imread(io.BytesIO(shot), format="png")
    pixels = img.reshape(-1, img.shape[-1])
    assert len(np.unique(pixels[::7], axis=0)) > 20
    (tmp_path / "page.png").write_bytes(shot)

    # nothing from the network, and no script errors
    urls = [
        e["params"]["request"]["url"] for e in cdp.events if e.get("method") == "Network.requestWillBeSent"
    ]
    assert all(u.startswith(("file:", "data:", "about:")) for u in urls), urls
    errors = [e for e in cdp.events if e.get("method") == "Runtime.exceptionThrown"]
    assert not errors, errors[0]
    print(f"10,000 characters: load {load_s:.2f} s, recolour {recolour_s:.3f} s")

    # a link opens the page on a cell's view
    cdp.call("Page.navigate", url="about:blank")
    cdp.call("Page.navigate", url=out.as_uri() + "#cell:1:c:3")
    status, deadline = None, time.monotonic() + 120
    while status is None and time.monotonic() < deadline:  # until the new page's script has run
        with contextlib.suppress(RuntimeError):  # the context went away mid-navigation
            status = cdp.js(
                "location.hash === '#cell:1:c:3' && window.charlmViz ? document.getElementById('status').textContent : null"
            )
        time.sleep(0.1)
    assert status is not None and status.startswith("colour: activation of L1 c3"), status
    if os.environ.get("CHARLM_VIZ_SCREENSHOT"):
        Path(os.environ["CHARLM_VIZ_SCREENSHOT"]).write_bytes(shot)


def test_visualize_core_imports_no_frameworks():
    code = (
        "import sys, charlm.visualize, charlm.visualize_html;"
        "bad = [m for m in ('ray', 'mlflow', 'prefect', 'fsspec', 's3fs', 'matplotlib') if m in sys.modules];"
        "print(bad); sys.exit(1 if bad else 0)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
