"use strict";
// Shared by the ops pages. Everything they show may come from participants (identities,
// service names): it is set with textContent only, never parsed as HTML.
function el(tag, text, cls) {
  const node = document.createElement(tag);
  if (text !== undefined && text !== null) node.textContent = String(text);  // never innerHTML
  if (cls) node.className = cls;
  return node;
}
function row(cells) {
  const tr = document.createElement("tr");
  for (const cell of cells) tr.appendChild(cell instanceof Node ? cell : el("td", cell));
  return tr;
}
function fill(id, rows, columns, emptyText) {
  const body = document.querySelector("#" + id + " tbody");
  body.replaceChildren();
  if (!rows.length) {
    const td = el("td", emptyText, "empty");
    td.colSpan = columns;
    body.appendChild(row([td]));
  }
  for (const r of rows) body.appendChild(r);
}
function num(value, cls) { return el("td", value, "num" + (cls ? " " + cls : "")); }
