// A stand-in backend for trying the page without the real one: serves static/ with the site's
// CSP and speaks the REST API and SockJS (xhr-streaming and xhr-polling; websocket upgrades are
// refused, so the client's fallback is exercised too) with made-up workspaces kept in memory.
// Usage: node tests/js/fake_backend.mjs [port]   then open http://127.0.0.1:PORT/
// Cells: code containing "sleep" streams for a few seconds; "plot" sends an image; "error"
// fails; "flood" prints past the cap (a truncated event); anything else echoes.
import http from 'node:http';
import { readFile } from 'node:fs/promises';
import { fileURLToPath } from 'node:url';
import path from 'node:path';
import zlib from 'node:zlib';

const STATIC = path.join(path.dirname(fileURLToPath(import.meta.url)), '../../static');
const CSP = "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; "
  + "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'";
// A small picture (a blue gradient with a diagonal), made here as a PNG.
const PNG = (() => {
  const crcTable = Array.from({ length: 256 }, (_, n) => {
    let c = n;
    for (let k = 0; k < 8; k++) c = c & 1 ? 0xedb88320 ^ (c >>> 1) : c >>> 1;
    return c >>> 0;
  });
  const crc = (b) => { let c = ~0; for (const x of b) c = crcTable[(c ^ x) & 255] ^ (c >>> 8); return ~c >>> 0; };
  const chunk = (type, data) => {
    const t = Buffer.concat([Buffer.from(type), data]);
    const len = Buffer.alloc(4); len.writeUInt32BE(data.length);
    const c = Buffer.alloc(4); c.writeUInt32BE(crc(t));
    return Buffer.concat([len, t, c]);
  };
  const [w, h] = [120, 80];
  const raw = Buffer.alloc((w * 3 + 1) * h);
  for (let y = 0; y < h; y++) {
    for (let x = 0; x < w; x++) {
      const o = y * (w * 3 + 1) + 1 + x * 3;
      const on = Math.abs(x * h - y * w) < w * 2;
      raw[o] = on ? 200 : 30; raw[o + 1] = on ? 40 : 60 + y; raw[o + 2] = on ? 40 : 120 + x;
    }
  }
  const ihdr = Buffer.alloc(13);
  ihdr.writeUInt32BE(w); ihdr.writeUInt32BE(h, 4); ihdr[8] = 8; ihdr[9] = 2;
  return Buffer.concat([Buffer.from([137, 80, 78, 71, 13, 10, 26, 10]), chunk('IHDR', ihdr),
    chunk('IDAT', zlib.deflateSync(raw)), chunk('IEND', Buffer.alloc(0))]).toString('base64');
})();

