// The admin page: enrol straps from a tablet. It uses only the hub's JSON API (docs/board.md).
// No framework, no build step: this file is served as is by gatewayd.
"use strict";

(() => {
  const TOKEN_KEY = "gatewayd.admin.token";
  const DEVICES_EVERY_MS = 2000;
  const ATHLETES_EVERY_MS = 15000;
  const KINDS = {
    heart_rate: "Heart-rate strap",
    power: "Power meter",
    speed_cadence: "Speed/cadence sensor",
    cadence: "Cadence sensor",
    speed: "Speed sensor",
    footpod: "Footpod",
    running: "Running sensor",
    bike: "Smart bike",
    treadmill: "Treadmill",
    rower: "Rower",
    fitness_equipment: "Gym machine",
  };

  const $ = (id) => document.getElementById(id);
  let token = localStorage.getItem(TOKEN_KEY) || "";
  let athletes = [];
  let devices = [];
  let timers = [];

  // ------------------------------------------------------------------ API

  async function api(method, path, body) {
    const options = { method, cache: "no-store", headers: { Authorization: `Bearer ${token}` } };
    if (body !== undefined) {
      options.headers["Content-Type"] = "application/json";
      options.body = JSON.stringify(body);
    }
    // Relative: the page works under a reverse proxy's sub-path too.
    const response = await fetch(path, options);
    const text = await response.text();
    let data = null;
    try {
      data = text ? JSON.parse(text) : null;
    } catch (err) {
      data = null;
    }
    if (response.status === 401) {
      signOut("The hub refused this tablet's admin token: sign in again.");
      throw new Error("unauthorized");
    }
    if (!response.ok) {
      const error = new Error((data && data.error) || `HTTP ${response.status}`);
      error.field = data && data.field;
      throw error;
    }
    return data;
  }

  function say(text, isError) {
    const box = $("message");
    box.textContent = text;
    box.classList.toggle("error", Boolean(isError));
    box.hidden = !text;
  }

  function failed(err) {
    if (err.message === "unauthorized") return;
    say(err.field ? `${err.field}: ${err.message}` : `Not saved: ${err.message}`, true);
  }

  // ------------------------------------------------------------------ signing in

  async function start() {
    const setup = new URLSearchParams(location.hash.slice(1)).get("setup");
    if (setup) {
      // The one-time link: trade its code for a lasting token, and drop it from the address bar.
      history.replaceState(null, "", location.pathname + location.search);
      try {
        const response = await fetch("api/claim", {
          method: "POST",
          cache: "no-store",
          headers: { Authorization: `Bearer ${setup}` },
        });
        const data = await response.json();
        if (!response.ok) throw new Error(data.error || `HTTP ${response.status}`);
        saveToken(data.token);
        say("This tablet is now signed in as the hub's admin.");
      } catch (err) {
        say(`The setup link did not work (${err.message}). Paste an admin token instead.`, true);
      }
    }
    if (token) showApp();
    else showLogin();
  }

  function saveToken(value) {
    token = value;
    localStorage.setItem(TOKEN_KEY, value);
  }

  function showLogin() {
    timers.forEach(clearInterval);
    timers = [];
    $("app").hidden = true;
    $("login").hidden = false;
  }

  function showApp() {
    $("login").hidden = true;
    $("app").hidden = false;
    refreshAll();
    timers.push(setInterval(refreshDevices, DEVICES_EVERY_MS));
    timers.push(setInterval(() => editing() || refreshAthletes(), ATHLETES_EVERY_MS));
  }

  function signOut(reason) {
    token = "";
    localStorage.removeItem(TOKEN_KEY);
    say(reason || "", true);
    showLogin();
  }

  $("login-form").addEventListener("submit", (event) => {
    event.preventDefault();
    saveToken($("login-token").value.trim());
    $("login-token").value = "";
    say("");
    showApp();
  });
  $("sign-out").addEventListener("click", () => signOut("Signed out."));

  // ------------------------------------------------------------------ data

  async function refreshAll() {
    await refreshAthletes();
    await refreshDevices();
  }

  async function refreshDevices() {
    try {
      devices = await api("GET", "api/devices");
      renderDevices();
    } catch (err) {
      if (err.message !== "unauthorized") say(`Cannot reach the hub: ${err.message}`, true);
    }
  }

  async function refreshAthletes() {
    try {
      athletes = await api("GET", "api/athletes");
      renderAthletes();
      renderDevices();
    } catch (err) {
      if (err.message !== "unauthorized") say(`Cannot reach the hub: ${err.message}`, true);
    }
  }

  function editing() {
    const focused = document.activeElement;
    return Boolean(focused && $("athletes").contains(focused));
  }

  function athleteById(id) {
    return athletes.find((a) => a.id === id);
  }

  function record(a, changes) {
    return {
      name: a.name,
      max_hr: a.max_hr,
      age: a.age,
      weight_kg: a.weight_kg,
      sex: a.sex,
      devices: a.devices,
      wheel_circumference_m: a.wheel_circumference_m,
      ...changes,
    };
  }

  async function put(id, body, done) {
    try {
      await api("PUT", `api/athletes/${encodeURIComponent(id)}`, body);
      say(done);
      await refreshAll();
      return true;
    } catch (err) {
      failed(err);
      return false;
    }
  }

  async function giveDevice(device, athleteId) {
    const a = athleteById(athleteId);
    if (!a) return;
    const ref = { source: device.source, id: device.id };
    const mine = a.devices.filter((d) => !(d.source === ref.source && d.id === ref.id));
    await put(a.id, record(a, { devices: [...mine, ref] }), `${describe(device)} is now ${a.name}'s.`);
  }

  // ------------------------------------------------------------------ devices

  function describe(device) {
    return KINDS[device.kind] || "Device";
  }

  function bars(rssi) {
    if (typeof rssi !== "number") return "–";
    const level = rssi >= -60 ? 4 : rssi >= -70 ? 3 : rssi >= -80 ? 2 : 1;
    return "▂▄▆█".slice(0, level).padEnd(4, "·");
  }

  function ago(iso) {
    const seconds = Math.max(0, (Date.now() - Date.parse(iso)) / 1000);
    if (seconds < 5) return "now";
    if (seconds < 90) return `${Math.round(seconds)} s ago`;
    if (seconds < 5400) return `${Math.round(seconds / 60)} min ago`;
    return `${Math.round(seconds / 3600)} h ago`;
  }

  function cell(row, text, className) {
    const td = document.createElement("td");
    if (className) td.className = className;
    if (text instanceof Node) td.appendChild(text);
    else td.textContent = text;
    row.appendChild(td);
    return td;
  }

  function renderDevices() {
    const body = $("devices").querySelector("tbody");
    if (document.activeElement && body.contains(document.activeElement)) return;
    body.textContent = "";
    $("no-devices").hidden = devices.length > 0;
    for (const device of devices) {
      const row = document.createElement("tr");
      row.dataset.device = `${device.source}:${device.id}`;
      const seconds = (Date.now() - Date.parse(device.last_seen)) / 1000;
      row.classList.toggle("stale", seconds > 30);
      const name = document.createElement("span");
      name.textContent = describe(device);
      const id = document.createElement("span");
      id.className = "device-id";
      id.textContent = `${device.source === "ant" ? "ANT+" : "BLE"} ${device.id}`;
      const what = document.createElement("div");
      what.append(name, id);
      cell(row, what);
      const signal = cell(row, bars(device.rssi), "bars");
      signal.title = typeof device.rssi === "number" ? `${device.rssi} dBm` : "unknown";
      cell(row, typeof device.battery === "number" ? `${Math.round(device.battery)} %` : "–");
      cell(row, ago(device.last_seen));
      const owner = device.athlete && athleteById(device.athlete);
      const who = cell(row, owner ? owner.name : device.athlete || "unassigned", "owner");
      who.classList.toggle("unassigned", !device.athlete);
      cell(row, giveSelect(device));
      body.appendChild(row);
    }
  }

  function giveSelect(device) {
    const select = document.createElement("select");
    select.setAttribute("aria-label", `Give ${describe(device)} ${device.id} to`);
    select.className = "give";
    const none = new Option(device.athlete ? "move to…" : "choose…", "");
    select.add(none);
    for (const a of athletes) {
      if (a.id !== device.athlete) select.add(new Option(a.name, a.id));
    }
    select.addEventListener("change", () => {
      if (select.value) giveDevice(device, select.value);
    });
    return select;
  }

  // ------------------------------------------------------------------ athletes

  function input(label, value, attrs) {
    const wrap = document.createElement("label");
    wrap.textContent = label;
    const field = document.createElement("input");
    Object.assign(field, attrs || {});
    field.value = value === null || value === undefined ? "" : String(value);
    wrap.appendChild(field);
    return [wrap, field];
  }

  function numberOrNull(field) {
    const text = field.value.trim();
    return text === "" ? null : Number(text);
  }

  function renderAthletes() {
    const list = $("athletes");
    list.textContent = "";
    for (const a of athletes) list.appendChild(athleteCard(a));
  }

  function athleteCard(a) {
    const card = document.createElement("form");
    card.className = "athlete";
    card.dataset.athlete = a.id;
    const top = document.createElement("div");
    top.className = "row";
    const [nameLabel, name] = input("Name", a.name, { maxLength: 64, className: "name" });
    const [maxLabel, maxHr] = input("Max HR", a.max_hr, { type: "number", min: 100, max: 250, className: "num max-hr" });
    const [ageLabel, age] = input("Age", a.age, { type: "number", min: 5, max: 110, className: "num age" });
    const [weightLabel, weight] = input("Weight kg", a.weight_kg, { type: "number", min: 20, max: 350, step: "0.1", className: "num weight" });
    const sexLabel = document.createElement("label");
    sexLabel.textContent = "Sex";
    const sex = document.createElement("select");
    sex.className = "sex";
    for (const [value, text] of [["", "–"], ["female", "female"], ["male", "male"]]) {
      sex.add(new Option(text, value, false, (a.sex || "") === value));
    }
    sexLabel.appendChild(sex);
    top.append(nameLabel, maxLabel, ageLabel, weightLabel, sexLabel);

    const chips = document.createElement("div");
    chips.className = "chips";
    for (const d of a.devices) {
      const chip = document.createElement("span");
      chip.className = "chip";
      chip.textContent = `${d.source === "ant" ? "ANT+" : "BLE"} ${d.id}`;
      const drop = document.createElement("button");
      drop.type = "button";
      drop.textContent = "×";
      drop.setAttribute("aria-label", `Take ${d.id} away from ${a.name}`);
      drop.addEventListener("click", () => {
        const kept = a.devices.filter((x) => !(x.source === d.source && x.id === d.id));
        put(a.id, record(a, { devices: kept }), `${d.id} is no longer ${a.name}'s.`);
      });
      chip.appendChild(drop);
      chips.appendChild(chip);
    }
    if (!a.devices.length) {
      const none = document.createElement("span");
      none.className = "hint";
      none.textContent = "No device yet: give one from the list above.";
      chips.appendChild(none);
    }

    const actions = document.createElement("div");
    actions.className = "row";
    const save = document.createElement("button");
    save.type = "submit";
    save.textContent = "Save";
    actions.appendChild(save);
    if (a.origin === "admin") {
      const remove = document.createElement("button");
      remove.type = "button";
      remove.className = "danger remove";
      remove.textContent = "Remove";
      remove.addEventListener("click", async () => {
        if (!confirm(`Remove ${a.name} from the roster?`)) return;
        try {
          await api("DELETE", `api/athletes/${encodeURIComponent(a.id)}`);
          say(`${a.name} was removed.`);
          await refreshAll();
        } catch (err) {
          failed(err);
        }
      });
      actions.appendChild(remove);
    } else {
      const origin = document.createElement("span");
      origin.className = "origin";
      origin.textContent = "from the config file (saving here overrides it)";
      actions.appendChild(origin);
    }
    card.append(top, chips, actions);
    card.addEventListener("submit", (event) => {
      event.preventDefault();
      const changes = {
        name: name.value.trim(),
        max_hr: numberOrNull(maxHr),
        age: numberOrNull(age),
        weight_kg: numberOrNull(weight),
        sex: sex.value || null,
      };
      const label = changes.name || a.id;
      put(a.id, record(a, changes), `${label} saved.`).then((ok) => ok && document.activeElement.blur());
    });
    return card;
  }

  function slug(text) {
    const base = text
      .normalize("NFKD")
      .replace(/[\u0300-\u036f]/g, "")
      .toLowerCase()
      .replace(/[^a-z0-9]+/g, "-")
      .replace(/^-+|-+$/g, "")
      .slice(0, 40);
    let id = base || "athlete";
    for (let n = 2; athleteById(id); n += 1) id = `${base || "athlete"}-${n}`;
    return id;
  }

  $("add-form").addEventListener("submit", async (event) => {
    event.preventDefault();
    const name = $("add-name").value.trim();
    const id = $("add-id").value.trim() || slug(name);
    if (athleteById(id)) {
      say(`id: ${id} is taken`, true);
      return;
    }
    if (await put(id, { name, devices: [] }, `${name} added: give them a device from the list.`)) {
      $("add-name").value = "";
      $("add-id").value = "";
    }
  });

  start();
})();
