/* Malaria Detect page behaviour. Every form also works without this script (POST, then redirect). */
(function () {
  "use strict";
  var meta = document.querySelector('meta[name="csrf-token"]');
  var CSRF = meta ? meta.content : "";
  function $(id) { return document.getElementById(id); }

  function postJSON(url, body) {
    var headers = { "X-CSRF-Token": CSRF, "Accept": "application/json" };
    var opts = { method: "POST", headers: headers, credentials: "same-origin" };
    if (body instanceof FormData) { opts.body = body; }
    else if (body) { headers["Content-Type"] = "application/json"; opts.body = JSON.stringify(body); }
    return fetch(url, opts).then(function (r) {
      return r.json().catch(function () { return { error: "unexpected answer (" + r.status + ")" }; })
        .then(function (j) { return { status: r.status, body: j }; });
    });
  }

  /* as the pages' pct filter (device/web/__init__.py, pct_text): three decimals, two significant digits below 0.01% */
  function fmtPct(v) {
    if (v === null || v === undefined) { return "—"; }
    var places = (v > 0 && v < 0.01) ? Math.min(12, 1 - Math.floor(Math.log10(v))) : 3;
    return v.toFixed(places) + "%";
  }
  function callClass(c) { return c === "positive" ? "call-pos" : (c === "negative" ? "call-neg" : "call-wait"); }

  /* --- status: banners, pill, focus, auto-capture --- */
  var statusListeners = [];
  function applyStatus(s) {
    var cam = s.camera || {};
    var connected = cam.state === "connected";
    var banner = $("camera-banner");
    if (banner) {
      banner.hidden = connected;
      var title = $("camera-title");
      if (title) {
        title.textContent = cam.state === "faulty" ? "Camera sends unusable pictures." :
          cam.state === "stalled" ? "Camera stopped sending pictures." : "Camera not connected.";
      }
      var msg = $("camera-msg");
      if (msg && !connected) {
        var retry = cam.next_retry_in_s !== null && cam.next_retry_in_s !== undefined ? " Next try in " + Math.ceil(cam.next_retry_in_s) + " s." : "";
        msg.textContent = (cam.message || "Connecting…").replace(/[.?!]*$/, "") + "." + retry;
      }
    }
    var disk = $("disk-banner");
    if (disk && s.disk) {
      disk.hidden = !s.disk.low;
      disk.className = "banner " + (s.disk.full ? "banner-error" : "banner-warn");
      $("disk-msg").textContent = s.disk.message || "";
    }
    var records = $("records-banner");
    if (records && "records_damage" in s) {
      records.hidden = !s.records_damage;
      $("records-msg").textContent = s.records_damage || "";
    }
    var pill = $("status-pill");
    if (pill) {
      pill.className = "pill " + ((connected && s.model && s.model.ok) ? "pill-ok" : "pill-bad");
      $("pill-camera").textContent = "Camera " + (cam.state || "?");
      $("pill-model").textContent = "Model " + (s.model && s.model.ok ? "ready" : "UNUSABLE");
    }
    var meter = $("focus-meter"), label = $("focus-label");
    if (meter && label) {
      meter.value = cam.focus || 1;
      if (cam.sharp === null || cam.sharp === undefined) { label.textContent = "—"; label.className = "focus-label"; }
      else if (cam.sharp) { label.textContent = "Sharp (" + cam.focus.toFixed(1) + ")"; label.className = "focus-label sharp"; }
      else { label.textContent = "Blurry: refocus (" + cam.focus.toFixed(1) + ")"; label.className = "focus-label blurry"; }
    }
    statusListeners.forEach(function (fn) { fn(s); });
  }
  function pollStatus() {
    fetch("/api/status", { cache: "no-store", credentials: "same-origin" })
      .then(function (r) { return r.json(); })
      .then(applyStatus)
      .catch(function () {
        var pill = $("status-pill");
        if (pill) {
          pill.className = "pill pill-bad";
          $("pill-camera").textContent = "Device unreachable";
          $("pill-model").textContent = "state unknown";  // "Model ready" beside it read as all is well
        }
      })
      .then(function () { setTimeout(pollStatus, 1500); });
  }
  if ($("status-pill")) { pollStatus(); }

  /* --- live preview: one JPEG at a time, the next asked for when the last arrived --- */
  var preview = $("preview");
  if (preview) {
    var off = $("preview-off");
    var asked = Date.now();  // when the current picture was asked for
    var timer = null;
    var next = function (delay) {
      clearTimeout(timer);
      timer = setTimeout(function () { asked = Date.now(); preview.src = "/preview.jpg?t=" + asked; }, delay);
    };
    preview.addEventListener("load", function () { off.hidden = true; next(document.hidden ? 2000 : 300); });
    preview.addEventListener("error", function () { off.hidden = false; next(2000); });
    // The status poll also says when the camera is gone or back. A picture asked for more than 5 s
    // ago is abandoned and asked for again (a new src drops the old request, so one chain runs).
    statusListeners.push(function (st) {
      var connected = st.camera && st.camera.state === "connected";
      if (!connected) { off.hidden = false; }
      if (Date.now() - asked > 5000) { next(0); }
    });
  }

  /* --- capture and upload --- */
  var ws = $("workspace");
  if (ws && ws.dataset.status === "open") {
    var captureUrl = ws.dataset.captureUrl;
    var btn = $("capture-btn"), msgEl = $("capture-msg");
    var busy = false;

    var say = function (text, kind) { msgEl.textContent = text || ""; msgEl.className = "msg" + (kind ? " msg-" + kind : ""); };

    var renderSlide = function (sl) {
      var a = sl.automatic;
      $("rbc-count").textContent = a.rbc_count;
      $("rbc-progress").value = Math.min(a.rbc_count, a.target_rbc);
      var reached = $("target-reached");
      if (reached) {  // also back below the target (fields excluded in another window), and up again
        var isReached = a.rbc_count >= a.target_rbc;
        if (isReached && reached.hidden) {
          var autoBox = $("auto-capture");  // the stage moving on would count on past the target unasked
          if (autoBox && autoBox.checked) { autoBox.checked = false; }
        }
        reached.hidden = !isReached;
      }
      $("infected-count").textContent = a.infected_count;

      $("fields-used").textContent = a.fields_used;
      $("fields-rejected").textContent = a.fields_rejected;
      var cur = sl.headline === "reviewed" ? sl.reviewed : a;  // as the result page leads
      // a density only for a positive call: otherwise the flagged share is the classifier's false positives
      // after review while flagged cells wait: only the confirmed cells' share is known, a lower bound
      var open = sl.headline === "reviewed" && sl.review_open;
      $("parasitemia").textContent = cur.call !== "positive" ? "—" :
        open ? "\u2265 " + fmtPct(sl.review_open.confirmed_pct) : fmtPct(cur.parasitemia_pct);
      // beside the automatic flagged count, a parasitemia after review must say so (12 flagged, 0.050%)
      $("parasitemia-label").textContent = "Parasitemia" + (sl.headline === "reviewed" ? " (after review)" : "");
      var discardForm = $("discard-form");
      // only a slide that counts nothing can be discarded
      if (discardForm && (sl.totals.fields_used > 0 || sl.totals.fields_excluded > 0)) { discardForm.remove(); }
      if (sl.status !== "open") { window.location.reload(); return; }  // finished in another window
      var call = $("call-now");
      call.textContent = cur.call + (sl.headline === "reviewed" ? " (after review)" : "");
      call.className = "call-chip " + callClass(cur.call);
      $("flagged-n").textContent = sl.totals.review.pending;
      if ($("near-n")) { $("near-n").textContent = sl.totals.near.pending; }
    };

    /* the answer beside the button says what the field held, as without the script: on a phone the
       last field's card is off screen */
    var fieldSummary = function (f) {
      return f.rejected ? "Field " + f.seq + " rejected: " + f.rejected :
        "Field " + f.seq + ": " + f.rbc_count + " red cells, " + f.infected_count + " flagged infected.";
    };

    var renderField = function (f) {
      $("last-field").hidden = false;
      $("last-title").textContent = "#" + f.seq;
      $("last-img").src = f.annotated_url;
      $("last-link").href = f.annotated_url;
      var s = $("last-summary");
      if (f.rejected) { s.textContent = "Rejected: " + f.rejected; s.className = "msg msg-error"; }
      else { s.textContent = f.rbc_count + " red cells, " + f.infected_count + " flagged infected"; s.className = "msg msg-ok"; }
      var ov = $("last-overlap");
      ov.textContent = "";
      if (f.overlap) {  // the stage moved too little (or back): the shared cells count twice
        ov.appendChild(document.createTextNode("This view overlaps field " + f.overlap.seq + " by about " +
          Math.round(f.overlap.fraction * 100) + "%: those cells count twice. Move the stage a whole field between captures; "));
        var exl = document.createElement("a");
        exl.href = f.exclude_url + "?reason=" + encodeURIComponent("same area counted twice");
        exl.textContent = "exclude field " + f.seq;
        ov.appendChild(exl);
        ov.appendChild(document.createTextNode(" if it is the same area."));
      }
      renderRow(f);
    };

    /* a row of the fields table, as the server renders it; rowState says when another window changed it */
    var rowState = function (f) { return f.rejected ? "rejected" : (f.excluded ? "excluded" : "used"); };
    var renderRow = function (f) {
      var none = $("no-fields");
      if (none) { none.remove(); }
      var tr = document.createElement("tr");
      tr.id = "field-" + f.id;
      tr.dataset.state = rowState(f);
      if (f.rejected || f.excluded) { tr.className = "row-rejected"; }
      var first = document.createElement("span");  // as the server renders a field whose picture is not on the device
      first.className = "muted";
      first.title = "Its picture is not on the device (deleted to free space, or not in a restored copy of the records); its counts and cells are kept";
      first.textContent = f.seq + " (no picture)";
      if (f.annotated_url) {
        first = document.createElement("a");
        first.href = f.annotated_url; first.target = "_blank"; first.textContent = f.seq;
      }
      var state = f.rejected ? "Rejected: " + f.rejected : (f.excluded ? "Excluded: " + f.excluded + " (reload to count it again)" : "Used");
      var cells = [first, f.captured_at_local,  /* in the device's time zone, as the server renders the rows */
        f.source, f.rbc_count, f.infected_count, f.focus.toFixed(1), state];
      cells.forEach(function (c) {
        var td = document.createElement("td");
        if (c instanceof Node) { td.appendChild(c); } else { td.textContent = c; }
        tr.appendChild(td);
      });
      if (!f.rejected && !f.excluded) {  // as the server renders it: a used field may be taken out of the count
        var ex = document.createElement("a");
        ex.href = f.exclude_url; ex.className = "exclude-link"; ex.textContent = "Exclude…";
        tr.lastChild.appendChild(document.createTextNode(" · "));
        tr.lastChild.appendChild(ex);
      }
      tr.dataset.seq = f.seq;
      var tbody = $("fields-table").querySelector("tbody");  // in capture order, also for another window's fields
      var after = Array.prototype.find.call(tbody.rows, function (row) { return +row.dataset.seq > f.seq; });
      tbody.insertBefore(tr, after || null);
    };

    /* a field still being analysed (202) is stored later: fetch the slide until each one is there, then show it */
    var slideUrl = captureUrl.replace(/\/fields$/, "");
    var incomingUrl = slideUrl + "/incoming";
    var pending = 0, tries = 0, polling = false;
    var poll = function () {
      fetch(slideUrl, { cache: "no-store", credentials: "same-origin" }).then(function (r) {
        return r.ok ? r.json() : null;
      }).then(function (sl) {
        var added = sl ? (sl.fields || []).filter(function (f) { return !$("field-" + f.id); }) : [];
        added.forEach(renderField);
        if (added.length) {
          renderSlide(sl);
          var f = added[added.length - 1];
          say(fieldSummary(f), f.rejected ? "error" : "ok");
          pending -= added.length;
        }
        if (pending <= 0) { polling = false; return; }
        if (++tries >= 60) { polling = false; say("Reload the page to see the fields still being analysed.", "info"); return; }
        setTimeout(poll, 1000);
      }).catch(function () { polling = false; });
    };
    var awaitPending = function () {
      pending += 1; tries = 0;
      if (!polling) { polling = true; setTimeout(poll, 1000); }
    };
    /* another window (or the auto-capture of another tab) may add fields or finish the slide: read it again
       every few seconds while this page is in view */
    var refresh = function () {
      if (!busy && !polling && !document.hidden) {
        fetch(slideUrl, { cache: "no-store", credentials: "same-origin" }).then(function (r) {
          if (r.status === 404) {  // discarded in another window: say so, stop asking
            gone = true;
            btn.disabled = true;
            if (uploadBtn) { uploadBtn.disabled = true; }
            ["finish-form", "discard-form"].forEach(function (id) { var f = $(id); if (f) { f.remove(); } });
            var auto = $("auto-capture");
            if (auto) { auto.checked = false; auto.disabled = true; }
            say("This slide was discarded in another window: start a new slide from the start page.", "error");
            return null;
          }
          return r.ok ? r.json() : null;
        }).then(function (sl) {
          if (!sl || busy || polling) { return; }
          (sl.fields || []).forEach(function (f) {
            var row = $("field-" + f.id);
            if (!row) { renderField(f); }
            else if (row.dataset.state !== rowState(f)) { row.remove(); renderRow(f); }  // excluded or counted again elsewhere
          });
          renderSlide(sl);
        }).catch(function () {});
      }
      if (!gone) { setTimeout(refresh, 5000); }
    };
    var gone = false;
    setTimeout(refresh, 5000);

    var uploadBtn = $("upload-btn");
    var capture = function (body) {
      if (busy) {  // said, not dropped: the upload's chosen file stays chosen
        say("A field is being analysed: try again in a moment.", "info");
        return Promise.resolve(false);
      }
      busy = true;
      var hadFocus = document.activeElement === btn;  // a keyboard user presses Enter again for the next field
      btn.disabled = true; btn.classList.add("busy");
      if (uploadBtn) { uploadBtn.disabled = true; }
      // Finish waits on the device for a field it is receiving, but a file still on its way over Wi-Fi is not
      // there yet (the server takes the whole request before the device sees it): an upload is announced
      // first, so that Finish in another window waits for it too, and Finish here waits for the answer
      var finishBtn = $("finish-btn");
      if (finishBtn) { finishBtn.disabled = true; }
      say("Analysing the field…", "info");
      var announced = null, renewal = null;  // renewed while the file is on its way, however slow the link
      var sent = !(body instanceof FormData) ? postJSON(captureUrl, body) :
        postJSON(incomingUrl, null).then(function (res) {
          if (res.status === 201) {
            announced = incomingUrl + "/" + encodeURIComponent(res.body.incoming);
            renewal = setInterval(function () { postJSON(announced + "/renew", null).catch(function () {}); },
                                  (res.body.renew_s || 8) * 1000);
            return postJSON(captureUrl + "?incoming=" + encodeURIComponent(res.body.incoming), body);
          }
          if (res.status === 409 || res.status === 404) { return res; }  // finished meanwhile: not sent for nothing
          return postJSON(captureUrl, body);  // not announced (another refusal): sent as before
        });
      sent = sent.then(function (res) { clearInterval(renewal); return res; }, function (err) {
        clearInterval(renewal);  // lost on the way: Finish need not wait for it
        if (announced) { postJSON(announced + "/withdraw", null).catch(function () {}); }
        throw err;
      });
      return sent.then(function (res) {
        if (res.status === 201) {
          renderField(res.body.field);
          renderSlide(res.body.slide);
          say(fieldSummary(res.body.field), res.body.field.rejected ? "error" : "ok");
          return true;
        } else if (res.status === 202) {
          say(res.body.message, "info");
          awaitPending();
          return true;
        }
        say(res.body.error || ("Error " + res.status), "error");
        return false;
      }).catch(function () {
        say("The device did not answer: check the connection and try again.", "error");
        return false;
      }).then(function (taken) {
        busy = false; btn.disabled = false; btn.classList.remove("busy");
        if (uploadBtn) { uploadBtn.disabled = false; }
        if (finishBtn) { finishBtn.disabled = false; }
        if (hadFocus) { btn.focus(); }
        return taken;  // an upload refused or unanswered keeps its chosen file, to send again
      });
    };

    $("capture-form").addEventListener("submit", function (e) { e.preventDefault(); capture(null); });
    $("upload-form").addEventListener("submit", function (e) {
      e.preventDefault();
      var form = e.target;
      capture(new FormData(form)).then(function (taken) { if (taken) { form.reset(); } });
    });

    /* auto-capture: once per steady, sharp scene (the stage moved, then stopped); shown only with the script */
    var autoLabel = $("auto-capture-label");
    if (autoLabel) { autoLabel.hidden = false; }
    var lastScene = null;
    statusListeners.push(function (s) {
      var auto = $("auto-capture");
      var cam = s.camera || {};
      if (auto && auto.checked && !busy && cam.state === "connected" && cam.steady && cam.sharp && cam.scene !== lastScene) {
        lastScene = cam.scene;
        capture(null);
      }
    });
  }

  /* --- finish: below the counting target, ask first (the call will most likely be "not enough cells") --- */
  var finishForm = $("finish-form");
  if (finishForm) {
    finishForm.addEventListener("submit", function (e) {
      var counted = parseInt(($("rbc-count") || {}).textContent, 10) || 0;
      var target = parseInt(finishForm.dataset.target, 10) || 0;
      if (counted < target && !window.confirm("Only " + counted + " of " + target + " red cells are counted. " +
          "A finished slide takes no more fields. Finish anyway?")) {
        e.preventDefault();
        return;
      }
      $("finish-confirm").value = "1";  // asked here: the device does not ask again
      // Finish waits on the device for a field still on its way or being analysed (up to a minute): say so,
      // and a second press sends nothing more (each would hold one of the server's few threads that long)
      if (finishForm.dataset.sent) { e.preventDefault(); return; }
      finishForm.dataset.sent = "1";
      var b = $("finish-btn"), m = $("capture-msg");
      if (b) { b.textContent = "Finishing…"; b.setAttribute("aria-disabled", "true"); }
      if (m) { m.textContent = "Finishing: waiting for any field still being uploaded or analysed…"; m.className = "msg msg-info"; }
    });
    var finishText = ($("finish-btn") || {}).textContent;
    window.addEventListener("pageshow", function (ev) {  // back from a refusal: Finish can be pressed again
      if (!ev.persisted || !finishForm.dataset.sent) { return; }
      delete finishForm.dataset.sent;
      var b = $("finish-btn"), m = $("capture-msg");
      if (b) { b.textContent = finishText; b.removeAttribute("aria-disabled"); }
      if (m) { m.textContent = ""; m.className = "msg"; }
    });
  }

  /* --- review gallery --- */
  document.querySelectorAll("form.review-form").forEach(function (form) {
    form.addEventListener("submit", function (e) {
      e.preventDefault();
      var decision = e.submitter ? e.submitter.value : "confirmed";
      var tile = form.closest(".tile");
      // A tap on the decision already taken changes nothing (a double tap must not undo it); "Undo" clears.
      if (form.dataset.busy || tile.dataset.review === decision) { return; }
      var buttons = form.querySelectorAll("button");
      var pressed = e.submitter;
      form.dataset.busy = "1";
      form.setAttribute("aria-busy", "true");
      // what this page shows: a decision changed in another window meanwhile is not overwritten unseen
      postJSON(form.dataset.api, { decision: decision, seen: tile.dataset.review || "" }).catch(function () {
        return { status: 0, body: { error: "The device did not answer: check the connection and try again." } };
      }).then(function (res) {
        delete form.dataset.busy;
        form.removeAttribute("aria-busy");
        if (res.status === 409) {  // changed elsewhere meanwhile: show what is stored now
          alert(res.body.error);
          location.reload();
          return;
        }
        if (res.status !== 200) { alert(res.body.error || ("Error " + res.status)); return; }
        tile.dataset.review = res.body.cell.review || "";
        buttons.forEach(function (b) { if (b.value !== "clear") { b.setAttribute("aria-pressed", String(b.value === tile.dataset.review)); } });
        if (pressed && pressed.offsetParent !== null) { pressed.focus(); } else { form.querySelector("button").focus(); }
        var rv = res.body.slide.totals.review;
        $("n-confirmed").textContent = rv.confirmed;
        $("n-rejected").textContent = rv.rejected;
        $("n-pending").textContent = rv.pending;
        $("reviewed-infected").textContent = res.body.slide.reviewed.infected_count;
        var nr = res.body.slide.totals.near;
        if (nr && $("near-confirmed")) {
          $("near-confirmed").textContent = nr.confirmed;
          $("near-rejected").textContent = nr.rejected;
          $("near-pending").textContent = nr.pending;
        }
      });
    });
  });

  /* --- admin: confirming the device clock sends this computer's time to compare --- */
  var clockForm = $("clock-confirm");
  if (clockForm) {
    clockForm.addEventListener("submit", function () { clockForm.elements.browser_time_ms.value = String(Date.now()); });
  }

  /* --- report --- */
  var printBtn = $("print-btn");
  if (printBtn) { printBtn.hidden = false; printBtn.addEventListener("click", function () { window.print(); }); }
})();
