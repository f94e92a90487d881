// sagews.js: the browser client of Sage workspaces (an ES module, no dependencies).
//
// - A small SockJS 0.3 client: GET <prefix>/info, then websocket, xhr-streaming or xhr-polling
//   (in that order, falling back when one fails before the session opens; `transport` forces
//   one). Frames: o (open), h (heartbeat), a[...] (messages), c[code,"reason"] (close).
// - The site's JSON protocol: `request(op, fields)` sends {"id": N, "op": ...} and resolves with
//   the reply {"id": N, "ok": true, ...}, or rejects with a SageError carrying the server's
//   text, `status` and `retryAfter`. Events ({"event": ...}) go to `on(name, fn)` listeners, and
//   an execute's events to the callback given to `execute`.
// - Heartbeats: no frame for `heartbeatTimeout` (55 s: two of the server's 25 s beats) means
//   the connection is dead. Reconnects use exponential backoff with jitter (capped); the
//   workspaces that were open are opened again and the page is told ('resumed'). A request in
//   flight when the connection drops is sent again if it only reads, otherwise it rejects
//   (SageError with code 'connection_lost'); a running execute gets a 'lost' event. A backend
//   that stops (a rolling upgrade) refuses what arrives meanwhile with code 'restarting' (it did
//   nothing with it): those requests are sent again once reconnected, and its close (1012)
//   reconnects at once, to another backend.
// - REST helpers (`client.rest` / SageREST): signup, signin, signout, whoami, upload, download.
//
// Transports are small factories `(ctx) => ({send(strings), close()})` that call
// `ctx.onframe(text)` for each frame and `ctx.onclose(info)` once when they end by themselves;
// tests pass their own through the `transports` option.
//
// Events a page can listen to:
//   server: stdout stderr done truncated image moved worker_lost reopened closed error
//   connection: state ({state}), connecting, open ({transport, reconnected}), disconnected
//     ({code, reason, error}), reconnecting ({attempt, delay}), offline, resumed ({workspaces,
//     failed}), lost ({workspace, id, message}: an execute whose output stopped with the
//     connection), protocol_error ({message})

/** Ops that only read: re-sent after a reconnect instead of failing. */
export const SAFE_OPS = new Set(['ping', 'whoami', 'list', 'history', 'files', 'read']);

/** Every request op the server knows. */
export const OPS = ['ping', 'whoami', 'signin', 'signup', 'signout', 'list', 'create', 'rename',
  'delete', 'open', 'close', 'execute', 'interrupt', 'save', 'history', 'revert', 'publish',
  'files', 'read', 'write', 'remove', 'fleet', 'drain_worker'];

/** Events the server sends. */
export const SERVER_EVENTS = ['stdout', 'stderr', 'done', 'truncated', 'image', 'moved',
  'worker_lost', 'reopened', 'closed', 'error'];

export const TRANSPORTS = ['websocket', 'xhr-streaming', 'xhr-polling'];

/** An error for people: the server's text, plus its HTTP-like status and Retry-After. */
/** How long a workspace is tried again after a reconnect while the backend has no worker. */
const REOPEN_PATIENCE = 60000;

export class SageError extends Error {
  constructor(message, { status = null, retryAfter = null, op = null, code = null, reply = null } = {}) {
    super(message);
    this.name = 'SageError';
    this.status = status;
    this.retryAfter = retryAfter;
    this.op = op;
    this.code = code;
    this.reply = reply;
  }
}

/** One SockJS frame: {type: 'open'|'heartbeat'|'messages'|'close', ...}; throws on garbage. */
export function parseFrame(text) {
  switch (text[0]) {
    case 'o': return { type: 'open' };
    case 'h': return { type: 'heartbeat' }; // also the xhr-streaming prelude (2048 h's)
    case 'a': {
      const messages = JSON.parse(text.slice(1));
      if (!Array.isArray(messages)) throw new Error('an "a" frame must hold an array');
      return { type: 'messages', messages };
    }
    case 'm': return { type: 'messages', messages: [JSON.parse(text.slice(1))] };
    case 'c': {
      const [code, reason] = JSON.parse(text.slice(1));
      return { type: 'close', code, reason };
    }
    default: throw new Error(`not a SockJS frame: ${JSON.stringify(text.slice(0, 40))}`);
  }
}

