// v2gpki operator console: progressive enhancement only; every page works without this script.
// Loaded as a file (the Content-Security-Policy allows no inline script).
"use strict";
document.addEventListener("DOMContentLoaded", () => {
  // "Copy PEM" buttons.
  for (const btn of document.querySelectorAll("button[data-copy-target]")) {
    btn.addEventListener("click", async () => {
      const el = document.getElementById(btn.dataset.copyTarget);
      if (!el || !navigator.clipboard) return;
      try {
        await navigator.clipboard.writeText(el.textContent);
        btn.textContent = "Copied";
      } catch (_) {
        btn.textContent = "Copy failed: select the text instead";
      }
    });
  }
  // Expiry chart legend: show / hide a profile's bars (keyboard: the legend entries are buttons).
  for (const item of document.querySelectorAll(".legend-item[data-series]")) {
    item.addEventListener("click", () => {
      const on = item.getAttribute("aria-pressed") !== "true";
      item.setAttribute("aria-pressed", String(on));
      for (const bar of document.querySelectorAll(".chart rect.bar." + item.dataset.series)) {
        bar.classList.toggle("dim", !on);
      }
    });
  }
});
