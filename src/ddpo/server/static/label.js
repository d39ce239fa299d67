// The labelling page: one pair at a time, keyboard first (1 / 2 / t / s, u or Backspace to undo).
// Everything from the server is shown with textContent or as a data: image URL: a prompt is never markup.
"use strict";

const KEYS = { "1": "1", "2": "2", "t": "tie", "s": "skip" };
const POLL_MS = 2000;
let token = null;
let pair = null;
let busy = false;

function $(id) { return document.getElementById(id); }

function readToken() {
  const fromHash = new URLSearchParams(location.hash.slice(1)).get("token");
  if (fromHash) {
    sessionStorage.setItem("ddpo-label-token", fromHash);
    history.replaceState(null, "", location.pathname);  // the token leaves the address bar and the history
  }
  return sessionStorage.getItem("ddpo-label-token");
}

function setState(state, message) {
  document.body.dataset.state = state;
  $("message").textContent = message || "";
}

async function api(method, path, body) {
  const response = await fetch(path, {
    method,
    headers: { "Authorization": "Bearer " + token, "Content-Type": "application/json" },
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  const data = await response.json().catch(() => ({}));
  if (!response.ok) {
    const error = new Error(data.detail || response.statusText);
    error.status = response.status;
    throw error;
  }
  return data;
}

function showProgress(progress) {
  if (!progress) return;
  $("who").textContent = "Labelling as " + progress.labeller;
  $("progress").textContent = "You: " + progress.yours + " labelled, " + progress.remaining + " to go · " +
    progress.labelled_pairs + " of " + progress.pairs + " pairs labelled by someone";
  const counts = Object.entries(progress.labels_per_labeller).map(([name, n]) => name + " " + n);
  $("labellers").textContent = "Labels per labeller: " + (counts.length ? counts.join(", ") : "none yet");
}

function showPair(next, message) {
  pair = next;
  document.body.dataset.pair = next ? next.id : "";
  if (!next) {
    $("prompt").textContent = "";
    $("image-1").removeAttribute("src");
    $("image-2").removeAttribute("src");
    setState("waiting", "No pairs to label right now; waiting for more…");
    setTimeout(refresh, POLL_MS);
    return;
  }
  $("prompt").textContent = next.prompt;
  $("image-1").src = next.images[0];
  $("image-2").src = next.images[1];
  setState("ready", message);
}

function fail(error) {
  if (error.status === 401) {
    setState("denied", "This link has no valid labeller token. Ask for a link made by `ddpo label add-labeller`.");
  } else {
    setState("error", "Could not reach the server (" + error.message + "); retrying…");
    setTimeout(refresh, POLL_MS);
  }
}

async function refresh() {
  if (busy) return;
  busy = true;
  try {
    const data = await api("GET", "/api/next");
    showProgress(data.progress);
    showPair(data.pair, $("message").textContent);
  } catch (error) {
    fail(error);
  } finally {
    busy = false;
  }
}

const WORDS = { "1": "the first image", "2": "the second image", "tie": "a tie", "skip": "skipped" };

async function choose(choice) {
  if (busy || !pair) return;
  busy = true;
  setState("saving", "Saving…");
  try {
    const data = await api("POST", "/api/label", { pair: pair.id, choice });
    showProgress(data.progress);
    showPair(data.pair, "Saved: " + WORDS[choice] + ". Press u to undo.");
  } catch (error) {
    fail(error);
  } finally {
    busy = false;
  }
}

async function undo() {
  if (busy) return;
  busy = true;
  setState("saving", "Undoing…");
  try {
    const data = await api("POST", "/api/undo");
    showProgress(data.progress);
    showPair(data.pair, data.undone ? "Undone: " + WORDS[data.undone.choice] + ". Choose again." : "Nothing to undo.");
  } catch (error) {
    fail(error);
  } finally {
    busy = false;
  }
}

document.addEventListener("keydown", (event) => {
  if (event.altKey || event.metaKey) return;
  const key = event.key.toLowerCase();
  if (event.ctrlKey) {
    if (key === "z") { event.preventDefault(); undo(); }
    return;
  }
  if (key in KEYS) { event.preventDefault(); choose(KEYS[key]); }
  else if (key === "u" || key === "backspace") { event.preventDefault(); undo(); }
});

document.addEventListener("DOMContentLoaded", () => {
  for (const button of document.querySelectorAll("button[data-choice]")) {
    button.addEventListener("click", () => choose(button.dataset.choice));
  }
  $("undo").addEventListener("click", undo);
  token = readToken();
  if (!token) {
    setState("denied", "Open this page with the link `ddpo label add-labeller` printed (it carries your token).");
    return;
  }
  refresh();
});