/** Random ids: 3 digits for the server, 128 bits from the platform's CSPRNG for the session
 * (the id is what names a SockJS session on the server: it must not be guessable). */
export function randomIds(random = Math.random) {
  const bytes = new Uint8Array(16);
  globalThis.crypto.getRandomValues(bytes);
  const session = [...bytes].map((b) => b.toString(16).padStart(2, '0')).join('');
  const server = String(Math.floor(random() * 1000)).padStart(3, '0');
  return { server, session };
}

/** The reconnect delay before attempt `n` (0-based): exponential, capped, half of it jitter. */
export function backoffDelay(n, { base = 500, max = 30000, factor = 2 } = {}, random = Math.random) {
  const d = Math.min(max, base * factor ** n);
  return Math.round(d / 2 + random() * d / 2);
}

/** Feeds each newline-ended line of a fetch Response to `online` as it arrives. */
async function readLines(res, online) {
  const reader = res.body && res.body.getReader ? res.body.getReader() : null;
  if (!reader) {
    for (const l of (await res.text()).split('\n')) if (l) online(l);
    return;
  }
  const dec = new TextDecoder();
  let buf = '';
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buf += dec.decode(value, { stream: true });
    let i;
    while ((i = buf.indexOf('\n')) >= 0) {
      const line = buf.slice(0, i);
      buf = buf.slice(i + 1);
      if (line && online(line) === false) {
        reader.cancel().catch(() => {});
        return;
      }
    }
  }
  buf += dec.decode();
  if (buf) online(buf);
}

/** Sends batches of messages with POST .../xhr_send, one request at a time, in order. */
function xhrSender(ctx, fail) {
  let queue = [];
  let busy = false;
  async function pump() {
    if (busy || !queue.length) return;
    busy = true;
    const batch = queue;
    queue = [];
    try {
      const res = await ctx.env.fetch(`${ctx.url}/xhr_send`, {
        method: 'POST', credentials: 'same-origin', cache: 'no-store',
        headers: { 'Content-Type': 'text/plain;charset=UTF-8' }, body: JSON.stringify(batch),
      });
      if (res.status !== 204 && res.status !== 200) throw new Error(`xhr_send: HTTP ${res.status}`);
    } catch (e) {
      busy = false;
      fail(`sending failed: ${e.message}`);
      return;
    }
    busy = false;
    pump();
  }
  return (msgs) => { queue.push(...msgs); pump(); };
}

/** Long-polling and streaming share everything but the receiving loop. */
function xhrTransport(ctx, path) {
  let ended = false;
  let ctl = null;
  const end = (error) => {
    if (ended) return;
    ended = true;
    if (ctl) ctl.abort();
    ctx.onclose({ error });
  };
  const send = xhrSender(ctx, end);
  (async () => {
    while (!ended) {
      ctl = typeof AbortController === 'function' ? new AbortController() : null;
      try {
        const res = await ctx.env.fetch(`${ctx.url}/${path}`, {
          method: 'POST', credentials: 'same-origin', cache: 'no-store', signal: ctl && ctl.signal,
        });
        if (!res.ok) throw new Error(`${path}: HTTP ${res.status}`);
        await readLines(res, (line) => {
          if (ended) return false;
          ctx.onframe(line);
          return !ended;
        });
      } catch (e) {
        end(e.message || String(e));
        return;
      }
      // A streaming response ends after 128 KiB, a poll after each frame: ask again.
    }
  })();
  return {
    send,
    close() { ended = true; if (ctl) ctl.abort(); },
  };
}

