// How bgq's web page talks to the API: requests with the key, and its answers in words.
export const STATUS_WORDS = {
  401: "API key needed or not accepted",
  404: "Not found",
  409: "Not available",
  413: "Too large",
  415: "Unsupported file",
  422: "Refused",
  429: "Rate limit",
  503: "bgq is unavailable right now, try again in a moment",
};

export class Gone extends Error {} // the item was cleared away while its request ran
export class Unreachable extends Error {} // no answer (network, timeout): worth trying again

/** fetch() for `item` with `key` (its bearer token, "" for none) and an optional time
 *  limit; throws Unreachable when no answer came, Gone when the item was cleared away.
 *  The response remembers the key it was sent with (`sentKey`). */
export async function call(item, key, path, init = {}, timeout = 0) {
  const sentKey = key;
  const auth = sentKey ? { Authorization: `Bearer ${sentKey}` } : {};
  const signals = [item.abort.signal, ...(timeout ? [AbortSignal.timeout(timeout)] : [])];
  let response;
  try {
    response = await fetch(path, { ...init, headers: auth, signal: AbortSignal.any(signals) });
  } catch (error) {
    if (item.removed) throw new Gone();
    throw new Unreachable(`Cannot reach bgq: ${error.message}`);
  }
  if (item.removed) throw new Gone();
  response.sentKey = sentKey;
  return response;
}

/** An answer that may well be different soon: the API or a proxy in front of it is
 *  unavailable (restarting, overloaded, its Redis down). */
export const temporary = (response) => [500, 502, 503, 504].includes(response.status);

/** Seconds the answer asks to wait before trying again (its Retry-After), else `fallback`. */
export const retryAfter = (response, fallback) =>
  Number(response.headers.get("Retry-After")) || fallback;

/** The API's JSON error, in words: "Too large: request body over ...". */
export async function describe(response) {
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
