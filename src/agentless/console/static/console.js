// The consoles' own script (no inline script anywhere: the CSP forbids it).
//  - <time datetime> shown in the browser's time zone;
//  - every htmx request carries the session's CSRF token (X-CSRF-Token);
//  - forms with data-confirm ask first;
//  - elements with data-live="URL" follow server-sent events of live progress;
//  - the menu button folds the navigation at phone width.
"use strict";
(function () {
  const zone = Intl.DateTimeFormat().resolvedOptions().timeZone;
  const formatter = new Intl.DateTimeFormat(undefined, {
    year: "numeric", month: "2-digit", day: "2-digit",
    hour: "2-digit", minute: "2-digit", second: "2-digit", timeZoneName: "short",
  });

  function localTimes(root) {
    root.querySelectorAll("time[datetime]").forEach(function (el) {
      if (el.dataset.local) return;
      const moment = new Date(el.getAttribute("datetime"));
      if (isNaN(moment.getTime())) return;
      el.textContent = formatter.format(moment);
      el.title = el.getAttribute("datetime") + " (" + zone + ")";
      el.dataset.local = "1";
    });
  }

  function apply(fields) {
    Object.keys(fields).forEach(function (id) {
      const el = document.getElementById(id);
      if (!el) return;
      const what = fields[id];
      if (el.tagName === "PROGRESS") {
        if (what.max !== undefined) el.max = Math.max(what.max, 1);
        if (what.value !== undefined) el.value = what.value;
      }
      if (what.text !== undefined) el.textContent = what.text;
      if (what.href !== undefined) el.setAttribute("href", what.href);
      if (what.hidden !== undefined) el.hidden = what.hidden;
      if (what.state !== undefined) el.dataset.state = what.state;
      if (what.time !== undefined) {
        el.setAttribute("datetime", what.time);
        delete el.dataset.local;
      }
    });
    localTimes(document);
  }

  function follow(root) {
    root.querySelectorAll("[data-live]").forEach(function (el) {
      if (el.dataset.following) return;
      el.dataset.following = "1";
      const source = new EventSource(el.dataset.live);
      source.onmessage = function (event) { apply(JSON.parse(event.data)); };
      source.addEventListener("end", function () {
        source.close();
        el.dataset.ended = "1";
        if (el.dataset.liveEnd === "reload") window.location.reload();
      });
    });
  }

  function start(root) {
    localTimes(root);
    follow(root);
  }

  document.addEventListener("DOMContentLoaded", function () {
    start(document);
    const csrf = document.querySelector('meta[name="csrf-token"]');
    document.body.addEventListener("htmx:configRequest", function (event) {
      if (csrf && csrf.content) event.detail.headers["X-CSRF-Token"] = csrf.content;
    });
    document.body.addEventListener("htmx:load", function (event) { start(event.detail.elt); });
    document.body.addEventListener("submit", function (event) {
      const form = event.target;
      if (form.dataset && form.dataset.confirm && !window.confirm(form.dataset.confirm)) {
        event.preventDefault();
        event.stopImmediatePropagation();
      }
    }, true);
    const toggle = document.querySelector(".menu-toggle");
    if (toggle) {
      toggle.addEventListener("click", function () {
        const open = toggle.getAttribute("aria-expanded") === "true";
        toggle.setAttribute("aria-expanded", String(!open));
        document.body.classList.toggle("menu-open", !open);
      });
    }
  });
})();