export const defaultTransports = {
  websocket(ctx) {
    const ws = new ctx.env.WebSocket(`${ctx.wsUrl}/websocket`);
    let ended = false;
    ws.onmessage = (e) => { if (!ended && typeof e.data === 'string') ctx.onframe(e.data); };
    ws.onerror = () => {};
    ws.onclose = (e) => {
      if (ended) return;
      ended = true;
      ctx.onclose({ error: `the websocket closed (${e && e.code})` });
    };
    return {
      send(msgs) { ws.send(JSON.stringify(msgs)); },
      close() { ended = true; try { ws.close(); } catch { /* already closed */ } },
    };
  },
  'xhr-streaming': (ctx) => xhrTransport(ctx, 'xhr_streaming'),
  'xhr-polling': (ctx) => xhrTransport(ctx, 'xhr'),
};

/** Listeners by name; `on` returns a function that removes the listener. */
class Emitter {
  constructor() { this._ls = new Map(); }
  on(name, fn) {
    if (!this._ls.has(name)) this._ls.set(name, new Set());
    this._ls.get(name).add(fn);
    return () => this.off(name, fn);
  }
  off(name, fn) { const s = this._ls.get(name); if (s) s.delete(fn); }
  once(name, fn) {
    const off = this.on(name, (v) => { off(); fn(v); });
    return off;
  }
  emit(name, value) {
    for (const fn of [...(this._ls.get(name) || [])]) {
      try { fn(value); } catch (e) { setTimeout(() => { throw e; }); }
    }
  }
}

async function restCall(env, base, method, path, body, headers = {}) {
  let res;
  try {
    res = await env.fetch(base + path, {
      method, credentials: 'same-origin', cache: 'no-store', body,
      headers: { Accept: 'application/json', ...headers },
    });
  } catch (e) {
    throw new SageError(`cannot reach the server: ${e.message}`, { code: 'network' });
  }
  const text = await res.text();
  let data = null;
  try { data = text ? JSON.parse(text) : {}; } catch { data = null; }
  if (!res.ok || !data || data.ok === false) {
    const ra = res.headers && res.headers.get('Retry-After');
    const msg = (data && data.error) || (text && text.length < 200 ? text.trim() : '')
      || `the server answered ${res.status}`;
    throw new SageError(msg, {
      status: res.status, retryAfter: ra != null && ra !== '' ? Number(ra) : null, reply: data,
    });
  }
  return data;
}

/** The HTTPS API under /api: sign-in by cookie and bundles. */
export class SageREST {
  constructor({ url = '', fetch = globalThis.fetch && globalThis.fetch.bind(globalThis) } = {}) {
    this.base = url.replace(/\/$/, '');
    this.env = { fetch };
  }
  _json(path, obj) {
    return restCall(this.env, this.base, 'POST', path, JSON.stringify(obj),
      { 'Content-Type': 'application/json' });
  }
  /** → {ok, account}; sets the HttpOnly session cookie. */
  signup(name, password) { return this._json('/api/signup', { name, password }); }
  signin(name, password) { return this._json('/api/signin', { name, password }); }
  signout() { return restCall(this.env, this.base, 'POST', '/api/signout'); }
  /** The signed-in account's name, or null. */
  async whoami() {
    try {
      return (await restCall(this.env, this.base, 'GET', '/api/whoami')).account;
    } catch (e) {
      if (e.status === 401) return null;
      throw e;
    }
  }
  /** Creates a workspace from a git bundle (a Blob, File or bytes) → {ok, workspace}. */
  upload(name, bundle) {
    return restCall(this.env, this.base, 'POST', `/api/workspaces?name=${encodeURIComponent(name)}`,
      bundle, { 'Content-Type': 'application/octet-stream' });
  }
  bundleUrl(workspace) { return `${this.base}/api/workspaces/${encodeURIComponent(workspace)}/bundle`; }
  /** The last save as a Blob. */
  async download(workspace) {
    const res = await this.env.fetch(this.bundleUrl(workspace), { credentials: 'same-origin' });
    if (!res.ok) {
      let msg = `the server answered ${res.status}`;
      try { msg = (await res.json()).error || msg; } catch { /* not JSON */ }
      throw new SageError(msg, { status: res.status });
    }
    return res.blob();
  }
}

