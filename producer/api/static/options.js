// The options form of bgq's web page: which fields apply, and the API fields it stands for.
// Patterns and the words of a refusal are the API's own, from the page's config.
const $ = (selector, root = document) => root.querySelector(selector);
const form = $("#options");
const field = (id) => $(`#${id}`, form);
const DEFAULTS = { position: "center" }; // a field at its default is not sent

export function setUpOptions(config) {
  for (const name of config.models) {
    field("model").append(new Option(name, name, false, name === config.model));
  }
  $("#no-models").hidden = config.models.length > 0; // only models some live worker serves
  field("quality").placeholder = String(config.quality);
  [field("quality").min, field("quality").max] = config.quality_range.map(String);
  form.addEventListener("input", syncOptions);
  form.addEventListener("change", syncOptions);
  syncOptions();
}

/** Enable only what applies, so the form never sends a combination the API always refuses:
 *  quality to webp, jpeg and zip, margin to crop, padding to a canvas, scale to no canvas,
 *  position to a canvas or a scale, a background colour and mask only to anything but zip. */
function syncOptions() {
  const zip = field("format").value === "zip";
  field("quality").disabled = field("format").value === "png";
  field("crop_margin").disabled = !field("crop").checked;
  const canvas = field("canvas").value.trim() !== "";
  field("padding").disabled = !canvas;
  field("scale").disabled = canvas;
  field("position").disabled = !canvas && field("scale").value.trim() === "";
  field("use-bgcolor").disabled = zip;
  field("bgcolor").disabled = zip || !field("use-bgcolor").checked;
  field("only_mask").disabled = zip;
  $("#options-error").textContent = "";
  for (const input of form.querySelectorAll("[aria-invalid]")) input.removeAttribute("aria-invalid");
}

/** A field as its label names it, with the API's name where the label's differs:
 *  "Crop margin (crop_margin)", so the API's words on a card point to the field too. */
function fieldName(id) {
  const label = field(id).closest("label").firstChild.textContent.trim();
  const same = label.toLowerCase() === id || label.includes(`(${id})`);
  return same ? label : `${label} (${id})`;
}

/** The form fields of the current options (only those that differ from the defaults), or
 *  null with the fault shown, in the API's words, when a value cannot be right. A value that
 *  passes here may still be refused by the API (a roi's x2 before its x1): its card says so. */
export function currentFields(config) {
  const fields = [["model", field("model").value]];
  const text = (id) => (field(id).disabled ? "" : field(id).value.trim());
  const check = (id, pattern, within = () => true) => {
    const value = text(id);
    const bad = !field(id).disabled && field(id).validity.badInput; // a number field's nonsense
    if (!bad && (value === "" || value === DEFAULTS[id])) return true;
    if (!bad && new RegExp(pattern).test(value) && within(value)) {
      fields.push([id, id === "quality" ? String(Number(value)) : value]);
      return true;
    }
    field(id).setAttribute("aria-invalid", "true");
    $("#options-error").textContent = `${fieldName(id)}: ${config.must[id]}`;
    field(id).focus();
    return false;
  };
  const format = field("format").value;
  if (format !== "png") fields.push(["format", format]);
  if (field("crop").checked) fields.push(["crop", "true"]);
  const { length, margin, canvas, roi, scale, position, number } = config.patterns;
  const megapixels = (value) => Number(value) > 0 && Number(value) <= config.fit_max_megapixels;
  const [lowest, highest] = config.quality_range;
  const quality = (value) =>
    Number.isInteger(Number(value)) && Number(value) >= lowest && Number(value) <= highest;
  const checks = [
    ["quality", number, quality],
    ["roi", roi],
    ["crop_margin", margin],
    ["canvas", canvas],
    ["padding", length],
    ["scale", scale],
    ["position", position],
    ["fit_megapixels", number, megapixels],
  ];
  if (!checks.every(([id, pattern, within]) => check(id, pattern, within))) return null;
  if (!field("bgcolor").disabled) {
    const hex = field("bgcolor").value; // #rrggbb
    const rgb = [1, 3, 5].map((i) => parseInt(hex.slice(i, i + 2), 16));
    fields.push(["bgcolor", `${rgb.join(",")},255`]);
  }
  for (const flag of ["alpha_matting", "post_process_mask", "only_mask"]) {
    if (field(flag).checked && !field(flag).disabled) fields.push([flag, "true"]);
  }
  return fields;
}
