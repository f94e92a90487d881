// The page of Sage workspaces (an ES module; the site's CSP allows no inline script or style).
//
// Element ids and classes a WebDriver test can use:
//   header:     #home, #connection-state (data-state: idle connecting open reconnecting offline
//               worker_lost moved reopened closed error), #connection-text, #reconnect-now,
//               #account-bar, #account-name, #signout; #notice, #notice-text, #notice-close
//   sign-in:    #auth-view, #signin-name, #signin-password, #signin-button, #signin-error,
//               #signup-name, #signup-password, #signup-button, #signup-error
//   list:       #list-view, #new-workspace-name, #upload-bundle, #create-workspace,
//               #workspace-empty, #workspace-list > .workspace-item[data-workspace-id] with
//               #open-<id> (.open), #rename-<id> (.rename), #delete-<id> (.delete),
//               .updated, .published
//   workspace:  #workspace-view, #back, #workspace-title, #worker-name,
//               #cells > .cell[data-status] (idle running ok error interrupted killed lost
//               failed) with .cell textarea (.code), .cell .run, .cell .interrupt,
//               .cell .remove-cell, .cell .output (span.stdout, span.stderr, img.figure,
//               .truncated), .cell .status; #add-cell
//               #save-message, #save, #save-result, #download-bundle
//               #publish-path, #publish, #publish-result, #publish-link
//               #files-list > li > button.file-item[data-path], #file-new, #files-refresh,
//               #file-path, #file-editor, #file-save, #file-delete, #file-result
//               #history-list > li.history-item > button.revert[data-commit], #history-refresh
//   operators:  #ops-view (shown to operators only), #ops-refresh, #ops-workers tbody >
//               tr.ops-worker[data-host][data-draining] with .state and #drain-<host> (.drain),
//               #ops-backends tbody > tr.ops-backend[data-host], #ops-audit > li, #ops-audit-error
//   dialog:     #dialog, #dialog-message, #dialog-input, #dialog-ok, #dialog-cancel
// Routes: #w/<workspace id> shows a workspace; anything else the list.
import { SageWS } from './sagews.js';

const $ = (sel, root = document) => root.querySelector(sel);
const el = (tag, props = {}, ...kids) => {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(props)) {
    if (k === 'dataset') Object.assign(e.dataset, v);
    else if (k.startsWith('aria-') || k === 'role') e.setAttribute(k, v);
    else e[k] = v;
  }
  e.append(...kids);
  return e;
};

// `?transport=xhr-polling` (or websocket, xhr-streaming) forces one: for tests, and for people
// behind a proxy that breaks the others.
const forced = new URLSearchParams(location.search).get('transport');
const client = new SageWS({ requestTimeout: 180000, ...(forced ? { transport: forced } : {}) });
const rest = client.rest;
const app = {
  account: null,
  ws: null, // {id, name}
  names: new Map(), // workspace id → name, from the last list
  cells: [],
  runs: 0,
  file: { path: null, dirty: false },
};

// ---------- small helpers ----------

function show(view) {
  for (const v of ['auth-view', 'list-view', 'workspace-view']) $(`#${v}`).hidden = v !== view;
  // The first view a person can use: the page is interactive (the bench reads this mark).
  if (!performance.getEntriesByName('sagews-interactive').length) performance.mark('sagews-interactive');
}

let noticeTimer = 0;
function notify(text, kind = 'error') {
  const n = $('#notice');
  $('#notice-text').textContent = text;
  n.dataset.kind = kind;
  n.hidden = false;
  clearTimeout(noticeTimer);
  if (kind !== 'error') noticeTimer = setTimeout(() => { n.hidden = true; }, 6000);
}

function errorText(e) {
  let t = e && e.message ? e.message : String(e);
  if (e && e.retryAfter) t += ` (try again in ${e.retryAfter} s)`;
  return t;
}

/** Handles a failed request: a lost sign-in goes back to the sign-in page. */
function fail(e, where = '') {
  if (e && e.status === 401) {
    signedOut('Your session has ended: sign in again.');
    return;
  }
  notify(where ? `${where}: ${errorText(e)}` : errorText(e));
}

/** Runs `fn` with `button` disabled, so a slow request cannot be started twice. */
async function busy(button, fn) {
  if (button.disabled) return undefined;
  button.disabled = true;
  button.setAttribute('aria-busy', 'true');
  try {
    return await fn();
  } finally {
    button.disabled = false;
    button.removeAttribute('aria-busy');
  }
}