/**
 * The connection to the backend. Options: url (the site's origin; default location.origin),
 * prefix ('/sockjs'), transport (force one), transports (factories by name), order, info
 * (false: skip GET /info), heartbeatTimeout (ms), openTimeout (ms), backoff ({base, max,
 * factor}), requestTimeout (ms, for every request), fetch, WebSocket, setTimeout,
 * clearTimeout, random, now, autoReconnect, watchOnline.
 */
export class SageWS extends Emitter {
  constructor(opts = {}) {
    super();
    const g = globalThis;
    this.base = (opts.url ?? (g.location ? g.location.origin : '')).replace(/\/$/, '');
    this.prefix = opts.prefix ?? '/sockjs';
    this.env = {
      fetch: opts.fetch ?? (g.fetch && g.fetch.bind(g)),
      WebSocket: opts.WebSocket ?? g.WebSocket,
      setTimeout: opts.setTimeout ?? g.setTimeout.bind(g),
      clearTimeout: opts.clearTimeout ?? g.clearTimeout.bind(g),
      random: opts.random ?? Math.random,
      now: opts.now ?? (() => Date.now()),
    };
    this.transports = { ...defaultTransports, ...(opts.transports || {}) };
    this.order = opts.transport ? [opts.transport] : (opts.order || TRANSPORTS).slice();
    this.useInfo = opts.info !== false;
    this.heartbeatTimeout = opts.heartbeatTimeout ?? 55000;
    this.openTimeout = opts.openTimeout ?? 10000;
    this.backoff = { base: 500, max: 30000, factor: 2, ...(opts.backoff || {}) };
    this.autoReconnect = opts.autoReconnect !== false;
    this.requestTimeout = opts.requestTimeout ?? 0; // ms; 0: wait as long as it takes
    this.rest = new SageREST({ url: this.base, fetch: this.env.fetch });
    this.state = 'idle';
    this.transport = null; // the name of the transport in use
    this.nextId = 1;
    this._pending = new Map(); // id → request
    this._held = []; // refused as 'restarting' by a stopping server: sent again once reconnected
    this._queue = []; // requests waiting for the connection, in order
    this._inflight = []; // requests sent and not answered, in the order sent
    this._executions = new Map(); // execute id → {workspace, onEvent}
    this.openWorkspaces = new Set();
    this._reopening = new Map(); // workspace → its reopen after a reconnect, while it runs
    this._conn = null;
    this._attempt = 0; // failed attempts since the last stable connection
    this._preferred = null;
    this._timer = null; // reconnect timer
    this._hb = null; // heartbeat timer
    this._opened = false; // opened at least once
    if (g.addEventListener && opts.watchOnline !== false) {
      g.addEventListener('online', () => {
        if (this.state === 'reconnecting' || this.state === 'offline') this._retryNow();
      });
    }
  }

  _setState(state, detail = {}) {
    this.state = state;
    this.emit('state', { state, ...detail });
    if (state !== 'closed' && state !== 'idle') this.emit(state, detail);
  }

  /** Connects (if not connected or connecting); resolves when the session is open. */
  connect() {
    if (this.state === 'idle' || this.state === 'closed') {
      this._attempt = 0;
      this._start();
    }
    if (this.state === 'open') return Promise.resolve();
    return new Promise((resolve) => this.once('open', () => resolve()));
  }

  /** Ends the connection for good (until connect()); pending requests reject. */
  close() {
    this._clearTimers();
    const c = this._conn;
    this._conn = null;
    if (c && c.t) c.t.close();
    this.openWorkspaces.clear();
    this._failAll(new SageError('the connection was closed', { code: 'closed' }));
    this._executions.clear();
    this._setState('closed');
  }

  /** Drops the current connection and connects again at once (e.g. after a cookie sign-in). */
  reconnect() {
    if (this.state === 'idle' || this.state === 'closed') return this.connect();
    const c = this._conn;
    if (c && c.t) {
      c.t.close();
      this._lost(c, { error: 'reconnecting' }, 0);
    } else {
      this._conn = null; // an attempt still asking /info stops when it sees this
      this._retryNow();
    }
    return new Promise((resolve) => this.once('open', () => resolve()));
  }

