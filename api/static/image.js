// An image's page: the heat map is fetched while it answers 202 (being computed; waits
// Retry-After, for a few minutes at most), then shown over the film; a slider sets its opacity.
// Any other answer (a 409: not scored, or its rendering failed) is shown in words and ends the
// polling. An image not yet finished reloads the page once it reaches a terminal status (read
// from the page, as job.js does).
"use strict";

(function () {
  const root = document.getElementById("image");
  if (!root) {
    return;
  }
  const heatmap = document.getElementById("heatmap");
  const statusEl = document.getElementById("heatmap-status");
  const opacity = document.getElementById("heatmap-opacity");
  const film = document.getElementById("film");
  const terminal = new Set(root.dataset.terminalStatuses.split(" "));
  const MAX_WAIT_S = 10;
  // a rendering takes well under a second: past this, something is wrong; the reader may reload
  const GIVE_UP_MS = 3 * 60 * 1000;

  film.addEventListener("error", function () {
    film.hidden = true;
    film.parentElement.querySelector("figcaption").textContent = "The film cannot be shown.";
  });

  opacity.addEventListener("input", function () {
    heatmap.style.opacity = opacity.value; // CSSOM, which the Content-Security-Policy allows
  });

  function retryAfter(resp) {
    const seconds = Number(resp.headers.get("Retry-After"));
    return Math.min(MAX_WAIT_S, seconds > 0 ? seconds : 1);
  }

  function stop(text) {
    statusEl.textContent = text;
    opacity.disabled = true;
  }

  async function loadHeatmap() {
    const started = Date.now();
    for (;;) {
      let resp;
      try {
        resp = await fetch(root.dataset.heatmapUrl, { credentials: "same-origin" });
      } catch (e) {
        statusEl.textContent = "The heat map could not be loaded: the server is unreachable.";
        return;
      }
      if (resp.status === 200) {
        heatmap.src = URL.createObjectURL(await resp.blob());
        heatmap.hidden = false;
        statusEl.textContent = "Heat map: the regions that weighed most in the score.";
        return;
      }
      if (resp.status === 202 || resp.status === 503) {
        // 503: a part of the service is away for a moment; it says when to ask again
        if (Date.now() - started > GIVE_UP_MS) {
          stop("The heat map is taking too long. Reload the page to ask again.");
          return;
        }
        statusEl.textContent =
          resp.status === 202
            ? "The heat map is being computed…"
            : "The server is busy; asking again in a moment…";
        await CXR.sleep(retryAfter(resp) * 1000);
        continue;
      }
      const body = CXR.parseJSON(await resp.text());
      const error = new CXR.ApiError(resp.status, body);
      if (CXR.signInAgainIf(error)) {
        return;
      }
      if (resp.status === 404 && error.code === "not_found") {
        stop("Heat maps are not available on this server.");
      } else {
        stop("No heat map. " + error.message); // in words for the codes ui.js knows
      }
      return;
    }
  }

  async function waitUntilFinished() {
    for (;;) {
      await CXR.sleep(2000);
      try {
        const image = await CXR.getJSON(root.dataset.imageUrl);
        if (terminal.has(image.status)) {
          window.location.reload();
          return;
        }
      } catch (error) {
        if (CXR.signInAgainIf(error)) {
          return;
        }
      }
    }
  }

  if (root.dataset.scored === "true") {
    loadHeatmap();
  } else if (root.dataset.terminal !== "true") {
    statusEl.textContent = "The film is still being screened…";
    waitUntilFinished();
  }
})();
