// The gym board: a consumer of the hub's broker (Terra's streaming protocol, PROTOCOL.md).
// No framework, no build step: this file is served as is by gatewayd.
"use strict";

(() => {
  const HISTORY_S = 60; // sparkline window
  // How far back a fresh page (or one that was away long) asks REPLAY to go, in seqs. Samples
  // older than the sparkline window are dropped here, so this only bounds the work.
  const BACKFILL_ROWS = 30000;
  const TYPES = ["HEART_RATE", "POWER", "BIKE_CADENCE", "BATTERY", "CALORIES"];
  const OP = { HEARTBEAT: 0, ACK: 1, HELLO: 2, IDENTIFY: 3, READY: 4, DISPATCH: 5, REPLAY: 7 };
  // PROTOCOL.md: reconnect with exponential backoff from 1 s to a 30 s cap, with jitter.
  const BACKOFF_BASE_S = 1;
  const BACKOFF_CAP_S = 30;
  const CLOSE_REASONS = {
    1001: "the hub is restarting",
    1006: "the connection dropped",
    1011: "the hub had an internal error",
    4001: "the board token was refused",
    4002: "the hub has too many viewers",
    4005: "heartbeat missed",
  };

  const $ = (id) => document.getElementById(id);
  const grid = $("grid");
  const banner = $("banner");

  let config = {
    title: "gatewayd",
    token: "",
    zones: [50, 60, 70, 80, 90],
    default_max_hr: null,
    lost_after_s: 5,
    low_battery_pct: 20,
    forget_after_s: 600,
    athletes: [],
  };
  const roster = new Map(); // uid -> {name, max_hr}
  const athletes = new Map(); // uid -> athlete state (see athlete())

  // The hub's clock, as seen here: the newest sample second, advanced by local elapsed time.
  // Staleness is judged on it, so a TV whose clock is wrong still marks lost athletes right.
  // A second's samples leave the hub when the second is over plus a grace of about 0.25 s.
  const SECOND_LAG_S = 1.25;
  let hubTs = null;
  let hubTsAt = 0;
  const hubNow = () =>
    hubTs === null ? null : hubTs + SECOND_LAG_S + (performance.now() - hubTsAt) / 1000;

  // ------------------------------------------------------------------ connection

  // A link that dies without a close (Wi-Fi gone) must still be noticed: the page gives the hub
  // this long to answer, and heartbeats at least this often (more often than HELLO asks is
  // harmless: the hub answers every HEARTBEAT).
  const ANSWER_TIMEOUT_MS = 10000;
  const MAX_HEARTBEAT_MS = 10000;
  let attempt = 0;
  let online = false;
  let offlineSince = null;
  let lastSeq = null; // highest live seq processed, kept across reconnects
  let retryAt = 0;
  let retryTimer = null;
  let lastProblem = "";

  async function connect() {
    retryTimer = null;
    setBanner();
    const abort = new AbortController();
    const abortTimer = setTimeout(() => abort.abort(), ANSWER_TIMEOUT_MS);
    try {
      // The board's key rides along from the page's own link (?key=...).
      const response = await fetch("board/config.json" + location.search, {
        cache: "no-store",
        signal: abort.signal,
      });
      if (response.status === 401) {
        retry("this link has no valid board key: ask staff for the board link");
        return;
      }
      if (!response.ok) throw new Error(`HTTP ${response.status}`);
      applyConfig(await response.json());
      configFetchedAt = performance.now();
    } catch (err) {
      retry("cannot reach the hub");
      return;
    } finally {
      clearTimeout(abortTimer);
    }
    const url = new URL("connect", location.href);
    url.protocol = location.protocol === "https:" ? "wss:" : "ws:";
    let socket;
    try {
      socket = new WebSocket(url);
    } catch (err) {
      retry("cannot open a connection");
      return;
    }
    const session = { heartbeat: null, awaitingAck: false, firstLive: null };
    const readyTimer = setTimeout(() => socket.close(), ANSWER_TIMEOUT_MS);

    socket.onmessage = (event) => {
      let msg;
      try {
        msg = JSON.parse(event.data);
      } catch (err) {
        return;
      }
      switch (msg.op) {
        case OP.HELLO: {
          const asked = Number(msg.d && msg.d.heartbeat_interval) || 40000;
          const interval = Math.min(asked, MAX_HEARTBEAT_MS);
          socket.send(JSON.stringify({
            op: OP.IDENTIFY,
            d: {
              token: config.token,
              type: 1,
              gatewayd: { types: TYPES, device_status: true },
            },
          }));
          const beat = () => {
            if (session.awaitingAck) {
              socket.close(1000, "no heartbeat ack");
              return;
            }
            session.awaitingAck = true;
            socket.send(JSON.stringify({ op: OP.HEARTBEAT }));
            session.heartbeat = setTimeout(beat, interval);
          };
          session.heartbeat = setTimeout(beat, interval * Math.random());
          break;
        }
        case OP.READY:
          clearTimeout(readyTimer);
          attempt = 0;
          setOnline(true);
          break;
        case OP.ACK:
          session.awaitingAck = false;
          break;
        case OP.DISPATCH:
          onDispatch(socket, session, msg);
          break;
        default:
          break;
      }
    };

    socket.onclose = (event) => {
      clearTimeout(session.heartbeat);
      clearTimeout(readyTimer);
      retry(CLOSE_REASONS[event.code] || (online ? "the connection closed" : "cannot connect"));
    };
  }

  function retry(problem) {
    if (retryTimer !== null) return;
    lastProblem = problem;
    setOnline(false);
    const ceiling = Math.min(BACKOFF_CAP_S, BACKOFF_BASE_S * 2 ** Math.min(attempt, 16));
    const delay = ceiling * (0.5 + 0.5 * Math.random());
    attempt += 1;
    retryAt = performance.now() + delay * 1000;
    retryTimer = setTimeout(connect, delay * 1000);
    setBanner();
  }

  function onDispatch(socket, session, msg) {
    if (msg.t === "DEVICE_STATUS") {
      if (typeof msg.uid === "string" && msg.d) onStatus(msg.uid, msg.d);
      return;
    }
    if (typeof msg.seq !== "number") return;
    if (session.firstLive === null) {
      // The first live seq: fill what this page missed (or the last minute) with REPLAY.
      session.firstLive = msg.seq;
      const known = lastSeq !== null && lastSeq < msg.seq ? lastSeq : 0;
      const after = Math.max(known, msg.seq - BACKFILL_ROWS, 0);
      if (msg.seq - after > 1) {
        socket.send(JSON.stringify({ op: OP.REPLAY, d: { after, before: msg.seq } }));
      }
    }
    const live = msg.seq >= session.firstLive;
    if (live) lastSeq = lastSeq === null ? msg.seq : Math.max(lastSeq, msg.seq);
    const d = msg.d;
    if (!d || typeof d.val !== "number" || typeof msg.uid !== "string") return;
    const ts = Date.parse(d.ts) / 1000;
    if (!Number.isFinite(ts)) return;
    onSample(msg.uid, msg.t, ts, d.val);
  }

  function setOnline(value) {
    online = value;
    if (value) offlineSince = null;
    else if (offlineSince === null) offlineSince = new Date();
    setBanner();
  }

  // The banner shows from the first failed attempt until READY; the tiles grey out meanwhile,
  // so nothing on screen pretends to be live.
  function setBanner() {
    const show = !online && offlineSince !== null;
    document.body.classList.toggle("offline", show);
    banner.hidden = !show;
    if (!show) return;
    const since = offlineSince.toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" });
    const wait = Math.max(0, Math.ceil((retryAt - performance.now()) / 1000));
    const next = retryTimer === null ? "reconnecting\u2026" : `retrying in ${wait} s`;
    banner.textContent = `Not connected to the hub: ${lastProblem}`;
    const small = document.createElement("small");
    small.textContent = `since ${since} \u00b7 ${next} \u00b7 numbers are not live`;
    banner.appendChild(small);
  }

  // ------------------------------------------------------------------ data

  function applyConfig(c) {
    config = Object.assign({}, config, c);
    roster.clear();
    for (const a of config.athletes || []) roster.set(a.uid, a);
    document.title = config.title;
    $("title").textContent = config.title;
    renderLegend();
    for (const a of athletes.values()) {
      const name = displayName(a.uid);
      if (name !== a.name) {
        a.name = name;
        a.el.name.textContent = name;
        placeTile(a); // a renamed athlete moves to their new place in the order
      }
      a.dirty = true;
    }
    relayout();
  }

  function displayName(uid) {
    const known = roster.get(uid);
    if (known && known.name) return known.name;
    // Unknown devices get uids like "ble:F0:5E:ED:00:00:01" or "ant:120:12345".
    const parts = uid.split(":");
    if (parts.length > 1 && (parts[0] === "ble" || parts[0] === "ant")) {
      const tail = parts[0] === "ble" ? parts.slice(-2).join(":") : parts[parts.length - 1];
      return `${parts[0].toUpperCase()} ${tail}`;
    }
    return uid;
  }

  function maxHr(uid) {
    const known = roster.get(uid);
    return (known && known.max_hr) || config.default_max_hr || null;
  }

  function athlete(uid) {
    let a = athletes.get(uid);
    if (a) return a;
    a = {
      uid,
      name: displayName(uid),
      hr: null, // {ts, val}
      power: null,
      cadence: null,
      kcal: null, // {ts, val}: this workout's CALORIES so far
      battery: null, // percent
      batteryTs: -Infinity,
      hist: [], // [ts, bpm], ascending ts
      devices: new Map(), // device id -> "connected" | "lost"
      lostAt: null, // hub time at which every device was reported lost
      lastTs: null, // newest sample second of any type
      dirty: true,
      state: "",
    };
    a.el = buildTile(a);
    athletes.set(uid, a);
    placeTile(a);
    return a;
  }

  // Staff edit the roster on /admin while the board runs: a uid the board has no name for (a
  // strap just enrolled) and a slow timer both fetch the names again, without reconnecting.
  // Also how often zone minutes (counted by the hub, in config.workouts) move on the tiles.
  const CONFIG_REFRESH_MS = 10000;
  const UNKNOWN_REFRESH_MS = 3000;
  let configFetchedAt = 0;
  let configFetching = false;

  async function refreshConfig() {
    if (configFetching) return;
    configFetching = true;
    configFetchedAt = performance.now();
    try {
      // The key rides along here too: without it the refresh is refused (401).
      const response = await fetch("board/config.json" + location.search, { cache: "no-store" });
      if (response.ok) applyConfig(await response.json());
    } catch (err) {
      // the connection's own retry reports trouble
    } finally {
      configFetching = false;
    }
  }

  function onSample(uid, t, ts, val) {
    if (!roster.has(uid) && performance.now() - configFetchedAt > UNKNOWN_REFRESH_MS) {
      refreshConfig();
    }
    if (hubTs === null || ts > hubTs) {
      hubTs = ts;
      hubTsAt = performance.now();
    }
    const now = hubNow();
    const existing = athletes.get(uid);
    // A replayed sample of someone long gone does not bring their tile back.
    if (!existing && now - ts > config.forget_after_s) return;
    const a = existing || athlete(uid);
    if (a.lastTs === null || ts > a.lastTs) a.lastTs = ts;
    // A lost device's streams end when it is declared lost, so a measurement of a later second
    // means this athlete is still heard (another device, or the same one back).
    if (a.lostAt !== null && t !== "BATTERY" && ts >= a.lostAt) a.lostAt = null;
    if (t === "HEART_RATE") {
      insertHistory(a.hist, ts, val);
      if (!a.hr || ts >= a.hr.ts) a.hr = { ts, val };
    } else if (t === "POWER") {
      if (!a.power || ts >= a.power.ts) a.power = { ts, val };
    } else if (t === "BIKE_CADENCE") {
      if (!a.cadence || ts >= a.cadence.ts) a.cadence = { ts, val };
    } else if (t === "CALORIES") {
      if (!a.kcal || ts >= a.kcal.ts) a.kcal = { ts, val };
    } else if (t === "BATTERY" && ts >= a.batteryTs) {
      a.battery = val;
      a.batteryTs = ts;
    }
    a.dirty = true;
    scheduleRender();
  }

  function onStatus(uid, d) {
    // Tiles come from samples only: a device that connects shows once it has something to show.
    const a = athletes.get(uid);
    if (!a) return;
    if (typeof d.device_id === "string") a.devices.set(d.device_id, d.state);
    const ts = Date.parse(d.ts) / 1000;
    if (typeof d.battery === "number" && Number.isFinite(ts) && ts >= a.batteryTs) {
      a.battery = d.battery;
      a.batteryTs = ts;
    }
    const states = [...a.devices.values()];
    if (d.state === "lost" && states.every((s) => s === "lost")) {
      a.lostAt = Number.isFinite(ts) ? ts : hubNow() || 0;
    } else if (d.state === "connected") {
      a.lostAt = null;
    }
    a.dirty = true;
    scheduleRender();
  }

  function insertHistory(hist, ts, val) {
    let i = hist.length;
    while (i > 0 && hist[i - 1][0] > ts) i -= 1;
    if (i > 0 && hist[i - 1][0] === ts) hist[i - 1][1] = val;
    else hist.splice(i, 0, [ts, val]);
    const horizon = hist[hist.length - 1][0] - HISTORY_S - 2;
    let drop = 0;
    while (drop < hist.length && hist[drop][0] < horizon) drop += 1;
    if (drop) hist.splice(0, drop);
  }

  // ------------------------------------------------------------------ tiles

  function buildTile(a) {
    const tile = document.createElement("article");
    tile.className = "tile";
    tile.dataset.uid = a.uid;
    const head = div("head");
    const name = span("name", a.name);
    const batt = span("batt", "");
    batt.hidden = true;
    head.append(name, batt);
    const hr = div("hr");
    hr.textContent = "--";
    const row = div("row");
    const pct = span("pct", "");
    const zone = span("zone", "");
    const canvas = document.createElement("canvas");
    row.append(pct, zone, canvas);
    const meta = div("meta");
    const power = span("power", "");
    const cadence = span("cadence", "");
    const kcal = span("kcal", "");
    const zmin = span("zmin", "");
    meta.append(kcal, zmin, power, cadence);
    const lost = div("lostmark");
    lost.append(document.createTextNode("Signal lost"));
    const lostFor = document.createElement("small");
    lost.append(lostFor);
    tile.append(head, hr, row, meta, lost);
    return { tile, name, batt, hr, pct, zone, power, cadence, kcal, zmin, canvas, lostFor };
  }

  function div(cls) {
    const el = document.createElement("div");
    el.className = cls;
    return el;
  }

  function span(cls, text) {
    const el = document.createElement("span");
    el.className = cls;
    el.textContent = text;
    return el;
  }

  // Alphabetical by name, then uid: a tile never jumps because someone's numbers changed.
  const collator = new Intl.Collator(undefined, { numeric: true, sensitivity: "base" });
  const order = (x, y) => collator.compare(x.name, y.name) || (x.uid < y.uid ? -1 : 1);

  function placeTile(a) {
    let before = null;
    for (const other of grid.children) {
      const b = athletes.get(other.dataset.uid);
      if (b && order(a, b) < 0) {
        before = other;
        break;
      }
    }
    grid.insertBefore(a.el.tile, before);
    relayout();
  }

  function removeTile(a) {
    a.el.tile.remove();
    athletes.delete(a.uid);
    relayout();
  }

  function lostSince(a) {
    if (a.lostAt !== null) return a.lostAt;
    return a.lastTs === null ? null : a.lastTs + 1;
  }

  function fresh(m, now) {
    return m !== null && now !== null && now - m.ts <= config.lost_after_s + SECOND_LAG_S + 1;
  }

  function zoneOf(pct) {
    let z = 0;
    config.zones.forEach((bound, i) => {
      if (pct >= bound) z = i + 1;
    });
    return z;
  }

  function renderTile(a, now) {
    const el = a.el;
    const hrLive = fresh(a.hr, now);
    const anyLive = hrLive || fresh(a.power, now) || fresh(a.cadence, now);
    const lost = a.lostAt !== null || !anyLive;
    let zone = 0;
    if (lost) {
      const since = lostSince(a);
      el.lostFor.textContent = since !== null && now !== null ? `for ${ago(now - since)}` : "";
    }
    if (hrLive) {
      el.hr.textContent = String(Math.round(a.hr.val));
      const max = maxHr(a.uid);
      if (max) {
        const pct = Math.round((a.hr.val / max) * 100);
        zone = zoneOf(pct);
        el.pct.textContent = String(pct);
        el.pct.append(Object.assign(document.createElement("small"), { textContent: "%" }));
      } else {
        el.pct.textContent = "bpm";
      }
    } else {
      el.hr.textContent = "--";
      el.pct.textContent = "";
    }
    el.zone.textContent = zone ? `Z${zone}` : "";
    el.zone.hidden = !zone;
    setMetric(el.power, fresh(a.power, now) ? a.power.val : null, "W");
    setMetric(el.cadence, fresh(a.cadence, now) ? a.cadence.val : null, "rpm");
    // Since the workout began (the hub ends one after the athlete is gone a while).
    const workout = (config.workouts || {})[a.uid];
    const kcal = a.kcal ? a.kcal.val : workout && typeof workout.kcal === "number" ? workout.kcal : null;
    setMetric(el.kcal, kcal, "kcal");
    setMetric(el.zmin, workout ? Math.floor(workout.zone_minutes) : null, "min Z4\u20135");
    const low = a.battery !== null && a.battery <= config.low_battery_pct;
    el.batt.hidden = !low;
    if (low) el.batt.textContent = `${Math.round(a.battery)}%`;
    el.batt.title = low ? "battery low" : "";
    const state = lost ? "lost" : hrLive ? "live" : "nohr";
    el.tile.dataset.state = state;
    el.tile.className = `tile ${lost ? "lost" : `z${zone}`}${state === "nohr" ? " nohr" : ""}`;
    el.tile.dataset.battery = low ? "low" : "ok";
    a.state = state;
    drawSpark(a, now);
  }

  function setMetric(el, val, unit) {
    if (val === null) {
      el.hidden = true;
      return;
    }
    el.hidden = false;
    el.textContent = String(Math.round(val));
    el.append(Object.assign(document.createElement("span"), { className: "unit", textContent: ` ${unit}` }));
  }

  function ago(s) {
    if (s < 90) return `${Math.max(0, Math.round(s))} s`;
    return `${Math.round(s / 60)} min`;
  }

  function drawSpark(a, now) {
    const canvas = a.el.canvas;
    const ratio = window.devicePixelRatio || 1;
    const w = Math.round(canvas.clientWidth * ratio);
    const h = Math.round(canvas.clientHeight * ratio);
    if (!w || !h) return;
    if (canvas.width !== w || canvas.height !== h) {
      canvas.width = w;
      canvas.height = h;
    }
    const ctx = canvas.getContext("2d");
    ctx.clearRect(0, 0, w, h);
    if (now === null || a.hist.length === 0) return;
    const start = now - HISTORY_S;
    const points = a.hist.filter(([ts]) => ts >= start - 1);
    if (!points.length) return;
    const max = maxHr(a.uid);
    let lo;
    let hi;
    if (max) {
      lo = (config.zones[0] / 100) * max - 10;
      hi = max;
    } else {
      lo = Infinity;
      hi = -Infinity;
    }
    for (const [, v] of points) {
      lo = Math.min(lo, v - 3);
      hi = Math.max(hi, v + 3);
    }
    const pad = ratio * 2;
    const x = (ts) => ((ts - start) / HISTORY_S) * w;
    const y = (v) => pad + (1 - (v - lo) / (hi - lo)) * (h - 2 * pad);
    const ink = getComputedStyle(a.el.tile).color;
    ctx.lineWidth = Math.max(2, h / 18);
    ctx.lineJoin = "round";
    ctx.strokeStyle = ink;
    ctx.fillStyle = ink;
    // one run per stretch without a gap: a dropout shows as a gap, not as a straight line
    let run = [];
    let runs = 0;
    const flush = () => {
      if (run.length) runs += 1;
      if (run.length === 1) {
        ctx.fillRect(x(run[0][0]) - ctx.lineWidth / 2, y(run[0][1]) - ctx.lineWidth / 2, ctx.lineWidth, ctx.lineWidth);
      } else if (run.length > 1) {
        ctx.globalAlpha = 0.18;
        ctx.beginPath();
        ctx.moveTo(x(run[0][0]), h);
        for (const [ts, v] of run) ctx.lineTo(x(ts), y(v));
        ctx.lineTo(x(run[run.length - 1][0]), h);
        ctx.closePath();
        ctx.fill();
        ctx.globalAlpha = 1;
        ctx.beginPath();
        run.forEach(([ts, v], i) => (i ? ctx.lineTo(x(ts), y(v)) : ctx.moveTo(x(ts), y(v))));
        ctx.stroke();
      }
      run = [];
    };
    let prev = null;
    for (const p of points) {
      if (prev !== null && p[0] - prev > 2.5) flush();
      run.push(p);
      prev = p[0];
    }
    flush();
    a.el.tile.dataset.gaps = String(Math.max(0, runs - 1)); // for tests and the curious
  }

  // ------------------------------------------------------------------ layout

  // Pick the column count that gives the biggest tiles (u = the tile's size unit) for this many
  // athletes on this screen; on a small screen with many athletes, keep a readable size and scroll.
  const MIN_U = 9;
  function relayout() {
    const n = Math.max(1, grid.children.length);
    const style = getComputedStyle(document.documentElement);
    const gap = parseFloat(style.getPropertyValue("--gap")) || 8;
    const header = document.querySelector(".top").offsetHeight || 56;
    const width = document.documentElement.clientWidth - 2 * gap;
    const height = window.innerHeight - header - gap;
    let best = null;
    for (let cols = 1; cols <= n; cols += 1) {
      const rows = Math.ceil(n / cols);
      const w = (width - (cols - 1) * gap) / cols;
      const h = (height - (rows - 1) * gap) / rows;
      const u = Math.min(w / 12, h / 10);
      if (best === null || u > best.u) best = { cols, w, h, u };
    }
    let { cols, h, u } = best;
    if (u < MIN_U) {
      u = MIN_U;
      cols = Math.max(1, Math.floor((width + gap) / (12 * MIN_U + gap)));
      h = 10 * MIN_U;
    }
    // Few athletes on a big screen: do not blow the tiles up past a sensible size.
    u = Math.min(u, 40);
    grid.style.setProperty("--cols", String(cols));
    grid.style.setProperty("--row", `${Math.floor(Math.min(h, u * 10 * 1.25))}px`);
    grid.style.setProperty("--u", `${u.toFixed(2)}px`);
    $("empty").hidden = grid.children.length > 0;
    for (const a of athletes.values()) a.dirty = true;
    scheduleRender();
  }

  // ------------------------------------------------------------------ rendering

  let renderPending = false;
  function scheduleRender() {
    if (renderPending) return;
    renderPending = true;
    requestAnimationFrame(render);
  }

  function render() {
    renderPending = false;
    const now = hubNow();
    for (const a of [...athletes.values()]) {
      const since = lostSince(a);
      if (now !== null && since !== null && a.state === "lost" && now - since > config.forget_after_s) {
        removeTile(a);
        continue;
      }
      if (a.dirty) {
        a.dirty = false;
        renderTile(a, now);
      }
    }
    const live = [...athletes.values()].filter((a) => a.state !== "lost").length;
    $("count").textContent = athletes.size ? `${live} live \u00b7 ${athletes.size} on the board` : "";
  }

  function renderLegend() {
    const legend = $("legend");
    legend.replaceChildren();
    config.zones.forEach((bound, i) => {
      const li = document.createElement("li");
      li.style.background = `var(--z${i + 1})`;
      li.style.color = `var(--z${i + 1}-ink)`;
      const upper = config.zones[i + 1];
      li.append(`Z${i + 1}`);
      const range = document.createElement("span");
      range.textContent = upper ? ` ${bound}\u2013${upper}%` : ` ${bound}%+`;
      li.append(range);
      legend.append(li);
    });
  }

  // Once a second: time moves on even when no data arrives (that is how staleness shows).
  function tick() {
    for (const a of athletes.values()) a.dirty = true;
    scheduleRender();
    const now = new Date();
    $("clock").textContent = now.toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" });
    if (!online) setBanner();
  }

  window.addEventListener("resize", relayout);
  renderLegend();
  relayout();
  tick();
  setInterval(tick, 1000);
  setInterval(() => online && refreshConfig(), CONFIG_REFRESH_MS);
  connect();
})();