  _clearTimers() {
    if (this._timer) this.env.clearTimeout(this._timer);
    if (this._hb) this.env.clearTimeout(this._hb);
    if (this._conn && this._conn.openTimer) this.env.clearTimeout(this._conn.openTimer);
    this._timer = this._hb = null;
  }

  _retryNow() {
    if (this._timer) this.env.clearTimeout(this._timer);
    this._timer = null;
    if (!this._conn) this._start();
  }

  async _start() {
    this._timer = null;
    this._setState('connecting', { attempt: this._attempt, reconnect: this._opened });
    let kinds = this.order.slice();
    const p = this._preferred ? kinds.indexOf(this._preferred) : -1;
    if (p > 0) kinds = kinds.slice(p);
    if (this.useInfo) {
      const token = {};
      this._conn = token; // a placeholder: close() during the request stops this attempt
      try {
        const res = await this.env.fetch(`${this.base}${this.prefix}/info`, {
          credentials: 'same-origin', cache: 'no-store',
        });
        if (!res.ok) throw new Error(`HTTP ${res.status}`);
        const info = await res.json();
        if (info.websocket === false && kinds.length > 1) kinds = kinds.filter((k) => k !== 'websocket');
      } catch (e) {
        if (this._conn !== token) return;
        this._conn = null;
        this._failed({ error: `cannot reach the server (${e.message})` });
        return;
      }
      if (this._conn !== token) return;
      this._conn = null;
    }
    this._try(kinds, 0, null);
  }

  _try(kinds, i, last) {
    if (i >= kinds.length) {
      this._preferred = null; // next time, every transport again
      this._failed(last || { error: 'no transport' });
      return;
    }
    const kind = kinds[i];
    const make = this.transports[kind];
    if (!make) { this._try(kinds, i + 1, { error: `unknown transport ${kind}` }); return; }
    const { server, session } = randomIds(this.env.random);
    const url = `${this.base}${this.prefix}/${server}/${session}`;
    const conn = { kind, kinds, i, opened: false, t: null, openTimer: null, openedAt: 0 };
    this._conn = conn;
    const ctx = {
      url,
      wsUrl: url.replace(/^http/, 'ws'),
      env: this.env,
      onframe: (text) => this._onFrame(conn, text),
      onclose: (info) => this._onTransportEnd(conn, info || {}),
    };
    conn.openTimer = this.env.setTimeout(() => {
      conn.openTimer = null;
      if (this._conn === conn && !conn.opened) {
        conn.t.close();
        this._onTransportEnd(conn, { error: `${kind}: no answer in ${this.openTimeout} ms` });
      }
    }, this.openTimeout);
    try {
      conn.t = make(ctx);
    } catch (e) {
      this.env.clearTimeout(conn.openTimer);
      if (this._conn === conn) this._try(kinds, i + 1, { error: `${kind}: ${e.message}` });
    }
  }

  _onTransportEnd(conn, info) {
    if (this._conn !== conn) return;
    if (conn.openTimer) this.env.clearTimeout(conn.openTimer);
    if (!conn.opened) {
      // This transport did not work here (blocked, refused): the next one.
      this._conn = null;
      this._try(conn.kinds, conn.i + 1, info);
    } else {
      this._lost(conn, info);
    }
  }

  _onFrame(conn, text) {
    if (this._conn !== conn) return;
    let f;
    try {
      f = parseFrame(text);
    } catch (e) {
      this.emit('protocol_error', { message: e.message });
      conn.t.close();
      this._onTransportEnd(conn, { error: e.message });
      return;
    }
    if (conn.opened) this._heartbeat(conn);
    if (f.type === 'open') {
      if (conn.opened) {
        // A second "o": the server lost our session and made a new one.
        conn.t.close();
        this._lost(conn, { error: 'the server forgot the session' }, 0);
        return;
      }
      this._onOpen(conn);
    } else if (f.type === 'messages') {
      if (!conn.opened) return;
      for (const m of f.messages) {
        let v;
        try { v = JSON.parse(m); } catch {
          this.emit('protocol_error', { message: `not JSON: ${String(m).slice(0, 80)}` });
          continue;
        }
        this._onMessage(v);
        if (this._conn !== conn) return;
      }
    } else if (f.type === 'close') {
      conn.t.close();
      if (conn.openTimer) this.env.clearTimeout(conn.openTimer);
      const info = { code: f.code, reason: f.reason };
      if (!conn.opened) {
        // Refused (backend full, ...): not the transport's fault; wait and try again.
        this._conn = null;
        this._failed(info);
      } else {
        // 2010: another connection holds the session; 1012: the server restarts (it has handed
        // this session over): reconnect at once.
        this._lost(conn, info, f.code === 2010 || f.code === 1012 ? 0 : undefined);
      }
    }
  }

