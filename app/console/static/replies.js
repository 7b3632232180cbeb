// The reply editor: as the operator types, ask the console how the reply would be sent
// (encoding, segments: app.sending.encoding, the send path's own count) and say it beside the
// field. No library; works without it too (the page shows each saved reply's cost).
(function () {
  "use strict";
  function describe(cost) {
    var text = cost.encoding + ", " + cost.segments + " segment" + (cost.segments === 1 ? "" : "s") +
      " (" + cost.units + (cost.encoding === "GSM-7" ? " septets" : " UTF-16 units") + ")";
    if (cost.non_gsm_characters.length) {
      text += "; not in GSM-7: " + cost.non_gsm_characters.join(" ");
    }
    return text;
  }
  function watch(area) {
    var output = document.getElementById(area.getAttribute("data-cost-output"));
    var timer = null;
    var asked = 0;
    function ask() {
      var mine = ++asked;
      fetch("/console/senders/reply-cost?text=" + encodeURIComponent(area.value), {
        credentials: "same-origin", headers: { "Accept": "application/json" }
      }).then(function (response) {
        if (!response.ok) { throw new Error(String(response.status)); }
        return response.json();
      }).then(function (cost) {
        if (mine === asked) { output.textContent = describe(cost); }
      }).catch(function () {
        if (mine === asked) { output.textContent = "cost unknown (could not ask the server)"; }
      });
    }
    area.addEventListener("input", function () {
      if (timer) { clearTimeout(timer); }
      timer = setTimeout(ask, 150);
    });
  }
  var areas = document.querySelectorAll("textarea[data-cost-output]");
  for (var i = 0; i < areas.length; i++) { watch(areas[i]); }
})();
