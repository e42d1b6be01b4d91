// bgq's web page. Every image goes through the public API, as any client's would:
// POST /v1/jobs, then GET /v1/jobs/{id} until it is done or failed, then GET .../result.
// The API key (if the server wants one) is kept in this tab's sessionStorage and sent only
// as an Authorization header, never in a URL.
import { currentFields, setUpOptions } from "./options.js";
import { Gone, Unreachable, call, describe, retryAfter, temporary } from "./api.js";
import { resultName, save, showResult, zipResults } from "./files.js";

const config = JSON.parse(document.getElementById("bgq-config").textContent);
const $ = (selector, root = document) => root.querySelector(selector);

const UPLOADS_AT_ONCE = 3; // requests submitting images
const POLLS_AT_ONCE = 4; // status requests at a time, in a round
const RESULTS_AT_ONCE = 3; // result downloads
const POLL_MIN_MS = 700;
const POLL_MAX_MS = 5000; // a round of polls with no change waits longer, up to this
const STATUS_TIMEOUT_MS = 20000; // a status request that takes longer is tried again
const RESULT_TIMEOUT_MS = 120000;
const BACKOFF_MAX_MS = 30000; // uploads wait this long at most after the API was unavailable
const LIMIT_WAIT_S = 5; // a 429 without Retry-After waits this long
const KEY_STORAGE = "bgq-api-key";
const STATE_WORDS = {
  waiting: "waiting",
  sending: "uploading",
  queued: "queued",
  running: "running",
  loading: "loading result",
  done: "done",
  failed: "failed",
  "needs-key": "needs a key",
};
const PENDING = new Set(["waiting", "sending", "queued", "running", "loading"]);

const items = []; // every image on the page, oldest first
let key = sessionStorage.getItem(KEY_STORAGE) || "";
let keyNeeded = config.auth; // the service wants a key (it said so, or answered a 401)
let keyRefused = false; // the API answered 401 to the current key
const keyMissing = () => (keyNeeded && !key) || keyRefused;
let uploading = 0;
let pollTimer = null;
let pollDelay = POLL_MIN_MS;
let polling = false; // a round is running
let pollAgain = false; // something changed during the round: the next one comes soon
const results = []; // items whose result is to be downloaded
let downloading = 0;
let backoff = 0; // ms uploads wait after the API was unavailable (0: it answered)
let uploadsPaused = null; // the timer that ends such a wait
let resumeAt = 0; // when it ends (ms since the epoch)
let countdown = null; // the timer counting it down on the cards waiting for a rate limit
let zipping = false;

// -- images on the page ----------------------------------------------------------------------

function addImages(sources) {
  const fields = currentFields(config);
  if (fields === null || sources.length === 0) return false;
  for (const source of sources) {
    const item = { source, fields };
    item.name = typeof source === "string" ? urlName(source) : source.name || "pasted image";
    item.el = render(item);
    items.push(item);
    reset(item);
    hold(item);
  }
  pump();
  return true;
}

/** The last part of a URL's path, for its card and its download's name. */
function urlName(url) {
  try {
    const parsed = new URL(url);
    const last = parsed.pathname.split("/").filter(Boolean).pop();
    if (!last) return parsed.hostname;
    try {
      return decodeURIComponent(last);
    } catch (_) {
      return last;
    }
  } catch (_) {
    return "image";
  }
}

function render(item) {
  const el = $("#job-template").content.firstElementChild.cloneNode(true);
  $(".name", el).textContent = item.name;
  $(".name", el).title = typeof item.source === "string" ? item.source : item.name;
  const original = $(".original img", el);
  original.addEventListener("error", () => original.removeAttribute("src"), { once: true });
  if (typeof item.source === "string") {
    original.referrerPolicy = "no-referrer";
    original.src = item.source; // the browser's own request, as a link would make
  } else {
    item.originalUrl = URL.createObjectURL(item.source);
    original.src = item.originalUrl;
  }
  $(".download", el).addEventListener("click", (event) => download(event, item));
  $(".retry", el).addEventListener("click", () => retry(item));
  $("#jobs").append(el);
  return el;
}

function update(item) {
  if (item.removed) return;
  const el = item.el;
  el.dataset.state = item.state;
  if (item.job) el.dataset.job = item.job;
  $(".state", el).textContent = STATE_WORDS[item.state];
  $(".cache", el).hidden = !item.cached;
  $(".error", el).textContent = item.error || "";
  const link = $(".download", el);
  link.hidden = item.state !== "done";
  if (item.job) {
    link.href = `/v1/jobs/${item.job}/result`;
    link.download = resultName(item);
  }
  $(".retry", el).hidden = item.state !== "failed";
  summarise();
  watchUnload();
}