  _heartbeat(conn) {
    if (this._hb) this.env.clearTimeout(this._hb);
    this._hb = this.env.setTimeout(() => {
      this._hb = null;
      if (this._conn !== conn) return;
      conn.t.close();
      this._lost(conn, { error: `no heartbeat from the server for ${Math.round(this.heartbeatTimeout / 1000)} s` });
    }, this.heartbeatTimeout);
  }

  _onOpen(conn) {
    conn.opened = true;
    conn.openedAt = this.env.now();
    if (conn.openTimer) this.env.clearTimeout(conn.openTimer);
    conn.openTimer = null;
    this._preferred = conn.kind;
    this.transport = conn.kind;
    const reconnected = this._opened;
    this._opened = true;
    this._heartbeat(conn);
    // Workspaces open before the drop first (the server runs requests in order), then the
    // requests that waited, then whatever the page sends when told the connection is open.
    const reopen = [...this.openWorkspaces];
    // A backend that has just started may not have heard from any worker yet (503): the open
    // is tried again, backing off, for a minute while this connection lasts.
    const reopenOne = async (ws) => {
      const until = this.env.now() + REOPEN_PATIENCE;
      let delay = 500;
      for (let first = true; ; first = false) {
        try {
          await this.request('open', { workspace: ws }, { front: first });
          return { ok: ws };
        } catch (e) {
          if (e.status !== 503 || this.env.now() > until || this._conn !== conn) {
            return { failed: { workspace: ws, error: e } };
          }
          await new Promise((r) => this.env.setTimeout(r, delay));
          delay = Math.min(delay * 2, 8000);
        }
      }
    };
    const opens = reopen.map((ws) => {
      const p = reopenOne(ws);
      this._reopening.set(ws, p);
      p.finally(() => { if (this._reopening.get(ws) === p) this._reopening.delete(ws); });
      return p;
    });
    this._flush();
    this._setState('open', { transport: conn.kind, reconnected });
    if (reopen.length) {
      Promise.all(opens).then((rs) => {
        const failed = rs.filter((r) => r.failed).map((r) => r.failed);
        // Lost again meanwhile: the next connection opens them again.
        if (failed.some((f) => f.error.code === 'connection_lost' || f.error.code === 'closed')) return;
        for (const f of failed) this.openWorkspaces.delete(f.workspace);
        this.emit('resumed', { workspaces: rs.filter((r) => r.ok).map((r) => r.ok), failed });
      });
    }
  }

  _lost(conn, info, delay) {
    if (this._conn !== conn) return;
    this._conn = null;
    if (this._hb) this.env.clearTimeout(this._hb);
    this._hb = null;
    if (conn.openedAt && this.env.now() - conn.openedAt > 10000) this._attempt = 0;
    this.emit('disconnected', { code: info.code ?? null, reason: info.reason ?? null, error: info.error ?? null });
    // Requests sent and not answered: reads go again, anything else may or may not have run.
    const again = [];
    for (const p of this._inflight) {
      if (p.retry) {
        p.sent = false;
        again.push(p);
      } else {
        this._pending.delete(p.id);
        this._settle(p);
        const why = info.reason ? `: ${info.reason}` : (info.error ? ` (${info.error})` : '');
        p.reject(new SageError(
          `the connection was lost before the server answered "${p.op}"${why}; it may or may not have been done`,
          { code: 'connection_lost', op: p.op, status: info.code ?? null }));
      }
    }
    this._inflight = [];
    this._queue = again.concat(this._held, this._queue);
    this._held = [];
    // Executes that will be sent on the next connection have not run: not lost.
    const waiting = new Set(this._queue.map((p) => p.id));
    for (const [id, x] of this._executions) {
      if (waiting.has(id)) continue;
      const ev = { event: 'lost', workspace: x.workspace, id,
        message: 'the connection was lost while this cell ran; its output after that is not shown' };
      if (x.onEvent) x.onEvent(ev);
      this.emit('lost', ev);
    }
    for (const id of [...this._executions.keys()]) if (!waiting.has(id)) this._executions.delete(id);
    if (this.autoReconnect) this._schedule(info, delay);
    else this._setState('closed', info);
  }

