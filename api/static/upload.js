// The upload page: files, folders (picked or dropped, walked recursively) and zips go to
// POST /v1/jobs in one multipart request, with a progress bar; then on to the job's page.
"use strict";

(function () {
  const form = document.getElementById("upload-form");
  if (!form) {
    return;
  }
  const dropZone = document.getElementById("drop-zone");
  const fileInput = document.getElementById("file-input");
  const folderInput = document.getElementById("folder-input");
  const summary = document.getElementById("selection-summary");
  const clearButton = document.getElementById("clear-button");
  const uploadButton = document.getElementById("upload-button");
  const progress = document.getElementById("upload-progress");
  const statusText = document.getElementById("upload-status");
  const errorBox = document.getElementById("upload-error");
  const clientRef = document.getElementById("client-ref");
  const limits = {
    files: Number(form.dataset.maxFiles),
    fileBytes: Number(form.dataset.maxFileBytes),
    requestBytes: Number(form.dataset.maxRequestBytes),
  };

  // each chosen file with the name it is sent under (its path inside a chosen folder)
  let chosen = [];

  function isHidden(name) {
    return name.split("/").some(function (part) {
      return part.startsWith(".") || part === "__MACOSX";
    });
  }

  function add(file, name) {
    if (!isHidden(name)) {
      chosen.push({ file: file, name: name });
    }
  }

  function problem() {
    const total = chosen.reduce(function (sum, item) {
      return sum + item.file.size;
    }, 0);
    const tooBig = chosen.find(function (item) {
      return item.file.size > limits.fileBytes;
    });
    if (chosen.length > limits.files) {
      return "Too many files: " + chosen.length + " chosen, at most " + limits.files + " per job.";
    }
    if (tooBig) {
      return '"' + tooBig.name + '" is larger than ' + CXR.formatBytes(limits.fileBytes) + ".";
    }
    if (total > limits.requestBytes) {
      return "The files add up to more than " + CXR.formatBytes(limits.requestBytes) + ".";
    }
    return "";
  }

  function refresh() {
    const total = chosen.reduce(function (sum, item) {
      return sum + item.file.size;
    }, 0);
    summary.textContent = chosen.length
      ? chosen.length + (chosen.length === 1 ? " file" : " files") + " chosen (" + CXR.formatBytes(total) + ")."
      : "No files chosen.";
    const issue = problem();
    CXR.showError(errorBox, issue);
    uploadButton.disabled = chosen.length === 0 || Boolean(issue);
    clearButton.disabled = chosen.length === 0;
  }

  fileInput.addEventListener("change", function () {
    Array.from(fileInput.files).forEach(function (file) {
      add(file, file.name);
    });
    fileInput.value = "";
    refresh();
  });

  folderInput.addEventListener("change", function () {
    Array.from(folderInput.files).forEach(function (file) {
      add(file, file.webkitRelativePath || file.name);
    });
    folderInput.value = "";
    refresh();
  });

  clearButton.addEventListener("click", function () {
    chosen = [];
    progress.value = 0;
    statusText.textContent = "";
    refresh();
  });

  // dropped folders: walk the FileSystemEntry tree (readEntries answers in batches)
  function readBatch(reader) {
    return new Promise(function (resolve, reject) {
      reader.readEntries(resolve, reject);
    });
  }

  async function walk(entry) {
    if (entry.isFile) {
      const file = await new Promise(function (resolve, reject) {
        entry.file(resolve, reject);
      });
      add(file, entry.fullPath.replace(/^\//, ""));
      return;
    }
    const reader = entry.createReader();
    for (;;) {
      const batch = await readBatch(reader);
      if (!batch.length) {
        return;
      }
      for (const child of batch) {
        await walk(child);
      }
    }
  }

  ["dragenter", "dragover"].forEach(function (type) {
    dropZone.addEventListener(type, function (event) {
      event.preventDefault();
      dropZone.classList.add("dragging");
    });
  });
  ["dragleave", "drop"].forEach(function (type) {
    dropZone.addEventListener(type, function () {
      dropZone.classList.remove("dragging");
    });
  });

  dropZone.addEventListener("drop", async function (event) {
    event.preventDefault();
    const items = Array.from(event.dataTransfer.items || []);
    const entries = items
      .map(function (item) {
        return item.webkitGetAsEntry ? item.webkitGetAsEntry() : null;
      })
      .filter(Boolean);
    if (entries.length) {
      summary.textContent = "Reading the dropped folders…";
      try {
        for (const entry of entries) {
          await walk(entry);
        }
      } catch (e) {
        CXR.showError(errorBox, "A dropped folder could not be read.");
      }
    } else {
      Array.from(event.dataTransfer.files).forEach(function (file) {
        add(file, file.name);
      });
    }
    refresh();
  });

  function idempotencyKey() {
    if (window.crypto && window.crypto.randomUUID) {
      return window.crypto.randomUUID();
    }
    const bytes = new Uint8Array(16);
    window.crypto.getRandomValues(bytes);
    return Array.from(bytes, function (b) {
      return b.toString(16).padStart(2, "0");
    }).join("");
  }

  function finished(xhr) {
    const body = CXR.parseJSON(xhr.responseText);
    if ((xhr.status === 202 || xhr.status === 200) && body && body.id) {
      statusText.textContent = "Uploaded: " + body.image_count + " images. Opening the job…";
      window.location.assign(form.dataset.jobPage.replace("JOB_ID", encodeURIComponent(body.id)));
      return;
    }
    const error = new CXR.ApiError(xhr.status, body);
    if (!CXR.signInAgainIf(error)) {
      fail(error.message);
    }
  }

  function fail(message) {
    statusText.textContent = "The upload was refused.";
    CXR.showError(errorBox, message);
    uploadButton.disabled = false;
  }

  form.addEventListener("submit", function (event) {
    event.preventDefault();
    const issue = problem();
    if (issue || !chosen.length) {
      CXR.showError(errorBox, issue || "Choose at least one film, folder or zip.");
      return;
    }
    const data = new FormData();
    chosen.forEach(function (item) {
      data.append("files", item.file, item.name);
    });
    if (clientRef.value.trim()) {
      data.append("client_ref", clientRef.value.trim());
    }
    const xhr = new XMLHttpRequest();
    xhr.open("POST", form.dataset.postUrl);
    xhr.setRequestHeader("Accept", "application/json");
    xhr.setRequestHeader("X-CSRF-Token", CXR.csrfToken());
    // a retry of this very upload (same key) cannot create a second job
    xhr.setRequestHeader("Idempotency-Key", idempotencyKey());
    xhr.upload.onprogress = function (e) {
      if (e.lengthComputable) {
        progress.value = e.loaded / e.total;
        progress.textContent = Math.round((100 * e.loaded) / e.total) + "%";
        statusText.textContent = "Uploading: " + CXR.formatBytes(e.loaded) + " of " + CXR.formatBytes(e.total);
      }
    };
    xhr.upload.onload = function () {
      progress.value = 1;
      statusText.textContent = "Uploaded; the server is storing the films…";
    };
    xhr.onload = function () {
      finished(xhr);
    };
    xhr.onerror = function () {
      fail(CXR.describe(0, null));
    };
    uploadButton.disabled = true;
    CXR.showError(errorBox, "");
    statusText.textContent = "Starting the upload…";
    xhr.send(data);
  });

  refresh();
})();
