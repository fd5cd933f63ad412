// The operator console's only script (served from 'self': the pages'
// Content-Security-Policy allows no inline script).
"use strict";

// The dashboard reloads its live part every data-refresh seconds, while the
// tab is visible; a failed or redirected (signed out) load stops it.
function refreshLive() {
  const live = document.querySelector("[data-refresh]");
  if (!live) return;
  const seconds = Math.max(5, parseInt(live.dataset.refresh, 10) || 15);
  const timer = setInterval(async () => {
    if (document.hidden) return;
    try {
      const response = await fetch(window.location.href, { credentials: "same-origin" });
      if (!response.ok || response.redirected) {
        clearInterval(timer);
        return;
      }
      const page = new DOMParser().parseFromString(await response.text(), "text/html");
      const fresh = page.getElementById(live.id);
      if (fresh) live.replaceChildren(...fresh.childNodes);
    } catch (error) {
      clearInterval(timer);
    }
  }, seconds * 1000);
}

// A thumbnail that cannot be made (no pixel data) shows a grey box.
function markMissingThumbnails() {
  for (const image of document.querySelectorAll("img.thumb")) {
    image.addEventListener("error", () => image.classList.add("missing"));
  }
}

document.addEventListener("DOMContentLoaded", () => {
  refreshLive();
  markMissingThumbnails();
});