  _failed(info) {
    this._schedule(info);
  }

  _schedule(info = {}, delay) {
    if (this.state === 'closed') return;
    const d = delay ?? backoffDelay(this._attempt, this.backoff, this.env.random);
    this._attempt++;
    const offline = globalThis.navigator && globalThis.navigator.onLine === false;
    this._setState(offline ? 'offline' : 'reconnecting', {
      attempt: this._attempt, delay: d, code: info.code ?? null, reason: info.reason ?? null,
      error: info.error ?? null,
    });
    this._timer = this.env.setTimeout(() => this._start(), d);
  }

  /**
   * Sends {"id", "op", ...fields}; resolves with the reply, rejects with a SageError.
   * opts: onEvent (an execute's events), retry (send again after a reconnect; default: reads
   * only), timeout (ms).
   */
  request(op, fields = {}, opts = {}) {
    // A workspace being opened again after a reconnect: its requests wait for that.
    const reopening = op !== 'open' && fields.workspace ? this._reopening.get(fields.workspace) : null;
    if (reopening) return reopening.then(() => this._request(op, fields, opts));
    return this._request(op, fields, opts);
  }

  _request(op, fields, opts) {
    if (this.state === 'idle') this.connect();
    const id = this.nextId++;
    const text = JSON.stringify({ id, op, ...fields });
    return new Promise((resolve, reject) => {
      if (this.state === 'closed') {
        reject(new SageError('not connected', { code: 'closed', op }));
        return;
      }
      const p = { id, op, text, resolve, reject, sent: false, workspace: fields.workspace,
        retry: opts.retry ?? SAFE_OPS.has(op), timer: null };
      this._pending.set(id, p);
      if (op === 'execute') this._executions.set(id, { workspace: fields.workspace, onEvent: opts.onEvent });
      const timeout = opts.timeout ?? this.requestTimeout;
      if (timeout) {
        p.timer = this.env.setTimeout(() => {
          if (!this._pending.has(id)) return;
          this._pending.delete(id);
          this._queue = this._queue.filter((q) => q !== p);
          this._inflight = this._inflight.filter((q) => q !== p);
          this._held = this._held.filter((q) => q !== p);
          this._executions.delete(id);
          reject(new SageError(`no answer to "${op}" in ${Math.round(timeout / 1000)} s`, { code: 'timeout', op }));
        }, timeout);
      }
      if (opts.front) this._queue.unshift(p);
      else this._queue.push(p);
      if (this.state === 'open' && !opts.front) this._flush();
    });
  }

  _flush() {
    const c = this._conn;
    if (!c || !c.opened || !this._queue.length) return;
    const batch = this._queue;
    this._queue = [];
    for (const p of batch) p.sent = true;
    this._inflight.push(...batch);
    try {
      c.t.send(batch.map((p) => p.text));
    } catch (e) {
      c.t.close();
      this._onTransportEnd(c, { error: `sending failed: ${e.message}` });
    }
  }

  _settle(p) {
    if (p.timer) this.env.clearTimeout(p.timer);
  }

  _failAll(err) {
    for (const p of this._pending.values()) {
      this._settle(p);
      p.reject(err);
    }
    this._pending.clear();
    this._queue = [];
    this._inflight = [];
    this._held = [];
  }

