/* HematoVision's one script (the CSP allows scripts from this site only, none inline). The pages work without it.
   While a form is being sent, its button says "Classifying..." and a second press does nothing: classifying takes
   a few seconds, and a double submit would only do the work twice. */
(function () {
  "use strict";

  function reset(form) {
    delete form.dataset.busy;
    form.removeAttribute("aria-busy");
    form.querySelectorAll("button").forEach(function (button) {
      button.disabled = false;
      var label = button.querySelector(".button__label") || button;
      if (button.dataset.label) {
        label.textContent = button.dataset.label;
        delete button.dataset.label;
      }
    });
    var status = form.querySelector(".busy-status");
    if (status) {
      status.textContent = "";
      status.hidden = true;
    }
  }

  document.addEventListener("submit", function (event) {
    var form = event.target;
    if (!form.hasAttribute("data-busy-text")) {
      return;
    }
    if (form.dataset.busy) {
      event.preventDefault();  // already sent: wait for its answer
      return;
    }
    form.dataset.busy = "true";
    form.setAttribute("aria-busy", "true");
    var submitter = event.submitter || form.querySelector("button[type=submit]");
    var text = form.dataset.busyText;
    var explain = form.querySelector("input[name=explain]");
    if (explain && explain.checked) {
      text += " The heatmap takes a few seconds more.";
    }
    var status = form.querySelector(".busy-status");
    if (status) {
      status.textContent = text;
      status.hidden = false;
    }
    // Disabled only once the browser has read the form: a disabled button's name and value are not sent.
    window.setTimeout(function () {
      form.querySelectorAll("button").forEach(function (button) {
        button.disabled = true;
      });
      if (submitter) {
        var label = submitter.querySelector(".button__label") || submitter;
        submitter.dataset.label = label.textContent;
        label.textContent = "Classifying...";
      }
    }, 0);
  });

  // Back from a result, the browser may show this page as it was left: make its forms ready again.
  window.addEventListener("pageshow", function () {
    document.querySelectorAll("form[data-busy]").forEach(reset);
  });
})();
