// The JSON API with the signed-in token. The token sits in session storage (gone with the tab) and
// goes out as a bearer header; the dashboard never relies on cookies.

const TOKEN_KEY = "tuneforge.token";

export class ApiError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

export const session = {
  get token() {
    return sessionStorage.getItem(TOKEN_KEY);
  },
  set token(value) {
    if (value) sessionStorage.setItem(TOKEN_KEY, value);
    else sessionStorage.removeItem(TOKEN_KEY);
  },
  user: null,
};

function headers(extra = {}, token = session.token) {
  return { Authorization: `Bearer ${token}`, ...extra };
}

function init({ method = "GET", body, token, signal }) {
  const request = { method, signal, headers: headers(body !== undefined ? { "Content-Type": "application/json" } : {}, token) };
  if (body !== undefined) request.body = JSON.stringify(body);
  return request;
}

async function failure(response) {
  let message = `${response.status} ${response.statusText}`;
  try {
    const body = await response.json();
    if (body && body.error) message = `${response.status}: ${body.error}`;
  } catch {
    // not JSON: keep the status line
  }
  return new ApiError(response.status, message);
}

export async function request(path, options = {}) {
  const response = await fetch(path, init(options));
  if (!response.ok) throw await failure(response);
  if (response.status === 204) return null;
  return response.json();
}

export const get = (path, options) => request(path, options);
export const post = (path, body, options = {}) => request(path, { ...options, method: "POST", body });

// Server-Sent Events over fetch (EventSource cannot send the Authorization header): calls onData
// with each `data:` payload parsed as JSON, until the stream ends or `signal` aborts it.
export async function streamEvents(path, { onData, ...options }) {
  const response = await fetch(path, init(options));
  if (!response.ok) throw await failure(response);
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += value;
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      const data = event
        .split("\n")
        .filter((line) => line.startsWith("data:"))
        .map((line) => line.slice(5).trim())
        .join("\n");
      if (data && data !== "[DONE]") onData(JSON.parse(data));
    }
  }
}

// Download with the header (a plain link could not carry it), then hand the bytes to the browser.
export async function download(path, fileName) {
  const response = await fetch(path, { headers: headers() });
  if (!response.ok) throw await failure(response);
  const url = URL.createObjectURL(await response.blob());
  const link = Object.assign(document.createElement("a"), { href: url, download: fileName });
  document.body.append(link);
  link.click();
  link.remove();
  setTimeout(() => URL.revokeObjectURL(url), 1000);
}