  _onMessage(m) {
    if (m === null || typeof m !== 'object') {
      this.emit('protocol_error', { message: 'a message that is not an object' });
    } else if (typeof m.event === 'string') {
      this._onEvent(m);
    } else if ('ok' in m) {
      this._onReply(m);
    } else {
      this.emit('protocol_error', { message: 'a message that is neither a reply nor an event' });
    }
  }

  _onReply(m) {
    let p;
    if (m.id === null || m.id === undefined) {
      // The server could not read a request (too large, ...); it answers in order, so this
      // is the oldest one sent.
      p = this._inflight[0];
    } else {
      p = this._pending.get(m.id);
    }
    if (!p) return; // timed out already
    this._inflight = this._inflight.filter((q) => q !== p);
    if (!m.ok && m.code === 'restarting') {
      // The server is stopping and did nothing with it: sent again once reconnected (the
      // server closes this connection next, with 1012).
      p.sent = false;
      this._held.push(p);
      return;
    }
    this._pending.delete(p.id);
    this._settle(p);
    if (m.ok) {
      const ws = m.workspace ?? p.workspace;
      if (p.op === 'open') this.openWorkspaces.add(ws);
      else if (p.op === 'close' || p.op === 'delete') this.openWorkspaces.delete(ws);
      else if (p.op === 'signout') this.openWorkspaces.clear();
      p.resolve(m);
    } else {
      this._executions.delete(p.id);
      p.reject(new SageError(m.error || `"${p.op}" failed`, {
        status: m.status ?? null, retryAfter: m.retry_after ?? null, op: p.op, reply: m,
      }));
    }
  }

  _onEvent(ev) {
    const x = typeof ev.id === 'number' ? this._executions.get(ev.id) : undefined;
    if (x) {
      if (ev.event === 'done') this._executions.delete(ev.id);
      if (x.onEvent) {
        try { x.onEvent(ev); } catch (e) { setTimeout(() => { throw e; }); }
      }
    }
    if (ev.event === 'closed' && ev.reason === 'deleted') this.openWorkspaces.delete(ev.workspace);
    this.emit(ev.event, ev);
    this.emit('event', ev);
  }

  // One method per op.
  ping() { return this.request('ping'); }
  whoami() { return this.request('whoami'); }
  signin(name, password) { return this.request('signin', { name, password }); }
  signup(name, password) { return this.request('signup', { name, password }); }
  signout() { return this.request('signout'); }
  list() { return this.request('list'); }
  create(name, bundleBase64) {
    return this.request('create', bundleBase64 ? { name, bundle: bundleBase64 } : { name });
  }
  rename(workspace, name) { return this.request('rename', { workspace, name }); }
  delete(workspace) { return this.request('delete', { workspace }); }
  open(workspace) { return this.request('open', { workspace }); }
  closeWorkspace(workspace) { return this.request('close', { workspace }); }
  /** Runs code; `onEvent` gets this execute's stdout/stderr/image/truncated/done (and 'lost'). */
  /** Operators only: workers, backends and the latest audit records. */
  fleet() { return this.request('fleet'); }
  /** Operators only: drain (true) or undrain (false) a worker. */
  drainWorker(worker, drain) { return this.request('drain_worker', { worker, drain }); }
  execute(workspace, code, onEvent) { return this.request('execute', { workspace, code }, { onEvent }); }
  interrupt(workspace) { return this.request('interrupt', { workspace }); }
  save(workspace, message) {
    return this.request('save', message ? { workspace, message } : { workspace });
  }
  history(workspace) { return this.request('history', { workspace }); }
  revert(workspace, commit) { return this.request('revert', { workspace, commit }); }
  publish(workspace, path) { return this.request('publish', path ? { workspace, path } : { workspace }); }
  files(workspace) { return this.request('files', { workspace }); }
  read(workspace, path) { return this.request('read', { workspace, path }); }
  write(workspace, path, data) { return this.request('write', { workspace, path, data }); }
  remove(workspace, path) { return this.request('remove', { workspace, path }); }
}

export default SageWS;
