// A job's page: polls GET /v1/jobs/{id} while the job runs (progress and counts), loads every
// image into a table that sorts (buttons in the column headings) and filters in the browser.
"use strict";

(function () {
  const root = document.getElementById("job");
  if (!root) {
    return;
  }
  const jobUrl = root.dataset.jobUrl;
  const terminal = new Set(root.dataset.terminal.split(" "));
  const perPage = Math.min(500, Number(root.dataset.maxPerPage) || 100);
  const POLL_MS = 1500;
  // while it runs, the whole table is reloaded at most this often, and less often for a big job
  // (2 s per page of images), so that readers do not load the server with their polls
  const TABLE_REFRESH_MS = 5000;
  const MS_PER_PAGE = 2000;

  const statusEl = document.getElementById("job-status");
  const progressEl = document.getElementById("job-progress");
  const countsEl = document.getElementById("job-counts");
  const table = document.getElementById("results");
  const tbody = table.querySelector("tbody");
  const summaryEl = document.getElementById("results-summary");
  const errorEl = document.getElementById("results-error");
  const filters = {
    text: document.getElementById("filter-text"),
    min: document.getElementById("filter-min"),
    label: document.getElementById("filter-label"),
    status: document.getElementById("filter-status"),
  };

  let images = [];
  let sortKey = "label"; // flagged first, then by probability, highest first
  let ascending = true;
  let lastTableLoad = 0;
  let tablePages = 1;
  let lastFinished = -1;

  const LABEL_RANK = { covid: 0, "non-covid": 1 };
  const STATUS_RANK = { completed: 0, skipped: 1, failed: 2, running: 3, queued: 4 };

  function reason(image) {
    return image.error ? image.error.code + ": " + image.error.message : "";
  }

  function byProbability(a, b) {
    const pa = a.probability === null ? -1 : a.probability;
    const pb = b.probability === null ? -1 : b.probability;
    return pa - pb;
  }

  const COMPARE = {
    filename: function (a, b) {
      return a.filename.localeCompare(b.filename, undefined, { numeric: true });
    },
    status: function (a, b) {
      return (STATUS_RANK[a.status] ?? 9) - (STATUS_RANK[b.status] ?? 9) || byProbability(b, a);
    },
    probability: byProbability,
    label: function (a, b) {
      return (LABEL_RANK[a.label] ?? 2) - (LABEL_RANK[b.label] ?? 2) || byProbability(b, a);
    },
    reason: function (a, b) {
      return reason(a).localeCompare(reason(b));
    },
  };

  function visible(image) {
    const text = filters.text.value.trim().toLowerCase();
    const min = filters.min.value === "" ? null : Number(filters.min.value);
    const label = filters.label.value;
    const status = filters.status.value;
    if (text && !image.filename.toLowerCase().includes(text)) {
      return false;
    }
    if (min !== null && !(image.probability !== null && image.probability >= min)) {
      return false;
    }
    if (label === "none" ? image.label !== null : label && image.label !== label) {
      return false;
    }
    return !status || image.status === status;
  }

  function cell(row, text, className) {
    const td = document.createElement("td");
    td.textContent = text;
    if (className) {
      td.className = className;
    }
    row.appendChild(td);
    return td;
  }

  function renderRow(image) {
    const row = document.createElement("tr");
    if (image.label === "covid") {
      row.className = "flagged";
    }
    const name = document.createElement("td");
    const link = document.createElement("a");
    link.href = root.dataset.imagePage.replace("IMAGE_ID", encodeURIComponent(image.id));
    link.textContent = image.filename;
    name.appendChild(link);
    row.appendChild(name);
    cell(row, image.status, "status status-" + image.status);
    cell(row, image.probability === null ? "—" : image.probability.toFixed(3), "num");
    cell(row, CXR.labelText(image.label), image.label === "covid" ? "label-covid" : "");
    cell(row, reason(image));
    return row;
  }

  function render() {
    const compare = COMPARE[sortKey];
    const rows = images.filter(visible).sort(function (a, b) {
      return ascending ? compare(a, b) : compare(b, a);
    });
    const fragment = document.createDocumentFragment();
    rows.forEach(function (image) {
      fragment.appendChild(renderRow(image));
    });
    tbody.replaceChildren(fragment);
    table.querySelectorAll("th[data-sort]").forEach(function (th) {
      if (th.dataset.sort === sortKey) {
        th.setAttribute("aria-sort", ascending ? "ascending" : "descending");
      } else {
        th.removeAttribute("aria-sort");
      }
    });
    summaryEl.textContent = "Showing " + rows.length + " of " + images.length + " images.";
  }

  table.querySelectorAll("th[data-sort] button").forEach(function (button) {
    button.addEventListener("click", function () {
      const key = button.parentElement.dataset.sort;
      ascending = key === sortKey ? !ascending : key !== "probability"; // probability: highest first
      sortKey = key;
      render();
    });
  });
  Object.values(filters).forEach(function (input) {
    input.addEventListener("input", render);
    input.addEventListener("change", render);
  });

  async function loadTable() {
    lastTableLoad = Date.now();
    const all = [];
    for (let page = 1; ; page += 1) {
      const body = await CXR.getJSON(jobUrl + "?per_page=" + perPage + "&page=" + page);
      all.push.apply(all, body.images);
      if (page >= body.pagination.pages) {
        tablePages = Math.max(1, body.pagination.pages);
        break;
      }
    }
    images = all;
    render();
  }

  function showSummary(job) {
    statusEl.textContent = job.status.replace(/_/g, " ");
    statusEl.className = "status status-" + job.status;
    progressEl.value = job.progress;
    progressEl.textContent = Math.round(job.progress * 100) + "%";
    countsEl.textContent = CXR.countsText(job);
    root.dataset.status = job.status;
  }

  function finishedCount(job) {
    return job.counts.completed + job.counts.failed + job.counts.skipped;
  }

  async function poll() {
    for (;;) {
      const job = await CXR.getJSON(jobUrl + "?per_page=0"); // the summary alone
      showSummary(job);
      const done = terminal.has(job.status);
      const changed = finishedCount(job) !== lastFinished;
      const gap = Math.max(TABLE_REFRESH_MS, tablePages * MS_PER_PAGE);
      if (done || (changed && Date.now() - lastTableLoad >= gap)) {
        lastFinished = finishedCount(job);
        await loadTable();
      }
      if (done) {
        return;
      }
      await CXR.sleep(POLL_MS);
    }
  }

  async function start() {
    try {
      await loadTable();
      if (!terminal.has(root.dataset.status)) {
        await poll();
      }
      root.dataset.settled = "true"; // the job is over and the table holds its last answer
      CXR.showError(errorEl, "");
    } catch (error) {
      if (!CXR.signInAgainIf(error)) {
        CXR.showError(errorEl, "The results could not be loaded. " + error.message);
        window.setTimeout(start, 5000); // a server restarting: try again
      }
    }
  }

  start();
})();