function ago(unix) {
  const s = Math.round(Date.now() / 1000 - unix);
  const rtf = new Intl.RelativeTimeFormat(undefined, { numeric: 'auto' });
  if (s < 60) return rtf.format(-s, 'second');
  if (s < 3600) return rtf.format(-Math.round(s / 60), 'minute');
  if (s < 86400) return rtf.format(-Math.round(s / 3600), 'hour');
  if (s < 86400 * 30) return rtf.format(-Math.round(s / 86400), 'day');
  return new Date(unix * 1000).toLocaleDateString();
}

function timeEl(unix) {
  const d = new Date(unix * 1000);
  return el('time', { dateTime: d.toISOString(), title: d.toLocaleString(), textContent: ago(unix) });
}

/** A modal question; resolves with true / the typed text, or null when cancelled. */
function ask(message, { input = null, label = 'Name', ok = 'OK', danger = false } = {}) {
  const d = $('#dialog');
  if (typeof d.showModal !== 'function') {
    // eslint-disable-next-line no-alert
    return Promise.resolve(input === null ? (window.confirm(message) || null) : window.prompt(message, input));
  }
  const inp = $('#dialog-input');
  $('#dialog-message').textContent = message;
  $('#dialog-input-field').hidden = input === null;
  $('#dialog-input-label').textContent = label;
  inp.required = input !== null;
  inp.value = input ?? '';
  $('#dialog-ok').textContent = ok;
  $('#dialog-ok').classList.toggle('danger', danger);
  d.returnValue = '';
  d.showModal();
  if (input !== null) inp.select(); else $('#dialog-ok').focus();
  return new Promise((resolve) => {
    d.addEventListener('close', () => {
      if (d.returnValue !== 'ok') resolve(null);
      else resolve(input === null ? true : inp.value);
    }, { once: true });
  });
}
$('#dialog-cancel').addEventListener('click', () => $('#dialog').close('cancel'));

// ---------- connection banner ----------

const banner = { timer: 0 };
function setBanner(state, text, retry = false) {
  const b = $('#connection-state');
  b.dataset.state = state;
  $('#connection-text').textContent = text;
  $('#reconnect-now').hidden = !retry;
  clearTimeout(banner.timer);
}

client.on('state', (s) => {
  if (s.state === 'connecting') setBanner('connecting', s.reconnect ? 'Reconnecting…' : 'Connecting…');
  else if (s.state === 'open') setBanner('open', s.reconnected ? 'Reconnected' : 'Connected');
  else if (s.state === 'reconnecting') {
    const why = s.reason || s.error;
    const secs = Math.max(1, Math.round(s.delay / 1000));
    // Cells that were running get a 'lost' event from the library; cells run meanwhile wait.
    setBanner('reconnecting', `Connection lost${why ? ` (${why})` : ''}. Reconnecting in ${secs} s…`, true);
  } else if (s.state === 'offline') {
    setBanner('offline', 'You are offline: waiting for the network…', true);
  } else if (s.state === 'closed') setBanner('idle', 'Not connected');
});
$('#reconnect-now').addEventListener('click', () => client.reconnect());

client.on('resumed', (r) => {
  if (app.ws && r.workspaces.includes(app.ws.id)) setBanner('open', 'Reconnected: the workspace is open again');
  for (const f of r.failed) {
    if (app.ws && f.workspace === app.ws.id) fail(f.error, 'Cannot reopen the workspace');
  }
});

const mine = (ev) => app.ws && ev.workspace === app.ws.id;
client.on('worker_lost', (ev) => {
  if (mine(ev)) setBanner('worker_lost', `Worker ${ev.worker} was lost: reopening the workspace on another…`);
});
client.on('moved', (ev) => {
  if (!mine(ev)) return;
  setBanner('moved', `Moved to worker ${ev.worker}${ev.message ? `: ${ev.message}` : ''}`);
  $('#worker-name').textContent = `on ${ev.worker}`;
});
client.on('reopened', (ev) => {
  if (!mine(ev)) return;
  setBanner('reopened', `Reopened on ${ev.worker}${ev.message ? `: ${ev.message}` : ''}`);
  $('#worker-name').textContent = `on ${ev.worker}`;
});
client.on('closed', (ev) => {
  if (!mine(ev)) return;
  if (ev.reason === 'deleted') {
    notify('This workspace was deleted.');
    location.hash = '';
    return;
  }
  markRunning('killed', ev.message || ev.reason);
  setBanner('closed', `The session ended (${ev.reason})${ev.message ? `: ${ev.message}` : ''}`);
});
client.on('error', (ev) => { if (mine(ev)) notify(ev.message); });