export function startFakeBackend(port = 0) {
  const accounts = new Map(); // name → {password, workspaces: Map}
  const sessions = new Map(); // sockjs session id → session
  const streams = new Set(); // responses waiting to stream or poll
  let wsSeq = 0;

  const cookieAccount = (req) => {
    const m = /(?:^|;\s*)sagews_session=tok-([^;]+)/.exec(req.headers.cookie || '');
    return m && accounts.has(decodeURIComponent(m[1])) ? decodeURIComponent(m[1]) : null;
  };
  const json = (res, status, obj, headers = {}) => {
    res.writeHead(status, { 'Content-Type': 'application/json', ...headers });
    res.end(JSON.stringify(obj));
  };
  const body = (req) => new Promise((resolve) => {
    const chunks = [];
    req.on('data', (c) => chunks.push(c));
    req.on('end', () => resolve(Buffer.concat(chunks)));
  });
  const fleet = {
    workers: new Map(['worker1', 'worker2'].map((host, i) => [host, { host, address: `10.77.0.${14 + i}:7000`,
      capacity: 32, sessions: 2 - i, load: 0.25, heard_seconds_ago: 1.5, seen_by: 'backend1', draining: false }])),
    audit: [{ ts_ms: Date.now() - 60000, host: 'sagectl', target: 'sagectl::up',
      message: 'operator@box ran sagectl up: 5 hosts, 0 changed', fields: {} }],
  };
  const newWs = (acct, name, files = { 'README.md': `# ${name}\n` }) => {
    const id = `w${(++wsSeq).toString(16).padStart(15, '0')}`;
    acct.workspaces.set(id, { id, name, files: new Map(Object.entries(files)), saved: null,
      history: [], published: false, updated: Math.floor(Date.now() / 1000) - 3600, version: 0 });
    return id;
  };

  function api(s, text) {
    let m;
    try { m = JSON.parse(text); } catch { return s.push({ id: null, ok: false, error: 'invalid JSON' }); }
    const reply = (r) => s.push({ id: m.id, ok: true, ...r });
    const err = (error, status = 400, extra = {}) => s.push({ id: m.id, ok: false, error, status, ...extra });
    const acct = s.account && accounts.get(s.account);
    if (m.op === 'ping') return reply({ pong: true });
    if (m.op === 'whoami') return reply({ account: s.account });
    if (!acct) return err('sign in first', 401);
    const w = m.workspace && acct.workspaces.get(m.workspace);
    const needWs = () => { if (!w) { err(`no workspace ${JSON.stringify(m.workspace)} in your account`, 404); return false; } return true; };
    switch (m.op) {
      // The account named "operator" is the deployment's operator (as backend.admins names).
      case 'fleet':
        if (s.account !== 'operator') return err('only the deployment\'s operators may do this', 403);
        return reply({ workers: [...fleet.workers.values()], backends: [{ host: 'backend1', sockjs_sessions: 2,
          open_workspaces: 1, stopping: false, heard_seconds_ago: 1.2 }], audit: fleet.audit, audit_error: null });
      case 'drain_worker': {
        if (s.account !== 'operator') return err('only the deployment\'s operators may do this', 403);
        const wk = fleet.workers.get(m.worker);
        if (!wk) return err(`no worker ${m.worker} is registered with this backend`, 404);
        wk.draining = m.drain;
        fleet.audit.unshift({ ts_ms: Date.now(), host: 'backend1', target: 'backend.audit',
          message: `operator operator ${m.drain ? 'drain' : 'undrain'}ed worker ${m.worker}`, fields: {} });
        return reply({ worker: m.worker, draining: m.drain });
      }
      case 'signout': s.account = null; return reply({});
      case 'list': return reply({ workspaces: [...acct.workspaces.values()].sort((a, b) => a.name.localeCompare(b.name))
        .map((x) => ({ workspace: x.id, name: x.name, version: x.version, updated: x.updated, published: x.published })) });
      case 'create': {
        if ([...acct.workspaces.values()].some((x) => x.name === m.name)) return err(`you already have a workspace named ${JSON.stringify(m.name)}`, 409);
        return reply({ workspace: newWs(acct, m.name) });
      }
      case 'rename': if (!needWs()) return; w.name = m.name; return reply({ workspace: w.id, name: m.name });
      case 'delete': if (!needWs()) return; acct.workspaces.delete(w.id); return reply({ workspace: w.id });
      case 'open': if (!needWs()) return; s.open.add(w.id); return setTimeout(() => reply({ workspace: w.id, name: w.name, worker: 'worker1' }), 300);
      case 'close': s.open.delete(m.workspace); return reply({ workspace: m.workspace });
      case 'execute': {
        if (!needWs()) return;
        if (!s.open.has(w.id)) return err(`workspace "${w.id}" is not open on this connection: send "open" first`);
        reply({ workspace: w.id });
        return run(s, w, m.id, m.code);
      }
      case 'interrupt':
        if (!needWs()) return;
        for (const r of s.running.values()) if (r.ws === w.id) r.stop('interrupted');
        return reply({ workspace: w.id });
      case 'save': {
        if (!needWs()) return;
        const snap = JSON.stringify([...w.files]);
        const changed = snap !== w.saved;
        if (changed) {
          w.saved = snap;
          w.version++;
          w.updated = Math.floor(Date.now() / 1000);
          w.history.unshift({ commit: Math.random().toString(16).slice(2).padEnd(40, '0').slice(0, 40),
            time: w.updated, message: m.message || 'Save', snap });
        }
        return reply({ workspace: w.id, changed });
      }
      case 'history': if (!needWs()) return; return reply({ workspace: w.id, history: w.history.map(({ commit, time, message }) => ({ commit, time, message })) });
      case 'revert': {
        if (!needWs()) return;
        const h = w.history.find((x) => x.commit === m.commit);
        if (!h) return err('no such commit', 404);
        w.files = new Map(JSON.parse(h.snap));
        const commit = Math.random().toString(16).slice(2).padEnd(40, '1').slice(0, 40);
        w.history.unshift({ commit, time: Math.floor(Date.now() / 1000), message: `Revert to ${h.message}`, snap: h.snap });
        w.saved = h.snap;
        return reply({ workspace: w.id, commit });
      }
      case 'publish':
        if (!needWs()) return;
        w.published = true;
        return reply({ workspace: w.id, url: `https://sage.example.org/pub/${w.id}/`, files: m.path ? [m.path] : [...w.files.keys()], hosts: ['static1'] });
      case 'files': if (!needWs()) return; return reply({ files: [...w.files].map(([p, d]) => ({ path: p, size: Buffer.byteLength(d) })) });
      case 'read': {
        if (!needWs()) return;
        if (!w.files.has(m.path)) return err(`no file ${m.path}`, 404);
        const d = w.files.get(m.path);
        return reply({ path: m.path, data: d, size: Buffer.byteLength(d) });
      }
      case 'write': if (!needWs()) return; w.files.set(m.path, m.data); return reply({ path: m.path, size: Buffer.byteLength(m.data) });
      case 'remove': if (!needWs()) return; w.files.delete(m.path); return reply({});
      default: return err(`unknown op ${JSON.stringify(m.op)}`);
    }
  }

  function run(s, w, id, code) {
    const ev = (e) => s.push({ workspace: w.id, id, ...e });
    const r = { ws: w.id, timers: [], stop(status, message = null) {
      r.timers.forEach(clearTimeout);
      s.running.delete(id);
      ev({ event: 'done', status, message });
    } };
    s.running.set(id, r);
    const later = (ms, fn) => r.timers.push(setTimeout(fn, ms));
    if (code.includes('sleep')) {
      for (let i = 1; i <= 10; i++) later(i * 400, () => ev({ event: 'stdout', data: `tick ${i}\n` }));
      later(4200, () => r.stop('ok'));
    } else if (code.includes('plot')) {
      ev({ event: 'stdout', data: 'a figure:\n' });
      ev({ event: 'image', mime: 'image/png', data: PNG });
      r.stop('ok');
    } else if (code.includes('error')) {
      ev({ event: 'stderr', data: 'Traceback (most recent call last):\n  File "<cell>", line 1\nNameError: name \'error\' is not defined\n' });
      r.stop('error', 'NameError');
    } else if (code.includes('flood')) {
      ev({ event: 'stdout', data: 'x'.repeat(2000) });
      ev({ event: 'truncated', message: 'output truncated: this cell printed more than 4194304 bytes (the rest is not shown; interrupt it to stop it)' });
      r.stop('ok');
    } else {
      ev({ event: 'stdout', data: `ran: ${code}\n` });
      r.stop('ok');
    }
  }

  function session(id, account) {
    const s = { id, account, out: [], open: new Set(), running: new Map(), wait: null, closed: false,
      push(m) { s.out.push(JSON.stringify(m)); if (s.wait) s.wait(); } };
    sessions.set(id, s);
    return s;
  }
  const frame = (s) => `a${JSON.stringify(s.out.splice(0))}\n`;

  const server = http.createServer(async (req, res) => {
    const url = new URL(req.url, 'http://x');
    const p = url.pathname;
    try {
      if (p === '/api/signup' || p === '/api/signin') {
        const c = JSON.parse((await body(req)).toString() || '{}');
        if (p === '/api/signup') {
          if (accounts.has(c.name)) return json(res, 409, { ok: false, error: 'that name is taken' });
          if (!c.password || c.password.length < 8) return json(res, 400, { ok: false, error: 'a password is at least 8 characters' });
          accounts.set(c.name, { password: c.password, workspaces: new Map() });
          newWs(accounts.get(c.name), 'Example');
        } else if (!accounts.has(c.name) || accounts.get(c.name).password !== c.password) {
          if (c.password === 'ratelimited') return json(res, 429, { ok: false, error: 'too many failed sign-ins' }, { 'Retry-After': '60' });
          return json(res, 401, { ok: false, error: 'wrong name or password' });
        }
        return json(res, 200, { ok: true, account: c.name },
          { 'Set-Cookie': `sagews_session=tok-${encodeURIComponent(c.name)}; Path=/; HttpOnly; SameSite=Strict` });
      }
      if (p === '/api/signout') {
        return json(res, 200, { ok: true }, { 'Set-Cookie': 'sagews_session=; Path=/; Max-Age=0; HttpOnly' });
      }
      if (p === '/api/whoami') {
        const a = cookieAccount(req);
        return a ? json(res, 200, { ok: true, account: a }) : json(res, 401, { ok: false, error: 'sign in first (no session cookie)' });
      }
      if (p === '/api/workspaces' && req.method === 'POST') {
        const a = cookieAccount(req);
        if (!a) return json(res, 401, { ok: false, error: 'sign in first' });
        const b = await body(req);
        if (!b.length) return json(res, 400, { ok: false, error: 'the request body must be a git bundle' });
        return json(res, 201, { ok: true, workspace: newWs(accounts.get(a), url.searchParams.get('name'), { 'from-bundle.txt': `${b.length} bytes\n` }) });
      }
      let m = /^\/api\/workspaces\/([^/]+)\/bundle$/.exec(p);
      if (m) {
        res.writeHead(200, { 'Content-Type': 'application/x-git-bundle', 'Content-Disposition': `attachment; filename="${m[1]}.bundle"` });
        return res.end('fake bundle');
      }
      // Test hooks: drop every connection and forget every session (a backend restart), or
      // send an event to every session.
      if (p === '/test/drop') {
        for (const r of streams) r.destroy();
        streams.clear();
        sessions.clear();
        return json(res, 200, { ok: true });
      }
      if (p === '/test/event') {
        const ev = JSON.parse((await body(req)).toString());
        for (const x of sessions.values()) if (x.open.has(ev.workspace)) x.push(ev);
        return json(res, 200, { ok: true });
      }
      if (p === '/sockjs/info') return json(res, 200, { websocket: true, cookie_needed: false, origins: ['*:*'], entropy: 1 });
      m = /^\/sockjs\/([^/]+)\/([^/]+)\/(xhr|xhr_streaming|xhr_send)$/.exec(p);
      if (m && req.method === 'POST') {
        const [, , sid, kind] = m;
        let s = sessions.get(sid);
        if (kind === 'xhr_send') {
          if (!s) { res.writeHead(404); return res.end(); }
          const msgs = JSON.parse((await body(req)).toString());
          res.writeHead(204);
          res.end();
          for (const t of msgs) api(s, t);
          return undefined;
        }
        res.writeHead(200, { 'Content-Type': 'application/javascript; charset=UTF-8', 'Cache-Control': 'no-store' });
        if (kind === 'xhr_streaming') res.write(`${'h'.repeat(2048)}\n`);
        if (!s) {
          s = session(sid, cookieAccount(req));
          if (kind === 'xhr') return res.end('o\n');
          res.write('o\n');
        }
        streams.add(res);
        const beat = setInterval(() => res.write('h\n'), 25000);
        const flush = () => {
          if (!s.out.length) return;
          res.write(frame(s));
          if (kind === 'xhr') { s.wait = null; clearInterval(beat); res.end(); }
        };
        s.wait = flush;
        res.on('close', () => { streams.delete(res); clearInterval(beat); if (s.wait === flush) s.wait = null; });
        flush();
        return undefined;
      }
      if (p.startsWith('/sockjs')) { res.writeHead(404); return res.end('Not found\n'); }
      // Static files, with the site's headers.
      const file = path.join(STATIC, p === '/' ? 'index.html' : path.normalize(p).replace(/^(\.\.[/\\])+/, ''));
      if (!file.startsWith(STATIC)) { res.writeHead(404); return res.end(); }
      const data = await readFile(file);
      const type = { '.html': 'text/html', '.js': 'application/javascript', '.css': 'text/css', '.json': 'application/json', '.svg': 'image/svg+xml' }[path.extname(file)] || 'application/octet-stream';
      res.writeHead(200, { 'Content-Type': `${type}; charset=utf-8`, 'Content-Security-Policy': CSP, 'X-Content-Type-Options': 'nosniff' });
      return res.end(data);
    } catch (e) {
      if (!res.headersSent) { res.writeHead(e.code === 'ENOENT' || e.code === 'EISDIR' ? 404 : 500); }
      return res.end();
    }
  });
  // Websocket upgrades: refused, so the page falls back to xhr-streaming.
  server.on('upgrade', (req, socket) => socket.destroy());
  return new Promise((resolve) => server.listen(port, '127.0.0.1', () => resolve(server)));
}

if (process.argv[1] === fileURLToPath(import.meta.url)) {
  const server = await startFakeBackend(Number(process.argv[2] || 8765));
  console.log(`fake backend on http://127.0.0.1:${server.address().port}/`);
}
