"""The status page's HTML: plain string templates, every value through :func:`html.escape`.

Image names, server names and hostnames are user strings, so nothing reaches the page
unescaped; the one inline script and style carry a per-response nonce that the
``Content-Security-Policy`` header names, so no injected script could run either.
The script polls ``/status/data`` and rewrites the pre-cache table and the cache
matrix's cells with ``textContent`` (never ``innerHTML``).
"""

from __future__ import annotations

import time
from html import escape

from cowfleet.api.status.view import StatusView

POLL_SECONDS = 3

_STYLE = """
body{font:14px/1.4 system-ui,sans-serif;margin:1.5em;color:#1d1d1f;background:#fafafa}
h1{font-size:1.4em;margin:0 0 .2em} h2{font-size:1.1em;margin:1.4em 0 .4em}
table{border-collapse:collapse;background:#fff} caption{text-align:left}
th,td{border:1px solid #ccc;padding:.25em .6em;text-align:left;white-space:nowrap}
th{background:#eee} td.num{text-align:right}
.up{color:#0a7a0a;font-weight:bold} .down{color:#b00020;font-weight:bold}
.cached{background:#e3f6e3} .fetching{background:#fff6d6} .failed{background:#fde2e2}
.quarantined{background:#f3ddf7} .unverified{background:#eef3e3} .none{color:#999}
.muted{color:#666} form.inline{display:inline} progress{width:8em}
"""

# The poller: rebuilds the pre-cache rows from /status/data with textContent only.
_SCRIPT = """
(function(){
  var body=document.getElementById('precache-rows');
  var stamp=document.getElementById('updated');
  function cell(tr,text,cls){var td=document.createElement('td');td.textContent=text;
    if(cls){td.className=cls;}tr.appendChild(td);return td;}
  function fmt(n){if(n===null||n===undefined){return '-';}
    var u=['B','KiB','MiB','GiB','TiB'],i=0;while(n>=1024&&i<u.length-1){n/=1024;i++;}
    return (i?n.toFixed(1):n)+' '+u[i];}
  function draw(rows){
    while(body.firstChild){body.removeChild(body.firstChild);}
    if(!rows.length){var tr=document.createElement('tr');
      cell(tr,'nothing is being fetched','none').colSpan=5;body.appendChild(tr);return;}
    rows.forEach(function(r){var tr=document.createElement('tr');
      cell(tr,r.node);cell(tr,r.image_name||r.image_id);
      var p=cell(tr,'');var bar=document.createElement('progress');bar.max=100;
      if(r.percent!==null){bar.value=r.percent;}p.appendChild(bar);
      var pct=r.percent===null?'?':r.percent.toFixed(0)+'%';
      p.appendChild(document.createTextNode(' '+pct+' '+r.state));
      cell(tr,fmt(r.bytes),'num');cell(tr,fmt(r.size),'num');body.appendChild(tr);});}
  function cells(list){
    var byKey={};list.forEach(function(c){byKey[c.node+'|'+c.image_id]=c;});
    document.querySelectorAll('#cache td[data-node]').forEach(function(td){
      var c=byKey[td.dataset.node+'|'+td.dataset.image];
      if(!c){return;}
      td.className=c.state==='verified'?'cached':c.state;td.dataset.state=c.state;
      td.firstChild.textContent=c.label;td.lastChild.textContent=fmt(c.bytes);});}
  function poll(){
    fetch('/status/data',{credentials:'same-origin',headers:{'Accept':'application/json'}})
      .then(function(r){if(!r.ok){throw new Error(r.status);}return r.json();})
      .then(function(doc){draw(doc.precache||[]);cells(doc.cache||[]);
        stamp.textContent=new Date(doc.now*1000).toISOString();
        document.body.setAttribute('data-polls',
          String(1+Number(document.body.getAttribute('data-polls')||0)));})
      .catch(function(){stamp.textContent='(update failed; retrying)';});}
  if(body){setInterval(poll,POLL_MS);}
})();
""".replace("POLL_MS", str(POLL_SECONDS * 1000))


def human_bytes(n: int | None) -> str:
    if n is None:
        return "-"
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{n} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{n} B"  # pragma: no cover


