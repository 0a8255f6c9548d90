// The fleet dashboard: one server-sent event per refresh carries the whole snapshot
// (/api/events); rows are keyed by device and updated in place, views reloaded at most once a
// second per device and only when the pipeline published a new one.
"use strict";

const VIEW_INTERVAL_MS = 1000;
const rows = new Map();
let plot = null;

function text(id, value) {
  document.getElementById(id).textContent = value;
}

function num(value, digits) {
  return value === null || value === undefined ? "–" : value.toFixed(digits);
}

function ms(seconds) {
  return seconds === null || seconds === undefined ? "–" : (seconds * 1000).toFixed(1) + " ms";
}

function ago(seconds) {
  if (seconds < 60) return seconds.toFixed(seconds < 10 ? 1 : 0) + " s";
  if (seconds < 3600) return (seconds / 60).toFixed(0) + " min";
  return (seconds / 3600).toFixed(1) + " h";
}

function saved(now, all) {
  if (now === null || all === null || all <= 0) return "n/a (no item sent at split 1 yet)";
  return ((1 - now / all) * 100).toFixed(0) + " %";
}

function newRow(id) {
  const tr = document.createElement("tr");
  tr.dataset.device = id;
  const cells = {};
  for (const name of ["view", "id", "connected", "split", "now", "window", "latency", "cpu",
                      "completed", "filtered", "failed", "seen"]) {
    const td = document.createElement("td");
    td.className = name;
    if (!["view", "id", "connected", "split"].includes(name)) td.classList.add("num");
    tr.appendChild(td);
    cells[name] = td;
  }
  const img = document.createElement("img");
  img.alt = "latest view of " + id;
  cells.view.appendChild(img);
  cells.id.textContent = id;
  const row = { tr, cells, img, shown: null, loadedAt: 0, loading: false };
  return row;
}

function updateRow(row, d, now, tasks) {
  const c = row.cells;
  c.connected.textContent = (d.connected ? "yes, " : "no, ") + ago(now - d.since);
  c.connected.className = "connected " + (d.connected ? "up" : "off");
  c.split.textContent = d.split + " (cloud from " + (d.cloud_from ?? "?") + ")";
  c.split.title = "device runs " + tasks.slice(0, d.split).join(", ");
  c.now.textContent = num(d.items_per_second, 1);
  c.window.textContent = num(d.items_per_second_window, 1);
  c.latency.textContent = ms(d.latency_p50) + " / " + ms(d.latency_p95);
  c.cpu.textContent = ms(d.cloud_cpu_per_item);
  c.completed.textContent = d.completed;
  c.filtered.textContent = d.filtered;
  c.failed.textContent = d.failed;
  c.seen.textContent = ago(now - d.last_seen) + " ago";
  const t = performance.now();
  if (d.view !== null && d.view !== row.shown && !row.loading && t - row.loadedAt >= VIEW_INTERVAL_MS) {
    row.shown = d.view;
    row.loadedAt = t;
    row.loading = true;
    // Decoded off screen, then swapped in: the shown image never blanks while the next loads.
    const next = new Image();
    next.alt = row.img.alt;
    next.src = "/api/view/" + encodeURIComponent(d.id) + "?v=" + d.view;
    next.decode().then(() => {
      row.img.replaceWith(next);
      row.img = next;
    }).catch(() => {}).finally(() => { row.loading = false; });
  }
}

function fromZero(_u, _min, max) {
  return [0, max > 0 ? max * 1.1 : 1];
}

function updatePlot(history, window) {
  // Always the whole window, seconds before the first answer empty: a steady time axis.
  const n = window - 1;
  const pad = Array(Math.max(0, n - history.items_per_second.length)).fill(null);
  const xs = Array.from({ length: n }, (_, i) => history.end - n + i);
  const cpu = history.cloud_cpu_per_item.map((v) => (v === null ? null : v * 1000));
  const data = [xs, pad.concat(history.items_per_second), pad.concat(cpu)];
  const el = document.getElementById("plot");
  if (plot === null) {
    plot = new uPlot({
      width: el.clientWidth || 800,
      height: 220,
      // Both from zero, so that a small wobble does not look like a collapse.
      scales: { rate: { range: fromZero }, cpu: { range: fromZero } },
      series: [
        {},
        { label: "items/s", stroke: "#1f6feb", width: 2, scale: "rate" },
        { label: "cloud CPU ms/item", stroke: "#d1242f", width: 2, scale: "cpu" },
      ],
      axes: [{}, { scale: "rate", label: "items/s" },
             { scale: "cpu", side: 1, label: "ms/item", grid: { show: false } }],
    }, data, el);
    window.addEventListener("resize", () => plot.setSize({ width: el.clientWidth, height: 220 }));
  } else {
    plot.setData(data);
  }
}

function render(snap) {
  const f = snap.fleet;
  text("pipeline", snap.pipeline);
  text("devices-active", f.devices_active + " / " + f.devices_kept);
  text("items-per-second", num(f.items_per_second, 1));
  text("cloud-cpu", ms(f.cloud_cpu_per_item));
  text("saving-cpu", saved(f.cloud_seconds_per_item, f.cloud_seconds_per_item_all));
  text("saving-bytes", saved(f.bytes_per_item, f.bytes_per_item_all));
  const body = document.querySelector("#devices tbody");
  const seen = new Set();
  let index = 0;
  for (const d of snap.devices) {
    seen.add(d.id);
    let row = rows.get(d.id);
    if (row === undefined) {
      row = newRow(d.id);
      rows.set(d.id, row);
    }
    updateRow(row, d, snap.time, snap.tasks);
    if (body.children[index] !== row.tr) body.insertBefore(row.tr, body.children[index] ?? null);
    index += 1;
  }
  for (const [id, row] of rows) {
    if (!seen.has(id)) {
      row.tr.remove();
      rows.delete(id);
    }
  }
  updatePlot(snap.history, snap.window_seconds);
  const status = document.getElementById("status");
  status.textContent = "live · updated " + new Date(snap.time * 1000).toLocaleTimeString();
  status.className = "status";
}

function connect() {
  const events = new EventSource("/api/events");
  events.onmessage = (e) => render(JSON.parse(e.data));
  events.onerror = () => {
    const status = document.getElementById("status");
    status.textContent = "disconnected: retrying…";
    status.className = "status down";
    fetch("/api/fleet").then((r) => {
      if (r.status === 401) window.location.assign("/login");
    }).catch(() => {});
  };
}

connect();
