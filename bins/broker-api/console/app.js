// The broker's console: a page over the admin API (/admin/v1/). The admin key stays in this
// tab's sessionStorage and goes out as a Bearer token. Every value shown is set as text.
"use strict";

const $ = (id) => document.getElementById(id);
let key = sessionStorage.getItem("broker-admin-key") || "";
let timer = null;
// The first overview seen since the console opened, for rates and percentiles over the window.
let first = null;
let last = null;

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) {
    if (name === "onclick") node.addEventListener("click", value);
    else if (value !== undefined && value !== null) node.setAttribute(name, value);
  }
  for (const child of children) {
    node.append(child instanceof Node ? child : document.createTextNode(String(child ?? "")));
  }
  return node;
}

async function api(method, path) {
  const response = await fetch("/admin/v1" + path, {
    method,
    headers: { Authorization: "Bearer " + key },
  });
  const body = await response.json().catch(() => ({}));
  if (response.status === 401 || response.status === 403) {
    signOut("That key is not an admin key.");
    throw new Error("not signed in");
  }
  if (!response.ok && response.status !== 409) {
    throw new Error(body.message || body.error || "HTTP " + response.status);
  }
  return body;
}

function notice(text, error = false) {
  const n = $("notice");
  n.textContent = text;
  n.className = error ? "error" : "notice";
}

function age(ms) {
  if (ms === null || ms === undefined) return "—";
  if (ms < 1000) return Math.round(ms) + " ms";
  if (ms < 120000) return (ms / 1000).toFixed(1) + " s";
  if (ms < 7200000) return Math.round(ms / 60000) + " min";
  return (ms / 3600000).toFixed(1) + " h";
}

function when(ms, now) {
  return ms ? age(now - ms) + " ago" : "—";
}

function signOut(message) {
  key = "";
  sessionStorage.removeItem("broker-admin-key");
  clearInterval(timer);
  $("app").hidden = true;
  $("nav").hidden = true;
  $("sign-in").hidden = false;
  $("sign-in-error").textContent = message || "";
}

async function signIn(candidate) {
  key = candidate;
  try {
    await api("GET", "/overview");
  } catch (e) {
    if (key) signOut("Could not sign in: " + e.message);
    return;
  }
  sessionStorage.setItem("broker-admin-key", key);
  $("sign-in").hidden = true;
  $("app").hidden = false;
  $("nav").hidden = false;
  route();
}

// Histogram percentile from cumulative buckets [[le, count], ...], over the window.
function percentile(now, then, q) {
  if (!now) return null;
  const counts = now.buckets.map(([le, n], i) => [le, n - (then ? then.buckets[i][1] : 0)]);
  const total = counts[counts.length - 1][1];
  if (total <= 0) return null;
  for (const [le, n] of counts) if (n >= q * total) return le === "+Inf" ? Infinity : le;
  return null;
}

function merged(overview, name) {
  const hs = overview.histograms.filter((h) => h.name === name);
  if (hs.length === 0) return null;
  const buckets = hs[0].buckets.map(([le], i) => [le, hs.reduce((s, h) => s + h.buckets[i][1], 0)]);
  return { buckets, count: hs.reduce((s, h) => s + h.count, 0) };
}

function rate(name) {
  if (!first || !last || last.now === first.now) return "—";
  const d = (last.counters[name] || 0) - (first.counters[name] || 0);
  return (d / ((last.now - first.now) / 1000)).toFixed(1) + "/s";
}

function card(label, value, id) {
  return el("div", { class: "card", id }, el("div", { class: "label" }, label), el("div", { class: "value" }, value));
}

