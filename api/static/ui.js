// cxr-screen web UI: what every page shares. Calls the /v1 API with the session cookie; unsafe
// methods add the page's CSRF token. Text goes into the page with textContent, never as HTML.
"use strict";

window.CXR = (function () {
  const LABELS = { covid: "Flagged", "non-covid": "Not flagged" };

  // the words shown for the API's error codes that a reader can act on; any other code shows
  // the server's own message
  const ADVICE = {
    missing_api_key: "You are signed out.",
    session_expired: "Your session has ended: please sign in again.",
    csrf_failed: "This page is out of date: reload it and try again.",
    no_files: "Choose at least one film, folder or zip.",
    too_many_files: "Too many films for one job: split them into several uploads.",
    file_too_large: "A file is too large.",
    request_too_large: "The upload is too large in all: split it into several uploads.",
    invalid_zip: "A zip archive cannot be read.",
    unsafe_zip_entry: "A zip archive holds an unsafe entry and was refused.",
    encrypted_zip_entry: "A zip archive is password-protected: unzip it first.",
    nested_zip: "A zip archive holds another zip: unzip the inner one first.",
    zip_bomb: "A zip archive expands far too much and was refused.",
    model_unavailable: "The server cannot screen films right now (its model is not loaded).",
    database_unavailable: "The server's database is unavailable: try again in a moment.",
    storage_unavailable: "The server's image store is unavailable: try again in a moment.",
    session_store_unavailable: "Sign-in is unavailable for a moment: try again shortly.",
    image_not_scored: "The film has no score from the model served now, so no heat map.",
    heatmap_unavailable:
      "The heat map could not be drawn (the stored film may be unreadable): try again later.",
  };

  function csrfToken() {
    const meta = document.querySelector('meta[name="csrf-token"]');
    return meta ? meta.content : "";
  }

  // "words (code): server's message" from an API error answer
  function describe(status, body) {
    const error = body && body.error;
    if (error && error.code) {
      const advice = ADVICE[error.code];
      const detail = error.message ? error.message : "";
      return (advice ? advice + " " : "") + "The server said: " + detail + " (" + error.code + ")";
    }
    if (status === 0) {
      return "The server could not be reached. Check the connection and try again.";
    }
    return "The server answered with HTTP status " + status + ".";
  }

  function parseJSON(text) {
    try {
      return JSON.parse(text);
    } catch (e) {
      return null;
    }
  }

  class ApiError extends Error {
    constructor(status, body) {
      super(describe(status, body));
      this.status = status;
      this.code = body && body.error ? body.error.code : null;
    }
  }

  async function getJSON(url) {
    let resp;
    try {
      resp = await fetch(url, { credentials: "same-origin", headers: { Accept: "application/json" } });
    } catch (e) {
      throw new ApiError(0, null);
    }
    const body = parseJSON(await resp.text());
    if (!resp.ok) {
      throw new ApiError(resp.status, body);
    }
    return body;
  }

  // a 401 means the session is gone: back to the sign-in page, then here again
  function signInAgainIf(error) {
    if (error && error.status === 401) {
      const next = window.location.pathname + window.location.search;
      window.location.assign(document.body.dataset.signinUrl + "?next=" + encodeURIComponent(next));
      return true;
    }
    return false;
  }

  function showError(element, message) {
    element.textContent = message;
    element.hidden = !message;
  }

  function formatBytes(n) {
    const units = ["bytes", "KiB", "MiB", "GiB"];
    let i = 0;
    while (n >= 1024 && i < units.length - 1) {
      n /= 1024;
      i += 1;
    }
    return (i === 0 ? n : n.toFixed(1)) + " " + units[i];
  }

  function sleep(ms) {
    return new Promise(function (resolve) {
      window.setTimeout(resolve, ms);
    });
  }

  function labelText(label) {
    return LABELS[label] || "—";
  }

  function countsText(summary) {
    const parts = Object.keys(summary.counts).map(function (status) {
      return summary.counts[status] + " " + status;
    });
    return summary.image_count + " images: " + parts.join(", ");
  }

  return {
    ApiError: ApiError,
    csrfToken: csrfToken,
    describe: describe,
    parseJSON: parseJSON,
    getJSON: getJSON,
    signInAgainIf: signInAgainIf,
    showError: showError,
    formatBytes: formatBytes,
    sleep: sleep,
    labelText: labelText,
    countsText: countsText,
  };
})();
