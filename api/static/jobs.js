// The jobs list: rows of jobs still running are refreshed from GET /v1/jobs/{id} every 2 s.
"use strict";

(function () {
  const table = document.getElementById("jobs-table");
  if (!table) {
    return;
  }
  const terminal = new Set(table.dataset.terminal.split(" "));

  function running() {
    return Array.from(table.querySelectorAll("tbody tr")).filter(function (row) {
      return !terminal.has(row.dataset.status);
    });
  }

  function show(row, job) {
    row.dataset.status = job.status;
    const status = row.querySelector('[data-field="status"]');
    status.textContent = job.status.replace(/_/g, " ");
    status.className = "status status-" + job.status;
    const progress = row.querySelector('[data-field="progress"]');
    progress.value = job.progress;
    progress.textContent = Math.round(job.progress * 100) + "%";
    row.querySelector('[data-field="image_count"]').textContent = job.image_count;
    row.querySelector('[data-field="counts"]').textContent =
      job.counts.completed + " · " + job.counts.skipped + " · " + job.counts.failed;
  }

  async function refresh() {
    const rows = running();
    if (!rows.length) {
      return;
    }
    try {
      for (const row of rows) {
        show(row, await CXR.getJSON(row.dataset.jobUrl + "?per_page=1"));
      }
    } catch (error) {
      if (CXR.signInAgainIf(error)) {
        return;
      }
    }
    window.setTimeout(refresh, 2000);
  }

  window.setTimeout(refresh, 2000);
})();