// ---------- accounts ----------

async function signedIn(name) {
  app.account = name;
  $('#account-name').textContent = name;
  $('#account-bar').hidden = false;
  // The cookie authenticates the SockJS session when it opens: a fresh one after a sign-in.
  if (client.state === 'idle' || client.state === 'closed') client.connect();
  else client.reconnect();
  await route();
}

function signedOut(message) {
  leaveWorkspace(false);
  app.account = null;
  $('#account-bar').hidden = true;
  client.close();
  setBanner('idle', 'Signed out');
  show('auth-view');
  if (message) notify(message);
  $('#signin-name').focus();
}

function authForm(kind) {
  const form = $(`#${kind}-form`);
  const err = $(`#${kind}-error`);
  form.addEventListener('submit', (e) => {
    e.preventDefault();
    const name = $(`#${kind}-name`).value.trim();
    const password = $(`#${kind}-password`).value;
    err.hidden = true;
    if (!name || !password) {
      err.textContent = 'Enter a name and a password.';
      err.hidden = false;
      return;
    }
    busy($(`#${kind}-button`), async () => {
      try {
        const r = kind === 'signup' ? await rest.signup(name, password) : await rest.signin(name, password);
        $(`#${kind}-password`).value = '';
        $('#notice').hidden = true;
        await signedIn(r.account);
      } catch (x) {
        err.textContent = errorText(x);
        err.hidden = false;
      }
    });
  });
}
authForm('signin');
authForm('signup');

$('#signout').addEventListener('click', () => busy($('#signout'), async () => {
  // Over the connection first (it closes the open workspaces, saving them), then the cookie.
  try { await client.request('signout', {}, { timeout: 15000 }); } catch { /* the cookie still goes */ }
  try { await rest.signout(); } catch (e) { notify(`Signing out: ${errorText(e)}`); }
  location.hash = '';
  signedOut();
}));

// ---------- routing ----------

async function route() {
  if (!app.account) { show('auth-view'); return; }
  const m = /^#w\/([A-Za-z0-9_-]+)$/.exec(location.hash);
  if (m) await enterWorkspace(m[1]);
  else await showList();
}
window.addEventListener('hashchange', () => { route(); });
$('#home').addEventListener('click', (e) => { e.preventDefault(); location.hash = ''; });
$('#back').addEventListener('click', () => { location.hash = ''; });

// ---------- the workspace list ----------

async function showList() {
  leaveWorkspace();
  show('list-view');
  await refreshList();
  await refreshOps();
}

// ---------- the operators' page (the server answers operators only; others never see it) ----------

async function refreshOps() {
  let f;
  try {
    f = await client.fleet();
  } catch (e) {
    $('#ops-view').hidden = true;
    if (e.status !== 403 && e.status !== 401) fail(e, 'Loading the operators\' page');
    return;
  }
  $('#ops-view').hidden = false;
  const heard = (s) => `${Math.round(s)} s ago`;
  const workers = $('#ops-workers tbody');
  workers.replaceChildren();
  for (const w of f.workers) {
    const verb = w.draining ? 'Undrain' : 'Drain';
    const btn = el('button', { type: 'button', id: `drain-${w.host}`, className: `drain small${w.draining ? '' : ' danger'}`,
      textContent: verb, 'aria-label': `${verb} worker ${w.host}` });
    btn.addEventListener('click', () => drainWorker(w, btn));
    const state = w.draining ? 'draining' : (w.heard_seconds_ago > 20 ? 'not heard from' : 'in service');
    workers.append(el('tr', { className: 'ops-worker', dataset: { host: w.host, draining: String(w.draining) } },
      el('td', { textContent: w.host }), el('td', { textContent: w.address }),
      el('td', { textContent: `${w.sessions} of ${w.capacity}` }), el('td', { textContent: w.load.toFixed(2) }),
      el('td', { textContent: heard(w.heard_seconds_ago) }), el('td', { className: 'state', textContent: state }),
      el('td', {}, btn)));
  }
  const backends = $('#ops-backends tbody');
  backends.replaceChildren();
  for (const x of f.backends) {
    const state = x.stopping ? 'stopping' : (x.heard_seconds_ago > 20 ? 'not heard from' : 'in service');
    backends.append(el('tr', { className: 'ops-backend', dataset: { host: x.host } },
      el('td', { textContent: x.host }), el('td', { textContent: String(x.sockjs_sessions) }),
      el('td', { textContent: String(x.open_workspaces) }), el('td', { textContent: heard(x.heard_seconds_ago) }),
      el('td', { className: 'state', textContent: state })));
  }
  const audit = $('#ops-audit');
  audit.replaceChildren();
  for (const a of f.audit) {
    audit.append(el('li', {}, timeEl(Math.floor(a.ts_ms / 1000)), ` ${a.host}: ${a.message}`));
  }
  $('#ops-audit-error').hidden = !f.audit_error;
  $('#ops-audit-error').textContent = f.audit_error ? `No audit records: ${f.audit_error}` : '';
}
$('#ops-refresh').addEventListener('click', () => busy($('#ops-refresh'), refreshOps));