function summarise() {
  const count = (state) => items.filter((item) => item.state === state).length;
  const done = count("done");
  const failed = count("failed");
  const hits = items.filter((item) => item.cached).length;
  const parts = [`${done} of ${items.length} done`];
  if (failed) parts.push(`${failed} failed`);
  if (hits) parts.push(`${hits} from the cache`);
  $("#summary").textContent = items.length ? parts.join(" · ") : "No images yet.";
  $("#download-all").disabled = done === 0 || zipping;
  $("#retry-failed").disabled = failed === 0;
  $("#clear").disabled = items.length === 0;
}

function fail(item, message) {
  item.state = "failed";
  item.error = message;
  update(item);
}

/** A fresh start for an item: no job, no result, and a way to cancel its requests. */
function reset(item) {
  if (item.resultUrl) URL.revokeObjectURL(item.resultUrl);
  Object.assign(item, { job: null, cached: false, error: "", blob: null, resultUrl: null });
  item.limited = false;
  item.abort = new AbortController();
  const img = $(".result img", item.el);
  img.removeAttribute("src");
  img.hidden = false; // a zip result hid it
  $(".result .packed", item.el).hidden = true;
}

// -- submitting ------------------------------------------------------------------------------

/** Ready an item to be sent: refused at once when too large; waiting for a key while the
 *  service needs one we do not have (or refused ours); else waiting for its turn. */
function hold(item) {
  const size = typeof item.source === "string" ? 0 : item.source.size;
  if (size > config.max_upload_bytes) {
    const mib = (bytes) => (bytes / 2 ** 20).toFixed(1);
    const limit = mib(config.max_upload_bytes);
    fail(item, `Too large: ${mib(size)} MiB, over this service's limit of ${limit} MiB`);
  } else if (keyMissing()) {
    item.state = "needs-key";
    item.error = keyRefused ? "API key not accepted: enter another above" : "API key needed: enter it above";
  } else {
    item.state = "waiting";
    item.error = "";
  }
  update(item);
}

/** Start uploads while fewer than UPLOADS_AT_ONCE run (none while a key is missing, or
 *  while waiting after the API was unavailable). */
function pump() {
  while (uploading < UPLOADS_AT_ONCE && !keyMissing() && uploadsPaused === null) {
    const item = items.find((candidate) => candidate.state === "waiting");
    if (!item) break;
    uploading++;
    item.state = "sending";
    if (item.limited) item.error = "";
    item.limited = false;
    update(item);
    submit(item)
      .catch((error) => {
        if (error instanceof Unreachable) unavailable(item, error.message, null);
        else if (!(error instanceof Gone)) fail(item, error.message);
      })
      .finally(() => {
        uploading--;
        pump();
      });
  }
}

/** The API did not answer or was unavailable: the item goes back in line, and uploads
 *  wait (Retry-After, else doubling from 2 s up to 30 s) before trying again. */
function unavailable(item, message, after) {
  item.state = "waiting";
  backoff = Math.min(BACKOFF_MAX_MS, after ? after * 1000 : Math.max(2000, backoff * 2));
  item.error = `${message} (trying again in ${Math.round(backoff / 1000)} s)`;
  update(item);
  banner(message);
  pauseUploads(backoff);
}

/** A 429: the key is over one of its limits. Not a failure: the item goes back in line, and
 *  uploads wait as long as the API asks (Retry-After), its card counting down. */
function rateLimited(item, seconds) {
  item.state = "waiting";
  item.limited = true;
  pauseUploads(seconds * 1000);
  showLimited();
  if (countdown === null) countdown = setInterval(showLimited, 1000);
}

function showLimited() {
  const left = Math.max(0, Math.ceil((resumeAt - Date.now()) / 1000));
  const waiting = items.filter((item) => item.limited && item.state === "waiting");
  for (const item of waiting) {
    item.error = left ? `rate limit, retrying in ${left} s` : "rate limit, retrying";
    update(item);
  }
  if (waiting.length === 0 || uploadsPaused === null) {
    clearInterval(countdown);
    countdown = null;
  }
}

/** No uploads for `ms` (or until an earlier pause ends, if that is later). */
function pauseUploads(ms) {
  if (uploadsPaused !== null && Date.now() + ms <= resumeAt) return;
  clearTimeout(uploadsPaused);
  resumeAt = Date.now() + ms;
  uploadsPaused = setTimeout(() => {
    uploadsPaused = null;
    pump();
  }, ms);
}

