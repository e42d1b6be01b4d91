// Results as files: a card's preview, a download's name, saving a blob, the zip of "Download all".
const ZIP = "application/zip"; // format=zip: colour JPEG + alpha PNG, which no <img> shows
const EXTENSIONS = {
  "image/png": ".png",
  "image/webp": ".webp",
  "image/jpeg": ".jpg",
  [ZIP]: ".zip",
};

/** A safe file name for a result: the input's name, its extension the result's format. */
export function resultName(item) {
  const stem = item.name
    .replace(/[\u0000-\u001f\u007f/\\:*?"<>|]+/g, "_")
    .replace(/^[.\s]+/, "")
    .replace(/\.[A-Za-z0-9]{1,5}$/, "");
  const type = item.blob ? item.blob.type : "";
  return (stem.slice(0, 120) || "image") + (EXTENSIONS[type] || ".png");
}

/** Show a fetched result on its card: an image as its preview, a zip as words. */
export function showResult(item) {
  const zip = item.blob.type === ZIP;
  const img = item.el.querySelector(".result img");
  img.hidden = zip;
  item.el.querySelector(".result .packed").hidden = !zip;
  if (zip) img.removeAttribute("src");
  else img.src = item.resultUrl;
}

export function save(blob, name) {
  const link = document.createElement("a");
  link.href = URL.createObjectURL(blob);
  link.download = name;
  document.body.append(link);
  link.click();
  link.remove();
  setTimeout(() => URL.revokeObjectURL(link.href), 60000);
}

/** A zip of the items' results, built a file at a time with the vendored fflate (stored:
 *  the images are compressed already); names made unique, ignoring case. */
export async function zipResults(items) {
  const chunks = [];
  const zip = new fflate.Zip((error, chunk) => {
    if (error) throw error;
    chunks.push(chunk);
  });
  const taken = new Set();
  for (const item of items) {
    let name = resultName(item);
    for (let n = 2; taken.has(name.toLowerCase()); n++) {
      name = resultName(item).replace(/(\.\w+)$/, `-${n}$1`);
    }
    taken.add(name.toLowerCase());
    const entry = new fflate.ZipPassThrough(name);
    zip.add(entry);
    entry.push(new Uint8Array(await item.blob.arrayBuffer()), true);
  }
  zip.end(); // fflate emits every chunk before end() returns
  return new Blob(chunks, { type: "application/zip" });
}