async function drainWorker(w, button) {
  if (!w.draining) {
    const ok = await ask(`Drain worker ${w.host}? It takes no new sessions, and its open workspaces are saved and moved to other workers.`,
      { ok: 'Drain', danger: true });
    if (!ok) return;
  }
  await busy(button, async () => {
    try {
      const r = await client.drainWorker(w.host, !w.draining);
      notify(`Worker ${r.worker} ${r.draining ? 'is draining' : 'takes sessions again'}.`, 'info');
    } catch (e) { fail(e, `${w.draining ? 'Undraining' : 'Draining'} ${w.host}`); }
    await refreshOps();
  });
}

async function refreshList() {
  let r;
  try { r = await client.list(); } catch (e) { fail(e, 'Listing your workspaces'); return; }
  const ul = $('#workspace-list');
  ul.replaceChildren();
  app.names.clear();
  for (const w of r.workspaces) {
    app.names.set(w.workspace, w.name);
    const id = w.workspace;
    const open = el('button', { type: 'button', id: `open-${id}`, className: 'open link', textContent: w.name,
      'aria-label': `Open ${w.name}` });
    const meta = el('span', { className: 'meta' },
      el('span', { className: 'updated' }, 'saved ', timeEl(w.updated)));
    if (w.published) meta.append(' ', el('span', { className: 'published badge', textContent: 'published' }));
    const rename = el('button', { type: 'button', id: `rename-${id}`, className: 'rename small', textContent: 'Rename',
      'aria-label': `Rename ${w.name}` });
    const del = el('button', { type: 'button', id: `delete-${id}`, className: 'delete small danger', textContent: 'Delete',
      'aria-label': `Delete ${w.name}` });
    open.addEventListener('click', () => { location.hash = `#w/${id}`; });
    rename.addEventListener('click', () => renameWorkspace(id, w.name, rename));
    del.addEventListener('click', () => deleteWorkspace(id, w.name, del));
    ul.append(el('li', { className: 'workspace-item', dataset: { workspaceId: id } },
      el('div', { className: 'ws-main' }, open, meta), el('div', { className: 'ws-actions' }, rename, del)));
  }
  $('#workspace-empty').hidden = r.workspaces.length > 0;
}

async function renameWorkspace(id, old, button) {
  const name = await ask(`Rename “${old}” to:`, { input: old, label: 'New name', ok: 'Rename' });
  if (name === null || name.trim() === old) return;
  await busy(button, async () => {
    try {
      await client.rename(id, name.trim());
      await refreshList();
      notify(`Renamed to “${name.trim()}”.`, 'info');
    } catch (e) { fail(e, 'Renaming'); }
  });
}

async function deleteWorkspace(id, name, button) {
  const ok = await ask(`Delete “${name}” and all its history? This cannot be undone.`, { ok: 'Delete', danger: true });
  if (!ok) return;
  await busy(button, async () => {
    try {
      await client.delete(id);
      localStorage.removeItem(`sagews:cells:${id}`);
      await refreshList();
      notify(`Deleted “${name}”.`, 'info');
    } catch (e) { fail(e, 'Deleting'); }
  });
}

