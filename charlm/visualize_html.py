"""The `charlm visualize` page: one self-contained HTML file (no network, no CDN) from an Analysis.

The data travel compactly inside the page as one JSON block: probabilities as uint16 (floored, so
five shown probabilities never sum above the true total), top-5 ids as uint8/uint16, and cell
activations (h and tanh(c), both in [-1, 1]) as uint8, one column per cell, all base64. A page
holds every cell while n x cells fits ACT_BUDGET bytes; past that it holds the cells that rank
best for some feature first (each feature's first, then second...), the random sample, then the rest by their best |r|, and says how
many it holds. The script builds the character spans once and recolours them in one pass per
animation frame, so a 10,000-character page stays responsive.
"""

from __future__ import annotations

import base64
import html
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from charlm.visualize import FEATURES, Analysis

ACT_BUDGET = 8_000_000  # bytes of activations in one page (~10.7 MB of base64)


def _b64(a: np.ndarray) -> str:
    return base64.b64encode(np.ascontiguousarray(a).tobytes()).decode("ascii")


def _floor16(p: np.ndarray) -> np.ndarray:
    return np.floor(np.nan_to_num(p, nan=0.0).clip(0, 1) * 65535).astype("<u2")


def pick_cells(an: Analysis, budget: int = ACT_BUDGET) -> list[int]:
    """Column indices of the cells the page holds, in a fixed priority (see the module doc)."""
    n, K = an.trace.acts.shape
    room = max(1, budget // max(n, 1))
    if room >= K:
        return list(range(K))
    index = {lab: k for k, lab in enumerate(an.labels)}
    first: list[int] = []
    depth = max((len(cells) for cells in an.best.values()), default=0)
    for rank in range(depth):  # every feature's best cell, then every feature's second...
        first += [
            index[(c.layer, c.kind, c.index)]
            for c in (cells[rank] for cells in an.best.values() if len(cells) > rank)
        ]
    first += [index[(s["layer"], s["kind"], s["cell"])] for s in an.sample]
    rs = [np.abs(r) for r in an.corr.values() if r is not None]
    best_r = np.max(rs, axis=0) if rs else np.zeros(K)
    rest = np.argsort(-best_r, kind="stable").tolist()
    order = list(dict.fromkeys(first + rest))
    return sorted(order[:room])


def page_data(an: Analysis, meta: dict[str, Any], chars: tuple[str, ...], budget: int = ACT_BUDGET) -> dict:
    """The JSON the page's script reads."""
    tr = an.trace
    cols = pick_cells(an, budget)
    q = np.rint((np.clip(tr.acts[:, cols], -1, 1) + 1) * 127.5).astype(np.uint8)  # (n, k)
    id_type = "<u1" if len(chars) <= 255 else "<u2"
    top_ids = np.where(tr.top_ids < 0, 0, tr.top_ids).astype(id_type)
    layers = sorted({lay for lay, _, _ in an.labels})
    return {
        "meta": meta,
        "text": tr.text,
        "chars": list(chars),
        "prob": _b64(_floor16(tr.prob)),
        "top_ids": _b64(top_ids),
        "top_ids_bytes": np.dtype(id_type).itemsize,
        "top_p": _b64(_floor16(tr.top_p)),
        "top": int(tr.top_ids.shape[1]),
        "layers": len(layers),
        "hidden": sum(1 for lay, kd, _ in an.labels if lay == 0 and kd == "h"),
        "kinds": sorted({kd for _, kd, _ in an.labels}, key="hc".index),
        "total_cells": len(an.labels),
        "cells": [list(an.labels[k]) for k in cols],
        "acts": _b64(q.T),  # one column per cell, cell after cell
        "features": [
            {
                "name": name,
                "title": FEATURES[name][0],
                "constant": an.corr[name] is None,
                "best": [c.to_dict() for c in an.best[name]],
            }
            for name in FEATURES
        ],
        "random": an.sample,
    }


def _json_for_script(obj: Any) -> str:
    # '<', '>' and '&' only occur inside JSON strings, where these escapes mean the same
    s = json.dumps(obj, ensure_ascii=False, separators=(",", ":"))
    return s.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def render(an: Analysis, meta: dict[str, Any], chars: tuple[str, ...], budget: int = ACT_BUDGET) -> str:
    """The whole page as a string."""
    title = html.escape(f"charlm visualize: {meta.get('model', 'model')}")
    return (
        _TEMPLATE.replace("%%TITLE%%", title)
        .replace("%%CSS%%", _CSS)
        .replace("%%JS%%", _JS)
        .replace("%%DATA%%", _json_for_script(page_data(an, meta, chars, budget)))
    )


def write(path: str | os.PathLike, page: str) -> Path:
    """Write the page atomically: a temporary file beside it, renamed over it last."""
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"{path}: is a folder; --out names the HTML file to write")
    if not path.parent.is_dir():
        raise FileNotFoundError(f"{path.parent}: no such folder for --out")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(page)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