async function overviewView(view) {
  const o = await api("GET", "/overview");
  if (!first) first = o;
  last = o;
  const p = (name, q) => {
    const v = percentile(merged(o, name), merged(first, name), q);
    return v === null ? "—" : v === Infinity ? "> 300 s" : "≤ " + age(v);
  };
  view.replaceChildren(
    el("h2", {}, "Now"),
    el("div", { class: "cards" },
      card("Accepted", rate("enqueued_total"), "rate-accepted"),
      card("Completed", rate("completed_total"), "rate-completed"),
      card("Failed", rate("failed_total"), "rate-failed"),
      card("Queue wait p50 / p95", p("queue_wait", 0.5) + " / " + p("queue_wait", 0.95)),
      card("Turn p50 / p95", p("turn", 0.5) + " / " + p("turn", 0.95)),
      card("Oldest waiting", o.oldest_waiting_at ? age(o.now - o.oldest_waiting_at) : "none", "oldest"),
      card("Queued", o.queued, "queued"),
      card("Running", o.processing, "running"),
      card("Held conversations", o.held, "held-count"),
    ),
    el("h2", {}, "Drainers"),
    el("p", {},
      o.paused ? el("span", { class: "badge paused", id: "paused-badge" }, "paused by " + o.paused.by) : el("span", { class: "badge", id: "paused-badge" }, "running"),
      " ",
      o.paused
        ? el("button", { id: "drainers-resume", type: "button", onclick: () => act("/drainers/resume", "Drainers resumed") }, "Resume drainers")
        : el("button", { id: "drainers-pause", type: "button", class: "danger", onclick: () => act("/drainers/pause", "Drainers paused: running turns finish, nothing new starts") }, "Pause drainers"),
    ),
    el("table", {},
      el("thead", {}, el("tr", {}, el("th", {}, "Drainer"), el("th", {}, "Heartbeat"))),
      el("tbody", {}, ...o.drainers.map((d) => el("tr", {}, el("td", {}, d.drainer), el("td", {}, age(d.heartbeat_age_ms) + " ago")))),
    ),
  );
}

async function conversationsView(view, state) {
  const list = await api("GET", "/conversations?state=" + encodeURIComponent(state) + "&limit=200");
  const select = el("select", { id: "state-filter", "aria-label": "State" },
    ...["waiting", "running", "held", "any"].map((s) => {
      const o = el("option", { value: s }, s);
      if (s === state) o.selected = true;
      return o;
    }));
  select.addEventListener("change", () => { location.hash = "#/conversations/" + select.value; });
  view.replaceChildren(
    el("h2", {}, "Conversations, oldest first"),
    el("p", {}, select),
    el("table", { id: "conversations" },
      el("thead", {}, el("tr", {}, el("th", {}, "Conversation"), el("th", {}, "State"), el("th", {}, "Waiting"),
        el("th", {}, "Oldest waiting"), el("th", { class: "hide-narrow" }, "Running"), el("th", { class: "hide-narrow" }, "Drainer"))),
      el("tbody", {}, ...list.conversations.map((c) => el("tr", {},
        el("td", {}, el("a", { href: "#/conversation/" + encodeURIComponent(c.conversation) }, c.conversation)),
        el("td", {}, el("span", { class: "badge " + (c.held ? "held" : c.state) }, c.held ? "held" : c.state)),
        el("td", {}, c.waiting),
        el("td", {}, when(c.oldest_waiting_at, list.now)),
        el("td", { class: "hide-narrow" }, c.running_message_id || ""),
        el("td", { class: "hide-narrow" }, c.drainer || ""),
      ))),
    ),
  );
  if (list.conversations.length === 0) view.append(el("p", {}, "None."));
}

async function conversationView(view, name) {
  const { conversation: c, now } = await api("GET", "/conversations/" + encodeURIComponent(name));
  view.replaceChildren(
    el("h2", {}, c.conversation),
    el("p", {},
      el("span", { class: "badge " + (c.held ? "held" : c.state), id: "conversation-state" }, c.held ? "held" : c.state), " ",
      c.held
        ? el("button", { id: "resume", type: "button", onclick: () => act("/conversations/" + encodeURIComponent(name) + "/resume", "Resumed") }, "Resume")
        : el("button", { id: "hold", type: "button", class: "danger", onclick: () => act("/conversations/" + encodeURIComponent(name) + "/hold", "Held: it accepts messages and starts none until resumed") }, "Hold"),
    ),
    el("p", {}, c.waiting + " waiting; oldest waiting " + when(c.oldest_waiting_at, now) +
      (c.running_message_id ? "; running " + c.running_message_id + " on " + c.drainer + " since " + when(c.since, now) : "")),
    el("table", { id: "queue" },
      el("thead", {}, el("tr", {}, el("th", {}, "Message"), el("th", {}, "Status"), el("th", {}, "Mode"), el("th", {}, "Enqueued"), el("th", {}, "Attempts"))),
      el("tbody", {}, ...c.messages.map((m) => el("tr", {},
        el("td", {}, el("a", { href: "#/message/" + encodeURIComponent(m.message_id) }, m.message_id)),
        el("td", {}, m.status), el("td", {}, m.mode), el("td", {}, when(m.enqueued_at, now)), el("td", {}, m.attempts ?? 0),
      ))),
    ),
  );
}