$('#create-form').addEventListener('submit', (e) => {
  e.preventDefault();
  const input = $('#new-workspace-name');
  const name = input.value.trim();
  if (!name) { notify('Give the new workspace a name.'); input.focus(); return; }
  const file = $('#upload-bundle').files[0];
  busy($('#create-workspace'), async () => {
    try {
      if (file) await rest.upload(name, file);
      else await client.create(name);
      input.value = '';
      $('#upload-bundle').value = '';
      await refreshList();
      notify(`Created “${name}”.`, 'info');
    } catch (x) { fail(x, 'Creating the workspace'); }
  });
});

// ---------- a workspace ----------

async function enterWorkspace(id) {
  if (app.ws && app.ws.id === id) { show('workspace-view'); return; }
  leaveWorkspace();
  const ws = { id, name: app.names.get(id) || id };
  app.ws = ws;
  $('#workspace-title').textContent = ws.name;
  $('#worker-name').textContent = 'opening…';
  $('#download-bundle').href = rest.bundleUrl(id);
  $('#publish-link').hidden = true;
  for (const s of ['#save-result', '#publish-result', '#file-result']) $(s).textContent = '';
  $('#files-list').replaceChildren();
  $('#history-list').replaceChildren();
  newFile(false);
  $('#cells').replaceChildren();
  app.cells = [];
  const saved = loadCells(id);
  for (const code of saved.length ? saved : ['']) addCell(code);
  show('workspace-view');
  document.title = `${ws.name} · Sage workspaces`;
  try {
    const r = await client.open(id);
    if (app.ws !== ws) return;
    ws.name = r.name || ws.name;
    $('#workspace-title').textContent = ws.name;
    document.title = `${ws.name} · Sage workspaces`;
    $('#worker-name').textContent = r.worker ? `on ${r.worker}` : '';
  } catch (e) {
    if (app.ws !== ws) return;
    $('#worker-name').textContent = 'not open';
    fail(e, 'Opening the workspace');
    if (e.status === 404) location.hash = '';
    return;
  }
  app.cells[0]?.ta.focus();
  refreshFiles();
  refreshHistory();
}

function leaveWorkspace(close = true) {
  const ws = app.ws;
  if (!ws) return;
  saveCells();
  for (const c of app.cells) c.gen++;
  app.ws = null;
  app.cells = [];
  $('#cells').replaceChildren();
  document.title = 'Sage workspaces';
  if (close && client.state !== 'closed') client.closeWorkspace(ws.id).catch(() => {});
}

// Cells' code stays in this browser (localStorage), per workspace.
function loadCells(id) {
  try {
    const v = JSON.parse(localStorage.getItem(`sagews:cells:${id}`) || '[]');
    return Array.isArray(v) ? v.filter((x) => typeof x === 'string') : [];
  } catch { return []; }
}
let saveCellsTimer = 0;
function saveCells() {
  clearTimeout(saveCellsTimer);
  if (!app.ws) return;
  try {
    localStorage.setItem(`sagews:cells:${app.ws.id}`, JSON.stringify(app.cells.map((c) => c.ta.value)));
  } catch { /* storage full or off: the code just is not kept */ }
}
const saveCellsSoon = () => { clearTimeout(saveCellsTimer); saveCellsTimer = setTimeout(saveCells, 500); };

function addCell(code = '', after = null, focus = false) {
  const node = $('#cell-template').content.firstElementChild.cloneNode(true);
  const cell = {
    el: node, ta: $('textarea', node), run: $('.run', node), intr: $('.interrupt', node),
    rm: $('.remove-cell', node), out: $('.output', node), status: $('.status', node),
    label: $('.cell-label', node), gen: 0, running: false, queue: [], raf: 0,
  };
  cell.ta.value = code;
  fitRows(cell.ta);
  cell.ta.addEventListener('input', () => { fitRows(cell.ta); saveCellsSoon(); });
  cell.ta.addEventListener('keydown', (e) => {
    if (e.key !== 'Enter' || !(e.shiftKey || e.ctrlKey || e.metaKey)) return;
    e.preventDefault();
    runCell(cell);
    if (e.shiftKey) {
      const i = app.cells.indexOf(cell);
      const next = app.cells[i + 1] || addCell('', cell);
      next.ta.focus();
    }
  });
  cell.run.addEventListener('click', () => runCell(cell));
  cell.intr.addEventListener('click', () => interrupt(cell));
  cell.rm.addEventListener('click', () => removeCell(cell));
  const i = after ? app.cells.indexOf(after) + 1 : app.cells.length;
  app.cells.splice(i, 0, cell);
  const before = app.cells[i + 1];
  if (before) $('#cells').insertBefore(node, before.el); else $('#cells').append(node);
  renumber();
  if (focus) cell.ta.focus();
  return cell;
}