_TEMPLATE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>%%TITLE%%</title>
<style>%%CSS%%</style></head>
<body>
<header><h1>charlm visualize</h1><div id="meta"></div></header>
<section id="controls">
  <label>colour by <select id="mode"></select></label>
  <label>layer <select id="layer"></select></label>
  <label>state <select id="kind"></select></label>
  <label>cell <input id="cell" type="number" min="0" value="0"></label>
  <span id="status"></span>
  <div id="legend"></div>
</section>
<div id="main">
<div id="text" aria-label="text"></div>
<aside>
<h2>Best cells per feature</h2><table id="features"></table>
<h2>Random cells (contrast)</h2><table id="random"></table>
</aside>
</div>
<div id="tip" hidden></div>
<script type="application/json" id="data">%%DATA%%</script>
<script>%%JS%%</script>
</body></html>
"""

_CSS = """
body{font-family:system-ui,sans-serif;margin:0;padding:0 1em;color:#222;background:#fff}
header h1{font-size:1.2em;margin:.6em 0 .2em}#meta{font-size:.85em;color:#555}
#controls{position:sticky;top:0;background:#fff;padding:.4em 0;border-bottom:1px solid #ddd;z-index:2}
#controls label{margin-right:1em;font-size:.9em}#cell{width:5em}#status{font-size:.85em;color:#555}
#legend{font-size:.8em;color:#555;margin-top:.2em}
#main{display:flex;gap:1.5em;align-items:flex-start}
#text{font-family:ui-monospace,Menlo,Consolas,monospace;font-size:13px;line-height:1.45;white-space:pre-wrap;
word-break:break-all;flex:1;min-width:0;padding:.5em 0}
#text span{cursor:default}#text span.nl::before{content:"\\21B5";color:#aaa}
aside{width:25em;font-size:.82em}aside h2{font-size:1em;margin:.8em 0 .3em}
aside table{border-collapse:collapse;width:100%}aside td,aside th{padding:1px 4px;text-align:left}
aside tr.pick{cursor:pointer}aside tr.pick:hover{background:#eef}
#tip{position:absolute;background:#fff;border:1px solid #888;box-shadow:0 2px 6px #0003;padding:4px 6px;
font-size:12px;z-index:5;pointer-events:none;font-family:ui-monospace,monospace}
#tip table{border-collapse:collapse}#tip td{padding:0 4px}#tip .bar{background:#4a8;height:8px}
"""

_JS = r"""
(function(){
"use strict";
const D = JSON.parse(document.getElementById('data').textContent);
function bytes(s){const b=atob(s),u=new Uint8Array(b.length);for(let i=0;i<b.length;i++)u[i]=b.charCodeAt(i);return u;}
const chars = Array.from(D.text), n = chars.length, TOP = D.top;
const prob = new Uint16Array(bytes(D.prob).buffer);
const topIds = D.top_ids_bytes === 1 ? bytes(D.top_ids) : new Uint16Array(bytes(D.top_ids).buffer);
const topP = new Uint16Array(bytes(D.top_p).buffer);
const acts = bytes(D.acts);
const cellIndex = new Map(D.cells.map((c, j) => [c.join(':'), j]));
const $ = id => document.getElementById(id);
const esc = s => s.replace(/[&<>"]/g, c => ({'&':'&amp;','<':'&lt;','>':'&gt;','"':'&quot;'}[c]));
const show = c => c === '\n' ? '\\n' : c === '\t' ? '\\t' : c === ' ' ? '\u2423' : c;
// palettes: 256 colours each, computed once
const confPal = [], actPal = [];
for (let q = 0; q < 256; q++) {
  const p = q / 255;
  confPal.push('hsl(' + Math.round(120 * p) + ',75%,' + Math.round(72 + 14 * p) + '%)');
  const v = q / 127.5 - 1, a = Math.abs(v), w = Math.round(255 - 200 * a);
  actPal.push(v >= 0 ? 'rgb(255,' + w + ',' + w + ')' : 'rgb(' + w + ',' + w + ',255)');
}
// meta
const M = D.meta;
$('meta').textContent = Object.entries(M).filter(([k, v]) => v !== null && v !== undefined)
  .map(([k, v]) => k + ': ' + v).join(' \u00b7 ');
// spans, once
const box = $('text'), spans = new Array(n), frag = document.createDocumentFragment();
for (let i = 0; i < n; i++) {
  const s = document.createElement('span');
  if (chars[i] === '\n') s.className = 'nl';
  s.textContent = chars[i];
  s._i = i;
  spans[i] = s;
  frag.appendChild(s);
}
box.appendChild(frag);
// controls
const mode = $('mode'), layerSel = $('layer'), kindSel = $('kind'), cellIn = $('cell');
function opt(sel, value, text){const o=document.createElement('option');o.value=value;o.textContent=text;sel.appendChild(o);}
opt(mode, 'conf', 'confidence (p of the character that came)');
opt(mode, 'cell', 'a cell (layer, state, cell)');
for (const f of D.features) if (!f.constant && f.best.length) {
  const b = f.best[0];
  opt(mode, 'feat:' + f.name, 'best for ' + f.title + ' (L' + b.layer + ' ' + b.kind + b.cell + ', r=' + b.r.toFixed(2) + ')');
}
for (let l = 0; l < D.layers; l++) opt(layerSel, l, String(l));
for (const k of D.kinds) opt(kindSel, k, k === 'c' ? 'c (tanh)' : 'h');
cellIn.max = D.hidden - 1;
const state = {mode: 'conf', cell: null, pending: false};
function cellName(c){return 'L' + c[0] + ' ' + c[1] + c[2];}
function setStatus(){
  const st = $('status');
  if (state.mode === 'conf') { st.textContent = 'colour: the probability the model gave each character (red low, green high)'; return; }
  const j = cellIndex.get(state.cell.join(':'));
  st.textContent = j === undefined
    ? cellName(state.cell) + ' is not in this page: it holds ' + D.cells.length + ' of ' + D.total_cells + ' cells (the best ranked first)'
    : 'colour: activation of ' + cellName(state.cell) + ' (blue -1 \u2026 white 0 \u2026 red +1)';
}
function paintNow(){
  state.pending = false;
  if (state.mode === 'conf') {
    spans[0].style.backgroundColor = '#ddd';
    for (let i = 1; i < n; i++) spans[i].style.backgroundColor = confPal[prob[i] >> 8];
  } else {
    const j = cellIndex.get(state.cell.join(':'));
    if (j === undefined) { for (let i = 0; i < n; i++) spans[i].style.backgroundColor = '#eee'; }
    else { const off = j * n; for (let i = 0; i < n; i++) spans[i].style.backgroundColor = actPal[acts[off + i]]; }
  }
  setStatus();
}
function paint(){ if (!state.pending) { state.pending = true; requestAnimationFrame(paintNow); } }
function selectCell(layer, kind, idx, viaMode){
  state.mode = 'cell'; state.cell = [Number(layer), kind, Number(idx)];
  layerSel.value = String(layer); kindSel.value = kind; cellIn.value = String(idx);
  mode.value = viaMode || 'cell';
  paint();
}
mode.addEventListener('change', () => {
  const v = mode.value;
  if (v === 'conf') { state.mode = 'conf'; paint(); }
  else if (v === 'cell') selectCell(layerSel.value, kindSel.value, cellIn.value || 0);
  else { const f = D.features.find(f => 'feat:' + f.name === v), b = f.best[0]; selectCell(b.layer, b.kind, b.cell, v); }
});
for (const el of [layerSel, kindSel, cellIn]) el.addEventListener('change', () => {
  const c = Math.max(0, Math.min(D.hidden - 1, Number(cellIn.value) || 0));
  selectCell(layerSel.value, kindSel.value, c);
});
// tables
function row(tb, cells, pick){
  const tr = document.createElement('tr');
  tr.innerHTML = cells.map(c => '<td>' + c + '</td>').join('');
  if (pick) { tr.className = 'pick'; tr.addEventListener('click', () => selectCell(pick.layer, pick.kind, pick.cell)); }
  tb.appendChild(tr);
}
const ft = $('features');
row(ft, ['<b>feature</b>', '<b>best cells (r)</b>']);
for (const f of D.features) {
  if (f.constant || !f.best.length) { row(ft, [esc(f.title), '<i>constant in this text</i>']); continue; }
  f.best.slice(0, 3).forEach((b, k) => row(ft, [k ? '' : esc(f.title), cellName([b.layer, b.kind, b.cell]) + ' (' + b.r.toFixed(3) + ')'], b));
}
const rt = $('random');
row(rt, ['<b>cell</b>', '<b>largest |r| over the features</b>']);
for (const c of D.random) {
  let best = null;
  for (const [k, r] of Object.entries(c.r)) if (r !== null && (best === null || Math.abs(r) > Math.abs(best[1]))) best = [k, r];
  row(rt, [cellName([c.layer, c.kind, c.cell]), best ? esc(best[0]) + ' ' + best[1].toFixed(3) : '-'], c);
}
// tooltip: one delegated listener
const tip = $('tip');
box.addEventListener('mouseover', e => {
  const s = e.target; if (s.parentNode !== box || s._i === undefined) return;
  const i = s._i;
  let h = '<div>' + esc(show(chars[i])) + ' at ' + i;
  if (i === 0) h += ': the first character, nothing predicts it</div>';
  else {
    h += ': p = ' + (prob[i] / 65535).toFixed(4) + '</div><table>';
    for (let k = 0; k < TOP; k++) {
      const p = topP[i * TOP + k] / 65535, id = topIds[i * TOP + k];
      h += '<tr class="pred" data-p="' + p + '"><td>' + esc(show(D.chars[id])) + '</td><td>' + p.toFixed(4) +
        '</td><td><div class="bar" style="width:' + Math.round(60 * p) + 'px"></div></td></tr>';
    }
    h += '</table>';
  }
  if (state.mode !== 'conf') {
    const j = cellIndex.get(state.cell.join(':'));
    if (j !== undefined) h += '<div>' + cellName(state.cell) + ' = ' + (acts[j * n + i] / 127.5 - 1).toFixed(3) + '</div>';
  }
  tip.innerHTML = h; tip.hidden = false;
  const r = s.getBoundingClientRect();
  tip.style.left = (window.scrollX + r.left) + 'px'; tip.style.top = (window.scrollY + r.bottom + 4) + 'px';
});
box.addEventListener('mouseleave', () => { tip.hidden = true; });
$('legend').textContent = n + ' characters; ' + D.cells.length + ' of ' + D.total_cells + ' cells in this page; hover a character for the model\u2019s top ' + TOP + ' guesses for it';
// a link can open the page on a view: #feat:NAME (that feature's best cell) or #cell:LAYER:KIND:INDEX
const hash = decodeURIComponent(location.hash.slice(1));
if (hash.startsWith('feat:') && [...mode.options].some(o => o.value === hash)) { mode.value = hash; mode.dispatchEvent(new Event('change')); }
else if (/^cell:\d+:[hc]:\d+$/.test(hash)) { const [, l, k, c] = hash.split(':'); selectCell(l, k, c); }
paintNow();
window.charlmViz = {spans: spans, paintNow: paintNow, selectCell: selectCell, state: state, n: n};
})();
"""