async function messageView(view, id) {
  const record = await api("GET", "/messages/" + encodeURIComponent(id));
  view.replaceChildren(
    el("h2", {}, "Message " + id),
    el("p", {}, "Conversation ", el("a", { href: "#/conversation/" + encodeURIComponent(record.conversation) }, record.conversation)),
    el("pre", { id: "record" }, JSON.stringify(record, null, 2)),
  );
}

async function foundView(view, query) {
  const found = await api("GET", "/messages?" + query);
  view.replaceChildren(
    el("h2", {}, "Found in " + found.conversation),
    el("table", { id: "found" }, el("tbody", {}, ...found.messages.map((m) => el("tr", {},
      el("td", {}, el("a", { href: "#/message/" + encodeURIComponent(m.message_id) }, m.message_id)),
      el("td", {}, m.status), el("td", {}, m.client_message_id || ""))))),
  );
  if (found.messages.length === 0) view.append(el("p", {}, "Nothing found."));
}

async function deadView(view, kind) {
  const dead = await api("GET", "/dead?limit=200" + (kind ? "&kind=" + kind : ""));
  const since = el("input", { id: "redrive-since", type: "datetime-local", "aria-label": "Since" });
  view.replaceChildren(
    el("h2", {}, "Dead list, newest first"),
    el("p", {},
      el("a", { href: "#/dead" }, "all"), " · ", el("a", { href: "#/dead/message" }, "messages"), " · ", el("a", { href: "#/dead/callback" }, "callbacks"), " — ",
      "redrive everything since ", since, " ",
      el("button", { type: "button", id: "redrive-all", onclick: () => {
        const t = since.value ? new Date(since.value).getTime() : 0;
        act("/dead/redrive?since=" + t + (kind ? "&kind=" + kind : ""), "Redriven");
      } }, "Redrive all")),
    el("table", { id: "dead" },
      el("thead", {}, el("tr", {}, el("th", {}, "Entry"), el("th", {}, "When"), el("th", {}, "Why"), el("th", {}, ""))),
      el("tbody", {}, ...dead.entries.map((e) => el("tr", {},
        el("td", {}, e.kind, " ", el("a", { href: "#/message/" + encodeURIComponent(e.message_id) }, e.message_id)),
        el("td", {}, when(e.at, Date.now())),
        el("td", {}, e.last_error || e.message || e.code || ""),
        el("td", {}, el("button", { type: "button", class: "redrive", "data-entry": e.entry,
          onclick: () => act("/dead/" + encodeURIComponent(e.entry) + "/redrive", "Redriven " + e.entry) }, "Redrive")),
      ))),
    ),
  );
  if (dead.entries.length === 0) view.append(el("p", { id: "dead-empty" }, "The dead list is empty."));
}

async function act(path, done) {
  try {
    const result = await api("POST", path);
    if (result.redriven === false) notice("Not redriven: " + (result.reason || ""), true);
    else notice(done);
  } catch (e) {
    notice(e.message, true);
  }
  route();
}

async function route() {
  clearInterval(timer);
  if (!key) return signOut();
  const view = $("view");
  const [, page, ...rest] = location.hash.replace(/^#/, "").split("/");
  const arg = decodeURIComponent(rest.join("/"));
  try {
    if (!page) {
      await overviewView(view);
      timer = setInterval(() => overviewView(view).catch((e) => notice(e.message, true)), 2000);
    } else if (page === "conversations") await conversationsView(view, arg || "waiting");
    else if (page === "conversation") await conversationView(view, arg);
    else if (page === "message") await messageView(view, arg);
    else if (page === "find") await foundView(view, rest.join("/"));
    else if (page === "dead") await deadView(view, arg);
  } catch (e) {
    if (key) view.replaceChildren(el("p", { class: "error" }, e.message));
  }
}

$("sign-in-form").addEventListener("submit", (e) => {
  e.preventDefault();
  signIn($("admin-key").value.trim());
});
$("sign-out").addEventListener("click", () => signOut());
$("search-kind").addEventListener("change", () => {
  $("search-conversation").hidden = $("search-kind").value !== "cmid";
});
$("search").addEventListener("submit", (e) => {
  e.preventDefault();
  const text = $("search-text").value.trim();
  const kind = $("search-kind").value;
  notice("");
  if (kind === "message") location.hash = "#/message/" + encodeURIComponent(text);
  else if (kind === "user") location.hash = "#/find/user=" + encodeURIComponent(text);
  else location.hash = "#/find/client_message_id=" + encodeURIComponent(text) + "&conversation=" +
    encodeURIComponent($("search-conversation").value.trim());
});
window.addEventListener("hashchange", route);
if (key) signIn(key); else signOut();