function fitRows(ta) {
  ta.rows = Math.min(30, Math.max(3, ta.value.split('\n').length + 1));
}

function renumber() {
  app.cells.forEach((c, i) => {
    const n = i + 1;
    c.label.textContent = c.count ? `[${c.count}]` : '[ ]';
    c.el.setAttribute('aria-label', `Cell ${n}`);
    c.ta.setAttribute('aria-label', `Cell ${n} code`);
    c.run.setAttribute('aria-label', `Run cell ${n}`);
    c.intr.setAttribute('aria-label', `Interrupt cell ${n}`);
    c.rm.setAttribute('aria-label', `Remove cell ${n}`);
    c.out.setAttribute('aria-label', `Cell ${n} output`);
  });
}

function removeCell(cell) {
  if (cell.running) interrupt(cell);
  cell.gen++;
  const i = app.cells.indexOf(cell);
  app.cells.splice(i, 1);
  cell.el.remove();
  if (!app.cells.length) addCell();
  renumber();
  (app.cells[i] || app.cells[i - 1]).ta.focus();
  saveCells();
}

$('#add-cell').addEventListener('click', () => addCell('', null, true));

const STATUS = {
  running: 'Running…', ok: 'Done', error: 'Error', interrupted: 'Interrupted', killed: 'Killed',
  lost: 'Connection lost', failed: 'Not run',
};

function setStatus(cell, status, message) {
  cell.el.dataset.status = status;
  cell.status.dataset.status = status;
  cell.status.textContent = message ? `${STATUS[status] || status}: ${message}` : (STATUS[status] || status);
}

function runCell(cell) {
  if (!app.ws) return;
  if (cell.running) { setStatus(cell, 'running', 'still running: interrupt it first'); return; }
  const ws = app.ws;
  const gen = ++cell.gen;
  cell.running = true;
  cell.count = ++app.runs;
  renumber();
  cell.queue = [];
  cell.out.replaceChildren();
  setStatus(cell, 'running', client.state === 'open' ? '' : 'waiting for the connection');
  cell.run.disabled = true;
  cell.intr.disabled = false;
  saveCells();
  client.execute(ws.id, cell.ta.value, (ev) => { if (cell.gen === gen) onCellEvent(cell, ev); })
    .catch((e) => {
      if (cell.gen !== gen || !cell.running) return;
      finish(cell, 'failed', errorText(e));
      if (e.status === 401) fail(e);
    });
}

function onCellEvent(cell, ev) {
  switch (ev.event) {
    case 'stdout':
    case 'stderr':
      out(cell, [ev.event, ev.data]);
      break;
    case 'image':
      if (/^image\/[\w.+-]+$/.test(ev.mime || '')) out(cell, ['image', ev]);
      break;
    case 'truncated':
      out(cell, ['truncated', ev.message]);
      break;
    case 'done':
      finish(cell, ev.status, ev.message);
      break;
    case 'lost':
      finish(cell, 'lost', ev.message);
      break;
    default:
  }
}

// Output is drawn once per frame, so a chatty cell does not slow typing elsewhere.
function out(cell, item) {
  cell.queue.push(item);
  if (!cell.raf) cell.raf = requestAnimationFrame(() => flush(cell));
}

function flush(cell) {
  if (cell.raf) cancelAnimationFrame(cell.raf);
  cell.raf = 0;
  const o = cell.out;
  const atEnd = o.scrollTop + o.clientHeight >= o.scrollHeight - 8;
  for (const [kind, v] of cell.queue) {
    if (kind === 'stdout' || kind === 'stderr') {
      let last = o.lastElementChild;
      if (!last || last.className !== kind || last !== o.lastChild) {
        last = el('span', { className: kind });
        o.append(last);
      }
      last.append(v);
    } else if (kind === 'image') {
      o.append(el('img', { className: 'figure', src: `data:${v.mime};base64,${v.data}`,
        alt: `Figure from cell ${app.cells.indexOf(cell) + 1}` }));
    } else if (kind === 'truncated') {
      o.append(el('div', { className: 'truncated', role: 'note', textContent: v }));
    }
  }
  cell.queue = [];
  if (atEnd) o.scrollTop = o.scrollHeight;
}

