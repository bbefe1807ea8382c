// An image's page: the heat map is fetched while it answers 202 (being computed; waits
// Retry-After), then shown over the film; a slider sets its opacity. An image not yet finished
// reloads the page once it is.
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
  const MAX_WAIT_S = 10;

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

  async function loadHeatmap() {
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
      if (resp.status === 202) {
        statusEl.textContent = "The heat map is being computed…";
        await CXR.sleep(retryAfter(resp) * 1000);
        continue;
      }
      const body = CXR.parseJSON(await resp.text());
      const error = new CXR.ApiError(resp.status, body);
      if (CXR.signInAgainIf(error)) {
        return;
      }
      if (resp.status === 404 && error.code === "not_found") {
        statusEl.textContent = "Heat maps are not available on this server.";
      } else {
        statusEl.textContent = "No heat map. " + error.message;
      }
      opacity.disabled = true;
      return;
    }
  }

  async function waitUntilFinished() {
    for (;;) {
      await CXR.sleep(2000);
      try {
        const image = await CXR.getJSON(root.dataset.imageUrl);
        if (["completed", "failed", "skipped"].includes(image.status)) {
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
