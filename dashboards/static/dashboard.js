// Sortable tables: click a header to sort by that column (numbers numerically, "not estimable" last).
(function () {
  "use strict";
  function cellValue(row, index) {
    var cell = row.cells[index];
    var raw = cell.getAttribute("data-value");
    if (raw === null) { raw = cell.textContent.trim(); }
    var num = parseFloat(raw);
    return isNaN(num) ? { num: null, text: raw.toLowerCase() } : { num: num, text: raw };
  }
  function sortTable(table, index, th) {
    var body = table.tBodies[0];
    var rows = Array.prototype.slice.call(body.rows);
    var desc = !th.classList.contains("sorted-desc");
    Array.prototype.forEach.call(table.tHead.rows[0].cells, function (c) {
      c.classList.remove("sorted-asc", "sorted-desc");
    });
    th.classList.add(desc ? "sorted-desc" : "sorted-asc");
    rows.sort(function (a, b) {
      var x = cellValue(a, index), y = cellValue(b, index);
      if (x.num === null && y.num === null) { return x.text < y.text ? -1 : x.text > y.text ? 1 : 0; }
      if (x.num === null) { return 1; }
      if (y.num === null) { return -1; }
      return desc ? y.num - x.num : x.num - y.num;
    });
    rows.forEach(function (r) { body.appendChild(r); });
  }
  document.querySelectorAll("table.sortable").forEach(function (table) {
    Array.prototype.forEach.call(table.tHead.rows[0].cells, function (th, index) {
      th.classList.add("sortable");
      th.addEventListener("click", function () { sortTable(table, index, th); });
    });
  });
  document.body.setAttribute("data-ready", "true");
})();
