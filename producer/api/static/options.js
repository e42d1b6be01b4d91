// The options form of bgq's web page: which fields apply, and the API fields it stands for.
const $ = (selector, root = document) => root.querySelector(selector);
const form = $("#options");
const field = (id) => $(`#${id}`, form);

export function setUpOptions(config) {
  for (const name of config.models) {
    field("model").append(new Option(name, name, false, name === config.model));
  }
  $("#no-models").hidden = config.models.length > 0; // only models some live worker serves
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
export function currentFields(config) {
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
  if (!check("quality", "^(100|[1-9][0-9]?)$", "a whole number from 1 to 100")) return null;
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