function finish(cell, status, message) {
  flush(cell);
  cell.running = false;
  cell.run.disabled = false;
  cell.intr.disabled = true;
  setStatus(cell, status, message);
}

/** Marks running cells as ended (after a lost connection, a revert, a closed session). */
function markRunning(status, message) {
  for (const c of app.cells) {
    if (c.running) {
      c.gen++;
      finish(c, status, message);
    }
  }
}

function interrupt(cell) {
  if (!app.ws) return;
  setStatus(cell, 'running', 'interrupting');
  client.interrupt(app.ws.id).catch((e) => fail(e, 'Interrupting'));
}

// ---------- save, history, publish ----------

$('#save-form').addEventListener('submit', (e) => {
  e.preventDefault();
  if (!app.ws) return;
  const ws = app.ws;
  const msg = $('#save-message').value.trim() || 'Save';
  busy($('#save'), async () => {
    try {
      const r = await client.save(ws.id, msg);
      $('#save-result').textContent = r.changed ? `Saved: “${msg}”.` : 'Nothing changed since the last save.';
      $('#save-message').value = '';
      if (app.ws === ws) refreshHistory();
    } catch (x) { fail(x, 'Saving'); }
  });
});

async function refreshHistory() {
  if (!app.ws) return;
  const ws = app.ws;
  const ol = $('#history-list');
  let r;
  try { r = await client.history(ws.id); } catch (e) { fail(e, 'History'); return; }
  if (app.ws !== ws) return;
  ol.replaceChildren();
  if (!r.history.length) ol.append(el('li', { className: 'muted', textContent: 'Nothing saved yet.' }));
  r.history.forEach((h, i) => {
    const label = h.message.split('\n')[0] || '(no message)';
    const b = el('button', { type: 'button', className: 'revert small', textContent: i === 0 ? 'Current' : 'Revert',
      dataset: { commit: h.commit }, 'aria-label': `Revert to “${label}”, ${new Date(h.time * 1000).toLocaleString()}` });
    b.disabled = i === 0;
    b.addEventListener('click', () => revert(h, label, b));
    ol.append(el('li', { className: 'history-item' },
      el('div', {}, el('span', { className: 'msg', textContent: label }),
        el('span', { className: 'meta' }, timeEl(h.time), ' ', el('code', { textContent: h.commit.slice(0, 8) }))),
      b));
  });
}
$('#history-refresh').addEventListener('click', () => busy($('#history-refresh'), refreshHistory));

async function revert(h, label, button) {
  const ok = await ask(`Revert the workspace to “${label}”? Its files become that version's (a new save on top: the history is kept). Running cells stop.`,
    { ok: 'Revert', danger: true });
  if (!ok || !app.ws) return;
  const ws = app.ws;
  await busy(button, async () => {
    try {
      const r = await client.revert(ws.id, h.commit);
      if (app.ws !== ws) return;
      markRunning('killed', 'the workspace was reverted');
      notify(`Reverted to “${label}” (new version ${r.commit.slice(0, 8)}).`, 'info');
      newFile(false);
      refreshFiles();
      refreshHistory();
    } catch (e) { fail(e, 'Reverting'); }
  });
}

$('#publish-form').addEventListener('submit', (e) => {
  e.preventDefault();
  if (!app.ws) return;
  const ws = app.ws;
  const path = $('#publish-path').value.trim();
  busy($('#publish'), async () => {
    try {
      const r = await client.publish(ws.id, path || undefined);
      if (app.ws !== ws) return;
      const a = $('#publish-link');
      a.href = r.url;
      a.textContent = r.url;
      a.hidden = false;
      $('#publish-result').textContent = `Published ${r.files.length} file${r.files.length === 1 ? '' : 's'}.`;
    } catch (x) { fail(x, 'Publishing'); }
  });
});

// ---------- files ----------

