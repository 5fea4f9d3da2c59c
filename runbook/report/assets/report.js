/* runbook report: filters, a table that renders only its visible rows, the task detail, the timeline.
   Reads only the JSON embedded in the page; makes no request of any kind (the page's CSP forbids them). */
(function () {
  "use strict";
  var D = JSON.parse(document.getElementById("report-data").textContent);
  var PLAN = D.kind === "plan";
  var C = D.cols, N = C.h.length, ST = D.statuses, LB = D.labels || {};
  var F_RESCUE = 1, F_IGNORED = 2, F_FROM = 4, F_MISMATCH = 8, F_LOOP = 32;   // F_LOOP: a loop's own row (its items count)
  var ROW = 26;
  var S = { on: ST.map(function () { return true; }), host: "", step: -1, q: "", sort: "", dir: 1, sel: -1 };
  var view = new Int32Array(N), nView = 0, hay = null;
  var table = null, timeline = null;

  function el(tag, cls, text) {
    var e = document.createElement(tag);
    if (cls) e.className = cls;
    if (text !== undefined && text !== null) e.textContent = String(text);
    return e;
  }
  function label(code) { var k = ST[code]; return LB[k] || k; }
  function pill(code) { return el("span", "pill st-" + ST[code], label(code)); }
  function fmtDur(ms) {
    if (ms < 0 || ms === undefined) return "—";
    if (ms < 1000) return Math.round(ms) + " ms";
    var s = ms / 1000;
    if (s < 60) return s.toFixed(1) + " s";
    if (s < 3600) return Math.floor(s / 60) + " min " + String(Math.floor(s % 60)).padStart(2, "0") + " s";
    return Math.floor(s / 3600) + " h " + String(Math.floor(s % 3600 / 60)).padStart(2, "0") + " min";
  }
  function fmtAt(ms) {
    if (ms < 0 || !D.t0) return "—";
    return new Date(D.t0 * 1000 + ms).toISOString().replace("T", " ").slice(0, 19) + "Z";
  }
  function stepOf(i) { return D.steps[C.s[i]]; }
  // A loop's item: its step's id with the item's label, as the console shows it (`step[label]`).
  // A bar on the timeline: a task this run started, not a loop's own span over its items' bars.
  function onTimeline(i) { return C.b[i] >= 0 && !(C.f && C.f[i] & F_LOOP); }
  function taskName(i) { var it = C.it ? C.it[i] : -1; return stepOf(i).id + (it >= 0 ? "[" + D.items[it] + "]" : ""); }
  var INTERNED = ["c", "m", "hi", "o", "ot", "e", "et", "df", "pr", "r"], STRS = [], DET = null;
  // The details block follows this script: it is read once the whole document is parsed.
  function detailsReady() {
    if (DET) return true;
    if (document.readyState === "loading") return false;
    var x = JSON.parse(document.getElementById("report-details").textContent);
    STRS = x.strs; DET = x.det;
    return true;
  }
  function whenDetails(fn) {
    if (detailsReady()) return fn();
    document.addEventListener("DOMContentLoaded", function () { detailsReady(); fn(); }, { once: true });
  }
  function det(i) {
    if (!detailsReady()) return {};
    var d = DET[i];
    if (!d) return {};
    if (!d.$) {   // resolve, once, the texts stored in the shared string table
      INTERNED.forEach(function (k) { if (typeof d[k] === "number") d[k] = STRS[d[k]]; });
      if (!d.a) d.a = stepOf(i).action;
      d.$ = 1;
    }
    return d;
  }

  // --- filtering --------------------------------------------------------------------------------
  function haystack() {
    if (hay) return hay;
    hay = new Array(N);
    for (var i = 0; i < N; i++) {
      var d = det(i), st = stepOf(i);
      hay[i] = [D.hosts[C.h[i]], taskName(i), st.name, ST[C.st[i]], d.m, d.hi, d.c, d.r, d.o, d.ot, d.e, d.et, d.df]
        .filter(Boolean).join("\n").toLowerCase();
    }
    return hay;
  }
  function hostMask() {
    if (!S.host) return null;
    var q = S.host.toLowerCase(), exact = D.hosts.indexOf(S.host), m = new Uint8Array(D.hosts.length);
    for (var h = 0; h < D.hosts.length; h++) m[h] = exact >= 0 ? (h === exact ? 1 : 0) : (D.hosts[h].toLowerCase().indexOf(q) >= 0 ? 1 : 0);
    return m;
  }
  var SORT = {
    host: function (i) { return C.h[i]; }, step: function (i) { return C.s[i]; }, status: function (i) { return C.st[i]; },
    attempts: function (i) { return C.a[i]; }, start: function (i) { return C.b[i]; }, duration: function (i) { return C.d[i]; }
  };
  function apply() {
    if (S.q.trim() && !detailsReady()) return whenDetails(apply);   // searching reads outputs and messages
    var hm = hostMask(), q = S.q.trim().toLowerCase(), hs = q ? haystack() : null;
    nView = 0;
    for (var i = 0; i < N; i++) {
      if (!S.on[C.st[i]]) continue;
      if (hm && !hm[C.h[i]]) continue;
      if (S.step >= 0 && C.s[i] !== S.step) continue;
      if (q && hs[i].indexOf(q) < 0) continue;
      view[nView++] = i;
    }
    if (S.sort && SORT[S.sort]) {
      var key = SORT[S.sort], dir = S.dir, part = Array.prototype.slice.call(view.subarray(0, nView));
      part.sort(function (a, b) { return (key(a) - key(b)) * dir || a - b; });
      view.set(part);
    }
    table.refresh();
    filters.update();
  }

  // --- filters UI -------------------------------------------------------------------------------
  var filters = (function () {
    var box = document.getElementById("filters"), chips = [], counts = new Array(ST.length).fill(0);
    for (var i = 0; i < N; i++) if (!(C.f && C.f[i] & F_LOOP)) counts[C.st[i]]++;   // as the outcome totals count
    ST.forEach(function (k, code) {
      if (!counts[code]) return;
      var b = el("button", "chip st-" + k, label(code) + " " + counts[code]);
      b.type = "button"; b.dataset.status = k; b.setAttribute("aria-pressed", "true");
      b.addEventListener("click", function () { toggle(code); });
      chips.push(b); box.appendChild(b);
    });
    var all = el("button", "reset", "all");
    all.type = "button"; all.title = "show every task";
    all.addEventListener("click", function () { reset(); });
    box.appendChild(all);
    var host = el("input"); host.type = "search"; host.id = "f-host"; host.placeholder = "host"; host.setAttribute("aria-label", "host");
    if (D.hosts.length <= 5000) {
      var dl = el("datalist"); dl.id = "hostlist";
      D.hosts.forEach(function (h) { var o = el("option"); o.value = h; dl.appendChild(o); });
      box.appendChild(dl); host.setAttribute("list", "hostlist");
    }
    host.addEventListener("input", function () { S.host = host.value; apply(); });
    box.appendChild(host);
    var step = el("select"); step.id = "f-step"; step.setAttribute("aria-label", "step");
    var o0 = el("option", null, "all steps"); o0.value = "-1"; step.appendChild(o0);
    D.steps.forEach(function (s, ix) { var o = el("option", null, s.id + (s.name !== s.id ? " — " + s.name : "")); o.value = String(ix); step.appendChild(o); });
    step.addEventListener("change", function () { S.step = +step.value; apply(); });
    box.appendChild(step);
    var q = el("input"); q.type = "search"; q.id = "f-search"; q.placeholder = "search output, messages, commands";
    q.setAttribute("aria-label", "search");
    var timer = 0;
    q.addEventListener("input", function () { clearTimeout(timer); timer = setTimeout(function () { S.q = q.value; apply(); }, 120); });
    box.appendChild(q);
    var count = el("span", "tcount"); count.id = "f-count"; box.appendChild(count);
    function toggle(code) {
      var allOn = S.on.every(Boolean);
      if (allOn) S.on = S.on.map(function (_, c) { return c === code; });   // from "everything", a click means "only this"
      else S.on[code] = !S.on[code];
      if (!S.on.some(Boolean)) S.on = S.on.map(function () { return true; });
      apply();
    }
    function only(code) { S.on = S.on.map(function (_, c) { return c === code; }); apply(); }
    function reset() {
      S.on = S.on.map(function () { return true; }); S.host = ""; S.step = -1; S.q = "";
      host.value = ""; step.value = "-1"; q.value = ""; apply();
    }
    function setHost(h) { S.host = h; host.value = h; apply(); }
    function setStep(ix) { S.step = ix; step.value = String(ix); apply(); }
    function update() {
      chips.forEach(function (b) { b.setAttribute("aria-pressed", String(S.on[ST.indexOf(b.dataset.status)])); });
      count.textContent = nView + " of " + N + (PLAN ? " predictions" : " tasks");
    }
    return { update: update, only: only, setHost: setHost, setStep: setStep };
  })();

  // --- the table: only the rows in view exist in the DOM ------------------------------------------
  function Table(box) {
    var cols = PLAN ? [["host", "host", "minmax(120px,1.2fr)"], ["step", "step", "minmax(140px,1.5fr)"], ["status", "prediction", "120px"],
                       ["", "reason", "minmax(200px,3fr)"]]
                    : [["host", "host", "minmax(120px,1.2fr)"], ["step", "step", "minmax(140px,1.6fr)"], ["status", "status", "150px"],
                       ["attempts", "attempts", "70px"], ["start", "start", "110px"], ["duration", "duration", "90px"]];
    if (!PLAN && D.predicted) cols.push(["", "plan said", "130px"]);
    var wrap = el("div", "tbl"), head = el("div", "thead"), body = el("div", "tbody"), spacer = el("div");
    wrap.style.setProperty("--cols", cols.map(function (c) { return c[2]; }).join(" "));
    cols.forEach(function (c) {
      var h = el("span", null, c[1]);
      if (c[0]) {
        h.dataset.sort = c[0];
        h.addEventListener("click", function () {
          S.dir = S.sort === c[0] ? -S.dir : 1; S.sort = c[0];
          head.querySelectorAll("span").forEach(function (x) { x.removeAttribute("data-dir"); });
          h.dataset.dir = String(S.dir); apply();
        });
      }
      head.appendChild(h);
    });
    body.tabIndex = 0; body.setAttribute("role", "grid"); body.setAttribute("aria-label", "results");
    body.appendChild(spacer); wrap.appendChild(head); wrap.appendChild(body); box.appendChild(wrap);
    var empty = el("div", "empty", "No task matches these filters."); empty.hidden = true; box.appendChild(empty);
    var pool = [], frame = 0;
    function fill(row, i) {
      row.textContent = ""; row.dataset.i = String(i);
      row.classList.toggle("sel", i === S.sel);
      row.classList.toggle("mismatch", (C.f ? C.f[i] & F_MISMATCH : 0) !== 0);
      var st = stepOf(i), f = C.f ? C.f[i] : 0, d = det(i);
      row.appendChild(el("span", null, D.hosts[C.h[i]]));
      var sc = el("span", null, (f & F_RESCUE ? "↺ " : "") + taskName(i)); sc.title = st.name + (f & F_RESCUE ? " (on_failure)" : "");
      row.appendChild(sc);
      var ss = el("span"); ss.appendChild(pill(C.st[i]));
      if (f & F_IGNORED) ss.appendChild(document.createTextNode(" ignored"));
      if (f & F_FROM) ss.appendChild(document.createTextNode(" earlier run"));
      row.appendChild(ss);
      if (PLAN) { row.appendChild(el("span", null, d.r || "")); return; }
      row.appendChild(el("span", null, C.a[i] > 1 ? C.a[i] + " ×" : String(C.a[i])));
      var sb = el("span", "mono", C.b[i] >= 0 ? "+" + fmtDur(C.b[i]) : "—"); sb.title = fmtAt(C.b[i]); row.appendChild(sb);
      row.appendChild(el("span", "mono", C.b[i] >= 0 || C.d[i] ? fmtDur(C.d[i]) : "—"));
      if (D.predicted) {
        var p = el("span", f & F_MISMATCH ? "mm" : null, d.p ? (LB[d.p] || d.p) + (f & F_MISMATCH ? " ≠" : "") : "");
        row.appendChild(p);
      }
    }
    function render() {
      frame = 0;
      var top = body.scrollTop, h = body.clientHeight || 440;
      var first = Math.max(0, Math.floor(top / ROW) - 4), last = Math.min(nView, Math.ceil((top + h) / ROW) + 4);
      var need = last - first;
      while (pool.length < need) {
        var r = el("div", "row"); r.setAttribute("role", "row"); body.appendChild(r); pool.push(r);
      }
      for (var k = 0; k < pool.length; k++) {
        var row = pool[k];
        if (k < need) { row.hidden = false; row.style.top = ((first + k) * ROW) + "px"; fill(row, view[first + k]); }
        else row.hidden = true;
      }
    }
    function schedule() { if (!frame) frame = requestAnimationFrame(render); }
    body.addEventListener("scroll", schedule);
    body.addEventListener("click", function (ev) {
      var row = ev.target.closest(".row");
      if (row) select(+row.dataset.i);
    });
    body.addEventListener("keydown", function (ev) {
      if (ev.key !== "ArrowDown" && ev.key !== "ArrowUp") return;
      ev.preventDefault();
      var pos = Array.prototype.indexOf.call(view.subarray(0, nView), S.sel);
      pos = Math.max(0, Math.min(nView - 1, pos + (ev.key === "ArrowDown" ? 1 : -1)));
      if (nView) { select(view[pos]); reveal(pos); }
    });
    function reveal(pos) {
      var y = pos * ROW;
      if (y < body.scrollTop || y + ROW > body.scrollTop + body.clientHeight) body.scrollTop = y - body.clientHeight / 2;
    }
    function refresh() {
      spacer.style.height = (nView * ROW) + "px";
      body.style.height = Math.min(440, Math.max(ROW * 4, nView * ROW + 2)) + "px";
      empty.hidden = nView > 0;
      if (body.scrollTop > nView * ROW) body.scrollTop = 0;
      render();
    }
    return { refresh: refresh, render: render, body: body };
  }

  // --- the task detail ------------------------------------------------------------------------------
  function pre(cls, text) { return el("pre", cls, text); }
  function output(box, name, head, omitted, tail) {
    if (!head && !tail) return;
    box.appendChild(el("h4", null, name));
    var p = pre("out " + name);
    p.appendChild(document.createTextNode(head || ""));
    if (tail) {
      p.appendChild(el("span", "omitted", "\n… " + omitted + " characters omitted …\n"));
      p.appendChild(document.createTextNode(tail));
    }
    box.appendChild(p);
  }
  function diff(box, text) {
    box.appendChild(el("h4", null, "diff"));
    var p = pre("out diff");
    text.split("\n").forEach(function (line) {
      var cls = line.startsWith("+++") || line.startsWith("---") ? "file" : line.startsWith("@@") ? "hunk"
              : line.startsWith("+") ? "add" : line.startsWith("-") ? "del" : null;
      p.appendChild(cls ? el("span", cls, line) : document.createTextNode(line + "\n"));
    });
    box.appendChild(p);
  }
  function kv(box, rows) {
    var dl = el("dl", "kv");
    rows.forEach(function (r) { if (r[1] === undefined || r[1] === null || r[1] === "") return; dl.appendChild(el("dt", null, r[0])); dl.appendChild(el("dd", null, r[1])); });
    box.appendChild(dl);
  }
  function select(i) {
    if (!detailsReady()) {
      var wait = document.getElementById("detail"); wait.hidden = false; wait.textContent = "Reading the task details…";
      return whenDetails(function () { select(i); });
    }
    S.sel = i;
    table.render();
    var box = document.getElementById("detail"), d = det(i), st = stepOf(i), f = C.f ? C.f[i] : 0;
    box.hidden = false; box.textContent = "";
    var h = el("h3", null, st.name + " on " + D.hosts[C.h[i]] + " ");
    h.appendChild(pill(C.st[i]));
    box.appendChild(h);
    if (PLAN) {
      kv(box, [["step", taskName(i)], ["action", d.a], ["read only", d.ro ? "yes: runs for real in the dry run" : null]]);
      if (d.r) { var rb = el("div", "box"); rb.appendChild(el("b", null, "why: ")); rb.appendChild(document.createTextNode(d.r)); box.appendChild(rb); }
      if (d.c) { box.appendChild(el("h4", null, "command")); box.appendChild(pre("out cmdline", d.c)); }
      if (d.df) diff(box, d.df);
      return;
    }
    kv(box, [["step", taskName(i) + (f & F_RESCUE ? " (on_failure)" : "")], ["action", d.a], ["exit status", d.rc],
             ["attempts", C.a[i]], ["started", fmtAt(C.b[i])], ["duration", fmtDur(C.d[i])],
             ["ignored", f & F_IGNORED ? "failed, but ignore_errors let the host go on" : null],
             ["from run", d.fr ? d.fr + " (done by an earlier run, not run again)" : null]]);
    if (d.p) {
      var pb = el("div", "box" + (f & F_MISMATCH ? " mismatch" : ""));
      pb.appendChild(el("b", null, (f & F_MISMATCH ? "Outcome differs from the plan: " : "As planned: ")));
      pb.appendChild(document.createTextNode("the plan said " + (LB[d.p] || d.p) + (d.pr ? " (" + d.pr + ")" : "") + "; the outcome is " + label(C.st[i]) + "."));
      box.appendChild(pb);
    }
    if (d.m) {
      var bad = ["failed", "drift", "unreachable"].indexOf(ST[C.st[i]]) >= 0;
      var eb = el("div", bad ? "box err" : "box"); eb.appendChild(el("b", null, bad ? "error" : "message"));
      eb.appendChild(pre("msg", d.m)); box.appendChild(eb);
    }
    if (d.hi) { var hb = el("div", "box hint"); hb.appendChild(el("b", null, "hint: ")); hb.appendChild(document.createTextNode(d.hi)); box.appendChild(hb); }
    if (d.c) { box.appendChild(el("h4", null, "command as run")); box.appendChild(pre("out cmdline", d.c)); }
    output(box, "stdout", d.o, d.oo, d.ot);
    output(box, "stderr", d.e, d.eo, d.et);
    if (d.df) diff(box, d.df);
    if (timeline) timeline.mark(i);
  }

  // --- the timeline: a row per host, or aggregated rows when hosts outnumber the screen's pixels ----
  function Timeline(box) {
    var canvas = el("canvas"), tip = el("div", "tip"), legend = el("div", "legend"), info = el("p", "note");
    tip.hidden = true;
    box.appendChild(info); box.appendChild(canvas); box.appendChild(tip); box.appendChild(legend);
    var css = getComputedStyle(document.documentElement);
    var colour = ST.map(function (k) { return css.getPropertyValue("--st-" + k).trim() || "#888"; });
    var used = new Array(ST.length).fill(0);
    for (var i = 0; i < N; i++) if (onTimeline(i)) used[C.st[i]]++;
    ST.forEach(function (k, code) {
      if (!used[code]) return;
      var it = el("span"), sw = el("i"); sw.style.background = colour[code];
      it.appendChild(sw); it.appendChild(document.createTextNode(label(code))); legend.appendChild(it);
    });
    var nH = D.hosts.length, byHost = [];
    for (var h = 0; h < nH; h++) byHost.push([]);
    for (var j = 0; j < N; j++) if (onTimeline(j)) byHost[C.h[j]].push(j);
    var geo = null, counts = null, marked = -1;
    var AXIS = 20;
    function draw() {
      var W = Math.max(320, box.clientWidth), avail = Math.max(160, Math.min(560, Math.round(window.innerHeight * 0.6)));
      var per = nH * 8 <= avail - AXIS, rowH, rows, G;
      if (per) { rowH = Math.max(8, Math.min(22, Math.floor((avail - AXIS) / Math.max(1, nH)))); rows = nH; G = 1; }
      else { rowH = 8; rows = Math.floor((avail - AXIS) / rowH); G = Math.ceil(nH / rows); rows = Math.ceil(nH / G); }
      var gutter = per && rowH >= 10 ? 150 : 96, H = AXIS + rows * rowH + 2, PW = W - gutter - 8;
      var span = Math.max(1, D.span), scale = PW / span, dpr = window.devicePixelRatio || 1;
      canvas.width = Math.round(W * dpr); canvas.height = Math.round(H * dpr); canvas.style.height = H + "px";
      var ctx = canvas.getContext("2d");
      ctx.setTransform(dpr, 0, 0, dpr, 0, 0); ctx.clearRect(0, 0, W, H);
      geo = { per: per, rowH: rowH, rows: rows, G: G, gutter: gutter, scale: scale, PW: PW };
      info.textContent = per ? nH + " hosts, " + fmtDur(span) + " from the first task to the end of the run"
        : nH + " hosts in " + rows + " rows of " + G + ": bar height is how many of a row's hosts run a task at that moment";
      axis(ctx, W, H, span, scale, gutter);
      ctx.font = "11px system-ui, sans-serif"; ctx.textBaseline = "middle"; ctx.fillStyle = "#5f6b76";
      for (var r = 0; r < rows; r++) {
        if (!per && r % Math.ceil(14 / rowH) !== 0) continue;
        var name = per ? D.hosts[r] : "hosts " + (r * G + 1) + "–" + Math.min(nH, (r + 1) * G);
        if (per && rowH < 10) continue;
        ctx.fillText(name.length > 22 ? name.slice(0, 21) + "…" : name, 4, AXIS + r * rowH + rowH / 2);
      }
      if (per) perHost(ctx); else aggregated(ctx);
      if (marked >= 0) outline(marked);
    }
    function axis(ctx, W, H, span, scale, gutter) {
      var stepMs = 1, nice = [1, 2, 5];
      for (var e = 0; ; e++) {
        var base = Math.pow(10, e), found = false;
        for (var k = 0; k < 3; k++) { stepMs = nice[k] * base; if (stepMs * scale >= 90) { found = true; break; } }
        if (found || e > 12) break;
      }
      ctx.strokeStyle = "#e3e7eb"; ctx.fillStyle = "#5f6b76"; ctx.font = "11px system-ui, sans-serif"; ctx.textBaseline = "top";
      for (var t = 0; t <= span; t += stepMs) {
        var x = gutter + t * scale;
        ctx.beginPath(); ctx.moveTo(x + 0.5, AXIS - 4); ctx.lineTo(x + 0.5, H); ctx.stroke();
        var text = "+" + fmtDur(t);
        if (x + 2 + ctx.measureText(text).width < W) ctx.fillText(text, x + 2, 3);   // no label cut at the edge
      }
    }
    function perHost(ctx) {
      var g = geo, problems = [];
      for (var i = 0; i < N; i++) {
        if (!onTimeline(i)) continue;
        var s = ST[C.st[i]];
        if (s === "failed" || s === "drift" || s === "unreachable") { problems.push(i); continue; }
        bar(ctx, i);
      }
      problems.forEach(function (i) { bar(ctx, i); });   // drawn last: failures stay visible
    }
    function bar(ctx, i) {
      var g = geo, x = g.gutter + C.b[i] * g.scale, w = Math.max(1.5, C.d[i] * g.scale);
      ctx.fillStyle = colour[C.st[i]];
      ctx.fillRect(x, AXIS + C.h[i] * g.rowH + 1, w, Math.max(1, g.rowH - 2));
    }
    function aggregated(ctx) {
      var g = geo, nS = ST.length, PW = Math.max(1, Math.floor(g.PW)), width = PW + 1;
      counts = new Int32Array(g.rows * nS * width);
      for (var i = 0; i < N; i++) {
        if (!onTimeline(i)) continue;
        var x0 = Math.min(PW - 1, Math.floor(C.b[i] * g.scale)), x1 = Math.min(PW, Math.max(x0 + 1, Math.ceil((C.b[i] + C.d[i]) * g.scale)));
        var base = ((Math.floor(C.h[i] / g.G)) * nS + C.st[i]) * width;
        counts[base + x0]++; counts[base + x1]--;
      }
      var y0 = new Float32Array(nS), acc = new Float32Array(PW);
      for (var r = 0; r < g.rows; r++) {
        var bottom = AXIS + (r + 1) * g.rowH - 0.5, unit = (g.rowH - 1) / g.G;
        acc.fill(0);
        for (var s = 0; s < nS; s++) {
          var base2 = (r * nS + s) * width, run = 0, prevH = -1, runX = 0;
          ctx.fillStyle = colour[s];
          for (var x = 0; x <= PW; x++) {
            if (x < PW) { run += counts[base2 + x]; counts[base2 + x] = run; }   // keep the running count for hovering
            var h = x < PW ? run * unit : -2, top = x < PW ? bottom - acc[x] - h : 0;
            if (x === PW || h !== prevH || (prevH > 0 && Math.abs(top - y0[s]) > 0.01)) {
              if (prevH > 0) ctx.fillRect(g.gutter + runX, y0[s], x - runX, prevH);
              prevH = h; runX = x; y0[s] = top;
            }
            if (x < PW) acc[x] += h;
          }
        }
      }
    }
    function at(ev) {
      var rect = canvas.getBoundingClientRect(), x = ev.clientX - rect.left, y = ev.clientY - rect.top, g = geo;
      if (!g) return null;
      var r = Math.floor((y - AXIS) / g.rowH), t = (x - g.gutter) / g.scale;
      if (r < 0 || r >= g.rows || x < g.gutter) return null;
      return { r: r, t: t, x: x, y: y, px: Math.floor(x - g.gutter) };
    }
    function taskAt(p) {
      var list = byHost[p.r] || [], slack = 3 / geo.scale;
      for (var k = 0; k < list.length; k++) { var i = list[k]; if (C.b[i] - slack <= p.t && p.t <= C.b[i] + C.d[i] + slack) return i; }
      return -1;
    }
    canvas.addEventListener("mousemove", function (ev) {
      var p = at(ev);
      if (!p) { tip.hidden = true; return; }
      var text;
      if (geo.per) {
        var i = taskAt(p);
        if (i < 0) { tip.hidden = true; return; }
        text = D.hosts[C.h[i]] + " · " + taskName(i) + "\n" + label(C.st[i]) + " · +" + fmtDur(C.b[i]) + " · " + fmtDur(C.d[i]);
      } else {
        var parts = [], nS = ST.length, width = Math.floor(geo.PW) + 1;
        for (var s = 0; s < nS; s++) { var n = counts ? counts[(p.r * nS + s) * width + Math.max(0, p.px)] : 0; if (n > 0) parts.push(n + " " + label(s)); }
        text = "hosts " + (p.r * geo.G + 1) + "–" + Math.min(nH, (p.r + 1) * geo.G) + " at +" + fmtDur(Math.max(0, p.t)) + "\n"
             + (parts.length ? parts.join(", ") + " running" : "nothing running");
      }
      tip.textContent = text; tip.hidden = false;
      tip.style.left = Math.min(p.x + 14, box.clientWidth - 260) + "px"; tip.style.top = (p.y + 30) + "px";
    });
    canvas.addEventListener("mouseleave", function () { tip.hidden = true; });
    canvas.addEventListener("click", function (ev) {
      var p = at(ev);
      if (!p) return;
      if (!geo.per) return;   // an aggregated row stands for many hosts: the tooltip is its detail
      var i = taskAt(p);
      if (i >= 0) { select(i); document.getElementById("detail").scrollIntoView({ block: "nearest" }); }
    });
    function outline(i) {
      if (!geo || !geo.per || C.b[i] < 0) return;
      var ctx = canvas.getContext("2d"), g = geo;
      ctx.strokeStyle = "#1565c0"; ctx.lineWidth = 2;
      ctx.strokeRect(g.gutter + C.b[i] * g.scale - 1, AXIS + C.h[i] * g.rowH, Math.max(3, C.d[i] * g.scale + 2), g.rowH);
    }
    var timer = 0;
    window.addEventListener("resize", function () { clearTimeout(timer); timer = setTimeout(draw, 150); });
    draw();
    function mark(i) {   // outline the selected task; redraw first when another one was outlined
      var had = marked;
      marked = i;
      if (had >= 0 && had !== i) draw(); else outline(i);
    }
    return { mark: mark, draw: draw };
  }

  // --- the host strip: every host as a thin slice coloured by its worst outcome (large runs only) ------
  function HostStrip(box) {
    var nH = D.hosts.length, nS = ST.length, per = new Int32Array(nH * nS), worst = new Int16Array(nH).fill(nS);
    for (var i = 0; i < N; i++) per[C.h[i] * nS + C.st[i]]++;
    for (var h = 0; h < nH; h++) for (var s = nS - 1; s >= 0; s--) if (per[h * nS + s]) worst[h] = s;
    var canvas = el("canvas"), tip = el("div", "tip"); tip.hidden = true;
    box.appendChild(canvas); box.appendChild(tip);
    var css = getComputedStyle(document.documentElement);
    var colour = ST.map(function (k) { return css.getPropertyValue("--st-" + k).trim() || "#888"; });
    var W = 0, H = 22;
    function draw() {
      W = Math.max(200, box.clientWidth);
      var dpr = window.devicePixelRatio || 1;
      canvas.width = Math.round(W * dpr); canvas.height = H * dpr; canvas.style.height = H + "px";
      var ctx = canvas.getContext("2d");
      ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
      ctx.fillStyle = "#e0e0e0"; ctx.fillRect(0, 0, W, H);
      var order = Array.from({ length: nH }, function (_, k) { return k; });
      order.sort(function (a, b) { return worst[b] - worst[a]; });   // the worst drawn last: it wins a shared pixel
      order.forEach(function (k) {
        if (worst[k] >= nS) return;
        var x0 = Math.floor(k * W / nH), x1 = Math.max(x0 + 1, Math.floor((k + 1) * W / nH));
        ctx.fillStyle = colour[worst[k]]; ctx.fillRect(x0, 0, x1 - x0, H);
      });
    }
    function hostAt(ev) {
      var x = ev.clientX - canvas.getBoundingClientRect().left, a = Math.floor(x * nH / W), b = Math.max(a + 1, Math.floor((x + 1) * nH / W));
      var best = -1;
      for (var k = Math.max(0, a); k < Math.min(nH, b); k++) if (best < 0 || worst[k] < worst[best]) best = k;
      return best;
    }
    canvas.addEventListener("mousemove", function (ev) {
      var k = hostAt(ev);
      if (k < 0) { tip.hidden = true; return; }
      var parts = [];
      for (var s = 0; s < nS; s++) if (per[k * nS + s]) parts.push(per[k * nS + s] + " " + label(s));
      tip.textContent = D.hosts[k] + "\n" + parts.join(", "); tip.hidden = false;
      tip.style.left = Math.min(ev.clientX - box.getBoundingClientRect().left + 12, W - 240) + "px"; tip.style.top = "26px";
    });
    canvas.addEventListener("mouseleave", function () { tip.hidden = true; });
    canvas.addEventListener("click", function (ev) { var k = hostAt(ev); if (k >= 0) { filters.setHost(D.hosts[k]); toResults(); } });
    var timer = 0;
    window.addEventListener("resize", function () { clearTimeout(timer); timer = setTimeout(draw, 150); });
    draw();
  }

  // --- links from the server-rendered summary, graph and host bars to the table --------------------
  function toResults() { document.getElementById("results").scrollIntoView({ block: "start" }); }
  document.querySelectorAll(".counts .count[data-status]").forEach(function (b) {
    b.addEventListener("click", function () { var c = ST.indexOf(b.dataset.status); if (c >= 0) { filters.only(c); toResults(); } });
  });
  document.querySelectorAll(".hostrow[data-host]").forEach(function (g) {
    g.addEventListener("click", function () { filters.setHost(g.dataset.host); toResults(); });
  });
  document.querySelectorAll(".graph .node[data-step]").forEach(function (g) {
    function go() {
      var ix = D.steps.findIndex(function (s) { return s.id === g.dataset.step; });
      if (ix >= 0) { filters.setStep(ix); toResults(); }
    }
    g.addEventListener("click", go);
    g.addEventListener("keydown", function (ev) { if (ev.key === "Enter" || ev.key === " ") { ev.preventDefault(); go(); } });
  });

  // --- printing: the filtered rows as a plain table (the scrolling one cannot print) ----------------
  var printRows = el("table"); printRows.id = "print-rows";
  document.getElementById("results").appendChild(printRows);
  window.addEventListener("beforeprint", function () {
    printRows.textContent = "";
    var head = el("tr");
    ["host", "step", PLAN ? "prediction" : "status", PLAN ? "reason" : "duration"].forEach(function (h) { head.appendChild(el("th", null, h)); });
    printRows.appendChild(head);
    for (var k = 0; k < Math.min(nView, 3000); k++) {
      var i = view[k], tr = el("tr");
      [D.hosts[C.h[i]], stepOf(i).id, label(C.st[i]), PLAN ? (det(i).r || "") : fmtDur(C.d[i])].forEach(function (v) { tr.appendChild(el("td", null, v)); });
      printRows.appendChild(tr);
    }
    if (nView > 3000) { var more = el("tr"); more.appendChild(el("td", null, "… " + (nView - 3000) + " more rows")); printRows.appendChild(more); }
  });
  window.addEventListener("afterprint", function () { printRows.textContent = ""; });

  table = Table(document.getElementById("table"));
  var tbox = document.getElementById("timeline-box");
  if (tbox && !PLAN) timeline = Timeline(tbox);
  var strip = document.getElementById("hoststrip");
  if (strip) HostStrip(strip);
  apply();
  whenDetails(function () { if (PLAN || D.predicted) table.render(); });   // reasons and predictions live in the details
  document.body.setAttribute("data-ready", "1");
  document.body.setAttribute("data-ready-ms", String(Math.round(performance.now())));   // read by benchmarks/report_bench.py
})();
