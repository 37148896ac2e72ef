// Small helpers shared by the two panels: element lookup, status lines and error wording.

export const $ = (id) => document.getElementById(id);

// ---- an API key, for a service run with API_KEYS (docs/security.md); kept for this tab only
const KEY = "api-key";

export const apiKey = () => sessionStorage.getItem(KEY) || "";

/** Headers for an API call: the key as a bearer token, when there is one. */
export const authHeaders = () => (apiKey() ? { authorization: `Bearer ${apiKey()}` } : {});

/** The server wants a key: show the key form (saving it fires "api-key" on window). */
export function askForKey() {
  $("key-form").hidden = false;
}

// Module scripts run once the document is parsed, so the form is there.
$("key-form").addEventListener("submit", (event) => {
  event.preventDefault();
  sessionStorage.setItem(KEY, $("key-input").value.trim());
  $("key-input").value = "";
  $("key-form").hidden = true;
  window.dispatchEvent(new Event("api-key"));
});

/** Show `text` in a status line; `kind` ("ok", "busy", "error") picks its colour. */
export function setStatus(el, text, kind = "ok") {
  el.textContent = text;
  el.dataset.kind = kind;
}

/** Words for a failed HTTP answer whose JSON body is {"error": code, "detail": text}. */
export function describeHttpError(status, body) {
  const code = body && body.error;
  const detail = body && typeof body.detail === "string" ? body.detail : "";
  const what = {
    401: "The server wants an API key",
    413: "Too large for the server",
    415: "The server cannot read that file",
    422: "The server refused the input",
    429: "Too many requests; slow down",
    503: "The model is not ready yet (loading or stopping); try again in a moment",
    504: "The model took too long to answer",
  }[status] || `The server answered HTTP ${status}`;
  if (code && detail) return `${what}: ${detail} (${code}).`;
  return `${what}.`;
}

/** Words for a fetch() that never got an answer. */
export function describeNetworkError() {
  return navigator.onLine === false
    ? "This device is offline."
    : "Cannot reach the server (stopped, restarting or unreachable). Try again once it is back.";
}

const CLOSE_WORDS = {
  1000: "closed normally",
  1001: "the server is going away",
  1006: "the connection dropped (server stopped or unreachable)",
  1008: "the server refused the session",
  1009: "a message was too large",
  1011: "the server hit an internal error",
  1012: "the server is restarting",
  1013: "the server is busy or not ready; trying again later",
};

/** Words for a WebSocket close (code and the server's "<code>: <detail>" reason). */
export function describeClose(code, reason) {
  const words = CLOSE_WORDS[code] || `closed with code ${code}`;
  return reason ? `${words}: ${reason} (${code})` : `${words} (${code})`;
}

/** Exponential backoff with jitter: 0.25 s, 0.5 s, 1 s, … up to `max` ms. */
export class Backoff {
  constructor(first = 250, max = 5000) {
    this.first = first;
    this.max = max;
    this.attempt = 0;
  }

  next() {
    const base = Math.min(this.max, this.first * 2 ** this.attempt);
    this.attempt += 1;
    return Math.round(base * (0.75 + Math.random() * 0.5));
  }

  reset() {
    this.attempt = 0;
  }
}

/** Read a response body as JSON, or null when it is not JSON. */
export async function jsonOrNull(response) {
  try {
    return await response.json();
  } catch {
    return null;
  }
}