def human_seconds(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, sec = divmod(int(seconds), 60)
    if minutes < 60:
        return f"{minutes} min {sec} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes} min"


def iso(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


def _e(value: object) -> str:
    return escape(str(value), quote=True)


def _page(title: str, body: str, nonce: str, *, script: bool) -> str:
    js = f'<script nonce="{_e(nonce)}">{_SCRIPT}</script>' if script else ""
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{_e(title)}</title>"
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f'<style nonce="{_e(nonce)}">{_STYLE}</style></head>'
        f"<body>{body}{js}</body></html>\n"
    )


def login_page(nonce: str, message: str | None = None) -> str:
    note = f'<p class="down" id="login-error">{_e(message)}</p>' if message else ""
    body = (
        "<h1>cowfleet fleet status</h1>"
        "<p>Sign in with an API token (admin: the whole fleet; member: your project).</p>"
        f"{note}"
        '<form method="post" action="/status/login" id="login">'
        '<label>API token <input type="password" name="token" autocomplete="off" required>'
        '</label> <button type="submit">Sign in</button></form>'
    )
    return _page("cowfleet - sign in", body, nonce, script=False)


def _nodes(view: StatusView) -> str:
    if not view.nodes:
        return '<p class="none" id="no-nodes">no node has registered</p>'
    rows = []
    for n in view.nodes:
        age = f'<span class="muted">({n.heartbeat_age:.0f} s)</span>'
        alive = '<span class="up">up</span>' if n.alive else f'<span class="down">down</span> {age}'
        if not n.enabled:
            alive += ' <span class="muted">disabled</span>'
        rows.append(
            f'<tr data-node="{_e(n.hostname)}"><td>{_e(n.hostname)}</td><td>{alive}</td>'
            f'<td class="num">{n.vcpus_used} / {n.vcpus}</td>'
            f'<td class="num">{n.ram_used_mb} / {n.ram_mb} MiB</td>'
            f'<td class="num">{n.disk_used_gb} / {n.disk_gb} GiB ({n.disk_free_gb} free)</td>'
            f'<td class="num">{n.instances}</td></tr>'
        )
    return (
        '<table id="nodes"><thead><tr><th>node</th><th>state</th><th>vCPU used / total</th>'
        "<th>RAM used / total</th><th>disk used / total</th><th>instances</th></tr></thead>"
        f"<tbody>{''.join(rows)}</tbody></table>"
    )


def _matrix(view: StatusView) -> str:
    if not view.images:
        return '<p class="none" id="no-cache">no node holds an image</p>'
    head = "".join(
        f'<th title="{_e(i.image_id)}">{_e(i.name or i.image_id)}</th>' for i in view.images
    )
    rows = []
    for n in view.nodes:
        cells = []
        for i in view.images:
            c = view.matrix.get((n.hostname, i.image_id))
            if c is None:
                cells.append('<td class="none">-</td>')
                continue
            css = "cached" if c.state == "verified" else c.state
            cells.append(
                f'<td class="{_e(css)}" data-state="{_e(c.state)}" data-node="{_e(n.hostname)}" '
                f'data-image="{_e(i.image_id)}"><span>{_e(c.label)}</span><br>'
                f'<span class="muted">{_e(human_bytes(c.bytes))}</span></td>'
            )
        rows.append(f"<tr><th>{_e(n.hostname)}</th>{''.join(cells)}</tr>")
    return (
        f'<table id="cache"><thead><tr><th>node \\ image</th>{head}</tr></thead>'
        f"<tbody>{''.join(rows)}</tbody></table>"
    )


def _precache(view: StatusView) -> str:
    rows = []
    for r in view.precache:
        pct = "?" if r.percent is None else f"{r.percent:.0f}%"
        value = "" if r.percent is None else f' value="{r.percent:.1f}"'
        rows.append(
            f"<tr><td>{_e(r.node)}</td><td>{_e(r.image_name or r.image_id)}</td>"
            f'<td><progress max="100"{value}></progress> {_e(pct)} {_e(r.state)}</td>'
            f'<td class="num">{_e(human_bytes(r.bytes))}</td>'
            f'<td class="num">{_e(human_bytes(r.size))}</td></tr>'
        )
    if not rows:
        rows.append('<tr><td class="none" colspan="5">nothing is being fetched</td></tr>')
    return (
        '<table id="precache"><thead><tr><th>node</th><th>image</th><th>progress</th>'
        "<th>fetched</th><th>size</th></tr></thead>"
        f'<tbody id="precache-rows">{"".join(rows)}</tbody></table>'
    )


def _builds(view: StatusView) -> str:
    if not view.builds:
        return '<p class="none" id="no-builds">no builds yet</p>'
    rows = []
    for b in view.builds:
        took = human_seconds(b.seconds) + ("" if b.finished else " so far")
        rows.append(
            f'<tr data-server="{_e(b.id)}"><td>{_e(b.name)}</td><td>{_e(b.project_id)}</td>'
            f"<td>{_e(b.image)}</td><td>{_e(b.host or '-')}</td><td>{_e(b.state)}</td>"
            f"<td>{_e(iso(b.created_at))}</td>"
            f'<td class="num">{_e(took)}</td></tr>'
        )
    return (
        '<table id="builds"><thead><tr><th>server</th><th>project</th><th>image</th>'
        "<th>node</th><th>state</th><th>started</th><th>build time</th></tr></thead>"
        f"<tbody>{''.join(rows)}</tbody></table>"
    )


def status_page(view: StatusView, nonce: str, *, role: str) -> str:
    who = f"{_e(view.project)} ({_e(role)})"
    parts = [
        "<h1>cowfleet fleet status</h1>",
        f'<p class="muted">signed in as <b id="who">{who}</b>; '
        f'updated <span id="updated">{_e(iso(view.now))}</span></p>'
        '<form method="post" action="/status/logout">'
        '<button type="submit">sign out</button></form>',
    ]
    if view.admin:
        parts += [
            "<h2>Nodes</h2>",
            _nodes(view),
            "<h2>Image cache (nodes &times; images)</h2>",
            _matrix(view),
            "<h2>Pre-cache progress</h2>",
            _precache(view),
        ]
    else:
        parts.append(
            '<p class="muted" id="member-note">Nodes and their caches are shown to admins; '
            "below are your project's builds.</p>"
        )
    parts += ["<h2>Recent builds</h2>", _builds(view)]
    return _page("cowfleet fleet status", "".join(parts), nonce, script=view.admin)
