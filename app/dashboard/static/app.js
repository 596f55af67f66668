// The dashboard shell: sign-in, hash routes (#/datasets, #/repos/NAME/TAG, ...), and page lifetimes.

import { ApiError, get, session } from "./api.js";
import { errorBox, h } from "./dom.js";
import { datasetList, datasetPage } from "./datasets.js";
import { deploymentList, deploymentPage } from "./deployments.js";
import { repoList, repoPage, versionPage } from "./repos.js";

const view = document.getElementById("view");
const nav = document.getElementById("nav");
// Aborted when the page changes, so streams and timers of the page left behind stop.
let pageScope = new AbortController();
let shownHash = null; // the route the view shows (or is loading)

const ROUTES = [
  [/^#\/datasets$/, datasetList],
  [/^#\/datasets\/(.+)$/, datasetPage],
  [/^#\/repos$/, repoList],
  [/^#\/repos\/([^/]+)$/, repoPage],
  [/^#\/repos\/([^/]+)\/(\d+)$/, versionPage],
  [/^#\/deployments$/, deploymentList],
  [/^#\/deployments\/([^/]+)$/, deploymentPage],
];

function signInForm(message) {
  nav.hidden = true;
  const input = h("input", { id: "token", type: "password", autocomplete: "off", required: true, placeholder: "API token" });
  const form = h(
    "form",
    { class: "card", id: "sign-in" },
    h("h1", {}, "Sign in"),
    h("p", { class: "muted" }, "Paste an API token (tuneforge token create). It stays in this tab only."),
    message ? errorBox(message) : null,
    h("label", {}, "Token ", input),
    h("button", { type: "submit" }, "Sign in"),
  );
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    await signIn(input.value.trim());
  });
  view.replaceChildren(form);
  input.focus();
}

async function signIn(token) {
  try {
    session.user = await get("/users/current", { token });
  } catch (error) {
    const message = error instanceof ApiError && error.status === 401 ? `That token was refused (${error.message})` : error;
    signInForm(message instanceof Error ? message : new Error(message));
    return;
  }
  session.token = token;
  if (!location.hash || location.hash === "#/") location.hash = "#/datasets";
  else route();
}

function signOut(message) {
  session.token = null;
  session.user = null;
  shownHash = null;
  pageScope.abort();
  signInForm(message);
}

async function route() {
  if (!session.token) return signInForm();
  if (!session.user) return signIn(session.token);
  nav.hidden = false;
  document.getElementById("who").textContent = `${session.user.username} @ ${session.user.tenant.name}`;
  pageScope.abort();
  const scope = (pageScope = new AbortController());
  const hash = location.hash || "#/datasets";
  for (const [pattern, page] of ROUTES) {
    const match = hash.match(pattern);
    if (!match) continue;
    // A page drawn anew in place (a job that ended while watched) keeps showing until its new
    // content is ready; only a move to another page shows "Loading…".
    if (hash !== shownHash) view.replaceChildren(h("p", { class: "muted" }, "Loading…"));
    shownHash = hash;
    try {
      const args = match.slice(1).map(decodeURIComponent);
      const content = await page(args, scope.signal);
      if (!scope.signal.aborted) view.replaceChildren(content);
    } catch (error) {
      if (error.name === "AbortError") return;
      if (error instanceof ApiError && error.status === 401) return signOut(new Error(`Signed out: ${error.message}`));
      view.replaceChildren(errorBox(error));
    }
    return;
  }
  view.replaceChildren(errorBox(new Error(`no page at ${hash}`)));
}

document.getElementById("sign-out").addEventListener("click", () => signOut());
window.addEventListener("hashchange", route);
route();