async function submit(item) {
  const body = new FormData();
  for (const [name, value] of item.fields) body.append(name, value);
  if (typeof item.source === "string") body.append("image_url", item.source);
  else body.append("file", item.source, item.name);
  const response = await call(item, key, "/v1/jobs", { method: "POST", body });
  if (response.status === 401) return refused(item, response, () => hold(item));
  if (response.status === 429) return rateLimited(item, retryAfter(response, LIMIT_WAIT_S));
  if (temporary(response)) {
    return unavailable(item, await describe(response), retryAfter(response, null));
  }
  if (response.status !== 202) return fail(item, await describe(response));
  backoff = 0;
  banner("");
  const job = await response.json();
  item.job = job.id;
  item.cached = job.cached;
  if (job.status === "done") {
    want(item);
  } else {
    item.state = "queued";
    update(item);
    schedulePoll(POLL_MIN_MS);
  }
}

function retry(item) {
  reset(item);
  hold(item);
  pump();
}

function retryFailed() {
  for (const item of items) if (item.state === "failed") retry(item);
}

// -- watching jobs ---------------------------------------------------------------------------

const watching = (item) => item.job && (item.state === "queued" || item.state === "running");

function schedulePoll(delay) {
  if (polling) {
    pollAgain = true; // after the round that is running
    return;
  }
  if (pollTimer !== null) {
    if (delay >= pollDelay) return;
    clearTimeout(pollTimer);
  }
  pollDelay = delay;
  pollTimer = setTimeout(pollRound, delay);
}

/** One round: the status of every job not yet final, POLLS_AT_ONCE requests at a time. */
async function pollRound() {
  pollTimer = null;
  polling = true;
  pollAgain = false;
  let changed = false;
  try {
    // POLLS_AT_ONCE lanes: a slow answer holds up its own lane, not the others.
    const pending = items.filter(watching);
    const lane = async () => {
      for (let item = pending.shift(); item; item = pending.shift()) {
        if (await poll(item)) changed = true;
      }
    };
    await Promise.all(Array.from({ length: POLLS_AT_ONCE }, lane));
  } finally {
    polling = false;
    if (items.some(watching)) {
      const calm = Math.min(POLL_MAX_MS, pollDelay * 1.5);
      schedulePoll(changed || pollAgain ? POLL_MIN_MS : calm);
    }
  }
}

/** Ask for one job's status; true when it changed. Never throws. */
async function poll(item) {
  if (!watching(item)) return false; // changed meanwhile
  const before = item.state;
  try {
    const response = await call(item, key, `/v1/jobs/${item.job}`, {}, STATUS_TIMEOUT_MS);
    if (response.status === 401) {
      await refused(item, response, () => {});
    } else if (temporary(response)) {
      banner(await describe(response)); // asked again next round
    } else if (!response.ok) {
      fail(item, await describe(response));
    } else {
      const view = await response.json();
      banner("");
      if (view.status === "failed") fail(item, view.error || "the job failed");
      else if (view.status === "done") want(item);
      else {
        item.state = view.status;
        update(item);
      }
    }
  } catch (error) {
    if (!(error instanceof Gone)) banner(error.message);
  }
  return item.state !== before;
}

// -- results ---------------------------------------------------------------------------------

/** Queue the download of a done job's result (once). */
function want(item) {
  item.state = "loading";
  update(item);
  results.push(item);
  fetchResults();
}

function fetchResults() {
  while (downloading < RESULTS_AT_ONCE && results.length) {
    const item = results.shift();
    if (item.removed || item.state !== "loading") continue;
    downloading++;
    fetchResult(item)
      .catch((error) => {
        if (error instanceof Unreachable) watchAgain(item, error.message);
        else if (!(error instanceof Gone)) fail(item, `${error.message} (reading the result)`);
      })
      .finally(() => {
        downloading--;
        fetchResults();
      });
  }
}

async function fetchResult(item) {
  const response = await call(item, key, `/v1/jobs/${item.job}/result`, {}, RESULT_TIMEOUT_MS);
  if (response.status === 401) return refused(item, response, () => want(item));
  if (temporary(response)) return watchAgain(item, await describe(response));
  if (!response.ok) return fail(item, await describe(response));
  const blob = await response.blob();
  if (item.removed) throw new Gone();
  item.blob = blob;
  item.resultUrl = URL.createObjectURL(blob);
  showResult(item);
  item.state = "done";
  item.error = "";
  update(item);
}

/** The result could not be read just now: watch the job again, and read it when done. */
function watchAgain(item, message) {
  banner(message);
  item.state = "queued";
  update(item);
  schedulePoll(POLL_MAX_MS);
}

// -- downloads -------------------------------------------------------------------------------

/** The link names the API's result URL; the click saves the copy already fetched (with
 *  the key, which a plain link could not send). */
function download(event, item) {
  if (!item.blob) return;
  event.preventDefault();
  save(item.blob, resultName(item));
}

