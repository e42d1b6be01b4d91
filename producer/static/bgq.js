// bgq's web page. Every image goes through the public API, as any client's would:
// POST /v1/jobs, then GET /v1/jobs/{id} until it is done or failed, then GET .../result.
// The API key (if the server wants one) is kept in this tab's sessionStorage and sent only
// as an Authorization header, never in a URL.
"use strict";
(() => {
  const config = JSON.parse(document.getElementById("bgq-config").textContent);
  const $ = (selector, root = document) => root.querySelector(selector);

  const UPLOADS_AT_ONCE = 3; // requests submitting images
  const POLLS_AT_ONCE = 4; // status requests per round
  const POLL_MIN_MS = 700;
  const POLL_MAX_MS = 5000; // a round of polls with no change waits longer, up to this
  const KEY_STORAGE = "bgq-api-key";
  const EXTENSIONS = { "image/png": ".png", "image/webp": ".webp", "image/jpeg": ".jpg" };
  const STATUS_WORDS = {
    401: "API key needed or not accepted",
    404: "Not found",
    409: "Not available",
    413: "Too large",
    415: "Unsupported file",
    422: "Refused",
    503: "bgq is unavailable right now, try again in a moment",
  };
  const STATE_WORDS = {
    waiting: "waiting",
    sending: "uploading",
    queued: "queued",
    running: "running",
    done: "done",
    failed: "failed",
    "needs-key": "needs a key",
  };

  const items = []; // every image on the page, oldest first
  let nextItem = 1;
  let key = sessionStorage.getItem(KEY_STORAGE) || "";
  let uploading = 0;
  let pollTimer = null;
  let pollDelay = POLL_MIN_MS;

  // -- talking to the API ---------------------------------------------------------------------

  function headers() {
    return key ? { Authorization: `Bearer ${key}` } : {};
  }

  /** The API's JSON error, in words: "Too large: request body over ...". */
  async function describe(response) {
    let message = "";
    try {
      const body = await response.json();
      message = (body.error && body.error.message) || "";
    } catch (_) {
      message = response.statusText;
    }
    const words = STATUS_WORDS[response.status] || `HTTP ${response.status}`;
    return message ? `${words}: ${message}` : words;
  }

  async function call(path, init = {}) {
    try {
      return await fetch(path, { ...init, headers: { ...headers(), ...(init.headers || {}) } });
    } catch (error) {
      throw new Error(`Cannot reach bgq: ${error.message}`);
    }
  }

  // -- options ---------------------------------------------------------------------------------

  const form = $("#options");
  const field = (id) => $(`#${id}`, form);

  function setUpOptions() {
    for (const name of config.models) {
      field("model").append(new Option(name, name, false, name === config.model));
    }
    field("quality").placeholder = String(config.quality);
    form.addEventListener("input", syncOptions);
    form.addEventListener("change", syncOptions);
    syncOptions();
  }

  /** Enable only what applies: quality to webp/jpeg, margin to crop, padding to a canvas. */
  function syncOptions() {
    field("quality").disabled = field("format").value === "png";
    field("crop_margin").disabled = !field("crop").checked;
    const canvas = field("canvas").value.trim() !== "";
    field("padding").disabled = !canvas;
    field("position").disabled = !canvas;
    field("bgcolor").disabled = !field("use-bgcolor").checked;
    $("#options-error").textContent = "";
    for (const input of form.querySelectorAll("[aria-invalid]")) input.removeAttribute("aria-invalid");
  }

  /** The form fields of the current options (only those that differ from the defaults), or
   *  null with the fault shown when a value cannot be right. */
  function currentFields() {
    const fields = [["model", field("model").value]];
    const text = (id) => (field(id).disabled ? "" : field(id).value.trim());
    const check = (id, pattern, words) => {
      const value = text(id);
      if (value === "") return true;
      if (new RegExp(pattern).test(value)) {
        fields.push([id, value]);
        return true;
      }
      field(id).setAttribute("aria-invalid", "true");
      $("#options-error").textContent = `${id.replace("_", " ")}: ${words}`;
      field(id).focus();
      return false;
    };
    const format = field("format").value;
    if (format !== "png") fields.push(["format", format]);
    if (text("quality") !== "" && !check("quality", "^(100|[1-9][0-9]?)$", "a whole number from 1 to 100")) return null;
    if (field("crop").checked) fields.push(["crop", "true"]);
    const length = config.patterns.length;
    if (!check("crop_margin", length, "a length such as 20px or 5%")) return null;
    if (!check("canvas", config.patterns.canvas, "width x height in pixels, such as 1000x1000")) return null;
    if (!check("padding", length, "a length such as 40px or 5%")) return null;
    if (!field("position").disabled && field("position").value !== "center") {
      fields.push(["position", field("position").value]);
    }
    if (field("use-bgcolor").checked) {
      const hex = field("bgcolor").value; // #rrggbb
      const rgb = [1, 3, 5].map((i) => parseInt(hex.slice(i, i + 2), 16));
      fields.push(["bgcolor", `${rgb.join(",")},255`]);
    }
    for (const flag of ["alpha_matting", "post_process_mask", "only_mask"]) {
      if (field(flag).checked) fields.push([flag, "true"]);
    }
    return fields;
  }

  // -- images on the page ----------------------------------------------------------------------

  function addImages(sources) {
    const fields = currentFields();
    if (fields === null || sources.length === 0) return;
    for (const source of sources) {
      const item = { id: nextItem++, source, fields, state: "waiting", job: null, cached: false };
      item.name = typeof source === "string" ? urlName(source) : source.name || "pasted image";
      item.el = render(item);
      items.push(item);
      update(item);
    }
    pump();
  }

  function urlName(url) {
    try {
      const parsed = new URL(url);
      const last = parsed.pathname.split("/").filter(Boolean).pop();
      return last ? decodeURIComponent(last) : parsed.hostname;
    } catch (_) {
      return url;
    }
  }

  function render(item) {
    const el = $("#job-template").content.firstElementChild.cloneNode(true);
    el.dataset.item = String(item.id);
    $(".name", el).textContent = item.name;
    $(".name", el).title = typeof item.source === "string" ? item.source : item.name;
    const original = $(".original img", el);
    if (typeof item.source === "string") {
      original.src = item.source; // the browser's own request, as a link would make
      original.referrerPolicy = "no-referrer";
    } else {
      item.originalUrl = URL.createObjectURL(item.source);
      original.src = item.originalUrl;
    }
    original.addEventListener("error", () => original.removeAttribute("src"), { once: true });
    $(".download", el).addEventListener("click", (event) => download(event, item));
    $(".retry", el).addEventListener("click", () => retry(item));
    $("#jobs").append(el);
    return el;
  }

  function update(item) {
    const el = item.el;
    el.dataset.state = item.state;
    if (item.job) el.dataset.job = item.job;
    $(".state", el).textContent = STATE_WORDS[item.state];
    $(".cache", el).hidden = !item.cached;
    $(".error", el).textContent = item.error || "";
    const link = $(".download", el);
    link.hidden = item.state !== "done" || !item.blob;
    if (item.job) {
      link.href = `/v1/jobs/${item.job}/result`;
      link.download = resultName(item);
    }
    $(".retry", el).hidden = item.state !== "failed";
    summarise();
  }

  function resultName(item) {
    const stem = item.name.replace(/\.[A-Za-z0-9]{1,5}$/, "") || "image";
    const type = item.blob ? item.blob.type : "";
    return stem + (EXTENSIONS[type] || ".png");
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
    $("#download-all").disabled = !items.some((item) => item.state === "done" && item.blob);
    $("#clear").disabled = items.length === 0 || uploading > 0;
  }

  function fail(item, message) {
    item.state = "failed";
    item.error = message;
    update(item);
  }

  // -- submitting ------------------------------------------------------------------------------

  /** Start uploads while fewer than UPLOADS_AT_ONCE run. */
  function pump() {
    while (uploading < UPLOADS_AT_ONCE) {
      const item = items.find((candidate) => candidate.state === "waiting");
      if (!item) break;
      uploading++;
      item.state = "sending";
      update(item);
      submit(item).finally(() => {
        uploading--;
        pump();
        summarise();
      });
    }
  }

  async function submit(item) {
    const body = new FormData();
    for (const [name, value] of item.fields) body.append(name, value);
    if (typeof item.source === "string") body.append("image_url", item.source);
    else body.append("file", item.source, item.name);
    let response;
    try {
      response = await call("/v1/jobs", { method: "POST", body });
    } catch (error) {
      return fail(item, error.message);
    }
    if (response.status === 401) return needKey(item, await describe(response));
    if (response.status !== 202) return fail(item, await describe(response));
    const job = await response.json();
    item.job = job.id;
    item.cached = job.cached;
    item.state = job.status === "done" ? "running" : "queued";
    update(item);
    if (job.status === "done") await fetchResult(item);
    else schedulePoll(POLL_MIN_MS);
  }

  function retry(item) {
    Object.assign(item, { state: "waiting", job: null, cached: false, error: "", blob: null });
    $(".result img", item.el).removeAttribute("src");
    update(item);
    pump();
  }

  // -- watching jobs ---------------------------------------------------------------------------

  function schedulePoll(delay) {
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
    const pending = items.filter((item) => item.job && ["queued", "running"].includes(item.state));
    let changed = false;
    for (let i = 0; i < pending.length; i += POLLS_AT_ONCE) {
      const results = await Promise.all(pending.slice(i, i + POLLS_AT_ONCE).map(poll));
      changed = changed || results.some(Boolean);
    }
    const still = items.some((item) => item.job && ["queued", "running"].includes(item.state));
    if (still) schedulePoll(changed ? POLL_MIN_MS : Math.min(POLL_MAX_MS, pollDelay * 1.5));
  }

  /** Ask for one job's status; true when it changed. */
  async function poll(item) {
    if (item.state !== "queued" && item.state !== "running") return false; // changed meanwhile
    const before = item.state;
    let response;
    try {
      response = await call(`/v1/jobs/${item.job}`);
    } catch (error) {
      banner(error.message);
      return false;
    }
    if (response.status === 401) {
      needKey(item, await describe(response));
      return true;
    }
    if (response.status === 503) {
      banner(await describe(response));
      return false;
    }
    if (!response.ok) {
      fail(item, await describe(response));
      return true;
    }
    banner("");
    const view = await response.json();
    if (view.status === "failed") {
      fail(item, view.error || "the job failed");
    } else if (view.status === "done") {
      item.state = "running";
      await fetchResult(item);
    } else {
      item.state = view.status;
      update(item);
    }
    return item.state !== before;
  }

  async function fetchResult(item) {
    let response;
    try {
      response = await call(`/v1/jobs/${item.job}/result`);
    } catch (error) {
      return fail(item, `${error.message} (reading the result)`);
    }
    if (response.status === 401) return needKey(item, await describe(response));
    if (!response.ok) return fail(item, await describe(response));
    item.blob = await response.blob();
    item.resultUrl = URL.createObjectURL(item.blob);
    $(".result img", item.el).src = item.resultUrl;
    item.state = "done";
    item.error = "";
    update(item);
  }

  // -- downloads -------------------------------------------------------------------------------

  /** The link names the API's result URL; the click saves the copy already fetched (with
   *  the key, which a plain link could not send). */
  function download(event, item) {
    if (!item.blob) return;
    event.preventDefault();
    save(item.blob, resultName(item));
  }

  function save(blob, name) {
    const link = document.createElement("a");
    link.href = URL.createObjectURL(blob);
    link.download = name;
    document.body.append(link);
    link.click();
    link.remove();
    setTimeout(() => URL.revokeObjectURL(link.href), 60000);
  }

  async function downloadAll() {
    const files = {};
    for (const item of items) {
      if (item.state !== "done" || !item.blob) continue;
      let name = resultName(item);
      for (let n = 2; name in files; n++) name = resultName(item).replace(/(\.\w+)$/, `-${n}$1`);
      files[name] = new Uint8Array(await item.blob.arrayBuffer());
    }
    // Stored, not deflated: PNG, WebP and JPEG are compressed already.
    const zipped = fflate.zipSync(files, { level: 0 });
    save(new Blob([zipped], { type: "application/zip" }), "bgq-results.zip");
  }

  function clearAll() {
    for (const item of items) {
      if (item.originalUrl) URL.revokeObjectURL(item.originalUrl);
      if (item.resultUrl) URL.revokeObjectURL(item.resultUrl);
      item.el.remove();
    }
    items.length = 0;
    banner("");
    summarise();
  }

  // -- the key ---------------------------------------------------------------------------------

  function needKey(item, message) {
    item.state = "needs-key";
    item.error = message;
    update(item);
    showKeyForm(true);
  }

  function showKeyForm(needed) {
    const keyForm = $("#key-form");
    keyForm.hidden = false;
    keyForm.classList.toggle("needed", needed && !key);
    $("#key-state").textContent = key ? "key set" : needed ? "this bgq needs an API key" : "";
    if (needed) $("#key").focus();
  }

  function useKey(event) {
    event.preventDefault(); // the form is never sent anywhere: the key stays out of URLs
    key = $("#key").value.trim();
    $("#key").value = "";
    if (key) sessionStorage.setItem(KEY_STORAGE, key);
    else sessionStorage.removeItem(KEY_STORAGE);
    showKeyForm(false);
    for (const item of items) {
      if (item.state !== "needs-key") continue;
      item.error = "";
      if (item.job && !item.blob) {
        item.state = "queued"; // submitted: go on watching it
        update(item);
        schedulePoll(POLL_MIN_MS);
      } else {
        item.state = "waiting";
        update(item);
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

  function setUpInputs() {
    const drop = $("#drop");
    $("#files").addEventListener("change", (event) => {
      addImages([...event.target.files]);
      event.target.value = "";
    });
    drop.addEventListener("dragover", (event) => {
      event.preventDefault();
      drop.classList.add("over");
    });
    drop.addEventListener("dragleave", () => drop.classList.remove("over"));
    drop.addEventListener("drop", (event) => {
      event.preventDefault();
      drop.classList.remove("over");
      addImages([...event.dataTransfer.files]);
    });
    drop.addEventListener("keydown", (event) => {
      if (event.key === "Enter" || event.key === " ") $("#files").click();
    });
    document.addEventListener("paste", (event) => {
      if (event.target.closest("input, textarea")) return;
      const files = [...(event.clipboardData ? event.clipboardData.files : [])];
      if (files.length) addImages(files);
    });
    $("#add-urls").addEventListener("click", () => {
      const urls = $("#urls").value.split(/\s+/).filter(Boolean);
      if (currentFields() === null) return;
      addImages(urls);
      $("#urls").value = "";
    });
    $("#download-all").addEventListener("click", downloadAll);
    $("#clear").addEventListener("click", clearAll);
    $("#key-form").addEventListener("submit", useKey);
  }

  $("#version").textContent = config.version;
  setUpOptions();
  setUpInputs();
  if (config.auth) showKeyForm(!key);
  summarise();
})();