async function refreshFiles() {
  if (!app.ws) return;
  const ws = app.ws;
  let r;
  try { r = await client.files(ws.id); } catch (e) { fail(e, 'Listing files'); return; }
  if (app.ws !== ws) return;
  const ul = $('#files-list');
  ul.replaceChildren();
  if (!r.files.length) ul.append(el('li', { className: 'muted', textContent: 'No files yet.' }));
  for (const f of r.files) {
    const b = el('button', { type: 'button', className: 'file-item link', dataset: { path: f.path },
      'aria-label': `Open file ${f.path}` }, el('span', { textContent: f.path }), el('span', { className: 'size', textContent: size(f.size) }));
    if (f.path === app.file.path) b.setAttribute('aria-current', 'true');
    b.addEventListener('click', () => openFile(f.path));
    ul.append(el('li', {}, b));
  }
}
$('#files-refresh').addEventListener('click', () => busy($('#files-refresh'), refreshFiles));

function size(n) {
  if (n < 1024) return `${n} B`;
  if (n < 1 << 20) return `${(n / 1024).toFixed(1)} KiB`;
  return `${(n / (1 << 20)).toFixed(1)} MiB`;
}

async function discardEdits() {
  return !app.file.dirty || !!(await ask('Discard the changes to the file in the editor?', { ok: 'Discard', danger: true }));
}

async function openFile(path) {
  if (!app.ws || !(await discardEdits())) return;
  const ws = app.ws;
  try {
    const r = await client.read(ws.id, path);
    if (app.ws !== ws) return;
    $('#file-path').value = r.path;
    $('#file-editor').value = r.data;
    app.file = { path: r.path, dirty: false };
    $('#file-result').textContent = `${r.path}: ${size(r.size)}`;
    for (const b of document.querySelectorAll('#files-list .file-item')) {
      if (b.dataset.path === r.path) b.setAttribute('aria-current', 'true'); else b.removeAttribute('aria-current');
    }
    $('#file-editor').focus();
  } catch (e) { fail(e, `Reading ${path}`); }
}

function newFile(focus = true) {
  $('#file-path').value = '';
  $('#file-editor').value = '';
  app.file = { path: null, dirty: false };
  $('#file-result').textContent = '';
  for (const b of document.querySelectorAll('#files-list .file-item')) b.removeAttribute('aria-current');
  if (focus) $('#file-path').focus();
}
$('#file-new').addEventListener('click', async () => { if (await discardEdits()) newFile(); });
$('#file-editor').addEventListener('input', () => { app.file.dirty = true; });
$('#file-path').addEventListener('input', () => { app.file.dirty = true; });

$('#file-form').addEventListener('submit', (e) => {
  e.preventDefault();
  if (!app.ws) return;
  const ws = app.ws;
  const path = $('#file-path').value.trim();
  if (!path) { notify('Give the file a path, e.g. notes/plot.py.'); $('#file-path').focus(); return; }
  busy($('#file-save'), async () => {
    try {
      const r = await client.write(ws.id, path, $('#file-editor').value);
      if (app.ws !== ws) return;
      app.file = { path: r.path, dirty: false };
      $('#file-result').textContent = `Wrote ${r.path} (${size(r.size)}). Save the workspace to keep it in the history.`;
      refreshFiles();
    } catch (x) { fail(x, `Writing ${path}`); }
  });
});

$('#file-delete').addEventListener('click', async () => {
  if (!app.ws) return;
  const ws = app.ws;
  const path = $('#file-path').value.trim();
  if (!path) { notify('Open a file first.'); return; }
  if (!(await ask(`Delete the file ${path}?`, { ok: 'Delete', danger: true }))) return;
  busy($('#file-delete'), async () => {
    try {
      await client.remove(ws.id, path);
      if (app.ws !== ws) return;
      newFile(false);
      $('#file-result').textContent = `Deleted ${path}.`;
      refreshFiles();
    } catch (x) { fail(x, `Deleting ${path}`); }
  });
});

// ---------- start ----------

$('#notice-close').addEventListener('click', () => { $('#notice').hidden = true; });
window.addEventListener('pagehide', saveCells);

(async () => {
  let name = null;
  try {
    name = await rest.whoami();
  } catch (e) {
    notify(`Cannot reach the server: ${errorText(e)}`);
  }
  if (name) await signedIn(name);
  else {
    setBanner('idle', 'Not signed in');
    show('auth-view');
    $('#signin-name').focus();
  }
})();