/** "Download all": a zip of every finished result. */
async function downloadAll() {
  zipping = true;
  summarise();
  try {
    const done = items.filter((item) => item.state === "done");
    save(await zipResults(done), "bgq-results.zip");
  } catch (error) {
    banner(`Cannot make the zip: ${error.message}`);
  } finally {
    zipping = false;
    summarise();
  }
}

function clearAll() {
  for (const item of items) {
    item.removed = true;
    item.abort.abort();
    if (item.originalUrl) URL.revokeObjectURL(item.originalUrl);
    if (item.resultUrl) URL.revokeObjectURL(item.resultUrl);
    item.el.remove();
  }
  items.length = 0;
  results.length = 0;
  banner("");
  summarise();
  watchUnload();
}

// -- the key ---------------------------------------------------------------------------------

/** A 401. Sent with an older key than the one entered since: `again` at once. Else the
 *  key is missing or refused: the item waits for a key, and so do new uploads. */
async function refused(item, response, again) {
  const message = await describe(response);
  if (response.sentKey !== key) return again(); // compared after the wait for the body
  keyNeeded = true;
  if (key) keyRefused = true;
  item.state = "needs-key";
  item.error = message;
  update(item);
  for (const other of items) if (other.state === "waiting") hold(other);
  showKeyForm();
}

function showKeyForm() {
  const keyForm = $("#key-form");
  const needed = keyMissing();
  const wasNeeded = keyForm.classList.contains("needed");
  keyForm.hidden = false;
  keyForm.classList.toggle("needed", needed);
  $("#key-state").textContent = keyRefused
    ? "key not accepted"
    : key
      ? "key set"
      : needed
        ? "this bgq needs an API key"
        : "";
  if (needed && !wasNeeded) $("#key").focus();
}

function useKey(event) {
  event.preventDefault(); // the form is never sent anywhere: the key stays out of URLs
  const given = $("#key").value.trim();
  if (!given) return;
  key = given;
  keyRefused = false;
  $("#key").value = "";
  sessionStorage.setItem(KEY_STORAGE, key);
  showKeyForm();
  for (const item of items) {
    if (item.state !== "needs-key") continue;
    if (item.job) {
      item.state = "queued"; // submitted: go on watching it
      item.error = "";
      update(item);
      schedulePoll(POLL_MIN_MS);
    } else {
      hold(item);
    }
  }
  pump();
}

// -- wiring ----------------------------------------------------------------------------------

function banner(message) {
  const el = $("#banner");
  el.textContent = message;
  el.hidden = !message;
}

/** Ask before leaving while images are still on their way (their results would be lost). */
function watchUnload() {
  const busy = items.some((item) => PENDING.has(item.state));
  window.onbeforeunload = busy
    ? (event) => {
        event.preventDefault();
        event.returnValue = true;
      }
    : null;
}

function setUpInputs() {
  const drop = $("#drop");
  $("#files").addEventListener("change", (event) => {
    addImages([...event.target.files]);
    event.target.value = "";
  });
  const intoText = (event) => event.target.closest("input, textarea") !== null;
  // A file dropped anywhere is taken, never opened by the browser in place of the page.
  document.addEventListener("dragover", (event) => {
    if (intoText(event)) return; // text and links dropped into a field go in as usual
    event.preventDefault();
    drop.classList.add("over");
  });
  document.addEventListener("dragleave", (event) => {
    if (event.relatedTarget === null) drop.classList.remove("over");
  });
  document.addEventListener("drop", (event) => {
    drop.classList.remove("over");
    if (intoText(event)) return;
    event.preventDefault();
    const files = [...event.dataTransfer.files];
    // An image dragged from another page comes as its URL.
    const links = (event.dataTransfer.getData("text/uri-list") || "")
      .split(/\r?\n/)
      .filter((line) => /^https?:\/\//.test(line));
    addImages(files.length ? files : links);
  });
  document.addEventListener("paste", (event) => {
    if (intoText(event)) return;
    const files = [...(event.clipboardData ? event.clipboardData.files : [])];
    if (files.length) addImages(files);
  });
  $("#add-urls").addEventListener("click", () => {
    const urls = $("#urls").value.split(/\s+/).filter(Boolean);
    if (addImages(urls)) $("#urls").value = "";
  });
  $("#download-all").addEventListener("click", downloadAll);
  $("#retry-failed").addEventListener("click", retryFailed);
  $("#clear").addEventListener("click", clearAll);
  $("#key-form").addEventListener("submit", useKey);
}

$("#version").textContent = config.version;
setUpOptions(config);
setUpInputs();
if (config.auth || key) showKeyForm();
summarise();
